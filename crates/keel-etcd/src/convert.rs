//! Field-by-field translation between etcd's protobuf messages and
//! keel-kv's request and response types. Enum values outside etcd's range
//! and empty `oneof`s are refused with InvalidArgument rather than guessed.

use keel_etcd_proto::etcdserverpb as pb;
use keel_etcd_proto::mvccpb;
use keel_kv as kv;
use tonic::Status;

fn bad(what: &str) -> Status {
    Status::invalid_argument(format!("etcdserver: {what}"))
}

pub fn kv_out(k: kv::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: k.key,
        create_revision: k.create_revision as i64,
        mod_revision: k.mod_revision as i64,
        version: k.version as i64,
        value: k.value,
        lease: k.lease,
    }
}

/// etcd's `checkRangeRequest` / `checkDeleteRequest`: a range needs a key
/// (keel-kv would read an empty one with a `range_end` as "from the first
/// key"; etcd refuses it, and clients send "\0" for that).
fn check_range_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    Ok(())
}

pub fn range_in(r: pb::RangeRequest) -> Result<kv::RangeRequest, Status> {
    check_range_key(&r.key)?;
    let sort_order = u8::try_from(r.sort_order)
        .ok()
        .and_then(|b| kv::SortOrder::from_u8(b).ok())
        .ok_or_else(|| bad(&format!("unknown sort order {}", r.sort_order)))?;
    let sort_target = u8::try_from(r.sort_target)
        .ok()
        .and_then(|b| kv::SortTarget::from_u8(b).ok())
        .ok_or_else(|| bad(&format!("unknown sort target {}", r.sort_target)))?;
    Ok(kv::RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn put_in(r: pb::PutRequest) -> kv::PutRequest {
    kv::PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    }
}

pub fn delete_in(r: pb::DeleteRangeRequest) -> Result<kv::DeleteRangeRequest, Status> {
    check_range_key(&r.key)?;
    Ok(kv::DeleteRangeRequest {
        key: r.key,
        range_end: r.range_end,
        prev_kv: r.prev_kv,
    })
}

fn compare_in(c: pb::Compare) -> Result<kv::TxnCompare, Status> {
    use pb::compare::TargetUnion as U;
    let result = u8::try_from(c.result)
        .ok()
        .and_then(|b| kv::CompareResult::from_u8(b).ok())
        .ok_or_else(|| bad(&format!("unknown compare result {}", c.result)))?;
    // As etcd's getters do: the operand is the union's value when it holds
    // the target's kind, else zero / empty.
    let int = |want: fn(&U) -> Option<i64>| c.target_union.as_ref().and_then(want).unwrap_or(0);
    let target = match c.target {
        0 => kv::CompareTarget::Version(int(|u| match u {
            U::Version(v) => Some(*v),
            _ => None,
        })),
        1 => kv::CompareTarget::Create(int(|u| match u {
            U::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        2 => kv::CompareTarget::Mod(int(|u| match u {
            U::ModRevision(v) => Some(*v),
            _ => None,
        })),
        3 => kv::CompareTarget::Value(match &c.target_union {
            Some(U::Value(v)) => v.clone(),
            _ => Default::default(),
        }),
        4 => kv::CompareTarget::Lease(int(|u| match u {
            U::Lease(v) => Some(*v),
            _ => None,
        })),
        other => return Err(bad(&format!("unknown compare target {other}"))),
    };
    Ok(kv::TxnCompare {
        key: c.key,
        range_end: c.range_end,
        result,
        target,
    })
}

fn op_in(op: pb::RequestOp) -> Result<kv::RequestOp, Status> {
    use pb::request_op::Request as R;
    Ok(match op.request {
        Some(R::RequestRange(r)) => kv::RequestOp::Range(range_in(r)?),
        Some(R::RequestPut(r)) => kv::RequestOp::Put(put_in(r)),
        Some(R::RequestDeleteRange(r)) => kv::RequestOp::DeleteRange(delete_in(r)?),
        Some(R::RequestTxn(t)) => kv::RequestOp::Txn(txn_in(t)?),
        None => return Err(bad("txn operation has no request")),
    })
}

pub fn txn_in(t: pb::TxnRequest) -> Result<kv::TxnRequest, Status> {
    Ok(kv::TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_in)
            .collect::<Result<_, _>>()?,
        success: t.success.into_iter().map(op_in).collect::<Result<_, _>>()?,
        failure: t.failure.into_iter().map(op_in).collect::<Result<_, _>>()?,
    })
}

/// Does a txn only read, in every branch at every depth?
pub fn txn_is_read_only(t: &kv::TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(|op| match op {
        kv::RequestOp::Range(_) => true,
        kv::RequestOp::Txn(t) => txn_is_read_only(t),
        kv::RequestOp::Put(_) | kv::RequestOp::DeleteRange(_) => false,
    })
}

/// Builds responses, stamping each with the header `header(revision)`.
pub struct Out<'a> {
    pub header: &'a dyn Fn(i64) -> Option<pb::ResponseHeader>,
}

impl Out<'_> {
    pub fn range(&self, r: kv::RangeResponse) -> pb::RangeResponse {
        pb::RangeResponse {
            header: (self.header)(r.revision as i64),
            kvs: r.kvs.into_iter().map(kv_out).collect(),
            more: r.more,
            count: r.count as i64,
        }
    }

    pub fn put(&self, r: kv::PutResponse) -> pb::PutResponse {
        pb::PutResponse {
            header: (self.header)(r.revision as i64),
            prev_kv: r.prev_kv.map(kv_out),
        }
    }

    pub fn delete(&self, r: kv::DeleteRangeResponse) -> pb::DeleteRangeResponse {
        pb::DeleteRangeResponse {
            header: (self.header)(r.revision as i64),
            deleted: r.deleted as i64,
            prev_kvs: r.prev_kvs.into_iter().map(kv_out).collect(),
        }
    }

    /// A nested txn's response has an empty header, as etcd leaves it; the
    /// other responses inside a txn carry only their revision, as etcd's
    /// (only the outermost header has the cluster, member and term).
    pub fn txn(&self, r: kv::TxnResponse, nested: bool) -> pb::TxnResponse {
        use pb::response_op::Response as R;
        let header = if nested {
            Some(pb::ResponseHeader::default())
        } else {
            (self.header)(r.revision as i64)
        };
        let inner = Out {
            header: &|revision| {
                Some(pb::ResponseHeader {
                    revision,
                    ..Default::default()
                })
            },
        };
        pb::TxnResponse {
            header,
            succeeded: r.succeeded,
            responses: r
                .responses
                .into_iter()
                .map(|op| pb::ResponseOp {
                    response: Some(match op {
                        kv::ResponseOp::Range(r) => R::ResponseRange(inner.range(r)),
                        kv::ResponseOp::Put(r) => R::ResponsePut(inner.put(r)),
                        kv::ResponseOp::DeleteRange(r) => R::ResponseDeleteRange(inner.delete(r)),
                        kv::ResponseOp::Txn(t) => R::ResponseTxn(inner.txn(t, true)),
                    }),
                })
                .collect(),
        }
    }
}

/// A watch event in etcd's form; `prev_kv` only when the watch asked.
pub fn event_out(e: &kv::WatchEvent, prev_kv: bool) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            kv::EventType::Put => mvccpb::event::EventType::Put as i32,
            kv::EventType::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(kv_out(e.kv.clone())),
        prev_kv: if prev_kv {
            e.prev_kv.clone().map(kv_out)
        } else {
            None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_operand_follows_the_target_like_etcds_getters() {
        let c = pb::Compare {
            result: 0,
            target: 3, // VALUE, but the union holds a version
            key: "k".into(),
            target_union: Some(pb::compare::TargetUnion::Version(7)),
            range_end: Default::default(),
        };
        let t = compare_in(c).unwrap();
        assert_eq!(t.target, kv::CompareTarget::Value(Default::default()));
        let c = pb::Compare {
            result: 2,
            target: 2,
            key: "k".into(),
            target_union: Some(pb::compare::TargetUnion::ModRevision(9)),
            range_end: Default::default(),
        };
        let t = compare_in(c).unwrap();
        assert_eq!(t.target, kv::CompareTarget::Mod(9));
        assert_eq!(t.result, kv::CompareResult::Less);
    }

    #[test]
    fn out_of_range_enums_and_empty_ops_are_refused() {
        let mut r = pb::RangeRequest {
            key: "a".into(),
            sort_order: 9,
            ..Default::default()
        };
        assert_eq!(
            range_in(r.clone()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        r.sort_order = 1;
        r.sort_target = -1;
        assert!(range_in(r).is_err());
        let t = pb::TxnRequest {
            success: vec![pb::RequestOp { request: None }],
            ..Default::default()
        };
        assert!(txn_in(t).is_err());
        let c = pb::Compare {
            target: 5,
            ..Default::default()
        };
        assert!(compare_in(c).is_err());
    }

    #[test]
    fn ranges_and_deletes_need_a_key_like_etcd() {
        let r = pb::RangeRequest {
            range_end: "z".into(),
            ..Default::default()
        };
        let e = range_in(r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "etcdserver: key is not provided");
        let d = pb::DeleteRangeRequest {
            range_end: "\0".into(),
            ..Default::default()
        };
        assert!(delete_in(d).is_err());
    }

    #[test]
    fn read_only_detection_looks_into_nested_txns() {
        let read = kv::RequestOp::Range(kv::RangeRequest::new("a", ""));
        let put = kv::RequestOp::Put(kv::PutRequest::new("a", "b"));
        let nested = |ops| {
            kv::RequestOp::Txn(kv::TxnRequest {
                success: ops,
                ..Default::default()
            })
        };
        let t = kv::TxnRequest {
            success: vec![read.clone(), nested(vec![read.clone()])],
            failure: vec![read.clone()],
            ..Default::default()
        };
        assert!(txn_is_read_only(&t));
        let t = kv::TxnRequest {
            success: vec![read.clone()],
            failure: vec![nested(vec![put])],
            ..Default::default()
        };
        assert!(!txn_is_read_only(&t));
    }
}
