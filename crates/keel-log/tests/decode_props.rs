//! The data directory's small files and the decoders behind their
//! checksums, fed valid, cut, mutated and hostile bytes: the identity
//! record, the manifest, memberships, hard state and snapshot headers whose
//! checksum holds but whose fields lie (a count or length claiming
//! gigabytes), backups framed with a good digest around a lying header, and
//! snapshot chunk ranges. Each must round-trip when valid and otherwise be
//! refused with an error naming the damage: never a panic, never an
//! allocation sized by a field, never a silently different value.

use bytes::Bytes;
use keel_core::{HardState, Membership, Snapshot, SnapshotMeta};
use keel_log::frame::{decode_membership, encode_membership, REMOVED_FLAG};
use keel_log::meta::{self, HardStateFile, Identity};
use keel_log::LogError;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::path::Path;

/// `magic ++ body ++ crc32c(magic ++ body)`: a file whose checksum holds.
fn sealed(magic: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut b = magic.to_vec();
    b.extend_from_slice(body);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Memberships with and without removed ids (never members, as the core
/// keeps them).
fn membership() -> impl Strategy<Value = Membership> {
    (
        proptest::collection::btree_set(1u64..1000, 0..6),
        proptest::collection::btree_set(1000u64..2000, 0..3),
        prop_oneof![
            Just(BTreeSet::new()),
            proptest::collection::btree_set(2000u64..3000, 1..5),
        ],
    )
        .prop_map(|(voters, learners, removed)| Membership {
            voters,
            learners,
            removed,
        })
}

/// A membership header (voter and learner counts) followed by `ids`.
fn membership_bytes(voters: u32, learners: u32, ids: &[u64]) -> Vec<u8> {
    let mut b = voters.to_le_bytes().to_vec();
    b.extend_from_slice(&learners.to_le_bytes());
    for id in ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    b
}

/// A membership header with removed ids (the learner count's flag, then
/// the removed count) followed by `ids`.
fn membership_bytes_removed(voters: u32, learners: u32, removed: u32, ids: &[u64]) -> Vec<u8> {
    let mut b = membership_bytes(voters, learners | REMOVED_FLAG, &[]);
    b.extend_from_slice(&removed.to_le_bytes());
    for id in ids {
        b.extend_from_slice(&id.to_le_bytes());
    }
    b
}

fn hostile_count() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(u32::MAX),
        Just(u32::MAX / 8),
        Just(1 << 29),
        7u32..1 << 31
    ]
}

fn is_corrupt(e: &LogError) -> bool {
    matches!(e, LogError::Corrupt { .. })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The identity record round-trips; garbage, a cut file or a damaged
    /// byte is refused as damage naming the file, and a refused record
    /// is not rewritten by `check_identity`.
    #[test]
    fn identity_files_round_trip_and_refuse_damage(
        node_id in any::<u64>(),
        cluster_id in any::<u64>(),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        body in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = Identity { node_id, cluster_id };
        meta::save_identity(dir.path(), id).expect("save");
        prop_assert_eq!(meta::load_identity(dir.path()).expect("load"), Some(id));
        prop_assert!(!meta::check_identity(dir.path(), id).expect("check"));
        let path = dir.path().join(meta::IDENTITY_FILE);
        let image = std::fs::read(&path).expect("read");
        let mut bad = image.clone();
        bad[flip.index(image.len())] ^= 1 << bit;
        // Checksummed, but not two ids.
        let lying = sealed(b"KID1", &body);
        let lying_ok = body.len() == 16;
        for (bytes, may_load) in [
            (garbage, false),
            (image[..cut.index(image.len())].to_vec(), false),
            (bad, false),
            (lying, lying_ok),
        ] {
            std::fs::write(&path, &bytes).expect("write");
            match meta::load_identity(dir.path()) {
                Ok(Some(got)) if may_load => {
                    prop_assert_eq!(&got.node_id.to_le_bytes()[..], &body[..8]);
                    prop_assert_eq!(&got.cluster_id.to_le_bytes()[..], &body[8..]);
                }
                Ok(got) => prop_assert!(false, "damaged identity {:?} loaded as {:?}", bytes, got),
                Err(e) => {
                    prop_assert!(is_corrupt(&e), "{}", e);
                    prop_assert!(e.to_string().contains(meta::IDENTITY_FILE), "{}", e);
                    prop_assert!(meta::check_identity(dir.path(), id).is_err());
                    prop_assert_eq!(std::fs::read(&path).expect("read"), bytes);
                }
            }
        }
    }

    /// The manifest round-trips through `save_snapshot`; garbage, a cut
    /// file, a damaged byte or a checksummed body that is not one position
    /// is refused as damage, and so is loading the snapshot it names.
    #[test]
    fn manifest_files_round_trip_and_refuse_damage(
        position in 1u64..1 << 40,
        data in proptest::collection::vec(any::<u8>(), 0..64),
        garbage in proptest::collection::vec(any::<u8>(), 0..32),
        body in proptest::collection::vec(any::<u8>(), 0..24),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
        membership in membership(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        // (With removed ids or without: a snapshot keeps them.)
        let s = Snapshot {
            meta: SnapshotMeta { position, term: 3, timestamp: 9, membership },
            data: Bytes::from(data),
        };
        prop_assert!(meta::save_snapshot(dir.path(), &s).expect("save"));
        prop_assert_eq!(meta::manifest_position(dir.path()).expect("manifest"), Some(position));
        prop_assert_eq!(meta::load_snapshot(dir.path()).expect("load"), Some(s.clone()));
        let path = dir.path().join(meta::MANIFEST_FILE);
        let image = std::fs::read(&path).expect("read");
        let mut bad = image.clone();
        bad[flip.index(image.len())] ^= 1 << bit;
        let lying = sealed(b"KMF1", &body);
        for bytes in [garbage, image[..cut.index(image.len())].to_vec(), bad, lying] {
            std::fs::write(&path, &bytes).expect("write");
            match meta::manifest_position(dir.path()) {
                // A checksummed body of one position is a manifest; the
                // snapshot it names must then be there and agree.
                Ok(Some(p)) => {
                    prop_assert_eq!(bytes.len(), 16);
                    prop_assert_eq!(&p.to_le_bytes()[..], &bytes[4..12]);
                    match meta::load_snapshot(dir.path()) {
                        Ok(got) => prop_assert_eq!(got, Some(s.clone())),
                        Err(e) => prop_assert!(p != position, "{}", e),
                    }
                }
                Ok(None) => prop_assert!(false, "a damaged manifest read as none"),
                Err(e) => {
                    prop_assert!(is_corrupt(&e), "{}", e);
                    prop_assert!(e.to_string().contains(meta::MANIFEST_FILE), "{}", e);
                    prop_assert!(meta::load_snapshot(dir.path()).is_err());
                }
            }
        }
    }

    /// Memberships round-trip (with removed ids or without), as long as
    /// the core says; any bytes decode or are refused without a panic, and
    /// what decodes re-encodes to as many bytes (the ids in order, no
    /// duplicates, no removed member); counts claiming more ids than the
    /// bytes hold are refused before anything is allocated for them.
    #[test]
    fn memberships_round_trip_and_refuse_lies(
        m in membership(),
        bytes in proptest::collection::vec(any::<u8>(), 0..80),
        flagged in proptest::collection::vec(any::<u8>(), 0..80),
        voters in hostile_count(),
        learners in hostile_count(),
        removed in hostile_count(),
        ids in proptest::collection::vec(any::<u64>(), 0..6),
    ) {
        let mut b = Vec::new();
        encode_membership(&m, &mut b);
        let len = b.len();
        prop_assert_eq!(len as u64, m.encoded_len());
        b.extend_from_slice(&[0xab; 5]);
        prop_assert_eq!(decode_membership(&b), Ok((m, len)));
        prop_assert!(decode_membership(&b[..len - 1]).is_err());
        // Garbage, and garbage behind a removed-id flag.
        let flagged = [membership_bytes(0, REMOVED_FLAG, &[]), flagged].concat();
        for bytes in [&bytes, &flagged] {
            if let Ok((got, n)) = decode_membership(bytes) {
                prop_assert_eq!(n as u64, got.encoded_len());
                prop_assert!(got.removed.iter().all(|r| !got.contains(*r)), "{:?}", got);
                let mut again = Vec::new();
                encode_membership(&got, &mut again);
                prop_assert_eq!(again.len(), n);
                // Sets come back sorted: equal as memberships.
                prop_assert_eq!(decode_membership(&again), Ok((got, n)));
            }
        }
        for (v, l) in [(voters, 0), (0, learners), (voters, learners), (voters, u32::MAX - voters)] {
            prop_assert!(decode_membership(&membership_bytes(v, l, &ids)).is_err());
        }
        let l = learners & !REMOVED_FLAG;
        for (v, l, r) in [(0, 0, removed), (1, 0, removed), (voters, l, removed), (0, l, 1), (0, 0, u32::MAX)] {
            prop_assert!(decode_membership(&membership_bytes_removed(v, l, r, &ids)).is_err());
        }
    }

    /// A hard state file whose checksum holds but whose fields do not
    /// parse (short, lying membership counts, trailing bytes) is refused as
    /// damage; one that parses loads as what its fields say.
    #[test]
    fn checksummed_hard_state_with_lying_fields(
        term in any::<u64>(),
        vote in any::<u64>(),
        hold in any::<u64>(),
        voters in hostile_count(),
        ids in proptest::collection::vec(any::<u64>(), 0..4),
        tail in proptest::collection::vec(any::<u8>(), 0..20),
        cut in any::<prop::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(meta::HARD_STATE_FILE);
        let mut fields = Vec::new();
        for v in [term, vote, hold] {
            fields.extend_from_slice(&v.to_le_bytes());
        }
        let good = [fields.clone(), membership_bytes_removed(1, 0, 1, &[5, 4])].concat();
        let cases = [
            // Counts claiming gigabytes of ids.
            [fields.clone(), membership_bytes(voters, 0, &ids)].concat(),
            [fields.clone(), membership_bytes(0, voters, &ids)].concat(),
            [fields.clone(), membership_bytes_removed(1, 0, voters, &ids)].concat(),
            // Fields cut short anywhere.
            good[..cut.index(good.len())].to_vec(),
            // Trailing bytes after a whole membership.
            [good.clone(), tail.clone()].concat(),
        ];
        for (i, body) in cases.iter().enumerate() {
            std::fs::write(&path, sealed(b"KHS3", body)).expect("write");
            let r = meta::load_hard_state(dir.path());
            if i == 4 && tail.is_empty() {
                prop_assert!(r.is_ok(), "{:?}", r);
                continue;
            }
            let e = r.expect_err("lying hard state accepted");
            prop_assert!(is_corrupt(&e), "{}", e);
        }
        std::fs::write(&path, sealed(b"KHS3", &good)).expect("write");
        let got = meta::load_hard_state(dir.path()).expect("load").expect("a hard state");
        prop_assert_eq!(got, HardStateFile {
            hard_state: HardState { term, voted_for: (vote != 0).then_some(vote), hold },
            membership: Membership { removed: [4].into(), ..Membership::new([5]) },
        });
    }

    /// A snapshot file, or a backup framed around one with a good SHA-256,
    /// whose header claims a state far longer (or shorter) than the file
    /// is refused, without a panic or an allocation of the claimed size.
    #[test]
    fn snapshot_headers_with_lying_lengths(
        claim in prop_oneof![Just(u64::MAX), Just(u64::MAX - 40), Just(1u64 << 40), any::<u64>()],
        data in proptest::collection::vec(any::<u8>(), 0..600),
        voters in hostile_count(),
    ) {
        let mut header = Vec::new();
        for v in [10u64, 2, 3] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        let good_members = membership_bytes(1, 0, &[1]);
        let path = Path::new("prop.snap");
        for (members, len) in [
            (good_members.clone(), claim),
            (membership_bytes(voters, 0, &[1]), data.len() as u64),
            (membership_bytes_removed(1, 0, voters, &[1, 2]), data.len() as u64),
        ] {
            if members == good_members && len == data.len() as u64 {
                continue; // the claim happened to be true
            }
            let body = [header.clone(), members, len.to_le_bytes().to_vec(), data.clone()].concat();
            // The snapshot checksum covers header and state.
            let file = sealed(b"KSN1", &body);
            let e = meta::decode_snapshot(path, &Bytes::from(file.clone())).expect_err("lying snapshot");
            prop_assert!(is_corrupt(&e), "{}", e);
            let dummy = SnapshotMeta { position: 10, term: 2, timestamp: 3, membership: Membership::new([1]) };
            prop_assert!(!meta::check_snapshot_image(&dummy, &file));
            // Framed as a backup, with a digest that matches.
            let mut framing = meta::BackupFraming::new(7);
            framing.update(&file);
            let framed = [file.clone(), framing.trailer()].concat();
            let e = meta::unwrap_backup(path, &Bytes::from(framed)).expect_err("lying backup");
            prop_assert!(matches!(e, LogError::BadBackup { .. }), "{}", e);
        }
    }

    /// Chunk ranges a follower asks for (offset and length straight off the
    /// wire): inside the file, the bytes; outside, an error; never a panic
    /// or a buffer of the asked length when the range is not in the file.
    #[test]
    fn snapshot_chunk_ranges_are_checked(
        data in proptest::collection::vec(any::<u8>(), 0..300),
        offset in prop_oneof![any::<u64>(), 0u64..400],
        len in prop_oneof![any::<u64>(), 0u64..400, Just(u64::MAX)],
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Snapshot {
            meta: SnapshotMeta { position: 40, term: 1, timestamp: 0, membership: Membership::new([1]) },
            data: Bytes::from(data),
        };
        meta::save_snapshot(dir.path(), &s).expect("save");
        let image = meta::encode_snapshot(&s);
        let size = image.len() as u64;
        match meta::read_snapshot_chunk(dir.path(), 40, offset, len) {
            Ok(Some(chunk)) => {
                prop_assert!(offset.checked_add(len).is_some_and(|e| e <= size));
                prop_assert_eq!(&chunk[..], &image[offset as usize..(offset + len) as usize]);
            }
            Ok(None) => prop_assert!(false, "the file is there"),
            Err(e) => {
                prop_assert!(offset.checked_add(len).is_none_or(|e| e > size), "{}", e);
                prop_assert!(matches!(e, LogError::Invalid(_)), "{}", e);
            }
        }
        prop_assert!(meta::read_snapshot_chunk(dir.path(), 41, offset, len).expect("no file").is_none());
    }
}
