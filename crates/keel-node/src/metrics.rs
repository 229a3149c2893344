//! Prometheus metrics of one node (`prometheus-client`): role, term,
//! positions, elections started and won, snapshots taken and installed,
//! busy rejections, the depths of the consensus, service and storage
//! queues, and a commit latency histogram (request accepted by the leader →
//! reply).

use keel_net::codec::NodeStatus;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub struct Metrics {
    registry: Registry,
    pub role: Gauge,
    pub term: Gauge,
    pub append: Gauge,
    pub durable: Gauge,
    pub commit: Gauge,
    pub applied: Gauge,
    pub queue_depth: Gauge,
    pub service_queue_depth: Gauge,
    pub storage_queue_depth: Gauge,
    pub leader_changes: Counter,
    pub elections_started: Counter,
    pub snapshots_taken: Counter,
    pub snapshots_installed: Counter,
    pub busy: Counter,
    pub commit_latency: Histogram,
    pub peer_messages_dropped: Gauge<u64, AtomicU64>,
    pub bad_frames: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keel");
        let m = Metrics {
            role: Gauge::default(),
            term: Gauge::default(),
            append: Gauge::default(),
            durable: Gauge::default(),
            commit: Gauge::default(),
            applied: Gauge::default(),
            queue_depth: Gauge::default(),
            service_queue_depth: Gauge::default(),
            storage_queue_depth: Gauge::default(),
            leader_changes: Counter::default(),
            elections_started: Counter::default(),
            snapshots_taken: Counter::default(),
            snapshots_installed: Counter::default(),
            busy: Counter::default(),
            commit_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            peer_messages_dropped: Gauge::default(),
            bad_frames: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "role",
            "0 follower, 1 pre-candidate, 2 candidate, 3 leader",
            m.role.clone(),
        );
        registry.register("term", "current term", m.term.clone());
        registry.register(
            "append_position",
            "end of the log (bytes)",
            m.append.clone(),
        );
        registry.register(
            "durable_position",
            "end of the durable log (bytes)",
            m.durable.clone(),
        );
        registry.register(
            "commit_position",
            "commit position (bytes)",
            m.commit.clone(),
        );
        registry.register(
            "applied_position",
            "applied position (bytes)",
            m.applied.clone(),
        );
        registry.register(
            "queue_depth",
            "client requests waiting for the consensus thread (beyond queue_depth, clients get busy)",
            m.queue_depth.clone(),
        );
        registry.register(
            "service_queue_depth",
            "committed entries, reads and replies waiting for the service thread (always 0 with service_thread = shared)",
            m.service_queue_depth.clone(),
        );
        registry.register(
            "storage_queue_depth",
            "appends and other requests waiting for the storage thread",
            m.storage_queue_depth.clone(),
        );
        registry.register(
            "elections_started",
            "elections this node started as a candidate (after winning a pre-vote)",
            m.elections_started.clone(),
        );
        registry.register(
            "snapshots_taken",
            "snapshots of the service state this node took",
            m.snapshots_taken.clone(),
        );
        registry.register(
            "snapshots_installed",
            "snapshots received from the leader and installed",
            m.snapshots_installed.clone(),
        );
        registry.register(
            "leader_elections_won",
            "times this node became leader",
            m.leader_changes.clone(),
        );
        registry.register(
            "busy_rejections",
            "client requests answered busy (queue full)",
            m.busy.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "write accepted by the leader to reply",
            m.commit_latency.clone(),
        );
        registry.register(
            "peer_messages_dropped",
            "peer messages dropped (queue full or link down)",
            m.peer_messages_dropped.clone(),
        );
        registry.register(
            "bad_frames",
            "connections closed for a frame that did not decode",
            m.bad_frames.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn observe(&self, s: &NodeStatus) {
        let role = match s.role.as_str() {
            "leader" => 3,
            "candidate" => 2,
            "pre-candidate" => 1,
            _ => 0,
        };
        self.role.set(role);
        self.term.set(s.term as i64);
        self.append.set(s.append as i64);
        self.durable.set(s.durable as i64);
        self.commit.set(s.commit as i64);
        self.applied.set(s.applied as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# metrics encoding failed\n");
        }
        out
    }
}
