//! Restoring a service host's snapshot allocates in proportion to the
//! bytes present, never to a count or length field: a valid snapshot with
//! sessions, replies and timers, with every 4- and 8-byte window
//! overwritten by a value claiming gigabytes, restores or is refused with
//! a bounded largest allocation. A counting global allocator measures this
//! test binary.

use bytes::Bytes;
use keel_core::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting on the current thread while `measure` runs.
struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn count(size: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

// SAFETY: every call is passed on to `System` unchanged; the counting only
// touches const-initialised thread locals, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation while `f` runs.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(0));
    ON.with(|on| on.set(true));
    f();
    ON.with(|on| on.set(false));
    LARGEST.with(Cell::get)
}

/// Large values for a 4-byte and an 8-byte field: lengths and counts
/// claiming gigabytes (and one that wraps when multiplied).
const LARGE_U32: [u32; 4] = [u32::MAX, 1 << 31, 1 << 30, 1 << 28];
const LARGE_U64: [u64; 4] = [u64::MAX, 1 << 63, 1 << 32, (1 << 61) + 1];

/// `good` with each of its 4- and 8-byte windows overwritten by each large
/// value in turn, passed through `fix` (e.g. to reseal a checksum).
fn with_large_fields(good: &[u8], fix: impl Fn(&mut [u8])) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    for at in 0..good.len() {
        for v in LARGE_U32 {
            if at + 4 <= good.len() {
                let mut b = good.to_vec();
                b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                fix(&mut b);
                out.push((at, b));
            }
        }
        for v in LARGE_U64 {
            if at + 8 <= good.len() {
                let mut b = good.to_vec();
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                fix(&mut b);
                out.push((at, b));
            }
        }
    }
    out
}

/// What a decoder of `len` bytes may allocate at once: a small multiple
/// of what it was given.
fn bound(len: usize) -> usize {
    4 * len + 4096
}

/// A service whose state is its bytes, kept as they are.
#[derive(Default)]
struct Blob(Vec<u8>);

impl Service for Blob {
    fn restore(&mut self, s: Option<&[u8]>) -> Result<(), String> {
        self.0 = s.unwrap_or_default().to_vec();
        Ok(())
    }
    fn snapshot(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn prepare_snapshot(&self) -> SnapshotTask {
        let b = self.0.clone();
        Box::new(move |out| out.write_all(&b))
    }
    fn on_message(&mut self, ctx: &mut Context<'_>, _c: ClientId, data: &[u8]) -> Bytes {
        self.0.extend_from_slice(data);
        ctx.schedule_timer(self.0.len() as u64, ctx.time() + 100);
        Bytes::copy_from_slice(data)
    }
    fn query(&self, _d: &[u8]) -> Bytes {
        Bytes::new()
    }
    fn on_timer(&mut self, _ctx: &mut Context<'_>, _id: u64) {}
}

#[test]
fn host_snapshots_allocate_nothing_for_a_large_field() {
    let mut host = ServiceHost::new(Blob::default(), 1 << 40);
    let mut out = ApplyOutput::default();
    let mut pos = 0;
    for (client, data) in [(3u64, &b"abc"[..]), (5, b"reply"), (7, b"")] {
        let e = Entry {
            term: 1,
            position: pos,
            timestamp: 10,
            kind: EntryKind::Command { client, seq: 1 },
            data: Bytes::copy_from_slice(data),
        };
        pos = e.end();
        host.apply(&[e], &mut out);
        out.clear();
    }
    let good = host.snapshot();
    assert!(good.len() > 100, "sessions and timers in the snapshot");
    let mut cases = 0;
    for (at, bad) in with_large_fields(&good, |_| {}) {
        let snap = Snapshot {
            meta: SnapshotMeta {
                position: pos,
                term: 1,
                timestamp: 10,
                membership: Membership::default(),
            },
            data: Bytes::from(bad),
        };
        let mut h = ServiceHost::new(Blob::default(), 1 << 40);
        let largest = largest_allocation(|| {
            let _ = h.restore(&snap);
            let _ = snapshot_sessions(&snap.data);
        });
        assert!(
            largest <= bound(snap.data.len()),
            "a host snapshot with a large field at byte {at}: an allocation of {largest} bytes"
        );
        cases += 1;
    }
    assert!(cases > 500, "{cases} cases");
}
