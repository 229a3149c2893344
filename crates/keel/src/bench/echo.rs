//! `keel bench echo`: latency vs offered rate, Aeron's method, through a
//! 3-node cluster of `keel server --service echo` processes.
//!
//! Each client connection is a pipelined native-protocol connection to the
//! leader: a sender thread writes bursts of requests at their scheduled
//! times (one `write` per burst), a reader thread matches replies to
//! requests by request id. A message's intended send time follows from its
//! id (burst = id / burst size; the schedule is fixed by the start time and
//! the rate), so nothing is shared between the two threads but counters.

use super::cluster::{
    check_keel_config, cpu_seconds, on_memory_fs, peak_rss_bytes, KeelCluster, MachineTicks,
};
use super::pace::{burst_due_ns, bursts_due_in, sleep_until, tighten_timer_slack};
use super::prom;
use super::report::{self, histogram, us, Panel, Percentiles, Series, PERCENTILE_COLORS};
use super::{check_interrupted, parse_rate, say, CommonArgs, NodeThreadArgs};
use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use keel_net::codec::{self, ClientOp, ClientRequest, ClientResult, Frame};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const LONG_ABOUT: &str = "\
Latency vs offered rate through a real 3-node cluster (Aeron's method).

For each durability mode, starts 3 `keel server --service echo` processes on \
loopback in a fresh temporary directory, finds the leader, and offers \
fixed rates of SIZE-byte messages in bursts of BURST over pipelined \
native-protocol connections to the leader. Each rate runs for --warmup then \
--duration seconds. Latency runs from each message's INTENDED send time \
(fixed by the start time and the rate, whatever the cluster does) to its \
reply, so a stall delays and counts every message scheduled behind it (no \
coordinated omission); recorded with HdrHistogram.

Every listed rate is measured. Then, if none of them saturated the cluster \
(achieved rate below 90% of offered, or over 1% of the messages lost or \
refused), the rate grows by --step until one does (or --max-rate).

Writes the table to --out between <!-- echo:start --> and <!-- echo:end --> \
and the plot to BENCHMARKS-echo.png next to it.";

#[derive(Args, Debug)]
pub struct EchoArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Offered rates in messages per second, comma-separated (k and m suffixes allowed).
    #[arg(long, value_delimiter = ',', value_parser = parse_rate, default_value = "1k,10k,50k,100k,200k")]
    rates: Vec<u64>,
    /// After the listed rates, add this many msg/s per step until saturation (0: stop after the list).
    #[arg(long, value_parser = parse_rate_or_zero, default_value = "100k")]
    step: u64,
    /// Never offer more than this many msg/s (a listed rate above it is refused).
    #[arg(long, value_parser = parse_rate, default_value = "2m")]
    max_rate: u64,
    /// Durability modes to measure, each on a fresh cluster.
    #[arg(long, value_delimiter = ',', default_value = "sync,replicated", value_parser = ["sync", "replicated"])]
    modes: Vec<String>,
    #[command(flatten)]
    threads: NodeThreadArgs,
    /// Pipelined client connections to the leader (the rate is split evenly).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    connections: u64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    size: u64,
    /// Messages per burst (one write per burst).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    burst: u64,
    /// Seconds to wait, after a step's schedule ends, for the replies still outstanding.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// The PNG to write (default: BENCHMARKS-echo.png next to --out).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

fn parse_rate_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_rate(s)
    }
}

/// The result of one offered rate.
#[derive(Clone, Debug)]
pub struct Step {
    pub mode: String,
    pub offered: u64,
    /// Replies received within the measured window, per second.
    pub achieved: f64,
    /// Latency from intended send time to reply, messages due in the window.
    pub latency: Percentiles,
    /// How late the sender wrote the bursts due in the window, each burst
    /// counted (client-side lag, included in latency).
    pub send_lag_p99: u64,
    /// Messages due in the window.
    pub scheduled: u64,
    /// Refused (busy, not leader, error) among them.
    pub errors: u64,
    /// Neither answered nor refused by the end of the drain.
    pub lost: u64,
    pub first_error: Option<String>,
    pub saturated: bool,
    /// CPU time of the cluster's processes per reply in the measured
    /// window, in µs.
    pub cpu_per_msg: Option<f64>,
    /// The cluster's and this client's CPU time during the measured window
    /// as a share of all cores' time.
    pub machine_busy: Option<f64>,
    /// The share of the machine's time the hypervisor stole during the
    /// window (its virtual CPUs runnable but not running).
    pub steal: Option<f64>,
    /// The largest node's peak resident memory since it started, at the
    /// window's end, in bytes.
    pub peak_rss: Option<u64>,
    /// The nodes' log fdatasyncs during the window, all together.
    pub syncs: Option<prom::Hist>,
    /// Replies received during the window.
    pub replies: u64,
}

/// Timing of one step, shared by every connection.
#[derive(Clone, Copy)]
struct Plan {
    start: Instant,
    rate: u64,
    burst: u64,
    connections: u64,
    /// Measured window [window_from, window_to) in ns after start.
    window_from: u64,
    window_to: u64,
    /// Give up sending and waiting at start + hard_stop.
    hard_stop: u64,
}

impl Plan {
    /// Due time (ns after start) of this connection's message `id`.
    fn due(&self, conn: u64, id: u64) -> u64 {
        let global_burst = (id / self.burst) * self.connections + conn;
        burst_due_ns(global_burst, self.burst, self.rate)
    }
    fn in_window(&self, ns: u64) -> bool {
        (self.window_from..self.window_to).contains(&ns)
    }

    /// How many of this connection's bursts, from its burst `next` on, are
    /// due by `elapsed` ns (at most `max`, none due at or after the
    /// window's end): the bursts to write now. Records the send lag of
    /// each one due in the measured window: a sender catching up writes
    /// many late bursts at once, and each of them was late.
    fn take_due(
        &self,
        conn: u64,
        next: u64,
        elapsed: u64,
        max: u64,
        lag: &mut Histogram<u64>,
    ) -> u64 {
        let mut bursts = 0;
        while bursts < max {
            let d = self.due(conn, (next + bursts) * self.burst);
            if d >= self.window_to || d > elapsed {
                break;
            }
            if self.in_window(d) {
                lag.saturating_record(elapsed.saturating_sub(d).max(1));
            }
            bursts += 1;
        }
        bursts
    }
}

/// The most bursts one `write` carries when the sender catches up.
const MAX_BURSTS_PER_WRITE: u64 = 64;

#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    sender_done: AtomicBool,
    send_error: std::sync::Mutex<Option<String>>,
}

struct ConnResult {
    latency: Histogram<u64>,
    ok_in_window: u64,
    errors_in_window: u64,
    replies_during_window: u64,
    first_error: Option<String>,
}

/// Sessionless writes (client id 0, `keel_core::SESSIONLESS`): the echo
/// service needs no exactly-once dedup, and sessionless commands skip the
/// session table. The node numbers sessionless writes itself, so the seq
/// sent here is ignored; it is still distinct per message (a high base per
/// connection), which helps when reading a trace.
const SEQ_BASE: u64 = 1 << 62;

fn sender(
    mut stream: TcpStream,
    plan: Plan,
    conn: u64,
    conn_uid: u64,
    payload: Bytes,
    shared: Arc<Shared>,
) -> Histogram<u64> {
    tighten_timer_slack();
    // Bounded blocking, so a leader that stops reading cannot hold the
    // sender past the hard stop.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(50)));
    let mut lag = histogram();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut next_burst = 0u64; // this connection's burst index
    let seq_base = SEQ_BASE | (conn_uid << 36);
    let result: Result<(), String> = (|| loop {
        let due = plan.due(conn, next_burst * plan.burst);
        if due >= plan.window_to {
            return Ok(());
        }
        sleep_until(plan.start + Duration::from_nanos(due));
        let now = Instant::now();
        let elapsed = (now - plan.start).as_nanos() as u64;
        if elapsed >= plan.hard_stop || super::interrupted() {
            return Ok(());
        }
        // Everything due by now goes in one write (catching up if late).
        buf.clear();
        let bursts = plan.take_due(conn, next_burst, elapsed, MAX_BURSTS_PER_WRITE, &mut lag);
        for b in next_burst..next_burst + bursts {
            for k in b * plan.burst..(b + 1) * plan.burst {
                let req = ClientRequest {
                    id: k,
                    client: keel_core::SESSIONLESS,
                    seq: seq_base + k,
                    op: ClientOp::Write(payload.clone()),
                };
                codec::encode(&Frame::Request(req), &mut buf);
            }
        }
        if !write_until(&mut stream, &buf, &plan)? {
            return Ok(()); // the leader stopped reading until the hard stop
        }
        next_burst += bursts;
        shared
            .sent
            .fetch_add(bursts * plan.burst, Ordering::Release);
    })();
    if let Err(e) = result {
        if let Ok(mut slot) = shared.send_error.lock() {
            *slot = Some(e);
        }
    }
    shared.sender_done.store(true, Ordering::Release);
    lag
}

/// Writes all of `buf`, waiting out TCP backpressure; false if the hard
/// stop (or Ctrl-C) came first.
fn write_until(stream: &mut TcpStream, buf: &[u8], plan: &Plan) -> Result<bool, String> {
    let mut off = 0;
    while off < buf.len() {
        match stream.write(&buf[off..]) {
            Ok(0) => return Err("the leader closed the connection".into()),
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                let elapsed = plan.start.elapsed().as_nanos() as u64;
                if elapsed >= plan.hard_stop || super::interrupted() {
                    return Ok(false);
                }
            }
            Err(e) => return Err(format!("sending to the leader: {e}")),
        }
    }
    Ok(true)
}

fn reader(mut stream: TcpStream, plan: Plan, conn: u64, shared: Arc<Shared>) -> ConnResult {
    let mut r = ConnResult {
        latency: histogram(),
        ok_in_window: 0,
        errors_in_window: 0,
        replies_during_window: 0,
        first_error: None,
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut chunk = vec![0u8; 256 * 1024];
    let mut pos = 0usize;
    let mut received = 0u64;
    loop {
        let now = Instant::now();
        let elapsed = (now - plan.start).as_nanos() as u64;
        if shared.sender_done.load(Ordering::Acquire)
            && received >= shared.sent.load(Ordering::Acquire)
        {
            break;
        }
        if elapsed >= plan.hard_stop || super::interrupted() {
            break;
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => {
                r.first_error
                    .get_or_insert_with(|| "the leader closed the connection".into());
                break;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                r.first_error
                    .get_or_insert_with(|| format!("receiving from the leader: {e}"));
                break;
            }
        };
        let at = (Instant::now() - plan.start).as_nanos() as u64;
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match codec::decode(&buf[pos..], codec::DEFAULT_MAX_FRAME) {
                Ok(Some((frame, used))) => {
                    pos += used;
                    let Frame::Response(resp) = frame else {
                        r.first_error
                            .get_or_insert_with(|| "the leader sent a non-response frame".into());
                        continue;
                    };
                    received += 1;
                    let due = plan.due(conn, resp.id);
                    let in_window = plan.in_window(due);
                    match resp.result {
                        ClientResult::Ok(_) => {
                            if in_window {
                                r.latency.saturating_record(at.saturating_sub(due).max(1));
                                r.ok_in_window += 1;
                            }
                            if plan.in_window(at) {
                                r.replies_during_window += 1;
                            }
                        }
                        other => {
                            if in_window {
                                r.errors_in_window += 1;
                            }
                            r.first_error.get_or_insert_with(|| format!("{other:?}"));
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    r.first_error
                        .get_or_insert_with(|| format!("bad frame from the leader: {e}"));
                    return r;
                }
            }
        }
        if pos > 0 && pos * 2 >= buf.len() {
            buf.drain(..pos);
            pos = 0;
        }
    }
    r
}

/// Runs one offered rate against `leader`.
fn run_step(
    a: &EchoArgs,
    mode: &str,
    leader: &str,
    rate: u64,
    conn_uid: &mut u64,
    servers: Vec<u32>,
    metrics: Vec<String>,
) -> Result<Step> {
    let warm = a.common.warmup().as_nanos() as u64;
    let dur = a.common.duration().as_nanos() as u64;
    let drain = Duration::from_secs_f64(a.drain.max(0.0)).as_nanos() as u64;
    let payload = Bytes::from(
        (0..a.size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut streams = Vec::new();
    for _ in 0..a.connections {
        let s = TcpStream::connect(leader).with_context(|| format!("connecting to {leader}"))?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    // Start a little in the future so every thread is up before the first burst.
    let plan = Plan {
        start: Instant::now() + Duration::from_millis(20),
        rate,
        burst: a.burst,
        connections: a.connections,
        window_from: warm,
        window_to: warm + dur,
        hard_stop: warm + dur + drain,
    };
    let cpu = std::thread::Builder::new()
        .name("bench-cpu".into())
        .spawn(move || {
            let at = |ns: u64| {
                let t = plan.start + Duration::from_nanos(ns);
                std::thread::sleep(t.saturating_duration_since(Instant::now()));
                (
                    cpu_seconds(Some(&servers)),
                    cpu_seconds(None),
                    Instant::now(),
                    MachineTicks::now(),
                )
            };
            let syncs = || prom::scrape_sum(&metrics, prom::KEEL_FSYNC);
            let (c0, m0, t0, k0) = at(plan.window_from);
            let h0 = syncs();
            let (c1, m1, t1, k1) = at(plan.window_to);
            let h1 = syncs();
            let steal = k0.zip(k1).and_then(|(k0, k1)| k1.steal_since(&k0));
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let wall = t1.duration_since(t0).as_secs_f64();
            let cluster = (c1 - c0).max(0.0);
            let share = (wall > 0.0).then(|| (cluster + (m1 - m0).max(0.0)) / (wall * cores));
            let syncs = h0.zip(h1).map(|(h0, h1)| h1.since(&h0));
            (cluster, share, steal, peak_rss_bytes(&servers), syncs)
        })?;
    let mut handles = Vec::new();
    for (c, s) in streams.into_iter().enumerate() {
        let c = c as u64;
        let shared = Arc::new(Shared::default());
        let rd = s.try_clone()?;
        let (sh, p) = (shared.clone(), payload.clone());
        let uid = *conn_uid;
        *conn_uid += 1;
        let send = std::thread::Builder::new()
            .name(format!("bench-send-{c}"))
            .spawn(move || sender(s, plan, c, uid, p, sh))?;
        let sh = shared.clone();
        let recv = std::thread::Builder::new()
            .name(format!("bench-recv-{c}"))
            .spawn(move || reader(rd, plan, c, sh))?;
        handles.push((send, recv, shared));
    }
    let mut latency = histogram();
    let mut lag = histogram();
    let (mut ok, mut errors, mut during) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    for (send, recv, shared) in handles {
        let l = send
            .join()
            .map_err(|_| anyhow::anyhow!("a sender thread panicked"))?;
        let r = recv
            .join()
            .map_err(|_| anyhow::anyhow!("a reader thread panicked"))?;
        latency.add(&r.latency).ok();
        lag.add(&l).ok();
        ok += r.ok_in_window;
        errors += r.errors_in_window;
        during += r.replies_during_window;
        let send_error = shared.send_error.lock().ok().and_then(|mut e| e.take());
        first_error = first_error.or(send_error).or(r.first_error);
    }
    let (cpu, machine_busy, steal, peak_rss, syncs) = cpu
        .join()
        .map_err(|_| anyhow::anyhow!("the CPU sampler panicked"))?;
    let scheduled = bursts_due_in(plan.window_from, plan.window_to, a.burst, rate) * a.burst;
    let lost = scheduled.saturating_sub(ok + errors);
    let achieved = during as f64 / a.common.duration;
    let saturated = achieved < 0.9 * rate as f64 || (lost + errors) * 100 > scheduled;
    Ok(Step {
        mode: mode.to_string(),
        offered: rate,
        achieved,
        latency: Percentiles::of(&latency),
        send_lag_p99: if lag.is_empty() {
            0
        } else {
            lag.value_at_quantile(0.99)
        },
        scheduled,
        errors,
        lost,
        first_error,
        saturated,
        cpu_per_msg: (during > 0).then(|| cpu * 1e6 / during as f64),
        machine_busy,
        steal,
        peak_rss,
        syncs,
        replies: during,
    })
}

/// Median round trips of a 200-byte ping-pong over a loopback TCP
/// connection (the unit of the p50 target), measured two ways.
#[derive(Clone, Copy, Debug)]
struct Rtt {
    /// Pings back to back: both threads stay awake (on this VM anywhere
    /// from ~10 µs, when they land on separate vCPUs and keep them, to
    /// ~120 µs).
    back_to_back: u64,
    /// One ping every `gap`, the time between bursts at the lowest offered
    /// rate: both ends sleep in between and every message wakes a thread
    /// from idle, as the cluster's threads are woken at that rate. This is
    /// the round trip the low-rate p50 is compared with.
    paced: u64,
    gap: Duration,
}

fn loopback_rtt(gap: Duration) -> Result<Rtt> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 200];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut b = [7u8; 200];
    let mut ping = |warmup: usize, n: usize, gap: Option<Duration>| -> Result<u64> {
        let mut h = histogram();
        for i in 0..warmup + n {
            if let Some(g) = gap {
                std::thread::sleep(g);
            }
            let t = Instant::now();
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            if i >= warmup {
                h.saturating_record(t.elapsed().as_nanos() as u64);
            }
        }
        Ok(h.value_at_quantile(0.5))
    };
    let back_to_back = ping(500, 2500, None)?;
    let paced = ping(10, 250, Some(gap))?;
    drop(c);
    let _ = server.join();
    Ok(Rtt {
        back_to_back,
        paced,
        gap,
    })
}

fn step_line(s: &Step) -> String {
    let p = &s.latency;
    let mut line = format!(
        "{:<10} {:>8} msg/s offered, {:>9.0} achieved  p50 {:>7} p90 {:>7} p99 {:>7} p99.9 {:>7} p99.99 {:>7} max {:>8} µs  send lag p99 {} µs",
        s.mode,
        s.offered,
        s.achieved,
        us(p.p50),
        us(p.p90),
        us(p.p99),
        us(p.p999),
        us(p.p9999),
        us(p.max),
        us(s.send_lag_p99)
    );
    if let Some(c) = s.cpu_per_msg {
        line.push_str(&format!("  cluster CPU {c:.1} µs/msg"));
    }
    if let Some(b) = s.machine_busy {
        line.push_str(&format!(
            ", cluster + client {:.0}% of the cores",
            b * 100.0
        ));
    }
    if let Some(st) = s.steal {
        line.push_str(&format!(", {:.0}% stolen by the hypervisor", st * 100.0));
    }
    if let Some(b) = s.peak_rss {
        line.push_str(&format!(", peak RSS {:.0} MB", b as f64 / 1e6));
    }
    if s.syncs.is_some() {
        line.push_str(&format!(", log fdatasyncs per 1000 msgs {}", syncs_cell(s)));
    }
    if s.errors + s.lost > 0 {
        line.push_str(&format!(
            "  {} refused, {} lost of {}",
            s.errors, s.lost, s.scheduled
        ));
    }
    if let Some(e) = &s.first_error {
        line.push_str(&format!("  (first problem: {e})"));
    }
    if s.saturated {
        line.push_str("  SATURATED");
    }
    line
}

/// Refuses flag values the run could not honour, before any measuring.
fn validate(a: &EchoArgs) -> Result<()> {
    if a.rates.is_empty() {
        bail!("--rates: give at least one rate");
    }
    if !(0.0..=600.0).contains(&a.drain) {
        bail!("--drain {}: expected 0 to 600 seconds", a.drain);
    }
    if let Some(r) = a.rates.iter().find(|&&r| r > a.max_rate) {
        bail!(
            "--rates {r}: above --max-rate {} (never offered); raise --max-rate or drop the rate",
            a.max_rate
        );
    }
    let warm = a.common.warmup().as_nanos() as u64;
    let dur = a.common.duration().as_nanos() as u64;
    if let Some(r) = a
        .rates
        .iter()
        .find(|&&r| bursts_due_in(warm, warm + dur, a.burst, r) == 0)
    {
        bail!(
            "--rates {r}: no burst of {} falls in the {} s window; raise the rate or --duration",
            a.burst,
            a.common.duration
        );
    }
    Ok(())
}

pub fn run(a: EchoArgs) -> Result<i32> {
    validate(&a)?;
    check_keel_config(&a.threads, "echo", false)?;
    if on_memory_fs(&a.common.dir) {
        eprintln!(
            "warning: {} is on tmpfs, where fsync costs nothing: `sync` will look like `replicated`. Use --dir on a disk.",
            a.common.dir.display()
        );
    }
    if !a.common.no_write {
        a.common.check_out()?;
    }
    // The gap between bursts at the lowest rate, within reason.
    let lowest = a.rates.iter().copied().min().unwrap_or(1000).max(1);
    let gap = Duration::from_secs_f64(a.burst as f64 / lowest as f64)
        .clamp(Duration::from_millis(1), Duration::from_millis(50));
    let rtt = loopback_rtt(gap).context("measuring the loopback round trip")?;
    println!(
        "loopback TCP round trip (200 B ping-pong, median): {} µs with one ping every {:?}, {} µs back to back",
        us(rtt.paced),
        rtt.gap,
        us(rtt.back_to_back)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let planned = a.modes.len() as u64 * a.rates.len() as u64;
    let pb = super::progress(planned);
    let mut steps: Vec<Step> = Vec::new();
    let mut conn_uid = 0u64;
    for mode in &a.modes {
        pb.set_message(format!("{mode}: starting a 3-node echo cluster"));
        let mut cluster = KeelCluster::start(
            &a.common.dir,
            a.common.keep,
            3,
            "echo",
            mode,
            &a.threads,
            false,
        )?;
        if cluster.dir.kept() {
            say(
                &pb,
                format!(
                    "{mode}: cluster data and logs in {}",
                    cluster.dir.path().display()
                ),
            );
        }
        let mut rates = a.rates.clone();
        let mut i = 0;
        let mut done_in_mode = 0;
        while i < rates.len() {
            let rate = rates[i];
            check_interrupted()?;
            let leader = rt
                .block_on(cluster.wait_for_leader(Duration::from_secs(20)))
                .with_context(|| format!("{mode} cluster"))?;
            pb.set_message(format!(
                "{mode}: {rate} msg/s for {}+{} s",
                a.common.warmup, a.common.duration
            ));
            let step = run_step(
                &a,
                mode,
                &leader,
                rate,
                &mut conn_uid,
                cluster.pids(),
                cluster.metrics_addrs(),
            )?;
            cluster.check_alive()?;
            check_interrupted()?;
            say(&pb, step_line(&step));
            pb.inc(1);
            done_in_mode += 1;
            let saturated = step.saturated;
            steps.push(step);
            if saturated && i + 1 >= a.rates.len() {
                break; // searching past the list: found the saturation point
            }
            let any_saturated = steps.iter().any(|x| &x.mode == mode && x.saturated);
            if i + 1 == rates.len() && a.step > 0 && !any_saturated {
                let next = rate.saturating_add(a.step);
                if next <= a.max_rate {
                    rates.push(next);
                    pb.inc_length(1);
                }
            }
            i += 1;
        }
        if done_in_mode > 0 && !steps.iter().any(|x| &x.mode == mode && x.saturated) {
            let why = if a.step == 0 {
                "--step 0"
            } else {
                "--max-rate"
            };
            say(
                &pb,
                format!(
                    "{mode}: not saturated up to {} msg/s (stopped by {why})",
                    rates[rates.len() - 1]
                ),
            );
        }
    }
    pb.finish_and_clear();

    let md = markdown(&a, &steps, rtt);
    println!("\n{md}");
    if !a.common.no_write {
        let png = a
            .plot
            .clone()
            .unwrap_or_else(|| report::beside(&a.common.out, "BENCHMARKS-echo.png"));
        let plotted = match plot(&png, &a, &steps) {
            Ok(()) => {
                println!("wrote {}", png.display());
                true
            }
            Err(e) => {
                eprintln!("warning: no plot: {e:#}");
                false
            }
        };
        let mut body = md;
        if plotted {
            let name = png
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            body.push_str(&format!(
                "\n![echo latency percentiles vs offered rate]({name})\n"
            ));
        }
        report::write_section(&a.common.out, "echo", &body)?;
        println!("wrote {}", a.common.out.display());
    }
    Ok(0)
}

/// A baseline step whose own tail is far above its median was most likely
/// disturbed (a stall of the machine, not of the cluster's steady state),
/// which flatters a ratio against it: says so. (On this VM a quiet 1k msg/s
/// step's p99 is 2–5x its p50; one hit by a 118 ms stall measured 73x.)
fn disturbed_baseline(low: &Step) -> Option<String> {
    let spread = low.latency.p99 as f64 / low.latency.p50.max(1) as f64;
    (spread > DISTURBED_SPREAD).then(|| {
        format!(
            " (but the {} msg/s step's own p99 is {spread:.0}x its p50: a disturbed baseline, \
             rerun before reading the ratio)",
            low.offered
        )
    })
}

/// See `disturbed_baseline`.
const DISTURBED_SPREAD: f64 = 10.0;

/// The nodes' fdatasyncs per 1000 replies in the window, and their mean
/// time in ms: "52.1 (0.41)".
fn syncs_cell(s: &Step) -> String {
    match &s.syncs {
        Some(h) if h.count > 0 => format!(
            "{:.1} ({:.2})",
            prom::per_1000(h, s.replies).unwrap_or(0.0),
            h.mean().unwrap_or(0.0) * 1e3
        ),
        Some(_) => "0".into(),
        None => "—".into(),
    }
}

fn markdown(a: &EchoArgs, steps: &[Step], rtt: Rtt) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut s = format!(
        "## Echo: latency vs offered rate (Aeron method)\n\n\
         `{}` ({} s per rate after {} s warm-up, {} cores). \
         3 `keel server --service echo {}` processes{} on loopback; {} pipelined native-protocol \
         connection(s) to the leader send {}-byte sessionless writes in bursts of {} (one `write` \
         per burst) at each fixed offered rate. Latency runs from each message's intended send time \
         (fixed by the start time and the rate, so a stall counts against every message scheduled \
         behind it: no coordinated omission) to its reply, and is recorded with HdrHistogram. \
         Achieved = replies received during the measured window per second; *send lag* is how late \
         the client itself wrote each burst due in the window (included in the latency). Every listed rate is measured; if \
         none saturated the cluster (achieved < 90% of offered, or > 1% refused or lost), rates grow \
         past the list until one does. The cluster and the \
         client share the machine's cores. *Cluster CPU* is the CPU time (user + system, all \
         threads) of the three server processes per reply in the window; *cluster + client CPU* is \
         the CPU time of those processes and of the client together as a share of all cores' \
         time: near 100% the tails are the scheduler's. *Stolen* is the share of the machine's \
         time the hypervisor ran something else while its virtual CPUs had work (/proc/stat \
         `steal`): on a shared virtual machine it is a hidden third party in every tail. *Log \
         fdatasyncs* are the three nodes' syncs of their logs in the window (from their \
         `keel_log_fsync_seconds` metrics) per 1000 replies, with their mean time: in `sync` a \
         write waits for them, in `replicated` a background thread makes them. Loopback TCP round trip (200 B ping-pong, \
         median): {} µs with one ping every {:?} (the time between bursts at the lowest rate: every message wakes a \
         sleeping thread, as at that rate; the unit of the p50 target), {} µs back to back.\n\n",
        super::command_line(),
        a.common.duration,
        a.common.warmup,
        cores,
        a.threads.flags(),
        a.threads.settings_note(),
        a.connections,
        a.size,
        a.burst,
        us(rtt.paced),
        rtt.gap,
        us(rtt.back_to_back),
    );
    s.push_str(
        "| durability | offered msg/s | achieved msg/s | p50 µs | p90 µs | p99 µs | p99.9 µs | p99.99 µs | max µs | send lag p99 µs | refused + lost | cluster CPU µs/msg | cluster + client CPU, share of the cores | stolen by the hypervisor | log fdatasyncs per 1000 msgs (mean ms) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for st in steps {
        let p = &st.latency;
        s.push_str(&format!(
            "| {} | {} | {:.0}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            st.mode,
            st.offered,
            st.achieved,
            if st.saturated { " (saturated)" } else { "" },
            us(p.p50),
            us(p.p90),
            us(p.p99),
            us(p.p999),
            us(p.p9999),
            us(p.max),
            us(st.send_lag_p99),
            st.errors + st.lost,
            st.cpu_per_msg.map_or("—".into(), |c| format!("{c:.1}")),
            st.machine_busy
                .map_or("—".into(), |b| format!("{:.0}%", b * 100.0)),
            st.steal
                .map_or("—".into(), |b| format!("{:.0}%", b * 100.0)),
            syncs_cell(st),
        ));
    }
    s.push('\n');
    for mode in &a.modes {
        let ms: Vec<&Step> = steps.iter().filter(|x| &x.mode == mode).collect();
        let Some(low) = ms.iter().find(|x| !x.saturated) else {
            continue;
        };
        let trips = low.latency.p50 as f64 / rtt.paced.max(1) as f64;
        let mut line = format!(
            "- **{mode}**: p50 at {} msg/s = {} µs = {:.1} loopback round trips paced like the load ({:.1} back-to-back ones) (target ≤ 4) — {}",
            low.offered,
            us(low.latency.p50),
            trips,
            low.latency.p50 as f64 / rtt.back_to_back.max(1) as f64,
            if trips <= 4.0 { "met" } else { "not met" }
        );
        match ms.iter().find(|x| x.offered == 200_000) {
            Some(high) if high.saturated => line.push_str(
                "; 200k msg/s saturates the cluster (target: p99 at 200k within 2x of p99 at 1k) — not met",
            ),
            Some(high) => {
                let ratio = high.latency.p99 as f64 / low.latency.p99.max(1) as f64;
                line.push_str(&format!(
                    "; p99 at 200k / p99 at {} = {:.1}x (target ≤ 2x) — {}",
                    low.offered,
                    ratio,
                    if ratio <= 2.0 { "met" } else { "not met" }
                ));
                if let Some(warning) = disturbed_baseline(low) {
                    line.push_str(&warning);
                }
            }
            None => {}
        }
        match ms.iter().find(|x| x.saturated) {
            Some(sat) => line.push_str(&format!(
                "; first saturated at {} msg/s offered ({:.0} achieved)",
                sat.offered, sat.achieved
            )),
            None => line.push_str(&format!(
                "; not saturated up to {} msg/s",
                ms.last().map_or(0, |x| x.offered)
            )),
        }
        // VmHWM only grows: its value after the last rate below the first
        // saturated one is the peak up to there (a saturated rate's backlog
        // comes after).
        let sustained = ms.iter().take_while(|x| !x.saturated);
        if let Some((rate, b)) = sustained
            .filter_map(|x| Some((x.offered, x.peak_rss?)))
            .last()
        {
            line.push_str(&format!(
                "; peak resident memory of the largest node up to {rate} msg/s {:.0} MB",
                b as f64 / 1e6
            ));
        }
        s.push_str(&line);
        s.push_str(".\n");
    }
    s
}

fn plot(path: &std::path::Path, a: &EchoArgs, steps: &[Step]) -> Result<()> {
    let panels: Vec<Panel> = a
        .modes
        .iter()
        .map(|mode| {
            let ms: Vec<&Step> = steps.iter().filter(|x| &x.mode == mode).collect();
            let series = (0..6)
                .map(|i| Series {
                    label: ms
                        .first()
                        .map_or("", |x| x.latency.labelled()[i].0)
                        .to_string(),
                    color: PERCENTILE_COLORS[i],
                    width: if i == 2 { 3 } else { 2 },
                    points: ms
                        .iter()
                        .map(|x| (x.offered as f64, x.latency.labelled()[i].1 as f64 / 1e3))
                        .collect(),
                })
                .collect();
            Panel {
                title: format!("{mode} durability"),
                series,
            }
        })
        .collect();
    report::plot(
        path,
        "Keel echo, 3 nodes: latency percentiles vs offered rate",
        "offered rate (msg/s)",
        "latency",
        &panels,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_at_1k(p50: u64, p99: u64) -> Step {
        Step {
            mode: "replicated".into(),
            offered: 1000,
            achieved: 1000.0,
            latency: Percentiles {
                count: 5000,
                p50,
                p99,
                ..Percentiles::default()
            },
            send_lag_p99: 0,
            scheduled: 5000,
            errors: 0,
            lost: 0,
            first_error: None,
            saturated: false,
            cpu_per_msg: None,
            machine_busy: None,
            steal: None,
            peak_rss: None,
            syncs: None,
            replies: 5000,
        }
    }

    #[test]
    fn a_baseline_with_a_stall_in_its_tail_is_called_disturbed() {
        // The run that read "met": p50 1.14 ms, p99 83 ms at 1k msg/s.
        let w = disturbed_baseline(&step_at_1k(1_140_000, 83_362_000)).expect("disturbed");
        assert!(w.contains("73x its p50"), "{w}");
        // A quiet one: p99 3.9x its p50.
        assert_eq!(disturbed_baseline(&step_at_1k(908_000, 3_568_000)), None);
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: EchoArgs,
    }

    fn args(flags: &[&str]) -> EchoArgs {
        use clap::Parser as _;
        let argv = std::iter::once("echo").chain(flags.iter().copied());
        Cli::try_parse_from(argv).expect("flags parse").a
    }

    #[test]
    fn flags_the_run_could_not_honour_are_refused() {
        assert!(validate(&args(&[])).is_ok());
        assert!(validate(&args(&["--rates", "1k,200k", "--max-rate", "200k"])).is_ok());
        // "Never offer more than --max-rate": a listed rate above it is
        // refused, not measured.
        let e = validate(&args(&["--rates", "1k,300k", "--max-rate", "200k"]))
            .expect_err("a rate above --max-rate");
        assert!(e.to_string().contains("--max-rate"), "{e}");
        let e = validate(&args(&["--drain=-1"])).expect_err("negative drain");
        assert!(e.to_string().contains("--drain"), "{e}");
        // A rate whose schedule puts no burst in the measured window would
        // measure nothing and be called saturated.
        let e = validate(&args(&["--rates", "1", "--duration", "5"]))
            .expect_err("no burst in the window");
        assert!(e.to_string().contains("--rates"), "{e}");
        assert!(validate(&args(&["--rates", "4", "--duration", "5"])).is_ok());
    }

    #[test]
    fn send_lag_counts_every_late_burst_in_the_window() {
        // 100k msg/s in bursts of 20: a burst every 200 µs; window 1-100 ms.
        let plan = Plan {
            start: Instant::now(),
            rate: 100_000,
            burst: 20,
            connections: 1,
            window_from: 1_000_000,
            window_to: 100_000_000,
            hard_stop: 200_000_000,
        };
        // On time: one burst, no lag (recorded as 1 ns).
        let mut lag = histogram();
        assert_eq!(plan.take_due(0, 10, 2_000_000, 64, &mut lag), 1);
        assert_eq!((lag.len(), lag.max()), (1, 1));
        // 1 ms late at burst 20 (due at 4 ms): the six bursts due from 4.0
        // to 5.0 ms go in one write, 1000, 800, ..., 0 µs late. Each is a
        // late burst: recording only the first would make a stall that
        // delays many bursts weigh as much as one late burst.
        let mut lag = histogram();
        assert_eq!(plan.take_due(0, 20, 5_000_000, 64, &mut lag), 6);
        assert_eq!(lag.len(), 6, "one lag per burst written");
        let p50 = lag.value_at_quantile(0.5);
        assert!((399_000..=401_000).contains(&p50), "{p50}");
        assert!((999_000..=1_001_000).contains(&lag.max()));
        // At most `max` bursts per write; the rest follow in the next one.
        let mut lag = histogram();
        assert_eq!(plan.take_due(0, 20, 5_000_000, 4, &mut lag), 4);
        assert_eq!(lag.len(), 4);
        // Warm-up bursts are sent but their lag is not the window's.
        let mut lag = histogram();
        assert_eq!(plan.take_due(0, 0, 900_000, 64, &mut lag), 5);
        assert_eq!(lag.len(), 0, "bursts due in the warm-up are not recorded");
        // Nothing due at or after the window's end is sent.
        let mut lag = histogram();
        assert_eq!(plan.take_due(0, 499, 150_000_000, 64, &mut lag), 1);
        assert_eq!(lag.len(), 1);
    }

    #[test]
    fn connections_interleave_the_global_schedule() {
        let plan = Plan {
            start: Instant::now(),
            rate: 1000,
            burst: 20,
            connections: 2,
            window_from: 0,
            window_to: 10_000_000_000,
            hard_stop: 10_000_000_000,
        };
        // Global bursts every 20 ms alternate between the two connections.
        assert_eq!(plan.due(0, 0), 0);
        assert_eq!(plan.due(1, 0), 20_000_000);
        assert_eq!(plan.due(0, 19), 0, "the whole burst shares one due time");
        assert_eq!(plan.due(0, 20), 40_000_000);
        assert_eq!(plan.due(1, 20), 60_000_000);
        // Over both connections, every global burst is used exactly once.
        let mut dues: Vec<u64> = (0..2)
            .flat_map(|c| (0..50).map(move |b| plan.due(c, b * 20)))
            .collect();
        dues.sort_unstable();
        let want: Vec<u64> = (0..100).map(|g| burst_due_ns(g, 20, 1000)).collect();
        assert_eq!(dues, want);
    }
}
