//! The runtime around one `keel-core` node: the consensus thread (the one
//! big pipe: peer messages, client requests, ticks and storage/service
//! completions go through it in order; it drives its own current-thread
//! tokio runtime, on which the peer links and native client connections
//! run, and writes its peer messages itself), the storage thread (keel-log
//! group commit; in `replicated` mode the consensus thread writes the log
//! itself), the service thread (applies committed entries, serves reads,
//! replies — only on the node that accepted the request as leader — writing
//! replies to the connections itself; with `service_thread = "shared"` the
//! consensus thread does this work in line, see `ServiceLink`), a snapshot
//! thread, a reader thread (snapshot chunks and log entries read from disk
//! for followers, see `reader`), and a two-thread
//! tokio runtime for the etcd API and HTTP. Backpressure: client requests
//! beyond the queue depth are answered "busy" at once.
//!
//! Snapshots: the service thread captures the state between entries
//! (`ServiceHost::prepare_snapshot`, a consistent clone for services that
//! provide one) and goes on applying; the capture goes to the consensus
//! thread, where the core gives it its metadata (`SaveSnapshot`; the core
//! never sees the state), and the snapshot thread then serializes it
//! straight into the file, in pieces, so the serialized state is never in
//! memory whole, and publishes it (the manifest; a lock orders this with snapshot installs
//! from the leader on the storage thread, so the manifest never moves
//! backwards), and the storage thread compacts the segments it covers and
//! reports the publication to the core. Appends never wait behind a
//! snapshot's file and directory syncs. Chunked installs to
//! followers read the published file (`SendSnapshotChunk`, on the reader
//! thread), so a leader never holds a whole snapshot in memory to serve
//! them; a follower checks the whole received file (its checksum) before
//! installing it.

use crate::config::{NodeConfig, ServiceThreadConfig};
use crate::handoff::{self, HandoffRx, HandoffTx};
use crate::metrics::Metrics;
use crate::reader;
use bytes::Bytes;
use crossbeam_channel::{unbounded, Sender};
use keel_core::{
    Action, ApplyOutput, Config as CoreConfig, Entry, Event, MembershipChange, Message, Nanos,
    Node, NodeId, Position, Proposal, Recovered, RejectReason, Reply, Role, Service, ServiceHost,
    Snapshot, SnapshotMeta, SnapshotTask, TimerUpdate,
};
use keel_log::meta::{self, HardStateFile};
use keel_log::{DirLock, Identity, LogStore, Options, StorageEvent, StorageThread};
use keel_net::codec::{ClientOp, ClientRequest, ClientResponse, ClientResult, NodeStatus};
use keel_net::mem::MemNetwork;
use keel_net::tcp::{self, NetStats, ResponseSink, TransportConfig};
use keel_net::PeerSender;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
// Maps keyed by request ids, touched several times per write on the leader:
// foldhash instead of SipHash (3% of the cluster's CPU at 200k msg/s).
use foldhash::{HashMap, HashMapExt as _};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::error::TrySendError;
use tracing::{error, info, warn};

/// Why a node could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Storage(#[from] keel_log::LogError),
    /// The OS error is in the message, not the `source()` (as in
    /// `keel_log::LogError::Io`): shown with `{}` or with a printer of the
    /// whole chain (anyhow's `{:#}`), it appears once.
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: std::io::Error },
    #[error("cannot start: {0}")]
    Start(String),
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("stopped after a fatal error: {0}")]
    Fatal(String),
    /// The node learned it was removed from the cluster and stopped for
    /// good (see `REMOVED_FILE`): the explanation it logged and wrote.
    #[error("{0}")]
    Removed(String),
}

/// The file a node writes into its data directory when it learns it was
/// removed from the cluster (a human-readable explanation): a start on a
/// data directory holding it is refused.
pub const REMOVED_FILE: &str = "REMOVED";

/// The file a node created to join (`join = true`: no membership of its
/// own) writes into its data directory once it has caught up with a leader
/// whose configuration includes it (`Node::joining` turned false). A
/// restart of such a node without it tells the core it is still joining
/// (`Node::resume_joining`): its data may hold configurations that
/// included an earlier node of its id (a snapshot or entries from before
/// that node was removed), and a lagging member's notice of that removal
/// must not stop it. (A removed id is never added again, but ids removed
/// before configurations recorded them, by an earlier version, were not
/// recorded: such an id may still come back.)
pub const JOINED_FILE: &str = "JOINED";

/// The file a node created to join writes into its data directory at its
/// first start, before anything else of it: a restart without
/// `JOINED_FILE` then knows the node may not have finished joining. A
/// directory created to join that holds neither was written by a version
/// before these files, which recorded neither: its node is almost always a
/// member that joined long ago, and resumes joining (removal notices wait)
/// but votes as under that version (`Node::resume_joining_voting`).
pub const JOINING_FILE: &str = "JOINING";

/// How a node restarts as far as joining goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JoinOnRestart {
    /// Not created to join, or it recorded that it finished.
    Joined,
    /// Created to join by this version and not recorded as finished: it
    /// may hold data of an earlier node of its id (`Node::resume_joining`).
    Resume,
    /// Created to join by a version that recorded neither start nor end
    /// of joining (`Node::resume_joining_voting`).
    ResumeVoting,
}

/// What a restart on `dir` does about joining, for a node whose recorded
/// initial configuration is empty (`created_to_join`) or not.
fn join_on_restart(dir: &Path, created_to_join: bool) -> Result<JoinOnRestart, NodeError> {
    let exists = |name: &str| {
        dir.join(name)
            .try_exists()
            .map_err(|e| NodeError::Start(format!("checking for {name}: {e}")))
    };
    Ok(if !created_to_join || exists(JOINED_FILE)? {
        JoinOnRestart::Joined
    } else if exists(JOINING_FILE)? {
        JoinOnRestart::Resume
    } else {
        JoinOnRestart::ResumeVoting
    })
}

/// How long a node that learned it was removed keeps its network up after
/// it stopped, so the answers already on their way get out.
const REMOVED_LINGER: Duration = Duration::from_millis(200);

/// What to do instead of bringing a removed node back, for the messages
/// about it: its id is never used again (`keel_core::Membership::removed`).
fn removed_advice(id: NodeId) -> String {
    format!(
        "the id {id} is never used again: to replace the node, add a node under a new id to \
         every member's [[peers]] and restart them one at a time, start it with an empty data \
         directory and `join = true`, then run `keel cluster add-learner <new id>` and, once it \
         has caught up, `keel cluster promote <new id>`"
    )
}

/// A start on a data directory of a removed node is refused, with what it
/// says.
fn refuse_removed(cfg: &NodeConfig) -> Result<(), NodeError> {
    let path = cfg.data_dir.join(REMOVED_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Err(NodeError::Start(format!(
            "node {} was removed from the cluster: {} says: {}",
            cfg.id,
            path.display(),
            text.trim()
        ))),
        // No such file, or no directory to hold it (a data_dir that is a
        // file is refused as such when the store opens).
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(NodeError::Start(format!(
            "node {} may have been removed from the cluster: {} exists but cannot be read: {e}",
            cfg.id,
            path.display()
        ))),
    }
}

/// Events into the consensus thread from inside the node (never dropped).
enum Internal {
    Durable {
        position: Position,
        term: u64,
    },
    Applied {
        position: Position,
        timers: Vec<TimerUpdate>,
    },
    /// The service thread captured the service state at applied position
    /// `position` (not serialized yet: `task` writes it).
    SnapshotCaptured {
        position: Position,
        task: SnapshotTask,
    },
    SnapshotPublished {
        position: Position,
        size: u64,
    },
    /// A backup is asked for (`NodeHandle::backup`): the service captures
    /// its state first.
    Backup(BackupReply),
    /// The service captured its state at `position` for a backup.
    BackupCaptured {
        position: Position,
        task: SnapshotTask,
        reply: BackupReply,
    },
    /// The reader thread filled a message from disk (see `reader`).
    Read(reader::ReadDone),
    Fatal(String),
    Shutdown,
}

/// Work for the snapshot thread.
enum SnapshotJob {
    /// Serialize the service state captured at `meta.position` straight
    /// into a snapshot file with the core's metadata, publish it and let
    /// storage compact the log up to there.
    Write {
        meta: SnapshotMeta,
        task: SnapshotTask,
    },
    /// Drop a capture the core wanted no snapshot of (off the consensus
    /// thread: the last references to replaced state may go with it).
    Discard(SnapshotTask),
    /// Free the entries the core dropped from its in-memory log (tens of
    /// milliseconds for a snapshot interval's worth: not on the consensus
    /// thread).
    Free(VecDeque<Entry>),
    /// Serialize a capture into a backup file (`BACKUP_DIR`), a snapshot
    /// file like the others but published nowhere.
    Backup {
        meta: SnapshotMeta,
        task: SnapshotTask,
        reply: BackupReply,
    },
    /// Drop a backup's capture (as `Discard`, but no snapshot was waiting
    /// on it).
    DropBackup(SnapshotTask),
}

/// Where a node writes backups while they are read (`NodeHandle::backup`),
/// under its data directory; emptied at start.
pub const BACKUP_DIR: &str = "backups";

/// Where a backup's file goes once written (or why there is none).
type BackupReply = tokio::sync::oneshot::Sender<Result<Backup, String>>;

/// A consistent copy of the node's state (`NodeHandle::backup`): a
/// snapshot file (`keel_log::meta` format: metadata, the service host's
/// state, a checksum) of everything applied up to `meta.position`, from
/// which `keel restore` seeds a new cluster. The file is removed when this
/// is dropped.
#[derive(Debug)]
pub struct Backup {
    pub meta: SnapshotMeta,
    pub path: std::path::PathBuf,
    /// The file's size in bytes.
    pub size: u64,
}

impl Drop for Backup {
    fn drop(&mut self) {
        // The file has a directory of its own (`write_backup`).
        let dir = self.path.parent().unwrap_or(&self.path);
        if let Err(e) = std::fs::remove_dir_all(dir) {
            warn!("removing backup {}: {e}", dir.display());
        }
    }
}

/// Events into the consensus thread from the network (bounded).
enum External {
    Peer(Message),
    Client(ClientRequest, ResponseSink),
    /// Requests that arrived together on one connection, in order.
    Clients(Vec<ClientRequest>, ResponseSink),
}

impl Internal {
    fn kind(&self) -> &'static str {
        match self {
            Internal::Durable { .. } => "durable",
            Internal::Applied { .. } => "applied",
            Internal::SnapshotCaptured { .. } => "snapshot-captured",
            Internal::SnapshotPublished { .. } => "snapshot-published",
            Internal::Backup(_) => "backup",
            Internal::BackupCaptured { .. } => "backup-captured",
            Internal::Read(_) => "read",
            Internal::Fatal(_) => "fatal",
            Internal::Shutdown => "shutdown",
        }
    }
}

impl External {
    /// Peer messages and client requests in it.
    fn requests(&self) -> usize {
        match self {
            External::Clients(reqs, _) => reqs.len(),
            _ => 1,
        }
    }
}

/// A consensus-loop turn or a service-thread step longer than this is
/// logged: everything behind it waited.
const SLOW_TURN: Duration = Duration::from_millis(50);

/// Where a consensus turn's time went, for the slow-turn warning. (What
/// is not in `external` or the slowest internal event went to other
/// internal events, proposing, ticking and the actions' IO hand-offs, or
/// the thread was not running: on a busy machine, the scheduler's.)
#[derive(Default)]
struct TurnStats {
    internal: usize,
    slowest_internal: (&'static str, Duration),
    /// Peer messages and client requests taken.
    taken: usize,
    external: Duration,
    slowest_external: Duration,
    proposed: usize,
}

impl std::fmt::Display for TurnStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} internal events, slowest {} {:?}; {} peer messages and requests in {:?} \
             (slowest {:?}); {} proposed",
            self.internal,
            self.slowest_internal.0,
            self.slowest_internal.1,
            self.taken,
            self.external,
            self.slowest_external,
            self.proposed
        )
    }
}

enum ServiceInput {
    /// Committed entries, with the local clients' writes among them that
    /// await their replies (by client and sequence number). The consensus
    /// thread keeps those until their entries apply, so a proposal does not
    /// wake this thread.
    Apply(Vec<Entry>, Vec<((u64, u64), AwaitingWrite)>),
    Read {
        index: Position,
        data: Bytes,
        id: u64,
        sink: ResponseSink,
    },
    StaleRead {
        data: Bytes,
        id: u64,
        sink: ResponseSink,
        commit: Position,
    },
    Restore(Box<Snapshot>),
    Role(Role, Option<String>, Option<NodeId>),
    /// Capture the state for a backup.
    Backup(BackupReply),
    Stop,
}

/// What a service published after applying entries (see
/// `Service::take_notifications`), with the applied position after them.
#[derive(Debug)]
pub struct Notification {
    pub applied: Position,
    pub items: Vec<Bytes>,
    /// The state was replaced by a snapshot (installed from the leader):
    /// what it covers was never published, so subscribers must read the
    /// state again. `items` is empty then.
    pub reset: bool,
}

/// Admission of client requests to the consensus thread's queue: at most
/// `depth` queued at once, counted in requests (a read from a pipelining
/// connection arrives as one batch of many). Beyond it, clients get "busy".
struct ClientQueue {
    queued: AtomicUsize,
    depth: usize,
}

impl ClientQueue {
    /// Reserves room for up to `n` requests; returns how many fit.
    fn admit(&self, n: usize) -> usize {
        let mut cur = self.queued.load(Ordering::Acquire);
        loop {
            let k = n.min(self.depth.saturating_sub(cur));
            if k == 0 {
                return 0;
            }
            match self.queued.compare_exchange_weak(
                cur,
                cur + k,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return k,
                Err(now) => cur = now,
            }
        }
    }
    /// `n` admitted requests left the queue (taken, or never sent).
    fn release(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::AcqRel);
    }
    fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Serializable (stale) reads go straight to the service thread: they need
/// nothing from consensus but the commit position it last published, and
/// skipping the consensus thread saves a thread handoff per read.
#[derive(Clone)]
struct StaleReads {
    service: HandoffTx<ServiceInput>,
    status: Arc<Mutex<NodeStatus>>,
    /// Reads queued for the service thread beyond this answer "busy".
    limit: usize,
    metrics: Arc<Metrics>,
    stopped: Arc<AtomicBool>,
}

impl StaleReads {
    fn submit(&self, id: u64, data: Bytes, sink: ResponseSink) {
        if self.stopped.load(Ordering::Acquire) {
            respond(&sink, id, stopped_node());
            return;
        }
        if self.service.len() >= self.limit {
            self.metrics.busy.inc();
            respond(&sink, id, ClientResult::Busy);
            return;
        }
        let commit = self.status.lock().map(|s| s.commit).unwrap_or(0);
        let read = ServiceInput::StaleRead {
            data,
            id,
            sink,
            commit,
        };
        // The service thread is gone only once the node stopped.
        if let Err(e) = self.service.send(read) {
            if let ServiceInput::StaleRead { id, sink, .. } = e.into_inner() {
                respond(&sink, id, stopped_node());
            }
        }
    }
}

/// Room in the consensus thread's input kept for peer messages beyond
/// what clients may fill (`queue_depth`): a peer link's own queue holds up
/// to 4096 messages, and the consensus thread takes them in turns of many.
const PEER_MESSAGES_RESERVED: usize = 4096;

/// What a stopped (shut down or failed) node answers: that it knows no
/// leader, so clients go on to another node rather than retrying this one
/// as they would a "busy" answer.
fn stopped_node() -> ClientResult {
    ClientResult::NotLeader {
        leader: None,
        address: None,
    }
}

/// The answer to the requests a node had taken, but not proposed, when it
/// learned it was removed from the cluster: never applied. (Requests after
/// that get a stopped node's answer, `stopped_node()`: clients go on to
/// another node, through the etcd API too, where this one is not retried.)
fn removed_refusal() -> ClientResult {
    ClientResult::Error(format!(
        "{}: the node stopped",
        keel_core::REMOVED_FROM_CLUSTER
    ))
}

/// The answer to the writes (and membership changes) a node had proposed
/// and was waiting on when it learned it was removed: as leader it may have
/// appended them, and the rest of the cluster may commit them (or have
/// already), so their outcome is unknown, not refused.
fn removed_outcome_unknown() -> ClientResult {
    ClientResult::Error(format!(
        "{}: {} before it was known to commit (the node stopped); it may or may not have \
         been applied",
        keel_net::codec::OUTCOME_UNKNOWN,
        keel_core::REMOVED_FROM_CLUSTER
    ))
}

/// The answer to a request the consensus queue did not take: "busy" if it
/// is full, `stopped_node()` if the consensus thread is gone.
fn refusal<T>(e: &TrySendError<T>) -> ClientResult {
    match e {
        TrySendError::Full(_) => ClientResult::Busy,
        TrySendError::Closed(_) => stopped_node(),
    }
}

/// Events for the consensus thread from the node's other threads (storage,
/// service, snapshots, the handle). Tokio channels: the consensus thread
/// runs its own single-threaded runtime (see `start_with`).
type InternalTx = tokio::sync::mpsc::UnboundedSender<Internal>;
/// Peer messages and client requests for the consensus thread (bounded).
type ExternalTx = tokio::sync::mpsc::Sender<External>;

/// A running node.
pub struct NodeHandle {
    internal: InternalTx,
    external: ExternalTx,
    cluster_id: u64,
    id: NodeId,
    notifications: tokio::sync::broadcast::Sender<Arc<Notification>>,
    next_request: AtomicU64,
    /// `None` in the shared threading mode.
    stale_reads: Option<StaleReads>,
    client_queue: Arc<ClientQueue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    fatal: Arc<Mutex<Option<String>>>,
    /// Set when the node stopped because it was removed from the cluster.
    removed: Arc<Mutex<Option<String>>>,
    status: Arc<Mutex<NodeStatus>>,
    /// The configuration in force here, published with the status.
    membership: Arc<Mutex<Arc<keel_core::Membership>>>,
    /// The current term, readable without copying the whole status.
    term: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    net_stats: Arc<NetStats>,
    clock: CoreClock,
    _rt: tokio::runtime::Runtime,
}

impl NodeHandle {
    /// This node's current term (what `status().term` says, without the copy).
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Relaxed)
    }
    pub fn status(&self) -> NodeStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
    /// The configuration in force on this node as of its last published
    /// status (`status()`'s voters and learners), with the ids removed
    /// from the cluster, which are never added again.
    pub fn membership(&self) -> Arc<keel_core::Membership> {
        self.membership
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }
    /// This node's consensus clock, in nanoseconds since the Unix epoch:
    /// the wall clock at start plus the time elapsed since on a clock that
    /// never steps. A leader stamps log entries with it (log time is that,
    /// clamped never to go back), and timers (lease expiry) fire against
    /// log time; unlike `wall_clock_ns`, a wall clock stepped since the
    /// start does not move it.
    pub fn log_time(&self) -> Nanos {
        self.clock.now()
    }
    /// This node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    /// This node's metrics as Prometheus text: what `/metrics` serves.
    pub fn render_metrics(&self) -> String {
        self.metrics.render_with(&self.net_stats)
    }
    /// Has the node stopped (shut down or failed)?
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
    /// Submits a request as a client of this node would, and waits for the
    /// answer. Writes go without a session (`SESSIONLESS`): each call is
    /// applied once per time it reaches the log, as etcd's API behaves.
    pub async fn call(&self, op: ClientOp) -> ClientResult {
        // (The consensus thread numbers sessionless writes.)
        self.call_as(keel_core::SESSIONLESS, 0, op).await
    }

    /// `call` in client session `client` with sequence number `seq`: a
    /// write is applied at most once per (client, seq) however often it is
    /// sent (a retry gets the first reply), as the native protocol's
    /// clients do.
    pub async fn call_in_session(&self, client: u64, seq: u64, op: ClientOp) -> ClientResult {
        if client == keel_core::SESSIONLESS {
            return ClientResult::Error(format!(
                "client id {client} is reserved for sessionless requests"
            ));
        }
        self.call_as(client, seq, op).await
    }

    async fn call_as(&self, client: u64, seq: u64, op: ClientOp) -> ClientResult {
        let n = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = ResponseSink::oneshot();
        let answer = |r: Result<ClientResponse, _>| match r {
            Ok(r) => r.result,
            Err(_) => ClientResult::Error("the node stopped".into()),
        };
        let op = match (op, &self.stale_reads) {
            (ClientOp::StaleRead(data), Some(stale)) => {
                stale.submit(n, data, tx);
                return answer(rx.await);
            }
            (op, _) => op,
        };
        let req = ClientRequest {
            id: n,
            client,
            seq,
            op,
        };
        if self.is_stopped() {
            return stopped_node();
        }
        if self.client_queue.admit(1) == 0 {
            return ClientResult::Busy;
        }
        if let Err(e) = self.external.try_send(External::Client(req, tx)) {
            self.client_queue.release(1);
            return refusal(&e);
        }
        answer(rx.await)
    }

    /// A consistent copy of this node's state: everything its service has
    /// applied when the request reaches it, written to a file under
    /// `BACKUP_DIR` (removed when the `Backup` is dropped). Reads on this
    /// node go on while it is written; it is this node's state, so a
    /// follower's may be a little behind the leader's.
    pub async fn backup(&self) -> Result<Backup, String> {
        if self.is_stopped() {
            return Err("the node stopped".into());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.internal
            .send(Internal::Backup(tx))
            .map_err(|_| "the node stopped".to_string())?;
        rx.await.map_err(|_| "the node stopped".to_string())?
    }

    /// Notifications the service publishes on this node, in apply order. A
    /// receiver that falls behind gets `RecvError::Lagged` and must resync.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Notification>> {
        self.notifications.subscribe()
    }

    /// The tokio runtime the node's network runs on (for extra servers).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self._rt.handle()
    }

    /// Graceful stop: flush and sync storage, close.
    pub fn shutdown(&self) {
        let _ = self.internal.send(Internal::Shutdown);
    }
    pub fn id(&self) -> NodeId {
        self.id
    }
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Waits until the node stops; an error if it stopped on a fatal error.
    pub fn wait(&self) -> Result<(), NodeError> {
        let threads: Vec<JoinHandle<()>> = self
            .threads
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        let mut panicked = None;
        for t in threads {
            let name = t.thread().name().unwrap_or("a node thread").to_string();
            if t.join().is_err() {
                panicked.get_or_insert(name);
            }
        }
        if let Some(why) = self.removed.lock().ok().and_then(|r| r.clone()) {
            return Err(NodeError::Removed(why));
        }
        match (self.fatal.lock().ok().and_then(|f| f.clone()), panicked) {
            (Some(e), _) => Err(NodeError::Fatal(e)),
            (None, Some(name)) => Err(NodeError::Fatal(format!("{name} panicked"))),
            (None, None) => Ok(()),
        }
    }
}

/// Where in each `every`-byte period of the log node `id` takes its
/// snapshot: spread over the period by a multiplicative hash of the id, so
/// the nodes of a cluster do not all publish snapshots at once.
fn snapshot_phase(id: NodeId, every: u64) -> u64 {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15) % every.max(1)
}

/// How stale the published status may get while nothing important changes.
const STATUS_EVERY: Duration = Duration::from_millis(1);

/// Low bits of a sessionless sequence number that count; the node id goes
/// above them.
const SESSIONLESS_COUNTER_MASK: u64 = (1 << 48) - 1;

/// What a parked request (`Consensus::park_leaderless`) counts against
/// `max_unapplied_bytes`: its data and `HELD_COMMAND_OVERHEAD`, so empty
/// ones are bounded too.
fn request_bytes(op: &ClientOp) -> u64 {
    match op {
        ClientOp::Write(data) | ClientOp::Read(data) => {
            data.len() as u64 + keel_core::HELD_COMMAND_OVERHEAD
        }
        _ => keel_core::HELD_COMMAND_OVERHEAD,
    }
}

/// The sequence number the consensus thread gives a sessionless write (the
/// client's own is ignored: without a session nothing deduplicates on it).
/// Replies are matched to waiting callers by (client, seq) on every node
/// that applies the entry, and a follower forwards its writes to the
/// leader, so the number must be unique across the cluster: the node id
/// goes in the top 16 bits (configurations refuse larger ids:
/// `config::MAX_NODE_ID`). (Two callers sharing one would get each other's
/// reply.)
fn sessionless_seq(node: NodeId, counter: u64) -> u64 {
    (node << 48) | (counter & SESSIONLESS_COUNTER_MASK)
}

/// The wall clock in nanoseconds since the Unix epoch: what the leader
/// stamps entries with (log time), so a node's reading approximates it.
pub fn wall_clock_ns() -> Nanos {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as Nanos)
}

/// The consensus core's clock: the wall clock at start plus the time
/// elapsed since on a clock that never steps and keeps counting while the
/// machine is suspended (Linux's `CLOCK_BOOTTIME`; `Instant` elsewhere).
/// Leader leases and stickiness are durations on it: a leader suspended
/// for a while must see its lease gone when it resumes, which a clock that
/// stops during suspend (`CLOCK_MONOTONIC`, what `Instant` reads) would
/// hide.
///
/// Shared by the consensus thread and the node's handle (`log_time`): one
/// anchor, so both read the same time.
#[derive(Clone)]
struct CoreClock(Arc<CoreClockInner>);

struct CoreClockInner {
    start_wall: Nanos,
    /// `CLOCK_BOOTTIME` at start, if the system has it.
    start_boot: Option<Nanos>,
    started: Instant,
    /// The latest reading, so that time never goes back.
    last: AtomicU64,
}

impl CoreClock {
    fn new(start_wall: Nanos) -> CoreClock {
        #[cfg(target_os = "linux")]
        let start_boot = boot_time_ns();
        #[cfg(not(target_os = "linux"))]
        let start_boot = None;
        CoreClock(Arc::new(CoreClockInner {
            start_wall,
            start_boot,
            started: Instant::now(),
            last: AtomicU64::new(start_wall),
        }))
    }

    fn now(&self) -> Nanos {
        let c = &*self.0;
        let elapsed = match c.start_boot {
            // (It cannot fail once it has worked; if it did, time would
            // stand still rather than go back.)
            #[cfg(target_os = "linux")]
            Some(start) => boot_time_ns().map_or(0, |t| t.saturating_sub(start)),
            _ => c.started.elapsed().as_nanos() as Nanos,
        };
        let t = c.start_wall.saturating_add(elapsed);
        c.last.fetch_max(t, Ordering::Relaxed).max(t)
    }
}

/// `CLOCK_BOOTTIME` in nanoseconds, if the system has it.
#[cfg(target_os = "linux")]
fn boot_time_ns() -> Option<Nanos> {
    let mut ts = std::mem::MaybeUninit::<libc::timespec>::uninit();
    // SAFETY: `ts` points to writable memory for a timespec for the call's
    // duration, and is read only after the call succeeded (filled it in).
    let ts = unsafe {
        if libc::clock_gettime(libc::CLOCK_BOOTTIME, ts.as_mut_ptr()) != 0 {
            return None;
        }
        ts.assume_init()
    };
    let secs = Nanos::try_from(ts.tv_sec).ok()?;
    let nanos = Nanos::try_from(ts.tv_nsec).ok()?;
    Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Follower => "follower",
        Role::PreCandidate => "pre-candidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
    }
}

/// How a node reaches its peers.
#[derive(Clone, Default)]
pub enum Transport {
    /// TCP on `peer_addr` (a real cluster).
    #[default]
    Tcp,
    /// An in-memory network shared with other nodes of this process.
    Memory(MemNetwork),
}

/// Starts a node with the TCP transport: recovers its data directory, then
/// runs until shut down.
pub fn start(cfg: NodeConfig, service: Box<dyn Service + Send>) -> Result<NodeHandle, NodeError> {
    start_with(cfg, service, Transport::Tcp)
}

/// Starts a node with the given peer transport. The node's threads get the
/// configured `thread_scheduling` policy; the caller's thread keeps its own.
pub fn start_with(
    cfg: NodeConfig,
    service: Box<dyn Service + Send>,
    transport: Transport,
) -> Result<NodeHandle, NodeError> {
    let policy = cfg.thread_scheduling;
    match crate::sched::run_with_policy(policy, move || start_node(cfg, service, transport)) {
        Ok(Ok(started)) => started,
        Ok(Err(panic)) => Err(NodeError::Start(format!(
            "starting the node panicked: {}",
            panic_message(&*panic)
        ))),
        Err(e) => Err(NodeError::Start(format!(
            "cannot start a thread to set the node up: {e}"
        ))),
    }
}

/// The node and cluster a node's data directory must belong to.
fn identity(cfg: &NodeConfig) -> Identity {
    Identity {
        node_id: cfg.id,
        cluster_id: cfg.cluster_id,
    }
}

/// The warning for a restart whose configuration gives no address for
/// some of the members its data directory records: the membership recorded
/// at the first start (from that start's `peers`) and changed since only by
/// membership changes is kept whatever later configurations say, and a
/// member without an address is never reached (a voter among them may
/// leave this node unable to win or join a majority, a pre-candidate for
/// good). `None` if every member has an address.
fn unreachable_members(cfg: &NodeConfig, recorded: &keel_core::Membership) -> Option<String> {
    let configured: std::collections::BTreeSet<NodeId> = std::iter::once(cfg.id)
        .chain(cfg.peers.iter().map(|p| p.id))
        .collect();
    let unknown: Vec<NodeId> = recorded
        .voters
        .iter()
        .chain(&recorded.learners)
        .filter(|id| !configured.contains(id))
        .copied()
        .collect();
    if unknown.is_empty() {
        return None;
    }
    let learners = if recorded.learners.is_empty() {
        String::new()
    } else {
        format!(" and learners {:?}", recorded.learners)
    };
    Some(format!(
        "data directory {} records the cluster's members as voters {:?}{learners}, but the \
         configuration lists nodes {:?} (this node and its peers): nodes {unknown:?} have no \
         address, and this node cannot reach them. Only the first start takes the membership \
         from the peers; later starts keep the recorded one and take only addresses from them. \
         Give every member a [[peers]] entry (--peer), change the membership with `keel \
         cluster` (add-learner, promote, remove), or start a new cluster on an empty data \
         directory",
        cfg.data_dir.display(),
        recorded.voters,
        configured,
    ))
}

/// A data directory before a node's first start on it (one with no hard
/// state yet), so that a failed first start can remove exactly what it
/// created (`undo`) and nothing that was there before.
struct FirstStart {
    dir: PathBuf,
    /// The directory's entries before the start (none if it did not exist).
    before: HashSet<OsString>,
    /// The directories the start will create: `dir` and any missing
    /// ancestors, innermost first.
    missing: Vec<PathBuf>,
}

impl FirstStart {
    /// `None` if `dir` holds a hard state (the node started on it before,
    /// or it was restored from a backup), or lies under a file (nothing
    /// can be created there). A `dir` that is not a directory is refused.
    fn survey(dir: &Path) -> Result<Option<FirstStart>, NodeError> {
        let mut missing = Vec::new();
        let mut at = Some(dir);
        while let Some(d) = at.filter(|d| !d.as_os_str().is_empty()) {
            match std::fs::metadata(d) {
                Ok(m) if m.is_dir() => break,
                Ok(_) if d == dir => {
                    return Err(NodeError::Storage(keel_log::LogError::NotADirectory {
                        dir: dir.to_path_buf(),
                    }))
                }
                Ok(_) => return Ok(None),
                Err(_) => missing.push(d.to_path_buf()),
            }
            at = d.parent();
        }
        let mut before = HashSet::new();
        if missing.is_empty() {
            let entries = std::fs::read_dir(dir)
                .map_err(|e| keel_log::LogError::io(dir, "reading the data directory", e))?;
            for entry in entries {
                let entry = entry
                    .map_err(|e| keel_log::LogError::io(dir, "reading the data directory", e))?;
                before.insert(entry.file_name());
            }
            if before.contains(OsStr::new(meta::HARD_STATE_FILE)) {
                return Ok(None);
            }
        }
        Ok(Some(FirstStart {
            dir: dir.to_path_buf(),
            before,
            missing,
        }))
    }

    /// Removes what the failed first start created: the entries it added
    /// to the directory (under the directory's lock, so never another
    /// process's; the lock file last, and only if it made it), then the
    /// directories it created, if empty.
    fn undo(self) {
        let dir = &self.dir;
        if dir.is_dir() {
            let lock = match DirLock::acquire(dir) {
                Ok(lock) => lock,
                Err(e) => {
                    warn!(
                        "a failed first start wrote to {}, left as it is: {e}",
                        dir.display()
                    );
                    return;
                }
            };
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries.filter_map(Result::ok).collect::<Vec<_>>(),
                Err(e) => {
                    warn!(
                        "a failed first start wrote to {}, left as it is: {e}",
                        dir.display()
                    );
                    return;
                }
            };
            let lock_file = OsStr::new(keel_log::lock::LOCK_FILE);
            let mut removed = Vec::new();
            for entry in entries {
                let name = entry.file_name();
                if self.before.contains(&name) || name == lock_file {
                    continue;
                }
                let path = entry.path();
                let gone = match entry.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                    _ => std::fs::remove_file(&path),
                };
                match gone {
                    Ok(()) => removed.push(name.to_string_lossy().into_owned()),
                    Err(e) => warn!(
                        "removing {} after a failed first start: {e}",
                        path.display()
                    ),
                }
            }
            // While holding the lock: nobody else writes here meanwhile.
            // (A process that opened the lock file meanwhile and waits for
            // the lock gets it on the removed file: two first starts racing
            // on one new directory, which the second's start then fails.)
            if !self.before.contains(lock_file) {
                let path = dir.join(lock_file);
                match std::fs::remove_file(&path) {
                    Ok(()) => removed.push(keel_log::lock::LOCK_FILE.to_string()),
                    Err(e) => warn!(
                        "removing {} after a failed first start: {e}",
                        path.display()
                    ),
                }
            }
            if let Err(e) = meta::sync_dir(dir) {
                warn!("after a failed first start: {e}");
            }
            drop(lock);
            if !removed.is_empty() {
                removed.sort();
                info!(
                    "the first start failed: removed what it wrote in {} ({})",
                    dir.display(),
                    removed.join(", ")
                );
            }
        }
        for d in &self.missing {
            match std::fs::remove_dir(d) {
                Ok(()) => info!(
                    "the first start failed: removed {}, which it created",
                    d.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Not empty: something else was put there meanwhile.
                Err(e) => {
                    warn!("leaving {}: {e}", d.display());
                    return;
                }
            }
            let parent = match d.parent() {
                Some(p) if p.as_os_str().is_empty() => Path::new("."),
                Some(p) => p,
                None => continue,
            };
            if let Err(e) = meta::sync_dir(parent) {
                warn!("after a failed first start: {e}");
            }
        }
    }
}

/// `start_with`, on a thread with the node's scheduling policy.
fn start_node(
    cfg: NodeConfig,
    service: Box<dyn Service + Send>,
    transport: Transport,
) -> Result<NodeHandle, NodeError> {
    let span = tracing::info_span!("node", id = cfg.id);
    let _entered = span.clone().entered();
    cfg.validate()
        .map_err(|e| NodeError::Start(e.to_string()))?;
    cfg.check_files()
        .map_err(|e| NodeError::Start(e.to_string()))?;
    refuse_removed(&cfg)?;
    // A first start that fails leaves the data directory as it found it:
    // what it would record there (this node's identity, and the initial
    // membership from `peers`) would otherwise be kept by every later
    // start, whatever its configuration says. Most failures (a taken port,
    // a bad address or file) come before anything is written; this undoes
    // what a failure after that wrote.
    let first = FirstStart::survey(&cfg.data_dir)?;
    let dir = cfg.data_dir.clone();
    // Whether an earlier run left the directory marked running: a failed
    // start takes away only a mark of its own.
    let marked_before = dir.join(meta::RESYNC_FILE).exists();
    let mut touched = false;
    let started = run_node(cfg, service, transport, span, &mut touched);
    if let Err(e) = &started {
        // (A locked directory is another process's: nothing here is ours.)
        let locked = matches!(e, NodeError::Storage(keel_log::LogError::Locked { .. }));
        match first {
            Some(first) if touched && !locked => first.undo(),
            None if touched && !locked && !marked_before => unmark(&dir),
            _ => {}
        }
    }
    started
}

/// Takes away the running mark (`meta::RESYNC_FILE`) a start that failed
/// before the node ran set, under the directory's lock: it wrote nothing
/// but what its open synced.
fn unmark(dir: &Path) {
    let cleared = DirLock::acquire(dir).and_then(|_lock| meta::clear_resync(dir));
    if let Err(e) = cleared {
        warn!("after a failed start: {e}");
    }
}

/// `start_node` after the checks: binds the listeners first (a taken port
/// or a bad address fails the start before the data directory is
/// touched), then opens the data directory (setting `touched` just before)
/// and starts the node's threads.
fn run_node(
    cfg: NodeConfig,
    service: Box<dyn Service + Send>,
    transport: Transport,
    span: tracing::Span,
    touched: &mut bool,
) -> Result<NodeHandle, NodeError> {
    let dir = cfg.data_dir.clone();
    let (internal_tx, internal_rx) = tokio::sync::mpsc::unbounded_channel::<Internal>();
    // Client events are admitted by `client_queue` (at most `queue_depth`
    // requests, so events, in the channel at once); the rest of the room is
    // peer messages' alone. Sharing one bound let a flood of clients fill
    // it, and peer messages (acknowledgements, heartbeats, votes, read
    // indexes) were then dropped.
    let (external_tx, external_rx) =
        tokio::sync::mpsc::channel::<External>(cfg.queue_depth + PEER_MESSAGES_RESERVED);
    let client_queue = Arc::new(ClientQueue {
        queued: AtomicUsize::new(0),
        depth: cfg.queue_depth,
    });
    // The service thread's input (none in the shared threading mode, where
    // the consensus thread runs the service itself).
    let (service_tx, service_rx) = handoff::channel::<ServiceInput>();
    let service_rx = (cfg.service_thread == ServiceThreadConfig::Dedicated).then_some(service_rx);
    let (notify_tx, _) = tokio::sync::broadcast::channel::<Arc<Notification>>(4096);
    let fatal = Arc::new(Mutex::new(None));
    let removed = Arc::new(Mutex::new(None));
    let term = Arc::new(AtomicU64::new(0));
    let status = Arc::new(Mutex::new(NodeStatus {
        id: cfg.id,
        ..NodeStatus::default()
    }));
    let membership = Arc::new(Mutex::new(Arc::new(keel_core::Membership::default())));
    let stopped = Arc::new(AtomicBool::new(false));
    let metrics = Arc::new(Metrics::new());
    let net_stats = Arc::new(NetStats::default());

    // The consensus thread's own single-threaded runtime, which also runs
    // the peer links and the native-protocol client connections: a peer
    // message or a client's burst is read, decoded and handed to the
    // consensus loop on one thread, with no thread wake-up in between
    // (three of them sat on every write's path: the client's request, the
    // follower's append and the leader's acknowledgement).
    let consensus_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::Start(format!("tokio runtime: {e}")))?;
    // Network: the etcd API, HTTP.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.net_threads_for(cores))
        .thread_name("keel-net")
        .enable_all()
        .build()
        .map_err(|e| NodeError::Start(format!("tokio runtime: {e}")))?;
    let tls = match cfg.peer_tls_files() {
        Ok(Some(files)) => Some(keel_net::tls::PeerTls::load(&files).map_err(NodeError::Start)?),
        Ok(None) => None,
        Err(e) => return Err(NodeError::Start(e.to_string())),
    };
    // (`validate` refuses a certificate without its key, and the reverse.)
    let server_tls =
        |keys, cert: &Option<PathBuf>, key: &Option<PathBuf>, ca: &Option<PathBuf>| match (
            cert, key,
        ) {
            (Some(cert), Some(key)) => {
                keel_net::tls::ServerTls::load(keys, cert, key, ca.as_deref())
                    .map(Some)
                    .map_err(NodeError::Start)
            }
            _ => Ok(None),
        };
    let client_tls = server_tls(
        keel_net::tls::CLIENT_PORT_TLS,
        &cfg.client_tls_cert_file,
        &cfg.client_tls_key_file,
        &cfg.client_tls_trusted_ca_file,
    )?;
    let http_tls = server_tls(
        keel_net::tls::HTTP_PORT_TLS,
        &cfg.http_tls_cert_file,
        &cfg.http_tls_key_file,
        &cfg.http_tls_trusted_ca_file,
    )?;
    let tcfg = TransportConfig {
        cluster_id: cfg.cluster_id,
        node_id: cfg.id,
        max_frame: (cfg.max_request_bytes + (1 << 20)).max(64 << 20),
        peer_queue: 4096,
        tls,
        // (Handshakes, TLS's above all, are not the consensus thread's.)
        handshakes: Some(rt.handle().clone()),
    };
    // (In the shared threading mode they go through the consensus thread.)
    let stale_reads = service_rx.is_some().then(|| StaleReads {
        service: service_tx.clone(),
        status: status.clone(),
        limit: cfg.queue_depth,
        metrics: metrics.clone(),
        stopped: stopped.clone(),
    });
    let peers_list: Vec<(NodeId, String)> = cfg
        .peers
        .iter()
        .map(|p| (p.id, p.peer_addr.clone()))
        .collect();
    let inbound: tcp::Inbound = {
        let tx = external_tx.clone();
        let stats = net_stats.clone();
        Arc::new(move |m| {
            if tx.try_send(External::Peer(m)).is_err() {
                stats.peer_messages_dropped.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The TCP listener is bound now; an in-memory network is joined once
    // the data directory is open (joining cannot fail, and a node that
    // then failed to open it would have taken its id on the network).
    // (The links' tasks run on `consensus_rt`, so only once the consensus
    // thread runs: nothing is read before the node has recovered.)
    let (tcp_peers, memory) = match transport {
        Transport::Tcp => {
            let peers = consensus_rt
                .block_on(tcp::start_peers(
                    tcfg.clone(),
                    &cfg.peer_addr,
                    &peers_list,
                    inbound.clone(),
                    net_stats.clone(),
                ))
                .map_err(|error| NodeError::Listen {
                    addr: cfg.peer_addr.clone(),
                    error,
                })?;
            (Some(Box::new(peers) as Box<dyn PeerSender>), None)
        }
        Transport::Memory(net) => (None, Some(net)),
    };
    {
        let tx = external_tx.clone();
        let max_request = cfg.max_request_bytes;
        let m = metrics.clone();
        let stale = stale_reads.clone();
        let queue = client_queue.clone();
        let stopped = stopped.clone();
        let handler: tcp::RequestHandler =
            Arc::new(move |reqs: Vec<ClientRequest>, sink: &ResponseSink| {
                if stopped.load(Ordering::Acquire) {
                    for req in reqs {
                        respond(sink, req.id, stopped_node());
                    }
                    return;
                }
                // Everything one read brought goes to the consensus thread
                // as one event: one wake-up, and a pipelining client's
                // burst becomes one proposal batch.
                let mut batch = Vec::with_capacity(reqs.len());
                for req in reqs {
                    let size = match &req.op {
                        ClientOp::Write(b) | ClientOp::Read(b) | ClientOp::StaleRead(b) => b.len(),
                        _ => 0,
                    };
                    // (Validation caps `max_request` so that the entry a
                    // write up to it becomes fits in a log frame: see
                    // `config::MAX_REQUEST_BYTES`.)
                    if size > max_request {
                        respond(
                            sink,
                            req.id,
                            ClientResult::Error(format!(
                                "request of {size} bytes exceeds the {max_request}-byte limit"
                            )),
                        );
                        continue;
                    }
                    match (req.op, &stale) {
                        (ClientOp::StaleRead(data), Some(stale)) => {
                            stale.submit(req.id, data, sink.clone())
                        }
                        (op, _) => batch.push(ClientRequest { op, ..req }),
                    }
                }
                if batch.is_empty() {
                    return;
                }
                // Admit what fits; the rest of the batch is refused.
                let k = queue.admit(batch.len());
                let mut refused = batch.split_off(k);
                let mut answer = ClientResult::Busy;
                if k > 0 {
                    if let Err(e) = tx.try_send(External::Clients(batch, sink.clone())) {
                        queue.release(k);
                        answer = refusal(&e);
                        if let External::Clients(mut b, _) = e.into_inner() {
                            b.append(&mut refused);
                            refused = b;
                        }
                    }
                }
                // A full queue: "busy"; a node that just stopped says so.
                let busy = answer == ClientResult::Busy;
                for req in refused {
                    if busy {
                        m.busy.inc();
                    }
                    respond(sink, req.id, answer.clone());
                }
            });
        consensus_rt
            .block_on(tcp::start_clients_with(
                &cfg.client_addr,
                cfg.id,
                tcfg.max_frame,
                handler,
                net_stats.clone(),
                client_tls,
                Some(rt.handle().clone()),
            ))
            .map_err(|error| NodeError::Listen {
                addr: cfg.client_addr.clone(),
                error,
            })?;
    }
    if let Some(addr) = &cfg.http_addr {
        rt.block_on(crate::http::serve(
            addr,
            status.clone(),
            metrics.clone(),
            net_stats.clone(),
            http_tls,
        ))
        .map_err(|error| NodeError::Listen {
            addr: addr.clone(),
            error,
        })?;
    }

    // Nothing was written before this point.
    *touched = true;
    // After the machine went down the log's unsynced end may have holes
    // (pages reach the disk out of order): cut there, the node amnesic if
    // that could lose what it acknowledged (`amnesia::WentDown`).
    let went_down = crate::amnesia::went_down(&dir)?;
    let options = Options {
        cut_after_hole: went_down.holes_possible(),
        ..Options::default()
    };
    // Locks the directory for the storage thread's lifetime, and refuses
    // one that belongs to another node or cluster.
    let opened = LogStore::open_as(&dir, options, identity(&cfg))?;
    // Running: unless this run stops cleanly, the next start writes the
    // log's end again before trusting it (a failed write-back may have left
    // it only in the page cache; `meta::RESYNC_FILE`).
    meta::mark_resync(&dir).map_err(|e| NodeError::Start(e.to_string()))?;
    // Backups a previous run was still sending when it stopped.
    match std::fs::remove_dir_all(dir.join(BACKUP_DIR)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            warn!(
                "removing old backups in {}: {e}",
                dir.join(BACKUP_DIR).display()
            )
        }
        _ => {}
    }
    if let Some(t) = &opened.torn {
        let after = match went_down {
            crate::amnesia::WentDown::PowerLost => " after a power loss",
            crate::amnesia::WentDown::AfterSyncRun => " after a reboot",
            crate::amnesia::WentDown::No => "",
        };
        let at = if t.hole {
            " at a hole (a zeroed sector with data after it: the node will be amnesic)"
        } else {
            ""
        };
        warn!(
            "recovery{after} cut a torn tail{at}: {} bytes at offset {} of {}",
            t.discarded_bytes,
            t.offset,
            t.path.display()
        );
    }
    if let Some(n) = opened.resynced {
        warn!(
            "the last run did not stop cleanly: wrote the log's last {n} bytes again and \
             synced them, in case a failed write-back left them only in the page cache"
        );
    }
    let first_start = opened.hard_state.is_none();
    let mut hard = match opened.hard_state.clone() {
        Some(h) => h,
        None => {
            let h = HardStateFile {
                hard_state: Default::default(),
                membership: cfg.initial_membership(),
            };
            if h.membership.voters.is_empty() && h.membership.learners.is_empty() {
                // Before the hard state: a directory with one was made by
                // this version with this file, or by an earlier one.
                let text = format!(
                    "Node {} of cluster {:#x} was created to join an existing cluster: until it \
                     writes {JOINED_FILE}, a restart takes it to be still joining.\n",
                    cfg.id, cfg.cluster_id
                );
                meta::write_atomic(&dir, JOINING_FILE, text.as_bytes())
                    .map_err(|e| NodeError::Start(format!("writing {JOINING_FILE}: {e}")))?;
            }
            meta::save_hard_state(&dir, &h)?;
            h
        }
    };
    // Before anything reads the hard state: a power loss moves it on.
    let amnesic = crate::amnesia::on_start(&dir, cfg.durability, &mut hard, cfg.id)?;
    metrics.amnesic.set(i64::from(amnesic));
    let snapshot = opened.snapshot.clone().unwrap_or(Snapshot {
        meta: SnapshotMeta {
            position: 0,
            term: 0,
            timestamp: 0,
            membership: hard.membership.clone(),
        },
        data: Bytes::new(),
    });
    let admission = service.admission();
    let mut host = ServiceHost::new(service, 3600 * 1_000_000_000);
    let timers = host
        .restore(&snapshot)
        .map_err(|e| NodeError::Start(format!("restoring the service from its snapshot: {e}")))?;
    let snapshot_file_size = match opened.snapshot {
        Some(ref s) => meta::snapshot_file_size(&dir, s.meta.position)?.unwrap_or(0),
        None => 0,
    };
    let recovered = Recovered {
        hard_state: hard.hard_state,
        snapshot: Some(snapshot.clone()),
        snapshot_file_size,
        entries: opened.entries,
    };
    info!(
        "node {} recovered: term {}, snapshot at {}, log to {}",
        cfg.id,
        hard.hard_state.term,
        snapshot.meta.position,
        recovered
            .entries
            .last()
            .map_or(snapshot.meta.position, Entry::end)
    );

    let storage = {
        let tx = internal_tx.clone();
        let node_id = cfg.id;
        let interval = Duration::from_millis(cfg.replicated_sync_interval_ms);
        let metrics = metrics.clone();
        StorageThread::spawn_with(opened.store, cfg.durability.into(), interval, move |ev| {
            let _ = tx.send(match ev {
                StorageEvent::Synced { took } => {
                    metrics.log_fsync.observe(took.as_secs_f64());
                    return;
                }
                StorageEvent::Slow { took, detail } => {
                    warn!("node {node_id}: slow storage batch: {took:?} ({detail})");
                    return;
                }
                StorageEvent::Warning(w) => {
                    warn!("node {node_id}: storage: {w}");
                    return;
                }
                StorageEvent::Durable { position, term } => Internal::Durable { position, term },
                StorageEvent::SnapshotPublished { position, size } => {
                    Internal::SnapshotPublished { position, size }
                }
                StorageEvent::Failed(e) => Internal::Fatal(format!("storage: {e}")),
            });
        })?
    };
    let storage = Arc::new(storage);
    let peers: Box<dyn PeerSender> = match (tcp_peers, memory) {
        (Some(peers), _) => peers,
        (None, Some(net)) => Box::new(net.join(cfg.id, inbound)),
        (None, None) => unreachable!("one transport or the other"),
    };

    // Snapshot thread: serializes captured service states, and writes
    // snapshot files that the storage thread then publishes in order.
    let (snap_tx, snap_rx) = unbounded::<SnapshotJob>();
    let snapshot_busy = Arc::new(AtomicBool::new(false));
    let snapshot_size = Arc::new(Mutex::new(LastSnapshot {
        position: snapshot.meta.position,
        size: snapshot.data.len() as u64,
    }));
    let cfg_id = cfg.id;
    let snapshot_writer = {
        let (dir, tx) = (dir.clone(), internal_tx.clone());
        // A handle, not the thread: the consensus thread alone stops storage.
        let storage = storage.snapshot_handle()?;
        let (busy, size, metrics) = (
            snapshot_busy.clone(),
            snapshot_size.clone(),
            metrics.clone(),
        );
        std::thread::Builder::new()
            .name("keel-snapshot".into())
            .spawn(move || {
                let _s = tracing::info_span!("node", id = cfg_id).entered();
                for job in snap_rx {
                    match job {
                        SnapshotJob::Write { meta, task } => {
                            let position = meta.position;
                            // A service whose serialization panics would
                            // never snapshot again: the node stops instead.
                            let stage = std::panic::AssertUnwindSafe(|| {
                                meta::stage_snapshot_with(&dir, &meta, task)
                            });
                            let (staged, len) = match std::panic::catch_unwind(stage) {
                                Ok(Ok(staged)) => staged,
                                Ok(Err(e)) => {
                                    let _ =
                                        tx.send(Internal::Fatal(format!("saving snapshot: {e}")));
                                    return;
                                }
                                Err(p) => {
                                    let what = panic_message(p.as_ref());
                                    let _ = tx.send(Internal::Fatal(format!(
                                        "serializing a snapshot panicked: {what}"
                                    )));
                                    return;
                                }
                            };
                            lock_ignoring_poison(&size).taken(position, len);
                            busy.store(false, Ordering::Release);
                            metrics.snapshots_taken.inc();
                            if let Err(e) = storage.commit_snapshot(position, staged, position) {
                                let _ = tx.send(Internal::Fatal(format!("saving snapshot: {e}")));
                                return;
                            }
                        }
                        SnapshotJob::Discard(task) => {
                            drop(task);
                            busy.store(false, Ordering::Release);
                        }
                        SnapshotJob::Free(entries) => drop(entries),
                        SnapshotJob::Backup { meta, task, reply } => {
                            let _ = reply.send(write_backup(&dir, meta, task));
                        }
                        SnapshotJob::DropBackup(task) => drop(task),
                    }
                }
            })
            .map_err(|e| NodeError::Start(e.to_string()))?
    };

    // What the service has applied, for the consensus thread.
    let applied_shared = Arc::new(AtomicU64::new(snapshot.meta.position));
    let worker = ServiceWorker {
        host,
        applied_shared: applied_shared.clone(),
        tx: internal_tx.clone(),
        snapshots: SnapshotSink {
            every: cfg.snapshot_every_bytes.max(1),
            phase: snapshot_phase(cfg.id, cfg.snapshot_every_bytes.max(1)),
            log_percent: u64::from(cfg.snapshot_log_percent),
            last: snapshot.meta.position,
            last_size: snapshot_size,
            busy: snapshot_busy,
        },
        metrics: metrics.clone(),
        notify: notify_tx.clone(),
        writes: HashMap::new(),
        reads: BTreeMap::new(),
        out: ApplyOutput::default(),
        failed: None,
    };
    let (service_link, service_thread) = match service_rx {
        Some(rx) => {
            let tx = internal_tx.clone();
            let thread = std::thread::Builder::new()
                .name("keel-service".into())
                .spawn(move || {
                    let _s = tracing::info_span!("node", id = cfg_id).entered();
                    // A panicking service leaves its state unknown: the
                    // node stops (instead of leaving every later write
                    // unanswered).
                    let run = std::panic::AssertUnwindSafe(|| service_loop(worker, rx));
                    if let Err(p) = std::panic::catch_unwind(run) {
                        let what = panic_message(p.as_ref());
                        let _ = tx.send(Internal::Fatal(format!("the service panicked: {what}")));
                    }
                })
                .map_err(|e| NodeError::Start(e.to_string()))?;
            (
                ServiceLink::Thread(service_tx, LazyWake::default()),
                Some(thread),
            )
        }
        None => (ServiceLink::Inline(Box::new(worker)), None),
    };

    // Reader thread: snapshot chunks and log entries for peers, from disk.
    let (reader_tx, reader_thread) = {
        let tx = internal_tx.clone();
        reader::spawn(cfg.id, cfg.data_dir.clone(), metrics.clone(), move |done| {
            let _ = tx.send(done.map_or_else(Internal::Fatal, Internal::Read));
        })
        .map_err(|e| NodeError::Start(e.to_string()))?
    };

    // Consensus thread.
    let start_wall = wall_clock_ns();
    let mut core_cfg = CoreConfig::new(cfg.id, cfg.cluster_id);
    core_cfg.heartbeat_interval = cfg.heartbeat_ms * 1_000_000;
    core_cfg.commit_notify_delay = cfg.commit_notify_delay_ms.min(cfg.heartbeat_ms) * 1_000_000;
    core_cfg.election_timeout_min = cfg.election_timeout_min_ms * 1_000_000;
    core_cfg.election_timeout_max = cfg.election_timeout_max_ms * 1_000_000;
    core_cfg.seed = start_wall ^ cfg.id;
    core_cfg.snapshot_check = meta::check_snapshot_image;
    core_cfg.log_cache_bytes = cfg.log_cache_bytes;
    core_cfg.lease_reads = cfg.lease_reads;
    core_cfg.clock_drift_ppm = cfg.clock_drift_ppm;
    core_cfg.preferred_leaders = cfg.preferred_leader_set();
    core_cfg.preferred_leader_hold = cfg.preferred_leader_hold_ms.saturating_mul(1_000_000);
    if !cfg.preferred_leaders.is_empty() {
        info!(
            "node {}: preferred leaders {:?} (hold {} ms){}",
            cfg.id,
            core_cfg.preferred_leaders,
            cfg.preferred_leader_hold_ms,
            if core_cfg.preferred_leaders.contains(&cfg.id) {
                ": this node is one"
            } else {
                ": this node hands leadership to one of them once it answers steadily"
            }
        );
        let unknown = cfg.unknown_preferred_leaders();
        if !unknown.is_empty() {
            warn!(
                "node {}: preferred_leaders names {unknown:?}, neither this node nor one of its \
                 peers (a typo? every node should have the same list)",
                cfg.id
            );
        }
    }
    let mut node = Node::restart(core_cfg, recovered, start_wall);
    if amnesic {
        node.set_amnesic();
    }
    let settled_config = crate::amnesia::settled_config(&dir);
    node.restore_settled_config(settled_config);
    // A node created to join that has not recorded that it caught up.
    let created_to_join = hard.membership.voters.is_empty() && hard.membership.learners.is_empty();
    let join = join_on_restart(&dir, created_to_join)?;
    match join {
        JoinOnRestart::Joined => {}
        JoinOnRestart::Resume => node.resume_joining(),
        JoinOnRestart::ResumeVoting => {
            warn!(
                "node {}: created to join by an earlier version (no {JOINED_FILE} or \
                 {JOINING_FILE} in {}): it waits until it has caught up with a leader before \
                 it acts on removal notices, and votes meanwhile as that version did",
                cfg.id,
                dir.display()
            );
            node.resume_joining_voting();
        }
    }
    let join_unrecorded = join != JoinOnRestart::Joined;
    let clock = CoreClock::new(start_wall);
    if !first_start {
        if let Some(w) = unreachable_members(&cfg, node.membership()) {
            warn!("{w}");
        }
    }
    let mut consensus = Consensus {
        node,
        cfg: cfg.clone(),
        now: clock.clone(),
        storage: storage.clone(),
        peers,
        outbox: reader::Outbox::new(),
        reader: reader_tx,
        service: service_link,
        admission,
        snapshots: snap_tx,
        captured: None,
        pending: HashMap::new(),
        awaiting: HashMap::new(),
        proposed_writes: Vec::new(),
        membership_waits: Vec::new(),
        reads_wait_upto: 0,
        last_leader: None,
        deposed: None,
        deposed_positions: std::collections::BTreeMap::new(),
        held_writes: HashMap::new(),
        unplaced_due: None,
        unplaced_term: 0,
        transfers: Vec::new(),
        next_expiry: Instant::now(),
        leaderless: VecDeque::new(),
        leaderless_bytes: 0,
        sessionless_next: (wall_clock_ns() / 1_000) & SESSIONLESS_COUNTER_MASK,
        next_id: 1,
        stats_seen: keel_core::Stats::default(),
        published_at: None,
        published_leading: None,
        client_queue: client_queue.clone(),
        applied_shared,
        proposed_bytes: 0,
        term: term.clone(),
        bootstrap: hard.membership.clone(),
        status: status.clone(),
        membership: membership.clone(),
        metrics: metrics.clone(),
        out: Vec::new(),
        written: None,
        log_writes: Vec::new(),
        removed_by: None,
        removed: removed.clone(),
        join_unrecorded,
        amnesic,
        settled_config,
        to_voter_ignored: (0, None),
    };
    let _ = internal_tx.send(Internal::Applied {
        position: snapshot.meta.position,
        timers,
    });
    let consensus_thread = {
        let (fatal, stopped, storage_for_stop) = (fatal.clone(), stopped.clone(), storage);
        let removed = removed.clone();
        let (stop_dir, durability) = (dir.clone(), cfg.durability);
        std::thread::Builder::new()
            .name("keel-consensus".into())
            .spawn(move || {
                let _s = span.entered();
                // A panic here (in the shared threading mode, also the
                // service's) stops the node as an error would: clients are
                // sent elsewhere and `wait` reports it.
                let run = std::panic::AssertUnwindSafe(|| {
                    consensus_rt.block_on(consensus.run(internal_rx, external_rx))
                });
                let result = std::panic::catch_unwind(run).unwrap_or_else(|p| {
                    Err(format!(
                        "the consensus thread panicked: {}",
                        panic_message(p.as_ref())
                    ))
                });
                // Stopped without an error.
                let graceful = result.is_ok();
                if let Err(e) = result {
                    error!("node stopped: {e}");
                    if let Ok(mut f) = fatal.lock() {
                        *f = Some(e);
                    }
                }
                // From here on clients are told to go elsewhere at once,
                // not "busy" from a client queue nobody drains any more
                // (storage may take a while to write out what is queued).
                stopped.store(true, Ordering::Release);
                // The rest of the shutdown runs while this thread's runtime
                // keeps going: its client connections are answered (as a
                // stopped node) and what is left to write gets written.
                consensus_rt.block_on(async move {
                    tcp::flush_deferred();
                    let wind_down = tokio::task::spawn_blocking(move || {
                        let _ = consensus.service.send(ServiceInput::Stop);
                        drop(consensus);
                        if let Ok(st) = Arc::try_unwrap(storage_for_stop) {
                            match st.shutdown_holding_lock() {
                                Err(e) => error!("storage shutdown: {e}"),
                                // Everything written is synced: a reboot
                                // from here loses nothing. (Marked before
                                // the directory's lock is let go: a next
                                // start records its own boot after it.)
                                Ok(_lock) if graceful => {
                                    if let Err(e) =
                                        crate::amnesia::on_clean_stop(&stop_dir, durability)
                                    {
                                        warn!("after storage shutdown: {e}");
                                    }
                                    // Everything written was synced without
                                    // an error: no need to write it again.
                                    if let Err(e) = meta::clear_resync(&stop_dir) {
                                        warn!("after storage shutdown: {e}");
                                    }
                                }
                                Ok(_) => {}
                            }
                        }
                    });
                    let _ = wind_down.await;
                    // A removed node's last answers (a leader's own removal,
                    // answered through the etcd API on the network runtime)
                    // get out before `wait` returns and `keel server` exits.
                    if removed.lock().is_ok_and(|r| r.is_some()) {
                        tokio::time::sleep(REMOVED_LINGER).await;
                    }
                });
            })
            .map_err(|e| NodeError::Start(e.to_string()))?
    };
    Ok(NodeHandle {
        internal: internal_tx,
        external: external_tx,
        notifications: notify_tx,
        stale_reads,
        client_queue,
        // Start the counter at the clock, so sequence numbers of a restarted
        // node do not repeat those of entries still in the log.
        next_request: AtomicU64::new((wall_clock_ns() / 1_000) & SESSIONLESS_COUNTER_MASK),
        threads: Mutex::new(
            [
                Some(consensus_thread),
                service_thread,
                Some(snapshot_writer),
                Some(reader_thread),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        cluster_id: cfg.cluster_id,
        id: cfg.id,
        metrics: metrics.clone(),
        net_stats,
        fatal,
        removed,
        status,
        membership,
        term,
        stopped,
        clock,
        _rt: rt,
    })
}

struct PendingRequest {
    client_id: u64,
    sink: ResponseSink,
    op: PendingOp,
}

enum PendingOp {
    /// A linearizable read, asked of the core in `term`.
    Read {
        data: Bytes,
        term: u64,
    },
    Other,
}

/// A membership change the leader appended, until its entry (ending at
/// `end`, of term `term`) commits.
struct MembershipWait {
    end: Position,
    term: u64,
    since: Instant,
    pending: PendingRequest,
}

struct Consensus {
    node: Node,
    cfg: NodeConfig,
    now: CoreClock,
    storage: Arc<StorageThread>,
    peers: Box<dyn PeerSender>,
    /// Keeps each peer's messages in order around reads (see `reader`).
    outbox: reader::Outbox,
    /// Jobs for the reader thread.
    reader: reader::ReadJobs,
    service: ServiceLink,
    /// The service's check of client writes before they are proposed.
    admission: Option<keel_core::Admission>,
    snapshots: Sender<SnapshotJob>,
    /// The service state captured for the `Event::SnapshotTaken` being
    /// stepped, until the core's `SaveSnapshot` takes it.
    captured: Option<(Position, SnapshotTask)>,
    /// Requests the core may still answer (reject, read-ready), by core id.
    pending: HashMap<u64, PendingRequest>,
    /// Accepted writes waiting for their entries to apply, by client and
    /// sequence number; handed to the service thread with those entries.
    awaiting: HashMap<(u64, u64), AwaitingWrite>,
    /// This turn's client writes, in the order of its proposal batch, until
    /// the core takes or rejects the batch (`await_accepted`). Kept in a
    /// list rather than in `pending`: a write then costs one map insert
    /// and one removal (in `awaiting`) instead of three of each.
    proposed_writes: Vec<ProposedWrite>,
    /// Membership changes taken, waiting for their entries to commit.
    membership_waits: Vec<MembershipWait>,
    /// The highest read index of a linearizable read handed to the service:
    /// applies up to it have a waiter, so they wake the service at once.
    reads_wait_upto: Position,
    /// The leader as of the last role change (for `leaders_seen`).
    last_leader: Option<NodeId>,
    /// Stepped down in this step: answer `awaiting` at its end.
    deposed: Option<ClientResult>,
    /// Sessionless writes a deposed leader keeps waiting for, by the
    /// position of their entry in its log then: once this node applies
    /// that position and the write was not among what it applied, another
    /// entry took the position, so the write is answered "not the leader"
    /// (it was not applied, and cannot be at any other position).
    deposed_positions: std::collections::BTreeMap<Position, (u64, u64)>,
    /// The writes the core held while this node transferred leadership,
    /// by the core's request id (which the core refuses if it drops them):
    /// their key in `awaiting` and their client's request id. Emptied once
    /// the core holds none (`Node::holds_commands`).
    held_writes: HashMap<u64, ((u64, u64), u64)>,
    /// When `settle_unplaced` looks at the writes whose fate this node
    /// cannot read from its log: those of an earlier term than the leader
    /// it learned of, or any while it knows no leader.
    unplaced_due: Option<Instant>,
    /// The term of the leader this node knew when `settle_unplaced` last
    /// looked (0: none).
    unplaced_term: u64,
    /// Leadership transfers this node started, answered once the target
    /// leads or their time is up (`settle_transfers`).
    transfers: Vec<PendingTransfer>,
    /// When `expire_awaiting` next looks.
    next_expiry: Instant,
    /// Writes and linearizable reads taken while this node knew no leader,
    /// oldest first, each with when it came (`settle_leaderless`), and
    /// their data bytes.
    leaderless: VecDeque<(ClientRequest, ResponseSink, Instant)>,
    leaderless_bytes: u64,
    /// Sequence numbers this node gives sessionless writes (see
    /// `sessionless_seq`).
    sessionless_next: u64,
    next_id: u64,
    /// Elections started, as last exported to the metrics.
    /// The core's counters as last carried into the metrics.
    stats_seen: keel_core::Stats,
    /// When the full status was last published (see `publish_status`).
    published_at: Option<Instant>,
    /// The term of the last status published as the leader (see
    /// `write_log`).
    published_leading: Option<u64>,
    /// Client requests admitted to the external queue.
    client_queue: Arc<ClientQueue>,
    /// The service's applied position (see `sync_applied`).
    applied_shared: Arc<AtomicU64>,
    /// Bytes of client writes taken this turn, not yet proposed (see
    /// `backlog_admits`).
    proposed_bytes: u64,
    term: Arc<AtomicU64>,
    bootstrap: keel_core::Membership,
    status: Arc<Mutex<NodeStatus>>,
    /// Shared with the handle (`NodeHandle::membership`).
    membership: Arc<Mutex<Arc<keel_core::Membership>>>,
    metrics: Arc<Metrics>,
    out: Vec<Action>,
    /// The log's end after appends this thread wrote itself (`replicated`
    /// mode), reported to the core as durable at the end of the step.
    written: Option<(Position, keel_core::Term)>,
    /// A step's appends and truncations, in order: done after its peer
    /// messages are written (see `step`).
    log_writes: Vec<Action>,
    /// The core said this node was removed (`Action::Removed`): who said
    /// so, and from which position. The node stops at the end of the step.
    removed_by: Option<(NodeId, Position)>,
    /// Shared with the handle: why the node stopped, if it was removed.
    removed: Arc<Mutex<Option<String>>>,
    /// Created to join, and `JOINED_FILE` not written yet.
    join_unrecorded: bool,
    /// `amnesia::AMNESIC_FILE` is present: removed once the core is no
    /// longer amnesic (`Node::set_amnesic`).
    amnesic: bool,
    /// What `amnesia::SETTLED_CONFIG_FILE` records (`Node::settled_config`).
    settled_config: u64,
    /// The core's `to_voter_ignored` when last looked at, and when it was
    /// last warned of.
    to_voter_ignored: (u64, Option<Instant>),
}

impl Consensus {
    /// The consensus loop. Runs on the consensus thread's own runtime,
    /// whose other tasks (peer links, client connections) run only while it
    /// waits here for the next event.
    async fn run(
        &mut self,
        mut internal: tokio::sync::mpsc::UnboundedReceiver<Internal>,
        mut external: tokio::sync::mpsc::Receiver<External>,
    ) -> Result<(), String> {
        let result = self.turns(&mut internal, &mut external).await;
        if self.removed.lock().is_ok_and(|r| r.is_some()) {
            // Requests queued behind the removal never reached the core:
            // answered as a stopped node's (clients go elsewhere), not
            // dropped.
            external.close();
            while let Ok(ev) = external.try_recv() {
                let (reqs, sink) = match ev {
                    External::Peer(_) => continue,
                    External::Client(req, sink) => (vec![req], sink),
                    External::Clients(reqs, sink) => (reqs, sink),
                };
                for req in reqs {
                    respond(&sink, req.id, stopped_node());
                }
            }
        }
        result
    }

    /// The consensus loop's turns, until the node stops.
    async fn turns(
        &mut self,
        internal: &mut tokio::sync::mpsc::UnboundedReceiver<Internal>,
        external: &mut tokio::sync::mpsc::Receiver<External>,
    ) -> Result<(), String> {
        let mut proposals = Vec::new();
        // Client responses (refusals) are written at the end of each turn.
        tcp::defer_flushes();
        loop {
            let now = self.now.now();
            let deadline = self.node.next_deadline();
            // Tokio's timer has a 1 ms resolution: a deadline is met up to
            // ~1 ms late (heartbeats and election timeouts are tens of ms).
            let mut wait =
                Duration::from_nanos(deadline.saturating_sub(now).clamp(1_000_000, 100_000_000));
            let leaderless_due = self
                .leaderless
                .front()
                .map(|(_, _, since)| *since + self.leaderless_limit());
            for due in [self.service.wake_due(), leaderless_due, self.unplaced_due]
                .into_iter()
                .flatten()
            {
                wait = wait.min(
                    due.saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                );
            }
            if !self.leaderless.is_empty() && self.node.leader().is_some() {
                // Reads refused by a leader that lost leadership, to ask
                // the new one (`retry_read`): at once.
                wait = Duration::ZERO;
            }
            let first = tokio::select! {
                biased;
                ev = internal.recv() => match ev {
                    Some(ev) => Some(Ok(ev)),
                    None => return Ok(()),
                },
                // (Never closed while `internal` is open: the handle holds
                // a sender of each.)
                Some(ev) = external.recv() => Some(Err(ev)),
                _ = tokio::time::sleep(wait) => None,
            };
            let turn = Instant::now();
            let mut stats = TurnStats::default();
            let stop = match first {
                Some(Ok(ev)) => self.timed_internal(ev, &mut stats)?,
                Some(Err(ev)) => {
                    self.timed_external(ev, &mut proposals, &mut stats)?;
                    false
                }
                None => false,
            };
            if stop {
                return Ok(());
            }
            // Drain what else is queued, batching client writes into one
            // proposal (one append, one replication round).
            for _ in 0..4096 {
                match internal.try_recv() {
                    Ok(ev) => {
                        if self.timed_internal(ev, &mut stats)? {
                            return Ok(());
                        }
                    }
                    Err(_) => break,
                }
            }
            // At most ~4096 requests per turn, so storage and service
            // completions are not held up behind one huge batch.
            while stats.taken < 4096 {
                match external.try_recv() {
                    Ok(ev) => self.timed_external(ev, &mut proposals, &mut stats)?,
                    Err(_) => break,
                }
            }
            self.settle_leaderless(&mut proposals, Instant::now())?;
            stats.proposed = proposals.len();
            self.sync_applied()?;
            if !proposals.is_empty() {
                let batch = std::mem::take(&mut proposals);
                self.proposed_bytes = 0;
                if self.node.leader().is_none() {
                    // The leader was lost in this turn after the writes were
                    // taken (a new term's vote came in): they wait for the
                    // next one, each from when it came.
                    self.repark(batch);
                } else {
                    self.step(Event::Propose(batch))?;
                }
            }
            if self.now.now() >= self.node.next_deadline() {
                self.step(Event::Tick)?;
            }
            // Published before this turn's messages go out at the flushes
            // below: whoever hears from this node (a vote, a new leader's
            // first append) and then asks for its status sees this turn's
            // role, term and leader, not an earlier turn's. (A leader's
            // appends may go out earlier, at `write_log`, which publishes
            // first when the node newly leads. The peer links' tasks run on
            // this thread's runtime, so none writes during a turn; the
            // in-memory network delivers at the flushes too.)
            self.maybe_publish_status();
            // This turn's peer messages, one write per peer, and its
            // client responses, one write per connection.
            self.peers.flush();
            tcp::flush_deferred();
            self.metrics.queue_depth.set(self.client_queue.len() as i64);
            self.metrics
                .service_queue_depth
                .set(self.service.queued() as i64);
            self.metrics
                .storage_queue_depth
                .set(self.storage.queue_len() as i64);
            self.service.wake_if_due(Instant::now());
            self.expire_awaiting();
            self.settle_unplaced();
            self.settle_transfers();
            let took = turn.elapsed();
            if took >= SLOW_TURN {
                warn!(
                    "node {}: slow consensus turn: {took:?} ({stats})",
                    self.cfg.id
                );
            }
        }
    }

    /// `external`, timed into `stats`.
    fn timed_external(
        &mut self,
        ev: External,
        proposals: &mut Vec<Proposal>,
        stats: &mut TurnStats,
    ) -> Result<(), String> {
        let t = Instant::now();
        stats.taken += ev.requests();
        self.external(ev, proposals, t)?;
        let took = t.elapsed();
        stats.external += took;
        stats.slowest_external = stats.slowest_external.max(took);
        Ok(())
    }

    /// `internal`, timed into `stats`.
    fn timed_internal(&mut self, ev: Internal, stats: &mut TurnStats) -> Result<bool, String> {
        let kind = ev.kind();
        let t = Instant::now();
        let stop = self.internal(ev)?;
        let took = t.elapsed();
        stats.internal += 1;
        if took >= stats.slowest_internal.1 {
            stats.slowest_internal = (kind, took);
        }
        Ok(stop)
    }

    /// Returns true when the node must stop.
    fn internal(&mut self, ev: Internal) -> Result<bool, String> {
        match ev {
            Internal::Durable { position, term } => self.step(Event::Durable { position, term })?,
            Internal::Applied { position, timers } => {
                self.step(Event::Applied { position, timers })?
            }
            Internal::SnapshotCaptured { position, task } => {
                self.sync_applied()?;
                // The core answers with `SaveSnapshot`, which takes the
                // capture, or with nothing: then it is dropped.
                self.captured = Some((position, task));
                self.step(Event::SnapshotTaken { position })?;
                if let Some((_, task)) = self.captured.take() {
                    let _ = self.snapshots.send(SnapshotJob::Discard(task));
                }
            }
            Internal::SnapshotPublished { position, size } => {
                self.step(Event::SnapshotPublished { position, size })?
            }
            Internal::Backup(reply) => self.service.send(ServiceInput::Backup(reply))?,
            Internal::BackupCaptured {
                position,
                task,
                reply,
            } => {
                self.sync_applied()?;
                match self.node.snapshot_meta_at(position) {
                    Some(meta) => {
                        let _ = self
                            .snapshots
                            .send(SnapshotJob::Backup { meta, task, reply });
                    }
                    None => {
                        let _ = reply.send(Err(format!(
                            "a snapshot install overtook the capture at position {position}: try again"
                        )));
                        let _ = self.snapshots.send(SnapshotJob::DropBackup(task));
                    }
                }
            }
            Internal::Read(done) => self.outbox.done(done, &*self.peers),
            Internal::Fatal(e) => return Err(e),
            Internal::Shutdown => {
                info!("node {} shutting down", self.cfg.id);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// `now`: when the event was taken, the time its writes wait from.
    fn external(
        &mut self,
        ev: External,
        proposals: &mut Vec<Proposal>,
        now: Instant,
    ) -> Result<(), String> {
        match ev {
            External::Peer(m) => self.step(Event::Message(m)),
            External::Client(req, sink) => {
                self.client_queue.release(1);
                self.client(req, sink, proposals, now)
            }
            External::Clients(reqs, sink) => {
                self.client_queue.release(reqs.len());
                reqs.into_iter()
                    .try_for_each(|req| self.client(req, sink.clone(), proposals, now))
            }
        }
    }

    /// The requests taken while this node knew no leader (`leaderless`):
    /// once it knows one they go on as if just taken (a write proposed to
    /// the core, which appends or forwards it, a read asked of the core);
    /// those that waited two heartbeats
    /// (`heartbeat_ms`: well above a round trip to any peer) are answered
    /// "not the leader" for their clients to try another node.
    fn settle_leaderless(
        &mut self,
        proposals: &mut Vec<Proposal>,
        now: Instant,
    ) -> Result<(), String> {
        if self.leaderless.is_empty() {
            return Ok(());
        }
        if self.node.leader().is_some() {
            self.leaderless_bytes = 0;
            // Each from when it came: its write timeout counts the wait.
            for (req, sink, since) in std::mem::take(&mut self.leaderless) {
                self.client(req, sink, proposals, since)?;
            }
            return Ok(());
        }
        while let Some((_, _, since)) = self.leaderless.front() {
            if now < *since + self.leaderless_limit() {
                break;
            }
            if let Some((req, sink, _)) = self.leaderless.pop_front() {
                self.leaderless_bytes -= request_bytes(&req.op);
                respond(&sink, req.id, self.not_leader());
            }
        }
        Ok(())
    }

    /// A write or linearizable read taken while this node knows no leader:
    /// most often the moment between a new term's vote and its leader's
    /// first append (a leadership transfer, an election), so it is held a
    /// little for the leader to be known (`settle_leaderless`) rather than
    /// refused. A removed node, or one holding `max_unapplied_bytes`
    /// already, answers "not the leader" at once.
    /// Whether it was parked (else answered).
    fn park_leaderless(&mut self, req: ClientRequest, sink: ResponseSink, now: Instant) -> bool {
        let len = request_bytes(&req.op);
        if self.node.removed().is_some()
            || self.leaderless_bytes.saturating_add(len) > self.cfg.max_unapplied_bytes
        {
            respond(&sink, req.id, self.not_leader());
            return false;
        }
        self.leaderless_bytes += len;
        self.leaderless.push_back((req, sink, now));
        true
    }

    /// A proposal batch that met no leader, back into `leaderless` with
    /// its writes (in `proposed_writes`, in the same order).
    fn repark(&mut self, batch: Vec<Proposal>) {
        let writes = std::mem::take(&mut self.proposed_writes);
        // Ahead of those parked meanwhile (taken later in the turn, once
        // the leader was lost): a session's writes keep their order.
        let later = std::mem::take(&mut self.leaderless);
        for (p, w) in batch.into_iter().zip(writes) {
            let req = ClientRequest {
                id: w.write.id,
                client: w.client,
                seq: w.seq,
                op: ClientOp::Write(p.data),
            };
            if self.park_leaderless(req, w.write.sink, w.write.since) {
                self.metrics.leaderless_requests.inc();
            }
        }
        self.leaderless.extend(later);
    }

    /// A linearizable read refused "not the leader" after a new term
    /// began (the leader it was asked of, or this node, lost leadership
    /// meanwhile, as in a leadership transfer): a read is safe to ask
    /// again, so it is, of the new term's leader once one is known, as if
    /// just taken (`park_leaderless`). Each retry needs a later term, and
    /// a node that knows no leader for two heartbeats refuses it.
    fn retry_read(&mut self, client_id: u64, data: Bytes, sink: ResponseSink) {
        self.metrics.reads_retried.inc();
        let req = ClientRequest {
            id: client_id,
            client: keel_core::SESSIONLESS,
            seq: 0,
            op: ClientOp::Read(data),
        };
        let _ = self.park_leaderless(req, sink, Instant::now());
    }

    fn leaderless_limit(&self) -> Duration {
        Duration::from_millis(2 * self.cfg.heartbeat_ms)
    }

    fn client(
        &mut self,
        req: ClientRequest,
        sink: ResponseSink,
        proposals: &mut Vec<Proposal>,
        now: Instant,
    ) -> Result<(), String> {
        // A write or linearizable read with no leader known, or behind
        // requests already waiting for one (a session's writes keep their
        // order), waits for one (`park_leaderless`).
        if matches!(req.op, ClientOp::Write(_) | ClientOp::Read(_))
            && (self.node.leader().is_none() || !self.leaderless.is_empty())
        {
            let no_leader = self.node.leader().is_none();
            if self.park_leaderless(req, sink, now) && no_leader {
                self.metrics.leaderless_requests.inc();
            }
            return Ok(());
        }
        let id = self.next_id;
        self.next_id += 1;
        match req.op {
            ClientOp::Write(data) => {
                // A follower forwards to the leader (the core does
                // it) and replies once the entry is applied here.
                if !self.backlog_admits(data.len()) {
                    self.metrics.busy.inc();
                    respond(&sink, req.id, ClientResult::Busy);
                    return Ok(());
                }
                if let Some(Err(refusal)) = self.admission.as_ref().map(|admit| admit(&data)) {
                    self.metrics.admission_refusals.inc();
                    respond(&sink, req.id, ClientResult::Error(refusal));
                    return Ok(());
                }
                self.proposed_bytes = self.proposed_bytes.saturating_add(data.len() as u64);
                // A sessionless write's number only matches its reply to
                // it: this node picks one no other write in flight has.
                let seq = if req.client == keel_core::SESSIONLESS {
                    self.sessionless_next = self.sessionless_next.wrapping_add(1);
                    sessionless_seq(self.cfg.id, self.sessionless_next)
                } else {
                    req.seq
                };
                self.proposed_writes.push(ProposedWrite {
                    id,
                    client: req.client,
                    seq,
                    write: AwaitingWrite {
                        id: req.id,
                        sink,
                        since: now,
                        unplaced: None,
                    },
                });
                proposals.push(Proposal {
                    id,
                    client: req.client,
                    seq,
                    data,
                });
                Ok(())
            }
            ClientOp::Read(data) => {
                self.pending.insert(
                    id,
                    PendingRequest {
                        client_id: req.id,
                        sink,
                        op: PendingOp::Read {
                            data,
                            term: self.node.term(),
                        },
                    },
                );
                self.step(Event::Read { id })
            }
            ClientOp::StaleRead(data) => self.service.send(ServiceInput::StaleRead {
                data,
                id: req.id,
                sink,
                commit: self.node.commit_position(),
            }),
            ClientOp::Status => {
                self.publish_status();
                let s = self.status.lock().map(|s| s.clone()).unwrap_or_default();
                respond(&sink, req.id, ClientResult::Status(s));
                Ok(())
            }
            ClientOp::Membership => {
                let m = self.node.membership().clone();
                respond(&sink, req.id, ClientResult::Membership(m));
                Ok(())
            }
            ClientOp::TransferLeader(target) => self.transfer_leader(id, req.id, sink, target),
            ClientOp::ChangeMembership(MembershipChange::AddLearner(n))
                if n != 0
                    && self.cfg.client_addr_of(n).is_none()
                    && !self.node.membership().removed.contains(&n) =>
            {
                // A node no configuration names could never be reached: as
                // a learner it would never catch up, and it must never
                // become a voter. (A removed id is the core's to refuse,
                // with its reason: a new id, not a new address, is the
                // remedy.)
                respond(
                    &sink,
                    req.id,
                    ClientResult::Error(format!(
                        "node {n} is not in this node's configuration: add it to every \
                         node's [[peers]] (id, peer_addr, client_addr) and restart them, \
                         start it with join = true, then add it"
                    )),
                );
                Ok(())
            }
            ClientOp::ChangeMembership(change) => self.change_membership(id, req.id, sink, change),
        }
    }

    /// Whether a client write of `len` bytes fits under `max_unapplied_bytes`:
    /// the log this node has not applied yet, plus this turn's writes not
    /// yet proposed, plus this one. Always when nothing is waiting.
    fn backlog_admits(&self, len: usize) -> bool {
        let applied = self.applied_shared.load(Ordering::Acquire);
        let backlog = self
            .node
            .append_position()
            .saturating_sub(applied)
            .saturating_add(self.proposed_bytes);
        backlog == 0 || backlog.saturating_add(len as u64) <= self.cfg.max_unapplied_bytes
    }

    /// Tells the core what the service thread applied since the last turn
    /// (published through an atomic rather than an event per batch).
    fn sync_applied(&mut self) -> Result<(), String> {
        let applied = self.applied_shared.load(Ordering::Acquire);
        if applied > self.node.applied_position() {
            self.step(Event::Applied {
                position: applied,
                timers: Vec::new(),
            })?;
        }
        Ok(())
    }

    /// A leadership transfer: answered once `target` leads (as etcd's
    /// MoveLeader does), or with `TRANSFER_TIMED_OUT` if it does not within
    /// the core's transfer window and an election after it.
    fn transfer_leader(
        &mut self,
        id: u64,
        client_id: u64,
        sink: ResponseSink,
        target: NodeId,
    ) -> Result<(), String> {
        if target == self.cfg.id && self.node.is_leader() {
            respond(&sink, client_id, ClientResult::Ok(Bytes::new()));
            return Ok(());
        }
        // Still pending: the core took it (a refusal answered it).
        if let Some(p) = self.step_admin(
            id,
            client_id,
            sink,
            Event::TransferLeadership { id, target },
        )? {
            let window = Duration::from_millis(
                self.cfg.election_timeout_min_ms + self.cfg.election_timeout_max_ms,
            );
            self.transfers.push(PendingTransfer {
                target,
                client_id: p.client_id,
                sink: p.sink,
                until: Instant::now() + window,
                window,
            });
            self.settle_transfers();
        }
        Ok(())
    }

    /// Answers the transfers whose target now leads, and those whose time
    /// is up.
    fn settle_transfers(&mut self) {
        if self.transfers.is_empty() {
            return;
        }
        let now = Instant::now();
        let leader = self.node.leader();
        let id = self.cfg.id;
        self.transfers.retain(|t| {
            let result = if leader == Some(t.target) {
                ClientResult::Ok(Bytes::new())
            } else if now >= t.until {
                ClientResult::Error(format!(
                    "{} after {} ms: node {} does not lead (the leader is {}); \
                     it may be lagging or unreachable",
                    keel_net::codec::TRANSFER_TIMED_OUT,
                    t.window.as_millis(),
                    t.target,
                    leader.map_or("unknown".to_string(), |l| {
                        if l == id {
                            format!("still node {l}")
                        } else {
                            format!("node {l}")
                        }
                    })
                ))
            } else {
                return true;
            };
            respond(&t.sink, t.client_id, result);
            false
        });
    }

    /// Steps an administrative request's event with the request pending:
    /// returns it if still pending (the core took it; a refusal answered
    /// and removed it).
    fn step_admin(
        &mut self,
        id: u64,
        client_id: u64,
        sink: ResponseSink,
        ev: Event,
    ) -> Result<Option<PendingRequest>, String> {
        self.pending.insert(
            id,
            PendingRequest {
                client_id,
                sink,
                op: PendingOp::Other,
            },
        );
        self.step(ev)?;
        Ok(self.pending.remove(&id))
    }

    /// A membership change: refused at once with the core's rejection, or
    /// answered once its entry commits (as etcd answers once the change
    /// applies): answered when appended, the client's next change would
    /// find this one still pending, and an answered change could be lost
    /// with its leader (`answer_membership_changes`).
    fn change_membership(
        &mut self,
        id: u64,
        client_id: u64,
        sink: ResponseSink,
        change: MembershipChange,
    ) -> Result<(), String> {
        let ev = Event::ChangeMembership { id, change };
        if let Some(pending) = self.step_admin(id, client_id, sink, ev)? {
            // Taken: its entry is the last of the leader's log.
            let log = self.node.log();
            self.membership_waits.push(MembershipWait {
                end: log.last_pos(),
                term: log.last_term(),
                since: Instant::now(),
                pending,
            });
            self.answer_membership_changes();
        }
        Ok(())
    }

    /// Answers the membership changes whose entries have committed: "ok",
    /// after publishing the status the caller reads the new membership
    /// from next. One whose leader lost its leadership first, or that has
    /// not committed within `write_timeout_ms`, is answered that its
    /// outcome is unknown (the entry may still commit under a new leader).
    fn answer_membership_changes(&mut self) {
        if self.membership_waits.is_empty() {
            return;
        }
        let node = &self.node;
        let commit = node.commit_position();
        let limit = Duration::from_millis(self.cfg.write_timeout_ms);
        let mut answers = Vec::new();
        for w in std::mem::take(&mut self.membership_waits) {
            let ours = node.log().term_at(w.end) == Some(w.term);
            let result = if commit >= w.end && ours {
                ClientResult::Ok(Bytes::new())
            } else if !node.is_leader() || node.term() != w.term {
                ClientResult::Error(format!(
                    "{}: the leader changed before the membership change committed \
                     (leader changed); it may or may not take effect: check the members",
                    keel_net::codec::OUTCOME_UNKNOWN
                ))
            } else if w.since.elapsed() >= limit {
                ClientResult::Error(format!(
                    "{}: the membership change did not commit within {limit:?} (timed out); \
                     it may or may not take effect: check the members",
                    keel_net::codec::OUTCOME_UNKNOWN
                ))
            } else {
                self.membership_waits.push(w);
                continue;
            };
            answers.push((w.pending, result));
        }
        if answers.is_empty() {
            return;
        }
        self.publish_status();
        for (p, result) in answers {
            respond(&p.sink, p.client_id, result);
        }
    }

    fn not_leader(&self) -> ClientResult {
        let leader = self.node.leader();
        ClientResult::NotLeader {
            leader,
            address: leader.and_then(|l| self.cfg.client_addr_of(l)),
        }
    }

    fn step(&mut self, ev: Event) -> Result<(), String> {
        let now = self.now.now();
        let mut out = std::mem::take(&mut self.out);
        // A proposal batch: the accepted writes wait for their entries.
        let mut writes = match &ev {
            Event::Propose(_) => std::mem::take(&mut self.proposed_writes),
            _ => Vec::new(),
        };
        self.node.step(now, ev, &mut out);
        let compacted = self.node.take_compacted();
        if !compacted.is_empty() {
            let _ = self.snapshots.send(SnapshotJob::Free(compacted));
        }
        self.await_accepted(&mut writes, &out);
        if self.proposed_writes.is_empty() {
            // Drained: its room serves the next turn's writes.
            self.proposed_writes = writes;
        }
        // The end of joining is recorded after this step's snapshot install
        // (a restart must find the configuration that added this node) and
        // before its messages go out: the acknowledgement that tells the
        // leader this node caught up lets it promote the node, and a voter
        // must not resume joining after a restart (a joining node ignores
        // a leader that counts it as a voter).
        let joined = self.join_unrecorded && !self.node.joining();
        let result = out.drain(..).try_for_each(|a| {
            let sends = matches!(
                a,
                Action::Send(_) | Action::SendSnapshotChunk { .. } | Action::SendLogRange { .. }
            );
            if joined && sends && self.join_unrecorded {
                self.record_joined()?;
            }
            self.execute(a)
        });
        self.out = out;
        result?;
        if joined && self.join_unrecorded {
            self.record_joined()?;
        }
        self.warn_if_taken_for_a_voter();
        if self.node.settled_config() > self.settled_config {
            // (A membership change committed: rare.)
            self.settled_config = self.node.settled_config();
            crate::amnesia::record_settled_config(&self.cfg.data_dir, self.settled_config)?;
        }
        if self.amnesic && !self.node.amnesic() {
            crate::amnesia::caught_up(&self.cfg.data_dir)?;
            self.amnesic = false;
            self.metrics.amnesic.set(0);
            info!(
                "node {}: caught up with the leader of term {} since its power loss (or the cut of \
                 its log at a hole): no longer amnesic",
                self.cfg.id,
                self.node.term()
            );
        }
        self.write_log()?;
        // Entries written on this thread (`replicated` mode) are durable
        // now: a follower acknowledges them in this same turn.
        if let Some((position, term)) = self.written.take() {
            self.step(Event::Durable { position, term })?;
        }
        // Committed changes are answered as such (a leader's own removal
        // included); then, before `answer_deposed`, the other clients of a
        // removed node hear that it was removed, not that it lost its
        // leader.
        self.answer_membership_changes();
        if let Some((by, position)) = self.removed_by.take() {
            return Err(self.stop_removed(by, position));
        }
        self.answer_deposed();
        if !self.held_writes.is_empty() && !self.node.holds_commands() {
            // Appended or passed on: answered by their entries now.
            self.held_writes.clear();
        }
        Ok(())
    }

    /// This node, created to join, has caught up with a leader whose
    /// configuration includes it (on entries the core knows are durable):
    /// `JOINED_FILE` records it. If it cannot be written the node stops
    /// with the error: a leader may promote it on its next
    /// acknowledgement, and a voter that resumed joining after a restart
    /// would ignore its leader (which counts it as a voter) for good.
    fn record_joined(&mut self) -> Result<(), String> {
        self.join_unrecorded = false;
        let text = format!(
            "Node {} of cluster {:#x} caught up with a leader whose configuration includes it \
             (log position {}): removal notices apply to it from here on.\n",
            self.cfg.id,
            self.cfg.cluster_id,
            self.node.durable_position()
        );
        meta::write_atomic(&self.cfg.data_dir, JOINED_FILE, text.as_bytes()).map_err(|e| {
            format!(
                "could not write {JOINED_FILE} into {}: {e} (a leader may promote this node \
                 once it acknowledges; without the record a restart would take it to be still \
                 joining and it would ignore its leader)",
                self.cfg.data_dir.display()
            )
        })?;
        info!("node {}: joined the cluster", self.cfg.id);
        Ok(())
    }

    /// A leader counts this node, still joining, as a voter: it takes the
    /// node for an earlier node of its id. Said at most once a minute.
    fn warn_if_taken_for_a_voter(&mut self) {
        let ignored = self.node.stats().to_voter_ignored;
        if ignored == self.to_voter_ignored.0 {
            return;
        }
        self.to_voter_ignored.0 = ignored;
        let now = Instant::now();
        if self
            .to_voter_ignored
            .1
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
        {
            return;
        }
        self.to_voter_ignored.1 = Some(now);
        warn!(
            "node {}: a leader counts this node as a voter though it was started to join, and \
             it is ignored: the id belonged to a node that was removed or whose disk was lost. \
             This node waits for good: give it a new id (an initial member that never ran is \
             started without join)",
            self.cfg.id
        );
    }

    /// This node was removed from the cluster: says so (log, clients, a
    /// `REMOVED_FILE` in the data directory) and returns the reason the
    /// consensus loop stops with.
    fn stop_removed(&mut self, by: NodeId, position: Position) -> String {
        let id = self.cfg.id;
        let who = if by == id {
            "it committed its own removal as the leader".to_string()
        } else {
            format!("node {by} says so")
        };
        let why = format!(
            "node {id} was removed from cluster {:#x} ({}: {who}; the configuration in force \
             from log position {position} excludes it) and stopped for good; it will not start \
             again on the data directory {}, and {}",
            self.cfg.cluster_id,
            keel_core::REMOVED_FROM_CLUSTER,
            self.cfg.data_dir.display(),
            removed_advice(id),
        );
        error!("{why}");
        // Its last messages (a removed leader's hand-over) go out first.
        self.peers.flush();
        let refusal = removed_refusal;
        for (_, p) in self.pending.drain() {
            respond(&p.sink, p.client_id, refusal());
        }
        for p in self.proposed_writes.drain(..) {
            respond(&p.write.sink, p.write.id, refusal());
        }
        // Proposed: they may commit without this node.
        for (_, w) in self.awaiting.drain() {
            respond(&w.sink, w.id, removed_outcome_unknown());
        }
        for w in self.membership_waits.drain(..) {
            respond(
                &w.pending.sink,
                w.pending.client_id,
                removed_outcome_unknown(),
            );
        }
        for t in self.transfers.drain(..) {
            respond(&t.sink, t.client_id, refusal());
        }
        for (req, sink, _) in self.leaderless.drain(..) {
            respond(&sink, req.id, refusal());
        }
        self.leaderless_bytes = 0;
        let text = format!(
            "This data directory belongs to node {id} of cluster {:#x}, which was removed from \
             the cluster: {who} (the configuration in force from log position {position} \
             excludes it). Keel refuses to start a node on it. The cluster refuses the id {id} \
             from now on: {}.\n\
             Written at {} ns since the Unix epoch.\n",
            self.cfg.cluster_id,
            removed_advice(id),
            wall_clock_ns()
        );
        if let Err(e) = meta::write_atomic(&self.cfg.data_dir, REMOVED_FILE, text.as_bytes()) {
            error!(
                "node {id}: could not write {REMOVED_FILE} into {}: {e}",
                self.cfg.data_dir.display()
            );
        }
        if let Ok(mut r) = self.removed.lock() {
            *r = Some(why.clone());
        }
        why
    }

    /// The writes of a proposal batch the core accepted (did not reject in
    /// `out`) now wait for their entries to apply; those it rejected go to
    /// `pending`, where `execute` answers them with the rejection.
    fn await_accepted(&mut self, writes: &mut Vec<ProposedWrite>, out: &[Action]) {
        if writes.is_empty() {
            return;
        }
        let mut rejected: Vec<u64> = out
            .iter()
            .filter_map(|a| match a {
                Action::Rejected { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        rejected.sort_unstable();
        // The core's role is the one the batch met (a step never changes
        // it after taking proposals).
        let unplaced =
            (!self.node.is_leader() || self.node.is_transferring()).then(|| self.node.term());
        let held = self.node.is_transferring();
        for ProposedWrite {
            id,
            client,
            seq,
            write: mut w,
        } in writes.drain(..)
        {
            w.unplaced = unplaced;
            if !rejected.is_empty() && rejected.binary_search(&id).is_ok() {
                self.pending.insert(
                    id,
                    PendingRequest {
                        client_id: w.id,
                        sink: w.sink,
                        op: PendingOp::Other,
                    },
                );
                continue;
            }
            if held {
                self.held_writes.insert(id, ((client, seq), w.id));
            }
            if let Some(old) = self.awaiting.insert((client, seq), w) {
                respond(
                    &old.sink,
                    old.id,
                    ClientResult::Error(format!(
                        "replaced by a newer request with the same session and sequence number ({client}, {seq}), which gets the reply"
                    )),
                );
            }
        }
    }

    /// After stepping down: the writes still waiting for their entries may
    /// or may not commit under the new leader. A write in a session is
    /// answered "not the leader" at once: its client retries at the new
    /// leader with the same sequence number, which the session table
    /// applies once. A sessionless one (the etcd API's) cannot be retried
    /// safely, and "not the leader" would read as a refusal, so it waits
    /// here as a follower's forwarded write does: answered by its entry if
    /// the new leader commits it, or after `write_timeout_ms` that its
    /// outcome is unknown (`expire_awaiting`), as etcd's server waits for a
    /// proposal across a leader change. So does a sessionless write this
    /// node forwarded before it led, or held while it transferred
    /// leadership, whose entry it never held: the leader it went to may
    /// have appended it. Runs at the end of a step, so
    /// writes whose entries that step applied went to the service first.
    fn answer_deposed(&mut self) {
        let Some(not_leader) = self.deposed.take() else {
            return;
        };
        if self.node.role() == Role::Leader {
            return;
        }
        // Writes kept at an earlier step-down and answered since (outcome
        // unknown: `settle_unplaced`, `expire_awaiting`) are kept no more.
        let awaiting = &self.awaiting;
        self.deposed_positions
            .retain(|_, key| awaiting.contains_key(key));
        // Where the sessionless writes' entries are in the log (after the
        // commit position: those committed went to the service already).
        let mut positions = HashMap::new();
        if self.awaiting.len() > self.deposed_positions.len()
            && self
                .awaiting
                .keys()
                .any(|&(c, _)| c == keel_core::SESSIONLESS)
        {
            let log = self.node.log();
            for e in log.entries_between(self.node.commit_position(), log.last_pos()) {
                if let keel_core::EntryKind::Command { client, seq } = e.kind {
                    if self.awaiting.contains_key(&(client, seq)) {
                        positions.insert((client, seq), (e.position, e.term));
                    }
                }
            }
        }
        // Writes kept at an earlier step-down stay kept: their entries may
        // be gone from this log (a new leader truncated it) and still
        // commit from another node's; only an entry applied at their
        // position settles them (`answer_superseded`).
        let already: std::collections::HashSet<(u64, u64)> =
            self.deposed_positions.values().copied().collect();
        let kept = &mut self.deposed_positions;
        // Below the term this node now knows: a leader's write truncated
        // in the step that deposed it was appended in an earlier term.
        let earlier_term = self.node.term().saturating_sub(1);
        self.awaiting.retain(|&(client, seq), w| {
            if client != keel_core::SESSIONLESS {
                respond(&w.sink, w.id, not_leader.clone());
                return false;
            }
            if already.contains(&(client, seq)) {
                return true;
            }
            if let Some(&(p, term)) = positions.get(&(client, seq)) {
                kept.insert(p, (client, seq));
                // (And, like a forwarded one, told its outcome is unknown
                // if this node knows no leader for long, or the next
                // leader's term commits without it.)
                w.unplaced = Some(term);
            } else if w.unplaced.is_none() {
                // Appended here as leader, and gone from the log past the
                // commit position (a committed one went to the service
                // already): the step that deposed this node truncated it,
                // a new leader's first append overwriting it. A node that
                // did not vote for that leader may hold it still and be
                // elected next, so it may yet commit: like a forwarded
                // write, it waits for its entry, or to be told its outcome
                // is unknown (`settle_unplaced`).
                w.unplaced = Some(earlier_term);
            }
            // (Otherwise forwarded before this node led, or held while it
            // transferred leadership: the leader it went to may hold it
            // still or have appended it, so it waits for its entry or
            // `write_timeout_ms`.)
            true
        });
    }

    /// A deposed leader's sessionless writes whose log positions `upto`
    /// has now applied without them (`deposed_positions`): not applied,
    /// and they never will be; their clients hear "not the leader".
    fn answer_superseded(&mut self, upto: Position) {
        while let Some(entry) = self.deposed_positions.first_entry() {
            if *entry.key() >= upto {
                break;
            }
            let key = entry.remove();
            if let Some(w) = self.awaiting.remove(&key) {
                let leader = self.node.leader();
                let address = leader.and_then(|l| self.cfg.client_addr_of(l));
                respond(&w.sink, w.id, ClientResult::NotLeader { leader, address });
            }
        }
    }

    /// A snapshot installed here replaces entries this node will never
    /// apply; writes of its own clients among them would wait for
    /// `write_timeout_ms`. A write in a session that the snapshot's session
    /// table shows at or past its sequence number is answered now, as its
    /// entry would answer it: with the reply the table keeps if it was the
    /// session's last request, as stale if the session has moved on.
    /// (Sessionless writes, and sessions the snapshot does not show that
    /// far, wait for their entries or the timeout as before.)
    fn settle_writes_covered_by(&mut self, s: &Snapshot) {
        if self
            .awaiting
            .keys()
            .all(|&(client, _)| client == keel_core::SESSIONLESS)
        {
            return;
        }
        // Unreadable sessions fail the restore that follows, loudly.
        let Ok(sessions) = keel_core::snapshot_sessions(&s.data) else {
            return;
        };
        let clients: std::collections::HashSet<u64> =
            self.awaiting.keys().map(|&(client, _)| client).collect();
        for o in sessions.into_iter().filter(|o| clients.contains(&o.client)) {
            let covered: Vec<(u64, u64)> = self
                .awaiting
                .keys()
                .filter(|&&(client, seq)| client == o.client && seq <= o.last_seq)
                .copied()
                .collect();
            for (client, seq) in covered {
                let Some(w) = self.awaiting.remove(&(client, seq)) else {
                    continue;
                };
                let result = if seq == o.last_seq {
                    ClientResult::Ok(o.last_reply.clone())
                } else {
                    stale_request(client, seq)
                };
                self.metrics
                    .commit_latency
                    .observe(w.since.elapsed().as_secs_f64());
                respond(&w.sink, w.id, result);
            }
        }
    }

    /// Answers writes that waited `write_timeout_ms` for their entries: a write
    /// a follower forwarded can be dropped on the way, or by a node that
    /// holds it (a leader in the middle of a leadership transfer) when that
    /// node stands for election, and one whose entry a snapshot
    /// install covered is never applied here (unless in a session the
    /// snapshot shows: `settle_writes_covered_by`). Its outcome is unknown.
    fn expire_awaiting(&mut self) {
        let now = Instant::now();
        if self.awaiting.is_empty() || now < self.next_expiry {
            return;
        }
        let limit = Duration::from_millis(self.cfg.write_timeout_ms);
        self.next_expiry = now + limit / 4;
        let expired: Vec<(u64, u64)> = self
            .awaiting
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) >= limit)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(w) = self.awaiting.remove(&key) {
                respond(
                    &w.sink,
                    w.id,
                    ClientResult::Error(format!(
                        "{} within {limit:?}: it may or may not have been applied",
                        keel_net::codec::OUTCOME_UNKNOWN
                    )),
                );
            }
        }
    }

    /// Sessionless writes whose fate this node cannot read from its log
    /// (`AwaitingWrite::unplaced`: forwarded, held, or appended here by a
    /// leader deposed before they committed), of an earlier term than that
    /// of the leader this node has known for `unplaced_grace`: their
    /// leader lost leadership (crashed, most often) before they were known
    /// to commit. Once an entry of the
    /// new term has committed here, what that leader appended and the new
    /// one holds has committed too (and gone to the service with its
    /// write); what it did not never will. A write still held by a
    /// former leader would have been passed on (it passes on what it holds
    /// as soon as it hears from the new leader), and one in this node's
    /// log, not yet committed, waits on. So rather than wait out
    /// `write_timeout_ms` (30 s by default; etcd answers after 7 s), the
    /// client is told now that the outcome is unknown (as it still is: a
    /// partitioned former leader could pass one on later). So are those of
    /// a node that has known no leader for `unplaced_grace` (cut off from
    /// the majority, most often: its leader may have appended them, and
    /// it cannot learn whether). Runs every turn; looks at the writes when
    /// the leader it knows changes term (or is lost), and at its due time.
    fn settle_unplaced(&mut self) {
        let term = self.node.term();
        // The term of the leader known, 0 for none.
        let known = self.node.leader().map_or(0, |_| term);
        if known != self.unplaced_term {
            // A leader of a later term (a new one, or the same node
            // elected again), or none: from now on the writes it strands
            // have `unplaced_grace` to show up.
            self.unplaced_term = known;
            self.unplaced_due = self
                .awaiting
                .iter()
                .any(|(k, w)| stranded(k, w, known))
                .then(|| Instant::now() + self.unplaced_grace(known));
        }
        let Some(due) = self.unplaced_due else {
            return;
        };
        let now = Instant::now();
        if now < due {
            return;
        }
        // Looked at again shortly while the term's first entry has not
        // committed here (what a former leader appended may still commit),
        // or while some of them are in this node's log, not yet committed.
        self.unplaced_due = Some(now + self.unplaced_grace(known) / 4);
        let (why, in_log) = if known == 0 {
            (
                "this node lost its leader (or its leadership) before the write was known to \
                 commit, and has known none since",
                std::collections::HashSet::new(),
            )
        } else {
            if self
                .node
                .log()
                .term_at(self.node.commit_position())
                .is_none_or(|t| t < term)
            {
                return;
            }
            let log = self.node.log();
            let in_log: std::collections::HashSet<(u64, u64)> = log
                .entries_between(self.node.commit_position(), log.last_pos())
                .into_iter()
                .filter_map(|e| match e.kind {
                    keel_core::EntryKind::Command { client, seq } => Some((client, seq)),
                    _ => None,
                })
                .filter(|k| self.awaiting.get(k).is_some_and(|w| stranded(k, w, known)))
                .collect();
            (
                "the leader that had it lost leadership before the write was known to commit, \
                 and the next leader has not applied it",
                in_log,
            )
        };
        let mut waiting = false;
        self.awaiting.retain(|k, w| {
            if !stranded(k, w, known) {
                return true;
            }
            if in_log.contains(k) {
                waiting = true;
                return true;
            }
            respond(
                &w.sink,
                w.id,
                ClientResult::Error(format!(
                    "{}: {why}; it may or may not be applied",
                    keel_net::codec::OUTCOME_UNKNOWN
                )),
            );
            false
        });
        if !waiting {
            self.unplaced_due = None;
        }
    }

    /// How long a write `settle_unplaced` looks at may take to show up
    /// once a leader of a later term is known (`known`): an election's
    /// worth, well above the few round trips a pass-on takes; or, known
    /// 0, once none is: two elections' worth, so that a node that is only
    /// waiting for the next leader (not cut off) learns the writes' fate
    /// from it.
    fn unplaced_grace(&self, known: u64) -> Duration {
        let grace = Duration::from_millis(self.cfg.election_timeout_max_ms);
        if known == 0 {
            2 * grace
        } else {
            grace
        }
    }

    /// Writes (or, in `sync` mode, hands to the storage thread) the step's
    /// appends and truncations. A leader first writes its peer messages, so
    /// its followers get new entries without waiting for the leader's own
    /// write: safe because the core counts nothing as durable before
    /// `Durable`. (A follower's messages then are only its early answer to
    /// the append, which goes out with the acknowledgement after the write.)
    fn write_log(&mut self) -> Result<(), String> {
        if self.log_writes.is_empty() {
            return Ok(());
        }
        if self.node.role() == Role::Leader {
            // A new leader's first appends go out here, before the turn's
            // status would be: it is published first, so that a node told
            // of the new leader (an old leader answering a MoveLeader) and
            // asked at once finds this one leading.
            if self.published_leading != Some(self.node.term()) {
                self.publish_status();
            }
            self.peers.flush();
        }
        for a in std::mem::take(&mut self.log_writes) {
            match a {
                Action::Append(entries) => {
                    // `replicated` mode writes here and returns the durable end.
                    if let Some(end) = self.storage.append(entries).map_err(|e| e.to_string())? {
                        self.written = Some(end);
                    }
                }
                Action::Truncate { from } => {
                    self.storage.truncate(from).map_err(|e| e.to_string())?
                }
                _ => unreachable!("only appends and truncations are deferred"),
            }
        }
        Ok(())
    }

    fn execute(&mut self, a: Action) -> Result<(), String> {
        match a {
            Action::PersistHardState(hs) => meta::save_hard_state(
                &self.cfg.data_dir,
                &HardStateFile {
                    hard_state: hs,
                    membership: self.bootstrap.clone(),
                },
            )
            .map_err(|e| format!("persisting hard state: {e}"))?,
            Action::Append(_) | Action::Truncate { .. } => self.log_writes.push(a),
            Action::SaveSnapshot(meta) => match self.captured.take() {
                Some((position, task)) if position == meta.position => {
                    let _ = self.snapshots.send(SnapshotJob::Write { meta, task });
                }
                _ => {
                    return Err(format!(
                        "the core asked to save a snapshot at {} that was not captured",
                        meta.position
                    ))
                }
            },
            Action::Send(m) => self.outbox.send(m, &*self.peers),
            // Chunks of the published snapshot file, and entries whose data
            // the core dropped from memory: read by the reader thread, off
            // this one; the peer's later messages wait behind them.
            Action::SendSnapshotChunk {
                message,
                position,
                offset,
                len,
            } => self.read(reader::ReadJob::SnapshotChunk {
                message,
                position,
                offset,
                len,
            })?,
            Action::SendLogRange {
                message,
                from,
                upto,
            } => self.read(reader::ReadJob::LogRange {
                message,
                from,
                upto,
            })?,
            Action::Apply(entries) => {
                let mut writes = Vec::new();
                if !self.awaiting.is_empty() {
                    for e in &entries {
                        if let keel_core::EntryKind::Command { client, seq } = e.kind {
                            if let Some(w) = self.awaiting.remove(&(client, seq)) {
                                writes.push(((client, seq), w));
                            }
                        }
                    }
                }
                // A follower's applies wait for its next wake unless a
                // client of its own waits on them: a write it took, or a
                // read handed over before them whose index they reach
                // towards (a read queued after them wakes the thread with
                // its own input).
                let interval = self.cfg.follower_apply_interval_ms;
                let read_waits = entries
                    .first()
                    .is_some_and(|e| e.position < self.reads_wait_upto);
                let lazy = interval > 0
                    && writes.is_empty()
                    && !read_waits
                    && self.node.role() != Role::Leader;
                if !self.deposed_positions.is_empty() {
                    if let Some(last) = entries.last() {
                        self.answer_superseded(last.end());
                    }
                }
                let input = ServiceInput::Apply(entries, writes);
                if lazy {
                    self.service
                        .send_lazily(input, Duration::from_millis(interval))?;
                } else {
                    self.service.send(input)?;
                }
            }
            Action::InstallSnapshot { meta: m, image } => {
                // The core checked the file (`check_snapshot_image`).
                let s = meta::decode_snapshot(std::path::Path::new("received snapshot"), &image)
                    .map_err(|e| format!("installing snapshot: {e}"))?;
                if s.meta != m {
                    return Err(format!(
                        "installing snapshot: the file is at {}, the leader said {}",
                        s.meta.position, m.position
                    ));
                }
                // After the log writes before it, in order.
                self.write_log()?;
                self.storage
                    .install_snapshot(s.clone())
                    .map_err(|e| format!("installing snapshot: {e}"))?;
                self.metrics.snapshots_installed.inc();
                info!(
                    "node {} installed a snapshot at {} (term {})",
                    self.cfg.id, s.meta.position, s.meta.term
                );
                self.settle_writes_covered_by(&s);
                // Kept writes whose positions the snapshot covers are not
                // settled by an entry applied there (none is applied):
                // `settle_unplaced` or `expire_awaiting` answers them.
                self.deposed_positions = self.deposed_positions.split_off(&s.meta.position);
                self.service.send(ServiceInput::Restore(Box::new(s)))?;
            }
            Action::ReadReady { id, index } => {
                if let Some(p) = self.pending.remove(&id) {
                    if let PendingOp::Read { data, .. } = p.op {
                        self.reads_wait_upto = self.reads_wait_upto.max(index);
                        self.service.send(ServiceInput::Read {
                            index,
                            data,
                            id: p.client_id,
                            sink: p.sink,
                        })?;
                    }
                }
            }
            Action::Rejected { id, reason } => {
                if let Some((key, client_id)) = self.held_writes.remove(&id) {
                    // Held during a transfer, and dropped: never appended
                    // anywhere, so its client may try again. (Unless
                    // answered already, at a step-down for a write in a
                    // session, and the key taken by another request.)
                    if self.awaiting.get(&key).is_some_and(|w| w.id == client_id) {
                        if let Some(w) = self.awaiting.remove(&key) {
                            respond(&w.sink, w.id, self.not_leader());
                        }
                    }
                }
                if let Some(p) = self.pending.remove(&id) {
                    if let (PendingOp::Read { data, term }, RejectReason::NotLeader { .. }) =
                        (&p.op, &reason)
                    {
                        if self.node.term() > *term {
                            self.retry_read(p.client_id, data.clone(), p.sink);
                            return Ok(());
                        }
                    }
                    let result = match reason {
                        RejectReason::NotLeader { .. } => self.not_leader(),
                        RejectReason::TransferInProgress | RejectReason::NotReady => {
                            ClientResult::Busy
                        }
                        RejectReason::MembershipChangePending => {
                            ClientResult::Error("a membership change is already in progress".into())
                        }
                        RejectReason::Invalid(m) => ClientResult::Error(m),
                        RejectReason::Removed => removed_refusal(),
                    };
                    respond(&p.sink, p.client_id, result);
                }
            }
            Action::Removed { by, position } => self.removed_by = Some((by, position)),
            Action::RoleChanged { role, term, leader } => {
                info!(
                    "node {}: {} in term {term}, leader {leader:?}",
                    self.cfg.id,
                    role_name(role)
                );
                if role == Role::Leader {
                    self.metrics.elections_won.inc();
                    let preferred = &self.node.config().preferred_leaders;
                    if !preferred.is_empty()
                        && !preferred.contains(&self.cfg.id)
                        && self.node.elected_by_transfer()
                    {
                        warn!(
                            "node {}: leads term {term} by a leadership transfer though \
                             preferred_leaders is {preferred:?}: it keeps leadership for this \
                             term (an operator's transfer, or a node whose preferred_leaders \
                             differs from this node's: give every node the same list)",
                            self.cfg.id
                        );
                    }
                }
                if leader.is_some() && leader != self.last_leader {
                    self.metrics.leaders_seen.inc();
                }
                self.last_leader = leader;
                let addr = leader.and_then(|l| self.cfg.client_addr_of(l));
                if role != Role::Leader {
                    // Answered at the end of the step, after the entries
                    // this same step applies (see `answer_deposed`).
                    self.deposed = Some(ClientResult::NotLeader {
                        leader,
                        address: addr.clone(),
                    });
                }
                // (Reads the core can no longer answer come back as Rejected.)
                self.service.send(ServiceInput::Role(role, addr, leader))?;
            }
        }
        Ok(())
    }

    /// Publishes the status (shared with handles, HTTP and metrics) when
    /// role, term, leader or membership changed, and otherwise at most
    /// every `STATUS_EVERY`: under load the loop turns thousands of times a
    /// second and a full copy each time is wasted work.
    fn maybe_publish_status(&mut self) {
        let n = &self.node;
        let due = self
            .published_at
            .is_none_or(|t| t.elapsed() >= STATUS_EVERY);
        let changed = self.status.lock().is_ok_and(|st| {
            let m = n.membership();
            st.role != role_name(n.role())
                || st.term != n.term()
                || st.leader != n.leader()
                || !st.voters.iter().eq(m.voters.iter())
                || !st.learners.iter().eq(m.learners.iter())
        });
        if due || changed {
            self.publish_status();
        }
    }

    /// Hands `job` to the reader thread, holding its message's place among
    /// its peer's messages.
    fn read(&mut self, job: reader::ReadJob) -> Result<(), String> {
        let seq = self.outbox.reserve(job.to());
        self.reader
            .send((seq, job))
            .map_err(|_| "the reader thread stopped".to_string())
    }

    fn publish_status(&mut self) {
        self.published_at = Some(Instant::now());
        let n = &self.node;
        self.published_leading = (n.role() == Role::Leader).then(|| n.term());
        self.term.store(n.term(), Ordering::Relaxed);
        let m = n.membership();
        let s = NodeStatus {
            id: self.cfg.id,
            role: role_name(n.role()).to_string(),
            term: n.term(),
            leader: n.leader(),
            append: n.append_position(),
            durable: n.durable_position(),
            commit: n.commit_position(),
            applied: n.applied_position(),
            voters: m.voters.iter().copied().collect(),
            learners: m.learners.iter().copied().collect(),
            followers: n.follower_progress(),
        };
        self.metrics.observe(&s);
        let log = n.log();
        self.metrics
            .log_retained_bytes
            .set(i64::try_from(log.held_bytes()).unwrap_or(i64::MAX));
        self.metrics
            .log_retained_entries
            .set(i64::try_from(log.len()).unwrap_or(i64::MAX));
        let (stats, seen) = (n.stats(), self.stats_seen);
        self.metrics.elections_started.inc_by(
            stats
                .elections_started
                .saturating_sub(seen.elections_started),
        );
        self.metrics
            .lease_reads
            .inc_by(stats.lease_reads.saturating_sub(seen.lease_reads));
        self.metrics.preference_transfers.inc_by(
            stats
                .preference_transfers
                .saturating_sub(seen.preference_transfers),
        );
        self.metrics
            .forwards_dropped
            .inc_by(stats.forwards_dropped.saturating_sub(seen.forwards_dropped));
        self.metrics
            .writes_held
            .inc_by(stats.commands_held.saturating_sub(seen.commands_held));
        self.stats_seen = stats;
        if let Ok(mut st) = self.status.lock() {
            *st = s;
        }
        if let Ok(mut shared) = self.membership.lock() {
            if **shared != *m {
                *shared = Arc::new(m.clone());
            }
        }
    }
}

/// The answer to a request older than its session's last one.
fn stale_request(client: u64, seq: u64) -> ClientResult {
    ClientResult::Error(format!(
        "request {seq} of session {client} is older than the session's last request"
    ))
}

fn respond(sink: &ResponseSink, id: u64, result: ClientResult) {
    let _ = sink.send(ClientResponse { id, result });
}

struct PendingTransfer {
    target: NodeId,
    client_id: u64,
    sink: ResponseSink,
    until: Instant,
    window: Duration,
}

struct AwaitingWrite {
    id: u64,
    sink: ResponseSink,
    since: Instant,
    /// Whether a leader of this term appended it is not known here: the
    /// core forwarded it (this node followed) or held it (this node was
    /// transferring leadership, and passes it on if the transfer
    /// succeeds), or it was appended here while this node led this term
    /// and the node was deposed before it committed. Only its entry says
    /// whether it is applied (or, failing that, `write_timeout_ms`, or
    /// `settle_unplaced` once a later term's leader has been known for a
    /// while, or no leader has).
    unplaced: Option<u64>,
}

/// The writes an apply batch carries, matched to the batch's replies. Both
/// are in log order (a write goes with its entry, and the service replies
/// to each command entry in turn), so the next reply normally belongs to
/// the next write: no map is needed. The first reply that does not (an
/// entry of another node's client, or a write whose entry was skipped as
/// already applied) moves the remaining writes into the worker's map,
/// which then serves as before: each write goes to the first reply with
/// its client and sequence number either way.
struct AwaitedInOrder {
    writes: std::vec::IntoIter<((u64, u64), AwaitingWrite)>,
    next: Option<((u64, u64), AwaitingWrite)>,
}

impl AwaitedInOrder {
    fn new(writes: Vec<((u64, u64), AwaitingWrite)>) -> Self {
        let mut writes = writes.into_iter();
        let next = writes.next();
        AwaitedInOrder { writes, next }
    }

    /// The write waiting for this reply, if any.
    fn take(
        &mut self,
        client: u64,
        seq: u64,
        map: &mut HashMap<(u64, u64), AwaitingWrite>,
    ) -> Option<AwaitingWrite> {
        if self.next.as_ref().is_some_and(|(k, _)| *k == (client, seq)) {
            let (k, w) = self.next.take()?;
            self.next = self.writes.next();
            if !map.is_empty() {
                // As an insert into the map would have: a write left there
                // with the same key is replaced.
                map.remove(&k);
            }
            return Some(w);
        }
        self.keep_rest(map);
        if map.is_empty() {
            None
        } else {
            map.remove(&(client, seq))
        }
    }

    /// Moves the writes not matched yet into `map`.
    fn keep_rest(&mut self, map: &mut HashMap<(u64, u64), AwaitingWrite>) {
        if let Some((k, w)) = self.next.take() {
            map.insert(k, w);
            map.extend(self.writes.by_ref());
        }
    }
}

/// A client write taken this turn, proposed to the core as `id` for the
/// session (`client`, `seq`).
struct ProposedWrite {
    id: u64,
    client: u64,
    seq: u64,
    write: AwaitingWrite,
}

/// The newest snapshot a node took or restored, for `SnapshotSink::due`.
#[derive(Clone, Copy, Debug, Default)]
struct LastSnapshot {
    position: Position,
    size: u64,
}

impl LastSnapshot {
    /// A snapshot at `position` was serialized: it is the newest unless one
    /// installed from the leader meanwhile is newer.
    fn taken(&mut self, position: Position, size: u64) {
        if position >= self.position {
            *self = LastSnapshot { position, size };
        }
    }
}

/// A sessionless write forwarded or held in a term before `known` (the
/// term of the leader the node knows; 0, none: any term), still waiting
/// for its entry (`Consensus::settle_unplaced`).
fn stranded(key: &(u64, u64), w: &AwaitingWrite, known: u64) -> bool {
    key.0 == keel_core::SESSIONLESS && w.unplaced.is_some_and(|t| known == 0 || t < known)
}

/// A mutex's value even if a thread panicked holding it (the value here is
/// plain data, consistent at every point).
fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// When and where the service thread hands off snapshots.
struct SnapshotSink {
    /// Take one after this many bytes of log were applied.
    every: u64,
    /// This node's offset of the points where it takes snapshots: nodes
    /// snapshot at different positions, so the storage work of publishing a
    /// snapshot (tens of milliseconds on a slow disk) stalls one node at a
    /// time and the others still make a quorum.
    phase: u64,
    /// And only once the log applied since the last one is at least this
    /// percentage of the last one's size (`snapshot_log_percent`).
    log_percent: u64,
    /// Applied position of the last one taken (or restored).
    last: Position,
    /// Position and size of the newest one serialized or restored: the
    /// snapshot thread sets it once it has serialized one.
    last_size: Arc<Mutex<LastSnapshot>>,
    /// A captured state is still being serialized (or the core has yet to
    /// decide on it): take no other meanwhile.
    busy: Arc<AtomicBool>,
}

impl SnapshotSink {
    /// Whether a snapshot is due at `applied`: a new `every`-byte period
    /// (shifted by this node's phase) has begun since the last one, and the
    /// log since then is at least `log_percent`% of the last one's size. A
    /// snapshot writes the whole state; without the second rule a state
    /// larger than `every` would be written out more often than the log
    /// grows by as much, and more often the larger it gets.
    fn due(&self, applied: Position) -> bool {
        let period = |p: Position| p.saturating_add(self.phase) / self.every;
        let grown = applied.saturating_sub(self.last);
        let needed = lock_ignoring_poison(&self.last_size)
            .size
            .saturating_mul(self.log_percent)
            / 100;
        period(applied) > period(self.last) && grown >= needed
    }

    fn maybe_take(&mut self, host: &ServiceHost<Box<dyn Service + Send>>, tx: &InternalTx) {
        let applied = host.applied();
        if self.busy.load(Ordering::Acquire) || !self.due(applied) {
            return;
        }
        self.last = applied;
        self.busy.store(true, Ordering::Release);
        // Cheap (a consistent clone for services that provide one). The
        // core gives it its metadata, then the snapshot thread serializes
        // it into the file while this thread goes on applying.
        let task = host.prepare_snapshot();
        let _ = tx.send(Internal::SnapshotCaptured {
            position: applied,
            task,
        });
    }

    /// A snapshot was restored: the next one counts from it.
    fn restored(&mut self, s: &Snapshot) {
        self.last = s.meta.position;
        *lock_ignoring_poison(&self.last_size) = LastSnapshot {
            position: s.meta.position,
            size: s.data.len() as u64,
        };
    }
}

/// The service's side of the node: applies committed entries, answers the
/// writes waiting on them and the reads, takes snapshots. Runs on its own
/// thread (`service_loop`) or, in the shared threading mode, on the
/// consensus thread (`ServiceLink::Inline`).
struct ServiceWorker {
    host: ServiceHost<Box<dyn Service + Send>>,
    /// What has been applied, for the consensus thread (see `sync_applied`).
    applied_shared: Arc<AtomicU64>,
    tx: InternalTx,
    snapshots: SnapshotSink,
    metrics: Arc<Metrics>,
    notify: tokio::sync::broadcast::Sender<Arc<Notification>>,
    writes: HashMap<(u64, u64), AwaitingWrite>,
    reads: BTreeMap<Position, VecDeque<(Bytes, u64, ResponseSink)>>,
    out: ApplyOutput,
    /// Why the service can take no more input (a snapshot it could not
    /// restore: its state is unknown from then on).
    failed: Option<String>,
}

impl ServiceWorker {
    /// Handles one input. False once the service is done: stopped, or
    /// failed to restore a snapshot (the consensus thread is told).
    fn handle(&mut self, input: ServiceInput) -> bool {
        let started = Instant::now();
        // What the step is, for the slow-step warning (no allocation here).
        let what: Result<usize, &str> = match &input {
            ServiceInput::Apply(e, _) => Ok(e.len()),
            ServiceInput::Read { .. } => Err("a linearizable read"),
            ServiceInput::StaleRead { .. } => Err("a serializable read"),
            ServiceInput::Restore(_) => Err("restoring a snapshot"),
            ServiceInput::Role(..) => Err("a role change"),
            ServiceInput::Backup(_) => Err("capturing a backup"),
            ServiceInput::Stop => Err("stopping"),
        };
        let go_on = self.step(input);
        let took = started.elapsed();
        if took >= SLOW_TURN {
            match what {
                Ok(n) => warn!("slow service step: {took:?} (applying {n} entries)"),
                Err(kind) => warn!("slow service step: {took:?} ({kind})"),
            }
        }
        go_on
    }

    fn step(&mut self, input: ServiceInput) -> bool {
        let host = &mut self.host;
        match input {
            ServiceInput::Apply(entries, awaited) => {
                self.out.clear();
                let wanted = self.notify.receiver_count() > 0;
                host.service_mut().notifications_wanted(wanted);
                host.apply(&entries, &mut self.out);
                let now = Instant::now();
                let mut awaited = AwaitedInOrder::new(awaited);
                for (client, seq, reply) in self.out.replies.drain(..) {
                    if let Some(w) = awaited.take(client, seq, &mut self.writes) {
                        let result = match reply {
                            Reply::Applied(b) | Reply::Duplicate(b) => ClientResult::Ok(b),
                            Reply::Stale => stale_request(client, seq),
                        };
                        self.metrics
                            .commit_latency
                            .observe(now.saturating_duration_since(w.since).as_secs_f64());
                        respond(&w.sink, w.id, result);
                    }
                }
                awaited.keep_rest(&mut self.writes);
                let applied = host.applied();
                // Without subscribers nothing is built or encoded. A
                // subscriber that comes later reads the state first (it
                // includes what was applied here), so it misses nothing.
                if !wanted {
                    host.service_mut().discard_notifications();
                } else {
                    let items = host.service_mut().take_notifications();
                    if !items.is_empty() {
                        // Subscribers may leave meanwhile: send fails only then.
                        let _ = self.notify.send(Arc::new(Notification {
                            applied,
                            items,
                            reset: false,
                        }));
                    }
                }
                // The position goes through an atomic the consensus thread
                // reads on its next turn (it needs it only for snapshots
                // and status): no wake-up per applied batch. Timer changes
                // must reach the core, in order: those go as an event.
                self.applied_shared.store(applied, Ordering::Release);
                if !self.out.timers.is_empty() {
                    let _ = self.tx.send(Internal::Applied {
                        position: applied,
                        timers: std::mem::take(&mut self.out.timers),
                    });
                }
                serve_reads(host, &mut self.reads);
                // After the store above: the core must know the snapshot's
                // position is applied when the snapshot reaches it.
                self.snapshots.maybe_take(host, &self.tx);
            }
            ServiceInput::Read {
                index,
                data,
                id,
                sink,
            } => {
                self.reads
                    .entry(index)
                    .or_default()
                    .push_back((data, id, sink));
                serve_reads(host, &mut self.reads);
            }
            ServiceInput::StaleRead {
                data,
                id,
                sink,
                commit,
            } => {
                let applied = host.applied();
                respond(
                    &sink,
                    id,
                    ClientResult::StaleOk {
                        data: host.query(&data),
                        applied,
                        commit: commit.max(applied),
                    },
                );
            }
            ServiceInput::Restore(s) => match host.restore(&s) {
                Ok(timers) => {
                    if self.notify.receiver_count() > 0 {
                        let _ = self.notify.send(Arc::new(Notification {
                            applied: s.meta.position,
                            items: Vec::new(),
                            reset: true,
                        }));
                    }
                    self.snapshots.restored(&s);
                    self.applied_shared
                        .fetch_max(s.meta.position, Ordering::AcqRel);
                    let _ = self.tx.send(Internal::Applied {
                        position: s.meta.position,
                        timers,
                    });
                    serve_reads(host, &mut self.reads);
                }
                Err(e) => {
                    let reason = format!("restoring snapshot: {e}");
                    let _ = self.tx.send(Internal::Fatal(reason.clone()));
                    self.failed = Some(reason);
                    return false;
                }
            },
            ServiceInput::Role(role, address, leader) => {
                host.service_mut().on_role_change(role);
                let not_leader = ClientResult::NotLeader { leader, address };
                if role != Role::Leader {
                    // Their entries may never commit here: let clients retry
                    // at the new leader with the same sequence number.
                    for (_, w) in self.writes.drain() {
                        respond(&w.sink, w.id, not_leader.clone());
                    }
                }
            }
            ServiceInput::Backup(reply) => {
                let _ = self.tx.send(Internal::BackupCaptured {
                    position: host.applied(),
                    task: host.prepare_snapshot(),
                    reply,
                });
            }
            ServiceInput::Stop => return false,
        }
        true
    }
}

/// Seeds node `cfg`'s new data directory from a backup file
/// (`etcdctl snapshot save` against a Keel member, or `NodeHandle::backup`'s
/// file): the node starts with the backup's state as a snapshot, its log
/// empty after it, and the members of `cfg` (not the backed-up cluster's)
/// as the cluster. `service` checks that the backup is a state it can
/// restore. Every initial member of the new cluster must be seeded from the
/// same backup (a member that started empty could be elected with an empty
/// log). A backup of the cluster `cfg` names (same `cluster_id`) is refused
/// unless `same_cluster_id`: a member restored in place of a running one
/// would have forgotten its votes and what it acknowledged, and could
/// break the running cluster's safety. The directory appears whole or not
/// at all. Returns the backup's metadata.
pub fn restore_backup(
    cfg: &NodeConfig,
    service: Box<dyn Service + Send>,
    backup: &std::path::Path,
    same_cluster_id: bool,
) -> Result<SnapshotMeta, NodeError> {
    let fail = NodeError::Restore;
    cfg.validate().map_err(|e| fail(e.to_string()))?;
    if cfg.join {
        return Err(fail(
            "restore seeds the initial members of a new cluster; a node that joins \
             later (join = true) gets the state from the leader"
                .into(),
        ));
    }
    let dir = &cfg.data_dir;
    let empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(fail(format!("reading {}: {e}", dir.display()))),
    };
    if !empty {
        return Err(fail(format!(
            "data directory {} is not empty: restore only seeds a new node (move it aside first)",
            dir.display()
        )));
    }
    let bytes = std::fs::read(backup)
        .map_err(|e| fail(format!("reading backup {}: {e}", backup.display())))?;
    // (Its error says the file is not a Keel backup, and what to do.)
    let unwrapped =
        meta::unwrap_backup(backup, &Bytes::from(bytes)).map_err(|e| fail(e.to_string()))?;
    if unwrapped.cluster_id == Some(cfg.cluster_id) && !same_cluster_id {
        return Err(fail(format!(
            "the backup comes from cluster {:#x}, the cluster_id this node's configuration \
             names: give the restored cluster a cluster_id of its own, so that it and the old \
             cluster cannot talk to each other (a member restored in place of a running one \
             would have forgotten its votes), or, once every member of the old cluster is gone \
             for good, pass --same-cluster-id",
            cfg.cluster_id
        )));
    }
    let mut snapshot = unwrapped.snapshot;
    ServiceHost::new(service, 3600 * 1_000_000_000)
        .restore(&snapshot)
        .map_err(|e| {
            fail(format!(
                "the backup is not a state the {:?} service can restore: {e}",
                cfg.service
            ))
        })?;
    let membership = cfg.initial_membership();
    snapshot.meta.membership = membership.clone();
    let hard = HardStateFile {
        hard_state: keel_core::HardState {
            term: snapshot.meta.term,
            voted_for: None,
            hold: 0,
        },
        membership,
    };
    // Written beside the data directory, then renamed into place.
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .map_or_else(|| "data".into(), |n| n.to_string_lossy().into_owned());
    let prefix = format!(".{name}.restoring-");
    remove_stale_restores(&parent, &prefix);
    let staging = parent.join(format!("{prefix}{}", std::process::id()));
    let write = || -> Result<(), NodeError> {
        std::fs::create_dir_all(&staging)
            .map_err(|e| fail(format!("creating {}: {e}", staging.display())))?;
        // Held until the directory is in place (its `LOCK` file moves with
        // it), as by anything that writes a data directory.
        let _lock = DirLock::acquire(&staging)?;
        // The node the restored directory belongs to, as `start` checks.
        meta::save_identity(&staging, identity(cfg))?;
        meta::save_hard_state(&staging, &hard)?;
        meta::save_snapshot(&staging, &snapshot)?;
        meta::sync_dir(&staging)?;
        std::fs::rename(&staging, dir).map_err(|e| {
            fail(format!(
                "moving {} to {}: {e}",
                staging.display(),
                dir.display()
            ))
        })?;
        meta::sync_dir(&parent)?;
        Ok(())
    };
    let written = write();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written.map(|()| snapshot.meta)
}

/// Removes the staging directories (`<prefix><pid>` in `parent`) that
/// restores killed part-way left, each a copy of a whole snapshot; one whose
/// lock a running restore holds is left alone. (A failed restore removes
/// its own.)
fn remove_stale_restores(parent: &std::path::Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        // `<prefix><pid>` exactly: nothing else is a restore's.
        let name = entry.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(prefix)
            .is_none_or(|pid| pid.parse::<u32>().is_err())
        {
            continue;
        }
        let path = entry.path();
        if let Ok(_lock) = DirLock::acquire(&path) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => info!(
                    "removed {}, left by an earlier restore that did not finish",
                    path.display()
                ),
                Err(e) => warn!("removing {}: {e}", path.display()),
            }
        }
    }
}

/// Serializes a capture into a backup file of its own directory under
/// `BACKUP_DIR` (on the snapshot thread); the directory is removed with the
/// `Backup`, or at once if writing fails.
fn write_backup(
    data_dir: &std::path::Path,
    meta: SnapshotMeta,
    task: SnapshotTask,
) -> Result<Backup, String> {
    // Unique across runs too: a late `Backup` of an earlier run in this
    // process must not remove a new one's file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = data_dir
        .join(BACKUP_DIR)
        .join(format!("{}-{n}", std::process::id()));
    let written = (|| {
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let stage = std::panic::AssertUnwindSafe(|| meta::stage_snapshot_with(&dir, &meta, task));
        let (staged, _) = match std::panic::catch_unwind(stage) {
            Ok(r) => r.map_err(|e| format!("writing a backup: {e}"))?,
            Err(p) => {
                return Err(format!(
                    "serializing a backup panicked: {}",
                    panic_message(p.as_ref())
                ))
            }
        };
        let path = dir.join("backup.keel");
        std::fs::rename(&staged, &path).map_err(|e| format!("naming {}: {e}", path.display()))?;
        let size = std::fs::metadata(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?
            .len();
        Ok((path, size))
    })();
    match written {
        Ok((path, size)) => Ok(Backup { meta, path, size }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// The service thread (`ServiceThreadConfig::Dedicated`).
fn service_loop(mut worker: ServiceWorker, rx: HandoffRx<ServiceInput>) {
    // Responses go out in one write per connection per step, or per few
    // steps while more input is queued.
    tcp::defer_flushes();
    let mut unflushed = 0;
    while let Some(input) = rx.recv() {
        if !worker.handle(input) {
            break;
        }
        unflushed += 1;
        if unflushed >= 16 || rx.is_empty() {
            tcp::flush_deferred();
            unflushed = 0;
        }
    }
    tcp::flush_deferred();
}

/// How the consensus thread reaches the service.
enum ServiceLink {
    /// The service thread, through a channel.
    Thread(HandoffTx<ServiceInput>, LazyWake),
    /// The shared threading mode: the service runs in line, on the
    /// consensus thread (whose turn flushes the responses it produces).
    Inline(Box<ServiceWorker>),
}

impl ServiceLink {
    /// Hands `input` to the service. An error means the service failed (in
    /// line, where the consensus thread must stop at once rather than go
    /// on applying to a state it could not restore; the service thread
    /// stops by itself and reports the failure).
    fn send(&mut self, input: ServiceInput) -> Result<(), String> {
        match self {
            // Fails only once the service thread is gone (node stopping).
            ServiceLink::Thread(tx, lazy) => {
                let _ = tx.send(input);
                lazy.owed = None;
                lazy.woken = Some(Instant::now());
                Ok(())
            }
            ServiceLink::Inline(worker) => match &worker.failed {
                Some(reason) => Err(reason.clone()),
                None => {
                    let stop = matches!(input, ServiceInput::Stop);
                    if worker.handle(input) || stop {
                        return Ok(());
                    }
                    Err(worker
                        .failed
                        .clone()
                        .unwrap_or_else(|| "the service stopped".into()))
                }
            },
        }
    }

    /// Hands `input` to the service, waking its thread at most once per
    /// `every` for such inputs. One queued within `every` of the last wake
    /// waits for the next wake: a `send`, the end of the first consensus
    /// turn `every` after the last wake (`wake_if_due`), or at the latest
    /// `LAZY_WAKE_LIMIT` intervals after it (the consensus loop's timer).
    /// Under load turns come far more often than `every`, so the batch goes
    /// with one of them; a turn of its own only for a stream that stops.
    fn send_lazily(&mut self, input: ServiceInput, every: Duration) -> Result<(), String> {
        let ServiceLink::Thread(tx, lazy) = self else {
            return self.send(input);
        };
        if lazy.owed.is_some() {
            let _ = tx.send_quiet(input);
            return Ok(());
        }
        let now = Instant::now();
        match lazy.woken {
            Some(at) if now < at + every => {
                let _ = tx.send_quiet(input);
                lazy.owed = Some(LazyDue {
                    soon: at + every,
                    latest: at + every * LAZY_WAKE_LIMIT,
                });
            }
            _ => {
                let _ = tx.send(input);
                lazy.woken = Some(now);
            }
        }
        Ok(())
    }

    /// When inputs queued by `send_lazily` must wake the service at the
    /// latest (the consensus loop sleeps no longer).
    fn wake_due(&self) -> Option<Instant> {
        match self {
            ServiceLink::Thread(_, lazy) => lazy.owed.map(|d| d.latest),
            ServiceLink::Inline(_) => None,
        }
    }

    /// Wakes the service thread for inputs queued by `send_lazily`, if
    /// they have waited an interval (called at the end of every turn).
    fn wake_if_due(&mut self, now: Instant) {
        if let ServiceLink::Thread(tx, lazy) = self {
            if lazy.owed.is_some_and(|d| now >= d.soon) {
                tx.wake();
                lazy.owed = None;
                lazy.woken = Some(now);
            }
        }
    }

    /// Inputs waiting for the service.
    fn queued(&self) -> usize {
        match self {
            ServiceLink::Thread(tx, _) => tx.len(),
            ServiceLink::Inline(_) => 0,
        }
    }
}

/// When the service thread was last woken for lazily sent inputs, and
/// when the inputs queued since are due to wake it.
#[derive(Default)]
struct LazyWake {
    woken: Option<Instant>,
    owed: Option<LazyDue>,
}

/// Inputs queued by `ServiceLink::send_lazily` wake the service with the
/// first consensus turn from `soon` on, and by `latest` in any case.
#[derive(Clone, Copy)]
struct LazyDue {
    soon: Instant,
    latest: Instant,
}

/// How many apply intervals lazily sent inputs wait at most for a consensus
/// turn to wake the service with (past that the loop wakes for them alone).
/// A timer of its own at one interval cost more wake-ups than it saved
/// whenever commits came in a few pieces per burst with bursts further
/// apart than the interval (`keel bench echo` at 10k msg/s: ~8% more CPU).
const LAZY_WAKE_LIMIT: u32 = 5;

/// What a caught panic said.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn serve_reads(
    host: &ServiceHost<Box<dyn Service + Send>>,
    reads: &mut BTreeMap<Position, VecDeque<(Bytes, u64, ResponseSink)>>,
) {
    let applied = host.applied();
    while let Some(entry) = reads.first_entry() {
        if *entry.key() > applied {
            break;
        }
        for (data, id, sink) in entry.remove() {
            respond(&sink, id, ClientResult::Ok(host.query(&data)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that cannot start: its restore of the empty state fails,
    /// which fails a start after the data directory was opened and the
    /// first hard state written.
    struct FailsToRestore;

    impl Service for FailsToRestore {
        fn restore(&mut self, _: Option<&[u8]>) -> Result<(), String> {
            Err("this service never starts".into())
        }
        fn snapshot(&self, _: &mut Vec<u8>) {}
        fn on_message(
            &mut self,
            _: &mut keel_core::Context<'_>,
            _: keel_core::ClientId,
            _: &[u8],
        ) -> Bytes {
            Bytes::new()
        }
        fn query(&self, _: &[u8]) -> Bytes {
            Bytes::new()
        }
    }

    fn one_node(dir: &Path) -> NodeConfig {
        let text = "id = 1\ndata_dir = \"d\"\npeer_addr = \"memory:0\"\n\
                    client_addr = \"127.0.0.1:0\"\n\
                    [[peers]]\nid = 2\npeer_addr = \"memory:2\"\nclient_addr = \"127.0.0.1:2\"\n";
        let mut cfg: NodeConfig = toml::from_str(text).expect("config");
        cfg.data_dir = dir.to_path_buf();
        cfg
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A first start that fails once it has written the data directory
    /// (its identity, the initial membership) removes what it wrote, and
    /// the directories it created, and nothing that was there before; a
    /// later start that fails removes nothing (but the running mark it
    /// set, `meta::RESYNC_FILE`).
    #[test]
    fn a_failed_first_start_leaves_the_data_directory_as_it_was() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let start = |cfg: &NodeConfig, service: Box<dyn Service + Send>| {
            start_with(cfg.clone(), service, Transport::Memory(MemNetwork::new()))
        };
        let failed = |cfg: &NodeConfig| {
            let e = start(cfg, Box::new(FailsToRestore))
                .err()
                .expect("a service that cannot start started");
            assert!(e.to_string().contains("this service never starts"), "{e}");
        };

        // A new directory, under new ones: all gone again.
        let nested = one_node(&tmp.path().join("a").join("b").join("data"));
        failed(&nested);
        assert!(!tmp.path().join("a").exists(), "{:?}", entries(tmp.path()));

        // An existing directory, with a file of the operator's and a lock
        // file (from an earlier failed start, say): only those stay.
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("notes.txt"), "mine").expect("write");
        std::fs::write(dir.join(keel_log::lock::LOCK_FILE), "").expect("write");
        let cfg = one_node(&dir);
        failed(&cfg);
        assert_eq!(entries(&dir), ["LOCK", "notes.txt"]);
        std::fs::remove_file(dir.join(keel_log::lock::LOCK_FILE)).expect("rm");
        failed(&cfg);
        assert_eq!(entries(&dir), ["notes.txt"], "the lock file it made stayed");

        // It starts there afterwards, then a failed restart removes nothing.
        let node = start(&cfg, Box::<keel_kv::KvService>::default()).expect("start");
        node.shutdown();
        node.wait().expect("clean stop");
        drop(node);
        let written = entries(&dir);
        assert!(
            written.iter().any(|n| n == meta::HARD_STATE_FILE),
            "{written:?}"
        );
        failed(&cfg);
        assert_eq!(entries(&dir), written);
        // Nor the running mark an unclean stop left (it set none of its own).
        meta::mark_resync(&dir).expect("mark");
        failed(&cfg);
        assert!(dir.join(meta::RESYNC_FILE).exists(), "{:?}", entries(&dir));
    }

    /// A restart whose peers give no address for members the directory
    /// records names both; one with addresses for all of them, and more,
    /// does not.
    #[test]
    fn members_without_an_address_are_named() {
        let mut cfg = one_node(Path::new("/data/n1"));
        let recorded = keel_core::Membership::new([1, 2, 3]);
        let w = unreachable_members(&cfg, &recorded).expect("node 3 has no address");
        assert!(
            w.contains("data directory /data/n1 records the cluster's members as voters {1, 2, 3}"),
            "{w}"
        );
        assert!(
            w.contains("the configuration lists nodes {1, 2} (this node and its peers): nodes [3]"),
            "{w}"
        );
        cfg.peers.clear();
        let w = unreachable_members(&cfg, &recorded).expect("no peers");
        assert!(
            w.contains("lists nodes {1}") && w.contains("nodes [2, 3]"),
            "{w}"
        );
        let mut learner = keel_core::Membership::new([1]);
        learner.learners.insert(4);
        let w = unreachable_members(&cfg, &learner).expect("a learner without an address");
        assert!(w.contains("voters {1} and learners {4}"), "{w}");
        assert_eq!(
            unreachable_members(&cfg, &keel_core::Membership::new([1])),
            None
        );
        let cfg = one_node(Path::new("/data/n1"));
        assert_eq!(
            unreachable_members(&cfg, &keel_core::Membership::new([1])),
            None
        );
        assert_eq!(
            unreachable_members(&cfg, &keel_core::Membership::default()),
            None
        );
    }

    #[test]
    fn nodes_take_snapshots_at_different_points() {
        let every = 64 << 20;
        let phases: Vec<u64> = (1..=5).map(|id| snapshot_phase(id, every)).collect();
        for (i, a) in phases.iter().enumerate() {
            assert!(*a < every);
            for b in &phases[i + 1..] {
                // At least 5% of a period apart.
                let d = a.abs_diff(*b).min(every - a.abs_diff(*b));
                assert!(d > every / 20, "phases {phases:?} too close");
            }
        }
        assert_eq!(snapshot_phase(7, 1), 0);
    }

    /// `ServiceLink::send_lazily`: the first apply after a quiet spell
    /// wakes the service; those within an interval of the last wake are
    /// queued quietly and owed a wake, which `wake_if_due` gives from
    /// `soon` on and the loop's timer by `latest`; an eager send wakes it,
    /// settles what was owed and counts as the last wake.
    #[test]
    fn lazy_applies_wake_the_service_once_per_interval() {
        let every = Duration::from_secs(10);
        let (tx, rx) = handoff::channel::<ServiceInput>();
        let mut link = ServiceLink::Thread(tx, LazyWake::default());
        let apply = || ServiceInput::Apply(Vec::new(), Vec::new());
        let lazy = |link: &ServiceLink| match link {
            ServiceLink::Thread(_, l) => (l.woken, l.owed.map(|d| (d.soon, d.latest))),
            ServiceLink::Inline(_) => unreachable!(),
        };

        rx.mark_parked();
        link.send_lazily(apply(), every).expect("send");
        assert!(!rx.is_parked(), "the first apply woke nothing");
        let (woken, owed) = lazy(&link);
        let woken = woken.expect("a wake recorded");
        assert_eq!(owed, None);

        rx.mark_parked();
        link.send_lazily(apply(), every).expect("send");
        link.send_lazily(apply(), every).expect("send");
        assert!(rx.is_parked(), "an apply within the interval woke it");
        assert_eq!(link.queued(), 3, "nothing is dropped");
        let due = (woken + every, woken + every * LAZY_WAKE_LIMIT);
        assert_eq!(lazy(&link).1, Some(due));
        assert_eq!(link.wake_due(), Some(due.1));

        link.wake_if_due(woken + every / 2);
        assert!(rx.is_parked(), "woken before the interval was up");
        link.wake_if_due(woken + every);
        assert!(!rx.is_parked(), "not woken once the interval was up");
        assert_eq!(lazy(&link), (Some(woken + every), None));
        assert_eq!(link.wake_due(), None);

        // An eager send (a read, a write's apply) wakes it and settles
        // what was owed; the apply right after it is quiet again.
        rx.mark_parked();
        link.send_lazily(apply(), every).expect("send");
        assert!(rx.is_parked());
        link.send(apply()).expect("send");
        assert!(!rx.is_parked(), "an eager send did not wake it");
        assert_eq!(lazy(&link).1, None, "the eager send left a wake owed");
        rx.mark_parked();
        link.send_lazily(apply(), every).expect("send");
        assert!(rx.is_parked(), "an apply right after an eager send woke it");
        assert_eq!(link.queued(), 6);
    }

    #[test]
    fn the_client_queue_admits_what_fits_and_counts_requests() {
        let q = ClientQueue {
            queued: AtomicUsize::new(0),
            depth: 16,
        };
        assert_eq!(q.admit(10), 10);
        assert_eq!(q.admit(10), 6, "only the prefix that fits");
        assert_eq!(q.admit(1), 0, "full");
        q.release(6);
        assert_eq!(q.len(), 10);
        assert_eq!(q.admit(100), 6);
        q.release(16);
        assert_eq!(q.len(), 0);
        assert_eq!(q.admit(16), 16);
    }

    fn sink(every: u64, phase: u64, log_percent: u64) -> SnapshotSink {
        SnapshotSink {
            every,
            phase,
            log_percent,
            last: 0,
            last_size: Arc::default(),
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Snapshots come at this node's period boundaries, and once the state
    /// outgrows the period only after as much log as the last snapshot's
    /// size: the bytes written to snapshots stay at most the log's instead
    /// of growing with the state.
    #[test]
    fn snapshots_wait_for_as_much_log_as_the_last_one_was_large() {
        let mut s = sink(1000, 300, 100);
        // The first boundary is at 700 (700 + 300 = 1000).
        assert!(!s.due(699));
        assert!(s.due(700));
        // A small state: every boundary.
        s.last = 700;
        lock_ignoring_poison(&s.last_size).size = 200;
        assert!(!s.due(1699));
        assert!(s.due(1700));
        // A state of 2500 bytes: not before 2500 more bytes of log, though
        // two boundaries pass.
        s.last = 1700;
        lock_ignoring_poison(&s.last_size).size = 2500;
        for applied in [2700, 3700, 4199] {
            assert!(!s.due(applied), "{applied}");
        }
        assert!(s.due(4200));
        // 0% ignores the size; 200% waits twice as long.
        s.log_percent = 0;
        assert!(s.due(2700));
        s.log_percent = 200;
        assert!(!s.due(6699));
        assert!(s.due(6700));
        // A restored snapshot counts as the last one.
        s.restored(&Snapshot {
            meta: SnapshotMeta {
                position: 10_000,
                term: 3,
                timestamp: 1,
                membership: keel_core::Membership::new([1, 2, 3]),
            },
            data: Bytes::from(vec![0; 100]),
        });
        assert_eq!(s.last, 10_000);
        assert!(!s.due(10_699));
        assert!(s.due(10_700));
        // An older state whose serialization finishes after the install
        // does not count as the last snapshot.
        lock_ignoring_poison(&s.last_size).taken(6_700, 50_000);
        assert!(s.due(10_700));
        lock_ignoring_poison(&s.last_size).taken(10_700, 5_000);
        assert!(!s.due(11_700));
    }

    /// A service that refuses every snapshot.
    struct Unrestorable;

    impl Service for Unrestorable {
        fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
            match snapshot {
                None => Ok(()),
                Some(_) => Err("this service restores nothing".into()),
            }
        }
        fn snapshot(&self, _: &mut Vec<u8>) {}
        fn on_message(&mut self, _: &mut keel_core::Context<'_>, _: u64, data: &[u8]) -> Bytes {
            Bytes::copy_from_slice(data)
        }
        fn query(&self, data: &[u8]) -> Bytes {
            Bytes::copy_from_slice(data)
        }
    }

    /// In the shared threading mode a service that failed to restore a
    /// snapshot takes no more input: the consensus thread gets an error at
    /// once (and stops) instead of applying entries to an unknown state.
    #[test]
    fn an_inline_service_that_failed_to_restore_takes_nothing_more() {
        let (tx, mut internal) = tokio::sync::mpsc::unbounded_channel();
        let worker = ServiceWorker {
            host: ServiceHost::new(Box::new(Unrestorable), 1_000_000_000),
            applied_shared: Arc::new(AtomicU64::new(0)),
            tx,
            snapshots: SnapshotSink {
                every: 1 << 20,
                phase: 0,
                log_percent: 100,
                last: 0,
                last_size: Arc::default(),
                busy: Arc::new(AtomicBool::new(false)),
            },
            metrics: Arc::new(Metrics::new()),
            notify: tokio::sync::broadcast::channel(4).0,
            writes: HashMap::new(),
            reads: BTreeMap::new(),
            out: ApplyOutput::default(),
            failed: None,
        };
        let mut link = ServiceLink::Inline(Box::new(worker));
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                position: 100,
                term: 2,
                timestamp: 1,
                membership: keel_core::Membership::new([1, 2, 3]),
            },
            data: Bytes::from_static(b"not a snapshot"),
        };
        let e = link
            .send(ServiceInput::Restore(Box::new(snapshot)))
            .expect_err("a failed restore must reach the consensus thread");
        assert!(e.contains("restoring snapshot"), "{e}");
        assert!(matches!(internal.try_recv(), Ok(Internal::Fatal(_))));
        let e = link
            .send(ServiceInput::Apply(Vec::new(), Vec::new()))
            .expect_err("input after the failure");
        assert!(e.contains("restoring snapshot"), "{e}");
    }

    #[test]
    fn sessionless_sequence_numbers_differ_across_nodes() {
        assert_ne!(sessionless_seq(1, 5), sessionless_seq(2, 5));
        assert_ne!(sessionless_seq(1, 5), sessionless_seq(1, 6));
        // The counter wraps inside its bits and never reaches the node id's.
        assert_eq!(
            sessionless_seq(3, SESSIONLESS_COUNTER_MASK + 7) >> 48,
            3,
            "node id bits must survive a counter overflow"
        );
    }
}

#[cfg(test)]
mod awaited_tests {
    use super::*;
    use proptest::prelude::*;

    type Key = (u64, u64);

    fn write(id: u64) -> AwaitingWrite {
        AwaitingWrite {
            id,
            sink: ResponseSink::oneshot().0,
            since: Instant::now(),
            unplaced: None,
        }
    }

    /// Which write each reply answers and which writes stay, as
    /// (reply index, write id) and (key, write id) lists.
    type Outcome = (Vec<(usize, u64)>, Vec<(Key, u64)>);

    /// What the worker did before `AwaitedInOrder`: every write into the
    /// map, then each reply takes its key's.
    fn with_map(left: &[(Key, u64)], awaited: &[(Key, u64)], replies: &[Key]) -> Outcome {
        let mut map: HashMap<Key, AwaitingWrite> = HashMap::new();
        map.extend(left.iter().map(|&(k, id)| (k, write(id))));
        map.extend(awaited.iter().map(|&(k, id)| (k, write(id))));
        let answered = replies
            .iter()
            .enumerate()
            .filter_map(|(i, k)| map.remove(k).map(|w| (i, w.id)))
            .collect();
        let mut rest: Vec<(Key, u64)> = map.into_iter().map(|(k, w)| (k, w.id)).collect();
        rest.sort_unstable();
        (answered, rest)
    }

    fn in_order(left: &[(Key, u64)], awaited: &[(Key, u64)], replies: &[Key]) -> Outcome {
        let mut map: HashMap<Key, AwaitingWrite> = HashMap::new();
        map.extend(left.iter().map(|&(k, id)| (k, write(id))));
        let mut a = AwaitedInOrder::new(awaited.iter().map(|&(k, id)| (k, write(id))).collect());
        let answered = replies
            .iter()
            .enumerate()
            .filter_map(|(i, &(c, s))| a.take(c, s, &mut map).map(|w| (i, w.id)))
            .collect();
        a.keep_rest(&mut map);
        let mut rest: Vec<(Key, u64)> = map.into_iter().map(|(k, w)| (k, w.id)).collect();
        rest.sort_unstable();
        (answered, rest)
    }

    /// An apply batch as the consensus thread builds it: command entries
    /// (key, skipped: already applied, so no reply); a write awaited for
    /// some keys, with the first entry of its key; leftover writes from
    /// earlier batches in the worker's map.
    /// Leftover writes, awaited writes, replies.
    type Batch = (Vec<(Key, u64)>, Vec<(Key, u64)>, Vec<Key>);

    fn batch() -> impl Strategy<Value = Batch> {
        (
            proptest::collection::vec(((0u64..3, 0u64..3), any::<bool>(), any::<bool>()), 0..24),
            proptest::collection::vec((0u64..3, 0u64..3), 0..4),
        )
            .prop_map(|(entries, left)| {
                let mut awaited: Vec<(Key, u64)> = Vec::new();
                let mut replies = Vec::new();
                let mut seen = std::collections::HashSet::new();
                for (i, (k, skipped, awaits)) in entries.into_iter().enumerate() {
                    if seen.insert(k) && awaits {
                        awaited.push((k, 100 + i as u64));
                    }
                    // Skipped entries are a prefix in practice; anywhere
                    // is a harder test.
                    if !skipped || i % 5 != 0 {
                        replies.push(k);
                    }
                }
                let left = left.into_iter().zip(1u64..).collect();
                (left, awaited, replies)
            })
    }

    proptest! {
        #[test]
        fn in_order_matching_answers_as_the_map_did((left, awaited, replies) in batch()) {
            prop_assert_eq!(
                in_order(&left, &awaited, &replies),
                with_map(&left, &awaited, &replies)
            );
        }
    }

    #[test]
    fn a_leaders_own_writes_need_no_map() {
        let awaited: Vec<(Key, u64)> = (0..5).map(|i| ((0, i), i)).collect();
        let replies: Vec<Key> = (0..5).map(|i| (0, i)).collect();
        let mut map: HashMap<Key, AwaitingWrite> = HashMap::new();
        let mut a = AwaitedInOrder::new(awaited.iter().map(|&(k, id)| (k, write(id))).collect());
        for (i, &(c, s)) in replies.iter().enumerate() {
            assert_eq!(a.take(c, s, &mut map).map(|w| w.id), Some(i as u64));
            assert!(map.is_empty());
        }
    }
}

#[cfg(test)]
mod removed_tests {
    use super::*;

    struct Echo;

    impl Service for Echo {
        fn restore(&mut self, _: Option<&[u8]>) -> Result<(), String> {
            Ok(())
        }
        fn snapshot(&self, _: &mut Vec<u8>) {}
        fn on_message(
            &mut self,
            _: &mut keel_core::Context<'_>,
            _: keel_core::ClientId,
            data: &[u8],
        ) -> Bytes {
            Bytes::copy_from_slice(data)
        }
        fn query(&self, data: &[u8]) -> Bytes {
            Bytes::copy_from_slice(data)
        }
    }

    /// Node `id` of three on the in-memory network, with election
    /// timeouts of 1-2 s: far longer than a heartbeat (20 ms), so a
    /// follower cut off for a moment keeps its leader.
    fn config(id: u64, dir: &Path) -> NodeConfig {
        let mut text = format!(
            "id = {id}\ndata_dir = \"d\"\npeer_addr = \"memory:{id}\"\n\
             client_addr = \"127.0.0.1:0\"\nheartbeat_ms = 20\n\
             election_timeout_min_ms = 1000\nelection_timeout_max_ms = 2000\n"
        );
        for p in (1..=3).filter(|&p| p != id) {
            text.push_str(&format!(
                "[[peers]]\nid = {p}\npeer_addr = \"memory:{p}\"\nclient_addr = \"127.0.0.1:{p}\"\n"
            ));
        }
        let mut cfg: NodeConfig = toml::from_str(&text).expect("config");
        cfg.data_dir = dir.join(format!("n{id}"));
        cfg
    }

    fn wait_for(what: &str, ok: impl Fn() -> bool) {
        let start = Instant::now();
        while !ok() {
            assert!(start.elapsed() < Duration::from_secs(20), "{what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Three echo nodes of one cluster on an in-memory network, their data
    /// in a temporary directory; shut down when dropped.
    struct Three {
        net: MemNetwork,
        nodes: Vec<Arc<NodeHandle>>,
        tmp: tempfile::TempDir,
    }

    impl Three {
        /// Each node's configuration changed by `change` first.
        fn start(change: impl Fn(&mut NodeConfig)) -> Three {
            let tmp = tempfile::tempdir().expect("tempdir");
            let net = MemNetwork::new();
            let nodes = (1..=3)
                .map(|id| {
                    let mut cfg = config(id, tmp.path());
                    change(&mut cfg);
                    let node = start_with(cfg, Box::new(Echo), Transport::Memory(net.clone()));
                    Arc::new(node.expect("start"))
                })
                .collect();
            Three { net, nodes, tmp }
        }

        /// `start`, with leadership transfers that stay on for 4 s
        /// (`election_timeout_min_ms`) before they run out: time enough for
        /// a test's requests to reach a transferring leader on a stalled
        /// machine.
        fn start_with_long_transfers(change: impl Fn(&mut NodeConfig)) -> Three {
            Three::start(|cfg| {
                cfg.election_timeout_min_ms = 4_000;
                cfg.election_timeout_max_ms = 5_000;
                change(cfg);
            })
        }
    }

    impl Drop for Three {
        fn drop(&mut self) {
            for n in &self.nodes {
                n.shutdown();
            }
        }
    }

    /// A current-thread tokio runtime for a test's calls.
    fn test_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// `node.call(op)` on a thread of its own (a call left waiting while
    /// the test goes on); join it for the answer.
    fn spawn_call(node: &Arc<NodeHandle>, op: ClientOp) -> std::thread::JoinHandle<ClientResult> {
        let node = node.clone();
        std::thread::spawn(move || {
            let rt = test_runtime();
            rt.block_on(node.call(op))
        })
    }

    /// Waits for a leader and for a follower to know it: their ids and
    /// handles (leader, follower, leader's, follower's).
    fn leader_and_follower(
        nodes: &[Arc<NodeHandle>],
    ) -> (NodeId, NodeId, Arc<NodeHandle>, Arc<NodeHandle>) {
        wait_for("a leader", || leader_of(nodes).is_some());
        let l = leader_of(nodes).expect("a leader");
        let f = (1..=3).find(|&n| n != l).expect("a follower");
        let (lh, fh) = (nodes[l as usize - 1].clone(), nodes[f as usize - 1].clone());
        wait_for("the follower knows the leader", || {
            fh.status().leader == Some(l)
        });
        (l, f, lh, fh)
    }

    /// Waits for `write` (a call left waiting) to be answered, and checks
    /// that its outcome is unknown.
    fn answered_outcome_unknown(write: std::thread::JoinHandle<ClientResult>) {
        wait_for("the write is answered", || write.is_finished());
        let answer = write.join().expect("the write's thread");
        assert!(
            matches!(&answer, ClientResult::Error(m) if m.starts_with(keel_net::codec::OUTCOME_UNKNOWN)),
            "{answer:?}"
        );
    }

    /// Waits for a leader: its id and handle.
    fn the_leader(nodes: &[Arc<NodeHandle>]) -> (NodeId, Arc<NodeHandle>) {
        wait_for("a leader", || leader_of(nodes).is_some());
        let l = leader_of(nodes).expect("a leader");
        (l, nodes[l as usize - 1].clone())
    }

    /// Cuts leader `l` (`lh`) off from its followers' messages (they still
    /// hear it), sends it a sessionless write ("kept") and waits for it to
    /// step down (check-quorum): the write's call.
    fn write_to_a_leader_that_hears_nothing_back(
        net: &MemNetwork,
        l: NodeId,
        lh: &Arc<NodeHandle>,
    ) -> std::thread::JoinHandle<ClientResult> {
        for f in (1..=3).filter(|&n| n != l) {
            net.cut(f, l);
        }
        let write = spawn_call(lh, ClientOp::Write(Bytes::from_static(b"kept")));
        wait_for("the cut-off leader steps down", || {
            lh.status().role != "leader"
        });
        write
    }

    /// The leader of the highest term any of `nodes` reports.
    fn leader_of(nodes: &[Arc<NodeHandle>]) -> Option<NodeId> {
        nodes
            .iter()
            .map(|n| n.status())
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// A sessionless write (the etcd API's) taken by a leader that then
    /// loses its quorum is answered by its entry once the new leader
    /// commits it, not "not the leader" at the step-down: it may well
    /// commit (here it does), and its client cannot retry it safely.
    #[test]
    fn a_deposed_leaders_sessionless_write_is_answered_by_its_entry() {
        // (Election timeouts of 4-5 s: the deposed leader knows no leader
        // until the heal, a follower's election timeout or so, well within
        // the two it waits before answering "outcome unknown".)
        let three = Three::start_with_long_transfers(|_| {});
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, lh) = the_leader(nodes);
        // Its write reaches both logs and commits nowhere until it has
        // stepped down and a follower has been elected.
        let write = write_to_a_leader_that_hears_nothing_back(net, l, &lh);
        wait_for("a new leader", || leader_of(nodes).is_some_and(|n| n != l));
        net.heal();
        let answer = write.join().expect("the write's thread");
        assert_eq!(answer, ClientResult::Ok(Bytes::from_static(b"kept")));
    }

    /// A deposed leader cut off from the rest answers its sessionless write
    /// "outcome unknown" once it has known no leader for two election
    /// timeouts (here the write did commit, by the new leader, which the
    /// cut-off node cannot learn), not after `write_timeout_ms` (here ten
    /// minutes).
    #[test]
    fn a_cut_off_deposed_leaders_write_is_answered_outcome_unknown() {
        let three = Three::start(|cfg| cfg.write_timeout_ms = 600_000);
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, lh) = the_leader(nodes);
        let write = write_to_a_leader_that_hears_nothing_back(net, l, &lh);
        answered_outcome_unknown(write);
        net.heal();
    }

    /// A deposed leader that told its kept writes' clients the outcome is
    /// unknown forgets them: when it leads again and is deposed again, its
    /// new write is kept (it may commit from another node's log), not
    /// answered "not the leader" because stale records of the old ones
    /// made it skip looking for the new one's entry.
    #[test]
    fn a_leader_deposed_twice_keeps_its_second_terms_write() {
        let three = Three::start(|cfg| cfg.write_timeout_ms = 600_000);
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, lh) = the_leader(nodes);
        // Three writes that never leave the leader, answered "unknown" once
        // it has been deposed and known no leader for two election
        // timeouts. (Large: the positions of the last two stay beyond
        // what the next terms apply before the second step-down.)
        net.isolate(l);
        let first: Vec<_> = (0..3u8)
            .map(|i| spawn_call(&lh, ClientOp::Write(Bytes::from(vec![i; 4096]))))
            .collect();
        for w in first {
            answered_outcome_unknown(w);
        }
        net.heal();
        wait_for("another leader", || {
            leader_of(nodes).is_some_and(|n| n != l)
        });
        let other = nodes[leader_of(nodes).expect("a leader") as usize - 1].clone();
        let rt = test_runtime();
        let r = rt.block_on(other.call(ClientOp::TransferLeader(l)));
        assert!(matches!(r, ClientResult::Ok(_)), "transfer back: {r:?}");
        // Its first entry committed, it takes a write and is deposed again.
        let r = rt.block_on(lh.call(ClientOp::Write(Bytes::from_static(b"led again"))));
        assert_eq!(r, ClientResult::Ok(Bytes::from_static(b"led again")));
        net.isolate(l);
        let second = spawn_call(&lh, ClientOp::Write(Bytes::from_static(b"second")));
        wait_for("the leader steps down", || lh.status().role != "leader");
        assert!(!second.is_finished(), "answered at the step-down");
        answered_outcome_unknown(second);
        net.heal();
    }

    /// A deposed leader's sessionless write whose entry never left it is
    /// answered "not the leader" once the node applies another entry at
    /// its position (it cannot be applied anywhere else), not after
    /// `write_timeout_ms` as an unknown outcome.
    #[test]
    fn a_deposed_leaders_lost_sessionless_write_is_answered_not_leader() {
        let three = Three::start(|_| {});
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, lh) = the_leader(nodes);
        net.isolate(l);
        let write = spawn_call(&lh, ClientOp::Write(Bytes::from_static(b"lost")));
        wait_for("the cut-off leader steps down", || {
            lh.status().role != "leader"
        });
        wait_for("a new leader", || leader_of(nodes).is_some_and(|n| n != l));
        net.heal();
        let answer = write.join().expect("the write's thread");
        assert!(
            matches!(answer, ClientResult::NotLeader { .. }),
            "{answer:?}"
        );
    }

    /// A leader's sessionless write that has not committed, when the
    /// first it hears of a new leader is an append that overwrites the
    /// write's entry: that append deposes it and truncates the write in one
    /// step. Another node may hold the write still (one that got it and did
    /// not vote for the new leader) and lead next, so it may yet commit:
    /// it must not be refused "not the leader" (a refusal the etcd API's
    /// clients may retry), but wait for its entry. Here it commits under
    /// the leader after next. Nodes 2 and 3 are played by the test.
    #[test]
    fn a_leaders_write_overwritten_as_it_is_deposed_waits_for_its_entry() {
        use keel_core::{Body, Entry, EntryKind, Message};
        let tmp = tempfile::tempdir().expect("tempdir");
        let net = MemNetwork::new();
        let heard: Arc<Mutex<Vec<Message>>> = Arc::new(Mutex::new(Vec::new()));
        let recorder = || -> keel_net::tcp::Inbound {
            let heard = heard.clone();
            Arc::new(move |m| heard.lock().expect("heard").push(m))
        };
        let fakes = net.join(2, recorder());
        let _ = net.join(3, recorder());
        // Election timeouts far longer than the test: node 1 neither
        // stands nor gives up leading on its own.
        let mut cfg = config(1, tmp.path());
        cfg.election_timeout_min_ms = 50_000;
        cfg.election_timeout_max_ms = 55_000;
        cfg.write_timeout_ms = 600_000;
        let cluster_id = cfg.cluster_id;
        let node = Arc::new(
            start_with(cfg, Box::new(Echo), Transport::Memory(net.clone())).expect("start"),
        );
        let send = |from: NodeId, term: u64, body: Body| {
            fakes.send(Message {
                cluster_id,
                from,
                to: 1,
                term,
                body,
            });
            fakes.flush();
        };
        // The first message node 1 sent to node 2 that `pick` picks from.
        let from_1 = |what: &str, pick: &dyn Fn(&Message) -> Option<Entry>| {
            let find = || {
                heard
                    .lock()
                    .expect("heard")
                    .iter()
                    .filter(|m| m.to == 2)
                    .find_map(pick)
            };
            wait_for(what, || find().is_some());
            find().expect("found")
        };
        let entry_of = |m: &Message, kind: fn(&EntryKind) -> bool| match &m.body {
            Body::Append { entries, .. } => entries.iter().find(|e| kind(&e.kind)).cloned(),
            _ => None,
        };

        // Node 2 hands leadership to node 1 and votes for it: node 1 leads
        // term 1, and node 2 acknowledges its first entry, which commits.
        send(2, 0, Body::TimeoutNow { last_pos: 0 });
        wait_for("node 1 asks for votes", || {
            heard
                .lock()
                .expect("heard")
                .iter()
                .any(|m| matches!(m.body, Body::Vote { .. }))
        });
        send(
            2,
            1,
            Body::VoteResp {
                granted: true,
                amnesic: false,
                committed: (0, 0),
            },
        );
        let start = from_1("node 1's term start", &|m| {
            entry_of(m, |k| matches!(k, EntryKind::TermStart))
        });
        assert_eq!(start.term, 1);
        send(
            2,
            1,
            Body::AppendResp {
                ok: true,
                position: start.end(),
                hint_pos: 0,
                hint_term: 0,
                heartbeat: 0,
                hold: 0,
            },
        );
        wait_for("node 1's term start commits", || {
            node.status().commit >= start.end()
        });

        // A write that reaches node 2's log only.
        let write = spawn_call(&node, ClientOp::Write(Bytes::from_static(b"w")));
        let w = from_1("node 1 sends the write", &|m| {
            entry_of(m, |k| matches!(k, EntryKind::Command { .. }))
        });
        assert_eq!(w.position, start.end());

        // Node 3, elected in term 2 without it, overwrites it at node 1.
        let overwriting = Entry {
            term: 2,
            position: w.position,
            timestamp: w.timestamp,
            kind: EntryKind::TermStart,
            data: Bytes::new(),
        };
        let overwritten_to = overwriting.end();
        send(
            3,
            2,
            Body::Append {
                prev_pos: start.end(),
                prev_term: 1,
                commit: start.end(),
                heartbeat: 1,
                entries: vec![overwriting],
                to_voter: true,
            },
        );
        wait_for("node 1 follows node 3", || {
            let s = node.status();
            s.term == 2 && s.leader == Some(3) && s.append == overwritten_to
        });

        // Node 2, which holds the write, is elected in term 3 and commits
        // it with its own term start.
        let next_start = Entry {
            term: 3,
            position: w.end(),
            timestamp: w.timestamp,
            kind: EntryKind::TermStart,
            data: Bytes::new(),
        };
        let end = next_start.end();
        send(
            2,
            3,
            Body::Append {
                prev_pos: start.end(),
                prev_term: 1,
                commit: end,
                heartbeat: 2,
                entries: vec![w, next_start],
                to_voter: true,
            },
        );
        let answer = write.join().expect("the write's thread");
        assert_eq!(answer, ClientResult::Ok(Bytes::from_static(b"w")));
        wait_for("node 1 applies what node 2 committed", || {
            node.status().applied == end
        });
        node.shutdown();
    }

    /// A write (or linearizable read) taken while the node knows no leader
    /// is held for two heartbeats: answered "not the leader" if none is
    /// known by then, forwarded (and answered) as soon as one is. Here the
    /// node is cut off until its election timer has made it forget its
    /// leader; heartbeats are 450 ms apart, so a write waits up to 900 ms.
    #[test]
    fn a_write_waits_briefly_for_a_leader_to_be_known() {
        let three = Three::start(|cfg| cfg.heartbeat_ms = 450);
        let (net, nodes) = (&three.net, &three.nodes);
        let (_, f, _, fh) = leader_and_follower(nodes);
        net.isolate(f);
        wait_for("the follower forgets its leader", || {
            fh.status().leader.is_none()
        });
        let waited = || fh.metrics().leaderless_requests.get();
        let first = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"first")));
        wait_for("the first write is held", || waited() == 1);
        let answer = first.join().expect("the first write's thread");
        assert!(
            matches!(answer, ClientResult::NotLeader { leader: None, .. }),
            "{answer:?}"
        );
        let second = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"second")));
        wait_for("the second write is held", || waited() == 2);
        let read = spawn_call(&fh, ClientOp::Read(Bytes::from_static(b"r")));
        wait_for("the read is held", || waited() == 3);
        net.heal();
        assert_eq!(
            second.join().expect("the second write's thread"),
            ClientResult::Ok(Bytes::from_static(b"second"))
        );
        let answer = read.join().expect("the read's thread");
        assert!(matches!(answer, ClientResult::Ok(_)), "{answer:?}");
    }

    /// A removed node answers the requests it held while it knew no leader
    /// as it answers the rest: "removed", not a dropped connection.
    #[test]
    fn a_removed_node_answers_the_requests_it_held_for_a_leader() {
        let three = Three::start(|cfg| cfg.heartbeat_ms = 450);
        let (net, nodes) = (&three.net, &three.nodes);
        let (_, f, lh, fh) = leader_and_follower(nodes);
        let rt = test_runtime();
        // Membership changes wait for the leader's first commit.
        let w = rt.block_on(lh.call(ClientOp::Write(Bytes::from_static(b"first"))));
        assert_eq!(w, ClientResult::Ok(Bytes::from_static(b"first")));
        net.isolate(f);
        let r = rt.block_on(lh.call(ClientOp::ChangeMembership(
            keel_core::MembershipChange::Remove(f),
        )));
        assert!(matches!(r, ClientResult::Ok(_)), "{r:?}");
        wait_for("the cut-off node forgets its leader", || {
            fh.status().leader.is_none()
        });
        let held = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"held")));
        wait_for("the write is held", || {
            fh.metrics().leaderless_requests.get() == 1
        });
        net.heal();
        let answer = held.join().expect("the write's thread");
        assert!(
            matches!(&answer, ClientResult::Error(m) if m.starts_with(keel_core::REMOVED_FROM_CLUSTER)),
            "{answer:?}"
        );
    }

    /// A sessionless write a follower forwarded, whose entry never reached
    /// it, is not answered "not the leader" when the node's role changes
    /// (a refusal its client may retry, though the leader it went to may
    /// hold it or have appended it): it waits for its entry, here (the
    /// forward was lost) until a later term's first entry has committed
    /// without it and an election timeout has passed (`settle_unplaced`):
    /// then its outcome is unknown. It used to wait `write_timeout_ms`
    /// (here ten minutes). Both ways: the node's leader is lost and
    /// another elected, and the node leads and steps down.
    #[test]
    fn a_forwarded_write_is_not_refused_when_the_nodes_role_changes() {
        for leads_then_steps_down in [false, true] {
            // (Election timeouts of 4-5 s: both transfers are over well
            // before the write's grace after the first runs out.)
            let three = Three::start_with_long_transfers(|cfg| cfg.write_timeout_ms = 600_000);
            let (net, nodes) = (&three.net, &three.nodes);
            let (l, f, lh, fh) = leader_and_follower(nodes);
            // The forward is lost on the way.
            net.cut(f, l);
            let write = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"w")));
            wait_for("the forward is dropped", || {
                net.dropped(f, l, "Forward") > 0
            });
            if leads_then_steps_down {
                net.heal();
                let rt = test_runtime();
                let transfer = |from: &Arc<NodeHandle>, to: NodeId| {
                    let r = rt.block_on(from.call(ClientOp::TransferLeader(to)));
                    assert!(matches!(r, ClientResult::Ok(_)), "transfer to {to}: {r:?}");
                    // Answered once the target's first append came, after
                    // its status said it leads.
                    assert_eq!(nodes[to as usize - 1].status().leader, Some(to));
                };
                transfer(&lh, f);
                transfer(&fh, l);
            } else {
                net.isolate(l);
                wait_for("another leader", || {
                    leader_of(nodes).is_some_and(|n| n != l)
                });
                // (Its status was published before its vote went out.)
                assert_ne!(fh.status().leader, Some(l));
            }
            assert!(!write.is_finished(), "answered at the role change");
            answered_outcome_unknown(write);
        }
    }

    /// A linearizable read a follower asked of a leader that then hands
    /// leadership over is asked again of the new leader and served, not
    /// refused "not the leader" when the follower learns of the new term.
    /// (Here the old leader's answer is lost on the way, so the read is
    /// still waiting when the transfer happens.)
    #[test]
    fn a_followers_read_across_a_leadership_transfer_is_served() {
        let three = Three::start(|_| {});
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, f, lh, fh) = leader_and_follower(nodes);
        let t = (1..=3).find(|&n| n != l && n != f).expect("a third");
        net.cut(l, f);
        let read = spawn_call(&fh, ClientOp::Read(Bytes::from_static(b"r")));
        wait_for("the leader's answer to the read is lost", || {
            net.dropped(l, f, "ReadIndexResp") > 0
        });
        net.heal();
        let rt = test_runtime();
        let r = rt.block_on(lh.call(ClientOp::TransferLeader(t)));
        assert!(matches!(r, ClientResult::Ok(_)), "transfer to {t}: {r:?}");
        assert_eq!(
            read.join().expect("the read's thread"),
            ClientResult::Ok(Bytes::from_static(b"r"))
        );
        // (Once per new term: a stall on a busy machine may add an
        // election.)
        assert!(fh.metrics().reads_retried.get() >= 1);
        assert_eq!(fh.status().leader, Some(t));
    }

    /// A sessionless write taken by a follower cut off from the rest (its
    /// forward is lost) is told its outcome is unknown once the node has
    /// known no leader for two election timeouts (its leader may have got
    /// it; it cannot learn whether), not after `write_timeout_ms` (here
    /// ten minutes). Requests taken after that get "not the leader".
    #[test]
    fn a_cut_off_followers_forwarded_write_is_answered_once_it_knows_no_leader() {
        let three = Three::start(|cfg| cfg.write_timeout_ms = 600_000);
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, f, _, fh) = leader_and_follower(nodes);
        net.isolate(f);
        let write = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"w")));
        wait_for("the forward is lost", || net.dropped(f, l, "Forward") > 0);
        answered_outcome_unknown(write);
        assert_eq!(fh.status().leader, None);
        let later = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"later")));
        assert!(matches!(
            later.join().expect("the later write's thread"),
            ClientResult::NotLeader { .. }
        ));
        net.heal();
    }

    /// A write a follower forwards while its leader is transferring
    /// leadership is held by the leader, not dropped: here the target is
    /// cut off, the transfer runs out after its window (4 s here), and the
    /// write is appended then and answered, where it used to wait out
    /// `write_timeout_ms` (30 s) for "outcome unknown".
    #[test]
    fn a_write_forwarded_during_a_transfer_is_answered() {
        let three = Three::start_with_long_transfers(|_| {});
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, t, transfer) = transfer_to_a_cut_off_follower(nodes, net);
        let f = (1..=3).find(|&n| n != l && n != t).expect("a third");
        let (lh, fh) = (nodes[l as usize - 1].clone(), nodes[f as usize - 1].clone());
        wait_for("the third node knows the leader", || {
            fh.status().leader == Some(l)
        });
        // The leader's own write is held as well, not refused as busy.
        let own = spawn_call(&lh, ClientOp::Write(Bytes::from_static(b"own")));
        let forwarded = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"forwarded")));
        assert_eq!(
            forwarded.join().expect("the forwarded write's thread"),
            ClientResult::Ok(Bytes::from_static(b"forwarded"))
        );
        assert_eq!(
            own.join().expect("the leader's write's thread"),
            ClientResult::Ok(Bytes::from_static(b"own"))
        );
        wait_for("both writes were held", || {
            lh.metrics().writes_held.get() == 2
        });
        transfer_ran_out(transfer);
        assert_eq!(leader_of(nodes), Some(l));
        net.heal();
    }

    /// A write a transferring leader holds for its own client, still held
    /// when the node stands for election itself (its target won no
    /// election, and no other leader came), is answered "not the leader"
    /// then: it was never appended nor sent on, so its client may retry.
    /// It used to wait out `write_timeout_ms` for "outcome unknown".
    #[test]
    fn a_held_write_dropped_at_an_election_is_answered_not_leader() {
        use keel_net::PeerSender;
        let three = Three::start_with_long_transfers(|cfg| cfg.write_timeout_ms = 30_000);
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, t, transfer) = transfer_to_a_cut_off_follower(nodes, net);
        let lh = nodes[l as usize - 1].clone();
        let write = spawn_call(&lh, ClientOp::Write(Bytes::from_static(b"held")));
        wait_for("the leader holds the write", || {
            lh.metrics().writes_held.get() == 1
        });
        // A vote request of a later term, as the target's would be had
        // its TimeoutNow arrived (sent as the third node: the target's
        // links are cut), deposes the leader, which then hears from
        // nobody.
        let s = lh.status();
        let o = (1..=3).find(|&n| n != l && n != t).expect("a third");
        let fake = net.join(99, Arc::new(|_| {}));
        fake.send(keel_core::Message {
            cluster_id: lh.cluster_id(),
            from: o,
            to: l,
            term: s.term + 1,
            body: keel_core::Body::Vote {
                last_pos: s.append,
                last_term: s.term,
                transfer: true,
            },
        });
        fake.flush();
        wait_for("the leader steps down", || lh.status().role != "leader");
        net.isolate(l);
        let answer = write.join().expect("the write's thread");
        assert!(
            matches!(answer, ClientResult::NotLeader { .. }),
            "{answer:?}"
        );
        wait_for("the drop is counted", || {
            lh.metrics().forwards_dropped.get() == 1
        });
        assert_eq!(lh.metrics().leaderless_requests.get(), 0);
        transfer_ran_out(transfer);
        net.heal();
    }

    /// Writes the core rejects in a proposal batch (here: more than a
    /// transferring leader holds, 4 MiB) are answered with the rejection,
    /// and the writes before it are served as before: the runtime keeps a
    /// turn's writes beside its proposal batch, not in `pending`. The held
    /// ones are appended once the transfer runs out.
    #[test]
    fn writes_a_transferring_leader_cannot_hold_are_answered_busy() {
        let three = Three::start_with_long_transfers(|_| {});
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, _, transfer) = transfer_to_a_cut_off_follower(nodes, net);
        let lh = nodes[l as usize - 1].clone();
        let rt = test_runtime();
        // Five writes of 1 MB, sent in order while the transfer is on: four
        // fit in what the leader holds (4 MiB, each counted with
        // `HELD_COMMAND_OVERHEAD`), the fifth does not.
        let data = |i: u8| Bytes::from(vec![i; 1_000_000]);
        let answers = rt.block_on(async {
            let calls: Vec<_> = (0..5u8)
                .map(|i| {
                    let lh = lh.clone();
                    tokio::spawn(async move { lh.call(ClientOp::Write(data(i))).await })
                })
                .collect();
            let mut answers = Vec::new();
            for c in calls {
                answers.push(c.await.expect("a call's task"));
            }
            answers
        });
        let expected: Vec<ClientResult> = (0..4u8)
            .map(|i| ClientResult::Ok(data(i)))
            .chain([ClientResult::Busy])
            .collect();
        assert!(
            answers == expected,
            "{:?}",
            answers.iter().map(short).collect::<Vec<_>>()
        );
        transfer_ran_out(transfer);
        wait_for("four writes were held", || {
            lh.metrics().writes_held.get() == 4
        });
        assert_eq!(
            leader_of(nodes),
            Some(l),
            "the transfer to the cut-off node succeeded"
        );
        net.heal();
        let r = rt.block_on(lh.call(ClientOp::Write(Bytes::from_static(b"after"))));
        assert_eq!(r, ClientResult::Ok(Bytes::from_static(b"after")));
    }

    /// An answer, its data cut short, for an assertion's message.
    fn short(r: &ClientResult) -> String {
        match r {
            ClientResult::Ok(b) => format!("Ok({} bytes of {:?})", b.len(), b.first()),
            other => format!("{other:?}"),
        }
    }

    /// Waits for a leader and a follower caught up with it, cuts that
    /// follower off and asks the leader to transfer leadership to it: the
    /// transfer stays on for its window (`election_timeout_min_ms`) and
    /// then runs out. Returns the leader, the follower and the
    /// transfer's call once the leader has told the follower to campaign
    /// (the message the cut dropped).
    fn transfer_to_a_cut_off_follower(
        nodes: &[Arc<NodeHandle>],
        net: &MemNetwork,
    ) -> (NodeId, NodeId, std::thread::JoinHandle<ClientResult>) {
        wait_for("a leader", || leader_of(nodes).is_some());
        let l = leader_of(nodes).expect("a leader");
        let f = (1..=3).find(|&n| n != l).expect("a follower");
        let lh = nodes[l as usize - 1].clone();
        wait_for("the follower has the leader's log", || {
            let s = lh.status();
            s.followers.contains(&(f, s.append))
        });
        net.isolate(f);
        let transfer = spawn_call(&lh, ClientOp::TransferLeader(f));
        wait_for("the transfer is on", || net.dropped(l, f, "TimeoutNow") > 0);
        (l, f, transfer)
    }

    /// The transfer `transfer_to_a_cut_off_follower` started ran out.
    fn transfer_ran_out(transfer: std::thread::JoinHandle<ClientResult>) {
        let r = transfer.join().expect("the transfer's thread");
        assert!(!matches!(r, ClientResult::Ok(_)), "{r:?}");
    }

    /// A follower removed while cut off learns it once it hears from the
    /// leader again: its pending write is answered "removed" (its outcome
    /// unknown: the leader might have appended it), the node
    /// stops with `NodeError::Removed`, leaves `REMOVED_FILE`, and a start
    /// on its data directory is refused.
    #[test]
    fn a_removed_node_answers_its_clients_stops_and_refuses_to_start_again() {
        let three = Three::start(|_| {});
        let (net, nodes) = (&three.net, &three.nodes);
        let (l, f, lh, fh) = leader_and_follower(nodes);
        let rt = test_runtime();
        // A leader refuses membership changes as busy until it has
        // committed an entry of its term; a committed write shows it has.
        let w = rt.block_on(lh.call(ClientOp::Write(Bytes::from_static(b"first"))));
        assert_eq!(w, ClientResult::Ok(Bytes::from_static(b"first")));

        // Cut off, it takes a write it cannot get committed.
        net.isolate(f);
        let pending = spawn_call(&fh, ClientOp::Write(Bytes::from_static(b"w")));
        let r = rt.block_on(lh.call(ClientOp::ChangeMembership(
            keel_core::MembershipChange::Remove(f),
        )));
        assert!(matches!(r, ClientResult::Ok(_)), "{r:?}");
        net.heal();

        // Forwarded before the removal: the leader may have appended it, so
        // its outcome is unknown (not a refusal a client could take as
        // "not applied").
        let answer = pending.join().expect("the write's thread");
        assert!(
            matches!(&answer, ClientResult::Error(m)
                if m.starts_with(keel_net::codec::OUTCOME_UNKNOWN)
                    && m.contains(keel_core::REMOVED_FROM_CLUSTER)),
            "{answer:?}"
        );
        wait_for("the removed node stops", || fh.is_stopped());
        let stopped = fh.wait().expect_err("a removed node's wait is an error");
        let why = stopped.to_string();
        assert!(
            matches!(stopped, NodeError::Removed(_))
                && why.contains(&format!("node {f} was removed from cluster 0x"))
                && why.contains(&format!("node {l} says so")),
            "{why}"
        );
        // Later requests get a stopped node's answer: clients go elsewhere.
        let later = rt.block_on(fh.call(ClientOp::Read(Bytes::from_static(b"r"))));
        assert_eq!(later, stopped_node());

        let cfg = config(f, three.tmp.path());
        let marker =
            std::fs::read_to_string(cfg.data_dir.join(REMOVED_FILE)).expect("the REMOVED file");
        assert!(
            marker.contains(&format!("node {f}"))
                && marker.contains(&format!("the id {f} is never used again"))
                && marker.contains("under a new id"),
            "{marker}"
        );
        let refused = start_with(cfg, Box::new(Echo), Transport::Memory(MemNetwork::new()))
            .err()
            .expect("a start on a removed node's data directory");
        let msg = refused.to_string();
        assert!(
            msg.contains(&format!("node {f} was removed from the cluster"))
                && msg.contains(REMOVED_FILE)
                && msg.contains(&format!("the id {f} is never used again"))
                && !msg.contains(&format!("add-learner {f}")),
            "{msg}"
        );

        // The other two go on.
        let w = rt.block_on(lh.call(ClientOp::Write(Bytes::from_static(b"after"))));
        assert_eq!(w, ClientResult::Ok(Bytes::from_static(b"after")));

        // The removed id is never added again (though every configuration
        // still names it), with the core's reason; the handle shows it
        // among the removed ids.
        let m = lh.membership();
        assert!(
            m.removed.contains(&f) && !m.contains(f) && m.contains(l),
            "{m:?}"
        );
        let again = rt.block_on(lh.call(ClientOp::ChangeMembership(
            keel_core::MembershipChange::AddLearner(f),
        )));
        assert_eq!(
            again,
            ClientResult::Error(format!(
                "node {f} was removed from the cluster and its id is never used again: start \
                 the new node under a new id"
            ))
        );
        assert!(!lh.membership().contains(f));

        // The leader removing itself is told the change went through, and
        // stops.
        let r = rt.block_on(lh.call(ClientOp::ChangeMembership(
            keel_core::MembershipChange::Remove(l),
        )));
        assert!(matches!(r, ClientResult::Ok(_)), "{r:?}");
        wait_for("the removed leader stops", || lh.is_stopped());
        let why = lh.wait().expect_err("a removed node's wait").to_string();
        assert!(why.contains("it committed its own removal"), "{why}");
    }

    /// Node 4, created to join, on an in-memory network where the test
    /// plays nodes 1 and 2 and records what node 4 sends them.
    struct Joiner4 {
        tmp: tempfile::TempDir,
        net: MemNetwork,
        heard: Arc<Mutex<Vec<keel_core::Message>>>,
        /// Whether node 4's `JOINED_FILE` existed as each message of
        /// `heard` arrived.
        joined_when_heard: Arc<Mutex<Vec<bool>>>,
        /// (A sender of the in-memory network sends as any node.)
        fakes: keel_net::mem::MemPeers,
    }

    impl Joiner4 {
        fn new() -> Self {
            let net = MemNetwork::new();
            let tmp = tempfile::tempdir().expect("tempdir");
            let heard = Arc::new(Mutex::new(Vec::new()));
            let joined_when_heard = Arc::new(Mutex::new(Vec::new()));
            let joined_file = config(4, tmp.path()).data_dir.join(JOINED_FILE);
            let recorder = || -> keel_net::tcp::Inbound {
                let (heard, joined) = (heard.clone(), joined_when_heard.clone());
                let joined_file = joined_file.clone();
                Arc::new(move |m| {
                    let mut heard = heard.lock().expect("heard");
                    joined.lock().expect("joined").push(joined_file.exists());
                    heard.push(m);
                })
            };
            let fakes = net.join(1, recorder());
            let _ = net.join(2, recorder());
            Joiner4 {
                tmp,
                net,
                heard,
                joined_when_heard,
                fakes,
            }
        }
        fn config(&self) -> NodeConfig {
            let mut cfg = config(4, self.tmp.path());
            cfg.join = true;
            cfg
        }
        fn dir(&self) -> PathBuf {
            self.config().data_dir
        }
        /// Starts (or restarts) node 4 on its data directory.
        fn start(&self) -> NodeHandle {
            let t = Transport::Memory(self.net.clone());
            start_with(self.config(), Box::new(Echo), t).expect("start")
        }
        /// Sends node 4 `body` as node `from` in `term`.
        fn to_4(&self, from: NodeId, term: u64, body: keel_core::Body) {
            self.fakes.send(keel_core::Message {
                cluster_id: self.config().cluster_id,
                from,
                to: 4,
                term,
                body,
            });
            self.fakes.flush();
        }
    }

    /// A node created to join writes `JOINING_FILE` at its first start; a
    /// restart before it wrote `JOINED_FILE` grants no vote (its data may be
    /// an earlier node's of its id), while a directory created to join by
    /// an earlier version, which wrote neither file, votes as that version
    /// did: a cluster grown by joins and restarted all at once on this
    /// version would otherwise elect no leader. Node 2 is played by the
    /// test and asks for votes with `transfer` set (no stickiness).
    #[test]
    fn a_joiner_of_an_earlier_version_votes_after_a_restart_and_one_of_this_version_does_not() {
        use keel_core::{Body, Entry, EntryKind, Membership};
        let j = Joiner4::new();
        let (heard, dir) = (&j.heard, j.dir());
        let to_4 = |from, term, body| j.to_4(from, term, body);
        let start = || j.start();
        // Node 4 a learner (a joining node is one until it has caught up).
        let mut with_4 = Membership::new([1, 2]);
        with_4.learners.insert(4);
        let member = Entry {
            term: 1,
            position: 0,
            timestamp: 1,
            kind: EntryKind::Membership(Arc::new(with_4)),
            data: Bytes::new(),
        };
        let node = start();
        assert!(dir.join(JOINING_FILE).exists());
        to_4(
            1,
            2,
            Body::Append {
                prev_pos: 0,
                prev_term: 0,
                commit: member.end(),
                heartbeat: 1,
                entries: vec![member.clone()],
                to_voter: false,
            },
        );
        wait_for("node 4 holds the configuration", || {
            heard.lock().expect("heard").iter().any(|m| {
                matches!(m.body, Body::AppendResp { ok: true, position, .. } if position >= member.end())
            })
        });
        node.shutdown();
        node.wait().expect("a clean stop");
        assert!(!dir.join(JOINED_FILE).exists());

        // Node 2 asks for node 4's vote in `term`: its answer.
        let vote = |term| {
            heard.lock().expect("heard").clear();
            let node = start();
            to_4(
                2,
                term,
                Body::Vote {
                    last_pos: member.end(),
                    last_term: 1,
                    transfer: true,
                },
            );
            let answer = || {
                heard
                    .lock()
                    .expect("heard")
                    .iter()
                    .find_map(|m| match m.body {
                        Body::VoteResp { granted, .. } if m.term == term => Some(granted),
                        _ => None,
                    })
            };
            wait_for("node 4 answers", || answer().is_some());
            node.shutdown();
            node.wait().expect("a clean stop");
            answer()
        };
        assert_eq!(vote(3), Some(false), "voted while joining");
        std::fs::remove_file(dir.join(JOINING_FILE)).expect("rm");
        assert_eq!(
            vote(4),
            Some(true),
            "a joiner of an earlier version did not vote"
        );
    }

    /// A node added again under the id of a removed one (`join = true`,
    /// empty data; possible only for an id removed before configurations
    /// recorded removed ids, by an earlier version) gets, from leader 1 of term 2, an entry of an earlier
    /// term whose configuration includes the earlier node 4, and restarts
    /// before it has caught up. The restart must not take it for that
    /// node: a lagging member's notice of the earlier node's removal is
    /// ignored (without `JOINED_FILE` the node stopped for good). Once it
    /// has caught up it records `JOINED_FILE`, and a removal notice then
    /// stops it. Nodes 1 and 2 are played by the test.
    #[test]
    fn a_node_added_again_that_restarts_before_it_caught_up_ignores_the_old_removal() {
        use keel_core::{Body, Entry, EntryKind, Membership};
        let j = Joiner4::new();
        let (heard, dir) = (&j.heard, j.dir());
        let to_4 = |from, term, body| j.to_4(from, term, body);
        let acked = |position: Position| {
            let heard = heard.clone();
            move || {
                heard.lock().expect("heard").iter().any(|m| {
                    matches!(m.body, Body::AppendResp { ok: true, position: p, .. } if p >= position)
                })
            }
        };
        let start = || j.start();
        let old = Entry {
            term: 1,
            position: 0,
            timestamp: 1,
            kind: EntryKind::Membership(Arc::new(Membership::new([1, 2, 3, 4]))),
            data: Bytes::new(),
        };
        // Leader 1's latest configuration has the new node 4 as a learner.
        let append = |prev_pos, prev_term, commit, entries| Body::Append {
            prev_pos,
            prev_term,
            commit,
            heartbeat: 1,
            entries,
            to_voter: false,
        };

        let node = start();
        assert!(dir.join(JOINING_FILE).exists());
        to_4(1, 2, append(0, 0, old.end(), vec![old.clone()]));
        wait_for("node 4 holds the old configuration", acked(old.end()));
        assert!(!dir.join(JOINED_FILE).exists());
        node.shutdown();
        node.wait().expect("a clean stop");

        heard.lock().expect("heard").clear();
        let node = start();
        // A lagging member's notice of the earlier node's removal.
        to_4(
            2,
            2,
            Body::Removed {
                position: old.end() + 100,
            },
        );
        // (Taken after the notice: the same queue.)
        to_4(1, 2, append(old.end(), 1, old.end(), Vec::new()));
        let answered = acked(old.end());
        wait_for("node 4 answers its leader", || {
            answered() || node.is_stopped()
        });
        assert!(!node.is_stopped(), "node 4 took the stale notice");
        assert!(!dir.join(REMOVED_FILE).exists());

        // Caught up: the leader's term start.
        let start_of_term = Entry {
            term: 2,
            position: old.end(),
            timestamp: 2,
            kind: EntryKind::TermStart,
            data: Bytes::from_static(keel_core::TERM_START_MARK),
        };
        let end = start_of_term.end();
        heard.lock().expect("heard").clear();
        j.joined_when_heard.lock().expect("joined").clear();
        to_4(1, 2, append(old.end(), 1, end, vec![start_of_term]));
        wait_for("node 4 records it joined", || {
            dir.join(JOINED_FILE).exists()
        });
        // Its acknowledgement that it caught up (which lets a leader promote
        // it) left only once the record was on disk: a voter must not
        // resume joining after a restart.
        wait_for("node 4 acknowledges the term start", acked(end));
        {
            let heard = heard.lock().expect("heard");
            let joined = j.joined_when_heard.lock().expect("joined");
            let acks: Vec<bool> = heard
                .iter()
                .zip(joined.iter())
                .filter(|(m, _)| {
                    matches!(m.body, Body::AppendResp { ok: true, position, .. } if position >= end)
                })
                .map(|(_, &joined)| joined)
                .collect();
            assert!(!acks.is_empty() && acks.iter().all(|&j| j), "{acks:?}");
        }
        to_4(2, 2, Body::Removed { position: end });
        wait_for("node 4 stops once removed", || node.is_stopped());
        assert!(matches!(node.wait(), Err(NodeError::Removed(_))));
        assert!(dir.join(REMOVED_FILE).exists());
    }
}
