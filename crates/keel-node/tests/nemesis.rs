//! A randomized fault-injection ("nemesis") test of the real node runtime,
//! checked for linearizability.
//!
//! `keel-sim` tests the pure consensus core; this tests what the runtime
//! (`crates/keel-node/src/runtime.rs`) promises its clients around it:
//! forwarding a follower's writes, holding writes during leadership
//! transfers, answering a deposed leader's writes, "outcome unknown"
//! answers (`settle_unplaced`, `expire_awaiting`), linearizable reads asked
//! again of a new leader, requests parked while no leader is known.
//!
//! Several nodes (`keel_node` runtimes with the KV service) run in this
//! process over the in-memory transport. Client tasks call them through
//! their `NodeHandle`s, each request to a random node: puts, linearizable
//! gets and compare-and-swaps of unique values on a few keys. Half the
//! clients write without a session (the etcd API's path); the others write
//! in a client session each, sending a write again with the same sequence
//! number to random nodes until one answers `Ok` (the native client's
//! retries: the session must apply it once). A nemesis thread meanwhile isolates nodes (often
//! the leader), cuts links one way, makes links lose messages or hold them
//! (in order) up to 80 ms, transfers leadership (sometimes
//! isolating the target right after), and restarts nodes (graceful stop,
//! then a start on the same data directory). At the end every link is
//! healed and each node must serve a write and linearizable reads again
//! (liveness); then the whole history, the final reads included, must be
//! linearizable (`keel_sim::linearizability`).
//!
//! How answers go into the history (the contract under test):
//! - a write or CAS answered `Ok` took effect (`PutOk`, `Cas(succeeded)`);
//! - `NotLeader` or `Busy`: the runtime promises it was not applied and
//!   never will be, so it is left out of the history (if that promise
//!   breaks, some read sees its unique value and the check fails);
//! - `Error` (`OUTCOME_UNKNOWN`, or a node stopping under it) or no answer
//!   within `CALL_TIMEOUT`: outcome unknown (it may take effect at any time
//!   after its call);
//! - a read answered `Ok` is a `Get` of the value seen; any other read is
//!   left out;
//! - a session write is one operation from its first attempt to its `Ok`,
//!   or of unknown outcome if its client gave up (`SESSION_ATTEMPTS`).
//!
//! Runs are not deterministic (threads, real time): the seed only fixes the
//! random choices (cluster settings, the clients' requests, the nemesis's
//! actions). `KEEL_NEMESIS_SEED` sets it (printed at the start), and
//! `KEEL_NEMESIS_SECS` the seconds of load per test, and
//! `KEEL_NEMESIS_PACE_MS` (`LO-HI`, default `200-700`) the range of the
//! nemesis's random pause between two actions. To soak:
//!
//! ```sh
//! for i in $(seq 50); do
//!   KEEL_NEMESIS_SECS=30 cargo test --release -p keel-node --test nemesis -- --nocapture \
//!     > /tmp/nemesis_$i.log 2>&1 || { echo "failed: /tmp/nemesis_$i.log"; break; }
//! done
//! ```

use keel_core::rng::Rng;
use keel_kv::{Command, Compare, KvService, Query, Response};
use keel_net::codec::{ClientOp, ClientResult, OUTCOME_UNKNOWN, TRANSFER_TIMED_OUT};
use keel_net::mem::MemNetwork;
use keel_node::config::{DurabilityConfig, ServiceThreadConfig};
use keel_node::runtime::{start_with, Transport};
use keel_node::{NodeConfig, NodeError, NodeHandle};
use keel_sim::history::{
    check_records, count, elapsed_ns, error_kind, gather, key_bytes, liveness, operation,
    parse_value, print_run, random_input, range_from_env, seed_from_env, u64_from_env, value_bytes,
    Counts, LastSeen, Record,
};
use keel_sim::linearizability::{KvInput, KvOutput};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How long a client waits for an answer before taking the outcome as
/// unknown (above the nodes' `write_timeout_ms`, so most unknown outcomes
/// are the runtime's own answers).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const WRITE_TIMEOUT_MS: u64 = 2_000;
/// After the final heal, how long the cluster has to serve a write and a
/// linearizable read of every key on every node.
const LIVENESS: Duration = Duration::from_secs(10);
/// A run that serves fewer acknowledged writes or successful reads than
/// this fails: it tested nothing.
const MIN_SERVED: u64 = 100;

/// The tests share the machine's cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn nemesis_three_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    run(Params {
        name: "three nodes",
        nodes: 3,
        keys: 4,
        clients: 7,
        secs: secs(12),
        seed_offset: 0,
    });
}

#[test]
fn nemesis_five_nodes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    run(Params {
        name: "five nodes",
        nodes: 5,
        keys: 5,
        clients: 8,
        secs: secs(10),
        seed_offset: 5,
    });
}

fn secs(default: u64) -> u64 {
    u64_from_env("KEEL_NEMESIS_SECS", default)
}

/// The nemesis's pause between actions: `KEEL_NEMESIS_PACE_MS` (`LO-HI`
/// ms), 200-700 ms by default.
fn pace() -> (u64, u64) {
    range_from_env("KEEL_NEMESIS_PACE_MS", (200, 700))
}

fn seed() -> u64 {
    seed_from_env("KEEL_NEMESIS_SEED")
}

struct Params {
    name: &'static str,
    nodes: u64,
    keys: u64,
    clients: u64,
    secs: u64,
    /// Added to the seed (`KEEL_NEMESIS_SEED`), so the tests of one run
    /// differ.
    seed_offset: u64,
}

/// The cluster settings a seed picks.
#[derive(Debug)]
struct Setup {
    durability: DurabilityConfig,
    service_thread: ServiceThreadConfig,
    lease_reads: bool,
    snapshot_every_bytes: u64,
    preferred_leaders: Vec<u64>,
}

impl Setup {
    fn pick(rng: &mut Rng, nodes: u64) -> Setup {
        Setup {
            durability: if rng.chance(0.5) {
                DurabilityConfig::Sync
            } else {
                DurabilityConfig::Replicated
            },
            service_thread: if rng.chance(0.75) {
                ServiceThreadConfig::Dedicated
            } else {
                ServiceThreadConfig::Shared
            },
            lease_reads: rng.chance(0.3),
            snapshot_every_bytes: [16 << 10, 256 << 10, 1 << 30][rng.below(3) as usize],
            preferred_leaders: if rng.chance(0.25) {
                vec![1 + rng.below(nodes)]
            } else {
                Vec::new()
            },
        }
    }
}

/// Node `id` of `nodes` on the in-memory network: the defaults but for
/// what is set here (20 ms heartbeats, 200-400 ms election timeouts, one
/// network thread) and what the seed picked (`setup`).
fn node_config(id: u64, nodes: u64, dir: &std::path::Path, setup: &Setup) -> NodeConfig {
    // Any free client port: a restarted node binds a new one (clients here
    // call the handles, and the address only goes into redirects).
    let mut text = format!(
        "id = {id}\ncluster_id = 7\ndata_dir = \"d\"\npeer_addr = \"memory:0\"\n\
         client_addr = \"127.0.0.1:0\"\nservice = \"kv\"\nnet_threads = 1\n\
         heartbeat_ms = 20\nelection_timeout_min_ms = 200\nelection_timeout_max_ms = 400\n\
         preferred_leader_hold_ms = 1000\nwrite_timeout_ms = {WRITE_TIMEOUT_MS}\n\
         # Followers that fall behind are sent entries read back from the log files.\n\
         log_cache_bytes = 0\n"
    );
    for p in (1..=nodes).filter(|&p| p != id) {
        text.push_str(&format!(
            "[[peers]]\nid = {p}\npeer_addr = \"memory:0\"\nclient_addr = \"127.0.0.1:{}\"\n",
            1000 + p
        ));
    }
    let mut cfg: NodeConfig = toml::from_str(&text).expect("config");
    cfg.data_dir = dir.join(format!("n{id}"));
    cfg.durability = setup.durability;
    cfg.service_thread = setup.service_thread;
    cfg.lease_reads = setup.lease_reads;
    cfg.preferred_leaders = setup.preferred_leaders.clone();
    cfg.snapshot_every_bytes = setup.snapshot_every_bytes;
    cfg
}

/// The nodes, their network, and the handles of nodes restarted since
/// (kept until the end: a handle owns a tokio runtime, which must not be
/// dropped by a client task that happened to hold the last reference).
struct Cluster {
    _tmp: tempfile::TempDir,
    net: MemNetwork,
    cfgs: Vec<NodeConfig>,
    nodes: RwLock<Vec<Arc<NodeHandle>>>,
    stopped: Mutex<Vec<Arc<NodeHandle>>>,
    /// How each stopped node's `wait` ended, by id.
    stops: Mutex<Vec<(u64, Result<(), String>)>>,
}

impl Cluster {
    fn start(n: u64, setup: &Setup) -> Cluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let net = MemNetwork::new();
        let cfgs: Vec<NodeConfig> = (1..=n)
            .map(|id| node_config(id, n, tmp.path(), setup))
            .collect();
        let nodes = cfgs
            .iter()
            .map(|cfg| Arc::new(start_node(cfg, &net).expect("start")))
            .collect();
        Cluster {
            _tmp: tmp,
            net,
            cfgs,
            nodes: RwLock::new(nodes),
            stopped: Mutex::new(Vec::new()),
            stops: Mutex::new(Vec::new()),
        }
    }

    fn ids(&self) -> Vec<u64> {
        self.cfgs.iter().map(|c| c.id).collect()
    }

    fn node(&self, id: u64) -> Arc<NodeHandle> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner())[(id - 1) as usize].clone()
    }

    fn all(&self) -> Vec<Arc<NodeHandle>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The leader of the highest term any node reports.
    fn leader(&self) -> Option<u64> {
        self.all()
            .iter()
            .map(|n| n.status())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// Stops node `id` gracefully, leaves it down for `down`, and starts
    /// it again on the same data directory and network.
    fn restart(&self, id: u64, down: Duration) -> Result<(), String> {
        let old = self.node(id);
        old.shutdown();
        let stop = old.wait().map_err(|e| e.to_string());
        lock(&self.stops).push((id, stop));
        lock(&self.stopped).push(old);
        std::thread::sleep(down);
        let cfg = &self.cfgs[(id - 1) as usize];
        // The data directory's lock is released once `wait` returns; the
        // start is retried a little in case of a transient failure.
        let mut last = String::new();
        for _ in 0..20 {
            match start_node(cfg, &self.net) {
                Ok(n) => {
                    self.nodes.write().unwrap_or_else(|e| e.into_inner())[(id - 1) as usize] =
                        Arc::new(n);
                    return Ok(());
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("node {id} did not start again: {last}"))
    }

    /// Stops every node; how each stop ended (those of earlier restarts
    /// too).
    fn stop_all(&self) -> Vec<(u64, Result<(), String>)> {
        let nodes = self.all();
        for n in &nodes {
            n.shutdown();
        }
        for n in &nodes {
            let r = n.wait().map_err(|e| e.to_string());
            lock(&self.stops).push((n.id(), r));
        }
        std::mem::take(&mut *lock(&self.stops))
    }
}

fn start_node(cfg: &NodeConfig, net: &MemNetwork) -> Result<NodeHandle, NodeError> {
    start_with(
        cfg.clone(),
        Box::new(KvService::default()),
        Transport::Memory(net.clone()),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a write's error is one this test knows (an unknown outcome:
/// `OUTCOME_UNKNOWN`, or the node stopping with the write taken).
fn known_write_error(msg: &str) -> bool {
    msg.starts_with(OUTCOME_UNKNOWN) || msg == "the node stopped"
}

fn short(r: &ClientResult) -> String {
    match r {
        ClientResult::Ok(data) => match Response::decode(data) {
            Ok(Response::Put { .. }) => "Ok(put)".into(),
            Ok(Response::Cas {
                succeeded, current, ..
            }) => format!(
                "Ok(cas {succeeded}, now {:?})",
                current.as_ref().map(|kv| parse_value(&kv.value))
            ),
            Ok(Response::Get { kv, .. }) => {
                format!("Ok(get {:?})", kv.as_ref().map(|kv| parse_value(&kv.value)))
            }
            other => format!("Ok({other:?})"),
        },
        ClientResult::NotLeader { leader, .. } => format!("NotLeader(leader {leader:?})"),
        ClientResult::Busy => "Busy".into(),
        ClientResult::Error(m) => format!("Error({m})"),
        other => format!("{other:?}"),
    }
}

/// Makes one request through `node` and records it. `last_seen` is what
/// this client last saw at each key (for its compare-and-swaps).
async fn request(
    node: &NodeHandle,
    input: KvInput,
    client: u64,
    session: Option<(u64, u64)>,
    start: Instant,
    counts: &mut Counts,
    last_seen: &mut BTreeMap<u64, Option<u64>>,
) -> Record {
    let (kind, op) = match &input {
        KvInput::Put { key, value } => (
            "put",
            ClientOp::Write(
                Command::Put {
                    key: key_bytes(*key),
                    value: value_bytes(*value),
                }
                .encode(),
            ),
        ),
        KvInput::Cas { key, expected, new } => (
            "cas",
            ClientOp::Write(
                Command::Cas {
                    key: key_bytes(*key),
                    expected: match expected {
                        Some(v) => Compare::ValueEquals(value_bytes(*v)),
                        None => Compare::VersionEquals(0),
                    },
                    value: value_bytes(*new),
                }
                .encode(),
            ),
        ),
        KvInput::Get { key } => (
            "get",
            ClientOp::Read(
                Query::Get {
                    key: key_bytes(*key),
                }
                .encode(),
            ),
        ),
    };
    let kind = match (session, kind) {
        (Some(_), "put") => "session put",
        (Some(_), "cas") => "session cas",
        (_, kind) => kind,
    };
    let call = elapsed_ns(start);
    let answer = match session {
        Some((id, seq)) if !matches!(op, ClientOp::Read(_)) => {
            tokio::time::timeout(CALL_TIMEOUT, node.call_in_session(id, seq, op)).await
        }
        _ => tokio::time::timeout(CALL_TIMEOUT, node.call(op)).await,
    };
    let ret = elapsed_ns(start);
    let is_read = kind == "get";
    let (output, kept, text) = match answer {
        Err(_) => {
            count(counts, format!("{kind} timeout"));
            (None, !is_read, "no answer in time".to_string())
        }
        Ok(r) => {
            let text = short(&r);
            match r {
                ClientResult::Ok(data) => {
                    count(counts, format!("{kind} ok"));
                    let out = match (Response::decode(&data), &input) {
                        (Ok(Response::Put { .. }), KvInput::Put { key, value }) => {
                            last_seen.insert(*key, Some(*value));
                            KvOutput::PutOk
                        }
                        (
                            Ok(Response::Cas {
                                succeeded, current, ..
                            }),
                            KvInput::Cas { key, new, .. },
                        ) => {
                            let now = if succeeded {
                                Some(*new)
                            } else {
                                current.map(|kv| parse_value(&kv.value))
                            };
                            last_seen.insert(*key, now);
                            KvOutput::Cas(succeeded)
                        }
                        (Ok(Response::Get { kv, .. }), KvInput::Get { key }) => {
                            let v = kv.map(|kv| parse_value(&kv.value));
                            last_seen.insert(*key, v);
                            KvOutput::Get(v)
                        }
                        (other, _) => panic!("{input:?} answered {other:?}"),
                    };
                    (Some(out), true, text)
                }
                ClientResult::NotLeader { .. } => {
                    count(counts, format!("{kind} not-leader"));
                    (None, false, text)
                }
                ClientResult::Busy => {
                    count(counts, format!("{kind} busy"));
                    (None, false, text)
                }
                ClientResult::Error(m) => {
                    let known = is_read || known_write_error(&m);
                    let tag = if known { "error" } else { "UNCLASSIFIED error" };
                    count(counts, format!("{kind} {tag}: {}", error_kind(&m)));
                    (None, !is_read, text)
                }
                other => panic!("{input:?} answered {other:?}"),
            }
        }
    };
    Record {
        op: operation(client, input, output, call, ret),
        node: node.id(),
        answer: text,
        kept,
    }
}

/// Session ids start here (clients with odd numbers have one).
const SESSION_BASE: u64 = 100;
/// How often a session write is sent (to random nodes) before its client
/// gives up on it.
const SESSION_ATTEMPTS: u32 = 6;

/// A write in a client session, sent with the same sequence number to
/// random nodes until one answers `Ok` (the session applies it at most
/// once: a retry of an applied write gets its first reply), at most
/// `SESSION_ATTEMPTS` times. One record for all the attempts, from the
/// first call to the last answer: `Ok`, or an unknown outcome (given up;
/// an attempt may have been applied, or may still be).
#[allow(clippy::too_many_arguments)]
async fn session_write(
    cluster: &Cluster,
    rng: &mut Rng,
    input: KvInput,
    client: u64,
    session: (u64, u64),
    start: Instant,
    counts: &mut Counts,
    last_seen: &mut BTreeMap<u64, Option<u64>>,
) -> Record {
    let ids = cluster.ids();
    let call = elapsed_ns(start);
    let mut answers = Vec::new();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let node = cluster.node(ids[rng.below(ids.len() as u64) as usize]);
        let mut r = request(
            &node,
            input.clone(),
            client,
            Some(session),
            start,
            counts,
            last_seen,
        )
        .await;
        answers.push(format!("node {}: {}", r.node, r.answer));
        if r.op.output.is_some() || attempt == SESSION_ATTEMPTS {
            r.op.call = call;
            r.kept = true;
            r.answer = format!("session {:?}: {}", session, answers.join("; "));
            if r.op.output.is_none() {
                count(counts, "session write given up".to_string());
            }
            return r;
        }
        drop(node);
        tokio::time::sleep(Duration::from_millis(rng.range(10, 100))).await;
    }
}

/// A client: random requests to random nodes until `stop`.
async fn client_loop(
    client: u64,
    seed: u64,
    keys: u64,
    cluster: Arc<Cluster>,
    values: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> (Vec<Record>, Counts) {
    let mut rng = Rng::new(seed ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let ids = cluster.ids();
    let mut records = Vec::new();
    let mut counts = Counts::new();
    let mut last_seen = LastSeen::new();
    // Every other client writes in a session of its own, as the native
    // client does: (session id, last sequence number used).
    let mut session = (client % 2 == 1).then_some((SESSION_BASE + client, 0u64));
    while !stop.load(Ordering::Relaxed) {
        let input = random_input(
            &mut rng,
            keys,
            (45, 35),
            || values.fetch_add(1, Ordering::Relaxed),
            &last_seen,
        );
        let node = cluster.node(ids[rng.below(ids.len() as u64) as usize]);
        let record = match session.as_mut() {
            Some((id, seq)) if !matches!(input, KvInput::Get { .. }) => {
                *seq += 1;
                let (id, seq) = (*id, *seq);
                drop(node);
                session_write(
                    &cluster,
                    &mut rng,
                    input,
                    client,
                    (id, seq),
                    start,
                    &mut counts,
                    &mut last_seen,
                )
                .await
            }
            _ => {
                request(
                    &node,
                    input,
                    client,
                    None,
                    start,
                    &mut counts,
                    &mut last_seen,
                )
                .await
            }
        };
        records.push(record);
        tokio::time::sleep(Duration::from_micros(rng.below(5_000))).await;
    }
    (records, counts)
}

/// The nemesis: a random fault every 200-700 ms (`pace`) until `stop`, then every
/// link healed. Returns what it did, with times (ms since the start).
fn nemesis(
    seed: u64,
    cluster: Arc<Cluster>,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> (Vec<String>, Counts) {
    let mut rng = Rng::new(seed ^ 0x6e65_6d65_7369_7321);
    let pace = pace();
    let ids = cluster.ids();
    let mut log = Vec::new();
    let mut counts = Counts::new();
    let mut transfers: Vec<std::thread::JoinHandle<ClientResult>> = Vec::new();
    // Since when links have been cut (None: all healed).
    let mut faulty: Option<Instant> = None;
    let pick = |rng: &mut Rng, except: &[u64]| -> Option<u64> {
        let c: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|i| !except.contains(i))
            .collect();
        (!c.is_empty()).then(|| c[rng.below(c.len() as u64) as usize])
    };
    'outer: loop {
        let pause = Duration::from_millis(rng.range(pace.0, pace.1));
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = start.elapsed().as_millis();
        let leader = cluster.leader();
        // The leader, or (half the time, or with none known) any node.
        let victim = |rng: &mut Rng| match leader {
            Some(l) if rng.chance(0.5) => l,
            _ => pick(rng, &[]).expect("a node"),
        };
        let roll = rng.below(100);
        let long_faulty = faulty.is_some_and(|f| f.elapsed() > Duration::from_secs(2));
        let (what, action) = if faulty.is_some() && (long_faulty || roll < 35) {
            cluster.net.heal();
            faulty = None;
            ("heal", String::new())
        } else if roll < 52 {
            let v = victim(&mut rng);
            cluster.net.isolate(v);
            faulty.get_or_insert_with(Instant::now);
            ("isolate", format!("{v} (leader {leader:?})"))
        } else if roll < 62 {
            // One way: the leader hears nothing from a follower, or its
            // messages to it are lost; else between two random nodes.
            let (from, to) = link(&mut rng, leader, &pick);
            cluster.net.cut(from, to);
            faulty.get_or_insert_with(Instant::now);
            ("cut", format!("{from} -> {to} (leader {leader:?})"))
        } else if roll < 66 {
            // Links that lose a share of their messages.
            let mut links = Vec::new();
            for _ in 0..rng.range(1, 4) {
                let (from, to) = link(&mut rng, leader, &pick);
                let chance = rng.range(5, 40) as f64 / 100.0;
                cluster.net.lossy(from, to, chance, seed);
                links.push(format!("{from} -> {to} {:.0}%", chance * 100.0));
            }
            faulty.get_or_insert_with(Instant::now);
            ("lossy", format!("{} (leader {leader:?})", links.join(", ")))
        } else if roll < 73 {
            // Slow links: each message held 1-80 ms (in order), past
            // heartbeats, lease margins and the runtime's waits.
            let mut links = Vec::new();
            for _ in 0..rng.range(1, 4) {
                let (from, to) = link(&mut rng, leader, &pick);
                let by = Duration::from_millis(rng.range(1, 81));
                cluster.net.delay(from, to, by);
                links.push(format!("{from} -> {to} {by:?}"));
            }
            faulty.get_or_insert_with(Instant::now);
            ("slow", format!("{} (leader {leader:?})", links.join(", ")))
        } else if roll < 89 {
            match leader {
                Some(l) => {
                    let target = pick(&mut rng, &[l]).expect("a target");
                    let node = cluster.node(l);
                    let call = std::thread::spawn(move || {
                        let rt = current_thread_runtime();
                        rt.block_on(async {
                            tokio::time::timeout(
                                Duration::from_secs(5),
                                node.call(ClientOp::TransferLeader(target)),
                            )
                            .await
                            .unwrap_or_else(|_| ClientResult::Error("no answer in 5 s".into()))
                        })
                    });
                    transfers.push(call);
                    if rng.chance(0.4) {
                        // The target cut off while the transfer is on: the
                        // leader holds its writes until the transfer runs
                        // out or the target wins anyway.
                        std::thread::sleep(Duration::from_millis(rng.below(15)));
                        cluster.net.isolate(target);
                        faulty.get_or_insert_with(Instant::now);
                        (
                            "transfer+isolate",
                            format!("{l} -> {target}, then isolate {target}"),
                        )
                    } else {
                        ("transfer", format!("{l} -> {target}"))
                    }
                }
                None => ("transfer-skipped", "(no leader)".to_string()),
            }
        } else {
            let v = victim(&mut rng);
            let down = Duration::from_millis(rng.below(400));
            match cluster.restart(v, down) {
                Ok(()) => (
                    "restart",
                    format!(
                        "{v} (leader {leader:?}), down {down:?}, took {} ms",
                        start.elapsed().as_millis() - t
                    ),
                ),
                Err(e) => panic!("{e}"),
            }
        };
        count(&mut counts, format!("action {what}"));
        log.push(format!("{t:>6} ms  {what} {action}"));
    }
    cluster.net.heal();
    log.push(format!("{:>6} ms  heal (end)", start.elapsed().as_millis()));
    for call in transfers {
        let r = call.join().expect("the transfer's thread");
        let kind = match &r {
            ClientResult::Ok(_) => "transfer ok".to_string(),
            ClientResult::Error(m) if m.starts_with(TRANSFER_TIMED_OUT) => {
                "transfer timed out".to_string()
            }
            other => format!("transfer answered {}", error_kind(&short(other))),
        };
        count(&mut counts, kind);
    }
    (log, counts)
}

/// A directed link for a one-way fault: most often between the leader
/// and a follower (either way), else between two random nodes.
fn link(
    rng: &mut Rng,
    leader: Option<u64>,
    pick: &dyn Fn(&mut Rng, &[u64]) -> Option<u64>,
) -> (u64, u64) {
    match leader {
        Some(l) if rng.chance(0.7) => {
            let f = pick(rng, &[l]).expect("a follower");
            if rng.chance(0.5) {
                (f, l)
            } else {
                (l, f)
            }
        }
        _ => {
            let a = pick(rng, &[]).expect("a node");
            (a, pick(rng, &[a]).expect("another node"))
        }
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn run(p: Params) {
    let base = seed();
    let seed = base.wrapping_add(p.seed_offset);
    // (Every failure message names it.)
    let rerun = format!("rerun with KEEL_NEMESIS_SEED={base}");
    let mut rng = Rng::new(seed);
    let setup = Setup::pick(&mut rng, p.nodes);
    println!(
        "nemesis, {}: seed {seed} ({rerun}), {} s of load, {} clients, {} keys",
        p.name, p.secs, p.clients, p.keys
    );
    println!("settings: {setup:?}, nemesis pause {:?} ms", pace());
    let cluster = Arc::new(Cluster::start(p.nodes, &setup));
    let start = Instant::now();
    let values = Arc::new(AtomicU64::new(1));
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_nemesis = Arc::new(AtomicBool::new(false));

    // Load and faults.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let clients: Vec<_> = (0..p.clients)
        .map(|c| {
            rt.spawn(client_loop(
                c,
                seed,
                p.keys,
                cluster.clone(),
                values.clone(),
                stop_clients.clone(),
                start,
            ))
        })
        .collect();
    let nemesis_thread = {
        let (cluster, stop) = (cluster.clone(), stop_nemesis.clone());
        std::thread::spawn(move || nemesis(seed, cluster, stop, start))
    };
    std::thread::sleep(Duration::from_secs(p.secs));
    stop_nemesis.store(true, Ordering::Relaxed);
    let (nemesis_log, nemesis_counts) = nemesis_thread.join().expect("the nemesis panicked");
    stop_clients.store(true, Ordering::Relaxed);
    let (mut records, counts) = gather(
        clients
            .into_iter()
            .map(|c| rt.block_on(c).expect("a client task panicked")),
    );
    let load_ms = start.elapsed().as_millis();

    // Liveness: every link healed, a write through some node and a
    // linearizable read of every key on every node, within `LIVENESS`.
    let mut final_counts = Counts::new();
    let mut seen = BTreeMap::new();
    let mut live = liveness(
        &cluster.ids(),
        p.keys,
        Instant::now() + LIVENESS,
        Duration::from_millis(20),
        || values.fetch_add(1, Ordering::Relaxed),
        |id, input| {
            let node = cluster.node(id);
            rt.block_on(request(
                &node,
                input,
                p.clients,
                None,
                start,
                &mut final_counts,
                &mut seen,
            ))
        },
    );
    records.append(&mut live.records);
    let statuses: Vec<String> = cluster
        .all()
        .iter()
        .map(|n| format!("{:?}", n.status()))
        .collect();
    let metrics = metric_totals(&cluster);
    drop(rt);
    let stops = cluster.stop_all();

    // The report.
    print_run(
        load_ms,
        &counts,
        &live,
        &final_counts,
        &nemesis_counts,
        &nemesis_log,
    );
    println!("node metrics, summed over every node run: {metrics}");
    let unclassified: Vec<(&String, &u64)> = counts
        .iter()
        .chain(&final_counts)
        .filter(|(k, _)| k.contains("UNCLASSIFIED"))
        .collect();
    if !unclassified.is_empty() {
        println!("UNCLASSIFIED write errors (taken as unknown outcomes): {unclassified:?}");
    }
    let served = check_records(&records, &rerun, || {
        format!("statuses after the run: {statuses:#?}")
    });

    let bad_stops: Vec<_> = stops.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        bad_stops.is_empty(),
        "nodes stopped with errors: {bad_stops:?} ({rerun})"
    );
    assert!(
        live.final_write.is_some(),
        "LIVENESS: no write was acknowledged within {LIVENESS:?} of the final heal; statuses: \
         {statuses:#?} ({rerun})"
    );
    assert!(
        live.unserved.is_empty(),
        "LIVENESS: no linearizable read served within {LIVENESS:?} of the final heal for \
         (node, key) {:?}; statuses: {statuses:#?} ({rerun})",
        live.unserved,
    );
    assert!(
        served.acked_writes >= MIN_SERVED && served.reads >= MIN_SERVED,
        "only {} acknowledged writes and {} served reads: the run tested too little ({rerun})",
        served.acked_writes,
        served.reads,
    );
}

/// The runtime counters this test means to exercise, summed over every
/// node that ran (restarted ones included).
fn metric_totals(cluster: &Cluster) -> String {
    let mut nodes = cluster.all();
    nodes.extend(lock(&cluster.stopped).iter().cloned());
    let sum = |f: &dyn Fn(&keel_node::metrics::Metrics) -> u64| -> u64 {
        nodes.iter().map(|n| f(n.metrics())).sum()
    };
    format!(
        "elections won {}, writes held {}, forwards dropped {}, requests waited for a leader {}, \
         reads retried {}, busy {}, snapshots taken {}, installed {}, lease reads {}, \
         preference transfers {}",
        sum(&|m| m.elections_won.get()),
        sum(&|m| m.writes_held.get()),
        sum(&|m| m.forwards_dropped.get()),
        sum(&|m| m.leaderless_requests.get()),
        sum(&|m| m.reads_retried.get()),
        sum(&|m| m.busy.get()),
        sum(&|m| m.snapshots_taken.get()),
        sum(&|m| m.snapshots_installed.get()),
        sum(&|m| m.lease_reads.get()),
        sum(&|m| m.preference_transfers.get()),
    )
}
