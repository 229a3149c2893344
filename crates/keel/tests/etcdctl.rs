//! Debian's `etcdctl` 3.4, unmodified, against a 3-node Keel cluster serving
//! the etcd v3 API: put/get/del with prefixes and ranges, interactive txn
//! from stdin, watch with a concurrent writer, leases (grant, keep-alive,
//! time-to-live with keys, revoke, expiry), `lock` and `elect` (built by
//! etcdctl from leases, txns and watches), member list, remove, add (a
//! removed id refused) and promote, endpoint status/health (also `--cluster` and `http://` endpoints, and
//! `hashkv`/`defrag --cluster`), `check datascale`, and `make-mirror` between etcd 3.4
//! and Keel both ways (with etcd-server). Output is checked line by line.
//!
//! Needs `etcdctl` (`apt-get install -y etcd-client`, which `.ci/run`
//! does): with CI=true a missing etcdctl fails the test; elsewhere it is
//! skipped with a printed reason.

mod common;

use common::{etcdctl_available, TestCluster};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Ctl {
    endpoints: String,
}

impl Ctl {
    fn new(c: &TestCluster) -> Ctl {
        Ctl {
            endpoints: c
                .nodes
                .iter()
                .map(|n| n.etcd.clone())
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    fn at(endpoint: &str) -> Ctl {
        Ctl {
            endpoints: endpoint.to_string(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .arg("--command-timeout=15s")
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcdctl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("etcdctl output")
    }

    /// Runs etcdctl, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// A long-running etcdctl (watch, elect) whose stdout lines arrive on a
    /// channel.
    fn stream(&self, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn etcdctl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    }
}

/// Lines of output, trailing empty ones dropped.
fn lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().collect();
    while v.last() == Some(&"") {
        v.pop();
    }
    v
}

/// Collects `n` lines from a streaming etcdctl, failing after `within`.
fn take_lines(rx: &mpsc::Receiver<String>, n: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => got.push(l),
            Err(_) => panic!(
                "expected {n} lines within {within:?}, got {}: {got:?}",
                got.len()
            ),
        }
    }
    got
}

/// The header revision etcdctl reports for a write (`-w fields`).
fn revision_of(fields: &str) -> i64 {
    fields
        .lines()
        .find_map(|l| l.strip_prefix("\"Revision\" : "))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no revision in {fields}"))
}

fn start() -> Option<(TestCluster, Ctl)> {
    if !etcdctl_available() {
        return None;
    }
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    let ctl = Ctl::new(&c);
    Some((c, ctl))
}

#[test]
fn etcdctl_kv_txn_and_watch() {
    let Some((_c, ctl)) = start() else { return };

    // Put / get / ranges / prefixes.
    for (k, v) in [
        ("a", "1"),
        ("b", "2"),
        ("c", "3"),
        ("foo/1", "x"),
        ("foo/2", "y"),
    ] {
        assert_eq!(lines(&ctl.ok(&["put", k, v])), ["OK"]);
    }
    assert_eq!(lines(&ctl.ok(&["get", "a"])), ["a", "1"]);
    assert_eq!(lines(&ctl.ok(&["get", "a", "c"])), ["a", "1", "b", "2"]);
    assert_eq!(
        lines(&ctl.ok(&["get", "foo", "--prefix"])),
        ["foo/1", "x", "foo/2", "y"]
    );
    // etcdctl prints an empty value line after each key.
    assert_eq!(
        lines(&ctl.ok(&["get", "foo", "--prefix", "--keys-only"])),
        ["foo/1", "", "foo/2"]
    );
    assert_eq!(
        lines(&ctl.ok(&["get", "c", "--from-key"])),
        ["c", "3", "foo/1", "x", "foo/2", "y"]
    );
    assert_eq!(
        lines(&ctl.ok(&[
            "get",
            "",
            "--prefix",
            "--limit=2",
            "--order=DESCEND",
            "--sort-by=KEY"
        ])),
        ["foo/2", "y", "foo/1", "x"]
    );
    let fields = ctl.ok(&["get", "foo", "--prefix", "--limit=1", "-w", "fields"]);
    assert!(
        fields.contains("\"Count\" : 2") && fields.contains("\"More\" : true"),
        "{fields}"
    );
    assert_eq!(
        lines(&ctl.ok(&["put", "a", "10", "--prev-kv"])),
        ["OK", "a", "1"]
    );
    assert_eq!(lines(&ctl.ok(&["get", "a", "--print-value-only"])), ["10"]);
    assert_eq!(lines(&ctl.ok(&["del", "foo", "--prefix"])), ["2"]);
    assert!(lines(&ctl.ok(&["get", "foo", "--prefix"])).is_empty());
    assert_eq!(lines(&ctl.ok(&["del", "b", "--prev-kv"])), ["1", "b", "2"]);
    assert_eq!(lines(&ctl.ok(&["del", "nothing"])), ["0"]);

    // Interactive txn from stdin: compares, blank line, success ops, blank
    // line, failure ops.
    let txn = "value(\"a\") = \"10\"\n\nput t yes\nget a\n\nput t no\n\n";
    assert_eq!(
        lines(&ctl.ok_with(&["txn", "-i"], Some(txn))),
        [
            "compares:",
            "success requests (get, put, del):",
            "failure requests (get, put, del):",
            "SUCCESS",
            "",
            "OK",
            "",
            "a",
            "10"
        ]
    );
    let txn = "version(\"a\") > \"5\"\nmod(\"c\") < \"1000\"\n\nput t yes\n\nput t no\n\n";
    let out = ctl.ok_with(&["txn", "-i"], Some(txn));
    assert!(lines(&out).ends_with(&["FAILURE", "", "OK"]), "{out}");
    assert_eq!(lines(&ctl.ok(&["get", "t", "--print-value-only"])), ["no"]);

    // Watch with a concurrent writer. The watch starts at a known revision,
    // so it sees every write whenever it gets going.
    let rev = revision_of(&ctl.ok(&["put", "w/start", "0", "-w", "fields"]));
    let (mut watcher, rx) = ctl.stream(&["watch", "w/", "--prefix", &format!("--rev={}", rev + 1)]);
    let writer = {
        let ctl = Ctl {
            endpoints: ctl.endpoints.clone(),
        };
        std::thread::spawn(move || {
            for i in 0..20 {
                ctl.ok(&["put", &format!("w/{i}"), &format!("v{i}")]);
            }
            ctl.ok(&["del", "w/", "--prefix"]);
        })
    };
    // 20 puts (3 lines each), then 21 deletes (w/start and w/0..w/19).
    let got = take_lines(&rx, 20 * 3 + 21 * 3, Duration::from_secs(60));
    writer.join().expect("writer");
    let _ = watcher.kill();
    let _ = watcher.wait();
    for i in 0..20 {
        assert_eq!(
            got[i * 3..i * 3 + 3],
            ["PUT".to_string(), format!("w/{i}"), format!("v{i}")],
            "event {i} of {got:?}"
        );
    }
    let mut deleted: Vec<&str> = got[60..]
        .chunks(3)
        .map(|e| {
            assert_eq!(e[0], "DELETE", "{e:?}");
            assert_eq!(e[2], "", "a delete carries no value: {e:?}");
            e[1].as_str()
        })
        .collect();
    deleted.sort_unstable();
    let mut want: Vec<String> = (0..20).map(|i| format!("w/{i}")).collect();
    want.push("w/start".into());
    want.sort_unstable();
    assert_eq!(deleted, want);
    // Watching from a revision before the writes replays history too.
    let (mut replay, rx) = ctl.stream(&["watch", "a", &format!("--rev={}", 1)]);
    let got = take_lines(&rx, 6, Duration::from_secs(20));
    let _ = replay.kill();
    let _ = replay.wait();
    assert_eq!(got, ["PUT", "a", "1", "PUT", "a", "10"]);
}

#[test]
fn etcdctl_leases_lock_and_elect() {
    let Some((_c, ctl)) = start() else { return };

    // Grant, attach, inspect, keep alive, revoke.
    let out = ctl.ok(&["lease", "grant", "30"]);
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("lease id in {out}"))
        .to_string();
    assert!(out.contains("granted with TTL(30s)"), "{out}");
    ctl.ok(&["put", "--lease", &id, "leased/a", "1"]);
    ctl.ok(&["put", "--lease", &id, "leased/b", "2"]);
    let ttl = ctl.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(
        ttl.contains("granted with TTL(30s)") && ttl.contains("attached keys([leased/a leased/b])"),
        "{ttl}"
    );
    let list = ctl.ok(&["lease", "list"]);
    assert!(list.contains(&id), "{list}");
    let ka = ctl.ok(&["lease", "keep-alive", "--once", &id]);
    assert!(
        ka.contains(&format!("lease {id} keepalived with TTL(30)")),
        "{ka}"
    );
    let revoked = ctl.ok(&["lease", "revoke", &id]);
    assert!(revoked.contains("revoked"), "{revoked}");
    assert!(lines(&ctl.ok(&["get", "leased/", "--prefix"])).is_empty());
    let gone = ctl.ok(&["lease", "timetolive", &id]);
    assert!(gone.contains("already expired"), "{gone}");

    // A key attached to a lease that is not kept alive disappears when the
    // lease expires (driven by the leader-stamped log time).
    let out = ctl.ok(&["lease", "grant", "2"]);
    let short = out.split_whitespace().nth(1).expect("lease id").to_string();
    ctl.ok(&["put", "--lease", &short, "ephemeral", "x"]);
    assert_eq!(
        lines(&ctl.ok(&["get", "ephemeral", "--print-value-only"])),
        ["x"]
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !lines(&ctl.ok(&["get", "ephemeral"])).is_empty() {
        assert!(
            Instant::now() < deadline,
            "a 2 s lease's key still exists after 15 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // lock: two holders run their critical sections one after the other.
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let path = log.path().display().to_string();
    let section = format!("echo start $$ >> {path}; sleep 0.5; echo end $$ >> {path}");
    let holders: Vec<Child> = (0..2)
        .map(|_| {
            ctl.command(&["lock", "biglock", "--", "sh", "-c", &section])
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn etcdctl lock")
        })
        .collect();
    for mut h in holders {
        assert!(h.wait().expect("lock holder").success());
    }
    let record = std::fs::read_to_string(log.path()).expect("lock log");
    let record: Vec<&str> = record.lines().collect();
    assert_eq!(record.len(), 4, "{record:?}");
    for pair in record.chunks(2) {
        let (s, e) = (pair[0].strip_prefix("start "), pair[1].strip_prefix("end "));
        assert!(
            s.is_some() && s == e,
            "critical sections overlapped: {record:?}"
        );
    }
    // The lock is free again.
    assert_eq!(
        lines(&ctl.ok(&["lock", "biglock", "echo", "free"])),
        ["free"]
    );

    // elect: a campaigner wins and an observer sees its proposal.
    let (mut campaigner, won) = ctl.stream(&["elect", "election", "proposal-1"]);
    let got = take_lines(&won, 2, Duration::from_secs(20));
    assert!(got[0].starts_with("election/"), "{got:?}");
    assert_eq!(got[1], "proposal-1");
    let (mut observer, seen) = ctl.stream(&["elect", "-l", "election"]);
    let got = take_lines(&seen, 2, Duration::from_secs(20));
    assert_eq!(got[1], "proposal-1", "{got:?}");
    let _ = observer.kill();
    let _ = campaigner.kill();
    let _ = observer.wait();
    let _ = campaigner.wait();
}

#[test]
fn etcdctl_member_list_and_endpoint_status() {
    let Some((c, ctl)) = start() else { return };
    let members = ctl.ok(&["member", "list"]);
    let members = lines(&members);
    assert_eq!(members.len(), 3, "{members:?}");
    for (i, n) in c.nodes.iter().enumerate() {
        // ID (hex), status, name, peer URLs, client URLs, is learner.
        assert_eq!(
            members[i],
            format!(
                "{:x}, started, node{}, http://{}, http://{}, false",
                n.id, n.id, n.peer, n.etcd
            )
        );
    }

    // The commands that reach every member by its client URL (Go's
    // client then sends `http://…` as the HTTP/2 :authority, which Keel
    // takes as etcd does), and the same with an http:// endpoint.
    let status = ctl.ok(&["endpoint", "status", "--cluster"]);
    let hashes = ctl.ok(&["endpoint", "hashkv", "--cluster"]);
    let defrag = ctl.ok(&["defrag", "--cluster"]);
    for n in &c.nodes {
        let url = format!("http://{}", n.etcd);
        assert!(
            status.contains(&format!("{url}, {:x}, 3.4.30", n.id)),
            "{status}"
        );
        assert!(hashes.contains(&format!("{url}, ")), "{hashes}");
        assert!(
            defrag.contains(&format!("Finished defragmenting etcd member[{url}]")),
            "{defrag}"
        );
        let one = Ctl::at(&url).ok(&["endpoint", "status"]);
        assert!(one.starts_with(&format!("{url}, {:x}, ", n.id)), "{one}");
    }

    let health = ctl.ok(&["endpoint", "health"]);
    let health = String::from_utf8_lossy(health.as_bytes()).into_owned();
    // etcdctl prints health to stderr in 3.4; check both streams.
    let out = ctl.run(&["endpoint", "health"], None);
    let text = format!("{health}{}", String::from_utf8_lossy(&out.stderr));
    for n in &c.nodes {
        assert!(text.contains(&format!("{} is healthy", n.etcd)), "{text}");
    }

    let status = ctl.ok(&["endpoint", "status"]);
    let rows = lines(&status);
    assert_eq!(rows.len(), 3, "{status}");
    let mut leaders = 0;
    for row in &rows {
        // endpoint, id, version, db size, is leader, is learner, term, index, applied, errors
        let cols: Vec<&str> = row.split(", ").collect();
        assert_eq!(cols[2], "3.4.30", "{row}");
        assert_eq!(cols[5], "false", "{row}");
        if cols[4] == "true" {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1, "exactly one leader: {status}");

    // `snapshot save` downloads a backup that `keel restore` takes (the
    // restore itself is tested in operations.rs).
    let file = c._tmp.path().join("snap.db");
    let saved = Ctl::at(&c.nodes[0].etcd).ok(&["snapshot", "save", &file.to_string_lossy()]);
    assert!(saved.contains("Snapshot saved at"), "{saved}");
    let data = c._tmp.path().join("restored");
    let (code, text) = keel_restore(&file, &data);
    assert_eq!(code, 0, "{text}");
    assert!(data.join("hardstate").exists(), "{text}");

    // Each endpoint alone answers.
    let one = Ctl::at(&c.nodes[0].etcd);
    assert_eq!(lines(&one.ok(&["put", "x", "1"])), ["OK"]);
}

/// Membership through etcdctl: remove a follower; adding it back (by its
/// peer URL, which every node's configuration still lists) is refused as
/// etcd refuses a removed id, "member not found", saying to give the new
/// node a new id, even with a new node running under the removed id; a
/// node under a new id (4, a spare every configuration lists) is added
/// as a learner, listed as such, and promoted.
#[test]
fn etcdctl_member_remove_add_and_promote() {
    if !etcdctl_available() {
        return;
    }
    let mut c = TestCluster::start_with_spares(3, 1, "");
    // Talk through the nodes that stay members (a removed node no longer
    // has a leader to ask).
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let f = c.nodes.iter().find(|n| n.id != leader).expect("a follower");
    let (fid, fpeer) = (f.id, f.peer.clone());
    let one = Ctl {
        endpoints: c
            .nodes
            .iter()
            .filter(|n| n.id != fid && n.id <= 3)
            .map(|n| n.etcd.clone())
            .collect::<Vec<_>>()
            .join(","),
    };
    let out = one.ok(&["member", "remove", &format!("{fid:x}")]);
    assert!(out.contains(&format!("Member {fid:>16x} removed")), "{out}");
    assert_eq!(lines(&one.ok(&["member", "list"])).len(), 2);
    // The removed member learns it and exits, leaving REMOVED in its data
    // directory.
    let deadline = Instant::now() + Duration::from_secs(20);
    let node = &mut c.nodes[(fid - 1) as usize];
    let child = node.child.as_mut().expect("running");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the removed member kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    node.child = None;
    assert!(node.dir.join("data").join("REMOVED").exists());
    // Its id is never used again, even for a new node on an empty data
    // directory started with `join`: etcd's code and text for a removed
    // id, then what to do.
    let config = std::fs::read_to_string(&node.config).expect("config");
    std::fs::write(&node.config, format!("join = true\n{config}")).expect("config");
    c.wipe(fid);
    c.spawn(fid);
    c.wait_status(fid, |s| s.voters.is_empty());
    for learner in [&["--learner"][..], &[]] {
        let out = one.run(
            &[
                &[
                    "member",
                    "add",
                    "again",
                    &format!("--peer-urls=http://{fpeer}"),
                ][..],
                learner,
            ]
            .concat(),
            None,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "etcdserver: member not found (member {fid:x}, id = {fid} in [[peers]], was \
                 removed from the cluster and its id is never used again: give the new node a \
                 new id in every member's [[peers]]"
            )),
            "{stderr}"
        );
    }
    assert_eq!(lines(&one.ok(&["member", "list"])).len(), 2);

    // Node 4 joins as a learner and is promoted.
    let (nid, npeer) = (4, c.node(4).peer.clone());
    c.spawn(nid);
    let out = one.ok(&[
        "member",
        "add",
        &format!("node{nid}"),
        &format!("--peer-urls=http://{npeer}"),
        "--learner",
    ]);
    assert!(out.contains(&format!("Member {nid:>16x} added")), "{out}");
    let list = one.ok(&["member", "list"]);
    assert!(
        list.contains(&format!("{nid:x}, started, node{nid}, http://{npeer}")),
        "{list}"
    );
    assert!(
        lines(&list)
            .iter()
            .any(|l| l.starts_with(&format!("{nid:x},")) && l.ends_with("true")),
        "{list}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = one.run(&["member", "promote", &format!("{nid:x}")], None);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "promote kept failing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let list = one.ok(&["member", "list"]);
    assert_eq!(lines(&list).len(), 3, "{list}");
    assert!(lines(&list).iter().all(|l| l.ends_with("false")), "{list}");
    // A peer URL no node knows is refused with an explanation.
    let out = one.run(
        &["member", "add", "stranger", "--peer-urls=http://10.9.9.9:1"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("configuration"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn etcdctl_check_datascale() {
    // It reads the member's memory from `/metrics` on the etcd API port
    // (as on etcd's client URL), writes 10000 keys of 1 KiB through 50
    // clients, and reads the memory again.
    let Some((c, _)) = start() else { return };
    let ctl = Ctl::at(&c.nodes[0].etcd);
    let out = ctl.ok(&["check", "datascale", "--load=s"]);
    assert!(
        out.contains("PASS: Approximate system memory used"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
}

/// `keel restore FILE` into `data` as node 1 of a single-node kv cluster
/// (with the backed-up cluster's id, which the test cluster's is too);
/// the exit code and stdout + stderr.
fn keel_restore(file: &std::path::Path, data: &std::path::Path) -> (i32, String) {
    let (file, data) = (file.as_os_str(), data.as_os_str());
    common::keel([
        "restore".as_ref(),
        file,
        "--id".as_ref(),
        "1".as_ref(),
        "--peer-addr".as_ref(),
        "127.0.0.1:1".as_ref(),
        "--client-addr".as_ref(),
        "127.0.0.1:2".as_ref(),
        "--service".as_ref(),
        "kv".as_ref(),
        "--same-cluster-id".as_ref(),
        "--data-dir".as_ref(),
        data,
    ])
}

/// `etcdctl alarm list|disarm`'s lines (etcdctl ends each with a space).
fn alarms(ctl: &Ctl, action: &str) -> Vec<String> {
    lines(&ctl.ok(&["alarm", action]))
        .iter()
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// The space quota (`kv_quota_bytes`): puts that would pass it are refused
/// with etcd's error, as are native-protocol writes; the member lists the
/// NOSPACE alarm, reads go on, and deleting and compacting make room.
#[test]
fn etcdctl_space_quota_refuses_puts_and_raises_nospace() {
    if !etcdctl_available() {
        return;
    }
    let c = TestCluster::start(3, "kv_quota_bytes = 20000\n");
    c.wait_for_leader(Duration::from_secs(10));
    // Writes through member 0, so the alarm is its own (each member raises
    // its own; any member lists them all).
    let ctl = Ctl::at(&c.nodes[0].etcd);
    let other = Ctl::at(&c.nodes[1].etcd);
    let id = c.nodes[0].id;
    assert_eq!(alarms(&ctl, "list"), Vec::<String>::new());
    let value = "v".repeat(1000);
    let mut stored = 0;
    let refusal = loop {
        let out = ctl.run(&["put", &format!("k{stored:02}"), &value], None);
        assert!(stored < 40, "40 puts of 1 KB passed a 20 KB quota");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            stored += 1;
        } else if !stderr.contains("no leader") && !stderr.contains("timed out") {
            break stderr;
        }
    };
    assert!(
        refusal.contains("etcdserver: mvcc: database space exceeded"),
        "{refusal}"
    );
    // ~1070 bytes per entry (key, value, bookkeeping) in 20000.
    assert!((15..=19).contains(&stored), "{stored} puts stored");
    let nospace = format!("memberID:{id} alarm:NOSPACE");
    assert_eq!(alarms(&ctl, "list"), [nospace.as_str()]);
    assert_eq!(alarms(&other, "list"), [nospace.as_str()]);
    let status = ctl.ok(&["endpoint", "status"]);
    assert!(status.contains("alarm:NOSPACE"), "{status}");
    // Native-protocol writes meet the same quota.
    let (code, text) = c.keel_cli(&["kv", "put", "native", &value]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("database space exceeded"), "{text}");
    // Reads go on.
    assert_eq!(
        lines(&ctl.ok(&["get", "k00", "--print-value-only"])),
        [value.as_str()]
    );

    // Disarmed (through another member), the alarm is gone until the next
    // refusal.
    assert_eq!(alarms(&other, "disarm"), [nospace.as_str()]);
    assert_eq!(alarms(&ctl, "list"), Vec::<String>::new());
    assert!(!ctl.run(&["put", "again", &value], None).status.success());
    assert_eq!(alarms(&ctl, "list"), [nospace.as_str()]);

    // Deleting and compacting make room; the next put lowers the alarm.
    let deleted = ctl.ok(&["del", "--prefix", "k", "-w", "fields"]);
    assert!(
        deleted.contains(&format!("\"Deleted\" : {stored}\n")),
        "{deleted}"
    );
    ctl.ok(&["compact", &revision_of(&deleted).to_string()]);
    assert_eq!(lines(&ctl.ok(&["put", "big", &value])), ["OK"]);
    assert_eq!(alarms(&ctl, "list"), Vec::<String>::new());
}

/// `get --prefix` as (key, value) pairs.
fn pairs(ctl: &Ctl, prefix: &str) -> Vec<(String, String)> {
    let out = ctl.ok(&["get", "--prefix", prefix]);
    let l = lines(&out);
    l.chunks(2)
        .map(|kv| (kv[0].to_string(), kv.get(1).unwrap_or(&"").to_string()))
        .collect()
}

/// Polls `get --prefix` until it is `want`.
fn wait_pairs(ctl: &Ctl, prefix: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = pairs(ctl, prefix);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix}: expected {want:?}, still {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `etcdctl make-mirror`, the tool for moving a live keyspace between
/// clusters: from etcd 3.4 into Keel (a migration), then from Keel into
/// etcd, each copying what is there and then following puts and deletes.
#[test]
fn etcdctl_make_mirror_moves_data_both_ways() {
    if !etcdctl_available() {
        return;
    }
    let Some(etcd_bin) = common::etcd_or_skip("the make-mirror test") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = common::EtcdProc::start(&etcd_bin, tmp.path());
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    let etcd_ctl = Ctl::at(&etcd.client);
    let keel_ctl = Ctl::new(&c);
    // (etcd may still be starting.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while !etcd_ctl
        .run(&["put", "/app/k1", "v1"], None)
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "etcd never took a put");
        std::thread::sleep(Duration::from_millis(100));
    }
    etcd_ctl.ok(&["put", "/app/k2", "v2"]);
    etcd_ctl.ok(&["put", "/other", "x"]);

    let (mut mirror, _) = etcd_ctl.stream(&["make-mirror", "--prefix", "/app", &c.nodes[0].etcd]);
    wait_pairs(&keel_ctl, "/", &[("/app/k1", "v1"), ("/app/k2", "v2")]);
    etcd_ctl.ok(&["put", "/app/k3", "v3"]);
    etcd_ctl.ok(&["del", "/app/k1"]);
    wait_pairs(&keel_ctl, "/", &[("/app/k2", "v2"), ("/app/k3", "v3")]);
    let _ = mirror.kill();
    let _ = mirror.wait();

    keel_ctl.ok(&["put", "/fromkeel/a", "1"]);
    let (mut back, _) = keel_ctl.stream(&["make-mirror", "--prefix", "/fromkeel", &etcd.client]);
    wait_pairs(&etcd_ctl, "/fromkeel", &[("/fromkeel/a", "1")]);
    keel_ctl.ok(&["put", "/fromkeel/b", "2"]);
    keel_ctl.ok(&["del", "/fromkeel/a"]);
    wait_pairs(&etcd_ctl, "/fromkeel", &[("/fromkeel/b", "2")]);
    let _ = back.kill();
    let _ = back.wait();
}
