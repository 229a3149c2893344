//! etcd's KV service: Range (linearizable through read-index, or
//! serializable from this node), Put, DeleteRange, Txn (one log entry; a
//! txn that only reads is served as a read) and Compact, on keel-kv; each
//! as the caller its token names (`auth`).

use crate::convert::{self, Out};
use crate::{unexpected, Api};
use keel_etcd_proto::etcdserverpb::kv_server::Kv;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::{Command, Query, Response as KvResponse};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct KvApi(pub Arc<Api>);

/// Is every operation of a txn a serializable range? Such a txn is
/// answered from this node's state without a linearizable read, as etcd's
/// `isTxnSerializable` decides: a txn with no operations at all (compares
/// only) is one, and a nested txn never is, whatever it holds.
fn txn_serializable(t: &TxnRequest) -> bool {
    use request_op::Request as R;
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| matches!(&op.request, Some(R::RequestRange(r)) if r.serializable))
}

impl KvApi {
    fn out(&self) -> impl Fn(i64) -> Option<ResponseHeader> + '_ {
        |rev| self.0.header(rev)
    }
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn range(&self, r: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let who = self.0.who(&r).await?;
        let r = r.into_inner();
        let serializable = r.serializable;
        let q = Query::RangeReq(convert::range_in(r)?);
        match self.0.read_as(&who, q, serializable).await? {
            KvResponse::RangeResp(resp) => {
                let h = self.out();
                Ok(Response::new(Out { header: &h }.range(resp)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn put(&self, r: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let who = self.0.who(&r).await?;
        let cmd = Command::PutReq(convert::put_in(r.into_inner()));
        match self.0.write_as(&who, cmd).await? {
            KvResponse::PutResp(resp) => {
                let h = self.out();
                Ok(Response::new(Out { header: &h }.put(resp)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn delete_range(
        &self,
        r: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let who = self.0.who(&r).await?;
        let cmd = Command::DeleteRangeReq(convert::delete_in(r.into_inner())?);
        match self.0.write_as(&who, cmd).await? {
            KvResponse::DeleteRangeResp(resp) => {
                let h = self.out();
                Ok(Response::new(Out { header: &h }.delete(resp)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn txn(&self, r: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let who = self.0.who(&r).await?;
        let r = r.into_inner();
        let serializable = txn_serializable(&r);
        let txn = convert::txn_in(r)?;
        let answer = if convert::txn_is_read_only(&txn) {
            self.0.read_as(&who, Query::Txn(txn), serializable).await?
        } else {
            self.0.write_as(&who, Command::Txn(txn)).await?
        };
        match answer {
            KvResponse::Txn(resp) => {
                let h = self.out();
                Ok(Response::new(Out { header: &h }.txn(resp, false)))
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn compact(
        &self,
        r: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let who = self.0.who(&r).await?;
        let revision = r.into_inner().revision;
        match self.0.write_as(&who, Command::Compact { revision }).await? {
            KvResponse::Compact { revision } => Ok(Response::new(CompactionResponse {
                header: self.0.header(revision as i64),
            })),
            other => Err(unexpected(&other)),
        }
    }
}

/// The store's current revision as this node knows it.
pub async fn current_revision(api: &Api) -> Option<i64> {
    api.local_revision().await.ok().map(|(r, _, _)| r as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_all_serializable_read_txns_are_serializable() {
        let range = |serializable| RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: "a".into(),
                serializable,
                ..Default::default()
            })),
        };
        let t = TxnRequest {
            success: vec![range(true)],
            failure: vec![range(true)],
            ..Default::default()
        };
        assert!(txn_serializable(&t));
        let t = TxnRequest {
            success: vec![range(true), range(false)],
            ..Default::default()
        };
        assert!(!txn_serializable(&t));
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest::default())),
        };
        let t = TxnRequest {
            success: vec![range(true), put],
            ..Default::default()
        };
        assert!(!txn_serializable(&t));
        // As etcd: compares alone are serializable; a nested txn is not,
        // even of serializable ranges only.
        assert!(txn_serializable(&TxnRequest::default()));
        let nested = RequestOp {
            request: Some(request_op::Request::RequestTxn(TxnRequest {
                success: vec![range(true)],
                ..Default::default()
            })),
        };
        let t = TxnRequest {
            success: vec![nested],
            ..Default::default()
        };
        assert!(!txn_serializable(&t));
    }
}
