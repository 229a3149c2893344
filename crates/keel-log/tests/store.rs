//! The durable log against a simple in-memory model (property test), plus
//! focused cases: hard state, snapshots and the manifest, install-snapshot
//! reconciliation, I/O errors surfacing, and the storage thread.

use bytes::Bytes;
use keel_core::*;
use keel_log::meta::{self, HardStateFile};
use keel_log::{Durability, LogError, LogStore, Options, StorageEvent, StorageThread};
use proptest::prelude::*;
use std::sync::mpsc;
use std::time::Duration;

fn entry(term: Term, position: Position, len: usize) -> Entry {
    Entry {
        term,
        position,
        timestamp: position * 3,
        kind: EntryKind::Command {
            client: 9,
            seq: position,
        },
        data: Bytes::from(
            (0..len)
                .map(|i| (i as u8) ^ (position as u8) | 1)
                .collect::<Vec<u8>>(),
        ),
    }
}

/// `n` contiguous entries of `len` bytes and term `term` from `from`.
fn run_of(term: Term, from: Position, n: usize, len: usize) -> Vec<Entry> {
    let mut pos = from;
    (0..n)
        .map(|_| {
            let e = entry(term, pos, len);
            pos = e.end();
            e
        })
        .collect()
}

/// Where `entries` end (`from` if there are none).
fn end_of(entries: &[Entry], from: Position) -> Position {
    entries.last().map_or(from, Entry::end)
}

fn opts(segment_size: u64) -> Options {
    Options::with_segment_size(segment_size)
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        sizes: Vec<usize>,
        bump: bool,
    },
    Truncate(usize),
    Snapshot(usize),
    Reopen,
    /// Read back the entries from the first to the second (wrapped).
    Read(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (proptest::collection::vec(0..400usize, 1..6), any::<bool>()).prop_map(|(sizes, bump)| Op::Append { sizes, bump }),
        1 => any::<usize>().prop_map(Op::Truncate),
        1 => any::<usize>().prop_map(Op::Snapshot),
        2 => Just(Op::Reopen),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Read(a, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The hard state file round-trips; any other bytes, a cut file or one
    /// damaged byte are refused as damage (a newer format only with a
    /// matching checksum), never a panic, and a refusal writes nothing.
    #[test]
    fn hard_state_files_round_trip_and_refuse_garbage(
        term in any::<u64>(),
        vote in 0u64..50,
        hold in any::<u64>(),
        members in proptest::collection::btree_set(1u64..50, 0..6),
        removed in proptest::collection::btree_set(50u64..80, 0..3),
        garbage in proptest::collection::vec(any::<u8>(), 0..100),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let hs = HardStateFile {
            hard_state: HardState { term, voted_for: (vote != 0).then_some(vote), hold },
            membership: Membership { removed, ..Membership::new(members) },
        };
        meta::save_hard_state(dir.path(), &hs).expect("save");
        prop_assert_eq!(meta::load_hard_state(dir.path()).expect("load"), Some(hs));
        let path = dir.path().join(meta::HARD_STATE_FILE);
        let image = std::fs::read(&path).expect("read");
        let mut bad = image.clone();
        bad[flip.index(image.len())] ^= 0x04;
        for bytes in [garbage, image[..cut.index(image.len())].to_vec(), bad] {
            std::fs::write(&path, &bytes).expect("write");
            let err = meta::load_hard_state(dir.path()).expect_err("bad hard state accepted");
            prop_assert!(matches!(err, LogError::Corrupt { .. }), "{}", err);
            prop_assert_eq!(std::fs::read(&path).expect("read"), bytes);
        }
    }

    /// A snapshot file's bytes decode back to the snapshot, with the state
    /// a slice of the file's buffer (not a copy); any other bytes, a cut
    /// file or one damaged byte are refused, never a panic.
    #[test]
    fn snapshot_files_round_trip_and_refuse_garbage(
        position in 0u64..1 << 40,
        term in 0u64..1 << 20,
        members in proptest::collection::btree_set(1u64..50, 0..6),
        removed in proptest::collection::btree_set(50u64..80, 0..3),
        data in proptest::collection::vec(any::<u8>(), 0..2000),
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        pieces in proptest::collection::vec(1usize..700, 0..8),
    ) {
        let s = Snapshot {
            meta: SnapshotMeta {
                position, term, timestamp: position ^ term,
                membership: Membership { removed, ..Membership::new(members) },
            },
            data: Bytes::from(data),
        };
        let image = Bytes::from(meta::encode_snapshot(&s));
        let mut written = Vec::new();
        meta::write_snapshot(&mut written, &s).expect("write to a Vec");
        prop_assert_eq!(&written[..], &image[..]);
        // Staged from a state written in pieces (as a service streams
        // it): the same bytes, the length and checksum filled in after.
        let dir = tempfile::tempdir().expect("tempdir");
        let (staged, len) = meta::stage_snapshot_with(dir.path(), &s.meta, |w| {
            let mut rest = &s.data[..];
            for &n in &pieces {
                let (piece, tail) = rest.split_at(n.min(rest.len()));
                w.write_all(piece)?;
                rest = tail;
            }
            w.write_all(rest)
        })
        .expect("stage");
        prop_assert_eq!(len, s.data.len() as u64);
        prop_assert_eq!(std::fs::read(&staged).expect("read staged"), image.to_vec());
        let path = std::path::Path::new("prop");
        let d = meta::decode_snapshot(path, &image).expect("decodes");
        prop_assert_eq!(&d, &s);
        let within = image.as_ptr_range();
        prop_assert!(d.data.is_empty() || within.contains(&d.data.as_ptr()), "the state was copied");
        prop_assert!(meta::check_snapshot_image(&s.meta, &image));
        prop_assert!(meta::decode_snapshot(path, &Bytes::from(garbage.clone())).is_err());
        let short = image.slice(..cut.index(image.len()));
        prop_assert!(meta::decode_snapshot(path, &short).is_err());
        let mut bad = image.to_vec();
        let at = flip.index(bad.len());
        bad[at] ^= 0x20;
        prop_assert!(meta::decode_snapshot(path, &Bytes::from(bad.clone())).is_err());
        prop_assert!(!meta::check_snapshot_image(&s.meta, &bad));

        // A streamed backup: the file, zero padding, a SHA-256; read back
        // whole, or as the bare file; cut or flipped anywhere, refused.
        let mut framing = meta::BackupFraming::new(position ^ 0x6b65656c);
        let mut framed = Vec::new();
        for piece in image.chunks(pieces.first().copied().unwrap_or(512)) {
            framing.update(piece);
            framed.extend_from_slice(piece);
        }
        framed.extend_from_slice(&framing.trailer());
        prop_assert_eq!(framed.len() as u64, meta::BackupFraming::framed_len(image.len() as u64));
        prop_assert_eq!(framed.len() % 512, 32);
        let framed = Bytes::from(framed);
        let got = meta::unwrap_backup(path, &framed).expect("framed");
        prop_assert_eq!(&got.snapshot, &s);
        prop_assert_eq!(got.cluster_id, Some(position ^ 0x6b65656c));
        let got = meta::unwrap_backup(path, &image).expect("bare");
        prop_assert_eq!((&got.snapshot, got.cluster_id), (&s, None));
        // Cut anywhere: refused, unless the cut leaves the bare file.
        let at = cut.index(framed.len());
        let short = meta::unwrap_backup(path, &framed.slice(..at));
        prop_assert!(short.is_err() || (at == image.len() && short.expect("ok").snapshot == s));
        let mut bad = framed.to_vec();
        let at = flip.index(bad.len());
        bad[at] ^= 0x20;
        prop_assert!(meta::unwrap_backup(path, &Bytes::from(bad)).is_err());
        // Garbage framed with a good digest: the header is read, not trusted.
        let mut framing = meta::BackupFraming::new(1);
        framing.update(&garbage);
        let framed_garbage = [garbage, framing.trailer()].concat();
        prop_assert!(meta::unwrap_backup(path, &Bytes::from(framed_garbage)).is_err());
    }

    /// append / truncate / snapshot+compact / reopen agree with a model.
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..40), seg in 200u64..3000) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::open(dir.path(), opts(seg)).expect("open").store;
        let mut model: Vec<Entry> = Vec::new();
        let mut snap: Option<(Position, Term)> = None;
        let mut term = 1;
        for op in ops {
            match op {
                Op::Append { sizes, bump } => {
                    if bump { term += 1; }
                    let mut batch = Vec::new();
                    let mut pos = store.last_pos();
                    for s in sizes {
                        let e = entry(term, pos, s);
                        pos = e.end();
                        batch.push(e);
                    }
                    store.append(&batch).expect("append");
                    store.sync().expect("sync");
                    model.extend(batch);
                }
                Op::Truncate(i) if !model.is_empty() => {
                    let i = i % model.len();
                    store.truncate(model[i].position).expect("truncate");
                    model.truncate(i);
                }
                Op::Snapshot(i) if !model.is_empty() => {
                    let i = i % model.len();
                    let e = model[i].clone();
                    let s = Snapshot {
                        meta: SnapshotMeta { position: e.end(), term: e.term, timestamp: e.timestamp, membership: Membership::new([1]) },
                        data: Bytes::from_static(b"state"),
                    };
                    store.install_snapshot(&s).expect("install");
                    model.drain(..=i);
                    snap = Some((e.end(), e.term));
                }
                Op::Reopen => {
                    drop(store);
                    let o = LogStore::open(dir.path(), opts(seg)).expect("reopen");
                    prop_assert_eq!(&o.entries, &model);
                    prop_assert_eq!(o.snapshot.map(|s| (s.meta.position, s.meta.term)), snap);
                    prop_assert!(o.torn.is_none());
                    store = o.store;
                }
                Op::Read(a, b) if !model.is_empty() => {
                    let (a, b) = (a % model.len(), b % model.len());
                    let (a, b) = (a.min(b), a.max(b));
                    let read = keel_log::store::read_range(dir.path(), model[a].position, model[b].end())
                        .expect("read back");
                    prop_assert_eq!(&read[..], &model[a..=b]);
                }
                _ => {}
            }
            let end = model.last().map_or(snap.map_or(0, |s| s.0), Entry::end);
            prop_assert_eq!(store.last_pos(), end);
        }
    }
}

/// A log in `dir` of 50 synced 100-byte entries over 1000-byte segments
/// (more than five of them), and the entries.
fn fifty_entries_over_segments(dir: &std::path::Path) -> (LogStore, Vec<Entry>) {
    let mut store = LogStore::open(dir, opts(1000)).expect("open").store;
    let all = run_of(1, 0, 50, 100);
    store.append(&all).expect("append");
    store.sync().expect("sync");
    assert!(
        store.segment_count() > 5,
        "{} segments",
        store.segment_count()
    );
    (store, all)
}

#[test]
fn segments_roll_and_compaction_deletes_whole_segments_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, all) = fifty_entries_over_segments(dir.path());
    let mid = all[25].clone();
    let s = Snapshot {
        meta: SnapshotMeta {
            position: mid.end(),
            term: 1,
            timestamp: 0,
            membership: Membership::new([1]),
        },
        data: Bytes::new(),
    };
    let before = store.segment_count();
    store.install_snapshot(&s).expect("install");
    assert!(store.segment_count() < before);
    assert!(
        store.first_pos() <= mid.end(),
        "compaction removed entries the snapshot does not cover"
    );
    drop(store);
    let o = LogStore::open(dir.path(), opts(1000)).expect("reopen");
    assert_eq!(o.entries, all[26..].to_vec());
}

#[test]
fn log_ranges_are_read_back_across_segments_and_bad_ranges_refused() {
    use keel_log::store::read_range;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut store, all) = fifty_entries_over_segments(dir.path());
    let end = end_of(&all, 0);
    assert_eq!(read_range(dir.path(), 0, end).expect("all"), all);
    assert_eq!(
        read_range(dir.path(), all[7].position, all[31].end()).expect("middle"),
        all[7..32].to_vec()
    );
    assert_eq!(
        read_range(dir.path(), all[3].position, all[3].position).expect("empty"),
        vec![]
    );
    let refused = |from, upto, want: &str| {
        let e = read_range(dir.path(), from, upto).expect_err("refused");
        assert!(e.to_string().contains(want), "{from}..{upto}: {e}");
    };
    refused(all[2].position, all[5].end() - 1, "no whole entry");
    refused(all[2].position + 1, all[5].end(), "at offset");
    refused(end, end + 10, "no whole entry");
    refused(10, 5, "ends before it starts");
    // Compacted away: refused, not read from what is left.
    store
        .install_snapshot(&Snapshot {
            meta: SnapshotMeta {
                position: all[30].end(),
                term: 1,
                timestamp: 0,
                membership: Membership::new([1]),
            },
            data: Bytes::new(),
        })
        .expect("install");
    refused(0, all[3].end(), "before the log on disk");
    assert_eq!(
        read_range(dir.path(), all[40].position, end).expect("after the snapshot"),
        all[40..].to_vec()
    );
    // A damaged byte is an error naming the file, not wrong data.
    let seg = dir_names(dir.path())
        .into_iter()
        .rfind(|n| n.ends_with(".seg"))
        .expect("a segment");
    let path = dir.path().join(seg);
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes.len() - 10;
    bytes[at] ^= 0x55;
    std::fs::write(&path, bytes).expect("write");
    refused(all[40].position, end, "checksum");
}

#[test]
fn install_snapshot_the_log_does_not_hold_replaces_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let e = entry(1, 0, 10);
    store.append(std::slice::from_ref(&e)).expect("append");
    let s = Snapshot {
        meta: SnapshotMeta {
            position: 5_000,
            term: 7,
            timestamp: 0,
            membership: Membership::new([1, 2]),
        },
        data: Bytes::from_static(b"remote state"),
    };
    store.install_snapshot(&s).expect("install");
    assert_eq!(store.last_pos(), 5_000);
    let next = entry(7, 5_000, 3);
    store
        .append(std::slice::from_ref(&next))
        .expect("append after install");
    store.sync().expect("sync");
    drop(store);
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert_eq!(o.snapshot, Some(s));
    assert_eq!(o.entries, vec![next]);
}

#[test]
fn a_snapshot_ahead_of_the_synced_log_supersedes_it() {
    // A node can apply (and snapshot) entries it has not synced itself.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    store.append(&[entry(1, 0, 10)]).expect("append");
    store.sync().expect("sync");
    drop(store);
    let s = Snapshot {
        meta: SnapshotMeta {
            position: 900,
            term: 1,
            timestamp: 0,
            membership: Membership::new([1]),
        },
        data: Bytes::new(),
    };
    meta::save_snapshot(dir.path(), &s).expect("save");
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert!(o.entries.is_empty());
    assert_eq!(o.store.last_pos(), 900);
}

/// Installing a snapshot whose position the log holds with another term
/// replaces the log, its segments removed newest first: a crash part way
/// leaves a prefix of them, and every prefix reopens as the snapshot with
/// an empty log after it. (Removed oldest first, a crash could leave a log
/// starting after the snapshot, refused as missing entries, or one starting
/// exactly at it whose entries the snapshot superseded.)
#[test]
fn a_log_reset_cut_short_by_a_crash_reopens_as_the_snapshot() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("log");
    let (store, all) = fifty_entries_over_segments(&dir);
    drop(store);
    // What an install saves before it resets the log.
    let s = Snapshot {
        meta: SnapshotMeta {
            position: all[25].end(),
            term: 2,
            timestamp: 0,
            membership: Membership::new([1]),
        },
        data: Bytes::from_static(b"a later term's state"),
    };
    meta::save_snapshot(&dir, &s).expect("save");
    let segments: Vec<String> = dir_names(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect();
    assert!(segments.len() > 5, "{segments:?}");
    for kept in 0..=segments.len() {
        let copy = tmp.path().join(format!("crashed-{kept}"));
        std::fs::create_dir(&copy).expect("mkdir");
        for name in dir_names(&dir) {
            if !segments[kept..].contains(&name) {
                std::fs::copy(dir.join(&name), copy.join(&name)).expect("copy");
            }
        }
        let o = LogStore::open(&copy, opts(1000))
            .unwrap_or_else(|e| panic!("{kept} of the segments left: {e}"));
        assert_eq!(o.snapshot.as_ref(), Some(&s), "{kept} left");
        assert!(o.entries.is_empty(), "{kept} left: {:?}", o.entries);
        assert_eq!(o.store.last_pos(), s.meta.position, "{kept} left");
    }
}

#[test]
fn hard_state_round_trips_and_rejects_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(meta::load_hard_state(dir.path()).expect("load"), None);
    let hs = HardStateFile {
        hard_state: HardState {
            term: 42,
            voted_for: Some(3),
            hold: 500_000_000,
        },
        membership: Membership::new([1, 2, 3]),
    };
    meta::save_hard_state(dir.path(), &hs).expect("save");
    assert_eq!(meta::load_hard_state(dir.path()).expect("load"), Some(hs));
    let path = dir.path().join(meta::HARD_STATE_FILE);
    let mut b = std::fs::read(&path).expect("read");
    b[9] ^= 0x40;
    std::fs::write(&path, b).expect("write");
    let err = meta::load_hard_state(dir.path()).expect_err("damaged hard state accepted");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("hardstate"), "{err}");
}

/// Rewrites the hard state file's magic (its format digit) and checksum.
fn set_hard_state_magic(dir: &std::path::Path, magic: &[u8; 4]) {
    let path = dir.join(meta::HARD_STATE_FILE);
    let mut b = std::fs::read(&path).expect("read");
    b[..4].copy_from_slice(magic);
    let body = b.len() - 4;
    let crc = crc32c::crc32c(&b[..body]);
    b[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, b).expect("write");
}

#[test]
fn hard_state_of_formats_1_and_2_is_upgraded_and_newer_formats_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hs = HardStateFile {
        hard_state: HardState {
            term: 7,
            voted_for: Some(2),
            hold: 0,
        },
        membership: Membership::new([1, 2, 3]),
    };
    meta::save_hard_state(dir.path(), &hs).expect("save");
    let path = dir.path().join(meta::HARD_STATE_FILE);
    assert_eq!(meta::DATA_FORMAT, 3);
    assert_eq!(&std::fs::read(&path).expect("read")[..4], b"KHS3");
    let format_3 = std::fs::read(&path).expect("read");

    // A directory written by format 2 (the same fields; its memberships
    // record no removed ids) opens, and is format 3 from then on (so the
    // binary that wrote it refuses it, rather than read removed ids in its
    // log as damage).
    set_hard_state_magic(dir.path(), b"KHS2");
    let opened = LogStore::open(dir.path(), Options::default()).expect("open format 2");
    assert_eq!(opened.hard_state, Some(hs.clone()));
    assert_eq!(std::fs::read(&path).expect("read"), format_3);
    drop(opened);

    // A directory written before format 2 (no hold: term, vote, then the
    // membership) opens, and is format 3 from then on.
    let mut b = std::fs::read(&path).expect("read");
    b.drain(20..28);
    std::fs::write(&path, b).expect("write");
    set_hard_state_magic(dir.path(), b"KHS1");
    let opened = LogStore::open(dir.path(), Options::default()).expect("open format 1");
    assert_eq!(opened.hard_state, Some(hs.clone()));
    assert_eq!(std::fs::read(&path).expect("read"), format_3);
    drop(opened);

    // A newer format is refused by name, not as damage.
    set_hard_state_magic(dir.path(), b"KHS4");
    let err = LogStore::open(dir.path(), Options::default())
        .err()
        .expect("a newer format accepted");
    assert!(
        matches!(
            err,
            LogError::NewerFormat {
                found: 4,
                supported: 3,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("newer version of Keel"), "{msg}");
    assert!(msg.contains("data format 4"), "{msg}");
    assert!(msg.contains("formats up to 3"), "{msg}");
    // Refusing changed nothing.
    assert_eq!(&std::fs::read(&path).expect("read")[..4], b"KHS4");

    // A format digit changed by damage (the checksum no longer matches) is
    // damage.
    set_hard_state_magic(dir.path(), b"KHS3");
    let mut b = std::fs::read(&path).expect("read");
    b[3] = b'5';
    std::fs::write(&path, b).expect("write");
    let err = meta::load_hard_state(dir.path()).expect_err("damaged hard state accepted");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
}

/// A membership the log records removed ids in (after a removal) is read
/// back whole on reopen, and the entry after it is at the position the
/// core gave it (the frame is as long as `Entry::encoded_len()` says).
#[test]
fn a_membership_entry_with_removed_ids_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let first = entry(1, 0, 10);
    let m = Membership {
        voters: [1, 2, 4].into(),
        learners: [5].into(),
        removed: [3, 9].into(),
    };
    let change = Entry {
        term: 2,
        position: first.end(),
        timestamp: 5,
        kind: EntryKind::Membership(std::sync::Arc::new(m.clone())),
        data: Bytes::from_static(b"conf"),
    };
    // 8 counts + 4 ids, 4 removed count + 2 ids, 4 data.
    assert_eq!(change.encoded_len(), 32 + 8 + 32 + 4 + 16 + 4);
    let after = entry(2, change.end(), 7);
    let all = vec![first, change, after.clone()];
    store.append(&all).expect("append");
    store.sync().expect("sync");
    drop(store);
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert!(o.torn.is_none(), "{:?}", o.torn);
    assert_eq!(o.entries, all);
    assert_eq!(o.store.last_pos(), after.end());
    match &o.entries[1].kind {
        EntryKind::Membership(got) => assert_eq!(got.removed, m.removed),
        other => panic!("{other:?}"),
    }
    let mut store = o.store;
    let next = entry(2, after.end(), 3);
    store
        .append(std::slice::from_ref(&next))
        .expect("append after reopen");
    store.sync().expect("sync");
    drop(store);
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert_eq!(o.entries.last(), Some(&next));
    assert_eq!(
        keel_log::store::read_range(dir.path(), after.position, next.end()).expect("read"),
        vec![after, next]
    );
}

/// A snapshot taken after a removal keeps the removed ids through a store
/// reopen (and a restore from it): a node restarted from it must still
/// refuse the ids, or it would accept them as new members.
#[test]
fn a_snapshot_with_removed_ids_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let run = run_of(1, 0, 5, 20);
    store.append(&run).expect("append");
    store.sync().expect("sync");
    let s = Snapshot {
        meta: SnapshotMeta {
            position: run[3].end(),
            term: 1,
            timestamp: 12,
            membership: Membership {
                voters: [1, 2].into(),
                learners: Default::default(),
                removed: [3].into(),
            },
        },
        data: Bytes::from_static(b"state after removing 3"),
    };
    assert!(meta::save_snapshot(dir.path(), &s).expect("save"));
    drop(store);
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert_eq!(o.snapshot, Some(s.clone()));
    assert_eq!(o.entries, run[4..].to_vec());
    // The file itself, as a follower or `keel restore` would take it.
    let image = meta::encode_snapshot(&s);
    assert!(meta::check_snapshot_image(&s.meta, &image));
    let unwrapped =
        meta::unwrap_backup(std::path::Path::new("b"), &Bytes::from(image)).expect("unwrap");
    assert_eq!(unwrapped.snapshot.meta.membership.removed, [3].into());
}

#[test]
fn appending_out_of_place_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let err = store.append(&[entry(1, 7, 1)]).expect_err("gap accepted");
    assert!(
        err.to_string()
            .contains("append at position 7 but the log ends at 0"),
        "{err}"
    );
    assert!(store.truncate(100).is_err());
}

/// A command entry at `position` whose frame body is `body` bytes (16 of
/// them the command's fields).
fn entry_with_body(position: Position, body: usize) -> Entry {
    Entry {
        term: 1,
        position,
        timestamp: position,
        kind: EntryKind::Command {
            client: 9,
            seq: position,
        },
        data: Bytes::from(vec![0x5A; body - 16]),
    }
}

/// Regression: an entry whose body exceeded the frame limit was written and
/// synced, and then no open could read the log back ("body length … exceeds
/// the 67108864-byte limit"). Now the largest frame round-trips, and one
/// byte more is refused before anything of the batch is written.
#[test]
fn an_entry_over_the_frame_limit_is_refused_and_nothing_is_written() {
    use keel_log::frame::MAX_BODY_LEN;
    let dir = tempfile::tempdir().expect("tempdir");
    let seg = dir.path().join(format!("{:020}.seg", 0));
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let first = entry(1, 0, 100);
    store.append(std::slice::from_ref(&first)).expect("append");
    store.sync().expect("sync");
    let len = std::fs::metadata(&seg).expect("metadata").len();

    // A batch with an oversized entry after a good one: all refused.
    let good = entry(1, first.end(), 100);
    let big = entry_with_body(good.end(), MAX_BODY_LEN + 1);
    let err = store
        .append(&[good.clone(), big.clone()])
        .expect_err("an entry over the frame limit was accepted");
    match &err {
        LogError::EntryTooLarge { position, body_len } => {
            assert_eq!((*position, *body_len), (big.position, MAX_BODY_LEN + 1));
        }
        other => panic!("expected EntryTooLarge, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("log position {}", big.position))
            && msg.contains("frame limit")
            && msg.contains("nothing was written"),
        "{msg}"
    );
    drop(big);
    assert_eq!(store.last_pos(), first.end(), "the store moved on");
    store.sync().expect("sync");
    assert_eq!(std::fs::metadata(&seg).expect("metadata").len(), len);

    // The store is still usable, and the largest frame round-trips.
    let largest = entry_with_body(first.end(), MAX_BODY_LEN);
    store
        .append(std::slice::from_ref(&largest))
        .expect("the largest frame is accepted");
    store.sync().expect("sync");
    drop(store);
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert!(o.torn.is_none());
    assert_eq!(o.entries.len(), 2);
    assert!(o.entries[0] == first && o.entries[1] == largest);
}

/// A refused append in the storage thread does not wedge the node: in
/// `sync` mode the thread stops and reports `Failed` (the node stops with
/// the error), later requests fail instead of waiting; in `replicated` mode
/// the append is refused to the caller (or, if it would roll a segment, by
/// the thread as in `sync` mode). Nothing of it reaches the disk.
#[test]
fn an_oversized_entry_stops_the_storage_thread_with_the_error() {
    use keel_log::frame::MAX_BODY_LEN;
    for durability in [Durability::Sync, Durability::Replicated] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path(), Options::default())
            .expect("open")
            .store;
        let (tx, rx) = mpsc::channel();
        let t = StorageThread::spawn(store, durability, move |ev| {
            let _ = tx.send(ev);
        })
        .expect("spawn");
        let first = entry(1, 0, 100);
        t.append(vec![first.clone()]).expect("append");
        t.barrier().expect("barrier");
        let big = entry_with_body(first.end(), MAX_BODY_LEN + 1);
        let (refused, by_thread) = match t.append(vec![big]) {
            Err(e) => (e, false),
            Ok(_) => loop {
                match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(StorageEvent::Failed(e)) => break (e, true),
                    Ok(StorageEvent::Durable { position, .. }) if position > first.end() => {
                        panic!("{durability:?}: the oversized entry was reported durable")
                    }
                    Ok(_) => {}
                    Err(e) => panic!("{durability:?}: no failure reported: {e}"),
                }
            },
        };
        assert!(
            matches!(refused, LogError::EntryTooLarge { .. }),
            "{durability:?}: {refused}"
        );
        if by_thread {
            // The thread has stopped: later requests fail, not hang.
            assert!(
                t.barrier().is_err(),
                "{durability:?}: the thread kept going"
            );
            assert!(t.append(vec![entry(1, first.end(), 1)]).is_err());
        }
        let _ = t.shutdown();
        let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
        assert_eq!(o.entries, vec![first], "{durability:?}");
    }
}

#[test]
fn every_sync_of_the_log_is_timed_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), opts(500)).expect("open").store;
    // Four segments' worth: three rolls, each syncing the full segment.
    let run = run_of(1, 0, 20, 100);
    store.append(&run).expect("append");
    assert!(store.segment_count() >= 3, "{}", store.segment_count());
    let rolls = store.take_sync_times();
    assert_eq!(rolls.len(), store.segment_count() - 1);
    store
        .append(&[entry(1, end_of(&run, 0), 10)])
        .expect("append");
    assert!(
        store.sync().expect("sync"),
        "the active segment was written"
    );
    assert_eq!(store.take_sync_times().len(), 1);
    assert!(!store.sync().expect("sync"), "nothing new to sync");
    assert!(store.take_sync_times().is_empty());
}

/// Appends, a truncation and appends again, queued back to back (so the
/// storage thread mostly takes them in one batch, where it writes a run of
/// appends together): the log is what they say in their order.
#[test]
fn appends_around_a_truncation_land_in_order() {
    for durability in [Durability::Sync, Durability::Replicated] {
        for round in 0..20 {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = LogStore::open(dir.path(), opts(1 << 20))
                .expect("open")
                .store;
            let t = StorageThread::spawn(store, durability, |_| {}).expect("spawn");
            let kept = run_of(1, 0, 10, 40);
            let cut = end_of(&kept, 0);
            let dropped = run_of(1, cut, 10 + round, 40);
            let new = run_of(2, cut, 5, 60);
            let more = run_of(2, end_of(&new, cut), 5, 20);
            for run in [&kept, &dropped] {
                for chunk in run.chunks(3) {
                    t.append(chunk.to_vec()).expect("append");
                }
            }
            t.truncate(cut).expect("truncate");
            t.append(new.clone()).expect("append");
            t.append(more.clone()).expect("append");
            t.barrier().expect("barrier");
            t.shutdown().expect("shutdown");
            let end = end_of(&more, 0);
            let o = LogStore::open(dir.path(), opts(1 << 20)).expect("reopen");
            assert_eq!(o.store.last_pos(), end, "{durability:?} round {round}");
            assert_eq!(o.store.last_term(), 2);
            let want: Vec<Entry> = kept.iter().chain(&new).chain(&more).cloned().collect();
            assert_eq!(
                keel_log::store::read_range(dir.path(), 0, end).expect("read"),
                want,
                "{durability:?} round {round}"
            );
        }
    }
}

#[test]
fn storage_thread_reports_durable_positions_in_order() {
    for durability in [Durability::Sync, Durability::Replicated] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LogStore::open(dir.path(), Options::default())
            .expect("open")
            .store;
        let (tx, rx) = mpsc::channel();
        let t = StorageThread::spawn(store, durability, move |ev| {
            let _ = tx.send(ev);
        })
        .expect("spawn");
        let mut pos = 0;
        for i in 0..200 {
            let e = entry(1 + i / 50, pos, 50);
            pos = e.end();
            let written = t.append(vec![e]).expect("append");
            // `replicated` mode writes on the caller's thread.
            match durability {
                Durability::Sync => assert_eq!(written, None),
                Durability::Replicated => assert_eq!(written, Some((pos, 1 + i / 50))),
            }
        }
        if durability == Durability::Replicated {
            // The syncer thread's background sync is reported too.
            loop {
                match rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(StorageEvent::Synced { .. }) => break,
                    Ok(StorageEvent::Failed(e)) => panic!("storage failed: {e}"),
                    Ok(_) => {}
                    Err(e) => panic!("no background sync reported: {e}"),
                }
            }
        }
        t.barrier().expect("barrier");
        let mut last = 0;
        let mut synced = 0;
        // (`replicated` mode returned each end from `append` instead.)
        let sync = durability == Durability::Sync;
        while let Some(Ok(ev)) = sync.then(|| rx.recv_timeout(Duration::from_secs(5))) {
            match ev {
                StorageEvent::Synced { .. } => synced += 1,
                StorageEvent::Durable { position, term } => {
                    assert!(position > last, "durable went from {last} to {position}");
                    last = position;
                    if position == pos {
                        assert_eq!(term, 4);
                        break;
                    }
                }
                StorageEvent::Failed(e) => panic!("storage failed: {e}"),
                StorageEvent::SnapshotPublished { .. }
                | StorageEvent::Slow { .. }
                | StorageEvent::Warning(_) => {}
            }
        }
        if durability == Durability::Sync {
            assert_eq!(last, pos, "never reported the end");
            assert!(
                synced > 0,
                "each sync is reported before what it made durable"
            );
        }
        t.shutdown().expect("shutdown");
        let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
        assert_eq!(o.store.last_pos(), pos);
    }
}

/// `replicated` mode: a membership entry goes through the storage thread,
/// which syncs it before it reports it durable (a configuration a quorum
/// counted must survive a power loss); other appends are written inline
/// and reported durable before the periodic sync.
#[test]
fn replicated_mode_syncs_a_membership_entry_before_it_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let (tx, rx) = mpsc::channel();
    // No periodic sync during the test.
    let t = StorageThread::spawn_with(
        store,
        Durability::Replicated,
        Duration::from_secs(600),
        move |ev| {
            let _ = tx.send(ev);
        },
    )
    .expect("spawn");
    let e = entry(1, 0, 100);
    assert_eq!(
        t.append(vec![e.clone()]).expect("append"),
        Some((e.end(), 1))
    );
    let m = Entry {
        term: 1,
        position: e.end(),
        timestamp: 0,
        kind: EntryKind::Membership(std::sync::Arc::new(Membership::new([1, 2, 3]))),
        data: Bytes::new(),
    };
    let end = m.end();
    assert_eq!(
        t.append(vec![m]).expect("append"),
        None,
        "not written inline"
    );
    // Appends after it go through the thread too, in order, until it has
    // caught up.
    let after = entry(1, end, 10);
    let _ = t.append(vec![after.clone()]).expect("append");
    let mut synced = false;
    loop {
        match rx.recv_timeout(Duration::from_secs(10)).expect("an event") {
            StorageEvent::Synced { .. } => synced = true,
            StorageEvent::Durable { position, .. } if position >= end => {
                assert!(synced, "reported durable at {position} before a sync");
                break;
            }
            StorageEvent::Failed(e) => panic!("storage failed: {e}"),
            _ => {}
        }
    }
    t.barrier().expect("barrier");
    let later = entry(1, after.end(), 10);
    assert_eq!(
        t.append(vec![later.clone()]).expect("append"),
        Some((later.end(), 1)),
        "inline again once caught up"
    );
    t.shutdown().expect("shutdown");
}

#[test]
fn replicated_mode_appends_and_truncates_on_the_callers_thread_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small segments: the appends roll over several of them.
    let store = LogStore::open(dir.path(), opts(1000)).expect("open").store;
    let (tx, rx) = mpsc::channel();
    let t = StorageThread::spawn(store, Durability::Replicated, move |ev| {
        let _ = tx.send(ev);
    })
    .expect("spawn");
    let mut ends = vec![0];
    let (mut inline, mut through_thread) = (0, 0);
    for _ in 0..30 {
        let e = entry(1, *ends.last().unwrap_or(&0), 100);
        // Written here (and durable) unless it rolls a segment or follows
        // a roll the thread has not written yet.
        match t.append(vec![e.clone()]).expect("append") {
            Some(end) => {
                assert_eq!(end, (e.end(), 1));
                inline += 1;
            }
            None => through_thread += 1,
        }
        ends.push(e.end());
    }
    assert!(inline > 0, "nothing was written inline");
    assert!(through_thread > 0, "no roll went through the thread");
    // Once the thread has written the roll, appends are inline again (the
    // new segment is empty: this one does not roll).
    t.barrier().expect("barrier");
    let e = entry(1, *ends.last().unwrap_or(&0), 10);
    assert_eq!(
        t.append(vec![e.clone()]).expect("append"),
        Some((e.end(), 1))
    );
    ends.push(e.end());
    // A new leader's entries replace the last eleven.
    let cut = ends[20];
    t.truncate(cut).expect("truncate");
    let mut pos = cut;
    for _ in 0..5 {
        let e = entry(2, pos, 40);
        pos = e.end();
        if let Some(end) = t.append(vec![e]).expect("append") {
            assert_eq!(end, (pos, 2));
        }
    }
    t.barrier().expect("barrier");
    t.shutdown().expect("shutdown");
    let events: Vec<StorageEvent> = rx.try_iter().collect();
    assert!(
        !events
            .iter()
            .any(|ev| matches!(ev, StorageEvent::Failed(_))),
        "storage failed: {events:?}"
    );
    // What went through the thread was reported durable by it.
    assert!(
        events.iter().any(|ev| matches!(
            ev,
            StorageEvent::Durable { position, term: 2 } if *position == pos
        )),
        "the end was never reported durable: {events:?}"
    );
    let o = LogStore::open(dir.path(), opts(1000)).expect("reopen");
    assert_eq!(o.store.last_pos(), pos);
    assert_eq!(o.store.last_term(), 2);
    let terms: Vec<Term> = o.entries.iter().map(|e| e.term).collect();
    assert_eq!(terms, [vec![1; 20], vec![2; 5]].concat());
}

#[test]
fn a_write_error_stops_the_storage_thread_and_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), opts(500)).expect("open").store;
    let (tx, rx) = mpsc::channel();
    let t = StorageThread::spawn(store, Durability::Sync, move |ev| {
        let _ = tx.send(ev);
    })
    .expect("spawn");
    // Make rolling to a new segment impossible: the directory goes away.
    std::fs::remove_dir_all(dir.path()).expect("rm");
    let run = run_of(1, 0, 20, 100);
    let pos = end_of(&run, 0);
    for e in run {
        let _ = t.append(vec![e]);
    }
    let failed = loop {
        match rx.recv_timeout(Duration::from_secs(5)).expect("no report") {
            StorageEvent::Failed(e) => break e,
            StorageEvent::Durable { .. }
            | StorageEvent::SnapshotPublished { .. }
            | StorageEvent::Slow { .. }
            | StorageEvent::Synced { .. }
            | StorageEvent::Warning(_) => continue,
        }
    };
    assert!(matches!(failed, LogError::Io { .. }), "{failed}");
    assert!(t.append(vec![entry(1, pos, 1)]).is_err() || t.barrier().is_err());
}

fn snapshot_at(position: Position, term: Term, data: &'static [u8]) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            position,
            term,
            timestamp: position,
            membership: Membership::new([1, 2, 3]),
        },
        data: Bytes::from_static(data),
    }
}

/// The snapshot file format, byte for byte, written out by hand: a change
/// to the encoder that moves a byte (files on disk and installs between
/// versions would break) fails here.
#[test]
fn the_snapshot_file_format_is_stable() {
    let s = Snapshot {
        meta: SnapshotMeta {
            position: 0x0102,
            term: 3,
            timestamp: 0x0a0b,
            membership: Membership {
                voters: [1, 2].into_iter().collect(),
                learners: [9].into_iter().collect(),
                removed: Default::default(),
            },
        },
        data: Bytes::from_static(b"state"),
    };
    let mut want: Vec<u8> = b"KSN1".to_vec();
    for v in [0x0102u64, 3, 0x0a0b] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    want.extend_from_slice(&2u32.to_le_bytes()); // voters
    want.extend_from_slice(&1u32.to_le_bytes()); // learners
    for id in [1u64, 2, 9] {
        want.extend_from_slice(&id.to_le_bytes());
    }
    want.extend_from_slice(&5u64.to_le_bytes());
    want.extend_from_slice(b"state");
    let crc = crc32c::crc32c(&want);
    assert_eq!(crc, CRC, "the checksum of the bytes before it");
    want.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(meta::encode_snapshot(&s), want);
    let mut streamed = Vec::new();
    meta::write_snapshot(&mut streamed, &s).expect("write");
    assert_eq!(streamed, want);
    // Computed independently (a bitwise CRC-32C of the bytes above).
    const CRC: u32 = 0xeba8_561c;
}

/// A state writer's error stops the staging with that error and the staged
/// file's path; nothing is published.
#[test]
fn a_failing_state_writer_fails_the_staging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = snapshot_at(700, 1, b"x");
    let e = meta::stage_snapshot_with(dir.path(), &s.meta, |w| {
        w.write_all(b"half of it")?;
        Err(std::io::Error::other("the service could not serialize"))
    })
    .expect_err("staging must fail");
    let msg = e.to_string();
    assert!(msg.contains("the service could not serialize"), "{msg}");
    assert!(
        msg.contains("snap-00000000000000000700.snap.staged"),
        "{msg}"
    );
    assert_eq!(meta::manifest_position(dir.path()).expect("manifest"), None);
    meta::remove_leftovers(dir.path()).expect("remove leftovers");
    assert!(snapshot_files(dir.path()).is_empty());
}

fn snapshot_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap-"))
        .collect();
    v.sort();
    v
}

/// Saving an older snapshot after a newer one was installed keeps the newer
/// one: the manifest never moves backwards, and the newer file stays.
#[test]
fn saving_an_older_snapshot_never_moves_the_manifest_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let run = run_of(1, 0, 20, 100);
    let pos = end_of(&run, 0);
    for e in run {
        store.append(&[e]).expect("append");
    }
    store.sync().expect("sync");
    let p2 = snapshot_at(50_000, 3, b"leader state");
    store.install_snapshot(&p2).expect("install P2");
    let p1 = snapshot_at(pos / 2, 1, b"own state");
    assert!(!meta::save_snapshot(dir.path(), &p1).expect("save P1"));
    assert_eq!(
        snapshot_files(dir.path()),
        vec![meta::snapshot_file_name(50_000)]
    );
    drop(store);
    let o = LogStore::open(dir.path(), Options::default()).expect("restart");
    assert_eq!(o.snapshot, Some(p2));
    assert!(o.entries.is_empty());
    assert_eq!(o.store.last_pos(), 50_000);
}

/// The race the runtime had: a follower stages its own snapshot P1 (the
/// background writer), the leader's snapshot P2 is installed by the storage
/// thread, then P1 is committed. Through the storage thread the commit comes
/// after the install and is ignored; the node restarts with P2 and its log.
#[test]
fn an_own_snapshot_committed_after_an_install_is_ignored_and_restart_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let t = StorageThread::spawn(store, Durability::Sync, |_| {}).expect("spawn");
    let run = run_of(1, 0, 20, 100);
    let pos = end_of(&run, 0);
    for e in run {
        t.append(vec![e]).expect("append");
    }
    t.barrier().expect("barrier");
    let p1 = snapshot_at(pos / 2, 1, b"own state");
    let staged = meta::stage_snapshot(dir.path(), &p1).expect("stage P1");
    let p2 = snapshot_at(50_000, 3, b"leader state");
    t.install_snapshot(p2.clone()).expect("install P2");
    t.commit_snapshot(p1.meta.position, staged, p1.meta.position)
        .expect("commit P1");
    let next = entry(3, 50_000, 10);
    t.append(vec![next.clone()]).expect("append after install");
    t.barrier().expect("barrier");
    assert_eq!(t.queue_len(), 0);
    t.shutdown().expect("shutdown");
    assert_eq!(
        snapshot_files(dir.path()),
        vec![meta::snapshot_file_name(50_000)],
        "the staged older snapshot is removed, the installed one kept"
    );
    let o = LogStore::open(dir.path(), Options::default()).expect("restart");
    assert_eq!(o.snapshot, Some(p2.clone()));
    assert_eq!(o.entries, vec![next.clone()]);
    drop(o);
    // And the other order: a newer own snapshot is published and compacts.
    let store = LogStore::open(dir.path(), Options::default())
        .expect("reopen")
        .store;
    let t = StorageThread::spawn(store, Durability::Sync, |_| {}).expect("spawn");
    let p3 = snapshot_at(next.end(), 3, b"newer own state");
    let staged = meta::stage_snapshot(dir.path(), &p3).expect("stage P3");
    t.commit_snapshot(p3.meta.position, staged, p3.meta.position)
        .expect("commit P3");
    t.shutdown().expect("shutdown");
    assert_eq!(
        snapshot_files(dir.path()),
        vec![meta::snapshot_file_name(next.end())]
    );
    let o = LogStore::open(dir.path(), Options::default()).expect("restart");
    assert_eq!(o.snapshot, Some(p3));
}

/// A staged snapshot left by a crash is never loaded and is cleaned up.
#[test]
fn a_staged_snapshot_left_by_a_crash_is_removed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(LogStore::open(dir.path(), Options::default()).expect("open"));
    let staged = meta::stage_snapshot(dir.path(), &snapshot_at(900, 1, b"x")).expect("stage");
    assert!(staged.exists());
    let o = LogStore::open(dir.path(), Options::default()).expect("reopen");
    assert!(o.snapshot.is_none());
    assert!(!staged.exists());
}

/// Chunked installs read the published snapshot file: chunks reassemble to
/// the exact file, which the follower's check accepts; bad ranges are
/// errors (never panics), a replaced file is `None`.
#[test]
fn snapshot_chunks_are_read_from_the_published_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31) as u8).collect();
    let s = Snapshot {
        meta: snapshot_at(700, 2, b"").meta,
        data: Bytes::from(data),
    };
    assert!(meta::save_snapshot(dir.path(), &s).expect("save"));
    let file = std::fs::read(dir.path().join(meta::snapshot_file_name(700))).expect("read");
    let size = meta::snapshot_file_size(dir.path(), 700)
        .expect("size")
        .expect("a file");
    assert_eq!(size, file.len() as u64);
    let mut image = Vec::new();
    while (image.len() as u64) < size {
        let len = (size - image.len() as u64).min(999);
        let chunk = meta::read_snapshot_chunk(dir.path(), 700, image.len() as u64, len)
            .expect("read chunk")
            .expect("the file is there");
        assert_eq!(chunk.len() as u64, len);
        image.extend_from_slice(&chunk);
    }
    assert_eq!(image, file);
    assert!(meta::check_snapshot_image(&s.meta, &image));
    // Decoding and re-encoding a received file gives the same bytes (an
    // installed snapshot's file is as long as the one that was sent).
    let decoded = meta::decode_snapshot(
        std::path::Path::new("x"),
        &bytes::Bytes::from(image.clone()),
    )
    .expect("decode");
    assert_eq!(meta::encode_snapshot(&decoded), image);
    // Any damaged byte, or another snapshot's metadata, is refused.
    for at in [0, 5, image.len() / 2, image.len() - 1] {
        let mut bad = image.clone();
        bad[at] ^= 0x10;
        assert!(!meta::check_snapshot_image(&s.meta, &bad), "flip at {at}");
    }
    assert!(!meta::check_snapshot_image(
        &s.meta,
        &image[..image.len() - 1]
    ));
    let mut other = s.meta.clone();
    other.term = 3;
    assert!(!meta::check_snapshot_image(&other, &image));
    // Out-of-range reads are errors; a missing file is None.
    for (offset, len) in [(size, 1), (size - 1, 2), (u64::MAX, 2), (0, u64::MAX)] {
        let e = meta::read_snapshot_chunk(dir.path(), 700, offset, len).expect_err("range");
        assert!(e.to_string().contains("outside"), "{e}");
    }
    assert_eq!(
        meta::read_snapshot_chunk(dir.path(), 700, size, 0).expect("empty"),
        Some(Bytes::new())
    );
    assert!(meta::read_snapshot_chunk(dir.path(), 701, 0, 1)
        .expect("no error")
        .is_none());
    // A newer snapshot replaces the file: the old position is gone.
    assert!(meta::save_snapshot(dir.path(), &snapshot_at(900, 2, b"newer")).expect("save"));
    assert!(meta::read_snapshot_chunk(dir.path(), 700, 0, 1)
        .expect("no error")
        .is_none());
}

/// The storage thread reports a published snapshot file (with its size),
/// and nothing for one ignored because a newer one is already published.
#[test]
fn the_storage_thread_reports_published_snapshot_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), Options::default())
        .expect("open")
        .store;
    let (tx, rx) = mpsc::channel();
    let t = StorageThread::spawn(store, Durability::Sync, move |ev| {
        let _ = tx.send(ev);
    })
    .expect("spawn");
    let mut pos = 0;
    for _ in 0..20 {
        let e = entry(1, pos, 100);
        pos = e.end();
        t.append(vec![e]).expect("append");
    }
    let p1 = snapshot_at(pos / 2, 1, b"own state");
    let staged = meta::stage_snapshot(dir.path(), &p1).expect("stage");
    t.commit_snapshot(p1.meta.position, staged, p1.meta.position)
        .expect("commit");
    let p0 = snapshot_at(pos / 4, 1, b"older");
    let staged = meta::stage_snapshot(dir.path(), &p0).expect("stage");
    t.commit_snapshot(p0.meta.position, staged, p0.meta.position)
        .expect("commit");
    t.barrier().expect("barrier");
    t.shutdown().expect("shutdown");
    let published: Vec<(Position, u64)> = rx
        .try_iter()
        .filter_map(|ev| match ev {
            StorageEvent::SnapshotPublished { position, size } => Some((position, size)),
            _ => None,
        })
        .collect();
    let size = meta::encode_snapshot(&p1).len() as u64;
    assert_eq!(published, vec![(p1.meta.position, size)]);
}

fn dir_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// On the storage thread, compaction behind a published snapshot renames
/// the covered segments out of the log and a background thread deletes
/// them: none is left once the thread stops, and the log reopens from the
/// snapshot with every entry after it.
#[test]
fn the_storage_thread_deletes_compacted_segments_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LogStore::open(dir.path(), opts(1000)).expect("open").store;
    let t = StorageThread::spawn(store, Durability::Sync, |_| {}).expect("spawn");
    let mut all = Vec::new();
    let mut pos = 0;
    for _ in 0..60 {
        let e = entry(1, pos, 100);
        pos = e.end();
        all.push(e.clone());
        t.append(vec![e]).expect("append");
    }
    t.barrier().expect("barrier");
    let segments_before = dir_names(dir.path())
        .iter()
        .filter(|n| n.ends_with(".seg"))
        .count();
    let snap = snapshot_at(all[39].end(), 1, b"state");
    let staged = meta::stage_snapshot(dir.path(), &snap).expect("stage");
    t.commit_snapshot(snap.meta.position, staged, snap.meta.position)
        .expect("commit");
    t.barrier().expect("barrier");
    t.shutdown().expect("shutdown");
    let names = dir_names(dir.path());
    assert!(
        !names.iter().any(|n| n.ends_with(".retired")),
        "retired segments left behind: {names:?}"
    );
    let segments_after = names.iter().filter(|n| n.ends_with(".seg")).count();
    // 60 entries of ~130 bytes in 1000-byte segments: the snapshot after
    // the 40th covers at least 4 whole ones.
    assert!(
        segments_after + 4 <= segments_before,
        "compaction kept {segments_after} of {segments_before} segments"
    );
    let o = LogStore::open(dir.path(), opts(1000)).expect("reopen");
    assert_eq!(o.snapshot, Some(snap));
    let first = o
        .entries
        .first()
        .expect("entries after the snapshot")
        .position;
    let from = all.iter().position(|e| e.position == first).expect("known");
    assert!(first <= all[39].end());
    assert_eq!(o.entries, all[from..].to_vec());
}

/// A segment retired but not yet deleted when the process died is removed
/// on open and is not read as part of the log.
#[test]
fn a_retired_segment_left_by_a_crash_is_removed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), opts(1000)).expect("open").store;
    let e = entry(1, 0, 100);
    store.append(std::slice::from_ref(&e)).expect("append");
    store.sync().expect("sync");
    drop(store);
    let leftover = dir.path().join("00000000000000000000.seg.retired");
    std::fs::write(&leftover, b"garbage that is not a log").expect("write leftover");
    let o = LogStore::open(dir.path(), opts(1000)).expect("reopen");
    assert_eq!(o.entries, vec![e]);
    assert!(!leftover.exists());
}

/// A follower truncates a stale tail, appends the new leader's entries,
/// applies them and publishes a snapshot of them; the snapshot is published
/// off the storage thread, so a crash can leave the manifest ahead of a
/// truncation that never reached the disk. If the snapshot position falls
/// inside one of the stale entries, the snapshot supersedes the whole log.
#[test]
fn a_snapshot_inside_a_stale_tail_supersedes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = LogStore::open(dir.path(), opts(1000)).expect("open").store;
    let stale = run_of(1, 0, 6, 100);
    store.append(&stale).expect("append");
    store.sync().expect("sync");
    drop(store);
    // The snapshot ends in the middle of the fourth stale entry.
    let inside = stale[3].position + 7;
    assert!(stale.iter().all(|e| e.end() != inside));
    let snap = snapshot_at(inside, 2, b"the new leader's state");
    meta::save_snapshot(dir.path(), &snap).expect("save");
    let o = LogStore::open(dir.path(), opts(1000)).expect("reopen");
    assert_eq!(o.snapshot, Some(snap));
    assert!(o.entries.is_empty(), "the stale tail is dropped");
    let mut store = o.store;
    assert_eq!(store.last_pos(), inside);
    let next = entry(2, inside, 50);
    store
        .append(std::slice::from_ref(&next))
        .expect("append after");
    store.sync().expect("sync");
    drop(store);
    let o = LogStore::open(dir.path(), opts(1000)).expect("reopen again");
    assert_eq!(o.entries, vec![next]);
}

/// A state larger than the staging buffer, written in pieces larger than
/// it too (the file goes to the disk a buffer at a time as it is written):
/// the file is exactly `encode_snapshot`'s bytes.
#[test]
fn a_staged_snapshot_larger_than_the_write_buffer_is_written_whole() {
    let data: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i * 7 % 251) as u8).collect();
    let s = Snapshot {
        data: Bytes::from(data.clone()),
        ..snapshot_at(4242, 3, b"")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (staged, len) = meta::stage_snapshot_with(dir.path(), &s.meta, |w| {
        w.write_all(&data[..100])?;
        w.write_all(&data[100..(5 << 19)])?;
        w.write_all(&data[(5 << 19)..])
    })
    .expect("stage");
    assert_eq!(len, data.len() as u64);
    assert!(
        std::fs::read(&staged).expect("read staged") == meta::encode_snapshot(&s),
        "the staged file differs from the snapshot's encoding"
    );
}

/// While the mark a running node sets is there (`meta::mark_resync`: it
/// stopped on an error, was killed or crashed), every open writes the last
/// segment again and syncs it before the log is trusted; the entries are
/// unchanged. Once cleared (a clean stop), nothing is written again.
#[test]
fn an_open_after_an_unclean_stop_writes_the_last_segment_again() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::with_segment_size(4096);
    let entries: Vec<Entry> = {
        let mut s = LogStore::open(dir.path(), opts.clone()).unwrap().store;
        let mut pos = 0;
        let mut all = Vec::new();
        for _ in 0..40 {
            let e = keel_log::testing::make_entry(1, pos, 200);
            pos = e.end();
            all.push(e);
        }
        s.append(&all).unwrap();
        s.sync().unwrap();
        assert!(
            s.segment_count() > 1,
            "the test wants a segment before the last"
        );
        all
    };
    let last_segment_len = |dir: &std::path::Path| {
        let mut segs: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "seg"))
            .collect();
        segs.sort();
        std::fs::metadata(segs.last().unwrap()).unwrap().len()
    };
    let opened = LogStore::open(dir.path(), opts.clone()).unwrap();
    assert_eq!(opened.resynced, None);
    drop(opened);
    meta::mark_resync(dir.path()).unwrap();
    for _ in 0..2 {
        let opened = LogStore::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(opened.resynced, Some(last_segment_len(dir.path())));
        assert_eq!(opened.entries, entries);
        assert!(dir.path().join(meta::RESYNC_FILE).exists());
    }
    meta::clear_resync(dir.path()).unwrap();
    meta::clear_resync(dir.path()).unwrap();
    let opened = LogStore::open(dir.path(), opts).unwrap();
    assert_eq!(opened.resynced, None);
    assert_eq!(opened.entries, entries);
}

/// Snapshot files the manifest does not name (a newer one a crash left
/// between its rename and the manifest, an older one whose deletion it cut
/// short) are removed at open; the named one stays and is loaded.
#[test]
fn snapshot_files_no_manifest_names_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let at = |position| Snapshot {
        meta: SnapshotMeta {
            position,
            term: 1,
            timestamp: 0,
            membership: Membership::new([1]),
        },
        data: Bytes::from_static(b"state"),
    };
    meta::save_snapshot(dir.path(), &at(500)).expect("save");
    let named = dir.path().join(meta::snapshot_file_name(500));
    for stray in [100, 900] {
        std::fs::copy(&named, dir.path().join(meta::snapshot_file_name(stray))).expect("copy");
    }
    let o = LogStore::open(dir.path(), Options::default()).expect("open");
    assert_eq!(o.snapshot.expect("snapshot").meta.position, 500);
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap-"))
        .collect();
    left.sort();
    assert_eq!(left, [meta::snapshot_file_name(500)]);
}
