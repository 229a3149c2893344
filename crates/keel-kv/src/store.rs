//! The in-memory MVCC store: the latest value and metadata of every key and
//! the store revision. Writes go through a `Write` batch that bumps the
//! revision once and records the `Event`s it made, so history, watches and
//! compaction can later be layered on the event stream without touching
//! the command semantics.

use crate::codec::{Reader, Writer};
use crate::error::KvError;
use crate::proto::{check_key, check_value, KeyValue};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::ops::Bound;

/// What the store keeps per live key (the key itself is the map key).
#[derive(Clone, Debug, PartialEq, Eq)]
struct KeyState {
    value: Bytes,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

impl KeyState {
    fn to_kv(&self, key: &Bytes) -> KeyValue {
        KeyValue {
            key: key.clone(),
            value: self.value.clone(),
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

/// One change made by a write, at the write's revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The key now holds this (version 1 means it was created).
    Put(KeyValue),
    /// The key was deleted; this was its last state.
    Delete(KeyValue),
}

/// Keys and their latest values, with etcd-style revisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Store {
    revision: u64,
    keys: BTreeMap<Bytes, KeyState>,
}

/// The key range selected by `start`/`end` with etcd's conventions.
enum Span<'a> {
    Empty,
    One(&'a [u8]),
    From(&'a [u8]),
    Between(&'a [u8], &'a [u8]),
}

fn span<'a>(start: &'a [u8], end: &'a [u8]) -> Span<'a> {
    if end.is_empty() {
        Span::One(start)
    } else if end == [0] {
        Span::From(start)
    } else if end <= start {
        Span::Empty
    } else {
        Span::Between(start, end)
    }
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Revision of the last write (0 before any).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.keys.get_key_value(key).map(|(k, s)| s.to_kv(k))
    }

    fn iter_span<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
    ) -> Box<dyn Iterator<Item = (&'a Bytes, &'a KeyState)> + 'a> {
        match span(start, end) {
            Span::Empty => Box::new(std::iter::empty()),
            Span::One(k) => Box::new(self.keys.get_key_value(k).into_iter()),
            Span::From(s) => Box::new(
                self.keys
                    .range::<[u8], _>((Bound::Included(s), Bound::Unbounded)),
            ),
            Span::Between(s, e) => Box::new(
                self.keys
                    .range::<[u8], _>((Bound::Included(s), Bound::Excluded(e))),
            ),
        }
    }

    /// Keys in the range in key order: at most `limit` (0 = all), whether
    /// more were left out, and how many the range holds in total.
    pub fn range(&self, start: &[u8], end: &[u8], limit: u64) -> (Vec<KeyValue>, bool, u64) {
        let limit = if limit == 0 {
            usize::MAX
        } else {
            usize::try_from(limit).unwrap_or(usize::MAX)
        };
        let mut kvs = Vec::new();
        let mut count = 0u64;
        for (k, s) in self.iter_span(start, end) {
            if kvs.len() < limit {
                kvs.push(s.to_kv(k));
            }
            count += 1;
        }
        let more = count > kvs.len() as u64;
        (kvs, more, count)
    }

    /// Starts a write batch at revision `revision() + 1`.
    pub fn write(&mut self) -> Write<'_> {
        let revision = self.revision.saturating_add(1);
        Write {
            store: self,
            revision,
            events: Vec::new(),
        }
    }

    /// Appends the store's state to a snapshot.
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.u64(self.revision).u64(self.keys.len() as u64);
        for (k, s) in &self.keys {
            w.bytes(k)
                .bytes(&s.value)
                .u64(s.create_revision)
                .u64(s.mod_revision)
                .u64(s.version);
        }
    }

    /// Reads a state written by `encode_into`, checking its invariants.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Store, KvError> {
        let revision = r.u64()?;
        let n = r.u64()?;
        let mut keys = BTreeMap::new();
        let mut last: Option<Bytes> = None;
        for i in 0..n {
            let key = r.bytes()?;
            let value = r.bytes()?;
            let s = KeyState {
                value,
                create_revision: r.u64()?,
                mod_revision: r.u64()?,
                version: r.u64()?,
            };
            let bad = |why: String| KvError::InvalidSnapshot(format!("key #{i} {key:?}: {why}"));
            check_key(&key).map_err(|e| bad(e.to_string()))?;
            check_value(&s.value).map_err(|e| bad(e.to_string()))?;
            if last.as_ref().is_some_and(|l| *l >= key) {
                return Err(bad("keys not in strictly increasing order".into()));
            }
            let ok = s.create_revision >= 1
                && s.create_revision <= s.mod_revision
                && s.mod_revision <= revision
                && s.version >= 1
                && s.version - 1 <= s.mod_revision - s.create_revision;
            if !ok {
                return Err(bad(format!(
                    "inconsistent metadata create {} mod {} version {} at store revision {}",
                    s.create_revision, s.mod_revision, s.version, revision
                )));
            }
            last = Some(key.clone());
            keys.insert(key, s);
        }
        Ok(Store { revision, keys })
    }
}

/// A batch of changes made at one revision. Changes apply as they are
/// made; `commit` bumps the store revision if anything changed.
pub struct Write<'a> {
    store: &'a mut Store,
    revision: u64,
    events: Vec<Event>,
}

impl Write<'_> {
    /// The revision the batch writes at (if it changes anything).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The key's current state within the batch.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.store.get(key)
    }

    /// Sets `key` to `value`; returns the previous state and the new one.
    pub fn put(&mut self, key: Bytes, value: Bytes) -> (Option<KeyValue>, KeyValue) {
        let rev = self.revision;
        let prev = self.store.get(&key);
        let state = match &prev {
            Some(p) => KeyState {
                value,
                create_revision: p.create_revision,
                mod_revision: rev,
                version: p.version.saturating_add(1),
            },
            None => KeyState {
                value,
                create_revision: rev,
                mod_revision: rev,
                version: 1,
            },
        };
        let kv = state.to_kv(&key);
        self.store.keys.insert(key, state);
        self.events.push(Event::Put(kv.clone()));
        (prev, kv)
    }

    /// Deletes `key`; returns its last state if it existed.
    pub fn delete(&mut self, key: &[u8]) -> Option<KeyValue> {
        let (k, s) = self.store.keys.remove_entry(key)?;
        let kv = s.to_kv(&k);
        self.events.push(Event::Delete(kv.clone()));
        Some(kv)
    }

    /// Deletes every key in the range; returns their last states in order.
    pub fn delete_range(&mut self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let keys: Vec<Bytes> = self
            .store
            .iter_span(start, end)
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| self.delete(k)).collect()
    }

    /// Ends the batch: the store revision afterwards and the events made.
    pub fn commit(self) -> (u64, Vec<Event>) {
        if !self.events.is_empty() {
            self.store.revision = self.revision;
        }
        (self.store.revision, self.events)
    }
}
