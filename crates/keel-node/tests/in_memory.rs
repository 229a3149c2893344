//! Three nodes in one process over the in-memory transport (the same
//! `PeerSender` interface as TCP): writes, reads, and a leader cut off from
//! the others being replaced, with every acknowledged write kept.

use bytes::Bytes;
use keel_client::{Client, ClientOptions};
use keel_core::{ClientId, Context, Service, ServiceHost, SnapshotTask};
use keel_kv::{Command, KvService, Query, Response};
use keel_net::codec::{ClientOp, ClientResult};
use keel_net::mem::MemNetwork;
use keel_node::config::{DurabilityConfig, ServiceThreadConfig};
use keel_node::runtime::{start_with, NodeError, Transport};
use keel_node::{NodeConfig, NodeHandle, PeerConfig};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
}

fn wait_leader(nodes: &[NodeHandle], isolated: Option<u64>) -> u64 {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let leader = nodes
            .iter()
            .map(NodeHandle::status)
            .filter(|s| s.role == "leader" && Some(s.id) != isolated)
            .max_by_key(|s| s.term)
            .map(|s| s.id);
        if let Some(l) = leader {
            return l;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no leader within 10 s");
}

/// Waits for a leader; returns its id, its handle and a follower's.
fn leader_and_follower(nodes: &[NodeHandle]) -> (u64, &NodeHandle, &NodeHandle) {
    let leader = wait_leader(nodes, None);
    let follower = nodes
        .iter()
        .find(|n| n.status().id != leader)
        .expect("a follower");
    (leader, &nodes[leader as usize - 1], follower)
}

/// Three KV nodes, `replicated`, snapshots practically never, each node's
/// configuration changed by `tweak`.
fn start_kv_three(tweak: impl Fn(&mut NodeConfig)) -> Three {
    start_three_with(1 << 30, DurabilityConfig::Replicated, tweak, || {
        Box::new(KvService::default())
    })
}

/// A KV put of `value` at `key`, encoded.
fn kv_put(key: &str, value: &str) -> Bytes {
    Command::Put {
        key: Bytes::from(key.to_owned()),
        value: Bytes::from(value.to_owned()),
    }
    .encode()
}

/// A linearizable KV get of `key` through `node` within `limit`: the value
/// (empty if the key is absent), or `None` if no value came back (no
/// answer in time, or an answer other than a value).
fn kv_get_within(node: &NodeHandle, key: &str, limit: Duration) -> Option<Bytes> {
    let q = Query::Get {
        key: Bytes::from(key.to_owned()),
    };
    let r = client_runtime().block_on(async {
        tokio::time::timeout(limit, node.call(ClientOp::Read(q.encode()))).await
    });
    match r {
        Ok(ClientResult::Ok(data)) => match Response::decode(&data) {
            Ok(Response::Get { kv, .. }) => Some(kv.map(|kv| kv.value).unwrap_or_default()),
            other => panic!("get {key}: {other:?}"),
        },
        _ => None,
    }
}

fn node_config(
    id: u64,
    dir: &std::path::Path,
    clients: &[String],
    snapshot_every_bytes: u64,
    durability: DurabilityConfig,
) -> NodeConfig {
    NodeConfig {
        id,
        cluster_id: 7,
        data_dir: dir.join(format!("n{id}")),
        peer_addr: "memory:0".into(),
        client_addr: clients[(id - 1) as usize].clone(),
        http_addr: None,
        etcd_addr: None,
        etcd_cert_file: None,
        peer_cert_file: None,
        peer_key_file: None,
        peer_trusted_ca_file: None,
        client_tls_cert_file: None,
        client_tls_key_file: None,
        client_tls_trusted_ca_file: None,
        http_tls_cert_file: None,
        http_tls_key_file: None,
        http_tls_trusted_ca_file: None,
        etcd_key_file: None,
        etcd_trusted_ca_file: None,
        etcd_client_cert_auth: false,
        etcd_cors: Vec::new(),
        auto_compaction_mode: "periodic".into(),
        auto_compaction_retention: "0".into(),
        watch_progress_notify_interval_ms: 600_000,
        kv_quota_bytes: 0,
        durability,
        replicated_sync_interval_ms: 10,
        service: "kv".into(),
        service_thread: ServiceThreadConfig::Dedicated,
        thread_scheduling: Default::default(),
        net_threads: 0,
        write_timeout_ms: 30_000,
        heartbeat_ms: 20,
        commit_notify_delay_ms: 5,
        follower_apply_interval_ms: 1,
        lease_reads: false,
        clock_drift_ppm: 10_000,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: 400,
        preferred_leaders: Vec::new(),
        preferred_leader_hold_ms: 5000,
        snapshot_every_bytes,
        snapshot_log_percent: 100,
        // Applied entries leave memory at once: followers that fall behind
        // are sent entries read back from the log files.
        log_cache_bytes: 0,
        queue_depth: 1024,
        max_request_bytes: 1 << 20,
        max_unapplied_bytes: 16 << 20,
        join: false,
        peers: (1..=clients.len() as u64)
            .filter(|&p| p != id)
            .map(|p| PeerConfig {
                id: p,
                peer_addr: "memory:0".into(),
                client_addr: clients[(p - 1) as usize].clone(),
                etcd_addr: None,
            })
            .collect(),
    }
}

/// Three nodes in a fresh directory over a fresh in-memory network.
struct Three {
    tmp: tempfile::TempDir,
    net: MemNetwork,
    /// Each node's client address, by id - 1.
    clients: Vec<String>,
    nodes: Vec<NodeHandle>,
}

/// Starts three nodes, each with its own service from `service` on a
/// thread of its own.
fn start_three(
    snapshot_every_bytes: u64,
    durability: DurabilityConfig,
    service: impl Fn() -> Box<dyn Service + Send>,
) -> Three {
    start_three_with(snapshot_every_bytes, durability, |_| {}, service)
}

/// `start_three`, with each node's configuration changed by `tweak` first.
fn start_three_with(
    snapshot_every_bytes: u64,
    durability: DurabilityConfig,
    tweak: impl Fn(&mut NodeConfig),
    service: impl Fn() -> Box<dyn Service + Send>,
) -> Three {
    // A port `free_addr` picked can be taken by a test running alongside
    // before the node binds it: then start over on fresh ports.
    for _attempt in 0..5 {
        let tmp = tempfile::tempdir().expect("tempdir");
        let net = MemNetwork::new();
        let clients: Vec<String> = (0..3).map(|_| free_addr()).collect();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let mut cfg = node_config(id, tmp.path(), &clients, snapshot_every_bytes, durability);
            tweak(&mut cfg);
            match start_with(cfg, service(), Transport::Memory(net.clone())) {
                Ok(n) => nodes.push(n),
                Err(NodeError::Listen { error, .. })
                    if error.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    break;
                }
                Err(e) => panic!("start: {e}"),
            }
        }
        if nodes.len() == 3 {
            return Three {
                tmp,
                net,
                clients,
                nodes,
            };
        }
        stop_all(nodes);
    }
    panic!("no free client ports in 5 attempts");
}

/// A runtime for the test's own client calls.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A sessionless write through `node`'s handle, as a client of it would
/// send one; `None` if no answer came within `limit`.
fn write_within(node: &NodeHandle, data: Bytes, limit: Duration) -> Option<ClientResult> {
    client_runtime()
        .block_on(async { tokio::time::timeout(limit, node.call(ClientOp::Write(data))).await })
        .ok()
}

/// Shuts every node down and waits for each to stop cleanly.
fn stop_all(nodes: Vec<NodeHandle>) {
    for n in &nodes {
        n.shutdown();
    }
    for n in nodes {
        n.wait().expect("clean stop");
    }
}

#[test]
fn three_nodes_in_one_process() {
    let dedicated = ServiceThreadConfig::Dedicated;
    leader_replaced_with_every_acknowledged_write_kept(DurabilityConfig::Sync, dedicated, 1 << 20);
}

/// The same in `replicated` mode, where the consensus thread writes the
/// log itself (and a deposed leader's tail is truncated through the storage
/// thread).
#[test]
fn three_nodes_in_one_process_replicated() {
    let (durability, dedicated) = (DurabilityConfig::Replicated, ServiceThreadConfig::Dedicated);
    leader_replaced_with_every_acknowledged_write_kept(durability, dedicated, 1 << 20);
}

/// The same with the service on the consensus thread (Aeron's shared
/// threading mode), taking a snapshot every KiB of log, so that applies,
/// both kinds of read, snapshot captures and role changes all run in line.
#[test]
fn three_nodes_in_one_process_with_the_service_on_the_consensus_thread() {
    let (durability, shared) = (DurabilityConfig::Sync, ServiceThreadConfig::Shared);
    let dir = leader_replaced_with_every_acknowledged_write_kept(durability, shared, 1024);
    for id in 1..=3 {
        let snapshots = std::fs::read_dir(dir.path().join(format!("n{id}")))
            .expect("data dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
            .count();
        assert!(snapshots > 0, "node {id} took no snapshot");
    }
}

fn leader_replaced_with_every_acknowledged_write_kept(
    durability: DurabilityConfig,
    service_thread: ServiceThreadConfig,
    snapshot_every_bytes: u64,
) -> tempfile::TempDir {
    let Three {
        tmp,
        net,
        clients,
        nodes,
    } = start_three_with(
        snapshot_every_bytes,
        durability,
        |c| c.service_thread = service_thread,
        || Box::new(KvService::default()),
    );
    let rt = client_runtime();
    let mut client = Client::new(ClientOptions::new(clients.clone())).expect("client");
    let put = |client: &mut Client, k: &str| {
        let cmd = Command::Put {
            key: Bytes::from(k.to_string()),
            value: Bytes::from_static(b"v"),
        };
        let r = rt.block_on(client.write(cmd.encode())).expect("put");
        assert!(matches!(Response::decode(&r), Ok(Response::Put { .. })));
    };
    let first = wait_leader(&nodes, None);
    for i in 0..20 {
        put(&mut client, &format!("a{i}"));
    }
    net.isolate(first);
    let second = wait_leader(&nodes, Some(first));
    assert_ne!(first, second);
    for i in 0..20 {
        put(&mut client, &format!("b{i}"));
    }
    net.heal();
    let keys = (0..20)
        .map(|i| format!("a{i}"))
        .chain((0..20).map(|i| format!("b{i}")));
    for k in keys {
        let q = Query::Get {
            key: Bytes::from(k.clone()),
        };
        let r = rt.block_on(client.read(q.encode())).expect("get");
        match Response::decode(&r) {
            Ok(Response::Get { kv: Some(kv), .. }) => assert_eq!(&kv.value[..], b"v"),
            other => panic!("{k}: {other:?}"),
        }
        // The node that answered the linearizable read has applied the
        // write, so its serializable read sees it too.
        let (r, _, _) = rt
            .block_on(client.stale_read(q.encode()))
            .expect("stale get");
        match Response::decode(&r) {
            Ok(Response::Get { kv: Some(kv), .. }) => assert_eq!(&kv.value[..], b"v"),
            other => panic!("{k} (serializable): {other:?}"),
        }
    }
    // Each node is marked running (`keel_log::meta::RESYNC_FILE`) until it
    // stops cleanly.
    let marked = |id: u64| {
        tmp.path()
            .join(format!("n{id}"))
            .join(keel_log::meta::RESYNC_FILE)
            .exists()
    };
    assert!((1..=3).all(marked), "a running node is not marked running");
    stop_all(nodes);
    assert!(
        !(1..=3).any(marked),
        "a cleanly stopped node is still marked running"
    );
    tmp
}

/// Snapshots serialized so far / started, by every `SlowSnapshots` in this
/// process.
static SNAPSHOTS_STARTED: AtomicU64 = AtomicU64::new(0);
static SNAPSHOTS_FINISHED: AtomicU64 = AtomicU64::new(0);
const SLOW_SNAPSHOT: Duration = Duration::from_millis(2500);

/// The KV service with a deliberately slow snapshot serialization: the
/// captured state takes `SLOW_SNAPSHOT` to serialize.
struct SlowSnapshots(KvService);

impl Service for SlowSnapshots {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        self.0.restore(snapshot)
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        self.prepare_snapshot()(out).expect("writing to a Vec cannot fail")
    }
    fn prepare_snapshot(&self) -> SnapshotTask {
        let task = self.0.prepare_snapshot();
        Box::new(move |out| {
            SNAPSHOTS_STARTED.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(SLOW_SNAPSHOT);
            task(out)?;
            SNAPSHOTS_FINISHED.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
    fn on_message(&mut self, ctx: &mut Context<'_>, client: ClientId, data: &[u8]) -> Bytes {
        self.0.on_message(ctx, client, data)
    }
    fn query(&self, data: &[u8]) -> Bytes {
        self.0.query(data)
    }
    fn on_timer(&mut self, ctx: &mut Context<'_>, id: u64) {
        self.0.on_timer(ctx, id)
    }
}

/// A snapshot must not stop the leader from serving: while every node
/// spends seconds serializing its snapshot, writes and linearizable reads
/// keep being answered promptly. Afterwards the snapshots on disk restore
/// the state they captured.
#[test]
fn writes_keep_being_acknowledged_while_a_slow_snapshot_is_serialized() {
    let Three {
        tmp,
        net: _,
        clients,
        nodes,
    } = start_three(4096, DurabilityConfig::Sync, || {
        Box::new(SlowSnapshots(KvService::default()))
    });
    let rt = client_runtime();
    let mut client = Client::new(ClientOptions::new(clients.clone())).expect("client");
    let mut put = |k: &str| -> Duration {
        let started = Instant::now();
        let cmd = Command::Put {
            key: Bytes::from(k.to_string()),
            value: Bytes::from(format!("value of {k}")),
        };
        let r = rt.block_on(client.write(cmd.encode())).expect("put");
        assert!(matches!(Response::decode(&r), Ok(Response::Put { .. })));
        started.elapsed()
    };
    wait_leader(&nodes, None);
    // Write until some node starts serializing a snapshot.
    let mut i = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while SNAPSHOTS_STARTED.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no snapshot started");
        put(&format!("k{i}"));
        i += 1;
    }
    // Now, during the slow serialization, writes go on.
    let during = Instant::now();
    let (mut acked, mut slowest) = (0, Duration::ZERO);
    while during.elapsed() < SLOW_SNAPSHOT / 2 {
        slowest = slowest.max(put(&format!("k{i}")));
        i += 1;
        acked += 1;
    }
    assert!(
        slowest < Duration::from_millis(1500),
        "a write took {slowest:?} while a snapshot was serialized"
    );
    assert!(
        SNAPSHOTS_FINISHED.load(Ordering::SeqCst) < SNAPSHOTS_STARTED.load(Ordering::SeqCst),
        "the snapshot finished early: the test proves nothing"
    );
    assert!(
        acked >= 20,
        "only {acked} writes acknowledged in {:?} while a snapshot was serialized",
        SLOW_SNAPSHOT / 2
    );
    // The snapshots complete and are published.
    let deadline = Instant::now() + Duration::from_secs(20);
    while SNAPSHOTS_FINISHED.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the snapshots never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let q = Query::Get {
        key: Bytes::from_static(b"k0"),
    };
    let r = rt.block_on(client.read(q.encode())).expect("get");
    assert!(matches!(
        Response::decode(&r),
        Ok(Response::Get { kv: Some(_), .. })
    ));
    stop_all(nodes);
    // Every node's published snapshot restores a state with the early keys.
    for id in 1..=3u64 {
        let dir = tmp.path().join(format!("n{id}"));
        let snap = keel_log::meta::load_snapshot(&dir)
            .expect("load snapshot")
            .unwrap_or_else(|| panic!("node {id} published no snapshot"));
        let mut host = ServiceHost::new(KvService::default(), 1);
        host.restore(&snap).expect("restore the snapshot");
        match Response::decode(&host.query(&q.encode())) {
            Ok(Response::Get { kv: Some(kv), .. }) => assert_eq!(&kv.value[..], b"value of k0"),
            other => panic!("node {id}: k0 in its snapshot: {other:?}"),
        }
    }
}

/// A node that has stopped while its process (and so its client listener)
/// lives on answers as a node that knows no leader, never "busy": a client
/// moves on to another node at once instead of retrying the stopped one
/// until its call times out.
#[test]
fn a_stopped_node_sends_clients_elsewhere() {
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net: _,
        clients,
        nodes,
    } = start_three(1 << 20, DurabilityConfig::Sync, || {
        Box::new(KvService::default())
    });
    let leader = wait_leader(&nodes, None);
    let stopped = nodes.iter().find(|n| n.id() != leader).expect("a follower");
    stopped.shutdown();
    stopped.wait().expect("clean stop");
    assert!(stopped.is_stopped());
    let rt = client_runtime();
    let no_leader = ClientResult::NotLeader {
        leader: None,
        address: None,
    };
    let put = Command::Put {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
    };
    let get = Query::Get {
        key: Bytes::from_static(b"k"),
    };
    assert_eq!(
        rt.block_on(stopped.call(ClientOp::Write(put.encode()))),
        no_leader
    );
    assert_eq!(
        rt.block_on(stopped.call(ClientOp::StaleRead(get.encode()))),
        no_leader
    );
    // Over TCP, with the stopped node first in the client's list.
    let first = clients[(stopped.id() - 1) as usize].clone();
    let mut endpoints = vec![first.clone()];
    endpoints.extend(clients.iter().filter(|c| **c != first).cloned());
    let mut opts = ClientOptions::new(endpoints);
    opts.call_timeout = Duration::from_secs(5);
    let mut client = Client::new(opts).expect("client");
    let r = rt
        .block_on(client.write(put.encode()))
        .expect("the write goes to a live node");
    assert!(matches!(Response::decode(&r), Ok(Response::Put { .. })));
    stop_all(nodes);
}

/// A write in a client session that the leader accepted but could not
/// commit before it lost its quorum is answered "not the leader" when it
/// steps down (the client then retries elsewhere with the same sequence
/// number, which the session table applies once), not left waiting. (A
/// sessionless write, the etcd API's, waits for its entry instead: see the
/// runtime's `a_deposed_leaders_*` tests.)
#[test]
fn a_deposed_leader_answers_its_uncommitted_writes() {
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net,
        clients: _,
        nodes,
    } = start_three(1 << 20, DurabilityConfig::Replicated, || {
        Box::new(KvService::default())
    });
    let first = wait_leader(&nodes, None);
    let leader = nodes.iter().find(|n| n.id() == first).expect("leader");
    net.isolate(first);
    let put = Command::Put {
        key: Bytes::from_static(b"k"),
        value: Bytes::from_static(b"v"),
    };
    let r = client_runtime()
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                leader.call_in_session(77, 1, ClientOp::Write(put.encode())),
            )
            .await
        })
        .expect("answered once the leader steps down");
    assert!(matches!(r, ClientResult::NotLeader { .. }), "{r:?}");
    net.heal();
    stop_all(nodes);
}

/// Replies with what it is sent; the command `panic` makes it panic.
/// `apply_delay` makes each write take that long (a service slower than
/// its log); `snapshot_fault` makes serializing its snapshot fail.
#[derive(Clone, Copy, Default)]
struct Echo {
    apply_delay: Duration,
    snapshot_fault: Option<SnapshotFault>,
}

/// How a snapshot fails to serialize.
#[derive(Clone, Copy, Debug)]
enum SnapshotFault {
    /// The service's serializer panics.
    Panics,
    /// It returns an error.
    Fails,
}

impl Service for Echo {
    fn restore(&mut self, _snapshot: Option<&[u8]>) -> Result<(), String> {
        Ok(())
    }
    fn snapshot(&self, _out: &mut Vec<u8>) {}
    fn prepare_snapshot(&self) -> SnapshotTask {
        let fault = self.snapshot_fault;
        Box::new(move |out| {
            out.write_all(b"part of it")?;
            match fault {
                None => Ok(()),
                Some(SnapshotFault::Panics) => panic!("the test service cannot serialize"),
                Some(SnapshotFault::Fails) => {
                    Err(std::io::Error::other("the test service cannot serialize"))
                }
            }
        })
    }
    fn on_message(&mut self, _ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        assert!(data != b"panic", "the test service was told to panic");
        std::thread::sleep(self.apply_delay);
        Bytes::copy_from_slice(data)
    }
    fn query(&self, data: &[u8]) -> Bytes {
        Bytes::copy_from_slice(data)
    }
}

/// A snapshot that cannot be serialized (the service's serializer panics
/// or fails) stops the node with the reason, rather than leaving the
/// snapshot thread dead and the node never taking another snapshot.
#[test]
fn a_snapshot_that_fails_to_serialize_stops_its_node_with_the_reason() {
    for (fault, reason) in [
        (SnapshotFault::Panics, "serializing a snapshot panicked"),
        (SnapshotFault::Fails, "saving snapshot"),
    ] {
        let e = first_stop_with_snapshot_fault(fault);
        assert!(
            e.contains(reason) && e.contains("the test service cannot serialize"),
            "{fault:?}: {e}"
        );
    }
}

/// Writes to a cluster of `Echo { snapshot_fault }` nodes until one stops;
/// its reason.
fn first_stop_with_snapshot_fault(fault: SnapshotFault) -> String {
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net: _,
        clients: _,
        nodes,
    } = start_three(1024, DurabilityConfig::Replicated, move || {
        Box::new(Echo {
            snapshot_fault: Some(fault),
            ..Echo::default()
        })
    });
    let leader = wait_leader(&nodes, None);
    let l = &nodes[(leader - 1) as usize];
    let start = Instant::now();
    while !nodes.iter().any(|n| n.is_stopped()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no node stopped, though every snapshot fails"
        );
        let _ = write_within(l, Bytes::from(vec![7u8; 200]), Duration::from_millis(500));
    }
    let stopped = nodes
        .iter()
        .position(|n| n.is_stopped())
        .expect("one stopped");
    for n in &nodes {
        n.shutdown();
    }
    let mut reasons = Vec::new();
    for n in nodes {
        reasons.push(n.wait());
    }
    reasons
        .swap_remove(stopped)
        .expect_err("a failed snapshot is not a clean stop")
        .to_string()
}

/// Writes that would take a node's unapplied log past
/// `max_unapplied_bytes` are answered "busy" at once instead of queueing
/// behind the backlog, and every write gets an answer: applied or busy.
#[test]
fn writes_beyond_the_unapplied_backlog_are_answered_busy() {
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net: _,
        clients: _,
        nodes,
    } = start_three_with(
        1 << 20,
        DurabilityConfig::Replicated,
        |c| {
            c.max_request_bytes = 1024;
            c.max_unapplied_bytes = 4096;
        },
        || {
            Box::new(Echo {
                apply_delay: Duration::from_millis(20),
                ..Echo::default()
            })
        },
    );
    let leader = wait_leader(&nodes, None);
    let l = &nodes[(leader - 1) as usize];
    // 40 writes of 500 bytes at once: five times the bound, and at 20 ms
    // each the service needs 0.8 s for them all.
    let results: Vec<ClientResult> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..40u8)
            .map(|i| {
                s.spawn(move || {
                    client_runtime().block_on(l.call(ClientOp::Write(Bytes::from(vec![i; 500]))))
                })
            })
            .collect();
        calls
            .into_iter()
            .map(|c| c.join().expect("a client thread"))
            .collect()
    });
    let ok = results
        .iter()
        .filter(|r| matches!(r, ClientResult::Ok(_)))
        .count();
    let busy = results
        .iter()
        .filter(|r| matches!(r, ClientResult::Busy))
        .count();
    assert_eq!(ok + busy, results.len(), "{results:?}");
    assert!(ok >= 1, "nothing was taken: {results:?}");
    assert!(busy >= 1, "all 40 were taken past the bound");
    // Once the backlog is applied, writes are taken again.
    assert!(matches!(
        write_within(l, Bytes::from_static(b"after"), Duration::from_secs(5)),
        Some(ClientResult::Ok(_))
    ));
    stop_all(nodes);
}

/// Sessionless writes are matched to their replies by a number the node
/// gives them, not the client's: two connections that both send sequence
/// number 7 (nothing deduplicates sessionless writes, so clients need not
/// pick distinct ones) each get their own reply.
#[test]
fn sessionless_writes_with_the_same_number_each_get_their_own_reply() {
    use keel_net::codec::{self, ClientRequest, Frame};
    use std::io::{Read, Write};
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net: _,
        clients,
        nodes,
    } = start_three(1 << 20, DurabilityConfig::Replicated, || {
        Box::new(Echo::default())
    });
    let leader = wait_leader(&nodes, None);
    let addr = &clients[(leader - 1) as usize];
    let mut conns: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    // Both requests are written before either reply is read, so both wait
    // for their entries at the same time.
    for (i, c) in conns.iter_mut().enumerate() {
        let mut buf = Vec::new();
        let req = ClientRequest {
            id: 1,
            client: keel_core::SESSIONLESS,
            seq: 7,
            op: ClientOp::Write(Bytes::from(format!("from connection {i}"))),
        };
        codec::encode(&Frame::Request(req), &mut buf);
        c.write_all(&buf).expect("send");
    }
    for (i, c) in conns.iter_mut().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = Vec::new();
        let reply = loop {
            if let Some((frame, _)) = codec::decode(&buf, 1 << 20).expect("a valid frame") {
                break frame;
            }
            let mut chunk = [0u8; 4096];
            let n = c.read(&mut chunk).expect("a reply within 10 s");
            assert!(n > 0, "connection {i} closed without a reply");
            buf.extend_from_slice(&chunk[..n]);
        };
        let Frame::Response(r) = reply else {
            panic!("connection {i}: {reply:?}");
        };
        assert_eq!(r.id, 1);
        assert_eq!(
            r.result,
            ClientResult::Ok(Bytes::from(format!("from connection {i}")))
        );
    }
    stop_all(nodes);
}

/// A write a follower forwarded to a leader that never gets it waits no
/// longer than `write_timeout_ms`: its client is told the outcome is
/// unknown. (Here the follower's messages to the leader are lost while the
/// leader's still arrive, so the follower keeps following it and nothing
/// else would ever answer the write.)
/// Waits for a leader and for a follower to know it, then cuts that
/// follower's link to the leader (the leader's to it stays up, so the
/// follower keeps hearing it); (leader, follower).
fn cut_a_follower_from_the_leader(nodes: &[NodeHandle], net: &MemNetwork) -> (u64, u64) {
    let leader = wait_leader(nodes, None);
    let follower = (1..=3u64).find(|&n| n != leader).expect("a follower");
    let f = &nodes[(follower - 1) as usize];
    let start = Instant::now();
    while f.status().leader != Some(leader) {
        assert!(start.elapsed() < Duration::from_secs(10), "no leader known");
        std::thread::sleep(Duration::from_millis(10));
    }
    net.cut(follower, leader);
    (leader, follower)
}

#[test]
fn a_forwarded_write_the_leader_never_got_is_answered_after_the_write_timeout() {
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net,
        clients: _,
        nodes,
    } = start_three_with(
        1 << 20,
        DurabilityConfig::Replicated,
        |c| c.write_timeout_ms = 1_000,
        || Box::new(Echo::default()),
    );
    let (leader, follower) = cut_a_follower_from_the_leader(&nodes, &net);
    let f = &nodes[(follower - 1) as usize];
    let asked = Instant::now();
    let r = write_within(f, Bytes::from_static(b"lost"), Duration::from_secs(10))
        .expect("answered within 10 s");
    let waited = asked.elapsed();
    match &r {
        ClientResult::Error(m) => assert!(m.contains("may or may not have been applied"), "{m}"),
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_secs(1),
        "answered after {waited:?}"
    );
    assert_eq!(
        f.status().leader,
        Some(leader),
        "the follower kept its leader"
    );
    net.heal();
    stop_all(nodes);
}

/// A follower's linearizable read whose read-index request the leader
/// never got (the follower's link to it is cut while the follower keeps
/// hearing it) is refused within two election timeouts, sending the client to
/// the leader, instead of waiting forever.
#[test]
fn a_forwarded_read_the_leader_never_got_is_refused() {
    let Three {
        tmp: _tmp, // kept until the end: the nodes' data
        net,
        clients: _,
        nodes,
    } = start_three_with(
        1 << 20,
        DurabilityConfig::Replicated,
        |_| {},
        || Box::new(Echo::default()),
    );
    let (leader, follower) = cut_a_follower_from_the_leader(&nodes, &net);
    let f = &nodes[(follower - 1) as usize];
    let r = client_runtime()
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                f.call(ClientOp::Read(Bytes::from_static(b"q"))),
            )
            .await
        })
        .expect("answered within 10 s");
    match r {
        ClientResult::NotLeader {
            leader: Some(l), ..
        } => assert_eq!(l, leader),
        other => panic!("expected to be sent to the leader, got {other:?}"),
    }
    assert_eq!(
        f.status().leader,
        Some(leader),
        "the follower kept its leader"
    );
    net.heal();
    stop_all(nodes);
}

/// Clients that keep the consensus thread's input full (here 16 requests
/// deep, with thousands waiting to get in) do not crowd out peer messages:
/// none is dropped.
#[test]
fn a_flood_of_client_requests_drops_no_peer_message() {
    let t = start_kv_three(|c| c.queue_depth = 16);
    let leader = wait_leader(&t.nodes, None);
    let l = &t.nodes[(leader - 1) as usize];
    let q = Query::Get {
        key: Bytes::from_static(b"k"),
    }
    .encode();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (mut answered, mut busy) = (0, 0);
    let start = Instant::now();
    rt.block_on(async {
        while start.elapsed() < Duration::from_secs(3) {
            let calls = (0..2048).map(|_| l.call(ClientOp::Read(q.clone())));
            for r in join_all(calls).await {
                match r {
                    ClientResult::Busy => busy += 1,
                    _ => answered += 1,
                }
            }
        }
    });
    assert!(busy > 0, "the flood never filled the queue");
    assert!(answered > 0);
    let metrics = l.render_metrics();
    let dropped = metrics
        .lines()
        .find_map(|line| line.strip_prefix("keel_peer_messages_dropped_total "))
        .expect("the dropped peer messages metric");
    assert_eq!(dropped.trim(), "0", "peer messages dropped");
    stop_all(t.nodes);
}

/// A learner no configuration names (it could never be reached, so never
/// catch up) is refused, with what to do.
#[test]
fn a_learner_no_configuration_names_is_refused() {
    let t = start_kv_three(|_| {});
    let leader = wait_leader(&t.nodes, None);
    let l = &t.nodes[(leader - 1) as usize];
    let r = client_runtime().block_on(l.call(ClientOp::ChangeMembership(
        keel_core::MembershipChange::AddLearner(9),
    )));
    match r {
        ClientResult::Error(m) => assert!(
            m.contains("node 9 is not in this node's configuration"),
            "{m}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!l.status().learners.contains(&9));
    stop_all(t.nodes);
}

/// Runs `futures` concurrently on the calling task; their outputs in order.
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut running: Vec<_> = futures.map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = running.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (slot, out) in running.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = slot {
                if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                    *out = Some(v);
                    *slot = None;
                }
            }
        }
        if running.iter().all(Option::is_none) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// A service that panics leaves its state unknown: the node stops with an
/// error naming the panic, with the service on its own thread or on the
/// consensus thread, instead of running on without it.
#[test]
fn a_panicking_service_stops_its_node_with_the_reason() {
    for service_thread in [ServiceThreadConfig::Dedicated, ServiceThreadConfig::Shared] {
        let Three {
            tmp, // kept until the end: the nodes' data
            net: _,
            clients: _,
            nodes,
        } = start_three_with(
            1 << 20,
            DurabilityConfig::Replicated,
            |c| c.service_thread = service_thread,
            || Box::new(Echo::default()),
        );
        let leader = wait_leader(&nodes, None);
        let l = &nodes[(leader - 1) as usize];
        // The leader applies it once committed (a follower only if it
        // heard of the commit before the leader stopped); the answer, if
        // any, does not matter.
        let _ = write_within(l, Bytes::from_static(b"panic"), Duration::from_secs(5));
        let start = Instant::now();
        while !l.is_stopped() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{service_thread:?}: the leader is still running"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = l.wait().expect_err("a panic is not a clean stop");
        assert!(
            e.to_string().contains("panicked"),
            "{service_thread:?}: {e}"
        );
        // A stop on an error leaves the running mark: the next start writes
        // the log's end again before trusting it
        // (`keel_log::meta::RESYNC_FILE`).
        let dir = tmp.path().join(format!("n{leader}"));
        assert!(
            dir.join(keel_log::meta::RESYNC_FILE).exists(),
            "{service_thread:?}: no resync mark after an error stop"
        );
        for n in &nodes {
            n.shutdown();
        }
        for n in nodes {
            let _ = n.wait(); // (stopped by the panic too, or cleanly)
        }
    }
}

/// With `log_cache_bytes = 0` (as every test here runs) applied entries
/// leave memory at once: a follower cut off while writes go on is caught
/// up with entries the leader reads back from its log files, and ends with
/// every write; the leader meanwhile holds none of the applied log.
#[test]
fn a_follower_behind_the_in_memory_log_catches_up_from_the_log_files() {
    let Three {
        tmp: _tmp,
        net,
        clients: _,
        nodes,
    } = start_three(1 << 30, DurabilityConfig::Sync, || {
        Box::new(KvService::default())
    });
    let leader = wait_leader(&nodes, None);
    let behind = if leader == 1 { 2 } else { 1 };
    let (l, b) = (&nodes[leader as usize - 1], &nodes[behind as usize - 1]);
    net.isolate(behind);
    let value = Bytes::from(vec![b'v'; 1000]);
    for i in 0..200 {
        let cmd = Command::Put {
            key: Bytes::from(format!("k{i}")),
            value: value.clone(),
        };
        let r = write_within(l, cmd.encode(), Duration::from_secs(10));
        assert!(matches!(r, Some(ClientResult::Ok(_))), "put k{i}: {r:?}");
    }
    // Everything applied: only unapplied entries' data would be held. (The
    // status and these gauges are published together, periodically.)
    let start = Instant::now();
    loop {
        let m = l.metrics();
        let (entries, held) = (m.log_retained_entries.get(), m.log_retained_bytes.get());
        if entries > 200 && held < 4096 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the leader holds {held} bytes of applied log in {entries} entries"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let written = l.status().commit;
    assert!(written > 200_000, "{written}");
    // (Not necessarily 0: on a loaded machine the other follower may fall
    // behind the in-memory log for a moment too, and be sent entries read
    // back. The isolated one certainly is: everything it lacks left memory.)
    let reads_before = l.metrics().log_reads.get();
    net.heal();
    let start = Instant::now();
    while b.status().applied < written {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node {behind} did not catch up: {:?}",
            b.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        l.metrics().log_reads.get() > reads_before,
        "nothing was read back for node {behind}"
    );
    let rt = client_runtime();
    for i in [0, 99, 199] {
        let q = Query::Get {
            key: Bytes::from(format!("k{i}")),
        };
        let r = rt.block_on(b.call(ClientOp::StaleRead(q.encode())));
        let ClientResult::StaleOk { data, .. } = r else {
            panic!("stale read of k{i} on node {behind}: {r:?}");
        };
        match Response::decode(&data) {
            Ok(Response::Get { kv: Some(kv), .. }) => assert_eq!(kv.value, value),
            other => panic!("k{i} on node {behind}: {other:?}"),
        }
    }
    stop_all(nodes);
}

/// Followers apply committed entries in batches (`follower_apply_interval_ms`,
/// here far longer than the time between commits), yet each one applies
/// every write, including the last ones of a stream that then stops (owed
/// until a later wake), and a follower's linearizable read sees the write
/// before it.
#[test]
fn followers_apply_in_batches_and_miss_nothing() {
    let Three {
        tmp: _tmp, nodes, ..
    } = start_kv_three(|c| c.follower_apply_interval_ms = 300);
    let leader = wait_leader(&nodes, None);
    let l = &nodes[leader as usize - 1];
    let rt = client_runtime();
    // Ten writers at once: commits come much faster than one per 300 ms.
    std::thread::scope(|s| {
        for t in 0..10 {
            s.spawn(move || {
                for i in 0..30 {
                    let cmd = Command::Put {
                        key: Bytes::from(format!("k{t}-{i}")),
                        value: Bytes::from(format!("v{i}")),
                    };
                    let r = write_within(l, cmd.encode(), Duration::from_secs(10));
                    assert!(
                        matches!(r, Some(ClientResult::Ok(_))),
                        "put k{t}-{i}: {r:?}"
                    );
                }
            });
        }
    });
    let written = l.status().commit;
    let start = Instant::now();
    for n in &nodes {
        while n.status().applied < written {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "a follower stopped short of the commit position {written}: {:?}",
                n.status()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // Another write, then at once a linearizable read through a follower:
    // the read waits behind that write's apply, however it was batched.
    let put = Command::Put {
        key: Bytes::from_static(b"last"),
        value: Bytes::from_static(b"written"),
    };
    let r = write_within(l, put.encode(), Duration::from_secs(10));
    assert!(matches!(r, Some(ClientResult::Ok(_))), "put last: {r:?}");
    let follower = nodes
        .iter()
        .find(|n| n.status().id != leader)
        .expect("a follower");
    let q = Query::Get {
        key: Bytes::from_static(b"last"),
    };
    let r = rt.block_on(follower.call(ClientOp::Read(q.encode())));
    let ClientResult::Ok(data) = r else {
        panic!("linearizable read on a follower: {r:?}");
    };
    match Response::decode(&data) {
        Ok(Response::Get { kv: Some(kv), .. }) => assert_eq!(&kv.value[..], b"written"),
        other => panic!("last on a follower: {other:?}"),
    }
    stop_all(nodes);
}

/// A follower's linearizable read whose read index is beyond what the
/// follower holds (it was cut off from the leader when the write before it
/// committed) is answered as soon as the follower applies up to it: the
/// applies it waits on wake the service at once, not after the apply
/// interval (here 1 s, so waiting for it would show).
#[test]
fn a_follower_read_ahead_of_its_log_does_not_wait_for_the_apply_interval() {
    let Three {
        tmp: _tmp,
        net,
        nodes,
        ..
    } = start_kv_three(|c| c.follower_apply_interval_ms = 1000);
    let (leader, l, follower) = leader_and_follower(&nodes);
    let f = follower.status().id;
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        net.cut(leader, f);
        let value = format!("v{round}");
        let r = write_within(l, kv_put("k", &value), Duration::from_secs(10));
        assert!(matches!(r, Some(ClientResult::Ok(_))), "put {round}: {r:?}");
        net.heal();
        let start = Instant::now();
        let got = kv_get_within(follower, "k", Duration::from_secs(10));
        slowest = slowest.max(start.elapsed());
        assert_eq!(
            got.as_deref(),
            Some(value.as_bytes()),
            "read {round} on the follower"
        );
    }
    println!("slowest follower read: {slowest:?}");
    assert!(
        slowest < Duration::from_millis(500),
        "a follower read waited {slowest:?}, as long as the 1 s apply interval"
    );
    stop_all(nodes);
}

/// With `lease_reads` on every node, the leader answers linearizable reads
/// from its lease (counted in `keel_lease_reads_total`), reads on it and
/// through a follower see every write before them, and after the leader is
/// cut off the majority's new leader serves them: the cut-off one answers
/// none by lease once its lease has run out. The nodes' election timeouts
/// differ (500, 750 and 1000 ms at least): each lease counts on the
/// stickiness its voters report.
#[test]
fn lease_reads_see_every_earlier_write_and_follow_the_leader() {
    let Three {
        tmp: _tmp,
        net,
        nodes,
        ..
    } = start_kv_three(|c| {
        c.lease_reads = true;
        c.election_timeout_min_ms = 250 + 250 * c.id;
        c.election_timeout_max_ms = c.election_timeout_min_ms + 500;
    });
    let read = |n: &NodeHandle| kv_get_within(n, "k", Duration::from_secs(5));
    let lease_reads = |n: &NodeHandle| n.metrics().lease_reads.get();
    let (leader, l, follower) = leader_and_follower(&nodes);
    for i in 0..20 {
        let value = format!("v{i}");
        let r = write_within(l, kv_put("k", &value), Duration::from_secs(10));
        assert!(matches!(r, Some(ClientResult::Ok(_))), "put {i}: {r:?}");
        assert_eq!(
            read(l).as_deref(),
            Some(value.as_bytes()),
            "leader read {i}"
        );
        assert_eq!(
            read(follower).as_deref(),
            Some(value.as_bytes()),
            "follower read {i}"
        );
    }
    let by_lease = lease_reads(l);
    assert!(
        by_lease >= 20,
        "the leader answered {by_lease} of 40 reads from its lease"
    );

    // Cut the leader off: the other two elect a new one, whose reads see a
    // write made there; the old leader answers no read from its lease
    // (it has run out by the time the others may elect).
    net.isolate(leader);
    let new = wait_leader(&nodes, Some(leader));
    assert_ne!(new, leader);
    let n = &nodes[new as usize - 1];
    let r = write_within(n, kv_put("k", "after"), Duration::from_secs(10));
    assert!(matches!(r, Some(ClientResult::Ok(_))), "put after: {r:?}");
    assert_eq!(read(n).as_deref(), Some(&b"after"[..]));
    let before = lease_reads(l);
    let stale = read(l);
    assert!(
        stale.is_none(),
        "the cut-off old leader answered a read: {stale:?}"
    );
    assert_eq!(lease_reads(l), before);
    net.heal();
    stop_all(nodes);
}

/// A write a follower took in a client session, whose entry the follower
/// never receives because a snapshot install replaces it (the leader
/// compacted its log while the follower heard nothing), is answered when
/// the snapshot is installed, with the reply the snapshot's session table
/// keeps: not "outcome unknown" after `write_timeout_ms`.
#[test]
fn a_session_write_covered_by_a_snapshot_install_is_answered_with_its_reply() {
    let Three {
        tmp: _tmp,
        net,
        nodes,
        ..
    } = start_three_with(
        2048,
        DurabilityConfig::Replicated,
        |c| {
            c.write_timeout_ms = 30_000;
            c.snapshot_log_percent = 0;
            // The cut-off follower must not time out (it would answer its
            // waiting writes "not the leader") while the leader compacts.
            c.election_timeout_min_ms = 3_000;
            c.election_timeout_max_ms = 6_000;
        },
        || Box::new(KvService::default()),
    );
    let (leader, l, f) = leader_and_follower(&nodes);
    let fid = f.status().id;
    net.cut(leader, fid);
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let rt = client_runtime();
            let start = Instant::now();
            let r = rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(15),
                    f.call_in_session(4242, 1, ClientOp::Write(kv_put("covered", "yes"))),
                )
                .await
            });
            (r, start.elapsed())
        });
        // The forwarded write commits without the follower; then enough
        // writes for snapshots that compact the leader's log past it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while l.metrics().snapshots_taken.get() < 3 {
            assert!(Instant::now() < deadline, "the leader took no snapshots");
            for i in 0..20 {
                let r = write_within(
                    l,
                    kv_put(&format!("fill{i}"), &"x".repeat(200)),
                    Duration::from_secs(5),
                );
                assert!(matches!(r, Some(ClientResult::Ok(_))), "fill: {r:?}");
            }
        }
        assert_eq!(f.metrics().snapshots_installed.get(), 0);
        net.heal();
        let (r, took) = waiting.join().expect("the waiting client");
        let r = r.unwrap_or_else(|_| panic!("no answer within 15 s (write timeout 30 s)"));
        let ClientResult::Ok(data) = r else {
            panic!("the covered write: {r:?} after {took:?}");
        };
        assert!(
            matches!(Response::decode(&data), Ok(Response::Put { .. })),
            "{:?}",
            Response::decode(&data)
        );
        assert!(
            f.metrics().snapshots_installed.get() >= 1,
            "no snapshot install"
        );
    });
    stop_all(nodes);
}

/// A backup taken on a follower with the service on the consensus thread
/// (the capture runs in line there) seeds a new three-node cluster through
/// `restore_backup`, which serves every backed-up key and takes writes; the
/// backup's file is gone once dropped, and a stopped node takes none. A
/// staging directory that a restore killed part-way left beside a data
/// directory is removed by the next restore into it.
#[test]
fn a_backup_seeds_a_new_cluster() {
    let shared = |c: &mut NodeConfig| c.service_thread = ServiceThreadConfig::Shared;
    let old = start_kv_three(shared);
    let (_, leader, follower) = leader_and_follower(&old.nodes);
    for i in 0..20 {
        let put = write_within(
            leader,
            kv_put(&format!("k{i}"), &format!("v{i}")),
            Duration::from_secs(10),
        );
        assert!(matches!(put, Some(ClientResult::Ok(_))), "{put:?}");
    }
    // Read through the follower: it has applied every put.
    assert_eq!(
        kv_get_within(follower, "k19", Duration::from_secs(10)).as_deref(),
        Some(&b"v19"[..])
    );
    let backup = client_runtime()
        .block_on(follower.backup())
        .expect("backup");
    assert!(backup.path.starts_with(old.tmp.path()), "{:?}", backup.path);
    let file = old.tmp.path().join("copy.keel");
    std::fs::copy(&backup.path, &file).expect("copy the backup");
    let written = backup.path.clone();
    drop(backup);
    assert!(!written.exists(), "the backup file outlived its Backup");
    let stopped = &old.nodes[0];
    stopped.shutdown();
    assert!(client_runtime().block_on(stopped.backup()).is_err());
    stop_all(old.nodes);

    let tmp = tempfile::tempdir().expect("tempdir");
    let clients: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let net = MemNetwork::new();
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut cfg = node_config(id, tmp.path(), &clients, 1 << 30, DurabilityConfig::Sync);
        shared(&mut cfg);
        // What a restore killed part-way leaves beside the directory; one
        // a running restore holds, and a name that is no restore's, stay.
        let staging = |rest: &str| {
            let d = tmp.path().join(format!(".n{id}.restoring-{rest}"));
            std::fs::create_dir_all(&d).expect("staging");
            std::fs::write(d.join("snap-00000000000000000001.snap"), b"half").expect("write");
            d
        };
        let (stale, running, other) = (staging("1"), staging("2"), staging("x"));
        let held = keel_log::DirLock::acquire(&running).expect("lock");
        let meta = keel_node::restore_backup(&cfg, Box::new(KvService::default()), &file, false)
            .expect("restore");
        assert!(
            !stale.exists(),
            "a killed restore's staging directory was left"
        );
        assert!(
            running.exists(),
            "a running restore's staging directory was removed"
        );
        assert!(
            other.exists(),
            "a directory that is no restore's was removed"
        );
        drop(held);
        for d in [running, other] {
            std::fs::remove_dir_all(d).expect("rm");
        }
        assert_eq!(meta.membership.voters.len(), 3);
        // The restored directory is this node's, of the new cluster.
        let identity = keel_log::meta::load_identity(&cfg.data_dir).expect("identity");
        assert_eq!(
            identity,
            Some(keel_log::Identity {
                node_id: id,
                cluster_id: cfg.cluster_id
            })
        );
        let again = keel_node::restore_backup(&cfg, Box::new(KvService::default()), &file, false);
        assert!(again.is_err(), "restored over a used data directory");
        nodes.push(
            start_with(
                cfg,
                Box::new(KvService::default()),
                Transport::Memory(net.clone()),
            )
            .expect("start"),
        );
    }
    let (_, leader, _) = leader_and_follower(&nodes);
    for i in 0..20 {
        let got = kv_get_within(leader, &format!("k{i}"), Duration::from_secs(10));
        assert_eq!(got, Some(Bytes::from(format!("v{i}"))), "k{i}");
    }
    let put = write_within(leader, kv_put("after", "restore"), Duration::from_secs(10));
    assert!(matches!(put, Some(ClientResult::Ok(_))), "{put:?}");
    stop_all(nodes);
}

/// Backups taken from a follower while writes go on, snapshots are taken
/// every few KiB and the follower, cut off again and again, catches up by
/// snapshot installs: every backup that is written is a consistent state
/// (the sequential writes' prefix, nothing torn), restores, and leaves no
/// file behind; one overtaken by an install says so.
#[test]
fn backups_stay_consistent_under_writes_and_snapshot_installs() {
    let three = start_three_with(
        8 << 10,
        DurabilityConfig::Replicated,
        |_| {},
        || Box::new(KvService::default()),
    );
    let (_, leader, follower) = leader_and_follower(&three.nodes);
    let follower_id = follower.status().id;
    let written = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (good, overtaken) = std::thread::scope(|scope| {
        let writes = scope.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let put = kv_put(&format!("k{i:05}"), &format!("{i:0>200}"));
                match write_within(leader, put, Duration::from_secs(10)) {
                    Some(ClientResult::Ok(_)) => {
                        i += 1;
                        written.store(i, Ordering::Relaxed);
                    }
                    other => panic!("write {i}: {other:?}"),
                }
            }
        });
        let rt = client_runtime();
        let (mut good, mut overtaken) = (0, 0);
        // Six rounds, and more (up to 30) until the follower has installed
        // a snapshot: a heal right after a snapshot is taken may still
        // find the follower's next entries in the leader's log (its
        // publication and compaction come a little later), and on a busy
        // machine every round's heal may (a CI run saw 0 installs in 6).
        for round in 0.. {
            if round >= 6 && follower.metrics().snapshots_installed.get() > 0 {
                break;
            }
            assert!(
                round < 30,
                "the follower installed no snapshot in 30 rounds"
            );
            // Cut the follower off for 150 ms and, in the first round
            // (while the state is small and snapshots frequent), until the
            // leader has taken a snapshot, whose publication compacts the
            // log past the follower's.
            three.net.isolate(follower_id);
            let taken = leader.metrics().snapshots_taken.get();
            let cut = std::time::Instant::now();
            while cut.elapsed() < Duration::from_millis(150)
                || (round == 0 && leader.metrics().snapshots_taken.get() == taken)
            {
                assert!(
                    cut.elapsed() < Duration::from_secs(30),
                    "the leader took no snapshot in 30 s ({} writes)",
                    written.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            three.net.heal();
            for _ in 0..3 {
                match rt.block_on(follower.backup()) {
                    Ok(b) => {
                        check_backup_is_a_prefix(&b, round);
                        let dir = b.path.parent().expect("its directory").to_path_buf();
                        drop(b);
                        assert!(!dir.exists(), "backup directory left behind");
                        good += 1;
                    }
                    Err(e) => {
                        assert!(e.contains("overtook"), "{e}");
                        overtaken += 1;
                    }
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        writes.join().expect("writer");
        (good, overtaken)
    });
    let installed = follower.metrics().snapshots_installed.get();
    println!(
        "{good} backups, {overtaken} overtaken, {installed} installs, {} writes",
        written.load(Ordering::Relaxed)
    );
    assert!(good >= 12, "{good} backups written, {overtaken} overtaken");
    assert!(installed > 0, "the follower never installed a snapshot");
    stop_all(three.nodes);
}

/// `b` decodes, restores into a KV service, and holds the sequential
/// writes `k00000`, `k00001`, ... up to some point and none after it.
fn check_backup_is_a_prefix(b: &keel_node::Backup, round: usize) {
    let bytes = Bytes::from(std::fs::read(&b.path).expect("read backup"));
    let got = keel_log::meta::unwrap_backup(&b.path, &bytes).expect("a backup decodes");
    assert_eq!(got.snapshot.meta, b.meta);
    let mut host = ServiceHost::new(KvService::default(), u64::MAX);
    host.restore(&got.snapshot).expect("a backup restores");
    let get = |i: u64| {
        let q = Query::Get {
            key: Bytes::from(format!("k{i:05}")),
        };
        match Response::decode(&host.query(&q.encode())) {
            Ok(Response::Get { kv, .. }) => kv.is_some(),
            other => panic!("get: {other:?}"),
        }
    };
    let count = match Response::decode(&host.query(&Query::Status.encode())) {
        Ok(Response::Status { keys, .. }) => keys,
        other => panic!("status: {other:?}"),
    };
    for i in (0..count).step_by(97).chain(count.checked_sub(1)) {
        assert!(get(i), "round {round}: k{i} of the first {count} missing");
    }
    assert!(!get(count), "round {round}: a key past the first {count}");
}

/// An error and its sources, as anyhow's `{:#}` (what `keel` prints).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut at = e.source();
    while let Some(s) = at {
        out.push_str(&format!(": {s}"));
        at = s.source();
    }
    out
}

/// One node at a time runs on a data directory (its lock is held until the
/// node has stopped), and only the node and cluster it was created for.
#[test]
fn a_data_directory_serves_one_node_of_one_cluster_at_a_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let start = |cfg: &NodeConfig| {
        start_with(
            cfg.clone(),
            Box::new(KvService::default()),
            Transport::Memory(MemNetwork::new()),
        )
    };
    let cfg = node_config(
        1,
        tmp.path(),
        &[free_addr()],
        1 << 30,
        DurabilityConfig::Sync,
    );
    let first = start(&cfg).expect("start");
    wait_leader(std::slice::from_ref(&first), None);
    assert!(matches!(
        write_within(&first, kv_put("k", "v"), Duration::from_secs(10)),
        Some(ClientResult::Ok(_))
    ));

    // A second node on the same directory (on addresses of its own).
    let mut second = cfg.clone();
    second.client_addr = free_addr();
    let err = start(&second).err().expect("a second node started");
    let msg = chain(&err);
    assert!(
        matches!(
            err,
            NodeError::Storage(keel_log::LogError::Locked { holder: Some(p), .. })
                if p == std::process::id()
        ),
        "{msg}"
    );
    assert!(msg.contains(&cfg.data_dir.display().to_string()), "{msg}");

    first.shutdown();
    first.wait().expect("clean stop");
    // Stopped: the directory is free again (the handle still exists).
    let again = start(&second).expect("restart");
    again.shutdown();
    again.wait().expect("clean stop");
    drop((first, again));

    // Another node's id, or another cluster's: refused, naming both.
    for (node_id, cluster_id, wants) in [
        (5, 7, "node 5 of cluster 0x7"),
        (1, 99, "node 1 of cluster 0x63"),
    ] {
        let mut wrong = second.clone();
        wrong.id = node_id;
        wrong.cluster_id = cluster_id;
        let err = start(&wrong).err().expect("started as another node");
        let msg = chain(&err);
        assert!(
            matches!(
                err,
                NodeError::Storage(keel_log::LogError::WrongIdentity { .. })
            ),
            "{msg}"
        );
        assert!(
            msg.contains("holds the data of node 1 of cluster 0x7"),
            "{msg}"
        );
        assert!(msg.contains(wants), "{msg}");
    }
    // Its data is intact for the node it belongs to.
    let back = start(&second).expect("restart");
    wait_leader(std::slice::from_ref(&back), None);
    assert_eq!(
        kv_get_within(&back, "k", Duration::from_secs(10)),
        Some(Bytes::from("v"))
    );
    stop_all(vec![back]);
}

/// The errors `keel server` prints name the OS error once (anyhow prints
/// the whole chain).
#[test]
fn start_errors_name_the_os_error_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let cfg = node_config(1, tmp.path(), &[addr], 1 << 30, DurabilityConfig::Sync);
    let err = start_with(
        cfg,
        Box::new(KvService::default()),
        Transport::Memory(MemNetwork::new()),
    )
    .err()
    .expect("listened on a taken address");
    let os = std::io::Error::from(std::io::ErrorKind::AddrInUse);
    let msg = chain(&err);
    assert!(matches!(err, NodeError::Listen { .. }), "{msg}");
    assert_eq!(msg.matches("(os error ").count(), 1, "{msg}");
    assert_eq!(err.to_string(), msg, "{os}");

    // A storage error (the data directory is a file).
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let mut cfg = node_config(
        1,
        tmp.path(),
        &[free_addr()],
        1 << 30,
        DurabilityConfig::Sync,
    );
    cfg.data_dir = file.join("data");
    let err = start_with(
        cfg,
        Box::new(KvService::default()),
        Transport::Memory(MemNetwork::new()),
    )
    .err()
    .expect("started on a file");
    let msg = chain(&err);
    assert_eq!(msg.matches("(os error ").count(), 1, "{msg}");

    // A configuration file that cannot be read.
    let err = NodeConfig::load(&tmp.path().join("missing.toml")).expect_err("loaded");
    let msg = chain(&err);
    assert_eq!(msg.matches("(os error ").count(), 1, "{msg}");
    assert!(msg.contains("missing.toml"), "{msg}");
}

/// A restore from a file that is not a backup says so, without the advice
/// for a damaged data directory, and writes nothing.
#[test]
fn a_restore_from_junk_says_the_backup_is_bad() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cfg = node_config(
        1,
        tmp.path(),
        &[free_addr()],
        1 << 30,
        DurabilityConfig::Sync,
    );
    let junk = tmp.path().join("junk.keel");
    std::fs::write(&junk, b"not a backup\n").expect("write");
    let err = keel_node::restore_backup(&cfg, Box::new(KvService::default()), &junk, false)
        .expect_err("restored junk");
    let msg = chain(&err);
    assert!(msg.contains("not a Keel backup"), "{msg}");
    assert!(msg.contains(&junk.display().to_string()), "{msg}");
    assert!(!msg.contains("Refusing to start"), "{msg}");
    assert!(!msg.contains("move its data directory aside"), "{msg}");
    assert!(!cfg.data_dir.exists(), "a refused restore wrote files");
}
