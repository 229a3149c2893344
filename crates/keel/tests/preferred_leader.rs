//! Preferred leaders with real `keel server` processes: a three-node
//! cluster whose nodes all have `preferred_leaders = [1]` settles on node
//! 1, gives leadership back to node 1 when it returns after a crash (the
//! node that handed it over counts the hand-over in
//! `keel_leader_preference_transfers_total`), loses no acknowledged write
//! on the way, and keeps an operator's transfer away from node 1 for the
//! rest of that term. Also: the flags reach the configuration, and bad
//! values are refused by name.
//!
//! Without the feature none of this holds: with no preference a healthy
//! leader is never deposed, so the node elected while node 1 was down
//! keeps leading after node 1 restarts and `node_1_leads` times out; and
//! which node wins the first election is chance.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// The hold: the shortest the configuration takes with the tests' maximum
/// election timeout (1000 ms) is 1000; a little more keeps the hand-over
/// clear of an election's timing.
const HOLD_MS: u64 = 1500;

fn preference() -> String {
    format!("preferred_leaders = [1]\npreferred_leader_hold_ms = {HOLD_MS}\n")
}

/// The leader and term a majority of the running nodes agree on, if any
/// (one round of status requests).
fn agreed_leader(c: &TestCluster) -> Option<(u64, u64)> {
    let statuses: Vec<_> = c
        .nodes
        .iter()
        .filter(|n| n.child.is_some())
        .filter_map(|n| c.status(n.id))
        .collect();
    let l = statuses
        .iter()
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)?;
    let agree = statuses
        .iter()
        .filter(|s| s.leader == Some(l.id) && s.term == l.term)
        .count();
    (agree * 2 > l.voters.len()).then_some((l.id, l.term))
}

/// Waits (polling, `within` at most) until a majority agrees that node
/// `id` leads; returns its term.
fn wait_leader_is(c: &TestCluster, id: u64, within: Duration) -> u64 {
    let start = Instant::now();
    loop {
        match agreed_leader(c) {
            Some((l, term)) if l == id => return term,
            other => assert!(
                start.elapsed() < within,
                "node {id} does not lead after {within:?} (leader, term: {other:?}){}",
                c.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn transfers(http: &str) -> f64 {
    let (code, body) = http_get(http, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert_openmetrics(&body);
    metric(&body, "keel_leader_preference_transfers_total")
        .unwrap_or_else(|| panic!("no keel_leader_preference_transfers_total at {http}:\n{body}"))
}

#[test]
fn leadership_returns_to_the_preferred_node_and_an_operator_transfer_stays() {
    let (mut c, http) = TestCluster::start_with_http(3, &preference());
    let mut client = c.client();

    // (a) The cluster settles on node 1: it stands first (the others'
    // election timeouts come after its range), or is handed leadership
    // once it has answered for a hold.
    let term = wait_leader_is(&c, 1, Duration::from_secs(15));
    assert!(
        c.log_of(1).contains("preferred leaders {1}"),
        "no start line naming the preferred leaders{}",
        c.logs()
    );
    c.put(&mut client, "before-crash", "1");

    // (b) Node 1 crashes: another node is elected and takes writes.
    c.kill(1);
    let (stand_in, stand_in_term) = c.wait_for_leader(Duration::from_secs(15));
    assert_ne!(stand_in, 1);
    assert!(stand_in_term > term);
    c.put(&mut client, "during-outage", "2");
    let handed_before = transfers(&http[stand_in as usize - 1]);
    // Node 1 returns: once it has answered the stand-in for a hold, the
    // stand-in hands it leadership (a healthy leader is never deposed
    // otherwise: node 1 hears it at once and does not stand).
    c.spawn(1);
    let back_term = wait_leader_is(&c, 1, Duration::from_secs(15));
    assert!(back_term > stand_in_term);
    let handed = transfers(&http[stand_in as usize - 1]);
    assert!(
        handed >= 1.0 && handed > handed_before,
        "node {stand_in} handed leadership to node 1 but counts {handed} transfers (before: \
         {handed_before}){}",
        c.logs()
    );
    c.put(&mut client, "after-return", "3");
    c.check_acked(&mut client);

    // (c) An operator moves leadership from node 1 to node 2.
    let (code, text) = c.keel_cli(&["cluster", "transfer-leader", "2"]);
    assert_eq!(code, 0, "{text}{}", c.logs());
    let moved_term = wait_leader_is(&c, 2, Duration::from_secs(5));
    let node2_before = transfers(&http[1]);
    // Node 2 was elected through a transfer, so it keeps leadership for
    // the term although node 1 answers it without a break. Without that
    // rule it would hand leadership back one hold after its term's first
    // entry committed; this watches for two holds and a second more. A
    // bounded observation of a rule, not a wait for something to happen:
    // every answer must show node 2 leading that same term.
    let watch = Duration::from_millis(2 * HOLD_MS + 1000);
    let start = Instant::now();
    // (A status request that goes unanswered under load proves nothing
    // either way and is skipped; node 2 must answer most polls.)
    let (mut polls, mut answered) = (0, 0);
    while start.elapsed() < watch {
        polls += 1;
        for id in 1..=3 {
            let Some(s) = c.status(id) else { continue };
            if id == 2 {
                answered += 1;
            }
            let ok = if id == 2 {
                s.role == "leader" && s.term == moved_term
            } else {
                s.role != "leader" && s.term == moved_term
            };
            assert!(
                ok,
                "an operator's transfer to node 2 was undone after {:?}: node {id} is {} in \
                 term {} (node 2 led term {moved_term}){}",
                start.elapsed(),
                s.role,
                s.term,
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        answered * 2 > polls,
        "node 2 answered {answered} of {polls} polls"
    );
    assert_eq!(
        transfers(&http[1]),
        node2_before,
        "node 2 tried to hand over"
    );
    c.put(&mut client, "after-transfer", "4");
    c.check_acked(&mut client);
}

/// `keel server --preferred-leaders` and `--preferred-leader-hold-ms` set
/// the configuration (the validation error shows both values), and bad
/// values are refused before anything starts, naming the setting.
#[test]
fn preferred_leader_flags_are_applied_and_checked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let data = data.to_str().expect("utf-8");
    let base = [
        "--id",
        "1",
        "--data-dir",
        data,
        "--peer-addr",
        "127.0.0.1:1",
        "--client-addr",
        "127.0.0.1:2",
    ];
    let run = |more: &[&str]| keel(["server"].iter().chain(&base).chain(more));
    for (more, wants) in [
        (
            &["--preferred-leaders", "1,0"][..],
            "preferred_leaders [1, 0]: node id 0 is 0",
        ),
        (
            &["--preferred-leaders", "2,1,2"],
            "preferred_leaders [2, 1, 2]: node id 2 is listed twice",
        ),
        (
            &[
                "--preferred-leaders",
                "1",
                "--preferred-leader-hold-ms",
                "999",
            ],
            "preferred_leader_hold_ms (999) must be at least election_timeout_max_ms (1000)",
        ),
        (
            &["--preferred-leader-hold-ms", "0"],
            "preferred_leader_hold_ms (0) must be between 1",
        ),
    ] {
        let (code, text) = run(more);
        assert_ne!(code, 0, "{more:?}: {text}");
        assert!(text.contains(wants), "{more:?}: {text}");
    }
    assert!(
        !std::path::Path::new(data).exists(),
        "a refused configuration wrote its data directory"
    );
    // A valid pair passes the checks: `keel restore` (which takes the same
    // flags) gets as far as the backup it is given.
    let (code, text) = keel(
        ["restore", "/nonexistent/backup.keel"]
            .iter()
            .chain(&base)
            .chain(&[
                "--preferred-leaders",
                "1,2",
                "--preferred-leader-hold-ms",
                "1000",
            ]),
    );
    assert_ne!(code, 0);
    assert!(
        text.contains("reading backup /nonexistent/backup.keel"),
        "{text}"
    );
    // `none` clears a list the configuration file sets (here an invalid
    // one, so the difference shows before anything starts); a list that is
    // not ids says so.
    let file = tmp.path().join("keel.toml");
    std::fs::write(
        &file,
        format!(
            "id = 1\ndata_dir = {data:?}\npeer_addr = \"127.0.0.1:1\"\n\
             client_addr = \"127.0.0.1:2\"\npreferred_leaders = [1, 0]\n"
        ),
    )
    .expect("config file");
    let file = file.to_str().expect("utf-8");
    let restore = |more: &[&str]| {
        keel(
            ["restore", "/nonexistent/backup.keel", "--config", file]
                .iter()
                .chain(more),
        )
    };
    let (code, text) = restore(&[]);
    assert_ne!(code, 0);
    assert!(text.contains("node id 0 is 0"), "{text}");
    let (code, text) = restore(&["--preferred-leaders", "none"]);
    assert_ne!(code, 0);
    assert!(
        text.contains("reading backup /nonexistent/backup.keel"),
        "{text}"
    );
    let (code, text) = run(&["--preferred-leaders", "1,two"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("\"two\" is not a node id: expected ids separated by commas (1,2) or none"),
        "{text}"
    );
    // `keel dev` refuses a list that names no node of its cluster, before
    // it writes anything.
    let dev_dir = tmp.path().join("dev");
    let dev_dir = dev_dir.to_str().expect("utf-8");
    for (list, wants) in [
        (
            "1,4",
            "--preferred-leaders 1,4: node 4 is not one of this cluster's nodes (1 to 3)",
        ),
        ("0", "node 0 is not one of this cluster's nodes"),
        ("2,2", "--preferred-leaders 2,2: node 2 is listed twice"),
    ] {
        let (code, text) = keel(["dev", "--dir", dev_dir, "--preferred-leaders", list]);
        assert_ne!(code, 0, "{list}: {text}");
        assert!(text.contains(wants), "{list}: {text}");
        assert!(
            !std::path::Path::new(dev_dir).exists(),
            "{list}: keel dev left files"
        );
    }
    // The help says what they are for.
    let (code, help) = keel(["server", "--help"]);
    assert_eq!(code, 0, "{help}");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for wants in [
        "--preferred-leaders",
        "writers' region",
        "same list on every node",
        "--preferred-leader-hold-ms",
    ] {
        assert!(help.contains(wants), "--help lacks {wants:?}: {help}");
    }
}
