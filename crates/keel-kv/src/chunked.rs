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
    /// The older items, if there are `CHUNK` or more (boxed: most keys of
    /// a large store have a few entries, and need only the tail).
    older: Option<Box<Older<T>>>,
    /// The newest items, fewer than `CHUNK`.
    tail: Vec<T>,
}

#[derive(Clone, Debug)]
struct Older<T> {
    /// `CHUNK` items per chunk, shared by copies; never empty.
    chunks: Vec<Arc<[T]>>,
    /// Items dropped from the front of `chunks[0]` (fewer than `CHUNK`).
    skip: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            older: None,
            tail: Vec::new(),
        }
    }
}

impl<T> Chunked<T> {
    /// The chunks and the items dropped from the first.
    fn sealed(&self) -> (&[Arc<[T]>], usize) {
        match &self.older {
            Some(o) => (&o.chunks, o.skip),
            None => (&[], 0),
        }
    }

    pub(crate) fn len(&self) -> usize {
        let (chunks, skip) = self.sealed();
        chunks.len() * CHUNK - skip + self.tail.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        let (chunks, skip) = self.sealed();
        let at = i.checked_add(skip)?;
        let sealed = chunks.len() * CHUNK;
        if at < sealed {
            Some(&chunks[at / CHUNK][at % CHUNK])
        } else {
            self.tail.get(at - sealed)
        }
    }

    pub(crate) fn last(&self) -> Option<&T> {
        // A chunk always keeps its last item (`skip` < CHUNK).
        let (chunks, _) = self.sealed();
        self.tail
            .last()
            .or_else(|| chunks.last().and_then(|c| c.last()))
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        let (chunks, skip) = self.sealed();
        chunks
            .iter()
            .enumerate()
            .flat_map(move |(i, c)| c[if i == 0 { skip } else { 0 }..].iter())
            .chain(self.tail.iter())
    }

    /// The index of the first item for which `pred` is false, the items
    /// being those for which it is true followed by the others (as
    /// `slice::partition_point`): a search of the chunks by their last
    /// items, then of one chunk or the tail.
    pub(crate) fn partition_point(&self, mut pred: impl FnMut(&T) -> bool) -> usize {
        let (chunks, skip) = self.sealed();
        // A chunk's last item is never dropped.
        let full = chunks.partition_point(|c| pred(&c[CHUNK - 1]));
        match chunks.get(full) {
            Some(chunk) => {
                let from = if full == 0 { skip } else { 0 };
                full * CHUNK + from - skip + chunk[from..].partition_point(pred)
            }
            None => chunks.len() * CHUNK - skip + self.tail.partition_point(pred),
        }
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
        if self.tail.capacity() == 0 && self.older.is_none() {
            // Room for one: most keys of a large store are written once,
            // and a vector's first push makes room for four.
            self.tail.reserve_exact(1);
        }
        self.tail.push(item);
        if self.tail.len() == CHUNK {
            // The tail's buffer stays for the next items.
            let chunk: Arc<[T]> = self.tail.drain(..).collect();
            match &mut self.older {
                Some(o) => o.chunks.push(chunk),
                None => {
                    self.older = Some(Box::new(Older {
                        chunks: vec![chunk],
                        skip: 0,
                    }))
                }
            }
        }
    }

    /// Drops the first `n` items (all of them if there are fewer).
    pub(crate) fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len());
        let Some(o) = &mut self.older else {
            self.tail.drain(..n);
            return;
        };
        o.skip += n;
        let whole = (o.skip / CHUNK).min(o.chunks.len());
        o.chunks.drain(..whole);
        o.skip -= whole * CHUNK;
        if o.chunks.is_empty() {
            let into_tail = o.skip;
            self.older = None;
            self.tail.drain(..into_tail);
        }
    }

    /// Gives back the room items dropped from the front left (for after
    /// `drop_front`, which keeps it for speed): a last chunk partly
    /// dropped and no tail becomes the tail, and a tail mostly empty is
    /// shrunk.
    pub(crate) fn shrink(&mut self)
    where
        T: Clone,
    {
        if let Some(o) = &self.older {
            if o.chunks.len() == 1 && o.skip > 0 && self.tail.is_empty() {
                // Copied: a capture may share the chunk.
                self.tail = o.chunks[0][o.skip..].to_vec();
                self.older = None;
            }
        }
        if self.older.is_none() && self.tail.capacity() > 2 * self.tail.len() + 4 {
            self.tail.shrink_to_fit();
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
        Shrink,
        Copy,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => any::<u32>().prop_map(Op::Push),
            1 => (0usize..80).prop_map(Op::DropFront),
            1 => Just(Op::Shrink),
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
                    Op::Shrink => c.shrink(),
                    Op::Copy => copies.push((c.clone(), v.clone())),
                }
                prop_assert_eq!(c.len(), v.len());
                prop_assert_eq!(c.is_empty(), v.is_empty());
                prop_assert_eq!(c.last(), v.last());
                prop_assert!(c.tail.len() < CHUNK);
                if let Some(o) = &c.older {
                    prop_assert!(!o.chunks.is_empty() && o.skip < CHUNK);
                }
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
    fn compacted_histories_give_their_room_back() {
        let mut c = Chunked::default();
        (0..CHUNK as u64).for_each(|x| c.push(x));
        c.drop_front(CHUNK - 1);
        c.shrink();
        assert!(c.older.is_none());
        assert_eq!((c.len(), c.tail.capacity()), (1, 1));
        let mut c = Chunked::default();
        (0..20u64).for_each(|x| c.push(x));
        c.drop_front(19);
        c.shrink();
        assert!(c.tail.capacity() < 20);
        assert_eq!(c.last(), Some(&19));
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
        let first = |c: &Chunked<u32>| c.older.as_ref().unwrap().chunks[0].clone();
        assert!(Arc::ptr_eq(&first(&c), &first(&copy)));
        assert_eq!(copy.tail.len(), 1000 % CHUNK);
        assert_eq!(c, copy);
        c.push(1000);
        assert_ne!(c, copy);
    }
}
