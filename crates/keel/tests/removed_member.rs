//! A member removed from the cluster learns it and stops for good: its
//! `keel server` exits saying so, leaves a `REMOVED` file in its data
//! directory and refuses to start on it again; the remaining members keep
//! serving. Also when it was down while removed (it learns it from the
//! answers to its pre-votes once it is back).

mod common;

use common::*;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// What the node says, and writes, when it learns it was removed.
const REMOVED: &str = "this member was removed from the cluster";

/// Waits for node `id`'s `keel server` to exit on its own.
fn wait_exit(c: &mut TestCluster, id: u64, within: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        let child = c.nodes[(id - 1) as usize]
            .child
            .as_mut()
            .expect("node not running");
        if let Some(status) = child.try_wait().expect("wait") {
            c.nodes[(id - 1) as usize].child = None;
            return status;
        }
        if start.elapsed() > within {
            panic!(
                "node {id} was still running {within:?} after its removal{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn removed_file(c: &TestCluster, id: u64) -> std::path::PathBuf {
    c.node(id).dir.join("data").join("REMOVED")
}

/// `keel cluster remove id`, asked of the cluster.
fn remove(c: &TestCluster, id: u64) {
    let (code, text) = c.keel_cli(&["cluster", "remove", &id.to_string()]);
    assert_eq!(code, 0, "keel cluster remove {id}: {text}");
}

/// The removed node `id` exited with the explanation, left `REMOVED`, and
/// a new start on its data directory is refused, saying how to add it
/// back; the others still take writes.
fn assert_removed_for_good(c: &mut TestCluster, id: u64, status: ExitStatus) {
    assert!(!status.success(), "node {id} exited with {status}");
    let log = c.log_of(id);
    assert!(
        log.contains(&format!("node {id} was removed from cluster")) && log.contains(REMOVED),
        "node {id}'s log does not say it was removed:\n{log}"
    );
    let marker = std::fs::read_to_string(removed_file(c, id)).expect("the REMOVED file");
    assert!(
        marker.contains(&format!("node {id}")) && marker.contains("join = true"),
        "{marker}"
    );

    // Started again on the same data: refused at once, with the reason.
    let before = log.len();
    c.spawn(id);
    let status = wait_exit(c, id, Duration::from_secs(20));
    assert!(!status.success());
    let again = &c.log_of(id)[before..];
    assert!(
        again.contains(&format!("node {id} was removed from the cluster"))
            && again.contains("REMOVED")
            && again.contains("join = true")
            && again.contains("add-learner"),
        "the refused start does not explain itself:\n{again}"
    );

    // The remaining members still serve writes, and see it gone.
    let mut client = c.client();
    c.put(&mut client, "after-removal", "yes");
    c.check_acked(&mut client);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let status = c.status(leader).expect("leader status");
    assert!(
        !status.voters.contains(&id) && !status.learners.contains(&id),
        "{status:?}"
    );
}

#[test]
fn a_removed_follower_exits_and_refuses_to_start_again() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let follower = (1..=3).find(|&n| n != leader).unwrap();
    remove(&c, follower);
    let status = wait_exit(&mut c, follower, Duration::from_secs(15));
    assert!(
        c.log_of(follower)
            .contains(&format!("node {leader} says so")),
        "{}",
        c.log_of(follower)
    );
    assert_removed_for_good(&mut c, follower, status);
}

#[test]
fn a_removed_leader_hands_over_exits_and_refuses_to_start_again() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    remove(&c, leader);
    let status = wait_exit(&mut c, leader, Duration::from_secs(15));
    assert!(
        c.log_of(leader)
            .contains("it committed its own removal as the leader"),
        "{}",
        c.log_of(leader)
    );
    assert_removed_for_good(&mut c, leader, status);
}

/// A node killed, removed while down, and started again once the leader
/// has long stopped telling it (10 maximum election timeouts): its
/// pre-votes are answered with the removal, and it exits.
#[test]
fn a_node_removed_while_down_learns_it_when_it_starts_again() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let target = (1..=3).find(|&n| n != leader).unwrap();
    c.kill(target);
    remove(&c, target);
    c.put(&mut client, "while-down", "1");
    // Past the leader's notices (a bound, not a wait for an outcome).
    std::thread::sleep(Duration::from_millis(11 * ELECTION_MAX_MS));
    assert!(!removed_file(&c, target).exists());
    let before = c.log_of(target).len();
    c.spawn(target);
    let status = wait_exit(&mut c, target, Duration::from_secs(20));
    let log = c.log_of(target)[before..].to_string();
    let other = (1..=3).find(|&n| n != leader && n != target).unwrap();
    assert!(
        log.contains(&format!("node {leader} says so"))
            || log.contains(&format!("node {other} says so")),
        "{log}"
    );
    assert_removed_for_good(&mut c, target, status);
}
