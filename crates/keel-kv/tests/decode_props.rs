//! The KV service's snapshot decoder fed valid, cut, mutated and hostile
//! bytes: a snapshot of any state reached through commands (auth state
//! included) round-trips to an equal service and the same bytes; every
//! strict prefix is refused; a mutated one never panics, and a refused
//! restore leaves the service as it was; counts claiming more than the
//! bytes hold are refused without allocating for them.

use bytes::Bytes;
use keel_core::{ApplyOutput, Entry, EntryKind, Service, ServiceHost};
use keel_kv::{AuthCommand, Command, KvService, PermKind, Permission, PutRequest};
use proptest::prelude::*;

mod support;
use support::service_after;

fn key(k: u8) -> Bytes {
    Bytes::from(format!("k{k}"))
}

fn kv_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (0u8..8, proptest::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(k, v)| Command::Put { key: key(k), value: Bytes::from(v) }),
        1 => (0u8..8).prop_map(|k| Command::Delete { key: key(k) }),
        1 => (0i64..20).prop_map(|revision| Command::Compact { revision }),
        1 => (1i64..4, 5i64..100).prop_map(|(id, ttl)| Command::LeaseGrant { id, ttl }),
        1 => (1i64..4).prop_map(|id| Command::LeaseRevoke { id }),
        2 => (0u8..8, 1i64..4).prop_map(|(k, lease)| Command::PutReq(PutRequest {
            key: key(k),
            value: Bytes::from_static(b"leased"),
            lease,
            ..PutRequest::default()
        })),
        2 => auth_command().prop_map(Command::Auth),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["root", "alice", "r"]).prop_map(str::to_string)
}

/// Auth commands over a few names, enough to reach enabled states with
/// users, roles and permissions.
fn auth_command() -> impl Strategy<Value = AuthCommand> {
    prop_oneof![
        (
            name(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8))
        )
            .prop_map(|(name, p)| AuthCommand::UserAdd {
                name,
                password: p.map(Bytes::from)
            }),
        name().prop_map(|name| AuthCommand::RoleAdd { name }),
        (name(), name()).prop_map(|(user, role)| AuthCommand::UserGrantRole { user, role }),
        (name(), 0i32..3, 0u8..8, 0u8..8).prop_map(|(role, kind, k, e)| {
            AuthCommand::RoleGrantPermission {
                role,
                perm: Permission {
                    kind: PermKind::from_i32(kind).unwrap_or(PermKind::Read),
                    key: key(k),
                    range_end: if e == 0 { Bytes::new() } else { key(e) },
                },
            }
        }),
        name().prop_map(|name| AuthCommand::RoleDelete { name }),
        proptest::collection::vec(any::<u8>(), 0..32).prop_map(|s| AuthCommand::Enable {
            secret: Bytes::from(s)
        }),
    ]
}

/// Root (with the root role) and alice (role "r", read on every key),
/// then auth enabled.
fn auth_setup() -> Vec<Command> {
    let perm = Permission {
        kind: PermKind::Read,
        key: Bytes::from_static(b"\0"),
        range_end: Bytes::from_static(b"\0"),
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
            password: Some(Bytes::from_static(b"h")),
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
            secret: Bytes::from_static(&[9; 32]),
        },
    ]
    .into_iter()
    .map(Command::Auth)
    .collect()
}

fn snapshot_bytes(s: &KvService) -> Vec<u8> {
    let mut out = Vec::new();
    Service::snapshot(s, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn kv_snapshots_round_trip_and_damage_never_panics(
        setup in any::<bool>(),
        cmds in proptest::collection::vec(kv_command(), 0..30),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // Half the runs start with auth enabled, which random commands
        // rarely reach.
        let cmds: Vec<Command> = if setup { auth_setup().into_iter().chain(cmds).collect() } else { cmds };
        let svc = service_after(&cmds, |i| 1_000_000 * i);
        let image = snapshot_bytes(&svc);
        let back = KvService::decode_snapshot(&image).expect("its own snapshot decodes");
        prop_assert!(back == svc, "restored service differs");
        prop_assert_eq!(snapshot_bytes(&back), image.clone());

        let mut restored = KvService::default();
        restored.restore(Some(&image)).expect("restore");
        prop_assert_eq!(snapshot_bytes(&restored), image.clone());

        // Cut anywhere: refused, and the service keeps its state.
        let short = &image[..cut.index(image.len())];
        let e = restored.restore(Some(short)).expect_err("a cut snapshot restored");
        prop_assert!(!e.is_empty());
        prop_assert_eq!(snapshot_bytes(&restored), image.clone());

        // One byte changed: no panic; refused leaves the state; accepted
        // is a consistent state whose own snapshot decodes again.
        let mut bad = image.clone();
        let at = flip.index(bad.len());
        bad[at] = byte;
        match KvService::decode_snapshot(&bad) {
            Ok(other) => {
                let again = snapshot_bytes(&other);
                let other_back = KvService::decode_snapshot(&again).expect("re-snapshot decodes");
                prop_assert!(other_back == other);
            }
            Err(_) => {
                prop_assert!(restored.restore(Some(&bad)).is_err());
                prop_assert_eq!(snapshot_bytes(&restored), image.clone());
            }
        }

        // Garbage, bare or behind the right magic.
        let _ = KvService::decode_snapshot(&garbage);
        let behind_magic = [&image[..4], &garbage[..]].concat();
        let _ = KvService::decode_snapshot(&behind_magic);
    }

    /// The key count and the lease count are u64s: a count claiming
    /// billions with a few bytes behind it is refused quickly, without a
    /// panic and without reserving room for it.
    #[test]
    fn hostile_snapshot_counts_are_refused(
        keys in prop_oneof![Just(u64::MAX), Just(1u64 << 40), 1u64..1 << 20],
        leases in prop_oneof![Just(u64::MAX), Just(1u64 << 40), 1u64..1 << 20],
        tail in proptest::collection::vec(any::<u8>(), 0..48),
    ) {
        let image = snapshot_bytes(&KvService::default());
        // Magic, applied, revision, compaction point, then the key count.
        let head = &image[..4 + 8 + 8 + 8];
        let lying_keys = [head, &keys.to_le_bytes(), &tail].concat();
        prop_assert!(KvService::decode_snapshot(&lying_keys).is_err());
        // No keys; the lease id counter, then the lease count.
        let no_keys = [head, &0u64.to_le_bytes(), &1i64.to_le_bytes(), &leases.to_le_bytes(), &tail].concat();
        prop_assert!(KvService::decode_snapshot(&no_keys).is_err());
        // The empty service's own image decodes.
        prop_assert!(KvService::decode_snapshot(&image).is_ok());
    }

    /// Commands with extreme field values (ids, TTLs, revisions at the
    /// ends of their range) and at extreme log times, then commands decoded
    /// from random bytes: applied, never a panic, and the state reached
    /// still snapshots and decodes to itself.
    #[test]
    fn extreme_and_random_commands_never_panic(
        extremes in proptest::collection::vec((0u8..5, prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(-1i64), Just(0i64), any::<i64>()]), 0..12),
        random in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..12),
        time in prop_oneof![Just(0u64), Just(u64::MAX / 2), Just(u64::MAX - 1), any::<u64>()],
    ) {
        let mut cmds: Vec<Bytes> = extremes
            .iter()
            .map(|&(kind, v)| match kind {
                0 => Command::LeaseGrant { id: v, ttl: v },
                1 => Command::LeaseKeepAlive { id: v },
                2 => Command::LeaseRevoke { id: v },
                3 => Command::Compact { revision: v },
                _ => Command::PutReq(PutRequest { key: key(1), value: Bytes::new(), lease: v, ..PutRequest::default() }),
            }
            .encode())
            .collect();
        cmds.extend(random.into_iter().map(Bytes::from));
        let mut host = ServiceHost::new(KvService::default(), u64::MAX / 4);
        let mut out = ApplyOutput::default();
        let mut pos = 0;
        for (i, data) in cmds.into_iter().enumerate() {
            let e = Entry {
                term: 1,
                position: pos,
                timestamp: time.saturating_add(i as u64),
                kind: EntryKind::Command { client: 1, seq: i as u64 + 1 },
                data,
            };
            pos = e.end();
            host.apply(&[e], &mut out);
            out.clear();
        }
        // Fire every timer the service set (lease expiries), as the core
        // logs them, at their deadlines.
        let timers: Vec<(u64, u64)> = host.timers().iter().map(|(&id, &d)| (id, d)).collect();
        for (id, deadline) in timers {
            let e = Entry {
                term: 1,
                position: pos,
                timestamp: deadline,
                kind: EntryKind::Timer { id, deadline },
                data: Bytes::new(),
            };
            pos = e.end();
            host.apply(&[e], &mut out);
            out.clear();
        }
        let image = snapshot_bytes(host.service());
        let back = KvService::decode_snapshot(&image).expect("the state reached decodes");
        prop_assert!(back == *host.service());
    }
}

/// A txn nested as deep as `validate` allows (128 levels below the top
/// one, as etcd 3.4 takes) decodes from its own encoding: the decoder
/// counted the top txn as a level and refused the deepest valid one.
#[test]
fn every_validated_txn_depth_round_trips() {
    let mut deepest = 0;
    for n in 0..=140usize {
        let mut t = keel_kv::TxnRequest::default();
        for _ in 0..n {
            t = keel_kv::TxnRequest {
                success: vec![keel_kv::RequestOp::Txn(t)],
                ..keel_kv::TxnRequest::default()
            };
        }
        let c = Command::Txn(t);
        if c.validate().is_ok() {
            deepest = n;
            let back = Command::decode(&c.encode());
            assert_eq!(back.as_ref().ok(), Some(&c), "nesting {n}: {back:?}");
        }
    }
    assert_eq!(deepest, keel_kv::MAX_TXN_DEPTH);
}
