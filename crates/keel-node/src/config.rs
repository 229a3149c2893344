//! Node configuration: the TOML file `keel server --config` reads (every
//! field can also come from flags), with validation that says what is wrong.

use keel_core::{Membership, NodeId};
use keel_log::Durability;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Another member of the cluster and where to reach it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: NodeId,
    /// Address its peer (replication) port listens on.
    pub peer_addr: String,
    /// Address its client port listens on (sent to clients in redirects).
    pub client_addr: String,
    /// Address its etcd v3 API listens on, if any (for `member list`).
    #[serde(default)]
    pub etcd_addr: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityConfig {
    #[default]
    Sync,
    Replicated,
}

impl From<DurabilityConfig> for Durability {
    fn from(d: DurabilityConfig) -> Self {
        match d {
            DurabilityConfig::Sync => Durability::Sync,
            DurabilityConfig::Replicated => Durability::Replicated,
        }
    }
}

/// Where the service runs (Aeron's threading modes, for one node).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ServiceThreadConfig {
    /// On a thread of its own, fed by the consensus thread: applying
    /// entries, answering reads and capturing snapshots never hold up
    /// heartbeats, votes or replication.
    #[default]
    Dedicated,
    /// On the consensus thread, called in line: one thread wake-up fewer
    /// per committed batch (lower latency, less CPU per message), but every
    /// apply, read and snapshot capture runs between consensus steps. For
    /// services whose work per entry and whose snapshot capture are cheap
    /// (echo); a slow service step here delays heartbeats and elections.
    Shared,
}

/// The Linux scheduling policy of the node's threads.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ThreadSchedulingConfig {
    /// `SCHED_OTHER`, the default for any Linux process: a woken thread may
    /// preempt the running one, so a consensus thread woken for a heartbeat
    /// or a vote runs at once.
    #[default]
    Normal,
    /// `SCHED_BATCH`, for throughput under sustained load: a thread the
    /// node wakes (a follower's consensus thread woken by the leader's
    /// append over loopback, the service thread woken by a commit) does not
    /// preempt the thread that woke it, which finishes its turn first
    /// (sends to every peer, writes the log, answers its clients) instead
    /// of being switched out after its first send. In `keel bench kv` on 2
    /// shared cores: about a fifth less CPU per put and a fifth more puts
    /// per second in the closed loop, but open-loop put tails at 1k–2k
    /// ops/s mostly 4–30x worse (p99 at 1k 14–159 ms against 3–5 ms): a
    /// woken node thread waits for whatever runs on its core to block or
    /// for the scheduler tick. See BENCHMARKS.md.
    Batch,
}

fn default_cluster_id() -> u64 {
    0x6b65_656c // "keel"
}
fn default_heartbeat_ms() -> u64 {
    50
}
fn default_commit_notify_delay_ms() -> u64 {
    5
}
fn default_follower_apply_interval_ms() -> u64 {
    1
}
fn default_clock_drift_ppm() -> u64 {
    10_000
}
fn default_replicated_sync_interval_ms() -> u64 {
    10
}
/// The longest election timeout accepted (etcd refuses 50 s and more).
pub const MAX_ELECTION_TIMEOUT_MS: u64 = 60_000;

/// The largest node id accepted. A sessionless write's sequence number
/// carries the id of the node that took it in its top 16 bits, which keeps
/// the numbers of different nodes apart; a larger id would share its low
/// bits with a smaller one's, and their clients could get each other's
/// replies.
pub const MAX_NODE_ID: NodeId = 0xFFFF;

fn default_write_timeout_ms() -> u64 {
    30_000
}
fn default_election_min_ms() -> u64 {
    500
}
fn default_election_max_ms() -> u64 {
    1000
}
fn default_preferred_leader_hold_ms() -> u64 {
    5000
}
/// The longest `preferred_leader_hold_ms` accepted: a day (longer is as
/// good as never moving leadership back).
pub const MAX_PREFERRED_LEADER_HOLD_MS: u64 = 86_400_000;
fn default_snapshot_bytes() -> u64 {
    64 << 20
}
fn default_snapshot_log_percent() -> u32 {
    100
}
fn default_auto_compaction_mode() -> String {
    "periodic".into()
}
fn default_auto_compaction_retention() -> String {
    "0".into()
}
fn default_watch_progress_notify_interval_ms() -> u64 {
    600_000
}
/// The longest `watch_progress_notify_interval_ms` accepted: a day.
pub const MAX_WATCH_PROGRESS_NOTIFY_INTERVAL_MS: u64 = 86_400_000;
fn default_kv_quota_bytes() -> u64 {
    2 << 30
}
fn default_log_cache_bytes() -> u64 {
    16 << 20
}
/// The largest `queue_depth`: a queue of requests is bounded so that a
/// typo cannot ask for one the channel cannot hold (tokio's channels panic
/// past about 2^61 slots), and a million waiting requests is already
/// seconds of work for a leader.
pub const MAX_QUEUE_DEPTH: usize = 1 << 20;

fn default_queue_depth() -> usize {
    16 * 1024
}
fn default_max_unapplied_bytes() -> u64 {
    16 << 20
}
fn default_max_request_bytes() -> usize {
    4 << 20
}

/// The largest `max_request_bytes` allowed: 63 MiB. A write becomes a log
/// entry whose frame body must fit in `keel_log::frame::MAX_BODY_LEN`
/// (64 MiB): the log refuses a larger one, which stops the node (before it
/// did, such an entry was committed everywhere and no node could restart).
/// Only command entries carry request data (a native-protocol write, or
/// the etcd API's encoded command, which that API bounds by its own limit,
/// at most this one); they add 16 bytes of (client, seq). Timer,
/// membership, session-close and term-start entries carry none. The 1 MiB
/// kept below the frame limit is a generous margin over those 16 bytes,
/// and leaves room for message headers in a 64 MiB peer message.
pub const MAX_REQUEST_BYTES: usize = keel_log::frame::MAX_BODY_LEN - (1 << 20);
/// The body bytes a command entry adds to its request: (client, seq).
const COMMAND_FIELDS_LEN: usize = 16;
const _: () = assert!(MAX_REQUEST_BYTES + COMMAND_FIELDS_LEN <= keel_log::frame::MAX_BODY_LEN);

fn default_service() -> String {
    "kv".into()
}

/// Everything one node needs to run.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id (1 to `MAX_NODE_ID`, unique in the cluster).
    pub id: NodeId,
    /// Every node of a cluster must use the same cluster id; connections
    /// and messages from another cluster are refused.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: u64,
    pub data_dir: PathBuf,
    /// Where to listen for peers.
    pub peer_addr: String,
    /// Where to listen for clients (native protocol).
    pub client_addr: String,
    /// Where to serve /metrics and /status over HTTP (optional).
    #[serde(default)]
    pub http_addr: Option<String>,
    /// Where to serve the etcd v3 gRPC API (optional; etcd's port is 2379).
    #[serde(default)]
    pub etcd_addr: Option<String>,
    /// With `etcd_addr`: serve it over TLS with this certificate chain (PEM),
    /// as etcd's `--cert-file`. Needs `etcd_key_file` and
    /// `etcd_trusted_ca_file`. Every member of a cluster should set it:
    /// members pass some requests to each other at `https://` addresses.
    #[serde(default)]
    pub etcd_cert_file: Option<PathBuf>,
    /// The private key of `etcd_cert_file` (PEM), as etcd's `--key-file`.
    #[serde(default)]
    pub etcd_key_file: Option<PathBuf>,
    /// The CA certificates (PEM) that sign the members' certificates and,
    /// with `etcd_client_cert_auth`, the clients', as etcd's
    /// `--trusted-ca-file`.
    #[serde(default)]
    pub etcd_trusted_ca_file: Option<PathBuf>,
    /// Refuse etcd API clients without a certificate signed by
    /// `etcd_trusted_ca_file`, as etcd's `--client-cert-auth`.
    #[serde(default)]
    pub etcd_client_cert_auth: bool,
    /// Mutual TLS on the peer links with this certificate chain (PEM), as
    /// etcd's `--peer-cert-file`. Needs `peer_key_file` and
    /// `peer_trusted_ca_file`, and every node of the cluster must set them.
    /// The certificate is presented both ways (when this node dials a peer
    /// and when a peer dials it), so it must allow TLS server and client
    /// use, and name the host of this node's `peer_addr` as the other nodes
    /// list it.
    #[serde(default)]
    pub peer_cert_file: Option<PathBuf>,
    /// The private key of `peer_cert_file` (PEM), as etcd's
    /// `--peer-key-file`.
    #[serde(default)]
    pub peer_key_file: Option<PathBuf>,
    /// The CA certificates (PEM) that sign every node's `peer_cert_file`,
    /// as etcd's `--peer-trusted-ca-file`: a connection from a node without
    /// such a certificate is refused, as etcd's `--peer-client-cert-auth`
    /// refuses it (always on here), and so is one whose certificate does
    /// not name the host of the peer address this node lists for the node
    /// its hello names.
    #[serde(default)]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// TLS on the native client port (`client_addr`) with this certificate
    /// chain (PEM); needs `client_tls_key_file`. Clients then connect with
    /// the CA that signs it (`keel kv --cacert`, `ClientOptions::tls`).
    #[serde(default)]
    pub client_tls_cert_file: Option<PathBuf>,
    /// The private key of `client_tls_cert_file` (PEM).
    #[serde(default)]
    pub client_tls_key_file: Option<PathBuf>,
    /// With client TLS: the CA certificates (PEM) that must sign every
    /// client's certificate (clients without one are refused); unset, any
    /// client may connect, as without TLS.
    #[serde(default)]
    pub client_tls_trusted_ca_file: Option<PathBuf>,
    /// HTTPS on `http_addr` (/metrics and /status) with this certificate
    /// chain (PEM); needs `http_tls_key_file`. Plain HTTP is then refused.
    #[serde(default)]
    pub http_tls_cert_file: Option<PathBuf>,
    /// The private key of `http_tls_cert_file` (PEM).
    #[serde(default)]
    pub http_tls_key_file: Option<PathBuf>,
    /// With HTTPS on `http_addr`: the CA certificates (PEM) that must sign
    /// every client's certificate (a scraper's `tls_config` cert); unset,
    /// any client may read /metrics and /status.
    #[serde(default)]
    pub http_tls_trusted_ca_file: Option<PathBuf>,
    /// The web origins (`https://dash.example.com`) whose pages may read the
    /// etcd API's HTTP answers (CORS), as etcd's `--cors`; `"*"` for any.
    /// A request from any other origin (a browser's, with an `Origin`
    /// header) is refused, 403, before it runs, so no page can write keys
    /// either; programs send no `Origin` and are not affected. (A browser
    /// sends `Origin` on every POST: a web UI must be listed even when a
    /// proxy serves it from this port's own origin.) Empty (the
    /// default): no origin is allowed. (etcd's default is any origin and it
    /// runs every request: with no auth, that lets every web page a user
    /// opens read and write the keys.)
    #[serde(default)]
    pub etcd_cors: Vec<String>,
    /// With `etcd_addr`: how the leader compacts the KV history by itself,
    /// as etcd's `--auto-compaction-mode`: `periodic` (keep a span of time)
    /// or `revision` (keep a number of revisions).
    #[serde(default = "default_auto_compaction_mode")]
    pub auto_compaction_mode: String,
    /// As etcd's `--auto-compaction-retention`: in `periodic` mode a
    /// duration (`30m`, `1h30m`, `90s`) or a number of hours, in `revision`
    /// mode a number of revisions; `0` (the default) leaves compaction to
    /// clients.
    #[serde(default = "default_auto_compaction_retention")]
    pub auto_compaction_retention: String,
    /// With `etcd_addr`: how often a watch created with `progress_notify`
    /// that had no events since the last time gets an empty response with
    /// the current revision, as etcd's
    /// `--experimental-watch-progress-notify-interval` (10 minutes).
    #[serde(default = "default_watch_progress_notify_interval_ms")]
    pub watch_progress_notify_interval_ms: u64,
    /// The KV service's space quota, as etcd's `--quota-backend-bytes`
    /// (default 2 GiB, etcd's default): writes that store values are
    /// refused with etcd's "database space exceeded" while the history's
    /// size estimate would pass it; reads, deletes and compactions go on.
    /// The history lives in memory, so this bounds a node's memory. `0`:
    /// no quota (unlike etcd, where 0 means the default).
    #[serde(default = "default_kv_quota_bytes")]
    pub kv_quota_bytes: u64,
    #[serde(default)]
    pub durability: DurabilityConfig,
    /// `replicated` mode: how often each node syncs what it has written (a
    /// power loss of a majority within this window can lose acknowledged
    /// writes; each sync costs CPU and disk work).
    #[serde(default = "default_replicated_sync_interval_ms")]
    pub replicated_sync_interval_ms: u64,
    /// The replicated service: kv, echo, lock, matching.
    #[serde(default = "default_service")]
    pub service: String,
    /// Whether the service gets a thread of its own (see
    /// `ServiceThreadConfig`).
    #[serde(default)]
    pub service_thread: ServiceThreadConfig,
    /// The scheduling policy of every thread the node starts (see
    /// `ThreadSchedulingConfig`; Linux only, ignored elsewhere).
    #[serde(default)]
    pub thread_scheduling: ThreadSchedulingConfig,
    /// Worker threads serving the etcd API and HTTP (0: half the machine's
    /// cores, at least 2; the consensus, service and storage threads have
    /// threads of their own).
    #[serde(default)]
    pub net_threads: usize,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// How long the leader may hold back a commit-only message to a
    /// follower (the next append or heartbeat carries the commit position);
    /// 0 sends it at once. Heartbeats carry it too, so at most
    /// `heartbeat_ms` is used.
    #[serde(default = "default_commit_notify_delay_ms")]
    pub commit_notify_delay_ms: u64,
    /// A follower wakes its service thread for committed entries at most
    /// once per this many milliseconds (entries committed in between are
    /// applied together), unless a client of this node waits on them: a
    /// linearizable read, or a write it took. 0 wakes it for each commit.
    /// The owed wake goes with the consensus thread's first turn this long
    /// after the last wake, or at most five times this after it: followers'
    /// watchers and serializable reads may see writes that much later; only
    /// followers committing more often than this are affected.
    #[serde(default = "default_follower_apply_interval_ms")]
    pub follower_apply_interval_ms: u64,
    /// Leader-lease reads: the leader answers a linearizable read at once
    /// while a quorum has echoed a heartbeat it sent within the lease
    /// (each voter's `election_timeout_min_ms`, which it reports with its
    /// acknowledgements, shortened by `clock_drift_ppm`), instead of
    /// confirming its leadership with a heartbeat round per read. Safe only
    /// if no node's clock rate is off by more than the leader's
    /// `clock_drift_ppm`. Election timeouts, and this setting itself, may
    /// differ between nodes: every node keeps the stickiness leases need,
    /// across restarts that change its timeout too (its hard state keeps
    /// the old one until it has run), except a restart onto a data
    /// directory without that record (written before it existed, or
    /// rebuilt empty), which must not also lower the timeout.
    /// Off by default (etcd 3.4 confirms every linearizable read with a
    /// round).
    #[serde(default)]
    pub lease_reads: bool,
    /// The clock-rate error (parts per million of elapsed time) lease reads
    /// assume at most on any node: 10000 = 1%, far above what a clock
    /// disciplined by NTP drifts. At most 500000.
    #[serde(default = "default_clock_drift_ppm")]
    pub clock_drift_ppm: u64,
    #[serde(default = "default_election_min_ms")]
    pub election_timeout_min_ms: u64,
    #[serde(default = "default_election_max_ms")]
    pub election_timeout_max_ms: u64,
    /// Voters that should lead whenever they can (say the nodes in the
    /// writers' region of a cluster spread over regions); give every node
    /// the same list. A leader outside the list hands leadership to a
    /// listed voter once that voter has answered it without a break for
    /// `preferred_leader_hold_ms` (so leadership returns after a latency
    /// blip or a failover elected a far-away node), unless it was itself
    /// handed leadership by a transfer (an operator's `keel cluster
    /// transfer-leader` is kept for the rest of that term). Unlisted voters
    /// wait longer before they stand for election, so a listed one usually
    /// stands first: failover with every listed node down is slower by up
    /// to the election timeouts' spread. Empty (the default): no
    /// preference.
    #[serde(default)]
    pub preferred_leaders: Vec<NodeId>,
    /// How long a voter in `preferred_leaders` must have answered a leader
    /// outside the list without a break before that leader hands it
    /// leadership, and the least time between two such hand-overs. At
    /// least `election_timeout_max_ms` when the list is set: a shorter hold
    /// could move leadership onto a link that is only briefly up.
    #[serde(default = "default_preferred_leader_hold_ms")]
    pub preferred_leader_hold_ms: u64,
    /// Take a snapshot after this many bytes of log were applied.
    #[serde(default = "default_snapshot_bytes")]
    pub snapshot_every_bytes: u64,
    /// And only once the log applied since the last snapshot is at least
    /// this percentage of that snapshot's size. A snapshot writes the whole
    /// state; with a state larger than `snapshot_every_bytes` (a KV store's
    /// uncompacted history, say) snapshots would otherwise write more than
    /// the log itself, and more with every one as the state grows. 100
    /// keeps the bytes written to snapshots at most those of the log; 0
    /// snapshots every `snapshot_every_bytes` whatever the state's size.
    /// The cost: up to about a snapshot's size of log is kept on disk (to
    /// replay at start-up); in memory, only the newest `log_cache_bytes` of
    /// it keep their data. Higher values keep more.
    #[serde(default = "default_snapshot_log_percent")]
    pub snapshot_log_percent: u32,
    /// How much of the newest log keeps its entries in memory once they
    /// are applied. Older applied entries keep only their term, position
    /// and timestamp (under 100 bytes each), their data being on disk; a
    /// follower that falls further behind is sent them read back from the
    /// log files. Bounds what the log since the last snapshot costs in
    /// memory (`snapshot_log_percent` lets it grow to the size of the
    /// state). A value above the log since the last snapshot keeps it all.
    #[serde(default = "default_log_cache_bytes")]
    pub log_cache_bytes: u64,
    /// Requests and peer messages queued for the consensus thread before new
    /// client requests are answered "busy".
    #[serde(default = "default_queue_depth")]
    pub queue_depth: usize,
    /// Client writes are answered "busy" while this node's log holds more
    /// than this many bytes it has not applied yet (appended but not
    /// committed, or committed but not applied), counting the write. This
    /// bounds the memory and the queueing delay an overloaded cluster
    /// builds up: without it a leader took writes faster than the cluster
    /// committed them and the backlog grew without limit. One write is
    /// always taken when nothing is waiting. At least `max_request_bytes`.
    #[serde(default = "default_max_unapplied_bytes")]
    pub max_unapplied_bytes: u64,
    /// How long a write this node accepted may wait for its entry to be
    /// applied here before its client is told the outcome is unknown (a
    /// write forwarded to a leader that dropped it, for example).
    #[serde(default = "default_write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// Largest client request (and thus command) accepted.
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    /// Start with no membership, waiting to be added as a learner.
    #[serde(default)]
    pub join: bool,
    /// The other members (and nodes that may be added later).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A port's TLS settings (`<port>_tls_cert_file`, `_key_file` and
/// `_trusted_ca_file`): the certificate and its key together or neither,
/// and the trusted CA only with them.
fn check_server_tls(
    port: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    ca: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let (cert_key, key_key) = (
        format!("{port}_tls_cert_file"),
        format!("{port}_tls_key_file"),
    );
    match (cert, key, ca) {
        (Some(_), Some(_), _) | (None, None, None) => Ok(()),
        (None, None, Some(_)) => Err(ConfigError::Invalid(format!(
            "{port}_tls_trusted_ca_file needs {port} TLS: set {cert_key} and {key_key}"
        ))),
        _ => Err(ConfigError::Invalid(format!(
            "{port} TLS needs both {cert_key} and {key_key}"
        ))),
    }
}

impl NodeConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let cfg = Self::read(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a configuration file without validating it, for a caller that
    /// overrides some of its settings (command-line flags) and validates
    /// the result.
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: NodeConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.id == 0 || self.id > MAX_NODE_ID {
            return bad(format!("id {} must be 1 to {MAX_NODE_ID}", self.id));
        }
        let mut ids = BTreeSet::new();
        for p in &self.peers {
            if p.id == 0 || p.id == self.id || !ids.insert(p.id) {
                return bad(format!(
                    "peer id {} is 0, this node's own id, or listed twice",
                    p.id
                ));
            }
            if p.id > MAX_NODE_ID {
                return bad(format!("peer id {} must be 1 to {MAX_NODE_ID}", p.id));
            }
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms >= self.election_timeout_min_ms {
            return bad(format!(
                "heartbeat_ms ({}) must be above 0 and below election_timeout_min_ms ({})",
                self.heartbeat_ms, self.election_timeout_min_ms
            ));
        }
        if self.election_timeout_max_ms > MAX_ELECTION_TIMEOUT_MS {
            return bad(format!(
                "election_timeout_max_ms ({}) must be at most {MAX_ELECTION_TIMEOUT_MS} (a node \
                 restarted with a longer one holds its vote that long after later restarts too)",
                self.election_timeout_max_ms
            ));
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return bad(format!(
                "election_timeout_min_ms ({}) must be below election_timeout_max_ms ({})",
                self.election_timeout_min_ms, self.election_timeout_max_ms
            ));
        }
        check_server_tls(
            "client",
            &self.client_tls_cert_file,
            &self.client_tls_key_file,
            &self.client_tls_trusted_ca_file,
        )?;
        check_server_tls(
            "http",
            &self.http_tls_cert_file,
            &self.http_tls_key_file,
            &self.http_tls_trusted_ca_file,
        )?;
        if self.http_tls_cert_file.is_some() && self.http_addr.is_none() {
            return bad("http_tls_cert_file needs http_addr: it serves HTTPS there".into());
        }
        if self.peer_tls_files()?.is_some() {
            for p in &self.peers {
                keel_net::tls::server_name(&p.peer_addr).map_err(|e| {
                    ConfigError::Invalid(format!("peer {}: {e}, which peer TLS needs", p.id))
                })?;
            }
        }
        let mut preferred = BTreeSet::new();
        for &p in &self.preferred_leaders {
            if p == 0 || !preferred.insert(p) {
                return bad(format!(
                    "preferred_leaders {:?}: node id {p} is {}",
                    self.preferred_leaders,
                    if p == 0 {
                        "0 (ids start at 1)"
                    } else {
                        "listed twice"
                    }
                ));
            }
        }
        if self.preferred_leader_hold_ms == 0
            || self.preferred_leader_hold_ms > MAX_PREFERRED_LEADER_HOLD_MS
        {
            return bad(format!(
                "preferred_leader_hold_ms ({}) must be between 1 and \
                 {MAX_PREFERRED_LEADER_HOLD_MS}",
                self.preferred_leader_hold_ms
            ));
        }
        // Only checked with a preference set: the hold is not used
        // otherwise, and a node with long election timeouts and no
        // preference must not have to set it.
        if !self.preferred_leaders.is_empty()
            && self.preferred_leader_hold_ms < self.election_timeout_max_ms
        {
            return bad(format!(
                "preferred_leader_hold_ms ({}) must be at least election_timeout_max_ms ({}): \
                 a hold shorter than an election timeout could move leadership onto a link \
                 that is only briefly up",
                self.preferred_leader_hold_ms, self.election_timeout_max_ms
            ));
        }
        if !(1..=60_000).contains(&self.replicated_sync_interval_ms) {
            return bad(format!(
                "replicated_sync_interval_ms ({}) must be between 1 and 60000",
                self.replicated_sync_interval_ms
            ));
        }
        if self.follower_apply_interval_ms > 1000 {
            return bad(format!(
                "follower_apply_interval_ms ({}) must be at most 1000 (0: apply each commit at once)",
                self.follower_apply_interval_ms
            ));
        }
        if self.clock_drift_ppm > 500_000 {
            return bad(format!(
                "clock_drift_ppm ({}) must be at most 500000 (50%)",
                self.clock_drift_ppm
            ));
        }
        if self.write_timeout_ms < 100 {
            return bad(format!(
                "write_timeout_ms ({}) must be at least 100",
                self.write_timeout_ms
            ));
        }
        if self.net_threads > 256 {
            return bad(format!(
                "net_threads ({}) must be at most 256 (0: half the cores, at least 2)",
                self.net_threads
            ));
        }
        if self.snapshot_log_percent > 10_000 {
            return bad(format!(
                "snapshot_log_percent ({}) must be at most 10000",
                self.snapshot_log_percent
            ));
        }
        if !(16..=MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return bad(format!(
                "queue_depth ({}) must be between 16 and {MAX_QUEUE_DEPTH}",
                self.queue_depth
            ));
        }
        if self.max_request_bytes < 1024 || self.max_request_bytes > MAX_REQUEST_BYTES {
            return bad(format!(
                "max_request_bytes ({}) must be between 1 KiB and 63 MiB ({MAX_REQUEST_BYTES}): \
                 a write becomes a log entry, which must fit in the log's {}-byte frame limit",
                self.max_request_bytes,
                keel_log::frame::MAX_BODY_LEN
            ));
        }
        if self.max_unapplied_bytes < self.max_request_bytes as u64 {
            return bad(format!(
                "max_unapplied_bytes ({}) must be at least max_request_bytes ({})",
                self.max_unapplied_bytes, self.max_request_bytes
            ));
        }
        if !(1..=MAX_WATCH_PROGRESS_NOTIFY_INTERVAL_MS)
            .contains(&self.watch_progress_notify_interval_ms)
        {
            return bad(format!(
                "watch_progress_notify_interval_ms ({}) must be between 1 and \
                 {MAX_WATCH_PROGRESS_NOTIFY_INTERVAL_MS} (a day)",
                self.watch_progress_notify_interval_ms
            ));
        }
        // Checked on every node, with or without `etcd_addr` (the etcd API
        // applies them): a typo is refused, not kept until the day the API
        // is turned on.
        if let Err(e) =
            check_auto_compaction(&self.auto_compaction_mode, &self.auto_compaction_retention)
        {
            return bad(e);
        }
        // This node's addresses and its peers': a peer address that is no
        // address would leave the node trying to reach it forever.
        let mut own = vec![
            ("peer_addr".to_string(), &self.peer_addr),
            ("client_addr".to_string(), &self.client_addr),
        ];
        own.extend(self.http_addr.iter().map(|a| ("http_addr".to_string(), a)));
        own.extend(self.etcd_addr.iter().map(|a| ("etcd_addr".to_string(), a)));
        let peers = self.peers.iter().flat_map(|p| {
            [
                (format!("peer {}'s peer_addr", p.id), &p.peer_addr),
                (format!("peer {}'s client_addr", p.id), &p.client_addr),
            ]
        });
        for (what, addr) in own.into_iter().chain(peers) {
            // (Port 0: a listener on any free port, as tests use.)
            if !keel_net::is_host_port(addr, true) {
                return bad(format!(
                    "{what} {addr:?} is not host:port (e.g. \"10.0.0.2:7001\")"
                ));
            }
        }
        Ok(())
    }

    /// The peer links' TLS files, if the configuration asks for TLS (all
    /// three set); an error for an incomplete set.
    pub fn peer_tls_files(&self) -> Result<Option<keel_net::tls::PeerTlsFiles>, ConfigError> {
        match (
            &self.peer_cert_file,
            &self.peer_key_file,
            &self.peer_trusted_ca_file,
        ) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(keel_net::tls::PeerTlsFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                trusted_ca_file: ca.clone(),
            })),
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::Invalid(
                "peer TLS needs all three of peer_cert_file, peer_key_file and \
                 peer_trusted_ca_file (the CA verifies the other nodes' certificates)"
                    .into(),
            )),
        }
    }

    /// Reads the TLS files that are set (the etcd API's, the peer links',
    /// the client port's and `http_addr`'s), and checks that each holds what it must in PEM (a
    /// certificate, a private key): a missing, unreadable or wrong file is
    /// refused with the file named, before the node writes anything. (That
    /// a key belongs to its certificate is checked where TLS is set up.)
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let (cert, key) = (
            ("CERTIFICATE-----", "certificate"),
            ("PRIVATE KEY-----", "private key"),
        );
        let files = [
            ("etcd_cert_file", &self.etcd_cert_file, cert),
            ("etcd_key_file", &self.etcd_key_file, key),
            ("etcd_trusted_ca_file", &self.etcd_trusted_ca_file, cert),
            ("peer_cert_file", &self.peer_cert_file, cert),
            ("peer_key_file", &self.peer_key_file, key),
            ("peer_trusted_ca_file", &self.peer_trusted_ca_file, cert),
            ("client_tls_cert_file", &self.client_tls_cert_file, cert),
            ("client_tls_key_file", &self.client_tls_key_file, key),
            (
                "client_tls_trusted_ca_file",
                &self.client_tls_trusted_ca_file,
                cert,
            ),
            ("http_tls_cert_file", &self.http_tls_cert_file, cert),
            ("http_tls_key_file", &self.http_tls_key_file, key),
            (
                "http_tls_trusted_ca_file",
                &self.http_tls_trusted_ca_file,
                cert,
            ),
        ];
        for (what, path, (marker, holds)) in files {
            let Some(path) = path else { continue };
            let text = std::fs::read(path)
                .map_err(|e| ConfigError::Invalid(format!("{what} {}: {e}", path.display())))?;
            let text = String::from_utf8_lossy(&text);
            let found = text.match_indices("-----BEGIN ").any(|(i, _)| {
                text[i..]
                    .lines()
                    .next()
                    .is_some_and(|l| l.ends_with(marker))
            });
            if !found {
                return Err(ConfigError::Invalid(format!(
                    "{what} {}: no PEM {holds} in it",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// The membership a new cluster starts with: this node and its peers
    /// (none for a node that joins an existing cluster).
    pub fn initial_membership(&self) -> Membership {
        if self.join {
            Membership::default()
        } else {
            Membership::new(std::iter::once(self.id).chain(self.peers.iter().map(|p| p.id)))
        }
    }

    /// `preferred_leaders` as a set (validated: no 0, no duplicates).
    pub fn preferred_leader_set(&self) -> BTreeSet<NodeId> {
        self.preferred_leaders.iter().copied().collect()
    }

    /// Ids in `preferred_leaders` that are neither this node nor one of
    /// its peers (a typo, or a node this one cannot know of): said at
    /// start, not refused, since a node's peer list may lag the others'.
    pub fn unknown_preferred_leaders(&self) -> Vec<NodeId> {
        self.preferred_leaders
            .iter()
            .copied()
            .filter(|&p| p != self.id && !self.peers.iter().any(|q| q.id == p))
            .collect()
    }

    /// `net_threads`, with 0 resolved: half of `cores`, at least 2.
    pub fn net_threads_for(&self, cores: usize) -> usize {
        match self.net_threads {
            0 => (cores / 2).max(2),
            n => n,
        }
    }

    pub fn client_addr_of(&self, id: NodeId) -> Option<String> {
        if id == self.id {
            return Some(self.client_addr.clone());
        }
        self.peers
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.client_addr.clone())
    }
}

/// The longest periodic retention accepted: 10 years (longer is as good
/// as off).
const MAX_RETENTION_SECS: f64 = 10.0 * 365.0 * 24.0 * 3600.0;

/// Checks the auto-compaction pair as the etcd API reads it (etcd's
/// `--auto-compaction-mode` and `--auto-compaction-retention`): `revision`
/// takes a whole number of revisions; `periodic` a duration (`1h30m`,
/// `90s`, `1.5h`, `500ms`) or a bare number of hours, at most 10 years; `0`
/// is off in both. The error names the setting and the value.
pub fn check_auto_compaction(mode: &str, retention: &str) -> Result<(), String> {
    let retention = retention.trim();
    match mode {
        "revision" => retention.parse::<u64>().map(|_| ()).map_err(|_| {
            format!(
                "auto_compaction_retention {retention:?}: revision mode keeps a number of \
                 revisions (a whole number, 0 for off)"
            )
        }),
        "periodic" => retention_secs(retention)
            .map(|_| ())
            .map_err(|e| format!("auto_compaction_retention {retention:?}: {e}")),
        other => Err(format!(
            "auto_compaction_mode {other:?}: expected \"periodic\" or \"revision\""
        )),
    }
}

/// A periodic retention in seconds: a Go-style duration, or hours.
/// A retention as etcd takes it, in seconds: a Go-style duration (`1h30m`,
/// `90s`, `1.5h`, `500ms`), or a bare number meaning hours; at most 10
/// years. (The etcd API's compactor parses it with this too.)
pub fn retention_secs(s: &str) -> Result<f64, String> {
    if s.is_empty() {
        return Err("empty (0 turns it off)".into());
    }
    let numeric = |c: char| c.is_ascii_digit() || c == '.';
    let number = |t: &str| -> Result<f64, String> {
        if t.is_empty() || t == "." || !t.chars().all(numeric) || t.matches('.').count() > 1 {
            return Err(format!("{t:?} is not a number"));
        }
        t.parse::<f64>().map_err(|e| format!("{t:?}: {e}"))
    };
    let secs = if s.chars().all(numeric) {
        number(s)? * 3600.0
    } else {
        let mut total = 0.0;
        let mut rest = s;
        while !rest.is_empty() {
            let value_end = rest
                .find(|c: char| !numeric(c))
                .ok_or_else(|| format!("{rest:?} has no unit (h, m, s or ms)"))?;
            let (value, tail) = rest.split_at(value_end);
            let (unit, next) = tail.split_at(tail.find(numeric).unwrap_or(tail.len()));
            let scale = match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                other => return Err(format!("unknown unit {other:?} (h, m, s or ms)")),
            };
            total += number(value)? * scale;
            rest = next;
        }
        total
    };
    if !secs.is_finite() || secs > MAX_RETENTION_SECS {
        return Err(format!(
            "longer than {} hours",
            MAX_RETENTION_SECS as u64 / 3600
        ));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> &'static str {
        "id = 1\ndata_dir = \"d\"\npeer_addr = \"127.0.0.1:7001\"\nclient_addr = \"127.0.0.1:7101\"\n"
    }

    /// The README's settings table names every key the file takes, each
    /// with the default the code has: writing a row's default out gives the
    /// same configuration as leaving the key out.
    #[test]
    fn readme_settings_table_matches_the_code() {
        let readme = include_str!("../../../README.md");
        let table = readme
            .split("| key | default | meaning |")
            .nth(1)
            .expect("the README's settings table");
        let parse = |text: &str| toml::from_str::<NodeConfig>(text).map_err(|e| e.to_string());
        let defaults = parse(base()).expect("base");
        // A TOML value for a row's default cell.
        let value = |cell: &str| -> Option<String> {
            let cell = cell.trim();
            if let Some(mib) = cell.strip_suffix(" MiB") {
                return Some((mib.parse::<u64>().ok()? << 20).to_string());
            }
            match cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) {
                // Backticked: a TOML literal as it is, or a bare word.
                Some(v) if toml::from_str::<toml::Table>(&format!("x = {v}")).is_ok() => {
                    Some(v.to_string())
                }
                Some(v) => Some(format!("{v:?}")),
                None if cell == "required" || cell == "none" => None,
                None => Some(cell.to_string()),
            }
        };
        let mut documented = BTreeSet::new();
        for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = row.split('|').collect();
            let (keys, default) = (cells[1].trim(), cells[2]);
            if keys == "`[[peers]]`" {
                documented.insert("peers".to_string());
                continue;
            }
            let keys: Vec<&str> = keys.split(", ").map(|k| k.trim_matches('`')).collect();
            let values: Vec<Option<String>> = match keys.len() {
                1 => vec![value(default)],
                _ if default.trim() == "none" => vec![None; keys.len()],
                _ => default.split(", ").map(value).collect(),
            };
            assert_eq!(keys.len(), values.len(), "row {row}");
            for (key, v) in keys.iter().zip(values) {
                documented.insert(key.to_string());
                let Some(v) = v else { continue };
                let with = parse(&format!("{}{key} = {v}\n", base()))
                    .unwrap_or_else(|e| panic!("README's default for {key} ({v}): {e}"));
                assert_eq!(
                    with, defaults,
                    "README's default for {key} is {v}, not the code's"
                );
            }
        }
        // serde names every field it knows when it refuses one it does not.
        let err = parse(&format!("{}no_such_key = 1\n", base())).expect_err("unknown key");
        let known: BTreeSet<String> = err
            .split('`')
            .skip(3)
            .step_by(2)
            .map(str::to_string)
            .collect();
        assert!(known.len() > 30 && known.contains("peers"), "{err}");
        for key in &known {
            assert!(
                documented.contains(key),
                "the README's settings table lacks {key}"
            );
        }
        for key in &documented {
            assert!(
                known.contains(key),
                "the README documents {key}, which the file does not take"
            );
        }
    }

    #[test]
    fn parses_defaults_and_peers() {
        let text = format!(
            "{}[[peers]]\nid = 2\npeer_addr = \"127.0.0.1:7002\"\nclient_addr = \"127.0.0.1:7102\"\n",
            base()
        );
        let c: NodeConfig = toml::from_str(&text).expect("parse");
        c.validate().expect("valid");
        assert_eq!(c.durability, DurabilityConfig::Sync);
        assert_eq!(c.kv_quota_bytes, 2 << 30, "etcd's default quota");
        assert_eq!(c.service_thread, ServiceThreadConfig::Dedicated);
        assert_eq!(c.thread_scheduling, ThreadSchedulingConfig::Normal);
        assert_eq!(c.net_threads, 0);
        assert_eq!(
            [1, 2, 3, 16].map(|cores| c.net_threads_for(cores)),
            [2, 2, 2, 8]
        );
        assert_eq!(c.initial_membership(), Membership::new([1, 2]));
        assert_eq!(c.client_addr_of(2).as_deref(), Some("127.0.0.1:7102"));
    }

    /// A peer's address that is no host:port is refused at start, with the
    /// peer named, instead of leaving the node trying to reach it forever.
    #[test]
    fn peer_addresses_must_be_host_and_port() {
        for (peer, client, bad) in [
            ("x", "127.0.0.1:7102", "peer 2's peer_addr \"x\""),
            (
                "127.0.0.1:7002",
                "host:port",
                "peer 2's client_addr \"host:port\"",
            ),
            ("127.0.0.1:70000", "127.0.0.1:7102", "peer 2's peer_addr"),
            (":7002", "127.0.0.1:7102", "peer 2's peer_addr"),
            ("::1:7002", "127.0.0.1:7102", "peer 2's peer_addr"),
            ("127.0.0.1: 7002", "127.0.0.1:7102", "peer 2's peer_addr"),
        ] {
            let text = format!(
                "{}[[peers]]\nid = 2\npeer_addr = {peer:?}\nclient_addr = {client:?}\n",
                base()
            );
            let c: NodeConfig = toml::from_str(&text).expect("parse");
            let e = c.validate().expect_err("a bad peer address").to_string();
            assert!(e.contains(bad) && e.contains("not host:port"), "{e}");
        }
        for ok in ["node-2.example:7002", "[::1]:7002", "10.0.0.2:7002"] {
            let text = format!(
                "{}[[peers]]\nid = 2\npeer_addr = {ok:?}\nclient_addr = {ok:?}\n",
                base()
            );
            let c: NodeConfig = toml::from_str(&text).expect("parse");
            c.validate().expect("a good peer address");
        }
    }

    #[test]
    fn rejects_typos_and_bad_values_with_reasons() {
        let typo = format!("{}heartbeat_msec = 5\n", base());
        let e = toml::from_str::<NodeConfig>(&typo).expect_err("typo accepted");
        assert!(e.to_string().contains("heartbeat_msec"), "{e}");
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        c.election_timeout_min_ms = 2000;
        let e = c.validate().expect_err("min > max accepted");
        assert!(
            e.to_string().contains("election_timeout_min_ms (2000)"),
            "{e}"
        );
        let bad_mode = format!("{}durability = \"fast\"\n", base());
        assert!(toml::from_str::<NodeConfig>(&bad_mode).is_err());
        let shared = format!("{}service_thread = \"shared\"\n", base());
        let c: NodeConfig = toml::from_str(&shared).expect("parse");
        assert_eq!(c.service_thread, ServiceThreadConfig::Shared);
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        assert_eq!(c.replicated_sync_interval_ms, 10);
        c.replicated_sync_interval_ms = 0;
        let e = c.validate().expect_err("a 0 ms sync interval accepted");
        assert!(
            e.to_string().contains("replicated_sync_interval_ms (0)"),
            "{e}"
        );
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        assert_eq!(c.follower_apply_interval_ms, 1);
        c.follower_apply_interval_ms = 5000;
        let e = c.validate().expect_err("a 5 s apply interval accepted");
        assert!(
            e.to_string().contains("follower_apply_interval_ms (5000)"),
            "{e}"
        );
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        assert!(!c.lease_reads);
        assert_eq!(c.clock_drift_ppm, 10_000);
        c.clock_drift_ppm = 600_000;
        let e = c.validate().expect_err("a 60% clock drift accepted");
        assert!(e.to_string().contains("clock_drift_ppm (600000)"), "{e}");
        let lease = format!("{}lease_reads = true\nclock_drift_ppm = 500\n", base());
        let c: NodeConfig = toml::from_str(&lease).expect("parse");
        assert!(c.lease_reads && c.clock_drift_ppm == 500);
        c.validate().expect("valid");
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        c.election_timeout_max_ms = 3_600_000;
        let e = c
            .validate()
            .expect_err("an hour's election timeout accepted");
        assert!(
            e.to_string()
                .contains("election_timeout_max_ms (3600000) must be at most 60000"),
            "{e}"
        );
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        assert_eq!(c.write_timeout_ms, 30_000);
        c.write_timeout_ms = 5;
        let e = c.validate().expect_err("a 5 ms write timeout accepted");
        assert!(e.to_string().contains("write_timeout_ms (5)"), "{e}");
        let mut c: NodeConfig =
            toml::from_str(&format!("{}net_threads = 3\n", base())).expect("parse");
        assert_eq!(c.net_threads_for(2), 3);
        c.net_threads = 1000;
        let e = c.validate().expect_err("1000 network threads accepted");
        assert!(e.to_string().contains("net_threads (1000)"), "{e}");
        let batch = format!("{}thread_scheduling = \"batch\"\n", base());
        let c: NodeConfig = toml::from_str(&batch).expect("parse");
        assert_eq!(c.thread_scheduling, ThreadSchedulingConfig::Batch);
        let bad = format!("{}thread_scheduling = \"fifo\"\n", base());
        let e = toml::from_str::<NodeConfig>(&bad).expect_err("fifo accepted");
        assert!(e.to_string().contains("batch"), "{e}");
        let bad_thread = format!("{}service_thread = \"own\"\n", base());
        let e = toml::from_str::<NodeConfig>(&bad_thread).expect_err("bad mode accepted");
        assert!(e.to_string().contains("dedicated"), "{e}");
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        assert_eq!(c.snapshot_log_percent, 100);
        c.snapshot_log_percent = 20_000;
        let e = c.validate().expect_err("20000% accepted");
        assert!(
            e.to_string().contains("snapshot_log_percent (20000)"),
            "{e}"
        );
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        assert_eq!(c.max_unapplied_bytes, 16 << 20);
        c.max_unapplied_bytes = 1 << 20;
        let e = c
            .validate()
            .expect_err("a backlog bound below one request accepted");
        assert!(
            e.to_string().contains("max_unapplied_bytes (1048576)"),
            "{e}"
        );
    }

    /// Node ids fit in the 16 bits a sessionless write's sequence number
    /// keeps for them: a larger one, this node's or a peer's, is refused.
    #[test]
    fn node_ids_above_the_limit_are_refused() {
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        c.id = MAX_NODE_ID;
        c.validate().expect("the largest id");
        c.id = MAX_NODE_ID + 1;
        let e = c.validate().expect_err("an id above the limit accepted");
        assert!(e.to_string().contains("id 65536 must be 1 to 65535"), "{e}");
        c.id = 0;
        assert!(c.validate().is_err(), "id 0 accepted");
        // (The low 16 bits of 65538 are 2's.)
        let text = format!(
            "{}[[peers]]\nid = 65538\npeer_addr = \"127.0.0.1:7002\"\n\
             client_addr = \"127.0.0.1:7102\"\n",
            base()
        );
        let c: NodeConfig = toml::from_str(&text).expect("parse");
        let e = c
            .validate()
            .expect_err("a peer id above the limit accepted");
        assert!(
            e.to_string().contains("peer id 65538 must be 1 to 65535"),
            "{e}"
        );
    }

    /// `preferred_leaders` and `preferred_leader_hold_ms`: defaults (no
    /// preference, 5 s), the set handed to the core, and refusals that
    /// name the key and the value.
    #[test]
    fn preferred_leaders_are_parsed_and_checked() {
        let c: NodeConfig = toml::from_str(base()).expect("parse");
        assert!(c.preferred_leaders.is_empty());
        assert!(c.preferred_leader_set().is_empty());
        assert_eq!(c.preferred_leader_hold_ms, 5000);
        c.validate().expect("the defaults are valid");
        let text = format!(
            "{}preferred_leaders = [3, 1]\npreferred_leader_hold_ms = 1000\n\
             [[peers]]\nid = 2\npeer_addr = \"127.0.0.1:7002\"\nclient_addr = \"127.0.0.1:7102\"\n",
            base()
        );
        let c: NodeConfig = toml::from_str(&text).expect("parse");
        c.validate().expect("valid");
        assert_eq!(c.preferred_leader_set(), BTreeSet::from([1, 3]));
        assert_eq!(c.preferred_leader_hold_ms, 1000);
        // 3 is neither this node nor a peer: said at start, not refused.
        assert_eq!(c.unknown_preferred_leaders(), vec![3]);
        for (list, wants) in [
            (vec![0], "preferred_leaders [0]: node id 0 is 0"),
            (vec![1, 0], "preferred_leaders [1, 0]: node id 0 is 0"),
            (
                vec![2, 1, 2],
                "preferred_leaders [2, 1, 2]: node id 2 is listed twice",
            ),
        ] {
            let mut bad = c.clone();
            bad.preferred_leaders = list;
            let e = bad.validate().expect_err("a bad list").to_string();
            assert!(e.contains(wants), "{e}");
        }
        for hold in [0, MAX_PREFERRED_LEADER_HOLD_MS + 1, u64::MAX] {
            let mut bad = c.clone();
            bad.preferred_leader_hold_ms = hold;
            let e = bad.validate().expect_err("a bad hold").to_string();
            assert!(
                e.contains(&format!(
                    "preferred_leader_hold_ms ({hold}) must be between 1"
                )),
                "{e}"
            );
        }
        // Shorter than an election timeout, with a preference: refused,
        // saying why.
        let mut short = c.clone();
        short.preferred_leader_hold_ms = 999;
        let e = short.validate().expect_err("a short hold").to_string();
        assert!(
            e.contains(
                "preferred_leader_hold_ms (999) must be at least election_timeout_max_ms (1000)"
            ) && e.contains("only briefly up"),
            "{e}"
        );
        // Without a preference the hold is unused: long election timeouts
        // need no hold set to match.
        short.preferred_leaders.clear();
        short.election_timeout_max_ms = 20_000;
        short.validate().expect("no preference, any hold");
        // From TOML too, with the key named by serde.
        let e = toml::from_str::<NodeConfig>(&format!("{}preferred_leaders = [-1]\n", base()))
            .expect_err("a negative id");
        assert!(e.to_string().contains("preferred_leaders"), "{e}");
        let e = toml::from_str::<NodeConfig>(&format!("{}preferred_leaders = 1\n", base()))
            .expect_err("not a list");
        assert!(e.to_string().contains("preferred_leaders"), "{e}");
    }

    /// Bad auto-compaction settings are refused on every node, not only
    /// on one with `etcd_addr` (they passed silently without it).
    #[test]
    fn auto_compaction_settings_are_checked_without_etcd_addr() {
        let c: NodeConfig = toml::from_str(base()).expect("parse");
        assert!(c.etcd_addr.is_none());
        c.validate().expect("the defaults are valid");
        for (mode, retention, wants) in [
            ("hourly", "0", "auto_compaction_mode \"hourly\""),
            ("periodic", "abc", "auto_compaction_retention \"abc\""),
            ("periodic", "", "empty"),
            ("periodic", "5d", "unknown unit \"d\""),
            ("periodic", "1h30", "has no unit"),
            ("periodic", "1..5h", "not a number"),
            ("periodic", "100000000", "longer than 87600 hours"),
            ("revision", "1h", "a whole number"),
            ("revision", "-5", "a whole number"),
        ] {
            let mut c = c.clone();
            c.auto_compaction_mode = mode.into();
            c.auto_compaction_retention = retention.into();
            let e = c.validate().expect_err("bad auto-compaction accepted");
            assert!(e.to_string().contains(wants), "{mode} {retention}: {e}");
        }
        for (mode, retention) in [
            ("periodic", "0"),
            ("periodic", "30m"),
            ("periodic", "1h30m"),
            ("periodic", "1.5h"),
            ("periodic", "500ms"),
            ("periodic", " 2 "),
            ("revision", "1000"),
            ("revision", "0"),
        ] {
            let mut c = c.clone();
            c.auto_compaction_mode = mode.into();
            c.auto_compaction_retention = retention.into();
            c.validate()
                .unwrap_or_else(|e| panic!("{mode} {retention:?} refused: {e}"));
        }
    }

    /// The watch progress interval defaults to etcd's 10 minutes; 0 (which
    /// would stop the ticker) and more than a day are refused.
    #[test]
    fn watch_progress_notify_interval_is_bounded() {
        let c: NodeConfig = toml::from_str(base()).expect("parse");
        assert_eq!(c.watch_progress_notify_interval_ms, 600_000);
        for (ms, ok) in [
            (0, false),
            (1, true),
            (86_400_000, true),
            (86_400_001, false),
        ] {
            let mut c = c.clone();
            c.watch_progress_notify_interval_ms = ms;
            match c.validate() {
                Ok(()) => assert!(ok, "{ms} accepted"),
                Err(e) => {
                    assert!(!ok, "{ms} refused: {e}");
                    assert!(
                        e.to_string().contains("watch_progress_notify_interval_ms"),
                        "{e}"
                    );
                }
            }
        }
    }

    /// `http_addr` and `etcd_addr` must be host:port too.
    #[test]
    fn http_and_etcd_addresses_must_be_host_and_port() {
        let c: NodeConfig = toml::from_str(base()).expect("parse");
        let mut http = c.clone();
        http.http_addr = Some("127.0.0.1:99999".into());
        let e = http.validate().expect_err("a bad http_addr").to_string();
        assert!(
            e.contains("http_addr \"127.0.0.1:99999\" is not host:port"),
            "{e}"
        );
        let mut etcd = c.clone();
        etcd.etcd_addr = Some("localhost".into());
        let e = etcd.validate().expect_err("a bad etcd_addr").to_string();
        assert!(
            e.contains("etcd_addr \"localhost\" is not host:port"),
            "{e}"
        );
    }

    /// The etcd API's TLS files are read and checked for what they hold.
    #[test]
    fn tls_files_are_checked_for_their_contents() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cert = tmp.path().join("cert.pem");
        let key = tmp.path().join("key.pem");
        let junk = tmp.path().join("junk.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        std::fs::write(
            &key,
            "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n",
        )
        .expect("write");
        std::fs::write(&junk, "not pem\n").expect("write");
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        c.check_files().expect("no files set");
        c.etcd_cert_file = Some(cert.clone());
        c.etcd_key_file = Some(key.clone());
        c.etcd_trusted_ca_file = Some(cert.clone());
        c.check_files().expect("good files");
        let mut swapped = c.clone();
        swapped.etcd_key_file = Some(cert.clone());
        let e = swapped.check_files().expect_err("a certificate as the key");
        assert_eq!(
            e.to_string(),
            format!(
                "invalid configuration: etcd_key_file {}: no PEM private key in it",
                cert.display()
            )
        );
        let mut junk_ca = c.clone();
        junk_ca.etcd_trusted_ca_file = Some(junk.clone());
        let e = junk_ca
            .check_files()
            .expect_err("junk as the CA")
            .to_string();
        assert!(
            e.contains("etcd_trusted_ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );
        let mut missing = c.clone();
        missing.etcd_cert_file = Some(tmp.path().join("missing.pem"));
        let e = missing
            .check_files()
            .expect_err("a missing file")
            .to_string();
        let os = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
        assert!(
            e.contains("etcd_cert_file") && e.contains("missing.pem") && e.contains(&os),
            "{e}"
        );
    }

    /// Peer TLS takes all three files or none, the files' contents are
    /// checked as the etcd API's are, and every peer's address must be
    /// able to name a certificate.
    #[test]
    fn peer_tls_settings_are_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cert = pem_certificate_file(tmp.path());
        let text = format!(
            "{}[[peers]]\nid = 2\npeer_addr = \"node-2.example:7001\"\nclient_addr = \"127.0.0.1:7102\"\n",
            base()
        );
        let mut c: NodeConfig = toml::from_str(&text).expect("parse");
        assert_eq!(c.peer_tls_files().expect("none set"), None);
        c.peer_cert_file = Some(cert.clone());
        let e = c.validate().expect_err("one of three").to_string();
        assert!(
            e.contains("peer TLS needs all three of peer_cert_file"),
            "{e}"
        );
        c.peer_key_file = Some(cert.clone());
        c.peer_trusted_ca_file = Some(cert.clone());
        c.validate()
            .expect("all three, and a peer address with a DNS name");
        let e = c
            .check_files()
            .expect_err("a certificate as the key")
            .to_string();
        assert!(
            e.contains("peer_key_file") && e.contains("no PEM private key"),
            "{e}"
        );
        c.peers[0].peer_addr = "node_2!:7001".into();
        let e = c
            .validate()
            .expect_err("a host no certificate can name")
            .to_string();
        assert!(
            e.contains("peer 2: address \"node_2!:7001\"") && e.contains("peer TLS"),
            "{e}"
        );
    }

    /// A file in `dir` that holds a PEM certificate block (not a valid
    /// certificate: `check_files` looks for the block only).
    fn pem_certificate_file(dir: &std::path::Path) -> PathBuf {
        let cert = dir.join("cert.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        cert
    }

    /// `http_tls_*`: certificate and key together, the CA only with them,
    /// and only with an `http_addr` to serve them on; the files' contents
    /// are checked.
    #[test]
    fn http_tls_settings_are_checked() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cert = pem_certificate_file(tmp.path());
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        c.http_tls_trusted_ca_file = Some(cert.clone());
        let e = c.validate().expect_err("a CA alone").to_string();
        assert!(
            e.contains("http_tls_trusted_ca_file needs http TLS: set http_tls_cert_file"),
            "{e}"
        );
        c.http_tls_cert_file = Some(cert.clone());
        let e = c.validate().expect_err("no key").to_string();
        assert!(
            e.contains("http TLS needs both http_tls_cert_file and http_tls_key_file"),
            "{e}"
        );
        c.http_tls_key_file = Some(cert.clone());
        let e = c.validate().expect_err("no http_addr").to_string();
        assert!(e.contains("http_tls_cert_file needs http_addr"), "{e}");
        c.http_addr = Some("127.0.0.1:7301".into());
        c.validate().expect("complete");
        let e = c
            .check_files()
            .expect_err("a certificate as the key")
            .to_string();
        assert!(
            e.contains("http_tls_key_file") && e.contains("no PEM private key"),
            "{e}"
        );
    }

    /// A huge queue_depth passed validation and then panicked inside the
    /// channel it sized at start ("starting the node panicked"); it is now
    /// refused by name.
    #[test]
    fn queue_depth_is_bounded() {
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        for bad in [0, 15, MAX_QUEUE_DEPTH + 1, 1 << 61, usize::MAX] {
            c.queue_depth = bad;
            let e = c.validate().expect_err("out of range").to_string();
            assert!(
                e.contains(&format!(
                    "queue_depth ({bad}) must be between 16 and 1048576"
                )),
                "{e}"
            );
        }
        for good in [16, MAX_QUEUE_DEPTH] {
            c.queue_depth = good;
            c.validate().expect("in range");
        }
    }

    /// A request of 64 MiB − 15 .. 64 MiB made a command entry over the
    /// log's frame limit: committed on every node, then no node could
    /// restart. The limit now keeps the largest request's entry in a frame.
    #[test]
    fn max_request_bytes_keeps_the_largest_entry_within_a_log_frame() {
        let mut c: NodeConfig = toml::from_str(base()).expect("parse");
        c.max_unapplied_bytes = 1 << 30;
        for too_big in [64 << 20, MAX_REQUEST_BYTES + 1] {
            c.max_request_bytes = too_big;
            let e = c.validate().expect_err("a request over the frame limit");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("max_request_bytes ({too_big})"))
                    && msg.contains("frame limit"),
                "{msg}"
            );
        }
        c.max_request_bytes = MAX_REQUEST_BYTES;
        c.validate().expect("the largest limit is valid");
        // The largest request, as the command entry it becomes (the only
        // kind that carries request data), fits in a frame.
        let e = keel_core::Entry {
            term: u64::MAX,
            position: u64::MAX / 2,
            timestamp: u64::MAX,
            kind: keel_core::EntryKind::Command {
                client: u64::MAX,
                seq: u64::MAX,
            },
            data: bytes::Bytes::from(vec![0u8; MAX_REQUEST_BYTES]),
        };
        let body = keel_log::frame::body_len(&e);
        assert_eq!(body, MAX_REQUEST_BYTES + COMMAND_FIELDS_LEN);
        assert!(body <= keel_log::frame::MAX_BODY_LEN);
    }
}
