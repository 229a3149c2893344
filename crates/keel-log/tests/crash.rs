//! Crash tests with real processes: run `keel-log-torture append` on a data
//! directory, SIGKILL it after a seeded random delay, recover the directory
//! in-process and check that every position the child reported as synced
//! survived, that the recovered log is contiguous and intact, and that it is
//! appendable. The same directory is killed and recovered again and again
//! (restart after restart), with the default segment size and with 64 KiB
//! segments (segment rolls, multi-segment recovery).
//!
//! Every recovery must succeed on its own: a kill in the middle of `write(2)`
//! leaves a torn tail, and the store must cut it. Regression: SIGKILL
//! mid-write leaves a frame cut short after its header.
//!
//! `keel-log-torture soak` runs the same check for as long as you like.
#![cfg(unix)]

use keel_core::rng::Rng;
use keel_core::{Position, Term};
use keel_log::testing::make_entry;
use keel_log::{LogStore, Options};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TORTURE: &str = env!("CARGO_BIN_EXE_keel-log-torture");

#[derive(Default, Debug)]
struct Stats {
    cycles: usize,
    synced_batches: usize,
    torn_tails_cut: usize,
    max_segments: usize,
    max_end: Position,
}

/// Reads complete lines until EOF (a line cut short by the kill is dropped).
fn read_lines(r: impl Read) -> Vec<String> {
    let mut r = BufReader::new(r);
    let (mut lines, mut buf) = (Vec::new(), Vec::new());
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(n) if n > 0 && buf.ends_with(b"\n") => {
                lines.push(String::from_utf8_lossy(&buf[..n - 1]).into_owned())
            }
            _ => return lines,
        }
    }
}

/// Runs the torture binary on `dir` and SIGKILLs it after `delay`; returns
/// its stdout lines. Panics if it ended for any other reason than our kill.
fn run_and_kill(dir: &Path, seed: u64, segment_size: u64, delay: Duration) -> Vec<String> {
    let mut child = Command::new(TORTURE)
        .arg("append")
        .arg(dir)
        .arg(seed.to_string())
        .arg("--segment-size")
        .arg(segment_size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keel-log-torture");
    let started = Instant::now();
    let stdout = child.stdout.take().expect("child stdout");
    let reader = std::thread::spawn(move || read_lines(stdout));
    std::thread::sleep(delay.saturating_sub(started.elapsed()));
    child.kill().expect("kill the child");
    let status = child.wait().expect("wait for the child");
    let lines = reader.join().expect("stdout reader");
    if status.signal() != Some(9) {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!(
            "the append child ended by itself ({status}) before the kill: {}",
            err.trim()
        );
    }
    lines
}

/// Recovers `dir` after a kill and checks it against what the child said
/// was synced and against `floor`, the highest position ever synced in this
/// directory. Then appends one entry, syncs, reopens and checks it is there.
/// Returns the new floor.
fn check_recovery(
    dir: &Path,
    segment_size: u64,
    lines: &[String],
    floor: Position,
    rng: &mut Rng,
    stats: &mut Stats,
) -> Result<Position, String> {
    let mut synced: Vec<(Position, Term)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let parts: Vec<&str> = line.split(' ').collect();
        let nums = match parts.as_slice() {
            [what, p, t] => p
                .parse::<u64>()
                .ok()
                .zip(t.parse::<u64>().ok())
                .map(|v| (*what, v)),
            _ => None,
        };
        match nums {
            Some(("opened", (p, _))) if i == 0 => {
                if p < floor {
                    return Err(format!(
                        "the child recovered to {p}, below the synced position {floor}"
                    ));
                }
            }
            Some(("synced", v)) if i > 0 => synced.push(v),
            _ => return Err(format!("unexpected child output line {i}: {line:?}")),
        }
    }
    if synced.windows(2).any(|w| w[1].0 <= w[0].0) {
        return Err(format!("synced positions do not increase: {synced:?}"));
    }
    let need = synced.last().map_or(floor, |s| s.0.max(floor));
    let opts = Options::with_segment_size(segment_size);
    let o = LogStore::open(dir, opts.clone())
        .map_err(|e| format!("recovery failed after the kill: {e}"))?;
    let mut ends = HashMap::new();
    let mut end = 0;
    for e in &o.entries {
        if e.position != end {
            return Err(format!(
                "recovered entries are not contiguous: entry at {} after one ending at {end}",
                e.position
            ));
        }
        if e.term == 0 || *e != make_entry(e.term, e.position, e.data.len()) {
            return Err(format!(
                "recovered entry at {} has the wrong content (term {}, kind {:?}, {} bytes)",
                e.position,
                e.term,
                e.kind,
                e.data.len()
            ));
        }
        end = e.end();
        ends.insert(end, e.term);
    }
    if o.store.last_pos() != end {
        return Err(format!(
            "the store ends at {} but its entries end at {end}",
            o.store.last_pos()
        ));
    }
    if need > end {
        return Err(format!(
            "synced position {need} was lost: the log recovered to {end}"
        ));
    }
    for &(p, t) in &synced {
        if ends.get(&p) != Some(&t) {
            return Err(format!(
                "no recovered entry of term {t} ends at the synced position {p}"
            ));
        }
    }
    stats.synced_batches += synced.len();
    stats.torn_tails_cut += usize::from(o.torn.is_some());
    stats.max_segments = stats.max_segments.max(o.store.segment_count());
    stats.max_end = stats.max_end.max(end);

    let mut store = o.store;
    let e = make_entry(store.last_term().max(1), end, rng.below(3000) as usize);
    store
        .append(std::slice::from_ref(&e))
        .and_then(|_| store.sync())
        .map_err(|err| format!("appending after recovery: {err}"))?;
    drop(store);
    let o =
        LogStore::open(dir, opts).map_err(|err| format!("reopening after the append: {err}"))?;
    if o.entries.last() != Some(&e) || o.store.last_pos() != e.end() || o.torn.is_some() {
        return Err(format!(
            "the entry appended at {end} after recovery is not there after a reopen"
        ));
    }
    Ok(e.end())
}

/// `dirs` data directories, each killed and recovered `restarts` times.
fn crash_loop(seed: u64, segment_size: u64, dirs: usize, restarts: usize) -> Stats {
    let mut rng = Rng::new(seed);
    let mut stats = Stats::default();
    for d in 0..dirs {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let mut floor = 0;
        for r in 0..restarts {
            let delay = Duration::from_millis(2 + rng.below(49));
            let child_seed = rng.next_u64();
            let lines = run_and_kill(&dir, child_seed, segment_size, delay);
            let checked = check_recovery(&dir, segment_size, &lines, floor, &mut rng, &mut stats);
            floor = match checked {
                Ok(f) => f,
                Err(msg) => panic!(
                    "seed {seed}, segment size {segment_size}, directory {d}, restart {r} \
                     (child seed {child_seed}, delay {delay:?}); data kept in {}: {msg}",
                    tmp.keep().display()
                ),
            };
            stats.cycles += 1;
        }
    }
    eprintln!("segment size {segment_size}: {stats:?}");
    stats
}

#[test]
fn sigkill_restart_recover_default_segments() {
    let segment_size = Options::default().segment_size;
    let stats = crash_loop(0xC0FFEE, segment_size, 5, 40);
    assert_eq!(stats.cycles, 200);
    assert!(stats.synced_batches > 0, "no child ever synced: {stats:?}");
}

#[test]
fn sigkill_restart_recover_64k_segments_roll_and_recover() {
    let stats = crash_loop(0xBADCAB1E, 64 << 10, 5, 40);
    assert_eq!(stats.cycles, 200);
    assert!(stats.synced_batches > 0, "no child ever synced: {stats:?}");
    assert!(
        stats.max_segments > 1,
        "the log never rolled to a second segment: {stats:?}"
    );
}
