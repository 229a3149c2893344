//! TCP transport on tokio. Peers: one connection per peer pair — the node
//! with the lower id dials, the other accepts — used in both directions,
//! opened with a `Hello` that carries the cluster id (a connection from
//! another cluster, or an unknown node, is refused). Writes are batched:
//! everything queued for a peer goes out in one write, with TCP_NODELAY.
//! Links reconnect with backoff; messages queued while a link is down are
//! dropped (Raft retransmits). Clients: one reader and one writer per
//! connection. A frame that does not decode closes its connection with a
//! logged reason; the node keeps running.

use crate::codec::{self, ClientRequest, ClientResponse, Frame};
use keel_core::{Message, NodeId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

/// Identity and limits of this end of the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub cluster_id: u64,
    pub node_id: NodeId,
    pub max_frame: usize,
    /// Messages queued per peer before new ones are dropped.
    pub peer_queue: usize,
}

/// Called for every message received from a peer.
pub type Inbound = Arc<dyn Fn(Message) + Send + Sync>;
/// Where responses to one client connection go.
pub type ResponseSink = mpsc::UnboundedSender<ClientResponse>;
/// Called with the client requests decoded from one read of a connection
/// (one or more, in order; a pipelining client's burst arrives together
/// and is handed on in one piece), with the connection's response sink.
pub type RequestHandler = Arc<dyn Fn(Vec<ClientRequest>, &ResponseSink) + Send + Sync>;

/// Counters the runtime exposes as metrics.
#[derive(Debug, Default)]
pub struct NetStats {
    pub peer_messages_dropped: AtomicU64,
    pub bad_frames: AtomicU64,
    pub rejected_connections: AtomicU64,
}

/// The outbound side of the peer links.
pub struct Peers {
    links: HashMap<NodeId, mpsc::Sender<Message>>,
    stats: Arc<NetStats>,
}

impl Peers {
    /// Queues `m` for its destination; drops it if the link's queue is full
    /// or the peer is unknown.
    pub fn send(&self, m: Message) {
        let ok = self
            .links
            .get(&m.to)
            .is_some_and(|tx| tx.try_send(m).is_ok());
        if !ok {
            self.stats
                .peer_messages_dropped
                .fetch_add(1, Ordering::Relaxed);
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
    let listener = TcpListener::bind(listen).await?;
    let span = tracing::info_span!("node", id = cfg.node_id);
    let mut links = HashMap::new();
    let mut accept_to = HashMap::new();
    for (id, addr) in peers.iter().cloned() {
        let (tx, rx) = mpsc::channel(cfg.peer_queue);
        let (atx, arx) = mpsc::channel(2);
        links.insert(id, tx);
        let dial = cfg.node_id < id;
        if !dial {
            accept_to.insert(id, atx);
        }
        let link = Link {
            cfg: cfg.clone(),
            peer: id,
            addr,
            dial,
            inbound: inbound.clone(),
            stats: stats.clone(),
        };
        tokio::spawn(link.run(rx, arx).instrument(span.clone()));
    }
    tokio::spawn(accept_peers(listener, cfg, accept_to, stats.clone()).instrument(span));
    Ok(Peers { links, stats })
}

async fn accept_peers(
    listener: TcpListener,
    cfg: TransportConfig,
    accept_to: HashMap<NodeId, mpsc::Sender<(TcpStream, Vec<u8>)>>,
    stats: Arc<NetStats>,
) {
    loop {
        let (mut stream, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("peer listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let cfg = cfg.clone();
        let accept_to = accept_to.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let hello = tokio::time::timeout(
                Duration::from_secs(5),
                read_one(&mut stream, &mut buf, cfg.max_frame),
            )
            .await;
            let reason = match hello {
                Err(_) => "no hello within 5 s".to_string(),
                Ok(Err(e)) => e,
                Ok(Ok(Frame::Hello {
                    cluster_id,
                    node_id,
                })) => {
                    if cluster_id != cfg.cluster_id {
                        format!(
                            "hello from node {node_id} of cluster {cluster_id:#x}, this is cluster {:#x}",
                            cfg.cluster_id
                        )
                    } else if let Some(tx) = accept_to.get(&node_id) {
                        let _ = tx.send((stream, buf)).await;
                        return;
                    } else {
                        format!(
                            "hello from node {node_id}, which is not a peer that dials this node"
                        )
                    }
                }
                Ok(Ok(other)) => format!("expected a hello, got {}", frame_name(&other)),
            };
            stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
            warn!("peer connection from {remote} refused: {reason}");
        }.instrument(tracing::Span::current()));
    }
}

fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "hello",
        Frame::Peer(_) => "peer message",
        Frame::Request(_) => "client request",
        Frame::Response(_) => "client response",
    }
}

/// Reads exactly one frame, keeping any bytes after it in `buf`.
async fn read_one(stream: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> Result<Frame, String> {
    loop {
        match codec::decode(buf, max) {
            Ok(Some((f, n))) => {
                buf.drain(..n);
                return Ok(f);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame: {e}")),
        }
        let n = stream
            .read_buf(buf)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
    }
}

/// Free buffer space kept for each read of a connection.
const READ_SPARE: usize = 64 << 10;

/// How long a client connection that sent a bad frame stays open for the
/// replies to the requests it sent before it.
const REPLY_GRACE: Duration = Duration::from_secs(2);

/// Reads frames until EOF or an error (from reading, decoding, or
/// `on_frame`). `on_frame` gets each frame as `Some`, then `None` once the
/// frames of a read were handed over, before waiting for more bytes.
async fn read_frames(
    mut r: OwnedReadHalf,
    mut buf: Vec<u8>,
    max: usize,
    mut on_frame: impl FnMut(Option<Frame>) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let mut off = 0;
        let decoded = loop {
            match codec::decode(&buf[off..], max) {
                Ok(Some((f, n))) => {
                    off += n;
                    if let Err(e) = on_frame(Some(f)) {
                        break Err(e);
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("bad frame: {e}")),
            }
        };
        // Requests decoded before a bad frame still run (and are answered
        // before the connection closes, see `serve_client`).
        on_frame(None)?;
        decoded?;
        buf.drain(..off);
        // Room for a whole burst in one read: a Vec only grows when full,
        // which would leave reads of one small frame at a time.
        if buf.capacity() - buf.len() < READ_SPARE / 4 {
            buf.reserve(READ_SPARE);
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
    addr: String,
    dial: bool,
    inbound: Inbound,
    stats: Arc<NetStats>,
}

impl Link {
    async fn run(
        self,
        mut outbox: mpsc::Receiver<Message>,
        mut accepted: mpsc::Receiver<(TcpStream, Vec<u8>)>,
    ) {
        let mut backoff = Duration::from_millis(20);
        let mut replacement: Option<(TcpStream, Vec<u8>)> = None;
        loop {
            let conn = if let Some(c) = replacement.take() {
                Some(c)
            } else if self.dial {
                match TcpStream::connect(&self.addr).await {
                    Ok(s) => {
                        backoff = Duration::from_millis(20);
                        let _ = s.set_nodelay(true);
                        Some((s, Vec::new()))
                    }
                    Err(e) => {
                        debug!("link to node {} at {}: {e}", self.peer, self.addr);
                        // Drop what queued up while the link is down.
                        while outbox.try_recv().is_ok() {}
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    c = accepted.recv() => c,
                    m = outbox.recv() => {
                        if m.is_none() { return; }
                        continue; // not connected: drop
                    }
                }
            };
            let Some((stream, leftover)) = conn else {
                return;
            };
            info!("link to node {} up", self.peer);
            let (r, mut w) = stream.into_split();
            if self.dial {
                let mut hello = Vec::new();
                codec::encode(
                    &Frame::Hello {
                        cluster_id: self.cfg.cluster_id,
                        node_id: self.cfg.node_id,
                    },
                    &mut hello,
                );
                if w.write_all(&hello).await.is_err() {
                    continue;
                }
            }
            let inbound = self.inbound.clone();
            let (cfg, peer, stats) = (self.cfg.clone(), self.peer, self.stats.clone());
            let mut reader = tokio::spawn(
                async move {
                    read_frames(r, leftover, cfg.max_frame, |f| match f {
                        None => Ok(()),
                        Some(Frame::Peer(m))
                            if m.cluster_id == cfg.cluster_id
                                && m.from == peer
                                && m.to == cfg.node_id =>
                        {
                            inbound(m);
                            Ok(())
                        }
                        Some(Frame::Peer(m)) => Err(format!(
                            "message for cluster {:#x} from {} to {} on the link to node {peer}",
                            m.cluster_id, m.from, m.to
                        )),
                        Some(other) => {
                            Err(format!("unexpected {} on a peer link", frame_name(&other)))
                        }
                    })
                    .await
                    .inspect_err(|_| {
                        stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    })
                }
                .instrument(tracing::Span::current()),
            );
            let reason = loop {
                tokio::select! {
                    r = &mut reader => {
                        break match r {
                            Ok(Ok(())) => "closed by peer".to_string(),
                            Ok(Err(e)) => e,
                            Err(e) => format!("reader failed: {e}"),
                        };
                    }
                    m = outbox.recv() => {
                        let Some(m) = m else { return; };
                        if let Err(e) = write_batch(&mut w, m, &mut outbox).await {
                            reader.abort();
                            break e;
                        }
                    }
                    c = accepted.recv(), if !self.dial => {
                        // The peer reconnected: the newer connection wins.
                        reader.abort();
                        replacement = c;
                        break "replaced by a newer connection".to_string();
                    }
                }
            };
            warn!("link to node {} down: {reason}", self.peer);
            if self.dial {
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Writes `first` and everything else already queued as one batch.
async fn write_batch(
    w: &mut OwnedWriteHalf,
    first: Message,
    outbox: &mut mpsc::Receiver<Message>,
) -> Result<(), String> {
    let mut buf = Vec::with_capacity(4096);
    codec::encode(&Frame::Peer(first), &mut buf);
    while buf.len() < (1 << 20) {
        match outbox.try_recv() {
            Ok(m) => codec::encode(&Frame::Peer(m), &mut buf),
            Err(_) => break,
        }
    }
    w.write_all(&buf)
        .await
        .map_err(|e| format!("write failed: {e}"))
}

/// Serves client connections on `listen`.
pub async fn start_clients(
    listen: &str,
    node_id: NodeId,
    max_frame: usize,
    handler: RequestHandler,
    stats: Arc<NetStats>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let span = tracing::info_span!("node", id = node_id);
    let task_span = span.clone();
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
                tokio::spawn(
                    serve_client(stream, remote, max_frame, handler, stats)
                        .instrument(task_span.clone()),
                );
            }
        }
        .instrument(span),
    );
    Ok(())
}

async fn serve_client(
    stream: TcpStream,
    remote: std::net::SocketAddr,
    max_frame: usize,
    handler: RequestHandler,
    stats: Arc<NetStats>,
) {
    let (r, mut w) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<ClientResponse>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(4096);
        while let Some(first) = rx.recv().await {
            buf.clear();
            codec::encode(&Frame::Response(first), &mut buf);
            while buf.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(resp) => codec::encode(&Frame::Response(resp), &mut buf),
                    Err(_) => break,
                }
            }
            if w.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut batch = Vec::new();
    let result = read_frames(r, Vec::new(), max_frame, |f| match f {
        Some(Frame::Request(req)) => {
            batch.push(req);
            Ok(())
        }
        Some(other) => Err(format!(
            "expected a client request, got {}",
            frame_name(&other)
        )),
        None => {
            if !batch.is_empty() {
                handler(std::mem::take(&mut batch), &tx);
            }
            Ok(())
        }
    })
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
        }
    } else {
        let _ = writer.await;
    }
}
