//! Append throughput of the durable log through the storage thread (group
//! commit), for 64 B, 200 B and 4 KiB entries in both durability modes, next
//! to the raw write+fdatasync rate of the same disk with the same bytes per
//! sync, measured in the same run. Writes its table into BENCHMARKS.md.
//!
//! Run: `cargo bench -p keel-log --bench append` (KEEL_BENCH_SECS sets the
//! seconds per row, default 2; KEEL_BENCH_DIR the directory, default a
//! temporary one under ./target).

use bytes::Bytes;
use keel_core::{Entry, EntryKind};
use keel_log::{Durability, LogStore, Options, StorageEvent, StorageThread};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

struct Row {
    size: usize,
    mode: Durability,
    entries_per_s: f64,
    mb_per_s: f64,
    bytes_per_sync: f64,
    raw_mb_per_s: f64,
}

fn bench_dir() -> std::path::PathBuf {
    let base = std::env::var_os("KEEL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/bench-append"
            ))
        });
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("create bench dir");
    base
}

fn keel(size: usize, mode: Durability, secs: f64) -> (f64, f64, f64) {
    let dir = bench_dir();
    let store = LogStore::open(&dir, Options::default())
        .expect("open")
        .store;
    let durable = Arc::new(AtomicU64::new(0));
    let reports = Arc::new(AtomicU64::new(0));
    let (d, r) = (durable.clone(), reports.clone());
    let t = StorageThread::spawn(store, mode, move |ev| match ev {
        StorageEvent::Durable { position, .. } => {
            d.store(position, Ordering::Release);
            r.fetch_add(1, Ordering::Relaxed);
        }
        StorageEvent::Failed(e) => panic!("storage failed: {e}"),
        StorageEvent::SnapshotPublished { .. }
        | StorageEvent::Slow { .. }
        | StorageEvent::Synced { .. }
        | StorageEvent::Warning(_) => {}
    })
    .expect("spawn");
    let payload = Bytes::from(vec![0xA5u8; size]);
    let mut pos = 0u64;
    let mut count = 0u64;
    let window = 8u64 << 20;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        if pos - durable.load(Ordering::Acquire) > window {
            std::thread::yield_now();
            continue;
        }
        let mut batch = Vec::with_capacity(64);
        for _ in 0..64 {
            let e = Entry {
                term: 1,
                position: pos,
                timestamp: count,
                kind: EntryKind::Command {
                    client: 1,
                    seq: count,
                },
                data: payload.clone(),
            };
            pos = e.end();
            count += 1;
            batch.push(e);
        }
        // `replicated` mode writes on this thread and returns the end.
        if let Some((end, _)) = t.append(batch).expect("append") {
            durable.store(end, Ordering::Release);
            reports.fetch_add(1, Ordering::Relaxed);
        }
    }
    t.barrier().expect("barrier");
    let elapsed = start.elapsed().as_secs_f64();
    t.shutdown().expect("shutdown");
    let syncs = reports.load(Ordering::Relaxed).max(1);
    (
        count as f64 / elapsed,
        pos as f64 / elapsed / 1e6,
        pos as f64 / syncs as f64,
    )
}

fn raw(bytes_per_sync: usize, secs: f64) -> f64 {
    let dir = bench_dir();
    let mut f = std::fs::File::create(dir.join("raw")).expect("create");
    let buf = vec![0x5Au8; bytes_per_sync.max(1)];
    let start = Instant::now();
    let mut written = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f.write_all(&buf).expect("write");
        f.sync_data().expect("fdatasync");
        written += buf.len() as u64;
    }
    written as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let secs: f64 = std::env::var("KEEL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let mut rows = Vec::new();
    for size in [64usize, 200, 4096] {
        for mode in [Durability::Sync, Durability::Replicated] {
            let (eps, mbps, bps) = keel(size, mode, secs);
            let raw_mbps = raw(bps as usize, secs);
            println!(
                "{size:>5} B {mode:?}: {eps:>10.0} entries/s {mbps:>8.1} MB/s ({bps:.0} B/batch); raw write+fdatasync of {bps:.0} B: {raw_mbps:.1} MB/s"
            );
            rows.push(Row {
                size,
                mode,
                entries_per_s: eps,
                mb_per_s: mbps,
                bytes_per_sync: bps,
                raw_mb_per_s: raw_mbps,
            });
        }
    }
    let _ = std::fs::remove_dir_all(bench_dir());
    let mut table = format!(
        "## Durable log append throughput\n\n\
         `cargo bench -p keel-log --bench append` ({secs} s per row). One producer appends batches \
         of 64 entries to the storage thread (at most 8 MiB unsynced in flight); the thread writes \
         each queued batch and, in `sync` mode, fdatasyncs once per batch (group commit). `raw` is \
         a plain write+fdatasync loop on the same disk with the same bytes per sync, run right \
         after; the ratio is Keel MB/s over raw MB/s (`replicated` mode syncs in the background, \
         so it can exceed 1).\n\n\
         | entry data | mode | entries/s | MB/s | bytes per batch | raw write+fdatasync MB/s (same bytes per sync) | ratio |\n\
         |---:|---|---:|---:|---:|---:|---:|\n"
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} B | {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.2} |\n",
            r.size,
            if r.mode == Durability::Sync {
                "sync"
            } else {
                "replicated"
            },
            r.entries_per_s,
            r.mb_per_s,
            r.bytes_per_sync,
            r.raw_mb_per_s,
            r.mb_per_s / r.raw_mb_per_s
        ));
    }
    write_section("storage", &table);
}

/// Replaces (or appends) this bench's section of BENCHMARKS.md.
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
        _ => format!("{}\n\n{}\n", current.trim_end(), block),
    };
    std::fs::write(path, next).unwrap_or_else(|e| panic!("could not write {path}: {e}"));
    println!("wrote {path}");
}
