//! etcd's Maintenance service: status (the version string of a compatible
//! etcd release, leader, raft term and index as Keel's log positions),
//! alarms (NOSPACE from each member's space quota, `keel_kv::quota`:
//! listed and disarmed cluster-wide; not raised by hand), defragment (nothing to do: the log is
//! compacted by snapshots), hash / hash-kv (a CRC-32C over the retained
//! history, equal on every replica at the same revision; not etcd's value),
//! move-leader (a Keel leadership transfer; asked of the leader, as in
//! etcd) and snapshot (a backup of this member's state, for `keel restore`).

use crate::auth::Who;
use crate::{forwarded, is_forwarded, node_error, Api};
use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_etcd_proto::etcdserverpb::maintenance_server::Maintenance;
use keel_etcd_proto::etcdserverpb::*;
use keel_kv::AuthStore;
use keel_kv::{Query, Response as KvResponse};
use keel_log::meta::BackupFraming;
use keel_net::codec::{ClientOp, ClientResult};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The etcd release whose API Keel serves (what `etcdctl endpoint status`
/// prints as the version).
pub const ETCD_VERSION: &str = "3.4.30";

/// The size of the pieces a backup is streamed in.
const BACKUP_CHUNK: usize = 64 * 1024;

/// How long a backup's client may leave a piece unread before the stream
/// is dropped.
const BACKUP_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// How long `alarm` waits for each other member: under etcdctl's 5 s
/// command timeout, so one member that does not answer fails no listing.
const MEMBER_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct MaintenanceApi(pub Arc<Api>);

impl MaintenanceApi {
    /// This member's NOSPACE alarm, if raised.
    fn own_alarm(&self) -> Vec<AlarmMember> {
        let raised = self.0.config.quota.as_ref().is_some_and(|q| q.alarm());
        raised
            .then(|| AlarmMember {
                member_id: self.0.node.id(),
                alarm: AlarmType::Nospace as i32,
            })
            .into_iter()
            .collect()
    }

    /// The caller of `r` is an admin, while auth is on: etcd's rule for
    /// backups, hashes, defragmentation and leader moves. Checked against
    /// this member's auth state as it is after what the call looked at
    /// (`after`): a member that was behind and caught up on the way (a
    /// backup's barrier) does not answer by the state it had before.
    fn admin_after<T>(&self, who: &Who, after: T) -> Result<T, Status> {
        self.0.check(who, AuthStore::check_admin)?;
        Ok(after)
    }

    /// Passes `req` on to the other members (only `named`, if given; no one
    /// if it is not a member) at once, and gathers their answers. A member
    /// that does not answer in time is left out, unless it was `named`: then
    /// that is the error.
    async fn ask_others(
        &self,
        who: &Who,
        named: Option<u64>,
        req: &AlarmRequest,
    ) -> Result<Vec<AlarmMember>, Status> {
        let st = self.0.node.status();
        let mut asks = tokio::task::JoinSet::new();
        for m in st.voters.iter().chain(&st.learners).copied() {
            if m == st.id || named.is_some_and(|n| n != m) {
                continue;
            }
            let (api, req, caller) = (self.0.clone(), *req, who.clone());
            asks.spawn(async move {
                let ask = async {
                    let who = format!("member {m:x}");
                    let channel = api.member_channel(m, &who).await?;
                    let mut passed = forwarded(req);
                    caller.pass_on(&mut passed);
                    let answer = MaintenanceClient::new(channel)
                        .alarm(passed)
                        .await
                        .inspect_err(|e| api.forget_channel(m, e))?;
                    Ok::<_, Status>(answer.into_inner().alarms)
                };
                let answer = tokio::time::timeout(MEMBER_ASK_TIMEOUT, ask).await;
                (
                    m,
                    answer.unwrap_or_else(|_| Err(Status::unavailable("request timed out"))),
                )
            });
        }
        let mut alarms = Vec::new();
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((_, Ok(found))) => alarms.extend(found),
                Ok((_, Err(e))) if named.is_some() => return Err(e),
                Ok((m, Err(e))) => {
                    tracing::warn!("alarms of member {m:x} left out: {}", e.message())
                }
                Err(e) => return Err(Status::internal(format!("alarm request task: {e}"))),
            }
        }
        Ok(alarms)
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceApi {
    /// NOSPACE alarms across the cluster, as etcd's replicated alarm list.
    /// Each member raises its own (`keel_kv::SpaceQuota::alarm`), so `GET`
    /// lists this member's and asks every other member for theirs;
    /// `DEACTIVATE` (`etcdctl alarm disarm`) lowers the named member's (on
    /// that member) or, for member 0, every member's, and answers with what
    /// it lowered (a quota raises its alarm again at the next refused write,
    /// and lists it while the history is at or past the quota). A member
    /// that does not answer within 2 s is left out of a
    /// `GET` or a member-0 disarm (a stopped member refuses nothing); a
    /// disarm that names it fails. `ACTIVATE` is refused: a raised alarm
    /// would not stop writes here, only the quota does.
    async fn alarm(&self, r: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let who = self.0.who(&r).await?;
        let passed_on = is_forwarded(&r);
        let r = r.into_inner();
        let id = self.0.node.id();
        let action = alarm_request::AlarmAction::try_from(r.action).map_err(|_| {
            Status::invalid_argument(format!("etcdserver: unknown alarm action {}", r.action))
        })?;
        // Anyone may list the alarms; only an admin lowers them.
        let who = match action {
            alarm_request::AlarmAction::Get => who,
            _ => self.0.check_admin_now(&who).await?,
        };
        let mut alarms = match action {
            // As etcd's, a listing of one type of alarm (NONE: every type):
            // the only type raised here is NOSPACE.
            alarm_request::AlarmAction::Get if !lists_nospace(r.alarm) => Vec::new(),
            alarm_request::AlarmAction::Get => {
                let mut alarms = self.own_alarm();
                if !passed_on {
                    alarms.extend(self.ask_others(&who, None, &r).await?);
                }
                alarms
            }
            alarm_request::AlarmAction::Deactivate => {
                let mut lowered = Vec::new();
                if lists_nospace(r.alarm) {
                    if r.member_id == 0 || r.member_id == id {
                        lowered = self.own_alarm();
                        if let Some(q) = &self.0.config.quota {
                            q.disarm();
                        }
                    }
                    if !passed_on && r.member_id != id {
                        let named = (r.member_id != 0).then_some(r.member_id);
                        lowered.extend(self.ask_others(&who, named, &r).await?);
                    }
                }
                lowered
            }
            alarm_request::AlarmAction::Activate => {
                return Err(Status::invalid_argument(
                    "etcdserver: Keel does not raise alarms on request: \
                     NOSPACE comes from the space quota (kv_quota_bytes)",
                ))
            }
        };
        alarms.sort_unstable_by_key(|a| a.member_id);
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
            // As etcd: "no leader" first when it knows none, then its
            // raised alarms.
            errors: st
                .leader
                .is_none()
                .then(|| "etcdserver: no leader".to_string())
                .into_iter()
                .chain(
                    self.0
                        .config
                        .quota
                        .as_ref()
                        .filter(|q| q.alarm())
                        .map(|_| format!("memberID:{} alarm:NOSPACE ", st.id)),
                )
                .collect(),
            db_size_in_use: db_size,
            is_learner: st.learners.contains(&st.id),
            ..Default::default()
        }))
    }

    /// `etcdctl snapshot save`: a backup of this member's state after a
    /// read-index barrier, or without one when there is no leader to ask
    /// (`NodeHandle::backup`: a Keel snapshot file of
    /// everything it has applied, not etcd's bbolt database), streamed in
    /// pieces with `BackupFraming`, one backup at a time. `keel restore`
    /// seeds a new cluster from it; `etcdctl snapshot restore` and `status`
    /// cannot read it.
    async fn snapshot(
        &self,
        r: Request<SnapshotRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<SnapshotResponse>>, Status> {
        let who = self.0.who(&r).await?;
        self.admin_after(&who, ())?;
        let permit = self.0.backups.clone().try_acquire_owned().map_err(|_| {
            Status::unavailable(
                "etcdserver: a backup is already being sent from this member; \
                 try again once it is done",
            )
        })?;
        // A read-index barrier first: everything committed before the
        // request is applied here, however far behind this member was. But
        // as etcd's, a member without a leader (a cluster that lost its
        // quorum: when a backup matters most) still saves what it has;
        // refusing would leave etcdctl, which retries Unavailable, waiting
        // forever.
        let barrier = match self.0.node.status().leader {
            Some(_) => self.0.read(&Query::Status, false).await,
            None => Err(Status::unavailable("etcdserver: no leader")),
        };
        let revision = match barrier {
            Ok(KvResponse::Status { revision, .. }) => revision as i64,
            Ok(other) => return Err(crate::unexpected(&other)),
            Err(e) if e.code() == tonic::Code::Unavailable => {
                tracing::warn!(
                    "backup of this member's state without a read barrier: {}",
                    e.message()
                );
                self.0.local_revision().await?.0 as i64
            }
            Err(e) => return Err(e),
        };
        let backup = self
            .0
            .node
            .backup()
            .await
            .map_err(|e| Status::unavailable(format!("etcdserver: backup failed: {e}")))?;
        // Looked at again for what the backup holds (users, password
        // hashes, the token secret among them), with the caller's token
        // checked against the state the backup was taken from.
        let who = self.0.refreshed(&who)?;
        let backup = self.admin_after(&who, backup)?;
        // At least this revision: writes may have applied since the barrier.
        let header = self.0.header(revision);
        let cluster_id = self.0.node.cluster_id();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let _one_at_a_time = permit;
            // A client that stops reading for this long is dropped (and the
            // file with `backup`).
            let send = |next| async {
                matches!(
                    tokio::time::timeout(BACKUP_STALL, tx.send(next)).await,
                    Ok(Ok(()))
                )
            };
            let failed = |e: std::io::Error| {
                Status::internal(format!("reading backup {}: {e}", backup.path.display()))
            };
            let piece = |blob: &[u8], remaining| SnapshotResponse {
                header,
                remaining_bytes: remaining,
                blob: bytes::Bytes::copy_from_slice(blob),
                version: String::new(),
            };
            // (Read on tokio's blocking pool: a large backup may have left
            // the page cache by the time a slow client reads it.)
            let mut file = match tokio::fs::File::open(&backup.path).await {
                Ok(f) => f,
                Err(e) => {
                    send(Err(failed(e))).await;
                    return;
                }
            };
            // etcd's framing (see `BackupFraming`): etcdctl keeps no
            // download without it.
            let mut framing = BackupFraming::new(cluster_id);
            let framed = BackupFraming::framed_len(backup.size);
            let mut sent = 0;
            let mut buf = vec![0; BACKUP_CHUNK];
            while sent < backup.size {
                let next = match file.read(&mut buf).await {
                    Ok(0) => Err(failed(std::io::ErrorKind::UnexpectedEof.into())),
                    Ok(n) => {
                        framing.update(&buf[..n]);
                        sent += n as u64;
                        Ok(piece(&buf[..n], framed.saturating_sub(sent)))
                    }
                    Err(e) => Err(failed(e)),
                };
                let last = next.is_err();
                if !send(next).await || last {
                    return;
                }
            }
            send(Ok(piece(&framing.trailer(), 0))).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn defragment(
        &self,
        r: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let who = self.0.who(&r).await?;
        self.admin_after(&who, ())?;
        Ok(Response::new(DefragmentResponse {
            header: self.0.header(0),
        }))
    }

    async fn move_leader(
        &self,
        r: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let who = self.0.who(&r).await?;
        self.0.check_admin_now(&who).await?;
        let target = r.into_inner().target_id;
        match self.0.node.call(ClientOp::TransferLeader(target)).await {
            ClientResult::Ok(_) => Ok(Response::new(MoveLeaderResponse {
                header: self.0.header(0),
            })),
            ClientResult::NotLeader { .. } => {
                Err(Status::failed_precondition("etcdserver: not leader"))
            }
            // etcd's ErrGRPCTimeoutLeaderTransfer (clients match the text).
            ClientResult::Error(m) if m.starts_with(keel_net::codec::TRANSFER_TIMED_OUT) => {
                Err(Status::deadline_exceeded(
                    "etcdserver: request timed out, leader transfer took too long",
                ))
            }
            // etcd's ErrGRPCBadLeaderTransferee: not a voter of the cluster.
            ClientResult::Error(m) if m.ends_with("is not a voter") => {
                tracing::debug!("move-leader to {target} refused: {m}");
                Err(Status::failed_precondition(
                    "etcdserver: bad leader transferee",
                ))
            }
            ClientResult::Error(m) => Err(Status::failed_precondition(m)),
            other => Err(node_error(other)),
        }
    }

    async fn hash(&self, r: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let who = self.0.who(&r).await?;
        self.admin_after(&who, ())?;
        let (revision, hash, _) = self.admin_after(&who, hash_kv(&self.0, 0).await?)?;
        Ok(Response::new(HashResponse {
            header: self.0.header(revision),
            hash,
        }))
    }

    async fn hash_kv(&self, r: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        let who = self.0.who(&r).await?;
        self.admin_after(&who, ())?;
        let answer = hash_kv(&self.0, r.into_inner().revision).await?;
        let (revision, hash, compact_revision) = self.admin_after(&who, answer)?;
        Ok(Response::new(HashKvResponse {
            header: self.0.header(revision),
            hash,
            compact_revision,
            hash_revision: 0,
        }))
    }
}

/// Does a request for alarms of type `alarm` take NOSPACE in (NONE is
/// every type)?
fn lists_nospace(alarm: i32) -> bool {
    alarm == AlarmType::None as i32 || alarm == AlarmType::Nospace as i32
}

/// This node's hash of the KV history up to `revision` (0: the current
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
