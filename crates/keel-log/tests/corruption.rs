//! Corruption tests: build a real data directory (several segments, in some
//! variants a hard state and a snapshot), damage a copy of it in one seeded
//! random way per case, and check what `LogStore::open` makes of it against
//! the storage rules:
//!
//! - it never panics;
//! - a cut in the last segment (at a frame boundary, inside a header, or
//!   inside a body after an intact header) is a torn tail: recovery keeps
//!   exactly the entries that fully fit before the cut, reports the cut frame
//!   as the `TornTail`, and the store is appendable;
//! - any other damage (a flipped byte anywhere, a cut in a sealed segment, a
//!   missing segment, a damaged hard state, manifest or snapshot) refuses to
//!   open with `LogError::Corrupt` naming the file and the offset.
//!
//! Entry data is random but never contains a zero byte, so a flipped byte
//! (which never produces a zero either) cannot pass for an unwritten sector.

use bytes::Bytes;
use keel_core::rng::Rng;
use keel_core::{Entry, EntryKind, HardState, Membership, Position, Snapshot, SnapshotMeta, Term};
use keel_log::meta::{self, HardStateFile};
use keel_log::{LogError, LogStore, Options, TornTail};
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use tempfile::TempDir;

const SEGMENT_SIZE: u64 = 8 << 10;
const ENTRIES: usize = 300;
const CASES: u64 = 300;
const HEADER_LEN: u64 = keel_core::ENTRY_HEADER_LEN;

fn opts() -> Options {
    Options::with_segment_size(SEGMENT_SIZE)
}

/// Random bytes, none of them zero.
fn nonzero_bytes(rng: &mut Rng, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|_| rng.range(1, 256) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Segments only.
    Plain,
    /// Hard state, and a snapshot installed with `LogStore::install_snapshot`
    /// (which deletes the segments it covers).
    InstalledSnapshot,
    /// Hard state, and a snapshot saved with `meta::save_snapshot` (the log
    /// keeps every segment).
    SavedSnapshot,
}

const VARIANTS: [Variant; 3] = [
    Variant::Plain,
    Variant::InstalledSnapshot,
    Variant::SavedSnapshot,
];

struct Segment {
    name: String,
    base: Position,
    len: u64,
}

/// A pristine data directory and what it holds.
struct Base {
    dir: TempDir,
    /// Every entry ever appended (also those below the snapshot).
    all: Vec<Entry>,
    snapshot: Option<Snapshot>,
    hard_state: Option<HardStateFile>,
    segments: Vec<Segment>,
    meta_files: Vec<String>,
}

impl Base {
    fn snap_pos(&self) -> Position {
        self.snapshot.as_ref().map_or(0, |s| s.meta.position)
    }
    /// What a clean open returns: the entries at or after the snapshot.
    fn recoverable(&self, upto: Position) -> Vec<Entry> {
        self.all
            .iter()
            .filter(|e| e.position >= self.snap_pos() && e.end() <= upto)
            .cloned()
            .collect()
    }
    /// The entry whose frame holds the byte at `pos`.
    fn frame_at(&self, pos: Position) -> &Entry {
        let i = self.all.partition_point(|e| e.end() <= pos);
        &self.all[i]
    }
    fn copy(&self) -> TempDir {
        let to = tempfile::tempdir().expect("tempdir");
        for f in fs::read_dir(self.dir.path()).expect("list base") {
            let f = f.expect("list base");
            fs::copy(f.path(), to.path().join(f.file_name())).expect("copy");
        }
        to
    }
}

fn build(variant: Variant, seed: u64) -> Base {
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), opts()).expect("open").store;
    let mut all: Vec<Entry> = Vec::new();
    let mut term = 1;
    while all.len() < ENTRIES {
        let mut batch = Vec::new();
        for _ in 0..rng.range(1, 11) {
            if rng.below(30) == 0 {
                term += 1;
            }
            let position = batch.last().or(all.last()).map_or(0, Entry::end);
            let len = rng.range(1, 400) as usize;
            batch.push(Entry {
                term,
                position,
                timestamp: position / 2,
                kind: EntryKind::Command {
                    client: 7,
                    seq: (all.len() + batch.len()) as u64,
                },
                data: nonzero_bytes(&mut rng, len),
            });
        }
        store.append(&batch).expect("append");
        store.sync().expect("sync");
        all.extend(batch);
    }
    let (mut snapshot, mut hard_state) = (None, None);
    if variant != Variant::Plain {
        let hs = HardStateFile {
            hard_state: HardState {
                term,
                voted_for: Some(2),
                hold: 0,
            },
            membership: Membership::new([1, 2, 3]),
        };
        meta::save_hard_state(dir.path(), &hs).expect("save hard state");
        hard_state = Some(hs);
        let at = &all[if variant == Variant::InstalledSnapshot {
            ENTRIES * 2 / 5
        } else {
            ENTRIES * 3 / 5
        }];
        let s = Snapshot {
            meta: SnapshotMeta {
                position: at.end(),
                term: at.term,
                timestamp: at.timestamp,
                membership: Membership::new([1, 2, 3]),
            },
            data: nonzero_bytes(&mut rng, 700),
        };
        if variant == Variant::InstalledSnapshot {
            store.install_snapshot(&s).expect("install snapshot");
        } else {
            meta::save_snapshot(dir.path(), &s).expect("save snapshot");
        }
        snapshot = Some(s);
    }
    drop(store);

    let mut segments = Vec::new();
    let mut meta_files = Vec::new();
    for f in fs::read_dir(dir.path()).expect("list") {
        let f = f.expect("list");
        let name = f.file_name().to_string_lossy().into_owned();
        let len = f.metadata().expect("metadata").len();
        match name.strip_suffix(".seg") {
            Some(stem) => segments.push(Segment {
                base: stem.parse().expect("segment name"),
                name,
                len,
            }),
            // Holds no data (the holder's pid; never read on open).
            None if name == keel_log::lock::LOCK_FILE => {}
            None => meta_files.push(name),
        }
    }
    segments.sort_by_key(|s| s.base);
    meta_files.sort();
    let base = Base {
        dir,
        all,
        snapshot,
        hard_state,
        segments,
        meta_files,
    };
    assert!(
        base.segments.len() >= 4,
        "{variant:?}: only {} segments",
        base.segments.len()
    );
    // The pristine directory recovers exactly.
    let copy = base.copy();
    let o = LogStore::open(copy.path(), opts()).expect("open the pristine copy");
    let end = base.all.last().map_or(0, Entry::end);
    assert_eq!(o.entries, base.recoverable(end), "{variant:?}");
    assert_eq!(o.snapshot, base.snapshot, "{variant:?}");
    assert_eq!(o.hard_state, base.hard_state, "{variant:?}");
    assert!(o.torn.is_none());
    base
}

#[derive(Debug)]
enum Damage {
    Flip { file: String, offset: u64, xor: u8 },
    Truncate { file: String, len: u64 },
    Delete { file: String },
}

#[derive(Debug, PartialEq)]
enum Expect {
    /// Opens, with exactly these entries, end and torn tail.
    Recover {
        entries: Vec<Entry>,
        last_pos: Position,
        torn: Option<(String, u64, u64)>,
    },
    /// Refuses with `Corrupt` naming this file and offset.
    Refuse { file: String, offset: u64 },
}

struct Case {
    damage: Damage,
    expect: Expect,
}

impl Case {
    /// The last segment is cut inside a frame's body, after an intact header
    /// (what a crash in the middle of `write(2)` leaves): a torn tail.
    fn cuts_last_segment_in_a_body(&self) -> bool {
        matches!(
            (&self.damage, &self.expect),
            (
                Damage::Truncate { .. },
                Expect::Recover {
                    torn: Some((_, _, discarded)),
                    ..
                },
            ) if *discarded >= HEADER_LEN
        )
    }
}

/// Draws one damage to `base` and works out what recovery must do.
fn draw(base: &Base, rng: &mut Rng) -> Case {
    let segs = &base.segments;
    let last = segs.len() - 1;
    let pick_segment = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            last
        } else {
            rng.below(segs.len() as u64) as usize
        }
    };
    let kind = rng.below(10);
    let kind = match kind {
        9 if base.meta_files.is_empty() => 4,
        k => k,
    };
    match kind {
        // A flipped byte in a segment.
        0..=3 => {
            let s = &segs[pick_segment(rng)];
            let offset = rng.below(s.len);
            let byte = fs::read(base.dir.path().join(&s.name)).expect("read")[offset as usize];
            let xor = loop {
                let x = rng.range(1, 256) as u8;
                if x != byte {
                    break x; // the result is never zero
                }
            };
            let frame = base.frame_at(s.base + offset);
            Case {
                damage: Damage::Flip {
                    file: s.name.clone(),
                    offset,
                    xor,
                },
                expect: Expect::Refuse {
                    file: s.name.clone(),
                    offset: frame.position - s.base,
                },
            }
        }
        // A segment cut short: at a frame boundary, inside a header, or
        // anywhere.
        4..=7 => {
            let i = pick_segment(rng);
            let s = &segs[i];
            let starts: Vec<Position> = base
                .all
                .iter()
                .map(|e| e.position)
                .filter(|&p| p >= s.base && p < s.base + s.len)
                .collect();
            let start = starts[rng.below(starts.len() as u64) as usize] - s.base;
            let len = match rng.below(4) {
                0 => start,
                1 => (start + rng.range(1, HEADER_LEN)).min(s.len - 1),
                _ => rng.below(s.len),
            };
            let cut = s.base + len;
            let frame = base.frame_at(cut);
            let at_boundary = frame.position == cut;
            let expect = if i == last {
                // A torn tail wherever the cut falls in the frame (header or
                // body): the cut frame is discarded whole.
                let kept = frame.position;
                let torn = (!at_boundary).then(|| {
                    let off = frame.position - s.base;
                    (s.name.clone(), off, len - off)
                });
                Expect::Recover {
                    entries: base.recoverable(kept),
                    last_pos: kept.max(base.snap_pos()),
                    torn,
                }
            } else if at_boundary {
                // The sealed segment now ends early at a frame boundary: the
                // store reports the gap at the start of the next segment.
                Expect::Refuse {
                    file: segs[i + 1].name.clone(),
                    offset: 0,
                }
            } else {
                Expect::Refuse {
                    file: s.name.clone(),
                    offset: frame.position - s.base,
                }
            };
            Case {
                damage: Damage::Truncate {
                    file: s.name.clone(),
                    len,
                },
                expect,
            }
        }
        // A missing middle segment: reported at the start of the next one.
        8 => {
            let i = rng.range(1, last as u64) as usize;
            Case {
                damage: Damage::Delete {
                    file: segs[i].name.clone(),
                },
                expect: Expect::Refuse {
                    file: segs[i + 1].name.clone(),
                    offset: 0,
                },
            }
        }
        // A damaged hard state, manifest or snapshot file: magic (offset 0)
        // or checksum (offset of the checksum) mismatch.
        _ => {
            let file = base.meta_files[rng.below(base.meta_files.len() as u64) as usize].clone();
            let size = fs::metadata(base.dir.path().join(&file))
                .expect("metadata")
                .len();
            if rng.below(2) == 0 {
                let offset = rng.below(size);
                let xor = rng.range(1, 256) as u8;
                let at = if offset < 4 { 0 } else { size - 4 };
                Case {
                    damage: Damage::Flip {
                        file: file.clone(),
                        offset,
                        xor,
                    },
                    expect: Expect::Refuse { file, offset: at },
                }
            } else {
                let len = rng.below(size);
                let at = if len < 8 { 0 } else { len - 4 };
                Case {
                    damage: Damage::Truncate {
                        file: file.clone(),
                        len,
                    },
                    expect: Expect::Refuse { file, offset: at },
                }
            }
        }
    }
}

fn apply(dir: &Path, d: &Damage) {
    match d {
        Damage::Flip { file, offset, xor } => {
            let path = dir.join(file);
            let mut b = fs::read(&path).expect("read");
            b[*offset as usize] ^= xor;
            fs::write(&path, b).expect("write");
        }
        Damage::Truncate { file, len } => fs::OpenOptions::new()
            .write(true)
            .open(dir.join(file))
            .and_then(|f| f.set_len(*len))
            .expect("truncate"),
        Damage::Delete { file } => fs::remove_file(dir.join(file)).expect("delete"),
    }
}

/// Opens the damaged copy and checks the outcome; `Err` describes a mismatch.
fn check(base: &Base, case: &Case) -> Result<(), String> {
    let copy = base.copy();
    let dir = copy.path();
    apply(dir, &case.damage);
    let opened = catch_unwind(AssertUnwindSafe(|| LogStore::open(dir, opts())))
        .map_err(|_| "LogStore::open panicked".to_string())?;
    match (&case.expect, opened) {
        (Expect::Refuse { file, offset }, Err(e)) => {
            let msg = e.to_string();
            let want = dir.join(file);
            match &e {
                LogError::Corrupt {
                    path, offset: got, ..
                } if *path == want && got == offset => {}
                _ => {
                    return Err(format!(
                        "expected Corrupt naming {file} at offset {offset}, got: {msg}"
                    ))
                }
            }
            let (p, o) = (want.display().to_string(), format!("offset {offset}"));
            if !msg.contains(&p) || !msg.contains(&o) {
                return Err(format!("the message does not name {p} and {o}: {msg}"));
            }
            Ok(())
        }
        (Expect::Refuse { file, offset }, Ok(o)) => Err(format!(
            "expected Corrupt naming {file} at offset {offset}, but it opened with {} entries \
             ending at {} (torn: {:?})",
            o.entries.len(),
            o.store.last_pos(),
            o.torn
        )),
        (Expect::Recover { .. }, Err(e)) => Err(format!("expected to recover, got: {e}")),
        (
            Expect::Recover {
                entries,
                last_pos,
                torn,
            },
            Ok(o),
        ) => {
            let want_torn = torn.as_ref().map(|(f, offset, n)| TornTail {
                path: dir.join(f),
                offset: *offset,
                discarded_bytes: *n,
                hole: false,
            });
            if o.entries != *entries {
                let got: Vec<_> = o.entries.iter().map(|e| (e.position, e.end())).collect();
                let want: Vec<_> = entries.iter().map(|e| (e.position, e.end())).collect();
                return Err(format!(
                    "recovered entries are not the expected prefix: got {} (last {:?}), want {} \
                     (last {:?})",
                    got.len(),
                    got.last(),
                    want.len(),
                    want.last()
                ));
            }
            if o.store.last_pos() != *last_pos || o.torn != want_torn {
                return Err(format!(
                    "recovered to {} with torn {:?}; want {last_pos} with {want_torn:?}",
                    o.store.last_pos(),
                    o.torn
                ));
            }
            if o.snapshot != base.snapshot || o.hard_state != base.hard_state {
                return Err("snapshot or hard state changed by recovery".into());
            }
            // Appendable: append, sync, reopen, and it is there.
            let mut store = o.store;
            let term: Term = store.last_term().max(1);
            let e = Entry {
                term,
                position: *last_pos,
                timestamp: 1,
                kind: EntryKind::Command { client: 9, seq: 1 },
                data: Bytes::from_static(b"after recovery"),
            };
            store
                .append(std::slice::from_ref(&e))
                .and_then(|_| store.sync())
                .map_err(|err| format!("append after recovery: {err}"))?;
            drop(store);
            let o = LogStore::open(dir, opts()).map_err(|err| format!("reopen: {err}"))?;
            let mut want = entries.clone();
            want.push(e.clone());
            if o.entries != want || o.store.last_pos() != e.end() || o.torn.is_some() {
                return Err(format!(
                    "after append + reopen: {} entries ending at {} (torn {:?}); want {} ending \
                     at {}",
                    o.entries.len(),
                    o.store.last_pos(),
                    o.torn,
                    want.len(),
                    e.end()
                ));
            }
            Ok(())
        }
    }
}

/// Runs the seeded cases that `select` picks; returns how many ran.
fn run_cases(seed: u64, select: impl Fn(&Case) -> bool) -> usize {
    let bases: Vec<Base> = VARIANTS
        .iter()
        .enumerate()
        .map(|(i, &v)| build(v, seed ^ i as u64))
        .collect();
    let mut rng = Rng::new(seed);
    let (mut run, mut failures) = (0, Vec::new());
    for n in 0..CASES {
        let v = rng.below(VARIANTS.len() as u64) as usize;
        let case = draw(&bases[v], &mut rng);
        if !select(&case) {
            continue;
        }
        run += 1;
        if let Err(msg) = check(&bases[v], &case) {
            failures.push(format!(
                "case {n} ({:?}, {:?}): {msg}",
                VARIANTS[v], case.damage
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {run} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    run
}

#[test]
fn random_damage_recovers_a_prefix_or_refuses_naming_file_and_offset() {
    let run = run_cases(0x6B65_656C, |_| true);
    assert_eq!(run, CASES as usize);
}

/// Every damage class shows up in the seeded cases.
#[test]
fn the_cases_cover_every_kind_of_damage() {
    let bases: Vec<Base> = VARIANTS
        .iter()
        .enumerate()
        .map(|(i, &v)| build(v, 0x6B65_656C ^ i as u64))
        .collect();
    let mut rng = Rng::new(0x6B65_656C);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..CASES {
        let v = rng.below(VARIANTS.len() as u64) as usize;
        let case = draw(&bases[v], &mut rng);
        let last = &bases[v].segments[bases[v].segments.len() - 1].name;
        let class = match (&case.damage, &case.expect) {
            (Damage::Delete { .. }, _) => "missing segment",
            (Damage::Flip { file, .. }, _) if !file.ends_with(".seg") => "meta flip",
            (Damage::Truncate { file, .. }, _) if !file.ends_with(".seg") => "meta cut",
            (Damage::Flip { file, .. }, _) if file == last => "last segment flip",
            (Damage::Flip { .. }, _) => "sealed segment flip",
            (Damage::Truncate { .. }, Expect::Recover { torn: None, .. }) => "last cut at boundary",
            (Damage::Truncate { .. }, Expect::Recover { .. })
                if case.cuts_last_segment_in_a_body() =>
            {
                "last cut in body"
            }
            (Damage::Truncate { .. }, Expect::Recover { .. }) => "last cut in header",
            (Damage::Truncate { file, .. }, Expect::Refuse { file: f, .. }) if file != f => {
                "sealed cut at boundary"
            }
            (Damage::Truncate { .. }, Expect::Refuse { .. }) => "sealed cut in frame",
        };
        seen.insert((VARIANTS[v] == Variant::Plain, class));
    }
    let classes: std::collections::BTreeSet<_> = seen.iter().map(|s| s.1).collect();
    assert_eq!(classes.len(), 10, "{classes:?}");
}

/// When the last segment ends inside a frame's body after an intact header
/// (what a crash in the middle of `write(2)` leaves), recovery cuts the torn
/// tail and keeps exactly the entries before that frame. These cases are
/// part of the main test too; this one runs only them, so a failure names
/// the behaviour.
#[test]
fn last_segment_cut_inside_a_frame_body_is_cut_as_a_torn_tail() {
    let run = run_cases(0x6B65_656C, Case::cuts_last_segment_in_a_body);
    assert!(
        run > 0,
        "no seeded case cuts the last segment inside a body"
    );
}

/// Regression: SIGKILL mid-write leaves a frame cut short after its header.
/// The smallest such case, with exact inputs: it must be cut as a torn tail,
/// not refused as corruption.
#[test]
fn frame_cut_short_after_its_header_is_cut_as_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let mk = |position, data: &'static [u8]| Entry {
        term: 1,
        position,
        timestamp: 0,
        kind: EntryKind::Command { client: 1, seq: 1 },
        data: Bytes::from_static(data),
    };
    let a = mk(0, b"first entry");
    let b = mk(a.end(), b"second entry");
    store.append(&[a.clone(), b.clone()]).expect("append");
    store.sync().expect("sync");
    drop(store);
    // Cut 10 bytes into the second entry's body (the header is intact).
    let seg = dir.path().join(format!("{:020}.seg", 0));
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(b.position + HEADER_LEN + 10))
        .expect("cut");
    let o =
        LogStore::open(dir.path(), Options::default()).expect("a torn tail is cut, not refused");
    assert_eq!(o.entries, vec![a.clone()]);
    assert_eq!(
        o.torn,
        Some(TornTail {
            path: seg,
            offset: b.position,
            discarded_bytes: HEADER_LEN + 10,
            hole: false,
        })
    );
}

/// A single-segment log of `n` entries with non-zero data; returns the
/// entries and the segment's path.
fn one_segment_log(dir: &Path, n: usize) -> (Vec<Entry>, std::path::PathBuf) {
    let mut rng = Rng::new(0x5EC7);
    let mut store = LogStore::open(dir, Options::default()).expect("open").store;
    let mut all: Vec<Entry> = Vec::new();
    for i in 0..n {
        let position = all.last().map_or(0, Entry::end);
        all.push(Entry {
            term: 1,
            position,
            timestamp: position,
            kind: EntryKind::Command {
                client: 3,
                seq: i as u64,
            },
            data: nonzero_bytes(&mut rng, 150 + (i * 37) % 200),
        });
    }
    store.append(&all).expect("append");
    store.sync().expect("sync");
    drop(store);
    (all, dir.join(format!("{:020}.seg", 0)))
}

fn zero(path: &Path, from: u64, len: u64) {
    let mut b = fs::read(path).expect("read");
    b[from as usize..(from + len) as usize].fill(0);
    fs::write(path, b).expect("write");
}

/// An all-zero sector in the middle of the last segment, with valid frames
/// after it, is not a torn tail: cutting there would silently drop those
/// entries. Recovery refuses, naming the file and the damaged frame.
#[test]
fn a_zeroed_sector_in_the_middle_of_the_last_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = one_segment_log(dir.path(), 120);
    let len = all.last().map_or(0, Entry::end);
    let sector = 16 * 512;
    assert!(sector + 4 * 512 < len, "the log is too short: {len}");
    zero(&seg, sector, 512);
    let damaged = all
        .iter()
        .find(|e| e.end() > sector)
        .expect("a frame over the sector");
    let err = match LogStore::open(dir.path(), Options::default()) {
        Ok(o) => panic!(
            "opened with {} entries (torn {:?}) despite valid frames after the zeroed sector",
            o.entries.len(),
            o.torn
        ),
        Err(e) => e,
    };
    match &err {
        LogError::Corrupt { path, offset, .. } => {
            assert_eq!(path, &seg);
            assert_eq!(*offset, damaged.position);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&seg.display().to_string()), "{msg}");
    assert!(
        msg.contains(&format!("offset {}", damaged.position)),
        "{msg}"
    );
    assert!(msg.contains("valid frame header follows"), "{msg}");
    // Refused without changing anything: the segment was not cut.
    assert_eq!(fs::metadata(&seg).expect("metadata").len(), len);
}

/// After a power loss (`Options::cut_after_hole`: the caller knows, and
/// counts the node as having lost what it acknowledged), the same hole is
/// what pages reaching the disk out of order leave at the unsynced end of
/// a log: the damaged frame is cut with everything after it, and the
/// entries before it are kept.
#[test]
fn a_zeroed_sector_in_the_last_segment_is_cut_after_a_power_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = one_segment_log(dir.path(), 120);
    let len = all.last().map_or(0, Entry::end);
    let sector = 16 * 512;
    zero(&seg, sector, 512);
    let damaged = all
        .iter()
        .position(|e| e.end() > sector)
        .expect("a frame over the sector");
    let after_power_loss = Options {
        cut_after_hole: true,
        ..Options::default()
    };
    let o = LogStore::open(dir.path(), after_power_loss).expect("opened after a power loss");
    assert_eq!(o.entries, all[..damaged]);
    let torn = o.torn.as_ref().expect("a cut tail");
    assert_eq!(torn.offset, all[damaged].position);
    assert_eq!(torn.discarded_bytes, len - all[damaged].position);
    assert!(torn.hole, "cut at a hole, with data after it");
    // Recorded before the cut, for the node to count itself amnesic.
    assert!(dir.path().join(meta::HOLE_CUT_FILE).exists());
    drop(o);
    assert_eq!(
        fs::metadata(&seg).expect("metadata").len(),
        all[damaged].position
    );
    // The cut is durable: a later open, without the option, finds the log
    // as it was left.
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert_eq!(o.entries, all[..damaged]);
    assert!(o.torn.is_none());
}

/// The same sector zeroed through the end of the file (what an interrupted
/// write can leave: the file grew but its last sectors were never written)
/// is a torn tail: recovery keeps the frames before it.
#[test]
fn zeroed_sectors_through_the_end_of_the_last_segment_are_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = one_segment_log(dir.path(), 120);
    let len = all.last().map_or(0, Entry::end);
    let sector = 16 * 512;
    zero(&seg, sector, len - sector);
    let damaged = all
        .iter()
        .find(|e| e.end() > sector)
        .expect("a frame over the sector");
    let o = LogStore::open(dir.path(), Options::default()).expect("a torn tail is cut");
    let kept: Vec<Entry> = all
        .iter()
        .filter(|e| e.end() <= damaged.position)
        .cloned()
        .collect();
    assert_eq!(o.entries, kept);
    assert_eq!(
        o.torn,
        Some(TornTail {
            path: seg,
            offset: damaged.position,
            discarded_bytes: len - damaged.position,
            hole: false,
        })
    );
}

// Entry data with zero bytes in it. The damage tests above use data with no
// zero byte, so a zeroed sector could only be damage; real entries (etcd
// values, padded records) hold zero runs, even whole zero sectors, and
// those must not let damage pass for an unwritten tail.

/// A one-segment log of command entries carrying `data`, synced; returns
/// the entries and the segment's path.
fn log_of(dir: &Path, data: &[Vec<u8>]) -> (Vec<Entry>, std::path::PathBuf) {
    let mut store = LogStore::open(dir, Options::default()).expect("open").store;
    let mut all: Vec<Entry> = Vec::new();
    for (i, d) in data.iter().enumerate() {
        let position = all.last().map_or(0, Entry::end);
        all.push(Entry {
            term: 1,
            position,
            timestamp: position,
            kind: EntryKind::Command {
                client: 3,
                seq: i as u64,
            },
            data: Bytes::from(d.clone()),
        });
    }
    store.append(&all).expect("append");
    store.sync().expect("sync");
    drop(store);
    (all, dir.join(format!("{:020}.seg", 0)))
}

/// Data of `len` non-zero bytes, from `seed`.
fn nonzero(seed: u64, len: usize) -> Vec<u8> {
    nonzero_bytes(&mut Rng::new(seed), len).to_vec()
}

/// Writes `bytes` as the segment at `seg`, opens `dir`, and says what came
/// of it: the entries kept and the torn tail, or the `Corrupt` offset.
fn open_with(
    dir: &Path,
    seg: &Path,
    bytes: &[u8],
) -> Result<(Vec<Entry>, Option<TornTail>), (u64, String)> {
    fs::write(seg, bytes).expect("write");
    match LogStore::open(dir, Options::default()) {
        Ok(o) => Ok((o.entries, o.torn)),
        Err(LogError::Corrupt {
            path,
            offset,
            reason,
        }) => {
            assert_eq!(path, seg);
            Err((offset, reason))
        }
        Err(e) => panic!("expected Corrupt or a clean open, got {e}"),
    }
}

/// The reviewer's case: the last entry's data is all zero (whole zero
/// sectors), and a byte near its end is damaged. It used to be cut as a
/// torn tail, silently dropping a synced, acknowledged entry.
#[test]
fn a_flipped_bit_in_a_last_frame_of_zeros_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = log_of(dir.path(), &[vec![0xAB; 100], vec![0; 4096]]);
    let mut b = fs::read(&seg).expect("read");
    let n = b.len();
    b[n - 10] ^= 0x01;
    let last = &all[1];
    match open_with(dir.path(), &seg, &b) {
        Err((offset, reason)) => {
            assert_eq!(offset, last.position);
            assert!(reason.contains("not an unwritten tail"), "{reason}");
        }
        Ok((entries, torn)) => panic!(
            "opened with {} entries (torn {torn:?}): the acknowledged entry at {} was dropped",
            entries.len(),
            last.position
        ),
    }
}

/// A last frame whose data holds whole zero sectors and ends in non-zero
/// bytes: damage to any byte of it is refused, wherever it falls (header,
/// fields, data before, in or after the zeros).
#[test]
fn damage_anywhere_in_a_last_frame_with_zero_sectors_in_its_data_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = [
        nonzero(1, 300),
        nonzero(2, 200),
        [nonzero(3, 100), vec![0; 2048], nonzero(4, 300)].concat(),
    ];
    let (all, seg) = log_of(dir.path(), &data);
    let orig = fs::read(&seg).expect("read");
    let last = &all[2];
    let mut opened = Vec::new();
    for at in last.position..last.end() {
        let mut b = orig.clone();
        b[at as usize] ^= 0x01;
        match open_with(dir.path(), &seg, &b) {
            Err((offset, _)) => assert_eq!(offset, last.position, "byte {at} damaged"),
            Ok((entries, torn)) => opened.push((at, entries.len(), torn)),
        }
    }
    assert!(
        opened.is_empty(),
        "{} of {} damaged bytes opened, e.g. {:?}",
        opened.len(),
        last.encoded_len(),
        opened.first()
    );
}

/// A last frame of zeros: damage after its first whole zero sector is
/// refused, as the zeros then do not run to the end of the file. (Damage
/// before it, followed only by zeros, is what an interrupted write leaves
/// too: that is cut as a torn tail, as nothing can tell them apart.)
#[test]
fn damage_after_the_first_zero_sector_of_a_last_frame_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = log_of(dir.path(), &[nonzero(5, 700), vec![0; 3000]]);
    let orig = fs::read(&seg).expect("read");
    let last = &all[1];
    let first_zero = (last.position / 512 * 512..)
        .step_by(512)
        .find(|&s| orig[s as usize..s as usize + 512].iter().all(|&b| b == 0))
        .expect("a zero sector");
    assert!(first_zero + 1024 < last.end());
    for at in (first_zero + 512..last.end())
        .step_by(7)
        .chain([last.end() - 1])
    {
        let mut b = orig.clone();
        b[at as usize] ^= 0x80;
        match open_with(dir.path(), &seg, &b) {
            Err((offset, _)) => assert_eq!(offset, last.position, "byte {at} damaged"),
            Ok((entries, torn)) => panic!(
                "damage at byte {at} opened with {} entries (torn {torn:?})",
                entries.len()
            ),
        }
    }
}

/// What an interrupted write leaves — the file's last sectors never written
/// (zero from a sector boundary to the end of the file, the last one often
/// partial) — is a torn tail also when entries carry zero runs: for every
/// sector boundary in the last few kilobytes, recovery keeps exactly the
/// frames the zeros left unchanged and cuts at the first one they changed.
#[test]
fn unwritten_sectors_at_the_end_are_a_torn_tail_with_zero_filled_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut data = Vec::new();
    // (The last entry ends in non-zero data, which a zeroed partial last
    // sector then changes.)
    for i in 0..13u64 {
        data.push(match i % 3 {
            0 => nonzero(i, 300 + 37 * i as usize),
            1 => vec![0; 500 + 90 * i as usize],
            _ => [nonzero(i, 150), vec![0; 700]].concat(),
        });
    }
    let (all, seg) = log_of(dir.path(), &data);
    let orig = fs::read(&seg).expect("read");
    let len = orig.len() as u64;
    assert_ne!(len % 512, 0, "want a partial last sector");
    let mut partial_cut = false;
    for t in (len.saturating_sub(8192) / 512 * 512..len).step_by(512) {
        let mut b = orig.clone();
        b[t as usize..].fill(0);
        // The first frame the zeros changed is cut, with all after it.
        let damaged = all.iter().find(|e| {
            orig[e.position as usize..e.end() as usize] != b[e.position as usize..e.end() as usize]
        });
        let want = match damaged {
            Some(d) => (
                all.iter()
                    .filter(|e| e.end() <= d.position)
                    .cloned()
                    .collect(),
                Some(TornTail {
                    path: seg.clone(),
                    offset: d.position,
                    discarded_bytes: len - d.position,
                    hole: false,
                }),
            ),
            None => (all.clone(), None),
        };
        let got = open_with(dir.path(), &seg, &b)
            .unwrap_or_else(|(o, r)| panic!("zeros from {t} (of {len}) refused at {o}: {r}"));
        assert_eq!(got.1, want.1, "zeros from {t} (of {len})");
        assert!(got.0 == want.0, "zeros from {t}: wrong entries kept");
        partial_cut |= len - t < 512 && damaged.is_some();
    }
    assert!(
        partial_cut,
        "no case zeroed only a partial last sector of a frame"
    );
}

/// The reviewer's case for a partial sector: the last sector of the file
/// (shorter than 512 bytes) was never written. It used to be refused as
/// corruption, so a node could not restart after a crash.
#[test]
fn an_unwritten_partial_last_sector_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = one_segment_log(dir.path(), 20);
    let len = all.last().map_or(0, Entry::end);
    let last_sector = len / 512 * 512;
    assert!(len - last_sector > 0 && len - last_sector < 512);
    zero(&seg, last_sector, len - last_sector);
    let damaged = all
        .iter()
        .find(|e| e.end() > last_sector)
        .expect("a frame over the sector");
    let o = LogStore::open(dir.path(), Options::default()).expect("a torn tail is cut");
    let kept: Vec<Entry> = all
        .iter()
        .filter(|e| e.end() <= damaged.position)
        .cloned()
        .collect();
    assert_eq!(o.entries, kept);
    assert_eq!(
        o.torn,
        Some(TornTail {
            path: seg,
            offset: damaged.position,
            discarded_bytes: len - damaged.position,
            hole: false,
        })
    );
}

/// Zeros shorter than a sector, from a sector boundary, with valid frames
/// after them: damage in the middle of the last segment, refused.
#[test]
fn a_partial_zeroed_sector_before_valid_frames_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (all, seg) = one_segment_log(dir.path(), 60);
    let at = 20 * 512;
    zero(&seg, at, 200);
    let damaged = all.iter().find(|e| e.end() > at).expect("a frame there");
    match LogStore::open(dir.path(), Options::default()) {
        Err(LogError::Corrupt { path, offset, .. }) => {
            assert_eq!((path, offset), (seg, damaged.position));
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(o) => panic!(
            "opened with {} entries (torn {:?})",
            o.entries.len(),
            o.torn
        ),
    }
}

/// A sealed segment whose end is zero from a sector boundary (a partial
/// sector, or whole ones) is damaged, not torn: only the last segment is
/// ever being written.
#[test]
fn zeros_at_the_end_of_a_sealed_segment_are_refused() {
    for sectors in [0, 2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = Options::with_segment_size(4096);
        let mut store = LogStore::open(dir.path(), opts.clone())
            .expect("open")
            .store;
        let mut all: Vec<Entry> = Vec::new();
        for i in 0..40u64 {
            let position = all.last().map_or(0, Entry::end);
            all.push(Entry {
                term: 1,
                position,
                timestamp: position,
                kind: EntryKind::Command { client: 3, seq: i },
                data: nonzero_bytes(&mut Rng::new(i), 250),
            });
        }
        store.append(&all).expect("append");
        store.sync().expect("sync");
        drop(store);
        let first = dir.path().join(format!("{:020}.seg", 0));
        let len = fs::metadata(&first).expect("metadata").len();
        assert!(!len.is_multiple_of(512) && dir.path().join(format!("{len:020}.seg")).exists());
        let from = (len / 512).saturating_sub(sectors) * 512;
        zero(&first, from, len - from);
        let damaged = all.iter().find(|e| e.end() > from).expect("a frame there");
        match LogStore::open(dir.path(), opts) {
            Err(LogError::Corrupt { path, offset, .. }) => {
                assert_eq!((path, offset), (first, damaged.position));
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(o) => panic!(
                "opened with {} entries (torn {:?})",
                o.entries.len(),
                o.torn
            ),
        }
    }
}

/// The price of never guessing: an interrupted write over a frame whose
/// data has a whole zero sector before the point where the write stopped
/// is refused (the zero sector could as well be data followed by damage),
/// with a message saying why. Refusing is the safe side: the node is
/// rebuilt from the cluster instead of possibly dropping an entry.
#[test]
fn an_unwritten_tail_after_a_zero_sector_in_the_frames_data_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = [
        nonzero(6, 300),
        [nonzero(7, 100), vec![0; 1024], nonzero(8, 2000)].concat(),
    ];
    let (all, seg) = log_of(dir.path(), &data);
    let mut b = fs::read(&seg).expect("read");
    let cut = (all[1].end() - 1000) / 512 * 512;
    b[cut as usize..].fill(0);
    match open_with(dir.path(), &seg, &b) {
        Err((offset, reason)) => {
            assert_eq!(offset, all[1].position);
            assert!(
                reason.contains("over an all-zero sector at offset"),
                "{reason}"
            );
            assert!(reason.contains("not an unwritten tail"), "{reason}");
        }
        Ok((entries, torn)) => panic!("opened with {} entries (torn {torn:?})", entries.len()),
    }
}
