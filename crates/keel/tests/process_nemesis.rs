//! A randomized fault-injection ("nemesis") test of real `keel server`
//! processes, checked for linearizability: what `keel-node`'s in-process
//! nemesis cannot do. Nodes are killed with SIGKILL mid-write (no graceful
//! stop: the log, snapshot and session files are recovered from whatever
//! the process left) and restarted; stopped with SIGSTOP and resumed, as a
//! long garbage-collection pause or a frozen virtual machine would (a
//! leader that wakes still believing it leads; with lease reads on, its
//! lease must have run out by the clock that kept going); their peer links,
//! real TCP through `common::proxy`, are cut, stalled one way, or slowed.
//! A second run does the same to five members, up to two of them killed
//! or paused at a time. A third (links direct) changes the membership
//! meanwhile: two spares join in turn as learners and are promoted, and
//! after each a voter, often the leader or one that is down, is removed
//! (`Membership`). In most runs one or two members' clocks run up to 18%
//! fast or slow all through (libfaketime), within the 20% clock-rate error
//! their lease reads are configured to allow (`Setup::clock_rates`); in
//! some, leadership keeps going back to a preferred member, the one with
//! the slowest clock if one runs slow (`Setup::preferred_leader`). In
//! runs with `replicated` durability some kills are power losses
//! (`lose_power`): the node's log loses its last frames, sometimes torn
//! mid-frame, and its machine seems to have rebooted, so it comes back
//! amnesic; in five-member runs the leader is often killed with it.
//!
//! The clients are the ones users run: half of them speak the etcd v3 API
//! (gRPC, sessionless writes: etcd's error contract), each request to a
//! random member; the other half use `keel_client::Client` over the native
//! protocol (a client session each, with the library's own retries and
//! redirects: a write is applied once however often it is sent). Both put,
//! read linearizably, and compare-and-swap unique values on the same few
//! keys, so one history holds them all; and a reader on each member's etcd
//! API reads those keys linearizably from that member alone (`Api::Reader`:
//! an old leader that answers from an expired lease gets caught). At the
//! end every link is healed,
//! every node resumed or started again, and each must serve a write and
//! linearizable reads of every key (liveness); then the whole history must
//! be linearizable (`keel_sim::linearizability`) and no node's log may show
//! a panic.
//!
//! How answers go into the history (the contract under test):
//! - etcd API: a put or txn answered is what it says; "etcdserver: no
//!   leader" and "etcdserver: too many requests" promise the write was not
//!   applied (left out: if it was, a read sees its unique value and the
//!   check fails), and so does a connection that could not be made (the
//!   node down); any other error, a broken connection or no answer in time
//!   is an unknown outcome;
//! - native client: `Ok` is what it says; `NoLeader` and `Refused` promise
//!   the write was not applied; `Uncertain`, other errors and no answer in
//!   time are unknown outcomes;
//! - a read answered is a read of what it returned; other reads are left
//!   out.
//!
//! `KEEL_NEMESIS_SEED` sets the seed (printed at the start),
//! `KEEL_NEMESIS_SECS` the seconds of load (15 by default),
//! `KEEL_NEMESIS_PACE_MS` (`LO-HI`, default `400-1200`) the range of the
//! nemesis's random pause between two actions, and `KEEL_NEMESIS_PEER_TLS=1`
//! runs every cluster's peer links over mutual TLS (certificates made by
//! rcgen; the proxies pass TLS's bytes as any others), and among the faults
//! renews the members' certificate on disk (another from the same CA),
//! which running nodes load again (links opened after use it). To soak:
//!
//! ```sh
//! for i in $(seq 20); do
//!   KEEL_NEMESIS_SECS=30 cargo test --release -p keel --test process_nemesis -- --nocapture \
//!     > /tmp/process_nemesis_$i.log 2>&1 || { echo "failed: /tmp/process_nemesis_$i.log"; break; }
//! done
//! ```

mod common;

use common::proxy::Way;
use common::TestCluster;
use keel_client::{Client, ClientError, ClientOptions};
use keel_core::rng::Rng;
use keel_etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::request_op::Request as Req;
use keel_etcd_proto::etcdserverpb::response_op::Response as Resp;
use keel_etcd_proto::etcdserverpb::{Compare, PutRequest, RangeRequest, RequestOp, TxnRequest};
use keel_kv::{Command, Compare as KvCompare, Query, Response};
use keel_sim::history::{
    check_records, count, elapsed_ns, error_kind, gather, key_bytes, liveness, operation,
    parse_value, print_run, random_input, range_from_env, seed_from_env, u64_from_env, value_bytes,
    Counts, LastSeen, Record,
};
use keel_sim::linearizability::{KvInput, KvOutput};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

const KEYS: u64 = 4;
const CLIENTS: u64 = 6;
/// How long a client waits for an answer before taking the outcome as
/// unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// After the final heal, how long the cluster has to serve a write and a
/// linearizable read of every key on every node (a restarted node may
/// need an election and a catch-up first).
const LIVENESS: Duration = Duration::from_secs(20);
/// A run that serves fewer acknowledged writes or reads than this fails:
/// it tested nothing.
const MIN_SERVED: u64 = 50;
/// The clock-rate error the nodes' lease reads are configured to allow
/// (`clock_drift_ppm`: 20%, far above the default 1%, so that clocks
/// skewed within it make a real difference to elections and leases), and
/// within which a run's skewed clocks run (`Setup::clock_rates`).
const CLOCK_DRIFT_PPM: u64 = 200_000;

/// The tests start clusters of processes: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Kills, pauses and link faults.
#[test]
fn process_nemesis() {
    let _one = lock(&ONE_AT_A_TIME);
    run(Params {
        name: "kills, pauses and link faults",
        members: 3,
        spares: 0,
        seed_offset: 0,
    });
}

/// Five members, up to two of them killed or paused at once, and link
/// faults.
#[test]
fn process_nemesis_five() {
    let _one = lock(&ONE_AT_A_TIME);
    run(Params {
        name: "five members, two out at a time, link faults",
        members: 5,
        spares: 0,
        seed_offset: 2,
    });
}

/// Kills and pauses while two spares join in turn and two voters (often
/// the leader) are removed.
#[test]
fn process_nemesis_membership() {
    let _one = lock(&ONE_AT_A_TIME);
    run(Params {
        name: "kills, pauses and membership changes",
        members: 3,
        spares: 2,
        seed_offset: 1,
    });
}

struct Params {
    name: &'static str,
    /// The initial voters (ids 1 to this). Up to a minority of them are
    /// out (killed or paused) at a time.
    members: u64,
    /// Nodes every member's configuration lists beside the members, for
    /// `Membership` (the links are then direct: no link faults).
    spares: u64,
    /// Added to the seed (`KEEL_NEMESIS_SEED`), so the tests of one run
    /// differ.
    seed_offset: u64,
}

fn run(p: Params) {
    let base = seed_from_env("KEEL_NEMESIS_SEED");
    let seed = base.wrapping_add(p.seed_offset);
    // (Peer TLS adds renewals to the faults, so it is part of a rerun.)
    let tls = if peer_tls_files().is_some() {
        " KEEL_NEMESIS_PEER_TLS=1"
    } else {
        ""
    };
    let rerun = format!("KEEL_NEMESIS_SEED={base}{tls}");
    let secs = u64_from_env("KEEL_NEMESIS_SECS", 15);
    let mut rng = Rng::new(seed);
    let setup = Setup::pick(&mut rng, p.members);
    // Without libfaketime (outside CI) the run goes on with true clocks.
    let faketime = if setup.clock_rates.is_empty() {
        None
    } else {
        common::faketime_or_skip("the clock-rate skew of this run")
    };
    println!(
        "process nemesis, {}: seed {seed} (rerun with {rerun}), {secs} s of load, {CLIENTS} \
         clients and a reader per member, {KEYS} keys",
        p.name
    );
    println!("settings: {setup:?}");
    let toml = setup.toml() + &peer_tls_from_env();
    let mut cluster = if p.spares == 0 {
        TestCluster::start_proxied(p.members, &toml)
    } else {
        TestCluster::start_with_spares(p.members, p.spares, &toml)
    };
    if let Some(lib) = &faketime {
        skew_clocks(&mut cluster, lib, &setup.clock_rates);
    }
    cluster.wait_for_leader(Duration::from_secs(20));
    if faketime.is_some() {
        for &(id, _) in &setup.clock_rates {
            let pid = cluster.node(id).child.as_ref().expect("running").id();
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            assert!(
                maps.contains("libfaketime"),
                "node {id} runs without libfaketime: its clock is not skewed"
            );
        }
    }
    let etcd: Vec<String> = cluster.nodes.iter().map(|n| n.etcd.clone()).collect();
    let native = cluster.endpoints();
    let serving: Serving = Arc::new(Mutex::new((1..=p.members).collect()));

    let start = Instant::now();
    let values = Arc::new(AtomicU64::new(1));
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_nemesis = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    // (A lazy channel needs the runtime it will run on.)
    let in_rt = rt.enter();
    // The clients, then a reader on each member.
    let clients: Vec<_> = (0..CLIENTS + p.members)
        .map(|c| {
            let api = if c >= CLIENTS {
                Api::Reader(
                    lazy_kv_client(&etcd[(c - CLIENTS) as usize]),
                    c - CLIENTS + 1,
                )
            } else if c % 2 == 0 {
                Api::Etcd(
                    etcd.iter().map(|a| lazy_kv_client(a)).collect(),
                    serving.clone(),
                )
            } else {
                Api::Native(Box::new(native_client(&native, c)))
            };
            rt.spawn(client_loop(
                c,
                seed,
                api,
                values.clone(),
                stop_clients.clone(),
                start,
            ))
        })
        .collect();
    let nemesis_thread = {
        let (stop, serving) = (stop_nemesis.clone(), serving.clone());
        let (members, spares) = (p.members, p.spares);
        let replicated = setup.durability == "replicated";
        std::thread::spawn(move || {
            nemesis(
                seed,
                (cluster, members, spares, replicated),
                serving,
                stop,
                start,
            )
        })
    };
    std::thread::sleep(Duration::from_secs(secs));
    stop_nemesis.store(true, Ordering::Relaxed);
    let (cluster, nemesis_log, nemesis_counts) =
        nemesis_thread.join().expect("the nemesis panicked");
    stop_clients.store(true, Ordering::Relaxed);
    let (mut records, counts) = gather(
        clients
            .into_iter()
            .map(|c| rt.block_on(c).expect("a client task panicked")),
    );
    let load_ms = start.elapsed().as_millis();

    // Liveness: a write, and a linearizable read of every key through
    // every node's etcd API, within `LIVENESS` of the final heal.
    let mut final_counts = Counts::new();
    let mut last_seen = LastSeen::new();
    let kv: Vec<KvClient<Channel>> = etcd.iter().map(|a| lazy_kv_client(a)).collect();
    let members = lock(&serving).clone();
    let mut live = liveness(
        &members,
        KEYS,
        Instant::now() + LIVENESS,
        Duration::from_millis(50),
        || values.fetch_add(1, Ordering::Relaxed),
        |id, input| {
            let ctx = Ctx {
                client: CLIENTS + p.members,
                start,
                counts: &mut final_counts,
                last_seen: &mut last_seen,
            };
            rt.block_on(etcd_request(&kv[(id - 1) as usize], id, input, ctx))
        },
    );
    records.append(&mut live.records);
    let statuses: Vec<String> = members
        .iter()
        .map(|&id| format!("{:?}", cluster.status(id)))
        .collect();
    drop(kv);
    drop(in_rt);
    drop(rt);

    // The report.
    print_run(
        load_ms,
        &counts,
        &live,
        &final_counts,
        &nemesis_counts,
        &nemesis_log,
    );
    let served = check_records(&records, &rerun, || {
        format!("statuses after the run: {statuses:#?}{}", cluster.logs())
    });
    let panics: Vec<u64> = (1..=p.members + p.spares)
        .filter(|&id| cluster.log_of(id).contains("panicked"))
        .collect();
    assert!(
        panics.is_empty(),
        "nodes {panics:?} logged a panic:{} ({rerun})",
        cluster.logs()
    );
    assert!(
        live.final_write.is_some() && live.unserved.is_empty(),
        "LIVENESS: within {LIVENESS:?} of the final heal, final write {:?}, reads never served \
         for (node, key) {:?}; statuses: {statuses:#?}{} ({rerun})",
        live.final_write,
        live.unserved,
        cluster.logs()
    );
    assert!(
        served.acked_writes >= MIN_SERVED && served.reads >= MIN_SERVED,
        "only {} acknowledged writes and {} served reads: the run tested too little ({rerun})",
        served.acked_writes,
        served.reads,
    );
}

/// The cluster settings a seed picks.
#[derive(Debug)]
struct Setup {
    durability: &'static str,
    service_thread: &'static str,
    lease_reads: bool,
    snapshot_every_bytes: u64,
    /// Members whose clocks (monotonic and wall) run at these rates of
    /// true time, through libfaketime, all through the run (restarts
    /// too): within `CLOCK_DRIFT_PPM`, so lease reads must stay safe.
    /// Their election timeouts, heartbeats, leases and log time run
    /// faster or slower than their peers' (a real clock's error is far
    /// smaller).
    clock_rates: Vec<(u64, f64)>,
    /// `preferred_leaders`: leadership goes back to this member whenever
    /// it has answered the leader for `ELECTION_MAX_MS` (the shortest
    /// hold allowed).
    preferred_leader: Option<u64>,
}

impl Setup {
    fn pick(rng: &mut Rng, members: u64) -> Setup {
        let durability = if rng.chance(0.5) {
            "sync"
        } else {
            "replicated"
        };
        let service_thread = if rng.chance(0.75) {
            "dedicated"
        } else {
            "shared"
        };
        let lease_reads = rng.chance(0.4);
        // Small ones: snapshots taken, published and installed (and
        // killed in the middle of) all through the run.
        let snapshot_every_bytes = [16 << 10, 256 << 10][rng.below(2) as usize];
        let mut ids: Vec<u64> = (1..=members).collect();
        let skewed = if rng.chance(0.6) { 1 + rng.below(2) } else { 0 };
        let most = CLOCK_DRIFT_PPM * 9 / 10;
        let clock_rates: Vec<(u64, f64)> = (0..skewed)
            .map(|_| {
                let id = ids.remove(rng.below(ids.len() as u64) as usize);
                let ppm = 1_000_000 - most + rng.range(0, 2 * most + 1);
                (id, ppm as f64 / 1e6)
            })
            .collect();
        // The member with the slowest clock, if one runs slow: as leader
        // its lease lasts longest in true time, against voters whose
        // clocks may run fast, which is where a lease is closest to
        // unsafe; else any member.
        let preferred_leader = rng.chance(0.35).then(|| {
            clock_rates
                .iter()
                .filter(|&&(_, rate)| rate < 1.0)
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or_else(|| 1 + rng.below(members), |&(id, _)| id)
        });
        Setup {
            durability,
            service_thread,
            lease_reads,
            snapshot_every_bytes,
            clock_rates,
            preferred_leader,
        }
    }

    fn toml(&self) -> String {
        format!(
            "durability = \"{}\"\nservice_thread = \"{}\"\nlease_reads = {}\n\
             snapshot_every_bytes = {}\nwrite_timeout_ms = 2000\nnet_threads = 1\n\
             clock_drift_ppm = {CLOCK_DRIFT_PPM}\n{}",
            self.durability,
            self.service_thread,
            self.lease_reads,
            self.snapshot_every_bytes,
            self.preferred_leader.map_or(String::new(), |id| format!(
                "preferred_leaders = [{id}]\npreferred_leader_hold_ms = {}\n",
                common::ELECTION_MAX_MS
            )),
        )
    }
}

/// With `KEEL_NEMESIS_PEER_TLS=1`, the files of peer TLS (made once per
/// process, kept until it ends: every member uses the same certificate),
/// with a copy of the first certificate and key to rotate back to.
fn peer_tls_files() -> Option<&'static (tempfile::TempDir, common::TlsFiles, [PathBuf; 2])> {
    static FILES: std::sync::OnceLock<(tempfile::TempDir, common::TlsFiles, [PathBuf; 2])> =
        std::sync::OnceLock::new();
    if std::env::var("KEEL_NEMESIS_PEER_TLS").as_deref() != Ok("1") {
        return None;
    }
    Some(FILES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = common::tls_files(dir.path());
        let first = [
            dir.path().join("first.pem"),
            dir.path().join("first-key.pem"),
        ];
        std::fs::copy(&f.server_cert, &first[0]).expect("copy");
        std::fs::copy(&f.server_key, &first[1]).expect("copy");
        (dir, f, first)
    }))
}

/// With `KEEL_NEMESIS_PEER_TLS=1`, the settings of peer TLS; else nothing.
fn peer_tls_from_env() -> String {
    let Some((_, f, _)) = peer_tls_files() else {
        return String::new();
    };
    println!("peer links over TLS, their certificate renewed now and then");
    format!(
        "peer_cert_file = {:?}\npeer_key_file = {:?}\npeer_trusted_ca_file = {:?}\n",
        f.server_cert, f.server_key, f.ca
    )
}

/// Restarts each member of `clock_rates` with its clock running at its
/// rate (libfaketime at `lib`, which also scales the process's sleeps and
/// timed waits), for the rest of the run: `spawn` keeps the setting.
fn skew_clocks(c: &mut TestCluster, lib: &std::path::Path, clock_rates: &[(u64, f64)]) {
    let lib = lib.to_str().expect("a UTF-8 path");
    for &(id, rate) in clock_rates {
        let rate = format!("+0 x{rate}");
        c.restart_with_env(
            id,
            &[
                ("LD_PRELOAD", lib),
                ("FAKETIME", &rate),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "0"),
            ],
        );
    }
}

/// How a client reaches the cluster.
enum Api {
    /// One etcd API client per node (by id - 1), each request to a random
    /// one of those serving.
    Etcd(Vec<KvClient<Channel>>, Serving),
    /// The native client (boxed: it is much larger than a `Vec`).
    Native(Box<Client>),
    /// Linearizable reads only, all of one member's etcd API (this id):
    /// a member that still takes itself for the leader after the others
    /// elected another (cut off, or paused and resumed) keeps being asked,
    /// so a read it answers from an expired lease is likely to come after
    /// a write the new leader acknowledged, where the history shows it.
    /// (The other clients are held up by that member's writes, which it
    /// cannot commit, for up to `CALL_TIMEOUT` each.)
    Reader(KvClient<Channel>, u64),
}

/// A client of member `addr`'s etcd API that connects when first used,
/// and again after its connection breaks (the member killed).
fn lazy_kv_client(addr: &str) -> KvClient<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_timeout(Duration::from_millis(500));
    KvClient::new(endpoint.connect_lazy())
}

fn native_client(endpoints: &[String], c: u64) -> Client {
    let mut o = ClientOptions::new(endpoints.to_vec());
    o.client_id = Some(1000 + c);
    o.attempt_timeout = Duration::from_secs(1);
    o.call_timeout = CALL_TIMEOUT;
    Client::new(o).expect("client")
}

fn input_kind(input: &KvInput) -> &'static str {
    match input {
        KvInput::Put { .. } => "put",
        KvInput::Get { .. } => "get",
        KvInput::Cas { .. } => "cas",
    }
}

/// A client: random requests until `stop`. `last_seen` is what it last saw
/// at each key, for its compare-and-swaps.
async fn client_loop(
    client: u64,
    seed: u64,
    mut api: Api,
    values: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> (Vec<Record>, Counts) {
    let mut rng = Rng::new(seed ^ (client + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut records = Vec::new();
    let mut counts = Counts::new();
    let mut last_seen = LastSeen::new();
    while !stop.load(Ordering::Relaxed) {
        let mix = if matches!(api, Api::Reader(..)) {
            (0, 100)
        } else {
            (35, 35)
        };
        let input = random_input(
            &mut rng,
            KEYS,
            mix,
            || values.fetch_add(1, Ordering::Relaxed),
            &last_seen,
        );
        let ctx = Ctx {
            client,
            start,
            counts: &mut counts,
            last_seen: &mut last_seen,
        };
        let record = match &mut api {
            Api::Etcd(nodes, serving) => {
                let node = {
                    let serving = lock(serving);
                    serving[rng.below(serving.len() as u64) as usize]
                };
                etcd_request(&nodes[(node - 1) as usize], node, input, ctx).await
            }
            Api::Native(c) => native_request(c, input, ctx).await,
            Api::Reader(kv, node) => etcd_request(kv, *node, input, ctx).await,
        };
        records.push(record);
        tokio::time::sleep(Duration::from_micros(rng.below(5_000))).await;
    }
    (records, counts)
}

/// What `last_seen` learns from an answered operation: the value it
/// wrote, or `now`, the one it read (a failed compare-and-swap's: what was
/// there instead).
fn learn(last_seen: &mut LastSeen, input: &KvInput, output: &KvOutput, now: Option<u64>) {
    let (key, seen) = match (input, output) {
        (&KvInput::Put { key, value }, _) => (key, Some(value)),
        (&KvInput::Cas { key, new, .. }, KvOutput::Cas(true)) => (key, Some(new)),
        (&KvInput::Cas { key, .. } | &KvInput::Get { key }, _) => (key, now),
    };
    last_seen.insert(key, seen);
}

/// One request over member `node`'s etcd API (`kv`), recorded.
async fn etcd_request(kv: &KvClient<Channel>, node: u64, input: KvInput, ctx: Ctx<'_>) -> Record {
    let mut kv = kv.clone();
    let call = elapsed_ns(ctx.start);
    let answer: Result<Result<(KvOutput, Option<u64>), tonic::Status>, _> =
        tokio::time::timeout(CALL_TIMEOUT, async {
            match &input {
                KvInput::Put { key, value } => {
                    kv.put(PutRequest {
                        key: key_bytes(*key),
                        value: value_bytes(*value),
                        ..Default::default()
                    })
                    .await?;
                    Ok((KvOutput::PutOk, None))
                }
                KvInput::Get { key } => {
                    let r = kv
                        .range(RangeRequest {
                            key: key_bytes(*key),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    let v = r.kvs.first().map(|kv| parse_value(&kv.value));
                    Ok((KvOutput::Get(v), v))
                }
                KvInput::Cas { key, expected, new } => {
                    let compare = match expected {
                        Some(v) => Compare {
                            key: key_bytes(*key),
                            target: CompareTarget::Value as i32,
                            result: CompareResult::Equal as i32,
                            target_union: Some(TargetUnion::Value(value_bytes(*v))),
                            ..Default::default()
                        },
                        None => Compare {
                            key: key_bytes(*key),
                            target: CompareTarget::Version as i32,
                            result: CompareResult::Equal as i32,
                            target_union: Some(TargetUnion::Version(0)),
                            ..Default::default()
                        },
                    };
                    let r = kv
                        .txn(TxnRequest {
                            compare: vec![compare],
                            success: vec![RequestOp {
                                request: Some(Req::RequestPut(PutRequest {
                                    key: key_bytes(*key),
                                    value: value_bytes(*new),
                                    ..Default::default()
                                })),
                            }],
                            // What is there instead, to compare next time.
                            failure: vec![RequestOp {
                                request: Some(Req::RequestRange(RangeRequest {
                                    key: key_bytes(*key),
                                    ..Default::default()
                                })),
                            }],
                        })
                        .await?
                        .into_inner();
                    let current = match r.responses.first().and_then(|o| o.response.as_ref()) {
                        Some(Resp::ResponseRange(range)) => {
                            range.kvs.first().map(|kv| parse_value(&kv.value))
                        }
                        _ => None,
                    };
                    Ok((KvOutput::Cas(r.succeeded), current))
                }
            }
        })
        .await;
    let outcome = match answer {
        Err(_) => Outcome::Timeout,
        Ok(Ok((out, now))) => Outcome::Answered(out, now),
        Ok(Err(status)) => {
            let m = status.message();
            Outcome::Failed {
                // (A connection that could not be made sent nothing.)
                refused: status.code() == tonic::Code::Unavailable
                    && (m.starts_with("etcdserver: no leader")
                        || m.starts_with("etcdserver: too many requests")
                        || m == "tcp connect error"),
                text: format!("{:?}: {m}", status.code()),
            }
        }
    };
    ctx.record("etcd", node, input, call, outcome)
}

/// One request through the native client (its own retries and redirects,
/// in its session), recorded. Its node is 0: the client picks.
async fn native_request(c: &mut Client, input: KvInput, ctx: Ctx<'_>) -> Record {
    let call = elapsed_ns(ctx.start);
    let answer = tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), async {
        match &input {
            KvInput::Put { key, value } => {
                let cmd = Command::Put {
                    key: key_bytes(*key),
                    value: value_bytes(*value),
                };
                c.write(cmd.encode()).await
            }
            KvInput::Get { key } => {
                c.read(
                    Query::Get {
                        key: key_bytes(*key),
                    }
                    .encode(),
                )
                .await
            }
            KvInput::Cas { key, expected, new } => {
                let cmd = Command::Cas {
                    key: key_bytes(*key),
                    expected: match expected {
                        Some(v) => KvCompare::ValueEquals(value_bytes(*v)),
                        None => KvCompare::VersionEquals(0),
                    },
                    value: value_bytes(*new),
                };
                c.write(cmd.encode()).await
            }
        }
    })
    .await;
    let outcome = match answer {
        Err(_) => Outcome::Timeout,
        Ok(Ok(data)) => {
            let (out, now) = match (Response::decode(&data), &input) {
                (Ok(Response::Put { .. }), KvInput::Put { .. }) => (KvOutput::PutOk, None),
                (
                    Ok(Response::Cas {
                        succeeded, current, ..
                    }),
                    KvInput::Cas { .. },
                ) => (
                    KvOutput::Cas(succeeded),
                    current.map(|kv| parse_value(&kv.value)),
                ),
                (Ok(Response::Get { kv, .. }), KvInput::Get { .. }) => {
                    let v = kv.map(|kv| parse_value(&kv.value));
                    (KvOutput::Get(v), v)
                }
                (other, _) => panic!("{input:?} answered {other:?}"),
            };
            Outcome::Answered(out, now)
        }
        Ok(Err(e)) => Outcome::Failed {
            refused: matches!(e, ClientError::NoLeader { .. } | ClientError::Refused(_)),
            text: e.to_string(),
        },
    };
    // (The client picks the node.)
    ctx.record("native", 0, input, call, outcome)
}

/// How a request ended.
enum Outcome {
    /// No answer within the client's time.
    Timeout,
    /// Answered: what, and the key's value it saw (for `last_seen`).
    Answered(KvOutput, Option<u64>),
    /// An error; `refused` if it promises the write was not applied.
    Failed { refused: bool, text: String },
}

/// A client's request in the making: who asks, the run's start, and where
/// its answer is counted and learned from.
struct Ctx<'a> {
    client: u64,
    start: Instant,
    counts: &'a mut Counts,
    last_seen: &'a mut LastSeen,
}

impl Ctx<'_> {
    /// The record of a request of `input` over `api` ("etcd", "native")
    /// to `node`, called at `call` (ns since the start), that ended now in
    /// `outcome`: counted, learned from, and in the history unless it is
    /// a read not served or a write refused.
    fn record(self, api: &str, node: u64, input: KvInput, call: u64, outcome: Outcome) -> Record {
        let ret = elapsed_ns(self.start);
        let kind = format!("{api} {}", input_kind(&input));
        let is_read = matches!(input, KvInput::Get { .. });
        let (output, kept, answer) = match outcome {
            Outcome::Timeout => {
                count(self.counts, format!("{kind} timeout"));
                (None, !is_read, "no answer in time".to_string())
            }
            Outcome::Answered(out, now) => {
                count(self.counts, format!("{kind} ok"));
                learn(self.last_seen, &input, &out, now);
                let text = format!("Ok({out:?})");
                (Some(out), true, text)
            }
            Outcome::Failed { refused, text } => {
                let tag = if refused { "refused" } else { "error" };
                count(self.counts, format!("{kind} {tag}: {}", error_kind(&text)));
                (None, !is_read && !refused, text)
            }
        };
        Record {
            op: operation(self.client, input, output, call, ret),
            node,
            answer,
            kept,
        }
    }
}

/// What a node is doing, for the nemesis.
#[derive(Clone, Copy, Debug)]
enum Out {
    /// Killed; started again at this time.
    Killed(Instant),
    /// Stopped (SIGSTOP); resumed at this time.
    Paused(Instant),
}

/// The nodes clients send requests to: the members (voters and learners)
/// that have not been removed.
type Serving = Arc<Mutex<Vec<u64>>>;

/// The membership changes of a cluster started with spares
/// (`Params::spares`): each spare in turn is started, added as a learner
/// and promoted, and then a voter (often the leader, or one that is
/// down) is removed, so the voters go from 3 to 4 and back while the
/// nemesis kills and pauses nodes. A removed node stops; its id is never
/// used again.
struct Membership {
    /// How many voters the cluster started with (and goes back to).
    members: usize,
    voters: Vec<u64>,
    /// Spares not started yet.
    spares: Vec<u64>,
    /// A spare started, not yet added as a learner.
    joining: Option<u64>,
    learner: Option<u64>,
}

impl Membership {
    /// Every node that runs (and may be killed or paused).
    fn running(&self) -> Vec<u64> {
        let mut r = self.voters.clone();
        r.extend(self.joining.iter().chain(&self.learner));
        r
    }

    /// The next change, through `keel cluster`; what it did (`None`: all
    /// done).
    fn step(&mut self, c: &mut TestCluster, serving: &Serving, victim: u64) -> Option<String> {
        if let Some(s) = self.learner {
            let (ok, text) = cli(c, &["cluster", "promote", &s.to_string()]);
            if ok {
                self.voters.push(s);
                self.learner = None;
            }
            return Some(format!("promote {s}: {text}"));
        }
        if self.voters.len() > self.members {
            let (ok, text) = cli(c, &["cluster", "remove", &victim.to_string()]);
            if ok {
                self.voters.retain(|&v| v != victim);
                lock(serving).retain(|&v| v != victim);
                // It stops once it learns of its removal; no need to wait
                // (nor to stop one that was killed already).
                if c.node(victim).child.is_some() {
                    c.kill(victim);
                }
            }
            return Some(format!("remove {victim}: {text}"));
        }
        let s = match self.joining {
            Some(s) => s,
            None => {
                let s = self.spares.pop()?;
                c.spawn(s);
                self.joining = Some(s);
                s
            }
        };
        let (ok, text) = cli(c, &["cluster", "add-learner", &s.to_string()]);
        if ok {
            self.joining = None;
            self.learner = Some(s);
            lock(serving).push(s);
        }
        Some(format!("add-learner {s}: {text}"))
    }
}

/// `keel cluster …` against `c`: whether it succeeded, and its last line.
fn cli(c: &TestCluster, args: &[&str]) -> (bool, String) {
    let (code, text) = c.keel_cli(args);
    (
        code == 0,
        text.trim().lines().last().unwrap_or("").to_string(),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The nemesis: a random fault every 0.4-1.2 s (`KEEL_NEMESIS_PACE_MS`)
/// until `stop`, then every link healed and every node resumed or started
/// again. At most a minority of the `members` is killed or paused at a
/// time (one of three, two of five: a majority can go on), with link
/// faults on top, or, in a cluster with spares (no proxies), membership
/// changes (`Membership`), the one out of action included: a voter that
/// is down is most often the one removed, as a dead node is replaced.
/// Returns the cluster, what it did, with times (ms since the start), and
/// its actions counted.
fn nemesis(
    seed: u64,
    (mut c, members, spares, replicated): (TestCluster, u64, u64, bool),
    serving: Serving,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> (TestCluster, Vec<String>, Counts) {
    let mut rng = Rng::new(seed ^ 0x6e65_6d65_7369_7321);
    let mut log = Vec::new();
    let mut counts = Counts::new();
    // Killed or paused, a minority of the members at most.
    let mut out: Vec<(u64, Out)> = Vec::new();
    let most_out = ((members - 1) / 2) as usize;
    let mut faulty_links = false;
    let mut renewals = 0u64;
    let mut membership = Membership {
        members: members as usize,
        voters: (1..=members).collect(),
        spares: (members + 1..=members + spares).rev().collect(),
        joining: None,
        learner: None,
    };
    let note = |log: &mut Vec<String>, counts: &mut Counts, what: &str, detail: String| {
        log.push(format!(
            "{:>7} ms  {what} {detail}",
            start.elapsed().as_millis()
        ));
        count(counts, what.to_string());
    };
    let pace = range_from_env("KEEL_NEMESIS_PACE_MS", (400, 1200));
    let mut next = Instant::now() + Duration::from_millis(rng.range(pace.0, pace.1));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
        let now = Instant::now();
        // Bring back the nodes whose time out is up.
        out.retain(|&(id, o)| match o {
            Out::Killed(until) if now >= until => {
                c.spawn(id);
                note(&mut log, &mut counts, "restart", format!("{id}"));
                false
            }
            Out::Paused(until) if now >= until => {
                c.resume(id);
                note(&mut log, &mut counts, "resume", format!("{id}"));
                false
            }
            _ => true,
        });
        if now < next {
            continue;
        }
        next = now + Duration::from_millis(rng.range(pace.0, pace.1));
        let running = membership.running();
        let is_out = |id: u64| out.iter().any(|&(o, _)| o == id);
        let leader = leader(&c, &running, &is_out);
        let any = |rng: &mut Rng| running[rng.below(running.len() as u64) as usize];
        // The leader, or (half the time, or with none known) any node.
        let victim = |rng: &mut Rng| match leader {
            Some(l) if rng.chance(0.5) => l,
            _ => any(rng),
        };
        let roll = rng.below(100);
        if let Some((_, files, first)) = peer_tls_files().filter(|_| rng.chance(0.1)) {
            // Every member's certificate renewed on disk (the certificate
            // first, then its key): taken by the links that open after it,
            // while the others stay up.
            renewals += 1;
            let (cert, key) = if renewals % 2 == 1 {
                (&files.renewed_server_cert, &files.renewed_server_key)
            } else {
                (&first[0], &first[1])
            };
            files.replace_server(cert, key);
            note(
                &mut log,
                &mut counts,
                "renew certificates",
                format!("({renewals})"),
            );
        } else if faulty_links && roll < 30 {
            for l in c.links.values() {
                l.heal();
            }
            faulty_links = false;
            note(&mut log, &mut counts, "heal links", String::new());
        } else if roll < 55 {
            let id = victim(&mut rng);
            if out.len() >= most_out || is_out(id) {
                continue;
            }
            let down = Duration::from_millis(rng.range(100, 2000));
            if replicated && rng.chance(0.3) {
                c.kill(id);
                let cut = lose_power(&c, id, &mut rng);
                out.push((id, Out::Killed(now + down)));
                note(
                    &mut log,
                    &mut counts,
                    "power loss",
                    format!("{id} for {down:?}, {cut} (leader {leader:?})"),
                );
                // The leader often goes down with it, if a minority may.
                let down_already = |l: u64| out.iter().any(|&(o, _)| o == l);
                let also = leader.filter(|&l| l != id && out.len() < most_out && !down_already(l));
                if let Some(l) = also.filter(|_| rng.chance(0.6)) {
                    c.kill(l);
                    let down = Duration::from_millis(rng.range(100, 2000));
                    out.push((l, Out::Killed(now + down)));
                    note(
                        &mut log,
                        &mut counts,
                        "kill",
                        format!("{l} (the leader) for {down:?}"),
                    );
                }
            } else if rng.chance(0.6) {
                c.kill(id);
                out.push((id, Out::Killed(now + down)));
                note(
                    &mut log,
                    &mut counts,
                    "kill",
                    format!("{id} for {down:?} (leader {leader:?})"),
                );
            } else {
                c.pause(id);
                out.push((id, Out::Paused(now + down)));
                note(
                    &mut log,
                    &mut counts,
                    "pause",
                    format!("{id} for {down:?} (leader {leader:?})"),
                );
            }
        } else if c.links.is_empty() {
            let voters = &membership.voters;
            let down = out.iter().map(|&(id, _)| id).find(|id| voters.contains(id));
            // A voter that is down is most often the one removed, as an
            // operator replaces a dead node; else the leader or any voter.
            let removed = match (down, leader) {
                (Some(d), _) if rng.chance(0.7) => d,
                (_, Some(l)) if rng.chance(0.5) && voters.contains(&l) => l,
                _ => voters[rng.below(voters.len() as u64) as usize],
            };
            let Some(what) = membership.step(&mut c, &serving, removed) else {
                continue;
            };
            // A node removed while it was down stays down: it is no
            // member any more (`step` stopped it if it was paused).
            let running = membership.running();
            out.retain(|(id, _)| running.contains(id));
            note(
                &mut log,
                &mut counts,
                "membership",
                format!("{what} (leader {leader:?})"),
            );
        } else {
            // A link fault, most often on one of the leader's links.
            let a = match leader {
                Some(l) if rng.chance(0.7) => l,
                _ => any(&mut rng),
            };
            let b = loop {
                let b = any(&mut rng);
                if b != a {
                    break b;
                }
            };
            let link = c.link(a, b);
            let what = match rng.below(4) {
                0 => {
                    // Node `a` cut off from the others (its clients still
                    // reach it).
                    for l in c.links_of(a) {
                        l.cut();
                    }
                    format!("isolate {a}")
                }
                1 => {
                    link.cut();
                    format!("cut {a}-{b}")
                }
                2 => {
                    let way = if rng.chance(0.5) {
                        Way::Forward
                    } else {
                        Way::Back
                    };
                    link.stall(way);
                    format!("stall {a}-{b} ({way:?})")
                }
                _ => {
                    let d = Duration::from_millis(rng.range(1, 60));
                    link.delay(d);
                    format!("slow {a}-{b} ({d:?})")
                }
            };
            faulty_links = true;
            note(
                &mut log,
                &mut counts,
                "link fault",
                format!("{what} (leader {leader:?})"),
            );
        }
    }
    // The final heal.
    for l in c.links.values() {
        l.heal();
    }
    for (id, o) in out {
        match o {
            Out::Killed(_) => c.spawn(id),
            Out::Paused(_) => c.resume(id),
        }
    }
    note(&mut log, &mut counts, "final heal", String::new());
    (c, log, counts)
}

/// What a power loss does to the data of node `id` (`replicated`
/// durability; the process was just killed): its last log segment loses
/// its last 1-8 frames, what it had written but not synced (three times
/// in ten the cut is torn, inside the frame before; two in ten a sector
/// among the last frames left is zeroed too, a page that never reached
/// the disk though later ones did), and the boot id its data directory
/// recorded changes, as if the machine rebooted. Says what was cut. (A
/// real power loss loses only what was not synced, at most a sync
/// interval's worth: this loses more, which a node must survive the same
/// way.)
fn lose_power(c: &TestCluster, id: u64, rng: &mut Rng) -> String {
    use keel_log::frame::{decode_header, HEADER_LEN};
    let data = c.node(id).dir.join("data");
    let last = std::fs::read_dir(&data)
        .expect("data directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .max()
        .expect("a log segment");
    let bytes = std::fs::read(&last).expect("read segment");
    // Where each frame ends.
    let mut ends = vec![0];
    let mut off = 0;
    while let Some(Ok(len)) = bytes.get(off..off + HEADER_LEN).map(decode_header) {
        off += HEADER_LEN + len;
        if off > bytes.len() {
            break;
        }
        ends.push(off);
    }
    let frames = ends.len() - 1;
    let cut = frames.min(1 + rng.below(8) as usize);
    let mut at = ends[frames - cut];
    if cut > 0 && rng.chance(0.3) {
        at += rng.below((ends[frames - cut + 1] - at) as u64) as usize;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open segment");
    f.set_len(at as u64).expect("cut segment");
    drop(f);
    // A hole: the whole sector before the one the cut is in.
    let hole = (at / 512)
        .checked_sub(1)
        .map(|s| s * 512)
        .filter(|_| rng.chance(0.2));
    if let Some(h) = hole {
        let mut left = std::fs::read(&last).expect("read segment");
        left[h..h + 512].fill(0);
        std::fs::write(&last, left).expect("write segment");
    }
    std::fs::write(
        data.join("BOOT"),
        format!("power-loss-{} replicated\n", rng.below(1 << 30)),
    )
    .expect("write BOOT");
    format!(
        "{cut} of {frames} frames of {} cut ({} bytes){}",
        last.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
        bytes.len() - at,
        hole.map_or(String::new(), |h| format!(", a hole at {h}"))
    )
}

/// The leader of the highest term the `running` nodes that are not out
/// report.
fn leader(c: &TestCluster, running: &[u64], is_out: &dyn Fn(u64) -> bool) -> Option<u64> {
    running
        .iter()
        .copied()
        .filter(|&id| !is_out(id))
        .filter_map(|id| c.status(id))
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .map(|s| s.id)
}
