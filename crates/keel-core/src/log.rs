//! The in-memory view of the replicated log the core reasons about: entries
//! after the latest snapshot, addressed by byte position, with (term,
//! position) comparison, divergent-tail truncation and compaction.
//!
//! Entries whose data nobody here needs any more (applied, committed and
//! durable, and older than the cache window) can be made *hollow*
//! (`evict_data`): their term, position, timestamp and kind stay, so every
//! lookup works as before, but their data is replaced by a shared static
//! run of zeros of the same length, which costs no memory. A hollow entry
//! must never be sent or applied: `entries_from` stops before one, and a
//! leader reads a run of them back from storage instead (`hollow_run`).

use crate::types::{Entry, Nanos, Position, Term};
use bytes::Bytes;
use std::collections::VecDeque;

/// Largest entry data a hollow entry can stand in for; larger entries keep
/// their data.
const MAX_HOLLOW: usize = 64 << 20;

/// What hollow entries' data points at. All zeros, so it lives in the
/// binary's zero-initialized section: address space, no memory, until read.
static HOLLOW: [u8; MAX_HOLLOW] = [0; MAX_HOLLOW];

/// Is `e`'s data dropped from memory (see the module docs)?
pub fn is_hollow(e: &Entry) -> bool {
    !e.data.is_empty() && std::ptr::eq(e.data.as_ptr(), HOLLOW.as_ptr())
}

#[derive(Clone, Debug, Default)]
pub struct Log {
    /// Position, term and timestamp of the last entry covered by the snapshot.
    base_pos: Position,
    base_term: Term,
    base_timestamp: Nanos,
    /// Entries after the snapshot, contiguous: entries[0].position == base_pos.
    entries: VecDeque<Entry>,
    /// Entries ending at or before this position were made hollow where
    /// they could be (`evict_data`); the rest hold their data.
    hollow_upto: Position,
    /// Log bytes (`encoded_len`) of the hollow entries held.
    hollow_bytes: u64,
}

impl Log {
    pub fn new(base_pos: Position, base_term: Term, base_timestamp: Nanos) -> Self {
        Log {
            base_pos,
            base_term,
            base_timestamp,
            entries: VecDeque::new(),
            hollow_upto: base_pos,
            hollow_bytes: 0,
        }
    }

    /// Bytes of log held in memory: the log after the snapshot less its
    /// hollow entries.
    pub fn held_bytes(&self) -> u64 {
        (self.last_pos() - self.base_pos).saturating_sub(self.hollow_bytes)
    }

    /// Makes every entry ending at or before `upto` hollow (see the module
    /// docs): the caller guarantees none of them will be applied or
    /// truncated again and that storage can read them back. Costs only the
    /// entries not made hollow before.
    pub fn evict_data(&mut self, upto: Position) {
        if upto <= self.hollow_upto {
            return;
        }
        let start = match search_newest_first(&self.entries, self.hollow_upto, |e| e.position) {
            Ok(i) | Err(i) => i,
        };
        for e in self.entries.range_mut(start..) {
            if e.end() > upto {
                break;
            }
            let len = e.data.len();
            if len > 0 && len <= MAX_HOLLOW && !is_hollow(e) {
                e.data = Bytes::from_static(&HOLLOW[..len]);
                self.hollow_bytes += e.encoded_len();
            }
            self.hollow_upto = e.end();
        }
    }

    /// If the entry starting at `from` is hollow: where the run of hollow
    /// entries from there ends, at most `max_bytes` of them (but at least
    /// one). Those are the entries to read back from storage.
    pub fn hollow_run(&self, from: Position, max_bytes: u64) -> Option<Position> {
        let start = self.index_starting_at(from)?;
        let mut end = None;
        let mut bytes = 0;
        for e in self.entries.range(start..) {
            let len = e.encoded_len();
            if !is_hollow(e) || (end.is_some() && bytes + len > max_bytes) {
                break;
            }
            bytes += len;
            end = Some(e.end());
        }
        end
    }

    /// First position the log can serve entries from (the snapshot position).
    pub fn first_pos(&self) -> Position {
        self.base_pos
    }
    pub fn base_term(&self) -> Term {
        self.base_term
    }
    pub fn last_pos(&self) -> Position {
        self.entries.back().map_or(self.base_pos, Entry::end)
    }
    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.base_term, |e| e.term)
    }
    pub fn last_timestamp(&self) -> Nanos {
        self.entries
            .back()
            .map_or(self.base_timestamp, |e| e.timestamp)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Index of the entry that ends exactly at `pos`.
    fn index_ending_at(&self, pos: Position) -> Option<usize> {
        search_newest_first(&self.entries, pos, Entry::end).ok()
    }
    /// Index of the entry that starts exactly at `pos`.
    fn index_starting_at(&self, pos: Position) -> Option<usize> {
        search_newest_first(&self.entries, pos, |e| e.position).ok()
    }

    /// Term of the entry ending exactly at `pos` (an entry boundary), or None
    /// if `pos` is not a boundary this log knows.
    pub fn term_at(&self, pos: Position) -> Option<Term> {
        if pos == self.base_pos {
            return Some(self.base_term);
        }
        if pos < self.base_pos {
            return None;
        }
        self.index_ending_at(pos).map(|i| self.entries[i].term)
    }

    /// Timestamp of the entry ending exactly at `pos`.
    pub fn timestamp_at(&self, pos: Position) -> Option<Nanos> {
        if pos == self.base_pos {
            return Some(self.base_timestamp);
        }
        self.index_ending_at(pos).map(|i| self.entries[i].timestamp)
    }

    /// The entry starting at `pos`, if held.
    pub fn entry_at(&self, pos: Position) -> Option<&Entry> {
        self.index_starting_at(pos).map(|i| &self.entries[i])
    }

    /// Is a log ending in (`last_term`, `last_pos`) at least as up to date as
    /// this one? Logs compare by last term, then by position.
    pub fn is_up_to_date(&self, last_term: Term, last_pos: Position) -> bool {
        (last_term, last_pos) >= (self.last_term(), self.last_pos())
    }

    /// The largest boundary `p <= pos` whose term is `<= term`: where a leader
    /// should resume after a rejection hint, and what a follower reports as
    /// its hint. Falls back to the snapshot position.
    pub fn last_boundary_at_or_before(&self, pos: Position, term: Term) -> (Position, Term) {
        let upto = match search_newest_first(&self.entries, pos, Entry::end) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        for e in self.entries.range(..upto).rev() {
            if e.term <= term {
                return (e.end(), e.term);
            }
        }
        (self.base_pos, self.base_term)
    }

    /// Entries starting at `from` (an entry boundary), at most `max_bytes`
    /// of them but always at least one if any exists, stopping before a
    /// hollow one (see `hollow_run`).
    pub fn entries_from(&self, from: Position, max_bytes: u64) -> Vec<Entry> {
        let Some(start) = self.index_starting_at(from) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in self.entries.range(start..) {
            let len = e.encoded_len();
            if is_hollow(e) || (!out.is_empty() && bytes + len > max_bytes) {
                break;
            }
            bytes += len;
            out.push(e.clone());
        }
        out
    }

    /// Entries in (`after`, `upto`], both boundaries.
    pub fn entries_between(&self, after: Position, upto: Position) -> Vec<Entry> {
        let start = if after <= self.base_pos {
            0
        } else {
            match self.index_ending_at(after) {
                Some(i) => i + 1,
                None => return Vec::new(),
            }
        };
        let out: Vec<Entry> = self
            .entries
            .range(start..)
            .take_while(|e| e.end() <= upto)
            .cloned()
            .collect();
        debug_assert!(!out.iter().any(is_hollow), "hollow entries to apply");
        out
    }

    /// Iterates all entries held.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Appends an entry that must start at `last_pos()`.
    pub fn push(&mut self, e: Entry) {
        debug_assert_eq!(e.position, self.last_pos());
        self.entries.push_back(e);
    }

    /// Removes every entry starting at or after `pos` (a boundary).
    pub fn truncate_from(&mut self, pos: Position) {
        while self.entries.back().is_some_and(|e| e.position >= pos) {
            if let Some(e) = self.entries.pop_back().filter(is_hollow) {
                // Not done by the core (only uncommitted entries are cut),
                // but kept consistent all the same.
                self.hollow_bytes = self.hollow_bytes.saturating_sub(e.encoded_len());
            }
        }
        self.hollow_upto = self.hollow_upto.min(self.last_pos());
    }

    /// Drops every entry ending at or before `pos`, which becomes the new
    /// base. If the log does not hold `pos` with `term`, it is emptied.
    ///
    /// Returns the dropped entries rather than freeing them here: a
    /// snapshot interval's worth is hundreds of thousands of entries, tens
    /// of milliseconds to free, which the caller may do on another thread.
    /// Costs a copy of the entries kept, not of those dropped.
    #[must_use = "dropping the returned entries frees them on this thread"]
    pub fn compact_to(&mut self, pos: Position, term: Term, timestamp: Nanos) -> VecDeque<Entry> {
        let dropped = if self.term_at(pos) == Some(term) {
            let upto = self.entries.partition_point(|e| e.end() <= pos);
            let kept = self.entries.split_off(upto);
            std::mem::replace(&mut self.entries, kept)
        } else {
            std::mem::take(&mut self.entries)
        };
        let dropped_hollow: u64 = dropped
            .iter()
            .filter(|e| is_hollow(e))
            .map(Entry::encoded_len)
            .sum();
        self.hollow_bytes = self.hollow_bytes.saturating_sub(dropped_hollow);
        self.hollow_upto = self.hollow_upto.max(pos);
        self.base_pos = pos;
        self.base_term = term;
        self.base_timestamp = timestamp;
        dropped
    }
}

/// `binary_search_by_key` over entries whose `key` strictly increases, but
/// galloping back from the newest entry first: the positions the core looks
/// up are nearly always among the last few entries (commit, durable and
/// match positions, the next entries to send), where this takes a handful
/// of probes, while a plain binary search over a window of hundreds of
/// thousands of entries costs ~18 cache misses each time.
pub fn search_newest_first(
    entries: &VecDeque<Entry>,
    pos: Position,
    key: impl Fn(&Entry) -> Position,
) -> Result<usize, usize> {
    // Invariant: every entry at or after `hi` has a key above `pos`.
    let mut hi = entries.len();
    let mut step = 1;
    let mut lo = 0;
    while step <= hi {
        let i = hi - step;
        if key(&entries[i]) <= pos {
            lo = i;
            break;
        }
        hi = i;
        step *= 2;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match key(&entries[mid]).cmp(&pos) {
            std::cmp::Ordering::Equal => return Ok(mid),
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
        }
    }
    Err(lo)
}
