//! The in-memory MVCC store: every revision of every key until compacted,
//! the store revision and the compaction point. Writes go through a `Write`
//! batch at revision `current + 1`; each change in the batch gets the next
//! sub-revision, and the store revision moves once when the batch ends if
//! anything changed (etcd's `storeTxnWrite`). Also answers reads at past
//! revisions, the event history for watches, and the KV hash.
//!
//! Revisions start at 1 before any write, as in etcd; the first write gets
//! revision 2. The compaction point starts at -1 (etcd's `compactMainRev`).
//! Compacting at `c` keeps, per key, every entry at revision `>= c` and the
//! latest entry below `c` if it is a put (so reads at `c` and later, and
//! events from `c` on with their previous values, stay answerable); a key
//! whose only remaining history is a tombstone below `c` is dropped.

use crate::chunked::Chunked;
use crate::codec::{Reader, Writer};
use crate::crc::Crc32c;
use crate::error::KvError;
use crate::etcd::{EventType, WatchEvent};
use crate::keymap::KeyMap;
use crate::proto::{check_key, check_value, KeyValue};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

/// A key's entries in revision order, shared with snapshot captures
/// (`Store::image`): a capture takes a reference, and the store copies a
/// key's history only when it next changes that key (`Arc::make_mut`),
/// which copies a pointer per chunk of the older entries and the newest
/// few (`Chunked`), however long the history.
type History = Arc<Chunked<Entry>>;

/// Size estimate of one history entry beyond its key and value bytes.
const ENTRY_OVERHEAD: u64 = 64;

/// The state a put left.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    value: Bytes,
    create_revision: u64,
    version: u64,
    lease: i64,
}

/// One change of one key: a put (`Some`) or a delete (`None`) at
/// revision `(main, sub)`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    main: u64,
    sub: u32,
    put: Option<Version>,
}

/// The newest of a key's history entries at or before revision `rev`.
/// Most reads are of the latest state, so the newest entry is looked at
/// first: one cache miss, where a binary search over a long history costs
/// one per probe (the largest item on the service thread under txn-CAS).
fn as_of(hist: &Chunked<Entry>, rev: u64) -> Option<&Entry> {
    match hist.last() {
        Some(newest) if newest.main <= rev => Some(newest),
        _ => {
            let i = hist.partition_point(|e| e.main <= rev);
            hist.get(i.checked_sub(1)?)
        }
    }
}

impl Entry {
    fn kv(&self, key: &Bytes) -> Option<KeyValue> {
        self.put.as_ref().map(|v| KeyValue {
            key: key.clone(),
            value: v.value.clone(),
            create_revision: v.create_revision,
            mod_revision: self.main,
            version: v.version,
            lease: v.lease,
        })
    }
    fn size(&self, key: &[u8]) -> u64 {
        let value = self.put.as_ref().map_or(0, |v| v.value.len());
        (key.len() + value) as u64 + ENTRY_OVERHEAD
    }
}

/// etcd's tombstone as a watcher sees it.
fn tombstone(key: &Bytes, main: u64) -> KeyValue {
    KeyValue {
        key: key.clone(),
        mod_revision: main,
        ..KeyValue::default()
    }
}

/// The watch event of `e`, an entry of `key`'s history `hist`, with the
/// key's state as of the revision before it, as etcd reads it (at
/// mod_revision - 1): an earlier change in the same revision (a txn's) is
/// not it.
fn event_of(key: &Bytes, hist: &Chunked<Entry>, e: &Entry) -> WatchEvent {
    let prev_kv = as_of(hist, e.main - 1).and_then(|p| p.kv(key));
    match e.kv(key) {
        Some(kv) => WatchEvent {
            kind: EventType::Put,
            kv,
            prev_kv,
        },
        None => WatchEvent {
            kind: EventType::Delete,
            kv: tombstone(key, e.main),
            prev_kv,
        },
    }
}

/// About the most revision-index entries one `Store::events` call over a
/// range examines (it stops only between revisions).
pub const EVENTS_SCAN_BUDGET: usize = 16_384;

/// The MVCC key space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    revision: u64,
    compacted: i64,
    /// Every key with retained history, its entries in revision order
    /// (in slices a capture shares: `KeyMap`).
    keys: KeyMap<History>,
    /// Every retained entry by revision: an index for events and hashing.
    by_rev: BTreeMap<(u64, u32), Bytes>,
    /// Keys whose latest entry is a put.
    live: usize,
    /// Size estimate of the retained history, in bytes.
    size: u64,
}

impl Default for Store {
    fn default() -> Store {
        Store {
            revision: 1,
            compacted: -1,
            keys: KeyMap::default(),
            by_rev: BTreeMap::new(),
            live: 0,
            size: 0,
        }
    }
}

/// Is `key` in the range selected by `start`/`end` with etcd's conventions?
pub(crate) fn in_span(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Revision of the last write (1 before any).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The compaction point: -1 before the first compaction.
    pub fn compact_revision(&self) -> i64 {
        self.compacted
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Retained history entries (puts and deletes).
    pub fn history_len(&self) -> usize {
        self.by_rev.len()
    }

    /// Size estimate of the retained history in bytes.
    pub fn db_size(&self) -> u64 {
        self.size
    }

    /// The key's latest state.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.get_at(key, u64::MAX)
    }

    /// The key as of revision `rev` (no compaction check).
    pub fn get_at(&self, key: &[u8], rev: u64) -> Option<KeyValue> {
        let (k, hist) = self.keys.get_key_value(key)?;
        as_of(hist, rev)?.kv(k)
    }

    fn iter_span<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
    ) -> Box<dyn Iterator<Item = (&'a Bytes, &'a Chunked<Entry>)> + 'a> {
        let entries = |(k, h): (&'a Bytes, &'a History)| (k, &**h);
        if end.is_empty() {
            Box::new(self.keys.get_key_value(start).into_iter().map(entries))
        } else if end == [0] {
            Box::new(self.keys.range(start, Bound::Unbounded).map(entries))
        } else if end <= start {
            Box::new(std::iter::empty())
        } else {
            Box::new(self.keys.range(start, Bound::Excluded(end)).map(entries))
        }
    }

    /// The keys in the range as of revision `rev`, in key order: the first
    /// `take` of them, and how many there are in all.
    pub fn range_at(
        &self,
        start: &[u8],
        end: &[u8],
        rev: u64,
        take: usize,
    ) -> (Vec<KeyValue>, u64) {
        let mut kvs = Vec::new();
        let mut count = 0u64;
        for (k, hist) in self.iter_span(start, end) {
            let Some(e) = as_of(hist, rev).filter(|e| e.put.is_some()) else {
                continue;
            };
            if kvs.len() < take {
                kvs.extend(e.kv(k));
            }
            count += 1;
        }
        (kvs, count)
    }

    /// Latest keys in the range in key order: at most `limit` (0 = all),
    /// whether more were left out, and how many the range holds in total.
    pub fn range(&self, start: &[u8], end: &[u8], limit: u64) -> (Vec<KeyValue>, bool, u64) {
        let take = if limit == 0 {
            usize::MAX
        } else {
            usize::try_from(limit).unwrap_or(usize::MAX)
        };
        let (kvs, count) = self.range_at(start, end, u64::MAX, take);
        let more = count > kvs.len() as u64;
        (kvs, more, count)
    }

    /// etcd's revision rules for a read at `requested` when the current
    /// revision is `current`: a future revision fails, `<= 0` means
    /// `current`, and a revision below the compaction point fails.
    pub fn read_revision(&self, requested: i64, current: u64) -> Result<u64, KvError> {
        if requested > 0 && requested as u64 > current {
            return Err(KvError::FutureRevision);
        }
        let rev = if requested <= 0 {
            current
        } else {
            requested as u64
        };
        if (rev as i128) < i128::from(self.compacted) {
            return Err(KvError::Compacted);
        }
        Ok(rev)
    }

    /// Compacts history at `rev` (see the module docs). Fails like etcd:
    /// at or below the current compaction point, or above the revision.
    pub fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        if rev <= self.compacted {
            return Err(KvError::Compacted);
        }
        if rev > 0 && rev as u64 > self.revision {
            return Err(KvError::FutureRevision);
        }
        let before = u64::try_from(self.compacted).unwrap_or(0);
        self.compacted = rev;
        if rev <= 0 {
            return Ok(());
        }
        let c = rev as u64;
        // As etcd's compaction: of a key's entries at or below `c`, only the
        // latest is kept, and only if it is a put (a delete at `c` itself is
        // dropped with the rest). A key with no entry after the previous
        // compaction point already is that way, so only keys written since
        // are visited: a compaction costs what it removes, not the number
        // of keys (automatic compaction runs every second or so).
        let touched: BTreeSet<Bytes> = self
            .by_rev
            .range((before + 1, 0)..(c + 1, 0))
            .map(|(_, k)| k.clone())
            .collect();
        for key in touched {
            let Some(hist) = self.keys.get(&key) else {
                continue;
            };
            let below = hist.partition_point(|e| e.main <= c);
            let keep_from = match below.checked_sub(1).and_then(|i| hist.get(i)) {
                Some(e) if e.put.is_some() => below - 1,
                _ => below,
            };
            if keep_from == 0 {
                // Nothing to drop: a history (and its slice of keys) that
                // a capture shares is not copied.
                continue;
            }
            for e in hist.iter().take(keep_from) {
                self.by_rev.remove(&(e.main, e.sub));
                self.size = self.size.saturating_sub(e.size(&key));
            }
            let Some(hist) = self.keys.get_mut(&key) else {
                continue;
            };
            let hist = Arc::make_mut(hist);
            hist.drop_front(keep_from);
            hist.shrink();
            if hist.is_empty() {
                self.keys.remove(&key);
            }
        }
        Ok(())
    }

    /// Changes to keys in the range at revisions `>= from` (0 counts as 1)
    /// in revision order: at least `limit` of them if there are (0 = all),
    /// never stopping inside a revision; and, if it stopped before the
    /// current revision, the revision to ask again from (every change in
    /// the range below it was returned, now or before).
    ///
    /// A watch catching up from an old revision runs this on the service
    /// thread, between applies, so one call's work is bounded: a single
    /// key's changes are read from its own history, and a range's from the
    /// revision index, of which one call examines about
    /// `EVENTS_SCAN_BUDGET` entries at most (a narrow range over a long
    /// history may then answer with no events and a revision to go on
    /// from).
    pub fn events(
        &self,
        start: &[u8],
        end: &[u8],
        from: u64,
        limit: u64,
    ) -> Result<(Vec<WatchEvent>, Option<u64>), KvError> {
        let from = from.max(1);
        if (from as i128) < i128::from(self.compacted) {
            return Err(KvError::Compacted);
        }
        let limit = if limit == 0 {
            usize::MAX
        } else {
            usize::try_from(limit).unwrap_or(usize::MAX)
        };
        if end.is_empty() {
            return Ok(self.key_events(start, from, limit));
        }
        let mut events = Vec::new();
        let mut last_main = None;
        for (scanned, (&(main, sub), key)) in self.by_rev.range((from, 0)..).enumerate() {
            if last_main != Some(main) {
                // Every change below `main` has been seen: a place to stop.
                if events.len() >= limit || scanned >= EVENTS_SCAN_BUDGET {
                    return Ok((events, Some(main)));
                }
                last_main = Some(main);
            }
            if !in_span(key, start, end) {
                continue;
            }
            let Some(hist) = self.keys.get(key) else {
                continue;
            };
            let Ok(i) = hist.binary_search_by(|e| (e.main, e.sub).cmp(&(main, sub))) else {
                continue;
            };
            if let Some(e) = hist.get(i) {
                events.push(event_of(key, hist, e));
            }
        }
        Ok((events, None))
    }

    /// `events` of one key, from its own history.
    fn key_events(&self, key: &[u8], from: u64, limit: usize) -> (Vec<WatchEvent>, Option<u64>) {
        let mut events = Vec::new();
        let Some((key, hist)) = self.keys.get_key_value(key) else {
            return (events, None);
        };
        let mut last_main = None;
        for i in hist.partition_point(|e| e.main < from)..hist.len() {
            let Some(e) = hist.get(i) else {
                break;
            };
            if last_main != Some(e.main) && events.len() >= limit {
                return (events, Some(e.main));
            }
            last_main = Some(e.main);
            events.push(event_of(key, hist, e));
        }
        (events, None)
    }

    /// A CRC-32C over the retained history up to revision `rev` (`0`: the
    /// current one), in revision order, with etcd's HashKV revision
    /// rules: `rev` at or below the compaction point, or above the current
    /// revision, fails; a negative `rev` covers no entry (etcd 3.4 hashes
    /// the revisions below `rev + 1`, so none, and answers the hash of its
    /// empty key bucket: the same value as this one's). Every entry contributes its revision (main, sub as
    /// big-endian u64s, as etcd's bolt keys), a tombstone mark, the key, and
    /// for puts value, create revision, version and lease. Deterministic
    /// across replicas; not equal to etcd's own hash.
    pub fn hash_kv(&self, rev: i64) -> Result<u32, KvError> {
        if rev > 0 && rev <= self.compacted {
            return Err(KvError::Compacted);
        }
        if rev > 0 && rev as u64 > self.revision {
            return Err(KvError::FutureRevision);
        }
        let mut h = Crc32c::new();
        h.update(b"key");
        if rev < 0 {
            return Ok(h.finish());
        }
        let upto = if rev == 0 { self.revision } else { rev as u64 };
        for (&(main, sub), key) in self.by_rev.range(..=(upto, u32::MAX)) {
            let Some(e) = self.keys.get(key).and_then(|hist| {
                hist.binary_search_by(|e| (e.main, e.sub).cmp(&(main, sub)))
                    .ok()
                    .map(|i| &hist[i])
            }) else {
                continue;
            };
            h.update(&main.to_be_bytes());
            h.update(&u64::from(sub).to_be_bytes());
            h.update(if e.put.is_some() { b"p" } else { b"t" });
            h.update(&(key.len() as u64).to_le_bytes());
            h.update(key);
            if let Some(v) = &e.put {
                h.update(&(v.value.len() as u64).to_le_bytes());
                h.update(&v.value);
                h.update(&v.create_revision.to_le_bytes());
                h.update(&v.version.to_le_bytes());
                h.update(&v.lease.to_le_bytes());
            }
        }
        Ok(h.finish())
    }

    /// Live keys with a lease, and the lease.
    pub(crate) fn leased_keys(&self) -> impl Iterator<Item = (&Bytes, i64)> + '_ {
        self.keys.iter().filter_map(|(k, hist)| {
            let lease = hist.last()?.put.as_ref()?.lease;
            (lease != 0).then_some((k, lease))
        })
    }

    /// Starts a write batch at revision `revision() + 1`.
    pub fn write(&mut self) -> Write<'_> {
        self.write_with_events(true)
    }

    /// `write`, building the batch's watch events only if `events` (each
    /// costs two `KeyValue` copies that nobody may take).
    pub fn write_with_events(&mut self, events: bool) -> Write<'_> {
        let main = self.revision.saturating_add(1);
        Write {
            store: self,
            main,
            next_sub: 0,
            events: Vec::new(),
            record: events,
            changed: false,
        }
    }

    fn push(&mut self, key: Bytes, entry: Entry) {
        self.size = self.size.saturating_add(entry.size(&key));
        self.by_rev.insert((entry.main, entry.sub), key.clone());
        Arc::make_mut(self.keys.slot(key).1).push(entry);
    }

    /// Appends the store's state to a snapshot.
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        encode_history(self.revision, self.compacted, &self.keys, w, &mut |_| {});
    }

    /// What `encode_into` writes, captured now to be encoded later (on
    /// another thread): the history only, each key's shared rather than
    /// copied (the store copies a key's history when it next changes it).
    /// The revision index and the counts are rebuilt when a snapshot is
    /// decoded, so they are not copied at all. The capture runs on the
    /// service thread between entries: it costs a reference per slice of
    /// keys (`KeyMap`), where copying every entry took 25-50 ms with ~350k
    /// revisions retained, and a reference per key 68-207 ms with 1M keys.
    pub(crate) fn image(&self) -> StoreImage {
        StoreImage {
            revision: self.revision,
            compacted: self.compacted,
            keys: self.keys.clone(),
        }
    }

    /// Reads a state written by `encode_into`, checking its invariants.
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<Store, KvError> {
        let revision = r.u64()?;
        let compacted = r.i64()?;
        // (etcd's revisions are int64: one above would make no valid
        // revision follow it.)
        if revision == 0
            || revision > i64::MAX as u64
            || compacted < -1
            || (compacted > 0 && compacted as u64 > revision)
        {
            return Err(KvError::InvalidSnapshot(format!(
                "inconsistent store revision {revision} with compaction point {compacted}"
            )));
        }
        let n = r.u64()?;
        let mut store = Store {
            revision,
            compacted,
            ..Store::default()
        };
        let mut last: Option<Bytes> = None;
        for i in 0..n {
            let key = r.bytes()?;
            let bad = |why: String| KvError::InvalidSnapshot(format!("key #{i} {key:?}: {why}"));
            check_key(&key).map_err(|e| bad(e.to_string()))?;
            if last.as_ref().is_some_and(|l| *l >= key) {
                return Err(bad("keys not in strictly increasing order".into()));
            }
            let entries = r.count(8 + 4 + 1)?;
            if entries == 0 {
                return Err(bad("no history".into()));
            }
            let mut prev: Option<Entry> = None;
            for j in 0..entries {
                let main = r.u64()?;
                let sub = r.u32()?;
                let put = if r.bool()? {
                    Some(Version {
                        value: r.bytes()?,
                        create_revision: r.u64()?,
                        version: r.u64()?,
                        lease: r.i64()?,
                    })
                } else {
                    None
                };
                let e = Entry { main, sub, put };
                check_entry(&e, prev.as_ref(), j, revision, compacted).map_err(&bad)?;
                if let Some(v) = &e.put {
                    check_value(&v.value).map_err(|e| bad(e.to_string()))?;
                }
                if store.by_rev.contains_key(&(main, sub)) {
                    return Err(bad(format!("revision ({main}, {sub}) used twice")));
                }
                store.push(key.clone(), e.clone());
                prev = Some(e);
            }
            if prev.is_some_and(|e| e.put.is_some()) {
                store.live += 1;
            }
            last = Some(key);
        }
        Ok(store)
    }
}

/// One entry's invariants, given the key's previous entry.
fn check_entry(
    e: &Entry,
    prev: Option<&Entry>,
    index: usize,
    revision: u64,
    compacted: i64,
) -> Result<(), String> {
    if e.main < 2 || e.main > revision {
        return Err(format!("entry revision {} outside 2..={revision}", e.main));
    }
    if let Some(p) = prev {
        if (p.main, p.sub) >= (e.main, e.sub) {
            return Err("entries not in increasing revision order".into());
        }
    }
    if (e.main as i128) < i128::from(compacted) && (index > 0 || e.put.is_none()) {
        return Err(format!(
            "history below the compaction point {compacted} beyond one put"
        ));
    }
    match (&e.put, prev.map(|p| &p.put)) {
        (None, Some(None)) => Err("two deletes in a row".into()),
        (None, _) => Ok(()),
        (Some(v), Some(Some(p))) => {
            if v.create_revision == p.create_revision && v.version == p.version.saturating_add(1) {
                Ok(())
            } else {
                Err(format!(
                    "create {} version {} does not continue create {} version {}",
                    v.create_revision, v.version, p.create_revision, p.version
                ))
            }
        }
        (Some(v), Some(None)) => {
            if v.create_revision == e.main && v.version == 1 {
                Ok(())
            } else {
                Err(format!(
                    "re-creation at {} with create {} version {}",
                    e.main, v.create_revision, v.version
                ))
            }
        }
        (Some(v), None) => {
            if v.create_revision >= 2 && v.create_revision <= e.main && v.version >= 1 {
                Ok(())
            } else {
                Err(format!(
                    "inconsistent metadata create {} mod {} version {}",
                    v.create_revision, e.main, v.version
                ))
            }
        }
    }
}

/// A captured copy of the store's history (`Store::image`).
pub(crate) struct StoreImage {
    revision: u64,
    compacted: i64,
    keys: KeyMap<History>,
}

impl StoreImage {
    /// Writes what `Store::encode_into` wrote when this was captured,
    /// calling `spill` after each key so the caller can pass on and clear
    /// what is in `w` (a snapshot streamed to its file in pieces).
    pub(crate) fn encode_streaming(&self, w: &mut Writer, spill: &mut dyn FnMut(&mut Writer)) {
        encode_history(self.revision, self.compacted, &self.keys, w, spill);
    }
}

fn encode_history(
    revision: u64,
    compacted: i64,
    keys: &KeyMap<History>,
    w: &mut Writer,
    spill: &mut dyn FnMut(&mut Writer),
) {
    w.u64(revision).i64(compacted).u64(keys.len() as u64);
    for (k, hist) in keys.iter() {
        spill(w);
        w.bytes(k).count(hist.len());
        for e in hist.iter() {
            w.u64(e.main).u32(e.sub).bool(e.put.is_some());
            if let Some(v) = &e.put {
                w.bytes(&v.value)
                    .u64(v.create_revision)
                    .u64(v.version)
                    .i64(v.lease);
            }
        }
    }
}

/// A batch of changes made at one revision. Changes apply as they are
/// made; the store revision moves to the batch's when it ends (`commit` or
/// drop) if anything changed.
pub struct Write<'a> {
    store: &'a mut Store,
    main: u64,
    next_sub: u32,
    events: Vec<WatchEvent>,
    /// Build `events` at all.
    record: bool,
    changed: bool,
}

impl Write<'_> {
    /// The revision the batch writes at.
    pub fn revision(&self) -> u64 {
        self.main
    }

    /// The store revision before the batch.
    pub fn begin_revision(&self) -> u64 {
        self.main - 1
    }

    /// Has the batch changed anything yet?
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// The revision reads inside the batch see (etcd: the batch's own
    /// revision once it wrote something).
    pub fn read_revision(&self) -> u64 {
        if self.changed {
            self.main
        } else {
            self.main - 1
        }
    }

    pub fn store(&self) -> &Store {
        self.store
    }

    /// The key's current state within the batch.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        self.store.get(key)
    }

    fn next(&mut self) -> u32 {
        let sub = self.next_sub;
        self.next_sub = self.next_sub.saturating_add(1);
        self.changed = true;
        sub
    }

    /// Sets `key` to `value` with `lease`; returns the previous state and
    /// the new one.
    pub fn put(&mut self, key: Bytes, value: Bytes, lease: i64) -> (Option<KeyValue>, KeyValue) {
        self.put_answering(key, value, lease, true)
            .1
            .unwrap_or_default()
    }

    /// Puts `key`: the lease of the version it replaced (none: the key had
    /// no live version), and, if `answer`, its state before and after (as
    /// `put`). Each state made costs two reference-count updates on shared
    /// buffers (key and value), on memory the put otherwise need not touch,
    /// so an etcd put that asks for neither does without them.
    pub fn put_answering(
        &mut self,
        key: Bytes,
        value: Bytes,
        lease: i64,
        answer: bool,
    ) -> (Option<i64>, Option<(Option<KeyValue>, KeyValue)>) {
        let sub = self.next();
        let main = self.main;
        let answer = answer || self.record;
        // One search of the key tree for both the key's last state and the
        // new entry (it was two; the key searches were ~5% of the cluster's
        // CPU samples in a put benchmark).
        let store = &mut *self.store;
        let (key, hist) = store.keys.slot(key);
        let hist = Arc::make_mut(hist);
        let prev = hist.last().and_then(|e| e.put.as_ref());
        let prev_lease = prev.map(|p| p.lease);
        let (create_revision, version) = match prev {
            Some(p) => (p.create_revision, p.version.saturating_add(1)),
            None => (main, 1),
        };
        let prev = answer.then(|| hist.last().and_then(|e| e.kv(&key)));
        // A watcher's previous state is the key's as of the revision
        // before (see `Store::events`), not an earlier change in this batch.
        let event_prev = (self.record && hist.last().is_some_and(|e| e.main == main))
            .then(|| as_of(hist, main - 1).and_then(|e| e.kv(&key)));
        let e = Entry {
            main,
            sub,
            put: Some(Version {
                value,
                create_revision,
                version,
                lease,
            }),
        };
        store.size = store.size.saturating_add(e.size(&key));
        hist.push(e);
        let states = prev.map(|prev| {
            let kv = hist.last().and_then(|e| e.kv(&key)).unwrap_or_default();
            (prev, kv)
        });
        store.by_rev.insert((main, sub), key);
        if prev_lease.is_none() {
            store.live += 1;
        }
        if let Some((prev, kv)) = states.as_ref().filter(|_| self.record) {
            self.events.push(WatchEvent {
                kind: EventType::Put,
                kv: kv.clone(),
                prev_kv: event_prev.unwrap_or_else(|| prev.clone()),
            });
        }
        (prev_lease, states)
    }

    /// Deletes `key`; returns its last state if it existed.
    pub fn delete(&mut self, key: &[u8]) -> Option<KeyValue> {
        let prev = self.store.get(key)?;
        let sub = self.next();
        let e = Entry {
            main: self.main,
            sub,
            put: None,
        };
        self.store.live = self.store.live.saturating_sub(1);
        self.store.push(prev.key.clone(), e);
        if self.record {
            // As for a put: the state as of the revision before.
            let prev_kv = if prev.mod_revision == self.main {
                self.store.get_at(key, self.main - 1)
            } else {
                Some(prev.clone())
            };
            self.events.push(WatchEvent {
                kind: EventType::Delete,
                kv: tombstone(&prev.key, self.main),
                prev_kv,
            });
        }
        Some(prev)
    }

    /// Deletes every live key in the range; returns their last states in
    /// key order.
    pub fn delete_range(&mut self, start: &[u8], end: &[u8]) -> Vec<KeyValue> {
        let (live, _) = self.store.range_at(start, end, u64::MAX, usize::MAX);
        for kv in &live {
            self.delete(&kv.key);
        }
        live
    }

    /// Ends the batch: the store revision afterwards and the events made.
    pub fn commit(mut self) -> (u64, Vec<WatchEvent>) {
        if self.changed {
            self.store.revision = self.main;
        }
        (self.store.revision, std::mem::take(&mut self.events))
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        if self.changed {
            self.store.revision = self.main;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compaction_that_drops_nothing_copies_nothing_a_capture_shares() {
        let mut s = Store::new();
        let mut w = s.write();
        for k in 0..20 {
            w.put(Bytes::from(format!("k{k:02}")), Bytes::from_static(b"v"), 0);
        }
        w.commit();
        let image = s.image();
        // Every key has one put, at or below the compaction point: kept.
        s.compact(s.revision() as i64).unwrap();
        assert!(s.keys.shares_every_slice_with(&image.keys));
        assert_eq!(s.history_len(), 20);
    }

    #[test]
    fn a_watchers_previous_state_is_the_one_before_the_revision() {
        // Found by etcd_diff (seed 9402): a txn that changes a key twice.
        let mut s = Store::new();
        let k = || Bytes::from_static(b"k");
        let mut w = s.write();
        w.put(k(), Bytes::from_static(b"v1"), 0);
        w.commit();
        let mut w = s.write();
        w.put(k(), Bytes::from_static(b"v2"), 0);
        w.delete(b"k");
        w.put(k(), Bytes::from_static(b"v3"), 0);
        let (rev, live) = w.commit();
        let (history, _) = s.events(b"k", b"", rev, 0).unwrap();
        assert_eq!(history, live);
        assert_eq!(live.len(), 3);
        for e in &live {
            let prev = e.prev_kv.as_ref().expect("k existed before");
            assert_eq!((&prev.value[..], prev.mod_revision), (&b"v1"[..], rev - 1));
        }
    }
}
