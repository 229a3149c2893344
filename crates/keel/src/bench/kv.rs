//! `keel bench kv`: one etcd v3 gRPC load generator (raw tonic clients)
//! run against a 3-node Keel cluster serving the etcd API and a 3-member
//! etcd, one after the other on the same machine, in one command.
//!
//! Two kinds of run per workload: closed loop (N connections × M clients,
//! each client with one request in flight: the throughput each system
//! sustains, and its latency there) and open loop at fixed offered rates
//! (a pacer thread schedules requests; latency from the intended time, at
//! most M in flight per connection) for the latency-vs-rate plot.

use super::cluster::{
    check_keel_config, cpu_seconds, etcd_version, find_etcd, on_memory_fs, peak_rss_bytes,
    EtcdCluster, KeelCluster, MachineTicks,
};
use super::pace::{burst_due_ns, bursts_due_in, sleep_until, tighten_timer_slack};
use super::prom;
use super::report::{self, histogram, ms, Panel, Percentiles, Series};
use super::{check_interrupted, interrupted, parse_rate, say, CommonArgs, NodeThreadArgs};
use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use keel_core::rng::Rng;
use keel_etcd_proto::etcdserverpb::{
    compare, kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, response_op,
    Compare, PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest,
};
use plotters::style::RGBColor;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

pub const LONG_ABOUT: &str = "\
Keel vs etcd 3.4 over the etcd v3 gRPC API, side by side in one run.

For each system (--systems), starts a 3-node cluster on loopback in a fresh \
temporary directory: 3 `keel server --service kv` processes serving the etcd \
API (with --durability, `sync` by default), or 3 etcd members (etcd from \
PATH or /usr/bin/etcd; Debian: `apt-get install -y etcd-server`). It \
preloads --keys keys of --value-size bytes, then runs every workload:

  put                  put a random key
  range                linearizable get of a random key
  range-serializable   serializable get of a random key (served locally)
  txn-cas              txn: if mod_revision(key) == last seen, put; else get

Closed loop: --connections gRPC connections × --clients clients per \
connection, each client with one request in flight, for --warmup then \
--duration seconds: ops/s and latency percentiles, and the Keel/etcd \
ratio per workload; each system's CPU time per request, and its members' \
log fdatasyncs (count and time, from their metrics). Then (unless --no-sweep) open loop at each of --rates \
(requests scheduled at fixed times, latency from the scheduled time, at most \
--clients in flight per connection) until the system saturates, for the \
latency-vs-rate plot.

Writes the tables to --out between <!-- kv:start --> and <!-- kv:end --> \
and the plot to BENCHMARKS-kv.png next to it.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum System {
    Keel,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Keel => "Keel",
            System::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Put,
    Range,
    RangeSerializable,
    TxnCas,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Range => "range (linearizable)",
            Workload::RangeSerializable => "range (serializable)",
            Workload::TxnCas => "txn-CAS",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// Every connection to the leader.
    Leader,
    /// Connections spread round-robin over all members.
    All,
}

#[derive(Args, Debug)]
pub struct KvArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Systems to measure, in this order.
    #[arg(long, value_delimiter = ',', default_value = "keel,etcd")]
    systems: Vec<System>,
    /// Workloads to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "put,range,range-serializable,txn-cas"
    )]
    workloads: Vec<Workload>,
    /// gRPC connections (HTTP/2 channels).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    connections: u64,
    /// Concurrent clients per connection (closed loop: each with one request
    /// in flight; open loop: the most requests in flight per connection).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    clients: u64,
    /// Number of distinct keys (chosen uniformly at random).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    keys: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    value_size: u64,
    /// Which members the connections go to.
    #[arg(long, value_enum, default_value = "leader")]
    target: Target,
    /// Keel's durability mode (etcd always fsyncs).
    #[arg(long, default_value = "sync", value_parser = ["sync", "replicated"])]
    durability: String,
    #[command(flatten)]
    threads: NodeThreadArgs,
    /// Offered rates (ops/s) of the open-loop sweep, comma-separated, increasing (k and m suffixes allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_rate, default_value = "1k,2k,5k,10k,20k,50k")]
    rates: Vec<u64>,
    /// Skip the open-loop sweep (closed loop only; no plot).
    #[arg(long)]
    no_sweep: bool,
    /// Seconds to wait for outstanding requests after an open-loop step.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// The etcd binary (default: `etcd` on PATH, else /usr/bin/etcd).
    #[arg(long)]
    etcd: Option<std::path::PathBuf>,
    /// Measure a Keel cluster that is already running, at these etcd API
    /// endpoints (host:port, comma-separated; every member, so the leader
    /// is found), instead of starting one here: for example on other
    /// machines, with cores of their own. Its CPU and memory are not
    /// measured (the load generator's are). The preload writes `--keys`
    /// keys under `bench/`, and the workloads overwrite them.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
    keel_endpoints: Vec<String>,
    /// The same for an etcd cluster that is already running.
    #[arg(long, value_delimiter = ',', value_name = "HOST:PORT")]
    etcd_endpoints: Vec<String>,
    /// The PNG to write (default: BENCHMARKS-kv.png next to --out).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

impl KvArgs {
    /// The endpoints of `system`'s cluster if it runs elsewhere.
    fn external(&self, system: System) -> Option<&[String]> {
        let eps = match system {
            System::Keel => &self.keel_endpoints,
            System::Etcd => &self.etcd_endpoints,
        };
        (!eps.is_empty()).then_some(eps.as_slice())
    }
}

/// One measured run.
#[derive(Clone, Debug)]
struct Run {
    system: System,
    workload: Workload,
    /// None: closed loop.
    offered: Option<u64>,
    ops_per_sec: f64,
    latency: Percentiles,
    errors: u64,
    lost: u64,
    cas_failed: u64,
    first_error: Option<String>,
    saturated: bool,
    /// CPU time per completed request during the measured window, in µs:
    /// (the cluster's processes, unless it runs elsewhere; the load
    /// generator). Closed loop only.
    cpu_per_op: Option<(Option<f64>, f64)>,
    /// The share of the machine's time the hypervisor stole during the
    /// measured window. Closed loop only.
    steal: Option<f64>,
    /// The largest member's peak resident memory since it started, read at
    /// the end of the measured window, in bytes. Closed loop only.
    peak_rss: Option<u64>,
    /// The members' log fdatasyncs during the measured window, and the
    /// requests completed in it. Closed loop only.
    syncs: Option<(prom::Hist, u64)>,
}

/// What every request needs.
struct Ctx {
    keys: Vec<Bytes>,
    value: Bytes,
    /// Last known mod_revision per key (for txn-CAS).
    revs: Vec<AtomicI64>,
}

impl Ctx {
    fn new(keys: u64, value_size: u64) -> Ctx {
        Ctx {
            keys: (0..keys)
                .map(|i| Bytes::from(format!("bench/{i:08}")))
                .collect(),
            value: Bytes::from(vec![b'v'; value_size as usize]),
            revs: (0..keys).map(|_| AtomicI64::new(0)).collect(),
        }
    }
}

/// The txn of the CAS workload: put if the key's mod_revision is still
/// `rev`, else read it (to learn the current revision).
fn cas_txn(key: &Bytes, rev: i64, value: &Bytes) -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Mod as i32,
            key: key.clone(),
            range_end: Bytes::new(),
            target_union: Some(compare::TargetUnion::ModRevision(rev)),
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            })),
        }],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: key.clone(),
                ..Default::default()
            })),
        }],
    }
}

/// One request of workload `w`; Ok(false) is a CAS whose compare failed.
async fn op(
    client: &mut KvClient<Channel>,
    w: Workload,
    ctx: &Ctx,
    rng: &mut Rng,
) -> Result<bool, tonic::Status> {
    let i = rng.below(ctx.keys.len() as u64) as usize;
    let key = ctx.keys[i].clone();
    match w {
        Workload::Put => {
            let r = client
                .put(PutRequest {
                    key,
                    value: ctx.value.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            if let Some(h) = r.header {
                ctx.revs[i].fetch_max(h.revision, Ordering::Relaxed);
            }
            Ok(true)
        }
        Workload::Range | Workload::RangeSerializable => {
            client
                .range(RangeRequest {
                    key,
                    serializable: w == Workload::RangeSerializable,
                    ..Default::default()
                })
                .await?;
            Ok(true)
        }
        Workload::TxnCas => {
            let rev = ctx.revs[i].load(Ordering::Relaxed);
            let r = client
                .txn(cas_txn(&key, rev, &ctx.value))
                .await?
                .into_inner();
            if r.succeeded {
                if let Some(h) = r.header {
                    ctx.revs[i].fetch_max(h.revision, Ordering::Relaxed);
                }
                return Ok(true);
            }
            let current = r.responses.iter().find_map(|o| match &o.response {
                Some(response_op::Response::ResponseRange(rr)) => {
                    rr.kvs.first().map(|kv| kv.mod_revision)
                }
                _ => None,
            });
            if let Some(m) = current {
                ctx.revs[i].fetch_max(m, Ordering::Relaxed);
            }
            Ok(false)
        }
    }
}

/// Counters of one run (merged across tasks).
struct Tally {
    latency: Histogram<u64>,
    ok_in_window: u64,
    errors_in_window: u64,
    done_during_window: u64,
    cas_failed: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency: histogram(),
            ok_in_window: 0,
            errors_in_window: 0,
            done_during_window: 0,
            cas_failed: 0,
            first_error: None,
        }
    }

    /// Records one request due at `due` ns and done at `done` ns after the start.
    fn record(&mut self, window: (u64, u64), due: u64, done: u64, r: Result<bool, tonic::Status>) {
        let in_window = |t: u64| (window.0..window.1).contains(&t);
        match r {
            Ok(cas_ok) => {
                if in_window(due) {
                    self.latency
                        .saturating_record(done.saturating_sub(due).max(1));
                    self.ok_in_window += 1;
                    if !cas_ok {
                        self.cas_failed += 1;
                    }
                }
                if in_window(done) {
                    self.done_during_window += 1;
                }
            }
            Err(s) => {
                if in_window(due) {
                    self.errors_in_window += 1;
                }
                self.first_error
                    .get_or_insert_with(|| format!("{:?}: {}", s.code(), s.message()));
            }
        }
    }

    fn merge(&mut self, o: &Tally) {
        self.latency.add(&o.latency).ok();
        self.ok_in_window += o.ok_in_window;
        self.errors_in_window += o.errors_in_window;
        self.done_during_window += o.done_during_window;
        self.cas_failed += o.cas_failed;
        if self.first_error.is_none() {
            self.first_error = o.first_error.clone();
        }
    }
}

fn nanos_since(start: Instant) -> u64 {
    Instant::now().saturating_duration_since(start).as_nanos() as u64
}

/// Closed loop: every client sends its next request when the previous
/// answer arrives.
async fn closed_loop(
    a: &KvArgs,
    channels: &[Channel],
    ctx: &Arc<Ctx>,
    w: Workload,
    seed: u64,
    servers: &[u32],
    syncs: Option<Syncs>,
) -> Result<(Tally, CpuUsed)> {
    let warm = a.common.warmup().as_nanos() as u64;
    let end = warm + a.common.duration().as_nanos() as u64;
    let start = Instant::now();
    let cpu = tokio::spawn(cpu_during(
        servers.to_vec(),
        syncs,
        start + Duration::from_nanos(warm),
        start + Duration::from_nanos(end),
    ));
    let mut tasks = Vec::new();
    for (c, ch) in channels.iter().enumerate() {
        for m in 0..a.clients {
            let mut client = KvClient::new(ch.clone());
            let ctx = ctx.clone();
            let mut rng = Rng::new(seed ^ ((c as u64) << 32 | m).wrapping_mul(0x9E37_79B9));
            tasks.push(tokio::spawn(async move {
                let mut t = Tally::new();
                loop {
                    let due = nanos_since(start);
                    if due >= end || interrupted() {
                        break;
                    }
                    let r = op(&mut client, w, &ctx, &mut rng).await;
                    let failed = r.is_err();
                    t.record((warm, end), due, nanos_since(start), r);
                    if failed {
                        // Do not spin on a cluster that refuses everything.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                t
            }));
        }
    }
    let mut total = Tally::new();
    for t in tasks {
        total.merge(&t.await.context("a client task failed")?);
    }
    check_interrupted()?;
    let cpu = cpu.await.context("the CPU sampler failed")?;
    Ok((total, cpu))
}

/// Where a cluster's members report their log's fdatasyncs: their metrics
/// addresses (host:port) and the histogram's name.
#[derive(Clone, Debug)]
struct Syncs {
    addrs: Vec<String>,
    histogram: &'static str,
}

/// CPU seconds used during a window: by the cluster's processes, and by
/// this process (the load generator).
#[derive(Clone, Debug, Default)]
struct CpuUsed {
    servers: f64,
    client: f64,
    /// Share of the machine's time stolen by the hypervisor.
    steal: Option<f64>,
    /// The largest cluster member's peak resident memory so far, at the
    /// window's end.
    peak_rss: Option<u64>,
    /// The members' fdatasyncs during the window, all members together.
    syncs: Option<prom::Hist>,
}

/// Samples CPU time (and the members' sync histograms) at `from` and `to`
/// (the measured window).
async fn cpu_during(pids: Vec<u32>, syncs: Option<Syncs>, from: Instant, to: Instant) -> CpuUsed {
    // (On the blocking pool: the load generator shares this thread.)
    let scrape = |s: &Option<Syncs>| {
        let s = s.clone();
        async move {
            let s = s?;
            tokio::task::spawn_blocking(move || prom::scrape_sum(&s.addrs, s.histogram))
                .await
                .ok()?
        }
    };
    tokio::time::sleep_until(from.into()).await;
    let (s0, c0, k0) = (
        cpu_seconds(Some(&pids)),
        cpu_seconds(None),
        MachineTicks::now(),
    );
    let h0 = scrape(&syncs).await;
    tokio::time::sleep_until(to.into()).await;
    let (s1, c1, k1) = (
        cpu_seconds(Some(&pids)),
        cpu_seconds(None),
        MachineTicks::now(),
    );
    let h1 = scrape(&syncs).await;
    CpuUsed {
        servers: (s1 - s0).max(0.0),
        client: (c1 - c0).max(0.0),
        steal: k0.zip(k1).and_then(|(k0, k1)| k1.steal_since(&k0)),
        peak_rss: peak_rss_bytes(&pids),
        syncs: h0.zip(h1).map(|(h0, h1)| h1.since(&h0)),
    }
}

/// Open loop at `rate` ops/s: a pacer thread releases requests at their
/// scheduled times, round-robin over the connections; each connection has
/// at most `--clients` requests in flight (a request waiting for a slot
/// is late, and its latency counts from its scheduled time).
async fn open_loop(
    a: &KvArgs,
    channels: &[Channel],
    ctx: &Arc<Ctx>,
    w: Workload,
    rate: u64,
    seed: u64,
) -> Result<(Tally, u64)> {
    let warm = a.common.warmup().as_nanos() as u64;
    let end = warm + a.common.duration().as_nanos() as u64;
    let drain = Duration::from_secs_f64(a.drain.max(0.0));
    let start = Instant::now() + Duration::from_millis(20);
    let n = channels.len();
    let mut txs = Vec::new();
    let mut dispatchers = Vec::new();
    let tally = Arc::new(Mutex::new(Tally::new()));
    for (c, ch) in channels.iter().enumerate() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        txs.push(tx);
        let slots = Arc::new(tokio::sync::Semaphore::new(a.clients as usize));
        let (ch, ctx, tally) = (ch.clone(), ctx.clone(), tally.clone());
        let mut rng = Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        dispatchers.push(tokio::spawn(async move {
            // Dropping the set (when this task is aborted) aborts its requests.
            let mut in_flight = tokio::task::JoinSet::new();
            while let Some(due) = rx.recv().await {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                while in_flight.try_join_next().is_some() {}
                let mut client = KvClient::new(ch.clone());
                let (ctx, tally) = (ctx.clone(), tally.clone());
                let mut r = Rng::new(rng.next_u64());
                in_flight.spawn(async move {
                    let res = op(&mut client, w, &ctx, &mut r).await;
                    let done = nanos_since(start);
                    if let Ok(mut t) = tally.lock() {
                        t.record((warm, end), due, done, res);
                    }
                    drop(slot);
                });
            }
            while in_flight.join_next().await.is_some() {}
        }));
    }
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            tighten_timer_slack();
            let mut i = 0u64;
            loop {
                let due = burst_due_ns(i, 1, rate);
                if due >= end || interrupted() {
                    break;
                }
                sleep_until(start + Duration::from_nanos(due));
                if txs[(i % n as u64) as usize].send(due).is_err() {
                    break;
                }
                i += 1;
            }
        })?;
    // The pacer blocks in sleeps: wait for it off the runtime's threads.
    tokio::task::spawn_blocking(move || pacer.join())
        .await
        .context("waiting for the pacer")?
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    let deadline = start + Duration::from_nanos(end) + drain;
    let left = deadline.saturating_duration_since(Instant::now());
    let aborts: Vec<_> = dispatchers.iter().map(|d| d.abort_handle()).collect();
    if tokio::time::timeout(left, futures_join(dispatchers))
        .await
        .is_err()
    {
        // Requests unanswered by the deadline are lost; stop them so they
        // do not load the next run.
        aborts.iter().for_each(|h| h.abort());
    }
    check_interrupted()?;
    let scheduled = bursts_due_in(warm, end, 1, rate);
    let t = tally
        .lock()
        .map_err(|_| anyhow::anyhow!("a request task panicked"))?;
    let mut out = Tally::new();
    out.merge(&t);
    Ok((out, scheduled))
}

/// Awaits every handle (without an extra futures dependency).
async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
}

/// A running cluster of either system: started here, or already running
/// elsewhere (`--keel-endpoints`, `--etcd-endpoints`).
enum Cluster {
    Keel(KeelCluster),
    Etcd(EtcdCluster),
    External(Vec<String>),
}

impl Cluster {
    fn check_alive(&mut self) -> Result<()> {
        match self {
            Cluster::Keel(c) => c.check_alive(),
            Cluster::Etcd(c) => c.check_alive(),
            Cluster::External(_) => Ok(()),
        }
    }
    fn endpoints(&self) -> Vec<String> {
        match self {
            Cluster::Keel(c) => c.nodes.iter().filter_map(|n| n.etcd.clone()).collect(),
            Cluster::Etcd(c) => c.clients.clone(),
            Cluster::External(eps) => eps.clone(),
        }
    }
    fn pids(&self) -> Vec<u32> {
        match self {
            Cluster::Keel(c) => c.pids(),
            Cluster::Etcd(c) => c.pids(),
            Cluster::External(_) => Vec::new(),
        }
    }
    /// Where the members' log fdatasyncs are counted (etcd serves its
    /// metrics on its client URLs).
    fn syncs(&self) -> Option<Syncs> {
        match self {
            Cluster::Keel(c) => Some(Syncs {
                addrs: c.metrics_addrs(),
                histogram: prom::KEEL_FSYNC,
            }),
            Cluster::Etcd(c) => Some(Syncs {
                addrs: c.clients.clone(),
                histogram: "etcd_disk_wal_fsync_duration_seconds",
            }),
            Cluster::External(_) => None,
        }
    }
    fn dir(&self) -> Option<&super::cluster::WorkDir> {
        match self {
            Cluster::Keel(c) => Some(&c.dir),
            Cluster::Etcd(c) => Some(&c.dir),
            Cluster::External(_) => None,
        }
    }

    /// Where the cluster is, for messages.
    fn place(&self) -> String {
        match self.dir() {
            Some(d) => format!("in {}", d.path().display()),
            None => format!("at {}", self.endpoints().join(",")),
        }
    }
}

/// Waits until a member reports itself leader over the etcd API and a put
/// succeeds; returns the leader's address.
async fn wait_ready(cluster: &mut Cluster, system: System, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    let mut last = String::from("no member answered yet");
    loop {
        cluster.check_alive()?;
        check_interrupted()?;
        for ep in cluster.endpoints() {
            let ch = match channel(&ep).await {
                Ok(ch) => ch,
                Err(e) => {
                    last = format!("{ep}: connect: {e}");
                    continue;
                }
            };
            let st = match MaintenanceClient::new(ch.clone())
                .status(StatusRequest {})
                .await
            {
                Ok(s) => s.into_inner(),
                Err(e) => {
                    last = format!("{ep}: status: {:?}: {}", e.code(), e.message());
                    continue;
                }
            };
            let me = st.header.as_ref().map_or(0, |h| h.member_id);
            if st.leader == 0 || st.leader != me {
                last = format!("{ep}: not the leader (leader {})", st.leader);
                continue;
            }
            let put = KvClient::new(ch)
                .put(PutRequest {
                    key: Bytes::from_static(b"bench/ready"),
                    value: Bytes::from_static(b"1"),
                    ..Default::default()
                })
                .await;
            match put {
                Ok(_) => return Ok(ep),
                Err(e) if e.code() == tonic::Code::Unimplemented => bail!(
                    "{} at {ep} does not implement the etcd KV API yet ({}); measure etcd alone with --systems etcd",
                    system.name(),
                    e.message()
                ),
                Err(e) => last = format!("{ep}: put: {:?}: {}", e.code(), e.message()),
            }
        }
        if started.elapsed() > timeout {
            let hint = if system == System::Keel {
                " (does `keel server` serve the etcd API? Each node's config sets etcd_addr)"
            } else {
                ""
            };
            bail!(
                "{} cluster {} not ready within {timeout:?}{hint}; last: {last}",
                system.name(),
                cluster.place()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts every key once (not measured), recording each key's revision.
async fn preload(channels: &[Channel], ctx: &Arc<Ctx>, workers: u64) -> Result<()> {
    let n = ctx.keys.len() as u64;
    let mut tasks = Vec::new();
    for wkr in 0..workers.min(n) {
        let mut client = KvClient::new(channels[(wkr as usize) % channels.len()].clone());
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = wkr;
            while i < n {
                let r = client
                    .put(PutRequest {
                        key: ctx.keys[i as usize].clone(),
                        value: ctx.value.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!("preloading keys: put: {:?}: {}", e.code(), e.message())
                    })?
                    .into_inner();
                if let Some(h) = r.header {
                    ctx.revs[i as usize].fetch_max(h.revision, Ordering::Relaxed);
                }
                i += workers;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("a preload task failed")??;
    }
    Ok(())
}

fn to_run(
    a: &KvArgs,
    system: System,
    w: Workload,
    offered: Option<u64>,
    t: &Tally,
    scheduled: Option<u64>,
) -> Run {
    let ops_per_sec = t.done_during_window as f64 / a.common.duration;
    let lost = scheduled.map_or(0, |s| s.saturating_sub(t.ok_in_window + t.errors_in_window));
    let saturated = match (offered, scheduled) {
        (Some(rate), Some(s)) => {
            ops_per_sec < 0.9 * rate as f64 || (lost + t.errors_in_window) * 100 > s
        }
        _ => false,
    };
    Run {
        system,
        workload: w,
        offered,
        ops_per_sec,
        latency: Percentiles::of(&t.latency),
        errors: t.errors_in_window,
        lost,
        cas_failed: t.cas_failed,
        first_error: t.first_error.clone(),
        saturated,
        cpu_per_op: None,
        steal: None,
        peak_rss: None,
        syncs: None,
    }
}

/// Bytes as whole megabytes (10^6), for the tables.
fn mb(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1e6)
}

fn run_line(r: &Run) -> String {
    let p = &r.latency;
    let what = match r.offered {
        Some(o) => format!("{o:>7} ops/s offered"),
        None => "closed loop".to_string(),
    };
    let mut s = format!(
        "{:<5} {:<21} {:<20} {:>9.0} ops/s  p50 {:>7} p90 {:>7} p99 {:>7} p99.9 {:>7} max {:>8} ms",
        r.system.name(),
        r.workload.name(),
        what,
        r.ops_per_sec,
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max)
    );
    match r.cpu_per_op {
        Some((Some(servers), client)) => s.push_str(&format!(
            "  CPU/op {servers:.0} µs cluster, {client:.0} µs load generator"
        )),
        Some((None, client)) => s.push_str(&format!("  CPU/op {client:.0} µs load generator")),
        None => {}
    }
    if let Some(st) = r.steal {
        s.push_str(&format!(", {:.0}% stolen by the hypervisor", st * 100.0));
    }
    if let Some(b) = r.peak_rss {
        s.push_str(&format!(", peak RSS {} MB", mb(b)));
    }
    if r.workload == Workload::TxnCas && p.count > 0 {
        s.push_str(&format!(
            "  CAS failed {:.1}%",
            r.cas_failed as f64 * 100.0 / p.count as f64
        ));
    }
    if r.errors + r.lost > 0 {
        s.push_str(&format!("  {} errors, {} lost", r.errors, r.lost));
    }
    if let Some(e) = &r.first_error {
        s.push_str(&format!("  (first error: {e})"));
    }
    if r.saturated {
        s.push_str("  SATURATED");
    }
    s
}

/// Starts `system`'s cluster and runs every workload against it.
async fn bench_system(
    a: &KvArgs,
    system: System,
    etcd: Option<&std::path::Path>,
    pb: &ProgressBar,
    runs: &mut Vec<Run>,
) -> Result<()> {
    let external = a.external(system);
    pb.set_message(match external {
        Some(eps) => format!("{}: connecting to {}", system.name(), eps.join(",")),
        None => format!("{}: starting a 3-member cluster", system.name()),
    });
    let mut cluster = match system {
        _ if external.is_some() => Cluster::External(external.unwrap_or_default().to_vec()),
        System::Keel => Cluster::Keel(KeelCluster::start(
            &a.common.dir,
            a.common.keep,
            3,
            "kv",
            &a.durability,
            &a.threads,
            true,
        )?),
        System::Etcd => Cluster::Etcd(EtcdCluster::start(
            etcd.context("etcd binary")?,
            &a.common.dir,
            a.common.keep,
            3,
            a.threads.batch(),
        )?),
    };
    if let Some(dir) = cluster.dir().filter(|d| d.kept()) {
        say(
            pb,
            format!(
                "{}: cluster data and logs in {}",
                system.name(),
                dir.path().display()
            ),
        );
    }
    let leader = wait_ready(&mut cluster, system, Duration::from_secs(30)).await?;
    let endpoints = cluster.endpoints();
    let mut channels = Vec::new();
    for c in 0..a.connections as usize {
        let addr = match a.target {
            Target::Leader => leader.clone(),
            Target::All => endpoints[c % endpoints.len()].clone(),
        };
        channels.push(
            channel(&addr)
                .await
                .with_context(|| format!("{}: connecting to {addr}", system.name()))?,
        );
    }
    pb.set_message(format!("{}: preloading {} keys", system.name(), a.keys));
    let ctx = Arc::new(Ctx::new(a.keys, a.value_size));
    preload(&channels, &ctx, a.connections * a.clients)
        .await
        .with_context(|| system.name())?;
    let mut seed = 0x6b65_656c_u64;
    for &w in &a.workloads {
        pb.set_message(format!("{}: {} closed loop", system.name(), w.name()));
        seed += 1;
        let (t, cpu) = closed_loop(
            a,
            &channels,
            &ctx,
            w,
            seed,
            &cluster.pids(),
            cluster.syncs(),
        )
        .await?;
        cluster.check_alive()?;
        let mut r = to_run(a, system, w, None, &t, None);
        if t.done_during_window > 0 {
            let per_op = |secs: f64| secs * 1e6 / t.done_during_window as f64;
            let servers = (!cluster.pids().is_empty()).then(|| per_op(cpu.servers));
            r.cpu_per_op = Some((servers, per_op(cpu.client)));
        }
        r.steal = cpu.steal;
        r.peak_rss = cpu.peak_rss;
        r.syncs = cpu.syncs.map(|h| (h, t.done_during_window));
        say(pb, run_line(&r));
        pb.inc(1);
        if t.ok_in_window == 0 {
            bail!(
                "{}: no {} request succeeded (first error: {})",
                system.name(),
                w.name(),
                t.first_error.as_deref().unwrap_or("none")
            );
        }
        runs.push(r);
    }
    if !a.no_sweep {
        for &w in &a.workloads {
            for (i, &rate) in a.rates.iter().enumerate() {
                pb.set_message(format!("{}: {} at {rate} ops/s", system.name(), w.name()));
                seed += 1;
                let (t, scheduled) = open_loop(a, &channels, &ctx, w, rate, seed).await?;
                cluster.check_alive()?;
                let r = to_run(a, system, w, Some(rate), &t, Some(scheduled));
                say(pb, run_line(&r));
                pb.inc(1);
                let saturated = r.saturated;
                runs.push(r);
                if saturated {
                    let skipped = (a.rates.len() - i - 1) as u64;
                    pb.set_length(pb.length().unwrap_or(0).saturating_sub(skipped));
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Refuses flag values the run could not honour, before any measuring.
fn validate(a: &KvArgs) -> Result<()> {
    if a.systems.is_empty() || a.workloads.is_empty() {
        bail!("--systems and --workloads each need at least one entry");
    }
    if !a.no_sweep && a.rates.is_empty() {
        bail!("--rates: give at least one rate, or --no-sweep");
    }
    if !(0.0..=600.0).contains(&a.drain) {
        bail!("--drain {}: expected 0 to 600 seconds", a.drain);
    }
    if let Some(s) = a
        .systems
        .iter()
        .enumerate()
        .find_map(|(i, s)| a.systems[..i].contains(s).then_some(s))
    {
        bail!("--systems: {} is listed twice", s.name());
    }
    if let Some(w) = a
        .workloads
        .iter()
        .enumerate()
        .find_map(|(i, w)| a.workloads[..i].contains(w).then_some(w))
    {
        bail!("--workloads: {} is listed twice", w.name());
    }
    if !a.no_sweep {
        if let Some(w) = a.rates.windows(2).find(|w| w[1] <= w[0]) {
            bail!(
                "--rates: {} after {}: list the rates in increasing order, each once (the sweep \
                 stops at the first saturated one)",
                w[1],
                w[0]
            );
        }
        let warm = a.common.warmup().as_nanos() as u64;
        let end = warm + a.common.duration().as_nanos() as u64;
        if let Some(r) = a
            .rates
            .iter()
            .find(|&&r| bursts_due_in(warm, end, 1, r) == 0)
        {
            bail!(
                "--rates {r}: no request falls in the {} s window; raise the rate or --duration",
                a.common.duration
            );
        }
    }
    Ok(())
}

pub fn run(a: KvArgs) -> Result<i32> {
    validate(&a)?;
    if !a.common.no_write {
        a.common.check_out()?;
    }
    for (system, eps) in [
        (System::Keel, &a.keel_endpoints),
        (System::Etcd, &a.etcd_endpoints),
    ] {
        if eps.is_empty() {
            continue;
        }
        if !a.systems.contains(&system) {
            bail!(
                "--{}-endpoints given, but --systems does not include {}",
                system.name().to_lowercase(),
                system.name()
            );
        }
        if let Some(bad) = eps.iter().find(|e| {
            e.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        }) {
            bail!(
                "--{}-endpoints: {bad:?} is not host:port",
                system.name().to_lowercase()
            );
        }
    }
    if a.systems.contains(&System::Keel) && a.external(System::Keel).is_none() {
        check_keel_config(&a.threads, "kv", true)?;
    }
    let etcd = if a.systems.contains(&System::Etcd) && a.external(System::Etcd).is_none() {
        Some(find_etcd(a.etcd.as_deref())?)
    } else {
        None
    };
    let etcd_ver = etcd.as_deref().map(etcd_version);
    if let Some(v) = &etcd_ver {
        println!("{v}");
    }
    if on_memory_fs(&a.common.dir) {
        eprintln!(
            "warning: {} is on tmpfs, where fsync costs nothing. Use --dir on a disk.",
            a.common.dir.display()
        );
    }
    let per_system =
        a.workloads.len() as u64 * (1 + if a.no_sweep { 0 } else { a.rates.len() as u64 });
    let pb = super::progress(per_system * a.systems.len() as u64);
    // One thread drives every connection: on 2 cores shared with the
    // cluster, a multi-threaded runtime's cross-thread wake-ups cost the
    // generator about a third more CPU per request, the same for both
    // systems, which dilutes every ratio the run reports.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut runs = Vec::new();
    // Cluster processes are spawned from this (the main) thread, which
    // block_on keeps: they die with it (PR_SET_PDEATHSIG).
    for &system in &a.systems {
        rt.block_on(bench_system(&a, system, etcd.as_deref(), &pb, &mut runs))?;
    }
    pb.finish_and_clear();
    drop(rt);

    let md = markdown(&a, &runs, etcd_ver.as_deref());
    println!("\n{md}");
    if !a.common.no_write {
        let png = a
            .plot
            .clone()
            .unwrap_or_else(|| report::beside(&a.common.out, "BENCHMARKS-kv.png"));
        let mut body = md;
        if runs.iter().any(|r| r.offered.is_some()) {
            match plot(&png, &a, &runs) {
                Ok(()) => {
                    println!("wrote {}", png.display());
                    let name = png
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    body.push_str(&format!(
                        "\n![etcd API latency vs offered rate, Keel and etcd]({name})\n"
                    ));
                }
                Err(e) => eprintln!("warning: no plot: {e:#}"),
            }
        }
        report::write_section(&a.common.out, "kv", &body)?;
        println!("wrote {}", a.common.out.display());
    }
    Ok(0)
}

fn find(runs: &[Run], s: System, w: Workload, offered: Option<u64>) -> Option<&Run> {
    runs.iter()
        .find(|r| r.system == s && r.workload == w && r.offered == offered)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "—".into(),
    }
}

fn markdown(a: &KvArgs, runs: &[Run], etcd_ver: Option<&str>) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let systems: Vec<String> = a
        .systems
        .iter()
        .map(|&s| match s {
            _ if a.external(s).is_some() => format!(
                "{} = the cluster already running at {} (its CPU and memory not measured)",
                s.name(),
                a.external(s).unwrap_or_default().join(", ")
            ),
            System::Keel => format!(
                "Keel = 3 `keel server --service kv {}` processes{} serving the \
                 etcd API, `{}` durability",
                a.threads.flags(),
                a.threads.settings_note(),
                a.durability
            ),
            System::Etcd => format!(
                "etcd = {}, default settings (fsync on commit){}",
                etcd_ver.unwrap_or("etcd"),
                if a.threads.batch() {
                    ", its processes under the same `SCHED_BATCH` scheduling policy as Keel's \
                     node threads"
                } else {
                    ""
                }
            ),
        })
        .collect();
    let mut s = format!(
        "## Keel vs etcd over the etcd v3 API\n\n\
         `{}` ({} s per run after {} s warm-up, {} cores). \
         One load generator (raw tonic clients of the etcd v3 gRPC API) runs against each system \
         in turn, {}: {}. \
         {} gRPC connections to {}, {} clients per connection; {} \
         keys of {} bytes, preloaded; keys chosen uniformly at random. Workloads: put; range of \
         one key, linearizable and serializable; txn-CAS = `txn` comparing the key's \
         mod_revision with the last one seen, then put (else get). **Closed loop**: each client \
         has one request in flight; ops/s = replies per second during the measured window; \
         latency from send to reply (HdrHistogram). Ratios are Keel / etcd (throughput: higher \
         is better for Keel; p99: lower is).\n\n",
        super::command_line(),
        a.common.duration,
        a.common.warmup,
        cores,
        if a.external(System::Keel).is_some() || a.external(System::Etcd).is_some() {
            "each a cluster given by its endpoints, or a 3-member cluster started on loopback \
             on this machine"
        } else {
            "each a 3-member cluster on loopback on the same machine"
        },
        systems.join("; "),
        a.connections,
        match a.target {
            Target::Leader => "the leader",
            Target::All => "all members round-robin",
        },
        a.clients,
        a.keys,
        a.value_size,
    );
    s.push_str(
        "| workload | Keel ops/s | Keel p50 ms | Keel p99 ms | etcd ops/s | etcd p50 ms | etcd p99 ms | throughput Keel/etcd | p99 Keel/etcd |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let cell = |r: Option<&Run>| -> [String; 3] {
        match r {
            Some(r) => [
                format!("{:.0}", r.ops_per_sec),
                ms(r.latency.p50),
                ms(r.latency.p99),
            ],
            None => ["—".into(), "—".into(), "—".into()],
        }
    };
    for &w in &a.workloads {
        let k = find(runs, System::Keel, w, None);
        let e = find(runs, System::Etcd, w, None);
        let [ko, k50, k99] = cell(k);
        let [eo, e50, e99] = cell(e);
        s.push_str(&format!(
            "| {} | {ko} | {k50} | {k99} | {eo} | {e50} | {e99} | {} | {} |\n",
            w.name(),
            ratio(k.map(|r| r.ops_per_sec), e.map(|r| r.ops_per_sec)),
            ratio(
                k.map(|r| r.latency.p99 as f64),
                e.map(|r| r.latency.p99 as f64)
            ),
        ));
    }
    s.push_str(&cpu_table(a, runs));
    s.push_str(&sync_table(a, runs));
    let problems: Vec<String> = runs
        .iter()
        .filter(|r| r.errors + r.lost > 0)
        .map(|r| {
            format!(
                "{} {} {}: {} errors, {} lost{}",
                r.system.name(),
                r.workload.name(),
                r.offered
                    .map_or("closed loop".into(), |o| format!("at {o} ops/s")),
                r.errors,
                r.lost,
                r.first_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (first: {e})"))
            )
        })
        .collect();
    let cas: Vec<String> = runs
        .iter()
        .filter(|r| r.workload == Workload::TxnCas && r.offered.is_none() && r.latency.count > 0)
        .map(|r| {
            format!(
                "{} {:.1}%",
                r.system.name(),
                r.cas_failed as f64 * 100.0 / r.latency.count as f64
            )
        })
        .collect();
    if !cas.is_empty() {
        s.push_str(&format!(
            "\nCAS compares that failed (a concurrent writer won; the txn still counts): {}.\n",
            cas.join(", ")
        ));
    }
    let sweep: Vec<&Run> = runs.iter().filter(|r| r.offered.is_some()).collect();
    if !sweep.is_empty() {
        s.push_str(&format!(
            "\n**Open loop**: requests scheduled at fixed offered rates (spread over the \
             connections, at most {} in flight per connection); latency from each request's \
             scheduled time, so queueing behind a slow request counts. Each system's sweep stops \
             at its first saturated rate (achieved < 90% of offered, or > 1% errors or lost).\n\n\
             | workload | offered ops/s | Keel achieved | Keel p50 ms | Keel p99 ms | Keel p99.9 ms | etcd achieved | etcd p50 ms | etcd p99 ms | etcd p99.9 ms |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            a.clients
        ));
        for &w in &a.workloads {
            for &rate in &a.rates {
                let k = find(runs, System::Keel, w, Some(rate));
                let e = find(runs, System::Etcd, w, Some(rate));
                if k.is_none() && e.is_none() {
                    continue;
                }
                let cells = |r: Option<&Run>| match r {
                    Some(r) => format!(
                        "{:.0}{} | {} | {} | {}",
                        r.ops_per_sec,
                        if r.saturated { " (saturated)" } else { "" },
                        ms(r.latency.p50),
                        ms(r.latency.p99),
                        ms(r.latency.p999)
                    ),
                    None => "— | — | — | —".into(),
                };
                s.push_str(&format!(
                    "| {} | {rate} | {} | {} |\n",
                    w.name(),
                    cells(k),
                    cells(e)
                ));
            }
        }
    }
    if !problems.is_empty() {
        s.push_str(&format!("\nErrors: {}.\n", problems.join("; ")));
    }
    // Against the targets (issue: put and txn-CAS at least 10x etcd at equal or lower p99).
    let mut targets = Vec::new();
    for w in [Workload::Put, Workload::TxnCas] {
        if let (Some(k), Some(e)) = (
            find(runs, System::Keel, w, None),
            find(runs, System::Etcd, w, None),
        ) {
            let t = k.ops_per_sec / e.ops_per_sec.max(1e-9);
            let p = k.latency.p99 as f64 / (e.latency.p99.max(1)) as f64;
            targets.push(format!(
                "{}: {:.2}x etcd's throughput at {:.2}x its p99 (target: ≥ 10x at ≤ 1x) — {}",
                w.name(),
                t,
                p,
                if t >= 10.0 && p <= 1.0 {
                    "met"
                } else {
                    "not met"
                }
            ));
        }
    }
    if !targets.is_empty() {
        s.push_str(&format!("\nTargets: {}.\n", targets.join("; ")));
    }
    s
}

const KEEL_COLORS: [RGBColor; 2] = [RGBColor(0x64, 0xb5, 0xf6), RGBColor(0x0d, 0x47, 0xa1)];
const ETCD_COLORS: [RGBColor; 2] = [RGBColor(0xff, 0xb7, 0x4d), RGBColor(0xbf, 0x36, 0x0c)];

/// CPU time per request in the closed-loop runs: what each system costs
/// the machine per request, independent of how the shared cores were split
/// between the clusters and the load generator.
fn cpu_table(a: &KvArgs, runs: &[Run]) -> String {
    let cpu = |sys, w| find(runs, sys, w, None).and_then(|r| r.cpu_per_op);
    let steal = |sys, w| find(runs, sys, w, None).and_then(|r| r.steal);
    let rss = |sys, w| find(runs, sys, w, None).and_then(|r| r.peak_rss);
    if a.workloads
        .iter()
        .all(|&w| cpu(System::Keel, w).is_none() && cpu(System::Etcd, w).is_none())
    {
        return String::new();
    }
    let mut s = String::from(
        "\n**CPU per request** (closed loop, measured window): CPU time (user + system, all \
         threads) of the 3 cluster processes, and of the load generator, divided by the \
         requests completed. On shared cores this is the steadier comparison: it says how much \
         machine each system needs per request, however the cores happened to be split. \
         *Stolen* is the share of the machine's time the hypervisor ran something else while \
         its virtual CPUs had work (/proc/stat `steal`) during each system's run: where it \
         differs, so do the conditions the two systems were measured in. *Peak RSS* is the \
         largest member's peak resident memory since it started (VmHWM), read at the end of \
         each workload's window: the workloads run in this order on one cluster per system, \
         so each figure covers the preload and the workloads above it too.\n\n\
         | workload | Keel cluster µs/op | etcd cluster µs/op | etcd/Keel | load generator µs/op (vs Keel) | load generator µs/op (vs etcd) | stolen during Keel / etcd run | peak RSS MB, Keel / etcd |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let us = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));
    let pct = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.0}%", v * 100.0));
    let mem = |v: Option<u64>| v.map_or("—".into(), mb);
    for &w in &a.workloads {
        let (k, e) = (cpu(System::Keel, w), cpu(System::Etcd, w));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |\n",
            w.name(),
            us(k.and_then(|c| c.0)),
            us(e.and_then(|c| c.0)),
            ratio(e.and_then(|c| c.0), k.and_then(|c| c.0)),
            us(k.map(|c| c.1)),
            us(e.map(|c| c.1)),
            pct(steal(System::Keel, w)),
            pct(steal(System::Etcd, w)),
            mem(rss(System::Keel, w)),
            mem(rss(System::Etcd, w)),
        ));
    }
    s
}

/// The members' log fdatasyncs per closed-loop workload that made any.
fn sync_table(a: &KvArgs, runs: &[Run]) -> String {
    let syncs = |sys, w| {
        find(runs, sys, w, None)
            .and_then(|r| r.syncs.as_ref())
            .filter(|(h, _)| h.count > 0)
    };
    let rows: Vec<Workload> = a
        .workloads
        .iter()
        .copied()
        .filter(|&w| syncs(System::Keel, w).is_some() || syncs(System::Etcd, w).is_some())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n**Disk syncs** (closed loop, measured window): the fdatasyncs of the log on all 3 \
         members together, from each member's metrics before and after the window (Keel \
         `keel_log_fsync_seconds`, etcd `etcd_disk_wal_fsync_duration_seconds`). Per 1000 \
         requests: how many requests each sync carried (group commit); the time is what a \
         write waits for on each member it needs. p99 is interpolated within the histograms' \
         buckets (etcd's are 1 ms wide at the bottom, so its p99 is coarse).\n\n\
         | workload | Keel syncs per 1000 requests | Keel mean ms | Keel p99 ms | etcd syncs per 1000 requests | etcd mean ms | etcd p99 ms |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let cells = |v: Option<&(prom::Hist, u64)>| match v {
        Some((h, done)) => [
            prom::per_1000(h, *done).map_or("—".into(), |n| format!("{n:.1}")),
            h.mean().map_or("—".into(), |m| format!("{:.2}", m * 1e3)),
            h.quantile(0.99)
                .map_or("—".into(), |q| format!("{:.2}", q * 1e3)),
        ],
        None => ["—".into(), "—".into(), "—".into()],
    };
    for w in rows {
        let [k1, k2, k3] = cells(syncs(System::Keel, w));
        let [e1, e2, e3] = cells(syncs(System::Etcd, w));
        s.push_str(&format!(
            "| {} | {k1} | {k2} | {k3} | {e1} | {e2} | {e3} |\n",
            w.name()
        ));
    }
    s
}

fn plot(path: &std::path::Path, a: &KvArgs, runs: &[Run]) -> Result<()> {
    let mut panels = Vec::new();
    for &w in &a.workloads {
        let mut series = Vec::new();
        for &sys in &a.systems {
            let pts: Vec<&Run> = runs
                .iter()
                .filter(|r| r.system == sys && r.workload == w && r.offered.is_some())
                .collect();
            let colors = if sys == System::Keel {
                KEEL_COLORS
            } else {
                ETCD_COLORS
            };
            for (i, label) in ["p50", "p99"].into_iter().enumerate() {
                let points = pts
                    .iter()
                    .map(|r| {
                        let ns = if i == 0 { r.latency.p50 } else { r.latency.p99 };
                        (r.offered.unwrap_or(0) as f64, ns as f64 / 1e3)
                    })
                    .collect();
                series.push(Series {
                    label: format!("{} {label}", sys.name()),
                    color: colors[i],
                    width: 2 + i as u32,
                    points,
                });
            }
        }
        panels.push(Panel {
            title: w.name().to_string(),
            series,
        });
    }
    report::plot(
        path,
        "etcd v3 API, 3 members: latency vs offered rate (open loop)",
        "offered rate (ops/s)",
        "latency",
        &panels,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_txn_compares_mod_revision_then_puts_else_reads() {
        let key = Bytes::from_static(b"bench/00000007");
        let t = cas_txn(&key, 42, &Bytes::from_static(b"v"));
        assert_eq!(t.compare.len(), 1);
        let c = &t.compare[0];
        assert_eq!(c.key, key);
        assert_eq!(c.result, compare::CompareResult::Equal as i32);
        assert_eq!(c.target, compare::CompareTarget::Mod as i32);
        assert_eq!(c.target_union, Some(compare::TargetUnion::ModRevision(42)));
        assert!(matches!(
            &t.success[..],
            [RequestOp { request: Some(request_op::Request::RequestPut(p)) }] if p.key == key && &p.value[..] == b"v"
        ));
        assert!(matches!(
            &t.failure[..],
            [RequestOp { request: Some(request_op::Request::RequestRange(r)) }] if r.key == key && !r.serializable
        ));
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: KvArgs,
    }

    fn args(flags: &[&str]) -> KvArgs {
        use clap::Parser as _;
        let argv = std::iter::once("kv").chain(flags.iter().copied());
        Cli::try_parse_from(argv).expect("flags parse").a
    }

    fn closed(system: System, workload: Workload, ops: f64, p99_ms: u64, cpu: f64) -> Run {
        Run {
            system,
            workload,
            offered: None,
            ops_per_sec: ops,
            latency: Percentiles {
                count: 1000,
                p50: p99_ms * 500_000,
                p99: p99_ms * 1_000_000,
                ..Percentiles::default()
            },
            errors: 0,
            lost: 0,
            cas_failed: 10,
            first_error: None,
            saturated: false,
            cpu_per_op: Some((Some(cpu), 20.0)),
            steal: Some(0.0),
            peak_rss: Some(100_000_000),
            syncs: None,
        }
    }

    #[test]
    fn flags_the_run_could_not_honour_are_refused() {
        assert!(validate(&args(&[])).is_ok());
        for (flags, says) in [
            // The sweep stops at the first saturated rate: a lower rate
            // listed after a higher one would be skipped unseen.
            (&["--rates", "10k,1k"][..], "--rates"),
            // A repeated rate, system or workload would show its first
            // run twice in the tables.
            (&["--rates", "1k,1k"][..], "--rates"),
            (&["--systems", "keel,keel"][..], "--systems"),
            (&["--workloads", "put,range,put"][..], "--workloads"),
            // No request would fall in the window: "saturated" with no data.
            (
                &["--rates", "1", "--warmup", "0.2", "--duration", "0.5"][..],
                "--rates",
            ),
            (&["--drain=-1"][..], "--drain"),
        ] {
            let e = validate(&args(flags)).expect_err(&format!("{flags:?}"));
            assert!(e.to_string().contains(says), "{flags:?}: {e}");
        }
        // With --no-sweep the rates are not used.
        assert!(validate(&args(&["--rates", "10k,1k", "--no-sweep"])).is_ok());
    }

    #[test]
    fn ratios_are_keel_over_etcd_and_cpu_etcd_over_keel() {
        let a = args(&["--workloads", "put,txn-cas", "--no-sweep"]);
        let runs = vec![
            closed(System::Keel, Workload::Put, 20_000.0, 2, 50.0),
            closed(System::Keel, Workload::TxnCas, 30_000.0, 1, 40.0),
            closed(System::Etcd, Workload::Put, 8_000.0, 8, 150.0),
            closed(System::Etcd, Workload::TxnCas, 3_000.0, 10, 400.0),
        ];
        let md = markdown(&a, &runs, Some("etcd Version: 3.4.23"));
        // Throughput Keel/etcd 2.50x, p99 Keel/etcd 0.25x.
        assert!(
            md.contains("| put | 20000 | 1.00 | 2.00 | 8000 | 4.00 | 8.00 | 2.50x | 0.25x |"),
            "{md}"
        );
        // CPU per op etcd/Keel: 3.00x.
        assert!(md.contains("| put | 50 | 150 | 3.00x | 20 | 20 |"), "{md}");
        assert!(md.contains("| txn-CAS | 40 | 400 | 10.00x |"), "{md}");
        // The targets: txn-CAS at 10x the throughput and 0.1x the p99 is met, put is not.
        assert!(
            md.contains("put: 2.50x etcd's throughput at 0.25x its p99"),
            "{md}"
        );
        assert!(
            md.contains(
                "txn-CAS: 10.00x etcd's throughput at 0.10x its p99 (target: ≥ 10x at ≤ 1x) — met"
            ),
            "{md}"
        );
        assert!(md.contains("CAS compares that failed (a concurrent writer won; the txn still counts): Keel 1.0%, etcd 1.0%"), "{md}");
        // No etcd run: no ratio.
        assert_eq!(ratio(Some(1.0), None), "—");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "—");
    }

    #[test]
    fn ops_per_sec_is_over_the_window_and_lost_is_what_never_came_back() {
        let a = args(&["--duration", "2"]);
        let mut t = Tally::new();
        let w = (1_000, 3_000);
        for due in [1_000, 1_500, 2_000] {
            t.record(w, due, due + 100, Ok(true));
        }
        t.record(w, 2_900, 3_100, Ok(true)); // done after the window
        t.record(
            w,
            2_950,
            2_960,
            Err(tonic::Status::resource_exhausted("busy")),
        );
        let r = to_run(&a, System::Keel, Workload::Put, Some(3), &t, Some(6));
        assert_eq!(r.ops_per_sec, 1.5, "3 done in the window, over its 2 s");
        assert_eq!((r.errors, r.lost), (1, 1));
        assert!(r.saturated, "2 of 6 errors or lost");
        let r = to_run(&a, System::Keel, Workload::Put, None, &t, None);
        assert_eq!((r.lost, r.saturated), (0, false));
    }

    #[test]
    fn tally_counts_by_due_time_and_completion_time() {
        let mut t = Tally::new();
        let w = (1_000, 2_000);
        t.record(w, 500, 1_500, Ok(true)); // due in warm-up: not in latency, done in window
        t.record(w, 1_200, 1_300, Ok(false)); // a failed CAS, fully in window
        t.record(w, 1_900, 2_500, Ok(true)); // due in window, done after it
        t.record(w, 1_100, 1_150, Err(tonic::Status::unavailable("x")));
        assert_eq!(t.ok_in_window, 2);
        assert_eq!(t.latency.len(), 2);
        assert_eq!(t.cas_failed, 1);
        assert_eq!(t.done_during_window, 2);
        assert_eq!(t.errors_in_window, 1);
        assert!(t.first_error.as_deref().unwrap().contains("Unavailable"));
        // Latency is from the due time: 100 ns and 600 ns.
        assert_eq!(t.latency.min(), 100);
        assert!((599..=601).contains(&t.latency.max()));
    }
}
