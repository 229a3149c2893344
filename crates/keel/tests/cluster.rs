//! Real `keel server` processes on loopback: writes and linearizable reads,
//! leader SIGKILL and failover, restart and catch-up, SIGSTOP of a follower
//! without disruption (each with 3 and 5 nodes), a 5-node cluster losing
//! two nodes, a follower back from a power loss (`replicated` durability),
//! and a wiped node rejoining through a snapshot install. Every
//! test ends by reading back every acknowledged write.

mod common;

use common::{wait_metric, TestCluster, ELECTION_MAX_MS};
use keel_client::Client;
use std::time::{Duration, Instant};

/// SIGKILL the leader of an `n`-node cluster: a new leader within two
/// election timeouts, writes continue; restart the old leader: it catches up.
fn leader_kill_failover_and_catch_up(n: u64) {
    let mut c = TestCluster::start(n, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    for i in 0..50 {
        c.put(&mut client, &format!("k{i}"), &format!("v{i}"));
    }
    assert_eq!(c.get(&mut client, "k7").as_deref(), Some("v7"));

    c.kill(leader);
    let killed_at = Instant::now();
    let (new_leader, new_term) = c.wait_for_leader(Duration::from_secs(10));
    let took = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    assert!(new_term > term);
    assert!(
        // (One timeout to notice, one more for a split vote, and room
        // for a stall on a busy machine.)
        took < Duration::from_millis(4 * ELECTION_MAX_MS + 1000),
        "{n} nodes: a new leader took {took:?} (election timeout at most {ELECTION_MAX_MS} ms)"
    );
    for i in 50..100 {
        c.put(&mut client, &format!("k{i}"), &format!("v{i}"));
    }

    c.spawn(leader);
    let commit = c.status(new_leader).expect("leader status").commit;
    c.wait_applied(leader, commit, Duration::from_secs(15));
    c.check_acked(&mut client);
}

#[test]
fn three_nodes_survive_a_leader_kill_and_the_old_leader_catches_up() {
    leader_kill_failover_and_catch_up(3);
}

#[test]
fn five_nodes_survive_a_leader_kill_and_the_old_leader_catches_up() {
    leader_kill_failover_and_catch_up(5);
}

/// SIGSTOP a follower of an `n`-node cluster for longer than the election
/// timeout while writes go on, then SIGCONT: it catches up without
/// disrupting the leader (pre-vote and leader stickiness).
fn paused_follower_does_not_disrupt_the_leader(n: u64) {
    let mut c = TestCluster::start(n, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    let follower = (1..=n).find(|&id| id != leader).expect("a follower");
    let mut client = c.client();
    c.pause(follower);
    let until = Instant::now() + Duration::from_millis(3 * ELECTION_MAX_MS);
    let mut i = 0;
    while Instant::now() < until {
        c.put(&mut client, &format!("p{i}"), "x");
        i += 1;
    }
    c.resume(follower);
    // Give it time to time out, pre-vote and be refused, and catch up.
    let commit = c.status(leader).expect("leader status").commit;
    c.wait_applied(follower, commit, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(2 * ELECTION_MAX_MS));
    let s = c.status(leader).expect("leader status");
    assert_eq!(
        (s.role.as_str(), s.term),
        ("leader", term),
        "{n} nodes: the returning follower disrupted the leader"
    );
    assert_eq!(c.status(follower).expect("follower status").term, term);
    c.check_acked(&mut client);
}

#[test]
fn a_paused_follower_does_not_disrupt_the_leader_when_it_returns() {
    paused_follower_does_not_disrupt_the_leader(3);
}

#[test]
fn a_paused_follower_of_five_does_not_disrupt_the_leader_when_it_returns() {
    paused_follower_does_not_disrupt_the_leader(5);
}

#[test]
fn five_nodes_keep_serving_with_two_down() {
    let mut c = TestCluster::start(5, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    for i in 0..20 {
        c.put(&mut client, &format!("a{i}"), "1");
    }
    let other = (1..=5).find(|&n| n != leader).expect("another node");
    c.kill(leader);
    c.kill(other);
    c.wait_for_leader(Duration::from_secs(10));
    for i in 0..20 {
        c.put(&mut client, &format!("b{i}"), "2");
    }
    c.check_acked(&mut client);
}

/// `replicated` durability: a follower whose machine went down (its
/// recorded boot id differs, as after a power loss) comes back amnesic,
/// and with the leader down too it helps elect no leader (it may have lost
/// entries that only its acknowledgement committed); once the old leader
/// is back a leader is elected, every acknowledged write is there, and the
/// follower catches up and is amnesic no more. Its log comes back with a
/// hole near its end, as pages written before a power loss may reach the
/// disk out of order: it starts, cutting the log at the hole (a log with a
/// hole is refused when no power loss explains it).
#[test]
fn a_follower_back_from_a_power_loss_elects_no_leader_until_it_caught_up() {
    let (mut c, leader, term, mut client) =
        with_a_log_of_several_sectors("durability = \"replicated\"\n");
    let mut followers = (1..=3).filter(|&n| n != leader);
    let (lost, other) = (followers.next().unwrap(), followers.next().unwrap());
    let data = c.node(lost).dir.join("data");
    let boot = std::fs::read_to_string(data.join("BOOT")).expect("BOOT recorded");
    assert!(boot.ends_with(" replicated\n"), "{boot:?}");
    c.kill(leader);
    c.kill(lost);
    // As after a power loss: another boot, and a sector of the log's end
    // never written while the one after it was.
    punch_a_hole_near_the_end_of_the_log(&data);
    std::fs::write(data.join("BOOT"), "0-another-boot replicated\n").expect("write BOOT");
    c.spawn(lost);
    c.wait_status(lost, |s| s.term > term);
    assert!(data.join("AMNESIC").exists());
    assert!(c.log_of(lost).contains("votes as amnesic"));
    assert!(
        c.log_of(lost)
            .contains("recovery after a power loss cut a torn tail"),
        "{}",
        c.logs()
    );
    // Several election timeouts with the two of them up: no leader.
    let until = Instant::now() + Duration::from_millis(4 * ELECTION_MAX_MS);
    while Instant::now() < until {
        for n in [lost, other] {
            let s = c.status(n);
            assert!(
                s.as_ref().is_none_or(|s| s.role != "leader"),
                "node {n} leads with the amnesic node's vote: {s:?}{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.spawn(leader);
    c.wait_for_leader(Duration::from_secs(10));
    c.put(&mut client, "after", "2");
    c.check_acked(&mut client);
    // (Logged once the file is gone.)
    c.wait_log(lost, "no longer amnesic", "still amnesic");
    assert!(!data.join("AMNESIC").exists());
}

/// `sync` durability: a follower whose machine went down (its recorded
/// boot id differs, as after a power loss during a write or a sync) may
/// come back with a hole in its log's unsynced end. It starts, cutting the
/// log at the hole, as amnesic: a `sync` node acknowledges an entry only
/// once a sync covering it returned, which made every page before it
/// durable, so nothing after such a hole was acknowledged, but a disk that
/// damaged synced data leaves the same (as here: the hole is punched in
/// synced entries). It catches up from the leader and is amnesic no more,
/// and every acknowledged write is there. Before, the node refused to
/// start, and a whole cluster back from a power cut could need every node
/// rebuilt.
#[test]
fn a_sync_follower_back_from_a_reboot_cuts_a_hole_in_its_log_end() {
    let (mut c, leader, _, mut client) = with_a_log_of_several_sectors("");
    let rebooted = (1..=3).find(|&n| n != leader).expect("a follower");
    let data = c.node(rebooted).dir.join("data");
    let boot = std::fs::read_to_string(data.join("BOOT")).expect("BOOT recorded");
    assert!(boot.ends_with(" sync\n"), "{boot:?}");
    c.kill(rebooted);
    punch_a_hole_near_the_end_of_the_log(&data);
    std::fs::write(data.join("BOOT"), "0-another-boot sync\n").expect("write BOOT");
    c.spawn(rebooted);
    c.put(&mut client, "after", "2");
    c.wait_log(
        rebooted,
        "recovery after a reboot cut a torn tail",
        "did not start cutting its log at the hole",
    );
    c.wait_status(rebooted, |s| s.term > 0);
    assert!(
        c.log_of(rebooted).contains("votes as amnesic"),
        "{}",
        c.logs()
    );
    // It gets every write again, and is amnesic no more (logged once the
    // file is gone).
    c.wait_log(rebooted, "no longer amnesic", "still amnesic");
    assert!(!data.join("AMNESIC").exists());
    assert!(!data.join("HOLE_CUT").exists());
    // The leader (another one, maybe: the node's higher term deposed the
    // first) down, the other two elect a leader that serves every write.
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let commit = c.status(leader).expect("leader status").commit;
    c.wait_applied(rebooted, commit, Duration::from_secs(20));
    c.kill(leader);
    let (elected, _) = c.wait_for_leader(Duration::from_secs(10));
    assert_ne!(elected, leader);
    c.check_acked(&mut client);
}

/// Three nodes (with `extra` configuration) and 20 acknowledged writes of
/// 100 bytes, so that every log spans several sectors: the cluster, its
/// leader and term, and the client that wrote them.
fn with_a_log_of_several_sectors(extra: &str) -> (TestCluster, u64, u64, Client) {
    let mut c = TestCluster::start(3, extra);
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    let value = "1".repeat(100);
    for i in 0..20 {
        c.put(&mut client, &format!("p{i}"), &value);
    }
    (c, leader, term, client)
}

/// Zeroes the last whole 512-byte sector before the last one of the last
/// log segment in `data`, which must hold more than two sectors.
fn punch_a_hole_near_the_end_of_the_log(data: &std::path::Path) {
    let last = std::fs::read_dir(data)
        .expect("data directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a log segment");
    let mut bytes = std::fs::read(&last).expect("read segment");
    let sectors = bytes.len() / 512;
    assert!(sectors >= 3, "the log is too short: {} bytes", bytes.len());
    let hole = (sectors - 2) * 512;
    bytes[hole..hole + 512].fill(0);
    assert!(bytes[hole + 512..].iter().any(|&b| b != 0));
    std::fs::write(&last, bytes).expect("write segment");
}

/// `replicated` durability: a follower stopped gracefully (SIGTERM) syncs
/// what it wrote and marks its boot record `synced`, so a reboot of its
/// machine is not taken for a power loss: back on another boot it is not
/// amnesic, and with the leader down it and the other follower elect a
/// leader that has every acknowledged write. Its start takes the mark
/// away (a power loss from then on is one again).
#[test]
fn a_follower_rebooted_after_a_graceful_stop_is_not_amnesic() {
    let mut c = TestCluster::start(3, "durability = \"replicated\"\n");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    for i in 0..20 {
        c.put(&mut client, &format!("p{i}"), "1");
    }
    let stopped = (1..=3).find(|&n| n != leader).expect("a follower");
    let data = c.node(stopped).dir.join("data");
    let exit = c.terminate(stopped, Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}{}", c.logs());
    let boot = std::fs::read_to_string(data.join("BOOT")).expect("BOOT recorded");
    assert!(boot.ends_with(" replicated synced\n"), "{boot:?}");
    c.kill(leader);
    // As after a reboot: another boot, the mark kept.
    std::fs::write(data.join("BOOT"), "0-another-boot replicated synced\n").expect("write");
    c.spawn(stopped);
    let (elected, _) = c.wait_for_leader(Duration::from_secs(10));
    assert_ne!(elected, leader);
    c.put(&mut client, "after", "2");
    c.check_acked(&mut client);
    assert!(!data.join("AMNESIC").exists());
    assert!(!c.log_of(stopped).contains("votes as amnesic"));
    let boot = std::fs::read_to_string(data.join("BOOT")).expect("BOOT recorded");
    assert!(boot.ends_with(" replicated\n"), "{boot:?}");
}

#[test]
fn a_wiped_node_rejoins_through_a_snapshot() {
    wiped_node_rejoins_through_a_snapshot("");
}

/// The same with the service on the consensus thread, which then restores
/// the installed snapshot in line.
#[test]
fn a_wiped_node_rejoins_through_a_snapshot_with_the_service_on_the_consensus_thread() {
    wiped_node_rejoins_through_a_snapshot("service_thread = \"shared\"");
}

fn wiped_node_rejoins_through_a_snapshot(extra: &str) {
    // Snapshot every 4 KiB so the log is compacted and a wiped node cannot
    // catch up from the log alone.
    let config = format!("snapshot_every_bytes = 4096\n{extra}");
    let mut c = TestCluster::start(3, &config);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    for i in 0..200 {
        c.put(&mut client, &format!("key-{i:04}"), &format!("value-{i}"));
    }
    let victim = (1..=3).find(|&n| n != leader).expect("a follower");
    c.kill(victim);
    c.wipe(victim);
    let http = c.enable_http(victim);
    for i in 200..220 {
        c.put(&mut client, &format!("key-{i:04}"), &format!("value-{i}"));
    }
    c.spawn(victim);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let commit = c.status(leader).expect("leader status").commit;
    c.wait_applied(victim, commit, Duration::from_secs(15));
    // One published snapshot (briefly two while a newer one replaces it).
    let data = c.node(victim).dir.join("data");
    let published = || {
        std::fs::read_dir(&data)
            .expect("data dir")
            .filter_map(Result::ok)
            .filter(|e| {
                // Not counting one being staged right now.
                let name = e.file_name().to_string_lossy().into_owned();
                name.starts_with("snap-") && name.ends_with(".snap")
            })
            .count()
    };
    let start = Instant::now();
    while published() != 1 && start.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        published(),
        1,
        "the wiped node should hold one snapshot, the installed one or a newer own one"
    );
    // It got there by installing the leader's snapshot, not by replaying a
    // log that starts at 0.
    let installed = wait_metric(
        &http,
        "keel_snapshots_installed_total",
        Duration::from_secs(5),
        |v| v > 0.0,
    );
    assert!(installed >= 1.0);
    // The rejoined node serves the early keys from its own state.
    let q = keel_kv::Query::Get {
        key: bytes::Bytes::from_static(b"key-0003"),
    };
    let mut direct = keel_client::Client::new(keel_client::ClientOptions::new(vec![c
        .node(victim)
        .client
        .clone()]))
    .expect("client");
    let (data, _, _) =
        c.rt.block_on(direct.stale_read(q.encode()))
            .expect("stale read");
    match keel_kv::Response::decode(&data) {
        Ok(keel_kv::Response::Get { kv: Some(kv), .. }) => assert_eq!(&kv.value[..], b"value-3"),
        other => panic!("unexpected {other:?}"),
    }
    c.check_acked(&mut client);
}

/// A peer that stays unreachable is said in the log (a warning naming it
/// and its address), not only at debug level: a node whose configuration
/// names a wrong peer address would otherwise wait in silence.
#[test]
fn an_unreachable_peer_is_reported() {
    let mut c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    // Node 1 dials the higher ids.
    let addr = c.node(3).peer.clone();
    c.kill(3);
    let want = format!("cannot reach node 3 at {addr}");
    let start = Instant::now();
    while !c.log_of(1).contains(&want) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no warning about node 3 in node 1's log:\n{}",
            c.log_of(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(start.elapsed() >= Duration::from_secs(4), "warned at once");
}
