//! A counting global allocator for the decoders' allocation tests (one
//! copy, included by each crate's test with `#[path]`): it measures, on the
//! current thread, the largest single allocation and the total allocated
//! while a closure runs, and builds hostile inputs by overwriting a valid
//! encoding's 4- and 8-byte windows with values claiming gigabytes.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting on the current thread while `measure` runs.
struct Counting;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TOTAL: Cell<usize> = const { Cell::new(0) };
}

fn count(size: usize) {
    let _ = ON.try_with(|on| {
        if on.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
            let _ = TOTAL.try_with(|t| t.set(t.get().saturating_add(size)));
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

/// (largest single allocation, total bytes allocated) while `f` runs.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    LARGEST.with(|l| l.set(0));
    TOTAL.with(|t| t.set(0));
    ON.with(|on| on.set(true));
    let out = f();
    ON.with(|on| on.set(false));
    (out, LARGEST.with(Cell::get), TOTAL.with(Cell::get))
}

/// The largest single allocation while `f` runs.
pub fn largest_allocation(f: impl FnOnce()) -> usize {
    measure(f).1
}

/// Large values for a 4-byte and an 8-byte field: lengths and counts
/// claiming gigabytes (and one that wraps when multiplied).
pub const LARGE_U32: [u32; 4] = [u32::MAX, 1 << 31, 1 << 30, 1 << 28];
pub const LARGE_U64: [u64; 4] = [u64::MAX, 1 << 63, 1 << 32, (1 << 61) + 1];

/// `good` with each of its 4- and 8-byte windows overwritten by each large
/// value in turn, passed through `fix` (e.g. to reseal a checksum).
pub fn with_large_fields(good: &[u8], fix: impl Fn(&mut [u8])) -> Vec<(usize, Vec<u8>)> {
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
pub fn bound(len: usize) -> usize {
    4 * len + 4096
}
