//! The `keel` command: `server` runs one node, `dev` a local cluster,
//! `kv` talks to the key-value service and `cluster` inspects and manages
//! the cluster.

mod bench;
mod dev;
mod logging;

/// mimalloc instead of glibc's malloc: a node allocates on one thread and
/// frees on another all the time (requests decoded by the network threads,
/// applied by the service thread, replies freed back on the network
/// threads), which glibc's per-thread arenas handle poorly (arena locks,
/// consolidation, heap growth by mprotect); see BENCHMARKS.md for the
/// before/after.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_client::{Client, ClientOptions};
use keel_core::{MembershipChange, NodeId, Service};
use keel_kv::{Command, Compare, KvService, Query, Response};
use keel_node::{NodeConfig, PeerConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "Keel: a fault-tolerant replicated state machine cluster",
    long_about = "Keel runs a deterministic service on every node of a cluster and feeds every copy \
the same totally ordered, timestamped log (Raft). Start a local cluster with `keel dev`, then try \
`keel kv put greeting hello`, `keel kv get greeting` and `keel cluster status`."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run one node of a cluster (flags or a TOML config file).
    Server(ServerArgs),
    /// Start a local cluster of `keel server` processes (data under ./keel-data).
    Dev(dev::DevArgs),
    /// Read and write the key-value service.
    #[command(
        after_help = "Exit status: 0 done; 1 the key was not found (get) or the condition did \
not hold (cas); 2 an error (unreachable, timed out, refused)."
    )]
    Kv {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: KvCmd,
    },
    /// Inspect and manage the cluster.
    #[command(
        after_help = "Exit status: 0 done; 1 `status` did not get every endpoint's status; 2 an \
error (unreachable, timed out, refused)."
    )]
    Cluster {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Seed a new node's data directory from a backup (`etcdctl snapshot
    /// save` against a Keel member), given the node's server configuration
    /// (a config file or the same flags as `server`). Run it for every
    /// initial member of the new cluster, from the same backup, then start
    /// them: the new cluster has the backup's data and its own members.
    Restore(RestoreArgs),
    /// Benchmarks on local clusters: `echo` (latency vs offered rate) and
    /// `kv` (Keel vs etcd over the etcd API); results go to BENCHMARKS.md.
    #[command(subcommand)]
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The backup file.
    backup: PathBuf,
    /// Allow the configuration's cluster_id to be the backed-up cluster's.
    /// Only once every member of that cluster is gone for good: a member
    /// restored in place of a running one forgets its votes and what it
    /// acknowledged, and can break the running cluster's safety.
    #[arg(long)]
    same_cluster_id: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args, Debug)]
struct ConnArgs {
    /// Client addresses (nodes' client_addr, not their etcd API ports) of
    /// cluster nodes, comma-separated (any one suffices).
    #[arg(long, env = "KEEL_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, value_delimiter = ',', value_parser = parse_endpoint, global = true)]
    endpoints: Vec<String>,
    /// Give up after this many seconds (at least 1): the whole command, its
    /// retries and redirects included; `cluster status` waits this long for
    /// each endpoint (it asks them all at once).
    #[arg(long, default_value_t = 10, value_parser = parse_timeout, global = true)]
    timeout: u64,
    /// Connect with TLS, trusting the nodes' certificates this CA (PEM)
    /// signs (nodes with client_tls_cert_file); each must name the host of
    /// its endpoint.
    #[arg(long, env = "KEEL_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// With --cacert: this client's certificate (PEM), for nodes that
    /// require one (client_tls_trusted_ca_file). Needs --key.
    #[arg(
        long = "cert",
        id = "tls_cert",
        value_name = "CERT",
        env = "KEEL_CERT",
        global = true
    )]
    cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(
        long = "key",
        id = "tls_key",
        value_name = "KEY",
        env = "KEEL_KEY",
        global = true
    )]
    key: Option<PathBuf>,
}

impl ConnArgs {
    /// The TLS the flags ask for, if any.
    fn tls(&self) -> Result<Option<keel_net::tls::ClientTls>> {
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            (Some(_), None) => bail!("--cert needs --key (its private key)"),
            (None, Some(_)) => bail!("--key needs --cert (the certificate it is the key of)"),
        };
        match &self.cacert {
            Some(ca) => Ok(Some(
                keel_net::tls::ClientTls::load(ca, identity).map_err(anyhow::Error::msg)?,
            )),
            None if identity.is_some() => {
                bail!("--cert and --key need --cacert (the CA that signs the nodes' certificates)")
            }
            None => Ok(None),
        }
    }
}

fn parse_timeout(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("0 would give up before the first attempt: give at least 1 (seconds)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number of seconds ({e})")),
    }
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    keel_client::check_endpoint(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// A u64 in decimal or, with 0x, in hex (as a config file's cluster_id).
fn parse_u64(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    };
    r.map_err(|e| format!("{s:?}: expected a number, decimal or 0x hex ({e})"))
}

#[derive(Subcommand, Debug)]
enum KvCmd {
    /// Set KEY to VALUE.
    Put { key: String, value: String },
    /// Print KEY's value (linearizable, or --stale from the contacted node).
    Get {
        key: String,
        /// Answer from the contacted node's state (the first endpoint that
        /// answers), and say on stderr how far behind it is.
        #[arg(long)]
        stale: bool,
    },
    /// Delete KEY (or every key with the prefix, with --prefix).
    Del {
        key: String,
        /// Delete every key that starts with KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// List keys starting with PREFIX (all keys if omitted).
    Range {
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many keys (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
    /// Set KEY to NEW only if the condition holds (exactly one of the --expect flags).
    Cas {
        key: String,
        new: String,
        /// The current value must be this.
        #[arg(long, group = "expect")]
        expect_value: Option<String>,
        /// The current version must be this (0: the key must not exist).
        #[arg(long, group = "expect")]
        expect_version: Option<u64>,
        /// The key must not exist.
        #[arg(long, group = "expect")]
        expect_absent: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Role, term, leader and log positions (bytes) of every endpoint,
    /// asked at once (each within --timeout). Lag: how far the node's
    /// applied position is behind the highest commit position among the
    /// endpoints' answers, the leader's when the leader is among them
    /// (otherwise the leader's may be further on, which the output says).
    /// Then the members as the leader (or the most up-to-date endpoint)
    /// knows them, with the ids removed from the cluster, which are never
    /// used again.
    Status,
    /// Hand leadership to node TARGET; returns once it leads, or fails if it
    /// does not within the minimum plus the maximum election timeout (a
    /// lagging or unreachable target).
    TransferLeader { target: NodeId },
    /// Add node ID as a learner (it must be in the nodes' peer lists).
    /// Ids are never reused: the id of a node removed from the cluster is
    /// refused, so give a new node a new id.
    AddLearner { id: NodeId },
    /// Make learner ID a voter.
    Promote { id: NodeId },
    /// Remove node ID from the cluster (the leader too). The removed node
    /// exits (status 2) and will not start again on its data directory,
    /// and its id is never used again (a node in its place needs a new id).
    Remove { id: NodeId },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum DurabilityArg {
    Sync,
    Replicated,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ServiceThreadArg {
    /// The service on a thread of its own: a slow apply or snapshot capture
    /// never holds up heartbeats, votes or replication.
    Dedicated,
    /// The service on the consensus thread: one thread wake-up fewer per
    /// committed batch; for services with cheap steps (echo).
    Shared,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ThreadSchedulingArg {
    /// SCHED_OTHER, Linux's default: woken threads may preempt.
    Normal,
    /// SCHED_BATCH: a thread the node wakes does not preempt the one that
    /// woke it (more throughput under sustained load, worse tails at
    /// moderate rates).
    Batch,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// TOML config file (the keys are the flags' names with `_` for `-`,
    /// and `[[peers]]` for --peer); flags given too override its values.
    /// Only the file sets kv_quota_bytes, auto_compaction_mode,
    /// auto_compaction_retention, watch_progress_notify_interval_ms,
    /// log_cache_bytes, queue_depth, max_request_bytes and
    /// max_unapplied_bytes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (not 0).
    #[arg(long)]
    id: Option<NodeId>,
    /// Where the node keeps its log, hard state and snapshots (a relative
    /// path is taken from the current directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// host:port to listen on for peers (replication).
    #[arg(long)]
    peer_addr: Option<String>,
    /// host:port to listen on for clients (Keel's native protocol: `keel kv`,
    /// `keel cluster`).
    #[arg(long)]
    client_addr: Option<String>,
    /// host:port for GET /metrics (Prometheus) and GET /status (JSON);
    /// HTTPS with --http-tls-cert-file. Default: none.
    #[arg(long)]
    http_addr: Option<String>,
    /// host:port to serve the etcd v3 gRPC API on (etcd's own port is 2379),
    /// so etcdctl and etcd client libraries can use this node. Needs the
    /// kv service. Default: none.
    #[arg(long)]
    etcd_addr: Option<String>,
    /// Serve the etcd API over TLS with this certificate (PEM; etcd's
    /// --cert-file). Needs --etcd-key-file and --etcd-trusted-ca-file.
    /// TLS files replaced while the node runs are taken without a restart.
    #[arg(long)]
    etcd_cert_file: Option<PathBuf>,
    /// The private key of --etcd-cert-file (PEM; etcd's --key-file).
    #[arg(long)]
    etcd_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the members' certificates and, with
    /// --etcd-client-cert-auth, the clients' (etcd's --trusted-ca-file).
    #[arg(long)]
    etcd_trusted_ca_file: Option<PathBuf>,
    /// Refuse etcd API clients without a certificate signed by the trusted
    /// CA (etcd's --client-cert-auth). --etcd-client-cert-auth=false
    /// overrides the config file.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    etcd_client_cert_auth: Option<bool>,
    /// Mutual TLS on the peer links with this certificate (PEM; etcd's
    /// --peer-cert-file), presented both when dialing and when dialed: it
    /// must name the host of this node's peer address and allow TLS server
    /// and client use. Needs --peer-key-file and --peer-trusted-ca-file;
    /// every node of the cluster must use peer TLS. Replaced files are
    /// taken without a restart.
    #[arg(long)]
    peer_cert_file: Option<PathBuf>,
    /// The private key of --peer-cert-file (PEM; etcd's --peer-key-file).
    #[arg(long)]
    peer_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign every node's --peer-cert-file
    /// (etcd's --peer-trusted-ca-file): connections from nodes without
    /// such a certificate, or with one not naming the host of the peer
    /// address this node lists for them, are refused.
    #[arg(long)]
    peer_trusted_ca_file: Option<PathBuf>,
    /// TLS on the native client port with this certificate (PEM); needs
    /// --client-tls-key-file. Clients connect with `--cacert`. Replaced
    /// files are taken without a restart.
    #[arg(long)]
    client_tls_cert_file: Option<PathBuf>,
    /// The private key of --client-tls-cert-file (PEM).
    #[arg(long)]
    client_tls_key_file: Option<PathBuf>,
    /// With client TLS: refuse clients without a certificate signed by this
    /// CA (PEM).
    #[arg(long)]
    client_tls_trusted_ca_file: Option<PathBuf>,
    /// Serve --http-addr over HTTPS only, with this certificate (PEM);
    /// needs --http-tls-key-file. Replaced files are taken without a
    /// restart.
    #[arg(long)]
    http_tls_cert_file: Option<PathBuf>,
    /// The private key of --http-tls-cert-file (PEM).
    #[arg(long)]
    http_tls_key_file: Option<PathBuf>,
    /// With HTTPS on --http-addr: refuse clients without a certificate
    /// signed by this CA (PEM).
    #[arg(long)]
    http_tls_trusted_ca_file: Option<PathBuf>,
    /// Web origins whose pages may use the etcd API over HTTP (CORS,
    /// etcd's --cors), comma-separated, e.g. https://dash.example.com; `*`
    /// for any. Requests from other web origins are refused (403).
    /// Default: none.
    #[arg(long, value_delimiter = ',')]
    etcd_cors: Vec<String>,
    /// Another member: ID=PEER_ADDR,CLIENT_ADDR[,ETCD_ADDR] (repeat for
    /// each), e.g. 2=127.0.0.1:7202,127.0.0.1:7102,127.0.0.1:12379. Given,
    /// they replace the config file's [[peers]].
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<PeerConfig>,
    /// When an entry counts toward commit on a node: sync (default), once
    /// it is synced to disk there; replicated, once it is written to the
    /// OS there (synced every --replicated-sync-interval-ms).
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// In replicated mode, how often each node syncs what it has written
    /// (1..=60000; default 10).
    #[arg(long)]
    replicated_sync_interval_ms: Option<u64>,
    /// The replicated service (default kv).
    #[arg(long, value_parser = ["kv", "echo", "lock", "matching"])]
    service: Option<String>,
    /// Whether the service gets a thread of its own (default) or runs on
    /// the consensus thread.
    #[arg(long, value_enum)]
    service_thread: Option<ServiceThreadArg>,
    /// Linux scheduling policy of the node's threads (default normal).
    #[arg(long, value_enum)]
    thread_scheduling: Option<ThreadSchedulingArg>,
    /// Worker threads for the etcd API and HTTP (0, the default: half the
    /// cores, at least 2; at most 256).
    #[arg(long)]
    net_threads: Option<usize>,
    /// Start empty and wait to be added to an existing cluster.
    /// --join=false overrides the config file.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    join: Option<bool>,
    /// Leader heartbeat interval in milliseconds (default 50; above 0 and
    /// below the minimum election timeout).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// How long the leader may hold back a commit-only message to a
    /// follower, in milliseconds (default 5; 0: at once; heartbeats carry
    /// it too, so at most the heartbeat interval is used).
    #[arg(long)]
    commit_notify_delay_ms: Option<u64>,
    /// A follower applies committed entries at most once per this many
    /// milliseconds unless a client of its own waits on them (0: each
    /// commit at once; at most 1000; default 1).
    #[arg(long)]
    follower_apply_interval_ms: Option<u64>,
    /// Answer linearizable reads on the leader from a lease (no heartbeat
    /// round per read) while a quorum of voters has each echoed a heartbeat
    /// within that voter's minimum election timeout (which it reports),
    /// shortened by the leader's --clock-drift-ppm. Election timeouts and
    /// this setting may differ between nodes; safe while no node's clock
    /// rate is off by more than the leader's --clock-drift-ppm.
    /// --lease-reads=false overrides the config file.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    lease_reads: Option<bool>,
    /// The clock-rate error lease reads assume at most on any node, in
    /// parts per million (0-500000, default 10000 = 1%).
    #[arg(long)]
    clock_drift_ppm: Option<u64>,
    /// How long a write this node accepted may wait to be applied before
    /// its client is told the outcome is unknown, in milliseconds (default
    /// 30000; at least 100).
    #[arg(long)]
    write_timeout_ms: Option<u64>,
    /// Election timeouts are drawn from [min, max), in milliseconds (default
    /// 500; below the maximum). The minimum is also how long a node refuses
    /// other candidates after hearing a leader (and after a start; after a
    /// restart that lowered it, the previous value).
    #[arg(long)]
    election_timeout_min_ms: Option<u64>,
    /// The top of the election timeout range, in milliseconds (default
    /// 1000; at most 60000).
    #[arg(long)]
    election_timeout_max_ms: Option<u64>,
    /// Node ids that should lead whenever they can, comma-separated (e.g.
    /// 1,2): the nodes in the writers' region, to keep leadership there.
    /// A leader not listed hands leadership to a listed voter once that
    /// voter has answered it steadily for --preferred-leader-hold-ms, so
    /// leadership returns after a latency blip or a failover elected a
    /// far-away node; unlisted nodes wait longer before standing for
    /// election. A leader handed leadership by a transfer (`keel cluster
    /// transfer-leader`) keeps it for its term. Set the same list on every
    /// node. `none` clears a list the --config file sets. Default: none (no
    /// preference).
    #[arg(long, value_parser = parse_node_ids)]
    preferred_leaders: Option<NodeIds>,
    /// How long a preferred node must have answered an unlisted leader
    /// without a break before that leader hands it leadership, and the
    /// least time between two such hand-overs, in milliseconds (default
    /// 5000; with --preferred-leaders at least the maximum election
    /// timeout, so a link that is only briefly up does not get leadership).
    #[arg(long)]
    preferred_leader_hold_ms: Option<u64>,
    /// Take a snapshot after this many bytes of log are applied (default
    /// 67108864, 64 MiB).
    #[arg(long)]
    snapshot_every_bytes: Option<u64>,
    /// Take a snapshot only once the log since the last one is at least
    /// this percentage of that snapshot's size, so snapshots of a large
    /// state write no more than the log does (0-10000, default 100; 0:
    /// every --snapshot-every-bytes whatever the state's size).
    #[arg(long)]
    snapshot_log_percent: Option<u32>,
    /// Every node of a cluster must have the same cluster id (decimal or
    /// 0x hex; default 0x6b65656c); connections from another cluster are
    /// refused.
    #[arg(long, value_parser = parse_u64)]
    cluster_id: Option<u64>,
}

/// A comma-separated list of node ids, or `none` for an empty one.
#[derive(Clone, Debug)]
struct NodeIds(Vec<NodeId>);

fn parse_node_ids(s: &str) -> Result<NodeIds, String> {
    if s.trim() == "none" {
        return Ok(NodeIds(Vec::new()));
    }
    s.split(',')
        .map(|id| {
            id.trim().parse().map_err(|_| {
                format!("{id:?} is not a node id: expected ids separated by commas (1,2) or none")
            })
        })
        .collect::<Result<_, _>>()
        .map(NodeIds)
}

fn parse_peer(s: &str) -> Result<PeerConfig, String> {
    let usage = || {
        format!("--peer {s:?}: expected ID=PEER_ADDR,CLIENT_ADDR[,ETCD_ADDR], e.g. 2=127.0.0.1:7202,127.0.0.1:7102")
    };
    let (id, addrs) = s.split_once('=').ok_or_else(usage)?;
    let parts: Vec<&str> = addrs.split(',').map(str::trim).collect();
    if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(usage());
    }
    Ok(PeerConfig {
        id: id.trim().parse().map_err(|_| usage())?,
        peer_addr: parts[0].to_string(),
        client_addr: parts[1].to_string(),
        etcd_addr: parts.get(2).map(|a| a.to_string()),
    })
}

fn server_config(a: &ServerArgs) -> Result<NodeConfig> {
    let mut cfg = match &a.config {
        // Validated once the flags are applied: a flag may mend the file.
        Some(p) => NodeConfig::read(p)?,
        None => {
            let missing: Vec<&str> = [
                ("--id", a.id.is_none()),
                ("--data-dir", a.data_dir.is_none()),
                ("--peer-addr", a.peer_addr.is_none()),
                ("--client-addr", a.client_addr.is_none()),
            ]
            .iter()
            .filter(|(_, m)| *m)
            .map(|(n, _)| *n)
            .collect();
            if !missing.is_empty() {
                bail!(
                    "without --config, these flags are required: {}",
                    missing.join(", ")
                );
            }
            toml::from_str("id = 1\ndata_dir = \"\"\npeer_addr = \"\"\nclient_addr = \"\"\n")
                .context("building the default configuration")?
        }
    };
    if let Some(v) = a.id {
        cfg.id = v;
    }
    if let Some(v) = &a.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &a.peer_addr {
        cfg.peer_addr = v.clone();
    }
    if let Some(v) = &a.client_addr {
        cfg.client_addr = v.clone();
    }
    if let Some(v) = &a.http_addr {
        cfg.http_addr = Some(v.clone());
    }
    if let Some(v) = &a.etcd_addr {
        cfg.etcd_addr = Some(v.clone());
    }
    if let Some(v) = &a.etcd_cert_file {
        cfg.etcd_cert_file = Some(v.clone());
    }
    if let Some(v) = &a.etcd_key_file {
        cfg.etcd_key_file = Some(v.clone());
    }
    if let Some(v) = &a.etcd_trusted_ca_file {
        cfg.etcd_trusted_ca_file = Some(v.clone());
    }
    if let Some(v) = a.etcd_client_cert_auth {
        cfg.etcd_client_cert_auth = v;
    }
    if let Some(v) = &a.peer_cert_file {
        cfg.peer_cert_file = Some(v.clone());
    }
    if let Some(v) = &a.peer_key_file {
        cfg.peer_key_file = Some(v.clone());
    }
    if let Some(v) = &a.peer_trusted_ca_file {
        cfg.peer_trusted_ca_file = Some(v.clone());
    }
    if let Some(v) = &a.client_tls_cert_file {
        cfg.client_tls_cert_file = Some(v.clone());
    }
    if let Some(v) = &a.client_tls_key_file {
        cfg.client_tls_key_file = Some(v.clone());
    }
    if let Some(v) = &a.client_tls_trusted_ca_file {
        cfg.client_tls_trusted_ca_file = Some(v.clone());
    }
    if let Some(v) = &a.http_tls_cert_file {
        cfg.http_tls_cert_file = Some(v.clone());
    }
    if let Some(v) = &a.http_tls_key_file {
        cfg.http_tls_key_file = Some(v.clone());
    }
    if let Some(v) = &a.http_tls_trusted_ca_file {
        cfg.http_tls_trusted_ca_file = Some(v.clone());
    }
    if !a.etcd_cors.is_empty() {
        cfg.etcd_cors = a.etcd_cors.clone();
    }
    if !a.peers.is_empty() {
        cfg.peers = a.peers.clone();
    }
    if let Some(d) = a.durability {
        cfg.durability = match d {
            DurabilityArg::Sync => keel_node::config::DurabilityConfig::Sync,
            DurabilityArg::Replicated => keel_node::config::DurabilityConfig::Replicated,
        };
    }
    if let Some(v) = a.replicated_sync_interval_ms {
        cfg.replicated_sync_interval_ms = v;
    }
    if let Some(s) = &a.service {
        cfg.service = s.clone();
    }
    if let Some(t) = a.service_thread {
        cfg.service_thread = match t {
            ServiceThreadArg::Dedicated => keel_node::config::ServiceThreadConfig::Dedicated,
            ServiceThreadArg::Shared => keel_node::config::ServiceThreadConfig::Shared,
        };
    }
    if let Some(t) = a.thread_scheduling {
        cfg.thread_scheduling = match t {
            ThreadSchedulingArg::Batch => keel_node::config::ThreadSchedulingConfig::Batch,
            ThreadSchedulingArg::Normal => keel_node::config::ThreadSchedulingConfig::Normal,
        };
    }
    if let Some(n) = a.net_threads {
        cfg.net_threads = n;
    }
    if let Some(v) = a.join {
        cfg.join = v;
    }
    if let Some(c) = a.cluster_id {
        cfg.cluster_id = c;
    }
    if let Some(v) = a.heartbeat_ms {
        cfg.heartbeat_ms = v;
    }
    if let Some(v) = a.commit_notify_delay_ms {
        cfg.commit_notify_delay_ms = v;
    }
    if let Some(v) = a.follower_apply_interval_ms {
        cfg.follower_apply_interval_ms = v;
    }
    if let Some(v) = a.lease_reads {
        cfg.lease_reads = v;
    }
    if let Some(v) = a.clock_drift_ppm {
        cfg.clock_drift_ppm = v;
    }
    if let Some(v) = a.write_timeout_ms {
        cfg.write_timeout_ms = v;
    }
    if let Some(v) = a.election_timeout_min_ms {
        cfg.election_timeout_min_ms = v;
    }
    if let Some(v) = a.election_timeout_max_ms {
        cfg.election_timeout_max_ms = v;
    }
    if let Some(NodeIds(v)) = &a.preferred_leaders {
        cfg.preferred_leaders = v.clone();
    }
    if let Some(v) = a.preferred_leader_hold_ms {
        cfg.preferred_leader_hold_ms = v;
    }
    if let Some(v) = a.snapshot_every_bytes {
        cfg.snapshot_every_bytes = v;
    }
    if let Some(v) = a.snapshot_log_percent {
        cfg.snapshot_log_percent = v;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// What the KV service shares with the etcd API: its space quota (whose
/// alarm the API reports) and its users and roles (which it checks calls
/// against).
#[derive(Default)]
pub struct KvShared {
    quota: Option<Arc<keel_kv::SpaceQuota>>,
    auth: Option<Arc<keel_kv::AuthShared>>,
}

/// The configured service, and what the KV service shares.
pub fn make_service(cfg: &NodeConfig) -> Result<(Box<dyn Service + Send>, KvShared)> {
    if cfg.service == "kv" {
        let kv = KvService::default().with_quota(cfg.kv_quota_bytes);
        let shared = KvShared {
            quota: kv.quota(),
            auth: Some(kv.auth_shared()),
        };
        return Ok((Box::new(kv), shared));
    }
    Ok((make_other_service(&cfg.service)?, KvShared::default()))
}

fn make_other_service(name: &str) -> Result<Box<dyn Service + Send>> {
    Ok(match name {
        "echo" => Box::new(keel_examples::echo::EchoService::default()),
        "lock" => Box::new(keel_examples::lock::LockService::default()),
        "matching" => Box::new(keel_examples::matching::MatchingEngine::default()),
        other => bail!("unknown service {other:?}: expected kv, echo, lock or matching"),
    })
}

/// The names of the services a node can run.
const SERVICES: [&str; 4] = ["kv", "echo", "lock", "matching"];

/// The configured service, to check that a backup is a state it can load
/// (`keel_node::restore_backup`): when it cannot, the error says which of
/// the other services' state the backup holds, if one loads it, and shows
/// byte strings (a snapshot's header) as text.
pub fn restore_check(cfg: &NodeConfig) -> Result<Box<dyn Service + Send>> {
    Ok(Box::new(RestoreCheck {
        name: cfg.service.clone(),
        service: make_service(cfg)?.0,
    }))
}

struct RestoreCheck {
    name: String,
    service: Box<dyn Service + Send>,
}

impl RestoreCheck {
    /// Which other service loads `data` (a service's snapshot).
    fn whose(&self, data: &[u8]) -> Option<&'static str> {
        SERVICES.into_iter().filter(|s| *s != self.name).find(|s| {
            let other = match *s {
                "kv" => Ok(Box::new(KvService::default()) as Box<dyn Service + Send>),
                other => make_other_service(other),
            };
            other.is_ok_and(|mut o| o.restore(Some(data)).is_ok())
        })
    }
}

impl Service for RestoreCheck {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        self.service.restore(snapshot).map_err(|e| {
            match snapshot.and_then(|data| self.whose(data)) {
                Some(s) => format!(
                    "it holds the {s} service's state: restore it with the {s} service \
                     (--service {s}, or service = \"{s}\" in the configuration), the service \
                     of the cluster it came from"
                ),
                None => e,
            }
        })
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        self.service.snapshot(out)
    }
    fn on_message(
        &mut self,
        ctx: &mut keel_core::Context<'_>,
        client: keel_core::ClientId,
        data: &[u8],
    ) -> Bytes {
        self.service.on_message(ctx, client, data)
    }
    fn query(&self, data: &[u8]) -> Bytes {
        self.service.query(data)
    }
}

fn restore(a: RestoreArgs) -> Result<()> {
    let cfg = server_config(&a.server)?;
    let service = restore_check(&cfg)?;
    let meta = keel_node::restore_backup(&cfg, service, &a.backup, a.same_cluster_id)
        .with_context(|| format!("restoring node {} from {}", cfg.id, a.backup.display()))?;
    println!(
        "node {} restored in {}: the backup's state at log position {} (term {}), members {:?}. \
         Restore every initial member from this same backup, then start them with `keel server` \
         and the same configuration.",
        cfg.id,
        cfg.data_dir.display(),
        meta.position,
        meta.term,
        meta.membership.voters,
    );
    Ok(())
}

fn run_server(a: ServerArgs) -> Result<()> {
    let cfg = server_config(&a)?;
    let (service, shared) = make_service(&cfg)?;
    let id = cfg.id;
    let etcd = etcd_api(&cfg, shared)?;
    if let Some((addr, api)) = &etcd {
        // A port taken by another program, or TLS files that do not make a
        // working configuration (a key that is not the certificate's, say),
        // fail the start before the node joins its peers and touches its
        // data (and `keel dev` sees a node that could not start, not one
        // that stops once running).
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("serving the etcd API on {addr}"))?;
        if let Some(files) = &api.tls {
            keel_etcd::tls::Tls::load(files)
                .map_err(|e| anyhow::anyhow!("serving the etcd API on {addr}: {e}"))?;
        }
    }
    let node = std::sync::Arc::new(
        keel_node::start(cfg, service).with_context(|| format!("starting node {id}"))?,
    );
    if let Some((addr, api)) = etcd {
        if let Err(e) = keel_etcd::serve(node.clone(), addr, api) {
            node.shutdown();
            let _ = node.wait();
            bail!("serving the etcd API on {addr}: {e}");
        }
        tracing::info!("node {id}: etcd v3 API on {addr}");
    }
    // SIGTERM / SIGINT: graceful stop (flush and sync storage).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut stopped = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = stopped.tick() => if node.is_stopped() { break },
            }
        }
        anyhow::Ok(())
    })?;
    node.shutdown();
    node.wait()?;
    Ok(())
}

/// Where and how to serve the etcd API, if the configuration asks for it.
fn etcd_api(
    cfg: &NodeConfig,
    shared: KvShared,
) -> Result<Option<(std::net::SocketAddr, keel_etcd::ApiConfig)>> {
    let Some(addr) = &cfg.etcd_addr else {
        if etcd_tls(cfg)?.is_some() || cfg.etcd_client_cert_auth {
            bail!("the etcd API's TLS settings are set but etcd_addr is not");
        }
        if !cfg.etcd_cors.is_empty() {
            bail!("etcd_cors is set but etcd_addr is not");
        }
        return Ok(None);
    };
    if cfg.service != "kv" {
        bail!(
            "etcd_addr is set but the service is {:?}: the etcd API needs service = \"kv\"",
            cfg.service
        );
    }
    let addr = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
        .with_context(|| format!("etcd_addr {addr:?}: expected host:port"))?
        .next()
        .with_context(|| format!("etcd_addr {addr:?} resolves to no address"))?;
    let tls = etcd_tls(cfg)?;
    let url = |a: &str| format!("http://{a}");
    // With TLS every member's etcd API is taken to be TLS too.
    let client_url = |a: &str| match tls {
        Some(_) => format!("https://{a}"),
        None => url(a),
    };
    let mut members = vec![keel_etcd::MemberInfo {
        id: cfg.id,
        name: format!("node{}", cfg.id),
        peer_urls: vec![url(&cfg.peer_addr)],
        client_urls: cfg.etcd_addr.iter().map(|a| client_url(a)).collect(),
    }];
    members.extend(cfg.peers.iter().map(|p| keel_etcd::MemberInfo {
        id: p.id,
        name: format!("node{}", p.id),
        peer_urls: vec![url(&p.peer_addr)],
        client_urls: p.etcd_addr.iter().map(|a| client_url(a)).collect(),
    }));
    let mut api = keel_etcd::ApiConfig::new(members);
    api.quota = shared.quota;
    if let Some(auth) = shared.auth {
        api.auth = auth;
    }
    api.tls = tls;
    api.election_timeout = std::time::Duration::from_millis(cfg.election_timeout_max_ms);
    api.watch_progress_interval =
        std::time::Duration::from_millis(cfg.watch_progress_notify_interval_ms);
    api.cors = keel_etcd::http::Cors::parse(&cfg.etcd_cors).map_err(anyhow::Error::msg)?;
    api.auto_compaction = keel_etcd::compactor::AutoCompaction::parse(
        &cfg.auto_compaction_mode,
        &cfg.auto_compaction_retention,
    )
    .map_err(anyhow::Error::msg)?;
    // etcd's request limit, or the node's own if that is lower.
    api.max_request_bytes = cfg
        .max_request_bytes
        .min(keel_etcd::DEFAULT_MAX_REQUEST_BYTES);
    Ok(Some((addr, api)))
}

/// The etcd API's TLS files, if the configuration asks for TLS; an error
/// for an incomplete set.
fn etcd_tls(cfg: &NodeConfig) -> Result<Option<keel_etcd::tls::TlsFiles>> {
    match (
        &cfg.etcd_cert_file,
        &cfg.etcd_key_file,
        &cfg.etcd_trusted_ca_file,
    ) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(keel_etcd::tls::TlsFiles {
            cert_file: cert.clone(),
            key_file: key.clone(),
            trusted_ca_file: ca.clone(),
            client_cert_auth: cfg.etcd_client_cert_auth,
        })),
        (None, None, None) if !cfg.etcd_client_cert_auth => Ok(None),
        (None, None, None) => bail!(
            "etcd_client_cert_auth needs TLS: set etcd_cert_file, etcd_key_file and \
             etcd_trusted_ca_file"
        ),
        _ => bail!(
            "etcd API TLS needs all three of etcd_cert_file, etcd_key_file and \
             etcd_trusted_ca_file (the CA verifies the other members' certificates, \
             and the clients' with etcd_client_cert_auth)"
        ),
    }
}

fn client(conn: &ConnArgs) -> Result<Client> {
    let mut opts = ClientOptions::new(conn.endpoints.clone());
    opts.call_timeout = Duration::from_secs(conn.timeout);
    opts.tls = conn.tls()?;
    Ok(Client::new(opts)?)
}

fn show(b: &Bytes) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn kv(conn: ConnArgs, cmd: KvCmd) -> Result<i32> {
    let mut c = client(&conn)?;
    let write = |cmd: Command| -> Result<Bytes> {
        cmd.validate()?;
        Ok(cmd.encode())
    };
    let resp = match &cmd {
        KvCmd::Put { key, value } => {
            let data = write(Command::Put {
                key: Bytes::from(key.clone()),
                value: Bytes::from(value.clone()),
            })?;
            c.write(data).await?
        }
        KvCmd::Del { key, prefix } => {
            let cmd = if *prefix {
                match Query::prefix(Bytes::from(key.clone()), 0) {
                    Query::Range { start, end, .. } => Command::DeleteRange { start, end },
                    _ => unreachable!("prefix() builds a range"),
                }
            } else {
                Command::Delete {
                    key: Bytes::from(key.clone()),
                }
            };
            c.write(write(cmd)?).await?
        }
        KvCmd::Cas {
            key,
            new,
            expect_value,
            expect_version,
            expect_absent,
        } => {
            let expected = match (expect_value, expect_version, expect_absent) {
                (Some(v), None, false) => Compare::ValueEquals(Bytes::from(v.clone())),
                (None, Some(n), false) => Compare::VersionEquals(*n),
                (None, None, true) => Compare::VersionEquals(0),
                _ => bail!("give exactly one of --expect-value, --expect-version, --expect-absent"),
            };
            let data = write(Command::Cas {
                key: Bytes::from(key.clone()),
                expected,
                value: Bytes::from(new.clone()),
            })?;
            c.write(data).await?
        }
        KvCmd::Get { key, stale } => {
            let q = Query::Get {
                key: Bytes::from(key.clone()),
            };
            q.validate()?;
            if *stale {
                let (data, applied, commit) = c.stale_read(q.encode()).await?;
                eprintln!(
                    "(stale read from {}: applied {applied}, {} bytes behind its known commit)",
                    c.endpoint(),
                    commit.saturating_sub(applied)
                );
                data
            } else {
                c.read(q.encode()).await?
            }
        }
        KvCmd::Range { prefix, limit } => {
            let q = Query::prefix(Bytes::from(prefix.clone()), *limit);
            q.validate()?;
            c.read(q.encode()).await?
        }
    };
    let resp = Response::decode(&resp).map_err(|e| {
        anyhow::anyhow!(
            "the cluster's answer is not a kv service's ({e}): the cluster does not seem to run \
             the kv service, which `keel kv` needs (it is chosen when a cluster is created: \
             `--service kv`, the default, for `keel dev` and `keel server`, or service = \"kv\" \
             in each node's configuration)"
        )
    })?;
    Ok(match resp {
        Response::Put { revision, .. } => {
            println!("OK (revision {revision})");
            0
        }
        Response::Delete {
            deleted, revision, ..
        }
        | Response::DeleteRange {
            deleted, revision, ..
        } => {
            println!("deleted {deleted} (revision {revision})");
            0
        }
        Response::Cas {
            succeeded,
            revision,
            current,
        } => {
            if succeeded {
                println!("OK (revision {revision})");
                0
            } else {
                match current {
                    Some(kv) => println!(
                        "FAILED: {} is {:?} (version {}, mod revision {})",
                        show(&kv.key),
                        show(&kv.value),
                        kv.version,
                        kv.mod_revision
                    ),
                    None => println!("FAILED: the key does not exist"),
                }
                1
            }
        }
        Response::Get { kv, .. } => match kv {
            Some(kv) => {
                println!("{}", show(&kv.value));
                0
            }
            None => {
                eprintln!("key not found");
                1
            }
        },
        Response::Range {
            kvs, more, count, ..
        } => {
            for kv in &kvs {
                println!("{}={}", show(&kv.key), show(&kv.value));
            }
            if more {
                eprintln!("({} of {count} keys shown)", kvs.len());
            }
            0
        }
        Response::Status { revision, keys, .. } => {
            println!("revision {revision}, {keys} keys");
            0
        }
        Response::Error { code, message } => {
            eprintln!("error ({code:?}): {message}");
            2
        }
        other => {
            println!("{other:?}");
            0
        }
    })
}

async fn cluster(conn: ConnArgs, cmd: ClusterCmd) -> Result<i32> {
    match cmd {
        ClusterCmd::Status => {
            println!(
                "{:<22} {:>4} {:<13} {:>6} {:>6} {:>12} {:>12} {:>12} {:>12} {:>10}",
                "endpoint",
                "id",
                "role",
                "term",
                "leader",
                "append",
                "durable",
                "commit",
                "applied",
                "lag"
            );
            // All at once, so the command takes at most --timeout.
            let timeout = Duration::from_secs(conn.timeout);
            let tls = conn.tls()?;
            let asked: Vec<_> = conn
                .endpoints
                .iter()
                .map(|e| {
                    let (e, tls) = (e.clone(), tls.clone());
                    tokio::spawn(
                        async move { Client::status_with(&e, timeout, tls.as_ref()).await },
                    )
                })
                .collect();
            let mut statuses = Vec::new();
            for (e, task) in conn.endpoints.iter().zip(asked) {
                let s = task
                    .await
                    .map_err(|j| keel_client::ClientError::Unreachable {
                        endpoint: e.clone(),
                        why: j.to_string(),
                    })
                    .and_then(|s| s);
                statuses.push((e, s));
            }
            let answers = || statuses.iter().filter_map(|(_, s)| s.as_ref().ok());
            // The leader's commit position is the highest; without the
            // leader, the highest any endpoint knows (the leader's may be
            // further on).
            let highest_commit = answers().map(|s| s.commit).max().unwrap_or(0);
            let leader_answered = answers().any(|s| s.role == "leader");
            let answered = answers().count();
            // The members as the leader (or the most up-to-date endpoint)
            // knows them.
            let members_from = statuses
                .iter()
                .filter_map(|(e, s)| s.as_ref().ok().map(|s| (e, s)))
                .max_by_key(|(_, s)| (s.role == "leader", s.commit))
                .map(|(e, s)| ((*e).clone(), s.voters.clone(), s.learners.clone()));
            let mut failed = 0;
            for (e, s) in statuses {
                match s {
                    Ok(s) => println!(
                        "{:<22} {:>4} {:<13} {:>6} {:>6} {:>12} {:>12} {:>12} {:>12} {:>10}",
                        e,
                        s.id,
                        s.role,
                        s.term,
                        s.leader.map_or("-".into(), |l| l.to_string()),
                        s.append,
                        s.durable,
                        s.commit,
                        s.applied,
                        highest_commit.saturating_sub(s.applied)
                    ),
                    Err(keel_client::ClientError::Unreachable { why, .. }) => {
                        failed += 1;
                        println!("{e:<22} unreachable: {why}");
                    }
                    Err(err) => {
                        failed += 1;
                        println!("{e:<22} {err}");
                    }
                }
            }
            if answered > 0 && !leader_answered {
                println!(
                    "(the leader is not among the endpoints: lag is counted from the highest \
                     commit position they know, {highest_commit}; the leader's may be further on)"
                );
            }
            if let Some((e, voters, learners)) = members_from {
                let list = |ids: &[u64]| {
                    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
                    if ids.is_empty() {
                        "none".to_string()
                    } else {
                        ids.join(", ")
                    }
                };
                // (A node of a version before this request has no answer:
                // the line goes without the removed ids.)
                let removed = match Client::membership_with(&e, timeout, tls.as_ref()).await {
                    Ok(m) => format!(
                        "; removed, never used again: {}",
                        list(&m.removed.into_iter().collect::<Vec<_>>())
                    ),
                    Err(_) => String::new(),
                };
                println!(
                    "members (as {e} knows them): voters {}; learners {}{removed}",
                    list(&voters),
                    list(&learners)
                );
            }
            Ok(i32::from(failed > 0))
        }
        ClusterCmd::TransferLeader { target } => {
            client(&conn)?.transfer_leader(target).await?;
            println!("leadership transferred to node {target}");
            Ok(0)
        }
        ClusterCmd::AddLearner { id } => membership(&conn, MembershipChange::AddLearner(id)).await,
        ClusterCmd::Promote { id } => membership(&conn, MembershipChange::PromoteLearner(id)).await,
        ClusterCmd::Remove { id } => membership(&conn, MembershipChange::Remove(id)).await,
    }
}

async fn membership(conn: &ConnArgs, change: MembershipChange) -> Result<i32> {
    client(conn)?.change_membership(change).await?;
    // The change is answered once its entry has committed.
    let done = match change {
        MembershipChange::AddLearner(id) => format!("node {id} added as a learner"),
        MembershipChange::PromoteLearner(id) => format!("node {id} promoted to voter"),
        MembershipChange::Remove(id) => format!("node {id} removed from the cluster"),
    };
    println!("{done} (membership change committed)");
    Ok(0)
}

/// Turns transparent huge pages off for this process (and the processes it
/// starts). With THP on, the first touch of each fresh 2 MiB region the
/// allocator hands out is a synchronous fault that zeroes the whole huge
/// page, on whichever thread allocates; on a virtual machine whose memory
/// the host backs lazily that is milliseconds per fault, and the consensus
/// thread (which grows the in-memory log) took tens of such faults in a
/// row. Measured side by side with the echo benchmark: p99 at 10k msg/s
/// 41-101 ms with THP, 4-22 ms without; consensus turns over 10 ms went
/// from ~50 to 9 per run. Returns the OS error if the kernel refused.
#[cfg(target_os = "linux")]
fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and only
    // sets a flag on this process's memory map.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn disable_transparent_huge_pages() -> std::io::Result<()> {
    Ok(())
}

fn main() {
    // First, before the allocator maps its arenas.
    let thp = disable_transparent_huge_pages();
    let cli = Cli::parse();
    logging::init();
    if let Err(e) = thp {
        tracing::debug!("could not turn transparent huge pages off: {e}");
    }
    let result = match cli.cmd {
        Cmd::Server(a) => run_server(a).map(|_| 0),
        Cmd::Restore(a) => restore(a).map(|_| 0),
        Cmd::Dev(a) => dev::run(a),
        Cmd::Kv { conn, cmd } => block(kv(conn, cmd)),
        Cmd::Cluster { conn, cmd } => block(cluster(conn, cmd)),
        Cmd::Bench(a) => bench::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn block<F: std::future::Future<Output = Result<i32>>>(f: F) -> Result<i32> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}
