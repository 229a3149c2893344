//! keel-etcd: the etcd v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance)
//! served by one Keel node, so etcdctl and etcd client libraries work
//! against a Keel cluster. Requests become commands and queries of the
//! replicated keel-kv service, submitted through the node like any client's
//! (writes go through the log; linearizable reads use read-index; a
//! follower forwards to the leader). Every reply carries etcd's response
//! header: cluster id, member id, revision, raft term.

pub mod cluster;
pub mod kv;
pub mod maintenance;

use keel_etcd_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_etcd_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_etcd_proto::etcdserverpb::ResponseHeader;
use keel_net::codec::ClientResult;
use keel_node::NodeHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use tonic::Status;

/// A member as the etcd API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

/// What the API needs besides the node: the address book of the cluster.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub members: Vec<MemberInfo>,
    /// Largest request accepted (etcd's default is 1.5 MiB).
    pub max_request_bytes: usize,
}

/// Shared by the services.
pub struct Api {
    pub node: Arc<NodeHandle>,
    pub config: ApiConfig,
}

impl Api {
    /// etcd's response header at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.node.cluster_id(),
            member_id: self.node.id(),
            revision,
            raft_term: self.node.status().term,
        })
    }
}

/// The gRPC status for a node-level refusal, with etcd's messages where
/// clients look for them.
pub fn node_error(r: ClientResult) -> Status {
    match r {
        ClientResult::NotLeader { .. } => Status::unavailable("etcdserver: no leader"),
        ClientResult::Busy => Status::unavailable("etcdserver: too many requests"),
        ClientResult::Error(m) => Status::internal(m),
        other => Status::internal(format!("unexpected answer from the node: {other:?}")),
    }
}

/// Serves the etcd API on `addr` on the node's runtime until the node stops.
pub fn serve(node: Arc<NodeHandle>, addr: SocketAddr, config: ApiConfig) -> std::io::Result<()> {
    let api = Arc::new(Api {
        node: node.clone(),
        config,
    });
    let rt = node.runtime().clone();
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tonic::transport::Server::builder()
        .add_service(ClusterServer::new(cluster::ClusterApi(api.clone())))
        .add_service(MaintenanceServer::new(maintenance::MaintenanceApi(
            api.clone(),
        )))
        .serve_with_incoming(incoming);
    rt.spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("etcd API server stopped: {e}");
        }
    });
    Ok(())
}
