//! Consensus alone, in one process: 3 nodes of `keel-core`, no network, an
//! in-memory log that is durable as soon as it is appended (as in openraft's
//! `benchmarks/minimal`), N concurrent clients each with one small write in
//! flight. Reports writes/s and p50/p99 commit latency (propose → applied on
//! the leader → reply) and writes the table into BENCHMARKS.md.
//!
//! Run: `cargo bench -p keel-sim --bench consensus` (env KEEL_BENCH_SECS sets
//! the seconds per client count, default 3).

use bytes::Bytes;
use hdrhistogram::Histogram;
use keel_core::*;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A service that only counts: the bench measures consensus, not a store.
#[derive(Default)]
struct Sink(u64);

impl Service for Sink {
    fn restore(&mut self, s: Option<&[u8]>) -> Result<(), String> {
        self.0 = match s {
            Some(b) => {
                u64::from_le_bytes(b.try_into().map_err(|_| "bad sink snapshot".to_string())?)
            }
            None => 0,
        };
        Ok(())
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_le_bytes());
    }
    fn on_message(&mut self, _ctx: &mut Context<'_>, _c: ClientId, _d: &[u8]) -> Bytes {
        self.0 += 1;
        Bytes::new()
    }
    fn query(&self, _d: &[u8]) -> Bytes {
        Bytes::new()
    }
}

struct Row {
    clients: usize,
    writes: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
}

fn run(clients: usize, duration: Duration) -> Row {
    let start = Instant::now();
    let now = |s: &Instant| s.elapsed().as_nanos() as Nanos + 1_000_000_000;
    let membership = Membership::new([1, 2, 3]);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut c = Config::new(id, 1);
            c.max_batch_bytes = 1 << 20;
            c.max_inflight_bytes = 64 << 20;
            Node::new(c, membership.clone(), 0)
        })
        .collect();
    let mut hosts: Vec<ServiceHost<Sink>> = (0..3)
        .map(|_| ServiceHost::new(Sink::default(), u64::MAX / 4))
        .collect();
    let mut queues: Vec<VecDeque<Event>> = vec![VecDeque::new(); 3];
    let mut out = Vec::new();
    let mut apply_out = ApplyOutput::default();
    let mut in_flight: Vec<Option<Instant>> = vec![None; clients];
    let mut seqs = vec![0u64; clients];
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    let mut writes = 0u64;
    let mut last_snapshot = [0u64; 3];
    let payload = Bytes::from_static(b"0123456789abcdef");
    queues[0].push_back(Event::Tick);
    let warmup = Duration::from_millis(300);
    let mut measuring_since: Option<Instant> = None;
    loop {
        let leader = nodes.iter().position(Node::is_leader);
        if let Some(l) = leader {
            if nodes[l].commit_position() > 0 {
                if measuring_since.is_none() && start.elapsed() > warmup {
                    measuring_since = Some(Instant::now());
                    hist.reset();
                    writes = 0;
                }
                if measuring_since.is_some_and(|t| t.elapsed() >= duration) {
                    break;
                }
                let t = Instant::now();
                let mut batch = Vec::new();
                for c in 0..clients {
                    if in_flight[c].is_none() {
                        in_flight[c] = Some(t);
                        seqs[c] += 1;
                        batch.push(Proposal {
                            id: c as u64,
                            client: c as u64 + 1,
                            seq: seqs[c],
                            data: payload.clone(),
                        });
                    }
                }
                if !batch.is_empty() {
                    queues[l].push_back(Event::Propose(batch));
                }
            }
        }
        let mut idle = true;
        for i in 0..3 {
            while let Some(ev) = queues[i].pop_front() {
                idle = false;
                nodes[i].step(now(&start), ev, &mut out);
                for a in out.drain(..) {
                    match a {
                        Action::Send(m) => queues[(m.to - 1) as usize].push_back(Event::Message(m)),
                        Action::Append(es) => {
                            if let Some(e) = es.last() {
                                queues[i].push_back(Event::Durable {
                                    position: e.end(),
                                    term: e.term,
                                });
                            }
                        }
                        Action::Apply(es) => {
                            hosts[i].apply(&es, &mut apply_out);
                            if nodes[i].is_leader() {
                                let done = Instant::now();
                                for (client, _, _) in apply_out.replies.drain(..) {
                                    let c = (client - 1) as usize;
                                    if let Some(t) = in_flight[c].take() {
                                        writes += 1;
                                        let _ = hist.record((done - t).as_nanos().max(1) as u64);
                                    }
                                }
                            }
                            apply_out.clear();
                            let applied = hosts[i].applied();
                            queues[i].push_back(Event::Applied {
                                position: applied,
                                timers: Vec::new(),
                            });
                            if applied - last_snapshot[i] > 64 << 20 {
                                last_snapshot[i] = applied;
                                // Serialized as a runtime would (the
                                // file itself is not written here).
                                drop(hosts[i].snapshot());
                                queues[i].push_back(Event::SnapshotTaken { position: applied });
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        if idle && leader.is_none() {
            // Election: let time pass on node 1 until it leads.
            queues[0].push_back(Event::Tick);
        }
    }
    let secs = measuring_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Row {
        clients,
        writes,
        secs,
        p50_us: hist.value_at_quantile(0.50) as f64 / 1e3,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1e3,
    }
}

fn main() {
    let secs: u64 = std::env::var("KEEL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // openraft benchmarks/minimal, measured on this machine (DESIGN.md).
    let openraft = [
        (1usize, 15_200.0),
        (64, 308_000.0),
        (256, 618_000.0),
        (1024, f64::NAN),
    ];
    let mut rows = Vec::new();
    for (clients, reference) in openraft {
        let r = run(clients, Duration::from_secs(secs));
        let rate = r.writes as f64 / r.secs;
        let ratio = if reference.is_nan() {
            "—".to_string()
        } else {
            format!("{:.1}x", rate / reference)
        };
        let reference = if reference.is_nan() {
            "not measured".to_string()
        } else {
            format!("{:.0}", reference)
        };
        println!(
            "{:>5} clients: {:>10.0} writes/s  p50 {:>8.1} µs  p99 {:>8.1} µs  (openraft minimal: {reference}, ratio {ratio})",
            r.clients, rate, r.p50_us, r.p99_us
        );
        rows.push(format!(
            "| {} | {:.0} | {:.1} | {:.1} | {} | {} |",
            r.clients, rate, r.p50_us, r.p99_us, reference, ratio
        ));
    }
    let table = format!(
        "## Consensus alone, in one process\n\n\
         `cargo bench -p keel-sim --bench consensus` ({secs} s per row after 0.3 s warm-up). \
         3 nodes of keel-core driven by one thread, no network, an in-memory log durable on \
         append (as openraft's `benchmarks/minimal`), each client with one 16-byte write in \
         flight; latency is propose → applied on the leader → reply, measured with HdrHistogram. \
         openraft figures are DESIGN.md's, measured on this machine class.\n\n\
         | clients | writes/s | p50 µs | p99 µs | openraft minimal writes/s | ratio |\n\
         |---:|---:|---:|---:|---:|---:|\n{}\n",
        rows.join("\n")
    );
    write_section("consensus", &table);
}

/// Replaces (or appends) the section between this bench's markers in
/// BENCHMARKS.md at the workspace root, leaving other sections alone.
fn write_section(name: &str, body: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../BENCHMARKS.md");
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\n".to_string());
    let block = format!("{start}\n{body}{end}");
    let next = match (current.find(&start), current.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{}{}", &current[..a], block, &current[b + end.len()..])
        }
        _ => format!("{}\n{}\n", current.trim_end(), block),
    };
    if let Err(e) = std::fs::write(path, next) {
        eprintln!("could not write {path}: {e}");
        std::process::exit(1);
    }
    println!("wrote {path}");
}
