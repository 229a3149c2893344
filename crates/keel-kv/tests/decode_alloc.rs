//! Decoding the KV service's snapshots, commands, queries, responses and
//! watch events allocates in proportion to the bytes present, never to a
//! length or count field: valid encodings rich in lists and byte strings,
//! with every 4- and 8-byte window overwritten by a value claiming
//! gigabytes, decode or are refused with a bounded largest allocation. A
//! counting global allocator measures this test binary.

use bytes::Bytes;
use keel_core::{ApplyOutput, Entry, EntryKind, Service, ServiceHost};
use keel_kv::*;
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

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: Bytes::from(k.to_owned()),
        value: Bytes::from(v.to_owned()),
        create_revision: 2,
        mod_revision: 3,
        version: 1,
        lease: 0,
    }
}

fn range(k: &str) -> RangeRequest {
    RangeRequest {
        key: Bytes::from(k.to_owned()),
        range_end: Bytes::from_static(b"z"),
        ..RangeRequest::default()
    }
}

/// A snapshot of a service with keys, history and leases.
fn snapshot() -> Vec<u8> {
    let cmds = [
        Command::LeaseGrant { id: 5, ttl: 60 },
        Command::Put {
            key: Bytes::from_static(b"a"),
            value: Bytes::from_static(b"one"),
        },
        Command::Put {
            key: Bytes::from_static(b"a"),
            value: Bytes::from_static(b"two"),
        },
        Command::PutReq(PutRequest {
            key: Bytes::from_static(b"leased"),
            value: Bytes::from_static(b"v"),
            lease: 5,
            ..PutRequest::default()
        }),
        Command::Delete {
            key: Bytes::from_static(b"gone"),
        },
    ];
    let mut host = ServiceHost::new(KvService::default(), 1 << 40);
    let mut out = ApplyOutput::default();
    let mut pos = 0;
    for (i, c) in cmds.iter().enumerate() {
        let e = Entry {
            term: 1,
            position: pos,
            timestamp: 1000,
            kind: EntryKind::Command {
                client: 1,
                seq: i as u64 + 1,
            },
            data: c.encode(),
        };
        pos = e.end();
        host.apply(&[e], &mut out);
        out.clear();
    }
    let mut b = Vec::new();
    Service::snapshot(host.service(), &mut b);
    b
}

#[test]
fn kv_decoders_allocate_nothing_for_a_large_field() {
    let txn = TxnRequest {
        compare: vec![TxnCompare {
            key: Bytes::from_static(b"a"),
            range_end: Bytes::new(),
            result: CompareResult::Equal,
            target: CompareTarget::Value(Bytes::from_static(b"one")),
        }],
        success: vec![
            RequestOp::Range(range("a")),
            RequestOp::Txn(TxnRequest {
                failure: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                    key: Bytes::from_static(b"b"),
                    ..DeleteRangeRequest::default()
                })],
                ..TxnRequest::default()
            }),
        ],
        failure: vec![RequestOp::Put(PutRequest {
            key: Bytes::from_static(b"c"),
            value: Bytes::from_static(b"v"),
            ..PutRequest::default()
        })],
    };
    let event = WatchEvent {
        kind: EventType::Put,
        kv: kv("a", "two"),
        prev_kv: Some(kv("a", "one")),
    };
    let images: Vec<(&str, Vec<u8>)> = vec![
        ("snapshot", snapshot()),
        ("txn command", Command::Txn(txn).encode().to_vec()),
        ("range query", Query::RangeReq(range("k")).encode().to_vec()),
        (
            "range response",
            Response::Range {
                revision: 9,
                kvs: vec![kv("a", "1"), kv("b", "2"), kv("c", "3")],
                more: true,
                count: 3,
            }
            .encode()
            .to_vec(),
        ),
        (
            "events",
            Response::Events {
                revision: 9,
                compact_revision: -1,
                events: vec![event.clone(), event.clone()],
                more: false,
            }
            .encode()
            .to_vec(),
        ),
        (
            "leases",
            Response::Leases {
                revision: 9,
                ids: vec![1, 2, 3],
            }
            .encode()
            .to_vec(),
        ),
        ("watch event", event.encode().to_vec()),
    ];
    let mut cases = 0;
    for (what, good) in &images {
        for (at, bad) in with_large_fields(good, |_| {}) {
            let largest = largest_allocation(|| {
                let _ = KvService::decode_snapshot(&bad);
                let _ = Command::decode(&bad);
                let _ = Query::decode(&bad);
                let _ = Response::decode(&bad);
                let _ = WatchEvent::decode(&bad);
            });
            assert!(
                largest <= bound(bad.len()),
                "{what} with a large field at byte {at}: an allocation of {largest} bytes"
            );
            cases += 1;
        }
    }
    assert!(cases > 2000, "{cases} cases");
}
