//! Operating a cluster of real `keel server` processes: a full queue answers
//! "busy" and the node keeps serving; SIGTERM stops a node cleanly (exit 0,
//! nothing torn, nothing lost); `/status` and `/metrics` over HTTP; and the
//! `keel kv` and `keel cluster` commands against a running cluster; the
//! node threads' scheduling policy; automatic compaction of the KV history;
//! etcd's `/health`, `/version` and `/metrics` on the etcd API port; puts on
//! every member succeed while leadership moves round the cluster.

mod common;

use bytes::Bytes;
use common::{
    assert_openmetrics, etcd_channel, http_get, http_request, metric, wait_metric, TestCluster,
};
use keel_net::codec::{self, ClientOp, ClientRequest, ClientResult, Frame};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends `n` puts pipelined on one connection without waiting, then reads
/// every answer. Returns (key, value, result) per request.
fn flood(addr: &str, n: u64, prefix: &str) -> Vec<(String, String, ClientResult)> {
    let kv = |i: u64| (format!("{prefix}{i}"), format!("v{i}"));
    let mut out = Vec::new();
    for i in 0..n {
        let (key, value) = kv(i);
        let cmd = keel_kv::Command::Put {
            key: Bytes::from(key),
            value: Bytes::from(value),
        };
        codec::encode(
            &Frame::Request(ClientRequest {
                id: i,
                client: keel_core::SESSIONLESS,
                seq: i,
                op: ClientOp::Write(cmd.encode()),
            }),
            &mut out,
        );
    }
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // Write from another thread so the server's answers never back up.
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || w.write_all(&out).expect("write flood"));
    let mut results: Vec<Option<ClientResult>> = vec![None; n as usize];
    let (mut buf, mut got) = (Vec::new(), 0);
    let mut chunk = vec![0u8; 64 << 10];
    while got < n {
        let k = s.read(&mut chunk).expect("read answers");
        assert!(k > 0, "connection closed after {got} of {n} answers");
        buf.extend_from_slice(&chunk[..k]);
        let mut off = 0;
        while let Some((f, used)) = codec::decode(&buf[off..], 64 << 20).expect("decode answer") {
            off += used;
            match f {
                Frame::Response(r) => {
                    let slot = &mut results[r.id as usize];
                    assert!(slot.is_none(), "two answers to request {}", r.id);
                    *slot = Some(r.result);
                    got += 1;
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
        buf.drain(..off);
    }
    writer.join().expect("writer");
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let (key, value) = kv(i as u64);
            (key, value, r.expect("answered"))
        })
        .collect()
}

#[test]
fn a_full_queue_answers_busy_and_the_node_keeps_serving() {
    let (mut c, http) = TestCluster::start_with_http(3, "queue_depth = 16");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let addr = c.node(leader).client.clone();
    let mut busy = 0;
    for round in 0..5 {
        let results = flood(&addr, 20_000, &format!("f{round}-"));
        for (key, value, r) in results {
            match r {
                ClientResult::Busy => busy += 1,
                ClientResult::Ok(b) => match keel_kv::Response::decode(&b) {
                    Ok(keel_kv::Response::Put { .. }) => {
                        c.acked.insert(key, value);
                    }
                    other => panic!("{key}: unexpected {other:?}"),
                },
                // Leadership may move under the flood; those were not applied.
                ClientResult::NotLeader { .. } => {}
                other => panic!("{key}: unexpected {other:?}"),
            }
        }
        if busy > 0 {
            break;
        }
    }
    assert!(
        busy > 0,
        "a flood of 20000 pipelined writes never got \"busy\""
    );
    println!(
        "{busy} writes answered busy, {} acknowledged",
        c.acked.len()
    );
    let counted = wait_metric(
        &http[(leader - 1) as usize],
        "keel_busy_rejections_total",
        Duration::from_secs(5),
        |v| v > 0.0,
    );
    assert!(counted >= busy as f64, "{counted} counted, {busy} answered");
    // Still serving: writes and linearizable reads, and nothing acked lost.
    c.put(&mut client, "after", "2");
    c.wait_for_leader(Duration::from_secs(10));
    c.check_acked(&mut client);
}

#[test]
fn sigterm_stops_cleanly_and_a_restart_recovers_every_acknowledged_write() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let mut client = c.client();
    for i in 0..100 {
        c.put(&mut client, &format!("t{i}"), &format!("v{i}"));
    }
    let status = c.terminate(leader, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "SIGTERM of the leader: {status:?}");
    c.wait_for_leader(Duration::from_secs(10));
    for i in 100..150 {
        c.put(&mut client, &format!("t{i}"), &format!("v{i}"));
    }
    let log_len: Vec<usize> = (1..=3).map(|id| c.log_of(id).len()).collect();
    for id in (1..=3).filter(|&id| id != leader) {
        let status = c.terminate(id, Duration::from_secs(10));
        assert_eq!(status.code(), Some(0), "SIGTERM of node {id}: {status:?}");
    }
    for id in 1..=3 {
        c.spawn(id);
    }
    c.wait_for_leader(Duration::from_secs(10));
    c.check_acked(&mut client);
    for id in 1..=3u64 {
        // (A majority elected the leader: this one may still be starting.)
        c.wait_status(id, |_| true);
        let log = c.log_of(id);
        let since = &log[log_len[(id - 1) as usize].min(log.len())..];
        assert!(
            !since.contains("torn tail"),
            "node {id} found a torn tail after a graceful stop:\n{since}"
        );
        assert!(
            since.contains("recovered"),
            "node {id} did not restart:\n{since}"
        );
    }
}

/// Waits until `/status` of `addr` contains all of `parts`.
fn wait_status(addr: &str, parts: &[String], within: Duration) -> String {
    let start = Instant::now();
    loop {
        let (code, body) = http_get(addr, "/status");
        assert_eq!(code, 200, "{body}");
        if parts.iter().all(|p| body.contains(p.as_str())) {
            return body;
        }
        assert!(
            start.elapsed() < within,
            "/status of {addr} lacks {parts:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn status_and_metrics_over_http() {
    let (mut c, http) = TestCluster::start_with_http(3, "");
    let (leader, term) = c.wait_for_leader(Duration::from_secs(10));
    // Servers run with transparent huge pages off (synchronous 2 MiB page
    // zeroing on allocation stalled the consensus thread for milliseconds).
    for n in &c.nodes {
        let pid = n.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        match status.lines().find(|l| l.starts_with("THP_enabled:")) {
            Some(line) => assert_eq!(
                line.split_whitespace().nth(1),
                Some("0"),
                "node {}: {line}",
                n.id
            ),
            None => println!("this kernel does not report THP_enabled; not checked"),
        }
    }
    let mut client = c.client();
    for i in 0..10 {
        c.put(&mut client, &format!("h{i}"), "x");
    }
    let mut latencies = 0.0;
    for id in 1..=3u64 {
        let addr = &http[(id - 1) as usize];
        let role = if id == leader { "leader" } else { "follower" };
        let body = wait_status(
            addr,
            &[
                format!("\"id\":{id}"),
                format!("\"role\":\"{role}\""),
                format!("\"leader\":{leader}"),
                format!("\"term\":{term}"),
                "\"voters\":[1,2,3]".to_string(),
                "\"commit_position\":".to_string(),
                // Every link up, in this version's peer protocol.
                format!(
                    "\"peer_links\":[{}]",
                    (1..=3u64)
                        .filter(|&p| p != id)
                        .map(|p| format!(
                            "{{\"id\":{p},\"peer_protocol\":{}}}",
                            codec::PEER_VERSION
                        ))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ],
            Duration::from_secs(5),
        );
        if id == leader {
            assert!(body.contains("\"followers\":[{"), "{body}");
        }
        // Gauges are published at most every status interval: wait until
        // this node's have caught up with the ten writes.
        wait_metric(
            addr,
            "keel_log_retained_entries",
            Duration::from_secs(5),
            |n| n >= 10.0,
        );
        let (code, text) = http_get(addr, "/metrics");
        assert_eq!(code, 200);
        assert_openmetrics(&text);
        let m = |name: &str| {
            metric(&text, name).unwrap_or_else(|| panic!("node {id}: no {name} in:\n{text}"))
        };
        assert_eq!(m("keel_role"), if id == leader { 3.0 } else { 0.0 });
        assert_eq!(m("keel_term"), term as f64);
        assert!(m("keel_commit_position") > 0.0);
        assert!(m("keel_applied_position") > 0.0);
        assert!(m("keel_durable_position") > 0.0);
        // (`sync` durability: what is durable was synced here.)
        assert!(m("keel_log_fsync_seconds_count") >= 1.0);
        assert!(m("keel_append_position") >= m("keel_commit_position"));
        m("keel_queue_depth");
        m("keel_service_queue_depth");
        m("keel_storage_queue_depth");
        m("keel_snapshots_taken_total");
        m("keel_snapshots_installed_total");
        m("keel_peer_messages_dropped_total");
        m("keel_bad_frames_total");
        for peer in (1..=3u64).filter(|&p| p != id) {
            // Every link speaks this version's peer protocol.
            let name = format!("keel_peer_protocol{{peer=\"{peer}\"}}");
            wait_metric(addr, &name, Duration::from_secs(5), |v| {
                v == f64::from(codec::PEER_VERSION)
            });
        }
        assert_eq!(m("keel_client_reads_paused_total"), 0.0);
        m("keel_busy_rejections_total");
        m("keel_admission_refusals_total");
        // No snapshot yet and far below the log cache: the whole log is
        // held in memory.
        assert_eq!(m("keel_log_retained_bytes"), m("keel_append_position"));
        assert!(m("process_resident_memory_bytes") > 1e6);
        // CPU time counts in kernel ticks: a node this young may be at 0.
        assert!(m("process_cpu_seconds_total") >= 0.0);
        // Consensus, storage, service, network and HTTP threads at least.
        assert!(m("process_threads") >= 4.0);
        if id == leader {
            assert!(m("keel_leader_elections_won_total") >= 1.0);
            assert!(m("keel_elections_started_total") >= 1.0);
        }
        // Observed where the write was accepted (a follower forwards).
        latencies += m("keel_commit_latency_seconds_count");
    }
    assert!(latencies >= 10.0, "{latencies} commit latencies observed");
    let (code, _) = http_get(&http[0], "/nope");
    assert_eq!(code, 404);
    c.check_acked(&mut client);
}

/// Waits until `GET path` from `addr` answers `code`; returns the body.
fn wait_http(addr: &str, path: &str, code: u16, within: Duration) -> String {
    let start = Instant::now();
    loop {
        let (got, body) = http_get(addr, path);
        if got == code {
            return body;
        }
        assert!(
            start.elapsed() < within,
            "{path} of {addr} still answers {got} after {within:?}: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn etcd_port_serves_health_version_and_metrics() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let etcd: Vec<String> = c.nodes.iter().map(|n| n.etcd.clone()).collect();
    for (i, addr) in etcd.iter().enumerate() {
        let id = i as u64 + 1;
        let body = wait_http(addr, "/health", 200, Duration::from_secs(10));
        assert_eq!(body, r#"{"health":"true"}"#, "node {id}");
        let (code, body) = http_get(addr, "/health?exclude=NOSPACE&serializable=true");
        assert_eq!((code, body.as_str()), (200, r#"{"health":"true"}"#));
        let (code, body) = http_request(addr, "HEAD", "/health", "");
        assert_eq!(code, 405, "etcd answers only GET: {body}");
        assert_eq!(
            http_get(addr, "/version"),
            (
                200,
                r#"{"etcdserver":"3.4.30","etcdcluster":"3.4.0"}"#.to_string()
            )
        );
        let (code, text) = http_get(addr, "/metrics");
        assert_eq!(code, 200, "{text}");
        assert_openmetrics(&text);
        let m = |name: &str| {
            metric(&text, name).unwrap_or_else(|| panic!("node {id}: no {name} in:\n{text}"))
        };
        assert_eq!(m("etcd_server_has_leader"), 1.0, "node {id}");
        let is_leader = if id == leader { 1.0 } else { 0.0 };
        assert_eq!(m("etcd_server_is_leader"), is_leader, "node {id}");
        // Every node saw the first leader.
        assert!(
            m("etcd_server_leader_changes_seen_total") >= 1.0,
            "node {id}"
        );
        assert!(m("process_resident_memory_bytes") > 1e6);
        // The node's own metrics are there too (a follower learns of the
        // first commit with the leader's next message).
        wait_metric(addr, "keel_commit_position", Duration::from_secs(10), |p| {
            p > 0.0
        });
        let (code, body) = http_get(addr, "/nope");
        assert_eq!(code, 404);
        assert!(body.contains("/health"), "{body}");
        // The JSON gateway takes POST only, as etcd's (405 to a GET).
        assert_eq!(http_get(addr, "/v3/kv/range").0, 405);
    }
    // gRPC on the same port is unchanged (every etcd test uses it): one
    // call here, after the HTTP/1.1 requests.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use keel_etcd_proto::etcdserverpb::{kv_client::KvClient, PutRequest};
        let mut kv = KvClient::new(etcd_channel(&etcd[0]).await);
        kv.put(PutRequest {
            key: b"k".to_vec().into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("put over gRPC on the port that serves /health");
    });
    // A leadership transfer is one leader change more on every member, and
    // moves etcd_server_is_leader.
    let seen = |addr: &str| {
        let (_, text) = http_get(addr, "/metrics");
        metric(&text, "etcd_server_leader_changes_seen_total").expect("leader changes seen")
    };
    let before: Vec<f64> = etcd.iter().map(|a| seen(a)).collect();
    let target = leader % 3 + 1;
    rt.block_on(async {
        use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
        use keel_etcd_proto::etcdserverpb::MoveLeaderRequest;
        let leader_addr = &etcd[(leader - 1) as usize];
        MaintenanceClient::new(etcd_channel(leader_addr).await)
            .move_leader(MoveLeaderRequest { target_id: target })
            .await
            .expect("move leader");
    });
    for (i, addr) in etcd.iter().enumerate() {
        let want = before[i] + 1.0;
        let after = wait_metric(
            addr,
            "etcd_server_leader_changes_seen_total",
            Duration::from_secs(10),
            |v| v >= want,
        );
        assert_eq!(after, want, "{addr}: one transfer, one change");
        let id = i as u64 + 1;
        let is_leader = if id == target { 1.0 } else { 0.0 };
        wait_metric(
            addr,
            "etcd_server_is_leader",
            Duration::from_secs(10),
            |v| v == is_leader,
        );
    }
    // etcd's refusals, in etcd's words (clients match them): a transfer to
    // a node that is not a voter, a promotion of a voter.
    rt.block_on(async {
        use keel_etcd_proto::etcdserverpb::cluster_client::ClusterClient;
        use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
        use keel_etcd_proto::etcdserverpb::{MemberPromoteRequest, MoveLeaderRequest};
        let ch = etcd_channel(&etcd[(target - 1) as usize]).await;
        let e = MaintenanceClient::new(ch.clone())
            .move_leader(MoveLeaderRequest { target_id: 12345 })
            .await
            .expect_err("no such voter");
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::FailedPrecondition,
                "etcdserver: bad leader transferee"
            )
        );
        let e = ClusterClient::new(ch)
            .member_promote(MemberPromoteRequest { id: leader })
            .await
            .expect_err("a voter");
        assert_eq!(
            (e.code(), e.message()),
            (
                tonic::Code::FailedPrecondition,
                "etcdserver: can only promote a learner member"
            )
        );
    });
    // Without a majority the survivor is unhealthy, and says why.
    let survivor = if target == 3 { 1 } else { 3 };
    for id in 1..=3 {
        if id != survivor {
            c.kill(id);
        }
    }
    let addr = &etcd[(survivor - 1) as usize];
    let body = wait_http(addr, "/health", 503, Duration::from_secs(10));
    assert!(
        body.starts_with(r#"{"health":"false","reason":""#),
        "{body}"
    );
    let no_leader = wait_metric(
        addr,
        "etcd_server_has_leader",
        Duration::from_secs(10),
        |v| v == 0.0,
    );
    assert_eq!(no_leader, 0.0);
    let body = wait_http(addr, "/health", 503, Duration::from_secs(1));
    assert!(body.contains("RAFT NO LEADER"), "{body}");
    // A liveness probe's serializable check still wants a leader (etcd 3.4).
    let body = wait_http(
        addr,
        "/health?exclude=NOSPACE&serializable=true",
        503,
        Duration::from_secs(1),
    );
    assert!(body.contains("RAFT NO LEADER"), "{body}");
    // A gateway stream that fails at once gets the error's HTTP status,
    // and its error object ends the body without a newline, as etcd's.
    let (status, body) = http_request(addr, "POST", "/v3/lease/keepalive", r#"{"ID":"55"}"#);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with(r#"{"error":{"grpc_code":14,"http_code":503,"#) && !body.ends_with('\n'),
        "{body:?}"
    );
}

#[test]
fn the_keel_command_against_a_running_cluster() {
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let ok = |c: &TestCluster, args: &[&str], want: &str| {
        let (code, text) = c.keel_cli(args);
        assert_eq!(code, 0, "keel {args:?}:\n{text}");
        assert!(
            text.contains(want),
            "keel {args:?}: expected {want:?} in:\n{text}"
        );
        text
    };
    ok(&c, &["kv", "put", "greeting", "hello"], "OK (revision");
    ok(&c, &["kv", "put", "user/1", "ada"], "OK");
    ok(&c, &["kv", "put", "user/2", "grace"], "OK");
    ok(&c, &["kv", "put", "zzz", "last"], "OK");
    let range = ok(&c, &["kv", "range", "user/"], "user/1=ada");
    assert!(range.contains("user/2=grace"), "{range}");
    assert!(
        !range.contains("greeting") && !range.contains("zzz"),
        "{range}"
    );
    let all = ok(&c, &["kv", "range"], "greeting=hello");
    assert!(all.contains("zzz=last"), "{all}");
    ok(
        &c,
        &["kv", "cas", "greeting", "hi", "--expect-value", "hello"],
        "OK (revision",
    );
    let (code, text) = c.keel_cli(&["kv", "cas", "greeting", "hey", "--expect-value", "hello"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("FAILED: greeting is \"hi\""), "{text}");
    ok(&c, &["kv", "cas", "fresh", "1", "--expect-absent"], "OK");
    ok(&c, &["kv", "get", "greeting"], "hi");
    ok(&c, &["kv", "del", "greeting"], "deleted 1");
    let (code, text) = c.keel_cli(&["kv", "get", "greeting"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("key not found"), "{text}");
    ok(&c, &["kv", "del", "user/", "--prefix"], "deleted 2");
    let (code, text) = c.keel_cli(&["kv", "range", "user/"]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("user/"), "{text}");

    let status = ok(&c, &["cluster", "status"], "follower");
    // The header's "leader" column, and one node in the role.
    assert_eq!(status.matches("leader").count(), 2, "{status}");
    for e in c.endpoints() {
        assert!(status.contains(&e), "status does not list {e}:\n{status}");
    }
    assert_eq!(status.matches("follower").count(), 2, "{status}");
    let target = (1..=3).find(|&id| id != leader).expect("a follower");
    ok(
        &c,
        &["cluster", "transfer-leader", &target.to_string()],
        &format!("leadership transferred to node {target}"),
    );
    // It answered once the target led: the target says so itself.
    let status = ok(&c, &["cluster", "status"], "leader");
    let line = status
        .lines()
        .find(|l| l.contains(&c.endpoints()[target as usize - 1]))
        .expect("the target's status line");
    assert!(line.contains("leader"), "{status}");
    ok(&c, &["kv", "get", "zzz"], "last");
    let mut client = c.client();
    c.put(&mut client, "after-transfer", "yes");
    c.check_acked(&mut client);
    // A transfer to a node that is down fails, and says why.
    let down = (1..=3).find(|&id| id != target).expect("another node");
    c.kill(down);
    let (code, text) = c.keel_cli(&["cluster", "transfer-leader", &down.to_string()]);
    assert_eq!(code, 2, "refused: {text}");
    assert!(
        text.contains(keel_net::codec::TRANSFER_TIMED_OUT)
            && text.contains(&format!("node {down} does not lead")),
        "{text}"
    );
}

/// The scheduling policy (`/proc/<pid>/task/<tid>/stat` field 41) of each
/// thread of process `pid` whose name starts with `keel-`, by name.
fn node_thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("list threads") {
        let dir = t.expect("thread entry").path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // "tid (comm) state ...": the fields after the name start at 3.
        let (head, rest) = stat.rsplit_once(") ").expect("stat has (comm)");
        let name = head.split_once(" (").expect("stat has (comm)").1;
        if !name.starts_with("keel-") {
            continue;
        }
        let policy = rest
            .split(' ')
            .nth(41 - 3)
            .and_then(|f| f.parse().ok())
            .expect("stat has a policy field");
        out.push((name.to_string(), policy));
    }
    out
}

#[test]
fn node_threads_run_with_the_configured_scheduling_policy() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    for (extra, want) in [
        ("", SCHED_OTHER),
        ("thread_scheduling = \"batch\"", SCHED_BATCH),
    ] {
        let mut c = TestCluster::start(1, extra);
        c.wait_for_leader(Duration::from_secs(10));
        let mut client = c.client();
        c.put(&mut client, "k", "v");
        let pid = c.node(1).child.as_ref().expect("running").id();
        let threads = node_thread_policies(pid);
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        for needed in ["keel-consensus", "keel-service", "keel-storage", "keel-net"] {
            assert!(names.contains(&needed), "{needed} missing from {names:?}");
        }
        for (name, policy) in &threads {
            assert_eq!(*policy, want, "{name} with config {extra:?}: {threads:?}");
        }
    }
}

/// `auto_compaction_mode = "revision"`: the leader compacts by itself,
/// keeping at least the newest `auto_compaction_retention` revisions on
/// every node, and keeps doing so after a leader change.
#[test]
fn the_leader_compacts_the_kv_history_by_itself() {
    use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
    use keel_etcd_proto::etcdserverpb::{PutRequest, RangeRequest};
    let mut c = TestCluster::start(
        3,
        "auto_compaction_mode = \"revision\"\nauto_compaction_retention = \"20\"\n",
    );
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let etcd: Vec<String> = c.nodes.iter().map(|n| n.etcd.clone()).collect();
    // Puts through the leader; each makes a revision. Returns the last.
    let put_all = |at: &str, from: usize, to: usize| -> i64 {
        rt.block_on(async {
            let mut kv = KvClient::new(etcd_channel(at).await);
            let mut rev = 0;
            for i in from..to {
                let r = kv
                    .put(PutRequest {
                        key: format!("k{}", i % 10).into(),
                        value: format!("v{i}").into(),
                        ..Default::default()
                    })
                    .await
                    .expect("put");
                rev = r.into_inner().header.expect("header").revision;
            }
            rev
        })
    };
    // A serializable get of k0 at `rev` on the node serving `at`.
    let get_at = |at: &str, rev: i64| -> Result<(), tonic::Status> {
        rt.block_on(async {
            let mut kv = KvClient::new(etcd_channel(at).await);
            kv.range(RangeRequest {
                key: Bytes::from_static(b"k0"),
                revision: rev,
                serializable: true,
                ..Default::default()
            })
            .await
            .map(|_| ())
        })
    };
    // On every node at `nodes`: reading at `last - 40` soon fails as
    // compacted, reading at `last - 20` (within the retention) works.
    let check = |nodes: &[String], last: i64| {
        for at in nodes {
            let start = Instant::now();
            loop {
                match get_at(at, last - 40) {
                    Err(e) if e.message().contains("compacted") => break,
                    other => assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "revision {} at {at} is still there: {other:?}",
                        last - 40
                    ),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Err(e) = get_at(at, last - 20) {
                panic!("{at}: revision {} is gone: {e}", last - 20);
            }
        }
    };
    let last = put_all(&etcd[(leader - 1) as usize], 0, 100);
    assert!(last >= 101, "{last}");
    check(&etcd, last);
    // A new leader carries on.
    c.kill(leader);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let last = put_all(&etcd[(leader - 1) as usize], 100, 200);
    let alive: Vec<String> = c
        .nodes
        .iter()
        .filter(|n| n.child.is_some())
        .map(|n| n.etcd.clone())
        .collect();
    check(&alive, last);
}

/// Backup and restore: a member streams a backup of its state over the etcd
/// API's Snapshot call (`etcdctl snapshot save`) and removes its file once
/// sent; `keel restore` seeds every member of a new cluster from it, and
/// that cluster serves the backed-up keys at their revisions, then takes
/// writes. A lease whose TTL ran out while the backup waited is granted its
/// TTL again when the new cluster's first leader starts (as etcd refreshes
/// leases on a leader change), so its key is still there. Restoring into a
/// used data directory or from a file that is no backup is refused with
/// the reason, and nothing is written.
#[test]
fn a_backup_restores_into_a_new_cluster() {
    use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
    use keel_etcd_proto::etcdserverpb::lease_client::LeaseClient;
    use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use keel_etcd_proto::etcdserverpb::{
        LeaseGrantRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest, SnapshotRequest,
    };
    const LEASE_TTL: i64 = 3;
    let put = |k: &str, v: &str| PutRequest {
        key: k.as_bytes().to_vec().into(),
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let get = |k: &str| RangeRequest {
        key: k.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    let backup = c._tmp.path().join("backup.keel");
    let (revision, lease, backed_up_at) = c.rt.block_on(async {
        let mut kv = KvClient::new(etcd_channel(&c.nodes[0].etcd).await);
        let mut leases = LeaseClient::new(etcd_channel(&c.nodes[0].etcd).await);
        let lease = leases
            .lease_grant(LeaseGrantRequest {
                ttl: LEASE_TTL,
                id: 0,
            })
            .await
            .expect("lease grant")
            .into_inner()
            .id;
        kv.put(PutRequest {
            lease,
            ..put("leased", "1")
        })
        .await
        .expect("put with a lease");
        for i in 0..50 {
            kv.put(put(&format!("k{i}"), &format!("v{i}")))
                .await
                .expect("put");
        }
        let last = kv.put(put("k0", "again")).await.expect("put").into_inner();
        // Through the leader: member 2 has applied it before it answers.
        let mut kv2 = KvClient::new(etcd_channel(&c.nodes[1].etcd).await);
        kv2.range(get("k0")).await.expect("linearizable read");
        let mut m = MaintenanceClient::new(etcd_channel(&c.nodes[1].etcd).await);
        let mut stream = m
            .snapshot(SnapshotRequest {})
            .await
            .expect("snapshot")
            .into_inner();
        let mut file = Vec::new();
        let mut remaining = u64::MAX;
        while let Some(piece) = stream.message().await.expect("snapshot stream") {
            file.extend_from_slice(&piece.blob);
            // The revision the read-index barrier saw, at least the last put's.
            let rev = piece.header.expect("header").revision;
            assert!(rev >= last.header.expect("header").revision, "{rev}");
            assert!(piece.remaining_bytes < remaining, "remaining bytes go down");
            remaining = piece.remaining_bytes;
        }
        assert_eq!(remaining, 0, "the stream ended with nothing remaining");
        std::fs::write(&backup, &file).expect("write backup");
        (last.header.expect("header").revision, lease, Instant::now())
    });
    assert_eq!(
        revision, 53,
        "the leased put, 50 puts, one more, after the initial revision 1"
    );
    // The member's copy is gone once sent.
    let backups = c.node(2).dir.join("data").join(keel_node::BACKUP_DIR);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&backups)
        .expect("the backups directory")
        .count()
        > 0
    {
        assert!(Instant::now() < deadline, "backup file left in {backups:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Same cluster id as the backup's (the default) at first.
    let mut d = TestCluster::start(3, "");
    for id in 1..=3 {
        d.kill(id);
        // (Killed at once: it may not have created it yet.)
        let _ = std::fs::remove_dir_all(d.node(id).dir.join("data"));
    }
    let restore = |config: &std::path::Path, file: &std::path::Path| {
        let (code, text) = common::keel([
            "restore".as_ref(),
            file.as_os_str(),
            "--config".as_ref(),
            config.as_os_str(),
        ]);
        (code == 0, text)
    };
    // Not a backup: refused, nothing written.
    let junk = c._tmp.path().join("junk");
    std::fs::write(&junk, b"not a backup at all").expect("write junk");
    let (ok, text) = restore(&d.node(1).config, &junk);
    assert!(!ok && text.contains("not a Keel backup"), "{text}");
    assert!(
        !d.node(1).dir.join("data").exists(),
        "a refused restore wrote files"
    );
    // The backed-up cluster's id: refused (a member restored in place of a
    // running one could vote twice).
    let (ok, text) = restore(&d.node(1).config, &backup);
    assert!(!ok && text.contains("cluster_id of its own"), "{text}");
    assert!(
        !d.node(1).dir.join("data").exists(),
        "a refused restore wrote files"
    );
    for id in 1..=3 {
        let config = &d.node(id).config;
        let toml = std::fs::read_to_string(config).expect("read config");
        std::fs::write(config, format!("cluster_id = 99\n{toml}")).expect("write config");
        let (ok, text) = restore(config, &backup);
        assert!(ok, "{text}");
        assert!(text.contains(&format!("node {id} restored")), "{text}");
    }
    // A used data directory is refused.
    let (ok, text) = restore(&d.node(1).config, &backup);
    assert!(!ok && text.contains("is not empty"), "{text}");
    // The lease's TTL runs out while the backup waits (log time runs on).
    let ttl = Duration::from_secs(LEASE_TTL as u64);
    std::thread::sleep(
        (backed_up_at + ttl + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    );
    for id in 1..=3 {
        d.spawn(id);
    }
    d.wait_for_leader(Duration::from_secs(10));
    d.rt.block_on(async {
        let mut kv = KvClient::new(etcd_channel(&d.nodes[2].etcd).await);
        let got = kv.range(get("leased")).await.expect("get").into_inner();
        assert_eq!(got.kvs.len(), 1, "the leased key expired on restore");
        assert_eq!(got.kvs[0].lease, lease);
        let mut leases = LeaseClient::new(etcd_channel(&d.nodes[2].etcd).await);
        let left = leases
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: lease,
                keys: false,
            })
            .await
            .expect("time to live")
            .into_inner();
        assert!(
            left.ttl > 0 && left.ttl <= LEASE_TTL && left.granted_ttl == LEASE_TTL,
            "the restored lease has {} s of {} left",
            left.ttl,
            left.granted_ttl
        );
        let got = kv.range(get("k0")).await.expect("get").into_inner();
        assert_eq!(got.kvs[0].value.as_ref(), b"again");
        assert_eq!(got.kvs[0].mod_revision, 53);
        assert_eq!(got.header.expect("header").revision, 53);
        for i in 1..50 {
            let got = kv
                .range(get(&format!("k{i}")))
                .await
                .expect("get")
                .into_inner();
            assert_eq!(got.kvs[0].value, format!("v{i}").into_bytes(), "k{i}");
        }
        let next = kv
            .put(put("after", "restore"))
            .await
            .expect("put")
            .into_inner();
        assert_eq!(next.header.expect("header").revision, 54);
    });
}

/// `keel bench kv --keel-endpoints` measures a cluster it did not start
/// (here the test's, as if on other machines): it finds the leader,
/// preloads, runs the workload and reports it, with the cluster's CPU and
/// memory marked as not measured.
#[test]
fn bench_kv_measures_a_cluster_already_running() {
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    let eps: Vec<&str> = c.nodes.iter().map(|n| n.etcd.as_str()).collect();
    let eps = eps.join(",");
    let (code, text) = common::keel([
        "bench",
        "kv",
        "--systems",
        "keel",
        "--keel-endpoints",
        eps.as_str(),
        "--workloads",
        "put",
        "--no-sweep",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--keys",
        "100",
        "--no-write",
    ]);
    assert_eq!(code, 0, "keel bench kv:\n{text}");
    for want in [
        "Keel = the cluster already running at",
        "(its CPU and memory not measured)",
        "| put | ",
    ] {
        assert!(text.contains(want), "expected {want:?} in:\n{text}");
    }
    let row = text
        .lines()
        .find(|l| l.starts_with("| put | "))
        .expect("a put row");
    let ops: f64 = row
        .split('|')
        .nth(2)
        .expect("ops/s")
        .trim()
        .parse()
        .expect("ops/s");
    assert!(ops > 0.0, "no puts measured: {row}");
    // The preload's keys are in the cluster.
    let mut client = c.client();
    assert_eq!(
        c.get(&mut client, "bench/00000099")
            .as_deref()
            .map(str::len),
        Some(256)
    );
}

/// Clients of every member keep writing, and reading what they wrote
/// (linearizably, retried when Unavailable as etcd's clients retry reads),
/// while leadership moves round the cluster (`MoveLeader`, as `etcdctl
/// move-leader` and preferred-leader hand-overs do): the leader holds
/// writes during a transfer, and a member between the new term's vote and
/// its leader's first append holds requests until it knows that leader,
/// so puts succeed rather than fail with "too many requests" or "no
/// leader" (before, 386 of 4632 puts failed here). A couple of failures
/// are tolerated for a machine that stalls a node past two heartbeats
/// (100 ms).
#[test]
fn puts_on_every_member_succeed_across_leadership_transfers() {
    use keel_etcd_proto::etcdserverpb::{
        kv_client::KvClient, maintenance_client::MaintenanceClient, MoveLeaderRequest, PutRequest,
        RangeRequest,
    };
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    const MOVES: u64 = 20;
    let c = TestCluster::start(3, "");
    let (first, _) = c.wait_for_leader(Duration::from_secs(10));
    let etcd: Vec<String> = c.nodes.iter().map(|n| n.etcd.clone()).collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    rt.block_on(async {
        let mut writers = Vec::new();
        for (i, addr) in etcd.iter().enumerate() {
            let mut kv = KvClient::new(etcd_channel(addr).await);
            let (stop, puts, failures) = (stop.clone(), puts.clone(), failures.clone());
            let addr = addr.clone();
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let put = PutRequest {
                        key: format!("k{i}").into_bytes().into(),
                        value: format!("v{n}").into_bytes().into(),
                        ..Default::default()
                    };
                    // A put, then a linearizable read of it, retried when
                    // Unavailable as etcd's clients retry reads (a read a
                    // follower asked of a leader that has just handed
                    // over is refused "no leader"; puts are not retried).
                    let read = RangeRequest {
                        key: format!("k{i}").into_bytes().into(),
                        ..Default::default()
                    };
                    let mut done = kv.put(put).await.map(|_| ());
                    if done.is_ok() {
                        for attempt in 0..5 {
                            done = kv.range(read.clone()).await.map(|_| ());
                            match &done {
                                Err(e) if e.code() == tonic::Code::Unavailable && attempt < 4 => {}
                                _ => break,
                            }
                        }
                    }
                    match done {
                        Ok(()) => {
                            puts.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .expect("failures")
                            .push(format!("{addr}: {}", e.message())),
                    }
                }
            }));
        }
        let mut leader = first;
        for _ in 0..MOVES {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let target = leader % 3 + 1;
            MaintenanceClient::new(etcd_channel(&etcd[(leader - 1) as usize]).await)
                .move_leader(MoveLeaderRequest { target_id: target })
                .await
                .expect("move leader");
            leader = target;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("a writer");
        }
    });
    let failures = failures.lock().expect("failures").clone();
    let puts = puts.load(Ordering::Relaxed);
    let mut why = std::collections::BTreeMap::new();
    for f in &failures {
        *why.entry(f.split_once(": ").map_or(f.as_str(), |(_, m)| m))
            .or_insert(0) += 1;
    }
    assert!(
        // (A transfer costs none; a stall of a member on a busy machine
        // around one can cost one.)
        failures.len() as u64 <= MOVES / 5 && puts >= 3 * MOVES,
        "{} of {} put-and-reads failed across {MOVES} transfers, by answer: {why:?}",
        failures.len(),
        puts + failures.len() as u64
    );
}
