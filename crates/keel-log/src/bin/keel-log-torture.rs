//! Crash torture for keel-log with real processes.
//!
//! `append <dir> <seed> [--segment-size N]` opens (and recovers) the log in
//! `dir`, then appends batches forever, syncing after each one and printing
//! `synced <position> <term>` once the batch is durable. The first line is
//! `opened <position> <term>`, printed once recovery is done. Entry data is a
//! function of the entry's position alone (`content`), so a reader can verify
//! every entry without the writer.
//!
//! `soak <dir> --iterations N [--seed S] [--segment-size N]
//! [--restarts-per-dir K]` repeats the crash test N times: run `append` on
//! a data directory, SIGKILL it after a seeded random delay, recover the
//! directory in-process and check that everything reported as synced is
//! there, contiguous and intact, and that the log is appendable. Each data
//! directory is restarted K times (default 25) before the soak moves to a
//! new one, so recovery time stays bounded. Exits non-zero on the first
//! violation, leaving the offending directory in place.
//!
//! `tests/crash.rs` holds the same check (and an identical copy of `Rng`,
//! `content` and `make_entry`); keep them in step.

use keel_core::rng::Rng;
use keel_core::{Position, Term};
use keel_log::testing::make_entry;
use keel_log::{LogStore, Options};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  keel-log-torture append <dir> <seed> [--segment-size N]
  keel-log-torture soak <dir> --iterations N [--seed S] [--segment-size N] [--restarts-per-dir K]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("append") => {
            parse_append(&args[1..]).map(|(dir, seed, opts)| append(&dir, seed, opts))
        }
        Some("soak") => parse_soak(&args[1..]).map(soak),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(format!("unknown mode {other:?}")),
        None => Err("missing mode".to_string()),
    };
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(msg)) => {
            eprintln!("keel-log-torture: {msg}");
            ExitCode::FAILURE
        }
        Err(usage) => {
            eprintln!("keel-log-torture: {usage}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn number(flag: &str, value: Option<&String>) -> Result<u64, String> {
    let v = value.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a non-negative integer"))
}

/// Splits `--flag value` pairs from positional arguments.
fn flags(args: &[String], known: &[&str]) -> Result<(Vec<String>, HashMap<String, u64>), String> {
    let (mut positional, mut values) = (Vec::new(), HashMap::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a.starts_with("--") {
            if !known.contains(&a.as_str()) {
                return Err(format!("unknown option {a}"));
            }
            values.insert(a.clone(), number(a, it.next())?);
        } else {
            positional.push(a.clone());
        }
    }
    Ok((positional, values))
}

fn segment_size(values: &HashMap<String, u64>) -> Result<Option<u64>, String> {
    match values.get("--segment-size") {
        Some(0) => Err("--segment-size must be positive".to_string()),
        v => Ok(v.copied()),
    }
}

fn parse_append(args: &[String]) -> Result<(PathBuf, u64, Options), String> {
    let (pos, values) = flags(args, &["--segment-size"])?;
    let [dir, seed] = pos.as_slice() else {
        return Err("append takes <dir> <seed>".to_string());
    };
    let seed = number("<seed>", Some(seed))?;
    let opts = segment_size(&values)?.map_or_else(Options::default, Options::with_segment_size);
    Ok((PathBuf::from(dir), seed, opts))
}

struct SoakArgs {
    dir: PathBuf,
    iterations: u64,
    seed: u64,
    segment_size: Option<u64>,
    restarts_per_dir: u64,
}

fn parse_soak(args: &[String]) -> Result<SoakArgs, String> {
    let (pos, values) = flags(
        args,
        &[
            "--iterations",
            "--seed",
            "--segment-size",
            "--restarts-per-dir",
        ],
    )?;
    let [dir] = pos.as_slice() else {
        return Err("soak takes one <dir>".to_string());
    };
    let iterations = *values
        .get("--iterations")
        .ok_or("soak needs --iterations N")?;
    let restarts_per_dir = values.get("--restarts-per-dir").copied().unwrap_or(25);
    if restarts_per_dir == 0 {
        return Err("--restarts-per-dir must be positive".to_string());
    }
    Ok(SoakArgs {
        dir: PathBuf::from(dir),
        iterations,
        seed: values.get("--seed").copied().unwrap_or(1),
        segment_size: segment_size(&values)?,
        restarts_per_dir,
    })
}

fn append(dir: &Path, seed: u64, opts: Options) -> Result<(), String> {
    let mut store = LogStore::open(dir, opts)
        .map_err(|e| format!("recovery failed: {e}"))?
        .store;
    let mut out = std::io::stdout().lock();
    let term = store.last_term().max(1);
    let say = |out: &mut std::io::StdoutLock, what: &str, pos: Position| {
        writeln!(out, "{what} {pos} {term}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("writing to stdout: {e}"))
    };
    say(&mut out, "opened", store.last_pos())?;
    let mut rng = Rng::new(seed);
    loop {
        let mut batch = Vec::new();
        let mut pos = store.last_pos();
        for _ in 0..1 + rng.below(20) {
            let e = make_entry(term, pos, rng.below(5000) as usize);
            pos = e.end();
            batch.push(e);
        }
        store
            .append(&batch)
            .and_then(|_| store.sync())
            .map_err(|e| e.to_string())?;
        say(&mut out, "synced", store.last_pos())?;
    }
}

// ---- the crash check (same logic as tests/crash.rs) ----

/// What one kill/recover cycle saw.
#[derive(Default)]
struct Cycle {
    synced_batches: usize,
    recovered_end: Position,
    segments: usize,
    torn: bool,
}

/// Reads complete lines until EOF (a line cut short by the kill is dropped).
fn read_lines(r: impl Read) -> Vec<String> {
    let mut r = BufReader::new(r);
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return lines,
            Ok(_) if buf.ends_with(b"\n") => {
                lines.push(String::from_utf8_lossy(&buf[..buf.len() - 1]).into_owned())
            }
            Ok(_) => return lines,
        }
    }
}

fn killed_by_sigkill(status: &ExitStatus) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status.signal() == Some(9)
    }
    #[cfg(not(unix))]
    {
        !status.success()
    }
}

/// Runs `append` on `dir` and SIGKILLs it after `delay`; returns its stdout
/// lines. An exit for any other reason than the kill is a violation.
fn run_and_kill(
    exe: &Path,
    dir: &Path,
    seed: u64,
    segment_size: u64,
    delay: Duration,
) -> Result<Vec<String>, String> {
    let mut child: Child = Command::new(exe)
        .arg("append")
        .arg(dir)
        .arg(seed.to_string())
        .arg("--segment-size")
        .arg(segment_size.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", exe.display()))?;
    let started = Instant::now();
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let reader = std::thread::spawn(move || read_lines(stdout));
    std::thread::sleep(delay.saturating_sub(started.elapsed()));
    let _ = child.kill();
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the child: {e}"))?;
    let lines = reader.join().map_err(|_| "stdout reader panicked")?;
    if !killed_by_sigkill(&status) {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(format!(
            "the append child ended by itself ({status}) before the kill: {}",
            err.trim()
        ));
    }
    Ok(lines)
}

/// Recovers `dir` after a kill and checks it against what the child said was
/// synced and against `floor` (the highest position ever reported synced in
/// this directory). Then appends one entry, syncs, reopens and checks it is
/// there. Returns the cycle's figures and the new floor.
fn check_recovery(
    dir: &Path,
    segment_size: u64,
    lines: &[String],
    floor: Position,
    rng: &mut Rng,
) -> Result<(Cycle, Position), String> {
    let mut synced: Vec<(Position, Term)> = Vec::new();
    let mut opened = None;
    for (i, line) in lines.iter().enumerate() {
        let parts: Vec<&str> = line.split(' ').collect();
        let parsed = match parts.as_slice() {
            [what, p, t] => p
                .parse::<u64>()
                .ok()
                .zip(t.parse::<u64>().ok())
                .map(|v| (*what, v)),
            _ => None,
        };
        match parsed {
            Some(("opened", (p, _))) if i == 0 => opened = Some(p),
            Some(("synced", v)) if opened.is_some() => synced.push(v),
            _ => return Err(format!("unexpected child output line {i}: {line:?}")),
        }
    }
    if let Some(p) = opened {
        if p < floor {
            return Err(format!(
                "the child recovered to {p}, below the synced position {floor}"
            ));
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
        let want = make_entry(e.term, e.position, e.data.len());
        if e.term == 0 || *e != want {
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
    let cycle = Cycle {
        synced_batches: synced.len(),
        recovered_end: end,
        segments: o.store.segment_count(),
        torn: o.torn.is_some(),
    };
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
    Ok((cycle, e.end()))
}

// ---- soak ----

fn soak(a: SoakArgs) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("creating {}: {e}", a.dir.display()))?;
    let mut rng = Rng::new(a.seed);
    let started = Instant::now();
    let (mut floor, mut run_dir, mut seg) = (0, PathBuf::new(), 0);
    let (mut synced, mut torn, mut max_segments, mut max_end) = (0, 0, 0, 0);
    // Without --segment-size, runs alternate between small (many segments)
    // and default (one segment) sizes.
    let sizes = [64 << 10, Options::default().segment_size];
    let (mut run, mut restarts_left) = (0, 0);
    for i in 0..a.iterations {
        if restarts_left == 0 {
            if i > 0 {
                let _ = std::fs::remove_dir_all(&run_dir); // it passed
            }
            run_dir = a.dir.join(format!("run-{run:05}"));
            let _ = std::fs::remove_dir_all(&run_dir);
            seg = a.segment_size.unwrap_or(sizes[run % sizes.len()]);
            run += 1;
            restarts_left = a.restarts_per_dir;
            floor = 0;
        }
        let delay = Duration::from_millis(2 + rng.below(49));
        let child_seed = rng.next_u64();
        let fail = |msg: String| {
            format!(
                "VIOLATION in iteration {i} (seed {}, child seed {child_seed}, delay {delay:?}, \
                 segment size {seg}) in {}: {msg}",
                a.seed,
                run_dir.display()
            )
        };
        let lines = run_and_kill(&exe, &run_dir, child_seed, seg, delay).map_err(fail)?;
        let (c, f) = check_recovery(&run_dir, seg, &lines, floor, &mut rng).map_err(fail)?;
        floor = f;
        restarts_left -= 1;
        synced += c.synced_batches;
        torn += usize::from(c.torn);
        max_segments = max_segments.max(c.segments);
        max_end = max_end.max(c.recovered_end);
        if (i + 1) % 10 == 0 || i + 1 == a.iterations {
            println!(
                "{}/{} kill/recover cycles ok; {} in {:?}: log end {}, {} segments; \
                 {synced} synced batches, {torn} torn tails cut so far",
                i + 1,
                a.iterations,
                run_dir.display(),
                started.elapsed(),
                c.recovered_end,
                c.segments
            );
        }
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    println!(
        "soak passed: {} kill/recover cycles in {:?}, {synced} synced batches verified, \
         {torn} torn tails cut, largest log {max_end} bytes, most segments {max_segments}",
        a.iterations,
        started.elapsed()
    );
    Ok(())
}
