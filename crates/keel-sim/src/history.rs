//! Client histories of fault-injection ("nemesis") tests that run real
//! nodes in real time (`keel-node`'s in-process one, `keel`'s over
//! processes): each request as a client made it, whether it goes into the
//! history the linearizability checker sees, the answers counted by kind,
//! and the verdict with its evidence when the check fails.
//!
//! Unlike the simulator's, these runs are not deterministic (threads, real
//! time); the seed only fixes their random choices, so a failure prints
//! everything needed to read it.

use crate::linearizability::{check, CheckResult, KvInput, KvOutput, Operation};
use keel_core::rng::Rng;
use std::collections::BTreeMap;

/// One request as a client made it, whether or not it is in the history.
#[derive(Clone, Debug)]
pub struct Record {
    pub op: Operation,
    /// The node it was sent to.
    pub node: u64,
    /// The answer, as text for the evidence.
    pub answer: String,
    /// In the history (else left out: refused, or a read not served).
    pub kept: bool,
}

/// Answers by kind ("put ok", "cas not-leader", "get error: ...").
pub type Counts = BTreeMap<String, u64>;

pub fn count(counts: &mut Counts, what: String) {
    *counts.entry(what).or_default() += 1;
}

/// Adds `from`'s counts to `into`'s.
fn add_counts(into: &mut Counts, from: Counts) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}

/// Key `k` of the model as the tests store it: `k{k}`.
pub fn key_bytes(k: u64) -> bytes::Bytes {
    bytes::Bytes::from(format!("k{k}"))
}

/// Value `v` of the model as the tests store it: its decimal digits.
pub fn value_bytes(v: u64) -> bytes::Bytes {
    bytes::Bytes::from(v.to_string())
}

/// A stored value back as the model's (`value_bytes`); panics on anything
/// else: the tests only ever write those.
pub fn parse_value(b: &[u8]) -> u64 {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a value this test never wrote: {b:?}"))
}

/// Nanoseconds since `start`, the histories' clock.
pub fn elapsed_ns(start: std::time::Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

/// What a client last saw at each key (absent: nothing yet), for its
/// compare-and-swaps.
pub type LastSeen = BTreeMap<u64, Option<u64>>;

/// A random request on one of `keys` keys: a put of a fresh value
/// (`next_value`) `put_percent` of the time, a read `get_percent`, else a
/// compare-and-swap from what this client last saw there to a fresh value.
pub fn random_input(
    rng: &mut Rng,
    keys: u64,
    (put_percent, get_percent): (u64, u64),
    mut next_value: impl FnMut() -> u64,
    last_seen: &LastSeen,
) -> KvInput {
    let key = rng.below(keys);
    let roll = rng.below(100);
    if roll < put_percent {
        KvInput::Put {
            key,
            value: next_value(),
        }
    } else if roll < put_percent + get_percent {
        KvInput::Get { key }
    } else {
        KvInput::Cas {
            key,
            expected: last_seen.get(&key).copied().flatten(),
            new: next_value(),
        }
    }
}

/// The clients' records and answers, put together.
pub fn gather(clients: impl IntoIterator<Item = (Vec<Record>, Counts)>) -> (Vec<Record>, Counts) {
    let mut records = Vec::new();
    let mut counts = Counts::new();
    for (r, c) in clients {
        records.extend(r);
        add_counts(&mut counts, c);
    }
    (records, counts)
}

fn print_counts(title: &str, counts: &Counts) {
    println!("{title}");
    for (k, v) in counts {
        println!("  {v:>6}  {k}");
    }
}

/// A message with its numbers blanked, to count messages by kind.
pub fn error_kind(msg: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in msg.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

/// A test's seed: the environment variable `var` if set (to rerun a
/// failure), else a fresh one from the clock and process id.
pub fn seed_from_env(var: &str) -> u64 {
    if let Some(s) = std::env::var(var).ok().and_then(|s| s.trim().parse().ok()) {
        return s;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::new(t ^ (u64::from(std::process::id()) << 32)).next_u64() % 1_000_000_000
}

/// The environment variable `var` as a number, else `default`.
pub fn u64_from_env(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// An operation by `client` of `input`, called at `call` and answered
/// `output` (`None`: unknown) at `ret` (ns since the run's start).
pub fn operation(
    client: u64,
    input: KvInput,
    output: Option<KvOutput>,
    call: u64,
    ret: u64,
) -> Operation {
    Operation {
        client,
        input,
        output,
        call,
        ret: Some(ret),
    }
}

/// How a cluster served again after a run's final heal (`liveness`).
#[derive(Debug, Default)]
pub struct Liveness {
    /// The node that took the first acknowledged write, and how long
    /// after the heal.
    pub final_write: Option<(u64, std::time::Duration)>,
    /// (Node, key) pairs no linearizable read was served for in time.
    pub unserved: Vec<(u64, u64)>,
    /// From the heal to the last read.
    pub took: std::time::Duration,
    /// Every request made, for the history.
    pub records: Vec<Record>,
}

/// After a run's final heal: a put of a fresh value (`next_value`) to key
/// 0 through each of `nodes` in turn until one is acknowledged, then a
/// linearizable read of each of `keys` keys through every node, each tried
/// until served; all until `deadline`, with `retry_pause` between tries.
/// `request(node, input)` makes and records one request.
pub fn liveness(
    nodes: &[u64],
    keys: u64,
    deadline: std::time::Instant,
    retry_pause: std::time::Duration,
    mut next_value: impl FnMut() -> u64,
    mut request: impl FnMut(u64, KvInput) -> Record,
) -> Liveness {
    let healed = std::time::Instant::now();
    let mut l = Liveness::default();
    let mut attempt = 0;
    while l.final_write.is_none() && std::time::Instant::now() < deadline {
        let node = nodes[attempt % nodes.len()];
        attempt += 1;
        let input = KvInput::Put {
            key: 0,
            value: next_value(),
        };
        let r = request(node, input);
        if r.op.output.is_some() {
            l.final_write = Some((node, healed.elapsed()));
        } else {
            std::thread::sleep(retry_pause);
        }
        l.records.push(r);
    }
    for &node in nodes {
        for key in 0..keys {
            let mut served = false;
            while !served && std::time::Instant::now() < deadline {
                let r = request(node, KvInput::Get { key });
                served = r.op.output.is_some();
                l.records.push(r);
                if !served {
                    std::thread::sleep(retry_pause);
                }
            }
            if !served {
                l.unserved.push((node, key));
            }
        }
    }
    l.took = healed.elapsed();
    l
}

/// Prints a run's answers (during the load, `counts`, and after the final
/// heal, `live`'s `final_counts`), the nemesis's actions counted and its
/// log.
pub fn print_run(
    load_ms: u128,
    counts: &Counts,
    live: &Liveness,
    final_counts: &Counts,
    nemesis_counts: &Counts,
    nemesis_log: &[String],
) {
    println!("load {load_ms} ms");
    print_counts("answers during the load:", counts);
    print_counts(
        &format!(
            "after the final heal: final write {:?}, every read served in {:?}; answers:",
            live.final_write, live.took
        ),
        final_counts,
    );
    print_counts("nemesis actions:", nemesis_counts);
    println!("nemesis log:");
    for l in nemesis_log {
        println!("  {l}");
    }
}

/// A range of milliseconds from the environment variable `var` (`LO-HI`,
/// LO below HI), else `default`: a nemesis's pause between two actions.
pub fn range_from_env(var: &str, default: (u64, u64)) -> (u64, u64) {
    std::env::var(var)
        .ok()
        .and_then(|s| {
            let (lo, hi) = s.trim().split_once('-')?;
            Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
        })
        .filter(|(lo, hi)| lo < hi)
        .unwrap_or(default)
}

/// What the history held, for the report and the test's own minimums.
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    /// Writes and compare-and-swaps answered with an outcome.
    pub acked_writes: u64,
    /// Writes of unknown outcome (in the history as such).
    pub unknown_writes: u64,
    /// Reads served.
    pub reads: u64,
}

/// Prints what `records` hold and checks their history (the records
/// `kept`) for linearizability, panicking with the evidence (every request
/// on the failing key, and reads of values no write in the history made)
/// if there is none or the search ran out of budget, after printing
/// `more_evidence()` (the nodes' states, say). `rerun` goes into the panic
/// message: how to run the same choices again.
pub fn check_records(
    records: &[Record],
    rerun: &str,
    more_evidence: impl FnOnce() -> String,
) -> Served {
    let history: Vec<Operation> = records
        .iter()
        .filter(|r| r.kept)
        .map(|r| r.op.clone())
        .collect();
    let is_read = |o: &&Operation| matches!(o.input, KvInput::Get { .. });
    let served = Served {
        acked_writes: history
            .iter()
            .filter(|o| !is_read(o) && o.output.is_some())
            .count() as u64,
        unknown_writes: history.iter().filter(|o| o.output.is_none()).count() as u64,
        reads: history.iter().filter(is_read).count() as u64,
    };
    println!(
        "{} requests, {} in the history ({} acknowledged writes, {} of unknown outcome, {} reads)",
        records.len(),
        history.len(),
        served.acked_writes,
        served.unknown_writes,
        served.reads
    );
    let checked = std::time::Instant::now();
    let verdict = check(&history);
    println!(
        "checked {} ops in {:?}: {}",
        history.len(),
        checked.elapsed(),
        match &verdict {
            CheckResult::Linearizable => "linearizable".to_string(),
            CheckResult::NotLinearizable { key, .. } => format!("NOT linearizable on k{key}"),
            CheckResult::Unknown { key } => format!("search budget exhausted on k{key}"),
        }
    );
    match verdict {
        CheckResult::Linearizable => served,
        CheckResult::NotLinearizable { key, ops } => {
            print_key(records, key);
            print_suspects(records, key);
            println!("{}", more_evidence());
            panic!(
                "NOT LINEARIZABLE: key k{key} ({} ops in the history; every request on it \
                 printed above, in call order) ({rerun})",
                ops.len()
            );
        }
        CheckResult::Unknown { key } => {
            println!("{}", more_evidence());
            panic!(
                "the checker ran out of its search budget on key k{key}: the history is too \
             large or too concurrent to check, which proves nothing either way ({rerun})"
            )
        }
    }
}

fn key_of(input: &KvInput) -> u64 {
    match *input {
        KvInput::Put { key, .. } | KvInput::Get { key } | KvInput::Cas { key, .. } => key,
    }
}

/// Every request on `key`, in call order, for a failure's evidence.
fn print_key(records: &[Record], key: u64) {
    let mut on_key: Vec<&Record> = records
        .iter()
        .filter(|r| key_of(&r.op.input) == key)
        .collect();
    on_key.sort_by_key(|r| r.op.call);
    println!(
        "every request on k{key} (times in ms since the start; [out] = left out of the history):"
    );
    for r in on_key {
        println!(
            "  {:>10.3} .. {:>10.3}  client {} node {}  {:?}  ->  {:?}  {}{}",
            r.op.call as f64 / 1e6,
            r.op.ret.unwrap_or(0) as f64 / 1e6,
            r.op.client,
            r.node,
            r.op.input,
            r.op.output,
            r.answer,
            if r.kept { "" } else { "  [out]" }
        );
    }
}

/// The clearest evidence, when there is some: reads on `key` that saw a
/// value whose write is not in the history as one that took effect (it
/// was refused, or never made), with that write's record.
fn print_suspects(records: &[Record], key: u64) {
    let written = |v: u64| {
        records.iter().find(|r| match r.op.input {
            KvInput::Put { value, .. } | KvInput::Cas { new: value, .. } => value == v,
            KvInput::Get { .. } => false,
        })
    };
    for r in records.iter().filter(|r| r.kept) {
        let (KvInput::Get { key: k }, Some(KvOutput::Get(Some(v)))) = (&r.op.input, &r.op.output)
        else {
            continue;
        };
        if *k != key {
            continue;
        }
        match written(*v) {
            Some(w) if w.kept && w.op.output != Some(KvOutput::Cas(false)) => {}
            w => println!(
                "SUSPECT: client {} read {v} through node {} at {:.3} ms; its write: {}",
                r.op.client,
                r.node,
                r.op.call as f64 / 1e6,
                match w {
                    Some(w) => format!(
                        "client {} node {} {:?} called at {:.3} ms, answered {} at {:.3} ms{}",
                        w.op.client,
                        w.node,
                        w.op.input,
                        w.op.call as f64 / 1e6,
                        w.answer,
                        w.op.ret.unwrap_or(0) as f64 / 1e6,
                        if w.kept { "" } else { " [out]" }
                    ),
                    None => "none made".to_string(),
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, input: KvInput, output: Option<KvOutput>, call: u64, ret: u64) -> Record {
        Record {
            op: operation(client, input, output, call, ret),
            node: 1,
            answer: String::new(),
            kept: true,
        }
    }

    #[test]
    fn error_kinds_blank_numbers() {
        assert_eq!(error_kind("node 12 at 3.5 s"), "node # at #.# s");
    }

    #[test]
    fn a_linearizable_history_is_counted() {
        let mut refused = op(2, KvInput::Put { key: 0, value: 9 }, None, 0, 1);
        refused.kept = false;
        let records = vec![
            op(
                1,
                KvInput::Put { key: 0, value: 1 },
                Some(KvOutput::PutOk),
                0,
                10,
            ),
            op(
                2,
                KvInput::Get { key: 0 },
                Some(KvOutput::Get(Some(1))),
                20,
                30,
            ),
            op(1, KvInput::Put { key: 0, value: 2 }, None, 40, 50),
            refused,
        ];
        let s = check_records(&records, "test", String::new);
        assert_eq!((s.acked_writes, s.unknown_writes, s.reads), (1, 1, 1));
    }

    #[test]
    #[should_panic(expected = "NOT LINEARIZABLE: key k0")]
    fn a_read_of_a_refused_write_fails() {
        let mut refused = op(2, KvInput::Put { key: 0, value: 9 }, None, 0, 1);
        refused.kept = false;
        let records = vec![
            refused,
            op(
                1,
                KvInput::Get { key: 0 },
                Some(KvOutput::Get(Some(9))),
                20,
                30,
            ),
        ];
        check_records(&records, "test", String::new);
    }
}
