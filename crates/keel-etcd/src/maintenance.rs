//! etcd's Maintenance service: status (the version string of a compatible
//! etcd release, leader, raft term and index as Keel's log positions),
//! alarms (NOSPACE from the space quota, `keel_kv::quota`: listed and
//! disarmed; not raised by hand), defragment (nothing to do: the log is
//! compacted by snapshots), hash / hash-kv (a CRC-32C over the retained
//! history, equal on every replica at the same revision; not etcd's value),
//! and move-leader (a Keel leadership transfer; asked of the leader, as in
//! etcd). Snapshot downloads are refused with a message saying why.

use crate::{node_error, Api};
use keel_etcd_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::{Query, Response as KvResponse};
use keel_net::codec::{ClientOp, ClientResult};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The etcd release whose API Keel serves (what `etcdctl endpoint status`
/// prints as the version).
pub const ETCD_VERSION: &str = "3.4.30";

/// Why `Snapshot` (`etcdctl snapshot save`) is refused.
pub const SNAPSHOT_NOT_SERVED: &str = "etcdserver: snapshot download is not served by Keel: \
its state is not an etcd (bbolt) database, which `etcdctl snapshot restore` and `status` need";

pub struct MaintenanceApi(pub Arc<Api>);

#[tonic::async_trait]
impl Maintenance for MaintenanceApi {
    /// The NOSPACE alarm of this member's quota: `GET` lists it while it
    /// is raised; `DEACTIVATE` (`etcdctl alarm disarm`) lowers it and
    /// answers with what it lowered (the quota raises it again at the next
    /// refused write, and lists it while the history is at or past the
    /// quota). Alarms are this member's: its history is every member's at
    /// the same revision. `ACTIVATE` is refused: a raised alarm would not
    /// stop writes here, only the quota does.
    async fn alarm(&self, r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let r = r.into_inner();
        let id = self.0.node.id();
        let quota = self.0.config.quota.as_ref();
        let raised = || quota.is_some_and(|q| q.alarm());
        let nospace = || AlarmMember {
            member_id: id,
            alarm: AlarmType::Nospace as i32,
        };
        let alarms = match alarm_request::AlarmAction::try_from(r.action) {
            Ok(alarm_request::AlarmAction::Get) => raised().then(nospace).into_iter().collect(),
            Ok(alarm_request::AlarmAction::Deactivate) => {
                let ours = (r.member_id == 0 || r.member_id == id)
                    && (r.alarm == AlarmType::None as i32 || r.alarm == AlarmType::Nospace as i32);
                let lowered = ours && raised();
                if let (true, Some(q)) = (ours, quota) {
                    q.disarm();
                }
                lowered.then(nospace).into_iter().collect()
            }
            Ok(alarm_request::AlarmAction::Activate) => {
                return Err(Status::invalid_argument(
                    "etcdserver: Keel does not raise alarms on request: \
                     NOSPACE comes from the space quota (kv_quota_bytes)",
                ))
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "etcdserver: unknown alarm action {}",
                    r.action
                )))
            }
        };
        Ok(Response::new(AlarmResponse {
            header: self.0.header(0),
            alarms,
        }))
    }

    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let st = self.0.node.status();
        // One read of this node's KV status for both numbers.
        let (revision, db_size) = self
            .0
            .local_revision()
            .await
            .map_or((0, 0), |(rev, _, size)| (rev as i64, size as i64));
        Ok(Response::new(StatusResponse {
            header: self.0.header(revision),
            version: ETCD_VERSION.to_string(),
            db_size,
            leader: st.leader.unwrap_or(0),
            raft_index: st.commit,
            raft_term: st.term,
            raft_applied_index: st.applied,
            // As etcd lists its raised alarms.
            errors: self
                .0
                .config
                .quota
                .as_ref()
                .filter(|q| q.alarm())
                .map(|_| format!("memberID:{} alarm:NOSPACE ", st.id))
                .into_iter()
                .collect(),
            db_size_in_use: db_size,
            is_learner: st.learners.contains(&st.id),
            ..Default::default()
        }))
    }

    /// Refused with `SNAPSHOT_NOT_SERVED` (the generated stub's answer,
    /// "Not yet implemented", would promise something that is not coming).
    async fn snapshot(
        &self,
        _r: Request<SnapshotRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<SnapshotResponse>>, Status> {
        Err(Status::unimplemented(SNAPSHOT_NOT_SERVED))
    }

    async fn defragment(
        &self,
        _r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Ok(Response::new(DefragmentResponse {
            header: self.0.header(0),
        }))
    }

    async fn move_leader(
        &self,
        r: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let target = r.into_inner().target_id;
        match self.0.node.call(ClientOp::TransferLeader(target)).await {
            ClientResult::Ok(_) => Ok(Response::new(MoveLeaderResponse {
                header: self.0.header(0),
            })),
            ClientResult::NotLeader { .. } => {
                Err(Status::failed_precondition("etcdserver: not leader"))
            }
            ClientResult::Error(m) => Err(Status::failed_precondition(m)),
            other => Err(node_error(other)),
        }
    }

    async fn hash(&self, _r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (revision, hash, _) = hash_kv(&self.0, 0).await?;
        Ok(Response::new(HashResponse {
            header: self.0.header(revision),
            hash,
        }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let (revision, hash, compact_revision) = hash_kv(&self.0, r.into_inner().revision).await?;
        Ok(Response::new(HashKvResponse {
            header: self.0.header(revision),
            hash,
            compact_revision,
            hash_revision: 0,
        }))
    }
}

/// This node's hash of the KV history up to `revision` (<= 0: the current
/// one), like etcd's HashKV a per-member answer: (header revision, hash,
/// compaction revision).
async fn hash_kv(api: &Api, revision: i64) -> Result<(i64, u32, i64), Status> {
    match api.read(&Query::HashKv { revision }, true).await? {
        KvResponse::HashKv {
            revision,
            compact_revision,
            hash,
        } => Ok((revision as i64, hash, compact_revision)),
        other => Err(crate::unexpected(&other)),
    }
}
