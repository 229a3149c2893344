//! An ordered map from keys to values in slices of consecutive keys, each
//! slice shared by the map's copies: copying the map costs a pointer per
//! slice, and a write after a copy copies only its own slice.
//!
//! The KV store's key index is one (`store::Store::keys`). A snapshot
//! capture copies it on the service thread; as one `BTreeMap` that copy
//! cloned every key (68–207 ms for 1M keys, a stall at every snapshot of
//! a large store). Persistent maps make the copy O(1) but every lookup
//! slower (imbl's `OrdMap`: 2.2x per lookup at 1M keys, see BENCHMARKS);
//! slices keep `BTreeMap` lookups, one binary search over the slices'
//! first keys in front. The copying is not gone but spread out: the
//! first write to each slice after a capture clones that slice.

use bytes::Bytes;
use std::collections::{btree_map, BTreeMap};
use std::ops::Bound;
use std::sync::Arc;

/// Keys per slice at most: a slice over this splits in two. A write
/// after a copy clones at most this many entries.
#[cfg(not(test))]
pub(crate) const SLICE: usize = 2048;
/// Small in tests (the store's too), so that slices split and merge often.
#[cfg(test)]
pub(crate) const SLICE: usize = 4;
// A split leaves both halves non-empty.
const _: () = assert!(SLICE >= 2);

#[derive(Clone, Debug)]
pub(crate) struct KeyMap<V> {
    /// Where each slice starts: `starts[0]` is the empty key, and slice
    /// `i` holds the keys from `starts[i]` up to `starts[i + 1]`.
    starts: Vec<Bytes>,
    /// Never empty; a slice is empty only if it is the only one.
    slices: Vec<Arc<BTreeMap<Bytes, V>>>,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        KeyMap {
            starts: vec![Bytes::new()],
            slices: vec![Arc::default()],
        }
    }
}

impl<V: Clone> KeyMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.slices.iter().map(|s| s.len()).sum()
    }

    /// The slice that holds (or would hold) `key`.
    fn slice_of(&self, key: &[u8]) -> usize {
        // starts[0] is the empty key, at or below every key.
        self.starts.partition_point(|s| &s[..] <= key) - 1
    }

    pub(crate) fn get_key_value(&self, key: &[u8]) -> Option<(&Bytes, &V)> {
        self.slices[self.slice_of(key)].get_key_value(key)
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&V> {
        self.slices[self.slice_of(key)].get(key)
    }

    /// `key`'s value to change (its slice is copied first if shared).
    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let i = self.slice_of(key);
        // A shared slice is copied only if the key is in it.
        if Arc::get_mut(&mut self.slices[i]).is_none() && !self.slices[i].contains_key(key) {
            return None;
        }
        Arc::make_mut(&mut self.slices[i]).get_mut(key)
    }

    /// The key as stored (its first writer's buffer) and its value, a
    /// default one inserted if there was none.
    pub(crate) fn slot(&mut self, key: Bytes) -> (Bytes, &mut V)
    where
        V: Default,
    {
        let mut i = self.slice_of(&key);
        // Only a full slice asks whether the key is new (a second search).
        if self.slices[i].len() >= SLICE && !self.slices[i].contains_key(&key) {
            self.split(i, &key);
            i = self.slice_of(&key);
        }
        match Arc::make_mut(&mut self.slices[i]).entry(key) {
            btree_map::Entry::Occupied(e) => (e.key().clone(), e.into_mut()),
            btree_map::Entry::Vacant(e) => (e.key().clone(), e.insert(V::default())),
        }
    }

    /// Splits slice `i` to make room for `key`: at its middle key, or,
    /// for a key past its last one (keys written in order, a snapshot
    /// read back), before its last key, so that the slices it leaves
    /// behind are full.
    fn split(&mut self, i: usize, key: &[u8]) {
        let slice = Arc::make_mut(&mut self.slices[i]);
        let at = match slice.last_key_value() {
            Some((last, _)) if &last[..] < key => slice.len() - 1,
            _ => slice.len() / 2,
        };
        let Some(first_moved) = slice.keys().nth(at).cloned() else {
            return;
        };
        let upper = slice.split_off(&first_moved);
        self.slices.insert(i + 1, Arc::new(upper));
        self.starts.insert(i + 1, first_moved);
    }

    pub(crate) fn remove(&mut self, key: &[u8]) -> Option<V> {
        let i = self.slice_of(key);
        if Arc::get_mut(&mut self.slices[i]).is_none() && !self.slices[i].contains_key(key) {
            return None;
        }
        let value = Arc::make_mut(&mut self.slices[i]).remove(key)?;
        self.merge_around(i);
        Some(value)
    }

    /// Merges slice `i` into a neighbour when the two hold at most half a
    /// slice together (so deletes do not leave many tiny slices), and
    /// drops it if it is empty.
    fn merge_around(&mut self, i: usize) {
        if self.slices.len() == 1 {
            return;
        }
        if self.slices[i].is_empty() {
            // Its keys' range goes to the slice before it (the first
            // slice's, to the one after, which then starts at the empty
            // key).
            self.slices.remove(i);
            self.starts.remove(i.max(1));
            return;
        }
        let lower = if i + 1 < self.slices.len() { i } else { i - 1 };
        if self.slices[lower].len() + self.slices[lower + 1].len() > SLICE / 2 {
            return;
        }
        let mut upper = self.slices.remove(lower + 1);
        self.starts.remove(lower + 1);
        Arc::make_mut(&mut self.slices[lower]).append(Arc::make_mut(&mut upper));
    }

    /// The entries from `start` (included) up to `end`, in key order.
    pub(crate) fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a Bytes, &'a V)> + 'a {
        let first = self.slice_of(start);
        let last = match end {
            Bound::Included(e) | Bound::Excluded(e) => self.slice_of(e).max(first),
            Bound::Unbounded => self.slices.len() - 1,
        };
        let valid = match end {
            Bound::Included(e) => start <= e,
            Bound::Excluded(e) => start < e,
            Bound::Unbounded => true,
        };
        let slices = if valid {
            &self.slices[first..=last]
        } else {
            &[]
        };
        slices
            .iter()
            .flat_map(move |s| s.range::<[u8], _>((Bound::Included(start), end)))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Bytes, &V)> + '_ {
        self.slices.iter().flat_map(|s| s.iter())
    }
}

#[cfg(test)]
impl<V> KeyMap<V> {
    /// Does `other` share every one of this map's slices?
    pub(crate) fn shares_every_slice_with(&self, other: &KeyMap<V>) -> bool {
        self.slices.len() == other.slices.len()
            && self
                .slices
                .iter()
                .zip(&other.slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl<V: PartialEq + Clone> PartialEq for KeyMap<V> {
    /// The same entries, however they are sliced.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<V: Eq + Clone> Eq for KeyMap<V> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Put(u16, u32),
        Remove(u16),
        Change(u16, u32),
        Copy,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u16..40, any::<u32>()).prop_map(|(k, v)| Op::Put(k, v)),
            4 => (0u16..40).prop_map(Op::Remove),
            1 => (0u16..40, any::<u32>()).prop_map(|(k, v)| Op::Change(k, v)),
            1 => Just(Op::Copy),
        ]
    }

    fn key(k: u16) -> Bytes {
        // Some keys share prefixes, some are prefixes of others; 0 is the
        // empty key.
        match k {
            0 => Bytes::new(),
            k => Bytes::from(format!("{k}").repeat(1 + usize::from(k % 3))),
        }
    }

    /// The map's entries are the model's, and its slices are in order.
    fn check(m: &KeyMap<u32>, model: &BTreeMap<Bytes, u32>) -> Result<(), TestCaseError> {
        prop_assert_eq!(m.len(), model.len());
        prop_assert!(m.iter().eq(model.iter()));
        prop_assert_eq!(m.starts.len(), m.slices.len());
        prop_assert!(m.starts[0].is_empty());
        for (i, s) in m.slices.iter().enumerate() {
            prop_assert!(s.len() <= SLICE);
            prop_assert!(!s.is_empty() || m.slices.len() == 1);
            if let Some((first, _)) = s.first_key_value() {
                prop_assert!(*first >= m.starts[i]);
            }
            if let (Some((last, _)), Some(next)) = (s.last_key_value(), m.starts.get(i + 1)) {
                prop_assert!(last < next);
            }
        }
        Ok(())
    }

    proptest! {
        /// Behaves as a `BTreeMap`, and a copy is unchanged by what is
        /// done to the original afterwards.
        #[test]
        fn behaves_as_a_btree_map(
            ops in proptest::collection::vec(op(), 0..600),
            probes in proptest::collection::vec((0u16..40, 0u16..40), 10),
        ) {
            let mut m = KeyMap::default();
            let mut model = BTreeMap::new();
            let mut copies = Vec::new();
            for op in ops {
                match op {
                    Op::Put(k, v) => {
                        let (stored, slot) = m.slot(key(k));
                        prop_assert_eq!(&stored, &key(k));
                        *slot = v;
                        model.insert(key(k), v);
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(m.remove(&key(k)), model.remove(&key(k)));
                    }
                    Op::Change(k, v) => {
                        let got = m.get_mut(&key(k)).map(|slot| {
                            *slot = v;
                        });
                        let want = model.get_mut(&key(k)).map(|slot| {
                            *slot = v;
                        });
                        prop_assert_eq!(got, want);
                    }
                    Op::Copy => copies.push((m.clone(), model.clone())),
                }
                check(&m, &model)?;
            }
            for (a, b) in probes {
                let (a, b) = (key(a), key(b));
                prop_assert_eq!(m.get(&a), model.get(&a));
                prop_assert_eq!(m.get_key_value(&a), model.get_key_value(&a));
                let ends = [Bound::Included(&b[..]), Bound::Excluded(&b[..]), Bound::Unbounded];
                for end in ends {
                    let valid = match end {
                        Bound::Included(e) => a[..] <= *e,
                        Bound::Excluded(e) => a[..] < *e,
                        Bound::Unbounded => true,
                    };
                    let got: Vec<_> = m.range(&a, end).collect();
                    let want: Vec<_> = if valid {
                        model.range::<[u8], _>((Bound::Included(&a[..]), end)).collect()
                    } else {
                        Vec::new()
                    };
                    prop_assert_eq!(got, want);
                }
            }
            for (copy, model) in &copies {
                check(copy, model)?;
            }
        }
    }

    #[test]
    fn emptied_slices_go_at_either_end() {
        for ascending in [true, false] {
            let mut m = KeyMap::default();
            let mut model = BTreeMap::new();
            for k in 0..100u16 {
                *m.slot(key(k)).1 = u32::from(k);
                model.insert(key(k), u32::from(k));
            }
            let mut order: Vec<Bytes> = model.keys().cloned().collect();
            if !ascending {
                order.reverse();
            }
            for k in order {
                assert_eq!(m.remove(&k), model.remove(&k));
                check(&m, &model).unwrap();
                assert_eq!(m.range(b"", Bound::Unbounded).count(), model.len());
            }
            assert_eq!(m.slices.len(), 1);
        }
    }

    #[test]
    fn keys_written_in_order_fill_their_slices() {
        let mut m = KeyMap::default();
        for k in 0..99u32 {
            *m.slot(Bytes::from(format!("k{k:03}"))).1 = k;
        }
        assert_eq!(m.slices.len(), 99usize.div_ceil(SLICE - 1));
        // A lookup of a missing key does not copy a shared slice.
        let copy = m.clone();
        assert!(m.get_mut(b"k500").is_none() && m.remove(b"k500").is_none());
        assert!(m.shares_every_slice_with(&copy));
    }

    #[test]
    fn a_copy_shares_its_slices_until_one_is_written() {
        let mut m = KeyMap::default();
        for i in 0..10_000u32 {
            *m.slot(Bytes::from(format!("k{i:05}"))).1 = i;
        }
        assert!(m.slices.len() > 4);
        let copy = m.clone();
        *m.slot(Bytes::from_static(b"k00000")).1 = 7;
        let shared = (0..m.slices.len())
            .filter(|&i| Arc::ptr_eq(&m.slices[i], &copy.slices[i]))
            .count();
        assert_eq!(
            shared,
            m.slices.len() - 1,
            "only the written slice is copied"
        );
        assert_eq!(copy.get(b"k00000"), Some(&0));
        assert_eq!(m.get(b"k00000"), Some(&7));
    }
}
