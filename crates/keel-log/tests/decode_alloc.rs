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

#[path = "../../../test-support/alloc_probe.rs"]
mod alloc_probe;
use alloc_probe::*;

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

/// A membership with removed ids (their count is one more field to lie).
fn members() -> Membership {
    Membership {
        voters: [1, 2, 3].into(),
        learners: [9].into(),
        removed: [4, 7].into(),
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
        // Without removed ids: the format before they were recorded.
        EntryKind::Membership(Membership::new([1, 2, 3]).into()),
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
