//! Leases: id, granted TTL, expiry in log time, and the keys attached. The
//! attachments mirror the `lease` field of live keys in the store (a
//! snapshot stores only id, TTL and expiry, and restore rebuilds them).
//! Expiry itself is driven by the service through log timers.

use crate::codec::{Reader, Writer};
use crate::error::KvError;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};

/// etcd's `MaxLeaseTTL`: the largest TTL a grant accepts, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// The default minimum TTL in seconds. etcd raises shorter TTLs to
/// `ceil(1.5 * election timeout)`; with its default 1 s election timeout
/// that is 2 s, which Keel uses too (see `KvService::with_min_lease_ttl`).
pub const DEFAULT_MIN_LEASE_TTL: i64 = 2;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// One lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl: i64,
    /// Log time (ns) at which it expires.
    pub expiry: u64,
    /// Live keys attached to it.
    pub keys: BTreeSet<Bytes>,
}

/// All leases and the id counter for leases granted without an id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leases {
    map: BTreeMap<i64, Lease>,
    next_id: i64,
}

impl Default for Leases {
    fn default() -> Leases {
        Leases {
            map: BTreeMap::new(),
            next_id: 1,
        }
    }
}

/// `now + ttl seconds`, saturating.
pub(crate) fn expiry(now: u64, ttl: i64) -> u64 {
    now.saturating_add((ttl.max(0) as u64).saturating_mul(NANOS_PER_SEC))
}

impl Leases {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, id: i64) -> Option<&Lease> {
        self.map.get(&id)
    }

    pub fn contains(&self, id: i64) -> bool {
        self.map.contains_key(&id)
    }

    /// Every lease's id, the soonest to expire first (then by id): the
    /// order etcd 3.4 lists its leases in (`lessor.Leases` sorts by
    /// expiry), which `etcdctl lease list` prints.
    pub fn ids(&self) -> Vec<i64> {
        let mut by_expiry: Vec<(u64, i64)> = self.map.values().map(|l| (l.expiry, l.id)).collect();
        by_expiry.sort_unstable();
        by_expiry.into_iter().map(|(_, id)| id).collect()
    }

    /// The id the next grant without an id gets: the counter's next value
    /// not in use (counting from 1, positive as etcd's ids).
    fn choose_id(&mut self) -> i64 {
        loop {
            let id = self.next_id;
            self.next_id = if id == i64::MAX { 1 } else { id + 1 };
            if !self.map.contains_key(&id) {
                return id;
            }
        }
    }

    /// Grants a lease (etcd `lessor.Grant` after the server picked an id).
    pub fn grant(&mut self, id: i64, ttl: i64, now: u64, min_ttl: i64) -> Result<&Lease, KvError> {
        if ttl > MAX_LEASE_TTL {
            return Err(KvError::LeaseTtlTooLarge);
        }
        if id != 0 && self.map.contains_key(&id) {
            return Err(KvError::LeaseExists);
        }
        let id = if id == 0 { self.choose_id() } else { id };
        let ttl = ttl.max(min_ttl);
        let lease = Lease {
            id,
            ttl,
            expiry: expiry(now, ttl),
            keys: BTreeSet::new(),
        };
        Ok(self.map.entry(id).or_insert(lease))
    }

    /// Renews an unexpired lease: it now expires `ttl` after `now`.
    pub fn renew(&mut self, id: i64, now: u64) -> Result<&Lease, KvError> {
        match self.map.get_mut(&id) {
            Some(l) if l.expiry > now => {
                l.expiry = expiry(now, l.ttl);
                Ok(l)
            }
            _ => Err(KvError::LeaseNotFound),
        }
    }

    /// Every lease (expired or not: none is revoked but by its timer) now
    /// expires no sooner than `ttl` after `now`, as etcd's leases do when
    /// a new leader takes over. Returns each lease's id and expiry.
    pub fn refresh_all(&mut self, now: u64) -> Vec<(i64, u64)> {
        self.map
            .values_mut()
            .map(|l| {
                l.expiry = l.expiry.max(expiry(now, l.ttl));
                (l.id, l.expiry)
            })
            .collect()
    }

    pub fn remove(&mut self, id: i64) -> Option<Lease> {
        self.map.remove(&id)
    }

    pub(crate) fn attach(&mut self, id: i64, key: Bytes) {
        if let Some(l) = self.map.get_mut(&id) {
            l.keys.insert(key);
        }
    }

    pub(crate) fn detach(&mut self, id: i64, key: &[u8]) {
        if let Some(l) = self.map.get_mut(&id) {
            l.keys.remove(key);
        }
    }

    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.i64(self.next_id).u64(self.map.len() as u64);
        for l in self.map.values() {
            w.i64(l.id).i64(l.ttl).u64(l.expiry);
        }
    }

    /// Reads leases written by `encode_into` (without their keys).
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Leases, KvError> {
        let next_id = r.i64()?;
        if next_id <= 0 {
            return Err(KvError::InvalidSnapshot(format!(
                "lease id counter {next_id}, expected a positive id"
            )));
        }
        let n = r.u64()?;
        let mut map = BTreeMap::new();
        let mut last: Option<i64> = None;
        for i in 0..n {
            let id = r.i64()?;
            let ttl = r.i64()?;
            let expiry = r.u64()?;
            if id == 0 || last.is_some_and(|l| l >= id) {
                return Err(KvError::InvalidSnapshot(format!(
                    "lease #{i} has id {id}: ids must be non-zero and increasing"
                )));
            }
            if !(1..=MAX_LEASE_TTL).contains(&ttl) {
                return Err(KvError::InvalidSnapshot(format!(
                    "lease {id} has TTL {ttl}, expected 1..={MAX_LEASE_TTL}"
                )));
            }
            map.insert(
                id,
                Lease {
                    id,
                    ttl,
                    expiry,
                    keys: BTreeSet::new(),
                },
            );
            last = Some(id);
        }
        Ok(Leases { map, next_id })
    }
}
