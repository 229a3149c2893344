//! The on-disk frame of one log entry. A frame occupies exactly
//! `Entry::encoded_len()` bytes, so file offsets and the core's byte
//! positions agree.
//!
//! ```text
//! 0..4    body length (u32 LE)
//! 4..8    CRC-32C of the body
//! 8..16   term
//! 16..24  leader timestamp
//! 24      kind (0 term-start, 1 command, 2 timer, 3 membership, 4 session-close)
//! 25..28  reserved, zero
//! 28..32  CRC-32C of bytes 0..28 (the header)
//! 32..    body: the kind's fields, then the entry data
//! ```
//!
//! Decoding never panics: every malformed input is a `FrameError`.

use bytes::Bytes;
use keel_core::{Entry, EntryKind, Membership, Position, ENTRY_HEADER_LEN};
use std::sync::Arc;

pub const HEADER_LEN: usize = ENTRY_HEADER_LEN as usize;
/// Largest body a frame may carry (64 MiB): a larger length is corruption.
pub const MAX_BODY_LEN: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("body checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BodyChecksum { stored: u32, computed: u32 },
    #[error("body length {0} exceeds the {MAX_BODY_LEN}-byte limit")]
    TooLarge(usize),
    #[error("unknown entry kind {0}")]
    UnknownKind(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("body of a {kind} entry is {len} bytes, shorter than its {need}-byte fields")]
    ShortBody {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error("body of a membership entry ({len} bytes) is not a membership: {reason}")]
    BadMembership { len: usize, reason: &'static str },
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// The body length of `e`'s frame: the kind's fields, then the data.
pub fn body_len(e: &Entry) -> usize {
    // `encoded_len` is the core's size of the whole frame, header included.
    usize::try_from(e.encoded_len() - HEADER_LEN as u64).unwrap_or(usize::MAX)
}

/// Appends the frame of `e` to `out`. Refuses (`TooLarge`, `out` untouched)
/// an entry whose body exceeds `MAX_BODY_LEN`: the decoder takes such a
/// length for corruption, so the frame could never be read back.
pub fn encode(e: &Entry, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = body_len(e);
    if len > MAX_BODY_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    let (kind, fields_start) = (kind_byte(&e.kind), out.len());
    match &e.kind {
        EntryKind::TermStart => {}
        EntryKind::Command { client, seq } => {
            out.extend_from_slice(&client.to_le_bytes());
            out.extend_from_slice(&seq.to_le_bytes());
        }
        EntryKind::Timer { id, deadline } => {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&deadline.to_le_bytes());
        }
        EntryKind::Membership(m) => encode_membership(m, out),
        EntryKind::SessionClose { client } => out.extend_from_slice(&client.to_le_bytes()),
    }
    out.extend_from_slice(&e.data);
    // `len`, at most `MAX_BODY_LEN` (checked above): it fits the u32 field.
    let body_len = out.len() - fields_start;
    debug_assert_eq!(body_len, len);
    let body_crc = crc32c::crc32c(&out[fields_start..]);
    let h = &mut out[start..start + HEADER_LEN];
    h[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&body_crc.to_le_bytes());
    h[8..16].copy_from_slice(&e.term.to_le_bytes());
    h[16..24].copy_from_slice(&e.timestamp.to_le_bytes());
    h[24] = kind;
    let header_crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&header_crc.to_le_bytes());
    Ok(())
}

fn kind_byte(k: &EntryKind) -> u8 {
    match k {
        EntryKind::TermStart => 0,
        EntryKind::Command { .. } => 1,
        EntryKind::Timer { .. } => 2,
        EntryKind::Membership(_) => 3,
        EntryKind::SessionClose { .. } => 4,
    }
}

/// Bit 31 of a membership's learner count: a count of removed ids (u32)
/// follows it, and the removed ids follow the learners. Never set when no
/// id was removed, so such a membership is encoded as before removed ids
/// were recorded (data format 2) and older logs keep their byte positions.
pub const REMOVED_FLAG: u32 = 1 << 31;

/// Membership as `Membership::encoded_len()` bytes:
///
/// ```text
/// voter count (u32 LE)
/// learner count (u32 LE), with REMOVED_FLAG set iff removed ids follow
/// removed count (u32 LE, only if REMOVED_FLAG is set; never 0)
/// voter ids, learner ids, removed ids (u64 LE each, ascending per set)
/// ```
pub fn encode_membership(m: &Membership, out: &mut Vec<u8>) {
    let start = out.len();
    // Counts this large do not fit in memory (a frame body is at most
    // `MAX_BODY_LEN`, 8 Mi ids): the flag bit is never a learner count's.
    debug_assert!(m.learners.len() < REMOVED_FLAG as usize);
    let flag = if m.removed.is_empty() {
        0
    } else {
        REMOVED_FLAG
    };
    out.extend_from_slice(&(m.voters.len() as u32).to_le_bytes());
    out.extend_from_slice(&(m.learners.len() as u32 | flag).to_le_bytes());
    if !m.removed.is_empty() {
        out.extend_from_slice(&(m.removed.len() as u32).to_le_bytes());
    }
    for id in m.voters.iter().chain(&m.learners).chain(&m.removed) {
        out.extend_from_slice(&id.to_le_bytes());
    }
    debug_assert_eq!((out.len() - start) as u64, m.encoded_len());
}

/// Decodes a membership at the start of `b`; returns it and its length
/// (its `encoded_len()`), or why the bytes are not one written by
/// `encode_membership`. Allocates nothing before the bytes for every id
/// the counts claim are known to be there.
pub fn decode_membership(b: &[u8]) -> Result<(Membership, usize), &'static str> {
    const SHORT: &str = "cut short before the ids its counts claim";
    if b.len() < 8 {
        return Err(SHORT);
    }
    let (v, l) = (u32_at(b, 0) as usize, u32_at(b, 4));
    let (l, ids_at, r) = if l & REMOVED_FLAG == 0 {
        (l as usize, 8, 0)
    } else {
        if b.len() < 12 {
            return Err(SHORT);
        }
        match u32_at(b, 8) as usize {
            // Never written: no removed ids is no flag (a flag with none
            // would be 4 bytes longer than the core's length for it).
            0 => return Err("a removed-id count of zero"),
            r => ((l & !REMOVED_FLAG) as usize, 12, r),
        }
    };
    let len = v
        .checked_add(l)
        .and_then(|n| n.checked_add(r))
        .and_then(|n| n.checked_mul(8))
        .and_then(|n| n.checked_add(ids_at))
        .ok_or(SHORT)?;
    if b.len() < len {
        return Err(SHORT);
    }
    let id = |i: usize| u64_at(b, ids_at + 8 * i);
    let m = Membership {
        voters: (0..v).map(id).collect(),
        learners: (v..v + l).map(id).collect(),
        removed: (v + l..v + l + r).map(id).collect(),
    };
    if m.voters.len() != v || m.learners.len() != l || m.removed.len() != r {
        return Err("an id listed twice"); // not something we write
    }
    if m.removed.iter().any(|n| m.contains(*n)) {
        // The core removes an id from the members as it records it, and
        // never adds it again.
        return Err("an id both removed and a member");
    }
    // What decodes re-encodes to as many bytes, so log positions hold.
    debug_assert_eq!(m.encoded_len(), len as u64);
    Ok((m, len))
}

/// Is the header at the start of `b` intact? Returns the body length.
pub fn decode_header(b: &[u8]) -> Result<usize, FrameError> {
    let stored = u32_at(b, 28);
    let computed = crc32c::crc32c(&b[0..28]);
    if stored != computed {
        return Err(FrameError::HeaderChecksum { stored, computed });
    }
    if b[25..28] != [0, 0, 0] {
        return Err(FrameError::Reserved);
    }
    let len = u32_at(b, 0) as usize;
    if len > MAX_BODY_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes the frame at the start of `b` as the entry at `position`.
/// `Ok(None)`: `b` ends before the frame does (incomplete).
pub fn decode(b: &[u8], position: Position) -> Result<Option<(Entry, usize)>, FrameError> {
    if b.len() < HEADER_LEN {
        return Ok(None);
    }
    let body_len = decode_header(b)?;
    let total = HEADER_LEN + body_len;
    if b.len() < total {
        return Ok(None);
    }
    let body = &b[HEADER_LEN..total];
    let stored = u32_at(b, 4);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(FrameError::BodyChecksum { stored, computed });
    }
    let need = |kind: &'static str, need: usize| {
        if body.len() < need {
            Err(FrameError::ShortBody {
                kind,
                len: body.len(),
                need,
            })
        } else {
            Ok(())
        }
    };
    let (kind, fields) = match b[24] {
        0 => (EntryKind::TermStart, 0),
        1 => {
            need("command", 16)?;
            (
                EntryKind::Command {
                    client: u64_at(body, 0),
                    seq: u64_at(body, 8),
                },
                16,
            )
        }
        2 => {
            need("timer", 16)?;
            (
                EntryKind::Timer {
                    id: u64_at(body, 0),
                    deadline: u64_at(body, 8),
                },
                16,
            )
        }
        3 => {
            let (m, len) = decode_membership(body).map_err(|reason| FrameError::BadMembership {
                len: body.len(),
                reason,
            })?;
            (EntryKind::Membership(Arc::new(m)), len)
        }
        4 => {
            need("session-close", 8)?;
            (
                EntryKind::SessionClose {
                    client: u64_at(body, 0),
                },
                8,
            )
        }
        k => return Err(FrameError::UnknownKind(k)),
    };
    let e = Entry {
        term: u64_at(b, 8),
        position,
        timestamp: u64_at(b, 16),
        kind,
        data: Bytes::copy_from_slice(&body[fields..]),
    };
    Ok(Some((e, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Memberships with and without removed ids (disjoint from the
    /// members, as the core keeps them).
    pub(crate) fn membership() -> impl Strategy<Value = Membership> {
        (
            proptest::collection::btree_set(1..100u64, 0..6),
            proptest::collection::btree_set(100..200u64, 0..3),
            prop_oneof![
                Just(std::collections::BTreeSet::new()),
                proptest::collection::btree_set(200..300u64, 1..5),
            ],
        )
            .prop_map(|(voters, learners, removed)| Membership {
                voters,
                learners,
                removed,
            })
    }

    fn kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::TermStart),
            (any::<u64>(), any::<u64>())
                .prop_map(|(client, seq)| EntryKind::Command { client, seq }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(id, deadline)| EntryKind::Timer { id, deadline }),
            membership().prop_map(|m| EntryKind::Membership(Arc::new(m))),
            any::<u64>().prop_map(|client| EntryKind::SessionClose { client }),
        ]
    }

    /// A frame as data format 2 wrote it (before removed ids were
    /// recorded), byte for byte: a membership entry of voters {1, 2} and
    /// learner {9}, then one byte of data, at term 5 and timestamp 77.
    const FORMAT_2_MEMBERSHIP_FRAME: [u8; 65] = [
        0x21, 0x00, 0x00, 0x00, 0xbc, 0x99, 0x06, 0xfe, // body length 33, body CRC
        0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // term
        0x4d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // timestamp
        0x03, 0x00, 0x00, 0x00, 0x96, 0x48, 0xf4, 0xce, // kind, reserved, header CRC
        0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // 2 voters, 1 learner
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // voter 1
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // voter 2
        0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // learner 9
        0x78, // data "x"
    ];

    /// An older log's membership entry decodes with no removed ids, takes
    /// the length it took before (the next entry's position depends on
    /// it), and a membership without removed ids is still written so.
    #[test]
    fn a_format_2_membership_frame_decodes_and_keeps_its_length() {
        let (e, n) = decode(&FORMAT_2_MEMBERSHIP_FRAME, 4096)
            .expect("decodes")
            .expect("whole");
        assert_eq!(n, 65);
        assert_eq!(e.encoded_len(), 65);
        assert_eq!(e.end(), 4096 + 65);
        let expected = Entry {
            term: 5,
            position: 4096,
            timestamp: 77,
            kind: EntryKind::Membership(Arc::new(Membership {
                voters: [1, 2].into(),
                learners: [9].into(),
                removed: Default::default(),
            })),
            data: Bytes::from_static(b"x"),
        };
        assert_eq!(e, expected);
        let mut again = Vec::new();
        encode(&e, &mut again).expect("encodes");
        assert_eq!(again, FORMAT_2_MEMBERSHIP_FRAME);
    }

    /// With removed ids: the learner count's bit 31, the removed count,
    /// then the removed ids after the learners; as long as the core says.
    #[test]
    fn removed_ids_follow_a_flag_in_the_learner_count() {
        let m = Membership {
            voters: [1, 2].into(),
            learners: [9].into(),
            removed: [7, 3].into(),
        };
        let mut b = Vec::new();
        encode_membership(&m, &mut b);
        let mut want = Vec::new();
        for n in [2u32, 1 | REMOVED_FLAG, 2] {
            want.extend_from_slice(&n.to_le_bytes());
        }
        for id in [1u64, 2, 9, 3, 7] {
            want.extend_from_slice(&id.to_le_bytes());
        }
        assert_eq!(b, want);
        assert_eq!(b.len() as u64, m.encoded_len());
        assert_eq!(decode_membership(&b), Ok((m.clone(), b.len())));
        // Cut anywhere: refused, not taken for the old format.
        for cut in 0..b.len() {
            assert!(decode_membership(&b[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// A log frame whose checksums hold around `body` (kind membership).
    fn membership_frame(body: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        b[4..8].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
        b[24] = 3;
        let crc = crc32c::crc32c(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    /// Membership bytes as written: counts (`learners` with its flag bits
    /// as given), an optional removed count, then `ids`.
    fn membership_bytes(voters: u32, learners: u32, removed: Option<u32>, ids: &[u64]) -> Vec<u8> {
        let mut b = voters.to_le_bytes().to_vec();
        b.extend_from_slice(&learners.to_le_bytes());
        if let Some(r) = removed {
            b.extend_from_slice(&r.to_le_bytes());
        }
        for id in ids {
            b.extend_from_slice(&id.to_le_bytes());
        }
        b
    }

    /// Removed ids the encoder never writes are damage, in a membership
    /// and in a log frame whose checksums hold: a flag with no count or a
    /// zero count, a count past the body or overflowing, an id listed
    /// twice, or an id both removed and a member.
    #[test]
    fn lying_removed_ids_are_refused() {
        let f = REMOVED_FLAG;
        let cases: [(&str, Vec<u8>); 9] = [
            ("cut short", membership_bytes(1, f, None, &[])),
            ("zero", membership_bytes(1, f, Some(0), &[1])),
            ("cut short", membership_bytes(1, f, Some(2), &[1, 5])),
            ("cut short", membership_bytes(1, f, Some(u32::MAX), &[1, 5])),
            (
                "cut short",
                membership_bytes(u32::MAX, f | (u32::MAX >> 1), Some(u32::MAX), &[1]),
            ),
            ("twice", membership_bytes(1, f, Some(2), &[1, 5, 5])),
            (
                "both removed and a member",
                membership_bytes(2, f, Some(1), &[1, 2, 2]),
            ),
            (
                "both removed and a member",
                membership_bytes(1, 1 | f, Some(1), &[1, 9, 9]),
            ),
            (
                "both removed and a member",
                membership_bytes(1, f, Some(2), &[1, 5, 1]),
            ),
        ];
        for (why, body) in cases {
            let err = decode_membership(&body).expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
            match decode(&membership_frame(&body), 0) {
                Err(FrameError::BadMembership { reason, .. }) => assert_eq!(reason, err),
                other => panic!("{why}: {other:?}"),
            }
        }
        // The same bytes without the lie decode.
        let ok = membership_bytes(1, f, Some(2), &[1, 5, 6]);
        let (m, n) = decode_membership(&ok).expect("decodes");
        assert_eq!((m.removed, n), ([5, 6].into(), ok.len()));
    }

    /// A body over `MAX_BODY_LEN` is refused, as the decoder would refuse
    /// it, and nothing is encoded; its `u32` length field used to be
    /// written regardless.
    #[test]
    fn encode_refuses_a_body_over_the_limit() {
        let e = |data_len: usize| Entry {
            term: 1,
            position: 0,
            timestamp: 0,
            kind: EntryKind::Command { client: 1, seq: 1 },
            data: Bytes::from(vec![0u8; data_len]),
        };
        let mut out = vec![7u8; 3];
        let too_big = e(MAX_BODY_LEN - 16 + 1);
        assert_eq!(body_len(&too_big), MAX_BODY_LEN + 1);
        assert_eq!(
            encode(&too_big, &mut out),
            Err(FrameError::TooLarge(MAX_BODY_LEN + 1))
        );
        assert_eq!(out, [7, 7, 7], "something was encoded");
        let largest = e(MAX_BODY_LEN - 16);
        encode(&largest, &mut out).expect("the largest body encodes");
        assert_eq!(decode(&out[3..], 0), Ok(Some((largest, out.len() - 3))));
    }

    proptest! {
        #[test]
        fn round_trip_and_length_matches_the_core(
            term in any::<u64>(), ts in any::<u64>(), pos in any::<u64>(), k in kind(),
            data in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let e = Entry { term, position: pos, timestamp: ts, kind: k, data: Bytes::from(data) };
            let mut buf = Vec::new();
            encode(&e, &mut buf).expect("encodes");
            prop_assert_eq!(buf.len() as u64, e.encoded_len());
            prop_assert_eq!(decode(&buf, pos), Ok(Some((e.clone(), buf.len()))));
            // Every strict prefix is incomplete, never an error or a panic.
            for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, buf.len() - 1] {
                if cut < buf.len() {
                    prop_assert_eq!(decode(&buf[..cut], pos), Ok(None));
                }
            }
        }

        /// Every membership frame is as long as the core says (log
        /// positions depend on it), with and without removed ids; without,
        /// exactly as long as before they were recorded, with no flag.
        #[test]
        fn membership_frames_are_as_long_as_the_core_says(
            m in membership(),
            data in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let e = Entry {
                term: 2, position: 100, timestamp: 3,
                kind: EntryKind::Membership(Arc::new(m.clone())), data: Bytes::from(data),
            };
            let mut buf = Vec::new();
            encode(&e, &mut buf).expect("encodes");
            prop_assert_eq!(buf.len() as u64, e.encoded_len());
            let fields = 8 + 8 * (m.voters.len() + m.learners.len());
            let flagged = u32_at(&buf, HEADER_LEN + 4) & REMOVED_FLAG != 0;
            prop_assert_eq!(flagged, !m.removed.is_empty());
            if m.removed.is_empty() {
                prop_assert_eq!(body_len(&e), fields + e.data.len());
            } else {
                prop_assert_eq!(body_len(&e), fields + 4 + 8 * m.removed.len() + e.data.len());
            }
            let (d, n) = decode(&buf, 100).expect("decodes").expect("whole");
            prop_assert_eq!(n as u64, d.encoded_len());
            prop_assert_eq!(d, e);
        }

        #[test]
        fn any_single_bit_flip_is_detected(
            data in proptest::collection::vec(any::<u8>(), 0..64), bit in any::<usize>(),
        ) {
            let e = Entry { term: 3, position: 0, timestamp: 9, kind: EntryKind::Command { client: 1, seq: 2 }, data: Bytes::from(data) };
            let mut buf = Vec::new();
            encode(&e, &mut buf).expect("encodes");
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            if let Ok(Some((d, _))) = decode(&buf, 0) {
                prop_assert!(false, "flip of bit {} went unnoticed: {:?}", bit, d);
            }
        }

        #[test]
        fn decoding_garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&b, 0);
            let _ = decode_membership(&b);
        }
    }
}
