//! A sequence appended at the back and dropped from the front, whose older
//! items live in fixed-size chunks shared by its copies: copying one costs
//! a pointer per chunk and the few newest items, not a copy of every item.
//!
//! A key's MVCC history is one (`store::History`). A snapshot capture
//! shares every key's history; the store copies a key's history when it
//! next changes that key. With one flat vector that copy was the whole
//! history: after each capture, the first write of each key paid for all
//! of the key's past, a latency spike on the service thread (10k keys of
//! 100 revisions: one put to each took 10x as long right after a capture
//! as without one; 3x with chunks).

use std::cmp::Ordering;
use std::sync::Arc;

/// Items per shared chunk.
pub(crate) const CHUNK: usize = 32;

#[derive(Clone, Debug)]
pub(crate) struct Chunked<T> {
    /// The older items, `CHUNK` per chunk, shared by copies.
    chunks: Vec<Arc<[T]>>,
    /// Items dropped from the front of `chunks[0]` (0 without chunks).
    skip: usize,
    /// The newest items, fewer than `CHUNK`.
    tail: Vec<T>,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            skip: 0,
            tail: Vec::new(),
        }
    }
}

impl<T> Chunked<T> {
    pub(crate) fn len(&self) -> usize {
        self.chunks.len() * CHUNK + self.tail.len() - self.skip
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        let at = i.checked_add(self.skip)?;
        let sealed = self.chunks.len() * CHUNK;
        if at < sealed {
            Some(&self.chunks[at / CHUNK][at % CHUNK])
        } else {
            self.tail.get(at - sealed)
        }
    }

    pub(crate) fn last(&self) -> Option<&T> {
        // A chunk always keeps its last item (`skip` < CHUNK).
        self.tail
            .last()
            .or_else(|| self.chunks.last().and_then(|c| c.last()))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        let skip = self.skip;
        self.chunks
            .iter()
            .enumerate()
            .flat_map(move |(i, c)| c[if i == 0 { skip } else { 0 }..].iter())
            .chain(self.tail.iter())
    }

    /// The index of the first item for which `pred` is false, the items
    /// being those for which it is true followed by the others (as
    /// `slice::partition_point`).
    pub(crate) fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.get(mid) {
                Some(item) if pred(item) => lo = mid + 1,
                _ => hi = mid,
            }
        }
        lo
    }

    /// As `slice::binary_search_by`, on items in `f`'s order.
    pub(crate) fn binary_search_by(
        &self,
        mut f: impl FnMut(&T) -> Ordering,
    ) -> Result<usize, usize> {
        let i = self.partition_point(|item| f(item) == Ordering::Less);
        match self.get(i) {
            Some(item) if f(item) == Ordering::Equal => Ok(i),
            _ => Err(i),
        }
    }

    pub(crate) fn push(&mut self, item: T) {
        if self.tail.capacity() == 0 && self.chunks.is_empty() {
            // Room for one: most keys of a large store are written once,
            // and a vector's first push makes room for four.
            self.tail.reserve_exact(1);
        }
        self.tail.push(item);
        if self.tail.len() == CHUNK {
            // The tail's buffer stays for the next items.
            self.chunks.push(self.tail.drain(..).collect());
        }
    }

    /// Drops the first `n` items (all of them if there are fewer).
    pub(crate) fn drop_front(&mut self, n: usize) {
        self.skip += n.min(self.len());
        let whole = (self.skip / CHUNK).min(self.chunks.len());
        self.chunks.drain(..whole);
        self.skip -= whole * CHUNK;
        if self.chunks.is_empty() {
            self.tail.drain(..self.skip);
            self.skip = 0;
        }
    }
}

impl<T> std::ops::Index<usize> for Chunked<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        self.get(i).expect("index within the sequence")
    }
}

impl<T: PartialEq> PartialEq for Chunked<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<T: Eq> Eq for Chunked<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Push(u32),
        DropFront(usize),
        Copy,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => any::<u32>().prop_map(Op::Push),
            1 => (0usize..80).prop_map(Op::DropFront),
            1 => Just(Op::Copy),
        ]
    }

    proptest! {
        /// Behaves as a vector, and a copy is unchanged by what is done
        /// to the original afterwards.
        #[test]
        fn behaves_as_a_vector(ops in proptest::collection::vec(op(), 0..300)) {
            let mut c = Chunked::default();
            let mut v: Vec<u32> = Vec::new();
            let mut copies: Vec<(Chunked<u32>, Vec<u32>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(x) => {
                        c.push(x);
                        v.push(x);
                    }
                    Op::DropFront(n) => {
                        c.drop_front(n);
                        v.drain(..n.min(v.len()));
                    }
                    Op::Copy => copies.push((c.clone(), v.clone())),
                }
                prop_assert_eq!(c.len(), v.len());
                prop_assert_eq!(c.is_empty(), v.is_empty());
                prop_assert_eq!(c.last(), v.last());
                prop_assert!(c.tail.len() < CHUNK && c.skip < CHUNK.max(1));
            }
            copies.push((c, v));
            for (c, v) in &copies {
                prop_assert!(c.iter().eq(v.iter()));
                for i in 0..=v.len() {
                    prop_assert_eq!(c.get(i), v.get(i));
                }
            }
        }

        #[test]
        fn searches_as_a_slice(
            mut items in proptest::collection::vec(0u32..200, 0..150),
            dropped in 0usize..40,
            probe in 0u32..210,
        ) {
            items.sort_unstable();
            items.dedup();
            let mut c = Chunked::default();
            items.iter().for_each(|&x| c.push(x));
            c.drop_front(dropped);
            let v = &items[dropped.min(items.len())..];
            prop_assert_eq!(c.partition_point(|&x| x <= probe), v.partition_point(|&x| x <= probe));
            prop_assert_eq!(c.binary_search_by(|x| x.cmp(&probe)), v.binary_search_by(|x| x.cmp(&probe)));
        }
    }

    #[test]
    fn one_item_takes_room_for_one() {
        let mut c = Chunked::default();
        c.push(1u64);
        assert_eq!(c.tail.capacity(), 1);
        c.push(2);
        assert_eq!((c.len(), c.last()), (2, Some(&2)));
    }

    #[test]
    fn a_copy_shares_the_chunks() {
        let mut c = Chunked::default();
        (0..1000u32).for_each(|x| c.push(x));
        let copy = c.clone();
        assert!(Arc::ptr_eq(&c.chunks[0], &copy.chunks[0]));
        assert_eq!(copy.tail.len(), 1000 % CHUNK);
        assert_eq!(c, copy);
        c.push(1000);
        assert_ne!(c, copy);
    }
}
