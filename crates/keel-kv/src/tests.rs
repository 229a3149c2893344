//! Tests of the KV service driven through `ServiceHost`: MVCC semantics,
//! limits, malformed input, snapshots, and property tests of determinism
//! and of decoders that never panic.

use crate::*;
use bytes::Bytes;
use keel_core::{
    ApplyOutput, Entry, EntryKind, Membership, Reply, Service, ServiceHost, Snapshot, SnapshotMeta,
};
use proptest::prelude::*;
use std::sync::Arc;

pub(crate) const TTL: u64 = 3_600_000_000_000;

pub(crate) struct Harness {
    pub(crate) host: ServiceHost<KvService>,
    pub(crate) pos: u64,
    pub(crate) seq: u64,
    pub(crate) time: u64,
}

impl Harness {
    pub(crate) fn new() -> Harness {
        Harness {
            host: ServiceHost::new(KvService::new(), TTL),
            pos: 0,
            seq: 0,
            time: 1_000,
        }
    }

    pub(crate) fn raw(&mut self, data: Bytes) -> Bytes {
        self.seq += 1;
        self.time += 1_000;
        let e = Entry {
            term: 1,
            position: self.pos,
            timestamp: self.time,
            kind: EntryKind::Command {
                client: 7,
                seq: self.seq,
            },
            data,
        };
        self.pos = e.end();
        let mut out = ApplyOutput::default();
        self.host.apply(&[e], &mut out);
        assert_eq!(out.replies.len(), 1);
        match out.replies.pop() {
            Some((7, _, Reply::Applied(b))) => b,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    pub(crate) fn cmd(&mut self, c: Command) -> Response {
        Response::decode(&self.raw(c.encode())).unwrap()
    }

    pub(crate) fn query(&self, q: &Query) -> Response {
        Response::decode(&self.host.query(&q.encode())).unwrap()
    }

    pub(crate) fn svc(&self) -> &KvService {
        self.host.service()
    }

    pub(crate) fn svc_mut(&mut self) -> &mut KvService {
        self.host.service_mut()
    }

    /// Moves log time forward.
    pub(crate) fn advance(&mut self, ns: u64) {
        self.time += ns;
    }

    /// Applies a timer entry for `id` fired for `deadline`, at the current
    /// log time (plus a tick).
    pub(crate) fn timer(&mut self, id: u64, deadline: u64) {
        self.time += 1_000;
        let e = Entry {
            term: 1,
            position: self.pos,
            timestamp: self.time,
            kind: EntryKind::Timer { id, deadline },
            data: Bytes::new(),
        };
        self.pos = e.end();
        let mut out = ApplyOutput::default();
        self.host.apply(&[e], &mut out);
        assert!(out.replies.is_empty());
    }

    /// Applies a new leader's term-start entry at the current log time
    /// (plus a tick): `marked` as this version writes it, or without data
    /// as logs from before services were told of term starts hold it.
    pub(crate) fn term_start(&mut self, marked: bool) {
        self.time += 1_000;
        let e = Entry {
            term: 2,
            position: self.pos,
            timestamp: self.time,
            kind: EntryKind::TermStart,
            data: if marked {
                Bytes::from_static(keel_core::TERM_START_MARK)
            } else {
                Bytes::new()
            },
        };
        self.pos = e.end();
        let mut out = ApplyOutput::default();
        self.host.apply(&[e], &mut out);
        assert!(out.replies.is_empty());
    }

    /// Fires every timer due at the current log time, as a leader would.
    pub(crate) fn fire_due(&mut self) {
        let due: Vec<(u64, u64)> = self
            .host
            .timers()
            .iter()
            .filter(|(_, &d)| d <= self.time)
            .map(|(&id, &d)| (id, d))
            .collect();
        for (id, d) in due {
            self.timer(id, d);
        }
    }
}

pub(crate) fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

pub(crate) fn put(k: &str, v: &str) -> Command {
    Command::Put {
        key: b(k),
        value: b(v),
    }
}

pub(crate) fn kv(k: &str, v: &str, create: u64, modr: u64, version: u64) -> KeyValue {
    KeyValue {
        key: b(k),
        value: b(v),
        create_revision: create,
        mod_revision: modr,
        version,
        lease: 0,
    }
}

pub(crate) fn keys(kvs: &[KeyValue]) -> Vec<Bytes> {
    kvs.iter().map(|k| k.key.clone()).collect()
}

#[test]
fn put_creates_and_updates_with_revisions_and_versions() {
    let mut h = Harness::new();
    assert_eq!(h.svc().revision(), 1);
    assert_eq!(
        h.cmd(put("a", "1")),
        Response::Put {
            revision: 2,
            prev: None
        }
    );
    assert_eq!(
        h.cmd(put("b", "x")),
        Response::Put {
            revision: 3,
            prev: None
        }
    );
    assert_eq!(
        h.cmd(put("a", "2")),
        Response::Put {
            revision: 4,
            prev: Some(kv("a", "1", 2, 2, 1))
        }
    );
    // Same value again is still a write.
    assert_eq!(
        h.cmd(put("a", "2")),
        Response::Put {
            revision: 5,
            prev: Some(kv("a", "2", 2, 4, 2))
        }
    );
    assert_eq!(h.svc().get(b"a"), Some(kv("a", "2", 2, 5, 3)));
    assert_eq!(
        h.query(&Query::Get { key: b("a") }),
        Response::Get {
            revision: 5,
            kv: Some(kv("a", "2", 2, 5, 3))
        }
    );
    assert_eq!(
        h.query(&Query::Get { key: b("zz") }),
        Response::Get {
            revision: 5,
            kv: None
        }
    );
    assert_eq!(h.svc().applied_commands(), 4);
    assert_eq!(
        h.query(&Query::Status),
        Response::Status {
            revision: 5,
            keys: 2,
            applied: 4,
            compact_revision: -1,
            db_size: h.svc().db_size(),
            leases: 0,
        }
    );
}

/// With nobody taking the watch feed the service builds none; asked again,
/// it resumes with the next change.
#[test]
fn no_watch_feed_is_built_while_nobody_wants_it() {
    let mut h = Harness::new();
    let put = |k: &str| Command::Put {
        key: Bytes::from(k.to_string()),
        value: Bytes::from_static(b"v"),
    };
    h.svc_mut().notifications_wanted(false);
    h.cmd(put("a"));
    h.cmd(Command::Delete {
        key: Bytes::from_static(b"a"),
    });
    assert!(h.svc_mut().take_events().is_empty());
    h.svc_mut().notifications_wanted(true);
    h.cmd(put("b"));
    let events = h.svc_mut().take_events();
    assert_eq!(events.len(), 1);
    assert_eq!(&events[0].kv.key[..], b"b");
}

/// The runtime holds its service boxed (`Box<dyn Service + Send>`): the
/// box passes "nobody wants the feed" on, or every write would build watch
/// events only for the runtime to drop them.
#[test]
fn a_boxed_service_hears_that_nobody_wants_the_watch_feed() {
    let mut boxed: Box<dyn Service + Send> = Box::new(KvService::new());
    boxed.notifications_wanted(false);
    let mut host = ServiceHost::new(boxed, TTL);
    let entry = |position, seq, c: Command| Entry {
        term: 1,
        position,
        timestamp: 1_000 * seq,
        kind: EntryKind::Command { client: 7, seq },
        data: c.encode(),
    };
    let first = entry(0, 1, put("a", "1"));
    let next = first.end();
    host.apply(&[first], &mut ApplyOutput::default());
    assert!(host.service_mut().take_notifications().is_empty());
    host.service_mut().notifications_wanted(true);
    host.apply(
        &[entry(next, 2, put("b", "2"))],
        &mut ApplyOutput::default(),
    );
    assert_eq!(host.service_mut().take_notifications().len(), 1);
}

#[test]
fn delete_and_recreate() {
    let mut h = Harness::new();
    h.cmd(put("a", "1"));
    h.cmd(put("a", "2"));
    assert_eq!(
        h.cmd(Command::Delete { key: b("a") }),
        Response::Delete {
            revision: 4,
            deleted: 1,
            prev: Some(kv("a", "2", 2, 3, 2))
        }
    );
    assert_eq!(h.svc().get(b"a"), None);
    // Deleting a missing key does not bump the revision.
    assert_eq!(
        h.cmd(Command::Delete { key: b("a") }),
        Response::Delete {
            revision: 4,
            deleted: 0,
            prev: None
        }
    );
    assert_eq!(h.svc().revision(), 4);
    assert_eq!(h.svc().applied_commands(), 4);
    // Re-creating starts over at version 1 with a new create revision.
    h.cmd(put("a", "3"));
    assert_eq!(h.svc().get(b"a"), Some(kv("a", "3", 5, 5, 1)));
}

#[test]
fn delete_range_and_prefix() {
    let mut h = Harness::new();
    for k in ["a", "ab", "abc", "abd", "b", "c"] {
        h.cmd(put(k, k));
    }
    let r = h.cmd(Command::DeleteRange {
        start: b("ab"),
        end: prefix_end(b"ab"),
    });
    match r {
        Response::DeleteRange {
            revision,
            deleted,
            prev,
        } => {
            assert_eq!(revision, 8, "one revision for the whole range");
            assert_eq!(deleted, 3);
            assert_eq!(keys(&prev), vec![b("ab"), b("abc"), b("abd")]);
        }
        other => panic!("{other:?}"),
    }
    // Empty range: no revision bump.
    assert_eq!(
        h.cmd(Command::DeleteRange {
            start: b("x"),
            end: b("y")
        }),
        Response::DeleteRange {
            revision: 8,
            deleted: 0,
            prev: vec![]
        }
    );
    // Single key (empty end) and everything from a key ([0]).
    h.cmd(Command::DeleteRange {
        start: b("a"),
        end: Bytes::new(),
    });
    assert_eq!(h.svc().get(b"a"), None);
    h.cmd(Command::DeleteRange {
        start: b("b"),
        end: Bytes::from_static(&[0]),
    });
    assert!(h.svc().is_empty());
    assert_eq!(h.svc().revision(), 10);
}

#[test]
fn cas_variants() {
    let mut h = Harness::new();
    let cas = |k: &str, expected: Compare, v: &str| Command::Cas {
        key: b(k),
        expected,
        value: b(v),
    };
    // Create-if-absent with version 0 and with mod revision 0.
    assert_eq!(
        h.cmd(cas("a", Compare::VersionEquals(0), "1")),
        Response::Cas {
            succeeded: true,
            revision: 2,
            current: Some(kv("a", "1", 2, 2, 1))
        }
    );
    assert_eq!(
        h.cmd(cas("a", Compare::VersionEquals(0), "x")),
        Response::Cas {
            succeeded: false,
            revision: 2,
            current: Some(kv("a", "1", 2, 2, 1))
        }
    );
    assert_eq!(
        h.cmd(cas("b", Compare::ModRevisionEquals(0), "b")),
        Response::Cas {
            succeeded: true,
            revision: 3,
            current: Some(kv("b", "b", 3, 3, 1))
        }
    );
    // Value compare.
    assert!(matches!(
        h.cmd(cas("a", Compare::ValueEquals(b("nope")), "2")),
        Response::Cas {
            succeeded: false,
            revision: 3,
            ..
        }
    ));
    assert_eq!(
        h.cmd(cas("a", Compare::ValueEquals(b("1")), "2")),
        Response::Cas {
            succeeded: true,
            revision: 4,
            current: Some(kv("a", "2", 2, 4, 2))
        }
    );
    // A value compare on an absent key fails, even against the empty value.
    assert_eq!(
        h.cmd(cas("z", Compare::ValueEquals(Bytes::new()), "z")),
        Response::Cas {
            succeeded: false,
            revision: 4,
            current: None
        }
    );
    // Version and mod revision compares.
    assert!(matches!(
        h.cmd(cas("a", Compare::VersionEquals(1), "3")),
        Response::Cas {
            succeeded: false,
            ..
        }
    ));
    assert!(matches!(
        h.cmd(cas("a", Compare::VersionEquals(2), "3")),
        Response::Cas {
            succeeded: true,
            revision: 5,
            ..
        }
    ));
    assert!(matches!(
        h.cmd(cas("a", Compare::ModRevisionEquals(4), "4")),
        Response::Cas {
            succeeded: false,
            ..
        }
    ));
    assert!(matches!(
        h.cmd(cas("a", Compare::ModRevisionEquals(5), "4")),
        Response::Cas {
            succeeded: true,
            revision: 6,
            ..
        }
    ));
    assert_eq!(h.svc().get(b"a"), Some(kv("a", "4", 2, 6, 4)));
    assert_eq!(h.svc().revision(), 6);
    assert_eq!(h.svc().applied_commands(), 10);
}

#[test]
fn range_limit_more_count() {
    let mut h = Harness::new();
    for k in ["a", "b", "c", "d", "e"] {
        h.cmd(put(k, k));
    }
    let range = |start: &str, end: &[u8], limit| Query::Range {
        start: b(start),
        end: Bytes::copy_from_slice(end),
        limit,
    };
    match h.query(&range("b", b"e", 2)) {
        Response::Range {
            revision,
            kvs,
            more,
            count,
        } => {
            assert_eq!(revision, 6);
            assert_eq!(keys(&kvs), vec![b("b"), b("c")]);
            assert!(more);
            assert_eq!(count, 3);
        }
        other => panic!("{other:?}"),
    }
    match h.query(&range("b", b"e", 3)) {
        Response::Range {
            kvs, more, count, ..
        } => {
            assert_eq!(kvs.len(), 3);
            assert!(!more);
            assert_eq!(count, 3);
        }
        other => panic!("{other:?}"),
    }
    // No limit, from a key to the end.
    match h.query(&range("c", &[0], 0)) {
        Response::Range {
            kvs, more, count, ..
        } => {
            assert_eq!(keys(&kvs), vec![b("c"), b("d"), b("e")]);
            assert!(!more);
            assert_eq!(count, 3);
        }
        other => panic!("{other:?}"),
    }
    // Every key: empty start, end [0].
    assert_eq!(h.svc().range(b"", &[0], 0).2, 5);
    assert_eq!(
        h.svc().range(b"", &[0], 1),
        (vec![kv("a", "a", 2, 2, 1)], true, 5)
    );
    // Single key, missing key, reversed and empty ranges.
    assert_eq!(h.svc().range(b"c", b"", 0).2, 1);
    assert_eq!(h.svc().range(b"cc", b"", 0).2, 0);
    assert_eq!(h.svc().range(b"d", b"b", 0), (vec![], false, 0));
    assert_eq!(h.svc().range(b"b", b"b", 0), (vec![], false, 0));
    // Prefix helper.
    h.cmd(put("ca", "x"));
    h.cmd(put("c\u{7f}", "y"));
    match h.query(&Query::prefix(b("c"), 0)) {
        Response::Range { kvs, count, .. } => {
            assert_eq!(keys(&kvs), vec![b("c"), b("ca"), b("c\u{7f}")]);
            assert_eq!(count, 3);
        }
        other => panic!("{other:?}"),
    }
    // Empty start needs a non-empty end.
    assert!(matches!(
        h.query(&range("", b"", 0)),
        Response::Error {
            code: ErrorCode::EmptyKey,
            ..
        }
    ));
}

#[test]
fn prefix_end_edge_cases() {
    assert_eq!(prefix_end(b"abc"), Bytes::from_static(b"abd"));
    assert_eq!(prefix_end(b"a"), Bytes::from_static(b"b"));
    assert_eq!(prefix_end(b"ab\xff"), Bytes::from_static(b"ac"));
    assert_eq!(prefix_end(b"a\xff\xff"), Bytes::from_static(b"b"));
    assert_eq!(prefix_end(b"a\xfe\xff"), Bytes::from_static(b"a\xff"));
    assert_eq!(prefix_end(b"\x00"), Bytes::from_static(b"\x01"));
    assert_eq!(prefix_end(b"\xff"), Bytes::from_static(&[0]));
    assert_eq!(prefix_end(b"\xff\xff\xff"), Bytes::from_static(&[0]));
    assert_eq!(prefix_end(b""), Bytes::from_static(&[0]));
}

#[test]
fn prefix_of_all_ff_selects_to_the_end() {
    let mut h = Harness::new();
    h.cmd(Command::Put {
        key: Bytes::from_static(b"\xfe"),
        value: b("0"),
    });
    h.cmd(Command::Put {
        key: Bytes::from_static(b"\xff"),
        value: b("1"),
    });
    h.cmd(Command::Put {
        key: Bytes::from_static(b"\xff\xff\x01"),
        value: b("2"),
    });
    match h.query(&Query::prefix(Bytes::from_static(b"\xff"), 0)) {
        Response::Range { kvs, count, .. } => {
            assert_eq!(count, 2);
            assert_eq!(kvs[1].key, Bytes::from_static(b"\xff\xff\x01"));
        }
        other => panic!("{other:?}"),
    }
    match h.query(&Query::prefix(Bytes::new(), 0)) {
        Response::Range { count, .. } => assert_eq!(count, 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn limits_are_enforced_and_change_nothing() {
    let mut h = Harness::new();
    h.cmd(put("a", "1"));
    let before = h.svc().snapshot_vec();
    let big_key = Bytes::from(vec![b'k'; MAX_KEY_LEN + 1]);
    let big_value = Bytes::from(vec![0u8; MAX_VALUE_LEN + 1]);
    let cases = [
        (
            Command::Put {
                key: big_key.clone(),
                value: b("v"),
            },
            ErrorCode::KeyTooLarge,
        ),
        (
            Command::Put {
                key: b("k"),
                value: big_value.clone(),
            },
            ErrorCode::ValueTooLarge,
        ),
        (
            Command::Put {
                key: Bytes::new(),
                value: b("v"),
            },
            ErrorCode::EmptyKey,
        ),
        (
            Command::Delete {
                key: big_key.clone(),
            },
            ErrorCode::KeyTooLarge,
        ),
        (
            Command::Cas {
                key: b("a"),
                expected: Compare::VersionEquals(1),
                value: big_value,
            },
            ErrorCode::ValueTooLarge,
        ),
        (
            Command::DeleteRange {
                start: b("a"),
                end: big_key,
            },
            ErrorCode::KeyTooLarge,
        ),
    ];
    for (c, code) in cases {
        match h.cmd(c) {
            Response::Error { code: got, message } => {
                assert_eq!(got, code, "{message}");
                assert!(message.contains("expected"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.svc().snapshot_vec(), before);
    // Exactly at the limits is fine.
    let r = h.cmd(Command::Put {
        key: Bytes::from(vec![b'k'; MAX_KEY_LEN]),
        value: Bytes::from(vec![1u8; MAX_VALUE_LEN]),
    });
    assert!(matches!(r, Response::Put { revision: 3, .. }), "{r:?}");
}

#[test]
fn malformed_command_changes_nothing() {
    let mut h = Harness::new();
    h.cmd(put("a", "1"));
    h.cmd(put("b", "2"));
    let before = h.svc().clone();
    let good = put("c", "3").encode();
    let mut bad: Vec<Bytes> = vec![
        Bytes::new(),
        Bytes::from_static(&[0]),
        Bytes::from_static(&[9, 1, 2]),
        Bytes::from_static(&[1, 0xff, 0xff, 0xff, 0xff]),
    ];
    for cut in 1..good.len() {
        bad.push(good.slice(..cut));
    }
    let mut long = good.to_vec();
    long.push(0);
    bad.push(Bytes::from(long));
    let mut bad_compare = Command::Cas {
        key: b("a"),
        expected: Compare::VersionEquals(1),
        value: b("v"),
    }
    .encode()
    .to_vec();
    bad_compare[1 + 4 + 1] = 7; // compare tag
    bad.push(Bytes::from(bad_compare));
    for data in bad {
        let reply = Response::decode(&h.raw(data.clone())).unwrap();
        assert!(
            matches!(
                reply,
                Response::Error {
                    code: ErrorCode::Malformed,
                    ..
                }
            ),
            "{data:?} -> {reply:?}"
        );
        assert_eq!(*h.svc(), before);
    }
    // A malformed query is answered with an error too.
    let reply = Response::decode(&h.host.query(&[2, 1])).unwrap();
    assert!(matches!(
        reply,
        Response::Error {
            code: ErrorCode::Malformed,
            ..
        }
    ));
    assert!(matches!(
        reply.into_result(),
        Err(KvError::Remote {
            code: ErrorCode::Malformed,
            ..
        })
    ));
}

#[test]
fn host_snapshot_round_trip() {
    let mut a = Harness::new();
    a.cmd(put("a", "1"));
    a.cmd(put("b", "2"));
    a.cmd(Command::Delete { key: b("a") });
    a.cmd(put("a", "3"));
    let snap = Snapshot {
        meta: SnapshotMeta {
            position: a.host.applied(),
            term: 1,
            timestamp: a.time,
            membership: Membership::new([1]),
        },
        data: a.host.snapshot(),
    };
    let mut b2 = ServiceHost::new(KvService::new(), TTL);
    b2.restore(&snap).unwrap();
    assert_eq!(b2.service(), a.svc());
    assert_eq!(b2.snapshot(), a.host.snapshot());
    // The restored host continues identically.
    let mut bh = Harness {
        host: b2,
        pos: a.pos,
        seq: a.seq,
        time: a.time,
    };
    assert_eq!(bh.cmd(put("c", "4")), a.cmd(put("c", "4")));
    assert_eq!(bh.svc(), a.svc());
}

/// Records each write a snapshot task makes; fails the `fail_at`th.
struct Pieces {
    writes: Vec<usize>,
    bytes: Vec<u8>,
    fail_at: Option<usize>,
}

impl std::io::Write for Pieces {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.fail_at == Some(self.writes.len()) {
            return Err(std::io::Error::other("disk full"));
        }
        self.writes.push(buf.len());
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A captured KV state writes itself in pieces of about a megabyte, so the
/// runtime can stream it to the snapshot file without holding it whole;
/// the pieces make up exactly `snapshot`'s bytes, and a write error stops
/// it with that error.
#[test]
fn a_captured_state_streams_in_pieces() {
    let mut s = KvService::new();
    let value = "v".repeat(1000);
    for round in 0..3 {
        for k in 0..1500 {
            s.apply(put(&format!("key-{k:05}"), &format!("{round}{value}")));
        }
    }
    let whole = s.snapshot_vec();
    assert!(whole.len() > 4 << 20, "{} bytes", whole.len());
    let mut out = Pieces {
        writes: Vec::new(),
        bytes: Vec::new(),
        fail_at: None,
    };
    s.prepare_snapshot()(&mut out).unwrap();
    assert_eq!(out.bytes, whole);
    assert!(out.writes.len() >= 4, "{:?}", out.writes);
    // One key's history beyond a piece at most (here 3 entries of ~1 KiB).
    let largest = out.writes.iter().max().copied().unwrap_or(0);
    assert!(largest < (1 << 20) + 4096, "{:?}", out.writes);
    let mut failing = Pieces {
        writes: Vec::new(),
        bytes: Vec::new(),
        fail_at: Some(2),
    };
    let e = s.prepare_snapshot()(&mut failing).unwrap_err();
    assert_eq!(e.to_string(), "disk full");
    assert_eq!(failing.writes.len(), 2, "nothing written after the error");
}

#[test]
fn restore_rejects_bad_snapshots_and_none_empties() {
    let mut s = KvService::new();
    s.apply(put("a", "1"));
    let snap = s.snapshot_vec();
    let mut t = KvService::new();
    assert!(t.restore(Some(b"nope")).is_err());
    assert!(t.restore(Some(&snap[..snap.len() - 1])).is_err());
    let mut extra = snap.clone();
    extra.push(0);
    assert!(t.restore(Some(&extra)).is_err());
    // A key whose mod revision is beyond the store revision.
    let mut bad = snap.clone();
    bad[4 + 8] = 0; // store revision 1 -> 0
    assert!(t.restore(Some(&bad)).unwrap_err().contains("inconsistent"));
    assert!(t.is_empty(), "a failed restore leaves the state alone");
    // A store revision past etcd's int64 revisions: no write could follow.
    let mut bad = snap.clone();
    bad[12..20].fill(0xff); // store revision 1 -> u64::MAX
    assert!(t.restore(Some(&bad)).unwrap_err().contains("inconsistent"));
    bad[12..20].copy_from_slice(&(i64::MAX as u64 + 1).to_le_bytes());
    assert!(t.restore(Some(&bad)).unwrap_err().contains("inconsistent"));
    assert!(t.is_empty());
    t.restore(Some(&snap)).unwrap();
    assert_eq!(t, s);
    t.restore(None).unwrap();
    assert_eq!(t, KvService::new());
}

// ---- property tests ----

fn arb_key() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(prop::sample::select(vec![b'a', b'b', 0xff]), 1..4).prop_map(Bytes::from)
}

fn arb_bound() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(prop::sample::select(vec![0u8, b'a', b'b', 0xff]), 0..4)
        .prop_map(Bytes::from)
}

fn arb_value() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(prop::sample::select(vec![b'x', b'y']), 0..3).prop_map(Bytes::from)
}

fn arb_compare() -> impl Strategy<Value = Compare> {
    prop_oneof![
        arb_value().prop_map(Compare::ValueEquals),
        (0u64..4).prop_map(Compare::VersionEquals),
        (0u64..12).prop_map(Compare::ModRevisionEquals),
    ]
}

fn arb_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (arb_key(), arb_value()).prop_map(|(key, value)| Command::Put { key, value }),
        2 => arb_key().prop_map(|key| Command::Delete { key }),
        1 => (arb_bound(), arb_bound()).prop_map(|(start, end)| Command::DeleteRange { start, end }),
        2 => (arb_key(), arb_compare(), arb_value())
            .prop_map(|(key, expected, value)| Command::Cas { key, expected, value }),
    ]
}

fn arb_query() -> impl Strategy<Value = Query> {
    prop_oneof![
        arb_bound().prop_map(|key| Query::Get { key }),
        (arb_bound(), arb_bound(), 0u64..4).prop_map(|(start, end, limit)| Query::Range {
            start,
            end,
            limit
        }),
        Just(Query::Status),
    ]
}

fn arb_kv() -> impl Strategy<Value = KeyValue> {
    (
        arb_bound(),
        arb_value(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(key, value, create_revision, mod_revision, version)| KeyValue {
                key,
                value,
                create_revision,
                mod_revision,
                version,
                lease: (version % 3) as i64 - 1,
            },
        )
}

fn arb_response() -> impl Strategy<Value = Response> {
    let kvs = || prop::collection::vec(arb_kv(), 0..3);
    prop_oneof![
        (any::<u64>(), prop::option::of(arb_kv()))
            .prop_map(|(revision, prev)| Response::Put { revision, prev }),
        (any::<u64>(), any::<u64>(), prop::option::of(arb_kv())).prop_map(
            |(revision, deleted, prev)| Response::Delete {
                revision,
                deleted,
                prev
            }
        ),
        (any::<u64>(), any::<u64>(), kvs()).prop_map(|(revision, deleted, prev)| {
            Response::DeleteRange {
                revision,
                deleted,
                prev,
            }
        }),
        (any::<bool>(), any::<u64>(), prop::option::of(arb_kv())).prop_map(
            |(succeeded, revision, current)| Response::Cas {
                succeeded,
                revision,
                current
            }
        ),
        (any::<u64>(), prop::option::of(arb_kv()))
            .prop_map(|(revision, kv)| Response::Get { revision, kv }),
        (any::<u64>(), kvs(), any::<bool>(), any::<u64>()).prop_map(
            |(revision, kvs, more, count)| Response::Range {
                revision,
                kvs,
                more,
                count
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
            |(revision, keys, applied, compact_revision)| Response::Status {
                revision,
                keys,
                applied,
                compact_revision,
                db_size: keys.wrapping_mul(3),
                leases: applied / 2,
            }
        ),
        (prop::sample::select(ErrorCode::ALL.to_vec()), ".{0,8}")
            .prop_map(|(code, message)| Response::Error { code, message }),
    ]
}

/// A plain model of the semantics: key -> (value, create, mod, version).
struct Model {
    revision: u64,
    keys: std::collections::BTreeMap<Bytes, KeyValue>,
}

impl Default for Model {
    fn default() -> Model {
        Model {
            revision: 1,
            keys: Default::default(),
        }
    }
}

impl Model {
    fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
        if end.is_empty() {
            key == start
        } else if end == [0] {
            key >= start
        } else {
            key >= start && key < end
        }
    }

    fn apply(&mut self, c: &Command) {
        if c.validate().is_err() {
            return;
        }
        let rev = self.revision + 1;
        let mut changed = false;
        let mut put =
            |keys: &mut std::collections::BTreeMap<Bytes, KeyValue>, key: &Bytes, value: &Bytes| {
                let (create, version) = match keys.get(key) {
                    Some(p) => (p.create_revision, p.version + 1),
                    None => (rev, 1),
                };
                keys.insert(
                    key.clone(),
                    KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision: create,
                        mod_revision: rev,
                        version,
                        lease: 0,
                    },
                );
                changed = true;
            };
        match c {
            Command::Put { key, value } => put(&mut self.keys, key, value),
            Command::Cas {
                key,
                expected,
                value,
            } if expected.matches(self.keys.get(key)) => put(&mut self.keys, key, value),
            Command::Delete { key } => changed = self.keys.remove(key).is_some(),
            Command::DeleteRange { start, end } => {
                let n = self.keys.len();
                self.keys.retain(|k, _| !Model::in_range(k, start, end));
                changed = self.keys.len() != n;
            }
            _ => {}
        }
        if changed {
            self.revision = rev;
        }
    }
}

fn service_after(cmds: &[Command]) -> (Harness, Vec<Bytes>) {
    let mut h = Harness::new();
    let replies = cmds.iter().map(|c| h.raw(c.encode())).collect();
    (h, replies)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn snapshot_round_trip_and_determinism(
        cmds in prop::collection::vec(arb_command(), 0..40),
        queries in prop::collection::vec(arb_query(), 1..20),
    ) {
        let (a, replies_a) = service_after(&cmds);
        let (a2, replies_a2) = service_after(&cmds);
        prop_assert_eq!(&replies_a, &replies_a2);
        let snap = a.svc().snapshot_vec();
        prop_assert_eq!(&snap, &a2.svc().snapshot_vec());

        let mut b = KvService::new();
        b.restore(Some(&snap)).unwrap();
        prop_assert_eq!(&b, a.svc());
        prop_assert_eq!(b.snapshot_vec(), snap);
        for q in &queries {
            prop_assert_eq!(b.query(&q.encode()), a.host.query(&q.encode()));
        }
        for k in [&b"a"[..], b"b", b"ab", b"\xff", b"ba\xff"] {
            prop_assert_eq!(b.get(k), a.svc().get(k));
        }
    }

    #[test]
    fn matches_model(cmds in prop::collection::vec(arb_command(), 0..40)) {
        let (h, _) = service_after(&cmds);
        let mut m = Model::default();
        for c in &cmds {
            m.apply(c);
        }
        prop_assert_eq!(h.svc().revision(), m.revision);
        let (all, more, count) = h.svc().range(b"", &[0], 0);
        prop_assert!(!more);
        prop_assert_eq!(count as usize, m.keys.len());
        prop_assert_eq!(all, m.keys.values().cloned().collect::<Vec<_>>());
        let valid = cmds.iter().filter(|c| c.validate().is_ok()).count();
        prop_assert_eq!(h.svc().applied_commands(), valid as u64);
    }

    #[test]
    fn range_agrees_with_filter(
        cmds in prop::collection::vec(arb_command(), 0..30),
        start in arb_bound(),
        end in arb_bound(),
        limit in 0u64..5,
    ) {
        let (h, _) = service_after(&cmds);
        let (all, _, _) = h.svc().range(b"", &[0], 0);
        let want: Vec<KeyValue> = all
            .into_iter()
            .filter(|kv| Model::in_range(&kv.key, &start, &end))
            .collect();
        let (kvs, more, count) = h.svc().range(&start, &end, limit);
        prop_assert_eq!(count as usize, want.len());
        let take = if limit == 0 { want.len() } else { want.len().min(limit as usize) };
        prop_assert_eq!(&kvs[..], &want[..take]);
        prop_assert_eq!(more, take < want.len());
    }

    #[test]
    fn prefix_end_bounds_exactly_the_prefix(
        prefix in prop::collection::vec(prop::sample::select(vec![0u8, 1, 0xfe, 0xff]), 0..4),
        key in prop::collection::vec(prop::sample::select(vec![0u8, 1, 0xfe, 0xff]), 0..6),
    ) {
        let end = prefix_end(&prefix);
        prop_assert_eq!(
            Model::in_range(&key, &prefix, &end),
            key.starts_with(&prefix),
        );
    }

    #[test]
    fn encodings_round_trip(c in arb_command(), q in arb_query(), r in arb_response()) {
        prop_assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        prop_assert_eq!(Query::decode(&q.encode()).unwrap(), q);
        prop_assert_eq!(Response::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..128)) {
        let _ = Command::decode(&data);
        let _ = Query::decode(&data);
        let _ = Response::decode(&data);
        let _ = KvService::decode_snapshot(&data);
        for magic in [b"KKV2", b"KKV3"] {
            let mut with_magic = magic.to_vec();
            with_magic.extend_from_slice(&data);
            let _ = KvService::decode_snapshot(&with_magic);
        }
        let s = KvService::new();
        let _ = Response::decode(&s.query(&data)).unwrap();
    }

    #[test]
    fn mutated_encodings_never_panic(
        c in arb_command(),
        r in arb_response(),
        cmds in prop::collection::vec(arb_command(), 0..8),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let (h, _) = service_after(&cmds);
        for enc in [c.encode().to_vec(), r.encode().to_vec(), h.svc().snapshot_vec()] {
            let mut m = enc.clone();
            let i = flip.index(m.len());
            m[i] = byte;
            let t = &enc[..cut.index(enc.len() + 1)];
            for d in [&m[..], t] {
                let _ = Command::decode(d);
                let _ = Response::decode(d);
                let _ = Query::decode(d);
                let _ = KvService::decode_snapshot(d);
            }
        }
    }

    #[test]
    fn malformed_never_changes_state(
        cmds in prop::collection::vec(arb_command(), 0..10),
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let (mut h, _) = service_after(&cmds);
        let before = h.svc().clone();
        let reply = Response::decode(&h.raw(Bytes::from(data.clone()))).unwrap();
        let is_error = matches!(reply, Response::Error { .. });
        // A well-formed command may still fail (a compaction in the future,
        // an unknown lease): it counts as applied but changes no data.
        // Anything malformed changes nothing at all.
        if is_error {
            prop_assert_eq!(h.svc().store(), before.store());
            prop_assert_eq!(h.svc().leases(), before.leases());
        }
        if !matches!(Command::decode(&data), Ok(c) if c.validate().is_ok()) {
            prop_assert!(is_error, "{:?}", reply);
            prop_assert_eq!(h.svc(), &before);
        }
    }
}

/// The quota admits writes while the published history leaves room,
/// refuses those that store values once it does not (raising the alarm),
/// and always admits what makes room: deletes, compactions, revocations.
#[test]
fn the_space_quota_refuses_writes_that_store_values_past_it() {
    let kv = KvService::new().with_quota(2_000);
    let quota = kv.quota().expect("a quota");
    let admit = kv.admission().expect("the quota's check");
    let mut h = Harness::new();
    h.host = ServiceHost::new(kv, TTL);
    assert_eq!((quota.limit(), quota.used()), (2_000, 0));
    let value = "v".repeat(300);
    let mut stored = 0;
    while admit(&put(&format!("k{stored}"), &value).encode()).is_ok() {
        h.cmd(put(&format!("k{stored}"), &value));
        stored += 1;
        assert_eq!(
            quota.used(),
            h.svc().db_size(),
            "published after each write"
        );
        assert!(stored < 10, "the quota never refused");
    }
    // 2000 bytes hold five entries of 366 bytes (key, value, overhead).
    assert_eq!(stored, 5);
    assert!(quota.alarm(), "a refusal raises the alarm");
    // Smaller writes still fit the last 170 bytes, until they do not.
    let mut small = 0;
    while admit(&put(&format!("s{small}"), "y").encode()).is_ok() {
        h.cmd(put(&format!("s{small}"), "y"));
        small += 1;
        assert!(small < 10, "the quota never refused");
    }
    assert_eq!(small, 2);
    assert!(2_000 - quota.used() < 64, "{} bytes used", quota.used());
    let txn_put = |success: Vec<RequestOp>, failure: Vec<RequestOp>| {
        Command::Txn(TxnRequest {
            compare: Vec::new(),
            success,
            failure,
        })
    };
    let put_op = || RequestOp::Put(PutRequest::new(b("k0"), b(&value)));
    let range_op = || {
        RequestOp::Range(RangeRequest {
            key: b("k0"),
            ..Default::default()
        })
    };
    let nested = txn_put(vec![range_op()], vec![put_op()]);
    let Command::Txn(nested) = nested else {
        unreachable!()
    };
    let refused = [
        Command::PutReq(PutRequest::new(b("k0"), b(&value))),
        Command::Cas {
            key: b("k0"),
            expected: Compare::VersionEquals(0),
            value: b("v"),
        },
        txn_put(vec![put_op()], Vec::new()),
        txn_put(vec![range_op()], vec![put_op()]),
        txn_put(vec![RequestOp::Txn(nested)], Vec::new()),
        Command::LeaseGrant { id: 0, ttl: 60 },
    ];
    for c in refused {
        assert_eq!(admit(&c.encode()), Err(NO_SPACE.to_string()), "{c:?}");
    }
    let admitted = [
        txn_put(vec![range_op()], vec![range_op()]),
        Command::Delete { key: b("k0") },
        Command::DeleteRangeReq(DeleteRangeRequest {
            key: b("k"),
            range_end: b("l"),
            prev_kv: false,
        }),
        Command::Compact { revision: 2 },
        Command::LeaseRevoke { id: 1 },
        Command::LeaseKeepAlive { id: 1 },
    ];
    for c in admitted {
        assert_eq!(admit(&c.encode()), Ok(()), "{c:?}");
    }
    assert_eq!(admit(b"not a command"), Ok(()), "the service says why");

    // Disarmed, the alarm stays down until the next refusal.
    quota.disarm();
    assert!(!quota.alarm());
    assert!(admit(&put("x", "y").encode()).is_err());
    assert!(quota.alarm());

    // Deleting and compacting make room; the next admitted write lowers
    // the alarm.
    h.cmd(Command::DeleteRange {
        start: b("k"),
        end: b("t"),
    });
    let revision = h.svc().revision() as i64;
    h.cmd(Command::Compact { revision });
    assert!(quota.used() < 200, "{} bytes left", quota.used());
    assert!(quota.alarm(), "raised until a write is admitted");
    assert_eq!(admit(&put("x", "y").encode()), Ok(()));
    assert!(!quota.alarm());
}

/// A restored service keeps its quota and publishes the restored
/// history's size; a quota of 0 admits everything.
#[test]
fn the_space_quota_follows_a_restore_and_zero_means_no_limit() {
    let mut full = Harness::new();
    for i in 0..20 {
        full.cmd(put(&format!("k{i}"), &"v".repeat(100)));
    }
    let image = full.svc().snapshot_vec();
    let mut kv = KvService::new().with_quota(1_000);
    let quota = kv.quota().expect("a quota");
    kv.restore(Some(&image)).expect("restore");
    assert_eq!(quota.used(), full.svc().db_size());
    assert!(quota.used() > 1_000 && quota.alarm());
    let admit = kv.admission().expect("still a quota after the restore");
    assert!(admit(&put("a", "b").encode()).is_err());
    // A snapshot that does not decode changes nothing, quota included.
    assert!(kv.restore(Some(&image[..image.len() / 2])).is_err());
    assert!(kv.quota().is_some_and(|q| Arc::ptr_eq(&q, &quota)));
    assert_eq!(kv.db_size(), full.svc().db_size());
    kv.restore(None).expect("empty");
    assert_eq!(quota.used(), 0);
    assert!(admit(&put("a", "b").encode()).is_ok());

    let unlimited = KvService::new().with_quota(0);
    let admit = unlimited.admission().expect("a check that admits all");
    unlimited.quota().expect("quota").publish(u64::MAX);
    assert!(admit(&put("a", &"v".repeat(1000)).encode()).is_ok());
    assert!(!unlimited.quota().expect("quota").alarm());
    assert!(KvService::new().admission().is_none(), "no quota, no check");
}

/// A watch catching up a narrow range from an old revision reads history on
/// the service thread: one read examines a bounded stretch of the revision
/// index and says where to go on, however long the history without a
/// match; one key's history is read from the key itself.
#[test]
fn history_reads_examine_a_bounded_stretch_of_the_index() {
    use crate::store::{Store, EVENTS_SCAN_BUDGET};
    let mut s = Store::new();
    let put = |s: &mut Store, k: &str| {
        let mut w = s.write();
        w.put(
            Bytes::copy_from_slice(k.as_bytes()),
            Bytes::from_static(b"v"),
            0,
        );
        w.commit();
    };
    let n = 2 * EVENTS_SCAN_BUDGET + 100;
    for i in 0..n {
        put(&mut s, &format!("other/{}", i % 50));
    }
    put(&mut s, "watched/1");
    let last = s.revision();
    // The range's only change is at the end: reads go on from where the
    // previous one stopped, never examining more than the budget (one
    // index entry per revision here; the first write is revision 2).
    let mut from = 2;
    let mut reads = 0;
    let found = loop {
        let (events, more) = s.events(b"watched/", b"watched0", from, 100).unwrap();
        reads += 1;
        match more {
            Some(next) => {
                assert!(events.is_empty(), "{events:?}");
                assert!(next > from && next - from <= EVENTS_SCAN_BUDGET as u64);
                from = next;
            }
            None => break events,
        }
    };
    assert_eq!(
        reads, 3,
        "{n} revisions in stretches of {EVENTS_SCAN_BUDGET}"
    );
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].revision(), last);
    // One key: straight from its history, in one read.
    let (events, more) = s.events(b"watched/1", b"", 1, 100).unwrap();
    assert_eq!((events.len(), more), (1, None));
    let (events, more) = s.events(b"other/7", b"", 1, 10).unwrap();
    assert_eq!(events.len(), 10);
    assert_eq!(more, Some(events[9].revision() + 50));
}
