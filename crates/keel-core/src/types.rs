//! Basic vocabulary of the consensus core: ids, terms, byte positions, log
//! entries, membership, hard state and snapshots.

use bytes::Bytes;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Identifies a node (server) of the cluster. Never 0.
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// A byte offset in the one logical log, continuous across terms.
pub type Position = u64;
/// Time in nanoseconds. For the core this is whatever clock the runtime
/// feeds it; leader-stamped entry timestamps are in the same unit.
pub type Nanos = u64;
/// A client (session) id.
pub type ClientId = u64;
/// Opaque id the runtime attaches to a request so it can route the answer.
pub type RequestId = u64;

/// Bytes every entry occupies in the log besides its body: the frame header
/// of the durable log (length, CRC-32C, term, timestamp, kind, reserved).
/// Positions advance by `ENTRY_HEADER_LEN + body length`, so the in-memory
/// log and the on-disk log agree on every position.
pub const ENTRY_HEADER_LEN: u64 = 32;

/// What an entry means to the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Appended by every new leader before it serves (Raft's no-op, Aeron's
    /// new-term event).
    TermStart,
    /// A client command: exactly-once by (client, seq).
    Command { client: ClientId, seq: u64 },
    /// A service timer that came due on the leader's clock. `deadline` is the
    /// deadline it fired for, so a duplicate or stale timer entry is ignored.
    Timer { id: u64, deadline: Nanos },
    /// A new cluster membership; effective as soon as it is in a log.
    Membership(Arc<Membership>),
    /// An explicit session close.
    SessionClose { client: ClientId },
}

impl EntryKind {
    /// Body bytes the kind itself needs (besides `data`).
    fn body_len(&self) -> u64 {
        match self {
            EntryKind::TermStart => 0,
            EntryKind::Command { .. } => 16,
            EntryKind::Timer { .. } => 16,
            EntryKind::Membership(m) => m.encoded_len(),
            EntryKind::SessionClose { .. } => 8,
        }
    }
}

/// One log entry. `position` is the byte offset where it starts; it ends at
/// `position + encoded_len()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: Term,
    pub position: Position,
    /// Leader-stamped cluster time; never decreases along a committed log.
    pub timestamp: Nanos,
    pub kind: EntryKind,
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry occupies in the log.
    pub fn encoded_len(&self) -> u64 {
        ENTRY_HEADER_LEN + self.kind.body_len() + self.data.len() as u64
    }
    /// The position right after this entry.
    pub fn end(&self) -> Position {
        self.position + self.encoded_len()
    }
}

/// The voting and non-voting members of the cluster, and the ids removed
/// from it, which are never members again.
///
/// Ids are not reused (as etcd never reuses a removed member's id): a node
/// that missed a removal may still count the removed id as a voter of its
/// old configuration, and a new node under that id, whose disk does not
/// hold the old node's term and log, would answer it as that voter (a
/// stale leader could commit with it what the cluster overwrote).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Every id a configuration change removed (as far as this
    /// configuration's history was recorded: configurations written by a
    /// version before this field record none).
    pub removed: BTreeSet<NodeId>,
}

impl Membership {
    pub fn new(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            voters: voters.into_iter().collect(),
            ..Membership::default()
        }
    }
    /// Bytes of its encoding in a log entry: voter and learner counts (u32
    /// each), then, if any id was removed, their count (u32); then the
    /// ids (u64 each). A configuration without removed ids is encoded as
    /// before they were recorded, so older logs keep their positions.
    pub fn encoded_len(&self) -> u64 {
        let removed = if self.removed.is_empty() {
            0
        } else {
            4 + 8 * self.removed.len() as u64
        };
        8 + 8 * (self.voters.len() + self.learners.len()) as u64 + removed
    }
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
    /// Votes (or acknowledgements) needed for a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }
    /// Every member but `me`.
    pub fn peers(&self, me: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        self.voters
            .iter()
            .chain(self.learners.iter())
            .copied()
            .filter(move |&n| n != me)
    }
}

/// A change of membership, one server at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a non-voting member that catches up and is never counted.
    AddLearner(NodeId),
    /// Turn a learner into a voter.
    PromoteLearner(NodeId),
    /// Remove a voter or a learner (the leader itself included).
    Remove(NodeId),
}

impl MembershipChange {
    /// The membership after the change, or why it is not allowed.
    pub fn apply(&self, m: &Membership) -> Result<Membership, String> {
        let mut next = m.clone();
        match *self {
            MembershipChange::AddLearner(n) => {
                if n == 0 {
                    return Err("node id 0 is reserved".into());
                }
                if m.contains(n) {
                    return Err(format!("node {n} is already a member"));
                }
                if m.removed.contains(&n) {
                    return Err(format!(
                        "node {n} was removed from the cluster and its id is never used again: \
                         start the new node under a new id"
                    ));
                }
                next.learners.insert(n);
            }
            MembershipChange::PromoteLearner(n) => {
                if !next.learners.remove(&n) {
                    return Err(format!("node {n} is not a learner"));
                }
                next.voters.insert(n);
            }
            MembershipChange::Remove(n) => {
                if !next.voters.remove(&n) && !next.learners.remove(&n) {
                    return Err(format!("node {n} is not a member"));
                }
                if next.voters.is_empty() {
                    return Err("cannot remove the last voter".into());
                }
                next.removed.insert(n);
            }
        }
        Ok(next)
    }
}

/// What must be durable before a node acts on it: its term and vote, and
/// the leader stickiness it may have promised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    pub voted_for: Option<NodeId>,
    /// The longest `election_timeout_min` this node may have reported as
    /// its `hold` (the time it refuses other candidates after each message
    /// from a leader, which leader leases count on) whose promise may still
    /// run. A restarted node holds its vote for the larger of this and its
    /// current `election_timeout_min`, so a timeout lowered across a
    /// restart breaks no promise made before it. 0: none recorded (a new
    /// node, or storage from before this field).
    pub hold: Nanos,
}

impl HardState {
    /// The hard state a node that lost writes it had not synced (a power
    /// loss in `replicated` durability) starts from, written before it
    /// starts: the next term, with no vote (see `Node::set_amnesic`).
    pub fn after_power_loss(self) -> HardState {
        HardState {
            term: self.term + 1,
            voted_for: None,
            hold: self.hold,
        }
    }
}

/// Where a snapshot sits in the log and what it knew there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The snapshot covers every entry ending at or before this position.
    pub position: Position,
    /// Term of the entry ending at `position` (0 for the empty log).
    pub term: Term,
    /// Timestamp of the entry ending at `position`.
    pub timestamp: Nanos,
    /// Membership in force at `position`.
    pub membership: Membership,
}

/// A snapshot: metadata plus the service host's serialized state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub data: Bytes,
}
