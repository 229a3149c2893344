//! Property tests of the etcd-style service: replicas stay identical,
//! snapshots restore and continue identically (leases and timers
//! included), history and events agree with a plain model at every
//! revision, encodings round-trip and decoders never panic.

use crate::tests::{Harness, TTL};
use crate::*;
use bytes::Bytes;
use keel_core::{Membership, Service, ServiceHost, Snapshot, SnapshotMeta};
use proptest::prelude::*;
use std::collections::BTreeMap;

const SEC: u64 = 1_000_000_000;

fn key() -> impl Strategy<Value = Bytes> {
    prop::sample::select(vec!["a", "b", "c", "ab", "b\u{0}"])
        .prop_map(|s| Bytes::from(s.as_bytes()))
}

fn end() -> impl Strategy<Value = Bytes> {
    prop::sample::select(vec!["", "\u{0}", "b", "c", "d", "a"])
        .prop_map(|s| Bytes::from(s.as_bytes()))
}

fn value() -> impl Strategy<Value = Bytes> {
    prop::sample::select(vec!["", "x", "y", "zz"]).prop_map(|s| Bytes::from(s.as_bytes()))
}

fn put_req() -> impl Strategy<Value = PutRequest> {
    (key(), value(), 0i64..4, any::<bool>(), 0u8..6).prop_map(
        |(key, value, lease, prev_kv, flags)| PutRequest {
            key,
            value: if flags == 1 { Bytes::new() } else { value },
            lease: if flags == 2 { 0 } else { lease },
            prev_kv,
            ignore_value: flags == 1,
            ignore_lease: flags == 2,
        },
    )
}

fn del_req() -> impl Strategy<Value = DeleteRangeRequest> {
    (key(), end(), any::<bool>()).prop_map(|(key, range_end, prev_kv)| DeleteRangeRequest {
        key,
        range_end,
        prev_kv,
    })
}

fn range_req() -> impl Strategy<Value = RangeRequest> {
    (
        (key(), end(), -1i64..4, -1i64..14),
        (0u8..3, 0u8..5, any::<bool>(), any::<bool>()),
        (0i64..10, 0i64..10, 0i64..10, 0i64..10),
    )
        .prop_map(
            |((key, range_end, limit, revision), (order, target, keys_only, count_only), f)| {
                RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order: SortOrder::from_u8(order).unwrap(),
                    sort_target: SortTarget::from_u8(target).unwrap(),
                    keys_only,
                    count_only,
                    min_mod_revision: f.0 % 4 * 2,
                    max_mod_revision: f.1 % 3 * 5,
                    min_create_revision: f.2 % 4,
                    max_create_revision: f.3 % 3 * 4,
                }
            },
        )
}

fn compare() -> impl Strategy<Value = TxnCompare> {
    (
        key(),
        prop::sample::select(vec!["", "c"]),
        0u8..4,
        0u8..5,
        0i64..6,
        value(),
    )
        .prop_map(|(key, end, result, target, n, v)| TxnCompare {
            key,
            range_end: Bytes::from(end.as_bytes()),
            result: CompareResult::from_u8(result).unwrap(),
            target: match target {
                0 => CompareTarget::Version(n),
                1 => CompareTarget::Create(n),
                2 => CompareTarget::Mod(n),
                3 => CompareTarget::Value(v),
                _ => CompareTarget::Lease(n % 3),
            },
        })
}

fn leaf_op() -> impl Strategy<Value = RequestOp> {
    prop_oneof![
        range_req().prop_map(RequestOp::Range),
        put_req().prop_map(RequestOp::Put),
        del_req().prop_map(RequestOp::DeleteRange),
    ]
}

fn txn_req() -> impl Strategy<Value = TxnRequest> {
    let ops = || prop::collection::vec(leaf_op(), 0..3);
    let leaf =
        (prop::collection::vec(compare(), 0..2), ops(), ops()).prop_map(|(c, s, f)| TxnRequest {
            compare: c,
            success: s,
            failure: f,
        });
    leaf.prop_recursive(2, 8, 3, |inner| {
        (
            prop::collection::vec(compare(), 0..2),
            prop::collection::vec(prop_oneof![leaf_op(), inner.prop_map(RequestOp::Txn)], 0..3),
            prop::collection::vec(leaf_op(), 0..2),
        )
            .prop_map(|(compare, success, failure)| TxnRequest {
                compare,
                success,
                failure,
            })
    })
}

/// Every command but the auth ones and `As`.
fn kv_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (key(), value()).prop_map(|(key, value)| Command::Put { key, value }),
        1 => key().prop_map(|key| Command::Delete { key }),
        4 => put_req().prop_map(Command::PutReq),
        2 => del_req().prop_map(Command::DeleteRangeReq),
        3 => txn_req().prop_map(Command::Txn),
        1 => (0i64..14).prop_map(|revision| Command::Compact { revision }),
        2 => (0i64..4, -1i64..12).prop_map(|(id, ttl)| Command::LeaseGrant { id, ttl }),
        1 => (0i64..4).prop_map(|id| Command::LeaseRevoke { id }),
        1 => (0i64..4).prop_map(|id| Command::LeaseKeepAlive { id }),
    ]
}

fn user_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["root", "alice", "bob", ""]).prop_map(str::to_string)
}

fn role_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["root", "r", "s", ""]).prop_map(str::to_string)
}

fn password() -> impl Strategy<Value = Bytes> {
    prop::sample::select(vec!["", "h1", "h2"]).prop_map(|s| Bytes::from(s.as_bytes()))
}

/// Auth commands over a few names and keys, biased towards building up a
/// state where auth can be enabled.
fn auth_command() -> impl Strategy<Value = AuthCommand> {
    prop_oneof![
        2 => password().prop_map(|secret| AuthCommand::Enable { secret }),
        1 => Just(AuthCommand::Disable),
        3 => (user_name(), prop::option::of(password()))
            .prop_map(|(name, password)| AuthCommand::UserAdd { name, password }),
        1 => user_name().prop_map(|name| AuthCommand::UserDelete { name }),
        1 => (user_name(), password())
            .prop_map(|(name, password)| AuthCommand::UserChangePassword { name, password }),
        3 => (user_name(), role_name())
            .prop_map(|(user, role)| AuthCommand::UserGrantRole { user, role }),
        1 => (user_name(), role_name())
            .prop_map(|(name, role)| AuthCommand::UserRevokeRole { name, role }),
        2 => role_name().prop_map(|name| AuthCommand::RoleAdd { name }),
        1 => role_name().prop_map(|name| AuthCommand::RoleDelete { name }),
        3 => (role_name(), 0i32..3, key(), end()).prop_map(|(role, kind, key, range_end)| {
            AuthCommand::RoleGrantPermission {
                role,
                perm: Permission {
                    kind: PermKind::from_i32(kind).unwrap(),
                    key,
                    range_end,
                },
            }
        }),
        1 => (role_name(), key(), end()).prop_map(|(role, key, range_end)| {
            AuthCommand::RoleRevokePermission { role, key, range_end }
        }),
    ]
}

/// Root, and alice with read-write on [a, c), then auth enabled: a start
/// that random commands rarely reach.
fn auth_setup() -> Vec<Command> {
    let perm = Permission {
        kind: PermKind::ReadWrite,
        key: Bytes::from("a"),
        range_end: Bytes::from("c"),
    };
    [
        AuthCommand::UserAdd {
            name: "root".into(),
            password: None,
        },
        AuthCommand::UserGrantRole {
            user: "root".into(),
            role: "root".into(),
        },
        AuthCommand::RoleAdd { name: "r".into() },
        AuthCommand::UserAdd {
            name: "alice".into(),
            password: Some(Bytes::from("h")),
        },
        AuthCommand::UserGrantRole {
            user: "alice".into(),
            role: "r".into(),
        },
        AuthCommand::RoleGrantPermission {
            role: "r".into(),
            perm,
        },
        AuthCommand::Enable {
            secret: Bytes::from("s"),
        },
    ]
    .into_iter()
    .map(Command::Auth)
    .collect()
}

/// Every command: the KV ones, auth ones, and either run as a user.
fn command() -> impl Strategy<Value = Command> {
    let user = prop::option::of(
        prop::sample::select(vec!["root", "alice", "bob", "nobody", ""]).prop_map(str::to_string),
    );
    let inner = prop_oneof![4 => kv_command(), 1 => auth_command().prop_map(Command::Auth)];
    prop_oneof![
        6 => kv_command(),
        2 => auth_command().prop_map(Command::Auth),
        4 => (user, inner).prop_map(|(user, c)| Command::As { generation: 0,
            user,
            command: Box::new(c),
        }),
    ]
}

fn query() -> impl Strategy<Value = Query> {
    prop_oneof![
        range_req().prop_map(Query::RangeReq),
        txn_req().prop_map(Query::Txn),
        (key(), end(), 0u64..12, 0u64..4).prop_map(|(start, end, from_revision, limit)| {
            Query::Events {
                start,
                end,
                from_revision,
                limit,
            }
        }),
        (0i64..4, any::<bool>(), 0u64..40).prop_map(|(id, keys, secs)| Query::LeaseTimeToLive {
            id,
            keys,
            now: secs * SEC,
        }),
        Just(Query::Leases),
        Just(Query::Status),
        (-1i64..14).prop_map(|revision| Query::HashKv { revision }),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Cmd(Command),
    /// Move log time forward this many seconds, then fire due timers.
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => command().prop_map(Step::Cmd),
        1 => (0u64..8).prop_map(Step::Advance),
    ]
}

fn run(h: &mut Harness, steps: &[Step]) -> Vec<Bytes> {
    let mut replies = Vec::new();
    for s in steps {
        match s {
            Step::Cmd(c) => replies.push(h.raw(c.encode())),
            Step::Advance(secs) => {
                h.advance(secs * SEC);
                h.fire_due();
            }
        }
        // Drain the feed as the runtime would; it is checked elsewhere.
        let events = h.svc_mut().take_events();
        for w in events.windows(2) {
            assert!(w[0].revision() <= w[1].revision());
        }
    }
    replies
}

fn host_snapshot(h: &Harness) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            position: h.host.applied(),
            term: 1,
            timestamp: h.time,
            membership: Membership::new([1]),
        },
        data: h.host.snapshot(),
    }
}

/// Latest-value model with history: the key space after every revision.
struct Model {
    states: Vec<BTreeMap<Bytes, KeyValue>>,
}

impl Model {
    fn new() -> Model {
        // Index = revision; revisions 0 and 1 are the empty store.
        Model {
            states: vec![BTreeMap::new(), BTreeMap::new()],
        }
    }
    fn revision(&self) -> u64 {
        self.states.len() as u64 - 1
    }
    fn current(&self) -> &BTreeMap<Bytes, KeyValue> {
        &self.states[self.states.len() - 1]
    }
    fn in_range(k: &[u8], start: &[u8], end: &[u8]) -> bool {
        if end.is_empty() {
            k == start
        } else if end == [0] {
            k >= start
        } else {
            k >= start && k < end
        }
    }
    fn apply(&mut self, c: &Command) {
        if c.validate().is_err() {
            return;
        }
        let rev = self.revision() + 1;
        let mut next = self.current().clone();
        let put = |next: &mut BTreeMap<Bytes, KeyValue>, key: &Bytes, value: &Bytes| {
            let (create, version) = match next.get(key) {
                Some(p) => (p.create_revision, p.version + 1),
                None => (rev, 1),
            };
            next.insert(
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
        };
        match c {
            Command::Put { key, value } => put(&mut next, key, value),
            Command::Cas {
                key,
                expected,
                value,
            } => {
                if expected.matches(next.get(key)) {
                    put(&mut next, key, value)
                }
            }
            Command::Delete { key } => {
                next.remove(key);
            }
            Command::DeleteRange { start, end } => {
                next.retain(|k, _| !Model::in_range(k, start, end));
            }
            _ => return,
        }
        // A put always changes the mod revision, so any write shows.
        if next != *self.current() {
            self.states.push(next);
        }
    }
}

fn model_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (key(), value()).prop_map(|(key, value)| Command::Put { key, value }),
        2 => key().prop_map(|key| Command::Delete { key }),
        1 => (key(), end()).prop_map(|(start, end)| Command::DeleteRange { start, end }),
        1 => (key(), 0u64..3, value()).prop_map(|(key, v, value)| Command::Cas {
            key,
            expected: Compare::VersionEquals(v),
            value
        }),
        1 => (0i64..20).prop_map(|revision| Command::Compact { revision }),
    ]
}

fn arb_response() -> impl Strategy<Value = Response> {
    let kv = || {
        (key(), value(), 0u64..9, 0u64..9, 0u64..4, -2i64..3).prop_map(
            |(key, value, create_revision, mod_revision, version, lease)| KeyValue {
                key,
                value,
                create_revision,
                mod_revision,
                version,
                lease,
            },
        )
    };
    let range = (
        any::<u64>(),
        prop::collection::vec(kv(), 0..3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(revision, kvs, more, count)| RangeResponse {
            revision,
            kvs,
            more,
            count,
        })
        .boxed();
    let put = (any::<u64>(), prop::option::of(kv()))
        .prop_map(|(revision, prev_kv)| PutResponse { revision, prev_kv })
        .boxed();
    let op = prop_oneof![
        range.clone().prop_map(ResponseOp::Range),
        put.clone().prop_map(ResponseOp::Put),
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(kv(), 0..2)
        )
            .prop_map(|(revision, deleted, prev_kvs)| ResponseOp::DeleteRange(
                DeleteRangeResponse {
                    revision,
                    deleted,
                    prev_kvs
                }
            )),
    ];
    let txn = (any::<u64>(), any::<bool>(), prop::collection::vec(op, 0..3))
        .prop_map(|(revision, succeeded, responses)| TxnResponse {
            revision,
            succeeded,
            responses,
        })
        .boxed();
    let event =
        (any::<bool>(), kv(), prop::option::of(kv())).prop_map(|(put, kv, prev_kv)| WatchEvent {
            kind: if put {
                EventType::Put
            } else {
                EventType::Delete
            },
            kv,
            prev_kv,
        });
    prop_oneof![
        range.prop_map(Response::RangeResp),
        put.prop_map(Response::PutResp),
        txn.clone().prop_map(|t| Response::Txn(TxnResponse {
            responses: vec![ResponseOp::Txn(t.clone())],
            ..t
        })),
        any::<u64>().prop_map(|revision| Response::Compact { revision }),
        (any::<u64>(), any::<i64>(), any::<i64>())
            .prop_map(|(revision, id, ttl)| Response::LeaseGrant { revision, id, ttl }),
        any::<u64>().prop_map(|revision| Response::LeaseRevoke { revision }),
        (any::<u64>(), any::<i64>(), any::<i64>())
            .prop_map(|(revision, id, ttl)| Response::LeaseKeepAlive { revision, id, ttl }),
        (
            any::<u64>(),
            any::<i64>(),
            any::<i64>(),
            prop::collection::vec(key(), 0..3)
        )
            .prop_map(|(revision, id, ttl, keys)| Response::LeaseTimeToLive {
                revision,
                id,
                ttl,
                granted_ttl: ttl / 2,
                keys
            }),
        (any::<u64>(), prop::collection::vec(any::<i64>(), 0..4))
            .prop_map(|(revision, ids)| Response::Leases { revision, ids }),
        (
            any::<u64>(),
            any::<i64>(),
            prop::collection::vec(event, 0..3),
            any::<Option<u64>>()
        )
            .prop_map(
                |(revision, compact_revision, events, more)| Response::Events {
                    revision,
                    compact_revision,
                    events,
                    more
                }
            ),
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(
            |(revision, compact_revision, hash)| {
                Response::HashKv {
                    revision,
                    compact_revision,
                    hash,
                }
            }
        ),
        any::<u64>().prop_map(|revision| Response::Auth { revision }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replicas_agree_and_snapshots_continue_identically(
        setup in any::<bool>(),
        first in prop::collection::vec(step(), 0..30),
        second in prop::collection::vec(step(), 0..20),
        queries in prop::collection::vec(query(), 1..8),
    ) {
        let mut a = Harness::new();
        let mut b = Harness::new();
        // Whether anyone takes the watch feed changes nothing replicated.
        b.svc_mut().notifications_wanted(false);
        let first: Vec<Step> = if setup {
            auth_setup().into_iter().map(Step::Cmd).chain(first).collect()
        } else {
            first
        };
        let ra = run(&mut a, &first);
        let rb = run(&mut b, &first);
        prop_assert_eq!(ra, rb);
        prop_assert_eq!(a.host.snapshot(), b.host.snapshot());
        prop_assert_eq!(a.svc(), b.svc());

        // Restore a third replica from a's host snapshot, mid-run.
        let snap = host_snapshot(&a);
        let mut host = ServiceHost::new(KvService::new(), TTL);
        host.restore(&snap).unwrap();
        prop_assert_eq!(host.service(), a.svc());
        prop_assert_eq!(host.snapshot(), a.host.snapshot());
        prop_assert_eq!(host.timers(), a.host.timers());
        let mut c = Harness { host, pos: a.pos, seq: a.seq, time: a.time };
        for q in &queries {
            prop_assert_eq!(c.host.query(&q.encode()), a.host.query(&q.encode()));
        }
        // The service snapshot alone round-trips too.
        let mut s = KvService::new();
        s.restore(Some(&a.svc().snapshot_vec())).unwrap();
        prop_assert_eq!(&s, a.svc());
        prop_assert_eq!(s.snapshot_vec(), a.svc().snapshot_vec());
        // The captured copy serializes to the same bytes as the state.
        let mut captured = Vec::new();
        a.svc().prepare_snapshot()(&mut captured).unwrap();
        prop_assert_eq!(&captured, &a.svc().snapshot_vec());
        // `snapshot` reserves `db_size() + SNAPSHOT_SLACK` up front so the
        // state is never copied into a bigger buffer: the estimate must
        // bound it.
        let encoded = a.svc().snapshot_vec().len() as u64;
        prop_assert!(
            encoded <= a.svc().db_size() + crate::service::SNAPSHOT_SLACK,
            "snapshot {} bytes, db_size {}", encoded, a.svc().db_size()
        );

        // A capture taken now serializes the state of now, however the
        // store changes before it runs (histories are shared, not copied).
        let before = a.svc().snapshot_vec();
        let task = a.svc().prepare_snapshot();
        let ra = run(&mut a, &second);
        let rc = run(&mut c, &second);
        prop_assert_eq!(ra, rc);
        let mut late = Vec::new();
        task(&mut late).unwrap();
        prop_assert_eq!(late, before);
        prop_assert_eq!(a.host.snapshot(), c.host.snapshot());
        for q in &queries {
            prop_assert_eq!(c.host.query(&q.encode()), a.host.query(&q.encode()));
        }
    }

    #[test]
    fn history_and_events_match_a_model(
        cmds in prop::collection::vec(model_command(), 0..40),
        ranges in prop::collection::vec((key(), end()), 1..4),
    ) {
        let mut h = Harness::new();
        let mut m = Model::new();
        for c in &cmds {
            h.cmd(c.clone());
            m.apply(c);
        }
        let svc = h.svc();
        prop_assert_eq!(svc.revision(), m.revision());
        let compact = svc.compact_revision();
        for rev in 1..=m.revision() {
            let q = Query::RangeReq(RangeRequest { revision: rev as i64, ..RangeRequest::new(Bytes::new(), Bytes::from_static(&[0])) });
            let got = Response::decode(&h.host.query(&q.encode())).unwrap();
            if (rev as i64) < compact {
                prop_assert!(matches!(got, Response::Error { code: ErrorCode::Compacted, .. }), "{:?}", got);
                continue;
            }
            let want: Vec<KeyValue> = m.states[rev as usize].values().cloned().collect();
            match got {
                Response::RangeResp(r) => {
                    prop_assert_eq!(r.count as usize, want.len());
                    prop_assert_eq!(r.kvs, want);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
        // Replaying the event history from the compaction point rebuilds
        // every later state.
        let from = compact.max(1) as u64;
        let q = Query::Events { start: Bytes::new(), end: Bytes::from_static(&[0]), from_revision: from, limit: 0 };
        let events = match Response::decode(&h.host.query(&q.encode())).unwrap() {
            Response::Events { events, more, .. } => { prop_assert_eq!(more, None); events }
            other => { prop_assert!(false, "{:?}", other); unreachable!() }
        };
        let mut state = m.states[from as usize].clone();
        let mut i = 0;
        while i < events.len() && events[i].revision() == from { i += 1; }
        for rev in from + 1..=m.revision() {
            let mut n = 0;
            while i < events.len() && events[i].revision() == rev {
                let e = &events[i];
                prop_assert_eq!(e.prev_kv.as_ref(), state.get(&e.kv.key));
                match e.kind {
                    EventType::Put => { state.insert(e.kv.key.clone(), e.kv.clone()); }
                    EventType::Delete => { state.remove(&e.kv.key); }
                }
                i += 1;
                n += 1;
            }
            prop_assert!(n > 0, "every revision has events");
            prop_assert_eq!(&state, &m.states[rev as usize]);
        }
        prop_assert_eq!(i, events.len());

        // Any range read in pages of any size, each from where the last
        // said to go on, gives the full read's events in that range.
        for (start, end) in ranges {
            for limit in [1u64, 2, 5] {
                let wanted: Vec<_> = events
                    .iter()
                    .filter(|e| crate::store::in_span(&e.kv.key, &start, &end))
                    .cloned()
                    .collect();
                let mut got = Vec::new();
                let mut at = from;
                loop {
                    let q = Query::Events { start: start.clone(), end: end.clone(), from_revision: at, limit };
                    match Response::decode(&h.host.query(&q.encode())).unwrap() {
                        Response::Events { events, more, .. } => {
                            // Past the limit only to finish a revision.
                            let l = limit as usize;
                            prop_assert!(events.len() <= l || events[l - 1..].iter().all(|e| e.revision() == events[l - 1].revision()));
                            got.extend(events);
                            match more {
                                Some(next) => { prop_assert!(next > at); at = next; }
                                None => break,
                            }
                        }
                        other => { prop_assert!(false, "{:?}", other); unreachable!() }
                    }
                }
                prop_assert_eq!(&got, &wanted, "{:?}..{:?} limit {}", start, end, limit);
            }
        }
    }

    #[test]
    fn etcd_encodings_round_trip(c in command(), q in query(), r in arb_response()) {
        prop_assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        prop_assert_eq!(Query::decode(&q.encode()).unwrap(), q);
        prop_assert_eq!(Response::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn etcd_decoders_never_panic(
        tag in 16u8..29,
        data in prop::collection::vec(any::<u8>(), 0..96),
        c in command(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut d = vec![tag];
        d.extend_from_slice(&data);
        let _ = Command::decode(&d);
        let _ = Query::decode(&d);
        let _ = Response::decode(&d);
        let _ = WatchEvent::decode(&data);
        // An auth command or an As with any body, and snapshots of either
        // format with anything after the magic.
        for head in [&[23u8][..], &[24], &[24, 0], &[24, 1], &[24, 0, 23], &[24, 0, 24]] {
            let _ = Command::decode(&[head, &data[..]].concat());
        }
        for magic in [b"KKV2", b"KKV3"] {
            let _ = KvService::decode_snapshot(&[&magic[..], &data[..]].concat());
        }
        let enc = c.encode().to_vec();
        let mut m = enc.clone();
        let i = flip.index(m.len());
        m[i] = byte;
        for d in [&m[..], &enc[..cut.index(enc.len() + 1)]] {
            let _ = Command::decode(d);
            let _ = Query::decode(d);
        }
    }

    /// A command run as a user is the command itself when the check
    /// passes (always, while auth is disabled), and otherwise the check's
    /// error with nothing changed but the applied count.
    #[test]
    fn as_runs_the_command_or_refuses_it_whole(
        setup in any::<bool>(),
        steps in prop::collection::vec(step(), 0..40),
        user in prop::option::of(
            prop::sample::select(vec!["root", "alice", "bob", "nobody"]).prop_map(str::to_string),
        ),
        c in prop_oneof![3 => kv_command(), 1 => auth_command().prop_map(Command::Auth)],
    ) {
        let mut h = Harness::new();
        if setup {
            for c in auth_setup() {
                let r = h.cmd(c);
                prop_assert!(matches!(r, Response::Auth { .. }), "{:?}", r);
            }
        }
        run(&mut h, &steps);
        // Invalid commands are refused before any check.
        prop_assume!(c.validate().is_ok());
        let svc = h.svc().clone();
        let check = if svc.auth().enabled() {
            svc.auth().check_command(user.as_deref(), &c, svc.leases())
        } else {
            Ok(())
        };
        let mut plain = svc.clone();
        let mut wrapped = svc.clone();
        // (The same command run as root, while auth is on: a plain etcd
        // command is then no one's.)
        let want = if svc.auth().enabled() {
            plain.apply(Command::As { generation: 0, user: Some(ROOT.into()), command: Box::new(c.clone()) })
        } else {
            plain.apply(c.clone())
        };
        let got = wrapped.apply(Command::As { generation: 0, user, command: Box::new(c) });
        match check {
            Ok(()) => {
                prop_assert_eq!(got, want);
                prop_assert!(wrapped == plain);
                prop_assert_eq!(wrapped.take_events(), plain.take_events());
            }
            Err(e) => {
                prop_assert_eq!(got, Response::error(&e));
                prop_assert_eq!(wrapped.applied_commands(), svc.applied_commands() + 1);
                prop_assert_eq!(wrapped.store(), svc.store());
                prop_assert_eq!(wrapped.leases(), svc.leases());
                prop_assert_eq!(wrapped.auth(), svc.auth());
                prop_assert!(wrapped.take_events().is_empty());
            }
        }
    }

    #[test]
    fn invalid_etcd_commands_change_nothing(
        steps in prop::collection::vec(step(), 0..10),
        c in command(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut h = Harness::new();
        run(&mut h, &steps);
        let before = h.svc().clone();
        let mut m = c.encode().to_vec();
        let i = flip.index(m.len());
        m[i] = byte;
        let reply = Response::decode(&h.raw(Bytes::from(m.clone()))).unwrap();
        match Command::decode(&m) {
            Ok(c) if c.validate().is_ok() => {}
            _ => {
                prop_assert!(matches!(reply, Response::Error { .. }), "{:?}", reply);
                prop_assert_eq!(h.svc(), &before);
                prop_assert!(h.svc_mut().take_events().is_empty());
            }
        }
    }
}

/// One step of `compacting_in_steps_equals_compacting_once`: a put or a
/// delete of one of a few keys, or a compaction `back` revisions behind the
/// current one.
#[derive(Clone, Debug)]
enum StoreOp {
    Put(u8),
    Delete(u8),
    Compact(u8),
}

fn store_op() -> impl Strategy<Value = StoreOp> {
    prop_oneof![
        5 => (0u8..6).prop_map(StoreOp::Put),
        2 => (0u8..6).prop_map(StoreOp::Delete),
        1 => (0u8..8).prop_map(StoreOp::Compact),
    ]
}

proptest! {
    /// A compaction visits only keys written since the previous one: the
    /// store it leaves is exactly the one a single compaction at the same
    /// point leaves, whatever compactions came before.
    #[test]
    fn compacting_in_steps_equals_compacting_once(
        ops in prop::collection::vec(store_op(), 0..80),
    ) {
        let mut stepped = store::Store::new();
        let mut once = store::Store::new();
        for (i, op) in ops.iter().enumerate() {
            let key = |k: &u8| Bytes::from(format!("k{k}"));
            for s in [&mut stepped, &mut once] {
                let mut w = s.write();
                match op {
                    StoreOp::Put(k) => {
                        w.put(key(k), Bytes::from(format!("v{i}")), 0);
                    }
                    StoreOp::Delete(k) => {
                        w.delete(&key(k));
                    }
                    StoreOp::Compact(_) => {}
                }
                w.commit();
            }
            if let StoreOp::Compact(back) = op {
                let at = stepped.revision() as i64 - i64::from(*back);
                if at > stepped.compact_revision() {
                    stepped.compact(at).unwrap();
                }
            }
        }
        if stepped.compact_revision() > once.compact_revision() {
            once.compact(stepped.compact_revision()).unwrap();
        }
        prop_assert_eq!(&stepped, &once);
    }
}
