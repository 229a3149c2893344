//! keel-etcd: the etcd v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance,
//! Auth, and the Lock and Election recipes) served by one Keel node, so etcdctl and etcd client libraries work
//! against a Keel cluster. Requests become commands and queries of the
//! replicated keel-kv service, submitted through the node like any client's
//! (writes go through the log; linearizable reads use read-index; a
//! follower forwards to the leader; serializable reads answer from the
//! node's own state). Watches are served from the node's own apply feed, so
//! they survive leader changes. Every reply carries etcd's response header:
//! cluster id, member id, revision, raft term. The same port answers
//! HTTP/1.1 too, as etcd's client URL does: `/health`, `/version` and
//! `/metrics` (`http`) and the JSON gateway `POST /v3/...` (`gateway`).

pub mod auth;
pub mod authority;
pub mod cluster;
pub mod compactor;
pub mod convert;
pub mod election;
pub mod gateway;
pub mod http;
mod json_objects;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod origin;
mod promote;
mod recipes;
pub mod require_leader;
pub mod tls;
pub mod watch;

/// Shared by the unit tests of the watch feed's users.
#[cfg(test)]
pub(crate) mod test_events {
    use bytes::Bytes;
    use keel_kv::{EventType, KeyValue, WatchEvent};

    /// An event of `kind` on `key` at revision `rev`.
    pub fn event(kind: EventType, key: &str, rev: u64) -> WatchEvent {
        WatchEvent {
            kind,
            kv: KeyValue {
                key: Bytes::copy_from_slice(key.as_bytes()),
                mod_revision: rev,
                ..Default::default()
            },
            prev_kv: None,
        }
    }
}

use bytes::Bytes;
use keel_etcd_proto::etcdserverpb::auth_server::AuthServer;
use keel_etcd_proto::etcdserverpb::cluster_server::ClusterServer;
use keel_etcd_proto::etcdserverpb::kv_server::KvServer;
use keel_etcd_proto::etcdserverpb::lease_server::LeaseServer;
use keel_etcd_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use keel_etcd_proto::etcdserverpb::watch_server::WatchServer;
use keel_etcd_proto::etcdserverpb::ResponseHeader;
use keel_kv::{Command, Query, Response};
use keel_net::codec::{ClientOp, ClientResult};
use keel_node::NodeHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A member as the etcd API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

/// What the API needs besides the node: the address book of the cluster and
/// its limits.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Every node the configuration knows (members or not yet).
    pub members: Vec<MemberInfo>,
    /// Largest request accepted (etcd's default is 1.5 MiB).
    pub max_request_bytes: usize,
    /// How often a watch created with `progress_notify` gets an empty
    /// response carrying the current revision (etcd: 10 minutes).
    pub watch_progress_interval: Duration,
    /// A request not answered within this is failed with etcd's "request
    /// timed out" (Unavailable, so clients retry).
    pub request_timeout: Duration,
    /// Compactions the leader proposes by itself (etcd's
    /// `--auto-compaction-*`; off by default, as in etcd).
    pub auto_compaction: compactor::AutoCompaction,
    /// The KV service's space quota, whose NOSPACE alarm `Alarm` and
    /// `Status` report (the node refuses the writes themselves).
    pub quota: Option<Arc<keel_kv::SpaceQuota>>,
    /// TLS for the port (and for calls to the other members), if set.
    pub tls: Option<tls::TlsFiles>,
    /// Which web origins get CORS headers on the HTTP answers.
    pub cors: http::Cors,
    /// How often a call that requires a leader checks that this member
    /// knows one (`require_leader`; etcd: its election timeout).
    pub election_timeout: Duration,
    /// The KV service's users, roles and permissions as it publishes them
    /// (`auth`): every call is checked against them while auth is on.
    pub auth: Arc<keel_kv::AuthShared>,
}

impl ApiConfig {
    pub fn new(members: Vec<MemberInfo>) -> ApiConfig {
        ApiConfig {
            members,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            watch_progress_interval: Duration::from_secs(600),
            request_timeout: Duration::from_secs(7),
            auto_compaction: compactor::AutoCompaction::Off,
            quota: None,
            tls: None,
            cors: http::Cors::default(),
            election_timeout: Duration::from_secs(1),
            auth: Default::default(),
        }
    }
}

/// etcd's default `--max-request-bytes`.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// What gRPC may add to a request on top of its payload (etcd's
/// `grpcOverheadBytes`).
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// Shared by the services.
pub struct Api {
    pub node: Arc<NodeHandle>,
    pub config: ApiConfig,
    /// One backup (`Snapshot`) at a time: each is a full copy of the state
    /// on disk and a turn of the snapshot thread.
    pub backups: Arc<tokio::sync::Semaphore>,
    /// The Lock and Campaign calls in progress, by key.
    pub(crate) contests: recipes::Contests,
    /// How this member's calls to other members use TLS, if it serves TLS.
    pub(crate) client_tls: Option<tls::Tls>,
    /// The watch streams and watches open here.
    pub watch_gauges: watch::WatchGauges,
    /// Held by a member addition (`cluster`) while it runs.
    pub(crate) member_adds: tokio::sync::Mutex<()>,
    /// The channels to other members' etcd APIs (`member_channel`).
    member_channels: MemberChannels,
}

/// One channel (one HTTP/2 connection, reconnecting by itself) to each
/// other member's etcd API, by member id and URL, shared by every call
/// passed on to it: a follower passes each time-to-live, membership
/// change and alarm request to another member, and a connection per call
/// would cost a TCP (and TLS) handshake each and leave a socket in
/// TIME_WAIT each. A leader change makes another member the one asked;
/// a call that fails drops the channel (`Api::forget_channel`), so the
/// next one connects afresh.
#[derive(Default)]
struct MemberChannels(std::sync::Mutex<std::collections::HashMap<u64, (String, u64, Channel)>>);

impl MemberChannels {
    /// The channel to member `id` at `url`, if one was made with TLS files
    /// of generation `tls` (0 without TLS).
    fn get(&self, id: u64, url: &str, tls: u64) -> Option<Channel> {
        let cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .get(&id)
            .filter(|(at, made_with, _)| at == url && *made_with == tls)
            .map(|(_, _, ch)| ch.clone())
    }

    fn put(&self, id: u64, url: &str, tls: u64, channel: &Channel) {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cached.insert(id, (url.to_string(), tls, channel.clone()));
    }

    fn forget(&self, id: u64) -> bool {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        cached.remove(&id).is_some()
    }
}

impl ApiConfig {
    /// The largest gRPC message a request may be: the request limit and
    /// gRPC's overhead on top, as etcd sets its gRPC server's limit.
    pub fn max_message_bytes(&self) -> usize {
        self.max_request_bytes + GRPC_OVERHEAD_BYTES
    }

    /// The most of a JSON gateway body held at once: a bound on memory (a
    /// request's JSON is about 4/3 of its protobuf, whose own limit each
    /// call checks).
    pub fn max_body_bytes(&self) -> usize {
        self.max_message_bytes() * 2
    }
}

impl Api {
    /// etcd's response header at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.node.cluster_id(),
            member_id: self.node.id(),
            revision,
            raft_term: self.node.term(),
        })
    }

    /// Runs a command through the log; the service's answer, or the gRPC
    /// status etcd would answer with.
    pub async fn write(&self, cmd: &Command) -> Result<Response, Status> {
        cmd.validate().map_err(kv_status)?;
        let data = cmd.encode();
        if data.len() > self.config.max_request_bytes {
            return Err(too_large());
        }
        self.call(ClientOp::Write(data)).await
    }

    /// Runs a query: linearizable (read-index, through the leader) or
    /// serializable (this node's state, however stale).
    pub async fn read(&self, q: &Query, serializable: bool) -> Result<Response, Status> {
        q.validate().map_err(kv_status)?;
        let data = q.encode();
        if data.len() > self.config.max_request_bytes {
            return Err(too_large());
        }
        let op = if serializable {
            ClientOp::StaleRead(data)
        } else {
            ClientOp::Read(data)
        };
        self.call(op).await
    }

    async fn call(&self, op: ClientOp) -> Result<Response, Status> {
        match tokio::time::timeout(self.config.request_timeout, self.node.call(op)).await {
            Ok(r) => self.answer(r),
            Err(_) => Err(Status::unavailable("etcdserver: request timed out")),
        }
    }

    /// A channel to member `id`'s etcd API, at the first client URL this
    /// node's configuration lists for it: the one already open to it, if
    /// any (`MemberChannels`). `who` names the member in errors ("the
    /// leader", "member 2"). A caller whose call on it fails says so with
    /// `forget_channel`.
    pub(crate) async fn member_channel(&self, id: u64, who: &str) -> Result<Channel, Status> {
        let url = self
            .config
            .members
            .iter()
            .find(|m| m.id == id)
            .and_then(|m| m.client_urls.first())
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "etcdserver: {who} (member {id:x}) has no etcd address in this node's \
                     configuration; send the request to it"
                ))
            })?;
        // (A channel reconnects with the TLS configuration it was made
        // with: one made before the TLS files changed is made again.)
        let tls = self.client_tls.as_ref();
        if let Some(channel) =
            self.member_channels
                .get(id, url, tls.map_or(0, tls::Tls::generation))
        {
            return Ok(channel);
        }
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|e| Status::internal(format!("URL {url:?} of {who}: {e}")))?;
        let mut generation = 0;
        if let Some(tls) = tls {
            let config;
            (config, generation) = tls.client();
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| Status::internal(format!("TLS for {who} ({url}): {e}")))?;
        }
        let channel = endpoint
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| {
                Status::unavailable(format!("etcdserver: {who} unreachable ({url}): {e}"))
            })?;
        self.member_channels.put(id, url, generation, &channel);
        Ok(channel)
    }

    /// Drops the channel to member `id` after a call on it failed with
    /// `status`, if the failure may be the connection's (Unavailable,
    /// Unknown, Internal, Cancelled: a broken connection or a member that
    /// stopped leading): the next call connects afresh. An answer the
    /// member gave (not found, invalid...) keeps it.
    pub(crate) fn forget_channel(&self, id: u64, status: &Status) {
        let broken = matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        );
        if broken && self.member_channels.forget(id) {
            tracing::debug!("channel to member {id:x} dropped after: {status}");
        }
    }

    /// The store's current revision on this node (serializable).
    pub async fn local_revision(&self) -> Result<(u64, i64, u64), Status> {
        match self.read(&Query::Status, true).await? {
            Response::Status {
                revision,
                compact_revision,
                db_size,
                ..
            } => Ok((revision, compact_revision, db_size)),
            other => Err(unexpected(&other)),
        }
    }

    fn answer(&self, r: ClientResult) -> Result<Response, Status> {
        let data: Bytes = match r {
            ClientResult::Ok(data) => data,
            ClientResult::StaleOk { data, .. } => data,
            other => return Err(node_error(other)),
        };
        match Response::decode(&data) {
            Ok(Response::Error { code, message }) => Err(Status::new(
                Code::from(code.grpc_code()),
                code.etcd_message().map_or(message, str::to_string),
            )),
            Ok(resp) => Ok(resp),
            Err(e) => Err(Status::internal(format!(
                "undecodable answer from the KV service: {e}"
            ))),
        }
    }
}

/// Marks a request one member passed to another, so it is never passed on
/// again.
pub(crate) const FORWARDED: &str = "keel-forwarded";

/// How long a member waits to connect to another it passes a request to.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `msg` as a request marked `FORWARDED`.
pub(crate) fn forwarded<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

/// Was `req` passed on by another member?
pub(crate) fn is_forwarded<T>(req: &tonic::Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// The gRPC status etcd answers a request error with.
pub fn kv_status(e: keel_kv::KvError) -> Status {
    let code = e.code();
    Status::new(
        Code::from(code.grpc_code()),
        code.etcd_message()
            .map_or_else(|| e.to_string(), str::to_string),
    )
}

/// etcd's answer to a write refused by the space quota.
pub fn no_space() -> Status {
    Status::resource_exhausted(format!("etcdserver: {}", keel_kv::NO_SPACE))
}

/// etcd's answer to a request over the size limit.
pub fn too_large() -> Status {
    Status::invalid_argument("etcdserver: request is too large")
}

/// A service answer of the wrong kind (a bug, reported rather than hidden).
pub fn unexpected(r: &Response) -> Status {
    Status::internal(format!("unexpected answer from the KV service: {r:?}"))
}

/// The gRPC status for a node-level refusal, with etcd's messages and codes
/// where clients look for them (Unavailable makes them retry elsewhere).
pub fn node_error(r: ClientResult) -> Status {
    match r {
        ClientResult::NotLeader { .. } => Status::unavailable("etcdserver: no leader"),
        // Busy covers a full queue, a leader not yet ready and a transfer in
        // progress: all worth a retry, which clients do on Unavailable.
        ClientResult::Busy => Status::unavailable("etcdserver: too many requests"),
        ClientResult::Error(m) if m == keel_kv::NO_SPACE => no_space(),
        // A write whose outcome is unknown (its leader was lost before it
        // was known to be appended, or the node was removed): etcd's
        // ErrTimeoutDueToLeaderFail, also Unavailable, which etcd clients
        // do not retry for writes.
        ClientResult::Error(m) if m.starts_with(keel_net::codec::OUTCOME_UNKNOWN) => {
            Status::unavailable(format!(
                "etcdserver: request timed out, possibly due to previous leader failure ({m})"
            ))
        }
        ClientResult::Error(m) if m.contains("stopped") => {
            Status::unavailable(format!("etcdserver: server stopped ({m})"))
        }
        ClientResult::Error(m) if m.contains("timed out") || m.contains("leader changed") => {
            Status::unavailable(format!("etcdserver: request timed out ({m})"))
        }
        ClientResult::Error(m) => Status::unknown(m),
        other => Status::internal(format!("unexpected answer from the node: {other:?}")),
    }
}

/// Serves the etcd API on `addr` on the node's runtime until the node stops.
/// Binds before returning, so a taken port is reported at once.
pub fn serve(node: Arc<NodeHandle>, addr: SocketAddr, config: ApiConfig) -> std::io::Result<()> {
    let max_msg = config.max_message_bytes();
    let auto_compaction = config.auto_compaction;
    let tls = match &config.tls {
        Some(files) => Some(tls::Tls::load(files).map_err(std::io::Error::other)?),
        None => None,
    };
    let api = Arc::new(Api {
        node: node.clone(),
        config,
        backups: Arc::new(tokio::sync::Semaphore::new(1)),
        contests: Default::default(),
        client_tls: tls.clone(),
        watch_gauges: Default::default(),
        member_adds: Default::default(),
        member_channels: Default::default(),
    });
    let rt = node.runtime().clone();
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
    // etcd's HTTP endpoints share the port (`http`): HTTP/1.1 requests
    // are told from HTTP/2 by their first bytes, once per connection.
    // Every connection goes through `authority::FixAuthority`, so Go
    // clients' malformed `:authority` values are taken as etcd takes them.
    let routes = tonic::service::Routes::from(http::router(api.clone()))
        .add_service(
            KvServer::new(kv::KvApi(api.clone()))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(usize::MAX),
        )
        .add_service(
            WatchServer::new(watch::WatchApi(api.clone())).max_decoding_message_size(max_msg),
        )
        .add_service(
            LeaseServer::new(lease::LeaseApi(api.clone())).max_decoding_message_size(max_msg),
        )
        .add_service(ClusterServer::new(cluster::ClusterApi(api.clone())))
        .add_service(MaintenanceServer::new(maintenance::MaintenanceApi(
            api.clone(),
        )))
        .add_service(
            keel_etcd_proto::v3lockpb::lock_server::LockServer::new(lock::LockApi(
                recipes::Recipes(api.clone(), Default::default()),
            ))
            .max_decoding_message_size(max_msg),
        )
        .add_service(
            keel_etcd_proto::v3electionpb::election_server::ElectionServer::new(
                election::ElectionApi(recipes::Recipes(api.clone(), Default::default())),
            )
            .max_decoding_message_size(max_msg),
        )
        .add_service(AuthServer::new(auth::AuthApi(api.clone())));
    let mut server = tonic::transport::Server::builder()
        .accept_http1(true)
        .layer(origin::OriginCheckLayer(api.clone()))
        .layer(require_leader::RequireLeaderLayer(api.clone()));
    let server = server.add_routes(routes);
    let report = |r: Result<(), tonic::transport::Error>| {
        if let Err(e) = r {
            tracing::error!("etcd API server stopped: {e}");
        }
    };
    match tls {
        Some(tls) => {
            rt.spawn(async move {
                let incoming =
                    tls::accept(listener, tls).map(|s| s.map(authority::FixAuthority::new));
                report(server.serve_with_incoming(incoming).await)
            });
        }
        None => {
            // The builder's tcp_nodelay applies only to listeners tonic opens
            // itself: set it on each accepted connection, or small responses wait
            // for the peer's delayed ACK (~40 ms) under Nagle's algorithm.
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
                s.inspect(|s| {
                    if let Err(e) = s.set_nodelay(true) {
                        tracing::debug!("TCP_NODELAY on an etcd API connection: {e}");
                    }
                })
                .map(authority::FixAuthority::new)
            });
            rt.spawn(async move { report(server.serve_with_incoming(incoming).await) });
        }
    }
    rt.spawn(promote::run(api.clone()));
    rt.spawn(compactor::run(api, auto_compaction));
    Ok(())
}

#[cfg(test)]
mod node_error_tests {
    use super::*;

    /// A write whose outcome is unknown reaches etcd clients as etcd's own
    /// "request timed out, possibly due to previous leader failure"
    /// (Unavailable), whether the node gave up at `write_timeout_ms` or
    /// once a new leader's term committed without it.
    #[test]
    fn a_write_of_unknown_outcome_is_etcds_timeout_due_to_leader_failure() {
        for m in [
            "within 30s: it may or may not have been applied",
            ": the leader that had it lost leadership",
        ] {
            let m = format!("{}{m}", keel_net::codec::OUTCOME_UNKNOWN);
            let s = node_error(ClientResult::Error(m));
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
            assert!(
                s.message().starts_with(
                    "etcdserver: request timed out, possibly due to previous leader failure"
                ),
                "{s:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cached channel to another member is used only at the URL and with
    /// the TLS files' generation it was made with: after the files change,
    /// the next call makes a channel with the new ones (a cached one would
    /// reconnect with the old certificate and CA).
    #[tokio::test]
    async fn member_channels_are_made_again_when_the_tls_files_change() {
        let channels = MemberChannels::default();
        let channel = Channel::from_static("https://127.0.0.1:1").connect_lazy();
        channels.put(7, "https://127.0.0.1:1", 3, &channel);
        assert!(channels.get(7, "https://127.0.0.1:1", 3).is_some());
        assert!(channels.get(7, "https://127.0.0.1:1", 4).is_none());
        assert!(channels.get(7, "https://127.0.0.1:2", 3).is_none());
        assert!(channels.get(8, "https://127.0.0.1:1", 3).is_none());
        assert!(channels.forget(7));
        assert!(channels.get(7, "https://127.0.0.1:1", 3).is_none());
    }
}
