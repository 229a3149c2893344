//! keel-client: the native client. Connects to any node, follows "not the
//! leader" redirects, retries a write with the same session sequence number
//! (so it is applied exactly once, whichever node finally takes it), bounds
//! every attempt and the whole call with timeouts, and says clearly when no
//! leader could be reached.
//!
//! Sequence numbers: the cluster keeps each session's last number and its
//! reply; a write numbered like the last one gets that reply again (a
//! retry), a lower one is refused as stale, only a higher one is applied.
//! Each write therefore takes the larger of the previous number plus one
//! and the wall clock in microseconds, so a new `Client` reusing a session
//! id (a restarted process) numbers its writes above its predecessor's
//! instead of starting over and having them taken for retries.

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
    /// Bound on one attempt (connect + request + response), cut to what
    /// is left of `call_timeout`.
    pub attempt_timeout: Duration,
    /// Bound on a whole call, across redirects and retries.
    pub call_timeout: Duration,
    /// Session id; random if None. Reuse it only from one client at a time.
    /// A later `Client` may take over the id (a restarted process): its
    /// writes are numbered from the wall clock in microseconds, above every
    /// number its predecessor used, provided the system clock has not been
    /// set back past the predecessor's last write (its writes would then be
    /// refused as older than the session's last, or one numbered exactly
    /// like that write answered with its reply without being applied).
    pub client_id: Option<u64>,
    /// TLS to nodes whose client port has it (`client_tls_cert_file`):
    /// the CA that signs their certificates, which must name the host of
    /// the endpoint, and this client's certificate if they ask for one.
    /// `None`: plain TCP.
    pub tls: Option<keel_net::tls::ClientTls>,
}

impl ClientOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        ClientOptions {
            endpoints,
            attempt_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(10),
            client_id: None,
            tls: None,
        }
    }
}

/// A connection to a node's client port: plain TCP, or TLS over it.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No leader answered within the call timeout. For a write: every
    /// attempt failed before it could reach a node or was answered "busy",
    /// so it was not applied (otherwise the error is `Uncertain`).
    #[error("no leader reachable within {waited:?} (tried {tried:?}; last error: {last})")]
    NoLeader {
        waited: Duration,
        tried: Vec<String>,
        last: String,
    },
    #[error("the cluster refused the request: {0}")]
    Refused(String),
    /// Whether a write took effect is unknown: an earlier attempt reached a
    /// node and got no answer, "not the leader" or "no outcome" (the node
    /// could not learn it; that attempt may have been applied), and then a
    /// retry was refused (a refusal such as the space quota's comes before
    /// the duplicate check) or the call ran out of time. (After "no
    /// outcome" the write is sent again in its session, as after a lost
    /// answer, until the call's time runs out.) Read to find out.
    #[error("outcome unknown: the write may or may not have been applied: {0}")]
    Uncertain(String),
    #[error("unexpected answer: {0}")]
    Protocol(String),
    #[error("no endpoints given")]
    NoEndpoints,
    /// An endpoint is not `host:port`.
    #[error("endpoint {0:?} is not host:port (e.g. 127.0.0.1:7101)")]
    BadEndpoint(String),
    /// Every endpoint answered in another protocol than Keel's: an etcd API
    /// (gRPC) or HTTP port, most likely. Nothing was applied.
    #[error(
        "{} {protocol} (an etcd API or HTTP port?), not Keel's client protocol: give a \
         node's client_addr{}",
        answer(.endpoints),
        if *protocol == "TLS" {
            " (a client port with client_tls_cert_file takes TLS: give the CA, `--cacert`)"
        } else {
            ""
        }
    )]
    NotKeel {
        endpoints: Vec<String>,
        /// "HTTP/gRPC" or "TLS".
        protocol: &'static str,
    },
    /// Every endpoint behaves as a Keel node's peer port (its `peer_addr`)
    /// does: it keeps a silent connection open, waiting for a hello, and
    /// closes one at once when a client request begins. A mistake for the
    /// node's `client_addr`; nothing was applied.
    #[error(
        "{}: this is a peer port, use the node's client_addr (a Keel node's peer port \
         closes client connections at once)",
        .endpoints.join(", ")
    )]
    PeerPort { endpoints: Vec<String> },
    /// One node (`Client::status_of`) did not answer.
    #[error("{endpoint}: {why}")]
    Unreachable { endpoint: String, why: String },
    /// Every endpoint's TLS handshake failed on a certificate: the node
    /// refused this client's (none, or another CA's), or this client does
    /// not trust the node's (`ClientOptions::tls`). Nothing was applied (a
    /// write that an earlier attempt may have applied is `Uncertain`).
    #[error("TLS refused by {}: {why}", .endpoints.join(", "))]
    Tls { endpoints: Vec<String>, why: String },
    #[error(
        "client id 0 is reserved for writes without a session (not deduplicated): choose another"
    )]
    ReservedClientId,
}

/// "A answers" or "A, B answer".
fn answer(endpoints: &[String]) -> String {
    match endpoints {
        [one] => format!("{one} answers"),
        many => format!("{} answer", many.join(", ")),
    }
}

/// Why an attempt failed, and whether its request may have reached the
/// node (after that, a write may have been applied).
struct AttemptError {
    why: String,
    sent: bool,
    /// TLS failed on a certificate (either side's): nothing reached the
    /// node, and trying it again will not help.
    tls: bool,
    /// The endpoint answered in this other protocol ("HTTP/gRPC", "TLS",
    /// `PEER_PORT`): not a Keel node's client port, so nothing was applied
    /// there.
    foreign: Option<&'static str>,
}

/// The "protocol" of a Keel node's peer port given as a client endpoint
/// (see `peer_port`).
const PEER_PORT: &str = "Keel's peer protocol";

/// The "protocol" of a server that answered a TLS handshake with
/// something else than TLS.
const NOT_TLS: &str = "something other than TLS";

/// The protocol a server that is not a Keel node answered in, if the
/// start of its answer `buf` (to a Keel frame) is recognisably another
/// one: an HTTP/1 response ("HTTP/1.1 400 ..."), or the HTTP/2 client or
/// server preface (a SETTINGS frame on stream 0: a gRPC port such as
/// etcd's). Neither can begin a Keel frame: read as a frame's length,
/// "HTTP", "PRI " and a SETTINGS frame's first four bytes declare at least
/// the 64 MiB limit, and a SETTINGS frame's fifth byte (its flags, 0 or 1)
/// is not a Keel version. With `closed` (the server closed the connection
/// after `buf`), also a lone TLS alert (a TLS port's answer to bytes that
/// are not a TLS handshake), which is a whole TLS record but would be the
/// start of an unfinished Keel frame.
fn foreign_protocol(buf: &[u8], closed: bool) -> Option<&'static str> {
    const HTTP2_SETTINGS: u8 = 4;
    const TLS_ALERT: u8 = 21;
    if buf.starts_with(b"HTTP") || buf.starts_with(b"PRI ") {
        return Some("HTTP/gRPC");
    }
    if buf.len() >= 5 && buf[0] == 0 && buf[3] == HTTP2_SETTINGS && buf[4] <= 1 {
        return Some("HTTP/gRPC");
    }
    if closed && buf.len() == 7 && buf[0] == TLS_ALERT && buf[1] == 3 && buf[3..5] == [0, 2] {
        return Some("TLS");
    }
    None
}

/// Is `e` host:port? Only its form is checked (a name is resolved when
/// the client connects).
pub fn check_endpoint(e: &str) -> Result<(), ClientError> {
    if keel_net::is_host_port(e, false) {
        Ok(())
    } else {
        Err(ClientError::BadEndpoint(e.to_string()))
    }
}

/// Is `op` applied through the log (a write, a membership change)? Once
/// an attempt of it reached a node unanswered, it may have been applied.
fn goes_through_the_log(op: &ClientOp) -> bool {
    matches!(op, ClientOp::Write(_) | ClientOp::ChangeMembership(_))
}

/// May a node that answered `op` "not the leader" have taken it? A write,
/// yes: a leader that appended it and then lost its leadership answers
/// its waiting writes so, and the entry may still commit. A membership
/// change, no: a node answers one at once, in the same step of its core,
/// "ok" once the core appended it and otherwise with the core's refusal,
/// "not the leader" among them; it never waits for its entry. So after
/// "not the leader" the next node's refusal of the change is a refusal
/// (unless an earlier attempt went unanswered).
fn not_leader_may_have_taken(op: &ClientOp) -> bool {
    matches!(op, ClientOp::Write(_))
}

/// Is `op` applied at most once however often it is sent? A write, in this
/// client's session (the cluster keeps each session's last sequence number
/// and reply); a membership change, no.
fn applied_at_most_once(op: &ClientOp) -> bool {
    matches!(op, ClientOp::Write(_))
}

/// The wall clock in microseconds since the Unix epoch (0 before it).
fn wall_clock_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The sequence number of the write after one numbered `prev`: above it,
/// and at least the wall clock in microseconds, so that numbers only go up
/// across clients sharing a session id one after another. (A write takes a
/// round trip, far more than a microsecond, so a client's numbers stay
/// with the clock and a successor starts above them.)
fn next_seq(prev: u64) -> u64 {
    prev.saturating_add(1).max(wall_clock_us())
}

/// `d` to the millisecond, for messages.
fn to_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long an attempt on an endpoint that has not answered in Keel's
/// protocol yet waits for an answer before `probe` looks at what it is.
const PROBE_AFTER: Duration = Duration::from_millis(300);

/// What answers at `addr`, when an attempt there gets no answer: an HTTP/1
/// server (a node's `http_addr`, which serves /status and /metrics) waits
/// for the end of a request's head, which a Keel frame never gives it, and
/// so never answers the attempt. The probe sends a status request (which
/// a Keel node answers, changing nothing) and closes its sending side: an
/// HTTP/1 server then answers what it got, as HTTP. Returns the protocol
/// if the answer is recognisably another one than Keel's.
async fn probe(addr: &str, client: u64) -> Option<&'static str> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&status_request(client)).await.ok()?;
    s.shutdown().await.ok()?;
    let mut buf = Vec::new();
    loop {
        let closed = !matches!(s.read_buf(&mut buf).await, Ok(n) if n > 0);
        if let Some(p) = foreign_protocol(&buf, closed) {
            return Some(p);
        }
        if closed
            || buf.len() >= 64
            || !matches!(codec::decode(&buf, codec::DEFAULT_MAX_FRAME), Ok(None))
        {
            // A Keel frame (or the start of one), or nothing recognisable.
            return None;
        }
    }
}

/// A status request (which a Keel node answers, changing nothing), encoded.
fn status_request(client: u64) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode(
        &Frame::Request(ClientRequest {
            id: 0,
            client,
            seq: 0,
            op: ClientOp::Status,
        }),
        &mut out,
    );
    out
}

/// How long `peer_port` waits for a silent connection to be closed.
const PEER_SILENCE: Duration = Duration::from_millis(100);

/// Is `addr` a Keel node's peer port, given as a client endpoint by
/// mistake? An attempt there sees the connection closed without an answer,
/// which a node's client port never does to a good request but a node
/// restarting, or a proxy to one, may: so this looks at what only a peer
/// port does. It waits for a hello (up to 5 s), so a silent connection
/// stays open, where something that closes every connection closes it;
/// and it refuses a frame that is not a hello from its first six bytes
/// (its tag), closing the connection at once, where a client port waits
/// for the rest of a request begun that way. (The half request sent is
/// dropped unseen by a client port, and a peer port only logs the refusal;
/// nothing is sent that a peer port would take for a hello.)
async fn peer_port(addr: &str, client: u64) -> bool {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return false;
    };
    let mut byte = [0u8; 1];
    if tokio::time::timeout(PEER_SILENCE, s.read(&mut byte))
        .await
        .is_ok()
    {
        return false; // closed, or said something, unasked
    }
    let request = status_request(client);
    // The length prefix, version and tag.
    if s.write_all(&request[..6]).await.is_err() {
        return false;
    }
    matches!(
        tokio::time::timeout(PEER_SILENCE * 5, s.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

struct Conn {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
}

pub struct Client {
    opts: ClientOptions,
    client_id: u64,
    seq: u64,
    next_id: u64,
    current: usize,
    conn: Option<Conn>,
    /// Endpoints that have answered in Keel's protocol: not probed for
    /// another one (see `probe`).
    keel: Vec<String>,
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
        for e in &opts.endpoints {
            check_endpoint(e)?;
            if opts.tls.is_some() && keel_net::tls::server_name(e).is_err() {
                return Err(ClientError::BadEndpoint(e.clone()));
            }
        }
        if opts.client_id == Some(keel_core::SESSIONLESS) {
            // Id 0 is the cluster's "no session": writes under it would not
            // be deduplicated, so a retried one could be applied twice.
            return Err(ClientError::ReservedClientId);
        }
        Ok(Client {
            client_id: opts.client_id.unwrap_or_else(random_id),
            opts,
            seq: 0,
            next_id: 1,
            current: 0,
            conn: None,
            keel: Vec::new(),
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
    /// Every retry of it carries the same sequence number.
    pub async fn write(&mut self, data: Bytes) -> Result<Bytes, ClientError> {
        self.seq = next_seq(self.seq);
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
        Self::status_with(addr, timeout, None).await
    }

    /// `status_of`, over TLS with `tls`.
    pub async fn status_with(
        addr: &str,
        timeout: Duration,
        tls: Option<&keel_net::tls::ClientTls>,
    ) -> Result<NodeStatus, ClientError> {
        match Self::ask_one(addr, ClientOp::Status, timeout, tls).await? {
            ClientResult::Status(s) => Ok(s),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The configuration in force on one node (no redirects), with the ids
    /// removed from the cluster. A node of a version before this request
    /// closes the connection (`ClientError::Unreachable`).
    pub async fn membership_of(
        addr: &str,
        timeout: Duration,
    ) -> Result<keel_core::Membership, ClientError> {
        Self::membership_with(addr, timeout, None).await
    }

    /// `membership_of`, over TLS with `tls`.
    pub async fn membership_with(
        addr: &str,
        timeout: Duration,
        tls: Option<&keel_net::tls::ClientTls>,
    ) -> Result<keel_core::Membership, ClientError> {
        match Self::ask_one(addr, ClientOp::Membership, timeout, tls).await? {
            ClientResult::Membership(m) => Ok(m),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// One attempt of `op` at one node, its errors named for that node.
    async fn ask_one(
        addr: &str,
        op: ClientOp,
        timeout: Duration,
        tls: Option<&keel_net::tls::ClientTls>,
    ) -> Result<ClientResult, ClientError> {
        let mut c = Client::new(ClientOptions {
            endpoints: vec![addr.to_string()],
            attempt_timeout: timeout,
            call_timeout: timeout,
            client_id: Some(1),
            tls: tls.cloned(),
        })?;
        match c.attempt(op, timeout).await {
            Ok(result) => Ok(result),
            Err(AttemptError {
                foreign: Some(PEER_PORT),
                ..
            }) => Err(ClientError::PeerPort {
                endpoints: vec![addr.to_string()],
            }),
            Err(AttemptError {
                foreign: Some(protocol),
                ..
            }) => Err(ClientError::NotKeel {
                endpoints: vec![addr.to_string()],
                protocol,
            }),
            Err(e) => Err(ClientError::Unreachable {
                endpoint: addr.to_string(),
                why: e.why,
            }),
        }
    }

    async fn call(&mut self, op: ClientOp) -> Result<ClientResult, ClientError> {
        let started = Instant::now();
        let mut tried = Vec::new();
        let mut last = String::from("no attempt made");
        let mut backoff = Duration::from_millis(10);
        // Did an attempt of this write reach a node without an answer?
        let mut maybe_applied = false;
        // Endpoints that answered in another protocol (not Keel nodes'
        // client ports), those of them that are peer ports, and the last
        // other protocol.
        let mut foreign: Vec<String> = Vec::new();
        let mut peer_ports: Vec<String> = Vec::new();
        let mut other_protocol = None;
        // Endpoints whose TLS failed on a certificate.
        let mut tls_refused: Vec<String> = Vec::new();
        // Every attempt and pause is cut to the time left, so the call
        // ends within its timeout.
        let deadline = started + self.opts.call_timeout;
        let pause = |backoff: &mut Duration| {
            let d = (*backoff).min(deadline.saturating_duration_since(Instant::now()));
            *backoff = (*backoff * 2).min(Duration::from_millis(500));
            tokio::time::sleep(d)
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let endpoint = self.endpoint().to_string();
            if !tried.contains(&endpoint) {
                tried.push(endpoint.clone());
            }
            let timeout = self.opts.attempt_timeout.min(left);
            match self.attempt(op.clone(), timeout).await {
                Ok(ClientResult::NotLeader { address, leader }) => {
                    // A node that took the write and then lost leadership
                    // answers this too: its entry may still commit.
                    maybe_applied |= not_leader_may_have_taken(&op);
                    last = format!("{endpoint} is not the leader (leader: {leader:?})");
                    self.conn = None;
                    match address {
                        Some(a) if a != endpoint => self.switch_to(&a),
                        _ => {
                            self.next_endpoint();
                            pause(&mut backoff).await;
                        }
                    }
                }
                Ok(ClientResult::Busy) => {
                    last = format!("{endpoint} is busy");
                    pause(&mut backoff).await;
                }
                Ok(ClientResult::Error(m))
                    if m.starts_with(codec::OUTCOME_UNKNOWN) && applied_at_most_once(&op) =>
                {
                    // The node could not learn the write's outcome (its
                    // leader was lost, or it was removed from the cluster).
                    // In this client's session it is applied at most once,
                    // so it is sent again, with its sequence number, to
                    // learn the outcome: its reply if it was applied,
                    // applied now if it was not.
                    maybe_applied = true;
                    last = format!("{endpoint}: {m}");
                    self.conn = None;
                    self.next_endpoint();
                    pause(&mut backoff).await;
                }
                Ok(ClientResult::Error(m))
                    if maybe_applied || m.starts_with(codec::OUTCOME_UNKNOWN) =>
                {
                    return Err(ClientError::Uncertain(m))
                }
                Ok(ClientResult::Error(m)) => return Err(ClientError::Refused(m)),
                Ok(r) => return Ok(r),
                Err(e) => {
                    if e.tls {
                        if !tls_refused.contains(&endpoint) {
                            tls_refused.push(endpoint.clone());
                        }
                        // Trying again will not change a certificate.
                        if self.opts.endpoints.iter().all(|e| tls_refused.contains(e)) {
                            if maybe_applied {
                                // (An earlier attempt reached a node.)
                                return Err(ClientError::Uncertain(format!(
                                    "an attempt reached a node, then every endpoint refused \
                                     TLS (last: {endpoint}: {})",
                                    e.why
                                )));
                            }
                            return Err(ClientError::Tls {
                                endpoints: tls_refused,
                                why: e.why,
                            });
                        }
                    }
                    if let Some(protocol) = e.foreign {
                        if !foreign.contains(&endpoint) {
                            foreign.push(endpoint.clone());
                        }
                        if protocol == PEER_PORT {
                            if !peer_ports.contains(&endpoint) {
                                peer_ports.push(endpoint.clone());
                            }
                        } else {
                            other_protocol = Some(protocol);
                        }
                        // Retrying will not make them Keel nodes' client
                        // ports.
                        if self.opts.endpoints.iter().all(|e| foreign.contains(e)) {
                            return Err(match other_protocol {
                                None => ClientError::PeerPort {
                                    endpoints: peer_ports,
                                },
                                Some(protocol) => ClientError::NotKeel {
                                    endpoints: foreign,
                                    protocol,
                                },
                            });
                        }
                    }
                    maybe_applied |= e.sent && e.foreign.is_none() && goes_through_the_log(&op);
                    last = format!("{endpoint}: {}", e.why);
                    self.conn = None;
                    self.next_endpoint();
                    pause(&mut backoff).await;
                }
            }
        }
        let waited = to_ms(started.elapsed());
        if maybe_applied {
            // Out of time, but an attempt reached a node: the write may
            // have been applied, and "no leader" would say it was not.
            return Err(ClientError::Uncertain(format!(
                "no answer within {waited:?} after an attempt reached a node \
                 (tried {tried:?}; last error: {last})"
            )));
        }
        Err(ClientError::NoLeader {
            waited,
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

    /// One request to the current endpoint, bounded by `timeout`. An
    /// endpoint that has not answered in Keel's protocol yet and is silent
    /// for `PROBE_AFTER` is probed for an HTTP/1 server meanwhile; one that
    /// closed a new connection without answering, for a peer port.
    async fn attempt(
        &mut self,
        op: ClientOp,
        timeout: Duration,
    ) -> Result<ClientResult, AttemptError> {
        let started = Instant::now();
        let mut sent = false;
        let mut foreign = None;
        let mut closed_unanswered = false;
        let mut tls = false;
        let endpoint = self.endpoint().to_string();
        // (The probes speak plain TCP: over TLS, what answers is known by
        // its handshake.)
        let probe = !self.keel.contains(&endpoint) && self.opts.tls.is_none();
        let client_id = self.client_id;
        let outcome = {
            let inner = tokio::time::timeout(
                timeout,
                self.attempt_inner(
                    op,
                    &mut sent,
                    &mut foreign,
                    &mut closed_unanswered,
                    &mut tls,
                ),
            );
            let probe = async {
                if !probe {
                    return None;
                }
                tokio::time::sleep(PROBE_AFTER).await;
                self::probe(&endpoint, client_id).await
            };
            tokio::select! {
                r = inner => Ok(r),
                Some(protocol) = probe => Err(protocol),
            }
        };
        match outcome {
            Ok(Ok(Ok(r))) => {
                if probe {
                    self.keel.push(endpoint);
                }
                Ok(r)
            }
            Ok(Ok(Err(why))) => {
                if probe && closed_unanswered && foreign.is_none() {
                    let left = timeout.saturating_sub(started.elapsed());
                    let peer = tokio::time::timeout(left, peer_port(&endpoint, client_id));
                    if peer.await == Ok(true) {
                        return Err(AttemptError {
                            why: "a peer port, not a client port".into(),
                            sent,
                            tls,
                            foreign: Some(PEER_PORT),
                        });
                    }
                }
                Err(AttemptError {
                    why,
                    sent,
                    tls,
                    foreign,
                })
            }
            Ok(Err(_)) => {
                // The connection may hold half a request or a late answer.
                self.conn = None;
                Err(AttemptError {
                    why: format!("no answer within {:?}", to_ms(timeout)),
                    sent,
                    tls,
                    foreign,
                })
            }
            Err(protocol) => {
                self.conn = None;
                Err(AttemptError {
                    why: format!("answers {protocol}, not Keel's client protocol"),
                    sent,
                    tls,
                    foreign: Some(protocol),
                })
            }
        }
    }

    /// Sets `sent` once the request may have reached the node, `foreign`
    /// if the server answered in another protocol, `closed_unanswered`
    /// if it closed a connection opened for this attempt without sending
    /// a byte (as a peer port does), and `tls` if TLS failed on a
    /// certificate (`sent` is then false: with TLS 1.3 the request goes out
    /// with the end of the client's handshake, and a node that refuses the
    /// client's certificate never reads it).
    async fn attempt_inner(
        &mut self,
        op: ClientOp,
        sent: &mut bool,
        foreign: &mut Option<&'static str>,
        closed_unanswered: &mut bool,
        tls: &mut bool,
    ) -> Result<ClientResult, String> {
        let fresh = self.conn.is_none();
        if fresh {
            let addr = self.endpoint().to_string();
            let tcp = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let stream: Box<dyn Stream> = match &self.opts.tls {
                None => Box::new(tcp),
                Some(config) => Box::new(config.connect(&addr, tcp).await.map_err(|e| {
                    *tls = keel_net::tls::certificate_refused(&e);
                    if keel_net::tls::not_tls(&e) {
                        *foreign = Some(NOT_TLS);
                    }
                    // A node without client TLS reads the handshake as a
                    // bad request and closes the connection.
                    let hint = match e.kind() {
                        std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe => {
                            " (closed by the node: is its client port without TLS?)"
                        }
                        _ => "",
                    };
                    format!("TLS handshake: {e}{hint}")
                })?),
            };
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
        *sent = true;
        // (Through TLS, the record must go out now.)
        let written = match conn.stream.write_all(&out).await {
            Ok(()) => conn.stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            self.conn = None;
            return Err(format!("send: {e}"));
        }
        // The server answered in another protocol: say so, not "bad frame".
        let not_keel = |buf: &[u8], closed: bool, foreign: &mut Option<&'static str>| {
            *foreign = foreign_protocol(buf, closed);
            foreign.map(|p| format!("answers {p}, not Keel's client protocol"))
        };
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
                Ok(None) => {
                    if let Some(why) = not_keel(&conn.buf, false, foreign) {
                        self.conn = None;
                        return Err(why);
                    }
                }
                Err(e) => {
                    // (No Keel frame starts so, so as if closed: a lone TLS
                    // alert is one, whose version byte may be refused
                    // before the server closes.)
                    let why = not_keel(&conn.buf, true, foreign)
                        .unwrap_or_else(|| format!("bad frame from server: {e}"));
                    self.conn = None;
                    return Err(why);
                }
            }
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) => {
                    *closed_unanswered = fresh && conn.buf.is_empty();
                    let why = not_keel(&conn.buf, true, foreign)
                        .unwrap_or_else(|| "connection closed".into());
                    self.conn = None;
                    return Err(why);
                }
                Ok(_) => {}
                Err(e) => {
                    *closed_unanswered = fresh && conn.buf.is_empty();
                    // (A node refusing this client's certificate: with TLS
                    // 1.3 the request went out with the end of the
                    // handshake, which the node ended there, unread.)
                    if *closed_unanswered && keel_net::tls::certificate_refused(&e) {
                        (*sent, *tls) = (false, true);
                    }
                    let why = not_keel(&conn.buf, true, foreign)
                        .unwrap_or_else(|| format!("receive: {e}"));
                    self.conn = None;
                    return Err(why);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Reads one request frame from `s`; `None` if the client closed it.
    async fn request(s: &mut TcpStream) -> Option<ClientRequest> {
        let mut buf = Vec::new();
        loop {
            if let Some((Frame::Request(r), _)) =
                codec::decode(&buf, codec::DEFAULT_MAX_FRAME).expect("a frame")
            {
                return Some(r);
            }
            if s.read_buf(&mut buf).await.expect("read") == 0 {
                return None;
            }
        }
    }

    async fn answer(s: &mut TcpStream, id: u64, result: ClientResult) {
        let mut out = Vec::new();
        codec::encode(
            &Frame::Response(codec::ClientResponse { id, result }),
            &mut out,
        );
        s.write_all(&out).await.expect("write");
    }

    /// A node that answers the requests it gets in turn from `script`
    /// (`None`: drop the connection unanswered), on whatever connection
    /// the client opens. Returns their sequence numbers.
    async fn fake_node(
        script: Vec<Option<ClientResult>>,
    ) -> (String, tokio::task::JoinHandle<Vec<u64>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            let mut seqs = Vec::new();
            let mut conn = None;
            for step in script {
                let r = loop {
                    let s = match &mut conn {
                        Some(s) => s,
                        None => conn.insert(l.accept().await.expect("accept").0),
                    };
                    match request(s).await {
                        Some(r) => break r,
                        None => conn = None,
                    }
                };
                seqs.push(r.seq);
                match (step, &mut conn) {
                    (Some(result), Some(s)) => answer(s, r.id, result).await,
                    _ => conn = None,
                }
            }
            seqs
        });
        (addr, task)
    }

    /// `e` is the scripted node's plain refusal.
    fn assert_no_room(e: &ClientError) {
        assert!(
            matches!(e, ClientError::Refused(m) if m == "no room"),
            "{e}"
        );
    }

    fn refused() -> Option<ClientResult> {
        Some(ClientResult::Error("no room".into()))
    }

    fn client(addr: String) -> Client {
        Client::new(ClientOptions {
            endpoints: vec![addr],
            attempt_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            client_id: Some(7),
            tls: None,
        })
        .expect("client")
    }

    /// A write whose first attempt reached the node and got no answer may
    /// have been applied: its refused retry (same sequence number) is an
    /// unknown outcome, not a refusal.
    #[tokio::test]
    async fn a_refused_retry_of_a_write_that_may_have_landed_is_uncertain() {
        let (addr, server) = fake_node(vec![None, refused()]).await;
        let mut c = client(addr);
        let e = c.write(Bytes::from_static(b"w")).await.unwrap_err();
        assert!(
            matches!(&e, ClientError::Uncertain(m) if m == "no room"),
            "{e}"
        );
        let seqs = server.await.expect("node");
        assert_eq!(seqs.len(), 2);
        assert_eq!(seqs[0], seqs[1], "the retry keeps its seq");
    }

    /// A write whose first attempt reached the node and got no answer,
    /// after which no node answers until the call runs out of time, may
    /// have been applied: that is an unknown outcome, not "no leader"
    /// (which says nothing was applied, so a caller would write again).
    /// A read in the same plight is "no leader" (it changes nothing), and
    /// so is a write that never reached a node.
    #[tokio::test]
    async fn a_write_that_may_have_landed_then_runs_out_of_time_is_uncertain() {
        let opts = |addr: String| ClientOptions {
            endpoints: vec![addr],
            attempt_timeout: Duration::from_millis(300),
            call_timeout: Duration::from_secs(1),
            client_id: Some(7),
            tls: None,
        };
        // The node takes the request, drops the connection unanswered and
        // stops listening.
        let (addr, server) = fake_node(vec![None]).await;
        let mut c = Client::new(opts(addr)).expect("client");
        let e = c.write(Bytes::from_static(b"w")).await.unwrap_err();
        server.await.expect("node");
        assert!(
            matches!(&e, ClientError::Uncertain(m) if m.contains("reached a node")),
            "{e}"
        );

        let (addr, server) = fake_node(vec![None]).await;
        let mut c = Client::new(opts(addr)).expect("client");
        let e = c.read(Bytes::from_static(b"r")).await.unwrap_err();
        server.await.expect("node");
        assert!(matches!(&e, ClientError::NoLeader { .. }), "{e}");

        // Nothing listens there: no attempt is ever sent.
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let mut c = Client::new(opts(addr)).expect("client");
        let e = c.write(Bytes::from_static(b"w")).await.unwrap_err();
        assert!(matches!(&e, ClientError::NoLeader { .. }), "{e}");
    }

    #[test]
    fn the_sessionless_id_is_refused() {
        let mut opts = ClientOptions::new(vec!["127.0.0.1:1".into()]);
        opts.client_id = Some(0);
        assert!(matches!(
            Client::new(opts),
            Err(ClientError::ReservedClientId)
        ));
    }

    /// A new client that reuses a session id (a restarted process) numbers
    /// its writes above every number its predecessor used: the session
    /// would answer an equal number with the predecessor's reply and
    /// refuse a lower one, so a write numbered afresh from 1 would be
    /// acknowledged without being applied.
    #[tokio::test]
    async fn a_client_reusing_a_session_id_numbers_its_writes_above_its_predecessors() {
        let ok = || Some(ClientResult::Ok(Bytes::new()));
        let (addr, server) = fake_node(vec![ok(), ok(), ok(), ok(), ok()]).await;
        let mut first = client(addr.clone());
        for _ in 0..3 {
            first.write(Bytes::from_static(b"w")).await.expect("write");
        }
        drop(first);
        let mut second = client(addr);
        assert_eq!(second.client_id(), 7);
        for _ in 0..2 {
            second.write(Bytes::from_static(b"w")).await.expect("write");
        }
        let seqs = server.await.expect("node");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "sequence numbers must only go up across clients of one session: {seqs:?}"
        );
    }

    /// A refusal of a write's only attempt is a refusal, and a read retried
    /// after a lost answer is refused plainly (it changes nothing).
    #[tokio::test]
    async fn a_refused_first_attempt_is_a_refusal() {
        let (addr, server) = fake_node(vec![Some(ClientResult::Busy), refused()]).await;
        let mut c = client(addr);
        let e = c.write(Bytes::from_static(b"w")).await.unwrap_err();
        assert_no_room(&e);
        server.await.expect("node");

        let (addr, server) = fake_node(vec![None, refused()]).await;
        let mut c = client(addr);
        let e = c.read(Bytes::from_static(b"r")).await.unwrap_err();
        assert_no_room(&e);
        server.await.expect("node");
    }

    /// "Not the leader" from a node that took the write is no proof that
    /// it was dropped, and a node's own "no outcome" answer is no refusal:
    /// both end as an unknown outcome.
    #[tokio::test]
    async fn not_the_leader_then_refused_and_no_outcome_are_uncertain() {
        let not_leader = Some(ClientResult::NotLeader {
            leader: None,
            address: None,
        });
        let (addr, server) = fake_node(vec![not_leader, refused()]).await;
        let e = client(addr)
            .write(Bytes::from_static(b"w"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Uncertain(m) if m == "no room"),
            "{e}"
        );
        server.await.expect("node");

        // A node's "no outcome" answer and then nothing until the call
        // runs out of time.
        let (addr, server) = fake_node(vec![Some(ClientResult::Error(no_outcome()))]).await;
        let mut c = client(addr);
        c.opts.call_timeout = Duration::from_millis(500);
        let e = c.write(Bytes::from_static(b"w")).await.unwrap_err();
        assert!(matches!(&e, ClientError::Uncertain(_)), "{e}");
        server.await.expect("node");
    }

    fn no_outcome() -> String {
        format!(
            "{} within 30s: it may or may not have been applied",
            codec::OUTCOME_UNKNOWN
        )
    }

    /// A write a node answers "no outcome" for (its leader lost, or the
    /// node removed) is sent again with its sequence number, which the
    /// session applies at most once: the client learns the outcome (here
    /// the retry's reply) instead of passing the uncertainty on.
    #[tokio::test]
    async fn a_write_with_no_outcome_is_sent_again_in_its_session() {
        let (addr, server) = fake_node(vec![
            Some(ClientResult::Error(no_outcome())),
            Some(ClientResult::Ok(Bytes::from_static(b"done"))),
        ])
        .await;
        let reply = client(addr)
            .write(Bytes::from_static(b"w"))
            .await
            .expect("the retry's reply");
        assert_eq!(reply, Bytes::from_static(b"done"));
        let seqs = server.await.expect("node");
        assert_eq!(seqs.len(), 2);
        assert_eq!(seqs[0], seqs[1], "the retry keeps its seq");
    }

    /// A server that answers whatever it is sent with `answer` and closes
    /// the connection; returns its address.
    async fn foreign_server(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    /// An HTTP, gRPC (HTTP/2) or TLS port given as an endpoint (etcd's
    /// 2379, say) is named for what it is, at once, not retried as a
    /// "bad frame" until the call times out; with a Keel node among the
    /// endpoints, the client uses that one.
    #[tokio::test]
    async fn an_endpoint_answering_http_grpc_or_tls_is_named_at_once() {
        const HTTP1: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        // An HTTP/2 server's preface (an empty SETTINGS frame), then a
        // GOAWAY (PROTOCOL_ERROR): what a gRPC port answers to a Keel frame.
        const HTTP2: &[u8] = &[
            0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ];
        // A fatal TLS alert (decode_error).
        const TLS: &[u8] = &[21, 3, 3, 0, 2, 2, 50];
        for (answer, protocol) in [(HTTP1, "HTTP/gRPC"), (HTTP2, "HTTP/gRPC"), (TLS, "TLS")] {
            let addr = foreign_server(answer).await;
            let started = Instant::now();
            let e = client(addr.clone())
                .write(Bytes::from_static(b"w"))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, ClientError::NotKeel { endpoints, protocol: p }
                    if *endpoints == [addr.clone()] && *p == protocol),
                "{e}"
            );
            assert!(e.to_string().contains("give a node's client_addr"), "{e}");
            assert!(started.elapsed() < Duration::from_secs(2), "{e}");
            let e = Client::status_of(&addr, Duration::from_secs(2))
                .await
                .unwrap_err();
            assert!(matches!(&e, ClientError::NotKeel { .. }), "{e}");
        }
        let http = foreign_server(HTTP1).await;
        let (node, server) = fake_node(vec![Some(ClientResult::Ok(Bytes::new()))]).await;
        let mut c = Client::new(ClientOptions {
            endpoints: vec![http, node],
            attempt_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            client_id: Some(7),
            tls: None,
        })
        .expect("client");
        c.write(Bytes::from_static(b"w")).await.expect("write");
        server.await.expect("node");
    }

    /// A node's peer port (the real one, of a transport with no peers)
    /// given as the endpoint is named as such at once, by a call and by the
    /// status of one node, instead of "connection closed" until the call
    /// times out; a server that closes every connection at once (a proxy
    /// whose node is down) is not taken for one and is retried as before.
    #[tokio::test]
    async fn a_peer_port_given_as_an_endpoint_is_named_at_once() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let cfg = keel_net::tcp::TransportConfig {
            cluster_id: 9,
            node_id: 1,
            max_frame: codec::DEFAULT_MAX_FRAME,
            peer_queue: 16,
            tls: None,
            handshakes: None,
        };
        let _peers = keel_net::tcp::start_peers(
            cfg,
            &addr,
            &[],
            std::sync::Arc::new(|_| {}),
            Default::default(),
        )
        .await
        .expect("peer port");
        let started = Instant::now();
        let e = client(addr.clone())
            .write(Bytes::from_static(b"w"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::PeerPort { endpoints } if *endpoints == [addr.clone()]),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("this is a peer port, use the node's client_addr"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(2), "{e}");
        let e = Client::status_of(&addr, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(&e, ClientError::PeerPort { .. }), "{e}");

        // Closes every connection at once, unasked.
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let closing = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move { while l.accept().await.is_ok() {} });
        let mut c = Client::new(ClientOptions {
            endpoints: vec![closing],
            attempt_timeout: Duration::from_millis(500),
            call_timeout: Duration::from_secs(1),
            client_id: Some(7),
            tls: None,
        })
        .expect("client");
        let e = c.read(Bytes::from_static(b"r")).await.unwrap_err();
        assert!(matches!(&e, ClientError::NoLeader { .. }), "{e}");
    }

    /// A server that takes connections and what is sent on them and never
    /// answers (a stopped process's port, a black hole); returns its
    /// address.
    async fn silent_server() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        addr
    }

    /// The call timeout bounds the whole call: an attempt is cut to the
    /// time left (a 2 s attempt timeout made a 1 s call take 2 s, and a
    /// 3 s one 4 s), and so is the status of one node.
    #[tokio::test]
    async fn a_call_ends_within_its_timeout() {
        let addr = silent_server().await;
        for call in [1, 3] {
            let call_timeout = Duration::from_secs(call);
            let mut c = Client::new(ClientOptions {
                endpoints: vec![addr.clone()],
                attempt_timeout: Duration::from_secs(2),
                call_timeout,
                client_id: Some(7),
                tls: None,
            })
            .expect("client");
            let started = Instant::now();
            let e = c.read(Bytes::from_static(b"r")).await.unwrap_err();
            let took = started.elapsed();
            assert!(matches!(&e, ClientError::NoLeader { .. }), "{e}");
            assert!(
                took >= call_timeout && took < call_timeout + Duration::from_millis(400),
                "a {call_timeout:?} call took {took:?}: {e}"
            );
        }
        let started = Instant::now();
        let e = Client::status_of(&addr, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Unreachable { why, .. } if why == "no answer within 1s"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_millis(1400), "{e}");
    }

    /// An HTTP/1 server that answers only a whole request head (as a
    /// node's `http_addr` does), given as an endpoint, is named for what it
    /// is within a second, by the call and by the status of one node (it
    /// never answers a Keel frame, and was "no answer within 2s").
    #[tokio::test]
    async fn an_http1_port_that_waits_for_a_request_head_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                });
            }
        });
        let started = Instant::now();
        let e = client(addr.clone())
            .write(Bytes::from_static(b"w"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::NotKeel { endpoints, protocol: "HTTP/gRPC" }
                if *endpoints == [addr.clone()]),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{e}");
        let started = Instant::now();
        let e = Client::status_of(&addr, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(&e, ClientError::NotKeel { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1), "{e}");
    }

    /// A Keel node that takes longer than `PROBE_AFTER` to answer is
    /// probed (a status request, on a connection of its own), which does
    /// not get in the way: the answer is the node's; once it has answered
    /// in Keel's protocol, it is not probed again.
    #[tokio::test]
    async fn a_slow_keel_node_is_still_answered() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let statuses = Arc::new(AtomicUsize::new(0));
        let counted = statuses.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    while let Some(r) = request(&mut s).await {
                        let result = if matches!(r.op, ClientOp::Status) {
                            counted.fetch_add(1, Ordering::SeqCst);
                            ClientResult::Status(NodeStatus::default())
                        } else {
                            tokio::time::sleep(PROBE_AFTER * 2).await;
                            ClientResult::Ok(Bytes::from_static(b"done"))
                        };
                        answer(&mut s, r.id, result).await;
                    }
                });
            }
        });
        let mut c = client(addr);
        for _ in 0..2 {
            let got = c.read(Bytes::from_static(b"r")).await.expect("read");
            assert_eq!(&got[..], b"done");
        }
        assert!(
            statuses.load(Ordering::SeqCst) <= 1,
            "probed more than once"
        );
    }

    #[test]
    fn endpoints_must_be_host_port() {
        for bad in [
            "nonsense",
            "127.0.0.1",
            "127.0.0.1:",
            ":7101",
            "host:port",
            "::1:7101",
            "h:0",
            "h:99999",
        ] {
            let e = Client::new(ClientOptions::new(vec![bad.into()]))
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(matches!(&e, ClientError::BadEndpoint(b) if b == bad), "{e}");
        }
        for good in [
            "127.0.0.1:7101",
            "localhost:7101",
            "[::1]:7101",
            "node-1.example:1",
        ] {
            check_endpoint(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }

    /// "Not the leader" to a membership change means the node did not take
    /// it (a node answers one at once, never after appending it), so the
    /// leader's refusal that follows is a refusal; after an unanswered
    /// attempt it is still an unknown outcome (that attempt may have
    /// changed the membership, which the refusal may only reflect).
    #[tokio::test]
    async fn a_membership_change_refused_after_not_the_leader_is_a_refusal() {
        let not_leader = || {
            Some(ClientResult::NotLeader {
                leader: None,
                address: None,
            })
        };
        let not_member = || Some(ClientResult::Error("node 9 is not a member".into()));
        let (addr, server) = fake_node(vec![not_leader(), not_member()]).await;
        let e = client(addr)
            .change_membership(MembershipChange::Remove(9))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Refused(m) if m == "node 9 is not a member"),
            "{e}"
        );
        server.await.expect("node");

        let (addr, server) = fake_node(vec![None, not_member()]).await;
        let e = client(addr)
            .change_membership(MembershipChange::Remove(9))
            .await
            .unwrap_err();
        assert!(matches!(&e, ClientError::Uncertain(_)), "{e}");
        server.await.expect("node");
    }

    /// The status of one node that does not answer says so, not that no
    /// leader was reachable.
    #[tokio::test]
    async fn status_of_a_down_node_says_it_is_unreachable() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr").to_string()
        };
        let e = Client::status_of(&addr, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ClientError::Unreachable { endpoint, why }
                if *endpoint == addr && why.contains("connect")),
            "{e}"
        );
        assert!(!e.to_string().contains("leader"), "{e}");
    }
}
