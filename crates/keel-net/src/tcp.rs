//! TCP transport on tokio. Peers: one connection per peer pair — the node
//! with the lower id dials, the other accepts — used in both directions,
//! opened with a `Hello` that carries the cluster id (a connection from
//! another cluster, or an unknown node, is refused), TCP_NODELAY; with
//! `TransportConfig::tls`, a mutual TLS handshake comes before the hello
//! and the link's bytes are TLS records (`tls`). The
//! hello's version byte is the newest peer protocol the dialer offers; an
//! accepting node of protocol 6 or later answers with its own hello at the
//! version the link will speak (the lower of the two), and a dialer whose
//! offer is closed unanswered twice in a row (an older node refuses a
//! version it does not know) offers the version before, down to
//! `codec::MIN_PEER_VERSION` (see `Offer`): so nodes one or two protocol
//! versions apart keep talking, and a cluster can be upgraded one node at
//! a time. Links
//! reconnect with backoff; messages sent while a link is down are dropped
//! (Raft retransmits), and so are messages past a link's frame or byte
//! limit. Clients: a reader task per connection hands each read's requests
//! on in one piece (in pieces only while the answers held and expected for
//! the connection are at their limit, `MAX_ANSWER_BACKLOG`).
//!
//! Writes are made by the thread with something to send, batched: a peer
//! message or client response is encoded into the connection's buffer
//! (`Outbox`), and the buffer is written with one non-blocking `write` on
//! that thread (`Peers::flush` once per consensus turn; a response sink at
//! once, or at `flush_deferred` on a thread that defers). Only what the
//! socket does not take at once is left to the connection's task: waking a
//! task costs more than the write. A frame that does not decode closes its
//! connection with a logged reason; the node keeps running.

use crate::codec::{self, ClientRequest, ClientResponse, Frame, FrameKind};
use crate::tls::{PeerTls, TlsWire};
use bytes::BytesMut;
use keel_core::{Message, NodeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::rustls;
use tracing::{debug, info, warn, Instrument};

/// Identity and limits of this end of the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub cluster_id: u64,
    pub node_id: NodeId,
    pub max_frame: usize,
    /// Messages queued per peer before new ones are dropped (as are
    /// those past `MAX_PEER_BACKLOG` bytes).
    pub peer_queue: usize,
    /// Mutual TLS on every peer connection, dialed and accepted (see
    /// `tls`); `None`: plain TCP.
    pub tls: Option<PeerTls>,
    /// Where accepted peer connections say hello (their TLS handshakes
    /// included): a runtime other than the links', so that anyone who can
    /// reach the peer port cannot keep the links' thread (a node's
    /// consensus thread) busy with handshakes. `None`: the links' own.
    pub handshakes: Option<tokio::runtime::Handle>,
}

/// Called for every message received from a peer.
pub type Inbound = Arc<dyn Fn(Message) + Send + Sync>;
/// Called with the client requests decoded from one read of a connection
/// (one or more, in order; a pipelining client's burst arrives together
/// and is handed on in one piece, unless its answers would pass
/// `MAX_ANSWER_BACKLOG`), with the connection's response sink. Each request
/// must get exactly one answer on the sink.
pub type RequestHandler = Arc<dyn Fn(Vec<ClientRequest>, &ResponseSink) + Send + Sync>;

/// Counters the runtime exposes as metrics.
#[derive(Debug, Default)]
pub struct NetStats {
    pub peer_messages_dropped: AtomicU64,
    pub bad_frames: AtomicU64,
    pub rejected_connections: AtomicU64,
    /// Times a client connection's reading paused because the answers
    /// held and expected for it reached `MAX_ANSWER_BACKLOG` (a client
    /// reading its answers slower than it sends requests).
    pub client_reads_paused: AtomicU64,
    /// The peer protocol each peer's link speaks, 0 while it is down (an
    /// upgrade is done when every link speaks the newest).
    pub peer_protocols: Mutex<std::collections::BTreeMap<NodeId, u8>>,
}

impl NetStats {
    /// `peer_protocols`, a copy.
    pub fn peer_protocols(&self) -> Vec<(NodeId, u8)> {
        let versions = self
            .peer_protocols
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        versions.iter().map(|(&id, &v)| (id, v)).collect()
    }

    fn set_peer_protocol(&self, peer: NodeId, version: u8) {
        self.peer_protocols
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer, version);
    }
}

/// The outbound side of the peer links.
pub struct Peers {
    links: HashMap<NodeId, Arc<Outbox>>,
    stats: Arc<NetStats>,
    /// Messages buffered per link (not yet written) before new ones are
    /// dropped.
    limit: usize,
    /// Bytes held per link (buffered or being written) before new
    /// messages are dropped: `MAX_PEER_BACKLOG` unless set.
    byte_limit: usize,
    /// The task accepting peer connections, which owns the listener.
    accepting: tokio::task::AbortHandle,
}

impl Peers {
    /// Encodes `m` into its link's buffer, written by the next `flush`.
    /// Dropped if the link is down, its buffer is full, or the peer is
    /// unknown (only the last two count as dropped: a down link loses
    /// messages as a network would).
    pub fn send(&self, m: Message) {
        let pushed = match self.links.get(&m.to) {
            Some(link) => link.push_message(&m, self.limit, self.byte_limit),
            None => Err(Refused::Full),
        };
        if pushed == Err(Refused::Full) {
            self.stats
                .peer_messages_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sets the bytes each link may hold (buffered, or being written)
    /// before new messages are dropped, instead of `MAX_PEER_BACKLOG`. A
    /// message is always taken by a link that holds nothing, however large.
    pub fn set_byte_limit(&mut self, bytes: usize) {
        self.byte_limit = bytes;
    }

    /// Writes every link's buffered messages: at once, with a non-blocking
    /// write on this thread, unless the link's task is already writing;
    /// what the socket does not take goes to the task.
    pub fn flush(&self) {
        for link in self.links.values() {
            link.flush();
        }
    }
}

impl Drop for Peers {
    /// The links close, each once its task has written what it holds or
    /// after `CLOSE_GRACE` (a write to a peer that stopped reading is
    /// stuck), and the listener with them: the address is free again as
    /// soon as the runtime next runs the accepting task, which is aborted.
    fn drop(&mut self) {
        self.accepting.abort();
        for link in self.links.values() {
            link.close();
        }
    }
}

/// Where the responses to a client's requests go: its connection, or an
/// in-process caller waiting for one response (`oneshot`). Clones go with
/// each request; a connection's writer stops once every clone is dropped
/// and everything sent is written.
#[derive(Clone)]
pub struct ResponseSink(Arc<Sink>);

enum Sink {
    Conn(Arc<Outbox>),
    /// Taken by the first response. (A oneshot rather than an mpsc
    /// channel: the etcd API makes one per request, and an mpsc channel
    /// allocates a block of 32 response slots, a few KiB, each time.)
    Once(Mutex<Option<oneshot::Sender<ClientResponse>>>),
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Sink::Conn(out) = self {
            out.close();
        }
    }
}

impl ResponseSink {
    /// A sink for one response, which arrives on the returned receiver
    /// (later ones are refused: `send` returns false).
    pub fn oneshot() -> (ResponseSink, oneshot::Receiver<ClientResponse>) {
        let (tx, rx) = oneshot::channel();
        (ResponseSink(Arc::new(Sink::Once(Mutex::new(Some(tx))))), rx)
    }

    /// Sends `r`; false if the client is gone. To a connection: encoded
    /// into its buffer and written at once, or, on a thread that called
    /// `defer_flushes`, at its next `flush_deferred` (so that the
    /// responses a thread produces in one step go out in one write).
    pub fn send(&self, r: ClientResponse) -> bool {
        match &*self.0 {
            Sink::Once(slot) => {
                let tx = slot.lock().ok().and_then(|mut s| s.take());
                tx.is_some_and(|tx| tx.send(r).is_ok())
            }
            Sink::Conn(out) => {
                if out.push_answer(&Frame::Response(r)).is_err() {
                    return false;
                }
                let deferred = DEFERRED.with(|d| match &mut *d.borrow_mut() {
                    Some(pending) => {
                        pending
                            .entry(Arc::as_ptr(out) as usize)
                            .or_insert_with(|| out.clone());
                        true
                    }
                    None => false,
                });
                if !deferred {
                    out.flush();
                }
                true
            }
        }
    }
}

/// Connections by address, each once.
type Pending = HashMap<usize, Arc<Outbox>>;

thread_local! {
    /// Connections with responses this thread buffered and has not flushed
    /// (`None`: this thread writes each response at once).
    static DEFERRED: std::cell::RefCell<Option<Pending>> =
        const { std::cell::RefCell::new(None) };
}

/// From now on, responses this thread sends to client connections are
/// buffered until it calls `flush_deferred`, which it must do after each
/// unit of work (a consensus turn, a service step).
pub fn defer_flushes() {
    DEFERRED.with(|d| {
        d.borrow_mut().get_or_insert_with(HashMap::new);
    });
}

/// Writes the responses this thread buffered (see `defer_flushes`).
pub fn flush_deferred() {
    let pending = DEFERRED.with(|d| d.borrow_mut().as_mut().map(std::mem::take));
    let Some(mut pending) = pending else {
        return;
    };
    if pending.is_empty() {
        // Nothing to do; keep the map's capacity.
        DEFERRED.with(|d| *d.borrow_mut() = Some(pending));
        return;
    }
    for out in pending.values() {
        out.flush();
    }
    // Give the (emptied) map back, keeping its capacity.
    pending.clear();
    DEFERRED.with(|d| {
        if let Some(slot) = &mut *d.borrow_mut() {
            if slot.is_empty() {
                *slot = pending;
            }
        }
    });
}

/// A connection's outgoing bytes, shared by the threads that send on it
/// and the connection's writer task. Whoever writes holds `state`'s lock
/// while writing (a sender's one non-blocking write) or owns writing
/// (`task_writes`), so writes never interleave.
#[derive(Default)]
struct Outbox {
    state: std::sync::Mutex<OutState>,
    /// Wakes the writer task to write what is buffered (or to stop).
    wake: tokio::sync::Notify,
    /// Wakes a client connection's reader waiting for the answers held
    /// and expected for it to fall to `MAX_ANSWER_BACKLOG` (see
    /// `wait_for_room`).
    room: tokio::sync::Notify,
    /// No more frames will come (the peers or every response sink are
    /// gone): a client connection's writer task stops once the buffer is
    /// written, a peer link's once it is or `CLOSE_GRACE` has passed.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct OutState {
    /// Encoded frames not yet written.
    buf: Vec<u8>,
    /// Frames in `buf` (for a limit).
    frames: usize,
    /// Bytes the task took out of `buf` and is writing.
    writing: usize,
    /// The connection while it is up.
    writer: Option<Arc<Wire>>,
    /// The peer protocol a peer link's connection speaks.
    version: u8,
    /// The task owns writing (it was handed a partial write): senders
    /// only append to `buf` until it has drained it.
    task_writes: bool,
    /// A client connection's requests handed on whose answers have not
    /// come yet (each request gets one answer).
    pending: usize,
    /// A client connection's answer size so far, in bytes (the largest
    /// recent one, falling back as a moving average; 0 before the first):
    /// what each pending answer is expected to add
    /// (`ANSWER_ESTIMATE_FLOOR` at least).
    answer_size: usize,
    /// The connection's reader waits in `wait_for_room`.
    reader_waiting: bool,
}

/// Why a frame was not buffered.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Down,
    Full,
}

fn lock(m: &std::sync::Mutex<OutState>) -> std::sync::MutexGuard<'_, OutState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OutState {
    /// Bytes held for the connection and not yet taken by the socket.
    fn backlog(&self) -> usize {
        self.buf.len() + self.writing
    }

    /// A client connection: would the answers held, the ones expected for
    /// the pending requests, and those for `more` requests exceed
    /// `MAX_ANSWER_BACKLOG`?
    fn over(&self, more: usize) -> bool {
        let each = if self.answer_size == 0 {
            FIRST_ANSWER_ESTIMATE
        } else {
            self.answer_size.max(ANSWER_ESTIMATE_FLOOR)
        };
        let expected = (self.pending.saturating_add(more)).saturating_mul(each);
        self.backlog().saturating_add(expected) > MAX_ANSWER_BACKLOG
    }
}

impl Outbox {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Returns once the outbox is closed, for a task that is not waiting
    /// on `wake` for anything else (a peer link's task while it drains:
    /// senders leave writing to it then, without waking it).
    async fn closing(&self) {
        while !self.is_closed() {
            self.wake.notified().await;
        }
    }

    /// Encodes `m` into the buffer in the connection's peer protocol,
    /// unless the connection is down, `limit` frames are buffered already,
    /// or it would make the bytes held (buffered or being written) more than
    /// `bytes`: a link holds at most `bytes`, or one frame larger than that
    /// (taken when nothing else is held, or it could never be sent).
    fn push_message(&self, m: &Message, limit: usize, bytes: usize) -> Result<(), Refused> {
        let mut out = lock(&self.state);
        if out.writer.is_none() {
            return Err(Refused::Down);
        }
        let held = out.backlog();
        if out.frames >= limit || (held > 0 && held >= bytes) {
            return Err(Refused::Full);
        }
        let start = out.buf.len();
        let version = out.version;
        codec::encode_message(m, version, &mut out.buf);
        if held > 0 && out.backlog() > bytes {
            out.buf.truncate(start);
            return Err(Refused::Full);
        }
        out.frames += 1;
        Ok(())
    }

    /// A client connection's answer to one of its pending requests (see
    /// `expect`): encoded into the buffer, unless the connection is down.
    fn push_answer(&self, f: &Frame) -> Result<(), Refused> {
        let mut out = lock(&self.state);
        if out.writer.is_none() {
            return Err(Refused::Down);
        }
        let start = out.buf.len();
        codec::encode(f, &mut out.buf);
        let size = out.buf.len() - start;
        out.frames += 1;
        out.pending = out.pending.saturating_sub(1);
        // Up at once to a larger answer (the requests handed on next are
        // expected to be as large), down as a moving average over about
        // the last 8 answers.
        out.answer_size = if size >= out.answer_size {
            size
        } else {
            out.answer_size - out.answer_size / 8 + size / 8
        };
        // (The sender flushes next, which is when a waiting reader may go
        // on if the socket takes the answer; an answer that stays held
        // leaves it as over as before.)
        self.wake_reader(out);
        Ok(())
    }

    /// A TLS connection's reader left records to send that the socket did
    /// not take: the task writes them, unless it is writing already (it
    /// then finishes them before it stops, see `drain`).
    fn records_held(&self) {
        let mut out = lock(&self.state);
        if out.writer.is_some() && !out.task_writes {
            out.task_writes = true;
            drop(out);
            self.wake.notify_one();
        }
    }

    /// A client connection's reader handed on `n` more requests.
    fn expect(&self, n: usize) {
        if n > 0 {
            lock(&self.state).pending += n;
        }
    }

    /// Would `more` requests' answers put the connection over the bound
    /// (`OutState::over`)? False once it is down.
    fn over(&self, more: usize) -> bool {
        let out = lock(&self.state);
        out.writer.is_some() && out.over(more)
    }

    /// Wakes the connection's reader if it waits for room and there is.
    fn wake_reader(&self, mut out: std::sync::MutexGuard<'_, OutState>) {
        if out.reader_waiting && (out.writer.is_none() || !out.over(0)) {
            out.reader_waiting = false;
            drop(out);
            self.room.notify_one();
        }
    }

    /// Writes the buffer with non-blocking writes on this thread, unless
    /// the task owns writing; what the socket does not take goes to the
    /// task.
    fn flush(&self) {
        let mut out = lock(&self.state);
        if out.buf.is_empty() || out.task_writes {
            return;
        }
        let Some(w) = out.writer.clone() else {
            return;
        };
        loop {
            match w.try_write(&out.buf) {
                Ok(n) if n == out.buf.len() => {
                    out.buf.clear();
                    out.frames = 0;
                    if out.buf.capacity() > SPARE_OUT {
                        out.buf = Vec::new();
                    }
                    if w.pending() {
                        // Taken into TLS records the socket did not take
                        // all of: the task writes the rest.
                        out.task_writes = true;
                        self.wake.notify_one();
                    }
                    // A client connection's reader may wait for this write.
                    self.wake_reader(out);
                    return;
                }
                Ok(n) if n > 0 => {
                    out.buf.drain(..n);
                }
                // Socket full (or an error, which the task's write meets
                // again and stops on): the task writes it.
                _ => {
                    out.task_writes = true;
                    self.wake_reader(out);
                    self.wake.notify_one();
                    return;
                }
            }
        }
    }

    /// A client connection's reader's side: returns once the bytes held
    /// for the connection and those expected for its pending requests are
    /// at most `MAX_ANSWER_BACKLOG` (or it is down). The socket writes only what the client reads, so a client
    /// that reads its answers slowly or not at all has its requests read
    /// no faster: the node's memory for it stays bounded.
    async fn wait_for_room(&self) {
        loop {
            {
                let mut out = lock(&self.state);
                if out.writer.is_none() || !out.over(0) {
                    out.reader_waiting = false;
                    return;
                }
                out.reader_waiting = true;
            }
            // (A wake-up between the check and this wait is not lost:
            // `notify_one` leaves a permit when nobody waits.)
            self.room.notified().await;
        }
    }

    /// The connection is up on `w` (`Some`) or down (`None`): either way
    /// what was buffered for the previous one is dropped.
    fn connect(&self, w: Option<Arc<Wire>>) {
        self.connect_at(w, codec::PEER_VERSION);
    }

    /// `connect`, a peer link whose connection speaks peer protocol
    /// `version`.
    fn connect_at(&self, w: Option<Arc<Wire>>, version: u8) {
        let mut out = lock(&self.state);
        *out = OutState {
            writer: w,
            version,
            ..OutState::default()
        };
        drop(out);
        // Nothing is held any more: a waiting reader goes on.
        self.room.notify_one();
    }

    /// The task's side: takes over writing and writes the buffer until it
    /// is empty, then hands writing back to the senders.
    async fn drain(&self, w: &Wire, spare: &mut Vec<u8>) -> Result<(), String> {
        loop {
            let records_left = {
                let mut out = lock(&self.state);
                if out.buf.is_empty() && !w.pending() {
                    out.task_writes = false;
                    return Ok(());
                }
                out.task_writes = true;
                out.buf.is_empty()
            };
            if records_left {
                // TLS records a sender's write (or the reader) left. (No
                // sender writes meanwhile: `task_writes` is set.)
                w.write_all(&[])
                    .await
                    .map_err(|e| format!("write failed: {e}"))?;
                continue;
            }
            {
                let mut out = lock(&self.state);
                // Under the lock no sender is mid-write; from here on none
                // starts one until the buffer is drained.
                out.task_writes = true;
                spare.clear();
                std::mem::swap(&mut out.buf, spare);
                out.frames = 0;
                out.writing = spare.len();
            }
            w.write_all(spare)
                .await
                .map_err(|e| format!("write failed: {e}"))?;
            {
                let mut out = lock(&self.state);
                out.writing = 0;
                self.wake_reader(out);
            }
            if spare.capacity() > SPARE_OUT {
                *spare = Vec::new();
            }
        }
    }
}

/// Buffer capacity a link keeps between writes.
const SPARE_OUT: usize = 4 << 20;

/// A client connection's requests are not handed on while the bytes of
/// answers held for it (buffered, or being written by its task) and those
/// expected for the requests it has sent that are still being answered
/// would exceed this: the node's memory for a client that does not read
/// its answers (or reads them slower than it sends requests) stays at about
/// this, instead of growing without bound. (Before, only the answers held
/// counted, not the requests in flight in the node: a client pipelining
/// reads of a large value had them taken by the thousand while the node was
/// still answering the first.) Each pending request is expected to add the
/// connection's recent answer size (the largest at once, then falling back
/// as a moving average). That is an estimate: when answers suddenly grow,
/// the requests already handed on add what their answers exceed it by, so
/// a client whose answers jump from tiny to large can pass this by that
/// much (once; it is then read no further until it reads). Bytes are only
/// held here once the socket's own buffer (up to a few MiB) is full, so a
/// client that reads as fast as it is answered is held back only by the
/// requests in flight (4 MiB of answers' worth: tens of thousands of small
/// ones); and an answer larger than this (one alone may be up to a frame,
/// 64 MiB) is still sent, one request at a time. 4 MiB is a few MiB per
/// slow client at most, and as much as a link keeps in its buffer anyway
/// (`SPARE_OUT`).
const MAX_ANSWER_BACKLOG: usize = 4 << 20;

/// What a client connection's first answer is expected to be, before any
/// came: 64 requests are handed on before the first answer's size is
/// known (a round trip through the node, after which a client with small
/// answers has thousands in flight).
const FIRST_ANSWER_ESTIMATE: usize = 64 << 10;

/// The least an answer is expected to be (a bare answer frame is about 20
/// bytes): at most 64 Ki requests of one connection are in flight.
const ANSWER_ESTIMATE_FLOOR: usize = 64;

/// The bytes a peer link holds (buffered, or being written by its task)
/// before new messages to it are dropped, as they are past `peer_queue`
/// frames (Raft retransmits): a link whose peer reads slowly or not at all
/// (a partition without a reset, a stalled process) keeps at most this, or
/// one frame larger than it, instead of up to `peer_queue` frames of up to
/// 64 MiB each. The leader's flow control keeps 4 MiB of appends in flight
/// per follower, snapshot chunks are 1 MiB and paused for an answer, so
/// this is only reached once the peer has stopped taking its messages.
pub const MAX_PEER_BACKLOG: usize = 64 << 20;

/// A connection's sending side, shared by whoever writes to it: plain
/// TCP, or a peer link's TLS.
enum Wire {
    Plain(OwnedWriteHalf),
    Tls(Arc<TlsWire>),
}

impl Wire {
    /// A non-blocking write of (the start of) `buf`: the bytes taken, or
    /// `WouldBlock`.
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Wire::Plain(w) => w.try_write(buf),
            Wire::Tls(t) => t.try_write(buf),
        }
    }

    /// Bytes taken are still held (TLS records the socket has not taken):
    /// `write_all` finishes them.
    fn pending(&self) -> bool {
        match self {
            Wire::Plain(_) => false,
            Wire::Tls(t) => t.pending(),
        }
    }

    /// Writes all of `buf`, and what is pending, waiting for the socket.
    async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        match self {
            Wire::Plain(w) => {
                while !buf.is_empty() {
                    w.writable().await?;
                    match w.try_write(buf) {
                        Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                        Ok(n) => buf = &buf[n..],
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Wire::Tls(t) => t.write_all(buf).await,
        }
    }
}

/// A connection's receiving side.
enum WireRead {
    Plain(OwnedReadHalf),
    Tls(Arc<TlsWire>),
}

impl WireRead {
    /// Reads into `buf`'s spare room: the bytes read, 0 at the end.
    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            WireRead::Plain(r) => r.read_buf(buf).await,
            WireRead::Tls(t) => t.read_buf(buf).await,
        }
    }
}

/// A socket on its way to a task on another runtime: taken off this
/// runtime's reactor (`away`), then put on the reactor of the runtime the
/// task runs on (`here`), which then drives it.
enum Travelling {
    Staying(TcpStream),
    Moving(std::net::TcpStream),
}

impl Travelling {
    fn away(s: TcpStream, moving: bool) -> std::io::Result<Travelling> {
        Ok(if moving {
            Travelling::Moving(s.into_std()?)
        } else {
            Travelling::Staying(s)
        })
    }

    fn here(self) -> std::io::Result<TcpStream> {
        match self {
            Travelling::Staying(s) => Ok(s),
            Travelling::Moving(s) => TcpStream::from_std(s),
        }
    }
}

/// TLS records a read of `w` leaves that the socket did not take are
/// written by `out`'s task (`Outbox::records_held`).
fn hand_held_records_to(w: &Wire, out: &Arc<Outbox>) {
    if let Wire::Tls(t) = w {
        let out = Arc::downgrade(out);
        t.on_records_held(Box::new(move || {
            if let Some(out) = out.upgrade() {
                out.records_held();
            }
        }));
    }
}

/// A connection past its hello (a peer's) or its TLS handshake (a
/// client's).
enum Conn {
    Plain(TcpStream),
    Tls(TcpStream, Box<rustls::Connection>),
}

impl Conn {
    /// The same connection, driven by this runtime's reactor (it may have
    /// said hello on another, `TransportConfig::handshakes`).
    fn rebind(self) -> std::io::Result<Conn> {
        let here = |s: TcpStream| TcpStream::from_std(s.into_std()?);
        Ok(match self {
            Conn::Plain(s) => Conn::Plain(here(s)?),
            Conn::Tls(s, conn) => Conn::Tls(here(s)?, conn),
        })
    }

    fn split(self) -> (WireRead, Wire) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (WireRead::Plain(r), Wire::Plain(w))
            }
            Conn::Tls(s, conn) => {
                let t = TlsWire::new(s, *conn);
                (WireRead::Tls(t.clone()), Wire::Tls(t))
            }
        }
    }
}

/// Starts the peer listener and one link manager per peer.
/// `peers`: every other node's (id, peer address).
pub async fn start_peers(
    cfg: TransportConfig,
    listen: &str,
    peers: &[(NodeId, String)],
    inbound: Inbound,
    stats: Arc<NetStats>,
) -> std::io::Result<Peers> {
    // With TLS, each peer's certificate must name the host it is dialed
    // at: a peer address that cannot is refused before anything starts.
    let mut names = HashMap::new();
    if cfg.tls.is_some() {
        for (id, addr) in peers {
            let name = crate::tls::server_name(addr)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            names.insert(*id, name);
        }
    }
    let listener = TcpListener::bind(listen).await?;
    // A root span: the caller (a node starting up) may be in its own
    // `node` span already, and nested they would print twice.
    let span = tracing::info_span!(parent: None, "node", id = cfg.node_id);
    let mut links = HashMap::new();
    let mut accept_to = HashMap::new();
    for (id, addr) in peers.iter().cloned() {
        stats.set_peer_protocol(id, 0);
        let outbox = Arc::new(Outbox::default());
        let (atx, arx) = mpsc::channel(2);
        links.insert(id, outbox.clone());
        let dial = cfg.node_id < id;
        if !dial {
            accept_to.insert(id, atx);
        }
        let link = Link {
            cfg: cfg.clone(),
            peer: id,
            server_name: names.get(&id).cloned(),
            addr,
            dial,
            inbound: inbound.clone(),
            stats: stats.clone(),
        };
        tokio::spawn(link.run(outbox, arx).instrument(span.clone()));
    }
    let limit = cfg.peer_queue;
    let accepting =
        tokio::spawn(accept_peers(listener, cfg, accept_to, names, stats.clone()).instrument(span))
            .abort_handle();
    Ok(Peers {
        links,
        stats,
        limit,
        byte_limit: MAX_PEER_BACKLOG,
        accepting,
    })
}

/// `names`: with TLS, the name each peer's certificate must have (the
/// host of its peer address).
async fn accept_peers(
    listener: TcpListener,
    cfg: TransportConfig,
    accept_to: HashMap<NodeId, mpsc::Sender<Accepted>>,
    names: HashMap<NodeId, rustls::pki_types::ServerName<'static>>,
    stats: Arc<NetStats>,
) {
    // Each connection's hello is read and answered by a task of its own,
    // held here so that they end with this one (when the transport is
    // dropped), not up to the hello's timeout later.
    let mut hellos = tokio::task::JoinSet::new();
    let names = Arc::new(names);
    // Connections saying hello, by the host they come from.
    let opening = Hosts::default();
    // (Said once per burst of connections over a bound.)
    let mut over_bound_said = false;
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("peer listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while hellos.try_join_next().is_some() {}
        let Some(slot) = opening.take_counted(remote.ip(), hellos.len(), PEER_OPENINGS) else {
            // A flood of connections (a node has one link per peer, and
            // dials again only once a connection has failed): closed at
            // once rather than holding a task each, and a flood from one
            // host leaves room for the others.
            stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
            if !std::mem::replace(&mut over_bound_said, true) {
                warn!(
                    "peer connection from {remote} refused: {MAX_OPENING_PER_HOST} connections \
                     from its host, or {MAX_OPENING} in all, are already saying hello (later \
                     ones are refused quietly)"
                );
            }
            continue;
        };
        over_bound_said = false;
        let _ = stream.set_nodelay(true);
        let handshakes = cfg.handshakes.clone();
        let cfg = cfg.clone();
        let accept_to = accept_to.clone();
        let names = names.clone();
        let stats = stats.clone();
        // On another runtime, the connection is driven by that runtime's
        // reactor until the link takes it (`Conn::rebind`).
        let stream = match Travelling::away(stream, handshakes.is_some()) {
            Ok(s) => s,
            Err(e) => {
                debug!("peer connection from {remote}: {e}");
                continue;
            }
        };
        let task = async move {
            let _slot = slot;
            let stream = match stream.here() {
                Ok(s) => s,
                Err(e) => return debug!("peer connection from {remote}: {e}"),
            };
            let deadline = tokio::time::Instant::now() + HELLO_WAIT;
            let refuse = |reason: String| {
                stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
                warn!("peer connection from {remote} refused: {reason}");
            };
            match cfg.tls.clone() {
                None => {
                    let plain = |_: &TcpStream, _| Ok(());
                    accept_hello(
                        stream,
                        &cfg,
                        &accept_to,
                        deadline,
                        plain,
                        Conn::Plain,
                        refuse,
                    )
                    .await
                }
                Some(tls) => {
                    if let Some(s) = accept_tls(stream, &tls, deadline, refuse).await {
                        // The certificate must name the address of the node
                        // the hello names.
                        let named = |s: &tokio_rustls::server::TlsStream<TcpStream>, id| {
                            let name = names.get(&id).ok_or("no peer address")?;
                            crate::tls::check_peer_name(s.get_ref().1, name).map_err(|e| {
                                format!(
                                    "node {id}'s hello came with a certificate that does not \
                                     name the host of its peer address ({e})"
                                )
                            })
                        };
                        let into = |s: tokio_rustls::server::TlsStream<TcpStream>| {
                            let (tcp, conn) = s.into_inner();
                            Conn::Tls(tcp, Box::new(rustls::Connection::Server(conn)))
                        };
                        accept_hello(s, &cfg, &accept_to, deadline, named, into, refuse).await
                    }
                }
            }
        }
        .instrument(tracing::Span::current());
        match &handshakes {
            Some(rt) => hellos.spawn_on(task, rt),
            None => hellos.spawn(task),
        };
    }
}

/// Accepted peer connections saying hello at once (each may take up to
/// `HELLO_WAIT`), in all and from one host; more are closed as they come.
const MAX_OPENING: usize = 256;
const MAX_OPENING_PER_HOST: usize = 8;

/// Bounds on connections held at once (`Hosts::take`): in all, and from
/// one host. The peer and client ports bound those opening (saying hello,
/// or in their TLS handshake); `http_addr` those it serves.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub all: usize,
    pub per_host: usize,
}

const PEER_OPENINGS: Bounds = Bounds {
    all: MAX_OPENING,
    per_host: MAX_OPENING_PER_HOST,
};

/// Clients' TLS handshakes: a client may open many connections at once
/// (a pool, a benchmark), so more per host than peers.
const CLIENT_OPENINGS: Bounds = Bounds {
    all: 1024,
    per_host: 64,
};

/// Connections held at once (each by its `Slot`), by the host they come
/// from.
#[derive(Clone, Default)]
pub struct Hosts(Arc<Mutex<HashMap<std::net::IpAddr, usize>>>);

impl Hosts {
    /// A place for a connection from `host`; `None` if `bounds` are
    /// reached (counted under one lock).
    pub fn take(&self, host: std::net::IpAddr, bounds: Bounds) -> Option<Slot> {
        let mut map = self.lock();
        let all = map.values().sum();
        self.take_in(&mut map, host, all, bounds)
    }

    /// `take`, with the connections held in all counted by the caller.
    fn take_counted(&self, host: std::net::IpAddr, all: usize, bounds: Bounds) -> Option<Slot> {
        let mut map = self.lock();
        self.take_in(&mut map, host, all, bounds)
    }

    fn take_in(
        &self,
        map: &mut HashMap<std::net::IpAddr, usize>,
        host: std::net::IpAddr,
        all: usize,
        bounds: Bounds,
    ) -> Option<Slot> {
        let n = map.entry(host).or_insert(0);
        if all >= bounds.all || *n >= bounds.per_host {
            if *n == 0 {
                map.remove(&host);
            }
            return None;
        }
        *n += 1;
        Some(Slot {
            hosts: self.clone(),
            host,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::IpAddr, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A connection from `host` counted in `Hosts`, until dropped.
pub struct Slot {
    hosts: Hosts,
    host: std::net::IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.hosts.lock();
        if let Some(n) = map.get_mut(&self.host) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.host);
            }
        }
    }
}

/// How long an accepted peer connection may take to say hello (its TLS
/// handshake included).
const HELLO_WAIT: Duration = Duration::from_secs(5);

/// How an accepted connection opens (`tls_opening`).
pub enum Opening {
    /// With a handshake record.
    Tls,
    /// With something else: a client or node without TLS.
    NotTls,
    /// Closed before a byte (a TCP health check, a port scan).
    Closed,
    /// Nothing by the deadline.
    Silent,
    /// Reading failed.
    Failed(std::io::Error),
}

/// Looks at an accepted connection's first byte, by `deadline`, without
/// taking it: a TLS connection opens with a handshake record (22).
pub async fn tls_opening(stream: &TcpStream, deadline: tokio::time::Instant) -> Opening {
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Err(_) => Opening::Silent,
        Ok(Err(e)) => Opening::Failed(e),
        Ok(Ok(0)) => Opening::Closed,
        Ok(Ok(_)) if first[0] != 22 => Opening::NotTls,
        Ok(Ok(_)) => Opening::Tls,
    }
}

/// The TLS handshake of an accepted peer connection, by `deadline`.
async fn accept_tls(
    stream: TcpStream,
    tls: &PeerTls,
    deadline: tokio::time::Instant,
    refuse: impl FnOnce(String),
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    // (Each refusal is said before the connection closes.)
    let why = match tls_opening(&stream, deadline).await {
        Opening::Tls => None,
        Opening::Closed => Some("closed before its TLS handshake".into()),
        Opening::Silent => Some(format!("no TLS handshake within {HELLO_WAIT:?}")),
        Opening::Failed(e) => Some(format!("read failed: {e}")),
        Opening::NotTls => Some(
            "not TLS, and this node's peer port takes only TLS (peer_cert_file is set): \
             is the dialing node without peer TLS?"
                .to_string(),
        ),
    };
    if let Some(why) = why {
        refuse(why);
        return None;
    }
    let accepted = tls.acceptor().accept(stream).into_fallible();
    match tokio::time::timeout_at(deadline, accepted).await {
        Err(_) => {
            refuse(format!("TLS handshake not done within {HELLO_WAIT:?}"));
            None
        }
        Ok(Err((e, stream))) => {
            refuse(format!("TLS handshake failed: {e}"));
            linger(stream).await;
            None
        }
        Ok(Ok(s)) => Some(s),
    }
}

/// Closes the connection of a failed TLS handshake gently: the alert that
/// says why goes out first (a close with the other side's bytes still
/// unread resets the connection, and the alert may be lost with it), and
/// what the other side still sends is read and dropped for up to a second.
pub async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut buf = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Reads an accepted peer connection's hello (by `deadline`), checks it
/// (and with `may_be` that the connection may speak for the node it
/// names), answers it, and hands the connection (as `into` makes it) to
/// the link of that node; or says why not.
async fn accept_hello<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    cfg: &TransportConfig,
    accept_to: &HashMap<NodeId, mpsc::Sender<Accepted>>,
    deadline: tokio::time::Instant,
    may_be: impl FnOnce(&S, NodeId) -> Result<(), String>,
    into: impl FnOnce(S) -> Conn,
    refuse: impl FnOnce(String),
) {
    let mut buf = Vec::new();
    let checked = async {
        let hello = tokio::time::timeout_at(deadline, read_hello(&mut stream, &mut buf)).await;
        match hello {
            Err(_) => Err(format!("no hello within {HELLO_WAIT:?}")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Frame::Hello {
                cluster_id,
                node_id,
                version: offer,
            })) => {
                // The link speaks the dialer's offer, or this node's newest
                // if the offer is newer still.
                let version = offer.min(codec::PEER_VERSION);
                if cluster_id != cfg.cluster_id {
                    Err(format!(
                        "hello from node {node_id} of cluster {cluster_id:#x}, this is cluster {:#x}",
                        cfg.cluster_id
                    ))
                } else if let Some(tx) = accept_to.get(&node_id) {
                    may_be(&stream, node_id)?;
                    answer_hello(&mut stream, cfg, version)
                        .await
                        .map_err(|e| format!("the answer to node {node_id}'s hello failed: {e}"))?;
                    Ok((tx, version))
                } else {
                    Err(format!(
                        "hello from node {node_id}, which is not a peer that dials this node"
                    ))
                }
            }
            Ok(Ok(other)) => Err(format!("expected a hello, got {}", other.kind().name())),
        }
    }
    .await;
    match checked {
        Ok((tx, version)) => {
            let accepted = Accepted {
                stream: into(stream),
                leftover: buf,
                version,
            };
            let _ = tx.send(accepted).await;
        }
        // (Said before the connection closes.)
        Err(reason) => refuse(reason),
    }
}

/// A peer connection that said hello (and, dialed, was answered).
struct Accepted {
    stream: Conn,
    /// Bytes read after the hello.
    leftover: Vec<u8>,
    /// The peer protocol the connection speaks.
    version: u8,
}

/// How long a dialer waits for the answer to its hello.
const HELLO_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// An accepting node's answer to a hello that offered `version` or later
/// (the link's), from `codec::ANSWERED_HELLO_VERSION` on: a dialer that
/// offers an older one expects none.
async fn answer_hello<S: AsyncWrite + Unpin>(
    stream: &mut S,
    cfg: &TransportConfig,
    version: u8,
) -> std::io::Result<()> {
    if version < codec::ANSWERED_HELLO_VERSION {
        return Ok(());
    }
    let mut answer = Vec::new();
    codec::encode(
        &Frame::Hello {
            cluster_id: cfg.cluster_id,
            node_id: cfg.node_id,
            version,
        },
        &mut answer,
    );
    stream.write_all(&answer).await?;
    // (Through TLS, the record must go out now.)
    stream.flush().await
}

/// Why a dialed connection's hello did not open the link.
enum HelloFailed {
    /// The peer closed the connection before answering a word: a node of
    /// an older peer protocol, which refuses an offer it does not know.
    Unanswered(String),
    Other(String),
}

/// The error for a frame of kind `found` where only `expected` may come:
/// known from the frame's tag byte, before the rest of it is read.
fn check_kind(buf: &[u8], expected: FrameKind) -> Result<(), String> {
    match codec::frame_kind(buf) {
        Ok(Some(found)) if found != expected => Err(format!(
            "expected {}, got {}",
            expected.name(),
            found.name()
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("bad frame: {e}")),
    }
}

/// Reads exactly one frame of kind `expected`, keeping any bytes after it
/// in `buf`.
async fn read_one<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
    expected: FrameKind,
) -> Result<Frame, ReadError> {
    loop {
        check_kind(buf, expected).map_err(ReadError::Other)?;
        match codec::decode(buf, max) {
            Ok(Some((f, n))) => {
                buf.drain(..n);
                return Ok(f);
            }
            Ok(None) => {}
            Err(e) => return Err(ReadError::Other(format!("bad frame: {e}"))),
        }
        let n = stream.read_buf(buf).await.map_err(|e| {
            if crate::tls::alert_received(&e) {
                ReadError::TlsRefused(e)
            } else {
                ReadError::Other(format!("read failed: {e}"))
            }
        })?;
        if n == 0 {
            return Err(ReadError::Other("connection closed".into()));
        }
    }
}

/// Why `read_one` read no frame.
#[derive(Debug)]
enum ReadError {
    /// The peer ended the TLS connection with an alert: with TLS 1.3 a
    /// dialer's handshake is over before the accepting node has checked
    /// its certificate, so a refusal comes with the first read.
    TlsRefused(std::io::Error),
    /// Anything else, said.
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TlsRefused(e) => write!(f, "the peer ended the TLS connection: {e}"),
            ReadError::Other(why) => f.write_str(why),
        }
    }
}

/// Reads an incoming peer connection's first frame, which must be a hello:
/// a frame of another kind, or one declaring more than a hello's bytes, is
/// refused from its first bytes (before its hello, a connection may come
/// from anyone).
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Frame, String> {
    let hello = read_one(stream, buf, codec::HELLO_MAX_FRAME, FrameKind::Hello).await;
    // (A refused frame is left in `buf`: here, the connection's opening.)
    hello.map_err(|e| foreign_opening(buf, FrameKind::Hello).unwrap_or_else(|| e.to_string()))
}

/// Why a connection whose opening bytes were refused as a frame was
/// closed, if they are another protocol's (`codec::foreign_protocol`):
/// that protocol and the port it should have gone to, instead of the
/// length its first bytes declare when read as a frame ("frame declares
/// 541676112 bytes" for HTTP/2's preface). `expected`: what the port takes
/// first (a client request on the client port, a hello on the peer port).
fn foreign_opening(opening: &[u8], expected: FrameKind) -> Option<String> {
    let proto = codec::foreign_protocol(opening)?;
    let port = match expected {
        FrameKind::Request => "the native client port, which speaks only Keel's client protocol",
        _ => "the peer port, which speaks only Keel's replication protocol",
    };
    let elsewhere = match (proto, expected) {
        ("HTTP/1.1", _) => "; etcd clients use etcd_addr, and /metrics and /status http_addr",
        ("TLS", FrameKind::Hello) => {
            " (without TLS: this node has no peer_cert_file; a node with peer TLS must not \
             dial it); etcd clients use etcd_addr"
        }
        ("TLS", _) => {
            " (without TLS: this node has no client_tls_cert_file; a client with TLS must \
             not use it); etcd clients use etcd_addr"
        }
        _ => "; etcd clients use etcd_addr",
    };
    Some(format!("{proto} on {port}{elsewhere}"))
}

/// Free buffer space kept for each read of a connection.
const READ_SPARE: usize = 64 << 10;

/// How long a client connection that sent a bad frame stays open for the
/// replies to the requests it sent before it.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Reads frames until EOF or an error (from reading, decoding, or
/// `on_frame`). `on_frame` gets each frame as `Some`, then `None` once the
/// frames of a read were handed over, before waiting for more bytes.
///
/// The whole frames of each read are split off the buffer and frozen, and
/// decoded as slices of it (`codec::decode_shared`): the entries and
/// commands of a read share one allocation instead of one copy each. The
/// rest of the buffer's allocation takes the next reads until it is used
/// up; a partial frame stays in the buffer, which grows to fit it.
async fn read_frames(
    r: WireRead,
    buf: BytesMut,
    max: usize,
    expected: FrameKind,
    on_frame: impl FnMut(Option<Frame>) -> Result<(), String>,
) -> Result<(), String> {
    read_frames_gated(r, buf, max, expected, None, on_frame).await
}

/// `read_frames`, and with `answers` (a client connection's outbox, and
/// the counters) no more requests handed on, and no read, while too many
/// bytes of answers are held or expected for the connection
/// (`Outbox::wait_for_room`): a read's requests are handed on in as many
/// pieces as that takes, each after the answers before it made room.
async fn read_frames_gated(
    mut r: WireRead,
    mut buf: BytesMut,
    max: usize,
    expected: FrameKind,
    answers: Option<(&Outbox, &NetStats)>,
    mut on_frame: impl FnMut(Option<Frame>) -> Result<(), String>,
) -> Result<(), String> {
    // Waits for room for answers, counting the pauses (as they begin).
    async fn room(out: &Outbox, stats: &NetStats) {
        if out.over(0) {
            stats.client_reads_paused.fetch_add(1, Ordering::Relaxed);
        }
        out.wait_for_room().await;
    }
    // No frame taken yet: what the buffer starts with is the connection's
    // opening, which may be another protocol's (`foreign_opening`).
    let mut opening = true;
    loop {
        // The whole frames at the front, by their length prefixes; a bad
        // prefix, or a frame of another kind than `expected` (known from
        // its tag byte, before the rest of it is read), ends the
        // connection after the frames before it.
        let (mut whole, mut partial, mut bad) = (0, 0, None);
        loop {
            let at = &buf[whole..];
            let size = codec::frame_size(at, max)
                .map_err(|e| format!("bad frame: {e}"))
                .and_then(|n| check_kind(at, expected).map(|()| n));
            match size {
                Ok(Some(n)) if n <= buf.len() - whole => whole += n,
                Ok(Some(n)) => {
                    partial = n;
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    let foreign = if opening && whole == 0 {
                        foreign_opening(&buf, expected)
                    } else {
                        None
                    };
                    bad = Some(foreign.unwrap_or(e));
                    break;
                }
            }
        }
        opening &= whole == 0;
        let chunk = buf.split_to(whole).freeze();
        let mut off = 0;
        // Frames handed to `on_frame` since its last `None`.
        let mut taken = 0;
        let decoded = loop {
            if off == chunk.len() {
                break bad.map_or(Ok(()), Err);
            }
            if let Some((out, stats)) = answers {
                // The requests so far go on, and the rest wait for room.
                if taken > 0 && out.over(taken) {
                    out.expect(std::mem::take(&mut taken));
                    on_frame(None)?;
                    room(out, stats).await;
                }
            }
            match codec::decode_shared(&chunk, off, max) {
                Ok(Some((f, n))) => {
                    off += n;
                    if let Err(e) = on_frame(Some(f)) {
                        break Err(e);
                    }
                    taken += 1;
                }
                // (`frame_size` said the frame is all there.)
                Ok(None) => break Err("bad frame: shorter than its length".into()),
                Err(e) => break Err(format!("bad frame: {e}")),
            }
        };
        // Requests decoded before a bad frame still run (and are answered
        // before the connection closes, see `serve_client`).
        if let Some((out, _)) = answers {
            out.expect(taken);
        }
        on_frame(None)?;
        decoded?;
        // A client connection: no more requests while its answers back up.
        if let Some((out, stats)) = answers {
            room(out, stats).await;
        }
        // Room for a whole burst in one read (a buffer only grows when
        // full, which would leave reads of one small frame at a time), and
        // for all of a large frame that has begun to arrive.
        let room = partial.saturating_sub(buf.len()).max(READ_SPARE / 4);
        if buf.capacity() - buf.len() < room {
            buf.reserve(room.max(READ_SPARE));
        }
        let n = r
            .read_buf(&mut buf)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Ok(());
        }
    }
}

struct Link {
    cfg: TransportConfig,
    peer: NodeId,
    /// With TLS: the name the peer's certificate must have (its address's
    /// host).
    server_name: Option<rustls::pki_types::ServerName<'static>>,
    addr: String,
    dial: bool,
    inbound: Inbound,
    stats: Arc<NetStats>,
}

impl Link {
    /// Opens a connection this node dialed: its TLS handshake (with TLS),
    /// then the hello (`say_hello`).
    async fn open(&self, stream: TcpStream, offer: u8) -> Result<Accepted, HelloFailed> {
        let (tls, name) = match (&self.cfg.tls, &self.server_name) {
            (Some(tls), Some(name)) => (tls, name),
            (None, _) => {
                let (stream, leftover, version) = self.say_hello(stream, offer).await?;
                return Ok(Accepted {
                    stream: Conn::Plain(stream),
                    leftover,
                    version,
                });
            }
            // (`start_peers` names every peer when there is TLS.)
            (Some(_), None) => {
                return Err(HelloFailed::Other(
                    "no name to check the peer's certificate against".into(),
                ))
            }
        };
        let handshake = tls.connector().connect(name.clone(), stream);
        let stream = match tokio::time::timeout(HELLO_ANSWER_WAIT, handshake).await {
            Err(_) => {
                return Err(HelloFailed::Other(format!(
                    "no TLS handshake within {HELLO_ANSWER_WAIT:?}"
                )))
            }
            Ok(Err(e)) => {
                // A node without TLS reads the handshake as a bad hello
                // and closes the connection.
                let closed = matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                );
                let hint = if closed {
                    " (closed by the peer: a node without peer TLS closes TLS connections, see its log)"
                } else {
                    ""
                };
                return Err(HelloFailed::Other(format!(
                    "TLS handshake failed: {e}{hint}"
                )));
            }
            Ok(Ok(s)) => s,
        };
        let (stream, leftover, version) = self.say_hello(stream, offer).await?;
        let (tcp, conn) = stream.into_inner();
        Ok(Accepted {
            stream: Conn::Tls(tcp, Box::new(rustls::Connection::Client(conn))),
            leftover,
            version,
        })
    }

    /// Says hello on a connection this node dialed, offering peer
    /// protocol `offer`, and (from `codec::ANSWERED_HELLO_VERSION` on) reads
    /// the answer: the connection, the bytes read after the answer, and the
    /// version the link speaks.
    async fn say_hello<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        offer: u8,
    ) -> Result<(S, Vec<u8>, u8), HelloFailed> {
        let mut hello = Vec::new();
        codec::encode(
            &Frame::Hello {
                cluster_id: self.cfg.cluster_id,
                node_id: self.cfg.node_id,
                version: offer,
            },
            &mut hello,
        );
        // (Through TLS, the record must go out now.)
        let sent = match stream.write_all(&hello).await {
            Ok(()) => stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            return Err(HelloFailed::Other(format!("hello not sent: {e}")));
        }
        if offer < codec::ANSWERED_HELLO_VERSION {
            return Ok((stream, Vec::new(), offer));
        }
        let mut buf = Vec::new();
        let answer = tokio::time::timeout(
            HELLO_ANSWER_WAIT,
            read_one(
                &mut stream,
                &mut buf,
                codec::HELLO_MAX_FRAME,
                FrameKind::Hello,
            ),
        )
        .await;
        match answer {
            Err(_) => Err(HelloFailed::Other(format!(
                "no answer to the hello within {HELLO_ANSWER_WAIT:?}"
            ))),
            // Not a refusal of the offered version: TLS refused the
            // connection.
            Ok(Err(e @ ReadError::TlsRefused(_))) => Err(HelloFailed::Other(format!(
                "{e} (does it trust this node's certificate, and does the certificate name \
                 this node's peer address? see its log)"
            ))),
            Ok(Err(e)) if buf.is_empty() => Err(HelloFailed::Unanswered(e.to_string())),
            Ok(Err(e)) => Err(HelloFailed::Other(format!("bad answer to the hello: {e}"))),
            Ok(Ok(Frame::Hello {
                cluster_id,
                node_id,
                version,
            })) => {
                if cluster_id != self.cfg.cluster_id || node_id != self.peer {
                    Err(HelloFailed::Other(format!(
                        "the hello was answered by node {node_id} of cluster {cluster_id:#x}"
                    )))
                } else if version > offer {
                    Err(HelloFailed::Other(format!(
                        "the hello was answered with peer protocol {version}, newer than the {offer} offered"
                    )))
                } else {
                    Ok((stream, buf, version))
                }
            }
            Ok(Ok(other)) => Err(HelloFailed::Other(format!(
                "the hello was answered with {}",
                other.kind().name()
            ))),
        }
    }

    async fn run(self, outbox: Arc<Outbox>, mut accepted: mpsc::Receiver<Accepted>) {
        let mut backoff = Duration::from_millis(20);
        let mut replacement: Option<Accepted> = None;
        let mut offer = Offer::newest(self.cfg.tls.is_some());
        let mut spare = Vec::new();
        // Since when dialing has failed, and when that was last reported.
        let mut failing: Option<(Instant, Option<Instant>)> = None;
        // Whether to wait before dialing again, and how long.
        let mut wait = None;
        loop {
            if let Some(pause) = wait.take() {
                let pause = match pause {
                    Pause::Reoffer => REOFFER_WAIT,
                    Pause::Backoff => {
                        let b = backoff;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        b
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = outbox.wake.notified() => {} // closed?
                }
            }
            if outbox.is_closed() {
                return;
            }
            let conn = if let Some(c) = replacement.take() {
                c
            } else if self.dial {
                let connected = tokio::select! {
                    c = TcpStream::connect(&self.addr) => c,
                    _ = outbox.wake.notified() => continue, // closed?
                };
                let s = match connected {
                    Ok(s) => s,
                    Err(e) => {
                        // Down: it may be back upgraded.
                        offer = Offer::newest(self.cfg.tls.is_some());
                        debug!("link to node {} at {}: {e}", self.peer, self.addr);
                        // A peer down for a moment is normal; one that
                        // cannot be reached for long (down, or a wrong
                        // address in the configuration) is said, now and
                        // then.
                        let now = Instant::now();
                        let (since, warned) = failing.get_or_insert((now, None));
                        let quiet = warned.is_none_or(|w| now - w >= UNREACHABLE_REPEAT);
                        if now - *since >= UNREACHABLE_WARN && quiet {
                            *warned = Some(now);
                            warn!(
                                "cannot reach node {} at {} for {:.0?}: {e}",
                                self.peer,
                                self.addr,
                                now - *since
                            );
                        }
                        wait = Some(Pause::Backoff);
                        continue;
                    }
                };
                failing = None;
                let _ = s.set_nodelay(true);
                let hello = self.open(s, offer.version);
                tokio::pin!(hello);
                let said = loop {
                    tokio::select! {
                        said = &mut hello => break said,
                        // (A wake-up left over from the last connection's
                        // flushes must not drop this one.)
                        _ = outbox.wake.notified() => if outbox.is_closed() {
                            return;
                        },
                    }
                };
                match said {
                    Ok(accepted) => {
                        if accepted.version >= codec::ANSWERED_HELLO_VERSION {
                            // Taken: refusals before were not in a row.
                            offer.refusals = 0;
                        }
                        accepted
                    }
                    Err(HelloFailed::Unanswered(e)) => {
                        wait = Some(offer.refused(self.peer, &e));
                        continue;
                    }
                    Err(HelloFailed::Other(e)) => {
                        warn!("link to node {} at {}: {e}", self.peer, self.addr);
                        offer.refusals = 0;
                        wait = Some(Pause::Backoff);
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    c = accepted.recv() => match c {
                        Some(c) => c,
                        None => return, // the peers are gone
                    },
                    _ = outbox.wake.notified() => continue, // closed?
                }
            };
            let Accepted {
                stream,
                leftover,
                version,
            } = conn;
            // (An accepted connection said hello on the runtime of
            // `TransportConfig::handshakes`.)
            let stream = if self.dial || self.cfg.handshakes.is_none() {
                stream
            } else {
                match stream.rebind() {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("link to node {} not taken up: {e}", self.peer);
                        continue;
                    }
                }
            };
            // A version older than `codec::ANSWERED_HELLO_VERSION` is not
            // answered: the link is only known to be taken once a message
            // comes (a node older still closes it without a word).
            let answered = version >= codec::ANSWERED_HELLO_VERSION;
            let older = if version < codec::PEER_VERSION {
                format!(
                    ", in its older peer protocol {version} (this node's is {})",
                    codec::PEER_VERSION
                )
            } else {
                String::new()
            };
            if answered || !self.dial {
                info!("link to node {} up{older}", self.peer);
            } else {
                debug!(
                    "connected to node {}, offering peer protocol {version}",
                    self.peer
                );
            }
            let up_since = Instant::now();
            let (r, w) = stream.split();
            hand_held_records_to(&w, &outbox);
            let w = Arc::new(w);
            outbox.connect_at(Some(w.clone()), version);
            self.stats.set_peer_protocol(self.peer, version);
            // Whether a message came on this connection.
            let heard = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let heard_here = heard.clone();
            let say_up = self.dial && !answered;
            let inbound = self.inbound.clone();
            let (cfg, peer, stats) = (self.cfg.clone(), self.peer, self.stats.clone());
            let mut reader = tokio::spawn(
                async move {
                    read_frames(
                        r,
                        BytesMut::from(&leftover[..]),
                        cfg.max_frame,
                        FrameKind::Peer,
                        |f| match f {
                            None => Ok(()),
                            Some(Frame::Peer(m))
                                if m.cluster_id == cfg.cluster_id
                                    && m.from == peer
                                    && m.to == cfg.node_id =>
                            {
                                if !heard_here.swap(true, Ordering::Relaxed) && say_up {
                                    info!("link to node {peer} up{older}");
                                }
                                inbound(m);
                                Ok(())
                            }
                            Some(Frame::Peer(m)) => Err(format!(
                            "message for cluster {:#x} from {} to {} on the link to node {peer}",
                            m.cluster_id, m.from, m.to
                        )),
                            Some(other) => {
                                Err(format!("unexpected {} on a peer link", other.kind().name()))
                            }
                        },
                    )
                    .await
                    .inspect_err(|_| {
                        stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    })
                }
                .instrument(tracing::Span::current()),
            );
            // Why the connection ended; `None` once the transport is gone
            // (closed, or its accepting task with it), after what the link
            // held got `CLOSE_GRACE` to go out.
            let reason = loop {
                tokio::select! {
                    r = &mut reader => break Some(reader_ended(r)),
                    _ = outbox.wake.notified() => {
                        if outbox.is_closed() {
                            grace(outbox.drain(&w, &mut spare)).await;
                            break None;
                        }
                        // Still watching the reader and for a replacement:
                        // a peer that stopped reading (a partition) must
                        // not keep its newer connection waiting until TCP
                        // gives up on this one, nor the transport's end
                        // for longer than `CLOSE_GRACE`.
                        let drain = outbox.drain(&w, &mut spare);
                        tokio::pin!(drain);
                        let drained = tokio::select! {
                            d = &mut drain => d,
                            r = &mut reader => break Some(reader_ended(r)),
                            _ = outbox.closing() => {
                                grace(&mut drain).await;
                                break None;
                            }
                            c = accepted.recv(), if !self.dial => {
                                let Some(c) = c else {
                                    grace(&mut drain).await;
                                    break None;
                                };
                                replacement = Some(c);
                                break Some(REPLACED.to_string());
                            }
                        };
                        if let Err(e) = drained {
                            break Some(e);
                        }
                    }
                    c = accepted.recv(), if !self.dial => {
                        let Some(c) = c else {
                            grace(outbox.drain(&w, &mut spare)).await;
                            break None;
                        };
                        // The peer reconnected: the newer connection wins.
                        replacement = Some(c);
                        break Some(REPLACED.to_string());
                    }
                }
            };
            reader.abort();
            outbox.connect(None);
            self.stats.set_peer_protocol(self.peer, 0);
            let Some(reason) = reason else {
                return;
            };
            let heard = heard.load(Ordering::Relaxed);
            if !self.dial {
                warn!("link to node {} down: {reason}", self.peer);
                continue;
            }
            let brief = up_since.elapsed() < REFUSAL_WITHIN;
            if heard || !brief {
                // At once again after a link that worked (or stayed up:
                // two followers' link carries nothing for long stretches).
                backoff = Duration::from_millis(20);
            }
            if !answered && !heard && brief {
                // A node older still closes an offer it does not know
                // right after reading the hello.
                debug!("link to node {} down: {reason}", self.peer);
                wait = Some(offer.refused(self.peer, &reason));
            } else {
                warn!("link to node {} down: {reason}", self.peer);
                // The peer may come back upgraded.
                offer = Offer::newest(self.cfg.tls.is_some());
                wait = Some(Pause::Backoff);
            }
        }
    }
}

/// The peer protocol a dialing link offers in its hello: this node's
/// newest, stepping down past a node that refuses it (see the module's
/// doc).
struct Offer {
    version: u8,
    /// The oldest version it may offer: `codec::MIN_PEER_VERSION`, or with
    /// TLS `codec::MIN_TLS_PEER_VERSION`.
    floor: u8,
    /// Times in a row `version` was refused.
    refusals: u32,
    /// When every version was last said refused (a warning at most once
    /// per `UNREACHABLE_REPEAT`; the peer logs each refusal too).
    warned: Option<Instant>,
}

/// Refusals in a row of one version before the one before is offered: one
/// could be a node of this version that stopped in the middle of the hello.
const REFUSALS_TO_STEP_DOWN: u32 = 2;
/// How soon a link whose unanswered offer was taken must close, unheard,
/// to count as a refusal of the offer (an older node refuses as soon as
/// it has read the hello).
const REFUSAL_WITHIN: Duration = Duration::from_secs(1);
/// How long a dialing link waits after a refusal before it offers again.
const REOFFER_WAIT: Duration = Duration::from_millis(20);

impl Offer {
    fn newest(tls: bool) -> Self {
        Offer {
            version: codec::PEER_VERSION,
            floor: if tls {
                codec::MIN_TLS_PEER_VERSION
            } else {
                codec::MIN_PEER_VERSION
            },
            refusals: 0,
            warned: None,
        }
    }

    /// The peer closed a connection that offered `version` without a word
    /// (`why`). Returns how long to wait before the next offer: a moment,
    /// or the link's backoff once every version was refused (the offer is
    /// then the newest again).
    fn refused(&mut self, peer: NodeId, why: &str) -> Pause {
        self.refusals += 1;
        if self.refusals < REFUSALS_TO_STEP_DOWN {
            return Pause::Reoffer;
        }
        let refused = self.version;
        if refused > self.floor {
            self.version -= 1;
            self.refusals = 0;
            info!(
                "node {peer} closed connections offering peer protocol {refused} without a word ({why}); offering {} next",
                self.version
            );
            Pause::Reoffer
        } else {
            let now = Instant::now();
            let what = if self.floor == codec::MIN_TLS_PEER_VERSION {
                format!(
                    "node {peer} closes TLS connections after this node's hello without a word \
                     ({why}): it refuses this node (see its log: does this node's certificate \
                     name the host of its peer address as node {peer} lists it?), or it runs a \
                     version older than {refused}"
                )
            } else {
                format!(
                    "node {peer} refuses peer protocols {} to {refused} ({why}): it runs a version older than {refused}, or it refuses this node (see its log)",
                    codec::PEER_VERSION
                )
            };
            if self.warned.is_none_or(|w| now - w >= UNREACHABLE_REPEAT) {
                warn!("{what}");
                self.warned = Some(now);
            } else {
                debug!("{what}");
            }
            *self = Offer {
                version: codec::PEER_VERSION,
                refusals: 0,
                ..*self
            };
            Pause::Backoff
        }
    }
}

/// What a dialing link waits for before it dials again.
enum Pause {
    /// `REOFFER_WAIT`, to offer again after a refusal.
    Reoffer,
    /// The link's backoff, which then grows (up to a second).
    Backoff,
}

/// How long a peer may be unreachable before it is said (a warning), and
/// how often it is said again while it stays so.
const UNREACHABLE_WARN: Duration = Duration::from_secs(5);
const UNREACHABLE_REPEAT: Duration = Duration::from_secs(60);

/// How long a link of a closed transport goes on writing what it holds
/// (a removed leader's last messages, its hand-over, may be left to the
/// link's task by a full socket) before it ends anyway: a peer that stopped
/// reading does not keep it.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// Why a link's connection ended when the peer dialed again.
const REPLACED: &str = "replaced by a newer connection";

/// Waits for a closing link's `drain` of what it holds, for at most
/// `CLOSE_GRACE`.
async fn grace(drain: impl std::future::Future) {
    let _ = tokio::time::timeout(CLOSE_GRACE, drain).await;
}

/// Why a link's reader task ended.
fn reader_ended(r: Result<Result<(), String>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "closed by peer".to_string(),
        Ok(Err(e)) => e,
        Err(e) => format!("reader failed: {e}"),
    }
}

/// Serves client connections on `listen`.
pub async fn start_clients(
    listen: &str,
    node_id: NodeId,
    max_frame: usize,
    handler: RequestHandler,
    stats: Arc<NetStats>,
) -> std::io::Result<()> {
    start_clients_with(listen, node_id, max_frame, handler, stats, None, None).await
}

/// Says something that may come again and again (refusals of
/// connections, failed accepts) as a warning at most once per `QUIET_FOR`
/// (the rest at debug level): anyone who can reach a port can make as many
/// refusals as they like. One `Quiet` per kind, so that one kind does not
/// silence another.
#[derive(Default)]
pub struct Quiet {
    last: Mutex<Option<Instant>>,
}

const QUIET_FOR: Duration = Duration::from_secs(10);

impl Quiet {
    pub fn say(&self, what: String) {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|t| now - t >= QUIET_FOR) {
            *last = Some(now);
            drop(last);
            warn!("{what} (more like it within {QUIET_FOR:?} are logged at debug level)");
        } else {
            debug!("{what}");
        }
    }
}

/// How long a client may take over its TLS handshake.
const CLIENT_HANDSHAKE_WAIT: Duration = Duration::from_secs(10);

/// `start_clients`, and with `tls` every connection is TLS: its handshake
/// runs on `handshakes` (another runtime than the one serving the
/// connections, which is a node's consensus thread's) if given, and the
/// connection is then served here as a plain one is.
pub async fn start_clients_with(
    listen: &str,
    node_id: NodeId,
    max_frame: usize,
    handler: RequestHandler,
    stats: Arc<NetStats>,
    tls: Option<crate::tls::ServerTls>,
    handshakes: Option<tokio::runtime::Handle>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let span = tracing::info_span!(parent: None, "node", id = node_id);
    let task_span = span.clone();
    let here = tokio::runtime::Handle::current();
    let opening = Hosts::default();
    let quiet = Arc::new(Quiet::default());
    tokio::spawn(
        async move {
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!("client listener: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (handler, stats) = (handler.clone(), stats.clone());
                let Some(tls) = tls.clone() else {
                    tokio::spawn(
                        serve_client(Conn::Plain(stream), remote, max_frame, handler, stats)
                            .instrument(task_span.clone()),
                    );
                    continue;
                };
                let Some(slot) = opening.take(remote.ip(), CLIENT_OPENINGS) else {
                    stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
                    quiet.say(format!(
                        "client {remote} refused: {} TLS handshakes from its host, or {} in \
                         all, are under way",
                        CLIENT_OPENINGS.per_host, CLIENT_OPENINGS.all
                    ));
                    continue;
                };
                let (here, span, quiet) = (here.clone(), task_span.clone(), quiet.clone());
                let moving = handshakes.is_some();
                let stream = match Travelling::away(stream, moving) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!("client {remote}: {e}");
                        continue;
                    }
                };
                let handshake = async move {
                    let _slot = slot;
                    let stream = match stream.here() {
                        Ok(s) => s,
                        Err(e) => return debug!("client {remote}: {e}"),
                    };
                    let deadline = tokio::time::Instant::now() + CLIENT_HANDSHAKE_WAIT;
                    let refused = |why: String| {
                        stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
                        quiet.say(format!("client {remote} refused: {why}"));
                    };
                    let plain = match tls_opening(&stream, deadline).await {
                        Opening::Tls => false,
                        // (A client without TLS still gets TLS's
                        // answer, an alert, which it can tell for TLS.)
                        Opening::NotTls => true,
                        // (A TCP health check, a port scan: not worth a
                        // line each.)
                        Opening::Closed | Opening::Silent => {
                            return debug!("client {remote}: closed or silent before TLS")
                        }
                        Opening::Failed(e) => return debug!("client {remote}: {e}"),
                    };
                    let accepted = tls.acceptor().accept(stream).into_fallible();
                    let accepted = tokio::time::timeout_at(deadline, accepted).await;
                    let stream = match accepted {
                        Ok(Ok(s)) => s,
                        Ok(Err((e, stream))) => {
                            // (Said before the connection closes.)
                            refused(if plain {
                                "not TLS, and client_addr takes only TLS (client_tls_cert_file \
                                 is set): a client without TLS? (the keel command takes \
                                 --cacert)"
                                    .into()
                            } else {
                                format!("TLS handshake failed: {e}")
                            });
                            return linger(stream).await;
                        }
                        Err(_) => {
                            return debug!(
                                "client {remote}: no TLS handshake within \
                                     {CLIENT_HANDSHAKE_WAIT:?}"
                            )
                        }
                    };
                    let (tcp, conn) = stream.into_inner();
                    let conn = Conn::Tls(tcp, Box::new(rustls::Connection::Server(conn)));
                    here.spawn(
                        async move {
                            // (Back on this runtime's reactor.)
                            let conn = if moving { conn.rebind() } else { Ok(conn) };
                            match conn {
                                Ok(conn) => {
                                    serve_client(conn, remote, max_frame, handler, stats).await
                                }
                                Err(e) => debug!("client {remote}: {e}"),
                            }
                        }
                        .instrument(span),
                    );
                }
                .instrument(task_span.clone());
                match &handshakes {
                    Some(rt) => drop(rt.spawn(handshake)),
                    None => drop(tokio::spawn(handshake)),
                }
            }
        }
        .instrument(span),
    );
    Ok(())
}

async fn serve_client(
    conn: Conn,
    remote: std::net::SocketAddr,
    max_frame: usize,
    handler: RequestHandler,
    stats: Arc<NetStats>,
) {
    let (r, w) = conn.split();
    let w = Arc::new(w);
    let out = Arc::new(Outbox::default());
    hand_held_records_to(&w, &out);
    out.connect(Some(w.clone()));
    let tx = ResponseSink(Arc::new(Sink::Conn(out.clone())));
    let outbox = out.clone();
    // Writes what the responding threads' own writes left over, until
    // every sink is gone and everything sent is written.
    let writer = tokio::spawn(async move {
        let mut spare = Vec::new();
        loop {
            out.wake.notified().await;
            loop {
                if out.drain(&w, &mut spare).await.is_err() {
                    out.connect(None); // the client is gone: drop what follows
                    return;
                }
                if !out.is_closed() {
                    break;
                }
                // No sink is left, so nothing new can come: stop once what
                // was sent before is written (by this drain or a sender's
                // own write; a deferred one may still be pending).
                let mut st = lock(&out.state);
                if st.buf.is_empty() {
                    st.writer = None;
                    return;
                }
            }
        }
    });
    let mut batch = Vec::new();
    let result = read_frames_gated(
        r,
        BytesMut::new(),
        max_frame,
        FrameKind::Request,
        Some((&outbox, &stats)),
        |f| match f {
            Some(Frame::Request(req)) => {
                batch.push(req);
                Ok(())
            }
            Some(other) => Err(format!(
                "expected a client request, got {}",
                other.kind().name()
            )),
            None => {
                if !batch.is_empty() {
                    handler(std::mem::take(&mut batch), &tx);
                    // Answers the handler gave itself (refusals) on a thread
                    // that defers its writes, as the consensus thread does,
                    // go out now, not at that thread's next turn.
                    flush_deferred();
                }
                Ok(())
            }
        },
    )
    .await;
    if let Err(reason) = &result {
        stats.bad_frames.fetch_add(1, Ordering::Relaxed);
        warn!("client {remote}: closing connection: {reason}");
    }
    // The writer ends once every request taken from this connection has
    // been answered (each holds a clone of the sink). After a bad frame,
    // wait a little for those answers, then close regardless.
    drop(tx);
    if result.is_err() {
        let mut writer = writer;
        if tokio::time::timeout(REPLY_GRACE, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
            // Closed regardless: later answers are dropped, not buffered
            // or written to a connection being closed.
            outbox.connect(None);
        }
    } else {
        let _ = writer.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use codec::ClientOp;

    /// A current-thread runtime, as the links run on.
    fn test_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Frames reach `on_frame` whole and in order however the bytes are cut
    /// into reads (a large frame across many), then a bad frame ends the
    /// connection with an error after the frames before it.
    #[test]
    fn read_frames_hands_over_whole_frames_however_the_bytes_arrive() {
        let rt = test_runtime();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let frames: Vec<Frame> = (0..60u64)
                .map(|i| {
                    let size = if i == 30 { 300_000 } else { 50 + i as usize };
                    Frame::Request(ClientRequest {
                        id: i,
                        client: 1,
                        seq: i,
                        op: ClientOp::Write(Bytes::from(vec![i as u8; size])),
                    })
                })
                .collect();
            let mut bytes = Vec::new();
            for f in &frames {
                codec::encode(f, &mut bytes);
            }
            // A length prefix below the smallest frame.
            bytes.extend_from_slice(&1u32.to_le_bytes());
            let writer = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                // Pieces of a prime size cut frames at every kind of place.
                for piece in bytes.chunks(7919) {
                    s.write_all(piece).await.expect("write");
                    tokio::task::yield_now().await;
                }
                s
            });
            let (sock, _) = listener.accept().await.expect("accept");
            let (r, _w) = sock.into_split();
            let mut got = Vec::new();
            let mut reads = 0;
            let result = read_frames(
                WireRead::Plain(r),
                BytesMut::new(),
                1 << 20,
                FrameKind::Request,
                |f| {
                    match f {
                        Some(f) => got.push(f),
                        None => reads += 1,
                    }
                    Ok(())
                },
            )
            .await;
            let _still_open = writer.await.expect("writer");
            assert!(
                got == frames,
                "{} of {} frames, or changed",
                got.len(),
                frames.len()
            );
            assert!(reads > 1, "all in one read: the test cut nothing");
            let e = result.expect_err("the bad frame was accepted");
            assert!(e.contains("bad frame"), "{e}");
        });
    }

    /// Another protocol's opening on a port (etcdctl's HTTP/2 on the
    /// client port, a browser's HTTP/1.1, a TLS handshake) is named as
    /// that, with the port to use, instead of "frame declares 541676112
    /// bytes"; the same bytes after the opening are a bad frame as before.
    #[test]
    fn foreign_openings_are_named() {
        let rt = test_runtime();
        rt.block_on(async {
            let client_port = |bytes: Vec<u8>| async move {
                let (server, mut client) = connected().await;
                client.write_all(&bytes).await.expect("write");
                let (r, _w) = server.into_split();
                let result = read_frames(
                    WireRead::Plain(r),
                    BytesMut::new(),
                    64 << 20,
                    FrameKind::Request,
                    |_| Ok(()),
                )
                .await;
                drop(client);
                result.expect_err("another protocol's bytes were taken")
            };
            let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            assert_eq!(
                client_port(preface.clone()).await,
                "HTTP/2 on the native client port, which speaks only Keel's client protocol; \
                 etcd clients use etcd_addr"
            );
            let e = client_port(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await;
            assert!(e.starts_with("HTTP/1.1 on the native client port"), "{e}");
            assert!(e.contains("http_addr"), "{e}");
            let hello = [
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ];
            let e = client_port(hello.to_vec()).await;
            assert!(e.starts_with("TLS on the native client port"), "{e}");
            // Arriving a byte at a time, the preface is still told.
            let (server, mut client) = connected().await;
            let (r, _w) = server.into_split();
            let writer = tokio::spawn(async move {
                for b in preface {
                    client.write_all(&[b]).await.expect("write");
                    tokio::task::yield_now().await;
                }
                client
            });
            let e = read_frames(
                WireRead::Plain(r),
                BytesMut::new(),
                64 << 20,
                FrameKind::Request,
                |_| Ok(()),
            )
            .await
            .expect_err("the preface was taken");
            assert!(e.starts_with("HTTP/2 on the native client port"), "{e}");
            drop(writer.await);
            // After a good frame, the same bytes are a bad frame.
            let mut bytes = Vec::new();
            codec::encode(
                &Frame::Request(ClientRequest {
                    id: 1,
                    client: 1,
                    seq: 1,
                    op: ClientOp::Status,
                }),
                &mut bytes,
            );
            bytes.extend_from_slice(b"PRI * HTTP/2.0\r\n");
            let e = client_port(bytes).await;
            assert!(
                e.starts_with("bad frame: frame declares 541676112 bytes"),
                "{e}"
            );

            // The peer port.
            for (bytes, wants) in [
                (&b"PRI * HTTP/2.0\r\n\r\n"[..], "HTTP/2 on the peer port"),
                (&hello[..], "TLS on the peer port"),
            ] {
                let (mut server, mut client) = connected().await;
                client.write_all(bytes).await.expect("write");
                let e = read_hello(&mut server, &mut Vec::new())
                    .await
                    .expect_err("another protocol for a hello");
                assert!(e.starts_with(wants), "{e}");
            }
        });
    }

    /// A connected pair: the accepted side and the connecting side.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (server, client)
    }

    /// The first bytes of a frame: its length prefix, version and tag.
    fn frame_header(f: &Frame, declared: u32) -> Vec<u8> {
        let mut b = Vec::new();
        codec::encode(f, &mut b);
        b.truncate(6);
        b[..4].copy_from_slice(&declared.to_le_bytes());
        b
    }

    fn peer_frame() -> Frame {
        Frame::Peer(keel_core::Message {
            cluster_id: 1,
            from: 1,
            to: 2,
            term: 1,
            body: keel_core::Body::TimeoutNow { last_pos: 0 },
        })
    }

    /// A frame of the wrong kind (a peer message on a client connection, a
    /// request where a hello must come) and a hello declaring more bytes
    /// than a hello has are refused from their first six bytes: the node
    /// neither waits for, buffers nor decodes the up to 64 MiB declared.
    /// (Before, they were read whole, and only then refused.)
    #[test]
    fn frames_of_the_wrong_kind_are_refused_from_their_first_bytes() {
        let rt = test_runtime();
        rt.block_on(async {
            let deadline = Duration::from_secs(20);
            let (server, mut client) = connected().await;
            client
                .write_all(&frame_header(&peer_frame(), 60 << 20))
                .await
                .expect("write");
            let (r, _w) = server.into_split();
            let result = tokio::time::timeout(
                deadline,
                read_frames(
                    WireRead::Plain(r),
                    BytesMut::new(),
                    64 << 20,
                    FrameKind::Request,
                    |_| Ok(()),
                ),
            )
            .await
            .expect("waited for the rest of a frame of the wrong kind");
            let e = result.expect_err("a peer frame on a client connection");
            assert_eq!(e, "expected a client request, got a peer message");

            let request = Frame::Request(ClientRequest {
                id: 1,
                client: 1,
                seq: 1,
                op: ClientOp::Status,
            });
            let (mut server, mut client) = connected().await;
            client
                .write_all(&frame_header(&request, 1 << 20))
                .await
                .expect("write");
            let e = tokio::time::timeout(deadline, read_hello(&mut server, &mut Vec::new()))
                .await
                .expect("waited for the rest of a frame that is not a hello")
                .expect_err("a request for a hello");
            assert_eq!(e, "expected a hello, got a client request");

            let hello = Frame::Hello {
                cluster_id: 1,
                node_id: 1,
                version: codec::PEER_VERSION,
            };
            let (mut server, mut client) = connected().await;
            client
                .write_all(&frame_header(&hello, 1 << 20))
                .await
                .expect("write");
            let e = tokio::time::timeout(deadline, read_hello(&mut server, &mut Vec::new()))
                .await
                .expect("waited for the rest of an oversized hello")
                .expect_err("a 1 MiB hello");
            assert!(e.contains("above the limit of 18 bytes"), "{e}");

            // A well-formed hello still passes, with what was read after
            // it kept for the link.
            let (mut server, mut client) = connected().await;
            let mut bytes = Vec::new();
            codec::encode(&hello, &mut bytes);
            let hello_len = bytes.len();
            codec::encode(&peer_frame(), &mut bytes);
            client.write_all(&bytes).await.expect("write");
            let mut buf = Vec::new();
            let got = read_hello(&mut server, &mut buf).await.expect("hello");
            assert_eq!(got, hello);
            assert!(bytes[hello_len..].starts_with(&buf), "{buf:?}");
        });
    }

    /// A TLS connection over loopback past its handshake, as a link's
    /// wire (the dialer's side), and the accepting side, which reads
    /// nothing.
    async fn tls_pair(
        dir: &std::path::Path,
    ) -> (Arc<TlsWire>, tokio_rustls::server::TlsStream<TcpStream>) {
        let tls = test_tls(dir);
        let (server, client) = connected().await;
        let name = crate::tls::server_name("127.0.0.1:1").expect("name");
        let (dialed, accepted) = tokio::join!(
            tls.connector().connect(name, client),
            tls.acceptor().accept(server)
        );
        let (tcp, conn) = dialed.expect("dial").into_inner();
        let wire = TlsWire::new(tcp, rustls::Connection::Client(conn));
        (wire, accepted.expect("accept"))
    }

    /// Peer TLS for 127.0.0.1, its files written in `dir`.
    fn test_tls(dir: &std::path::Path) -> PeerTls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("ca key");
        let ca = p.self_signed(&key).expect("ca cert");
        let issuer = Issuer::new(p, key);
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("cert");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write");
            path
        };
        PeerTls::load(&crate::tls::PeerTlsFiles {
            cert_file: write("cert.pem", cert.pem()),
            key_file: write("key.pem", key.serialize_pem()),
            trusted_ca_file: write("ca.pem", ca.pem()),
        })
        .expect("load")
    }

    #[test]
    fn a_plain_hello_on_a_tls_peer_port_is_named() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = test_tls(dir.path());
        rt.block_on(async {
            let (server, mut client) = connected().await;
            let mut hello = Vec::new();
            codec::encode(
                &Frame::Hello {
                    cluster_id: 1,
                    node_id: 1,
                    version: codec::PEER_VERSION,
                },
                &mut hello,
            );
            client.write_all(&hello).await.expect("write");
            let deadline = tokio::time::Instant::now() + HELLO_WAIT;
            let said = std::cell::RefCell::new(String::new());
            let taken = accept_tls(server, &tls, deadline, |why| *said.borrow_mut() = why).await;
            assert!(taken.is_none(), "a plain hello was taken for TLS");
            let e = said.into_inner();
            assert!(e.starts_with("not TLS"), "{e}");
            assert!(e.contains("without peer TLS"), "{e}");
        });
    }

    /// A sender's flush whose TLS records the socket takes only a part of
    /// must hand the rest to the link's task: no later flush may come to
    /// write them.
    #[test]
    fn a_flush_that_leaves_tls_records_held_hands_them_to_the_task() {
        let rt = test_runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        rt.block_on(async {
            let (wire, _unread) = tls_pair(dir.path()).await;
            let out = Outbox::default();
            out.connect(Some(Arc::new(Wire::Tls(wire.clone()))));
            let m = keel_core::Message {
                cluster_id: 1,
                from: 1,
                to: 2,
                term: 1,
                body: keel_core::Body::Append {
                    prev_pos: 0,
                    prev_term: 0,
                    commit: 0,
                    heartbeat: 0,
                    entries: vec![keel_core::Entry {
                        term: 1,
                        position: 0,
                        timestamp: 0,
                        kind: keel_core::EntryKind::Command { client: 1, seq: 1 },
                        data: Bytes::from(vec![7u8; 1000]),
                    }],
                    to_voter: true,
                },
            };
            // Flushes of one message each until the socket is full: the
            // first flush that leaves records held, or finds them held.
            for _ in 0..1_000_000 {
                out.push_message(&m, usize::MAX, usize::MAX)
                    .expect("buffered");
                out.flush();
                if wire.pending() || lock(&out.state).task_writes {
                    break;
                }
            }
            assert!(wire.pending(), "the socket never filled");
            assert!(
                lock(&out.state).task_writes,
                "TLS records are held and the task was not asked to write them"
            );
        });
    }
}
