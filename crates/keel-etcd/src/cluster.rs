//! etcd's Cluster service: member list (voters and learners, with their
//! URLs), and member add / remove / promote through Keel's one-at-a-time
//! membership changes. Keel's members have static ids and addresses, so
//! member add takes the node whose peer URL every node's `[[peers]]`
//! already lists: it joins as a learner and, unless `--learner` was asked
//! for, is then promoted to voter. Every change is answered once it is
//! committed, as etcd answers once it has applied it. As in etcd 3.4, a
//! learner is added only while there is none. As in etcd, a removed
//! member's id is never added again: a peer URL whose node was removed is
//! refused as etcd refuses a removed id (`membership.ErrIDRemoved`, which
//! etcd answers "member not found"), saying to give the new node a new id. Member update takes
//! only the URLs a member already has. As in etcd, any member takes these
//! requests: a follower forwards them to the leader's etcd API (once; a
//! forwarded request that finds no leader fails with "no leader").

use crate::auth::Who;
use crate::{forwarded, is_forwarded, node_error, Api};
use keel_core::MembershipChange;
use keel_etcd_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_etcd_proto::etcdserverpb::cluster_server::Cluster;
use keel_etcd_proto::etcdserverpb::*;
use keel_net::codec::{ClientOp, ClientResult};
use std::sync::Arc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Forwards a membership request to the leader, unless this node leads (or
/// the request was forwarded already): `None` means "handle it here".
/// The caller's token goes with it: the leader checks it again.
macro_rules! forward_unless_leader {
    ($self:ident, $who:ident, $req:ident, $method:ident) => {
        if let Some((leader, mut client)) = $self.leader_client(&$req).await? {
            let mut passed = forwarded($req.into_inner());
            $who.pass_on(&mut passed);
            return client
                .$method(passed)
                .await
                .inspect_err(|e| $self.0.forget_channel(leader, e));
        }
    };
}

pub struct ClusterApi(pub Arc<Api>);

/// The most learners a member addition through the etcd API leaves in the
/// cluster (etcd 3.4's `maxLearners`).
pub const MAX_LEARNERS: usize = 1;

/// What the core's refusal of a removed id says (`MembershipChange::apply`).
const ID_NEVER_USED_AGAIN: &str = "was removed from the cluster and its id is never used again";

/// etcd's answer to a change naming a removed id (`membership.ErrIDRemoved`,
/// which its gRPC layer answers as `ErrGRPCMemberNotFound`: NotFound,
/// "etcdserver: member not found"), with what to do in Keel after it.
fn id_removed(id: u64) -> Status {
    Status::not_found(format!(
        "etcdserver: member not found (member {id:x}, id = {id} in [[peers]], was removed from \
         the cluster and its id is never used again: give the new node a new id in every \
         member's [[peers]], restart them one at a time, start it with join = true, then add it)"
    ))
}

impl ClusterApi {
    fn members(&self) -> Vec<Member> {
        let st = self.0.node.status();
        let mut ids: Vec<(u64, bool)> = st.voters.iter().map(|&v| (v, false)).collect();
        ids.extend(st.learners.iter().map(|&l| (l, true)));
        ids.sort_unstable();
        ids.into_iter()
            .map(|(id, is_learner)| {
                let info = self.0.config.members.iter().find(|m| m.id == id);
                Member {
                    id,
                    name: info.map_or_else(|| format!("node{id}"), |m| m.name.clone()),
                    peer_ur_ls: info.map(|m| m.peer_urls.clone()).unwrap_or_default(),
                    client_ur_ls: info.map(|m| m.client_urls.clone()).unwrap_or_default(),
                    is_learner,
                }
            })
            .collect()
    }

    async fn change(&self, change: MembershipChange) -> Result<Vec<Member>, Status> {
        match self.0.node.call(ClientOp::ChangeMembership(change)).await {
            // (The node answers once the change has committed.)
            ClientResult::Ok(_) => Ok(self.members()),
            // etcd's exact texts: clients match them (clientv3's
            // ErrMemberNotFound, ErrMemberNotLearner).
            ClientResult::Error(m) if m.contains("not a member") || m.contains("not a learner") => {
                tracing::debug!("membership change {change:?} refused: {m}");
                match change {
                    MembershipChange::PromoteLearner(id)
                        if self.0.node.status().voters.contains(&id) =>
                    {
                        Err(Status::failed_precondition(
                            "etcdserver: can only promote a learner member",
                        ))
                    }
                    _ => Err(Status::not_found("etcdserver: member not found")),
                }
            }
            // etcd refuses to remove its last voter so (with gRPC's Unknown
            // code, as etcd 3.4 answers it).
            ClientResult::Error(m) if m.contains("last voter") => {
                tracing::debug!("membership change {change:?} refused: {m}");
                Err(Status::unknown(
                    "etcdserver: re-configuration failed due to not enough started members",
                ))
            }
            // etcd's ErrGRPCLearnerNotReady.
            ClientResult::Error(m) if m.contains(ID_NEVER_USED_AGAIN) => {
                tracing::debug!("membership change {change:?} refused: {m}");
                match change {
                    MembershipChange::AddLearner(id) => Err(id_removed(id)),
                    _ => Err(Status::not_found("etcdserver: member not found")),
                }
            }
            ClientResult::Error(m) if m.starts_with(keel_core::LEARNER_NOT_READY) => {
                tracing::debug!("membership change {change:?} refused: {m}");
                Err(Status::failed_precondition(
                    "etcdserver: can only promote a learner member which is in sync with leader",
                ))
            }
            ClientResult::Error(m) => Err(Status::failed_precondition(m)),
            other => Err(node_error(other)),
        }
    }

    /// Who makes a membership change, who must be an admin while auth is
    /// on (as in etcd).
    async fn admin<T>(&self, r: &Request<T>) -> Result<Who, Status> {
        let who = self.0.who(r).await?;
        self.0.check_admin_now(&who).await
    }

    fn header(&self) -> Option<ResponseHeader> {
        self.0.header(0)
    }

    /// The leader and a client of its etcd API if this node is a follower
    /// that knows the leader and `req` was not forwarded already.
    async fn leader_client<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Option<(u64, ClusterClient<Channel>)>, Status> {
        let st = self.0.node.status();
        if st.role == "leader" || is_forwarded(req) {
            return Ok(None);
        }
        let Some(leader) = st.leader else {
            return Err(Status::unavailable("etcdserver: no leader"));
        };
        let channel = self.0.member_channel(leader, "the leader").await?;
        Ok(Some((leader, ClusterClient::new(channel))))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn member_add(
        &self,
        r: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let who = self.admin(&r).await?;
        forward_unless_leader!(self, who, r, member_add);
        let r = r.into_inner();
        let wanted: Vec<&str> = r.peer_ur_ls.iter().map(|u| normalize_url(u)).collect();
        let info = self
            .0
            .config
            .members
            .iter()
            .find(|m| {
                m.peer_urls
                    .iter()
                    .any(|u| wanted.contains(&normalize_url(u)))
            })
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "etcdserver: no node with peer URL {:?} in this node's configuration: Keel's \
                     members are listed in every node's [[peers]] (id, peer_addr, client_addr) and \
                     the new node is started with join = true before it is added",
                    r.peer_ur_ls
                ))
            })?
            .clone();
        // One addition at a time here (the leader): a voter's addition is a
        // learner's and then its promotion, so a learner counted below is
        // one asked for as such, and two learner additions cannot both see
        // room for one.
        let _adding = self.0.member_adds.lock().await;
        let st = self.0.node.status();
        if st.voters.contains(&info.id) || st.learners.contains(&info.id) {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        // (The core refuses it too, should the removal commit meanwhile:
        // `change` answers that alike.)
        if self.0.node.membership().removed.contains(&info.id) {
            return Err(id_removed(info.id));
        }
        // etcd 3.4 takes one learner at most (its `maxLearners`), checked
        // after the URLs, with this code and text (clientv3's
        // ErrGRPCTooManyLearners); a voter's addition is not limited.
        if r.is_learner && st.learners.len() >= MAX_LEARNERS {
            return Err(Status::failed_precondition(
                "etcdserver: too many learner members in cluster",
            ));
        }
        self.change(MembershipChange::AddLearner(info.id)).await?;
        if !r.is_learner {
            // One change at a time: the promotion waits for the addition.
            let deadline = tokio::time::Instant::now() + self.0.config.request_timeout;
            loop {
                match self.change(MembershipChange::PromoteLearner(info.id)).await {
                    Ok(_) => break,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!("promoting {} after member add: {e}", info.id);
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let members = self.members();
        Ok(Response::new(MemberAddResponse {
            header: self.header(),
            member: members.iter().find(|m| m.id == info.id).cloned(),
            members,
        }))
    }

    async fn member_remove(
        &self,
        r: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let who = self.admin(&r).await?;
        forward_unless_leader!(self, who, r, member_remove);
        let members = self
            .change(MembershipChange::Remove(r.into_inner().id))
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members,
        }))
    }

    /// Keel's peer addresses come from each node's configuration, so the
    /// only update it takes is one to the URLs a member already has (a
    /// no-op, as tools that re-assert a member's URLs send). Otherwise
    /// etcd's refusals, in etcd's order: an id that is no member, then URLs
    /// another member has.
    async fn member_update(
        &self,
        r: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.admin(&r).await?;
        let r = r.into_inner();
        let members = self.members();
        let Some(member) = members.iter().find(|m| m.id == r.id) else {
            return Err(Status::not_found("etcdserver: member not found"));
        };
        let wanted: Vec<&str> = r.peer_ur_ls.iter().map(|u| normalize_url(u)).collect();
        let taken = members
            .iter()
            .filter(|m| m.id != r.id)
            .flat_map(|m| &m.peer_ur_ls)
            .any(|u| wanted.contains(&normalize_url(u)));
        if taken {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        let mut has: Vec<&str> = member.peer_ur_ls.iter().map(|u| normalize_url(u)).collect();
        let mut wanted = wanted;
        has.sort_unstable();
        has.dedup();
        wanted.sort_unstable();
        wanted.dedup();
        if has != wanted {
            return Err(Status::unimplemented(format!(
                "Keel's peer addresses come from each node's configuration: member {:x} keeps {:?}",
                r.id, member.peer_ur_ls
            )));
        }
        Ok(Response::new(MemberUpdateResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_list(
        &self,
        _r: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: self.header(),
            members: self.members(),
        }))
    }

    async fn member_promote(
        &self,
        r: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let who = self.admin(&r).await?;
        forward_unless_leader!(self, who, r, member_promote);
        let members = self
            .change(MembershipChange::PromoteLearner(r.into_inner().id))
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members,
        }))
    }
}

/// A URL without its scheme and trailing slash, for comparing addresses.
fn normalize_url(u: &str) -> &str {
    let u = u.trim();
    let u = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .unwrap_or(u);
    u.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_compare_without_scheme_or_trailing_slash() {
        assert_eq!(
            super::normalize_url("http://127.0.0.1:7201/"),
            "127.0.0.1:7201"
        );
        assert_eq!(super::normalize_url(" 127.0.0.1:7201"), "127.0.0.1:7201");
        assert_eq!(super::normalize_url("https://h:1"), "h:1");
    }
}
