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

/// Membership as (voter count u32, learner count u32, ids u64...).
pub fn encode_membership(m: &Membership, out: &mut Vec<u8>) {
    out.extend_from_slice(&(m.voters.len() as u32).to_le_bytes());
    out.extend_from_slice(&(m.learners.len() as u32).to_le_bytes());
    for id in m.voters.iter().chain(m.learners.iter()) {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// Decodes a membership at the start of `b`; returns it and its length.
pub fn decode_membership(b: &[u8]) -> Option<(Membership, usize)> {
    if b.len() < 8 {
        return None;
    }
    let (v, l) = (u32_at(b, 0) as usize, u32_at(b, 4) as usize);
    let len = v.checked_add(l)?.checked_mul(8)?.checked_add(8)?;
    if b.len() < len {
        return None;
    }
    let ids: Vec<u64> = (0..v + l).map(|i| u64_at(b, 8 + 8 * i)).collect();
    let m = Membership {
        voters: ids[..v].iter().copied().collect(),
        learners: ids[v..].iter().copied().collect(),
        removed: Default::default(),
    };
    if m.voters.len() != v || m.learners.len() != l {
        return None; // duplicates: not something we write
    }
    Some((m, len))
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
            let (m, len) = decode_membership(body).ok_or(FrameError::ShortBody {
                kind: "membership",
                len: body.len(),
                need: 8,
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

    fn kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::TermStart),
            (any::<u64>(), any::<u64>())
                .prop_map(|(client, seq)| EntryKind::Command { client, seq }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(id, deadline)| EntryKind::Timer { id, deadline }),
            (
                proptest::collection::btree_set(1..100u64, 0..6),
                proptest::collection::btree_set(100..200u64, 0..3)
            )
                .prop_map(|(voters, learners)| EntryKind::Membership(Arc::new(
                    Membership {
                        voters,
                        learners,
                        removed: Default::default(),
                    }
                ))),
            any::<u64>().prop_map(|client| EntryKind::SessionClose { client }),
        ]
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
