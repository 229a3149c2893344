//! etcd's Cluster service: member list (voters and learners, with their
//! URLs), and member remove / promote through Keel's one-at-a-time
//! membership changes. Member add needs an id and addresses known to every
//! node's configuration, so it is refused with an explanation.

use crate::{node_error, Api};
use keel_core::MembershipChange;
use keel_etcd_proto::etcdserverpb::cluster_server::Cluster;
use keel_etcd_proto::etcdserverpb::*;
use keel_net::codec::{ClientOp, ClientResult};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ClusterApi(pub Arc<Api>);

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
            ClientResult::Ok(_) => Ok(self.members()),
            ClientResult::Error(m) if m.contains("not a member") || m.contains("not a learner") => {
                Err(Status::not_found(format!(
                    "etcdserver: member not found ({m})"
                )))
            }
            ClientResult::Error(m) => Err(Status::failed_precondition(m)),
            other => Err(node_error(other)),
        }
    }

    fn header(&self) -> Option<ResponseHeader> {
        self.0.header(0)
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn member_add(
        &self,
        _r: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented(
            "Keel adds members by node id: list the new node in every node's [[peers]], start it with \
             join = true, then run `keel cluster add-learner ID` and `keel cluster promote ID`",
        ))
    }

    async fn member_remove(
        &self,
        r: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let members = self
            .change(MembershipChange::Remove(r.into_inner().id))
            .await?;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(),
            members,
        }))
    }

    async fn member_update(
        &self,
        _r: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(
            "Keel's peer addresses come from each node's configuration",
        ))
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
        let members = self
            .change(MembershipChange::PromoteLearner(r.into_inner().id))
            .await?;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(),
            members,
        }))
    }
}
