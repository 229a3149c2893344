//! Linearizability checking for the simulator's key-value client histories.
//! This module owns the history types (`Operation`, `KvInput`, `KvOutput`),
//! the per-key register model they are checked against, a just-in-time
//! (Wing & Gong / Lowe) search with memoisation of (linearized set, register
//! state) that checks every key independently (P-compositionality), and an
//! exhaustive brute-force checker for tiny histories used to cross-check it.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// An operation a client invoked on the key-value store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvInput {
    /// Sets the key to `value`.
    Put { key: u64, value: u64 },
    /// Reads the key.
    Get { key: u64 },
    /// Succeeds (and writes `new`) iff the current value equals `expected` (None = key absent).
    Cas {
        key: u64,
        expected: Option<u64>,
        new: u64,
    },
}

/// What the store answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOutput {
    /// The put took effect.
    PutOk,
    /// The value read (None = key absent).
    Get(Option<u64>),
    /// Whether the compare-and-swap succeeded.
    Cas(bool),
}

/// One client operation of a history.
#[derive(Clone, Debug)]
pub struct Operation {
    /// The client that issued the operation (informational only).
    pub client: u64,
    /// What was invoked.
    pub input: KvInput,
    /// None: the outcome is unknown (client timed out / run ended); the op may or may not have taken effect, at any time after `call`.
    pub output: Option<KvOutput>,
    /// Invocation time (simulated ns).
    pub call: u64,
    /// Response time; None = never returned (treat as +infinity). Ignored
    /// when `output` is None; a value below `call` is treated as `call`.
    pub ret: Option<u64>,
}

/// The verdict on a whole history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckResult {
    /// Every key's sub-history has a linearization.
    Linearizable,
    /// No linearization exists for this key; `ops` are indices into the input slice of the ops on that key.
    NotLinearizable { key: u64, ops: Vec<usize> },
    /// The search exceeded its budget for this key (report, do not treat as pass or fail).
    Unknown { key: u64 },
}

/// Search budget per key used by [`check`]: iterations of the search loop.
pub const DEFAULT_MAX_STEPS_PER_KEY: u64 = 10_000_000;

/// Approximate cap on the memory of one key's memoisation cache. When it is
/// reached the cache is emptied: that only costs repeated work (the search
/// stays correct and is still bounded by the step budget).
const CACHE_BYTE_LIMIT: usize = 128 << 20;

/// Checks `history` with [`DEFAULT_MAX_STEPS_PER_KEY`].
pub fn check(history: &[Operation]) -> CheckResult {
    check_with_budget(history, DEFAULT_MAX_STEPS_PER_KEY)
}

/// Checks every key's sub-history independently, in ascending key order.
/// A key with no linearization wins over a key whose search ran out of its
/// `max_steps_per_key` budget; otherwise the first such key is reported as
/// `Unknown`. `NotLinearizable::ops` lists every operation on the failing
/// key, as ascending indices into `history`.
pub fn check_with_budget(history: &[Operation], max_steps_per_key: u64) -> CheckResult {
    let mut per_key: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        per_key.entry(input_key(&op.input)).or_default().push(i);
    }
    let mut unknown = None;
    for (&key, indices) in &per_key {
        match check_key(history, indices, max_steps_per_key) {
            KeyOutcome::Linearizable => {}
            KeyOutcome::NotLinearizable => {
                return CheckResult::NotLinearizable {
                    key,
                    ops: indices.clone(),
                }
            }
            KeyOutcome::Unknown => {
                unknown.get_or_insert(key);
            }
        }
    }
    match unknown {
        Some(key) => CheckResult::Unknown { key },
        None => CheckResult::Linearizable,
    }
}

/// Exhaustive check of the whole history (all keys at once, one map as the
/// model, no memoisation, no per-key split): tries every subset of the
/// unknown-outcome operations as "took effect" and every order of the chosen
/// operations consistent with real-time order. The cost grows like
/// `2^unknown * n!`, so it is only meant for small histories: debug builds
/// assert `history.len() <= 10`; release builds accept longer ones but may
/// not finish in any useful time. Never panics otherwise.
pub fn check_brute_force(history: &[Operation]) -> bool {
    debug_assert!(
        history.len() <= 10,
        "check_brute_force is exponential; use it on at most 10 operations"
    );
    let ret: Vec<u64> = history.iter().map(effective_ret).collect();
    let optional: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].output.is_none())
        .collect();
    // `included[i]`: op i takes effect. Required ops always do; the optional
    // ones run through every combination like the digits of a binary counter.
    let mut included: Vec<bool> = history.iter().map(|op| op.output.is_some()).collect();
    loop {
        if brute_force_orders(history, &ret, &included) {
            return true;
        }
        let mut wrapped = true;
        for &i in &optional {
            if included[i] {
                included[i] = false;
            } else {
                included[i] = true;
                wrapped = false;
                break;
            }
        }
        if wrapped {
            return false;
        }
    }
}

/// Whether the `included` ops can be ordered so that real-time order holds
/// and every op with a known output produces it (iterative DFS over orders).
fn brute_force_orders(history: &[Operation], ret: &[u64], included: &[bool]) -> bool {
    let n = history.len();
    let total = included.iter().filter(|&&b| b).count();
    let mut placed = vec![false; n];
    let mut store: BTreeMap<u64, u64> = BTreeMap::new();
    // (op, value of its key before it was applied)
    let mut path: Vec<(usize, Option<u64>)> = Vec::with_capacity(total);
    let mut first_candidate = 0;
    loop {
        if path.len() == total {
            return true;
        }
        let mut chosen = None;
        for i in first_candidate..n {
            if !included[i] || placed[i] {
                continue;
            }
            let op = &history[i];
            // Excluded ops are optional, whose return is +infinity, so they
            // never block anything.
            if (0..n).any(|j| j != i && !placed[j] && ret[j] < op.call) {
                continue;
            }
            let key = input_key(&op.input);
            let before = store.get(&key).copied();
            let (after, out) = apply(before, &op.input);
            if op.output.as_ref().is_some_and(|expected| *expected != out) {
                continue;
            }
            chosen = Some((i, key, before, after));
            break;
        }
        match chosen {
            Some((i, key, before, after)) => {
                set_value(&mut store, key, after);
                placed[i] = true;
                path.push((i, before));
                first_candidate = 0;
            }
            None => match path.pop() {
                None => return false,
                Some((i, before)) => {
                    set_value(&mut store, input_key(&history[i].input), before);
                    placed[i] = false;
                    first_candidate = i + 1;
                }
            },
        }
    }
}

fn set_value(store: &mut BTreeMap<u64, u64>, key: u64, value: Option<u64>) {
    match value {
        Some(v) => store.insert(key, v),
        None => store.remove(&key),
    };
}

fn input_key(input: &KvInput) -> u64 {
    match *input {
        KvInput::Put { key, .. } | KvInput::Get { key } | KvInput::Cas { key, .. } => key,
    }
}

/// The register model: applies `input` to the key's current value and
/// returns the new value and the output the store must have produced.
fn apply(state: Option<u64>, input: &KvInput) -> (Option<u64>, KvOutput) {
    match *input {
        KvInput::Put { value, .. } => (Some(value), KvOutput::PutOk),
        KvInput::Get { .. } => (state, KvOutput::Get(state)),
        KvInput::Cas { expected, new, .. } => {
            if state == expected {
                (Some(new), KvOutput::Cas(true))
            } else {
                (state, KvOutput::Cas(false))
            }
        }
    }
}

/// The time after which `op` no longer has to precede anything, i.e. its
/// return time; `u64::MAX` (never) for unknown outcomes and unreturned ops.
fn effective_ret(op: &Operation) -> u64 {
    match (&op.output, op.ret) {
        (Some(_), Some(ret)) => ret.max(op.call),
        _ => u64::MAX,
    }
}

enum KeyOutcome {
    Linearizable,
    NotLinearizable,
    Unknown,
}

/// One step of the search for `op`: the new register value if `op` may be
/// linearized now. Ops with an unknown outcome accept any output, but are
/// only worth linearizing when they change the value: otherwise taking
/// effect is indistinguishable from never taking effect, which is allowed.
fn try_step(state: Option<u64>, op: &Operation) -> Option<Option<u64>> {
    let (after, out) = apply(state, &op.input);
    match &op.output {
        Some(expected) => (*expected == out).then_some(after),
        None => (after != state).then_some(after),
    }
}

/// Just-in-time linearizability search over one key's operations.
///
/// Events (calls, and returns of ops with a known output) sit in a doubly
/// linked list sorted by time, calls before returns at equal times (so
/// `a.ret == b.call` counts as concurrent). Scanning from the head, any call
/// met before the first return may be linearized next; doing so unlinks its
/// call and return and restarts the scan. Meeting a return of an op that is
/// not linearized means the current prefix is a dead end, so the search
/// backtracks. Ops with an unknown outcome have no return event: they never
/// block, and may be left out at the end. Configurations (linearized set,
/// value) already visited are skipped.
fn check_key(history: &[Operation], indices: &[usize], max_steps: u64) -> KeyOutcome {
    // Reads with an unknown outcome constrain nothing.
    let ops: Vec<&Operation> = indices
        .iter()
        .filter_map(|&i| history.get(i))
        .filter(|op| op.output.is_some() || !matches!(op.input, KvInput::Get { .. }))
        .collect();
    let mut required_left = ops.iter().filter(|op| op.output.is_some()).count();
    if required_left == 0 {
        return KeyOutcome::Linearizable;
    }

    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        events.push((op.call, false, i));
        if op.output.is_some() {
            events.push((effective_ret(op), true, i));
        }
    }
    events.sort_unstable();

    // Nodes: 0 = head sentinel, 1..=m = events, m + 1 = tail sentinel.
    let m = events.len();
    let head = 0;
    let tail = m + 1;
    let mut next: Vec<usize> = (1..=m + 2).collect();
    let mut prev: Vec<usize> = (0..m + 2).map(|i| i.saturating_sub(1)).collect();
    next[tail] = tail;
    let mut node_op = vec![0usize; m + 2];
    let mut node_is_ret = vec![false; m + 2];
    let mut ret_node: Vec<Option<usize>> = vec![None; ops.len()];
    for (pos, &(_, is_ret, op)) in events.iter().enumerate() {
        let node = pos + 1;
        node_op[node] = op;
        node_is_ret[node] = is_ret;
        if is_ret {
            ret_node[op] = Some(node);
        }
    }

    let unlink = |next: &mut [usize], prev: &mut [usize], x: usize| {
        next[prev[x]] = next[x];
        prev[next[x]] = prev[x];
    };
    let relink = |next: &mut [usize], prev: &mut [usize], x: usize| {
        next[prev[x]] = x;
        prev[next[x]] = x;
    };

    let mut bits = Bitset::new(ops.len());
    let mut cache = Cache::default();
    // (call node linearized, register value before it)
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut state: Option<u64> = None;
    let mut cur = next[head];
    let mut steps = 0u64;
    loop {
        if steps >= max_steps {
            return KeyOutcome::Unknown;
        }
        steps += 1;
        if cur == tail {
            if required_left == 0 {
                return KeyOutcome::Linearizable;
            }
        } else if !node_is_ret[cur] {
            let i = node_op[cur];
            let op = ops[i];
            if let Some(after) = try_step(state, op) {
                bits.set(i);
                if cache.insert(&bits.words, after) {
                    stack.push((cur, state));
                    state = after;
                    unlink(&mut next, &mut prev, cur);
                    if let Some(r) = ret_node[i] {
                        unlink(&mut next, &mut prev, r);
                    }
                    if op.output.is_some() {
                        required_left -= 1;
                        if required_left == 0 {
                            return KeyOutcome::Linearizable;
                        }
                    }
                    cur = next[head];
                    continue;
                }
                bits.clear(i);
            }
            cur = next[cur];
            continue;
        }
        // Dead end: undo the most recent linearization and try the next
        // candidate after it.
        let Some((node, before)) = stack.pop() else {
            return KeyOutcome::NotLinearizable;
        };
        let i = node_op[node];
        if let Some(r) = ret_node[i] {
            relink(&mut next, &mut prev, r);
        }
        relink(&mut next, &mut prev, node);
        bits.clear(i);
        state = before;
        if ops[i].output.is_some() {
            required_left += 1;
        }
        cur = next[node];
    }
}

struct Bitset {
    words: Vec<u64>,
}

impl Bitset {
    fn new(bits: usize) -> Self {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
        }
    }

    fn set(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    fn clear(&mut self, i: usize) {
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }
}

/// Visited configurations: linearized set -> register values seen with it.
#[derive(Default)]
struct Cache {
    map: HashMap<Box<[u64]>, Vec<Option<u64>>, BuildHasherDefault<WordHasher>>,
    bytes: usize,
}

impl Cache {
    /// Records a configuration; false if it had been recorded already.
    fn insert(&mut self, bits: &[u64], state: Option<u64>) -> bool {
        const STATE_BYTES: usize = std::mem::size_of::<Option<u64>>();
        if let Some(states) = self.map.get_mut(bits) {
            if states.contains(&state) {
                return false;
            }
            states.push(state);
            self.bytes += STATE_BYTES;
            return true;
        }
        // Key allocation, value allocation, table slot (boxed slice + vec)
        // and control byte, roughly.
        let entry_bytes = 8 * bits.len() + 2 * STATE_BYTES + 16 + 24 + 1;
        if self.bytes + entry_bytes > CACHE_BYTE_LIMIT {
            self.map.clear();
            self.bytes = 0;
        }
        self.map.insert(bits.into(), vec![state]);
        self.bytes += entry_bytes;
        true
    }
}

/// A fast hasher for the word slices of the cache (std only; no DoS
/// concerns in a test checker).
#[derive(Default)]
struct WordHasher(u64);

impl WordHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.add(word);
    }

    fn write_usize(&mut self, word: usize) {
        self.add(word as u64);
    }

    fn finish(&self) -> u64 {
        // splitmix64 finaliser, so that the low bits (the bucket index)
        // depend on every input bit.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    fn op(input: KvInput, output: Option<KvOutput>, call: u64, ret: Option<u64>) -> Operation {
        Operation {
            client: 0,
            input,
            output,
            call,
            ret,
        }
    }

    fn put(key: u64, value: u64, call: u64, ret: u64) -> Operation {
        op(
            KvInput::Put { key, value },
            Some(KvOutput::PutOk),
            call,
            Some(ret),
        )
    }

    fn get(key: u64, seen: Option<u64>, call: u64, ret: u64) -> Operation {
        op(
            KvInput::Get { key },
            Some(KvOutput::Get(seen)),
            call,
            Some(ret),
        )
    }

    fn cas(key: u64, expected: Option<u64>, new: u64, ok: bool, call: u64, ret: u64) -> Operation {
        op(
            KvInput::Cas { key, expected, new },
            Some(KvOutput::Cas(ok)),
            call,
            Some(ret),
        )
    }

    fn pending(input: KvInput, call: u64) -> Operation {
        op(input, None, call, None)
    }

    /// Checks both checkers agree with `expected` (and that a failure names
    /// the only key of these single-key histories).
    fn assert_verdict(history: &[Operation], expected: bool) {
        let result = check(history);
        if expected {
            assert_eq!(result, CheckResult::Linearizable, "{history:#?}");
        } else {
            assert!(
                matches!(result, CheckResult::NotLinearizable { .. }),
                "{result:?} for {history:#?}"
            );
        }
        assert_eq!(check_brute_force(history), expected, "{history:#?}");
    }

    #[test]
    fn empty_and_trivial_histories() {
        assert_verdict(&[], true);
        assert_verdict(&[get(1, None, 0, 1)], true);
        assert_verdict(&[get(1, Some(3), 0, 1)], false);
        assert_verdict(&[put(1, 3, 0, 1), get(1, Some(3), 2, 3)], true);
    }

    #[test]
    fn stale_read_after_completed_put() {
        assert_verdict(&[put(1, 1, 0, 10), get(1, None, 20, 30)], false);
        assert_eq!(
            check(&[put(1, 1, 0, 10), get(1, None, 20, 30)]),
            CheckResult::NotLinearizable {
                key: 1,
                ops: vec![0, 1]
            }
        );
        // Overwritten value read back.
        assert_verdict(
            &[put(1, 1, 0, 1), put(1, 2, 2, 3), get(1, Some(1), 4, 5)],
            false,
        );
        // The same read, concurrent with the put, may see either value.
        assert_verdict(&[put(1, 1, 0, 10), get(1, None, 5, 30)], true);
    }

    #[test]
    fn equal_timestamps_are_concurrent() {
        // get.call == put.ret: the get may be ordered first.
        assert_verdict(&[put(1, 1, 0, 5), get(1, None, 5, 6)], true);
        assert_verdict(&[put(1, 1, 0, 5), get(1, None, 6, 7)], false);
    }

    #[test]
    fn concurrent_puts_then_disagreeing_reads() {
        let base = [put(1, 1, 0, 10), put(1, 2, 0, 10)];
        let mut h = base.to_vec();
        h.extend([get(1, Some(1), 20, 21), get(1, Some(2), 22, 23)]);
        assert_verdict(&h, false);
        let mut h = base.to_vec();
        h.extend([get(1, Some(2), 20, 21), get(1, Some(2), 22, 23)]);
        assert_verdict(&h, true);
        // Concurrent reads during the puts may disagree and flip once.
        let mut h = base.to_vec();
        h.extend([get(1, Some(1), 1, 9), get(1, Some(2), 1, 9)]);
        assert_verdict(&h, true);
        // ...but cannot come back: 1, then 2, then 1 needs a third write.
        let mut h = base.to_vec();
        h.extend([
            get(1, Some(1), 1, 2),
            get(1, Some(2), 3, 4),
            get(1, Some(1), 5, 6),
        ]);
        assert_verdict(&h, false);
    }

    #[test]
    fn a_write_seen_while_in_flight_cannot_vanish() {
        // The put is still running when a read sees it; a later read
        // (also during the put) cannot miss it.
        let h = [
            put(1, 5, 0, 100),
            get(1, Some(5), 10, 20),
            get(1, None, 30, 40),
        ];
        assert_verdict(&h, false);
        // Overlapping reads may see it in either order.
        let h = [
            put(1, 5, 0, 100),
            get(1, Some(5), 10, 40),
            get(1, None, 30, 50),
        ];
        assert_verdict(&h, true);
        // A successful cas is a write: the old value cannot come back.
        let h = [
            put(1, 1, 0, 1),
            cas(1, Some(1), 2, true, 2, 3),
            get(1, Some(1), 4, 5),
        ];
        assert_verdict(&h, false);
    }

    #[test]
    fn cas_success_requires_a_specific_order() {
        // Concurrent put 1 and cas 1->2: only put-then-cas explains both.
        assert_verdict(
            &[
                put(1, 1, 0, 10),
                cas(1, Some(1), 2, true, 0, 10),
                get(1, Some(2), 20, 21),
            ],
            true,
        );
        // Read 1 afterwards contradicts the only order the cas allows.
        assert_verdict(
            &[
                put(1, 1, 0, 10),
                cas(1, Some(1), 2, true, 0, 10),
                get(1, Some(1), 20, 21),
            ],
            false,
        );
        // cas from absent succeeded, so it went before the put.
        assert_verdict(
            &[
                put(1, 1, 0, 10),
                cas(1, None, 5, true, 0, 10),
                get(1, Some(1), 20, 21),
            ],
            true,
        );
        assert_verdict(&[put(1, 1, 0, 10), cas(1, None, 5, true, 11, 12)], false);
        // A failed cas changes nothing.
        assert_verdict(
            &[
                put(1, 1, 0, 1),
                cas(1, Some(7), 5, false, 2, 3),
                get(1, Some(1), 4, 5),
            ],
            true,
        );
        assert_verdict(&[put(1, 1, 0, 1), cas(1, Some(1), 5, false, 2, 3)], false);
    }

    #[test]
    fn pending_put_whose_value_is_read() {
        let h = [
            pending(KvInput::Put { key: 1, value: 7 }, 0),
            get(1, Some(7), 10, 11),
            get(1, Some(7), 20, 21),
        ];
        assert_verdict(&h, true);
        // Read before the pending put was even invoked.
        let h = [
            get(1, Some(7), 0, 1),
            pending(KvInput::Put { key: 1, value: 7 }, 5),
        ];
        assert_verdict(&h, false);
        // A pending op may take effect long after the run saw it: absent,
        // then 7.
        let h = [
            pending(KvInput::Put { key: 1, value: 7 }, 0),
            get(1, None, 10, 11),
            get(1, Some(7), 20, 21),
        ];
        assert_verdict(&h, true);
        // ...but only once: 7, absent is impossible.
        let h = [
            pending(KvInput::Put { key: 1, value: 7 }, 0),
            get(1, Some(7), 10, 11),
            get(1, None, 20, 21),
        ];
        assert_verdict(&h, false);
    }

    #[test]
    fn pending_put_never_observed() {
        let h = [
            pending(KvInput::Put { key: 1, value: 7 }, 0),
            get(1, None, 10, 11),
            put(1, 3, 12, 13),
            get(1, Some(3), 20, 21),
        ];
        assert_verdict(&h, true);
    }

    #[test]
    fn pending_cas_and_get() {
        let h = [
            pending(
                KvInput::Cas {
                    key: 1,
                    expected: None,
                    new: 3,
                },
                0,
            ),
            get(1, Some(3), 10, 11),
        ];
        assert_verdict(&h, true);
        // The cas can only have succeeded from absent.
        let h = [
            put(1, 1, 0, 1),
            pending(
                KvInput::Cas {
                    key: 1,
                    expected: None,
                    new: 3,
                },
                2,
            ),
            get(1, Some(3), 10, 11),
        ];
        assert_verdict(&h, false);
        // Pending reads are irrelevant, whatever their times.
        let h = [
            pending(KvInput::Get { key: 1 }, 0),
            op(KvInput::Get { key: 1 }, None, 0, Some(1)),
            get(1, None, 5, 6),
        ];
        assert_verdict(&h, true);
    }

    #[test]
    fn known_output_without_return_must_take_effect() {
        // Output known but never returned: it did happen, at any time.
        let h = [
            op(
                KvInput::Put { key: 1, value: 4 },
                Some(KvOutput::PutOk),
                0,
                None,
            ),
            get(1, None, 5, 6),
            get(1, Some(4), 7, 8),
        ];
        assert_verdict(&h, true);
        let h = [
            op(
                KvInput::Get { key: 1 },
                Some(KvOutput::Get(Some(4))),
                0,
                None,
            ),
            get(1, None, 5, 6),
        ];
        assert_verdict(&h, false);
    }

    #[test]
    fn malformed_input_does_not_panic() {
        // Wrong output kind.
        assert_verdict(
            &[op(
                KvInput::Put { key: 1, value: 1 },
                Some(KvOutput::Cas(true)),
                0,
                Some(1),
            )],
            false,
        );
        // Return before call is clamped to the call time.
        assert_verdict(&[put(1, 1, 10, 5), get(1, None, 10, 11)], true);
        assert_verdict(&[put(1, 1, 10, 5), get(1, None, 11, 12)], false);
        // Extreme times.
        assert_verdict(
            &[put(1, 1, u64::MAX, u64::MAX), get(1, None, u64::MAX, 0)],
            true,
        );
        assert_verdict(&[put(u64::MAX, u64::MAX, 0, 0)], true);
    }

    #[test]
    fn keys_are_checked_independently() {
        let h = [
            put(1, 1, 0, 10),
            put(2, 1, 0, 10),
            get(1, Some(1), 20, 21),
            get(2, None, 20, 21),
            get(3, None, 30, 31),
        ];
        assert_eq!(
            check(&h),
            CheckResult::NotLinearizable {
                key: 2,
                ops: vec![1, 3]
            }
        );
        assert!(!check_brute_force(&h));
    }

    #[test]
    fn budget_exhaustion_is_unknown() {
        // Many concurrent puts then a read of a value nobody wrote: a real
        // search, which a budget of a few steps cannot finish.
        let mut h: Vec<Operation> = (0..12).map(|v| put(5, v, 0, 100)).collect();
        h.push(get(5, Some(99), 200, 201));
        assert_eq!(check_with_budget(&h, 5), CheckResult::Unknown { key: 5 });
        assert_eq!(check_with_budget(&h, 0), CheckResult::Unknown { key: 5 });
        assert!(matches!(
            check(&h),
            CheckResult::NotLinearizable { key: 5, .. }
        ));
        // A definite failure on another key wins over Unknown.
        h.push(put(6, 1, 0, 1));
        h.push(get(6, None, 2, 3));
        assert!(matches!(
            check_with_budget(&h, 50),
            CheckResult::NotLinearizable { key: 6, .. }
        ));
    }

    /// Tiny deterministic PRNG (xorshift64*), so tests need no extra crates.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A history from a real sequential execution: op i takes effect at
    /// time 10 * i and its interval stretches randomly around that point, so
    /// neighbouring ops overlap. Some ops time out (unknown outcome).
    fn sequential_history(seed: u64, len: u64, keys: u64) -> Vec<Operation> {
        let mut rng = Rng(seed | 1);
        let mut store: BTreeMap<u64, u64> = BTreeMap::new();
        let mut history = Vec::new();
        for i in 0..len {
            let key = rng.below(keys);
            let input = match rng.below(3) {
                0 => KvInput::Put {
                    key,
                    value: rng.below(5),
                },
                1 => KvInput::Get { key },
                _ => KvInput::Cas {
                    key,
                    expected: (rng.below(4) > 0).then(|| rng.below(5)),
                    new: rng.below(5),
                },
            };
            let before = store.get(&key).copied();
            let (after, out) = apply(before, &input);
            set_value(&mut store, key, after);
            let at = 1000 + 10 * i;
            let call = at - rng.below(30);
            let timed_out = rng.below(40) == 0;
            history.push(Operation {
                client: i % 7,
                input,
                output: (!timed_out).then_some(out),
                call,
                ret: (!timed_out).then(|| at + rng.below(30)),
            });
        }
        history
    }

    #[test]
    fn large_sequential_history_is_linearizable_quickly() {
        let start = Instant::now();
        for seed in 1..=3 {
            let h = sequential_history(seed, 2000, 10);
            assert_eq!(check(&h), CheckResult::Linearizable, "seed {seed}");
        }
        // One key only: 2000 ops in a single search.
        let h = sequential_history(42, 2000, 1);
        assert_eq!(check(&h), CheckResult::Linearizable);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
    }

    #[test]
    fn large_history_with_corrupted_read_fails() {
        let mut h = sequential_history(7, 2000, 10);
        let Some((i, key)) = h.iter().enumerate().find_map(|(i, o)| match o.input {
            KvInput::Get { key } if o.output.is_some() && i > 1000 => Some((i, key)),
            _ => None,
        }) else {
            panic!("no completed get in the generated history");
        };
        // Nobody ever writes 99.
        h[i].output = Some(KvOutput::Get(Some(99)));
        match check(&h) {
            CheckResult::NotLinearizable { key: k, ops } => {
                assert_eq!(k, key);
                assert!(ops.contains(&i));
                assert!(ops.iter().all(|&o| input_key(&h[o].input) == key));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// (key, kind, value, expected, time a, time b, output mode, random output)
    type RawOp = (u64, u8, u64, Option<u64>, u64, u64, u8, (Option<u64>, bool));

    fn raw_op() -> impl Strategy<Value = RawOp> {
        (
            0u64..2,
            0u8..3,
            0u64..3,
            proptest::option::of(0u64..3),
            0u64..20,
            0u64..12,
            0u8..20,
            (proptest::option::of(0u64..3), any::<bool>()),
        )
    }

    fn make_input(key: u64, kind: u8, value: u64, expected: Option<u64>) -> KvInput {
        match kind {
            0 => KvInput::Put { key, value },
            1 => KvInput::Get { key },
            _ => KvInput::Cas {
                key,
                expected,
                new: value,
            },
        }
    }

    fn random_output(input: &KvInput, seen: Option<u64>, ok: bool) -> KvOutput {
        match input {
            KvInput::Put { .. } => KvOutput::PutOk,
            KvInput::Get { .. } => KvOutput::Get(seen),
            KvInput::Cas { .. } => KvOutput::Cas(ok),
        }
    }

    /// Output mode: 0..=2 unknown outcome and never returned, 3 unknown
    /// outcome but returned, 4 known output but never returned, else normal.
    fn with_mode(mut o: Operation, mode: u8) -> Operation {
        match mode {
            0..=2 => {
                o.output = None;
                o.ret = None;
            }
            3 => o.output = None,
            4 => o.ret = None,
            _ => {}
        }
        o
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Random intervals and random outputs.
        #[test]
        fn matches_brute_force_random(raw in proptest::collection::vec(raw_op(), 0..=8)) {
            let history: Vec<Operation> = raw
                .iter()
                .enumerate()
                .map(|(i, &(key, kind, value, expected, call, dur, mode, (seen, ok)))| {
                    let input = make_input(key, kind, value, expected);
                    let output = random_output(&input, seen, ok);
                    with_mode(op_of(i, input, output, call, call + dur), mode)
                })
                .collect();
            let fast = check(&history);
            prop_assert!(!matches!(fast, CheckResult::Unknown { .. }), "budget exceeded");
            prop_assert_eq!(
                fast == CheckResult::Linearizable,
                check_brute_force(&history),
                "{:?} for {:#?}", fast, history
            );
        }

        /// Outputs from a real sequential execution at random points inside
        /// each interval, some of them then replaced by random ones.
        #[test]
        fn matches_brute_force_mostly_valid(raw in proptest::collection::vec(raw_op(), 0..=8)) {
            let mut order: Vec<(u64, usize)> =
                raw.iter().enumerate().map(|(i, r)| (r.4, i)).collect();
            order.sort_unstable();
            let mut store: BTreeMap<u64, u64> = BTreeMap::new();
            let mut history: Vec<Option<Operation>> = vec![None; raw.len()];
            let mut perturbed = false;
            for (at, i) in order {
                let (key, kind, value, expected, _, spread, mode, (seen, ok)) = raw[i];
                let input = make_input(key, kind, value, expected);
                let before = store.get(&key).copied();
                let (after, mut output) = apply(before, &input);
                // Unknown outcomes took effect in the real run half the time.
                let applied = mode > 2 || ok;
                if applied {
                    set_value(&mut store, key, after);
                }
                if mode >= 17 {
                    let random = random_output(&input, seen, ok);
                    perturbed |= random != output;
                    output = random;
                }
                let call = at.saturating_sub(spread / 2);
                let o = op_of(i, input, output, call, at + spread - spread / 2);
                history[i] = Some(with_mode(o, if applied { mode } else { 0 }));
            }
            let history: Vec<Operation> = history.into_iter().flatten().collect();
            let fast = check(&history);
            if !perturbed {
                prop_assert_eq!(&fast, &CheckResult::Linearizable, "{:#?}", history);
            }
            prop_assert_eq!(
                fast == CheckResult::Linearizable,
                check_brute_force(&history),
                "{:?} for {:#?}", fast, history
            );
        }
    }

    fn op_of(i: usize, input: KvInput, output: KvOutput, call: u64, ret: u64) -> Operation {
        Operation {
            client: i as u64,
            input,
            output: Some(output),
            call,
            ret: Some(ret),
        }
    }
}
