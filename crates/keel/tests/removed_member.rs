//! A member removed from the cluster learns it and stops for good: its
//! `keel server` exits saying so, leaves a `REMOVED` file in its data
//! directory and refuses to start on it again; the remaining members keep
//! serving. Also when it was down while removed (it learns it from the
//! answers to its pre-votes once it is back). Its id is never used again:
//! `keel cluster add-learner` refuses it, even for a new node started under
//! it, while a node under a new id joins.

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
/// a new start on its data directory is refused, saying that its id is
/// never used again and how to add a node under a new one; the others still
/// take writes.
fn assert_removed_for_good(c: &mut TestCluster, id: u64, status: ExitStatus) {
    assert!(!status.success(), "node {id} exited with {status}");
    let log = c.log_of(id);
    assert!(
        log.contains(&format!("node {id} was removed from cluster")) && log.contains(REMOVED),
        "node {id}'s log does not say it was removed:\n{log}"
    );
    let marker = std::fs::read_to_string(removed_file(c, id)).expect("the REMOVED file");
    let never = format!("the id {id} is never used again");
    assert!(
        marker.contains(&format!("node {id}"))
            && marker.contains(&never)
            && marker.contains("under a new id")
            && marker.contains("join = true"),
        "{marker}"
    );
    assert!(
        log.contains(&never) && !log.contains(&format!("add-learner {id}")),
        "{log}"
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
            && again.contains(&never)
            && again.contains("add-learner <new id>")
            && !again.contains(&format!("add-learner {id}")),
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

/// `keel cluster add-learner` of a removed id is refused with the reason
/// (it exits 2), even while a new node runs under that id on an empty data
/// directory with `join = true`: that node is never added, and waits as
/// any joining node (it does not stop, nor does the cluster's leadership
/// move). A node under a new id (a spare every member's `[[peers]]`
/// lists) joins and is promoted. The help says ids are never reused.
#[test]
fn a_removed_id_is_never_added_again_and_a_new_id_joins() {
    let (code, help) = keel(["cluster", "add-learner", "--help"]);
    assert_eq!(code, 0, "{help}");
    assert!(help.contains("Ids are never reused"), "{help}");

    let mut c = TestCluster::start_with_spares(3, 1, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let f = (1..=3).find(|&n| n != leader).unwrap();
    remove(&c, f);
    let status = wait_exit(&mut c, f, Duration::from_secs(15));
    assert!(!status.success(), "{status}");

    // A new node under the removed id: empty data, `join = true`.
    c.wipe(f);
    let config = std::fs::read_to_string(&c.node(f).config).expect("config");
    std::fs::write(&c.node(f).config, format!("join = true\n{config}")).expect("config");
    let before = c.log_of(f).len();
    c.spawn(f);
    c.wait_status(f, |s| s.voters.is_empty() && s.learners.is_empty());

    let reason = format!(
        "node {f} was removed from the cluster and its id is never used again: start the new \
         node under a new id"
    );
    for _ in 0..2 {
        let (code, text) = c.keel_cli(&["cluster", "add-learner", &f.to_string()]);
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("refused") && text.contains(&reason), "{text}");
    }
    // Written after the refusals: every member has the configuration the
    // refusals were checked against.
    c.put(&mut client, "after-refusal", "1");
    // `keel cluster status` names the members as the leader knows them,
    // and the removed id (the spare, not started yet, is unreachable).
    let (_, text) = c.keel_cli(&["cluster", "status"]);
    let voters: Vec<String> = (1..=3).filter(|&n| n != f).map(|n| n.to_string()).collect();
    let line = format!(
        "voters {}; learners none; removed, never used again: {f}",
        voters.join(", ")
    );
    assert!(text.contains(&line), "{line:?} in:\n{text}");
    for id in (1..=3).filter(|&n| n != f) {
        let s = c.status(id).expect("a member's status");
        assert!(
            !s.voters.contains(&f) && !s.learners.contains(&f),
            "node {id}: {s:?}"
        );
    }
    let s = c.status(leader).expect("the leader's status");
    assert_eq!(
        (s.role.as_str(), s.term),
        ("leader", term),
        "the leadership moved"
    );
    // The node under the removed id still runs, waiting to be added.
    let s = c.status(f).expect("the joining node's status");
    assert!(s.voters.is_empty() && s.learners.is_empty(), "{s:?}");
    assert!(
        c.nodes[(f - 1) as usize]
            .child
            .as_mut()
            .expect("running")
            .try_wait()
            .expect("wait")
            .is_none(),
        "the node under the removed id exited:\n{}",
        &c.log_of(f)[before..]
    );
    assert!(!removed_file(&c, f).exists());
    // Quietly: nothing tells it about its refusal, and nothing loops (its
    // start and its links take a few lines).
    let joined_log = c.log_of(f)[before..].to_string();
    assert!(
        joined_log.lines().count() < 20 && !joined_log.contains("ERROR"),
        "{joined_log}"
    );

    // A node under a new id joins and becomes a voter.
    c.spawn(4);
    let (code, text) = c.keel_cli(&["cluster", "add-learner", "4"]);
    assert_eq!(code, 0, "{text}");
    let start = Instant::now();
    loop {
        let (code, text) = c.keel_cli(&["cluster", "promote", "4"]);
        if code == 0 {
            break;
        }
        assert!(
            text.contains("not caught up") && start.elapsed() < Duration::from_secs(20),
            "{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = c.status(leader).expect("the leader's status");
    let others: Vec<u64> = (1..=3).filter(|&n| n != f).chain([4]).collect();
    let mut voters = s.voters.clone();
    voters.sort_unstable();
    assert_eq!(voters, others, "{s:?}");
    c.put(&mut client, "after-join", "1");
    c.check_acked(&mut client);
}

/// A voter whose disk was lost, started again with an empty data directory
/// and `join = true`: its leader still counts it as a voter, and a node
/// still joining ignores such a leader (it would be a learner), since it
/// holds neither the term nor the log the voter acknowledged. It waits for
/// good (term 0, no configuration) and says why, while the others keep
/// taking writes; the way back is a new id.
#[test]
fn a_voter_whose_disk_was_lost_started_to_join_waits_and_says_why() {
    let mut c = TestCluster::start(3, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let f = (1..=3).find(|&n| n != leader).unwrap();
    c.kill(f);
    c.wipe(f);
    let config = std::fs::read_to_string(&c.node(f).config).expect("config");
    std::fs::write(&c.node(f).config, format!("join = true\n{config}")).expect("config");
    let before = c.log_of(f).len();
    c.spawn(f);
    let start = Instant::now();
    let why = "a leader counts this node as a voter though it was started to join";
    while !c.log_of(f)[before..].contains(why) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no warning:\n{}",
            &c.log_of(f)[before..]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.log_of(f)[before..].contains("give it a new id"));
    let s = c.status(f).expect("the joining node's status");
    assert!(s.voters.is_empty() && s.learners.is_empty(), "{s:?}");
    assert_eq!(s.term, 0, "it took its leader's term: {s:?}");
    c.put(&mut client, "after", "1");
    let s = c.status(leader).expect("the leader's status");
    assert_eq!((s.role.as_str(), s.term), ("leader", term), "{s:?}");
    c.check_acked(&mut client);
}
