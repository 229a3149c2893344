//! The etcd API's request path for untrusted input, end to end: a request
//! as protobuf bytes (gRPC) or JSON (the gateway), valid, cut or mutated,
//! then etcd's checks (`convert`) and Keel's (`validate`), then the log
//! encoding. Never a panic; a request is refused with InvalidArgument or
//! taken whole, and whatever passes every check encodes to a command that
//! decodes back to itself (what the service will apply is what was
//! checked). Also the HTTP endpoints' own parsers (the CORS setting and the
//! `/health` query).

use bytes::Bytes;
use keel_etcd::convert;
use keel_etcd::gateway;
use keel_etcd::http::{Cors, HealthCheck};
use keel_etcd_proto::etcdserverpb as pb;
use keel_kv::{Command, Query};
use proptest::prelude::*;
use prost::Message;

fn small_bytes() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        Just(Bytes::from_static(b"\0")),
        "[a-c]{1,3}".prop_map(Bytes::from),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(Bytes::from),
    ]
}

/// Enum fields straight off the wire: in range, just out of it, anything.
fn enum_i32() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..4, -1i32..6, any::<i32>()]
}

fn range() -> impl Strategy<Value = pb::RangeRequest> {
    (
        small_bytes(),
        small_bytes(),
        any::<i64>(),
        prop_oneof![Just(0i64), any::<i64>()],
        enum_i32(),
        enum_i32(),
        any::<(bool, bool, bool)>(),
        any::<[i64; 4]>(),
    )
        .prop_map(
            |(key, range_end, limit, revision, sort_order, sort_target, flags, rev)| {
                pb::RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order,
                    sort_target,
                    serializable: flags.0,
                    keys_only: flags.1,
                    count_only: flags.2,
                    min_mod_revision: rev[0],
                    max_mod_revision: rev[1],
                    min_create_revision: rev[2],
                    max_create_revision: rev[3],
                }
            },
        )
}

fn compare() -> impl Strategy<Value = pb::Compare> {
    use pb::compare::TargetUnion as U;
    (
        enum_i32(),
        enum_i32(),
        small_bytes(),
        small_bytes(),
        prop_oneof![
            Just(None),
            any::<i64>().prop_map(|v| Some(U::Version(v))),
            any::<i64>().prop_map(|v| Some(U::ModRevision(v))),
            small_bytes().prop_map(|v| Some(U::Value(v))),
            any::<i64>().prop_map(|v| Some(U::Lease(v))),
        ],
    )
        .prop_map(
            |(result, target, key, range_end, target_union)| pb::Compare {
                result,
                target,
                key,
                range_end,
                target_union,
            },
        )
}

fn op(txn: BoxedStrategy<pb::TxnRequest>) -> impl Strategy<Value = pb::RequestOp> {
    use pb::request_op::Request as R;
    prop_oneof![
        1 => Just(None),
        3 => range().prop_map(|r| Some(R::RequestRange(r))),
        3 => (small_bytes(), small_bytes(), any::<i64>(), any::<[bool; 3]>()).prop_map(|(key, value, lease, f)| {
            Some(R::RequestPut(pb::PutRequest { key, value, lease, prev_kv: f[0], ignore_value: f[1], ignore_lease: f[2] }))
        }),
        2 => (small_bytes(), small_bytes(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| {
            Some(R::RequestDeleteRange(pb::DeleteRangeRequest { key, range_end, prev_kv }))
        }),
        1 => txn.prop_map(|t| Some(R::RequestTxn(t))),
    ]
    .prop_map(|request| pb::RequestOp { request })
}

fn txn() -> impl Strategy<Value = pb::TxnRequest> {
    let leaf = Just(pb::TxnRequest::default()).boxed();
    leaf.prop_recursive(3, 24, 4, |inner| {
        (
            proptest::collection::vec(compare(), 0..3),
            proptest::collection::vec(op(inner.clone()), 0..3),
            proptest::collection::vec(op(inner), 0..3),
        )
            .prop_map(|(compare, success, failure)| pb::TxnRequest {
                compare,
                success,
                failure,
            })
            .boxed()
    })
}

/// A refusal is InvalidArgument with etcd's prefix.
fn refused_well(s: &tonic::Status) -> Result<(), TestCaseError> {
    prop_assert_eq!(s.code(), tonic::Code::InvalidArgument, "{:?}", s);
    prop_assert!(s.message().starts_with("etcdserver: "), "{:?}", s);
    Ok(())
}

/// A txn through every check; if it passes, its log encoding decodes to
/// the same command.
fn check_txn(t: pb::TxnRequest) -> Result<(), TestCaseError> {
    match convert::txn_in(t) {
        Err(s) => refused_well(&s)?,
        Ok(t) => {
            let c = Command::Txn(t);
            if c.validate().is_ok() {
                prop_assert_eq!(Command::decode(&c.encode()).ok(), Some(c));
            }
        }
    }
    Ok(())
}

fn check_range(r: pb::RangeRequest) -> Result<(), TestCaseError> {
    let (key_given, order, target) = (!r.key.is_empty(), r.sort_order, r.sort_target);
    match convert::range_in(r) {
        Err(s) => {
            refused_well(&s)?;
            prop_assert!(!key_given || !(0..=2).contains(&order) || !(0..=4).contains(&target));
        }
        Ok(r) => {
            prop_assert!(key_given && (0..=2).contains(&order) && (0..=4).contains(&target));
            if r.validate().is_ok() {
                let q = Query::RangeReq(r);
                prop_assert_eq!(Query::decode(&q.encode()).ok(), Some(q));
            }
        }
    }
    Ok(())
}

/// `t` with every enum value wrapped into etcd's range.
fn known_enums(mut t: pb::TxnRequest) -> pb::TxnRequest {
    use pb::request_op::Request as R;
    for c in &mut t.compare {
        c.result = c.result.rem_euclid(4);
        c.target = c.target.rem_euclid(5);
    }
    for op in t.success.iter_mut().chain(&mut t.failure) {
        match &mut op.request {
            Some(R::RequestRange(r)) => {
                r.sort_order = r.sort_order.rem_euclid(3);
                r.sort_target = r.sort_target.rem_euclid(5);
            }
            Some(R::RequestTxn(inner)) => *inner = known_enums(std::mem::take(inner)),
            _ => {}
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// gRPC: a txn's protobuf bytes, whole, cut or with a byte changed.
    #[test]
    fn txn_protobuf_bytes_are_refused_or_taken_whole(
        t in txn(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let wire = t.encode_to_vec();
        prop_assert_eq!(pb::TxnRequest::decode(&wire[..]).expect("decodes"), t.clone());
        check_txn(t)?;
        let mut bad = wire.clone();
        if !bad.is_empty() {
            let i = at.index(bad.len());
            bad[i] = byte;
        }
        for b in [&wire[..cut.index(wire.len() + 1)], &bad[..]] {
            if let Ok(t) = pb::TxnRequest::decode(b) {
                check_txn(t)?;
            }
        }
    }

    /// gRPC: a range's protobuf bytes, whole or with a byte changed.
    #[test]
    fn range_protobuf_bytes_are_refused_or_taken_whole(
        r in range(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        check_range(r.clone())?;
        let mut bad = r.encode_to_vec();
        if !bad.is_empty() {
            let i = at.index(bad.len());
            bad[i] = byte;
        }
        if let Ok(r) = pb::RangeRequest::decode(&bad[..]) {
            check_range(r)?;
        }
    }

    /// The JSON gateway: a txn's JSON, whole, cut or with a character
    /// changed, parsed as the gateway parses a body.
    #[test]
    fn txn_json_bodies_are_refused_or_taken_whole(
        t in txn(),
        cut in any::<prop::sample::Index>(),
        at in any::<prop::sample::Index>(),
        ch in prop::sample::select(b"{}[]\":,0-9azAZ=\\ n".to_vec()),
    ) {
        // (JSON names enum values: only those etcd defines can be written.)
        let t = known_enums(t);
        let json = serde_json::to_vec(&t).expect("json");
        prop_assert_eq!(gateway::parse::<pb::TxnRequest>(&json).expect("parses"), t.clone());
        let mut bad = json.clone();
        let i = at.index(bad.len());
        bad[i] = ch;
        for b in [&json[..cut.index(json.len() + 1)], &bad[..]] {
            match gateway::parse::<pb::TxnRequest>(b) {
                Ok(t) => check_txn(t)?,
                Err(s) => prop_assert_eq!(s.code(), tonic::Code::InvalidArgument),
            }
        }
    }

    /// The `etcd_cors` setting: any entries are refused naming the entry,
    /// or read as origins the way a browser's Origin header spells them.
    #[test]
    fn cors_settings_never_panic(origins in proptest::collection::vec("[ -~]{0,24}|(https?|app)://[a-zA-Z0-9.:/-]{0,16}", 0..4)) {
        match Cors::parse(&origins) {
            Ok(Cors::Origins(list)) => {
                for o in &list {
                    prop_assert!(o.contains("://") && !o.ends_with('/'), "{:?}", o);
                    prop_assert_eq!(o.to_ascii_lowercase(), o.clone());
                }
            }
            Ok(_) => {}
            Err(e) => prop_assert!(e.starts_with("etcd_cors: ") && origins.iter().any(|o| e.contains(&format!("{o:?}"))), "{}", e),
        }
    }

    /// A `/health` query string of any text: never a panic; `serializable`
    /// only when asked for with `true`.
    #[test]
    fn health_queries_never_panic(q in ".{0,40}|(exclude|serializable)=[A-Za-z&=]{0,12}") {
        let check = HealthCheck::from_query(Some(&q));
        if check.serializable {
            prop_assert!(q.contains("serializable=true"));
        }
        prop_assert!(check.excluded.iter().all(|a| !a.is_empty()));
    }
}
