//! Decoding allocates in proportion to the bytes actually present, never
//! to a declared length or count: every frame kind, with each of its 4-byte
//! windows (its lengths and counts among them) overwritten by large values,
//! decodes with a bounded largest allocation and bounded total allocation.
//! A counting global allocator measures this test binary's decodes.

use bytes::Bytes;
use keel_core::{Body, Entry, EntryKind, Membership, MembershipChange, Message, SnapshotMeta};
use keel_net::codec::{
    self, ClientOp, ClientRequest, ClientResponse, ClientResult, Frame, NodeStatus,
};
use std::sync::Arc;

#[path = "../../../test-support/alloc_probe.rs"]
mod alloc_probe;
use alloc_probe::*;

const MAX: usize = codec::DEFAULT_MAX_FRAME;

fn enc(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode(f, &mut out);
    out
}

fn peer(body: Body) -> Frame {
    Frame::Peer(Message {
        cluster_id: 7,
        from: 1,
        to: 2,
        term: 3,
        body,
    })
}

fn membership() -> Membership {
    Membership {
        voters: [1, 2, 3].into(),
        learners: [4].into(),
        removed: [5, 6].into(),
    }
}

fn entry(kind: EntryKind, data: &'static [u8]) -> Entry {
    Entry {
        term: 3,
        position: 100,
        timestamp: 5,
        kind,
        data: Bytes::from_static(data),
    }
}

/// One frame of every kind that has a length or a count, and the others.
fn seeds() -> Vec<Frame> {
    let request = |op| {
        Frame::Request(ClientRequest {
            id: 1,
            client: 2,
            seq: 3,
            op,
        })
    };
    let response = |result| Frame::Response(ClientResponse { id: 1, result });
    vec![
        Frame::Hello {
            cluster_id: 7,
            node_id: 1,
            version: codec::PEER_VERSION,
        },
        peer(Body::PreVote {
            last_pos: 1,
            last_term: 2,
        }),
        peer(Body::PreVoteResp {
            granted: true,
            amnesic: true,
            committed: (5, 6),
        }),
        peer(Body::Vote {
            last_pos: 1,
            last_term: 2,
            transfer: true,
        }),
        peer(Body::VoteResp {
            granted: false,
            amnesic: false,
            committed: (7, 8),
        }),
        peer(Body::Append {
            prev_pos: 1,
            prev_term: 2,
            commit: 3,
            heartbeat: 4,
            entries: vec![
                entry(EntryKind::TermStart, b""),
                entry(EntryKind::Command { client: 1, seq: 2 }, b"put k v"),
                entry(EntryKind::Timer { id: 1, deadline: 9 }, b"t"),
                entry(EntryKind::Membership(Arc::new(membership())), b""),
                entry(EntryKind::SessionClose { client: 1 }, b"bye"),
            ],
            to_voter: true,
        }),
        peer(Body::AppendResp {
            ok: true,
            position: 1,
            hint_pos: 2,
            hint_term: 3,
            heartbeat: 4,
            hold: 5,
        }),
        peer(Body::InstallSnapshot {
            meta: SnapshotMeta {
                position: 1,
                term: 2,
                timestamp: 3,
                membership: membership(),
            },
            offset: 0,
            chunk: Bytes::from_static(b"snapshot bytes"),
            done: false,
            to_voter: true,
        }),
        peer(Body::SnapshotAck {
            position: 1,
            received: 2,
        }),
        peer(Body::TimeoutNow { last_pos: 1 }),
        peer(Body::Removed { position: 1 }),
        peer(Body::Forward {
            commands: vec![
                (1, 2, Bytes::from_static(b"a")),
                (3, 4, Bytes::from_static(b"")),
            ],
        }),
        peer(Body::ReadIndex { id: 1 }),
        peer(Body::ReadIndexResp {
            id: 1,
            index: 2,
            ok: true,
        }),
        request(ClientOp::Write(Bytes::from_static(b"write"))),
        request(ClientOp::Read(Bytes::from_static(b"read"))),
        request(ClientOp::StaleRead(Bytes::from_static(b"stale"))),
        request(ClientOp::Status),
        request(ClientOp::TransferLeader(2)),
        request(ClientOp::ChangeMembership(MembershipChange::AddLearner(5))),
        response(ClientResult::Ok(Bytes::from_static(b"ok"))),
        response(ClientResult::StaleOk {
            data: Bytes::from_static(b"stale"),
            applied: 1,
            commit: 2,
        }),
        response(ClientResult::NotLeader {
            leader: Some(2),
            address: Some("127.0.0.1:7000".into()),
        }),
        response(ClientResult::Busy),
        response(ClientResult::Error("no".into())),
        response(ClientResult::Status(NodeStatus {
            id: 1,
            role: "leader".into(),
            term: 3,
            leader: Some(1),
            append: 10,
            durable: 10,
            commit: 9,
            applied: 9,
            voters: vec![1, 2, 3],
            learners: vec![4],
            followers: vec![(2, 10), (3, 9)],
        })),
    ]
}

/// Whatever the bytes, decoding allocates at most a few times what is
/// there: no declared length or count is trusted beyond the bytes present.
fn assert_bounded(buf: &[u8], what: &str) {
    let shared = Bytes::copy_from_slice(buf);
    for (name, (_, largest, total)) in [
        ("decode", measure(|| codec::decode(buf, MAX).map(|_| ()))),
        (
            "decode_shared",
            measure(|| codec::decode_shared(&shared, 0, MAX).map(|_| ())),
        ),
        (
            "frame_size",
            measure(|| codec::frame_size(buf, MAX).map(|_| ())),
        ),
    ] {
        // An `Entry` takes 80 bytes of memory for its 29 on the wire; every
        // other item less than 3 times its encoding.
        assert!(
            largest <= 3 * buf.len() + 128,
            "{name} of {what}: an allocation of {largest} bytes for a {}-byte frame",
            buf.len()
        );
        assert!(
            total <= 16 * buf.len() + 1024,
            "{name} of {what}: {total} bytes allocated for a {}-byte frame",
            buf.len()
        );
    }
}

#[test]
fn seeds_cover_every_kind_and_round_trip() {
    for f in seeds() {
        let buf = enc(&f);
        assert_eq!(codec::decode(&buf, MAX), Ok(Some((f, buf.len()))));
    }
}

#[test]
fn large_lengths_and_counts_in_any_field_allocate_nothing_beyond_the_frame() {
    for f in seeds() {
        let good = enc(&f);
        assert_bounded(&good, &format!("{f:?}"));
        for at in 0..good.len() - 3 {
            let rest = (good.len() - at) as u32;
            for v in [
                u32::MAX,
                u32::MAX / 2,
                1 << 24,
                rest,
                rest / 8,
                rest / 16,
                rest / 20,
                rest / 29,
            ] {
                let mut buf = good.clone();
                buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
                assert_bounded(&buf, &format!("{f:?} with {v} at byte {at}"));
                // With the length prefix kept consistent too.
                if at >= 4 {
                    let len = (buf.len() - 4) as u32;
                    buf[..4].copy_from_slice(&len.to_le_bytes());
                    assert_bounded(&buf, &format!("{f:?} with {v} at byte {at}"));
                }
            }
        }
    }
}

/// A membership's removed ids (peer protocol 3) declaring u32::MAX, 2^24
/// or 2^16 of them, in an entry and in a snapshot's meta: refused from the
/// bytes left, within the same bounds as every other count.
#[test]
fn a_huge_removed_count_allocates_within_bounds() {
    let m = membership();
    // The removed count and ids close a membership: find them on the wire.
    let mut tail = (m.removed.len() as u32).to_le_bytes().to_vec();
    for id in &m.removed {
        tail.extend_from_slice(&id.to_le_bytes());
    }
    let frames = [
        peer(Body::Append {
            prev_pos: 1,
            prev_term: 2,
            commit: 3,
            heartbeat: 4,
            entries: vec![entry(EntryKind::Membership(Arc::new(m.clone())), b"")],
            to_voter: true,
        }),
        peer(Body::InstallSnapshot {
            meta: SnapshotMeta {
                position: 1,
                term: 2,
                timestamp: 3,
                membership: m.clone(),
            },
            offset: 0,
            chunk: Bytes::from_static(b"snapshot bytes"),
            done: false,
            to_voter: true,
        }),
    ];
    for f in frames {
        let good = enc(&f);
        let at = good
            .windows(tail.len())
            .position(|w| w == tail)
            .expect("the removed ids are on the wire");
        for count in [u32::MAX, 1 << 24, 1 << 16] {
            let mut buf = good.clone();
            buf[at..at + 4].copy_from_slice(&count.to_le_bytes());
            let got = codec::decode(&buf, MAX);
            assert!(
                matches!(
                    got,
                    Err(codec::CodecError::CountTooLarge {
                        what: "membership removed ids",
                        ..
                    })
                ),
                "{count}: {got:?}"
            );
            assert_bounded(&buf, &format!("{f:?} declaring {count} removed ids"));
        }
    }
}

/// A declared length of 4 GiB is refused from its four bytes, or (with a
/// limit that admits it) waits for the bytes: it never reserves them.
#[test]
fn a_four_gib_length_allocates_nothing() {
    let mut buf = u32::MAX.to_le_bytes().to_vec();
    buf.extend_from_slice(&[codec::PEER_VERSION, 2, 0, 0, 0]);
    let (got, largest, _) = measure(|| codec::decode(&buf, MAX));
    assert_eq!(
        got,
        Err(codec::CodecError::FrameTooLarge {
            len: u32::MAX as usize,
            max: MAX
        })
    );
    assert_eq!(largest, 0);
    let (got, largest, _) = measure(|| codec::decode(&buf, usize::MAX));
    assert_eq!(got, Ok(None));
    assert_eq!(largest, 0);
    let (got, largest, _) = measure(|| codec::frame_size(&buf, usize::MAX));
    assert_eq!(got, Ok(Some(4 + u32::MAX as usize)));
    assert_eq!(largest, 0);
}

/// The densest frame for memory: entries that each carry a small
/// membership. Decoding it takes a bounded multiple of its size.
#[test]
fn the_densest_append_stays_within_a_small_multiple() {
    let m = Arc::new(Membership {
        voters: [1].into(),
        learners: [2].into(),
        removed: [3].into(),
    });
    let entries = (0..20_000)
        .map(|_| entry(EntryKind::Membership(m.clone()), b""))
        .collect();
    let buf = enc(&peer(Body::Append {
        prev_pos: 0,
        prev_term: 0,
        commit: 0,
        heartbeat: 0,
        entries,
        to_voter: true,
    }));
    let (got, largest, total) = measure(|| codec::decode(&buf, MAX));
    assert!(matches!(got, Ok(Some(_))));
    println!(
        "{} bytes: largest allocation {largest}, total {total} ({:.1}x)",
        buf.len(),
        total as f64 / buf.len() as f64
    );
    assert!(largest <= 3 * buf.len());
    assert!(total <= 16 * buf.len());
}
