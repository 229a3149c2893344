//! Prometheus metrics of one node (`prometheus-client`): role, term,
//! positions, elections started and won, snapshots taken and installed,
//! busy rejections, the depths of the consensus, service and storage
//! queues, the log held in memory since the last snapshot, a commit latency
//! histogram (request accepted by the leader → reply), and the standard
//! `process_*` metrics (resident memory, CPU time, threads, descriptors)
//! read from `/proc/self` on each scrape.

use keel_net::codec::NodeStatus;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The content type of `Metrics::render`'s text: OpenMetrics, which is
/// what `prometheus-client` writes (counters are families `x` with samples
/// `x_total`, and `# EOF` ends the text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
    /// 1 while the node is amnesic (`crate::amnesia`).
    pub amnesic: Gauge,
    pub elections_won: Counter,
    pub leaders_seen: Counter,
    pub elections_started: Counter,
    pub lease_reads: Counter,
    pub preference_transfers: Counter,
    pub forwards_dropped: Counter,
    pub writes_held: Counter,
    pub leaderless_requests: Counter,
    pub reads_retried: Counter,
    pub snapshots_taken: Counter,
    pub snapshots_installed: Counter,
    pub busy: Counter,
    pub admission_refusals: Counter,
    pub commit_latency: Histogram,
    /// Each fdatasync of the log (etcd: `etcd_disk_wal_fsync_duration_seconds`).
    pub log_fsync: Histogram,
    /// The transport's counters (`keel_net::tcp::NetStats`), copied in at
    /// each render (`render_with`).
    pub peer_messages_dropped: Counter<u64, AtomicU64>,
    pub bad_frames: Counter<u64, AtomicU64>,
    pub rejected_connections: Counter<u64, AtomicU64>,
    pub http_rejected_connections: Counter<u64, AtomicU64>,
    pub client_reads_paused: Counter<u64, AtomicU64>,
    /// The peer protocol each peer link speaks, 0 while down (copied in
    /// from `NetStats::peer_protocols` at each render).
    pub peer_protocol: Family<PeerLabel, Gauge>,
    pub log_retained_bytes: Gauge,
    pub log_retained_entries: Gauge,
    pub log_reads: Counter,
}

/// A metric's `peer` label: the node at the other end of a peer link.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("keel");
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
            amnesic: Gauge::default(),
            elections_won: Counter::default(),
            leaders_seen: Counter::default(),
            elections_started: Counter::default(),
            lease_reads: Counter::default(),
            preference_transfers: Counter::default(),
            forwards_dropped: Counter::default(),
            writes_held: Counter::default(),
            leaderless_requests: Counter::default(),
            reads_retried: Counter::default(),
            snapshots_taken: Counter::default(),
            snapshots_installed: Counter::default(),
            busy: Counter::default(),
            admission_refusals: Counter::default(),
            commit_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            log_fsync: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            peer_messages_dropped: Counter::default(),
            bad_frames: Counter::default(),
            rejected_connections: Counter::default(),
            http_rejected_connections: Counter::default(),
            client_reads_paused: Counter::default(),
            peer_protocol: Family::default(),
            log_retained_bytes: Gauge::default(),
            log_retained_entries: Gauge::default(),
            log_reads: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "role",
            "0 follower, 1 pre-candidate, 2 candidate, 3 leader",
            m.role.clone(),
        );
        registry.register("term", "current term", m.term.clone());
        registry.register(
            "amnesic",
            "1 while the node, back from a power loss in replicated mode, has not caught up with \
             a leader elected since (its votes count only beside enough votes of voters that kept \
             their logs)",
            m.amnesic.clone(),
        );
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
            "lease_reads",
            "linearizable reads this node answered as leader from its lease, without a heartbeat round (lease_reads = true)",
            m.lease_reads.clone(),
        );
        registry.register(
            "leader_preference_transfers",
            "leadership transfers this node started as a leader outside preferred_leaders, to a \
             preferred voter that had answered it steadily for preferred_leader_hold_ms",
            m.preference_transfers.clone(),
        );
        registry.register(
            "forwarded_writes_dropped",
            "client writes a follower forwarded to this node as its leader that it dropped (it \
             knew no leader to pass them to, or held as many as it may while a leadership \
             transfer was in progress), and writes it held during a transfer and dropped when it \
             stood for election; the followers' clients are told the outcome is unknown once the \
             next term commits without them, this node's own clients at once not the leader",
            m.forwards_dropped.clone(),
        );
        registry.register(
            "writes_held",
            "client writes this node held (its own clients' and those followers forwarded) while \
             it transferred leadership or knew no leader, to append or pass on to the next leader",
            m.writes_held.clone(),
        );
        registry.register(
            "requests_waited_for_leader",
            "client writes and linearizable reads this node took while it knew no leader \
             (between a new term's vote and its leader's first message, as in a leadership \
             transfer): held for up to two heartbeats until one was known, else answered not the \
             leader",
            m.leaderless_requests.clone(),
        );
        registry.register(
            "reads_retried",
            "linearizable reads refused not the leader after a new term began (the leader they \
             were asked of, or this node, lost leadership meanwhile) and asked again of the new \
             term's leader",
            m.reads_retried.clone(),
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
            m.elections_won.clone(),
        );
        registry.register(
            "leader_changes_seen",
            "times this node learned of a new leader, the first included (etcd's etcd_server_leader_changes_seen_total)",
            m.leaders_seen.clone(),
        );
        registry.register(
            "busy_rejections",
            "client requests answered busy (queue full)",
            m.busy.clone(),
        );
        registry.register(
            "admission_refusals",
            "writes the service refused before the log (e.g. the KV space quota)",
            m.admission_refusals.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "write accepted by the leader to reply",
            m.commit_latency.clone(),
        );
        registry.register(
            "log_fsync_seconds",
            "each fdatasync of the log: after a batch of appends (sync durability) or in the background (replicated), and at segment rolls; the disk's latency, which every sync-mode write waits for",
            m.log_fsync.clone(),
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
        registry.register(
            "rejected_connections",
            "connections refused before they were served: a peer's hello refused (another \
             cluster, an unknown node, a certificate that does not name it), a failed TLS \
             handshake, a client without TLS on a TLS port, or too many opening at once",
            m.rejected_connections.clone(),
        );
        registry.register(
            "http_rejected_connections",
            "connections to http_addr refused: plain HTTP on its HTTPS port or TLS on its plain \
             one, a failed TLS handshake, or too many at once",
            m.http_rejected_connections.clone(),
        );
        registry.register(
            "client_reads_paused",
            "times a client connection was not read further because the answers held and \
             expected for it reached 4 MiB (a client sending faster than it reads)",
            m.client_reads_paused.clone(),
        );
        registry.register(
            "peer_protocol",
            "the peer protocol version the link to this peer speaks (the older of the two nodes'), \
             0 while it is down: once every link speaks this node's newest, the nodes are upgraded",
            m.peer_protocol.clone(),
        );
        registry.register(
            "log_retained_bytes",
            "log held in memory (bytes): since the last snapshot, less the data of applied entries beyond log_cache_bytes",
            m.log_retained_bytes.clone(),
        );
        registry.register(
            "log_retained_entries",
            "entries since the last snapshot (those whose data left memory included)",
            m.log_retained_entries.clone(),
        );
        registry.register(
            "log_reads",
            "appends sent to a follower behind the in-memory log with entries read back from the log files",
            m.log_reads.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
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

    /// The Prometheus text exposition, with the transport's counters
    /// (`net`) brought up to date first: what `/metrics` serves.
    pub fn render_with(&self, net: &keel_net::tcp::NetStats) -> String {
        use std::sync::atomic::Ordering;
        // The sources only grow: a copy of each keeps the counter monotonic
        // whatever the order of concurrent renders.
        for (counter, source) in [
            (&self.peer_messages_dropped, &net.peer_messages_dropped),
            (&self.bad_frames, &net.bad_frames),
            (&self.rejected_connections, &net.rejected_connections),
            (&self.client_reads_paused, &net.client_reads_paused),
        ] {
            counter
                .inner()
                .fetch_max(source.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (peer, version) in net.peer_protocols() {
            self.peer_protocol
                .get_or_create(&PeerLabel { peer })
                .set(i64::from(version));
        }
        self.render()
    }

    /// The OpenMetrics text exposition (`CONTENT_TYPE`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.push_str("# metrics encoding failed\n");
        }
        out
    }
}

/// The standard Prometheus `process_*` metrics of this process, read from
/// `/proc/self` on each scrape (Linux; elsewhere, or if `/proc` cannot be
/// read, they are left out rather than reported wrong).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .as_deref()
            .and_then(ProcStat::parse)
        else {
            return Ok(());
        };
        // SAFETY: sysconf only reads a system constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let (ticks, page) = (ticks.max(1) as f64, page.max(0) as u64);
        let mut gauge = |name: &str, help: &str, value: f64| -> std::fmt::Result {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            "process_resident_memory_bytes",
            "resident memory size in bytes",
            stat.rss_pages.saturating_mul(page) as f64,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "virtual memory size in bytes",
            stat.vsize_bytes as f64,
        )?;
        gauge("process_threads", "OS threads", stat.threads as f64)?;
        if let Some(btime) = std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(boot_time)
        {
            gauge(
                "process_start_time_seconds",
                "start time of the process since the Unix epoch in seconds",
                btime as f64 + stat.start_ticks as f64 / ticks,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                "process_open_fds",
                "open file descriptors",
                fds.count() as f64,
            )?;
        }
        let cpu = ConstCounter::new((stat.utime_ticks + stat.stime_ticks) as f64 / ticks);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)
    }
}

/// The fields of `/proc/self/stat` the process metrics need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    utime_ticks: u64,
    stime_ticks: u64,
    threads: u64,
    start_ticks: u64,
    vsize_bytes: u64,
    rss_pages: u64,
}

impl ProcStat {
    /// Parses `/proc/<pid>/stat` (proc(5)); `None` if it is not one. The
    /// command name (field 2) is in parentheses and may itself hold spaces
    /// and parentheses, so the fields are counted from the last `)`.
    fn parse(text: &str) -> Option<ProcStat> {
        let rest = &text[text.rfind(')')? + 1..];
        // Fields 3.. of proc(5): rest[0] is field 3 (state).
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
        Some(ProcStat {
            utime_ticks: field(14)?,
            stime_ticks: field(15)?,
            threads: field(20)?,
            start_ticks: field(22)?,
            vsize_bytes: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// Boot time (seconds since the Unix epoch) from `/proc/stat`'s `btime` line.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_whose_command_holds_spaces_and_parentheses() {
        let line = "4242 (keel (x) y) S 1 4242 4242 0 -1 4194560 1500 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 104857600 2560 18446744073709551615 \
                    1 1 0 0 0 0 0 4096 17987 0 0 0 17 1 0 0 0 0 0\n";
        assert_eq!(
            ProcStat::parse(line),
            Some(ProcStat {
                utime_ticks: 250,
                stime_ticks: 75,
                threads: 9,
                start_ticks: 123456,
                vsize_bytes: 104857600,
                rss_pages: 2560,
            })
        );
    }

    #[test]
    fn rejects_what_is_not_a_stat_line() {
        for bad in [
            "",
            "4242 keel S 1",
            "4242 (keel) S 1 2 3",
            "4242 (keel) S 1 4242 4242 0 -1 4194560 1500 0 0 0 x 75 0 0 20 0 9 0 1 2 3",
        ] {
            assert_eq!(ProcStat::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_process_reports_its_memory_and_cpu() {
        let text = Metrics::new().render();
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        };
        if cfg!(target_os = "linux") {
            assert!(
                value("process_resident_memory_bytes").unwrap() > 1e6,
                "{text}"
            );
            assert!(value("process_threads").unwrap() >= 1.0, "{text}");
            assert!(value("process_open_fds").unwrap() >= 1.0, "{text}");
            assert!(value("process_cpu_seconds_total").is_some(), "{text}");
            assert!(
                value("process_start_time_seconds").unwrap() > 1.5e9,
                "{text}"
            );
        }
        assert!(value("keel_log_retained_bytes").is_some(), "{text}");
        assert!(value("keel_role").is_some(), "{text}");
        // A counter's sample ends in _total (OpenMetrics).
        assert_eq!(
            value("keel_leader_preference_transfers_total"),
            Some(0.0),
            "{text}"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(text in ".{0,200}") {
            let _ = ProcStat::parse(&text);
            let _ = boot_time(&text);
        }
    }
}
