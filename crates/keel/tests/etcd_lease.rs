//! etcd's Lease service on a 3-node Keel cluster, where it depends on which
//! member answers: a follower's LeaseTimeToLive answers what the leader's
//! clock says (etcd asks its leader), whatever the follower's own clock
//! reads; and a keep-alive stream, through a follower, lives through
//! leader changes, each renewal answered (etcd retries a renewal that
//! found no leader until its request timeout instead of failing the
//! stream, which clients such as the etcd-client crate do not reopen);
//! and the follower keeps one connection to the leader for them.

mod common;

use common::{etcd_channel, faketime_or_skip, TestCluster};
use keel_etcd_proto::etcdserverpb::lease_client::LeaseClient;
use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_etcd_proto::etcdserverpb::*;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

/// Restarts node `id` with its wall clock `offset` (libfaketime's syntax,
/// e.g. "+3600") away from the machine's; its monotonic clocks are left
/// alone.
fn restart_with_clock(c: &mut TestCluster, id: u64, lib: &Path, offset: &str) {
    restart_with_faketime(c, id, lib, &[("FAKETIME", offset)]);
}

/// Restarts node `id` under libfaketime with `env` (its settings), its
/// monotonic clocks left alone.
fn restart_with_faketime(c: &mut TestCluster, id: u64, lib: &Path, env: &[(&str, &str)]) {
    let lib = lib.to_str().expect("a UTF-8 path");
    let mut all = vec![("LD_PRELOAD", lib), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")];
    all.extend_from_slice(env);
    c.restart_with_env(id, &all);
}

/// The TTL node `at` reports for `id`, retried while the node (re)starts
/// or has no leader.
async fn ttl_at(addr: &str, id: i64) -> LeaseTimeToLiveResponse {
    let mut lease = LeaseClient::new(etcd_channel(addr).await);
    let start = Instant::now();
    loop {
        match lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
            .await
        {
            Ok(r) => return r.into_inner(),
            Err(e) if start.elapsed() < WAIT => {
                eprintln!("time-to-live at {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("time-to-live at {addr}: {e}"),
        }
    }
}

/// A follower whose wall clock is an hour ahead (or behind) still reports
/// the TTL the leader's clock gives: not "expired" (TTL -1), not an hour
/// too long. etcd's followers ask the leader; Keel's did the arithmetic
/// on their own clock.
#[test]
fn time_to_live_on_a_follower_does_not_depend_on_its_clock() {
    let Some(lib) = faketime_or_skip("time_to_live_on_a_follower_does_not_depend_on_its_clock")
    else {
        return;
    };
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(WAIT);
    let mut followers = (1..=3).filter(|&id| id != leader);
    let (ahead, behind) = (followers.next().unwrap(), followers.next().unwrap());
    restart_with_clock(&mut c, ahead, &lib, "+3600");
    restart_with_clock(&mut c, behind, &lib, "-3600");
    let (now_leader, _) = c.wait_for_leader(WAIT);
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let (leader_at, ahead_at, behind_at) = (at(leader), at(ahead), at(behind));
    c.rt.block_on(async {
        if now_leader != leader {
            // The leader with the true clock (log time is its clock).
            MaintenanceClient::new(etcd_channel(&at(now_leader)).await)
                .move_leader(MoveLeaderRequest { target_id: leader })
                .await
                .expect("move the leadership back");
        }
        let mut lease = LeaseClient::new(etcd_channel(&leader_at).await);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id;
        for (name, addr) in [
            ("leader", &leader_at),
            ("follower an hour ahead", &ahead_at),
            ("follower an hour behind", &behind_at),
        ] {
            let r = ttl_at(addr, id).await;
            assert_eq!(r.granted_ttl, 600, "{name}: {r:?}");
            assert!(
                (560..=600).contains(&r.ttl),
                "{name} reports TTL {} of 600 (the leader's clock gives about 600): {r:?}",
                r.ttl
            );
        }
    });
}

/// The leader answers a time-to-live from the clock its lease timers fire
/// on (log time: its wall clock at start, then a clock that never steps),
/// not from its wall clock read now: after the leader's wall clock is
/// stepped an hour ahead (an NTP correction, say), a 600 s lease still
/// reports about 600 s, as long as it does live on; from the wall clock
/// it was reported expired (TTL -1).
#[test]
fn time_to_live_on_the_leader_follows_log_time_when_its_wall_clock_steps() {
    let Some(lib) =
        faketime_or_skip("time_to_live_on_the_leader_follows_log_time_when_its_wall_clock_steps")
    else {
        return;
    };
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(WAIT);
    let offset_file = c.nodes[leader as usize - 1].dir.join("clock-offset");
    std::fs::write(&offset_file, "+0\n").expect("write the clock offset");
    let offset_path = offset_file.to_str().expect("a UTF-8 path").to_string();
    restart_with_faketime(
        &mut c,
        leader,
        &lib,
        &[
            ("FAKETIME_TIMESTAMP_FILE", &offset_path),
            ("FAKETIME_NO_CACHE", "1"),
        ],
    );
    let (now_leader, _) = c.wait_for_leader(WAIT);
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    let (leader_at, follower_at) = (at(leader), at(follower));
    let id = c.rt.block_on(async {
        // The restarted node leads again (log time is the leader's clock).
        let deadline = Instant::now() + WAIT;
        if now_leader != leader {
            loop {
                let ch = etcd_channel(&at(now_leader)).await;
                let moved = MaintenanceClient::new(ch)
                    .move_leader(MoveLeaderRequest { target_id: leader })
                    .await;
                match moved {
                    Ok(_) => break,
                    Err(e) if Instant::now() < deadline => {
                        eprintln!("move the leadership to {leader}: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("move the leadership to {leader}: {e}"),
                }
            }
        }
        LeaseClient::new(etcd_channel(&leader_at).await)
            .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id
    });
    assert_eq!(c.wait_for_leader(WAIT).0, leader, "the leader moved");
    // The leader's wall clock jumps an hour ahead; its log clock does not.
    std::fs::write(&offset_file, "+3600\n").expect("step the leader's clock");
    c.rt.block_on(async {
        for (name, addr) in [("leader", &leader_at), ("follower", &follower_at)] {
            let r = ttl_at(addr, id).await;
            assert_eq!(r.granted_ttl, 600, "{name}: {r:?}");
            assert!(
                (560..=600).contains(&r.ttl),
                "the {name} reports TTL {} of a 600 s lease after the leader's wall clock \
                 stepped an hour ahead (its timer fires in about 600 s): {r:?}",
                r.ttl
            );
        }
    });
    assert_eq!(c.wait_for_leader(WAIT).0, leader, "the leader moved");
}

/// Keep-alives sent on one stream through a follower while leadership
/// moves around the cluster: every one is answered with the lease's TTL,
/// and the stream never fails.
#[test]
fn keep_alive_stream_through_a_follower_lives_through_leader_changes() {
    let c = TestCluster::start(3, "");
    let (mut leader, _) = c.wait_for_leader(WAIT);
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    // Leader changes are the point, not a follower yet to hear of one.
    let start = Instant::now();
    while c.status(follower).and_then(|s| s.leader) != Some(leader) {
        assert!(
            start.elapsed() < WAIT,
            "node {follower} never learned of the leader"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let addrs: Vec<String> = (1..=3).map(at).collect();
    c.rt.block_on(async {
        let ch = etcd_channel(&addrs[follower as usize - 1]).await;
        let mut lease = LeaseClient::new(ch.clone());
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 60, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut answers = lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("keep-alive stream")
            .into_inner();
        // Renew without pause, one at a time, in the background, counting
        // the answers.
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        let renewals = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                count.store(n, Ordering::Relaxed);
                if tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                    return Ok(n);
                }
                match tokio::time::timeout(WAIT, answers.message()).await {
                    Ok(Ok(Some(r))) if r.id == id && r.ttl == 60 => n += 1,
                    Ok(Ok(Some(r))) => return Err(format!("renewal {n} answered {r:?}")),
                    Ok(Ok(None)) => return Err(format!("stream ended after {n} renewals")),
                    Ok(Err(e)) => return Err(format!("stream failed after {n} renewals: {e}")),
                    Err(_) => return Err(format!("renewal {n} unanswered within {WAIT:?}")),
                }
            }
        });
        for round in 0..6 {
            let target = (1..=3u64)
                .filter(|&t| t != leader)
                .nth(round % 2)
                .expect("a target");
            let mut m = MaintenanceClient::new(etcd_channel(&addrs[leader as usize - 1]).await);
            m.move_leader(MoveLeaderRequest { target_id: target })
                .await
                .unwrap_or_else(|e| panic!("move leader {leader} -> {target}: {e}"));
            leader = target;
            // Renewals go on under the new leader (or the stream failed).
            let (before, start) = (answered.load(Ordering::Relaxed), Instant::now());
            while answered.load(Ordering::Relaxed) < before + 3 {
                if renewals.is_finished() {
                    panic!("keep-alive stopped: {:?}", renewals.await);
                }
                assert!(
                    start.elapsed() < WAIT,
                    "no renewal answered within {WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        renewals.abort();
        let ttl = ttl_at(&addrs[0], id).await;
        assert!(ttl.ttl > 50, "{ttl:?}");
    });
}

/// The TCP connections (in any state, TIME_WAIT included) with an end on
/// `port` on loopback, from the kernel's tables (Linux).
fn connections_on_port(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address rem_address st, as HEX_IP:HEX_PORT and hex.
            let [_, local, remote, state, ..] = cols[..] else {
                continue;
            };
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            const LISTEN: &str = "0A";
            if state != LISTEN && (port_of(local) == Some(port) || port_of(remote) == Some(port)) {
                n += 1;
            }
        }
    }
    n
}

/// A follower passes each time-to-live to the leader over one connection
/// it keeps, not a new one per call: 100 calls leave at most a connection
/// (two sockets: the follower's end and the leader's) on the leader's etcd
/// port, where a connection per call left a socket in TIME_WAIT per call.
#[test]
fn time_to_live_on_a_follower_reuses_its_connection_to_the_leader() {
    if !std::path::Path::new("/proc/net/tcp").exists() {
        eprintln!("skipping: no /proc/net/tcp to count connections in (Linux only)");
        return;
    }
    let c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(WAIT);
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let leader_port: u16 = at(leader)
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the leader's etcd port");
    let (before, after) = c.rt.block_on(async {
        let mut lease = LeaseClient::new(etcd_channel(&at(follower)).await);
        let id = lease
            .lease_grant(LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id;
        // The first call opens the connection.
        let first = ttl_at(&at(follower), id).await;
        assert!(first.ttl > 0, "{first:?}");
        let before = connections_on_port(leader_port);
        for _ in 0..100 {
            let r = lease
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
                .await
                .expect("time-to-live through the follower")
                .into_inner();
            assert_eq!(r.granted_ttl, 600, "{r:?}");
        }
        (before, connections_on_port(leader_port))
    });
    // (A leader change would have sent calls elsewhere: say so rather
    // than pass.)
    let (now_leader, _) = c.wait_for_leader(WAIT);
    assert_eq!(now_leader, leader, "the leader changed during the test");
    assert!(
        after <= before.max(2),
        "100 time-to-live calls through follower {follower} left {after} sockets on the \
         leader's etcd port {leader_port} (there were {before} after the first call)"
    );
}

/// After a leader change, a lease nobody renews lives its TTL plus an
/// election timeout (the cluster's: 1 s) from when the new leader took
/// over, as etcd's do (its new leader's lessor `Promote`s every lease by
/// an election timeout); Keel's gave only the TTL.
#[test]
fn a_new_leader_extends_every_lease_by_an_election_timeout() {
    const TTL: i64 = 3;
    const ELECTION_TIMEOUT: Duration = Duration::from_millis(common::ELECTION_MAX_MS);
    let c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(WAIT);
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let (leader_at, follower_at) = (at(leader), at(follower));
    let (lived, moved_in) = c.rt.block_on(async {
        let lch = etcd_channel(&leader_at).await;
        let id = LeaseClient::new(lch.clone())
            .lease_grant(LeaseGrantRequest { ttl: TTL, id: 0 })
            .await
            .expect("grant")
            .into_inner()
            .id;
        // The new leader's term starts after this instant.
        let moved_at = Instant::now();
        MaintenanceClient::new(lch)
            .move_leader(MoveLeaderRequest {
                target_id: follower,
            })
            .await
            .expect("move the leadership");
        let moved_in = moved_at.elapsed();
        let mut lease = LeaseClient::new(etcd_channel(&follower_at).await);
        loop {
            let r = lease
                .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false })
                .await
                .expect("time-to-live at the new leader")
                .into_inner();
            if r.ttl == -1 {
                break (moved_at.elapsed(), moved_in);
            }
            assert!(
                moved_at.elapsed() < Duration::from_secs(30),
                "the lease still lives: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let least = Duration::from_secs(TTL as u64) + ELECTION_TIMEOUT;
    assert!(
        lived + Duration::from_millis(50) >= least,
        "the lease ended {lived:?} after the leadership transfer began (it took {moved_in:?}): \
         before a TTL and an election timeout ({least:?}) from the new leader's start"
    );
    assert_eq!(
        c.wait_for_leader(WAIT).0,
        follower,
        "the leader moved again"
    );
}
