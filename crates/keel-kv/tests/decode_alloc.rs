//! Decoding the KV service's snapshots, commands, queries, responses and
//! watch events allocates in proportion to the bytes present, never to a
//! length or count field: valid encodings rich in lists and byte strings,
//! with every 4- and 8-byte window overwritten by a value claiming
//! gigabytes, decode or are refused with a bounded largest allocation. A
//! counting global allocator measures this test binary.

use bytes::Bytes;
use keel_core::Service;
use keel_kv::*;

#[path = "../../../test-support/alloc_probe.rs"]
mod alloc_probe;
use alloc_probe::*;
mod support;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: Bytes::from(k.to_owned()),
        value: Bytes::from(v.to_owned()),
        create_revision: 2,
        mod_revision: 3,
        version: 1,
        lease: 0,
    }
}

fn range(k: &str) -> RangeRequest {
    RangeRequest {
        key: Bytes::from(k.to_owned()),
        range_end: Bytes::from_static(b"z"),
        ..RangeRequest::default()
    }
}

/// A snapshot of a service with keys, history, leases and auth state.
fn snapshot() -> Vec<u8> {
    let cmds = [
        Command::LeaseGrant { id: 5, ttl: 60 },
        Command::Put {
            key: Bytes::from_static(b"a"),
            value: Bytes::from_static(b"one"),
        },
        Command::Put {
            key: Bytes::from_static(b"a"),
            value: Bytes::from_static(b"two"),
        },
        Command::PutReq(PutRequest {
            key: Bytes::from_static(b"leased"),
            value: Bytes::from_static(b"v"),
            lease: 5,
            ..PutRequest::default()
        }),
        Command::Delete {
            key: Bytes::from_static(b"gone"),
        },
        Command::Auth(AuthCommand::UserAdd {
            name: "root".into(),
            password: Some(Bytes::from_static(b"hash")),
        }),
        Command::Auth(AuthCommand::UserGrantRole {
            user: "root".into(),
            role: "root".into(),
        }),
        Command::Auth(AuthCommand::RoleAdd { name: "r".into() }),
        Command::Auth(AuthCommand::RoleGrantPermission {
            role: "r".into(),
            perm: Permission {
                kind: PermKind::Read,
                key: Bytes::from_static(b"a"),
                range_end: Bytes::from_static(b"z"),
            },
        }),
        Command::Auth(AuthCommand::Enable {
            secret: Bytes::from_static(&[1; 32]),
        }),
    ];
    let mut b = Vec::new();
    Service::snapshot(&support::service_after(&cmds, |_| 1000), &mut b);
    b
}

#[test]
fn kv_decoders_allocate_nothing_for_a_large_field() {
    let txn = TxnRequest {
        compare: vec![TxnCompare {
            key: Bytes::from_static(b"a"),
            range_end: Bytes::new(),
            result: CompareResult::Equal,
            target: CompareTarget::Value(Bytes::from_static(b"one")),
        }],
        success: vec![
            RequestOp::Range(range("a")),
            RequestOp::Txn(TxnRequest {
                failure: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                    key: Bytes::from_static(b"b"),
                    ..DeleteRangeRequest::default()
                })],
                ..TxnRequest::default()
            }),
        ],
        failure: vec![RequestOp::Put(PutRequest {
            key: Bytes::from_static(b"c"),
            value: Bytes::from_static(b"v"),
            ..PutRequest::default()
        })],
    };
    let event = WatchEvent {
        kind: EventType::Put,
        kv: kv("a", "two"),
        prev_kv: Some(kv("a", "one")),
    };
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("snapshot", snapshot()),
        ("txn command", Command::Txn(txn).encode().to_vec()),
        ("range query", Query::RangeReq(range("k")).encode().to_vec()),
        (
            "command as a user",
            Command::As {
                generation: 0,
                user: Some("alice".into()),
                command: Box::new(Command::Auth(AuthCommand::RoleGrantPermission {
                    role: "r".into(),
                    perm: Permission {
                        kind: PermKind::Write,
                        key: Bytes::from_static(b"k"),
                        range_end: Bytes::from_static(b"l"),
                    },
                })),
            }
            .encode()
            .to_vec(),
        ),
        (
            "range response",
            Response::Range {
                revision: 9,
                kvs: vec![kv("a", "1"), kv("b", "2"), kv("c", "3")],
                more: true,
                count: 3,
            }
            .encode()
            .to_vec(),
        ),
        (
            "events",
            Response::Events {
                revision: 9,
                compact_revision: -1,
                events: vec![event.clone(), event.clone()],
                more: Some(7),
            }
            .encode()
            .to_vec(),
        ),
        (
            "leases",
            Response::Leases {
                revision: 9,
                ids: vec![1, 2, 3],
            }
            .encode()
            .to_vec(),
        ),
        ("watch event", event.encode().to_vec()),
    ];
    let mut cases = 0;
    for (what, good) in &images {
        for (at, bad) in with_large_fields(good, |_| {}) {
            let largest = largest_allocation(|| {
                let _ = KvService::decode_snapshot(&bad);
                let _ = Command::decode(&bad);
                let _ = Query::decode(&bad);
                let _ = Response::decode(&bad);
                let _ = WatchEvent::decode(&bad);
            });
            assert!(
                largest <= bound(bad.len()),
                "{what} with a large field at byte {at}: an allocation of {largest} bytes"
            );
            cases += 1;
        }
    }
    assert!(cases > 2000, "{cases} cases");
}
