//! etcd v3.4's authentication state as replicated KV-service state: users
//! (password hash, roles, the generation tokens name), roles (key-range
//! permissions), the enabled flag, the auth revision and the token secret;
//! how `AuthCommand`s change it; etcd's permission checks of requests
//! (`isOpPermitted`, `IsAdminPermitted`, `checkTxnReqsPermission`,
//! `checkLeasePuts`); its snapshot section; and `AuthShared`, the latest
//! state published for the etcd API.
//!
//! Ranges follow etcd: an empty `range_end` is the single key `key`,
//! `range_end == "\0"` is every key `>= key`. No key is empty, so a range
//! starting at `""` selects the same keys as one starting at `"\0"` (the
//! smallest key), and the checks treat them alike: `["\0", "\0")` and
//! `["", "\0")` are both every key.

use crate::codec::{Reader, Writer};
use crate::error::KvError;
use crate::etcd::{RequestOp, TxnRequest};
use crate::lease::Leases;
use crate::proto::{check_bound, check_value, Command, Query};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use crate::proto::AuthCommand;

/// The name of both the root user and the root role.
pub const ROOT: &str = "root";

/// What a permission allows (etcd `authpb.Permission.Type`, same numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PermKind {
    Read = 0,
    Write = 1,
    ReadWrite = 2,
}

impl PermKind {
    pub fn from_i32(v: i32) -> Option<PermKind> {
        match v {
            0 => Some(PermKind::Read),
            1 => Some(PermKind::Write),
            2 => Some(PermKind::ReadWrite),
            _ => None,
        }
    }

    pub fn allows(self, a: Access) -> bool {
        matches!(
            (self, a),
            (PermKind::ReadWrite, _)
                | (PermKind::Read, Access::Read)
                | (PermKind::Write, Access::Write)
        )
    }

    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<PermKind, KvError> {
        let found = r.u8()?;
        PermKind::from_i32(i32::from(found)).ok_or(KvError::UnknownTag {
            what: "permission type",
            found,
            expected: "0..=2",
        })
    }
}

/// The access a request needs on a key range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// A role's permission on `[key, range_end)` (etcd's range rules).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Permission {
    pub kind: PermKind,
    pub key: Bytes,
    pub range_end: Bytes,
}

impl Permission {
    /// Checks the key limits: a bounded key and range end.
    pub(crate) fn validate(&self) -> Result<(), KvError> {
        // An empty key is the smallest key, as in a range: `--prefix ''`
        // grants every key ("" to "\0").
        check_bound(&self.key)?;
        check_bound(&self.range_end)
    }
}

/// A user. (`Debug` leaves out the password hash.)
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// The password hash as the etcd API stored it (opaque bytes to
    /// keel-kv); None = created with no_password (cannot authenticate).
    pub password: Option<Bytes>,
    pub roles: BTreeSet<String>,
    /// The auth revision at which the user was created or its password
    /// last set: tokens name it, so a changed password or a
    /// deleted-and-re-added user invalidates older tokens.
    pub generation: u64,
}

/// A role: its permissions, sorted by (key, range_end), at most one per
/// (key, range_end).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Role {
    pub perms: Vec<Permission>,
}

/// The whole authentication state. (`Debug` leaves out the token
/// secret and the password hashes.)
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    secret: Bytes,
    users: BTreeMap<String, User>,
    roles: BTreeMap<String, Role>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("roles", &self.roles)
            .field("generation", &self.generation)
            .finish()
    }
}

impl std::fmt::Debug for AuthStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthStore")
            .field("enabled", &self.enabled)
            .field("revision", &self.revision)
            .field("secret", &"<hidden>")
            .field("users", &self.users)
            .field("roles", &self.roles)
            .finish()
    }
}

/// A key interval `[lo, hi)`, `hi` None = no upper bound. `lo` is never
/// empty (a range from `""` starts at `"\0"`).
#[derive(Debug)]
struct Interval {
    lo: Vec<u8>,
    hi: Option<Vec<u8>>,
}

impl Interval {
    /// The keys `[key, range_end)` selects, by etcd's rules; None if none.
    fn of(key: &[u8], range_end: &[u8]) -> Option<Interval> {
        let lo = if key.is_empty() {
            vec![0]
        } else {
            key.to_vec()
        };
        let hi = match range_end {
            [] => {
                if key.is_empty() {
                    return None;
                }
                let mut h = key.to_vec();
                h.push(0);
                Some(h)
            }
            [0] => None,
            end => Some(end.to_vec()),
        };
        match &hi {
            Some(h) if *h <= lo => None,
            _ => Some(Interval { lo, hi }),
        }
    }

    /// The single key `key` (`key` non-empty).
    fn point(key: &[u8]) -> Interval {
        Interval::of(key, &[]).unwrap_or(Interval {
            lo: vec![0],
            hi: Some(vec![0, 0]),
        })
    }
}

/// Does the union of `perms` (sorted by `lo`) contain all of `want`?
fn covers(perms: &[Interval], want: &Interval) -> bool {
    let mut reached: &[u8] = &want.lo;
    for p in perms {
        if p.lo.as_slice() > reached {
            return false;
        }
        match &p.hi {
            None => return true,
            Some(h) if h.as_slice() > reached => reached = h,
            Some(_) => {}
        }
        if want.hi.as_deref().is_some_and(|end| reached >= end) {
            return true;
        }
    }
    false
}

/// Who a request runs as, resolved once for several checks. Errors are
/// only reported when a check is made (a txn with no operations is
/// permitted to anyone, as in etcd).
enum Who {
    /// Auth is disabled, or the user has the root role.
    Anyone,
    /// No user, or an unknown one: this error for every check.
    Refused(KvError),
    /// The user's read and write intervals, each sorted by `lo`.
    Perms {
        read: Vec<Interval>,
        write: Vec<Interval>,
    },
}

impl Who {
    fn check(&self, access: Access, key: &[u8], range_end: &[u8]) -> Result<(), KvError> {
        let perms = match self {
            Who::Anyone => return Ok(()),
            Who::Refused(e) => return Err(e.clone()),
            Who::Perms { read, write } => match access {
                Access::Read => read,
                Access::Write => write,
            },
        };
        // An empty range (end before start) needs the start key.
        let want = Interval::of(key, range_end).unwrap_or_else(|| Interval::point(key));
        if covers(perms, &want) {
            Ok(())
        } else {
            Err(KvError::PermissionDenied)
        }
    }

    fn check_key(&self, access: Access, key: &[u8]) -> Result<(), KvError> {
        self.check(access, key, &[])
    }

    /// etcd's `checkTxnAuth`: compares read, then both branches' operations,
    /// nested txns included.
    fn check_txn(&self, t: &TxnRequest) -> Result<(), KvError> {
        for c in &t.compare {
            self.check(Access::Read, &c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match op {
                RequestOp::Range(r) => self.check(Access::Read, &r.key, &r.range_end)?,
                RequestOp::Put(p) => {
                    self.check_key(Access::Write, &p.key)?;
                    if p.prev_kv {
                        self.check_key(Access::Read, &p.key)?;
                    }
                }
                RequestOp::DeleteRange(d) => {
                    self.check(Access::Write, &d.key, &d.range_end)?;
                    if d.prev_kv {
                        self.check(Access::Read, &d.key, &d.range_end)?;
                    }
                }
                RequestOp::Txn(n) => self.check_txn(n)?,
            }
        }
        Ok(())
    }

    /// etcd's `checkLeasePuts`: write on every key attached to `lease`
    /// (none if there is no such lease).
    fn check_lease_keys(&self, lease: i64, leases: &Leases) -> Result<(), KvError> {
        if let Some(l) = leases.get(lease) {
            for key in &l.keys {
                self.check_key(Access::Write, key)?;
            }
        }
        Ok(())
    }
}

/// `Some("")` is no user, as etcd's empty user name.
fn named(user: Option<&str>) -> Option<&str> {
    user.filter(|u| !u.is_empty())
}

impl AuthStore {
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// etcd's auth revision: 0 for a fresh store, one more for every auth
    /// command that changed something.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The token-signing secret set by the last `Enable` (empty before).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.get(name)
    }

    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.get(name)
    }

    /// Every user's name, sorted.
    pub fn user_names(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    /// Every role's name, sorted.
    pub fn role_names(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// Does `user` exist and have the root role?
    pub fn is_admin(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(ROOT))
    }

    /// etcd's `IsAdminPermitted`: Ok when auth is disabled; no user ->
    /// UserEmpty; an unknown user -> UserNotFound; a user without the root
    /// role -> PermissionDenied.
    pub fn check_admin(&self, user: Option<&str>) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        let name = named(user).ok_or(KvError::UserEmpty)?;
        let u = self.users.get(name).ok_or(KvError::UserNotFound)?;
        if u.roles.contains(ROOT) {
            Ok(())
        } else {
            Err(KvError::PermissionDenied)
        }
    }

    /// Any known user (for calls etcd lets every authenticated user make):
    /// Ok when auth is disabled; no user -> UserEmpty; an unknown user ->
    /// PermissionDenied.
    pub fn check_user(&self, user: Option<&str>) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        let name = named(user).ok_or(KvError::UserEmpty)?;
        if self.users.contains_key(name) {
            Ok(())
        } else {
            Err(KvError::PermissionDenied)
        }
    }

    /// Resolves `user` for permission checks (see `Who`).
    fn who(&self, user: Option<&str>) -> Who {
        if !self.enabled {
            return Who::Anyone;
        }
        let Some(name) = named(user) else {
            return Who::Refused(KvError::UserEmpty);
        };
        let Some(u) = self.users.get(name) else {
            return Who::Refused(KvError::PermissionDenied);
        };
        if u.roles.contains(ROOT) {
            return Who::Anyone;
        }
        let (mut read, mut write) = (Vec::new(), Vec::new());
        for role in u.roles.iter().filter_map(|r| self.roles.get(r)) {
            for p in &role.perms {
                if p.kind.allows(Access::Read) {
                    read.extend(Interval::of(&p.key, &p.range_end));
                }
                if p.kind.allows(Access::Write) {
                    write.extend(Interval::of(&p.key, &p.range_end));
                }
            }
        }
        read.sort_by(|a, b| a.lo.cmp(&b.lo));
        write.sort_by(|a, b| a.lo.cmp(&b.lo));
        Who::Perms { read, write }
    }

    /// etcd's `isOpPermitted` on `[key, range_end)` (etcd's range rules):
    /// Ok when auth is disabled; no user -> UserEmpty; an unknown user ->
    /// PermissionDenied; the root role -> Ok; else Ok only if the
    /// permissions of the user's roles that allow `access` together cover
    /// the whole range, else PermissionDenied. An empty range (end at or
    /// before start) needs the start key.
    pub fn check_range(
        &self,
        user: Option<&str>,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), KvError> {
        self.who(user).check(access, key, range_end)
    }

    /// etcd's checks of a read: ranges and gets read their range or key, a
    /// txn as `check_txn`, events read their range; lease queries and
    /// status need a known user, a hash the root role.
    pub fn check_query(&self, user: Option<&str>, q: &Query) -> Result<(), KvError> {
        match q {
            Query::Get { key } => self.check_range(user, Access::Read, key, &[]),
            Query::Range { start, end, .. } | Query::Events { start, end, .. } => {
                self.check_range(user, Access::Read, start, end)
            }
            Query::RangeReq(r) => self.check_range(user, Access::Read, &r.key, &r.range_end),
            Query::Txn(t) => self.check_txn(user, t),
            Query::LeaseTimeToLive { .. } | Query::Leases | Query::Status => self.check_user(user),
            Query::HashKv { .. } => self.check_admin(user),
            Query::As { .. } => Err(KvError::NestedAs),
        }
    }

    /// The caller of a `Command::As` or `Query::As`, while auth is
    /// enabled: a named user must exist with the `generation` its token
    /// names (0: not checked), else its token is no longer valid (etcd's
    /// clients then log in again). No user is left to the checks that
    /// follow.
    pub fn check_caller(&self, user: Option<&str>, generation: u64) -> Result<(), KvError> {
        let Some(name) = named(user).filter(|_| self.enabled && generation != 0) else {
            return Ok(());
        };
        match self.users.get(name) {
            Some(u) if u.generation == generation => Ok(()),
            _ => Err(KvError::InvalidAuthToken),
        }
    }

    /// Has auth ever been used (a user or role added, auth enabled)? Until
    /// then the etcd API sends plain commands, which binaries from before
    /// auth can apply too.
    pub fn in_use(&self) -> bool {
        self.revision != 0
    }

    /// etcd's `checkTxnReqsPermission`: read on every compare's range; for
    /// every operation of both branches, nested txns included: a range
    /// reads; a put writes its key (and reads it with prev_kv); a delete
    /// writes its range (and reads it with prev_kv).
    pub fn check_txn(&self, user: Option<&str>, t: &TxnRequest) -> Result<(), KvError> {
        self.who(user).check_txn(t)
    }

    /// The check made when a `Command::As` runs `cmd` as `user`: puts and
    /// deletes write their keys (and read them with prev_kv), a put with a
    /// lease also writes every key attached to the lease (etcd's
    /// `checkLeasePuts`), as does a lease revocation; compare-and-swap
    /// reads and writes; txns as `check_txn`; lease grants and compaction
    /// need a known user, renewals nothing (as in etcd 3.4); auth commands
    /// the root role.
    pub fn check_command(
        &self,
        user: Option<&str>,
        cmd: &Command,
        leases: &Leases,
    ) -> Result<(), KvError> {
        let who = || self.who(user);
        match cmd {
            Command::Put { key, .. } => who().check_key(Access::Write, key),
            Command::PutReq(p) => {
                let who = who();
                who.check_key(Access::Write, &p.key)?;
                if p.lease != 0 {
                    who.check_lease_keys(p.lease, leases)?;
                }
                if p.prev_kv {
                    who.check_key(Access::Read, &p.key)?;
                }
                Ok(())
            }
            Command::Delete { key } => who().check_key(Access::Write, key),
            Command::DeleteRange { start, end } => who().check(Access::Write, start, end),
            Command::DeleteRangeReq(d) => {
                let who = who();
                who.check(Access::Write, &d.key, &d.range_end)?;
                if d.prev_kv {
                    who.check(Access::Read, &d.key, &d.range_end)?;
                }
                Ok(())
            }
            Command::Cas { key, .. } => {
                let who = who();
                who.check_key(Access::Read, key)?;
                who.check_key(Access::Write, key)
            }
            Command::Txn(t) => who().check_txn(t),
            Command::LeaseRevoke { id } => {
                // A known user first: a lease without keys checks none.
                self.check_user(user)?;
                who().check_lease_keys(*id, leases)
            }
            // Renewals are not checked, as in etcd 3.4 (they come plain
            // too from the leader's own renewals after a failover).
            Command::LeaseKeepAlive { .. } => Ok(()),
            Command::LeaseGrant { .. } | Command::Compact { .. } => self.check_user(user),
            Command::Auth(_) => self.check_admin(user),
            Command::As { .. } => Err(KvError::NestedAs),
        }
    }

    /// Applies an auth command (etcd's `authStore` methods). A command that
    /// changes something moves the revision by one; one that changes
    /// nothing (enabling when enabled, disabling when disabled, granting a
    /// role already granted) leaves it. An error changes nothing.
    pub fn apply(&mut self, c: &AuthCommand) -> Result<(), KvError> {
        if self.apply_inner(c)? {
            self.revision = self.revision.wrapping_add(1);
        }
        Ok(())
    }

    /// `apply` without the revision: whether anything changed.
    fn apply_inner(&mut self, c: &AuthCommand) -> Result<bool, KvError> {
        let next = self.revision.wrapping_add(1);
        match c {
            AuthCommand::Enable { secret } => {
                if self.enabled {
                    return Ok(false);
                }
                let root = self.users.get(ROOT).ok_or(KvError::RootUserNotExist)?;
                if !root.roles.contains(ROOT) {
                    return Err(KvError::RootRoleNotExist);
                }
                self.enabled = true;
                self.secret = secret.clone();
            }
            AuthCommand::Disable => {
                if !self.enabled {
                    return Ok(false);
                }
                self.enabled = false;
            }
            AuthCommand::UserAdd { name, password } => {
                if name.is_empty() {
                    return Err(KvError::UserEmpty);
                }
                if self.users.contains_key(name) {
                    return Err(KvError::UserAlreadyExists);
                }
                let user = User {
                    password: password.clone(),
                    roles: BTreeSet::new(),
                    generation: next,
                };
                self.users.insert(name.clone(), user);
            }
            AuthCommand::UserDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(KvError::InvalidAuthMgmt);
                }
                self.users.remove(name).ok_or(KvError::UserNotFound)?;
            }
            AuthCommand::UserChangePassword { name, password } => {
                let u = self.users.get_mut(name).ok_or(KvError::UserNotFound)?;
                u.password = Some(password.clone());
                u.generation = next;
            }
            AuthCommand::UserGrantRole { user, role } => {
                if !self.users.contains_key(user) {
                    return Err(KvError::UserNotFound);
                }
                if role != ROOT && !self.roles.contains_key(role) {
                    return Err(KvError::RoleNotFound);
                }
                let u = self.users.get_mut(user).ok_or(KvError::UserNotFound)?;
                return Ok(u.roles.insert(role.clone()));
            }
            AuthCommand::UserRevokeRole { name, role } => {
                if self.enabled && name == ROOT && role == ROOT {
                    return Err(KvError::InvalidAuthMgmt);
                }
                let u = self.users.get_mut(name).ok_or(KvError::UserNotFound)?;
                if !u.roles.remove(role) {
                    return Err(KvError::RoleNotGranted);
                }
            }
            AuthCommand::RoleAdd { name } => {
                if name.is_empty() {
                    return Err(KvError::RoleEmpty);
                }
                if self.roles.contains_key(name) {
                    return Err(KvError::RoleAlreadyExists);
                }
                self.roles.insert(name.clone(), Role::default());
            }
            AuthCommand::RoleDelete { name } => {
                if self.enabled && name == ROOT {
                    return Err(KvError::InvalidAuthMgmt);
                }
                self.roles.remove(name).ok_or(KvError::RoleNotFound)?;
                for u in self.users.values_mut() {
                    u.roles.remove(name);
                }
            }
            AuthCommand::RoleGrantPermission { role, perm } => {
                let r = self.roles.get_mut(role).ok_or(KvError::RoleNotFound)?;
                match r
                    .perms
                    .binary_search_by(|p| perm_order(p, &perm.key, &perm.range_end))
                {
                    Ok(i) => r.perms[i].kind = perm.kind,
                    Err(i) => r.perms.insert(i, perm.clone()),
                }
            }
            AuthCommand::RoleRevokePermission {
                role,
                key,
                range_end,
            } => {
                let r = self.roles.get_mut(role).ok_or(KvError::RoleNotFound)?;
                let i = r
                    .perms
                    .binary_search_by(|p| perm_order(p, key, range_end))
                    .map_err(|_| KvError::PermissionNotGranted)?;
                r.perms.remove(i);
            }
        }
        Ok(true)
    }

    /// The size of the auth section of a snapshot in bytes beyond its fixed
    /// 21 (enabled flag, revision, secret length, user and role counts): 0
    /// for a fresh state. Part of the service's `db_size`.
    pub(crate) fn contents_len(&self) -> u64 {
        let str_len = |n: usize| 4 + n as u64;
        let users: u64 = self
            .users
            .iter()
            .map(|(name, u)| {
                let roles: u64 = u.roles.iter().map(|r| str_len(r.len())).sum();
                str_len(name.len())
                    + 1
                    + u.password.as_ref().map_or(0, |p| str_len(p.len()))
                    + 8
                    + 4
                    + roles
            })
            .sum();
        let roles: u64 = self
            .roles
            .iter()
            .map(|(name, r)| {
                let perms: u64 = r
                    .perms
                    .iter()
                    .map(|p| 1 + str_len(p.key.len()) + str_len(p.range_end.len()))
                    .sum();
                str_len(name.len()) + 4 + perms
            })
            .sum();
        self.secret.len() as u64 + users + roles
    }

    /// The auth section of a snapshot (see `service`).
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bool(self.enabled).u64(self.revision).bytes(&self.secret);
        w.count(self.users.len());
        for (name, u) in &self.users {
            w.bytes(name.as_bytes());
            w.bool(u.password.is_some());
            if let Some(p) = &u.password {
                w.bytes(p);
            }
            w.u64(u.generation).count(u.roles.len());
            for r in &u.roles {
                w.bytes(r.as_bytes());
            }
        }
        w.count(self.roles.len());
        for (name, role) in &self.roles {
            w.bytes(name.as_bytes()).count(role.perms.len());
            for p in &role.perms {
                w.u8(p.kind as u8).bytes(&p.key).bytes(&p.range_end);
            }
        }
    }

    /// Reads an auth section written by `encode_into`, checking every
    /// invariant `apply` keeps.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<AuthStore, KvError> {
        let enabled = r.bool()?;
        let revision = r.u64()?;
        let secret = r.bytes()?;
        // A user is at least a name, a flag, a generation and a count.
        let n = r.count(4 + 1 + 8 + 4)?;
        let mut users = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n {
            let name = snapshot_name(r, "user name")?;
            if last.as_ref().is_some_and(|l| *l >= name) {
                return Err(invalid(format!(
                    "user {name:?} is out of order: user names must be increasing"
                )));
            }
            let password = if r.bool()? { Some(r.bytes()?) } else { None };
            if let Some(p) = &password {
                check_value(p).map_err(|e| invalid(format!("user {name:?} password: {e}")))?;
            }
            let generation = r.u64()?;
            if generation == 0 || generation > revision {
                return Err(invalid(format!(
                    "user {name:?} has generation {generation}, expected 1..={revision}"
                )));
            }
            let k = r.count(4)?;
            let mut roles = BTreeSet::new();
            let mut last_role: Option<String> = None;
            for _ in 0..k {
                let role = snapshot_name(r, "role name")?;
                if last_role.as_ref().is_some_and(|l| *l >= role) {
                    return Err(invalid(format!(
                        "user {name:?} has role {role:?} out of order: roles must be increasing"
                    )));
                }
                last_role = Some(role.clone());
                roles.insert(role);
            }
            last = Some(name.clone());
            users.insert(
                name,
                User {
                    password,
                    roles,
                    generation,
                },
            );
        }
        // A role is at least a name and a count.
        let n = r.count(4 + 4)?;
        let mut roles: BTreeMap<String, Role> = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..n {
            let name = snapshot_name(r, "role name")?;
            if last.as_ref().is_some_and(|l| *l >= name) {
                return Err(invalid(format!(
                    "role {name:?} is out of order: role names must be increasing"
                )));
            }
            // A permission is at least a kind and two empty strings.
            let k = r.count(1 + 4 + 4)?;
            let mut perms: Vec<Permission> = Vec::with_capacity(k);
            for _ in 0..k {
                let perm = Permission {
                    kind: PermKind::decode_from(r)?,
                    key: r.bytes()?,
                    range_end: r.bytes()?,
                };
                perm.validate()
                    .map_err(|e| invalid(format!("role {name:?} permission: {e}")))?;
                if perms.last().is_some_and(|p| {
                    perm_order(p, &perm.key, &perm.range_end) != std::cmp::Ordering::Less
                }) {
                    return Err(invalid(format!(
                        "role {name:?} has permission on {:?}..{:?} out of order: \
                         permissions must be increasing by key and range end",
                        perm.key, perm.range_end
                    )));
                }
                perms.push(perm);
            }
            last = Some(name.clone());
            roles.insert(name, Role { perms });
        }
        for (name, u) in &users {
            if let Some(role) = u
                .roles
                .iter()
                .find(|r| *r != ROOT && !roles.contains_key(*r))
            {
                return Err(invalid(format!(
                    "user {name:?} has role {role:?}, which does not exist"
                )));
            }
        }
        if enabled && !users.get(ROOT).is_some_and(|u| u.roles.contains(ROOT)) {
            return Err(invalid(
                "auth is enabled without a root user that has the root role".to_string(),
            ));
        }
        Ok(AuthStore {
            enabled,
            revision,
            secret,
            users,
            roles,
        })
    }
}

/// The order of a role's permissions: by key, then range end.
fn perm_order(p: &Permission, key: &[u8], range_end: &[u8]) -> std::cmp::Ordering {
    (&p.key[..], &p.range_end[..]).cmp(&(key, range_end))
}

fn invalid(msg: String) -> KvError {
    KvError::InvalidSnapshot(format!("auth: {msg}"))
}

/// A user or role name in a snapshot: UTF-8, non-empty, within the limits.
fn snapshot_name(r: &mut Reader<'_>, what: &'static str) -> Result<String, KvError> {
    let name = r.string(what)?;
    if name.is_empty() {
        return Err(invalid(format!("empty {what}")));
    }
    check_bound(name.as_bytes()).map_err(|e| invalid(format!("{what}: {e}")))?;
    Ok(name)
}

impl Command {
    /// Is this one of the etcd API's own commands, which while auth is
    /// enabled the service takes only with a caller (`Command::As`)? A
    /// member that has not yet applied the first auth entry sends them
    /// plain: they are then refused (UserEmpty), as etcd refuses a request
    /// without a user when it applies it. The native protocol's put,
    /// delete and compare-and-swap, compaction and lease renewal (which
    /// etcd 3.4 does not check either) are taken plain.
    pub fn needs_a_caller(&self) -> bool {
        matches!(
            self,
            Command::PutReq(_)
                | Command::DeleteRangeReq(_)
                | Command::Txn(_)
                | Command::LeaseGrant { .. }
                | Command::LeaseRevoke { .. }
                | Command::Auth(_)
        )
    }
}

impl Query {
    /// As `Command::needs_a_caller`, for the etcd API's reads of keys:
    /// ranges, txns and a lease's time-to-live (its keys). Status, the
    /// lease list, hashes, the history a watch catches up from (the watch
    /// was checked when created) and the native protocol's reads are
    /// answered plain.
    pub fn needs_a_caller(&self) -> bool {
        matches!(
            self,
            Query::RangeReq(_) | Query::Txn(_) | Query::LeaseTimeToLive { .. }
        )
    }
}

/// The latest `AuthStore`, published by the service after each auth change
/// (and a restore) for the etcd API, which reads it on every request:
/// shared by `Arc` like `SpaceQuota`. Not replicated state.
#[derive(Debug, Default)]
pub struct AuthShared {
    enabled: AtomicBool,
    in_use: AtomicBool,
    current: Mutex<Arc<AuthStore>>,
}

impl AuthShared {
    /// Is auth enabled (one atomic load)?
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The latest state (a lock and an `Arc` clone).
    pub fn current(&self) -> Arc<AuthStore> {
        match self.current.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Has auth ever been used (`AuthStore::in_use`; one atomic load)?
    pub fn in_use(&self) -> bool {
        self.in_use.load(Ordering::Acquire)
    }

    pub(crate) fn publish(&self, s: &AuthStore) {
        let next = Arc::new(s.clone());
        match self.current.lock() {
            Ok(mut g) => *g = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        // In use before enabled: a reader that sees auth enabled also
        // sees it in use, so it sends its requests with their caller.
        self.in_use.store(s.in_use(), Ordering::Release);
        self.enabled.store(s.enabled, Ordering::Release);
    }
}
