//! Messages between the consensus cores of a cluster. The wire codec lives in
//! `keel-net`; here they are plain values.

use crate::types::{ClientId, Entry, Nanos, NodeId, Position, SnapshotMeta, Term};
use bytes::Bytes;

/// A message between two nodes of one cluster. Every message carries the
/// cluster id and the sender's term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub cluster_id: u64,
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// "Would you vote for me at `term`?" Sent without raising the sender's
    /// term; `term` is the sender's term + 1.
    PreVote { last_pos: Position, last_term: Term },
    /// `amnesic`: the sender restarted without writes it may have
    /// acknowledged and has not caught up since (see
    /// `Node::set_amnesic`): its grant counts towards a quorum, but not
    /// among the votes of voters that kept their logs. `committed`: the
    /// end position and term of the latest entry the sender knows is
    /// committed (`(0, 0)`: none); a candidate whose log has that entry
    /// knows its own log is committed up to there (what elections count
    /// depends on whether its configuration is).
    PreVoteResp {
        granted: bool,
        amnesic: bool,
        committed: (Position, Term),
    },
    /// A real vote request. `transfer` marks a leadership transfer, which
    /// overrides leader stickiness.
    Vote {
        last_pos: Position,
        last_term: Term,
        transfer: bool,
    },
    /// `amnesic` and `committed` as for `PreVoteResp`.
    VoteResp {
        granted: bool,
        amnesic: bool,
        committed: (Position, Term),
    },
    /// Entries after (`prev_pos`, `prev_term`), the leader's commit position
    /// and its heartbeat sequence (for read-index confirmation). An empty
    /// append is a heartbeat and a commit notification. `to_voter`: the
    /// leader's latest configuration counts the receiver as a voter. A
    /// node still joining ignores such a leader (see `Node::joining`): a
    /// joining node is a learner until it has caught up, so that leader
    /// takes it for an earlier node of its id, whose votes and log it
    /// does not hold.
    Append {
        prev_pos: Position,
        prev_term: Term,
        commit: Position,
        heartbeat: u64,
        entries: Vec<Entry>,
        to_voter: bool,
    },
    /// `ok`: `position` is the follower's durable position known to match the
    /// leader's log (conflated: only the latest matters). Not `ok`:
    /// `position` is the rejected `prev_pos` and (`hint_pos`, `hint_term`)
    /// the follower's last boundary at or before it with a term `<=
    /// prev_term`. `hold` is the sender's leader stickiness (its
    /// `election_timeout_min`): after each message from a leader it votes
    /// for no other candidate for this long on its own clock. A leader's
    /// lease counts on it, so the nodes' election timeouts may differ.
    AppendResp {
        ok: bool,
        position: Position,
        hint_pos: Position,
        hint_term: Term,
        heartbeat: u64,
        hold: Nanos,
    },
    /// One chunk of the leader's latest snapshot, for a follower whose next
    /// entry was compacted away: bytes `offset..offset + chunk.len()` of the
    /// snapshot data; `done` on the last one. Chunks are acknowledged with
    /// `SnapshotAck`; the installed snapshot with an `AppendResp`.
    /// `to_voter` as for `Append`.
    InstallSnapshot {
        meta: SnapshotMeta,
        offset: u64,
        chunk: Bytes,
        done: bool,
        to_voter: bool,
    },
    /// The follower holds the first `received` bytes of the snapshot at
    /// `position` (send from there).
    SnapshotAck { position: Position, received: u64 },
    /// Leadership transfer: "campaign now". `last_pos` is the leader's log
    /// end when it sent this: a target that holds an entry of this term
    /// past it knows the message is stale (the leader appended since, and
    /// may have given the transfer up) and ignores it.
    TimeoutNow { last_pos: Position },
    /// Client commands a follower took, for the leader to append (client,
    /// sequence number, data). A leader in the middle of a leadership
    /// transfer holds them (with its own clients' writes) until the
    /// transfer ends, and so does a node
    /// that stepped down until it learns the new leader: then they are
    /// appended or passed on to that leader. One sent in an earlier term
    /// is passed on to the leader the receiver knows. Otherwise, or
    /// beyond `Config::max_inflight_bytes` held, they are dropped
    /// (`Stats::forwards_dropped`), and the follower's clients are
    /// answered when their writes time out.
    Forward {
        commands: Vec<(ClientId, u64, Bytes)>,
    },
    /// A follower asks the leader for a read index for its read `id`.
    ReadIndex { id: u64 },
    /// The read index for the follower's read `id`, confirmed by a quorum
    /// (`ok`), or a refusal (not the leader).
    ReadIndexResp { id: u64, index: Position, ok: bool },
    /// "You were removed": the configuration in force from `position` on
    /// in the sender's committed log (the end of its membership entry, or
    /// the start of the sender's log for its snapshot's) excludes the
    /// receiver, and so does the sender's latest configuration. Sent in
    /// answer to any message but a leader's from a node so excluded, and by
    /// a leader for a while to each node a configuration committed during
    /// its leadership removed. Never to a node in the sender's latest
    /// configuration. The receiver stops for good (`Action::Removed`)
    /// unless it is joining or knows a later configuration that includes
    /// it.
    Removed { position: Position },
}

impl Body {
    pub fn name(&self) -> &'static str {
        match self {
            Body::PreVote { .. } => "PreVote",
            Body::PreVoteResp { .. } => "PreVoteResp",
            Body::Vote { .. } => "Vote",
            Body::VoteResp { .. } => "VoteResp",
            Body::Append { .. } => "Append",
            Body::AppendResp { .. } => "AppendResp",
            Body::InstallSnapshot { .. } => "InstallSnapshot",
            Body::SnapshotAck { .. } => "SnapshotAck",
            Body::Forward { .. } => "Forward",
            Body::ReadIndex { .. } => "ReadIndex",
            Body::ReadIndexResp { .. } => "ReadIndexResp",
            Body::TimeoutNow { .. } => "TimeoutNow",
            Body::Removed { .. } => "Removed",
        }
    }
}
