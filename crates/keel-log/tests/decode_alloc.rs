//! Decoding the data directory's files and log frames allocates in
//! proportion to the bytes present, never to a length or count field: a
//! valid image of each, with every 4- and 8-byte window overwritten by a
//! value claiming gigabytes and its checksums resealed (so the lie reaches
//! the decoder behind them), decodes or is refused with a bounded largest
//! allocation. A counting global allocator measures this test binary.

use bytes::Bytes;
use keel_core::{Entry, EntryKind, HardState, Membership, Snapshot, SnapshotMeta};
use keel_log::frame;
use keel_log::meta::{self, HardStateFile, Identity};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting on the current thread while `measure` runs.
struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn count(size: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is passed on to `System` unchanged; the counting only
// touches const-initialised thread locals, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation while `f` runs.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    ON.with(|on| on.set(true));
    f();
    ON.with(|on| on.set(false));
    LARGEST.with(Cell::get)
}

/// Large values for a 4-byte and an 8-byte field: lengths and counts
/// claiming gigabytes (and one that wraps when multiplied).
const LARGE_U32: [u32; 4] = [u32::MAX, 1 << 31, 1 << 30, 1 << 28];
const LARGE_U64: [u64; 4] = [u64::MAX, 1 << 63, 1 << 32, (1 << 61) + 1];

/// `good` with each of its 4- and 8-byte windows overwritten by each large
/// value in turn, passed through `fix` (e.g. to reseal a checksum).
fn with_large_fields(good: &[u8], fix: impl Fn(&mut [u8])) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    for at in 0..good.len() {
        for v in LARGE_U32 {
            if at + 4 <= good.len() {
                let mut b = good.to_vec();
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                fix(&mut b);
                out.push((at, b));
            }
        }
        for v in LARGE_U64 {
            if at + 8 <= good.len() {
                let mut b = good.to_vec();
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                fix(&mut b);
                out.push((at, b));
            }
        }
    }
    out
}

/// What a decoder of `len` bytes may allocate at once: a small multiple
/// of what it was given.
fn bound(len: usize) -> usize {
    4 * len + 4096
}

/// Reseals a file whose last 4 bytes are the CRC-32C of the rest.
fn reseal(b: &mut [u8]) {
    let n = b.len() - 4;
    let crc = crc32c::crc32c(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
}

/// Reseals a log frame: the body checksum (bytes 4..8) over what follows
/// the header, then the header checksum (28..32) over its first 28 bytes.
fn reseal_frame(b: &mut [u8]) {
    let body = crc32c::crc32c(&b[frame::HEADER_LEN..]);
    b[4..8].copy_from_slice(&body.to_le_bytes());
    let header = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&header.to_le_bytes());
}

fn members() -> Membership {
    Membership {
        voters: [1, 2, 3].into(),
        learners: [9].into(),
    }
}

/// Each data directory file, written valid, then with each large field.
#[test]
fn data_directory_files_allocate_nothing_for_a_large_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    meta::save_hard_state(
        d,
        &HardStateFile {
            hard_state: HardState {
                term: 4,
                voted_for: Some(2),
                hold: 7,
            },
            membership: members(),
        },
    )
    .expect("save");
    meta::save_identity(
        d,
        Identity {
            node_id: 2,
            cluster_id: 0x6b65656c,
        },
    )
    .expect("save");
    let s = Snapshot {
        meta: SnapshotMeta {
            position: 500,
            term: 4,
            timestamp: 99,
            membership: members(),
        },
        data: Bytes::from(vec![0x5a; 100]),
    };
    meta::save_snapshot(d, &s).expect("save");
    let mut cases = 0;
    for name in [
        meta::HARD_STATE_FILE,
        meta::IDENTITY_FILE,
        meta::MANIFEST_FILE,
    ] {
        let path = d.join(name);
        let good = std::fs::read(&path).expect("read");
        for (at, bad) in with_large_fields(&good, reseal) {
            std::fs::write(&path, &bad).expect("write");
            let largest = largest_allocation(|| {
                let _ = meta::load_hard_state(d);
                let _ = meta::load_identity(d);
                let _ = meta::manifest_position(d);
            });
            assert!(
                largest <= bound(bad.len()),
                "{name} with a large field at byte {at}: an allocation of {largest} bytes"
            );
            cases += 1;
        }
        std::fs::write(&path, &good).expect("restore the file");
    }
    let image = meta::encode_snapshot(&s);
    for (at, bad) in with_large_fields(&image, reseal) {
        let bad = Bytes::from(bad);
        let largest = largest_allocation(|| {
            let _ = meta::decode_snapshot(std::path::Path::new("s"), &bad);
            let _ = meta::unwrap_backup(std::path::Path::new("s"), &bad);
            let _ = meta::check_snapshot_image(&s.meta, &bad);
        });
        assert!(
            largest <= bound(bad.len()),
            "a snapshot file with a large field at byte {at}: an allocation of {largest} bytes"
        );
        cases += 1;
    }
    assert!(cases > 500, "{cases} cases");
}

/// Log frames of every kind, each field large, checksums resealed.
#[test]
fn log_frames_allocate_nothing_for_a_large_field() {
    let data = Bytes::from_static(b"some command data");
    let kinds = [
        EntryKind::TermStart,
        EntryKind::Command { client: 3, seq: 8 },
        EntryKind::Timer {
            id: 5,
            deadline: 900,
        },
        EntryKind::Membership(members().into()),
        EntryKind::SessionClose { client: 3 },
    ];
    for kind in kinds {
        let e = Entry {
            term: 2,
            position: 4096,
            timestamp: 77,
            kind,
            data: data.clone(),
        };
        let mut good = Vec::new();
        frame::encode(&e, &mut good).expect("encode");
        assert_eq!(
            frame::decode(&good, 4096).expect("decodes"),
            Some((e.clone(), good.len()))
        );
        for (at, bad) in with_large_fields(&good, reseal_frame) {
            let largest = largest_allocation(|| {
                let _ = frame::decode(&bad, 4096);
                let _ = frame::decode_membership(&bad[frame::HEADER_LEN.min(bad.len())..]);
            });
            assert!(
                largest <= bound(bad.len()),
                "{e:?} with a large field at byte {at}: an allocation of {largest} bytes"
            );
        }
    }
}
