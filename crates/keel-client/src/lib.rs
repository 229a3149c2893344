//! keel-client: the native client. Connects to any node, follows "not the
//! leader" redirects, retries a write with the same session sequence number
//! (so it is applied exactly once, whichever node finally takes it), bounds
//! every attempt and the whole call with timeouts, and says clearly when no
//! leader could be reached.

use bytes::Bytes;
use keel_core::{MembershipChange, NodeId};
use keel_net::codec::{self, ClientOp, ClientRequest, ClientResult, Frame, NodeStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Client addresses of some nodes of the cluster (any one suffices).
    pub endpoints: Vec<String>,
    /// Bound on one attempt (connect + request + response).
    pub attempt_timeout: Duration,
    /// Bound on a whole call, across redirects and retries.
    pub call_timeout: Duration,
    /// Session id; random if None. Reuse it only from one client at a time.
    pub client_id: Option<u64>,
}

impl ClientOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        ClientOptions {
            endpoints,
            attempt_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(10),
            client_id: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no leader reachable within {waited:?} (tried {tried:?}; last error: {last})")]
    NoLeader {
        waited: Duration,
        tried: Vec<String>,
        last: String,
    },
    #[error("the cluster refused the request: {0}")]
    Refused(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("no endpoints given")]
    NoEndpoints,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

pub struct Client {
    opts: ClientOptions,
    client_id: u64,
    seq: u64,
    next_id: u64,
    current: usize,
    conn: Option<Conn>,
}

fn random_id() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut z = t ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Self, ClientError> {
        if opts.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        Ok(Client {
            client_id: opts.client_id.unwrap_or_else(random_id),
            opts,
            seq: 0,
            next_id: 1,
            current: 0,
            conn: None,
        })
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }
    /// The endpoint the client currently talks to.
    pub fn endpoint(&self) -> &str {
        &self.opts.endpoints[self.current]
    }

    /// A command for the replicated service, applied exactly once.
    pub async fn write(&mut self, data: Bytes) -> Result<Bytes, ClientError> {
        self.seq += 1;
        match self.call(ClientOp::Write(data)).await? {
            ClientResult::Ok(b) => Ok(b),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// A linearizable read-only query.
    pub async fn read(&mut self, data: Bytes) -> Result<Bytes, ClientError> {
        match self.call(ClientOp::Read(data)).await? {
            ClientResult::Ok(b) => Ok(b),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// A query answered by the current endpoint from its own state, with its
    /// applied position and the commit position it knows (how far behind).
    pub async fn stale_read(&mut self, data: Bytes) -> Result<(Bytes, u64, u64), ClientError> {
        match self.call(ClientOp::StaleRead(data)).await? {
            ClientResult::StaleOk {
                data,
                applied,
                commit,
            } => Ok((data, applied, commit)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    pub async fn transfer_leader(&mut self, target: NodeId) -> Result<(), ClientError> {
        self.call(ClientOp::TransferLeader(target))
            .await
            .map(|_| ())
    }

    pub async fn change_membership(&mut self, change: MembershipChange) -> Result<(), ClientError> {
        self.call(ClientOp::ChangeMembership(change))
            .await
            .map(|_| ())
    }

    /// The status of one node (no redirects).
    pub async fn status_of(addr: &str, timeout: Duration) -> Result<NodeStatus, ClientError> {
        let mut c = Client::new(ClientOptions {
            endpoints: vec![addr.to_string()],
            attempt_timeout: timeout,
            call_timeout: timeout,
            client_id: Some(1),
        })?;
        match c.attempt(ClientOp::Status).await {
            Ok(ClientResult::Status(s)) => Ok(s),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(e) => Err(ClientError::NoLeader {
                waited: timeout,
                tried: vec![addr.to_string()],
                last: e,
            }),
        }
    }

    async fn call(&mut self, op: ClientOp) -> Result<ClientResult, ClientError> {
        let started = Instant::now();
        let mut tried = Vec::new();
        let mut last = String::from("no attempt made");
        let mut backoff = Duration::from_millis(10);
        while started.elapsed() < self.opts.call_timeout {
            let endpoint = self.endpoint().to_string();
            if !tried.contains(&endpoint) {
                tried.push(endpoint.clone());
            }
            match self.attempt(op.clone()).await {
                Ok(ClientResult::NotLeader { address, leader }) => {
                    last = format!("{endpoint} is not the leader (leader: {leader:?})");
                    self.conn = None;
                    match address {
                        Some(a) if a != endpoint => self.switch_to(&a),
                        _ => {
                            self.next_endpoint();
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
                Ok(ClientResult::Busy) => {
                    last = format!("{endpoint} is busy");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Ok(ClientResult::Error(m)) => return Err(ClientError::Refused(m)),
                Ok(r) => return Ok(r),
                Err(e) => {
                    last = format!("{endpoint}: {e}");
                    self.conn = None;
                    self.next_endpoint();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
        Err(ClientError::NoLeader {
            waited: started.elapsed(),
            tried,
            last,
        })
    }

    fn next_endpoint(&mut self) {
        self.current = (self.current + 1) % self.opts.endpoints.len();
    }

    fn switch_to(&mut self, addr: &str) {
        match self.opts.endpoints.iter().position(|e| e == addr) {
            Some(i) => self.current = i,
            None => {
                self.opts.endpoints.push(addr.to_string());
                self.current = self.opts.endpoints.len() - 1;
            }
        }
    }

    /// One request to the current endpoint, bounded by the attempt timeout.
    async fn attempt(&mut self, op: ClientOp) -> Result<ClientResult, String> {
        let timeout = self.opts.attempt_timeout;
        match tokio::time::timeout(timeout, self.attempt_inner(op)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn attempt_inner(&mut self, op: ClientOp) -> Result<ClientResult, String> {
        if self.conn.is_none() {
            let addr = self.endpoint().to_string();
            let stream = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            self.conn = Some(Conn {
                stream,
                buf: Vec::new(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let req = ClientRequest {
            id,
            client: self.client_id,
            seq: self.seq,
            op,
        };
        let mut out = Vec::new();
        codec::encode(&Frame::Request(req), &mut out);
        let conn = self.conn.as_mut().ok_or("not connected")?;
        if let Err(e) = conn.stream.write_all(&out).await {
            self.conn = None;
            return Err(format!("send: {e}"));
        }
        loop {
            match codec::decode(&conn.buf, codec::DEFAULT_MAX_FRAME) {
                Ok(Some((frame, n))) => {
                    conn.buf.drain(..n);
                    match frame {
                        Frame::Response(r) if r.id == id => return Ok(r.result),
                        Frame::Response(_) => continue, // an answer to an abandoned attempt
                        other => {
                            self.conn = None;
                            return Err(format!("expected a response, got {other:?}"));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    self.conn = None;
                    return Err(format!("bad frame from server: {e}"));
                }
            }
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) => {
                    self.conn = None;
                    return Err("connection closed".into());
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Err(format!("receive: {e}"));
                }
            }
        }
    }
}
