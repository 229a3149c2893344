//! Real `keel server` processes on loopback: writes and linearizable reads,
//! leader SIGKILL and failover, restart and catch-up, SIGSTOP of a follower
//! without disruption, a 5-node cluster losing two nodes, and a wiped node
//! rejoining through a snapshot. Every test ends by reading back every
//! acknowledged write.

mod common;

use common::{TestCluster, ELECTION_MAX_MS};
use std::time::{Duration, Instant};

#[test]
fn three_nodes_survive_a_leader_kill_and_the_old_leader_catches_up() {
    let mut c = TestCluster::start(3, "");
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
        took < Duration::from_millis(2 * ELECTION_MAX_MS + 500),
        "a new leader took {took:?} (election timeout at most {ELECTION_MAX_MS} ms)"
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
fn a_paused_follower_does_not_disrupt_the_leader_when_it_returns() {
    let mut c = TestCluster::start(3, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    let follower = (1..=3).find(|&n| n != leader).expect("a follower");
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
        "the returning follower disrupted the leader"
    );
    assert_eq!(c.status(follower).expect("follower status").term, term);
    c.check_acked(&mut client);
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

#[test]
fn a_wiped_node_rejoins_through_a_snapshot() {
    // Snapshot every 4 KiB so the log is compacted and a wiped node cannot
    // catch up from the log alone.
    let mut c = TestCluster::start(3, "snapshot_every_bytes = 4096");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    for i in 0..200 {
        c.put(&mut client, &format!("key-{i:04}"), &format!("value-{i}"));
    }
    let victim = (1..=3).find(|&n| n != leader).expect("a follower");
    c.kill(victim);
    c.wipe(victim);
    for i in 200..220 {
        c.put(&mut client, &format!("key-{i:04}"), &format!("value-{i}"));
    }
    c.spawn(victim);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let commit = c.status(leader).expect("leader status").commit;
    c.wait_applied(victim, commit, Duration::from_secs(15));
    let snaps = std::fs::read_dir(c.node(victim).dir.join("data"))
        .expect("data dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap-"))
        .count();
    assert_eq!(
        snaps, 1,
        "the wiped node should hold the installed snapshot"
    );
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
