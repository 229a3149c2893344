//! The wire codec: every frame exchanged between peers and between clients
//! and nodes, and its binary encoding. A frame is `[len: u32 LE][version:
//! u8][tag: u8][payload]`, where `len` counts the bytes after the length
//! field (so at least 2). Inside the payload integers are little-endian and
//! fixed-width, byte strings and strings are a `u32` length then the bytes,
//! an `Option` is a 0/1 byte then the value, a `Vec` is a `u32` count then
//! the items, and every enum starts with a tag byte. Decoding never panics,
//! never trusts a declared count or length beyond the bytes present, and
//! requires each frame to be consumed exactly.

use bytes::Bytes;
use keel_core::{
    Body, Entry, EntryKind, Membership, MembershipChange, Message, NodeId, SnapshotMeta,
};
use std::sync::Arc;

/// The peer protocol's version, carried by `Hello` and `Peer` frames. 2:
/// `AppendResp` carries the sender's `hold` (its leader stickiness), which
/// leader leases count on, and `TimeoutNow` the leader's log end (so a
/// late one is ignored). 3: a membership (a membership entry's, a
/// snapshot's) carries the ids removed from the cluster, a third id set
/// after the voters and learners, which are never added again; a version-2
/// node would drop them and accept a removed id back; `Append` and
/// `InstallSnapshot` say whether the leader counts the receiver as a voter
/// (`to_voter`: a node still joining ignores such a leader). 4:
/// `PreVoteResp` and `VoteResp` say whether the voter is amnesic (it
/// restarted without writes it had not synced, see
/// `keel_core::Node::set_amnesic`); a version-3 node would count
/// such a vote like any other. 5: they also say the latest entry the
/// voter knows is committed (its end position and term), by which a
/// candidate may learn that its configuration is. 6: a node that accepts
/// a peer connection answers the dialer's `Hello` with its own, at the
/// version the link will speak (the lower of the two nodes' newest), so
/// nodes of different versions agree on one per link (see
/// `MIN_PEER_VERSION`); no message changed.
pub const PEER_VERSION: u8 = 6;
/// The oldest peer protocol this node still speaks: a link to a node of an
/// older version (down to this) speaks that node's version, so a cluster
/// can be upgraded one node at a time. Frames of versions 4 and 5 differ
/// only in votes: one of 4 carries no committed entry (decoded as `(0,
/// 0)`, "none known", which a candidate counts as no claim). Not 3: a
/// vote in 3 cannot say that its voter is amnesic, and a candidate that
/// counted an amnesic voter's vote could be elected without writes a
/// power loss left only on others, so leaving the flag out is not safe.
pub const MIN_PEER_VERSION: u8 = 4;
/// The first peer protocol version whose votes carry the latest entry the
/// voter knows is committed.
const COMMITTED_IN_VOTES_VERSION: u8 = 5;
/// The first peer protocol version whose accepting node answers a hello:
/// a dialer that offers an older one gets no answer and speaks it.
pub const ANSWERED_HELLO_VERSION: u8 = 6;
/// The first peer protocol version of nodes that have peer TLS: a TLS link
/// never offers an older one (no older node could take it).
pub const MIN_TLS_PEER_VERSION: u8 = 6;
/// The client protocol's version, carried by `Request` and `Response`
/// frames. Kept apart from the peer protocol's so that a change between
/// nodes does not refuse clients whose frames did not change (it was 2
/// when the two were split, the version both families carried then).
pub const CLIENT_VERSION: u8 = 2;
/// The default limit on a frame's declared length.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Bytes of the length prefix.
const LEN_BYTES: usize = 4;
/// The smallest declared length: version and tag.
const MIN_FRAME: usize = 2;

/// One unit of the wire protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame on a peer connection, from the node that dials it, and
    /// (from `ANSWERED_HELLO_VERSION` on) the accepting node's answer.
    /// `version` is the frame's version byte: the newest peer protocol the
    /// dialer offers, and in an answer the one the link speaks.
    Hello {
        cluster_id: u64,
        node_id: NodeId,
        version: u8,
    },
    Peer(keel_core::Message),
    Request(ClientRequest),
    Response(ClientResponse),
}

/// Which of the four kinds a frame is, known from its tag byte before the
/// rest of it has arrived (`frame_kind`): a connection refuses a frame of
/// the wrong kind without reading, buffering or decoding the rest of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    Hello,
    Peer,
    Request,
    Response,
}

impl FrameKind {
    /// What the frame is, for messages ("a client request").
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Hello => "a hello",
            FrameKind::Peer => "a peer message",
            FrameKind::Request => "a client request",
            FrameKind::Response => "a client response",
        }
    }
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello { .. } => FrameKind::Hello,
            Frame::Peer(_) => FrameKind::Peer,
            Frame::Request(_) => FrameKind::Request,
            Frame::Response(_) => FrameKind::Response,
        }
    }
}

/// The largest declared length of a `Hello` frame (version, tag, cluster
/// id, node id): the limit to read a connection's first frame with.
pub const HELLO_MAX_FRAME: usize = 2 + 8 + 8;

/// The protocol a connection's opening bytes speak, if they are one of the
/// common ones sent to a Keel port by mistake (an etcd client or a browser
/// on the native client port, a TLS client anywhere): "HTTP/2" (its
/// preface, `PRI * HTTP/2.0`), "HTTP/1.1" (a request line's method) or
/// "TLS" (a handshake record, 0x16 0x03). `None` if they are none of these
/// or too few to tell. Read as a Keel frame, an HTTP opening declares over
/// 512 MiB (its fourth byte, a letter or a space, is the length's top
/// byte), above every frame limit; a TLS one may declare a length a frame
/// could have, so take it as TLS only once the frame was refused.
pub fn foreign_protocol(opening: &[u8]) -> Option<&'static str> {
    const HTTP1: [&[u8; 4]; 9] = [
        b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
    ];
    match opening {
        [b'P', b'R', b'I', b' ', ..] => Some("HTTP/2"),
        [a, b, c, d, ..] if HTTP1.contains(&&[*a, *b, *c, *d]) => Some("HTTP/1.1"),
        // A record of type handshake, protocol version 3.x (SSL 3.0 to
        // TLS 1.3, which keeps 3.1 or 3.3 here).
        [0x16, 0x03, minor, ..] if *minor <= 4 => Some("TLS"),
        _ => None,
    }
}

/// A client's request to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRequest {
    pub id: u64,
    pub client: u64,
    pub seq: u64,
    pub op: ClientOp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOp {
    /// A command for the replicated service (exactly once by (client, seq)).
    Write(Bytes),
    /// A linearizable read-only query (read-index).
    Read(Bytes),
    /// A read-only query answered from this node's state, however stale.
    StaleRead(Bytes),
    Status,
    TransferLeader(NodeId),
    ChangeMembership(keel_core::MembershipChange),
    /// The configuration in force on the node, with the ids removed from
    /// the cluster (which are never added again), answered
    /// `ClientResult::Membership`. Added within client protocol 2 (a
    /// request only new clients send): a node from before it refuses the
    /// unknown op tag and closes the connection.
    Membership,
}

/// How the `ClientResult::Error` a node gives a write whose outcome it
/// could not learn (`write_timeout_ms`) begins: it may or may not have been
/// applied, and clients report it so, not as a refusal.
pub const OUTCOME_UNKNOWN: &str = "no outcome for this write";

/// How the `ClientResult::Error` for a leadership transfer that did not
/// complete in time begins (the etcd API answers it as etcd does a
/// transfer that took too long).
pub const TRANSFER_TIMED_OUT: &str = "leadership transfer timed out";

/// A node's answer to the request with the same `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientResponse {
    pub id: u64,
    pub result: ClientResult,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientResult {
    Ok(Bytes),
    /// A stale read's answer with this node's applied position and the commit position it knows.
    StaleOk {
        data: Bytes,
        applied: u64,
        commit: u64,
    },
    NotLeader {
        leader: Option<NodeId>,
        address: Option<String>,
    },
    /// The node is overloaded; retry later (the request was not taken).
    Busy,
    Error(String),
    Status(NodeStatus),
    /// The answer to `ClientOp::Membership`.
    Membership(Membership),
}

/// What a node reports about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub append: u64,
    pub durable: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Leader only: (follower, matched position).
    pub followers: Vec<(NodeId, u64)>,
}

/// Why a frame could not be decoded. Any of these means the stream is no
/// longer trustworthy: close the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame declares {len} bytes, above the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame declares {len} bytes, expected at least {MIN_FRAME} (version and tag)")]
    FrameTooShort { len: usize },
    #[error("unsupported {what} version {found}, expected {}", versions(*.min, *.max))]
    BadVersion {
        what: &'static str,
        found: u8,
        /// The oldest and the newest version this node takes.
        min: u8,
        max: u8,
    },
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("frame ended in the middle of {what}")]
    Truncated { what: &'static str },
    #[error("{extra} unexpected bytes after the end of the {what}")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what}: expected a flag byte 0 or 1, found {found}")]
    BadFlag { what: &'static str, found: u8 },
    #[error("{what} declares {count} items, but only {remaining} bytes remain in the frame")]
    CountTooLarge {
        what: &'static str,
        count: u32,
        remaining: usize,
    },
    #[error("{what} must be in strictly ascending order, found {found} after {prev}")]
    Unordered {
        what: &'static str,
        prev: u64,
        found: u64,
    },
    #[error("membership lists node {id} both among its {among} and among its removed ids")]
    RemovedMember { id: NodeId, among: &'static str },
}

// Frame tags.
const FRAME_HELLO: u8 = 1;
const FRAME_PEER: u8 = 2;
const FRAME_REQUEST: u8 = 3;
const FRAME_RESPONSE: u8 = 4;

/// The versions a frame with this tag may carry (the oldest and the
/// newest), and whose protocol it is (`None`: not a frame tag).
fn versions_for(tag: u8) -> Option<(u8, u8, &'static str)> {
    match tag {
        // A hello's layout is the same in every version, so one that
        // offers a version newer than this node's is read too (and
        // answered with this node's newest).
        FRAME_HELLO => Some((MIN_PEER_VERSION, u8::MAX, "peer protocol")),
        FRAME_PEER => Some((MIN_PEER_VERSION, PEER_VERSION, "peer protocol")),
        FRAME_REQUEST | FRAME_RESPONSE => Some((CLIENT_VERSION, CLIENT_VERSION, "client protocol")),
        _ => None,
    }
}

/// "5", "4 to 6", or "4 or later".
fn versions(min: u8, max: u8) -> String {
    if min == max {
        min.to_string()
    } else if max == u8::MAX {
        format!("{min} or later")
    } else {
        format!("{min} to {max}")
    }
}

// Message body tags.
const BODY_PRE_VOTE: u8 = 1;
const BODY_PRE_VOTE_RESP: u8 = 2;
const BODY_VOTE: u8 = 3;
const BODY_VOTE_RESP: u8 = 4;
const BODY_APPEND: u8 = 5;
const BODY_APPEND_RESP: u8 = 6;
const BODY_INSTALL_SNAPSHOT: u8 = 7;
const BODY_TIMEOUT_NOW: u8 = 8;
const BODY_SNAPSHOT_ACK: u8 = 9;
const BODY_FORWARD: u8 = 10;
const BODY_READ_INDEX: u8 = 11;
const BODY_READ_INDEX_RESP: u8 = 12;
/// Newer than the rest: a node from before it fails to decode the frame
/// (an unknown tag), logs it and closes the link, which reconnects.
const BODY_REMOVED: u8 = 13;

// Entry kind tags.
const KIND_TERM_START: u8 = 1;
const KIND_COMMAND: u8 = 2;
const KIND_TIMER: u8 = 3;
const KIND_MEMBERSHIP: u8 = 4;
const KIND_SESSION_CLOSE: u8 = 5;

// Client op tags.
const OP_WRITE: u8 = 1;
const OP_READ: u8 = 2;
const OP_STALE_READ: u8 = 3;
const OP_STATUS: u8 = 4;
const OP_TRANSFER_LEADER: u8 = 5;
const OP_CHANGE_MEMBERSHIP: u8 = 6;
const OP_MEMBERSHIP: u8 = 7;

// Membership change tags.
const CHANGE_ADD_LEARNER: u8 = 1;
const CHANGE_PROMOTE_LEARNER: u8 = 2;
const CHANGE_REMOVE: u8 = 3;

// Client result tags.
const RESULT_OK: u8 = 1;
const RESULT_STALE_OK: u8 = 2;
const RESULT_NOT_LEADER: u8 = 3;
const RESULT_BUSY: u8 = 4;
const RESULT_ERROR: u8 = 5;
const RESULT_STATUS: u8 = 6;
const RESULT_MEMBERSHIP: u8 = 7;

// Smallest encodings, to bound declared counts by the bytes present.
/// term, position, timestamp, kind tag, data length.
const MIN_ENTRY: usize = 8 + 8 + 8 + 1 + 4;

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Appends one frame: [len: u32 LE = bytes after this field][version u8][tag u8][payload].
///
/// Never panics. A frame whose length does not fit the `u32` prefix (over
/// 4 GiB) is written with the length `u32::MAX`, which any receiver whose
/// limit is below that rejects with [`CodecError::FrameTooLarge`].
///
/// A peer message is written in the newest peer protocol
/// (`encode_message` writes an older one), a hello in its own `version`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    match frame {
        Frame::Hello {
            cluster_id,
            node_id,
            version,
        } => {
            let start = begin_frame(out, *version, FRAME_HELLO);
            put_u64(out, *cluster_id);
            put_u64(out, *node_id);
            end_frame(out, start);
        }
        Frame::Peer(m) => encode_message(m, PEER_VERSION, out),
        Frame::Request(r) => {
            let start = begin_frame(out, CLIENT_VERSION, FRAME_REQUEST);
            put_request(out, r);
            end_frame(out, start);
        }
        Frame::Response(r) => {
            let start = begin_frame(out, CLIENT_VERSION, FRAME_RESPONSE);
            put_response(out, r);
            end_frame(out, start);
        }
    }
}

/// Appends a peer message's frame in peer protocol `version` (from
/// `MIN_PEER_VERSION` to `PEER_VERSION`; what that version cannot carry is
/// left out, see `MIN_PEER_VERSION`): a link to a node of an older version
/// speaks that node's.
pub fn encode_message(m: &Message, version: u8, out: &mut Vec<u8>) {
    let start = begin_frame(out, version, FRAME_PEER);
    put_message(out, m, version);
    end_frame(out, start);
}

/// Appends a frame's header with a length to be filled in by `end_frame`;
/// returns where the frame starts.
fn begin_frame(out: &mut Vec<u8>, version: u8, tag: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_BYTES]);
    out.push(version);
    out.push(tag);
    start
}

/// Fills in the length of the frame that starts at `start`.
fn end_frame(out: &mut [u8], start: usize) {
    let body_len = out.len().saturating_sub(start).saturating_sub(LEN_BYTES);
    let len = u32::try_from(body_len).unwrap_or(u32::MAX);
    if let Some(prefix) = out.get_mut(start..start.saturating_add(LEN_BYTES)) {
        prefix.copy_from_slice(&len.to_le_bytes());
    }
}

fn put_u8(out: &mut Vec<u8>, v: u8) {
    out.push(v);
}

fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(u8::from(v));
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A length or count as `u32`; one above `u32::MAX` can only occur in a
/// frame over 4 GiB, which `encode` marks as too large anyway.
fn put_len(out: &mut Vec<u8>, n: usize) {
    put_u32(out, u32::try_from(n).unwrap_or(u32::MAX));
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => put_u8(out, 0),
        Some(v) => {
            put_u8(out, 1);
            put_u64(out, v);
        }
    }
}

fn put_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => put_u8(out, 0),
        Some(s) => {
            put_u8(out, 1);
            put_bytes(out, s.as_bytes());
        }
    }
}

fn put_ids<'a>(out: &mut Vec<u8>, len: usize, ids: impl Iterator<Item = &'a u64>) {
    put_len(out, len);
    for id in ids {
        put_u64(out, *id);
    }
}

/// Voters, learners, then the removed ids (peer protocol 3), each a
/// strictly ascending id set.
fn put_membership(out: &mut Vec<u8>, m: &Membership) {
    put_ids(out, m.voters.len(), m.voters.iter());
    put_ids(out, m.learners.len(), m.learners.iter());
    put_ids(out, m.removed.len(), m.removed.iter());
}

/// `m` in peer protocol `version`.
fn put_message(out: &mut Vec<u8>, m: &Message, version: u8) {
    put_u64(out, m.cluster_id);
    put_u64(out, m.from);
    put_u64(out, m.to);
    put_u64(out, m.term);
    match &m.body {
        Body::PreVote {
            last_pos,
            last_term,
        } => {
            put_u8(out, BODY_PRE_VOTE);
            put_u64(out, *last_pos);
            put_u64(out, *last_term);
        }
        Body::PreVoteResp {
            granted,
            amnesic,
            committed,
        } => {
            put_u8(out, BODY_PRE_VOTE_RESP);
            put_bool(out, *granted);
            put_bool(out, *amnesic);
            if version >= COMMITTED_IN_VOTES_VERSION {
                put_u64(out, committed.0);
                put_u64(out, committed.1);
            }
        }
        Body::Vote {
            last_pos,
            last_term,
            transfer,
        } => {
            put_u8(out, BODY_VOTE);
            put_u64(out, *last_pos);
            put_u64(out, *last_term);
            put_bool(out, *transfer);
        }
        Body::VoteResp {
            granted,
            amnesic,
            committed,
        } => {
            put_u8(out, BODY_VOTE_RESP);
            put_bool(out, *granted);
            put_bool(out, *amnesic);
            if version >= COMMITTED_IN_VOTES_VERSION {
                put_u64(out, committed.0);
                put_u64(out, committed.1);
            }
        }
        Body::Append {
            prev_pos,
            prev_term,
            commit,
            heartbeat,
            entries,
            to_voter,
        } => {
            put_u8(out, BODY_APPEND);
            put_u64(out, *prev_pos);
            put_u64(out, *prev_term);
            put_u64(out, *commit);
            put_u64(out, *heartbeat);
            put_bool(out, *to_voter);
            put_len(out, entries.len());
            for e in entries {
                put_entry(out, e);
            }
        }
        Body::AppendResp {
            ok,
            position,
            hint_pos,
            hint_term,
            heartbeat,
            hold,
        } => {
            put_u8(out, BODY_APPEND_RESP);
            put_bool(out, *ok);
            put_u64(out, *position);
            put_u64(out, *hint_pos);
            put_u64(out, *hint_term);
            put_u64(out, *heartbeat);
            put_u64(out, *hold);
        }
        Body::InstallSnapshot {
            meta,
            offset,
            chunk,
            done,
            to_voter,
        } => {
            put_u8(out, BODY_INSTALL_SNAPSHOT);
            put_meta(out, meta);
            put_u64(out, *offset);
            put_bytes(out, chunk);
            put_bool(out, *done);
            put_bool(out, *to_voter);
        }
        Body::SnapshotAck { position, received } => {
            put_u8(out, BODY_SNAPSHOT_ACK);
            put_u64(out, *position);
            put_u64(out, *received);
        }
        Body::Forward { commands } => {
            put_u8(out, BODY_FORWARD);
            put_u32(out, commands.len() as u32);
            for (client, seq, data) in commands {
                put_u64(out, *client);
                put_u64(out, *seq);
                put_bytes(out, data);
            }
        }
        Body::ReadIndex { id } => {
            put_u8(out, BODY_READ_INDEX);
            put_u64(out, *id);
        }
        Body::ReadIndexResp { id, index, ok } => {
            put_u8(out, BODY_READ_INDEX_RESP);
            put_u64(out, *id);
            put_u64(out, *index);
            put_bool(out, *ok);
        }
        Body::TimeoutNow { last_pos } => {
            put_u8(out, BODY_TIMEOUT_NOW);
            put_u64(out, *last_pos);
        }
        Body::Removed { position } => {
            put_u8(out, BODY_REMOVED);
            put_u64(out, *position);
        }
    }
}

fn put_entry(out: &mut Vec<u8>, e: &Entry) {
    put_u64(out, e.term);
    put_u64(out, e.position);
    put_u64(out, e.timestamp);
    match &e.kind {
        EntryKind::TermStart => put_u8(out, KIND_TERM_START),
        EntryKind::Command { client, seq } => {
            put_u8(out, KIND_COMMAND);
            put_u64(out, *client);
            put_u64(out, *seq);
        }
        EntryKind::Timer { id, deadline } => {
            put_u8(out, KIND_TIMER);
            put_u64(out, *id);
            put_u64(out, *deadline);
        }
        EntryKind::Membership(m) => {
            put_u8(out, KIND_MEMBERSHIP);
            put_membership(out, m);
        }
        EntryKind::SessionClose { client } => {
            put_u8(out, KIND_SESSION_CLOSE);
            put_u64(out, *client);
        }
    }
    put_bytes(out, &e.data);
}

fn put_meta(out: &mut Vec<u8>, m: &SnapshotMeta) {
    put_u64(out, m.position);
    put_u64(out, m.term);
    put_u64(out, m.timestamp);
    put_membership(out, &m.membership);
}

fn put_request(out: &mut Vec<u8>, r: &ClientRequest) {
    put_u64(out, r.id);
    put_u64(out, r.client);
    put_u64(out, r.seq);
    match &r.op {
        ClientOp::Write(b) => {
            put_u8(out, OP_WRITE);
            put_bytes(out, b);
        }
        ClientOp::Read(b) => {
            put_u8(out, OP_READ);
            put_bytes(out, b);
        }
        ClientOp::StaleRead(b) => {
            put_u8(out, OP_STALE_READ);
            put_bytes(out, b);
        }
        ClientOp::Status => put_u8(out, OP_STATUS),
        ClientOp::Membership => put_u8(out, OP_MEMBERSHIP),
        ClientOp::TransferLeader(n) => {
            put_u8(out, OP_TRANSFER_LEADER);
            put_u64(out, *n);
        }
        ClientOp::ChangeMembership(c) => {
            put_u8(out, OP_CHANGE_MEMBERSHIP);
            let (tag, n) = match *c {
                MembershipChange::AddLearner(n) => (CHANGE_ADD_LEARNER, n),
                MembershipChange::PromoteLearner(n) => (CHANGE_PROMOTE_LEARNER, n),
                MembershipChange::Remove(n) => (CHANGE_REMOVE, n),
            };
            put_u8(out, tag);
            put_u64(out, n);
        }
    }
}

fn put_response(out: &mut Vec<u8>, r: &ClientResponse) {
    put_u64(out, r.id);
    match &r.result {
        ClientResult::Ok(b) => {
            put_u8(out, RESULT_OK);
            put_bytes(out, b);
        }
        ClientResult::StaleOk {
            data,
            applied,
            commit,
        } => {
            put_u8(out, RESULT_STALE_OK);
            put_bytes(out, data);
            put_u64(out, *applied);
            put_u64(out, *commit);
        }
        ClientResult::NotLeader { leader, address } => {
            put_u8(out, RESULT_NOT_LEADER);
            put_opt_u64(out, *leader);
            put_opt_str(out, address.as_deref());
        }
        ClientResult::Busy => put_u8(out, RESULT_BUSY),
        ClientResult::Error(e) => {
            put_u8(out, RESULT_ERROR);
            put_bytes(out, e.as_bytes());
        }
        ClientResult::Status(s) => {
            put_u8(out, RESULT_STATUS);
            put_status(out, s);
        }
        ClientResult::Membership(m) => {
            put_u8(out, RESULT_MEMBERSHIP);
            put_membership(out, m);
        }
    }
}

fn put_status(out: &mut Vec<u8>, s: &NodeStatus) {
    put_u64(out, s.id);
    put_bytes(out, s.role.as_bytes());
    put_u64(out, s.term);
    put_opt_u64(out, s.leader);
    put_u64(out, s.append);
    put_u64(out, s.durable);
    put_u64(out, s.commit);
    put_u64(out, s.applied);
    put_ids(out, s.voters.len(), s.voters.iter());
    put_ids(out, s.learners.len(), s.learners.iter());
    put_len(out, s.followers.len());
    for (id, matched) in &s.followers {
        put_u64(out, *id);
        put_u64(out, *matched);
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// Decodes one frame from the start of `buf`. Ok(None): `buf` holds only part
/// of a frame (need more bytes); Ok(Some((frame, consumed))). A declared
/// length above `max_frame` is an error right away (before the bytes arrive),
/// as is a length < 2 or (once its byte is present) a wrong version. Never
/// panics on any input; never allocates more than the bytes actually present.
pub fn decode(buf: &[u8], max_frame: usize) -> Result<Option<(Frame, usize)>, CodecError> {
    decode_in(buf, None, max_frame)
}

/// `decode` of the frame starting `at` bytes into `chunk`, whose byte
/// strings (entry payloads, request commands, snapshot chunks) are slices
/// of `chunk` rather than copies: one buffer, shared by every frame of a
/// read, instead of an allocation and a copy per entry on every node. The
/// slices keep `chunk` alive, so pass a chunk holding just the frames read.
pub fn decode_shared(
    chunk: &Bytes,
    at: usize,
    max_frame: usize,
) -> Result<Option<(Frame, usize)>, CodecError> {
    match chunk.get(at..) {
        Some(buf) => decode_in(buf, Some(chunk), max_frame),
        None => Ok(None),
    }
}

/// The size (length prefix included) of the frame at the start of `buf`,
/// from its length prefix alone: Ok(None) until the prefix is there; the
/// errors `decode` gives for a bad prefix or version.
pub fn frame_size(buf: &[u8], max_frame: usize) -> Result<Option<usize>, CodecError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<LEN_BYTES>() else {
        return Ok(None);
    };
    let len = usize::try_from(u32::from_le_bytes(*prefix)).unwrap_or(usize::MAX);
    if len > max_frame {
        return Err(CodecError::FrameTooLarge {
            len,
            max: max_frame,
        });
    }
    if len < MIN_FRAME {
        return Err(CodecError::FrameTooShort { len });
    }
    // The version byte is checked against the tag's family once both are
    // there (an unknown tag is `decode`'s error).
    if let Some(&[found, tag]) = rest.get(..2) {
        if let Some((min, max, what)) = versions_for(tag) {
            if !(min..=max).contains(&found) {
                return Err(CodecError::BadVersion {
                    what,
                    found,
                    min,
                    max,
                });
            }
        }
    }
    Ok(Some(LEN_BYTES.saturating_add(len)))
}

/// The kind of the frame at the start of `buf`, from its tag byte alone
/// (Ok(None) until that byte is there); an unknown tag is an error. The
/// length prefix is not checked here: that is `frame_size`'s.
pub fn frame_kind(buf: &[u8]) -> Result<Option<FrameKind>, CodecError> {
    let Some(&tag) = buf.get(LEN_BYTES + 1) else {
        return Ok(None);
    };
    let kind = match tag {
        FRAME_HELLO => FrameKind::Hello,
        FRAME_PEER => FrameKind::Peer,
        FRAME_REQUEST => FrameKind::Request,
        FRAME_RESPONSE => FrameKind::Response,
        tag => return Err(CodecError::UnknownTag { what: "frame", tag }),
    };
    Ok(Some(kind))
}

/// `decode`; with `shared`, the buffer `buf` lies in, byte strings are
/// slices of it.
fn decode_in(
    buf: &[u8],
    shared: Option<&Bytes>,
    max_frame: usize,
) -> Result<Option<(Frame, usize)>, CodecError> {
    let Some(size) = frame_size(buf, max_frame)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LEN_BYTES..size) else {
        return Ok(None);
    };
    let mut r = Reader {
        buf: body,
        shared,
        version: 0,
    };
    // (In the range its tag's protocol takes: `frame_size`.)
    r.version = r.u8("version")?;
    let frame = match r.u8("frame tag")? {
        FRAME_HELLO => Frame::Hello {
            cluster_id: r.u64("Hello.cluster_id")?,
            node_id: r.u64("Hello.node_id")?,
            version: r.version,
        },
        FRAME_PEER => Frame::Peer(r.message()?),
        FRAME_REQUEST => Frame::Request(r.request()?),
        FRAME_RESPONSE => Frame::Response(r.response()?),
        tag => return Err(CodecError::UnknownTag { what: "frame", tag }),
    };
    let what = match frame.kind() {
        FrameKind::Hello => "Hello frame",
        FrameKind::Peer => "Peer frame",
        FrameKind::Request => "Request frame",
        FrameKind::Response => "Response frame",
    };
    r.finish(what)?;
    Ok(Some((frame, size)))
}

/// Reads fields off the front of one frame's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    /// The buffer `buf` lies in, when byte strings may be slices of it.
    shared: Option<&'a Bytes>,
    /// The frame's version (what a peer message's fields are).
    version: u8,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        let (Some(head), Some(tail)) = (self.buf.get(..n), self.buf.get(n..)) else {
            return Err(CodecError::Truncated { what });
        };
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let Some((head, tail)) = self.buf.split_first_chunk::<N>() else {
            return Err(CodecError::Truncated { what });
        };
        self.buf = tail;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A 0/1 byte.
    fn flag(&mut self, what: &'static str) -> Result<bool, CodecError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            found => Err(CodecError::BadFlag { what, found }),
        }
    }

    fn bytes(&mut self, what: &'static str) -> Result<Bytes, CodecError> {
        let n = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        let raw = self.take(n, what)?;
        Ok(match self.shared {
            // `raw` is part of `buf`, which `decode_shared` took from `shared`.
            Some(whole) => whole.slice_ref(raw),
            None => Bytes::copy_from_slice(raw),
        })
    }

    fn string(&mut self, what: &'static str) -> Result<String, CodecError> {
        let n = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        let raw = self.take(n, what)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(CodecError::BadUtf8 { what }),
        }
    }

    fn opt_u64(&mut self, what: &'static str) -> Result<Option<u64>, CodecError> {
        Ok(if self.flag(what)? {
            Some(self.u64(what)?)
        } else {
            None
        })
    }

    fn opt_string(&mut self, what: &'static str) -> Result<Option<String>, CodecError> {
        Ok(if self.flag(what)? {
            Some(self.string(what)?)
        } else {
            None
        })
    }

    /// A vector's count, checked against the bytes left: each item takes at
    /// least `min_item` bytes, so a larger count cannot be genuine.
    fn count(&mut self, what: &'static str, min_item: usize) -> Result<usize, CodecError> {
        let count = self.u32(what)?;
        let n = usize::try_from(count).unwrap_or(usize::MAX);
        let remaining = self.buf.len();
        if n > remaining / min_item.max(1) {
            return Err(CodecError::CountTooLarge {
                what,
                count,
                remaining,
            });
        }
        Ok(n)
    }

    fn ids(&mut self, what: &'static str) -> Result<Vec<u64>, CodecError> {
        let n = self.count(what, 8)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.u64(what)?);
        }
        Ok(v)
    }

    /// A set of ids, which must be strictly ascending (as encoded), so that
    /// every set has exactly one encoding.
    fn id_set(
        &mut self,
        what: &'static str,
    ) -> Result<std::collections::BTreeSet<u64>, CodecError> {
        let ids = self.ids(what)?;
        let mut prev: Option<u64> = None;
        for &found in &ids {
            if let Some(prev) = prev {
                if found <= prev {
                    return Err(CodecError::Unordered { what, prev, found });
                }
            }
            prev = Some(found);
        }
        Ok(ids.into_iter().collect())
    }

    /// A membership; a removed id is never a member again (the core never
    /// writes one that is), so one listed as both is refused.
    fn membership(&mut self) -> Result<Membership, CodecError> {
        let voters = self.id_set("membership voters")?;
        let learners = self.id_set("membership learners")?;
        let removed = self.id_set("membership removed ids")?;
        for (among, members) in [("voters", &voters), ("learners", &learners)] {
            if let Some(&id) = removed.intersection(members).next() {
                return Err(CodecError::RemovedMember { id, among });
            }
        }
        Ok(Membership {
            voters,
            learners,
            removed,
        })
    }

    fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::TrailingBytes {
                what,
                extra: self.buf.len(),
            })
        }
    }

    /// A vote's committed entry: `(0, 0)` (none) in a version-4 frame.
    fn committed_claim(
        &mut self,
        pos: &'static str,
        term: &'static str,
    ) -> Result<(u64, u64), CodecError> {
        if self.version < COMMITTED_IN_VOTES_VERSION {
            return Ok((0, 0));
        }
        Ok((self.u64(pos)?, self.u64(term)?))
    }

    fn message(&mut self) -> Result<Message, CodecError> {
        let cluster_id = self.u64("Message.cluster_id")?;
        let from = self.u64("Message.from")?;
        let to = self.u64("Message.to")?;
        let term = self.u64("Message.term")?;
        let body = match self.u8("message body tag")? {
            BODY_PRE_VOTE => Body::PreVote {
                last_pos: self.u64("PreVote.last_pos")?,
                last_term: self.u64("PreVote.last_term")?,
            },
            BODY_PRE_VOTE_RESP => Body::PreVoteResp {
                granted: self.flag("PreVoteResp.granted")?,
                amnesic: self.flag("PreVoteResp.amnesic")?,
                committed: self
                    .committed_claim("PreVoteResp.committed_pos", "PreVoteResp.committed_term")?,
            },
            BODY_VOTE => Body::Vote {
                last_pos: self.u64("Vote.last_pos")?,
                last_term: self.u64("Vote.last_term")?,
                transfer: self.flag("Vote.transfer")?,
            },
            BODY_VOTE_RESP => Body::VoteResp {
                granted: self.flag("VoteResp.granted")?,
                amnesic: self.flag("VoteResp.amnesic")?,
                committed: self
                    .committed_claim("VoteResp.committed_pos", "VoteResp.committed_term")?,
            },
            BODY_APPEND => {
                let prev_pos = self.u64("Append.prev_pos")?;
                let prev_term = self.u64("Append.prev_term")?;
                let commit = self.u64("Append.commit")?;
                let heartbeat = self.u64("Append.heartbeat")?;
                let to_voter = self.flag("Append.to_voter")?;
                let n = self.count("Append.entries", MIN_ENTRY)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(self.entry()?);
                }
                Body::Append {
                    prev_pos,
                    prev_term,
                    commit,
                    heartbeat,
                    entries,
                    to_voter,
                }
            }
            BODY_APPEND_RESP => Body::AppendResp {
                ok: self.flag("AppendResp.ok")?,
                position: self.u64("AppendResp.position")?,
                hint_pos: self.u64("AppendResp.hint_pos")?,
                hint_term: self.u64("AppendResp.hint_term")?,
                heartbeat: self.u64("AppendResp.heartbeat")?,
                hold: self.u64("AppendResp.hold")?,
            },
            BODY_INSTALL_SNAPSHOT => Body::InstallSnapshot {
                meta: self.meta()?,
                offset: self.u64("InstallSnapshot.offset")?,
                chunk: self.bytes("InstallSnapshot.chunk")?,
                done: self.flag("InstallSnapshot.done")?,
                to_voter: self.flag("InstallSnapshot.to_voter")?,
            },
            BODY_SNAPSHOT_ACK => Body::SnapshotAck {
                position: self.u64("SnapshotAck.position")?,
                received: self.u64("SnapshotAck.received")?,
            },
            BODY_FORWARD => {
                // Each command needs at least 20 bytes: bound the count by
                // what is actually there before allocating.
                let n = self.count("Forward.commands", 20)?;
                let mut commands = Vec::with_capacity(n);
                for _ in 0..n {
                    let client = self.u64("Forward.client")?;
                    let seq = self.u64("Forward.seq")?;
                    let data = self.bytes("Forward.data")?;
                    commands.push((client, seq, data));
                }
                Body::Forward { commands }
            }
            BODY_READ_INDEX => Body::ReadIndex {
                id: self.u64("ReadIndex.id")?,
            },
            BODY_READ_INDEX_RESP => Body::ReadIndexResp {
                id: self.u64("ReadIndexResp.id")?,
                index: self.u64("ReadIndexResp.index")?,
                ok: self.flag("ReadIndexResp.ok")?,
            },
            BODY_TIMEOUT_NOW => Body::TimeoutNow {
                last_pos: self.u64("TimeoutNow.last_pos")?,
            },
            BODY_REMOVED => Body::Removed {
                position: self.u64("Removed.position")?,
            },
            tag => {
                return Err(CodecError::UnknownTag {
                    what: "message body",
                    tag,
                })
            }
        };
        Ok(Message {
            cluster_id,
            from,
            to,
            term,
            body,
        })
    }

    fn entry(&mut self) -> Result<Entry, CodecError> {
        let term = self.u64("Entry.term")?;
        let position = self.u64("Entry.position")?;
        let timestamp = self.u64("Entry.timestamp")?;
        let kind = match self.u8("entry kind tag")? {
            KIND_TERM_START => EntryKind::TermStart,
            KIND_COMMAND => EntryKind::Command {
                client: self.u64("Command.client")?,
                seq: self.u64("Command.seq")?,
            },
            KIND_TIMER => EntryKind::Timer {
                id: self.u64("Timer.id")?,
                deadline: self.u64("Timer.deadline")?,
            },
            KIND_MEMBERSHIP => EntryKind::Membership(Arc::new(self.membership()?)),
            KIND_SESSION_CLOSE => EntryKind::SessionClose {
                client: self.u64("SessionClose.client")?,
            },
            tag => {
                return Err(CodecError::UnknownTag {
                    what: "entry kind",
                    tag,
                })
            }
        };
        let data = self.bytes("Entry.data")?;
        Ok(Entry {
            term,
            position,
            timestamp,
            kind,
            data,
        })
    }

    fn meta(&mut self) -> Result<SnapshotMeta, CodecError> {
        Ok(SnapshotMeta {
            position: self.u64("SnapshotMeta.position")?,
            term: self.u64("SnapshotMeta.term")?,
            timestamp: self.u64("SnapshotMeta.timestamp")?,
            membership: self.membership()?,
        })
    }

    fn request(&mut self) -> Result<ClientRequest, CodecError> {
        let id = self.u64("ClientRequest.id")?;
        let client = self.u64("ClientRequest.client")?;
        let seq = self.u64("ClientRequest.seq")?;
        let op = match self.u8("client op tag")? {
            OP_WRITE => ClientOp::Write(self.bytes("Write data")?),
            OP_READ => ClientOp::Read(self.bytes("Read query")?),
            OP_STALE_READ => ClientOp::StaleRead(self.bytes("StaleRead query")?),
            OP_STATUS => ClientOp::Status,
            OP_MEMBERSHIP => ClientOp::Membership,
            OP_TRANSFER_LEADER => ClientOp::TransferLeader(self.u64("TransferLeader target")?),
            OP_CHANGE_MEMBERSHIP => {
                let tag = self.u8("membership change tag")?;
                let n = self.u64("membership change node")?;
                ClientOp::ChangeMembership(match tag {
                    CHANGE_ADD_LEARNER => MembershipChange::AddLearner(n),
                    CHANGE_PROMOTE_LEARNER => MembershipChange::PromoteLearner(n),
                    CHANGE_REMOVE => MembershipChange::Remove(n),
                    tag => {
                        return Err(CodecError::UnknownTag {
                            what: "membership change",
                            tag,
                        })
                    }
                })
            }
            tag => {
                return Err(CodecError::UnknownTag {
                    what: "client op",
                    tag,
                })
            }
        };
        Ok(ClientRequest {
            id,
            client,
            seq,
            op,
        })
    }

    fn response(&mut self) -> Result<ClientResponse, CodecError> {
        let id = self.u64("ClientResponse.id")?;
        let result = match self.u8("client result tag")? {
            RESULT_OK => ClientResult::Ok(self.bytes("Ok data")?),
            RESULT_STALE_OK => ClientResult::StaleOk {
                data: self.bytes("StaleOk.data")?,
                applied: self.u64("StaleOk.applied")?,
                commit: self.u64("StaleOk.commit")?,
            },
            RESULT_NOT_LEADER => ClientResult::NotLeader {
                leader: self.opt_u64("NotLeader.leader")?,
                address: self.opt_string("NotLeader.address")?,
            },
            RESULT_BUSY => ClientResult::Busy,
            RESULT_ERROR => ClientResult::Error(self.string("Error message")?),
            RESULT_STATUS => ClientResult::Status(self.status()?),
            RESULT_MEMBERSHIP => ClientResult::Membership(self.membership()?),
            tag => {
                return Err(CodecError::UnknownTag {
                    what: "client result",
                    tag,
                })
            }
        };
        Ok(ClientResponse { id, result })
    }

    fn status(&mut self) -> Result<NodeStatus, CodecError> {
        let id = self.u64("NodeStatus.id")?;
        let role = self.string("NodeStatus.role")?;
        let term = self.u64("NodeStatus.term")?;
        let leader = self.opt_u64("NodeStatus.leader")?;
        let append = self.u64("NodeStatus.append")?;
        let durable = self.u64("NodeStatus.durable")?;
        let commit = self.u64("NodeStatus.commit")?;
        let applied = self.u64("NodeStatus.applied")?;
        let voters = self.ids("NodeStatus.voters")?;
        let learners = self.ids("NodeStatus.learners")?;
        let n = self.count("NodeStatus.followers", 16)?;
        let mut followers = Vec::with_capacity(n);
        for _ in 0..n {
            let follower = self.u64("NodeStatus.followers")?;
            let matched = self.u64("NodeStatus.followers")?;
            followers.push((follower, matched));
        }
        Ok(NodeStatus {
            id,
            role,
            term,
            leader,
            append,
            durable,
            commit,
            applied,
            voters,
            learners,
            followers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_set, vec};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const MAX: usize = DEFAULT_MAX_FRAME;

    fn enc(f: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(f, &mut out);
        out
    }

    /// `f` encoded as a frame whose version byte is `version`: a peer
    /// message in that peer protocol (an older one decodes too), anything
    /// else as `enc`.
    fn enc_as(f: &Frame, version: u8) -> Vec<u8> {
        match f {
            Frame::Peer(m) => {
                let mut b = Vec::new();
                encode_message(m, version, &mut b);
                b
            }
            f => enc(f),
        }
    }

    /// Rewrites the length prefix of an encoded frame.
    fn set_len(buf: &mut [u8], len: usize) {
        let len = u32::try_from(len).unwrap();
        buf[..4].copy_from_slice(&len.to_le_bytes());
    }

    /// Any `u64`, with the edges (0, 1, around `u32::MAX`, `u64::MAX`)
    /// often: a uniform `u64` almost never hits them.
    fn u64s() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => any::<u64>(),
            1 => proptest::sample::select(vec![
                0,
                1,
                u64::from(u32::MAX),
                u64::from(u32::MAX) + 1,
                u64::MAX - 1,
                u64::MAX,
            ]),
        ]
    }

    /// Byte strings: often empty, mostly short, sometimes a few KiB.
    fn bytes() -> impl Strategy<Value = Bytes> {
        prop_oneof![
            2 => Just(Bytes::new()),
            8 => vec(any::<u8>(), 0..40).prop_map(Bytes::from),
            1 => vec(any::<u8>(), 0..4000).prop_map(Bytes::from),
        ]
    }

    /// Voters, learners and removed ids (none of them a member, as the
    /// core writes them; often none at all, as in most clusters).
    fn membership() -> impl Strategy<Value = Membership> {
        let removed = prop_oneof![
            1 => Just(BTreeSet::new()),
            2 => btree_set(u64s(), 1..5),
        ];
        (btree_set(u64s(), 0..6), btree_set(u64s(), 0..4), removed).prop_map(
            |(voters, learners, removed)| {
                let removed = removed
                    .into_iter()
                    .filter(|id| !voters.contains(id) && !learners.contains(id))
                    .collect();
                Membership {
                    voters,
                    learners,
                    removed,
                }
            },
        )
    }

    fn kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            Just(EntryKind::TermStart),
            (u64s(), u64s()).prop_map(|(client, seq)| EntryKind::Command { client, seq }),
            (u64s(), u64s()).prop_map(|(id, deadline)| EntryKind::Timer { id, deadline }),
            membership().prop_map(|m| EntryKind::Membership(Arc::new(m))),
            u64s().prop_map(|client| EntryKind::SessionClose { client }),
        ]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (u64s(), u64s(), u64s(), kind(), bytes()).prop_map(
            |(term, position, timestamp, kind, data)| Entry {
                term,
                position,
                timestamp,
                kind,
                data,
            },
        )
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            1 => (u64s(), u64s()).prop_map(|(last_pos, last_term)| Body::PreVote {
                last_pos,
                last_term
            }),
            1 => (any::<bool>(), any::<bool>(), u64s(), u64s()).prop_map(
                |(granted, amnesic, p, t)| Body::PreVoteResp {
                    granted,
                    amnesic,
                    committed: (p, t)
                }
            ),
            1 => (u64s(), u64s(), any::<bool>()).prop_map(
                |(last_pos, last_term, transfer)| Body::Vote {
                    last_pos,
                    last_term,
                    transfer
                }
            ),
            1 => (any::<bool>(), any::<bool>(), u64s(), u64s()).prop_map(
                |(granted, amnesic, p, t)| Body::VoteResp {
                    granted,
                    amnesic,
                    committed: (p, t)
                }
            ),
            // Weighted up: the variant with the most structure.
            3 => (
                u64s(),
                u64s(),
                u64s(),
                u64s(),
                vec(entry(), 0..8),
                any::<bool>()
            )
                .prop_map(|(prev_pos, prev_term, commit, heartbeat, entries, to_voter)| {
                    Body::Append {
                        prev_pos,
                        prev_term,
                        commit,
                        heartbeat,
                        entries,
                        to_voter,
                    }
                }),
            1 => (
                any::<bool>(),
                u64s(),
                u64s(),
                u64s(),
                u64s(),
                u64s()
            )
                .prop_map(|(ok, position, hint_pos, hint_term, heartbeat, hold)| {
                    Body::AppendResp {
                        ok,
                        position,
                        hint_pos,
                        hint_term,
                        heartbeat,
                        hold,
                    }
                }),
            2 => (
                (u64s(), u64s(), u64s(), membership()),
                (u64s(), bytes(), any::<bool>(), any::<bool>())
            )
                .prop_map(|((position, term, timestamp, membership), (offset, chunk, done, to_voter))| {
                    Body::InstallSnapshot {
                        meta: SnapshotMeta {
                            position,
                            term,
                            timestamp,
                            membership,
                        },
                        offset,
                        chunk,
                        done,
                        to_voter,
                    }
                }),
            1 => (u64s(), u64s())
                .prop_map(|(position, received)| Body::SnapshotAck { position, received }),
            1 => vec((u64s(), u64s(), bytes()), 0..4)
                .prop_map(|commands| Body::Forward { commands }),
            1 => u64s().prop_map(|id| Body::ReadIndex { id }),
            1 => (u64s(), u64s(), any::<bool>())
                .prop_map(|(id, index, ok)| Body::ReadIndexResp { id, index, ok }),
            1 => u64s().prop_map(|last_pos| Body::TimeoutNow { last_pos }),
            1 => u64s().prop_map(|position| Body::Removed { position }),
        ]
    }

    fn message() -> impl Strategy<Value = Message> {
        (u64s(), u64s(), u64s(), u64s(), body()).prop_map(|(cluster_id, from, to, term, body)| {
            Message {
                cluster_id,
                from,
                to,
                term,
                body,
            }
        })
    }

    fn op() -> impl Strategy<Value = ClientOp> {
        prop_oneof![
            bytes().prop_map(ClientOp::Write),
            bytes().prop_map(ClientOp::Read),
            bytes().prop_map(ClientOp::StaleRead),
            Just(ClientOp::Status),
            Just(ClientOp::Membership),
            u64s().prop_map(ClientOp::TransferLeader),
            prop_oneof![
                u64s().prop_map(MembershipChange::AddLearner),
                u64s().prop_map(MembershipChange::PromoteLearner),
                u64s().prop_map(MembershipChange::Remove),
            ]
            .prop_map(ClientOp::ChangeMembership),
        ]
    }

    fn status() -> impl Strategy<Value = NodeStatus> {
        (
            (u64s(), ".{0,12}", u64s(), proptest::option::of(u64s())),
            (u64s(), u64s(), u64s(), u64s()),
            (
                vec(u64s(), 0..5),
                vec(u64s(), 0..3),
                vec((u64s(), u64s()), 0..5),
            ),
        )
            .prop_map(
                |(
                    (id, role, term, leader),
                    (append, durable, commit, applied),
                    (voters, learners, followers),
                )| NodeStatus {
                    id,
                    role,
                    term,
                    leader,
                    append,
                    durable,
                    commit,
                    applied,
                    voters,
                    learners,
                    followers,
                },
            )
    }

    fn result() -> impl Strategy<Value = ClientResult> {
        prop_oneof![
            bytes().prop_map(ClientResult::Ok),
            (bytes(), u64s(), u64s()).prop_map(|(data, applied, commit)| {
                ClientResult::StaleOk {
                    data,
                    applied,
                    commit,
                }
            }),
            (
                proptest::option::of(u64s()),
                proptest::option::of(".{0,20}")
            )
                .prop_map(|(leader, address)| ClientResult::NotLeader { leader, address }),
            Just(ClientResult::Busy),
            ".{0,30}".prop_map(ClientResult::Error),
            status().prop_map(ClientResult::Status),
            membership().prop_map(ClientResult::Membership),
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            1 => (u64s(), u64s(), MIN_PEER_VERSION..=u8::MAX).prop_map(
                |(cluster_id, node_id, version)| Frame::Hello {
                    cluster_id,
                    node_id,
                    version
                }
            ),
            3 => message().prop_map(Frame::Peer),
            1 => (u64s(), u64s(), u64s(), op()).prop_map(
                |(id, client, seq, op)| Frame::Request(ClientRequest {
                    id,
                    client,
                    seq,
                    op
                })
            ),
            2 => (u64s(), result()).prop_map(|(id, result)| Frame::Response(ClientResponse {
                id,
                result
            })),
        ]
    }

    /// One change to an encoded frame, at a position taken modulo its length.
    #[derive(Clone, Debug)]
    enum Edit {
        Set(usize, u8),
        Insert(usize, u8),
        Remove(usize),
        /// Overwrite 4 bytes (a length or count where one lies) with a
        /// value near a boundary.
        Word(usize, u32),
        Truncate(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let word = prop_oneof![
            proptest::sample::select(vec![
                0,
                1,
                2,
                7,
                8,
                16,
                20,
                29,
                0x8000_0000,
                u32::MAX - 1,
                u32::MAX
            ]),
            any::<u32>(),
        ];
        prop_oneof![
            3 => (any::<usize>(), any::<u8>()).prop_map(|(at, v)| Edit::Set(at, v)),
            1 => (any::<usize>(), any::<u8>()).prop_map(|(at, v)| Edit::Insert(at, v)),
            1 => any::<usize>().prop_map(Edit::Remove),
            3 => (any::<usize>(), word).prop_map(|(at, v)| Edit::Word(at, v)),
            1 => any::<usize>().prop_map(Edit::Truncate),
        ]
    }

    fn apply(buf: &mut Vec<u8>, e: &Edit) {
        let at = |i: usize, n: usize| if n == 0 { 0 } else { i % n };
        match *e {
            Edit::Set(i, v) if !buf.is_empty() => {
                let i = at(i, buf.len());
                buf[i] = v;
            }
            Edit::Insert(i, v) => {
                let i = at(i, buf.len() + 1);
                buf.insert(i, v);
            }
            Edit::Remove(i) if !buf.is_empty() => {
                let i = at(i, buf.len());
                buf.remove(i);
            }
            Edit::Word(i, v) if buf.len() >= 4 => {
                let i = at(i, buf.len() - 3);
                buf[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            Edit::Truncate(i) => {
                let i = at(i, buf.len() + 1);
                buf.truncate(i);
            }
            _ => {}
        }
    }

    /// Every entry point on arbitrary bytes: none panics, they agree with
    /// each other, and whatever decodes is canonical and within `buf`.
    fn check_entry_points(buf: &[u8], junk: &[u8]) -> Result<(), TestCaseError> {
        let decoded = decode(buf, MAX);
        let size = frame_size(buf, MAX);
        match (&decoded, &size) {
            (Ok(Some((g, n))), _) => {
                prop_assert_eq!(&size, &Ok(Some(*n)));
                prop_assert!(*n <= buf.len() && *n >= LEN_BYTES + MIN_FRAME);
                prop_assert_eq!(&enc_as(g, buf[LEN_BYTES])[..], &buf[..*n], "not canonical");
            }
            (Ok(None), Ok(Some(n))) => prop_assert!(*n > buf.len()),
            (Ok(None), Ok(None)) => prop_assert!(buf.len() < LEN_BYTES),
            (Ok(None), Err(e)) => prop_assert!(false, "frame_size: {e}, decode: incomplete"),
            (Err(_), _) => {}
        }
        // The same bytes behind junk in a shared chunk decode the same.
        let mut whole = junk.to_vec();
        whole.extend_from_slice(buf);
        let chunk = Bytes::from(whole);
        prop_assert_eq!(&decode_shared(&chunk, junk.len(), MAX), &decoded);
        for at in 0..=junk.len() {
            let _ = decode_shared(&chunk, at, MAX);
        }
        // A limit below the declared length refuses it from the prefix.
        if let Some(prefix) = buf.first_chunk::<LEN_BYTES>() {
            let len = u32::from_le_bytes(*prefix) as usize;
            if len > 0 {
                let want = Err(CodecError::FrameTooLarge { len, max: len - 1 });
                prop_assert_eq!(&decode(buf, len - 1).map(|_| ()), &want);
                prop_assert_eq!(&frame_size(buf, len - 1).map(|_| ()), &want);
            }
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn round_trips_exactly(f in frame()) {
            let buf = enc(&f);
            prop_assert_eq!(decode(&buf, MAX), Ok(Some((f.clone(), buf.len()))));
            // The length prefix counts the bytes after it.
            prop_assert_eq!(
                u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize,
                buf.len() - 4
            );
            // The kind is known from the first six bytes alone.
            prop_assert_eq!(frame_kind(&buf[..6]), Ok(Some(f.kind())));
            prop_assert_eq!(frame_kind(&buf[..5]), Ok(None));
            // A Hello is never longer than the limit its reader uses.
            if let Frame::Hello { .. } = f {
                prop_assert_eq!(buf.len() - 4, HELLO_MAX_FRAME);
            }
            // Encoding appends: earlier contents are kept.
            let mut out = vec![0xAB; 3];
            encode(&f, &mut out);
            prop_assert_eq!(&out[..3], &[0xAB; 3]);
            prop_assert_eq!(&out[3..], &buf[..]);
        }

        /// A message in any peer protocol this node speaks decodes to
        /// itself, less what that version cannot carry (a vote's committed
        /// entry before 5), and its truncations are incomplete, not errors.
        #[test]
        fn messages_round_trip_in_every_spoken_version(
            m in message(), v in MIN_PEER_VERSION..=PEER_VERSION,
        ) {
            let mut buf = Vec::new();
            encode_message(&m, v, &mut buf);
            let mut want = m.clone();
            if v < 5 {
                if let Body::PreVoteResp { committed, .. } | Body::VoteResp { committed, .. } =
                    &mut want.body
                {
                    *committed = (0, 0);
                }
            }
            prop_assert_eq!(decode(&buf, MAX), Ok(Some((Frame::Peer(want), buf.len()))));
            if v == PEER_VERSION {
                prop_assert_eq!(&buf, &enc(&Frame::Peer(m)));
            }
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut], MAX), Ok(None), "prefix of {} bytes", cut);
            }
        }

        #[test]
        fn every_strict_prefix_is_incomplete(f in frame()) {
            let buf = enc(&f);
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut], MAX), Ok(None), "prefix of {} bytes", cut);
            }
        }

        #[test]
        fn concatenated_frames_decode_in_order(a in frame(), b in frame()) {
            let mut buf = enc(&a);
            let first = buf.len();
            encode(&b, &mut buf);
            let (fa, na) = decode(&buf, MAX).unwrap().unwrap();
            prop_assert_eq!(na, first);
            prop_assert_eq!(fa, a);
            let (fb, nb) = decode(&buf[na..], MAX).unwrap().unwrap();
            prop_assert_eq!(na + nb, buf.len());
            prop_assert_eq!(fb, b);
        }

        #[test]
        fn random_bytes_never_panic(buf in vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, n))) = decode(&buf, MAX) {
                prop_assert!(n <= buf.len());
            }
        }

        /// Decoding in place from a shared chunk gives the same frame as
        /// decoding a copy, with its byte strings pointing into the chunk.
        #[test]
        fn shared_decoding_matches_and_borrows_the_chunk(
            junk in vec(any::<u8>(), 0..20),
            f in frame(),
            tail in vec(any::<u8>(), 0..20),
        ) {
            let mut buf = junk.clone();
            encode(&f, &mut buf);
            let end = buf.len();
            buf.extend_from_slice(&tail);
            let chunk = Bytes::from(buf);
            let got = decode_shared(&chunk, junk.len(), MAX);
            prop_assert_eq!(&got, &Ok(Some((f.clone(), end - junk.len()))));
            prop_assert_eq!(frame_size(&chunk[junk.len()..], MAX), Ok(Some(end - junk.len())));
            let inside = |b: &Bytes| {
                b.is_empty() || chunk.as_ptr_range().contains(&b.as_ptr())
            };
            match got {
                Ok(Some((Frame::Request(r), _))) => match &r.op {
                    ClientOp::Write(d) | ClientOp::Read(d) | ClientOp::StaleRead(d) => {
                        prop_assert!(inside(d), "command copied")
                    }
                    _ => {}
                },
                Ok(Some((Frame::Peer(m), _))) => {
                    if let Body::Append { entries, .. } = &m.body {
                        for e in entries {
                            prop_assert!(inside(&e.data), "entry copied");
                        }
                    }
                }
                _ => {}
            }
            // Past the end, or in the junk: never a panic.
            prop_assert_eq!(decode_shared(&chunk, chunk.len() + 1, MAX), Ok(None));
            let _ = decode_shared(&chunk, 0, MAX);
        }

        /// `frame_size` agrees with `decode` on any input: same errors for a
        /// bad prefix, and the size of every frame `decode` returns.
        #[test]
        fn frame_size_agrees_with_decode(buf in vec(any::<u8>(), 0..300)) {
            match (decode(&buf, MAX), frame_size(&buf, MAX)) {
                (Ok(Some((_, n))), size) => prop_assert_eq!(size, Ok(Some(n))),
                (Ok(None), Ok(size)) => prop_assert!(size.is_none_or(|n| n > buf.len())),
                (Ok(None), Err(e)) => prop_assert!(false, "frame_size: {e}, decode: incomplete"),
                (Err(_), Ok(Some(n))) => prop_assert!(n <= buf.len(), "a bad body"),
                (Err(_), _) => {}
            }
            let chunk = Bytes::from(buf.clone());
            prop_assert_eq!(decode_shared(&chunk, 0, MAX), decode(&buf, MAX));
        }

        /// A valid header in front of random bytes reaches deep into the
        /// payload decoders.
        #[test]
        fn random_payloads_never_panic(
            tag in 0u8..6, version in any::<u8>(), payload in vec(any::<u8>(), 0..300),
        ) {
            let mut buf = vec![0; 4];
            // Any version the tag's protocol takes.
            let version = versions_for(tag).map_or(PEER_VERSION, |(min, max, _)| {
                let span = u16::from(max - min) + 1;
                min + (u16::from(version) % span) as u8
            });
            buf.push(version);
            buf.push(tag);
            buf.extend_from_slice(&payload);
            let len = buf.len() - 4;
            set_len(&mut buf, len);
            match decode(&buf, MAX) {
                Ok(Some((f, n))) => {
                    prop_assert_eq!(n, buf.len());
                    // Whatever decodes re-encodes to the same bytes.
                    prop_assert_eq!(enc_as(&f, version), buf);
                }
                Ok(None) => prop_assert!(false, "a complete frame was reported incomplete"),
                Err(_) => {}
            }
        }

        /// Corrupting any byte of a valid frame never panics, and whatever
        /// still decodes is canonical (in the version its version byte
        /// says: a peer message whose byte was changed to an older peer
        /// protocol decodes in that one).
        #[test]
        fn corrupted_frames_never_panic(f in frame(), at in any::<usize>(), v in any::<u8>()) {
            let mut buf = enc(&f);
            let at = at % buf.len();
            buf[at] = v;
            if let Ok(Some((g, n))) = decode(&buf, MAX) {
                prop_assert!(n <= buf.len());
                prop_assert_eq!(enc_as(&g, buf[LEN_BYTES]), &buf[..n]);
            }
        }

        /// Several edits of a valid frame of any kind (bytes changed,
        /// inserted, removed, lengths and counts overwritten, the end cut)
        /// fed to every entry point: `decode`, `decode_shared` and
        /// `frame_size`, with the length prefix kept consistent or not.
        #[test]
        fn mutated_frames_never_panic_at_any_entry_point(
            f in frame(),
            edits in vec(edit(), 1..6),
            fix_len in any::<bool>(),
            junk in vec(any::<u8>(), 0..8),
        ) {
            let mut buf = enc(&f);
            for e in &edits {
                apply(&mut buf, e);
            }
            if fix_len && buf.len() >= LEN_BYTES {
                let len = buf.len() - LEN_BYTES;
                set_len(&mut buf, len);
            }
            check_entry_points(&buf, &junk)?;
        }

        #[test]
        fn arbitrary_bytes_never_panic_at_any_entry_point(
            buf in vec(any::<u8>(), 0..300),
            junk in vec(any::<u8>(), 0..8),
        ) {
            check_entry_points(&buf, &junk)?;
        }

        /// Cutting the payload short (with a consistent length prefix) is a
        /// clean error; so is an extra byte.
        #[test]
        fn inconsistent_lengths_are_errors(f in frame(), cut in any::<usize>()) {
            let full = enc(&f);
            if full.len() > 6 {
                let keep = 6 + cut % (full.len() - 6);
                let mut short = full[..keep].to_vec();
                set_len(&mut short, keep - 4);
                prop_assert!(decode(&short, MAX).is_err(), "{} of {} bytes", keep, full.len());
            }
            let mut long = full.clone();
            long.push(0);
            set_len(&mut long, full.len() - 3);
            let is_trailing = matches!(
                decode(&long, MAX),
                Err(CodecError::TrailingBytes { extra: 1, .. })
            );
            prop_assert!(is_trailing);
        }

        #[test]
        fn oversized_length_is_rejected_from_the_prefix_alone(
            max in 2usize..100_000, over in 1usize..1000, more in vec(any::<u8>(), 0..8),
        ) {
            let len = max + over;
            let mut buf = (len as u32).to_le_bytes().to_vec();
            prop_assert_eq!(
                decode(&buf, max),
                Err(CodecError::FrameTooLarge { len, max })
            );
            buf.extend_from_slice(&more);
            prop_assert_eq!(
                decode(&buf, max),
                Err(CodecError::FrameTooLarge { len, max })
            );
        }

        #[test]
        fn wrong_version_is_rejected(f in frame(), v in any::<u8>(), cut in any::<usize>()) {
            let mut buf = enc(&f);
            let (min, max, what) = versions_for(buf[5]).expect("a frame tag");
            // (Mapped below the range rather than rejected: rejecting
            // aborts long runs for too many rejects.)
            let v = if (min..=max).contains(&v) { v % min } else { v };
            buf[4] = v;
            let want = Err(CodecError::BadVersion { what, found: v, min, max });
            prop_assert_eq!(decode(&buf, MAX), want.clone());
            // Already from the tag byte on, before the frame is complete.
            let cut = 6 + cut % (buf.len() - 5);
            prop_assert_eq!(decode(&buf[..cut], MAX), want);
        }

        #[test]
        fn unknown_tags_are_errors(f in frame(), t in any::<u8>()) {
            let mut buf = enc(&f);
            // The frame tag, and the first nested tag of each frame kind.
            let (at, what, known) = match &f {
                Frame::Hello { .. } => (5, "frame", 1..=4),
                Frame::Peer(_) => (6 + 32, "message body", 1..=13),
                Frame::Request(_) => (6 + 24, "client op", 1..=7),
                Frame::Response(_) => (6 + 8, "client result", 1..=7),
            };
            // A known tag becomes 0, unknown everywhere (rejecting it
            // instead aborts long runs for too many rejects).
            let t = if known.contains(&t) { 0 } else { t };
            buf[at] = t;
            prop_assert_eq!(decode(&buf, MAX), Err(CodecError::UnknownTag { what, tag: t }));
            let mut buf = enc(&f);
            if !(1..=4).contains(&t) {
                buf[5] = t;
                prop_assert_eq!(
                    decode(&buf, MAX),
                    Err(CodecError::UnknownTag { what: "frame", tag: t })
                );
                prop_assert_eq!(
                    frame_kind(&buf[..6]),
                    Err(CodecError::UnknownTag { what: "frame", tag: t })
                );
            }
        }
    }

    /// Large byte strings and counts round-trip, and a frame exactly at the
    /// limit decodes while one byte more is refused from its prefix.
    #[test]
    fn large_frames_round_trip_up_to_the_limit() {
        let write = |n: usize| {
            Frame::Request(ClientRequest {
                id: u64::MAX,
                client: u64::MAX,
                seq: u64::MAX,
                op: ClientOp::Write(Bytes::from(vec![0xA5; n])),
            })
        };
        let big = enc(&write(1 << 20));
        let limit = big.len() - 4;
        assert_eq!(decode(&big, limit), Ok(Some((write(1 << 20), big.len()))));
        assert_eq!(
            decode(&big, limit - 1),
            Err(CodecError::FrameTooLarge {
                len: limit,
                max: limit - 1
            })
        );
        let m = Arc::new(Membership {
            voters: (0..5000).chain([u64::MAX]).collect(),
            learners: (5000..6000).collect(),
            removed: (6000..9000).collect(),
        });
        let small = Arc::new(Membership {
            voters: [0, 1, u64::MAX].into(),
            learners: [2].into(),
            removed: [3, 4].into(),
        });
        let frames = [
            Frame::Peer(Message {
                cluster_id: u64::MAX,
                from: 0,
                to: u64::MAX,
                term: u64::MAX,
                body: Body::Append {
                    prev_pos: u64::MAX,
                    prev_term: u64::MAX,
                    commit: u64::MAX,
                    heartbeat: u64::MAX,
                    entries: (0..10_000u64)
                        .map(|i| Entry {
                            term: u64::MAX,
                            position: u64::MAX - i,
                            timestamp: i,
                            kind: match i % 3 {
                                0 => EntryKind::TermStart,
                                1 => EntryKind::Membership(small.clone()),
                                _ => EntryKind::Command {
                                    client: u64::MAX,
                                    seq: i,
                                },
                            },
                            data: Bytes::from(vec![i as u8; (i % 7) as usize]),
                        })
                        .collect(),
                    to_voter: true,
                },
            }),
            Frame::Peer(Message {
                cluster_id: 0,
                from: 0,
                to: 0,
                term: 0,
                body: Body::Forward {
                    commands: (0..5000u64)
                        .map(|i| (i, u64::MAX, Bytes::from(vec![7; (i % 3) as usize])))
                        .collect(),
                },
            }),
            Frame::Peer(Message {
                cluster_id: 1,
                from: 2,
                to: 3,
                term: 4,
                body: Body::InstallSnapshot {
                    meta: SnapshotMeta {
                        position: u64::MAX,
                        term: u64::MAX,
                        timestamp: u64::MAX,
                        membership: (*m).clone(),
                    },
                    offset: u64::MAX,
                    chunk: Bytes::from(vec![1; 1 << 20]),
                    done: true,
                    to_voter: true,
                },
            }),
            Frame::Response(ClientResponse {
                id: u64::MAX,
                result: ClientResult::Status(NodeStatus {
                    id: u64::MAX,
                    role: "é".repeat(10_000),
                    term: u64::MAX,
                    leader: Some(u64::MAX),
                    append: u64::MAX,
                    durable: u64::MAX,
                    commit: u64::MAX,
                    applied: u64::MAX,
                    voters: (0..5000).rev().collect(),
                    learners: vec![u64::MAX; 100],
                    followers: (0..5000).map(|i| (u64::MAX - i, i)).collect(),
                }),
            }),
        ];
        for f in frames {
            let buf = enc(&f);
            assert_eq!(decode(&buf, MAX), Ok(Some((f, buf.len()))));
        }
    }

    #[test]
    fn hello_layout_is_pinned() {
        let buf = enc(&Frame::Hello {
            cluster_id: 0x0102,
            node_id: 7,
            version: PEER_VERSION,
        });
        let mut want = vec![18, 0, 0, 0, PEER_VERSION, 1];
        want.extend_from_slice(&0x0102u64.to_le_bytes());
        want.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(buf, want);
    }

    /// `Removed` (tag 13): the position as a u64 after the message header.
    /// A peer from before it fails the frame with an unknown tag.
    #[test]
    fn removed_layout_is_pinned() {
        let buf = enc(&Frame::Peer(Message {
            cluster_id: 9,
            from: 2,
            to: 1,
            term: 3,
            body: Body::Removed { position: 0x0405 },
        }));
        let mut want = vec![2 + 32 + 1 + 8, 0, 0, 0, PEER_VERSION, 2];
        for v in [9u64, 2, 1, 3] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.push(13);
        want.extend_from_slice(&0x0405u64.to_le_bytes());
        assert_eq!(buf, want);
        // Cut anywhere in the position: incomplete, then a length error.
        for cut in 6 + 33..buf.len() {
            let mut short = buf[..cut].to_vec();
            set_len(&mut short, cut - 4);
            assert_eq!(
                decode(&short, MAX),
                Err(CodecError::Truncated {
                    what: "Removed.position"
                })
            );
        }
    }

    /// Version 2's change: the acknowledgement ends with the sender's hold.
    #[test]
    fn append_resp_layout_is_pinned() {
        let buf = enc(&Frame::Peer(Message {
            cluster_id: 9,
            from: 2,
            to: 1,
            term: 3,
            body: Body::AppendResp {
                ok: true,
                position: 100,
                hint_pos: 0,
                hint_term: 0,
                heartbeat: 5,
                hold: 500_000_000,
            },
        }));
        let mut want = vec![2 + 32 + 1 + 1 + 40, 0, 0, 0, PEER_VERSION, 2];
        for v in [9u64, 2, 1, 3] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(&[6, 1]);
        for v in [100u64, 0, 0, 5, 500_000_000] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(buf, want);
    }

    /// Version 3's change: a membership is its voters, learners and
    /// removed ids, each a u32 count then ascending u64 ids.
    #[test]
    fn membership_layout_is_pinned() {
        let m = Membership {
            voters: [1, 3].into(),
            learners: [4].into(),
            removed: [2, 5].into(),
        };
        let buf = enc(&Frame::Peer(Message {
            cluster_id: 9,
            from: 1,
            to: 2,
            term: 3,
            body: Body::Append {
                prev_pos: 10,
                prev_term: 2,
                commit: 8,
                heartbeat: 0,
                entries: vec![Entry {
                    term: 3,
                    position: 10,
                    timestamp: 7,
                    kind: EntryKind::Membership(Arc::new(m.clone())),
                    data: Bytes::new(),
                }],
                to_voter: true,
            },
        }));
        let mut want = vec![0, 0, 0, 0, PEER_VERSION, 2];
        for v in [9u64, 1, 2, 3] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.push(5);
        for v in [10u64, 2, 8, 0] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.push(1); // to_voter
        want.extend_from_slice(&1u32.to_le_bytes());
        for v in [3u64, 10, 7] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.push(4);
        for ids in [&[1u64, 3][..], &[4], &[2, 5]] {
            want.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                want.extend_from_slice(&id.to_le_bytes());
            }
        }
        want.extend_from_slice(&0u32.to_le_bytes());
        let len = want.len() - 4;
        set_len(&mut want, len);
        assert_eq!(buf, want);
        let Ok(Some((Frame::Peer(got), n))) = decode(&buf, MAX) else {
            panic!("the frame decodes");
        };
        let Body::Append { entries, .. } = got.body else {
            panic!("an append");
        };
        assert_eq!(n, buf.len());
        assert_eq!(entries[0].kind, EntryKind::Membership(Arc::new(m)));
        // Cut anywhere in the removed ids (their count, 24 bytes from the
        // end, then two ids, then the data's length): an error naming them.
        for cut in buf.len() - 24..buf.len() - 4 {
            let mut short = buf[..cut].to_vec();
            set_len(&mut short, cut - 4);
            let what = match decode(&short, MAX) {
                Err(CodecError::Truncated { what }) => what,
                Err(CodecError::CountTooLarge { what, count: 2, .. }) => what,
                other => panic!("cut at {cut}: {other:?}"),
            };
            assert_eq!(what, "membership removed ids", "cut at {cut}");
        }
    }

    /// A vote from node 2 to node 1 that says entry 40 of term 2 is
    /// committed.
    fn vote_resp() -> Message {
        Message {
            cluster_id: 1,
            from: 2,
            to: 1,
            term: 3,
            body: Body::VoteResp {
                granted: true,
                amnesic: false,
                committed: (40, 2),
            },
        }
    }

    /// Peer protocols 4 to 6 are spoken (a link to an older node speaks
    /// its version): frames of 3 and older (which would count an amnesic
    /// voter's vote like any other, or drop a membership's removed ids)
    /// are refused, hello first, as are peer messages of versions newer
    /// than this node's. A hello of a newer version is read: its layout
    /// never changes, and the answer says which version the link speaks.
    /// Client frames, whose protocol did not change, keep version 2.
    #[test]
    fn peer_frames_of_versions_4_to_6_are_spoken() {
        assert_eq!((MIN_PEER_VERSION, PEER_VERSION), (4, 6));
        let hello = |version| Frame::Hello {
            cluster_id: 1,
            node_id: 2,
            version,
        };
        let mut old = enc(&hello(3));
        let got = decode(&old, MAX);
        let refused = CodecError::BadVersion {
            what: "peer protocol",
            found: 3,
            min: 4,
            max: u8::MAX,
        };
        assert_eq!(got, Err(refused.clone()));
        assert_eq!(
            refused.to_string(),
            "unsupported peer protocol version 3, expected 4 or later"
        );
        // From the version and tag alone, before the rest arrives.
        old.truncate(6);
        assert_eq!(frame_size(&old, MAX), Err(refused));
        for v in [4, 5, 6, 7, 200] {
            let buf = enc(&hello(v));
            assert_eq!(
                decode(&buf, MAX),
                Ok(Some((hello(v), buf.len()))),
                "hello {v}"
            );
        }

        let vote = vote_resp();
        for (v, committed) in [(4, (0, 0)), (5, (40, 2)), (6, (40, 2))] {
            let mut buf = Vec::new();
            encode_message(&vote, v, &mut buf);
            assert_eq!(buf[4], v);
            let mut want = vote.clone();
            if let Body::VoteResp { committed: c, .. } = &mut want.body {
                *c = committed;
            }
            assert_eq!(
                decode(&buf, MAX),
                Ok(Some((Frame::Peer(want), buf.len()))),
                "version {v}"
            );
        }
        for v in [3, 7] {
            let mut buf = Vec::new();
            encode_message(&vote, v, &mut buf);
            let refused = CodecError::BadVersion {
                what: "peer protocol",
                found: v,
                min: 4,
                max: 6,
            };
            assert_eq!(decode(&buf, MAX), Err(refused.clone()));
            assert_eq!(
                refused.to_string(),
                format!("unsupported peer protocol version {v}, expected 4 to 6")
            );
        }
        let request = enc(&Frame::Request(ClientRequest {
            id: 1,
            client: 1,
            seq: 1,
            op: ClientOp::Status,
        }));
        assert_eq!(request[4], 2, "the client protocol stays at 2");
        assert!(matches!(decode(&request, MAX), Ok(Some(_))));
    }

    /// Version 4's votes, pinned: granted, amnesic, and nothing after.
    #[test]
    fn a_version_4_vote_ends_after_its_amnesic_flag() {
        let mut v4 = Vec::new();
        encode_message(&vote_resp(), 4, &mut v4);
        let mut v6 = Vec::new();
        encode_message(&vote_resp(), 6, &mut v6);
        assert_eq!(v6.len() - v4.len(), 16);
        // Header (4 + 2), cluster, from, to, term, body tag, two flags.
        assert_eq!(v4.len(), 6 + 32 + 1 + 2);
        assert_eq!(&v4[v4.len() - 3..], &[BODY_VOTE_RESP, 1, 0]);
        assert_eq!(&v4[6..], &v6[6..v4.len()]);
    }

    /// The last chunk of a snapshot at 10 (term 2) with `membership`, from
    /// node 1 to node 2 in term 3.
    fn snapshot_chunk(membership: Membership, chunk: &'static [u8]) -> Frame {
        Frame::Peer(Message {
            cluster_id: 1,
            from: 1,
            to: 2,
            term: 3,
            body: Body::InstallSnapshot {
                meta: SnapshotMeta {
                    position: 10,
                    term: 2,
                    timestamp: 5,
                    membership,
                },
                offset: 0,
                chunk: Bytes::from_static(chunk),
                done: true,
                to_voter: true,
            },
        })
    }

    /// The core never writes a membership whose removed ids include a
    /// member; a frame with one is refused, whichever set it overlaps and
    /// wherever the membership is (an entry, a snapshot's meta).
    #[test]
    fn a_removed_id_among_the_members_is_refused() {
        let entry = |m: Membership| {
            Frame::Peer(Message {
                cluster_id: 1,
                from: 1,
                to: 2,
                term: 3,
                body: Body::Append {
                    prev_pos: 0,
                    prev_term: 0,
                    commit: 0,
                    heartbeat: 0,
                    entries: vec![Entry {
                        term: 3,
                        position: 1,
                        timestamp: 0,
                        kind: EntryKind::Membership(Arc::new(m)),
                        data: Bytes::new(),
                    }],
                    to_voter: true,
                },
            })
        };
        let snapshot = |membership| snapshot_chunk(membership, b"");
        let with = |removed: &[u64]| Membership {
            voters: [1, 2, 3].into(),
            learners: [4, 5].into(),
            removed: removed.iter().copied().collect(),
        };
        for frame in [entry, snapshot] {
            let ok = frame(with(&[6, 7]));
            assert_eq!(
                decode(&enc(&ok), MAX),
                Ok(Some((ok.clone(), enc(&ok).len())))
            );
            assert_eq!(
                decode(&enc(&frame(with(&[0, 2, 4]))), MAX),
                Err(CodecError::RemovedMember {
                    id: 2,
                    among: "voters"
                })
            );
            assert_eq!(
                decode(&enc(&frame(with(&[5, 6]))), MAX),
                Err(CodecError::RemovedMember {
                    id: 5,
                    among: "learners"
                })
            );
        }
        assert_eq!(
            CodecError::RemovedMember {
                id: 5,
                among: "learners"
            }
            .to_string(),
            "membership lists node 5 both among its learners and among its removed ids"
        );
    }

    #[test]
    fn short_or_empty_input_needs_more() {
        for n in 0..4 {
            assert_eq!(decode(&[2, 0, 0, 0][..n], MAX), Ok(None));
        }
        assert_eq!(decode(&[2, 0, 0, 0], MAX), Ok(None));
        assert_eq!(decode(&[2, 0, 0, 0, PEER_VERSION], MAX), Ok(None));
    }

    #[test]
    fn length_below_two_is_rejected() {
        for len in 0..2u32 {
            let buf = len.to_le_bytes();
            assert_eq!(
                decode(&buf, MAX),
                Err(CodecError::FrameTooShort { len: len as usize })
            );
        }
    }

    #[test]
    fn huge_declared_length_is_rejected_without_waiting() {
        let buf = u32::MAX.to_le_bytes();
        assert_eq!(
            decode(&buf, DEFAULT_MAX_FRAME),
            Err(CodecError::FrameTooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            })
        );
        // Exactly at the limit is allowed (and incomplete here).
        let buf = (DEFAULT_MAX_FRAME as u32).to_le_bytes();
        assert_eq!(decode(&buf, DEFAULT_MAX_FRAME), Ok(None));
    }

    #[test]
    fn huge_counts_do_not_allocate() {
        // An Append claiming u32::MAX entries in a few bytes.
        let mut buf = enc(&Frame::Peer(Message {
            cluster_id: 1,
            from: 1,
            to: 2,
            term: 3,
            body: Body::Append {
                prev_pos: 0,
                prev_term: 0,
                commit: 0,
                heartbeat: 0,
                entries: vec![],
                to_voter: true,
            },
        }));
        let at = buf.len() - 4;
        buf[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&buf, MAX),
            Err(CodecError::CountTooLarge {
                what: "Append.entries",
                count: u32::MAX,
                remaining: 0
            })
        );
        // A byte string claiming u32::MAX bytes.
        let mut buf = enc(&Frame::Response(ClientResponse {
            id: 1,
            result: ClientResult::Ok(Bytes::new()),
        }));
        let at = buf.len() - 4;
        buf[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&buf, MAX),
            Err(CodecError::Truncated { what: "Ok data" })
        );
    }

    #[test]
    fn bad_flags_utf8_and_unordered_sets_are_errors() {
        let mut buf = enc(&Frame::Peer(Message {
            cluster_id: 1,
            from: 1,
            to: 2,
            term: 3,
            body: Body::VoteResp {
                granted: true,
                amnesic: false,
                committed: (0, 0),
            },
        }));
        // The amnesic flag, before the committed entry's 16 bytes.
        let at = buf.len() - 17;
        buf[at] = 2;
        assert_eq!(
            decode(&buf, MAX),
            Err(CodecError::BadFlag {
                what: "VoteResp.amnesic",
                found: 2
            })
        );

        let mut buf = enc(&Frame::Response(ClientResponse {
            id: 1,
            result: ClientResult::Error("ab".into()),
        }));
        *buf.last_mut().unwrap() = 0xFF;
        assert_eq!(
            decode(&buf, MAX),
            Err(CodecError::BadUtf8 {
                what: "Error message"
            })
        );

        let snapshot = |voters: [u64; 2]| snapshot_chunk(Membership::new(voters), b"state");
        // Encode {11, 22}, then swap the two ids on the wire.
        let good = enc(&snapshot([11, 22]));
        let one = 11u64.to_le_bytes();
        let two = 22u64.to_le_bytes();
        let at = good
            .windows(16)
            .position(|w| w[..8] == one && w[8..] == two)
            .unwrap();
        let mut bad = good.clone();
        bad[at..at + 8].copy_from_slice(&two);
        bad[at + 8..at + 16].copy_from_slice(&one);
        assert_eq!(
            decode(&bad, MAX),
            Err(CodecError::Unordered {
                what: "membership voters",
                prev: 22,
                found: 11
            })
        );
        // A duplicate is rejected the same way.
        bad[at..at + 8].copy_from_slice(&two);
        bad[at + 8..at + 16].copy_from_slice(&two);
        assert!(matches!(
            decode(&bad, MAX),
            Err(CodecError::Unordered { .. })
        ));
    }

    /// The openings of HTTP/2, HTTP/1.1 and TLS are told apart from each
    /// other and from Keel's frames, whose length prefixes they would be
    /// read as otherwise ("frame declares 541676112 bytes").
    #[test]
    fn foreign_openings_are_recognised() {
        assert_eq!(
            foreign_protocol(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some("HTTP/2")
        );
        assert_eq!(
            u32::from_le_bytes(*b"PRI "),
            541_676_112,
            "the length the preface was read as"
        );
        for req in [
            "GET /metrics HTTP/1.1\r\n",
            "POST /v3/kv/range HTTP/1.1\r\n",
            "HEAD / ",
        ] {
            assert_eq!(foreign_protocol(req.as_bytes()), Some("HTTP/1.1"), "{req}");
            let len = u32::from_le_bytes(req.as_bytes()[..4].try_into().expect("4 bytes"));
            assert!(len as usize > 512 << 20, "{req}: {len}");
        }
        // A TLS 1.2/1.3 ClientHello's record header.
        assert_eq!(
            foreign_protocol(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
            Some("TLS")
        );
        assert_eq!(foreign_protocol(b"PRI"), None, "too short to tell");
        assert_eq!(foreign_protocol(b"PRIX"), None);
        assert_eq!(foreign_protocol(b"get / HTTP/1.1"), None);
        // Keel's own frames are none of these.
        let mut b = Vec::new();
        encode(
            &Frame::Request(ClientRequest {
                id: 1,
                client: 1,
                seq: 1,
                op: ClientOp::Status,
            }),
            &mut b,
        );
        encode(
            &Frame::Hello {
                cluster_id: 1,
                node_id: 2,
                version: PEER_VERSION,
            },
            &mut b,
        );
        assert_eq!(foreign_protocol(&b), None);
        assert_eq!(foreign_protocol(&b[b.len() - 22..]), None);
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            CodecError::FrameTooLarge { len: 100, max: 10 }.to_string(),
            "frame declares 100 bytes, above the limit of 10 bytes"
        );
        assert_eq!(
            CodecError::BadVersion {
                what: "client protocol",
                found: 9,
                min: 2,
                max: 2
            }
            .to_string(),
            "unsupported client protocol version 9, expected 2"
        );
        assert_eq!(
            CodecError::UnknownTag {
                what: "entry kind",
                tag: 42
            }
            .to_string(),
            "unknown entry kind tag 42"
        );
    }
}
