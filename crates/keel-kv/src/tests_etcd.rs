//! Tests of the etcd v3 semantics driven through `ServiceHost`: revisions
//! across put / delete / txn, reads at past revisions, compaction, every
//! range option, txn compares and operations (nested, duplicate keys),
//! leases with log timers, the watch feed and the event history, hashes.

use crate::tests::{b, kv, put, Harness};
use crate::*;
use bytes::Bytes;
use keel_core::Service;

const SEC: u64 = 1_000_000_000;

fn lkv(k: &str, v: &str, create: u64, modr: u64, version: u64, lease: i64) -> KeyValue {
    KeyValue {
        lease,
        ..kv(k, v, create, modr, version)
    }
}

fn preq(k: &str, v: &str) -> PutRequest {
    PutRequest::new(b(k), b(v))
}

fn rreq(k: &str, end: &[u8]) -> RangeRequest {
    RangeRequest::new(b(k), Bytes::copy_from_slice(end))
}

fn all() -> RangeRequest {
    rreq("", &[0])
}

fn keys(kvs: &[KeyValue]) -> Vec<&[u8]> {
    kvs.iter().map(|k| &k.key[..]).collect()
}

fn err(r: Response) -> (ErrorCode, String) {
    match r {
        Response::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    }
}

impl Harness {
    fn range(&self, r: RangeRequest) -> RangeResponse {
        match self.query(&Query::RangeReq(r)) {
            Response::RangeResp(r) => r,
            other => panic!("{other:?}"),
        }
    }
    fn range_err(&self, r: RangeRequest) -> (ErrorCode, String) {
        err(self.query(&Query::RangeReq(r)))
    }
    fn put_req(&mut self, p: PutRequest) -> Response {
        self.cmd(Command::PutReq(p))
    }
    fn txn(&mut self, t: TxnRequest) -> TxnResponse {
        match self.cmd(Command::Txn(t)) {
            Response::Txn(t) => t,
            other => panic!("{other:?}"),
        }
    }
    fn txn_err(&mut self, t: TxnRequest) -> (ErrorCode, String) {
        err(self.cmd(Command::Txn(t)))
    }
    fn grant(&mut self, id: i64, ttl: i64) -> (i64, i64) {
        match self.cmd(Command::LeaseGrant { id, ttl }) {
            Response::LeaseGrant { id, ttl, .. } => (id, ttl),
            other => panic!("{other:?}"),
        }
    }
    fn rev(&self) -> u64 {
        self.svc().revision()
    }
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp::Put(preq(k, v))
}

fn op_del(k: &str, end: &[u8]) -> RequestOp {
    RequestOp::DeleteRange(DeleteRangeRequest {
        key: b(k),
        range_end: Bytes::copy_from_slice(end),
        prev_kv: false,
    })
}

fn op_range(k: &str, end: &[u8]) -> RequestOp {
    RequestOp::Range(rreq(k, end))
}

fn txn(compare: Vec<TxnCompare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
    TxnRequest {
        compare,
        success,
        failure,
    }
}

fn cmp(k: &str, result: CompareResult, target: CompareTarget) -> TxnCompare {
    TxnCompare::new(b(k), result, target)
}

#[test]
fn revisions_start_at_one_and_move_once_per_write() {
    let mut h = Harness::new();
    assert_eq!(h.rev(), 1, "a fresh store is at revision 1, as etcd");
    assert_eq!(h.range(all()).revision, 1);
    assert!(matches!(
        h.put_req(preq("a", "1")),
        Response::PutResp(PutResponse { revision: 2, .. })
    ));
    // Deleting nothing does not move the revision.
    assert_eq!(
        h.cmd(Command::DeleteRangeReq(DeleteRangeRequest {
            key: b("zz"),
            ..Default::default()
        })),
        Response::DeleteRangeResp(DeleteRangeResponse {
            revision: 2,
            deleted: 0,
            prev_kvs: vec![]
        })
    );
    h.put_req(preq("b", "1"));
    // A txn with several writes moves it once; every change shares it.
    let t = h.txn(txn(
        vec![],
        vec![op_put("c", "1"), op_put("d", "1"), op_del("a", b"")],
        vec![],
    ));
    assert_eq!(t.revision, 4);
    assert!(t.succeeded);
    assert_eq!(h.svc().get(b"c").unwrap().mod_revision, 4);
    assert_eq!(h.svc().get(b"d").unwrap().mod_revision, 4);
    assert_eq!(h.svc().get(b"a"), None);
    // Read-only txns, and write txns that take a branch without writes,
    // leave it alone.
    let t = h.txn(txn(vec![], vec![op_range("c", b"")], vec![]));
    assert_eq!(t.revision, 4);
    let t = h.txn(txn(
        vec![cmp("c", CompareResult::Equal, CompareTarget::Version(9))],
        vec![op_put("x", "1")],
        vec![],
    ));
    assert_eq!((t.revision, t.succeeded, t.responses.len()), (4, false, 0));
    assert_eq!(h.rev(), 4);
    // Compaction and leases do not move it either.
    h.cmd(Command::Compact { revision: 3 });
    h.grant(0, 60);
    assert_eq!(h.rev(), 4);
}

#[test]
fn keys_far_longer_than_a_few_kib_work_as_in_etcd() {
    // etcd limits a key only by its request limit (1.5 MiB by default);
    // Keel refused keys over 4 KiB ("request is too large").
    let mut h = Harness::new();
    for len in [5_000, 64 * 1024, 1024 * 1024] {
        let key = Bytes::from(vec![b'k'; len]);
        let r = h.put_req(PutRequest::new(key.clone(), b("v")));
        assert!(matches!(r, Response::PutResp(_)), "{len}: {r:?}");
        let got = h.range(RangeRequest::new(key.clone(), Bytes::new()));
        assert_eq!(keys(&got.kvs), vec![&key[..]], "{len}");
        // As a range bound and a compare key too.
        let mut end = key.to_vec();
        end.push(0);
        assert_eq!(h.range(RangeRequest::new(key.clone(), end)).count, 1);
        let t = h.txn(txn(
            vec![TxnCompare::new(
                key.clone(),
                CompareResult::Equal,
                CompareTarget::Version(1),
            )],
            vec![RequestOp::DeleteRange(DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            })],
            vec![],
        ));
        assert!(t.succeeded, "{len}");
    }
    // Over etcd's request limit is still refused.
    let key = Bytes::from(vec![b'k'; MAX_KEY_LEN + 1]);
    let (code, _) = err(h.put_req(PutRequest::new(key, b("v"))));
    assert_eq!(code, ErrorCode::KeyTooLarge);
}

#[test]
fn reads_at_past_revisions_and_revision_errors() {
    let mut h = Harness::new();
    h.cmd(put("a", "1")); // 2
    h.cmd(put("a", "2")); // 3
    h.cmd(put("b", "1")); // 4
    h.cmd(Command::Delete { key: b("a") }); // 5
    h.cmd(put("a", "3")); // 6
    let at = |h: &Harness, rev: i64| {
        h.range(RangeRequest {
            revision: rev,
            ..all()
        })
    };
    assert_eq!(at(&h, 2).kvs, vec![kv("a", "1", 2, 2, 1)]);
    assert_eq!(at(&h, 3).kvs, vec![kv("a", "2", 2, 3, 2)]);
    assert_eq!(
        at(&h, 4).kvs,
        vec![kv("a", "2", 2, 3, 2), kv("b", "1", 4, 4, 1)]
    );
    assert_eq!(at(&h, 5).kvs, vec![kv("b", "1", 4, 4, 1)]);
    assert_eq!(
        at(&h, 6).kvs,
        vec![kv("a", "3", 6, 6, 1), kv("b", "1", 4, 4, 1)]
    );
    assert_eq!(at(&h, 0), at(&h, 6));
    assert_eq!(at(&h, -3), at(&h, 6), "a negative revision means current");
    // The header revision is the current one, whatever was asked.
    assert_eq!(at(&h, 2).revision, 6);
    assert_eq!(at(&h, 2).count, 1);
    // A single key at a past revision.
    let r = h.range(RangeRequest {
        revision: 5,
        ..rreq("a", b"")
    });
    assert_eq!((r.kvs.len(), r.count), (0, 0));
    // The future.
    assert_eq!(
        h.range_err(RangeRequest {
            revision: 7,
            ..all()
        }),
        (
            ErrorCode::FutureRevision,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    // Compaction: below the point fails, at the point still reads.
    assert_eq!(
        h.cmd(Command::Compact { revision: 4 }),
        Response::Compact { revision: 6 }
    );
    assert_eq!(
        h.range_err(RangeRequest {
            revision: 3,
            ..all()
        }),
        (
            ErrorCode::Compacted,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    assert_eq!(
        at(&h, 4).kvs,
        vec![kv("a", "2", 2, 3, 2), kv("b", "1", 4, 4, 1)]
    );
    assert_eq!(at(&h, 5).kvs, vec![kv("b", "1", 4, 4, 1)]);
    assert_eq!(at(&h, 0).count, 2);
}

#[test]
fn compaction_errors_and_results() {
    let mut h = Harness::new();
    h.cmd(put("a", "1")); // 2
    h.cmd(put("a", "2")); // 3
    h.cmd(put("b", "1")); // 4
    h.cmd(Command::Delete { key: b("b") }); // 5
    h.cmd(put("a", "3")); // 6
    h.cmd(put("c", "1")); // 7
    assert_eq!(h.svc().compact_revision(), -1);
    assert_eq!(h.svc().store().history_len(), 6);
    let size = h.svc().db_size();
    // Future and repeated compactions fail and change nothing.
    assert_eq!(
        err(h.cmd(Command::Compact { revision: 8 })).0,
        ErrorCode::FutureRevision
    );
    assert_eq!(
        h.cmd(Command::Compact { revision: 5 }),
        Response::Compact { revision: 7 }
    );
    for r in [5, 4, 0, -1] {
        assert_eq!(
            err(h.cmd(Command::Compact { revision: r })),
            (
                ErrorCode::Compacted,
                "etcdserver: mvcc: required revision has been compacted".into()
            ),
            "compact {r}"
        );
    }
    assert_eq!(h.svc().compact_revision(), 5);
    // Kept, as etcd's compaction keeps them: a@3 (the latest entry at or
    // below 5, a put) and a@6; c@7. b's latest entry at or below 5 is its
    // delete at 5, a tombstone, so b's history goes entirely.
    assert_eq!(h.svc().store().history_len(), 3);
    assert!(h.svc().db_size() < size);
    let events = |h: &Harness, from| match h.query(&Query::Events {
        start: Bytes::new(),
        end: Bytes::from_static(&[0]),
        from_revision: from,
        limit: 0,
    }) {
        Response::Events {
            events,
            compact_revision,
            ..
        } => {
            assert_eq!(compact_revision, h.svc().compact_revision());
            Ok(events)
        }
        Response::Error { code, .. } => Err(code),
        other => panic!("{other:?}"),
    };
    assert_eq!(events(&h, 4), Err(ErrorCode::Compacted));
    let ev = events(&h, 5).unwrap();
    assert_eq!(
        ev.iter()
            .map(|e| (e.kind, e.kv.key.clone(), e.revision()))
            .collect::<Vec<_>>(),
        vec![(EventType::Put, b("a"), 6), (EventType::Put, b("c"), 7),]
    );
    assert_eq!(ev[0].prev_kv, Some(kv("a", "2", 2, 3, 2)));
    // Compacting at 6 keeps only a@6 and c@7.
    h.cmd(Command::Compact { revision: 6 });
    assert_eq!(h.svc().store().history_len(), 2);
    assert_eq!(events(&h, 5), Err(ErrorCode::Compacted));
    assert_eq!(events(&h, 6).unwrap().len(), 2);
    assert_eq!(
        h.range(RangeRequest {
            revision: 6,
            ..all()
        })
        .kvs,
        vec![kv("a", "3", 2, 6, 3)]
    );
    // Status reports the point; a restored copy keeps it.
    match h.query(&Query::Status) {
        Response::Status {
            compact_revision,
            revision,
            keys,
            ..
        } => assert_eq!((compact_revision, revision, keys), (6, 7, 2)),
        other => panic!("{other:?}"),
    }
    let snap = h.svc().snapshot_vec();
    let mut t = KvService::new();
    t.restore(Some(&snap)).unwrap();
    assert_eq!(t.compact_revision(), 6);
    assert_eq!(&t, h.svc());
    // Compacting at the current revision is allowed.
    assert_eq!(
        h.cmd(Command::Compact { revision: 7 }),
        Response::Compact { revision: 7 }
    );
}

/// a=w (create 2, mod 5, v2), b=t (3, 8, v3), c=x (4, 4, v1), d=v (6, 6, v1).
fn sorted_fixture() -> Harness {
    let mut h = Harness::new();
    for (k, v) in [
        ("a", "z"),
        ("b", "y"),
        ("c", "x"),
        ("a", "w"),
        ("d", "v"),
        ("b", "u"),
        ("b", "t"),
    ] {
        h.cmd(put(k, v));
    }
    h
}

#[test]
fn range_limit_count_more_and_keys_only() {
    let h = sorted_fixture();
    let r = h.range(RangeRequest { limit: 2, ..all() });
    assert_eq!(
        (keys(&r.kvs), r.more, r.count),
        (vec![&b"a"[..], b"b"], true, 4)
    );
    for limit in [4, 5, 0, -1] {
        let r = h.range(RangeRequest { limit, ..all() });
        assert_eq!(
            (r.kvs.len(), r.more, r.count),
            (4, false, 4),
            "limit {limit}"
        );
    }
    let r = h.range(RangeRequest {
        keys_only: true,
        limit: 1,
        ..all()
    });
    assert_eq!(
        r.kvs,
        vec![KeyValue {
            value: Bytes::new(),
            ..kv("a", "w", 2, 5, 2)
        }]
    );
    let r = h.range(RangeRequest {
        count_only: true,
        limit: 1,
        ..all()
    });
    assert_eq!((r.kvs.len(), r.more, r.count), (0, false, 4));
    // Prefix, from-key, single key, reversed and empty ranges.
    let r = h.range(RangeRequest::new(b("b"), prefix_end(b"b")));
    assert_eq!(keys(&r.kvs), vec![&b"b"[..]]);
    assert_eq!(
        keys(&h.range(rreq("b", &[0])).kvs),
        vec![&b"b"[..], b"c", b"d"]
    );
    assert_eq!(h.range(rreq("c", b"")).kvs, vec![kv("c", "x", 4, 4, 1)]);
    assert_eq!(h.range(rreq("d", b"b")).count, 0);
    assert_eq!(h.range(rreq("zz", b"")).count, 0);
}

#[test]
fn range_sort_orders_and_targets() {
    let h = sorted_fixture();
    let sorted = |order, target| {
        let r = h.range(RangeRequest {
            sort_order: order,
            sort_target: target,
            ..all()
        });
        assert_eq!((r.count, r.more), (4, false));
        r.kvs
            .iter()
            .map(|k| String::from_utf8_lossy(&k.key).into_owned())
            .collect::<Vec<_>>()
            .concat()
    };
    use SortOrder::*;
    use SortTarget::*;
    assert_eq!(sorted(None, Key), "abcd");
    assert_eq!(sorted(Ascend, Key), "abcd");
    assert_eq!(sorted(Descend, Key), "dcba");
    // A target other than KEY with order NONE sorts ascending (etcd).
    assert_eq!(sorted(None, Version), "cdab", "ties stay in key order");
    assert_eq!(sorted(Ascend, Version), "cdab");
    assert_eq!(sorted(Descend, Version), "bacd");
    assert_eq!(sorted(Ascend, Create), "abcd");
    assert_eq!(sorted(Descend, Create), "dcba");
    assert_eq!(sorted(None, Mod), "cadb");
    assert_eq!(sorted(Descend, Mod), "bdac");
    assert_eq!(sorted(Ascend, Value), "bdac");
    assert_eq!(sorted(Descend, Value), "cadb");
    // Sorting happens before the limit.
    let r = h.range(RangeRequest {
        sort_order: Ascend,
        sort_target: Value,
        limit: 2,
        ..all()
    });
    assert_eq!(
        (keys(&r.kvs), r.more, r.count),
        (vec![&b"b"[..], b"d"], true, 4)
    );
    // etcd quirk: a non-KEY target with order NONE sorts ascending, but
    // only the first limit + 1 keys (in key order) are fetched and sorted.
    let r = h.range(RangeRequest {
        sort_target: Version,
        limit: 2,
        ..all()
    });
    assert_eq!((keys(&r.kvs), r.more), (vec![&b"c"[..], b"a"], true));
    let r = h.range(RangeRequest {
        sort_order: Ascend,
        sort_target: Version,
        limit: 2,
        ..all()
    });
    assert_eq!((keys(&r.kvs), r.more), (vec![&b"c"[..], b"d"], true));
    // And at a past revision: at 4, a=z b=y c=x.
    let r = h.range(RangeRequest {
        sort_order: Ascend,
        sort_target: Value,
        revision: 4,
        ..all()
    });
    assert_eq!(keys(&r.kvs), vec![&b"c"[..], b"b", b"a"]);
}

#[test]
fn range_min_max_filters() {
    let h = sorted_fixture();
    let f = |min_mod, max_mod, min_create, max_create, limit| {
        let r = h.range(RangeRequest {
            min_mod_revision: min_mod,
            max_mod_revision: max_mod,
            min_create_revision: min_create,
            max_create_revision: max_create,
            limit,
            ..all()
        });
        assert_eq!(r.count, 4, "count ignores the filters, as etcd");
        (
            r.kvs
                .iter()
                .map(|k| String::from_utf8_lossy(&k.key).into_owned())
                .collect::<Vec<_>>()
                .concat(),
            r.more,
        )
    };
    assert_eq!(f(5, 0, 0, 0, 0), ("abd".into(), false));
    assert_eq!(f(0, 5, 0, 0, 0), ("ac".into(), false));
    assert_eq!(f(0, 0, 3, 0, 0), ("bcd".into(), false));
    assert_eq!(f(0, 0, 0, 3, 0), ("ab".into(), false));
    assert_eq!(f(5, 6, 0, 0, 0), ("ad".into(), false));
    assert_eq!(
        f(5, 0, 0, 0, 1),
        ("a".into(), true),
        "filters apply before the limit"
    );
    assert_eq!(f(0, 4, 0, 0, 2), ("c".into(), false));
    assert_eq!(
        f(0, -1, 0, 0, 0),
        ("".into(), false),
        "etcd compares as int64"
    );
}

#[test]
fn put_options_and_errors() {
    let mut h = Harness::new();
    // A lease that does not exist.
    let r = h.put_req(PutRequest {
        lease: 99,
        ..preq("a", "1")
    });
    assert_eq!(
        err(r),
        (
            ErrorCode::LeaseNotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    assert_eq!(h.rev(), 1);
    // ignore_value / ignore_lease need the key.
    for p in [
        PutRequest {
            ignore_value: true,
            ..preq("a", "")
        },
        PutRequest {
            ignore_lease: true,
            ..preq("a", "1")
        },
    ] {
        assert_eq!(
            err(h.put_req(p)),
            (ErrorCode::KeyNotFound, "etcdserver: key not found".into())
        );
    }
    // Provided value / lease with the ignore flags: invalid requests.
    let applied = h.svc().applied_commands();
    assert_eq!(
        err(h.put_req(PutRequest {
            ignore_value: true,
            ..preq("a", "v")
        })),
        (
            ErrorCode::ValueProvided,
            "etcdserver: value is provided".into()
        )
    );
    assert_eq!(
        err(h.put_req(PutRequest {
            ignore_lease: true,
            lease: 5,
            ..preq("a", "")
        })),
        (
            ErrorCode::LeaseProvided,
            "etcdserver: lease is provided".into()
        )
    );
    assert_eq!(h.svc().applied_commands(), applied);
    assert_eq!(h.rev(), 1);
    // prev_kv.
    let (lease, _) = h.grant(0, 60);
    assert_eq!(lease, 1);
    assert_eq!(
        h.put_req(PutRequest {
            lease,
            prev_kv: true,
            ..preq("a", "1")
        }),
        Response::PutResp(PutResponse {
            revision: 2,
            prev_kv: None
        })
    );
    assert_eq!(
        h.put_req(PutRequest {
            prev_kv: true,
            ignore_lease: true,
            ..preq("a", "2")
        }),
        Response::PutResp(PutResponse {
            revision: 3,
            prev_kv: Some(lkv("a", "1", 2, 2, 1, 1))
        })
    );
    assert_eq!(h.svc().get(b"a"), Some(lkv("a", "2", 2, 3, 2, 1)));
    // ignore_value keeps the value; without ignore_lease the lease goes.
    assert_eq!(
        h.put_req(PutRequest {
            ignore_value: true,
            ..preq("a", "")
        }),
        Response::PutResp(PutResponse {
            revision: 4,
            prev_kv: None
        })
    );
    assert_eq!(h.svc().get(b"a"), Some(lkv("a", "2", 2, 4, 3, 0)));
    assert!(h.svc().leases().get(1).unwrap().keys.is_empty());
    // DeleteRange with and without prev_kv.
    h.cmd(put("b", "1"));
    h.cmd(put("c", "1"));
    assert_eq!(
        h.cmd(Command::DeleteRangeReq(DeleteRangeRequest {
            key: b("a"),
            range_end: b("c"),
            prev_kv: true
        })),
        Response::DeleteRangeResp(DeleteRangeResponse {
            revision: 7,
            deleted: 2,
            prev_kvs: vec![kv("a", "2", 2, 4, 3), kv("b", "1", 5, 5, 1)]
        })
    );
    assert_eq!(
        h.cmd(Command::DeleteRangeReq(DeleteRangeRequest {
            key: b("c"),
            ..Default::default()
        })),
        Response::DeleteRangeResp(DeleteRangeResponse {
            revision: 8,
            deleted: 1,
            prev_kvs: vec![]
        })
    );
}

#[test]
fn txn_compare_targets_and_results() {
    let mut h = Harness::new();
    let (lease, _) = h.grant(0, 60);
    h.cmd(put("a", "1")); // 2
    h.cmd(put("b", "2")); // 3
    h.put_req(PutRequest {
        lease,
        ..preq("c", "3")
    }); // 4
    h.cmd(put("a", "1")); // 5: a version 2
    use CompareResult::*;
    use CompareTarget::*;
    let holds = |h: &mut Harness, c: TxnCompare| {
        let t = h.txn(txn(vec![c], vec![op_range("a", b"")], vec![]));
        assert_eq!(t.responses.len(), usize::from(t.succeeded));
        t.succeeded
    };
    let cases: Vec<(TxnCompare, bool)> = vec![
        (cmp("a", Equal, Value(b("1"))), true),
        (cmp("a", NotEqual, Value(b("1"))), false),
        (cmp("a", Greater, Value(b("0"))), true),
        (cmp("a", Less, Value(b("10"))), true),
        (cmp("a", Less, Value(b("1"))), false),
        (cmp("zz", Equal, Value(Bytes::new())), false),
        (cmp("zz", NotEqual, Value(b("x"))), false),
        (cmp("a", Equal, Version(2)), true),
        (cmp("a", Greater, Version(1)), true),
        (cmp("a", Less, Version(2)), false),
        (cmp("zz", Equal, Version(0)), true),
        (cmp("zz", Equal, Create(0)), true),
        (cmp("zz", Equal, Mod(0)), true),
        (cmp("zz", Equal, Lease(0)), true),
        (cmp("a", Equal, Create(2)), true),
        (cmp("a", Equal, Mod(5)), true),
        (cmp("a", NotEqual, Mod(5)), false),
        (cmp("a", Greater, Mod(-1)), true),
        (cmp("c", Equal, Lease(lease)), true),
        (cmp("c", Equal, Lease(0)), false),
        (cmp("a", Equal, Lease(0)), true),
    ];
    for (c, want) in cases {
        assert_eq!(holds(&mut h, c.clone()), want, "{c:?}");
    }
    // Range compares: every key in [key, range_end) must satisfy it.
    let range_cmp = |k: &str, end: &[u8], result, target| TxnCompare {
        range_end: Bytes::copy_from_slice(end),
        ..cmp(k, result, target)
    };
    assert!(holds(&mut h, range_cmp("a", b"c", Greater, Value(b("0")))));
    assert!(!holds(&mut h, range_cmp("a", b"c", Equal, Value(b("1")))));
    assert!(holds(&mut h, range_cmp("a", &[0], Greater, Create(1))));
    assert!(!holds(&mut h, range_cmp("a", &[0], Greater, Create(2))));
    // An empty range compares as one absent key, except for values.
    assert!(holds(&mut h, range_cmp("x", b"y", Equal, Version(0))));
    assert!(!holds(
        &mut h,
        range_cmp("x", b"y", Equal, Value(Bytes::new()))
    ));
    // All compares must hold; the failure branch runs otherwise.
    let t = h.txn(txn(
        vec![cmp("a", Equal, Version(2)), cmp("b", Equal, Version(9))],
        vec![op_put("s", "1")],
        vec![op_put("f", "1"), op_range("f", b"")],
    ));
    assert!(!t.succeeded);
    assert_eq!(t.revision, 6);
    match &t.responses[1] {
        ResponseOp::Range(r) => assert_eq!(r.kvs, vec![kv("f", "1", 6, 6, 1)]),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.svc().get(b"s"), None);
}

#[test]
fn txn_ops_see_earlier_writes_and_nested_compares_see_the_start() {
    let mut h = Harness::new();
    h.cmd(put("y", "1")); // 2
    h.cmd(put("z", "1")); // 3
    h.take_all_events();
    let t = h.txn(txn(
        vec![],
        vec![
            op_range("x", b""),
            op_put("x", "1"),
            op_range("x", b""),
            op_del("y", b""),
            op_range("y", b""),
            RequestOp::Put(PutRequest {
                prev_kv: true,
                ..preq("z", "2")
            }),
            // Compared against the state before the txn: x was absent.
            RequestOp::Txn(txn(
                vec![cmp("x", CompareResult::Equal, CompareTarget::Version(0))],
                vec![op_put("n", "1"), op_del("nothing", b"")],
                vec![op_put("m", "1")],
            )),
        ],
        vec![],
    ));
    assert_eq!(t.revision, 4);
    let want = vec![
        ResponseOp::Range(RangeResponse {
            revision: 3,
            ..Default::default()
        }),
        ResponseOp::Put(PutResponse {
            revision: 4,
            prev_kv: None,
        }),
        ResponseOp::Range(RangeResponse {
            revision: 4,
            kvs: vec![kv("x", "1", 4, 4, 1)],
            more: false,
            count: 1,
        }),
        ResponseOp::DeleteRange(DeleteRangeResponse {
            revision: 4,
            deleted: 1,
            prev_kvs: vec![],
        }),
        ResponseOp::Range(RangeResponse {
            revision: 4,
            ..Default::default()
        }),
        ResponseOp::Put(PutResponse {
            revision: 4,
            prev_kv: Some(kv("z", "1", 3, 3, 1)),
        }),
        ResponseOp::Txn(TxnResponse {
            revision: 0,
            succeeded: true,
            responses: vec![
                ResponseOp::Put(PutResponse {
                    revision: 4,
                    prev_kv: None,
                }),
                ResponseOp::DeleteRange(DeleteRangeResponse {
                    revision: 4,
                    deleted: 0,
                    prev_kvs: vec![],
                }),
            ],
        }),
    ];
    assert_eq!(t.responses, want);
    // Events of the txn, in sub-revision order, all at revision 4.
    let ev = h.take_all_events();
    assert_eq!(
        ev.iter()
            .map(|e| (e.kind, e.kv.key.clone(), e.revision()))
            .collect::<Vec<_>>(),
        vec![
            (EventType::Put, b("x"), 4),
            (EventType::Delete, b("y"), 4),
            (EventType::Put, b("z"), 4),
            (EventType::Put, b("n"), 4),
        ]
    );
    // A delete of nothing in a txn that wrote nothing keeps the revision.
    let t = h.txn(txn(vec![], vec![op_del("nothing", b"")], vec![]));
    assert_eq!(
        t.responses,
        vec![ResponseOp::DeleteRange(DeleteRangeResponse {
            revision: 4,
            ..Default::default()
        })]
    );
    assert_eq!(t.revision, 4);
}

#[test]
fn txn_duplicate_keys_follow_etcds_interval_rules() {
    let mut h = Harness::new();
    h.cmd(put("a", "0"));
    let nested = |s: Vec<RequestOp>, f: Vec<RequestOp>| RequestOp::Txn(txn(vec![], s, f));
    let dup: Vec<Vec<RequestOp>> = vec![
        vec![op_put("a", "1"), op_put("a", "2")],
        vec![op_put("a", "1"), op_del("a", b"")],
        vec![op_del("a", b"c"), op_put("b", "1")],
        vec![op_del("a", &[0xff]), op_put("z", "1")],
        vec![nested(vec![op_put("a", "1")], vec![]), op_put("a", "1")],
        vec![nested(vec![op_del("a", b"")], vec![]), op_put("a", "1")],
        vec![
            nested(vec![op_put("a", "1")], vec![]),
            nested(vec![op_put("a", "1")], vec![]),
        ],
        vec![
            nested(vec![op_del("a", b"b")], vec![]),
            nested(vec![], vec![op_put("a", "1")]),
        ],
        vec![nested(
            vec![op_put("a", "1")],
            vec![op_put("a", "2"), op_put("a", "3")],
        )],
    ];
    let before = h.svc().clone();
    for ops in dup {
        assert_eq!(
            h.txn_err(txn(vec![], ops.clone(), vec![])),
            (
                ErrorCode::DuplicateKey,
                "etcdserver: duplicate key given in txn request".into()
            ),
            "{ops:?}"
        );
        // The failure branch is checked too, whichever runs.
        assert_eq!(
            h.txn_err(txn(vec![], vec![], ops)).0,
            ErrorCode::DuplicateKey
        );
    }
    assert_eq!(h.svc().store(), before.store());
    let ok: Vec<Vec<RequestOp>> = vec![
        vec![op_del("a", b"c"), op_put("c", "1")],
        vec![op_del("a", b""), op_del("a", b"c")],
        vec![nested(vec![op_put("a", "1")], vec![op_put("a", "2")])],
        // etcd checks a nested txn's puts only against deletes seen before it.
        vec![
            nested(vec![op_put("q", "1")], vec![]),
            nested(vec![op_del("q", b"")], vec![]),
        ],
        // etcd's "from key" end "\0" makes an empty interval.
        vec![op_del("p", &[0]), op_put("pz", "1")],
    ];
    for ops in ok {
        let t = h.txn(txn(vec![], ops.clone(), vec![]));
        assert!(t.succeeded, "{ops:?}");
    }
    // The put-then-delete of q at one revision left q deleted; the
    // from-key delete ran before the put of pz.
    assert_eq!(h.svc().get(b"q"), None);
    assert_eq!(h.svc().get(b"pz").map(|k| k.value), Some(b("1")));
    // And such a state snapshots and restores.
    let mut t = KvService::new();
    t.restore(Some(&h.svc().snapshot_vec())).unwrap();
    assert_eq!(&t, h.svc());
}

#[test]
fn txn_checks_fail_atomically() {
    let mut h = Harness::new();
    h.cmd(put("a", "1")); // 2
    h.cmd(put("b", "1")); // 3
    let before = h.svc().clone();
    let no_lease = RequestOp::Put(PutRequest {
        lease: 42,
        ..preq("c", "1")
    });
    let ignore_missing = RequestOp::Put(PutRequest {
        ignore_value: true,
        ..preq("zz", "")
    });
    let at = |rev| {
        RequestOp::Range(RangeRequest {
            revision: rev,
            ..rreq("a", b"")
        })
    };
    let cases = vec![
        (
            vec![op_put("x", "1"), no_lease.clone()],
            ErrorCode::LeaseNotFound,
        ),
        (
            vec![op_put("x", "1"), ignore_missing.clone()],
            ErrorCode::KeyNotFound,
        ),
        (vec![op_put("x", "1"), at(4)], ErrorCode::FutureRevision),
        (vec![at(4)], ErrorCode::FutureRevision),
        (
            vec![RequestOp::Txn(txn(vec![], vec![no_lease.clone()], vec![]))],
            ErrorCode::LeaseNotFound,
        ),
    ];
    for (ops, code) in cases {
        assert_eq!(
            h.txn_err(txn(vec![], ops.clone(), vec![])).0,
            code,
            "{ops:?}"
        );
        assert_eq!(*h.svc().store(), *before.store());
    }
    // Only the branch taken is checked.
    let t = h.txn(txn(
        vec![],
        vec![op_put("x", "1")],
        vec![no_lease, ignore_missing, at(99)],
    ));
    assert!(t.succeeded);
    // Reads at a compacted revision inside a txn.
    h.cmd(Command::Compact { revision: 3 });
    assert_eq!(
        h.txn_err(txn(vec![], vec![at(2)], vec![])).0,
        ErrorCode::Compacted
    );
    assert!(h.txn(txn(vec![], vec![at(3)], vec![])).succeeded);
    // Too many operations (etcd's default limit of 128 per branch; a nested
    // txn gets what its parent leaves).
    let many = |n| {
        (0..n)
            .map(|i| op_put(&format!("k{i}"), "v"))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        h.txn_err(txn(vec![], many(129), vec![])),
        (
            ErrorCode::TooManyOps,
            "etcdserver: too many operations in txn request".into()
        )
    );
    assert!(h.txn(txn(vec![], many(128), vec![])).succeeded);
    let mut full = many(127);
    full.push(RequestOp::Txn(txn(vec![], many(1), vec![])));
    assert_eq!(
        h.txn_err(txn(vec![], full, vec![])).0,
        ErrorCode::TooManyOps
    );
    // An empty compare key.
    assert_eq!(
        h.txn_err(txn(
            vec![cmp("", CompareResult::Equal, CompareTarget::Version(0))],
            vec![],
            vec![]
        ))
        .0,
        ErrorCode::EmptyKey
    );
}

#[test]
fn read_only_txn_as_a_query() {
    let mut h = Harness::new();
    h.cmd(put("a", "1"));
    let q = Query::Txn(txn(
        vec![cmp("a", CompareResult::Equal, CompareTarget::Value(b("1")))],
        vec![
            op_range("a", b""),
            RequestOp::Txn(txn(vec![], vec![op_range("b", b"")], vec![])),
        ],
        vec![],
    ));
    match h.query(&q) {
        Response::Txn(t) => {
            assert!(t.succeeded);
            assert_eq!(t.revision, 2);
            assert_eq!(t.responses.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    let q = Query::Txn(txn(vec![], vec![], vec![op_put("a", "2")]));
    assert_eq!(err(h.query(&q)).0, ErrorCode::NotReadOnly);
    let q = Query::Txn(txn(
        vec![],
        vec![RequestOp::Range(RangeRequest {
            revision: 3,
            ..rreq("a", b"")
        })],
        vec![],
    ));
    assert_eq!(err(h.query(&q)).0, ErrorCode::FutureRevision);
}

impl Harness {
    fn take_all_events(&mut self) -> Vec<WatchEvent> {
        self.svc_mut().take_events()
    }
    fn ttl(&self, id: i64, keys: bool) -> Result<(i64, i64, Vec<Bytes>), ErrorCode> {
        match self.query(&Query::LeaseTimeToLive {
            id,
            keys,
            now: self.time,
        }) {
            Response::LeaseTimeToLive {
                id: got,
                ttl,
                granted_ttl,
                keys,
                ..
            } => {
                assert_eq!(got, id);
                Ok((ttl, granted_ttl, keys))
            }
            Response::Error { code, .. } => Err(code),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn lease_grant_rules() {
    let mut h = Harness::new();
    assert_eq!(h.grant(0, 10), (1, 10), "ids are chosen from 1 up");
    assert_eq!(
        h.grant(0, 1),
        (2, 2),
        "TTLs are raised to the minimum (2 s)"
    );
    assert_eq!(h.grant(0, -5), (3, 2));
    assert_eq!(h.grant(100, 30), (100, 30));
    assert_eq!(h.grant(-7, 30), (-7, 30), "etcd accepts any non-zero id");
    assert_eq!(
        err(h.cmd(Command::LeaseGrant { id: 100, ttl: 5 })),
        (
            ErrorCode::LeaseExists,
            "etcdserver: lease already exists".into()
        )
    );
    assert_eq!(
        err(h.cmd(Command::LeaseGrant {
            id: 0,
            ttl: MAX_LEASE_TTL + 1
        })),
        (
            ErrorCode::LeaseTtlTooLarge,
            "etcdserver: too large lease TTL".into()
        )
    );
    assert_eq!(h.grant(0, MAX_LEASE_TTL), (4, MAX_LEASE_TTL));
    // The counter skips ids in use.
    h.grant(5, 10);
    assert_eq!(h.grant(0, 10).0, 6);
    assert_eq!(h.grant(0, 10).0, 7);
    match h.query(&Query::Leases) {
        Response::Leases { ids, revision } => {
            // Soonest expiry first, as etcd 3.4 lists them (each grant's
            // log time is a little later than the one before).
            assert_eq!(ids, vec![2, 3, 1, 5, 6, 7, 100, -7, 4]);
            assert_eq!(revision, 1);
        }
        other => panic!("{other:?}"),
    }
    // A configured minimum.
    let mut s = KvService::new().with_min_lease_ttl(30);
    match s.apply(Command::LeaseGrant { id: 0, ttl: 5 }) {
        Response::LeaseGrant { ttl, .. } => assert_eq!(ttl, 30),
        other => panic!("{other:?}"),
    }
}

/// A new leader's term start gives every lease its whole TTL again from
/// that entry's log time, as etcd refreshes leases on a leader change, even
/// one whose expiry passed while the cluster had no leader (or while a
/// backup waited to be restored): a timer entry for the old deadline that
/// follows is stale. A term start without data (from a log written before
/// services were told of them) replays as it was first applied.
#[test]
fn a_term_start_refreshes_every_lease() {
    for marked in [true, false] {
        let mut h = Harness::new();
        let (id, _) = h.grant(0, 10);
        let (short, _) = h.grant(0, 3);
        let deadline = h.host.timers()[&1];
        h.put_req(PutRequest {
            lease: id,
            ..preq("a", "1")
        });
        h.put_req(PutRequest {
            lease: short,
            ..preq("b", "1")
        });
        // 20 s past the deadline without a leader, then a new term.
        h.time = deadline + 20 * SEC;
        h.term_start(marked);
        let started = h.time;
        // The old leader's timer entries for the old deadlines.
        h.timer(1, deadline);
        h.timer(2, h.host.timers().get(&2).copied().unwrap_or(0));
        if !marked {
            assert_eq!(h.svc().get(b"a"), None, "no refresh without the mark");
            assert_eq!(h.svc().get(b"b"), None);
            continue;
        }
        assert_eq!(h.host.timers().get(&1), Some(&(started + 10 * SEC)));
        assert_eq!(h.host.timers().get(&2), Some(&(started + 3 * SEC)));
        assert!(h.svc().get(b"a").is_some() && h.svc().get(b"b").is_some());
        assert_eq!(h.ttl(id, false).unwrap().0, 9);
        h.time = started + 3 * SEC;
        h.fire_due();
        assert!(h.svc().get(b"a").is_some());
        assert_eq!(h.svc().get(b"b"), None, "the 3 s lease expired 3 s later");
        h.time = started + 10 * SEC;
        h.fire_due();
        assert_eq!(h.svc().get(b"a"), None, "the 10 s lease expired 10 s later");
    }
}

#[test]
fn lease_expiry_through_log_timers() {
    let mut h = Harness::new();
    let (id, ttl) = h.grant(0, 10);
    assert_eq!((id, ttl), (1, 10));
    let granted_at = h.time;
    let deadline = granted_at + 10 * SEC;
    assert_eq!(h.host.timers().get(&1), Some(&deadline));
    h.put_req(PutRequest {
        lease: id,
        ..preq("b", "1")
    }); // 2
    h.put_req(PutRequest {
        lease: id,
        ..preq("a", "1")
    }); // 3
    h.cmd(put("c", "1")); // 4
    h.advance(SEC + SEC / 2);
    let (left, granted, keys) = h.ttl(id, true).unwrap();
    assert_eq!((left, granted), (8, 10), "remaining TTL is truncated");
    assert_eq!(keys, vec![b("a"), b("b")]);
    assert_eq!(h.ttl(id, false).unwrap().2, Vec::<Bytes>::new());
    // Keep-alive: expiry = log time of the renewal + TTL.
    h.advance(3 * SEC);
    match h.cmd(Command::LeaseKeepAlive { id }) {
        Response::LeaseKeepAlive {
            id: got,
            ttl,
            revision,
        } => {
            assert_eq!((got, ttl, revision), (id, 10, 4))
        }
        other => panic!("{other:?}"),
    }
    let renewed = h.time + 10 * SEC;
    assert_eq!(h.host.timers().get(&1), Some(&renewed));
    assert_eq!(h.ttl(id, false).unwrap().0, 10);
    // The old deadline's timer entry is stale: nothing happens.
    h.time = deadline + SEC;
    h.timer(1, deadline);
    assert_eq!(h.svc().len(), 3);
    // Past the new expiry, before the timer entry: renewal and TTL already
    // say the lease is gone, but keys remain until the timer revokes it.
    h.time = renewed;
    assert_eq!(h.ttl(id, false), Err(ErrorCode::LeaseNotFound));
    assert_eq!(
        err(h.cmd(Command::LeaseKeepAlive { id })).0,
        ErrorCode::LeaseNotFound
    );
    assert_eq!(h.svc().len(), 3);
    h.take_all_events();
    h.fire_due();
    assert!(h.host.timers().is_empty());
    assert_eq!(h.rev(), 5, "all attached keys deleted at one revision");
    assert_eq!(h.svc().get(b"a"), None);
    assert_eq!(h.svc().get(b"b"), None);
    assert!(h.svc().get(b"c").is_some());
    let ev = h.take_all_events();
    assert_eq!(
        ev.iter()
            .map(|e| (e.kind, e.kv.key.clone(), e.revision()))
            .collect::<Vec<_>>(),
        vec![
            (EventType::Delete, b("a"), 5),
            (EventType::Delete, b("b"), 5)
        ]
    );
    assert_eq!(h.svc().leases().len(), 0);
}

#[test]
fn lease_revoke_detach_and_restore() {
    let mut h = Harness::new();
    let (l1, _) = h.grant(0, 60);
    let (l2, _) = h.grant(0, 60);
    h.put_req(PutRequest {
        lease: l1,
        ..preq("a", "1")
    }); // 2
    h.put_req(PutRequest {
        lease: l1,
        ..preq("b", "1")
    }); // 3
    h.put_req(PutRequest {
        lease: l2,
        ..preq("c", "1")
    }); // 4
        // Re-putting without a lease detaches; deleting detaches.
    h.cmd(put("b", "2")); // 5
    h.cmd(Command::Delete { key: b("c") }); // 6
    assert_eq!(h.ttl(l1, true).unwrap().2, vec![b("a")]);
    assert_eq!(h.ttl(l2, true).unwrap().2, Vec::<Bytes>::new());
    // Moving a key to another lease.
    h.put_req(PutRequest {
        lease: l2,
        ..preq("a", "2")
    }); // 7
    assert_eq!(h.ttl(l1, true).unwrap().2, Vec::<Bytes>::new());
    assert_eq!(h.ttl(l2, true).unwrap().2, vec![b("a")]);
    // Snapshots carry leases, expiries and attachments.
    let mut t = KvService::new();
    t.restore(Some(&h.svc().snapshot_vec())).unwrap();
    assert_eq!(&t, h.svc());
    assert_eq!(t.leases().get(l2).unwrap().keys.len(), 1);
    // Revoking a lease without keys does not move the revision.
    assert_eq!(
        h.cmd(Command::LeaseRevoke { id: l1 }),
        Response::LeaseRevoke { revision: 7 }
    );
    assert!(!h.host.timers().contains_key(&(l1 as u64)));
    assert_eq!(
        h.cmd(Command::LeaseRevoke { id: l2 }),
        Response::LeaseRevoke { revision: 8 }
    );
    assert_eq!(h.svc().get(b"a"), None);
    assert_eq!(
        err(h.cmd(Command::LeaseRevoke { id: l2 })),
        (
            ErrorCode::LeaseNotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    assert!(h.host.timers().is_empty());
    // The id counter is part of the snapshot.
    let mut t = KvService::new();
    t.restore(Some(&h.svc().snapshot_vec())).unwrap();
    match t.apply(Command::LeaseGrant { id: 0, ttl: 5 }) {
        Response::LeaseGrant { id, .. } => assert_eq!(id, 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn watch_feed_and_event_history() {
    let mut h = Harness::new();
    h.cmd(put("a", "1")); // 2
    h.txn(txn(
        vec![],
        vec![op_put("b", "1"), op_del("a", b""), op_put("c", "1")],
        vec![],
    )); // 3
    h.cmd(put("b", "2")); // 4
    let feed = h.take_all_events();
    assert!(h.take_all_events().is_empty(), "draining empties the feed");
    let a1 = kv("a", "1", 2, 2, 1);
    let want = vec![
        WatchEvent {
            kind: EventType::Put,
            kv: a1.clone(),
            prev_kv: None,
        },
        WatchEvent {
            kind: EventType::Put,
            kv: kv("b", "1", 3, 3, 1),
            prev_kv: None,
        },
        WatchEvent {
            kind: EventType::Delete,
            kv: KeyValue {
                key: b("a"),
                mod_revision: 3,
                ..KeyValue::default()
            },
            prev_kv: Some(a1),
        },
        WatchEvent {
            kind: EventType::Put,
            kv: kv("c", "1", 3, 3, 1),
            prev_kv: None,
        },
        WatchEvent {
            kind: EventType::Put,
            kv: kv("b", "2", 3, 4, 2),
            prev_kv: Some(kv("b", "1", 3, 3, 1)),
        },
    ];
    assert_eq!(feed, want);
    // The history query returns the same events.
    let events = |h: &Harness, start: &str, end: &[u8], from, limit| match h.query(&Query::Events {
        start: b(start),
        end: Bytes::copy_from_slice(end),
        from_revision: from,
        limit,
    }) {
        Response::Events {
            events,
            more,
            revision,
            compact_revision,
        } => {
            assert_eq!((revision, compact_revision), (4, -1));
            (events, more)
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(events(&h, "", &[0], 0, 0), (want.clone(), None));
    assert_eq!(events(&h, "", &[0], 2, 0), (want.clone(), None));
    assert_eq!(events(&h, "", &[0], 3, 0), (want[1..].to_vec(), None));
    assert_eq!(events(&h, "", &[0], 5, 0), (vec![], None));
    // Limits never split a revision, and say where to go on from.
    assert_eq!(events(&h, "", &[0], 2, 1), (want[..1].to_vec(), Some(3)));
    assert_eq!(events(&h, "", &[0], 2, 2), (want[..4].to_vec(), Some(4)));
    assert_eq!(events(&h, "", &[0], 3, 1), (want[1..4].to_vec(), Some(4)));
    assert_eq!(events(&h, "", &[0], 4, 1), (want[4..].to_vec(), None));
    // Key ranges (one key: from its own history).
    assert_eq!(
        events(&h, "b", b"", 0, 0),
        (vec![want[1].clone(), want[4].clone()], None)
    );
    assert_eq!(events(&h, "b", b"", 0, 1), (vec![want[1].clone()], Some(4)));
    assert_eq!(events(&h, "b", b"", 4, 1), (vec![want[4].clone()], None));
    assert_eq!(events(&h, "zz", b"", 0, 1), (vec![], None));
    assert_eq!(events(&h, "b", &[0], 0, 0).0.len(), 3);
    assert_eq!(
        events(&h, "a", b"b", 0, 0).0,
        vec![want[0].clone(), want[2].clone()]
    );
    // Notifications carry the same feed, encoded.
    h.cmd(put("d", "1"));
    let items = h.svc_mut().take_notifications();
    assert_eq!(items.len(), 1);
    let e = WatchEvent::decode(&items[0]).unwrap();
    assert_eq!(e.kv, kv("d", "1", 5, 5, 1));
    assert!(h.take_all_events().is_empty());
    // Failed and no-op commands publish nothing.
    h.cmd(Command::Delete { key: b("zz") });
    h.cmd(Command::LeaseRevoke { id: 9 });
    assert!(h.take_all_events().is_empty());
}

#[test]
fn hash_kv_and_status() {
    let run = |extra: bool| {
        let mut h = Harness::new();
        h.cmd(put("a", "1"));
        h.cmd(put("b", "1"));
        h.cmd(Command::Delete { key: b("a") });
        if extra {
            h.cmd(put("c", "1"));
        }
        h
    };
    let hash = |h: &Harness, rev| match h.query(&Query::HashKv { revision: rev }) {
        Response::HashKv {
            hash,
            revision,
            compact_revision,
        } => {
            assert_eq!(revision, h.rev());
            assert_eq!(compact_revision, h.svc().compact_revision());
            Ok(hash)
        }
        Response::Error { code, .. } => Err(code),
        other => panic!("{other:?}"),
    };
    let (h1, h2, h3) = (run(false), run(false), run(true));
    assert_eq!(hash(&h1, 0), hash(&h2, 0));
    assert_eq!(hash(&h1, 0), hash(&h1, 4));
    assert_ne!(hash(&h1, 0), hash(&h3, 0));
    assert_eq!(
        hash(&h3, 4),
        hash(&h1, 0),
        "later writes do not change a past hash"
    );
    assert_ne!(hash(&h1, 3), hash(&h1, 4));
    assert_eq!(hash(&h1, 5), Err(ErrorCode::FutureRevision));
    // etcd 3.4 hashes no revision for a negative one (its bucket name
    // only: 1084519789, the value `etcdctl endpoint hashkv --rev=-1`
    // prints against any etcd 3.4), not the current state.
    assert_eq!(hash(&h1, -1), Ok(1_084_519_789));
    assert_eq!(hash(&h3, -7), Ok(1_084_519_789));
    assert_eq!(hash(&Harness::new(), 0), Ok(1_084_519_789));
    let mut h = run(true);
    h.cmd(Command::Compact { revision: 3 });
    assert_eq!(
        hash(&h, 3),
        Err(ErrorCode::Compacted),
        "HashKV: rev <= compact fails"
    );
    assert!(hash(&h, 4).is_ok());
    match h.query(&Query::Status) {
        Response::Status {
            revision,
            keys,
            applied,
            compact_revision,
            db_size,
            leases,
        } => {
            assert_eq!(
                (revision, keys, applied, compact_revision, leases),
                (5, 2, 5, 3, 0)
            );
            assert!(db_size > 0);
            assert_eq!(db_size, h.svc().db_size());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_codes_map_to_grpc() {
    use crate::error::grpc;
    assert_eq!(ErrorCode::Compacted.grpc_code(), grpc::OUT_OF_RANGE);
    assert_eq!(ErrorCode::FutureRevision.grpc_code(), grpc::OUT_OF_RANGE);
    assert_eq!(ErrorCode::LeaseNotFound.grpc_code(), grpc::NOT_FOUND);
    assert_eq!(
        ErrorCode::LeaseExists.grpc_code(),
        grpc::FAILED_PRECONDITION
    );
    assert_eq!(ErrorCode::DuplicateKey.grpc_code(), grpc::INVALID_ARGUMENT);
    assert_eq!(
        ErrorCode::EmptyKey.etcd_message(),
        Some("etcdserver: key is not provided")
    );
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u8(code as u8), Ok(code));
    }
    // Every etcd-style error's message is etcd's.
    for e in [
        KvError::Compacted,
        KvError::FutureRevision,
        KvError::LeaseNotFound,
        KvError::LeaseExists,
        KvError::LeaseTtlTooLarge,
        KvError::DuplicateKey,
        KvError::KeyNotFound,
        KvError::ValueProvided,
        KvError::LeaseProvided,
        KvError::TooManyOps,
    ] {
        assert_eq!(e.code().etcd_message(), Some(e.to_string().as_str()));
    }
}

#[test]
fn malformed_etcd_commands_change_nothing() {
    let mut h = Harness::new();
    let (id, _) = h.grant(0, 60);
    h.put_req(PutRequest {
        lease: id,
        ..preq("a", "1")
    });
    h.take_all_events();
    let before = h.svc().clone();
    let snap = h.svc().snapshot_vec();
    let good = Command::Txn(txn(
        vec![cmp("a", CompareResult::Equal, CompareTarget::Value(b("1")))],
        vec![op_put("b", "2"), op_del("a", b"")],
        vec![op_range("a", b"")],
    ))
    .encode();
    let mut bad: Vec<Bytes> = (1..good.len()).map(|n| good.slice(..n)).collect();
    let mut long = good.to_vec();
    long.push(0);
    bad.push(Bytes::from(long));
    // Unknown compare result, compare target and op tags.
    let (mut r, mut t, mut o) = (good.to_vec(), good.to_vec(), good.to_vec());
    let compare_at = 1 + 4 + 4 + 1 + 4; // count, key "a", empty range_end
    r[compare_at] = 9;
    t[compare_at + 1] = 9;
    o[compare_at + 2 + 4 + 1 + 4] = 9; // after the value operand and the op count
    bad.extend([Bytes::from(r), Bytes::from(t), Bytes::from(o)]);
    // Nesting deeper than MAX_TXN_DEPTH levels below the top txn.
    let mut deep = txn(vec![], vec![], vec![]);
    for _ in 0..=MAX_TXN_DEPTH {
        deep = txn(vec![], vec![RequestOp::Txn(deep)], vec![]);
    }
    bad.push(Command::Txn(deep).encode());
    for data in bad {
        let reply = Response::decode(&h.raw(data.clone())).unwrap();
        assert!(
            matches!(
                reply,
                Response::Error {
                    code: ErrorCode::Malformed,
                    ..
                }
            ),
            "{data:?} -> {reply:?}"
        );
        assert_eq!(*h.svc(), before);
        assert_eq!(h.svc().snapshot_vec(), snap);
        assert!(h.take_all_events().is_empty());
    }
    // A bad sort order in a range query.
    let mut q = Query::RangeReq(all()).encode().to_vec();
    q[1 + 4 + 4 + 1 + 8 + 8] = 3;
    assert_eq!(
        err(Response::decode(&h.host.query(&q)).unwrap()).0,
        ErrorCode::Malformed
    );
}

/// Builds a `KKV2` snapshot by hand (what a service that never used auth
/// writes): keys with entries (main, sub, put as (value, create, version,
/// lease)), then leases (id, ttl, expiry).
#[allow(clippy::type_complexity)]
fn craft(
    revision: u64,
    compacted: i64,
    keys: &[(&str, &[(u64, u32, Option<(&str, u64, u64, i64)>)])],
    leases: &[(i64, i64, u64)],
) -> Vec<u8> {
    let mut s = b"KKV2".to_vec();
    s.extend_from_slice(&0u64.to_le_bytes());
    s.extend_from_slice(&revision.to_le_bytes());
    s.extend_from_slice(&compacted.to_le_bytes());
    s.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for (k, entries) in keys {
        s.extend_from_slice(&(k.len() as u32).to_le_bytes());
        s.extend_from_slice(k.as_bytes());
        s.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (main, sub, put) in entries.iter() {
            s.extend_from_slice(&main.to_le_bytes());
            s.extend_from_slice(&sub.to_le_bytes());
            s.push(u8::from(put.is_some()));
            if let Some((v, create, version, lease)) = put {
                s.extend_from_slice(&(v.len() as u32).to_le_bytes());
                s.extend_from_slice(v.as_bytes());
                s.extend_from_slice(&create.to_le_bytes());
                s.extend_from_slice(&version.to_le_bytes());
                s.extend_from_slice(&lease.to_le_bytes());
            }
        }
    }
    s.extend_from_slice(&1i64.to_le_bytes());
    s.extend_from_slice(&(leases.len() as u64).to_le_bytes());
    for (id, ttl, expiry) in leases {
        s.extend_from_slice(&id.to_le_bytes());
        s.extend_from_slice(&ttl.to_le_bytes());
        s.extend_from_slice(&expiry.to_le_bytes());
    }
    s
}

/// A fresh auth state's snapshot section: disabled, revision 0, no
/// secret, no users, no roles.
pub(crate) const FRESH_AUTH: [u8; 21] = [0; 21];

#[test]
fn restore_checks_history_and_lease_invariants() {
    let good = craft(
        4,
        -1,
        &[
            (
                "a",
                &[(2, 0, Some(("1", 2, 1, 7))), (4, 0, Some(("2", 2, 2, 7)))],
            ),
            ("b", &[(3, 0, Some(("1", 3, 1, 0))), (4, 1, None)]),
        ],
        &[(7, 10, 5 * SEC)],
    );
    let mut t = KvService::new();
    t.restore(Some(&good)).unwrap();
    assert_eq!(t.revision(), 4);
    assert_eq!(t.get(b"a"), Some(lkv("a", "2", 2, 4, 2, 7)));
    assert_eq!(t.get(b"b"), None);
    assert_eq!(t.leases().get(7).unwrap().keys.len(), 1);
    assert_eq!(t.snapshot_vec(), good, "the crafted format is the real one");
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (
            craft(4, -1, &[("a", &[(2, 0, Some(("1", 2, 1, 9)))])], &[]),
            "lease 9, which does not exist",
        ),
        (
            craft(
                4,
                -1,
                &[
                    ("a", &[(2, 0, Some(("1", 2, 1, 0)))]),
                    ("b", &[(2, 0, Some(("1", 2, 1, 0)))]),
                ],
                &[],
            ),
            "used twice",
        ),
        (
            craft(4, -1, &[("a", &[(5, 0, Some(("1", 5, 1, 0)))])], &[]),
            "outside",
        ),
        (craft(4, 5, &[], &[]), "compaction point"),
        (craft(0, -1, &[], &[]), "store revision 0"),
        (
            craft(
                4,
                -1,
                &[(
                    "a",
                    &[(2, 0, Some(("1", 2, 1, 0))), (3, 0, None), (4, 0, None)],
                )],
                &[],
            ),
            "two deletes",
        ),
        (
            craft(
                4,
                -1,
                &[(
                    "a",
                    &[(2, 0, Some(("1", 2, 1, 0))), (3, 0, Some(("1", 2, 5, 0)))],
                )],
                &[],
            ),
            "does not continue",
        ),
        (
            craft(
                4,
                -1,
                &[("a", &[(3, 0, Some(("1", 3, 1, 0))), (2, 0, None)])],
                &[],
            ),
            "increasing revision order",
        ),
        (
            craft(
                4,
                4,
                &[(
                    "a",
                    &[(2, 0, Some(("1", 2, 1, 0))), (3, 0, Some(("1", 2, 2, 0)))],
                )],
                &[],
            ),
            "below the compaction point",
        ),
        (craft(4, -1, &[("b", &[]), ("a", &[])], &[]), "no history"),
        (craft(4, -1, &[], &[(3, 0, 0)]), "TTL 0"),
        (craft(4, -1, &[], &[(3, 5, 0), (2, 5, 0)]), "increasing"),
        (craft(4, -1, &[], &[(0, 5, 0)]), "non-zero"),
    ];
    for (snap, why) in bad {
        let e = t.restore(Some(&snap)).unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
        assert_eq!(t.revision(), 4, "a failed restore leaves the state alone");
    }
}

/// etcd 3.4 lists leases soonest expiry first (`lessor.Leases`), not by
/// id; a renewal moves a lease back, and leases expiring together are
/// listed by id.
#[test]
fn leases_are_listed_soonest_expiry_first() {
    let mut h = Harness::new();
    let listed = |h: &Harness| match h.query(&Query::Leases) {
        Response::Leases { ids, .. } => ids,
        other => panic!("{other:?}"),
    };
    h.grant(1, 300);
    h.grant(2, 200);
    h.grant(3, 100);
    h.grant(4, 250);
    assert_eq!(listed(&h), vec![3, 2, 4, 1]);
    h.advance(200 * SEC);
    h.fire_due();
    h.cmd(Command::LeaseKeepAlive { id: 4 });
    assert_eq!(listed(&h), vec![1, 4]);
    // A term start gives each its whole TTL from one log time.
    h.grant(9, 250);
    h.term_start(true);
    assert_eq!(listed(&h), vec![4, 9, 1]);
}
