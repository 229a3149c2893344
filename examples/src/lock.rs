//! `LockService`: named locks with leases. A grant carries a fencing token
//! (a counter, strictly increasing across grants) and a lease that expires
//! in log time: every grant or renewal schedules a log timer at the lease's
//! end, and `on_timer` releases the lock if the lease is still over then.
//! A lock whose lease has run out is also treated as free by the next
//! command that touches it, so correctness does not wait on the timer.
//! Each new leader's term start gives every held lock its whole TTL again
//! (as etcd's leases and Chubby's grace period do), so time without a
//! leader, when holders could not renew, does not take their locks.
//!
//! # Encoding
//!
//! One tag byte, then the fields, little-endian; `name` is a `u32` length
//! then the bytes; an `Option<T>` is a byte 0/1 then `T`.
//!
//! ```text
//! LockCommand
//!   1 Acquire   name, owner:u64, ttl_ms:u64
//!   2 Renew     name, owner:u64, ttl_ms:u64
//!   3 Release   name, owner:u64
//! LockQuery
//!   1 Holder    name
//! LockReply
//!   1 Granted       token:u64, expires_at:u64
//!   2 HeldByOther   holder:LockInfo
//!   3 Renewed       token:u64, expires_at:u64
//!   4 Released      token:u64
//!   5 NotHolder     holder:Option<LockInfo>
//!   6 Holder        holder:Option<LockInfo>
//!   255 Error       message (UTF-8)
//! LockInfo          owner:u64, token:u64, expires_at:u64
//! ```
//!
//! `expires_at` is in log time (nanoseconds). Snapshot: magic `LCK2`,
//! next token `u64`, lock count `u32`, then per lock in name order: name,
//! `LockInfo`, the TTL of its last grant or renewal `ttl_ms:u64` (0:
//! unknown). (`LCK1`
//! snapshots, without the TTLs, are read too: their locks are not renewed
//! at term starts until granted or renewed again.)

use crate::codec::{DecodeError, Reader, Writer};
use bytes::Bytes;
use keel_core::{ClientId, Context, Nanos, Service};
use std::collections::BTreeMap;

/// Longest lock name, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// Longest lease, in milliseconds (one day).
pub const MAX_TTL_MS: u64 = 86_400_000;

const SNAPSHOT_MAGIC: [u8; 4] = *b"LCK2";
const SNAPSHOT_MAGIC_V1: [u8; 4] = *b"LCK1";
const NANOS_PER_MS: u64 = 1_000_000;

/// A write to the lock table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockCommand {
    /// Take the lock if free (or already ours: then the lease is extended
    /// and the token kept).
    Acquire {
        name: Bytes,
        owner: u64,
        ttl_ms: u64,
    },
    /// Extend our unexpired lease to `ttl_ms` from now.
    Renew {
        name: Bytes,
        owner: u64,
        ttl_ms: u64,
    },
    /// Give the lock up.
    Release { name: Bytes, owner: u64 },
}

/// A read of the lock table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockQuery {
    /// Who holds the lock as of the last applied entry.
    Holder { name: Bytes },
}

/// The holder of a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockInfo {
    pub owner: u64,
    /// Fencing token of the grant.
    pub token: u64,
    /// Log time at which the lease ends.
    pub expires_at: Nanos,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockReply {
    Granted {
        token: u64,
        expires_at: Nanos,
    },
    HeldByOther {
        holder: LockInfo,
    },
    Renewed {
        token: u64,
        expires_at: Nanos,
    },
    Released {
        token: u64,
    },
    /// Renew or release by someone who does not hold the lock.
    NotHolder {
        holder: Option<LockInfo>,
    },
    Holder {
        holder: Option<LockInfo>,
    },
    Error {
        message: String,
    },
}

fn check_name(name: &[u8]) -> Result<(), DecodeError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(DecodeError::Invalid(format!(
            "lock name of {} bytes, expected 1 to {MAX_NAME_LEN}",
            name.len()
        )));
    }
    Ok(())
}

fn check_ttl(ttl_ms: u64) -> Result<(), DecodeError> {
    if ttl_ms == 0 || ttl_ms > MAX_TTL_MS {
        return Err(DecodeError::Invalid(format!(
            "ttl_ms {ttl_ms}, expected 1 to {MAX_TTL_MS}"
        )));
    }
    Ok(())
}

impl LockCommand {
    pub fn encode(&self) -> Bytes {
        let mut w;
        match self {
            LockCommand::Acquire {
                name,
                owner,
                ttl_ms,
            } => {
                w = Writer::new(1);
                w.bytes(name).u64(*owner).u64(*ttl_ms);
            }
            LockCommand::Renew {
                name,
                owner,
                ttl_ms,
            } => {
                w = Writer::new(2);
                w.bytes(name).u64(*owner).u64(*ttl_ms);
            }
            LockCommand::Release { name, owner } => {
                w = Writer::new(3);
                w.bytes(name).u64(*owner);
            }
        }
        w.finish()
    }

    /// Decodes and validates (name length, ttl range).
    pub fn decode(data: &[u8]) -> Result<LockCommand, DecodeError> {
        let mut r = Reader::new(data, "lock command");
        let cmd = match r.tag()? {
            1 => LockCommand::Acquire {
                name: r.bytes()?,
                owner: r.u64()?,
                ttl_ms: r.u64()?,
            },
            2 => LockCommand::Renew {
                name: r.bytes()?,
                owner: r.u64()?,
                ttl_ms: r.u64()?,
            },
            3 => LockCommand::Release {
                name: r.bytes()?,
                owner: r.u64()?,
            },
            found => {
                return Err(DecodeError::UnknownTag {
                    what: "lock command",
                    found,
                    expected: "1..=3",
                })
            }
        };
        r.finish()?;
        match &cmd {
            LockCommand::Acquire { name, ttl_ms, .. } | LockCommand::Renew { name, ttl_ms, .. } => {
                check_name(name)?;
                check_ttl(*ttl_ms)?;
            }
            LockCommand::Release { name, .. } => check_name(name)?,
        }
        Ok(cmd)
    }
}

impl LockQuery {
    pub fn encode(&self) -> Bytes {
        let LockQuery::Holder { name } = self;
        let mut w = Writer::new(1);
        w.bytes(name);
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<LockQuery, DecodeError> {
        let mut r = Reader::new(data, "lock query");
        let q = match r.tag()? {
            1 => LockQuery::Holder { name: r.bytes()? },
            found => {
                return Err(DecodeError::UnknownTag {
                    what: "lock query",
                    found,
                    expected: "1",
                })
            }
        };
        r.finish()?;
        Ok(q)
    }
}

impl LockInfo {
    fn encode_into(&self, w: &mut Writer) {
        w.u64(self.owner).u64(self.token).u64(self.expires_at);
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<LockInfo, DecodeError> {
        Ok(LockInfo {
            owner: r.u64()?,
            token: r.u64()?,
            expires_at: r.u64()?,
        })
    }
}

fn encode_opt(w: &mut Writer, info: &Option<LockInfo>) {
    match info {
        Some(i) => {
            w.u8(1);
            i.encode_into(w);
        }
        None => {
            w.u8(0);
        }
    }
}

fn decode_opt(r: &mut Reader<'_>) -> Result<Option<LockInfo>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(LockInfo::decode_from(r)?)),
        found => Err(DecodeError::UnknownTag {
            what: "option",
            found,
            expected: "0 or 1",
        }),
    }
}

impl LockReply {
    pub fn encode(&self) -> Bytes {
        let mut w;
        match self {
            LockReply::Granted { token, expires_at } => {
                w = Writer::new(1);
                w.u64(*token).u64(*expires_at);
            }
            LockReply::HeldByOther { holder } => {
                w = Writer::new(2);
                holder.encode_into(&mut w);
            }
            LockReply::Renewed { token, expires_at } => {
                w = Writer::new(3);
                w.u64(*token).u64(*expires_at);
            }
            LockReply::Released { token } => {
                w = Writer::new(4);
                w.u64(*token);
            }
            LockReply::NotHolder { holder } => {
                w = Writer::new(5);
                encode_opt(&mut w, holder);
            }
            LockReply::Holder { holder } => {
                w = Writer::new(6);
                encode_opt(&mut w, holder);
            }
            LockReply::Error { message } => {
                w = Writer::new(255);
                w.bytes(message.as_bytes());
            }
        }
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<LockReply, DecodeError> {
        let mut r = Reader::new(data, "lock reply");
        let reply = match r.tag()? {
            1 => LockReply::Granted {
                token: r.u64()?,
                expires_at: r.u64()?,
            },
            2 => LockReply::HeldByOther {
                holder: LockInfo::decode_from(&mut r)?,
            },
            3 => LockReply::Renewed {
                token: r.u64()?,
                expires_at: r.u64()?,
            },
            4 => LockReply::Released { token: r.u64()? },
            5 => LockReply::NotHolder {
                holder: decode_opt(&mut r)?,
            },
            6 => LockReply::Holder {
                holder: decode_opt(&mut r)?,
            },
            255 => LockReply::Error {
                message: String::from_utf8(r.bytes()?.to_vec())
                    .map_err(|_| DecodeError::Invalid("lock error message is not UTF-8".into()))?,
            },
            found => {
                return Err(DecodeError::UnknownTag {
                    what: "lock reply",
                    found,
                    expected: "1..=6 or 255",
                })
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

/// The replicated lock table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockService {
    locks: BTreeMap<Bytes, LockInfo>,
    /// Lease timer id (the grant's token) -> lock name, for live locks.
    timers: BTreeMap<u64, Bytes>,
    /// The grant's token -> the TTL of its last grant or renewal, in ms
    /// (absent: unknown, from an `LCK1` snapshot).
    ttls: BTreeMap<u64, u64>,
    next_token: u64,
}

impl Default for LockService {
    fn default() -> Self {
        LockService {
            locks: BTreeMap::new(),
            timers: BTreeMap::new(),
            ttls: BTreeMap::new(),
            next_token: 1,
        }
    }
}

impl LockService {
    pub fn new() -> LockService {
        LockService::default()
    }

    /// The holder of `name` as of the last applied entry.
    pub fn holder(&self, name: &[u8]) -> Option<LockInfo> {
        self.locks.get(name).copied()
    }

    /// Number of locks held.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Token the next grant will carry.
    pub fn next_token(&self) -> u64 {
        self.next_token
    }

    fn lease_end(ctx: &Context<'_>, ttl_ms: u64) -> Nanos {
        ctx.time()
            .saturating_add(ttl_ms.saturating_mul(NANOS_PER_MS))
    }

    fn remove(&mut self, ctx: &mut Context<'_>, name: &[u8]) -> Option<LockInfo> {
        let info = self.locks.remove(name)?;
        self.timers.remove(&info.token);
        self.ttls.remove(&info.token);
        ctx.cancel_timer(info.token);
        Some(info)
    }

    /// Drops the lock on `name` if its lease is over at the current log time.
    fn reap(&mut self, ctx: &mut Context<'_>, name: &[u8]) {
        if self
            .locks
            .get(name)
            .is_some_and(|l| ctx.time() >= l.expires_at)
        {
            self.remove(ctx, name);
        }
    }

    /// Applies one decoded command.
    pub fn apply(&mut self, ctx: &mut Context<'_>, cmd: LockCommand) -> LockReply {
        match cmd {
            LockCommand::Acquire {
                name,
                owner,
                ttl_ms,
            } => {
                self.reap(ctx, &name);
                let expires_at = Self::lease_end(ctx, ttl_ms);
                if let Some(l) = self.locks.get_mut(&name) {
                    if l.owner != owner {
                        return LockReply::HeldByOther { holder: *l };
                    }
                    l.expires_at = expires_at;
                    ctx.schedule_timer(l.token, expires_at);
                    self.ttls.insert(l.token, ttl_ms);
                    return LockReply::Granted {
                        token: l.token,
                        expires_at,
                    };
                }
                let token = self.next_token;
                let Some(next) = token.checked_add(1) else {
                    return LockReply::Error {
                        message: "fencing tokens exhausted".into(),
                    };
                };
                self.next_token = next;
                self.locks.insert(
                    name.clone(),
                    LockInfo {
                        owner,
                        token,
                        expires_at,
                    },
                );
                self.timers.insert(token, name);
                self.ttls.insert(token, ttl_ms);
                ctx.schedule_timer(token, expires_at);
                LockReply::Granted { token, expires_at }
            }
            LockCommand::Renew {
                name,
                owner,
                ttl_ms,
            } => {
                self.reap(ctx, &name);
                let expires_at = Self::lease_end(ctx, ttl_ms);
                match self.locks.get_mut(&name) {
                    Some(l) if l.owner == owner => {
                        l.expires_at = expires_at;
                        ctx.schedule_timer(l.token, expires_at);
                        self.ttls.insert(l.token, ttl_ms);
                        LockReply::Renewed {
                            token: l.token,
                            expires_at,
                        }
                    }
                    other => LockReply::NotHolder {
                        holder: other.map(|l| *l),
                    },
                }
            }
            LockCommand::Release { name, owner } => {
                self.reap(ctx, &name);
                match self.locks.get(&name) {
                    Some(l) if l.owner == owner => {
                        let token = l.token;
                        self.remove(ctx, &name);
                        LockReply::Released { token }
                    }
                    other => LockReply::NotHolder {
                        holder: other.copied(),
                    },
                }
            }
        }
    }

    fn decode_snapshot(data: &[u8]) -> Result<LockService, DecodeError> {
        let v1 = data.starts_with(&SNAPSHOT_MAGIC_V1);
        let mut r = Reader::new(data, "lock snapshot");
        r.magic(if v1 {
            &SNAPSHOT_MAGIC_V1
        } else {
            &SNAPSHOT_MAGIC
        })?;
        let next_token = r.u64()?;
        let n = r.count(if v1 { 4 + 24 } else { 4 + 32 })?;
        let mut s = LockService {
            next_token,
            ..LockService::default()
        };
        for _ in 0..n {
            let name = r.bytes()?;
            let info = LockInfo::decode_from(&mut r)?;
            if !v1 {
                // 0: unknown (the lock came from an `LCK1` snapshot).
                let ttl_ms = r.u64()?;
                if ttl_ms != 0 {
                    check_ttl(ttl_ms)?;
                    s.ttls.insert(info.token, ttl_ms);
                }
            }
            check_name(&name)?;
            if info.token == 0 || info.token >= next_token {
                return Err(DecodeError::Invalid(format!(
                    "lock token {}, expected 1 to {}",
                    info.token,
                    next_token.saturating_sub(1)
                )));
            }
            if s.timers.insert(info.token, name.clone()).is_some() {
                return Err(DecodeError::Invalid(format!(
                    "lock token {} used twice",
                    info.token
                )));
            }
            if s.locks.insert(name, info).is_some() {
                return Err(DecodeError::Invalid("lock name listed twice".into()));
            }
        }
        r.finish()?;
        Ok(s)
    }
}

impl Service for LockService {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        *self = match snapshot {
            None => LockService::new(),
            Some(data) => LockService::decode_snapshot(data).map_err(|e| e.to_string())?,
        };
        Ok(())
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        let mut w = Writer::onto(std::mem::take(out));
        w.raw_bytes(&SNAPSHOT_MAGIC)
            .u64(self.next_token)
            .count(self.locks.len());
        for (name, info) in &self.locks {
            w.bytes(name);
            info.encode_into(&mut w);
            w.u64(self.ttls.get(&info.token).copied().unwrap_or(0));
        }
        *out = w.into_vec();
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        match LockCommand::decode(data) {
            Ok(cmd) => self.apply(ctx, cmd).encode(),
            Err(e) => LockReply::Error {
                message: e.to_string(),
            }
            .encode(),
        }
    }

    fn query(&self, data: &[u8]) -> Bytes {
        match LockQuery::decode(data) {
            Ok(LockQuery::Holder { name }) => LockReply::Holder {
                holder: self.holder(&name),
            }
            .encode(),
            Err(e) => LockReply::Error {
                message: e.to_string(),
            }
            .encode(),
        }
    }

    /// A new leader's term starts: every held lock's lease runs for its
    /// whole TTL from now (never shorter than it was).
    fn on_term_start(&mut self, ctx: &mut Context<'_>) {
        let now = ctx.time();
        for info in self.locks.values_mut() {
            let Some(&ttl_ms) = self.ttls.get(&info.token) else {
                continue;
            };
            let end = now.saturating_add(ttl_ms.saturating_mul(NANOS_PER_MS));
            if end > info.expires_at {
                info.expires_at = end;
                ctx.schedule_timer(info.token, end);
            }
        }
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, id: u64) {
        let Some(name) = self.timers.get(&id).cloned() else {
            return;
        };
        match self.locks.get(&name) {
            Some(l) if l.token == id => {
                if ctx.time() >= l.expires_at {
                    self.remove(ctx, &name);
                } else {
                    // Fired before the lease ended (the leader's clock ran
                    // early): wait for the real end.
                    ctx.schedule_timer(id, l.expires_at);
                }
            }
            _ => {
                self.timers.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;
    use proptest::prelude::*;

    const MS: u64 = NANOS_PER_MS;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn send(h: &mut Harness<LockService>, c: LockCommand) -> LockReply {
        LockReply::decode(&h.raw(c.encode())).unwrap()
    }

    fn acquire(name: &str, owner: u64, ttl_ms: u64) -> LockCommand {
        LockCommand::Acquire {
            name: b(name),
            owner,
            ttl_ms,
        }
    }

    fn holder(h: &Harness<LockService>, name: &str) -> Option<LockInfo> {
        let q = LockQuery::Holder { name: b(name) }.encode();
        match LockReply::decode(&h.host.query(&q)).unwrap() {
            LockReply::Holder { holder } => holder,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn acquire_contend_release() {
        let mut h = Harness::new(LockService::new());
        let t0 = h.time;
        assert_eq!(
            send(&mut h, acquire("a", 1, 100)),
            LockReply::Granted {
                token: 1,
                expires_at: t0 + 100 * MS
            }
        );
        assert_eq!(h.scheduled(1), Some(t0 + 100 * MS));
        let info = LockInfo {
            owner: 1,
            token: 1,
            expires_at: t0 + 100 * MS,
        };
        assert_eq!(
            send(&mut h, acquire("a", 2, 100)),
            LockReply::HeldByOther { holder: info }
        );
        assert_eq!(holder(&h, "a"), Some(info));
        // Another lock gets the next token.
        assert!(matches!(
            send(&mut h, acquire("b", 2, 100)),
            LockReply::Granted { token: 2, .. }
        ));
        // Only the holder can release.
        assert_eq!(
            send(
                &mut h,
                LockCommand::Release {
                    name: b("a"),
                    owner: 2
                }
            ),
            LockReply::NotHolder { holder: Some(info) }
        );
        assert_eq!(
            send(
                &mut h,
                LockCommand::Release {
                    name: b("a"),
                    owner: 1
                }
            ),
            LockReply::Released { token: 1 }
        );
        assert!(h.host.timers().get(&1).is_none(), "lease timer cancelled");
        assert_eq!(holder(&h, "a"), None);
        assert!(matches!(
            send(&mut h, acquire("a", 2, 100)),
            LockReply::Granted { token: 3, .. }
        ));
        assert_eq!(
            send(
                &mut h,
                LockCommand::Release {
                    name: b("zz"),
                    owner: 2
                }
            ),
            LockReply::NotHolder { holder: None }
        );
    }

    #[test]
    fn lease_expires_through_timer() {
        let mut h = Harness::new(LockService::new());
        let t0 = h.time;
        send(&mut h, acquire("a", 1, 50));
        let deadline = h.scheduled(1).unwrap();
        assert_eq!(deadline, t0 + 50 * MS);
        // A timer entry stamped early (leader clock ahead of the lease
        // math) does not release: it re-arms.
        h.time = deadline - 1;
        h.timer(1, deadline);
        assert!(holder(&h, "a").is_some());
        assert_eq!(h.scheduled(1), Some(deadline));
        h.time = deadline;
        h.timer(1, deadline);
        assert_eq!(holder(&h, "a"), None);
        assert!(h.svc().is_empty());
        assert!(h.host.timers().is_empty());
        // A duplicate timer entry is ignored by the host.
        h.timer(1, deadline);
        assert!(h.svc().is_empty());
    }

    #[test]
    fn renew_moves_the_timer() {
        let mut h = Harness::new(LockService::new());
        send(&mut h, acquire("a", 1, 50));
        let first = h.scheduled(1).unwrap();
        h.time += 40 * MS;
        let r = send(
            &mut h,
            LockCommand::Renew {
                name: b("a"),
                owner: 1,
                ttl_ms: 50,
            },
        );
        let second = h.time + 50 * MS;
        assert_eq!(
            r,
            LockReply::Renewed {
                token: 1,
                expires_at: second
            }
        );
        assert_eq!(h.scheduled(1), Some(second));
        // The old deadline's timer entry no longer matches: ignored.
        h.time = first;
        h.timer(1, first);
        assert_eq!(holder(&h, "a").map(|i| i.expires_at), Some(second));
        // Renew by someone else fails.
        assert!(matches!(
            send(
                &mut h,
                LockCommand::Renew {
                    name: b("a"),
                    owner: 2,
                    ttl_ms: 50
                }
            ),
            LockReply::NotHolder { holder: Some(_) }
        ));
        // Re-acquire by the holder extends and keeps the token.
        let r = send(&mut h, acquire("a", 1, 80));
        assert_eq!(
            r,
            LockReply::Granted {
                token: 1,
                expires_at: h.time + 80 * MS
            }
        );
        h.time += 80 * MS;
        h.timer(1, h.time);
        assert_eq!(holder(&h, "a"), None);
    }

    #[test]
    fn expired_lease_is_free_before_its_timer() {
        let mut h = Harness::new(LockService::new());
        send(&mut h, acquire("a", 1, 10));
        h.time += 10 * MS;
        // The holder cannot renew a lease that is over.
        assert_eq!(
            send(
                &mut h,
                LockCommand::Renew {
                    name: b("a"),
                    owner: 1,
                    ttl_ms: 10
                }
            ),
            LockReply::NotHolder { holder: None }
        );
        send(&mut h, acquire("a", 1, 10));
        h.time += 10 * MS;
        let r = send(&mut h, acquire("a", 2, 10));
        assert!(
            matches!(r, LockReply::Granted { token: 3, .. }),
            "fencing token increases: {r:?}"
        );
        assert!(h.host.timers().get(&2).is_none());
        assert!(h.host.timers().contains_key(&3));
    }

    #[test]
    fn invalid_commands_are_rejected_without_change() {
        let mut h = Harness::new(LockService::new());
        send(&mut h, acquire("a", 1, 10));
        let before = h.svc().clone();
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for c in [
            acquire("", 1, 10),
            acquire(&long, 1, 10),
            acquire("b", 1, 0),
            acquire("b", 1, MAX_TTL_MS + 1),
        ] {
            let r = send(&mut h, c);
            assert!(matches!(r, LockReply::Error { .. }), "{r:?}");
        }
        for data in [&[][..], &[9], &[1, 1, 0, 0, 0, b'a'], &[3, 1, 0, 0]] {
            let r = LockReply::decode(&h.raw(Bytes::copy_from_slice(data))).unwrap();
            assert!(matches!(r, LockReply::Error { .. }), "{r:?}");
        }
        assert_eq!(h.svc(), &before);
        let r = LockReply::decode(&h.host.query(&[7])).unwrap();
        assert!(matches!(r, LockReply::Error { .. }));
    }

    /// A term start (the time without a leader ends) gives held locks
    /// their whole TTL again, reschedules their timers, and survives a
    /// snapshot; a lock restored from an `LCK1` snapshot (TTL unknown)
    /// keeps its end.
    #[test]
    fn a_term_start_renews_every_held_lock() {
        let mut h = Harness::new(LockService::new());
        let granted = send(&mut h, acquire("a", 1, 100));
        let LockReply::Granted { expires_at, .. } = granted else {
            panic!("{granted:?}");
        };
        send(&mut h, acquire("b", 2, 300));
        // 150 ms without a leader: a's lease ran out, b's has 150 ms left.
        h.time += 150 * MS;
        h.term_start();
        let a = h.svc().holder(b"a").expect("a still held");
        assert_eq!(a.expires_at, h.time + 100 * MS);
        assert!(a.expires_at > expires_at);
        assert_eq!(h.scheduled(a.token), Some(a.expires_at));
        let b = h.svc().holder(b"b").expect("b held");
        assert_eq!(b.expires_at, h.time + 300 * MS);
        // Renewed state is in the snapshot, TTLs included.
        let r = h.restored(LockService::new());
        assert_eq!(r.svc(), h.svc());
        // An LCK1 snapshot has no TTLs: its locks keep their ends.
        let mut v1 = b"LCK1".to_vec();
        v1.extend_from_slice(&3u64.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.push(b'c');
        for w in [7u64, 2, 5_000] {
            v1.extend_from_slice(&w.to_le_bytes());
        }
        let mut old = LockService::new();
        old.restore(Some(&v1)).expect("an LCK1 snapshot");
        let mut o = Harness::new(old);
        o.time = 10_000;
        o.term_start();
        assert_eq!(o.svc().holder(b"c").map(|l| l.expires_at), Some(5_000));
    }

    #[test]
    fn snapshot_round_trip_keeps_leases_and_timers() {
        let mut h = Harness::new(LockService::new());
        send(&mut h, acquire("a", 1, 50));
        send(&mut h, acquire("b", 2, 70));
        send(&mut h, acquire("c", 3, 70));
        send(
            &mut h,
            LockCommand::Release {
                name: b("c"),
                owner: 3,
            },
        );
        let mut r = h.restored(LockService::new());
        assert_eq!(r.svc(), h.svc());
        assert_eq!(r.host.timers(), h.host.timers());
        let deadline = h.host.timers()[&1];
        r.time = deadline;
        r.timer(1, deadline);
        assert_eq!(r.svc().holder(b"a"), None);
        assert!(r.svc().holder(b"b").is_some());
        assert!(matches!(
            send(&mut r, acquire("d", 1, 5)),
            LockReply::Granted { token: 4, .. }
        ));
        let mut s = LockService::new();
        assert!(s.restore(Some(b"LCK1")).is_err());
        let snap = h.svc().snapshot_vec();
        assert!(s.restore(Some(&snap[..snap.len() - 1])).is_err());
        s.restore(Some(&snap)).unwrap();
        assert_eq!(&s, h.svc());
        s.restore(None).unwrap();
        assert_eq!(s, LockService::new());
    }

    fn arb_command() -> impl Strategy<Value = LockCommand> {
        let name = prop::sample::select(vec![b("a"), b("b"), b("")]);
        prop_oneof![
            (name.clone(), 1u64..4, 0u64..200).prop_map(|(name, owner, ttl_ms)| {
                LockCommand::Acquire {
                    name,
                    owner,
                    ttl_ms,
                }
            }),
            (name.clone(), 1u64..4, 0u64..200).prop_map(|(name, owner, ttl_ms)| {
                LockCommand::Renew {
                    name,
                    owner,
                    ttl_ms,
                }
            }),
            (name, 1u64..4).prop_map(|(name, owner)| LockCommand::Release { name, owner }),
        ]
    }

    /// Applies commands spaced `gap_ms` apart, firing due timers between.
    fn run(cmds: &[(LockCommand, u64)]) -> Harness<LockService> {
        let mut h = Harness::new(LockService::new());
        for (c, gap_ms) in cmds {
            h.time += gap_ms * MS;
            let due: Vec<(u64, u64)> = h
                .host
                .timers()
                .iter()
                .filter(|(_, d)| **d <= h.time)
                .map(|(i, d)| (*i, *d))
                .collect();
            for (id, d) in due {
                h.timer(id, d);
            }
            h.raw(c.encode());
        }
        h
    }

    proptest! {
        #[test]
        fn deterministic_and_snapshot_round_trip(
            cmds in prop::collection::vec((arb_command(), 0u64..100), 0..30),
        ) {
            let a = run(&cmds);
            let a2 = run(&cmds);
            prop_assert_eq!(a.svc().snapshot_vec(), a2.svc().snapshot_vec());
            prop_assert_eq!(a.host.snapshot(), a2.host.snapshot());
            let mut s = LockService::new();
            s.restore(Some(&a.svc().snapshot_vec())).unwrap();
            prop_assert_eq!(&s, a.svc());
            for name in ["a", "b", ""] {
                let q = LockQuery::Holder { name: b(name) }.encode();
                prop_assert_eq!(s.query(&q), a.host.query(&q));
            }
            // Every live lock has exactly its lease timer.
            prop_assert_eq!(a.host.timers().len(), a.svc().len());
            for (name, info) in &a.svc().locks {
                prop_assert_eq!(a.host.timers().get(&info.token), Some(&info.expires_at));
                prop_assert_eq!(a.svc().timers.get(&info.token), Some(name));
            }
        }

        #[test]
        fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..96)) {
            let _ = LockCommand::decode(&data);
            let _ = LockQuery::decode(&data);
            let _ = LockReply::decode(&data);
            let mut s = LockService::new();
            let _ = s.restore(Some(&data));
            let mut m = b"LCK1".to_vec();
            m.extend_from_slice(&data);
            let _ = s.restore(Some(&m));
            prop_assert!(LockReply::decode(&s.query(&data)).is_ok());
        }

        #[test]
        fn malformed_changes_nothing(
            cmds in prop::collection::vec((arb_command(), 0u64..100), 0..10),
            data in prop::collection::vec(any::<u8>(), 0..48),
        ) {
            let mut h = run(&cmds);
            let before = h.svc().clone();
            let reply = LockReply::decode(&h.raw(Bytes::from(data.clone()))).unwrap();
            if LockCommand::decode(&data).is_err() {
                prop_assert!(matches!(reply, LockReply::Error { .. }), "{:?}", reply);
                prop_assert_eq!(h.svc(), &before);
            }
        }
    }
}
