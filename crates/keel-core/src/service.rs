//! The service side of the log: the `Service` trait a user implements and
//! the `ServiceHost` that drives it with committed entries. The host owns
//! the replicated bookkeeping every replica must agree on: client sessions
//! with their last reply (exactly-once), the timer table, and the snapshot
//! format that carries both with the service's own state. Pure and
//! deterministic: the service sees only log time.

use crate::node::{Role, TimerUpdate};
use crate::types::{ClientId, Entry, EntryKind, Nanos, Position, Snapshot};
use bytes::Bytes;
use std::collections::BTreeMap;

/// A deterministic service replicated by Keel. Every replica applies the
/// same entries in the same order and must reach the same state: use only
/// the context's time, never a clock, thread or RNG of your own.
pub trait Service {
    /// Replace the state with a snapshot made by `snapshot`, or empty it.
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String>;
    /// Serialize the whole state, appending it to `out` (append, do not
    /// replace: the buffer may hold something already). What `restore`
    /// reads back; the default `prepare_snapshot` is built on it.
    fn snapshot(&self, out: &mut Vec<u8>);
    /// `snapshot` into a buffer of its own.
    fn snapshot_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.snapshot(&mut out);
        out
    }
    /// Capture the state now, serialize it later: returns a closure that
    /// writes exactly the bytes `snapshot` would append now. The runtime
    /// calls this between entries and runs the closure on a background
    /// thread, writing straight into the snapshot file, so applying (and
    /// replying, and serving reads) goes on while the state is serialized
    /// and the serialized state is never held whole in memory. Override it
    /// with a cheap consistent clone (copy-on-write or persistent data
    /// structures) of the state that writes in pieces; the default
    /// serializes at once, which pauses applying for that long and holds
    /// the whole serialized state until the closure has run.
    fn prepare_snapshot(&self) -> SnapshotTask {
        let data = self.snapshot_vec();
        Box::new(move |out| out.write_all(&data))
    }
    /// Apply one client command and return its reply.
    fn on_message(&mut self, ctx: &mut Context<'_>, client: ClientId, data: &[u8]) -> Bytes;
    /// Answer a read-only query against the current state (served after a
    /// linearizable read-index confirmation, or as a stale read).
    fn query(&self, data: &[u8]) -> Bytes;
    /// A timer scheduled through the context came due (in log time).
    fn on_timer(&mut self, _ctx: &mut Context<'_>, _id: u64) {}
    fn on_session_open(&mut self, _ctx: &mut Context<'_>, _client: ClientId) {}
    fn on_session_close(&mut self, _ctx: &mut Context<'_>, _client: ClientId) {}
    /// A leader's term starts at this entry (Aeron's new-leadership-term
    /// event): every replica sees it at the same position and log time,
    /// before any entry that leader appends. The log time since the entry
    /// before it may include a stretch without a leader (an election, or a
    /// cluster restored from a backup long after it was taken): the KV
    /// store refreshes its leases here, as etcd does on a leader change.
    fn on_term_start(&mut self, _ctx: &mut Context<'_>) {}
    /// This replica's role changed (not replicated: for logging or metrics).
    fn on_role_change(&mut self, _role: Role) {}
    /// Notifications produced by the entries applied since the last call
    /// (for example watch events), handed by the runtime to local
    /// subscribers on every replica. Not replicated state: drained each time.
    fn take_notifications(&mut self) -> Vec<Bytes> {
        Vec::new()
    }
    /// Drop the pending notifications: the runtime calls this instead of
    /// `take_notifications` when nobody subscribes, so a service can skip
    /// encoding them.
    fn discard_notifications(&mut self) {
        let _ = self.take_notifications();
    }
    /// Whether anyone will take the notifications of the entries applied
    /// next (the runtime says so before each batch). With `false` a service
    /// may skip building them; a subscriber that comes later reads the
    /// state first, so it misses nothing. Not called: assume `true`.
    fn notifications_wanted(&mut self, _wanted: bool) {}
    /// A check the node runs on each client write before proposing it, on
    /// its own threads while the service applies on another (asked once,
    /// at start). Refusing is always safe, since nothing entered the log:
    /// the client gets the message as an error. It is not part of the
    /// replicated state machine, so it may depend on local settings (such
    /// as a memory quota). `None` (the default): every write is proposed.
    fn admission(&self) -> Option<Admission> {
        None
    }
}

/// A service's check of a client write before it is proposed (see
/// `Service::admission`): `Err` refuses the write with that message.
pub type Admission = std::sync::Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// A captured service state that serializes itself when called, on any
/// thread, writing it to the writer it is given (the snapshot file, or a
/// buffer); it passes on the writer's errors (see
/// `Service::prepare_snapshot`). Write in pieces of a megabyte or so: the
/// runtime writes them through to the file as they come.
pub type SnapshotTask = Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send>;

/// Client id of commands without a session: applied every time they appear
/// in the log, with no duplicate detection (as etcd's own API behaves).
pub const SESSIONLESS: ClientId = 0;

/// A boxed service is a service, so a runtime can pick one at start-up.
impl<S: Service + ?Sized> Service for Box<S> {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        (**self).restore(snapshot)
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        (**self).snapshot(out)
    }
    fn prepare_snapshot(&self) -> SnapshotTask {
        (**self).prepare_snapshot()
    }
    fn on_message(&mut self, ctx: &mut Context<'_>, client: ClientId, data: &[u8]) -> Bytes {
        (**self).on_message(ctx, client, data)
    }
    fn query(&self, data: &[u8]) -> Bytes {
        (**self).query(data)
    }
    fn on_timer(&mut self, ctx: &mut Context<'_>, id: u64) {
        (**self).on_timer(ctx, id)
    }
    fn on_session_open(&mut self, ctx: &mut Context<'_>, client: ClientId) {
        (**self).on_session_open(ctx, client)
    }
    fn on_session_close(&mut self, ctx: &mut Context<'_>, client: ClientId) {
        (**self).on_session_close(ctx, client)
    }
    fn on_term_start(&mut self, ctx: &mut Context<'_>) {
        (**self).on_term_start(ctx)
    }
    fn on_role_change(&mut self, role: Role) {
        (**self).on_role_change(role)
    }
    fn take_notifications(&mut self) -> Vec<Bytes> {
        (**self).take_notifications()
    }
    fn discard_notifications(&mut self) {
        (**self).discard_notifications()
    }
    fn notifications_wanted(&mut self, wanted: bool) {
        (**self).notifications_wanted(wanted)
    }
    fn admission(&self) -> Option<Admission> {
        (**self).admission()
    }
}

/// What a service may see and do while applying an entry.
pub struct Context<'a> {
    time: Nanos,
    position: Position,
    timers: &'a mut BTreeMap<u64, Nanos>,
    updates: &'a mut Vec<TimerUpdate>,
}

impl Context<'_> {
    /// Leader-stamped log time of the entry being applied.
    pub fn time(&self) -> Nanos {
        self.time
    }
    /// Log position where the entry being applied ends.
    pub fn position(&self) -> Position {
        self.position
    }
    /// Schedule (or move) timer `id` to fire at log time `deadline`.
    pub fn schedule_timer(&mut self, id: u64, deadline: Nanos) {
        self.timers.insert(id, deadline);
        self.updates.push(TimerUpdate::Set { id, deadline });
    }
    pub fn cancel_timer(&mut self, id: u64) {
        if self.timers.remove(&id).is_some() {
            self.updates.push(TimerUpdate::Cancel { id });
        }
    }
}

/// The answer to a client command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Applied now; this is the service's reply.
    Applied(Bytes),
    /// A retry of the last applied command of this session: its original
    /// reply, not applied again.
    Duplicate(Bytes),
    /// Older than the session's last command: applied long ago, reply gone.
    Stale,
}

/// What applying a batch of entries produced.
#[derive(Clone, Debug, Default)]
pub struct ApplyOutput {
    pub replies: Vec<(ClientId, u64, Reply)>,
    pub timers: Vec<TimerUpdate>,
}

impl ApplyOutput {
    pub fn clear(&mut self) {
        self.replies.clear();
        self.timers.clear();
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    last_seq: u64,
    last_reply: Bytes,
    last_active: Nanos,
}

/// Why a snapshot could not be loaded.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("snapshot data truncated: needed {needed} bytes at offset {offset}, {available} left")]
    Truncated {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "snapshot data has bad magic {}, expected {}",
        MagicText(found),
        MagicText(expected)
    )]
    BadMagic { found: [u8; 4], expected: [u8; 4] },
    #[error("snapshot has {0} trailing bytes after the service state")]
    Trailing(usize),
    #[error("service rejected its snapshot: {0}")]
    Service(String),
}

/// A format's magic bytes as an operator reads them in an error: quoted
/// text when they are printable ASCII (`"KKV2"`), hex otherwise
/// (`0x00ff1234`), never Rust's list of decimal bytes.
#[derive(Clone, Copy, Debug)]
pub struct MagicText<'a>(pub &'a [u8]);

impl std::fmt::Display for MagicText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.is_empty() && self.0.iter().all(u8::is_ascii_graphic) {
            // Printable ASCII is valid UTF-8.
            write!(f, "\"{}\"", String::from_utf8_lossy(self.0))
        } else {
            f.write_str("0x")?;
            self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
        }
    }
}

const SNAPSHOT_MAGIC: [u8; 4] = *b"KSH2";
/// The first format, still read: the service state was length-prefixed.
const SNAPSHOT_MAGIC_V1: [u8; 4] = *b"KSH1";

/// Drives a `Service` with committed entries and keeps sessions and timers.
pub struct ServiceHost<S> {
    service: S,
    sessions: BTreeMap<ClientId, Session>,
    timers: BTreeMap<u64, Nanos>,
    applied: Position,
    session_ttl: Nanos,
    last_sweep: Nanos,
}

impl<S: Service> ServiceHost<S> {
    /// `session_ttl`: a session idle (in log time) for longer is expired and
    /// its last reply forgotten. Must be the same on every replica.
    pub fn new(service: S, session_ttl: Nanos) -> Self {
        ServiceHost {
            service,
            sessions: BTreeMap::new(),
            timers: BTreeMap::new(),
            applied: 0,
            session_ttl,
            last_sweep: 0,
        }
    }

    pub fn service(&self) -> &S {
        &self.service
    }
    pub fn service_mut(&mut self) -> &mut S {
        &mut self.service
    }
    pub fn applied(&self) -> Position {
        self.applied
    }
    pub fn timers(&self) -> &BTreeMap<u64, Nanos> {
        &self.timers
    }
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
    pub fn query(&self, data: &[u8]) -> Bytes {
        self.service.query(data)
    }

    /// Applies committed entries in order. Entries at or before the applied
    /// position are skipped (idempotent across restarts and snapshots).
    pub fn apply(&mut self, entries: &[Entry], out: &mut ApplyOutput) {
        for e in entries {
            if e.position < self.applied {
                continue;
            }
            self.apply_one(e, out);
            self.applied = e.end();
        }
    }

    fn apply_one(&mut self, e: &Entry, out: &mut ApplyOutput) {
        let mut ctx = Context {
            time: e.timestamp,
            position: e.end(),
            timers: &mut self.timers,
            updates: &mut out.timers,
        };
        match &e.kind {
            // Term starts written before services were told of them have
            // no data: replaying them must not change what they did.
            EntryKind::TermStart if e.data.is_empty() => {}
            EntryKind::TermStart => self.service.on_term_start(&mut ctx),
            EntryKind::Membership(_) => {}
            EntryKind::Command { client, seq } if *client == SESSIONLESS => {
                let r = self.service.on_message(&mut ctx, *client, &e.data);
                out.replies.push((*client, *seq, Reply::Applied(r)));
            }
            EntryKind::Command { client, seq } => {
                let reply = match self.sessions.get_mut(client) {
                    Some(s) if *seq == s.last_seq => {
                        s.last_active = e.timestamp;
                        Reply::Duplicate(s.last_reply.clone())
                    }
                    Some(s) if *seq < s.last_seq => Reply::Stale,
                    known => {
                        if known.is_none() {
                            self.service.on_session_open(&mut ctx, *client);
                        }
                        let r = self.service.on_message(&mut ctx, *client, &e.data);
                        self.sessions.insert(
                            *client,
                            Session {
                                last_seq: *seq,
                                last_reply: r.clone(),
                                last_active: e.timestamp,
                            },
                        );
                        Reply::Applied(r)
                    }
                };
                out.replies.push((*client, *seq, reply));
            }
            EntryKind::Timer { id, deadline } => {
                if ctx.timers.get(id) == Some(deadline) {
                    ctx.timers.remove(id);
                    ctx.updates.push(TimerUpdate::Cancel { id: *id });
                    self.service.on_timer(&mut ctx, *id);
                }
            }
            EntryKind::SessionClose { client } => {
                if self.sessions.remove(client).is_some() {
                    self.service.on_session_close(&mut ctx, *client);
                }
            }
        }
        self.expire_sessions(e, &mut out.timers);
    }

    fn expire_sessions(&mut self, e: &Entry, updates: &mut Vec<TimerUpdate>) {
        let now = e.timestamp;
        if now < self.last_sweep.saturating_add(self.session_ttl / 4) {
            return;
        }
        self.last_sweep = now;
        let ttl = self.session_ttl;
        let expired: Vec<ClientId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.last_active.saturating_add(ttl) < now)
            .map(|(c, _)| *c)
            .collect();
        let mut ctx = Context {
            time: now,
            position: e.end(),
            timers: &mut self.timers,
            updates,
        };
        for c in expired {
            self.sessions.remove(&c);
            self.service.on_session_close(&mut ctx, c);
        }
    }

    /// Serializes sessions, timers and the service state.
    pub fn snapshot(&self) -> Bytes {
        let mut b = Vec::new();
        self.prepare_snapshot()(&mut b).expect("writing to a Vec cannot fail");
        Bytes::from(b)
    }

    /// Captures sessions, timers and the service state now (the service
    /// through `Service::prepare_snapshot`); the returned closure, which may
    /// run on another thread, writes exactly what `snapshot` returns now:
    /// the host's part (sessions and timers, small), then the service's
    /// state, which runs to the end, so it streams through without a length
    /// written ahead of it.
    pub fn prepare_snapshot(&self) -> SnapshotTask {
        let service = self.service.prepare_snapshot();
        let (applied, last_sweep) = (self.applied, self.last_sweep);
        // Replies are reference-counted `Bytes`: the copy is shallow.
        let sessions = self.sessions.clone();
        let timers = self.timers.clone();
        Box::new(move |out| {
            let mut b = Vec::with_capacity(64);
            b.extend_from_slice(&SNAPSHOT_MAGIC);
            b.extend_from_slice(&applied.to_le_bytes());
            b.extend_from_slice(&last_sweep.to_le_bytes());
            b.extend_from_slice(&(sessions.len() as u64).to_le_bytes());
            for (c, s) in &sessions {
                b.extend_from_slice(&c.to_le_bytes());
                b.extend_from_slice(&s.last_seq.to_le_bytes());
                b.extend_from_slice(&s.last_active.to_le_bytes());
                b.extend_from_slice(&(s.last_reply.len() as u64).to_le_bytes());
                b.extend_from_slice(&s.last_reply);
            }
            b.extend_from_slice(&(timers.len() as u64).to_le_bytes());
            for (id, d) in &timers {
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&d.to_le_bytes());
            }
            out.write_all(&b)?;
            service(out)
        })
    }

    /// Replaces all state with a snapshot (an empty snapshot at position 0
    /// means the empty state). Returns the timer-table changes for the core.
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<Vec<TimerUpdate>, SnapshotError> {
        if snapshot.data.is_empty() {
            self.service.restore(None).map_err(SnapshotError::Service)?;
            self.sessions.clear();
            self.timers.clear();
            self.last_sweep = 0;
            self.applied = snapshot.meta.position;
            return Ok(vec![TimerUpdate::Clear]);
        }
        let mut r = Reader {
            data: &snapshot.data,
            offset: 0,
        };
        let HostSessions {
            magic,
            last_sweep,
            sessions,
        } = read_host_sessions(&mut r)?;
        let mut timers = BTreeMap::new();
        for _ in 0..r.u64()? {
            let id = r.u64()?;
            let deadline = r.u64()?;
            timers.insert(id, deadline);
        }
        // Version 1 put the service state's length before it; from
        // version 2 it is the rest of the data.
        let service = if magic == SNAPSHOT_MAGIC_V1 {
            let len = r.u64()?;
            let service = r.bytes(len)?;
            if r.offset != r.data.len() {
                return Err(SnapshotError::Trailing(r.data.len() - r.offset));
            }
            service
        } else {
            &r.data[r.offset..]
        };
        self.service
            .restore(Some(service))
            .map_err(SnapshotError::Service)?;
        self.sessions = sessions;
        self.timers = timers;
        self.last_sweep = last_sweep;
        self.applied = snapshot.meta.position;
        let mut updates = vec![TimerUpdate::Clear];
        updates.extend(
            self.timers
                .iter()
                .map(|(&id, &deadline)| TimerUpdate::Set { id, deadline }),
        );
        Ok(updates)
    }
}

/// A client session's outcome as a snapshot holds it: its last sequence
/// number and the reply to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOutcome {
    pub client: ClientId,
    pub last_seq: u64,
    pub last_reply: Bytes,
}

/// The client sessions in a `ServiceHost` snapshot's data, read without
/// restoring anything (the session table comes first and is small): what
/// a node that installs the snapshot can tell its own waiting clients
/// about writes the snapshot covers.
pub fn snapshot_sessions(data: &[u8]) -> Result<Vec<SessionOutcome>, SnapshotError> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut r = Reader { data, offset: 0 };
    let host = read_host_sessions(&mut r)?;
    Ok(host
        .sessions
        .into_iter()
        .map(|(client, s)| SessionOutcome {
            client,
            last_seq: s.last_seq,
            last_reply: s.last_reply,
        })
        .collect())
}

/// A snapshot's header and session table.
struct HostSessions {
    magic: [u8; 4],
    last_sweep: Nanos,
    sessions: BTreeMap<ClientId, Session>,
}

/// Reads a snapshot's header and session table.
fn read_host_sessions(r: &mut Reader<'_>) -> Result<HostSessions, SnapshotError> {
    let magic: [u8; 4] = r.array()?;
    if magic != SNAPSHOT_MAGIC && magic != SNAPSHOT_MAGIC_V1 {
        return Err(SnapshotError::BadMagic {
            found: magic,
            expected: SNAPSHOT_MAGIC,
        });
    }
    let _applied = r.u64()?;
    let last_sweep = r.u64()?;
    let mut sessions = BTreeMap::new();
    for _ in 0..r.u64()? {
        let client = r.u64()?;
        let last_seq = r.u64()?;
        let last_active = r.u64()?;
        let len = r.u64()?;
        let last_reply = Bytes::copy_from_slice(r.bytes(len)?);
        sessions.insert(
            client,
            Session {
                last_seq,
                last_reply,
                last_active,
            },
        );
    }
    Ok(HostSessions {
        magic,
        last_sweep,
        sessions,
    })
}

/// Bounds-checked little-endian reader: decoding never panics.
struct Reader<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: u64) -> Result<&'a [u8], SnapshotError> {
        let available = self.data.len() - self.offset;
        let err = SnapshotError::Truncated {
            offset: self.offset,
            needed: usize::try_from(n).unwrap_or(usize::MAX),
            available,
        };
        let n = usize::try_from(n).map_err(|_| err.clone())?;
        if n > available {
            return Err(err);
        }
        let s = &self.data[self.offset..self.offset + n];
        self.offset += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N as u64)?);
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}
