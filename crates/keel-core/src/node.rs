//! The consensus state machine of one node: `Node::step(now, event, out)`
//! consumes one input and appends the actions the runtime must carry out.
//! No IO, no threads, no clock, no global randomness: time and a seed are
//! inputs, so the same inputs always give the same outputs.
//!
//! Runtime contract for the actions, which must be executed in order:
//! - `PersistHardState` and `InstallSnapshot` are synchronous: they must be
//!   durable before any later action (in particular a `Send`) is executed.
//! - `Append`/`Truncate`/`SaveSnapshot` are queued to storage in order;
//!   storage reports progress with `Event::Durable { position, term }`
//!   naming the last entry it has made durable, and a published snapshot
//!   file with `Event::SnapshotPublished`.
//! - `SendSnapshotChunk` is a `Send` whose chunk the runtime reads from the
//!   published snapshot file (the core keeps only snapshot metadata).
//! - `SendLogRange` is a `Send` of an append whose entries the runtime reads
//!   from its log on disk: with `Config::log_cache_bytes` set, the core
//!   drops the data of applied entries beyond that window from memory (it
//!   keeps their term, position and timestamp), so a follower that falls
//!   further behind is served from storage.
//! - `Apply` hands committed entries, in log order, to the service; the
//!   runtime reports `Event::Applied` when they have been applied.
//!
//! Snapshots and the log: a snapshot taken here compacts the in-memory log
//! only once its file is published, so the log always starts where the
//! newest published snapshot file ends. A follower behind the log gets that
//! file, whose metadata the core keeps with it, and then the log after it;
//! newer snapshots whose files are still being written change neither.

use crate::log::Log;
use crate::message::{Body, Message};
use crate::rng::Rng;
use crate::types::*;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Most snapshots awaiting publication whose metadata is kept (they are
/// published in order, so there are rarely more than one or two).
const MAX_UNPUBLISHED: usize = 16;

/// The data of a term-start entry: services are told of it
/// (`Service::on_term_start`). Entries from before that have none, and
/// replay as they were first applied.
pub const TERM_START_MARK: &[u8] = &[1];

/// Lease reads: most heartbeat creation times a leader keeps for voters
/// that have not echoed them yet. It records at most one per
/// `HEARTBEAT_TIME_GRAIN` (a heartbeat sequence number created since counts
/// from the recorded time before it, which is earlier: safe), so this
/// covers echoes up to 1.2 s late however many reads take a round; a voter
/// further behind adds nothing to the lease until it catches up.
const MAX_HEARTBEAT_TIMES: usize = 1200;
/// See `MAX_HEARTBEAT_TIMES`.
const HEARTBEAT_TIME_GRAIN: Nanos = 1_000_000;

/// Client commands a follower forwards (`Body::Forward`): client,
/// sequence number, data.
type ForwardedCommands = Vec<(ClientId, u64, Bytes)>;

/// What a held client command counts against `Config::max_inflight_bytes`
/// beyond its data (`Node::held_forwards`), so that empty ones are bounded
/// too: about what one costs in memory.
pub const HELD_COMMAND_OVERHEAD: u64 = 64;

fn held_size(data: &Bytes) -> u64 {
    data.len() as u64 + HELD_COMMAND_OVERHEAD
}

/// How long a leader tells each node that a configuration committed
/// during its leadership removed that it was removed (with every
/// heartbeat), in maximum election timeouts. Later, a removed node learns
/// it in answer to its own messages (`Body::Removed`).
pub const REMOVED_NOTICE_TIMEOUTS: u64 = 10;

/// How a request refused because this node was removed from the cluster
/// (`RejectReason::Removed`) is described to clients.
pub const REMOVED_FROM_CLUSTER: &str = "this member was removed from the cluster";

/// Timing and limits of one node. Election timeouts may differ between
/// nodes (leases count on each voter's own); the other values should be
/// the same on all nodes of a cluster (apart from `id` and `seed`).
#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    pub cluster_id: u64,
    /// How often an idle leader sends heartbeats.
    pub heartbeat_interval: Nanos,
    /// Election timeouts are drawn uniformly from [min, max). `min` is also
    /// the leader-stickiness window (after each message from a leader and
    /// after a start, no vote goes to another candidate) and the
    /// check-quorum period.
    pub election_timeout_min: Nanos,
    pub election_timeout_max: Nanos,
    /// How long a leader may hold back telling a follower that the commit
    /// position advanced when it has nothing else to send it: the next
    /// append (or heartbeat) carries it anyway, and under load one comes
    /// sooner. A follower whose own clients' writes were just committed
    /// (it forwarded them) is told at once. 0: always at once.
    pub commit_notify_delay: Nanos,
    /// Largest batch of entries in one append message.
    pub max_batch_bytes: u64,
    /// Bytes a leader may have sent to one follower beyond what it has
    /// acknowledged (flow control window).
    pub max_inflight_bytes: u64,
    /// Largest snapshot chunk in one `InstallSnapshot` message.
    pub snapshot_chunk_bytes: u64,
    /// How much of the newest log keeps its entries' data in memory once
    /// applied. Older entries that are applied, committed and durable keep
    /// only their term, position, timestamp and kind; a follower that
    /// needs them is sent them with `Action::SendLogRange`, read from
    /// storage. `u64::MAX` (the default) keeps everything until a snapshot
    /// compacts it.
    pub log_cache_bytes: u64,
    /// Checks a snapshot file received in chunks before a follower installs
    /// it (the storage format's checksum and that its header matches the
    /// metadata the leader sent). Pure; a file that fails is dropped and
    /// received again from the start. The default accepts anything.
    pub snapshot_check: fn(&SnapshotMeta, &[u8]) -> bool,
    /// Leader-lease reads (off by default). A leader answers a
    /// linearizable read at once, without a heartbeat round, while it holds
    /// a lease: while a quorum of voters is known to refuse other
    /// candidates, each from when this node created the latest heartbeat
    /// it echoed, for `lease_for` the `hold` it reported with the echo. It
    /// relies on leader stickiness, which every node keeps whatever this
    /// setting: a voter refuses (pre-)votes for its `election_timeout_min`
    /// (the `hold` it reports) on its own clock after each message from a
    /// leader, even if a higher term reaches it in between, and after a
    /// (re)start (it may have forgotten a leader it heard). Election
    /// timeouts may differ between nodes. Safe only if every node's clock
    /// runs within this node's `clock_drift_ppm` of true time and never
    /// steps (a node restarted with a lower `election_timeout_min` holds
    /// for its old one after the restart: `HardState::hold`). A leader
    /// that tells a node to
    /// campaign (leadership transfer) gives the lease up, since that
    /// election bypasses stickiness, until the transfer is over and an
    /// entry appended after the last such message has committed (an
    /// election on a late one then cannot win; see `timeout_now_sent`).
    pub lease_reads: bool,
    /// The clock-rate error lease reads assume at most, for any node, in
    /// parts per million of elapsed time (10 000 = 1%). Values at or above
    /// 1 000 000 leave no lease.
    pub clock_drift_ppm: u64,
    /// Voters that should lead whenever they can: the nodes near the
    /// writers, say, in a cluster spread over regions. Empty (the
    /// default): no preference. It should be the same on every node.
    ///
    /// A leader outside a non-empty set hands leadership to a preferred
    /// voter within `max_batch_bytes` of its log end, as
    /// `Event::TransferLeadership` does, once that voter has answered it
    /// without a break for `preferred_leader_hold` (so a cluster that
    /// elected a far-away leader during a latency blip or a failover moves
    /// back once the link is steady again), unless the leader was itself
    /// elected through a transfer from a voter: an operator's transfer is
    /// respected for the rest of that term, and nodes given different sets
    /// cannot hand leadership back and forth (a removed leader's hand-over
    /// is nobody's choice and does not count). A hand-over to a node that
    /// then did not lead (it answers the leader but cannot reach a quorum,
    /// or never stood) makes the next one wait four times longer, per such
    /// failure in a row (until a preferred voter leads), up to 64 holds. A
    /// leader removed from the voters hands over to a caught-up preferred
    /// voter if there is one, else to the most caught-up voter. A voter
    /// outside the set draws its election timeouts from
    /// [`election_timeout_max`, 2 `election_timeout_max` -
    /// `election_timeout_min`) while the configuration has a preferred
    /// voter, so a preferred follower usually stands first when a leader
    /// is lost (failover with every preferred node down is slower by up to
    /// the timeouts' spread).
    pub preferred_leaders: BTreeSet<NodeId>,
    /// How long a preferred voter must have answered a leader outside
    /// `preferred_leaders` without a break (no gap over half
    /// `election_timeout_min`) before it is handed leadership; also the
    /// least time between two such hand-overs.
    pub preferred_leader_hold: Nanos,
    /// Seed for randomized election timeouts.
    pub seed: u64,
    /// Deliberate protocol bugs, for proving the simulator's checkers fire.
    /// Always `TestingBugs::default()` (all off) outside those tests.
    #[doc(hidden)]
    pub testing_bugs: TestingBugs,
}

impl Config {
    pub fn new(id: NodeId, cluster_id: u64) -> Self {
        Config {
            id,
            cluster_id,
            heartbeat_interval: 50_000_000,
            commit_notify_delay: 5_000_000,
            election_timeout_min: 500_000_000,
            election_timeout_max: 1_000_000_000,
            max_batch_bytes: 256 * 1024,
            max_inflight_bytes: 4 * 1024 * 1024,
            snapshot_chunk_bytes: 1024 * 1024,
            log_cache_bytes: u64::MAX,
            snapshot_check: accept_any_snapshot,
            lease_reads: false,
            clock_drift_ppm: 10_000,
            preferred_leaders: BTreeSet::new(),
            preferred_leader_hold: 5_000_000_000,
            seed: id,
            testing_bugs: TestingBugs::default(),
        }
    }

    /// How long a lease lasts on the leader's clock, from the creation of
    /// a heartbeat echoed by voters that hold their votes for this node's
    /// own `election_timeout_min`: `lease_for(election_timeout_min)`.
    pub fn lease_duration(&self) -> Nanos {
        self.lease_for(self.election_timeout_min)
    }

    /// How long a voter that echoed a heartbeat, and holds its vote for
    /// `hold` on its own clock after each message from a leader, keeps the
    /// leader's lease, on the leader's clock from the heartbeat's creation:
    /// `hold` scaled by (1 - d) / (1 + d) for the drift bound d. The
    /// voter's stickiness lasts at least `hold / (1 + d)` of true time from
    /// when it received that heartbeat; the lease at most `lease / (1 - d)`
    /// of true time from its creation, which is earlier.
    pub fn lease_for(&self, hold: Nanos) -> Nanos {
        const MILLION: u128 = 1_000_000;
        let d = u128::from(self.clock_drift_ppm);
        if d >= MILLION {
            return 0;
        }
        let lease = u128::from(hold) * (MILLION - d) / (MILLION + d);
        lease as Nanos
    }
}

/// The default `Config::snapshot_check`: no checking.
pub fn accept_any_snapshot(_: &SnapshotMeta, _: &[u8]) -> bool {
    true
}

/// Switches that break safety on purpose (test-only).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestingBugs {
    /// The leader commits what it has made durable itself, without a quorum.
    pub commit_without_quorum: bool,
    /// Voters grant votes without comparing logs.
    pub vote_without_log_check: bool,
    /// Lease reads: a lease lasts three maximum election timeouts, past
    /// the voters' stickiness.
    pub lease_outlasts_stickiness: bool,
    /// Lease reads: a lease lasts `election_timeout_min` on the leader's
    /// clock, as if clocks ran at the true rate (no drift margin).
    pub lease_ignores_drift: bool,
    /// Lease reads: the leader counts on every voter holding its vote for
    /// the leader's own `election_timeout_min`, not for the `hold` the
    /// voter reported (unsafe where election timeouts differ).
    pub lease_assumes_own_timeout: bool,
    /// Lease reads: a leader keeps its lease when it tells a node to
    /// campaign (leadership transfer), whose election bypasses stickiness.
    pub lease_ignores_transfer: bool,
    /// A node told to campaign does so even if it holds an entry the
    /// leader appended after telling it (a late or duplicated message).
    pub stale_timeout_now: bool,
    /// Leader stickiness starts only with the first message from a leader,
    /// not at a (re)start: a restarted voter may vote at once.
    pub no_restart_hold: bool,
    /// A restart holds the vote for the node's current
    /// `election_timeout_min` only, not for a longer one it reported
    /// before the restart (`HardState::hold`).
    pub restart_hold_ignores_old_timeout: bool,
    /// A node tells another it was removed as soon as its latest
    /// configuration excludes it, before that configuration commits.
    pub removal_before_commit: bool,
    /// Entries to apply are handed out from the position the service
    /// reported applied, not from what was already handed out: entries
    /// handed out but not yet reported applied are handed out again.
    pub apply_from_applied: bool,
    /// A read is confirmed by one echo fewer than a quorum needs.
    pub read_quorum_off_by_one: bool,
    /// A read starts no new heartbeat round: echoes of an earlier round
    /// (sent before the read arrived) confirm it.
    pub read_without_new_round: bool,
    /// A read's index is the applied position, not the commit position.
    pub read_index_at_applied: bool,
    /// A follower installs a snapshot below its commit position (both
    /// guards, on a chunk and on installing, are skipped, and a partly
    /// received one is kept once the commit position passes it).
    pub install_snapshot_below_commit: bool,
    /// A node that restarted after losing unsynced writes
    /// (`Node::set_amnesic`) grants (pre-)votes that count as any other's.
    pub amnesia_ignored: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// A client command to replicate.
#[derive(Clone, Debug)]
pub struct Proposal {
    pub id: RequestId,
    pub client: ClientId,
    pub seq: u64,
    pub data: Bytes,
}

/// A change the service host made to its timer table while applying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerUpdate {
    Set {
        id: u64,
        deadline: Nanos,
    },
    Cancel {
        id: u64,
    },
    /// Forget every timer (before a restore lists them again).
    Clear,
}

/// Inputs of the state machine.
#[derive(Clone, Debug)]
pub enum Event {
    /// Time passed; check timeouts.
    Tick,
    Message(Message),
    /// Client writes: a leader appends them, a follower forwards them to
    /// its leader, a leader transferring leadership holds them (up to
    /// `Config::max_inflight_bytes`, see `Body::Forward`); the rest are
    /// rejected (`Action::Rejected`).
    Propose(Vec<Proposal>),
    /// A linearizable read: answered with `ReadReady` once leadership is
    /// confirmed; the runtime serves it once applied >= the read index.
    Read {
        id: RequestId,
    },
    /// Storage made the log durable up to the entry ending at `position`
    /// with term `term`.
    Durable {
        position: Position,
        term: Term,
    },
    /// The service applied everything up to `position`; `timers` are the
    /// timer-table changes that applying made.
    Applied {
        position: Position,
        timers: Vec<TimerUpdate>,
    },
    /// The runtime captured the service state at applied position
    /// `position` (and keeps it: the core never sees the state). The core
    /// answers with `Action::SaveSnapshot` carrying the snapshot's metadata,
    /// or with nothing if it wants no snapshot there (one at or beyond it
    /// exists, or `position` is not applied), and the runtime then drops the
    /// capture. The log before it is compacted once its file is published.
    SnapshotTaken {
        position: Position,
    },
    /// Storage published (made durable and named in the manifest) the
    /// snapshot file of `Action::SaveSnapshot` at `position`, `size` bytes
    /// long: the log before it is compacted and a leader streams this file
    /// to followers that are behind the log. Ignored unless it is newer than
    /// the published file the core knows and is a snapshot it asked to
    /// save. (Installed snapshots need no such event: `InstallSnapshot` is
    /// synchronous.)
    SnapshotPublished {
        position: Position,
        size: u64,
    },
    ChangeMembership {
        id: RequestId,
        change: MembershipChange,
    },
    TransferLeadership {
        id: RequestId,
        target: NodeId,
    },
}

/// The start of the refusal of a promotion of a learner that has not
/// caught up with the leader's log.
pub const LEARNER_NOT_READY: &str = "the learner is not caught up with the leader";

/// Why a request was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// Not the leader; `leader` is the best known one.
    NotLeader {
        leader: Option<NodeId>,
    },
    /// A leadership transfer is in progress; retry shortly.
    TransferInProgress,
    /// The leader has not yet committed an entry of its term.
    NotReady,
    /// A previous membership change is not committed yet.
    MembershipChangePending,
    Invalid(String),
    /// This node was removed from the cluster (`Action::Removed`): it
    /// serves nothing any more.
    Removed,
}

/// Outputs of the state machine, to be executed in order.
#[derive(Clone, Debug)]
pub enum Action {
    PersistHardState(HardState),
    Append(Vec<Entry>),
    Truncate {
        from: Position,
    },
    /// Write the service state captured at `Event::SnapshotTaken` (at this
    /// metadata's position) with this metadata to a snapshot file, publish
    /// it, then delete log entries ending at or before its position. Asynchronous; snapshots are published in the
    /// order they are saved. Report `Event::SnapshotPublished` once the
    /// file is published (not if a newer snapshot file is already
    /// published). Until then the core keeps the log before it and streams
    /// the previous published file to followers that need a snapshot.
    SaveSnapshot(SnapshotMeta),
    Send(Message),
    /// Send `message`, an `InstallSnapshot` whose `chunk` is empty, after
    /// filling `chunk` with bytes `offset..offset + len` of the published
    /// snapshot file at `position` (the newest published file the core was
    /// told of; `message` carries that file's metadata). If that file is
    /// gone (a newer snapshot replaced it) or cannot be read, send nothing:
    /// the leader resends after its retry timeout, or as soon as it hears
    /// of the newer file, from the newest published snapshot.
    SendSnapshotChunk {
        message: Message,
        position: Position,
        offset: u64,
        len: u64,
    },
    /// Send `message`, an `Append` whose `entries` is empty, after filling
    /// it with the log's entries from `from` to `upto` (both entry
    /// boundaries; committed and durable) read from storage: the core
    /// dropped their data from memory (`Config::log_cache_bytes`). If they
    /// cannot be read (a snapshot compacted them meanwhile), send nothing:
    /// the leader resends once it notices, from its snapshot if need be.
    SendLogRange {
        message: Message,
        from: Position,
        upto: Position,
    },
    Apply(Vec<Entry>),
    /// Persist the snapshot file `image` (received in chunks, already
    /// accepted by `Config::snapshot_check`), restore the service from it,
    /// and drop log entries it covers (the whole log if it does not hold
    /// the snapshot's last entry).
    InstallSnapshot {
        meta: SnapshotMeta,
        image: Bytes,
    },
    ReadReady {
        id: RequestId,
        index: Position,
    },
    /// Request `id` is refused. Most often in the step that took it; a
    /// linearizable read once its answer is known; a write this node held
    /// while it transferred leadership (`Node::holds_commands`) in the
    /// step in which it stands for election with the write still held
    /// (never appended, nor sent to another node).
    Rejected {
        id: RequestId,
        reason: RejectReason,
    },
    RoleChanged {
        role: Role,
        term: Term,
        leader: Option<NodeId>,
    },
    /// This node was removed from the cluster for good: node `by` (this
    /// node itself for a leader that committed its own removal) knows a
    /// committed configuration that excludes it, in force from `position`
    /// of the log (see `Body::Removed`). The last action the core emits:
    /// every later event is ignored (requests are refused with
    /// `RejectReason::Removed`). The runtime should stop the node and keep
    /// it from starting again on the same data (an empty data directory
    /// joins afresh).
    Removed {
        by: NodeId,
        position: Position,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProgressState {
    /// Find the match point: one append at a time.
    Probe,
    /// Stream entries within the in-flight window.
    Replicate,
    /// A snapshot is on its way.
    Snapshot,
}

#[derive(Clone, Debug)]
struct Progress {
    /// Highest durable position known to match our log.
    matched: Position,
    /// Where the next append starts.
    next: Position,
    state: ProgressState,
    /// Probe: an append is outstanding. Snapshot: when it was sent.
    paused_since: Option<Nanos>,
    /// Heard from it since the last check-quorum round.
    active: bool,
    /// Highest heartbeat sequence it echoed.
    heartbeat: u64,
    /// Lease reads: until when (our clock) it refuses votes to other
    /// candidates, from the latest heartbeat it echoed and the `hold` it
    /// reported (0: not known).
    lease_end: Nanos,
    /// Snapshot state: which snapshot is being sent, how many of its bytes
    /// the follower has acknowledged, and how many have been sent (chunks
    /// go out while less than `max_inflight_bytes` is unacknowledged; in
    /// this state `paused_since` is when the follower last acknowledged
    /// more, or the transfer started).
    snapshot_pos: Position,
    snapshot_offset: u64,
    snapshot_sent: u64,
    /// Replicate: when it last acknowledged something new or was last sent
    /// entries (to tell appends lost on the way from appends in flight).
    last_progress: Nanos,
    /// The commit position last sent to it.
    commit_sent: Position,
    /// Where each batch of writes it forwarded ends, oldest first, until it
    /// is sent a commit position covering it: its clients are answered
    /// once it applies them, so it hears at once when one commits.
    forwarded: VecDeque<Position>,
    /// When it last answered an append this term, and since when it has
    /// answered without a break (`Config::preferred_leaders`).
    answered: Option<(Nanos, Nanos)>,
}

impl Progress {
    /// Records that a message carrying `commit` was sent to it.
    fn commit_sent(&mut self, commit: Position) {
        self.commit_sent = commit;
        while self.forwarded.front().is_some_and(|&end| end <= commit) {
            self.forwarded.pop_front();
        }
    }
}

struct PendingRead {
    id: RequestId,
    /// The follower that asked (a forwarded read), or None for a local one.
    from: Option<NodeId>,
    index: Position,
    heartbeat: u64,
}

/// Counters for observability and the simulator's summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub elections_started: u64,
    pub pre_votes_started: u64,
    pub became_leader: u64,
    pub snapshots_sent: u64,
    /// Snapshots received in full that failed `Config::snapshot_check`.
    pub snapshots_rejected: u64,
    pub rejections_received: u64,
    /// Appends whose entries the runtime had to read back from storage
    /// (`Action::SendLogRange`).
    pub log_ranges_sent: u64,
    /// Reads answered under a leader lease, without a heartbeat round.
    pub lease_reads: u64,
    /// Appends dropped because their entries did not follow each other
    /// from their `prev_pos` (no correct leader sends one).
    pub malformed_appends: u64,
    /// `Body::Removed` messages sent (answers and a leader's notices).
    pub removed_sent: u64,
    /// `Body::Removed` messages received and not acted on (this node was
    /// joining, or knows a later configuration that includes it).
    pub removed_ignored: u64,
    /// Appends and snapshot chunks ignored while joining because their
    /// leader counts this node as a voter (`to_voter`; see
    /// `Node::joining`): it takes it for an earlier node of its id (a
    /// removed one, or one whose disk was lost), or the node was started
    /// to join under an id the initial configuration lists. A count that
    /// keeps growing means the node waits for good: it must be given a
    /// new id (or, an initial member that never ran, be started with the
    /// initial configuration instead).
    pub to_voter_ignored: u64,
    /// Leadership transfers this node started as a leader outside
    /// `Config::preferred_leaders`, to a preferred voter.
    pub preference_transfers: u64,
    /// Client commands followers forwarded that this node dropped (it knew
    /// no leader to pass them to and was not holding them, see
    /// `Body::Forward`, or held `Config::max_inflight_bytes` of them
    /// already), and commands it held, its own clients' included, that it
    /// dropped when it stood for election. The runtime answers their
    /// clients once it can tell (the followers' with an unknown outcome),
    /// except this node's own, which are refused here (`Action::Rejected`,
    /// not the leader).
    pub forwards_dropped: u64,
    /// Client commands this node held (its own clients' and forwarded
    /// ones) while it transferred leadership or knew no leader, to append
    /// or pass on to the next leader.
    pub commands_held: u64,
    /// Times this node stopped being amnesic (see `Node::set_amnesic`):
    /// it caught up with a leader elected since its power loss.
    pub amnesia_ended: u64,
}

/// What a restarted node recovers from its storage.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    pub hard_state: HardState,
    /// The latest snapshot (only its metadata is kept).
    pub snapshot: Option<Snapshot>,
    /// Size of its published snapshot file (0: none, e.g. a new node).
    pub snapshot_file_size: u64,
    /// Durable entries after the snapshot, contiguous.
    pub entries: Vec<Entry>,
}

/// A follower's snapshot file being received from a leader in chunks,
/// held until it is whole.
#[derive(Debug)]
struct IncomingSnapshot {
    meta: SnapshotMeta,
    /// The term of the leader sending it: another leader's file of the
    /// same snapshot may differ (and be shorter), and is never joined to
    /// it.
    term: Term,
    /// The file from its start, as far as its chunks have come in order.
    buf: Vec<u8>,
    /// Chunks that came before the ones ahead of them (the network
    /// reordered them), by offset, and their bytes in all (at most
    /// `max_inflight_bytes`).
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: u64,
    /// Where its last chunk ends, once seen.
    end: Option<u64>,
}

pub struct Node {
    cfg: Config,
    rng: Rng,
    role: Role,
    term: Term,
    voted_for: Option<NodeId>,
    leader: Option<NodeId>,
    log: Log,
    /// The latest snapshot: taken here, installed, or recovered. Its file
    /// may still be unpublished.
    snapshot: Option<SnapshotMeta>,
    /// The newest published snapshot file: its metadata and size. The log
    /// starts at its position; a leader streams it to followers behind.
    published: Option<(SnapshotMeta, u64)>,
    /// Snapshots taken here whose files are not published yet, oldest
    /// first: a publication is matched with its metadata here.
    unpublished: VecDeque<SnapshotMeta>,
    /// Entries the last compaction dropped, for the host to free off its
    /// hot thread (`take_compacted`); freed here at the next compaction if
    /// not taken.
    compacted: VecDeque<Entry>,
    /// Membership at the snapshot position, and every membership entry in
    /// the log after it (start position, membership).
    base_membership: Membership,
    membership_log: Vec<(Position, Arc<Membership>)>,
    commit: Position,
    apply_sent: Position,
    applied: Position,
    durable: Position,
    /// Follower: highest position known to match the current leader's log.
    matched: Position,
    /// Follower: last acknowledged position and heartbeat, and whether an
    /// acknowledgement is due at the end of this step.
    acked: (Position, u64),
    /// Follower: when the last acknowledgement went to the current leader.
    acked_at: Option<Nanos>,
    ack_due: bool,
    ack_forced: bool,
    leader_heartbeat: u64,
    election_deadline: Nanos,
    heartbeat_deadline: Nanos,
    check_quorum_deadline: Nanos,
    /// (Pre-)votes this (pre-)candidate was answered: whether granted,
    /// and whether by an amnesic voter (see `Node::set_amnesic`).
    votes: BTreeMap<NodeId, Ballot>,
    progress: BTreeMap<NodeId, Progress>,
    term_start_pos: Position,
    heartbeat_seq: u64,
    heartbeat_due: bool,
    /// Leader, lease reads: when heartbeat sequence numbers a voter may
    /// still echo were created, oldest first (at most one per
    /// `HEARTBEAT_TIME_GRAIN`; see `voter_lease_end`).
    heartbeat_times: VecDeque<(u64, Nanos)>,
    /// Leader, lease reads: reads are answered at once before this time.
    lease_until: Nanos,
    /// Leader: the nodes it told to campaign this term (`TimeoutNow`), with
    /// its log end when it last did. Their elections would bypass the
    /// voters' stickiness, so no lease is trusted while a transfer is on or
    /// until an entry past each of those positions has committed: a quorum
    /// then holds an entry of this term past the target's log end (the
    /// target is sent `TimeoutNow` only when caught up), so an election it
    /// starts on such a message, however late, cannot win, and a target
    /// that holds that entry ignores the message altogether.
    timeout_now_sent: BTreeMap<NodeId, Position>,
    /// Leader stickiness: no (pre-)vote is granted to another candidate
    /// before this time (except for a leadership transfer): an election
    /// timeout after the last message from a leader, and after a
    /// (re)start (this node may have forgotten a leader it heard). Neither
    /// a new term nor losing the leader ends it early: a leader's lease
    /// counts on it.
    vote_hold_until: Nanos,
    /// The stickiness the hard state records (`HardState::hold`).
    hold_persisted: Nanos,
    /// When to record `election_timeout_min` as the hard state's `hold`:
    /// at once if it is larger than the recorded one (before it is ever
    /// reported), else once the recorded one has run since the restart.
    hold_update_at: Option<Nanos>,
    reads: VecDeque<PendingRead>,
    reads_waiting: Vec<(RequestId, Option<NodeId>)>,
    /// Follower: reads waiting for the leader's read index, each with the
    /// time it is given up at (`expire_forwarded_reads`).
    forwarded_reads: BTreeMap<RequestId, Nanos>,
    transfer: Option<(NodeId, Nanos)>,
    /// Client commands that this node could not append at once, with the
    /// node that took them (a follower that forwarded them, or this one):
    /// it was leading a transfer (its log holds still so that the target
    /// catches up), or no longer leads and knows no leader yet. Appended
    /// once it leads with no transfer, passed on once it knows another
    /// leader, dropped when it stands for election
    /// (`release_held_forwards`, `drop_held_forwards`).
    held_forwards: Vec<(NodeId, ForwardedCommands)>,
    /// The request ids of this node's own clients' commands in
    /// `held_forwards`, in order: refused "not the leader" if they are
    /// dropped (they were never appended, nor sent anywhere).
    held_own: Vec<RequestId>,
    /// What `held_forwards` counts against `max_inflight_bytes` (each
    /// command's data and `HELD_COMMAND_OVERHEAD`).
    held_forward_bytes: u64,
    /// Candidate: this election was started by a leadership transfer
    /// (`TimeoutNow`) from a voter (not a removed leader's hand-over).
    /// Leader: it won such an election, so it keeps leadership for its
    /// term whatever `Config::preferred_leaders` says.
    by_transfer: bool,
    /// Leader outside `Config::preferred_leaders`: no hand-over to a
    /// preferred voter before this time.
    next_preference_move: Nanos,
    /// The target of this node's latest preference hand-over, until a
    /// leader is known after it (`settle_preference_handover`), and how
    /// many hand-overs in a row went to a node that did not come to lead.
    preference_handover: Option<NodeId>,
    preference_failures: u32,
    timers: BTreeMap<u64, Nanos>,
    timers_fired: BTreeSet<u64>,
    commit_advanced: bool,
    /// Leader: when to tell followers the commit position it held back
    /// (see `Config::commit_notify_delay`).
    commit_notify_at: Option<Nanos>,
    /// Follower: the snapshot being received in chunks (held until it is
    /// whole; dropped once this node stands in a term of its own or leads,
    /// or has committed what it covers: see `set_role`,
    /// `advance_follower_commit`).
    incoming: Option<IncomingSnapshot>,
    /// Set once this node learned it was removed from the cluster: who
    /// said so and from which position. Every later event is ignored.
    removed: Option<(NodeId, Position)>,
    /// Leader: the nodes a configuration committed during this leadership
    /// removed, each with where that configuration is in force and until
    /// when (our clock) heartbeats tell it so.
    removed_peers: BTreeMap<NodeId, (Position, Nanos)>,
    /// Started with no membership (a node waiting to be added, possibly
    /// under the id of a removed node) and not yet caught up with a leader
    /// whose configuration includes it: the configurations it replays
    /// may have removed an earlier node of its id, so it neither acts on
    /// nor sends `Body::Removed` until then.
    joining: bool,
    /// Joining: the highest commit position a leader has told it.
    join_commit: Position,
    /// Joining again after a restart on data an earlier version wrote
    /// (`resume_joining_voting`): it grants votes as that version did.
    joining_votes: bool,
    /// Restarted after losing writes it had not synced, which it may have
    /// acknowledged (`set_amnesic`), and not yet caught up with a leader
    /// elected since: its (pre-)votes say so (see `tally`).
    amnesic: bool,
    /// The position of the latest membership entry this node knows is
    /// committed and holds durably (`settled_config`); kept by the runtime
    /// across restarts, when the commit position starts over.
    config_settled: Position,
    now: Nanos,
    stats: Stats,
}

/// One voter's answer to a (pre-)vote request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ballot {
    granted: bool,
    amnesic: bool,
    /// The latest entry the voter knows is committed: end position, term.
    committed: (Position, Term),
}

impl Ballot {
    fn pre_vote_resp(self) -> Body {
        let Ballot {
            granted,
            amnesic,
            committed,
        } = self;
        Body::PreVoteResp {
            granted,
            amnesic,
            committed,
        }
    }
    fn vote_resp(self) -> Body {
        let Ballot {
            granted,
            amnesic,
            committed,
        } = self;
        Body::VoteResp {
            granted,
            amnesic,
            committed,
        }
    }
}

impl Node {
    /// A node of a new cluster whose initial members are `membership` (empty
    /// for a node that will be added to an existing cluster). It has
    /// promised no stickiness yet; the first hard state it writes (at its
    /// first term change, which comes before it answers any leader)
    /// records its `hold`.
    pub fn new(cfg: Config, membership: Membership, now: Nanos) -> Self {
        let snapshot = Snapshot {
            meta: SnapshotMeta {
                position: 0,
                term: 0,
                timestamp: 0,
                membership,
            },
            data: Bytes::new(),
        };
        let hold = cfg.election_timeout_min;
        let mut node = Self::restart(
            cfg,
            Recovered {
                hard_state: HardState {
                    hold,
                    ..HardState::default()
                },
                snapshot: Some(snapshot),
                snapshot_file_size: 0,
                entries: Vec::new(),
            },
            now,
        );
        node.hold_update_at = None;
        node
    }

    /// A node restarting from what its storage recovered. Everything
    /// recovered counts as durable. The service must be restored from
    /// `recovered.snapshot` by the runtime.
    pub fn restart(cfg: Config, recovered: Recovered, now: Nanos) -> Self {
        let meta = recovered
            .snapshot
            .as_ref()
            .map(|s| s.meta.clone())
            .unwrap_or(SnapshotMeta {
                position: 0,
                term: 0,
                timestamp: 0,
                membership: Membership::default(),
            });
        let mut log = Log::new(meta.position, meta.term, meta.timestamp);
        let mut membership_log = Vec::new();
        for e in recovered.entries {
            if e.position != log.last_pos() {
                break; // storage guarantees contiguity; be defensive anyway
            }
            if let EntryKind::Membership(m) = &e.kind {
                membership_log.push((e.position, m.clone()));
            }
            log.push(e);
        }
        let rng = Rng::new(cfg.seed ^ cfg.id.rotate_left(32));
        let mut node = Node {
            rng,
            role: Role::Follower,
            term: recovered.hard_state.term,
            voted_for: recovered.hard_state.voted_for,
            leader: None,
            durable: log.last_pos(),
            commit: meta.position,
            apply_sent: meta.position,
            applied: meta.position,
            log,
            snapshot: (meta.position > 0).then(|| meta.clone()),
            published: (meta.position > 0 && recovered.snapshot_file_size > 0)
                .then(|| (meta.clone(), recovered.snapshot_file_size)),
            unpublished: VecDeque::new(),
            compacted: VecDeque::new(),
            base_membership: meta.membership,
            membership_log,
            matched: 0,
            acked: (0, 0),
            acked_at: None,
            ack_due: false,
            ack_forced: false,
            leader_heartbeat: 0,
            election_deadline: 0,
            heartbeat_deadline: 0,
            check_quorum_deadline: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            term_start_pos: 0,
            heartbeat_seq: 0,
            heartbeat_due: false,
            heartbeat_times: VecDeque::new(),
            lease_until: 0,
            timeout_now_sent: BTreeMap::new(),
            vote_hold_until: if cfg.testing_bugs.no_restart_hold {
                0
            } else if cfg.testing_bugs.restart_hold_ignores_old_timeout {
                now.saturating_add(cfg.election_timeout_min)
            } else {
                now.saturating_add(cfg.election_timeout_min.max(recovered.hard_state.hold))
            },
            hold_persisted: recovered.hard_state.hold,
            hold_update_at: match recovered.hard_state.hold.cmp(&cfg.election_timeout_min) {
                // At the first step, whatever its clock reads.
                std::cmp::Ordering::Less => Some(0),
                std::cmp::Ordering::Equal => None,
                std::cmp::Ordering::Greater => Some(now.saturating_add(recovered.hard_state.hold)),
            },
            reads: VecDeque::new(),
            reads_waiting: Vec::new(),
            forwarded_reads: BTreeMap::new(),
            transfer: None,
            held_forwards: Vec::new(),
            held_own: Vec::new(),
            held_forward_bytes: 0,
            by_transfer: false,
            next_preference_move: 0,
            preference_handover: None,
            preference_failures: 0,
            timers: BTreeMap::new(),
            timers_fired: BTreeSet::new(),
            commit_advanced: false,
            commit_notify_at: None,
            incoming: None,
            removed: None,
            removed_peers: BTreeMap::new(),
            joining: false,
            join_commit: 0,
            joining_votes: false,
            amnesic: false,
            config_settled: 0,
            now,
            stats: Stats::default(),
            cfg,
        };
        let m = node.membership();
        node.joining = m.voters.is_empty() && m.learners.is_empty();
        node.reset_election_deadline();
        node
    }

    // ----- read-only accessors -------------------------------------------

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn term(&self) -> Term {
        self.term
    }
    pub fn voted_for(&self) -> Option<NodeId> {
        self.voted_for
    }
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// Whether this node's latest election was started by a leadership
    /// transfer (`TimeoutNow`) from a voter of its configuration (not a
    /// removed leader's hand-over): a leader elected so keeps leadership
    /// for its term whatever `Config::preferred_leaders` says.
    pub fn elected_by_transfer(&self) -> bool {
        self.by_transfer
    }
    /// Whether this node holds client commands it took during a
    /// leadership transfer (its own clients' or forwarded ones), to be
    /// appended, passed on to the next leader, or dropped (its own
    /// clients' then refused by `Action::Rejected`).
    pub fn holds_commands(&self) -> bool {
        !self.held_forwards.is_empty()
    }
    /// A leader transferring leadership: it holds the writes proposed to
    /// it (`Event::Propose`) instead of appending them, until the transfer
    /// ends (see `Body::Forward`).
    pub fn is_transferring(&self) -> bool {
        self.role == Role::Leader && self.transfer.is_some()
    }
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
    pub fn log(&self) -> &Log {
        &self.log
    }
    pub fn append_position(&self) -> Position {
        self.log.last_pos()
    }
    pub fn durable_position(&self) -> Position {
        self.durable
    }
    pub fn commit_position(&self) -> Position {
        self.commit
    }
    pub fn applied_position(&self) -> Position {
        self.applied
    }
    /// Metadata of the latest snapshot (its data lives in the service and
    /// the snapshot file, not here); its file may not be published yet.
    pub fn snapshot_meta(&self) -> Option<&SnapshotMeta> {
        self.snapshot.as_ref()
    }
    /// The newest published snapshot file: (position, size). The log
    /// starts at its position, and it is the file sent to followers.
    pub fn snapshot_file(&self) -> Option<(Position, u64)> {
        self.published.as_ref().map(|(m, size)| (m.position, *size))
    }
    /// Bytes held of a snapshot being received from the leader (0: none).
    pub fn incoming_snapshot_bytes(&self) -> usize {
        self.incoming.as_ref().map_or(0, |f| f.buf.len())
    }
    /// Metadata of the newest published snapshot file.
    pub fn published_snapshot_meta(&self) -> Option<&SnapshotMeta> {
        self.published.as_ref().map(|(m, _)| m)
    }
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// Set once this node learned it was removed from the cluster
    /// (`Action::Removed`): who told it, and the position from which the
    /// configuration excluding it is in force.
    pub fn removed(&self) -> Option<(NodeId, Position)> {
        self.removed
    }
    /// Whether this node is still joining: it started with no membership
    /// (to be added, possibly under the id of a removed node) and has not
    /// caught up with a leader whose configuration includes it yet, or no
    /// configuration it holds includes it. A joining node neither acts on
    /// nor sends `Body::Removed`, grants no vote, and ignores a leader that
    /// counts it as a voter (`Body::Append::to_voter`). A runtime records
    /// when a node created to join stops joining, after it has carried out
    /// the step's `Action::InstallSnapshot` (an installed snapshot counts
    /// as durable, and may hold the configuration that added the node)
    /// and before it sends any message the step gave (the acknowledgement
    /// that lets a leader promote it), and calls `resume_joining` on a
    /// restart before.
    pub fn joining(&self) -> bool {
        self.is_joining()
    }
    /// A node created to join (no membership of its own) restarted before
    /// it finished joining (`joining()` was still true): its data may hold
    /// configurations that included an earlier node of its id (a snapshot
    /// or entries from before that node was removed), which its restart
    /// cannot tell from its own membership. It ignores removal notices
    /// again until it has caught up with a leader whose configuration
    /// includes it.
    pub fn resume_joining(&mut self) {
        self.joining = true;
        self.join_commit = 0;
        self.joining_votes = false;
    }
    /// `resume_joining` for data an earlier version wrote, which did not
    /// record whether the node had finished joining (nor that it was
    /// created to join): removal notices wait as there, but the node
    /// grants (pre-)votes as that version did, to a candidate whose log is
    /// at least as up to date, if a configuration it holds includes it.
    /// Such a node is almost always a member that joined long ago: a
    /// cluster grown by joins, all restarted on a newer version at once,
    /// would otherwise wait for a leader that only those votes can elect
    /// (with a majority of such voters, or one other voter whose log is
    /// ahead, for good).
    pub fn resume_joining_voting(&mut self) {
        self.resume_joining();
        self.joining_votes = true;
    }
    /// Called right after `restart` on storage that may have lost writes
    /// the node had acknowledged, and until the node is no longer
    /// `amnesic` (the runtime records that it is, across restarts). In
    /// `replicated` durability an entry counts once written to the OS, so
    /// a machine that lost power (not a process crash, which keeps the
    /// page cache) comes back without what it had not synced. Such a
    /// node's vote could elect a leader without an entry that only its
    /// acknowledgement had made a quorum's.
    ///
    /// So the node is *amnesic*: its (pre-)votes say so, and a candidate
    /// needs, besides a quorum of votes, enough from voters that are not
    /// amnesic to meet every quorum, or every voter's (`tally`). Before
    /// the first restart after the loss the runtime writes
    /// `HardState::after_power_loss`, a new term with no vote, so that no
    /// leader of an earlier term, which may count the node's old
    /// acknowledgements, has it follow. The node stops being amnesic once
    /// it has committed an entry x of its current term (`end_amnesia`): x
    /// was committed by a quorum's acknowledgements made after the loss
    /// (none of them the node's own from before it: those are of earlier
    /// terms), each from a node that holds the log below x as the leader
    /// of that term does, which was elected by the rule above and so holds
    /// every entry a quorum acknowledged before. The node's log below x is
    /// that log too, durable or not yet: what it has not written yet, that
    /// quorum holds.
    pub fn set_amnesic(&mut self) {
        self.amnesic = true;
    }
    /// Whether the node is amnesic (see `set_amnesic`).
    pub fn amnesic(&self) -> bool {
        self.amnesic
    }
    /// The position of the latest membership entry this node knows is
    /// committed and holds durably (0: none). Elections count votes
    /// differently while the configuration in force may not be committed
    /// (`tally`), and a restart does not know what was: the runtime keeps
    /// this across restarts (`restore_settled_config`).
    pub fn settled_config(&self) -> Position {
        self.config_settled
    }
    /// After `restart`: what `settled_config` said before it.
    pub fn restore_settled_config(&mut self, position: Position) {
        self.config_settled = self.config_settled.max(position);
    }
    /// Moves `config_settled` to the latest membership entry that is
    /// committed and durable here.
    fn note_settled_config(&mut self) {
        self.note_settled_config_upto(self.commit);
    }

    /// `note_settled_config`, with this node's log known committed up to
    /// `committed`.
    fn note_settled_config_upto(&mut self, committed: Position) {
        // (Called at each commit and durable advance: nothing to do unless
        // a membership entry past the settled one is in the log.)
        if self
            .membership_log
            .last()
            .is_none_or(|&(p, _)| p <= self.config_settled)
        {
            return;
        }
        let settled = self.membership_log.iter().rev().find(|(p, _)| {
            *p < committed
                && self
                    .log
                    .entry_at(*p)
                    .is_some_and(|e| e.end() <= self.durable)
        });
        if let Some(&(p, _)) = settled {
            self.config_settled = self.config_settled.max(p);
        }
    }
    /// The membership in force: the latest one in the log, committed or not.
    pub fn membership(&self) -> &Membership {
        self.membership_log
            .last()
            .map_or(&self.base_membership, |(_, m)| m)
    }
    /// Takes the entries the last log compaction dropped (after a snapshot
    /// is published or installed), so the host can free them on another
    /// thread: a snapshot interval's worth takes tens of milliseconds to
    /// free. Not taking them is fine: they are freed at the next compaction.
    pub fn take_compacted(&mut self) -> VecDeque<Entry> {
        std::mem::take(&mut self.compacted)
    }

    /// The next time `step(_, Event::Tick)` has something to do.
    pub fn next_deadline(&self) -> Nanos {
        if self.removed.is_some() {
            return Nanos::MAX;
        }
        let mut d = self.election_deadline;
        // (Request ids grow, so the first read waits longest.)
        if let Some((_, &t)) = self.forwarded_reads.first_key_value() {
            d = d.min(t);
        }
        if self.role == Role::Leader {
            d = self.heartbeat_deadline.min(self.check_quorum_deadline);
            if let Some((_, t)) = self.transfer {
                d = d.min(t);
            }
            // (Timers wait while a transfer is on: see `tick`.)
            if let Some(t) = self.next_timer_due().filter(|_| self.transfer.is_none()) {
                d = d.min(t);
            }
            if let Some(t) = self.commit_notify_at {
                d = d.min(t);
            }
        }
        d
    }
    /// The metadata of a snapshot of the state applied up to `position`:
    /// the term and timestamp of the entry ending there and the membership
    /// in force. `None` unless `position` is applied and the log still
    /// holds it (as its start, or an entry's end).
    pub fn snapshot_meta_at(&self, position: Position) -> Option<SnapshotMeta> {
        if position > self.applied || position < self.log.first_pos() {
            return None;
        }
        Some(SnapshotMeta {
            position,
            term: self.log.term_at(position)?,
            timestamp: self.log.timestamp_at(position)?,
            membership: self.membership_at(position),
        })
    }
    /// Follower lag as the leader sees it: (node, matched position).
    pub fn follower_progress(&self) -> Vec<(NodeId, Position)> {
        self.progress.iter().map(|(&n, p)| (n, p.matched)).collect()
    }

    // ----- the step function ---------------------------------------------

    /// Consumes one event at time `now`, appending actions to `out`.
    pub fn step(&mut self, now: Nanos, event: Event, out: &mut Vec<Action>) {
        // A clock that jumps backwards must not make deadlines unreachable
        // forever; deadlines are recomputed from `now` as they expire.
        self.now = now;
        if self.removed.is_some() {
            self.refuse_removed(event, out);
            return;
        }
        if self.hold_update_at.is_some_and(|at| now >= at) {
            // Before anything this step sends (the hard state is written
            // before the actions after it): a raised hold is on disk
            // before an acknowledgement reports it.
            self.hold_update_at = None;
            self.hold_persisted = self.cfg.election_timeout_min;
            self.persist_hard_state(out);
        }
        match event {
            Event::Tick => self.tick(out),
            Event::Message(m) => self.on_message(m, out),
            Event::Propose(ps) => self.propose(ps, out),
            Event::Read { id } => self.read(id, out),
            Event::Durable { position, term } => self.on_durable(position, term, out),
            Event::Applied { position, timers } => self.on_applied(position, timers),
            Event::SnapshotTaken { position } => self.on_snapshot_taken(position, out),
            Event::SnapshotPublished { position, size } => {
                self.on_snapshot_published(position, size)
            }
            Event::ChangeMembership { id, change } => self.change_membership(id, change, out),
            Event::TransferLeadership { id, target } => self.transfer_leadership(id, target, out),
        }
        self.flush(out);
    }

    fn tick(&mut self, out: &mut Vec<Action>) {
        let now = self.now;
        self.expire_forwarded_reads(out);
        if self.role == Role::Leader {
            if now >= self.check_quorum_deadline {
                self.check_quorum_deadline = now + self.cfg.election_timeout_min;
                if !self.check_quorum() {
                    self.become_follower(self.term, None, out);
                    return;
                }
            }
            if let Some((target, deadline)) = self.transfer {
                if now >= deadline {
                    self.transfer = None;
                    // A preference hand-over whose target never stood
                    // (TimeoutNow lost, never caught up): it did not lead.
                    if self.preference_handover == Some(target) {
                        self.settle_preference_handover(self.cfg.id);
                    }
                    self.release_held_forwards(out);
                }
            }
            self.maybe_move_to_preferred(out);
            if now >= self.heartbeat_deadline {
                self.heartbeat_due = true;
            }
            if self.commit_notify_at.is_some_and(|t| now >= t) {
                self.commit_notify_at = None;
                let behind: Vec<NodeId> = self
                    .progress
                    .iter()
                    .filter(|(_, p)| p.commit_sent < self.commit)
                    .map(|(&n, _)| n)
                    .collect();
                for n in behind {
                    self.send_heartbeat(n, out);
                }
            }
            // Not during a transfer: the target is told to stand once it
            // holds the whole log, and an entry appended after that would
            // make the voters refuse it (their logs would be ahead of its).
            // Timers fire once the transfer is over, at most an election
            // timeout late.
            if self.transfer.is_none() {
                self.fire_due_timers(out);
            }
        } else if now >= self.election_deadline {
            self.reset_election_deadline();
            if now < self.vote_hold_until {
                // A node that holds its vote does not cast it for itself
                // either. Only a restart with a lower election timeout
                // than before gets here (elsewhere a leader's message sets
                // the hold and a later deadline together).
                let spread = self.cfg.election_timeout_max - self.cfg.election_timeout_min;
                let at = self
                    .vote_hold_until
                    .saturating_add(self.rng.range(0, spread));
                self.election_deadline = self.election_deadline.max(at);
            } else if self.stands_for_election() {
                self.leader = None;
                self.start_pre_vote(out);
            } else if !self.is_joining() && !self.membership().voters.is_empty() {
                // A learner, or a node its latest configuration excludes,
                // that has not heard from a leader: ask the voters (a
                // pre-vote, which changes nothing here or there). A
                // voter whose committed configuration removed it answers
                // `Removed`; a node that was removed while away learns
                // it so. (A node that stood last time, and has learned
                // since that it need not, is a candidate no more.)
                if self.role != Role::Follower {
                    self.become_follower(self.term, None, out);
                }
                self.send_pre_votes(out);
            }
        }
    }

    /// Whether this node stands for election when its election timer runs
    /// out: as a voter of the configuration in force, or of the one before
    /// while the one in force is not known to be committed
    /// (`config_before`). A leader that removed itself and stepped down
    /// before the removal committed (cut off, say) may hold entries no
    /// voter left holds on disk: amnesic voters (`set_amnesic`) that lost
    /// them cannot elect a leader without it, and it is the one that can
    /// win (`tally` counts the votes of the configuration in force, and
    /// this node's among the one before's). Elected, it leads until the
    /// removal commits and hands over, as a leader that removes itself
    /// does.
    ///
    /// (On what it knows itself: what votes said is committed counts
    /// once noted in `settled_config`.)
    fn stands_for_election(&self) -> bool {
        let id = self.cfg.id;
        let before = || self.config_before_given(self.commit);
        self.membership().is_voter(id)
            || (!self.is_joining() && before().is_some_and(|c| c.is_voter(id)))
    }

    // ----- removal ----------------------------------------------------------

    /// A removed node's answer to any event: none, but requests are refused.
    fn refuse_removed(&mut self, event: Event, out: &mut Vec<Action>) {
        let ids: Vec<RequestId> = match event {
            Event::Propose(ps) => ps.into_iter().map(|p| p.id).collect(),
            Event::Read { id }
            | Event::ChangeMembership { id, .. }
            | Event::TransferLeadership { id, .. } => vec![id],
            _ => Vec::new(),
        };
        for id in ids {
            out.push(Action::Rejected {
                id,
                reason: RejectReason::Removed,
            });
        }
    }

    /// The configuration in force for entries after `pos` (the latest
    /// whose entry starts before it), and the position from which it is:
    /// the end of its entry, or the start of the log for the snapshot's.
    fn config_in_force_at(&self, pos: Position) -> (Position, &Membership) {
        self.membership_log
            .iter()
            .rev()
            .find(|(p, _)| *p < pos)
            .and_then(|(p, m)| self.log.entry_at(*p).map(|e| (e.end(), &**m)))
            .unwrap_or((self.log.first_pos(), &self.base_membership))
    }

    /// If node `n` is removed for good as far as this node knows (neither
    /// its latest configuration nor its committed one includes it): the
    /// position from which the committed one is in force.
    /// Only once its own latest configuration has committed as far as it
    /// knows: a node that restarted (its commit position back at its
    /// snapshot) or is catching up may hold an old configuration that
    /// excluded a node added since.
    fn removal_notice(&self, n: NodeId) -> Option<Position> {
        if self.is_joining() || n == 0 || n == self.cfg.id || self.membership().contains(n) {
            return None;
        }
        let at = if self.cfg.testing_bugs.removal_before_commit {
            self.log.last_pos() + 1
        } else {
            if self
                .membership_log
                .last()
                .is_some_and(|(p, _)| *p >= self.commit)
            {
                return None;
            }
            self.commit
        };
        let (position, committed) = self.config_in_force_at(at);
        (!committed.voters.is_empty() && !committed.contains(n)).then_some(position)
    }

    /// Joining: started with no membership and not caught up yet
    /// (`joining`), or no configuration this node holds (its snapshot's
    /// or its log's) has ever included it: it was never a member as far as
    /// its data goes (say a joining node that restarted before it got the
    /// entry that added it). A member holds the configuration that made
    /// it one until it is removed (a leader that commits its own removal
    /// stops at once).
    fn is_joining(&self) -> bool {
        self.joining || !self.holds_itself()
    }

    /// Whether a configuration this node holds (its snapshot's or its
    /// log's) includes it.
    fn holds_itself(&self) -> bool {
        let me = self.cfg.id;
        self.base_membership.contains(me) || self.membership_log.iter().any(|(_, m)| m.contains(me))
    }

    /// `by` says a committed configuration in force from `position`
    /// excludes this node.
    fn on_removed(&mut self, by: NodeId, position: Position, out: &mut Vec<Action>) {
        let me = self.cfg.id;
        let m = self.membership();
        let empty = m.voters.is_empty() && m.learners.is_empty();
        let joining = self.is_joining();
        // A configuration after it that includes this node (re-added): the
        // notice is stale.
        let later = self
            .membership_log
            .iter()
            .any(|(p, m)| *p >= position && m.contains(me))
            || (self.log.first_pos() >= position && self.base_membership.contains(me));
        if empty || joining || later {
            self.stats.removed_ignored += 1;
            return;
        }
        self.enter_removed(by, position, out);
    }

    /// Stops for good: pending reads are refused and nothing is done again.
    fn enter_removed(&mut self, by: NodeId, position: Position, out: &mut Vec<Action>) {
        let local_reads: Vec<RequestId> = self
            .reads
            .iter()
            .filter(|r| r.from.is_none())
            .map(|r| r.id)
            .chain(
                self.reads_waiting
                    .iter()
                    .filter(|r| r.1.is_none())
                    .map(|r| r.0),
            )
            .chain(std::mem::take(&mut self.forwarded_reads).into_keys())
            .collect();
        self.reads.retain(|r| r.from.is_some());
        self.reads_waiting.retain(|r| r.1.is_some());
        // Nobody to hand them to: this node stops (its own clients are
        // answered "removed" with every request it has waiting).
        let _ = self.drop_held_forwards();
        for id in local_reads {
            out.push(Action::Rejected {
                id,
                reason: RejectReason::Removed,
            });
        }
        if self.role == Role::Leader {
            // Refuses the followers' reads.
            self.abandon_leadership(out);
        }
        self.removed_peers.clear();
        self.votes.clear();
        self.set_role(Role::Follower, None, out);
        self.removed = Some((by, position));
        out.push(Action::Removed { by, position });
    }

    /// Joining: done once this node's log, as far as it matches the
    /// leader's and is durable, holds everything the leader has told it
    /// committed and an entry of the leader's term, and the configuration
    /// in force there includes it.
    ///
    /// The configuration that added it is then in that part of its log:
    /// either the leader appended it in its own term, after the previous
    /// configuration (the one that may have removed an earlier node of
    /// this id) and its term start committed, so the leader's commit
    /// position is past that one; or an earlier leader did, before this
    /// leader's term start. A configuration in force before the leader's
    /// commit position or its first entry (a snapshot taken, or entries
    /// appended, before an earlier node of this id was removed) may
    /// include that node, not this one. Only durable entries count (and
    /// an installed snapshot): the runtime records that this node stopped
    /// joining, and a restart must find the configuration that added it.
    ///
    /// Checked wherever what this node acknowledges may change (appends,
    /// durable entries, snapshots): a leader promotes a learner on an
    /// acknowledgement that shows it finished joining by the same test
    /// (`change_membership`), and a node promoted while still joining here
    /// would ignore that leader for good (`Body::Append::to_voter`).
    fn note_join_progress(&mut self, leader_commit: Option<Position>) {
        if !self.joining {
            return;
        }
        if let Some(c) = leader_commit {
            self.join_commit = self.join_commit.max(c);
        }
        let upto = self.matched.min(self.durable);
        let caught_up = upto >= self.join_commit
            && self.leader.is_some()
            && self.log.term_at(upto) == Some(self.term);
        if caught_up && self.membership_at(upto).contains(self.cfg.id) {
            self.joining = false;
            self.joining_votes = false;
        }
    }

    /// Leader: did a quorum of voters talk to us in the last period?
    fn check_quorum(&mut self) -> bool {
        let me = self.cfg.id;
        let membership = self.membership().clone();
        let mut active = usize::from(membership.is_voter(me));
        for (&n, p) in self.progress.iter_mut() {
            if p.active && membership.is_voter(n) {
                active += 1;
            }
            p.active = false;
        }
        active >= membership.quorum()
    }

    fn reset_election_deadline(&mut self) {
        let (min, max) = (self.cfg.election_timeout_min, self.cfg.election_timeout_max);
        let t = if self.defers_to_preferred() {
            // After the preferred voters' range (see `preferred_leaders`).
            self.rng.range(max, max.saturating_add(max - min))
        } else {
            self.rng.range(min, max)
        };
        self.election_deadline = self.now.saturating_add(t);
    }

    /// A voter outside a non-empty `Config::preferred_leaders` while the
    /// configuration has a preferred voter: its elections start later.
    fn defers_to_preferred(&self) -> bool {
        let preferred = &self.cfg.preferred_leaders;
        !preferred.is_empty()
            && !preferred.contains(&self.cfg.id)
            && self
                .membership()
                .voters
                .iter()
                .any(|v| preferred.contains(v))
    }

    /// Leader outside `Config::preferred_leaders`: hands leadership to the
    /// preferred voter within `max_batch_bytes` of the log end that has
    /// answered without a break for the hold (the most caught up, the
    /// lowest id on ties), as `transfer_leadership` does. Not while a
    /// transfer is on, before this term's first entry has committed, while
    /// backing off after a failed hand-over, or in a term won through a
    /// transfer from a voter.
    fn maybe_move_to_preferred(&mut self, out: &mut Vec<Action>) {
        let preferred = &self.cfg.preferred_leaders;
        let now = self.now;
        if preferred.is_empty()
            || preferred.contains(&self.cfg.id)
            || self.by_transfer
            || self.transfer.is_some()
            || now < self.next_preference_move
            || self.commit < self.term_start_end()
        {
            return;
        }
        let hold = self.cfg.preferred_leader_hold;
        let gap = self.answer_gap_limit();
        let last = self.log.last_pos();
        let membership = self.membership();
        let target = self
            .progress
            .iter()
            .filter(|&(n, p)| {
                preferred.contains(n)
                    && membership.is_voter(*n)
                    && p.state == ProgressState::Replicate
                    && last.saturating_sub(p.matched) <= self.cfg.max_batch_bytes
                    && p.answered.is_some_and(|(at, since)| {
                        now.saturating_sub(at) <= gap && now.saturating_sub(since) >= hold
                    })
            })
            // The most caught up; on a tie the lowest id (the first).
            .max_by_key(|&(&n, p)| (p.matched, std::cmp::Reverse(n)))
            .map(|(&n, _)| n);
        if let Some(target) = target {
            self.stats.preference_transfers += 1;
            self.next_preference_move = now.saturating_add(hold);
            self.preference_handover = Some(target);
            self.transfer = Some((target, now + self.cfg.election_timeout_min));
            self.maybe_send_timeout_now(target, out);
        }
    }

    /// The longest silence of a follower that still counts as answering
    /// without a break (`Config::preferred_leader_hold`): half the minimum
    /// election timeout. Followers answer at least once per heartbeat, so
    /// this spans several lost answers or a TCP retransmission, but not an
    /// outage long enough to matter.
    fn answer_gap_limit(&self) -> Nanos {
        self.cfg.election_timeout_min / 2
    }

    /// A leader is known (`leader`: this node itself when it was elected,
    /// or when its hand-over's transfer ran out): a preference hand-over
    /// this node made is settled. Handed to a node that did not come to
    /// lead (it cannot reach a quorum, say), the next one waits four times
    /// longer per failure in a row, up to 64 holds; a preferred leader
    /// ends the row.
    fn settle_preference_handover(&mut self, leader: NodeId) {
        if self.cfg.preferred_leaders.contains(&leader) {
            // A preferred voter leads: earlier failures are not in a row.
            self.preference_failures = 0;
        }
        let Some(target) = self.preference_handover.take() else {
            return;
        };
        if leader == target {
            self.preference_failures = 0;
        } else {
            self.preference_failures = (self.preference_failures + 1).min(3);
            let wait = self
                .cfg
                .preferred_leader_hold
                .saturating_mul(1 << (2 * self.preference_failures));
            self.next_preference_move = self.now.saturating_add(wait);
        }
    }

    /// Leader stickiness: true while this node refuses to vote for (or
    /// pre-vote for) another candidate, being a leader or having heard
    /// from one within an election timeout (see `vote_hold_until`).
    fn sticky(&self) -> bool {
        self.role == Role::Leader || self.now < self.vote_hold_until
    }

    /// Leader: may a read be answered at once (a lease read)?
    fn holds_read_lease(&self) -> bool {
        self.cfg.lease_reads
            && self.role == Role::Leader
            && self.transfer.is_none()
            && self
                .timeout_now_sent
                .values()
                .all(|&sent_at| self.commit > sent_at)
            && self.now < self.lease_until
    }

    /// Leader: a new heartbeat sequence number, carried by every message
    /// sent from now on; with lease reads, when it was created (unless one
    /// was recorded less than `HEARTBEAT_TIME_GRAIN` ago).
    fn next_heartbeat_seq(&mut self) {
        self.heartbeat_seq += 1;
        let recent = self
            .heartbeat_times
            .back()
            .is_some_and(|&(_, t)| self.now < t.saturating_add(HEARTBEAT_TIME_GRAIN));
        if self.cfg.lease_reads && !recent {
            self.heartbeat_times
                .push_back((self.heartbeat_seq, self.now));
        }
    }

    fn persist_hard_state(&self, out: &mut Vec<Action>) {
        out.push(Action::PersistHardState(HardState {
            term: self.term,
            voted_for: self.voted_for,
            hold: self.hold_persisted,
        }));
    }

    fn send(&self, to: NodeId, body: Body, out: &mut Vec<Action>) {
        self.send_with_term(to, self.term, body, out);
    }

    fn message(&self, to: NodeId, body: Body) -> Message {
        Message {
            cluster_id: self.cfg.cluster_id,
            from: self.cfg.id,
            to,
            term: self.term,
            body,
        }
    }

    fn send_with_term(&self, to: NodeId, term: Term, body: Body, out: &mut Vec<Action>) {
        out.push(Action::Send(Message {
            cluster_id: self.cfg.cluster_id,
            from: self.cfg.id,
            to,
            term,
            body,
        }));
    }

    fn set_role(&mut self, role: Role, leader: Option<NodeId>, out: &mut Vec<Action>) {
        let changed = self.role != role || self.leader != leader;
        self.role = role;
        self.leader = leader;
        if matches!(role, Role::Candidate | Role::Leader) {
            // In a term of its own: no leader sends the rest. (A
            // pre-candidate may hear from its leader again and go on.)
            self.set_incoming(None);
        }
        if role == Role::Follower && leader.is_some() {
            self.release_held_forwards(out);
        }
        if changed {
            out.push(Action::RoleChanged {
                role,
                term: self.term,
                leader,
            });
        }
    }

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>, out: &mut Vec<Action>) {
        let new_term = term > self.term;
        if new_term {
            self.term = term;
            self.voted_for = None;
            self.persist_hard_state(out);
        }
        if self.role == Role::Leader {
            self.abandon_leadership(out);
        }
        // What matched the old leader says nothing about the new one, even
        // when the same node leads again in a later term.
        if new_term || self.leader != leader {
            for id in std::mem::take(&mut self.forwarded_reads).into_keys() {
                out.push(Action::Rejected {
                    id,
                    reason: RejectReason::NotLeader { leader },
                });
            }
            self.matched = 0;
            self.acked = (0, 0);
            self.acked_at = None;
            self.leader_heartbeat = 0;
        }
        self.votes.clear();
        self.set_role(Role::Follower, leader, out);
        self.reset_election_deadline();
    }

    fn abandon_leadership(&mut self, out: &mut Vec<Action>) {
        self.progress.clear();
        self.removed_peers.clear();
        self.transfer = None;
        self.lease_until = 0;
        self.heartbeat_times.clear();
        self.commit_notify_at = None;
        self.timers_fired.clear();
        let reads: Vec<(RequestId, Option<NodeId>)> = self
            .reads
            .drain(..)
            .map(|r| (r.id, r.from))
            .chain(self.reads_waiting.drain(..))
            .collect();
        for (id, from) in reads {
            self.answer_read(id, from, None, out);
        }
    }

    // ----- elections -------------------------------------------------------

    fn start_pre_vote(&mut self, out: &mut Vec<Action>) {
        self.stats.pre_votes_started += 1;
        // No leader is left to take them (as far as this node can tell):
        // its own clients' are refused (never appended, nor sent), so
        // they may retry; followers' clients are answered when their
        // writes time out.
        for id in self.drop_held_forwards() {
            out.push(Action::Rejected {
                id,
                reason: RejectReason::NotLeader { leader: None },
            });
        }
        self.votes.clear();
        self.votes.insert(self.cfg.id, self.ballot(true));
        self.set_role(Role::PreCandidate, None, out);
        if self.tally() == Some(true) {
            self.campaign(false, out);
            return;
        }
        self.send_pre_votes(out);
    }

    /// Asks every other voter whether it would vote for us at the next
    /// term (without moving to it).
    fn send_pre_votes(&mut self, out: &mut Vec<Action>) {
        for n in self.electorate() {
            self.send_with_term(
                n,
                self.term + 1,
                Body::PreVote {
                    last_pos: self.log.last_pos(),
                    last_term: self.log.last_term(),
                },
                out,
            );
        }
    }

    fn campaign(&mut self, transfer: bool, out: &mut Vec<Action>) {
        self.stats.elections_started += 1;
        self.by_transfer = transfer;
        self.term += 1;
        self.voted_for = Some(self.cfg.id);
        self.persist_hard_state(out);
        self.votes.clear();
        self.votes.insert(self.cfg.id, self.ballot(true));
        self.set_role(Role::Candidate, None, out);
        self.reset_election_deadline();
        if self.tally() == Some(true) {
            self.become_leader(out);
            return;
        }
        for n in self.electorate() {
            self.send(
                n,
                Body::Vote {
                    last_pos: self.log.last_pos(),
                    last_term: self.log.last_term(),
                    transfer,
                },
                out,
            );
        }
    }

    /// Records `from`'s answer to this node's (pre-)vote request, and
    /// notes what it says is committed: the tally after it.
    fn count_ballot(&mut self, from: NodeId, ballot: Ballot) -> Option<bool> {
        self.votes.insert(from, ballot);
        self.note_settled_config_upto(self.committed_here());
        self.tally()
    }

    /// This node's answer to a (pre-)vote request.
    fn ballot(&self, granted: bool) -> Ballot {
        Ballot {
            granted,
            amnesic: self.amnesic && !self.cfg.testing_bugs.amnesia_ignored,
            committed: self.known_committed(),
        }
    }

    /// The latest entry this node knows is committed, as (end position,
    /// term), `(0, 0)` if none: the one at its commit position, or the
    /// settled membership entry, which a restart remembers while its
    /// commit position starts over.
    fn known_committed(&self) -> (Position, Term) {
        let by_commit = self.log.term_at(self.commit).map(|t| (self.commit, t));
        let by_config = (self.config_settled > 0)
            .then(|| self.log.entry_at(self.config_settled))
            .flatten()
            .map(|e| (e.end(), e.term));
        by_commit
            .into_iter()
            .chain(by_config)
            .max()
            .unwrap_or((0, 0))
    }

    /// How far this node knows its own log is committed: its commit
    /// position, or further, to the latest entry a voter said it knows is
    /// committed (`Ballot::committed`) that this log holds too (the same
    /// position and term: the same entries up to it).
    fn committed_here(&self) -> Position {
        self.votes
            .values()
            .map(|b| b.committed)
            .filter(|&(p, t)| p > self.commit && self.log.term_at(p) == Some(t))
            .map(|(p, _)| p)
            .fold(self.commit, Position::max)
    }

    /// The configuration before the one in force, while the one in force
    /// is not known to be committed (here, before a restart:
    /// `settled_config`, or by a voter's word in this election:
    /// `committed_here`). See `tally`. (An entry of a later term after it
    /// does not settle it: voters of the one before that never got it may
    /// elect leaders of later terms still. Review, against an earlier
    /// version that took it so.)
    fn config_before(&self) -> Option<&Membership> {
        self.config_before_given(self.committed_here())
    }

    /// `config_before`, with this node's log known committed up to
    /// `committed`.
    fn config_before_given(&self, committed: Position) -> Option<&Membership> {
        let settled = |position: Position| position <= self.config_settled || position < committed;
        match self.membership_log.as_slice() {
            [.., (position, _)] if settled(*position) => None,
            [] => None,
            [(_, _)] => Some(&self.base_membership),
            [.., (_, before), _] => Some(&**before),
        }
    }

    /// Who a (pre-)candidate asks for votes: the voters of the
    /// configuration in force, and of the one before while that one counts
    /// (`config_before`).
    fn electorate(&self) -> Vec<NodeId> {
        let mut voters = self.membership().voters.clone();
        if let Some(before) = self.config_before() {
            voters.extend(before.voters.iter().copied());
        }
        voters.remove(&self.cfg.id);
        voters.into_iter().collect()
    }

    /// Some(true): won a quorum; Some(false): lost; None: undecided.
    /// Winning takes a quorum of votes (one leader per term), of which the
    /// votes of voters that are not amnesic (see `set_amnesic`) are
    /// enough to meet every quorum: then every entry a quorum acknowledged
    /// is held by one of them (amnesic ones may have lost theirs), whose
    /// vote says this node's log has it too. With an odd number of voters
    /// that is a quorum of them; with an even number, half. The votes of
    /// every voter win too: each that still holds an entry voted.
    ///
    /// While the configuration in force is not known to be committed
    /// (`config_before`), the
    /// one before it may have committed entries meanwhile, held by voters
    /// of that one only (a removed voter, say): the votes that count must
    /// meet every quorum of both (only the configuration in force counts
    /// towards the quorum of votes, which meets every quorum of the one
    /// before as single-server changes go: so this asks nothing more when
    /// no voter is amnesic). Once it is committed, a quorum of it holds
    /// everything before it on disk (a membership entry counts only once
    /// synced, with what precedes it).
    fn tally(&self) -> Option<bool> {
        let m = self.membership();
        let before = self.config_before();
        // Every quorum of `c` meets the votes from voters that kept their
        // logs, or every voter of `c` voted.
        let holds = |c: &Membership| {
            let ballots = || c.voters.iter().filter_map(|n| self.votes.get(n));
            let kept = ballots().filter(|b| b.granted && !b.amnesic).count();
            let granted = ballots().filter(|b| b.granted).count();
            kept > c.voters.len().saturating_sub(c.quorum()) || granted == c.voters.len()
        };
        let ballots = || m.voters.iter().filter_map(|n| self.votes.get(n));
        let granted = ballots().filter(|b| b.granted).count();
        let denied = ballots().filter(|b| !b.granted).count();
        if granted >= m.quorum() && holds(m) && before.is_none_or(holds) {
            Some(true)
        } else if denied > m.voters.len() - m.quorum() {
            Some(false)
        } else {
            None
        }
    }

    /// Whether a (pre-)vote may go to a candidate whose log ends at
    /// `last_pos` in `last_term`: its log is at least as up to date as
    /// ours, and we are not joining. A joining node's data says nothing a
    /// quorum may count on: it may be empty, or hold a snapshot or entries
    /// from before an earlier node of its id was removed, so a candidate
    /// that missed the removal (cut off, paused) and still counts this id
    /// as a voter would win with its vote without holding what the
    /// cluster committed since. (Simulator seed 10621 of `chaos`.) Only a
    /// leader ends a node's joining, so a voter that is joining withholds
    /// a vote the others may need to elect one: a leader promotes only a
    /// learner that has finished joining (`change_membership`), which
    /// leaves a voter that restarted before its runtime recorded that it
    /// joined (`resume_joining`): it votes again once a leader reaches it.
    /// (Data of an earlier version, `resume_joining_voting`, votes as there.)
    fn grants_vote_to(&self, last_term: Term, last_pos: Position) -> bool {
        let votes = !self.is_joining() || (self.joining_votes && self.holds_itself());
        self.cfg.testing_bugs.vote_without_log_check
            || (votes && self.log.is_up_to_date(last_term, last_pos))
    }

    fn become_leader(&mut self, out: &mut Vec<Action>) {
        self.stats.became_leader += 1;
        self.settle_preference_handover(self.cfg.id);
        self.set_role(Role::Leader, Some(self.cfg.id), out);
        self.votes.clear();
        self.progress.clear();
        let last = self.log.last_pos();
        let peers: Vec<NodeId> = self.membership().peers(self.cfg.id).collect();
        for n in peers {
            self.progress.insert(n, self.new_progress(last));
        }
        self.check_quorum_deadline = self.now + self.cfg.election_timeout_min;
        self.heartbeat_due = true;
        self.lease_until = 0;
        self.timeout_now_sent.clear();
        self.heartbeat_times.clear();
        self.timers_fired.clear();
        self.term_start_pos = last;
        let mark = Bytes::from_static(TERM_START_MARK);
        self.append_entries(vec![(EntryKind::TermStart, mark)], out);
        self.release_held_forwards(out);
    }

    fn new_progress(&self, next: Position) -> Progress {
        Progress {
            matched: 0,
            next,
            state: ProgressState::Probe,
            paused_since: None,
            active: true,
            heartbeat: 0,
            lease_end: 0,
            snapshot_pos: 0,
            snapshot_offset: 0,
            snapshot_sent: 0,
            last_progress: 0,
            commit_sent: 0,
            forwarded: VecDeque::new(),
            answered: None,
        }
    }

    // ----- messages -------------------------------------------------------

    fn on_message(&mut self, m: Message, out: &mut Vec<Action>) {
        if m.cluster_id != self.cfg.cluster_id || m.to != self.cfg.id || m.from == self.cfg.id {
            return;
        }
        if let Body::Removed { position } = m.body {
            // Whatever its term: a committed configuration stays committed.
            self.on_removed(m.from, position, out);
            return;
        }
        // A leader that counts this node, still joining, as a voter takes
        // it for an earlier node of its id (removed, or whose disk was
        // lost): a joining node is a learner until it has caught up, and
        // is promoted only after (its runtime records that before its
        // acknowledgement says so). This node holds neither that node's
        // term nor its log: were it to follow that leader, a stale one
        // (cut off through the removal) could commit with its answers what
        // the cluster overwrote. It is not heard at all, its term neither.
        // (A node an earlier version created to join follows any leader,
        // as it did there.) Nor does a node none of whose configurations
        // includes it (`is_joining`): its runtime may have recorded that it
        // joined and crashed before the snapshot that added it was on disk,
        // or the entry that added it was uncommitted and overwritten; no
        // leader promoted it (a promotion follows the acknowledgement of a
        // configuration that includes it, which it would hold), so one
        // that counts it as a voter takes it for an earlier node too.
        if self.is_joining() && !self.joining_votes {
            if let Body::Append { to_voter: true, .. }
            | Body::InstallSnapshot { to_voter: true, .. } = m.body
            {
                self.stats.to_voter_ignored += 1;
                return;
            }
        }
        // A node removed for good is told so, and not heard (its votes and
        // terms would only disturb). A leader's messages are taken: this
        // node may be behind a configuration that added the sender again,
        // and a removed leader's last `TimeoutNow` hands leadership over.
        // So is a (pre-)vote from a log at least as up to date as ours:
        // it may hold configurations we have not seen that added the
        // candidate (again), and our vote may be the one a quorum needs
        // (a removed node's log is behind ours: no leader sent it anything
        // after the entry removing it, which we hold).
        let from_leader = matches!(
            m.body,
            Body::Append { .. } | Body::InstallSnapshot { .. } | Body::TimeoutNow { .. }
        );
        let may_know_more = match m.body {
            Body::PreVote {
                last_pos,
                last_term,
            }
            | Body::Vote {
                last_pos,
                last_term,
                ..
            } => self.log.is_up_to_date(last_term, last_pos),
            _ => false,
        };
        if !from_leader && !may_know_more {
            if let Some(position) = self.removal_notice(m.from) {
                self.stats.removed_sent += 1;
                self.send(m.from, Body::Removed { position }, out);
                return;
            }
        }
        if m.term > self.term {
            match &m.body {
                Body::PreVote { .. } => {}
                Body::PreVoteResp { granted: true, .. } => {}
                Body::Vote { transfer, .. } => {
                    if !transfer && self.sticky() {
                        return; // leader stickiness: a live leader is heard
                    }
                    // A follower moves to the candidate's term but keeps its
                    // election timer unless it grants the vote (below), as
                    // in Raft: otherwise candidates that cannot win (shorter
                    // logs, split votes) would keep resetting the timer of
                    // the node that could, and with a narrow timeout range
                    // and a slow clock it might never stand.
                    // (A pre-candidate has not moved to a term of its own:
                    // it is a follower asking around, and keeps its timer too.)
                    let keeps = matches!(self.role, Role::Follower | Role::PreCandidate);
                    let deadline = keeps.then_some(self.election_deadline);
                    self.become_follower(m.term, None, out);
                    if let Some(d) = deadline {
                        self.election_deadline = d;
                    }
                }
                Body::Append { .. } | Body::InstallSnapshot { .. } | Body::TimeoutNow { .. } => {
                    self.become_follower(m.term, Some(m.from), out);
                }
                _ => self.become_follower(m.term, None, out),
            }
        } else if m.term < self.term {
            match m.body {
                Body::Append { .. } | Body::InstallSnapshot { .. } => {
                    // Tell a stale leader about the newer term.
                    self.send(
                        m.from,
                        Body::AppendResp {
                            ok: false,
                            position: 0,
                            hint_pos: 0,
                            hint_term: 0,
                            heartbeat: 0,
                            hold: self.cfg.election_timeout_min,
                        },
                        out,
                    );
                }
                Body::PreVote { .. } => self.send(m.from, self.ballot(false).pre_vote_resp(), out),
                Body::Vote { .. } => self.send(m.from, self.ballot(false).vote_resp(), out),
                // Sent to this node as the leader of an earlier term.
                Body::Forward { commands } => self.on_forward(m.from, m.term, commands, out),
                _ => {}
            }
            return;
        }
        match m.body {
            Body::PreVote {
                last_pos,
                last_term,
            } => {
                let granted = !self.sticky() && self.grants_vote_to(last_term, last_pos);
                let term = if granted { m.term } else { self.term };
                let resp = self.ballot(granted).pre_vote_resp();
                self.send_with_term(m.from, term, resp, out);
            }
            Body::PreVoteResp {
                granted,
                amnesic,
                committed,
            } => {
                if self.role == Role::PreCandidate && m.term == self.term + 1 {
                    let ballot = Ballot {
                        granted,
                        amnesic,
                        committed,
                    };
                    match self.count_ballot(m.from, ballot) {
                        Some(true) => self.campaign(false, out),
                        Some(false) => self.become_follower(self.term, None, out),
                        None => {}
                    }
                }
            }
            Body::Vote {
                last_pos,
                last_term,
                transfer,
            } => {
                // (Stickiness holds at an equal term too: this node may have
                // heard from a leader of an earlier term just before a
                // higher-term message moved it on.)
                let can_vote = self.voted_for.is_none_or(|v| v == m.from);
                let granted = can_vote
                    && self.role != Role::Leader
                    && (transfer || !self.sticky())
                    && self.grants_vote_to(last_term, last_pos);
                if granted {
                    self.voted_for = Some(m.from);
                    self.persist_hard_state(out);
                    self.reset_election_deadline();
                }
                self.send(m.from, self.ballot(granted).vote_resp(), out);
            }
            Body::VoteResp {
                granted,
                amnesic,
                committed,
            } => {
                if self.role == Role::Candidate {
                    let ballot = Ballot {
                        granted,
                        amnesic,
                        committed,
                    };
                    match self.count_ballot(m.from, ballot) {
                        Some(true) => self.become_leader(out),
                        Some(false) => self.become_follower(self.term, None, out),
                        None => {}
                    }
                }
            }
            Body::Append {
                prev_pos,
                prev_term,
                commit,
                heartbeat,
                entries,
                ..
            } => {
                self.heard_from_leader(m.from, out);
                self.on_append(prev_pos, prev_term, commit, heartbeat, entries, out);
                self.note_join_progress(Some(commit));
            }
            Body::AppendResp {
                ok,
                position,
                hint_pos,
                hint_term,
                heartbeat,
                hold,
            } => {
                if self.role == Role::Leader {
                    let echo = (heartbeat, hold);
                    self.on_append_resp(m.from, ok, position, hint_pos, hint_term, echo, out);
                }
            }
            Body::InstallSnapshot {
                meta,
                offset,
                chunk,
                done,
                ..
            } => {
                self.heard_from_leader(m.from, out);
                self.on_snapshot_chunk(meta, offset, chunk, done, out);
                // The installed snapshot (or one already covered) is
                // acknowledged in this step: where that tells the leader
                // this node finished joining (its position, of the
                // leader's term, past all it said was committed, in a
                // configuration that includes the node), the node must
                // have, or once promoted it ignores that leader for good.
                self.note_join_progress(None);
            }
            Body::SnapshotAck { position, received } => {
                if self.role == Role::Leader {
                    self.on_snapshot_ack(m.from, position, received);
                }
            }
            Body::TimeoutNow { last_pos } => {
                // An entry of this term past `last_pos` was appended after
                // the message was sent: the transfer may be over.
                let stale = self.log.last_term() == m.term
                    && self.log.last_pos() > last_pos
                    && !self.cfg.testing_bugs.stale_timeout_now;
                if !stale && self.membership().is_voter(self.cfg.id) && self.role != Role::Leader {
                    // A removed leader's hand-over (the sender is no voter
                    // of our latest configuration) is nobody's choice: the
                    // winner may still hand over to a preferred voter.
                    let chosen = self.membership().is_voter(m.from);
                    self.campaign(true, out);
                    self.by_transfer = self.by_transfer && chosen;
                }
            }
            Body::Forward { commands } => self.on_forward(m.from, m.term, commands, out),
            Body::ReadIndex { id } => {
                if self.role == Role::Leader {
                    self.leader_read(id, Some(m.from), out);
                } else {
                    self.answer_read(id, Some(m.from), None, out);
                }
            }
            // (Handled above.)
            Body::Removed { .. } => {}
            Body::ReadIndexResp { id, index, ok } => {
                if self.forwarded_reads.remove(&id).is_some() {
                    if ok && Some(m.from) == self.leader {
                        out.push(Action::ReadReady { id, index });
                    } else {
                        out.push(Action::Rejected {
                            id,
                            reason: RejectReason::NotLeader {
                                leader: self.leader,
                            },
                        });
                    }
                }
            }
        }
    }

    fn heard_from_leader(&mut self, from: NodeId, out: &mut Vec<Action>) {
        self.settle_preference_handover(from);
        if self.role != Role::Follower || self.leader != Some(from) {
            self.become_follower(self.term, Some(from), out);
        }
        let hold = self.now.saturating_add(self.cfg.election_timeout_min);
        self.vote_hold_until = self.vote_hold_until.max(hold);
        self.reset_election_deadline();
    }

    fn on_append(
        &mut self,
        prev_pos: Position,
        prev_term: Term,
        leader_commit: Position,
        heartbeat: u64,
        entries: Vec<Entry>,
        out: &mut Vec<Action>,
    ) {
        if !follows_on(prev_pos, &entries) {
            // No correct leader sends one (a peer's bug, or bytes that are
            // not a leader's): nothing of it is taken, as a message lost.
            self.stats.malformed_appends += 1;
            return;
        }
        self.leader_heartbeat = self.leader_heartbeat.max(heartbeat);
        // Answered if it tells the leader something new (a position, a
        // newer heartbeat: see `flush`), and otherwise if the leader has not
        // heard from us for `quiet_answer_limit`: its check-quorum counts on
        // hearing from us, but an answer to a commit-only notification right
        // after an acknowledgement would wake it (and cost a message) for
        // nothing.
        self.ack_due = true;
        self.ack_forced = self.acked_at.is_none_or(|t| {
            // (A clock that went backwards answers at once.)
            self.now < t || self.now >= t.saturating_add(self.quiet_answer_limit())
        });
        let (mut prev_pos, mut prev_term) = (prev_pos, prev_term);
        let mut entries = entries;
        // Entries at or below our commit position are committed and so
        // identical to ours: skip them (they may be compacted away here).
        if prev_pos < self.commit {
            let skip = entries
                .iter()
                .take_while(|e| e.end() <= self.commit)
                .count();
            entries.drain(..skip);
            match entries.first() {
                Some(e) if e.position == self.commit => {
                    prev_pos = self.commit;
                    prev_term = self.log.term_at(self.commit).unwrap_or(0);
                }
                Some(_) => return, // not on a boundary of ours: malformed
                None => {
                    // Nothing new; everything in it is known to match.
                    self.matched = self.matched.max(self.commit);
                    self.advance_follower_commit(leader_commit, out);
                    return;
                }
            }
        }
        if self.log.term_at(prev_pos) != Some(prev_term) {
            let upto = prev_pos.min(self.log.last_pos());
            let (hint_pos, hint_term) = self.log.last_boundary_at_or_before(upto, prev_term);
            self.ack_due = false;
            self.ack_forced = false;
            self.send(
                self.leader.unwrap_or(0),
                Body::AppendResp {
                    ok: false,
                    position: prev_pos,
                    hint_pos,
                    hint_term,
                    heartbeat: self.leader_heartbeat,
                    hold: self.cfg.election_timeout_min,
                },
                out,
            );
            return;
        }
        let msg_end = entries.last().map_or(prev_pos, Entry::end);
        // Skip what we already hold; truncate at the first conflict.
        let mut first_new = entries.len();
        for (i, e) in entries.iter().enumerate() {
            match self.log.entry_at(e.position) {
                Some(ours) if ours.term == e.term => continue,
                Some(_) => {
                    if e.position < self.commit {
                        return; // would rewrite committed history: refuse
                    }
                    self.truncate_from(e.position, out);
                    first_new = i;
                    break;
                }
                None => {
                    first_new = i;
                    break;
                }
            }
        }
        if first_new < entries.len() {
            let new: Vec<Entry> = entries.drain(first_new..).collect();
            if new[0].position != self.log.last_pos() {
                return; // a gap: malformed
            }
            for e in &new {
                if let EntryKind::Membership(m) = &e.kind {
                    self.membership_log.push((e.position, m.clone()));
                }
                self.log.push(e.clone());
            }
            out.push(Action::Append(new));
            // The answer that matters is the acknowledgement once they are
            // durable (`on_durable`). Answer now only to confirm a newer
            // heartbeat (a read waits on it): an early answer would cost
            // the leader a wake-up for nothing new.
            if self.leader_heartbeat == self.acked.1 {
                self.ack_due = false;
                self.ack_forced = false;
            }
        }
        self.matched = self.matched.max(msg_end);
        self.advance_follower_commit(leader_commit, out);
    }

    /// How long a follower may leave an append with nothing new
    /// unanswered after its last answer: half a heartbeat interval, and
    /// less when heartbeats are slow, so that the longest silence (a
    /// heartbeat interval plus this) stays below the leader's check-quorum
    /// window (`election_timeout_min`).
    fn quiet_answer_limit(&self) -> Nanos {
        let (hb, window) = (self.cfg.heartbeat_interval, self.cfg.election_timeout_min);
        (hb / 2).min(window.saturating_sub(hb) / 2)
    }

    fn truncate_from(&mut self, pos: Position, out: &mut Vec<Action>) {
        self.log.truncate_from(pos);
        self.membership_log.retain(|(p, _)| *p < pos);
        self.durable = self.durable.min(pos);
        self.matched = self.matched.min(pos);
        out.push(Action::Truncate { from: pos });
    }

    fn advance_follower_commit(&mut self, leader_commit: Position, out: &mut Vec<Action>) {
        let c = leader_commit.min(self.matched).min(self.log.last_pos());
        if c > self.commit && self.log.term_at(c).is_some() {
            self.commit = c;
            self.emit_apply(out);
            if self.incoming.as_ref().is_some_and(|f| f.meta.position <= c)
                && !self.cfg.testing_bugs.install_snapshot_below_commit
            {
                // Caught up by appends (a new leader that had the log): a
                // snapshot this far back would be refused when whole.
                self.set_incoming(None);
            }
        }
    }

    /// An amnesic node that committed an entry of its current term is no
    /// longer amnesic (see `set_amnesic`).
    fn end_amnesia(&mut self) {
        if self.amnesic && self.log.term_at(self.commit) == Some(self.term) {
            self.amnesic = false;
            self.stats.amnesia_ended += 1;
        }
    }

    fn emit_apply(&mut self, out: &mut Vec<Action>) {
        self.end_amnesia();
        self.note_settled_config();
        if self.commit > self.apply_sent {
            let from = if self.cfg.testing_bugs.apply_from_applied {
                self.applied
            } else {
                self.apply_sent
            };
            let entries = self.log.entries_between(from, self.commit);
            self.apply_sent = self.commit;
            if !entries.is_empty() {
                out.push(Action::Apply(entries));
            }
        }
    }

    /// Starts receiving a snapshot file from this term's leader (`Some`),
    /// or drops what was held.
    fn set_incoming(&mut self, meta: Option<SnapshotMeta>) {
        self.incoming = meta.map(|meta| IncomingSnapshot {
            meta,
            term: self.term,
            buf: Vec::new(),
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            end: None,
        });
    }

    fn on_snapshot_chunk(
        &mut self,
        meta: SnapshotMeta,
        offset: u64,
        chunk: Bytes,
        done: bool,
        out: &mut Vec<Action>,
    ) {
        if meta.position <= self.commit && !self.cfg.testing_bugs.install_snapshot_below_commit {
            // Already have everything it covers: acknowledge as installed.
            // (A newer file being received stays.)
            if self
                .incoming
                .as_ref()
                .is_some_and(|f| f.meta.position <= self.commit)
            {
                self.set_incoming(None);
            }
            self.ack_due = true;
            self.ack_forced = true;
            self.matched = self.matched.max(meta.position.min(self.commit));
            return;
        }
        // A file is known by its snapshot and the term of the leader
        // sending it: another leader's file of the same snapshot may differ
        // (and be shorter), and is never joined to what was held. Within a
        // term, a newer snapshot's file replaces an older one (a leader
        // restarts a transfer with each file it publishes), and a late
        // chunk of an older one is ignored.
        let same = match &self.incoming {
            None => false,
            Some(f) if f.term != self.term => false,
            Some(f) if f.meta.position == meta.position && f.meta.term == meta.term => true,
            Some(f) if f.meta.position > meta.position => {
                self.send(
                    self.leader.unwrap_or(0),
                    Body::SnapshotAck {
                        position: meta.position,
                        received: 0,
                    },
                    out,
                );
                return;
            }
            Some(_) => false,
        };
        if !same {
            self.set_incoming(Some(meta.clone()));
        }
        let max_ahead = self.cfg.max_inflight_bytes;
        let mut received = 0;
        let mut whole = false;
        if let Some(f) = self.incoming.as_mut() {
            if done {
                f.end = Some(offset.saturating_add(chunk.len() as u64));
            }
            let held = f.buf.len() as u64;
            if offset == held {
                f.buf.extend_from_slice(&chunk);
                // Chunks that came early follow on now.
                while let Some(next) = f.ahead.remove(&(f.buf.len() as u64)) {
                    f.ahead_bytes -= next.len() as u64;
                    f.buf.extend_from_slice(&next);
                }
            } else if offset > held
                && f.ahead_bytes + chunk.len() as u64 <= max_ahead
                && !f.ahead.contains_key(&offset)
            {
                f.ahead_bytes += chunk.len() as u64;
                f.ahead.insert(offset, chunk);
            }
            received = f.buf.len() as u64;
            whole = f.end == Some(received);
        }
        if whole {
            if let Some(f) = self.incoming.take() {
                if (self.cfg.snapshot_check)(&f.meta, &f.buf) {
                    self.on_install_snapshot(f.meta, Bytes::from(f.buf), out);
                    return;
                }
                // Damaged on the way (or on the leader's disk): start over.
                self.stats.snapshots_rejected += 1;
                received = 0;
            }
        }
        self.send(
            self.leader.unwrap_or(0),
            Body::SnapshotAck {
                position: meta.position,
                received,
            },
            out,
        );
    }

    fn on_snapshot_ack(&mut self, from: NodeId, position: Position, received: u64) {
        let now = self.now;
        if let Some(p) = self.progress.get_mut(&from) {
            p.active = true;
            if p.state == ProgressState::Snapshot && p.snapshot_pos == position {
                if received > p.snapshot_offset {
                    p.paused_since = Some(now);
                    p.snapshot_sent = p.snapshot_sent.max(received);
                }
                // Less than before: an answer overtaken by a later one, or
                // the follower started over (the file failed its check, or
                // it dropped what it had). Either way the chunks from there
                // go again if nothing more is acknowledged for a while.
                p.snapshot_offset = received;
            }
        }
    }

    fn on_install_snapshot(&mut self, meta: SnapshotMeta, image: Bytes, out: &mut Vec<Action>) {
        self.ack_due = true;
        self.ack_forced = true;
        if meta.position <= self.commit && !self.cfg.testing_bugs.install_snapshot_below_commit {
            self.matched = self.matched.max(meta.position.min(self.commit));
            return;
        }
        self.compacted = self
            .log
            .compact_to(meta.position, meta.term, meta.timestamp);
        self.membership_log.retain(|(p, _)| *p >= meta.position);
        if self.log.is_empty() {
            self.membership_log.clear();
        }
        self.base_membership = meta.membership.clone();
        self.commit = meta.position;
        self.end_amnesia();
        self.apply_sent = meta.position;
        self.applied = meta.position;
        self.durable = self.durable.max(meta.position).min(self.log.last_pos());
        self.matched = self.matched.max(meta.position);
        self.snapshot = Some(meta.clone());
        // Snapshots of our own still being written are older: their files
        // will not be published (storage keeps the newer one).
        self.unpublished.clear();
        self.published = Some((meta.clone(), image.len() as u64));
        out.push(Action::InstallSnapshot { meta, image });
    }

    /// Drops from memory the data of entries no one here needs again
    /// (`Config::log_cache_bytes`): applied (so committed) and durable, so
    /// storage can read them back for a follower.
    fn evict_log_data(&mut self) {
        let window = self.cfg.log_cache_bytes;
        if window == u64::MAX {
            return;
        }
        let upto = self
            .applied
            .min(self.commit)
            .min(self.durable)
            .min(self.log.last_pos().saturating_sub(window));
        self.log.evict_data(upto);
    }

    fn on_durable(&mut self, position: Position, term: Term, out: &mut Vec<Action>) {
        if position > self.durable && self.log.term_at(position) == Some(term) {
            self.durable = position;
            self.note_settled_config();
            self.evict_log_data();
            if self.role == Role::Leader {
                self.maybe_commit(out);
            } else {
                self.ack_due = true;
                self.note_join_progress(None);
            }
        }
    }

    fn on_applied(&mut self, position: Position, timers: Vec<TimerUpdate>) {
        self.applied = self.applied.max(position);
        self.evict_log_data();
        for t in timers {
            match t {
                TimerUpdate::Set { id, deadline } => {
                    self.timers.insert(id, deadline);
                    self.timers_fired.remove(&id);
                }
                TimerUpdate::Cancel { id } => {
                    self.timers.remove(&id);
                    self.timers_fired.remove(&id);
                }
                TimerUpdate::Clear => {
                    self.timers.clear();
                    self.timers_fired.clear();
                }
            }
        }
    }

    fn on_snapshot_taken(&mut self, position: Position, out: &mut Vec<Action>) {
        let newest = self
            .snapshot
            .as_ref()
            .map_or(0, |m| m.position)
            .max(self.log.first_pos());
        if position <= newest {
            return;
        }
        let Some(meta) = self.snapshot_meta_at(position) else {
            return;
        };
        self.snapshot = Some(meta.clone());
        // The log is compacted when the file is published: until then a
        // follower behind gets the previous file and the log after it.
        if self.unpublished.len() >= MAX_UNPUBLISHED {
            self.unpublished.pop_front();
        }
        self.unpublished.push_back(meta.clone());
        out.push(Action::SaveSnapshot(meta));
    }

    fn on_snapshot_published(&mut self, position: Position, size: u64) {
        if self
            .published
            .as_ref()
            .is_some_and(|(m, _)| m.position >= position)
        {
            return; // older than the file we know (e.g. reported late)
        }
        let Some(i) = self.unpublished.iter().position(|m| m.position == position) else {
            return; // not a snapshot we asked to save: no metadata to send
        };
        // Publications come in order: older files will not be reported.
        let Some(meta) = self.unpublished.drain(..=i).next_back() else {
            return;
        };
        if meta.position > self.log.first_pos() {
            self.compacted = self
                .log
                .compact_to(meta.position, meta.term, meta.timestamp);
            self.membership_log.retain(|(p, _)| *p >= meta.position);
            self.base_membership = meta.membership.clone();
        }
        self.published = Some((meta, size));
        // Followers part-way through an older file: it has been replaced
        // (storage deletes it); start them on this one now rather than
        // after the retry timeout.
        for p in self.progress.values_mut() {
            if p.state == ProgressState::Snapshot && p.snapshot_pos < position {
                p.paused_since = None;
            }
        }
    }

    /// The membership in force for an entry ending at `pos`.
    fn membership_at(&self, pos: Position) -> Membership {
        self.membership_log
            .iter()
            .rev()
            .find(|(p, _)| *p < pos)
            .map_or_else(|| self.base_membership.clone(), |(_, m)| (**m).clone())
    }

    /// Client commands a follower forwarded, sent at `term` to this node as
    /// its leader: appended by a leader with no transfer in progress; held
    /// by one in a transfer, and by a follower that knows no leader (it
    /// led, most likely, and stepped down); passed on to the leader this
    /// node knows if it was sent in an earlier term. Each such hop goes to
    /// a node that led a term later than the one the sender knew, so a
    /// command is never passed round in a circle. Nothing is appended
    /// twice: a node passes on or drops what it did not append.
    fn on_forward(
        &mut self,
        from: NodeId,
        term: Term,
        commands: ForwardedCommands,
        out: &mut Vec<Action>,
    ) {
        match (self.role, self.leader) {
            (Role::Leader, _) if self.transfer.is_none() => {
                self.append_forwarded(from, commands, out);
            }
            (Role::Leader, _) | (Role::Follower, None) => {
                if let Err(commands) = self.hold_commands(from, commands) {
                    self.stats.forwards_dropped += commands.len() as u64;
                }
            }
            (Role::Follower, Some(leader)) if term < self.term => {
                self.send(leader, Body::Forward { commands }, out);
            }
            _ => self.stats.forwards_dropped += commands.len() as u64,
        }
    }

    /// Holds client commands (`held_forwards`) if they fit within
    /// `max_inflight_bytes`; else gives them back.
    fn hold_commands(
        &mut self,
        from: NodeId,
        commands: ForwardedCommands,
    ) -> Result<(), ForwardedCommands> {
        let bytes: u64 = commands.iter().map(|(_, _, d)| held_size(d)).sum();
        if self.held_forward_bytes.saturating_add(bytes) <= self.cfg.max_inflight_bytes {
            self.held_forward_bytes += bytes;
            self.stats.commands_held += commands.len() as u64;
            self.held_forwards.push((from, commands));
            Ok(())
        } else {
            Err(commands)
        }
    }

    fn append_forwarded(
        &mut self,
        from: NodeId,
        commands: ForwardedCommands,
        out: &mut Vec<Action>,
    ) {
        let items = commands
            .into_iter()
            .map(|(client, seq, data)| (EntryKind::Command { client, seq }, data))
            .collect();
        self.append_entries(items, out);
        let end = self.log.last_pos();
        if let Some(p) = self.progress.get_mut(&from) {
            p.forwarded.push_back(end);
        }
    }

    /// Appends the held forwarded commands (leading, no transfer) or passes
    /// them to the leader (following one), in the order they came.
    fn release_held_forwards(&mut self, out: &mut Vec<Action>) {
        if self.held_forwards.is_empty() {
            return;
        }
        let leading = self.role == Role::Leader && self.transfer.is_none();
        let follows = match (self.role, self.leader) {
            (Role::Follower, Some(l)) if l != self.cfg.id => Some(l),
            _ => None,
        };
        if !leading && follows.is_none() {
            return;
        }
        self.held_forward_bytes = 0;
        self.held_own.clear();
        for (from, commands) in std::mem::take(&mut self.held_forwards) {
            match follows {
                Some(leader) => self.send(leader, Body::Forward { commands }, out),
                None => self.append_forwarded(from, commands, out),
            }
        }
    }

    /// Drops the held commands; returns the request ids of this node's
    /// own clients' among them.
    fn drop_held_forwards(&mut self) -> Vec<RequestId> {
        let n: usize = self.held_forwards.iter().map(|(_, c)| c.len()).sum();
        self.stats.forwards_dropped += n as u64;
        self.held_forwards.clear();
        self.held_forward_bytes = 0;
        std::mem::take(&mut self.held_own)
    }

    // ----- leader ---------------------------------------------------------

    fn reject(&self, id: RequestId, out: &mut Vec<Action>) -> bool {
        let reason = if self.role != Role::Leader {
            RejectReason::NotLeader {
                leader: self.leader,
            }
        } else if self.transfer.is_some() {
            RejectReason::TransferInProgress
        } else {
            return false;
        };
        out.push(Action::Rejected { id, reason });
        true
    }

    fn propose(&mut self, proposals: Vec<Proposal>, out: &mut Vec<Action>) {
        if let (Role::Follower, Some(leader)) = (self.role, self.leader) {
            // Forward to the leader; the runtime replies when the entry is
            // applied here.
            let commands = proposals
                .into_iter()
                .map(|p| (p.client, p.seq, p.data))
                .collect();
            self.send(leader, Body::Forward { commands }, out);
            return;
        }
        if self.role == Role::Leader && self.transfer.is_some() {
            // Held with the followers' forwards until the transfer ends
            // (appended, or passed on to the new leader); from the first
            // that does not fit on, refused for their clients to retry (a
            // later write of a session is never held ahead of an earlier
            // one refused).
            let mut commands = Vec::with_capacity(proposals.len());
            let mut refusing = false;
            for p in proposals {
                let len = held_size(&p.data);
                refusing = refusing
                    || self.held_forward_bytes.saturating_add(len) > self.cfg.max_inflight_bytes;
                if refusing {
                    self.reject(p.id, out);
                } else {
                    self.held_forward_bytes += len;
                    self.held_own.push(p.id);
                    commands.push((p.client, p.seq, p.data));
                }
            }
            if !commands.is_empty() {
                self.stats.commands_held += commands.len() as u64;
                self.held_forwards.push((self.cfg.id, commands));
            }
            return;
        }
        if self.role != Role::Leader {
            for p in proposals {
                self.reject(p.id, out);
            }
            return;
        }
        let entries = proposals
            .into_iter()
            .map(|p| {
                (
                    EntryKind::Command {
                        client: p.client,
                        seq: p.seq,
                    },
                    p.data,
                )
            })
            .collect();
        self.append_entries(entries, out);
    }

    /// Leader: stamp, append locally and queue for storage; replication
    /// happens in `flush` at the end of the step.
    fn append_entries(&mut self, items: Vec<(EntryKind, Bytes)>, out: &mut Vec<Action>) {
        if items.is_empty() {
            return;
        }
        let timestamp = self.now.max(self.log.last_timestamp());
        let mut batch = Vec::with_capacity(items.len());
        for (kind, data) in items {
            let e = Entry {
                term: self.term,
                position: self.log.last_pos(),
                timestamp,
                kind,
                data,
            };
            if let EntryKind::Membership(m) = &e.kind {
                self.membership_log.push((e.position, m.clone()));
            }
            self.log.push(e.clone());
            batch.push(e);
        }
        out.push(Action::Append(batch));
        if self
            .membership_log
            .last()
            .is_some_and(|(p, _)| *p >= self.commit)
        {
            self.sync_progress_with_membership();
        }
    }

    fn sync_progress_with_membership(&mut self) {
        // The lease is the new configuration's quorum's, from the next
        // acknowledgement on.
        self.lease_until = 0;
        let m = self.membership().clone();
        self.progress.retain(|n, _| m.contains(*n));
        let last = self.log.last_pos();
        for n in m.peers(self.cfg.id).collect::<Vec<_>>() {
            if !self.progress.contains_key(&n) {
                let p = self.new_progress(last);
                self.progress.insert(n, p);
            }
        }
    }

    /// Follower: gives up the forwarded reads the leader has not answered
    /// within two election timeouts (the request or the answer was lost: a
    /// peer link that reconnected, a full queue), so no read waits forever
    /// while this node keeps the same leader. Refused as not the leader's:
    /// a client then asks the leader itself, or another node. (Two: a
    /// leader that is gone is normally replaced sooner, and the change of
    /// leader refuses the reads already.)
    fn expire_forwarded_reads(&mut self, out: &mut Vec<Action>) {
        let now = self.now;
        if self
            .forwarded_reads
            .first_key_value()
            .is_none_or(|(_, &t)| now < t)
        {
            return;
        }
        let leader = self.leader;
        self.forwarded_reads.retain(|&id, &mut give_up| {
            if now < give_up {
                return true;
            }
            out.push(Action::Rejected {
                id,
                reason: RejectReason::NotLeader { leader },
            });
            false
        });
    }

    fn read(&mut self, id: RequestId, out: &mut Vec<Action>) {
        if let (Role::Follower, Some(leader)) = (self.role, self.leader) {
            // Ask the leader for a read index; serve locally once applied.
            let give_up = self
                .now
                .saturating_add(self.cfg.election_timeout_max.saturating_mul(2));
            self.forwarded_reads.insert(id, give_up);
            self.send(leader, Body::ReadIndex { id }, out);
            return;
        }
        if self.role != Role::Leader {
            self.reject(id, out);
            return;
        }
        // Also while a transfer is on, as for the followers' `ReadIndex`:
        // the lease is given up then, and a heartbeat round confirmed by a
        // quorum in this term shows no later leader was elected before it
        // (if the target wins first, the read is refused at the step-down).
        self.leader_read(id, None, out);
    }

    /// Leader: a read (local, or forwarded by `from`) waits for the term's
    /// first entry to commit, then for a heartbeat round, unless the leader
    /// holds a read lease: then it is answered at once.
    fn leader_read(&mut self, id: RequestId, from: Option<NodeId>, out: &mut Vec<Action>) {
        if self.commit < self.term_start_end() {
            self.reads_waiting.push((id, from));
            return;
        }
        if self.holds_read_lease() {
            self.stats.lease_reads += 1;
            self.answer_read(id, from, Some(self.commit), out);
            return;
        }
        self.register_read(id, from, out);
    }

    /// Answers a read: `index` None is a refusal (no longer the leader).
    fn answer_read(
        &mut self,
        id: RequestId,
        from: Option<NodeId>,
        index: Option<Position>,
        out: &mut Vec<Action>,
    ) {
        match (from, index) {
            (None, Some(index)) => out.push(Action::ReadReady { id, index }),
            (None, None) => out.push(Action::Rejected {
                id,
                reason: RejectReason::NotLeader { leader: None },
            }),
            (Some(f), index) => self.send(
                f,
                Body::ReadIndexResp {
                    id,
                    index: index.unwrap_or(0),
                    ok: index.is_some(),
                },
                out,
            ),
        }
    }

    fn term_start_end(&self) -> Position {
        self.log
            .entry_at(self.term_start_pos)
            .map_or(self.term_start_pos, Entry::end)
    }

    fn register_read(&mut self, id: RequestId, from: Option<NodeId>, out: &mut Vec<Action>) {
        if !self.cfg.testing_bugs.read_without_new_round {
            self.next_heartbeat_seq();
        }
        let index = if self.cfg.testing_bugs.read_index_at_applied {
            self.applied
        } else {
            self.commit
        };
        self.reads.push_back(PendingRead {
            id,
            from,
            index,
            heartbeat: self.heartbeat_seq,
        });
        self.heartbeat_due = true;
        self.confirm_reads(out);
    }

    /// Leader, lease reads: until when (our clock) a voter that echoed
    /// heartbeat `seq` and holds its vote for `hold` after each message
    /// from a leader refuses other candidates, counted from the latest
    /// recorded creation at or before `seq`'s (creation times grow with
    /// the numbers, so that is no later); 0 if none is kept any more.
    fn voter_lease_end(&self, seq: u64, hold: Nanos) -> Nanos {
        if !self.cfg.lease_reads {
            return 0;
        }
        let i = self.heartbeat_times.partition_point(|&(s, _)| s <= seq);
        let Some(&(_, created)) = i.checked_sub(1).and_then(|i| self.heartbeat_times.get(i)) else {
            return 0;
        };
        let bugs = self.cfg.testing_bugs;
        let hold = if bugs.lease_assumes_own_timeout {
            self.cfg.election_timeout_min
        } else {
            hold
        };
        let lease = if bugs.lease_outlasts_stickiness {
            3 * self.cfg.election_timeout_max
        } else if bugs.lease_ignores_drift {
            hold
        } else {
            self.cfg.lease_for(hold)
        };
        created.saturating_add(lease)
    }

    /// Answers the reads whose heartbeat a quorum has echoed, and with
    /// lease reads extends the lease to the quorum-th latest time until
    /// which the voters refuse other candidates (this node counting as
    /// never): any other candidate needs a vote from one of that quorum.
    fn confirm_reads(&mut self, out: &mut Vec<Action>) {
        if self.reads.is_empty() && self.heartbeat_times.is_empty() {
            return;
        }
        let m = self.membership();
        let per_voter = |f: fn(&Progress) -> u64| -> Vec<u64> {
            let mut v: Vec<u64> = m
                .voters
                .iter()
                .map(|n| {
                    if *n == self.cfg.id {
                        u64::MAX
                    } else {
                        self.progress.get(n).map_or(0, f)
                    }
                })
                .collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v
        };
        let acks = per_voter(|p| p.heartbeat);
        let needed = if self.cfg.testing_bugs.read_quorum_off_by_one {
            m.quorum().saturating_sub(1).max(1)
        } else {
            m.quorum()
        };
        let confirmed = acks.get(needed - 1).copied().unwrap_or(0);
        if self.cfg.lease_reads {
            // Each voter's end only grows; only a membership change lowers
            // this (a lease of the old configuration must not outlive it).
            let ends = per_voter(|p| p.lease_end);
            self.lease_until = ends.get(m.quorum() - 1).copied().unwrap_or(0);
            // Keep the creation times a voter may still echo: the latest
            // at or before the slowest voter's echo, and all after it
            // (bounded, for a voter that is gone).
            let slowest = acks.last().copied().unwrap_or(0);
            while self
                .heartbeat_times
                .get(1)
                .is_some_and(|&(seq, _)| seq <= slowest)
                || self.heartbeat_times.len() > MAX_HEARTBEAT_TIMES
            {
                self.heartbeat_times.pop_front();
            }
        }
        while self.reads.front().is_some_and(|r| r.heartbeat <= confirmed) {
            if let Some(r) = self.reads.pop_front() {
                self.answer_read(r.id, r.from, Some(r.index), out);
            }
        }
    }

    fn change_membership(
        &mut self,
        id: RequestId,
        change: MembershipChange,
        out: &mut Vec<Action>,
    ) {
        if self.reject(id, out) {
            return;
        }
        let reason = if self.commit < self.term_start_end() {
            Some(RejectReason::NotReady)
        } else if self
            .membership_log
            .last()
            .is_some_and(|(p, _)| *p >= self.commit)
        {
            Some(RejectReason::MembershipChangePending)
        } else {
            None
        };
        if let Some(reason) = reason {
            out.push(Action::Rejected { id, reason });
            return;
        }
        // A learner promoted far behind the log would be a voter that
        // cannot vote for anyone up to date or count towards commits until
        // it catches up: with one node down that can stall the cluster. As
        // etcd, promote only one that holds 90% of the leader's log.
        // And only one that has finished joining as far as this leader can
        // tell (see `note_join_progress`): it acknowledged, in this term,
        // all the leader told it was committed, past the configuration
        // that added it. A joining node grants no vote, and only a leader
        // ends its joining: a voter promoted mid-join (at 90% of a long
        // log) whose leader is lost before it catches up would withhold
        // the vote the other voters need, for good.
        if let MembershipChange::PromoteLearner(n) = change {
            let leader_end = self.log.last_pos();
            let progress = self.progress.get(&n);
            let matched = progress.map_or(0, |p| p.matched);
            let joined = progress.is_some_and(|p| p.matched >= p.commit_sent)
                && self.log.term_at(matched) == Some(self.term)
                && self.membership_at(matched).contains(n);
            if self.membership().learners.contains(&n)
                && (u128::from(matched) * 10 < u128::from(leader_end) * 9 || !joined)
            {
                out.push(Action::Rejected {
                    id,
                    reason: RejectReason::Invalid(format!(
                        "{LEARNER_NOT_READY}: node {n} holds the log to position {matched} of \
                         {leader_end}; promote it once it has caught up"
                    )),
                });
                return;
            }
        }
        match change.apply(self.membership()) {
            Ok(next) => self.append_entries(
                vec![(EntryKind::Membership(Arc::new(next)), Bytes::new())],
                out,
            ),
            Err(e) => out.push(Action::Rejected {
                id,
                reason: RejectReason::Invalid(e),
            }),
        }
    }

    fn transfer_leadership(&mut self, id: RequestId, target: NodeId, out: &mut Vec<Action>) {
        if self.reject(id, out) {
            return;
        }
        if target == self.cfg.id {
            return;
        }
        if !self.membership().is_voter(target) {
            out.push(Action::Rejected {
                id,
                reason: RejectReason::Invalid(format!("node {target} is not a voter")),
            });
            return;
        }
        self.transfer = Some((target, self.now + self.cfg.election_timeout_min));
        self.maybe_send_timeout_now(target, out);
    }

    fn maybe_send_timeout_now(&mut self, target: NodeId, out: &mut Vec<Action>) {
        let caught_up = self
            .progress
            .get(&target)
            .is_some_and(|p| p.matched == self.log.last_pos());
        if caught_up {
            self.send_timeout_now(target, out);
        }
    }

    /// Tells `target` to campaign now. Its election bypasses the voters'
    /// stickiness, so the lease is given up (see `timeout_now_sent`).
    fn send_timeout_now(&mut self, target: NodeId, out: &mut Vec<Action>) {
        let last_pos = self.log.last_pos();
        if !self.cfg.testing_bugs.lease_ignores_transfer {
            self.timeout_now_sent.insert(target, last_pos);
        }
        self.send(target, Body::TimeoutNow { last_pos }, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append_resp(
        &mut self,
        from: NodeId,
        ok: bool,
        position: Position,
        hint_pos: Position,
        hint_term: Term,
        (heartbeat, hold): (u64, Nanos),
        out: &mut Vec<Action>,
    ) {
        let last = self.log.last_pos();
        let first = self.log.first_pos();
        let now = self.now;
        let lease_end = self.voter_lease_end(heartbeat, hold);
        let gap = self.answer_gap_limit();
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        p.active = true;
        let since = match p.answered {
            Some((last, since)) if now.saturating_sub(last) <= gap => since,
            _ => now,
        };
        p.answered = Some((now, since));
        p.heartbeat = p.heartbeat.max(heartbeat);
        p.lease_end = p.lease_end.max(lease_end);
        if ok {
            if position > last {
                return; // acknowledges entries we never had: ignore
            }
            if position > p.matched {
                p.matched = position;
                p.last_progress = now;
            }
            p.next = p.next.max(p.matched);
            if p.state != ProgressState::Replicate {
                p.state = ProgressState::Replicate;
                p.paused_since = None;
                p.last_progress = now;
            }
            self.maybe_commit(out);
            if self.transfer.is_some_and(|(t, _)| t == from) {
                self.maybe_send_timeout_now(from, out);
            }
        } else {
            self.stats.rejections_received += 1;
            if position < p.matched || p.state == ProgressState::Snapshot {
                return; // stale rejection, or a snapshot is on its way
            }
            let hint = hint_pos.min(position).min(last);
            let resume = if hint < first || position <= first {
                None
            } else {
                let (b, _) = self.log.last_boundary_at_or_before(hint, hint_term);
                (b < position).then_some(b)
            };
            match resume {
                Some(b) => {
                    p.next = b;
                    p.state = ProgressState::Probe;
                }
                None => p.state = ProgressState::Snapshot,
            }
            p.paused_since = None;
        }
        self.confirm_reads(out);
    }

    fn maybe_commit(&mut self, out: &mut Vec<Action>) {
        let m = self.membership();
        let candidate = if self.cfg.testing_bugs.commit_without_quorum {
            self.durable
        } else {
            let mut matched: Vec<Position> = m
                .voters
                .iter()
                .map(|n| {
                    if *n == self.cfg.id {
                        self.durable
                    } else {
                        self.progress.get(n).map_or(0, |p| p.matched)
                    }
                })
                .collect();
            matched.sort_unstable_by(|a, b| b.cmp(a));
            matched.get(m.quorum() - 1).copied().unwrap_or(0)
        };
        if candidate > self.commit && self.log.term_at(candidate) == Some(self.term) {
            self.note_removed_peers(candidate);
            self.commit = candidate;
            self.commit_advanced = true;
            self.emit_apply(out);
            if self.commit >= self.term_start_end() && !self.reads_waiting.is_empty() {
                for (id, from) in std::mem::take(&mut self.reads_waiting) {
                    self.leader_read(id, from, out);
                }
            }
            // A leader removed from the voters steps down once that is
            // committed, handing over to a preferred voter that holds the
            // commit if there is one, else to the most caught-up voter
            // (which, outside the preferred set, hands over in turn: a
            // removed leader's hand-over does not count as a transfer).
            let removed = !self.membership().is_voter(self.cfg.id)
                && self
                    .membership_log
                    .last()
                    .is_none_or(|(p, _)| *p < self.commit);
            if removed {
                let preferred = &self.cfg.preferred_leaders;
                let best = self
                    .progress
                    .iter()
                    .filter(|(n, _)| self.membership().is_voter(**n))
                    .max_by_key(|(n, p)| {
                        (preferred.contains(n) && p.matched >= self.commit, p.matched)
                    })
                    .map(|(n, _)| *n);
                // Everyone hears of the commit now: this node stops.
                self.heartbeat_due = true;
                self.flush_leader(out);
                if let Some(n) = best {
                    self.send_timeout_now(n, out);
                }
                self.become_follower(self.term, None, out);
                // It holds every committed entry (it led): the committed
                // configuration excluding it is the latest there is.
                if !self.membership().contains(self.cfg.id) {
                    let (position, _) = self.config_in_force_at(self.commit);
                    self.enter_removed(self.cfg.id, position, out);
                }
            }
        }
    }

    /// Leader, its commit advancing to `commit`: the nodes the
    /// configurations committed on the way removed are told so for a
    /// while (`REMOVED_NOTICE_TIMEOUTS`).
    fn note_removed_peers(&mut self, commit: Position) {
        let (_, before) = self.config_in_force_at(self.commit);
        let (position, after) = self.config_in_force_at(commit);
        if before == after {
            return;
        }
        let (before, after) = (before.clone(), after.clone());
        let latest = self.membership();
        let gone: Vec<NodeId> = before
            .peers(self.cfg.id)
            .filter(|&n| !after.contains(n) && !latest.contains(n))
            .collect();
        let until = self.now.saturating_add(
            self.cfg
                .election_timeout_max
                .saturating_mul(REMOVED_NOTICE_TIMEOUTS),
        );
        for n in gone {
            self.removed_peers.insert(n, (position, until));
        }
    }

    fn next_timer_due(&self) -> Option<Nanos> {
        self.timers
            .iter()
            .filter(|(id, _)| !self.timers_fired.contains(id))
            .map(|(_, &d)| d)
            .min()
    }

    fn fire_due_timers(&mut self, out: &mut Vec<Action>) {
        if self.commit < self.term_start_end() {
            return;
        }
        let now = self.now.max(self.log.last_timestamp());
        let mut due: Vec<(u64, Nanos)> = self
            .timers
            .iter()
            .filter(|(id, d)| **d <= now && !self.timers_fired.contains(id))
            .map(|(&id, &d)| (id, d))
            .collect();
        if due.is_empty() {
            return;
        }
        // In the order they came due (then by id), not by id: timers a late
        // turn fires together take effect in deadline order, as they would
        // have on time (etcd revokes leases in expiry order).
        due.sort_unstable_by_key(|&(id, deadline)| (deadline, id));
        let items = due
            .iter()
            .map(|&(id, deadline)| (EntryKind::Timer { id, deadline }, Bytes::new()))
            .collect();
        for (id, _) in due {
            self.timers_fired.insert(id);
        }
        self.append_entries(items, out);
    }

    // ----- end of step ----------------------------------------------------

    fn flush(&mut self, out: &mut Vec<Action>) {
        match self.role {
            Role::Leader => self.flush_leader(out),
            _ => {
                if self.ack_due {
                    self.ack_due = false;
                    let pos = self.durable.min(self.matched);
                    if let Some(leader) = self.leader {
                        let forced = std::mem::take(&mut self.ack_forced);
                        if forced || (pos, self.leader_heartbeat) != self.acked {
                            self.acked = (pos, self.leader_heartbeat);
                            self.acked_at = Some(self.now);
                            self.send(
                                leader,
                                Body::AppendResp {
                                    ok: true,
                                    position: pos,
                                    hint_pos: 0,
                                    hint_term: 0,
                                    heartbeat: self.leader_heartbeat,
                                    hold: self.cfg.election_timeout_min,
                                },
                                out,
                            );
                        }
                    }
                }
            }
        }
    }

    fn flush_leader(&mut self, out: &mut Vec<Action>) {
        if self.role != Role::Leader {
            return;
        }
        let heartbeat = std::mem::take(&mut self.heartbeat_due);
        if heartbeat {
            self.heartbeat_deadline = self.now + self.cfg.heartbeat_interval;
            // Every heartbeat renews the lease once a quorum echoes it.
            if self.cfg.lease_reads
                && self
                    .heartbeat_times
                    .back()
                    .is_none_or(|&(_, t)| t < self.now)
            {
                self.next_heartbeat_seq();
            }
        }
        if heartbeat && !self.removed_peers.is_empty() {
            let (now, latest) = (self.now, self.membership().clone());
            self.removed_peers
                .retain(|n, (_, until)| now < *until && !latest.contains(*n));
            let notices: Vec<(NodeId, Position)> = self
                .removed_peers
                .iter()
                .map(|(&n, &(position, _))| (n, position))
                .collect();
            for (n, position) in notices {
                self.stats.removed_sent += 1;
                self.send(n, Body::Removed { position }, out);
            }
        }
        let commit_advanced = std::mem::take(&mut self.commit_advanced);
        let peers: Vec<NodeId> = self.progress.keys().copied().collect();
        for n in peers {
            let sent = self.replicate_to(n, heartbeat, out);
            if sent || !(heartbeat || commit_advanced) {
                continue;
            }
            let commit = self.commit;
            let waiting = self
                .progress
                .get(&n)
                .and_then(|p| p.forwarded.front())
                .is_some_and(|&end| end <= commit);
            if heartbeat || waiting || self.cfg.commit_notify_delay == 0 {
                self.send_heartbeat(n, out);
            } else if self.commit_notify_at.is_none() {
                self.commit_notify_at = Some(self.now + self.cfg.commit_notify_delay);
            }
        }
    }

    /// An empty append at the follower's matched position: a heartbeat
    /// and commit notification that a healthy follower never rejects. Two
    /// exceptions, where a rejection is what the leader needs to hear (a
    /// rejected heartbeat sends the follower back to probing or to a
    /// snapshot):
    /// - The matched position is compacted away: at the start of the log.
    ///   Every follower must hear from its leader, and one that does not
    ///   hold that position (wiped, or it lost the appends sent to it)
    ///   needs a snapshot.
    /// - Replicating, entries were sent but nothing has been acknowledged
    ///   or sent for a heartbeat interval: at the end of what was sent. If
    ///   those appends were lost (a dropped connection), nothing else would
    ///   tell the leader while no new entry is written.
    ///
    /// (Appends sent before a heartbeat reach the follower before it, so a
    /// follower that is merely behind holds either position by then.)
    fn send_heartbeat(&mut self, n: NodeId, out: &mut Vec<Action>) {
        let Some(p) = self.progress.get(&n) else {
            return;
        };
        let first = self.log.first_pos();
        let stalled = p.state == ProgressState::Replicate
            && p.matched < p.next
            && self.now >= p.last_progress.saturating_add(self.cfg.heartbeat_interval);
        let prev_pos = if stalled {
            p.next
        } else {
            p.matched.max(first)
        };
        let Some(prev_term) = self.log.term_at(prev_pos) else {
            return; // beyond our log: cannot happen (acks beyond it are ignored)
        };
        if let Some(p) = self.progress.get_mut(&n) {
            p.commit_sent(self.commit);
        }
        self.send(n, self.append_body(n, prev_pos, prev_term, Vec::new()), out);
    }

    /// Sends what the follower's state and window allow; true if anything
    /// was sent.
    fn replicate_to(&mut self, n: NodeId, heartbeat: bool, out: &mut Vec<Action>) -> bool {
        let now = self.now;
        let last = self.log.last_pos();
        let first = self.log.first_pos();
        let retry_after = self.cfg.election_timeout_min;
        let window = self.cfg.max_inflight_bytes;
        let Some(p) = self.progress.get(&n) else {
            return false;
        };
        let (state, mut next, matched) = (p.state, p.next, p.matched);
        let paused = p.paused_since.is_some_and(|t| now < t + retry_after);
        if state == ProgressState::Probe && paused && !heartbeat {
            return false;
        }
        let need_snapshot =
            state == ProgressState::Snapshot || next < first || self.log.term_at(next).is_none();
        if need_snapshot {
            // Chunks come from the newest published file, whose metadata
            // is kept with it (the log starts there); newer snapshots still
            // being written do not hold it up.
            let published = self.published.clone();
            let Some(p) = self.progress.get_mut(&n) else {
                return false;
            };
            match published {
                None if first > 0 => {
                    // Compacted without a published file (a recovered
                    // snapshot whose file is missing): nothing to send.
                    // Heartbeats still reach the follower.
                    p.state = ProgressState::Snapshot;
                    return false;
                }
                Some((meta, size)) => {
                    if p.state != ProgressState::Snapshot || p.snapshot_pos != meta.position {
                        // Start (over) with the newest published file.
                        p.state = ProgressState::Snapshot;
                        p.snapshot_pos = meta.position;
                        p.snapshot_offset = 0;
                        p.snapshot_sent = 0;
                        p.paused_since = Some(now);
                        self.stats.snapshots_sent += 1;
                    } else if !paused
                        && (p.snapshot_sent > p.snapshot_offset || p.snapshot_offset >= size)
                    {
                        // Nothing acknowledged for a while: what was in
                        // flight was lost (a connection dropped), or the
                        // last chunk's answer was: send again from what the
                        // follower has (at the end, an empty last chunk).
                        p.snapshot_sent = p.snapshot_offset.min(size);
                        p.paused_since = Some(now);
                        if p.snapshot_offset >= size {
                            p.snapshot_sent = size;
                            let chunks = vec![(size, size)];
                            return self.send_snapshot_chunks(n, meta, size, chunks, out);
                        }
                    }
                    p.next = meta.position;
                    let chunk = self.cfg.snapshot_chunk_bytes.max(1);
                    // Chunks while less than the window is unacknowledged
                    // (one at least when nothing is).
                    let mut chunks = Vec::new();
                    while p.snapshot_sent < size
                        && (chunks.is_empty() && p.snapshot_sent == p.snapshot_offset
                            || p.snapshot_sent.saturating_sub(p.snapshot_offset) < window)
                    {
                        let start = p.snapshot_sent;
                        let end = start.saturating_add(chunk).min(size);
                        chunks.push((start, end));
                        p.snapshot_sent = end;
                    }
                    if size == 0 && p.snapshot_sent == 0 && p.snapshot_offset == 0 && !paused {
                        // (An empty file: its one, empty chunk.)
                        chunks.push((0, 0));
                        p.paused_since = Some(now);
                    }
                    return self.send_snapshot_chunks(n, meta, size, chunks, out);
                }
                None => {
                    // Nothing compacted yet: probe from the start of the log.
                    p.paused_since = Some(now);
                    p.state = ProgressState::Probe;
                    p.next = first;
                    self.send_append_from(n, first, out);
                }
            }
            return true;
        }
        if state != ProgressState::Replicate {
            // Probe: one append (possibly empty), then wait for the answer.
            if let Some(p) = self.progress.get_mut(&n) {
                p.paused_since = Some(now);
            }
            self.send_append_from(n, next, out);
            return true;
        }
        let mut sent = false;
        while next < last && next.saturating_sub(matched) < window {
            next = self.send_append_from(n, next, out);
            sent = true;
        }
        if let Some(p) = self.progress.get_mut(&n) {
            p.next = next;
            if sent {
                p.last_progress = now;
            }
        }
        sent
    }

    /// Sends follower `n` the chunks (`start`, `end`) of the published
    /// snapshot file `meta` of `size` bytes (read by the runtime); true if
    /// there were any.
    fn send_snapshot_chunks(
        &mut self,
        n: NodeId,
        meta: SnapshotMeta,
        size: u64,
        chunks: Vec<(u64, u64)>,
        out: &mut Vec<Action>,
    ) -> bool {
        let sent = !chunks.is_empty();
        let to_voter = self.membership().is_voter(n);
        let position = meta.position;
        for (start, end) in chunks {
            let message = self.message(
                n,
                Body::InstallSnapshot {
                    meta: meta.clone(),
                    offset: start,
                    chunk: Bytes::new(),
                    done: end == size,
                    to_voter,
                },
            );
            out.push(Action::SendSnapshotChunk {
                message,
                position,
                offset: start,
                len: end - start,
            });
        }
        sent
    }

    /// Sends one append starting after `prev_pos` (a boundary we hold);
    /// returns where it ends.
    fn send_append_from(
        &mut self,
        n: NodeId,
        prev_pos: Position,
        out: &mut Vec<Action>,
    ) -> Position {
        let prev_term = self.log.term_at(prev_pos).unwrap_or(0);
        if let Some(p) = self.progress.get_mut(&n) {
            p.commit_sent(self.commit);
        }
        if let Some(upto) = self.log.hollow_run(prev_pos, self.cfg.max_batch_bytes) {
            // Their data is only on disk: the runtime reads it in.
            self.stats.log_ranges_sent += 1;
            let message = self.message(n, self.append_body(n, prev_pos, prev_term, Vec::new()));
            out.push(Action::SendLogRange {
                message,
                from: prev_pos,
                upto,
            });
            return upto;
        }
        let entries = self.log.entries_from(prev_pos, self.cfg.max_batch_bytes);
        let end = entries.last().map_or(prev_pos, Entry::end);
        self.send(n, self.append_body(n, prev_pos, prev_term, entries), out);
        end
    }

    /// An append to follower `n` after `prev_pos`, with this leader's
    /// commit position and heartbeat sequence.
    fn append_body(
        &self,
        n: NodeId,
        prev_pos: Position,
        prev_term: Term,
        entries: Vec<Entry>,
    ) -> Body {
        Body::Append {
            prev_pos,
            prev_term,
            commit: self.commit,
            heartbeat: self.heartbeat_seq,
            entries,
            to_voter: self.membership().is_voter(n),
        }
    }
}

/// Whether `entries` follow each other from `prev_pos` with no gap or
/// overlap, and all end within the position space (so `Entry::end` cannot
/// overflow on any of them).
fn follows_on(prev_pos: Position, entries: &[Entry]) -> bool {
    let mut at = prev_pos;
    entries.iter().all(|e| {
        let next = e.position.checked_add(e.encoded_len());
        let ok = e.position == at && next.is_some();
        at = next.unwrap_or(at);
        ok
    })
}
