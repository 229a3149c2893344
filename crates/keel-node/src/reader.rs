//! Reads for peers, off the consensus thread. Two of the core's sends need
//! data that is only on disk: a snapshot chunk (`Action::SendSnapshotChunk`,
//! read from the published snapshot file) and a run of log entries whose
//! data the core dropped from memory (`Action::SendLogRange`, read from
//! the segment files). Both are usually in the page cache, but a follower
//! catching up from far behind can make a leader read from a cold disk, and
//! a read on the consensus thread would hold up heartbeats, votes and every
//! other follower's appends meanwhile. The reader thread does them instead.
//!
//! A peer's messages must still go out in the order the core sent them (a
//! follower that got a later append before the read one would reject it and
//! make the leader back off). The `Outbox` keeps that order: while a read
//! for a peer is in flight, that peer's later messages wait behind it, and
//! go out as soon as it is done. Other peers are not held up.

use crate::metrics::Metrics;
use crossbeam_channel::{unbounded, Sender};
use foldhash::{HashMap, HashMapExt as _};
use keel_core::{Body, Message, NodeId, Position};
use keel_log::meta;
use keel_net::PeerSender;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use tracing::{info, warn};

/// A message to fill from disk before it is sent.
pub(crate) enum ReadJob {
    /// `message` is an `InstallSnapshot`: its chunk is `len` bytes at
    /// `offset` of the snapshot file published at `position`.
    SnapshotChunk {
        message: Message,
        position: Position,
        offset: u64,
        len: u64,
    },
    /// `message` is an `Append`: its entries are the log's from `from` to
    /// `upto`.
    LogRange {
        message: Message,
        from: Position,
        upto: Position,
    },
}

impl ReadJob {
    /// The peer the message goes to.
    pub fn to(&self) -> NodeId {
        match self {
            ReadJob::SnapshotChunk { message, .. } | ReadJob::LogRange { message, .. } => {
                message.to
            }
        }
    }
}

/// Jobs for the reader thread, each with the sequence number
/// `Outbox::reserve` gave its message's place.
pub(crate) type ReadJobs = Sender<(u64, ReadJob)>;

/// A finished read: the filled message, or `None` if there was nothing to
/// send (the file was replaced or compacted meanwhile: the core resends).
pub(crate) struct ReadDone {
    pub to: NodeId,
    pub seq: u64,
    pub message: Option<Message>,
}

/// Starts the reader thread of node `id` with data in `dir`; `done` gets
/// each finished read (with the sequence number its job came with), in
/// the order the jobs came, or the reason the
/// thread stopped (a read panicked: the peer's held messages would wait
/// forever, so the node must stop). The thread ends when the returned
/// sender is dropped.
pub(crate) fn spawn(
    id: NodeId,
    dir: PathBuf,
    metrics: Arc<Metrics>,
    done: impl Fn(Result<ReadDone, String>) + Send + 'static,
) -> std::io::Result<(ReadJobs, JoinHandle<()>)> {
    let (tx, rx) = unbounded::<(u64, ReadJob)>();
    let thread = std::thread::Builder::new()
        .name("keel-reader".into())
        .spawn(move || {
            let _s = tracing::info_span!("node", id).entered();
            for (seq, job) in rx {
                let one = std::panic::AssertUnwindSafe(|| read(id, &dir, &metrics, seq, job));
                match std::panic::catch_unwind(one) {
                    Ok(d) => done(Ok(d)),
                    Err(p) => {
                        let what = crate::runtime::panic_message(p.as_ref());
                        done(Err(format!("a read for a peer panicked: {what}")));
                        return;
                    }
                }
            }
        })?;
    Ok((tx, thread))
}

fn read(id: NodeId, dir: &std::path::Path, metrics: &Metrics, seq: u64, job: ReadJob) -> ReadDone {
    match job {
        ReadJob::SnapshotChunk {
            mut message,
            position,
            offset,
            len,
        } => {
            let to = message.to;
            let message = match meta::read_snapshot_chunk(dir, position, offset, len) {
                Ok(Some(bytes)) => {
                    if let Body::InstallSnapshot { chunk, .. } = &mut message.body {
                        *chunk = bytes;
                    }
                    Some(message)
                }
                Ok(None) => {
                    info!("node {id}: snapshot file at {position} replaced; not sending a chunk of it");
                    None
                }
                Err(e) => {
                    warn!("node {id}: not sending a snapshot chunk to node {to}: {e}");
                    None
                }
            };
            ReadDone { to, seq, message }
        }
        ReadJob::LogRange {
            mut message,
            from,
            upto,
        } => {
            let to = message.to;
            // Durable and committed, so nothing rewrites them; if a snapshot
            // compacted them meanwhile, the core resends from the snapshot.
            let message = match keel_log::store::read_range(dir, from, upto) {
                Ok(read) => {
                    if let Body::Append { entries, .. } = &mut message.body {
                        *entries = read;
                    }
                    metrics.log_reads.inc();
                    Some(message)
                }
                Err(e) => {
                    warn!("node {id}: not sending log {from}..{upto} to node {to}: {e}");
                    None
                }
            };
            ReadDone { to, seq, message }
        }
    }
}

enum Slot {
    Reading(u64),
    Ready(Message),
    Nothing,
}

/// Each peer's messages in the core's order, some waiting for reads (see
/// the module docs).
#[derive(Default)]
pub(crate) struct Outbox {
    /// Peers with a read in flight: their messages from the oldest read on.
    waiting: HashMap<NodeId, VecDeque<Slot>>,
    next_seq: u64,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            waiting: HashMap::new(),
            next_seq: 0,
        }
    }

    /// Sends `m` now, or after the reads for its peer that came before it.
    pub fn send(&mut self, m: Message, peers: &dyn PeerSender) {
        match self.waiting.get_mut(&m.to) {
            Some(q) => q.push_back(Slot::Ready(m)),
            None => peers.send(m),
        }
    }

    /// Holds a place for a message to `to` that a read will fill; the
    /// sequence number to give the read.
    pub fn reserve(&mut self, to: NodeId) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.waiting
            .entry(to)
            .or_default()
            .push_back(Slot::Reading(seq));
        seq
    }

    /// A read is done: its message takes its place, and what no longer
    /// waits for a read goes out.
    pub fn done(&mut self, d: ReadDone, peers: &dyn PeerSender) {
        let Some(q) = self.waiting.get_mut(&d.to) else {
            return;
        };
        if let Some(slot) = q
            .iter_mut()
            .find(|s| matches!(s, Slot::Reading(seq) if *seq == d.seq))
        {
            *slot = d.message.map_or(Slot::Nothing, Slot::Ready);
        }
        while let Some(front) = q.front() {
            if matches!(front, Slot::Reading(_)) {
                return;
            }
            if let Some(Slot::Ready(m)) = q.pop_front() {
                peers.send(m);
            }
        }
        self.waiting.remove(&d.to);
    }

    /// Messages held for peers (reads in flight and what waits behind them).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_core::Body;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Wire(Mutex<Vec<(NodeId, u64)>>);
    impl PeerSender for Wire {
        fn send(&self, m: Message) {
            let Body::Append { commit, .. } = m.body else {
                panic!("{m:?}")
            };
            self.0.lock().unwrap().push((m.to, commit));
        }
    }
    impl Wire {
        fn take(&self) -> Vec<(NodeId, u64)> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    /// A message to `to` told apart by `n` (in its commit field).
    fn msg(to: NodeId, n: u64) -> Message {
        Message {
            cluster_id: 1,
            from: 1,
            to,
            term: 1,
            body: Body::Append {
                prev_pos: 0,
                prev_term: 0,
                commit: n,
                heartbeat: 0,
                entries: Vec::new(),
                to_voter: true,
            },
        }
    }

    #[test]
    fn a_peer_s_messages_wait_behind_its_reads_in_order_and_others_do_not() {
        let wire = Wire::default();
        let mut o = Outbox::new();
        o.send(msg(2, 1), &wire);
        let r1 = o.reserve(2);
        o.send(msg(2, 3), &wire);
        let r2 = o.reserve(2);
        o.send(msg(2, 5), &wire);
        o.send(msg(3, 100), &wire);
        assert_eq!(wire.take(), vec![(2, 1), (3, 100)]);
        assert_eq!(o.held(), 4);
        // The second read finishes first: still behind the first.
        o.done(
            ReadDone {
                to: 2,
                seq: r2,
                message: Some(msg(2, 4)),
            },
            &wire,
        );
        assert_eq!(wire.take(), vec![]);
        o.done(
            ReadDone {
                to: 2,
                seq: r1,
                message: Some(msg(2, 2)),
            },
            &wire,
        );
        assert_eq!(wire.take(), vec![(2, 2), (2, 3), (2, 4), (2, 5)]);
        assert_eq!(o.held(), 0);
        o.send(msg(2, 6), &wire);
        assert_eq!(wire.take(), vec![(2, 6)], "sent at once again");
    }

    #[test]
    fn a_read_with_nothing_to_send_releases_what_waits_behind_it() {
        let wire = Wire::default();
        let mut o = Outbox::new();
        let r = o.reserve(2);
        o.send(msg(2, 7), &wire);
        o.done(
            ReadDone {
                to: 2,
                seq: r,
                message: None,
            },
            &wire,
        );
        assert_eq!(wire.take(), vec![(2, 7)]);
        assert_eq!(o.held(), 0);
        // A stray completion changes nothing.
        o.done(
            ReadDone {
                to: 2,
                seq: 99,
                message: Some(msg(2, 8)),
            },
            &wire,
        );
        assert_eq!(wire.take(), vec![]);
    }
}
