//! Tests of the authentication state: `AuthStore`'s commands and their
//! errors, its permission checks (range coverage, txns, commands), the
//! service applying `Command::Auth` and `Command::As`, `AuthShared`, and
//! the auth section of snapshots.

use crate::error::grpc;
use crate::tests::{b, put, Harness};
use crate::*;
use bytes::Bytes;
use keel_core::Service;
use proptest::prelude::*;
use std::sync::Arc;

fn perm(kind: PermKind, key: &str, end: &str) -> Permission {
    Permission {
        kind,
        key: b(key),
        range_end: b(end),
    }
}

fn user_add(name: &str) -> AuthCommand {
    AuthCommand::UserAdd {
        name: name.to_string(),
        password: Some(b("hash")),
    }
}

fn role_add(name: &str) -> AuthCommand {
    AuthCommand::RoleAdd {
        name: name.to_string(),
    }
}

fn grant_role(user: &str, role: &str) -> AuthCommand {
    AuthCommand::UserGrantRole {
        user: user.to_string(),
        role: role.to_string(),
    }
}

fn grant(role: &str, p: Permission) -> AuthCommand {
    AuthCommand::RoleGrantPermission {
        role: role.to_string(),
        perm: p,
    }
}

fn revoke(role: &str, key: &str, end: &str) -> AuthCommand {
    AuthCommand::RoleRevokePermission {
        role: role.to_string(),
        key: b(key),
        range_end: b(end),
    }
}

fn enable() -> AuthCommand {
    AuthCommand::Enable {
        secret: Bytes::from_static(&[7; 32]),
    }
}

/// Applies commands that must succeed.
fn ok(s: &mut AuthStore, cmds: &[AuthCommand]) {
    for c in cmds {
        s.apply(c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
}

/// Applies a command that must fail with `want`, changing nothing.
fn fails(s: &mut AuthStore, c: AuthCommand, want: KvError) {
    let before = s.clone();
    assert_eq!(s.apply(&c), Err(want), "{c:?}");
    assert_eq!(*s, before, "a refused {c:?} changed the state");
}

/// Root (with the root role), and "alice" with role "r" (no permissions
/// yet) and "bob" with no role; auth enabled.
fn enabled_store() -> AuthStore {
    let mut s = AuthStore::default();
    ok(
        &mut s,
        &[
            user_add(ROOT),
            role_add(ROOT),
            grant_role(ROOT, ROOT),
            user_add("alice"),
            role_add("r"),
            grant_role("alice", "r"),
            user_add("bob"),
            enable(),
        ],
    );
    assert!(s.enabled());
    s
}

/// `enabled_store` where role "r" has `perms`.
fn alice_with(perms: &[Permission]) -> AuthStore {
    let mut s = enabled_store();
    for p in perms {
        ok(&mut s, &[grant("r", p.clone())]);
    }
    s
}

const ALICE: Option<&str> = Some("alice");

fn can(s: &AuthStore, access: Access, key: &str, end: &str) -> bool {
    match s.check_range(ALICE, access, key.as_bytes(), end.as_bytes()) {
        Ok(()) => true,
        Err(KvError::PermissionDenied) => false,
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn enable_needs_the_root_user_with_the_root_role() {
    let mut s = AuthStore::default();
    assert_eq!(s.revision(), 0);
    assert!(s.secret().is_empty());
    fails(&mut s, enable(), KvError::RootUserNotExist);
    ok(&mut s, &[user_add(ROOT)]);
    fails(&mut s, enable(), KvError::RootRoleNotExist);
    // etcd lets "root" be granted before the role exists.
    ok(&mut s, &[grant_role(ROOT, ROOT)]);
    assert!(s.role(ROOT).is_none());
    assert!(s.is_admin(ROOT));
    let rev = s.revision();
    ok(&mut s, &[enable()]);
    assert!(s.enabled());
    assert_eq!(s.secret(), &[7; 32]);
    assert_eq!(s.revision(), rev + 1);
    // Enabling again: nothing changes, the first secret stays.
    ok(
        &mut s,
        &[AuthCommand::Enable {
            secret: Bytes::from_static(b"other"),
        }],
    );
    assert_eq!(s.secret(), &[7; 32]);
    assert_eq!(s.revision(), rev + 1);
    ok(&mut s, &[AuthCommand::Disable]);
    assert!(!s.enabled());
    assert_eq!(s.revision(), rev + 2);
    // Disabling again changes nothing; the secret is kept.
    ok(&mut s, &[AuthCommand::Disable]);
    assert_eq!(s.revision(), rev + 2);
    assert_eq!(s.secret(), &[7; 32]);
}

#[test]
fn user_commands_refuse_with_etcds_errors() {
    let mut s = AuthStore::default();
    fails(&mut s, user_add(""), KvError::UserEmpty);
    ok(&mut s, &[user_add("alice"), role_add("r")]);
    fails(&mut s, user_add("alice"), KvError::UserAlreadyExists);
    let nobody = || "nobody".to_string();
    fails(
        &mut s,
        AuthCommand::UserDelete { name: nobody() },
        KvError::UserNotFound,
    );
    fails(
        &mut s,
        AuthCommand::UserChangePassword {
            name: nobody(),
            password: b("x"),
        },
        KvError::UserNotFound,
    );
    fails(&mut s, grant_role("nobody", "r"), KvError::UserNotFound);
    fails(&mut s, grant_role("alice", "nope"), KvError::RoleNotFound);
    fails(
        &mut s,
        AuthCommand::UserRevokeRole {
            name: nobody(),
            role: "r".into(),
        },
        KvError::UserNotFound,
    );
    fails(
        &mut s,
        AuthCommand::UserRevokeRole {
            name: "alice".into(),
            role: "r".into(),
        },
        KvError::RoleNotGranted,
    );
    ok(&mut s, &[grant_role("alice", "r")]);
    // Granted again: Ok, and no change at all.
    let before = s.clone();
    ok(&mut s, &[grant_role("alice", "r")]);
    assert_eq!(s, before);
    ok(
        &mut s,
        &[AuthCommand::UserRevokeRole {
            name: "alice".into(),
            role: "r".into(),
        }],
    );
    assert!(s.user("alice").unwrap().roles.is_empty());
    ok(
        &mut s,
        &[AuthCommand::UserDelete {
            name: "alice".into(),
        }],
    );
    assert!(s.user("alice").is_none());
    assert_eq!(s.user_names(), Vec::<String>::new());
}

#[test]
fn root_is_protected_only_while_enabled() {
    let mut s = enabled_store();
    let del_root = || AuthCommand::UserDelete { name: ROOT.into() };
    let revoke_root = || AuthCommand::UserRevokeRole {
        name: ROOT.into(),
        role: ROOT.into(),
    };
    let del_root_role = || AuthCommand::RoleDelete { name: ROOT.into() };
    fails(&mut s, del_root(), KvError::InvalidAuthMgmt);
    fails(&mut s, revoke_root(), KvError::InvalidAuthMgmt);
    fails(&mut s, del_root_role(), KvError::InvalidAuthMgmt);
    ok(&mut s, &[AuthCommand::Disable, revoke_root()]);
    assert!(!s.is_admin(ROOT));
    ok(&mut s, &[del_root_role(), del_root()]);
    assert!(s.user(ROOT).is_none());
    assert!(s.role(ROOT).is_none());
}

#[test]
fn role_commands_refuse_with_etcds_errors() {
    let mut s = AuthStore::default();
    fails(&mut s, role_add(""), KvError::RoleEmpty);
    ok(&mut s, &[role_add("r")]);
    fails(&mut s, role_add("r"), KvError::RoleAlreadyExists);
    fails(
        &mut s,
        AuthCommand::RoleDelete { name: "x".into() },
        KvError::RoleNotFound,
    );
    fails(
        &mut s,
        grant("x", perm(PermKind::Read, "a", "")),
        KvError::RoleNotFound,
    );
    fails(&mut s, revoke("x", "a", ""), KvError::RoleNotFound);
    fails(&mut s, revoke("r", "a", ""), KvError::PermissionNotGranted);
    ok(&mut s, &[grant("r", perm(PermKind::Read, "a", "c"))]);
    // Only the exact (key, range end) is revoked.
    fails(&mut s, revoke("r", "a", ""), KvError::PermissionNotGranted);
    fails(&mut s, revoke("r", "a", "d"), KvError::PermissionNotGranted);
    fails(&mut s, revoke("r", "b", "c"), KvError::PermissionNotGranted);
    assert_eq!(s.role_names(), vec!["r".to_string()]);
}

#[test]
fn granted_permissions_merge_and_stay_sorted() {
    let mut s = AuthStore::default();
    ok(
        &mut s,
        &[
            role_add("r"),
            grant("r", perm(PermKind::Write, "b", "")),
            grant("r", perm(PermKind::Read, "a", "c")),
            grant("r", perm(PermKind::Read, "a", "")),
            grant("r", perm(PermKind::Write, "a", "\0")),
        ],
    );
    let rev = s.revision();
    // Same (key, range end): the kind is replaced, nothing added.
    ok(&mut s, &[grant("r", perm(PermKind::ReadWrite, "a", "c"))]);
    assert_eq!(s.revision(), rev + 1);
    assert_eq!(
        s.role("r").unwrap().perms,
        vec![
            perm(PermKind::Read, "a", ""),
            perm(PermKind::Write, "a", "\0"),
            perm(PermKind::ReadWrite, "a", "c"),
            perm(PermKind::Write, "b", ""),
        ]
    );
    ok(&mut s, &[revoke("r", "a", "c"), revoke("r", "a", "")]);
    assert_eq!(
        s.role("r").unwrap().perms,
        vec![
            perm(PermKind::Write, "a", "\0"),
            perm(PermKind::Write, "b", "")
        ]
    );
    fails(&mut s, revoke("r", "a", "c"), KvError::PermissionNotGranted);
}

#[test]
fn deleting_a_role_revokes_it_from_every_user() {
    let mut s = AuthStore::default();
    ok(
        &mut s,
        &[
            role_add("r"),
            role_add("keep"),
            user_add("alice"),
            user_add("bob"),
            grant_role("alice", "r"),
            grant_role("alice", "keep"),
            grant_role("bob", "r"),
            AuthCommand::RoleDelete { name: "r".into() },
        ],
    );
    assert!(s.role("r").is_none());
    let roles =
        |s: &AuthStore, u: &str| s.user(u).unwrap().roles.iter().cloned().collect::<Vec<_>>();
    assert_eq!(roles(&s, "alice"), vec!["keep".to_string()]);
    assert!(roles(&s, "bob").is_empty());
    // The role can be added again and is granted to no one.
    ok(&mut s, &[role_add("r")]);
    assert_eq!(roles(&s, "alice"), vec!["keep".to_string()]);
}

#[test]
fn generations_change_with_the_password_and_on_re_adding() {
    let mut s = AuthStore::default();
    ok(&mut s, &[role_add("r"), user_add("alice")]);
    let first = s.user("alice").unwrap().generation;
    assert_eq!(first, s.revision());
    assert_eq!(first, 2);
    ok(&mut s, &[grant_role("alice", "r")]);
    assert_eq!(
        s.user("alice").unwrap().generation,
        first,
        "a grant keeps it"
    );
    ok(
        &mut s,
        &[AuthCommand::UserChangePassword {
            name: "alice".into(),
            password: b("new"),
        }],
    );
    let second = s.user("alice").unwrap();
    assert_eq!(second.generation, s.revision());
    assert!(second.generation > first);
    assert_eq!(second.password, Some(b("new")));
    let second = second.generation;
    ok(
        &mut s,
        &[
            AuthCommand::UserDelete {
                name: "alice".into(),
            },
            AuthCommand::UserAdd {
                name: "alice".into(),
                password: None,
            },
        ],
    );
    let third = s.user("alice").unwrap();
    assert!(third.generation > second);
    assert_eq!(third.password, None);
    assert!(
        third.roles.is_empty(),
        "a re-added user starts without roles"
    );
}

#[test]
fn checks_pass_everyone_while_disabled() {
    let mut s = AuthStore::default();
    ok(&mut s, &[user_add("alice")]);
    for user in [None, Some(""), Some("alice"), Some("nobody")] {
        assert_eq!(s.check_range(user, Access::Write, b"k", b""), Ok(()));
        assert_eq!(s.check_admin(user), Ok(()));
        assert_eq!(s.check_user(user), Ok(()));
        assert_eq!(s.check_query(user, &Query::HashKv { revision: 0 }), Ok(()));
    }
}

#[test]
fn who_is_asking() {
    let s = enabled_store();
    for user in [None, Some("")] {
        assert_eq!(
            s.check_range(user, Access::Read, b"k", b""),
            Err(KvError::UserEmpty)
        );
        assert_eq!(s.check_admin(user), Err(KvError::UserEmpty));
        assert_eq!(s.check_user(user), Err(KvError::UserEmpty));
    }
    let nobody = Some("nobody");
    assert_eq!(
        s.check_range(nobody, Access::Read, b"k", b""),
        Err(KvError::PermissionDenied)
    );
    assert_eq!(s.check_admin(nobody), Err(KvError::UserNotFound));
    assert_eq!(s.check_user(nobody), Err(KvError::PermissionDenied));
    assert_eq!(s.check_admin(ALICE), Err(KvError::PermissionDenied));
    assert_eq!(s.check_user(ALICE), Ok(()));
    assert_eq!(s.check_user(Some("bob")), Ok(()));
    assert_eq!(s.check_admin(Some(ROOT)), Ok(()));
    assert!(s.is_admin(ROOT));
    assert!(!s.is_admin("alice"));
    assert!(!s.is_admin("nobody"));
    // Root reads and writes everything, with no permission at all.
    for (k, e) in [("k", ""), ("a", "z"), ("\0", "\0"), ("", "\0")] {
        for a in [Access::Read, Access::Write] {
            assert_eq!(
                s.check_range(Some(ROOT), a, k.as_bytes(), e.as_bytes()),
                Ok(())
            );
        }
    }
    // A user with no permissions gets nothing.
    assert!(!can(&s, Access::Read, "k", ""));
}

#[test]
fn a_single_key_permission_covers_that_key_only() {
    let s = alice_with(&[perm(PermKind::ReadWrite, "k", "")]);
    assert!(can(&s, Access::Read, "k", ""));
    assert!(can(&s, Access::Write, "k", ""));
    assert!(can(&s, Access::Read, "k", "k\0"));
    assert!(!can(&s, Access::Read, "k", "k\0\0"));
    assert!(!can(&s, Access::Read, "k\0", ""));
    assert!(!can(&s, Access::Read, "k", "l"));
    assert!(!can(&s, Access::Read, "j", "k\0"));
    assert!(!can(&s, Access::Read, "kk", ""));
    assert!(!can(&s, Access::Read, "k", "\0"));
}

#[test]
fn kinds_allow_what_they_name() {
    assert!(PermKind::Read.allows(Access::Read));
    assert!(!PermKind::Read.allows(Access::Write));
    assert!(PermKind::Write.allows(Access::Write));
    assert!(!PermKind::Write.allows(Access::Read));
    assert!(PermKind::ReadWrite.allows(Access::Read));
    assert!(PermKind::ReadWrite.allows(Access::Write));
    for k in [PermKind::Read, PermKind::Write, PermKind::ReadWrite] {
        assert_eq!(PermKind::from_i32(k as i32), Some(k));
    }
    assert_eq!(PermKind::from_i32(3), None);
    assert_eq!(PermKind::from_i32(-1), None);
    let s = alice_with(&[
        perm(PermKind::Read, "r", ""),
        perm(PermKind::Write, "w", ""),
    ]);
    assert!(can(&s, Access::Read, "r", ""));
    assert!(!can(&s, Access::Write, "r", ""));
    assert!(can(&s, Access::Write, "w", ""));
    assert!(!can(&s, Access::Read, "w", ""));
}

#[test]
fn a_prefix_permission_covers_ranges_inside_it() {
    let s = alice_with(&[perm(PermKind::Read, "p/", "p0")]);
    assert_eq!(prefix_end(b"p/"), b("p0"));
    assert!(can(&s, Access::Read, "p/x", ""));
    assert!(can(&s, Access::Read, "p/", ""));
    assert!(can(&s, Access::Read, "p/", "p0"));
    assert!(can(&s, Access::Read, "p/a", "p/z"));
    assert!(!can(&s, Access::Write, "p/x", ""));
    assert!(!can(&s, Access::Read, "p", "p0"));
    assert!(!can(&s, Access::Read, "p/", "p1"));
    assert!(!can(&s, Access::Read, "p/", "\0"));
    assert!(!can(&s, Access::Read, "p0", ""));
}

#[test]
fn an_open_ended_permission_covers_every_key_after_it() {
    let s = alice_with(&[perm(PermKind::Write, "m", "\0")]);
    assert!(can(&s, Access::Write, "m", ""));
    assert!(can(&s, Access::Write, "zzz", ""));
    assert!(can(&s, Access::Write, "\u{7f}\u{7f}", ""));
    assert!(can(&s, Access::Write, "m", "\0"));
    assert!(can(&s, Access::Write, "n", "\0"));
    assert!(can(&s, Access::Write, "n", "q"));
    assert!(!can(&s, Access::Write, "l", "\0"));
    assert!(!can(&s, Access::Write, "lz", ""));
    assert!(!can(&s, Access::Read, "n", ""));
}

#[test]
fn the_whole_key_space() {
    // etcdctl's permission for every key, and clients' "every key" range
    // (`"\0"` or `""` to `"\0"`).
    let s = alice_with(&[perm(PermKind::Read, "\0", "\0")]);
    assert!(can(&s, Access::Read, "\0", "\0"));
    assert!(can(&s, Access::Read, "", "\0"));
    assert!(can(&s, Access::Read, "", "b"));
    assert!(can(&s, Access::Read, "\0", ""));
    assert!(can(&s, Access::Read, "anything", ""));
    let all = Query::prefix("", 0);
    assert_eq!(s.check_query(ALICE, &all), Ok(()));
    // From "a" on does not cover all keys.
    let s = alice_with(&[perm(PermKind::Read, "a", "\0")]);
    assert!(!can(&s, Access::Read, "\0", "\0"));
    assert!(!can(&s, Access::Read, "", "\0"));
    assert!(can(&s, Access::Read, "a", "\0"));
}

#[test]
fn permissions_cover_together_exactly() {
    // Adjacent intervals join.
    let s = alice_with(&[
        perm(PermKind::Read, "a", "c"),
        perm(PermKind::Read, "c", "e"),
    ]);
    assert!(can(&s, Access::Read, "b", "d"));
    assert!(can(&s, Access::Read, "a", "e"));
    assert!(can(&s, Access::Read, "c", ""));
    assert!(!can(&s, Access::Read, "a", "e\0"));
    assert!(!can(&s, Access::Read, "e", ""));
    assert!(!can(&s, Access::Read, "a", "\0"));
    // A gap of one key ("c") breaks the cover.
    let s = alice_with(&[
        perm(PermKind::Read, "a", "c"),
        perm(PermKind::Read, "c\0", "e"),
    ]);
    assert!(!can(&s, Access::Read, "b", "d"));
    assert!(!can(&s, Access::Read, "c", ""));
    assert!(can(&s, Access::Read, "c\0", "d"));
    // A single key fills it.
    let s = alice_with(&[
        perm(PermKind::Read, "a", "c"),
        perm(PermKind::Read, "c\0", "e"),
        perm(PermKind::Read, "c", ""),
    ]);
    assert!(can(&s, Access::Read, "b", "d"));
    // Overlapping and nested intervals, and an open end.
    let s = alice_with(&[
        perm(PermKind::Read, "a", "m"),
        perm(PermKind::Read, "b", "c"),
        perm(PermKind::Read, "k", "p"),
        perm(PermKind::Read, "o", "\0"),
    ]);
    assert!(can(&s, Access::Read, "a", "\0"));
    assert!(can(&s, Access::Read, "l", "zz"));
    // Permissions of another kind do not help.
    let s = alice_with(&[
        perm(PermKind::Read, "a", "c"),
        perm(PermKind::Write, "c", "e"),
    ]);
    assert!(!can(&s, Access::Read, "b", "d"));
    assert!(!can(&s, Access::Write, "b", "d"));
}

#[test]
fn permissions_of_all_the_users_roles_count() {
    let mut s = alice_with(&[perm(PermKind::Read, "a", "c")]);
    ok(
        &mut s,
        &[
            role_add("r2"),
            grant("r2", perm(PermKind::ReadWrite, "c", "e")),
            role_add("other"),
            grant("other", perm(PermKind::ReadWrite, "e", "g")),
        ],
    );
    assert!(!can(&s, Access::Read, "b", "d"));
    ok(&mut s, &[grant_role("alice", "r2")]);
    assert!(can(&s, Access::Read, "b", "d"));
    assert!(!can(&s, Access::Read, "b", "f"), "a role alice lacks");
    // Revoking the role or the permission takes it away again.
    ok(&mut s, &[revoke("r2", "c", "e")]);
    assert!(!can(&s, Access::Read, "b", "d"));
}

#[test]
fn queries_need_what_etcd_checks() {
    let s = alice_with(&[perm(PermKind::Read, "a", "c")]);
    let deny = Err(KvError::PermissionDenied);
    let q = |q: Query| s.check_query(ALICE, &q);
    assert_eq!(q(Query::Get { key: b("a") }), Ok(()));
    assert_eq!(q(Query::Get { key: b("c") }), deny);
    let range = |start: &str, end: &str| Query::Range {
        start: b(start),
        end: b(end),
        limit: 0,
    };
    assert_eq!(q(range("a", "c")), Ok(()));
    assert_eq!(q(range("a", "d")), deny);
    assert_eq!(q(Query::RangeReq(RangeRequest::new("b", "c"))), Ok(()));
    assert_eq!(q(Query::RangeReq(RangeRequest::new("b", "\0"))), deny);
    let events = |start: &str, end: &str| Query::Events {
        start: b(start),
        end: b(end),
        from_revision: 1,
        limit: 0,
    };
    assert_eq!(q(events("a", "")), Ok(()));
    assert_eq!(q(events("a", "z")), deny);
    let read = |k: &str| TxnRequest {
        success: vec![RequestOp::Range(RangeRequest::new(b(k), ""))],
        ..TxnRequest::default()
    };
    assert_eq!(q(Query::Txn(read("a"))), Ok(()));
    assert_eq!(q(Query::Txn(read("x"))), deny);
    for lq in [
        Query::Leases,
        Query::Status,
        Query::LeaseTimeToLive {
            id: 1,
            keys: true,
            now: 0,
        },
    ] {
        assert_eq!(s.check_query(ALICE, &lq), Ok(()));
        assert_eq!(s.check_query(None, &lq), Err(KvError::UserEmpty));
        assert_eq!(s.check_query(Some("x"), &lq), deny);
    }
    let hash = Query::HashKv { revision: 0 };
    assert_eq!(s.check_query(ALICE, &hash), deny);
    assert_eq!(s.check_query(Some("x"), &hash), Err(KvError::UserNotFound));
    assert_eq!(s.check_query(Some(ROOT), &hash), Ok(()));
}

#[test]
fn txns_check_compares_both_branches_and_nested_txns() {
    // alice reads [a, m) and writes "w".
    let s = alice_with(&[
        perm(PermKind::Read, "a", "m"),
        perm(PermKind::Write, "w", ""),
    ]);
    let deny = Err(KvError::PermissionDenied);
    let check = |t: &TxnRequest| s.check_txn(ALICE, t);
    let range = |k: &str| RequestOp::Range(RangeRequest::new(b(k), ""));
    let put = |k: &str, prev_kv: bool| {
        RequestOp::Put(PutRequest {
            prev_kv,
            ..PutRequest::new(b(k), "v")
        })
    };
    let del = |k: &str, end: &str, prev_kv: bool| {
        RequestOp::DeleteRange(DeleteRangeRequest {
            key: b(k),
            range_end: b(end),
            prev_kv,
        })
    };
    let txn =
        |compare: Vec<TxnCompare>, success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
            compare,
            success,
            failure,
        };
    let cmp = |k: &str, end: &str| TxnCompare {
        range_end: b(end),
        ..TxnCompare::new(b(k), CompareResult::Equal, CompareTarget::Version(0))
    };
    // Compares read.
    assert_eq!(check(&txn(vec![cmp("a", "")], vec![], vec![])), Ok(()));
    assert_eq!(check(&txn(vec![cmp("a", "m")], vec![], vec![])), Ok(()));
    assert_eq!(check(&txn(vec![cmp("a", "n")], vec![], vec![])), deny);
    assert_eq!(check(&txn(vec![cmp("w", "")], vec![], vec![])), deny);
    // Both branches, whichever would be taken.
    let allowed = vec![range("b"), put("w", false), del("w", "", false)];
    assert_eq!(
        check(&txn(vec![], allowed.clone(), allowed.clone())),
        Ok(())
    );
    for bad in [
        range("w"),
        put("b", false),
        put("w", true),
        del("b", "", false),
        del("w", "", true),
        del("w", "x", false),
    ] {
        let mut ops = allowed.clone();
        ops.push(bad.clone());
        assert_eq!(check(&txn(vec![], ops.clone(), vec![])), deny, "{bad:?}");
        assert_eq!(check(&txn(vec![], vec![], ops)), deny, "{bad:?}");
    }
    // Nested txns: their compares and both their branches, at any depth.
    let nest = |t: TxnRequest| txn(vec![], vec![], vec![RequestOp::Txn(t)]);
    assert_eq!(
        check(&nest(nest(txn(vec![], allowed.clone(), vec![])))),
        Ok(())
    );
    assert_eq!(
        check(&nest(nest(txn(vec![cmp("x", "")], vec![], vec![])))),
        deny
    );
    assert_eq!(
        check(&nest(nest(txn(vec![], vec![put("x", false)], vec![])))),
        deny
    );
    assert_eq!(check(&nest(txn(vec![], vec![], vec![range("z")]))), deny);
    // A user is only needed once something is checked (as in etcd).
    assert_eq!(s.check_txn(None, &TxnRequest::default()), Ok(()));
    assert_eq!(
        s.check_txn(None, &txn(vec![], vec![range("b")], vec![])),
        Err(KvError::UserEmpty)
    );
}

/// Leases 1 (keys "mine/1", "mine/2"), 2 (keys "mine/3", "theirs") and 3
/// (no keys).
fn leases() -> Leases {
    let mut l = Leases::default();
    for id in [1, 2, 3] {
        l.grant(id, 60, 0, 1).unwrap();
    }
    for (id, key) in [(1, "mine/1"), (1, "mine/2"), (2, "mine/3"), (2, "theirs")] {
        l.attach(id, b(key));
    }
    l
}

#[test]
fn commands_need_what_etcd_checks() {
    let s = alice_with(&[
        perm(PermKind::Write, "mine/", "mine0"),
        perm(PermKind::Read, "r", ""),
        perm(PermKind::ReadWrite, "rw", ""),
    ]);
    let leases = leases();
    let deny = Err(KvError::PermissionDenied);
    let check = |c: Command| s.check_command(ALICE, &c, &leases);
    assert_eq!(check(put("mine/x", "v")), Ok(()));
    assert_eq!(check(put("r", "v")), deny);
    let put_req = |k: &str, lease: i64, prev_kv: bool| {
        Command::PutReq(PutRequest {
            lease,
            prev_kv,
            ..PutRequest::new(b(k), "v")
        })
    };
    assert_eq!(check(put_req("mine/x", 0, false)), Ok(()));
    assert_eq!(check(put_req("mine/x", 0, true)), deny, "prev_kv reads");
    assert_eq!(check(put_req("rw", 0, true)), Ok(()));
    // A lease's keys must all be writable (etcd's checkLeasePuts).
    assert_eq!(check(put_req("mine/x", 1, false)), Ok(()));
    assert_eq!(check(put_req("mine/x", 2, false)), deny);
    assert_eq!(check(put_req("mine/x", 3, false)), Ok(()));
    assert_eq!(check(put_req("mine/x", 99, false)), Ok(()), "no such lease");
    assert_eq!(check(Command::LeaseRevoke { id: 1 }), Ok(()));
    assert_eq!(check(Command::LeaseRevoke { id: 2 }), deny);
    assert_eq!(check(Command::LeaseRevoke { id: 3 }), Ok(()));
    assert_eq!(check(Command::Delete { key: b("mine/a") }), Ok(()));
    assert_eq!(check(Command::Delete { key: b("rw0") }), deny);
    let del_range = |start: &str, end: &str| Command::DeleteRange {
        start: b(start),
        end: b(end),
    };
    assert_eq!(check(del_range("mine/", "mine0")), Ok(()));
    assert_eq!(check(del_range("mine/", "\0")), deny);
    let del_req = |k: &str, end: &str, prev_kv: bool| {
        Command::DeleteRangeReq(DeleteRangeRequest {
            key: b(k),
            range_end: b(end),
            prev_kv,
        })
    };
    assert_eq!(check(del_req("mine/a", "mine/b", false)), Ok(()));
    assert_eq!(check(del_req("mine/a", "mine/b", true)), deny);
    assert_eq!(check(del_req("rw", "", true)), Ok(()));
    assert_eq!(check(del_req("r", "", false)), deny);
    let cas = |k: &str| Command::Cas {
        key: b(k),
        expected: Compare::VersionEquals(0),
        value: b("v"),
    };
    assert_eq!(check(cas("rw")), Ok(()));
    assert_eq!(check(cas("r")), deny, "needs write too");
    assert_eq!(check(cas("mine/x")), deny, "needs read too");
    let txn = TxnRequest {
        success: vec![RequestOp::Put(PutRequest::new("r", "v"))],
        ..TxnRequest::default()
    };
    assert_eq!(check(Command::Txn(txn)), deny);
    // Renewals are not checked (as in etcd 3.4).
    let renew = Command::LeaseKeepAlive { id: 1 };
    for user in [ALICE, None, Some("x")] {
        assert_eq!(s.check_command(user, &renew, &leases), Ok(()));
    }
    for c in [
        Command::LeaseGrant { id: 0, ttl: 10 },
        Command::Compact { revision: 1 },
    ] {
        assert_eq!(s.check_command(ALICE, &c, &leases), Ok(()));
        assert_eq!(s.check_command(None, &c, &leases), Err(KvError::UserEmpty));
        assert_eq!(s.check_command(Some("x"), &c, &leases), deny);
    }
    for a in [enable(), AuthCommand::Disable, role_add("x"), user_add("x")] {
        let c = Command::Auth(a);
        assert_eq!(s.check_command(ALICE, &c, &leases), deny);
        assert_eq!(
            s.check_command(Some("x"), &c, &leases),
            Err(KvError::UserNotFound)
        );
        assert_eq!(s.check_command(Some(ROOT), &c, &leases), Ok(()));
    }
    let nested = Command::As {
        generation: 0,
        user: Some(ROOT.into()),
        command: Box::new(put("mine/x", "v")),
    };
    assert_eq!(check(nested), Err(KvError::NestedAs));
    // Root may do anything; no user nothing that is checked.
    assert_eq!(
        s.check_command(Some(ROOT), &put_req("x", 2, true), &leases),
        Ok(())
    );
    assert_eq!(
        s.check_command(None, &put("mine/x", "v"), &leases),
        Err(KvError::UserEmpty)
    );
}

#[test]
fn auth_errors_carry_etcds_messages_and_codes() {
    let cases = [
        (
            KvError::RootUserNotExist,
            "etcdserver: root user does not exist",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::RootRoleNotExist,
            "etcdserver: root user does not have root role",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::UserAlreadyExists,
            "etcdserver: user name already exists",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::UserEmpty,
            "etcdserver: user name is empty",
            grpc::INVALID_ARGUMENT,
        ),
        (
            KvError::UserNotFound,
            "etcdserver: user name not found",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::RoleAlreadyExists,
            "etcdserver: role name already exists",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::RoleNotFound,
            "etcdserver: role name not found",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::RoleEmpty,
            "etcdserver: role name is empty",
            grpc::INVALID_ARGUMENT,
        ),
        (
            KvError::AuthFailed,
            "etcdserver: authentication failed, invalid user ID or password",
            grpc::INVALID_ARGUMENT,
        ),
        (
            KvError::PermissionDenied,
            "etcdserver: permission denied",
            grpc::PERMISSION_DENIED,
        ),
        (
            KvError::RoleNotGranted,
            "etcdserver: role is not granted to the user",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::PermissionNotGranted,
            "etcdserver: permission is not granted to the role",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::AuthNotEnabled,
            "etcdserver: authentication is not enabled",
            grpc::FAILED_PRECONDITION,
        ),
        (
            KvError::InvalidAuthToken,
            "etcdserver: invalid auth token",
            grpc::UNAUTHENTICATED,
        ),
        (
            KvError::InvalidAuthMgmt,
            "etcdserver: invalid auth management",
            grpc::INVALID_ARGUMENT,
        ),
    ];
    assert_eq!(grpc::PERMISSION_DENIED, 7);
    assert_eq!(grpc::UNAUTHENTICATED, 16);
    for (i, (e, msg, status)) in cases.into_iter().enumerate() {
        assert_eq!(e.to_string(), msg);
        let code = e.code();
        assert_eq!(code as usize, 17 + i, "{e:?}");
        assert_eq!(ErrorCode::from_u8(code as u8), Ok(code));
        assert_eq!(code.grpc_code(), status, "{e:?}");
        assert_eq!(code.etcd_message(), Some(msg));
        // The reply carries both, and decodes back.
        let reply = Response::error(&e);
        assert_eq!(Response::decode(&reply.encode()), Ok(reply.clone()));
        assert_eq!(
            reply,
            Response::Error {
                code,
                message: msg.to_string()
            }
        );
    }
    assert_eq!(KvError::NestedAs.code(), ErrorCode::Malformed);
    for (i, c) in ErrorCode::ALL.iter().enumerate() {
        assert_eq!(*c as usize, i + 1);
    }
    assert!(ErrorCode::from_u8(32).is_err());
}

#[test]
fn auth_and_as_commands_are_validated() {
    let huge = "x".repeat(MAX_KEY_LEN + 1);
    let invalid = [
        Command::Auth(role_add(&huge)),
        Command::Auth(user_add(&huge)),
        Command::Auth(grant_role("alice", &huge)),
        Command::Auth(grant("r", perm(PermKind::Read, "a", &huge))),
        Command::Auth(revoke("r", "", "")),
        Command::Auth(AuthCommand::UserChangePassword {
            name: "alice".into(),
            password: Bytes::from(vec![0; MAX_VALUE_LEN + 1]),
        }),
        Command::As {
            generation: 0,
            user: Some(huge.clone()),
            command: Box::new(put("k", "v")),
        },
        Command::As {
            generation: 0,
            user: None,
            command: Box::new(put("", "v")),
        },
        Command::As {
            generation: 0,
            user: None,
            command: Box::new(Command::As {
                generation: 0,
                user: None,
                command: Box::new(put("k", "v")),
            }),
        },
    ];
    for c in invalid {
        assert!(c.validate().is_err(), "{c:?}");
    }
    assert_eq!(
        Command::As {
            generation: 0,
            user: None,
            command: Box::new(Command::As {
                generation: 0,
                user: None,
                command: Box::new(put("k", "v")),
            }),
        }
        .validate(),
        Err(KvError::NestedAs)
    );
    // Empty names are refused when applied, with etcd's errors.
    assert_eq!(Command::Auth(user_add("")).validate(), Ok(()));
    assert_eq!(Command::Auth(role_add("")).validate(), Ok(()));
    // A nested As does not decode either.
    let inner = Command::As {
        generation: 0,
        user: None,
        command: Box::new(put("k", "v")),
    };
    let mut data = vec![24u8, 0];
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&inner.encode());
    assert_eq!(Command::decode(&data), Err(KvError::NestedAs));
    // Auth commands never add history; As is its command's.
    assert!(!Command::Auth(user_add("a")).adds_history());
    assert!(inner.adds_history());
    let revoke_as = Command::As {
        generation: 0,
        user: None,
        command: Box::new(Command::LeaseRevoke { id: 1 }),
    };
    assert!(!revoke_as.adds_history());
}

#[test]
fn the_quota_looks_through_as() {
    let svc = KvService::new().with_quota(10);
    let quota = svc.quota().unwrap();
    let big = Command::As {
        generation: 0,
        user: None,
        command: Box::new(put("k", &"v".repeat(200))),
    };
    assert!(quota.admit(&big.encode()).is_err());
    let revoke_as = Command::As {
        generation: 0,
        user: None,
        command: Box::new(Command::LeaseRevoke { id: 1 }),
    };
    assert!(quota.admit(&revoke_as.encode()).is_ok());
    let auth = Command::Auth(user_add(&"u".repeat(200)));
    assert!(quota.admit(&auth.encode()).is_ok());
}

fn as_user(user: Option<&str>, c: Command) -> Command {
    Command::As {
        generation: 0,
        user: user.map(str::to_string),
        command: Box::new(c),
    }
}

/// `c` run as root (an etcd API command needs a caller while auth is on).
fn root(c: Command) -> Command {
    as_user(Some(ROOT), c)
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A service with root and alice (role "r", no permissions), auth
/// enabled, set up with unwrapped commands.
fn auth_harness() -> Harness {
    let mut h = Harness::new();
    for c in [
        user_add(ROOT),
        grant_role(ROOT, ROOT),
        role_add("r"),
        user_add("alice"),
        grant_role("alice", "r"),
        enable(),
    ] {
        assert_eq!(h.cmd(Command::Auth(c)), Response::Auth { revision: 1 });
    }
    h
}

#[test]
fn a_put_as_a_user_without_permission_is_refused_and_changes_nothing() {
    let mut h = auth_harness();
    let before = h.svc().clone();
    let applied = h.svc().applied_commands();
    let r = h.cmd(as_user(ALICE, put("k", "v")));
    assert_eq!(
        r,
        Response::Error {
            code: ErrorCode::PermissionDenied,
            message: "etcdserver: permission denied".into()
        }
    );
    assert_eq!(h.svc().revision(), 1);
    assert_eq!(h.svc().get(b"k"), None);
    assert!(h.svc_mut().take_events().is_empty());
    // Counted as applied, like other refused valid commands.
    assert_eq!(h.svc().applied_commands(), applied + 1);
    assert_eq!(h.svc().store(), before.store());
    assert_eq!(h.svc().auth(), before.auth());

    // Root grants alice write on "k": now it runs.
    let g = as_user(
        Some(ROOT),
        Command::Auth(grant("r", perm(PermKind::Write, "k", ""))),
    );
    assert_eq!(h.cmd(g), Response::Auth { revision: 1 });
    let r = h.cmd(as_user(ALICE, put("k", "v")));
    assert_eq!(
        r,
        Response::Put {
            revision: 2,
            prev: None
        }
    );
    assert_eq!(h.svc().get(b"k").unwrap().value, b("v"));
    // But not a put asking for the previous value (a read).
    let r = h.cmd(as_user(
        ALICE,
        Command::PutReq(PutRequest {
            prev_kv: true,
            ..PutRequest::new("k", "w")
        }),
    ));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    assert_eq!(h.svc().revision(), 2);
    // Auth commands need root.
    let r = h.cmd(as_user(ALICE, Command::Auth(role_add("x"))));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    assert!(h.svc().auth().role("x").is_none());
    // Unwrapped commands are not checked.
    assert!(matches!(h.cmd(put("other", "v")), Response::Put { .. }));
}

#[test]
fn no_user_is_refused_while_enabled_and_runs_while_disabled() {
    let mut h = auth_harness();
    let r = h.cmd(as_user(None, put("k", "v")));
    assert_eq!(
        r,
        Response::Error {
            code: ErrorCode::UserEmpty,
            message: "etcdserver: user name is empty".into()
        }
    );
    assert_eq!(h.svc().get(b"k"), None);
    let r = h.cmd(as_user(None, Command::Auth(AuthCommand::Disable)));
    assert_eq!(code(&r), ErrorCode::UserEmpty);
    assert!(h.svc().auth().enabled());
    let r = h.cmd(as_user(Some(ROOT), Command::Auth(AuthCommand::Disable)));
    assert_eq!(r, Response::Auth { revision: 1 });
    assert!(!h.svc().auth().enabled());
    let r = h.cmd(as_user(None, put("k", "v")));
    assert_eq!(
        r,
        Response::Put {
            revision: 2,
            prev: None
        }
    );
    // Anyone may enable auth while it is disabled (etcd's
    // IsAdminPermitted passes everything then).
    let r = h.cmd(as_user(Some("nobody"), Command::Auth(enable())));
    assert_eq!(r, Response::Auth { revision: 2 });
    assert!(h.svc().auth().enabled());
}

#[test]
fn revoking_a_lease_needs_write_on_its_keys() {
    let mut h = auth_harness();
    let root = Some(ROOT);
    assert!(matches!(
        h.cmd(as_user(root, Command::LeaseGrant { id: 5, ttl: 60 })),
        Response::LeaseGrant { id: 5, .. }
    ));
    let leased = |k: &str| {
        Command::PutReq(PutRequest {
            lease: 5,
            ..PutRequest::new(b(k), "v")
        })
    };
    assert!(matches!(
        h.cmd(as_user(root, leased("secret/x"))),
        Response::PutResp(_)
    ));
    let g = grant("r", perm(PermKind::ReadWrite, "k", ""));
    assert_eq!(
        h.cmd(as_user(root, Command::Auth(g))),
        Response::Auth { revision: 2 }
    );
    // alice may write "k" but not with lease 5, whose key she cannot write,
    // nor revoke the lease.
    let r = h.cmd(as_user(ALICE, leased("k")));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    let r = h.cmd(as_user(ALICE, Command::LeaseRevoke { id: 5 }));
    assert_eq!(code(&r), ErrorCode::PermissionDenied);
    assert!(h.svc().leases().contains(5));
    assert!(h.svc().get(b"secret/x").is_some());
    assert_eq!(h.svc().revision(), 2);
    // Granted write on "secret/": both run.
    let g = grant("r", perm(PermKind::Write, "secret/", "secret0"));
    assert!(matches!(
        h.cmd(as_user(root, Command::Auth(g))),
        Response::Auth { .. }
    ));
    assert!(matches!(
        h.cmd(as_user(ALICE, leased("k"))),
        Response::PutResp(_)
    ));
    assert_eq!(
        h.cmd(as_user(ALICE, Command::LeaseRevoke { id: 5 })),
        Response::LeaseRevoke { revision: 4 }
    );
    assert!(!h.svc().leases().contains(5));
    assert!(h.svc().get(b"secret/x").is_none());
}

#[test]
fn auth_commands_reply_with_the_store_revision_and_publish() {
    let mut h = Harness::new();
    let shared = h.svc().auth_shared();
    assert!(!shared.enabled());
    assert_eq!(*shared.current(), AuthStore::default());
    h.cmd(put("a", "1"));
    h.cmd(put("a", "2"));
    let r = h.cmd(Command::Auth(user_add(ROOT)));
    assert_eq!(r, Response::Auth { revision: 3 });
    assert_eq!(h.svc().revision(), 3, "auth commands do not move it");
    assert_eq!(*shared.current(), *h.svc().auth());
    assert!(shared.current().user(ROOT).is_some());
    // A refused one replies with the error and publishes nothing new.
    let held = shared.current();
    let r = h.cmd(Command::Auth(user_add(ROOT)));
    assert_eq!(
        r,
        Response::Error {
            code: ErrorCode::UserAlreadyExists,
            message: "etcdserver: user name already exists".into()
        }
    );
    assert!(Arc::ptr_eq(&held, &shared.current()));
    h.cmd(Command::Auth(grant_role(ROOT, ROOT)));
    h.cmd(Command::Auth(enable()));
    assert!(shared.enabled());
    assert!(shared.current().enabled());
    assert_eq!(shared.current().secret(), &[7; 32]);
    assert_eq!(*shared.current(), *h.svc().auth());
    // While on, a plain auth command is no one's: refused.
    let r = h.cmd(Command::Auth(AuthCommand::Disable));
    assert_eq!(code(&r), ErrorCode::UserEmpty);
    assert!(shared.enabled());
    h.cmd(root(Command::Auth(AuthCommand::Disable)));
    assert!(!shared.enabled());
    assert_eq!(shared.current().revision(), 4);
    // Encodings of the new response.
    let r = Response::Auth { revision: 9 };
    assert_eq!(Response::decode(&r.encode()), Ok(r));
}

/// A service with keys, a lease and auth state.
fn service_with_auth() -> KvService {
    let mut h = auth_harness();
    h.cmd(put("a", "1"));
    h.cmd(root(Command::LeaseGrant { id: 3, ttl: 100 }));
    for c in [
        grant("r", perm(PermKind::Read, "a", "z")),
        grant("r", perm(PermKind::ReadWrite, "b", "")),
        grant("r", perm(PermKind::Write, "c", "\0")),
        role_add("empty"),
        AuthCommand::UserAdd {
            name: "nopass".into(),
            password: None,
        },
        grant_role("nopass", "empty"),
        grant_role("nopass", "r"),
    ] {
        assert!(matches!(
            h.cmd(root(Command::Auth(c))),
            Response::Auth { .. }
        ));
    }
    h.svc().clone()
}

#[test]
fn snapshots_carry_the_auth_state() {
    let svc = service_with_auth();
    let image = svc.snapshot_vec();
    assert_eq!(&image[..4], b"KKV3");
    let back = KvService::decode_snapshot(&image).unwrap();
    assert!(back == svc);
    assert_eq!(back.auth(), svc.auth());
    assert!(back.auth().enabled());
    assert_eq!(back.snapshot_vec(), image);
    let mut captured = Vec::new();
    svc.prepare_snapshot()(&mut captured).unwrap();
    assert_eq!(captured, image);
    // Auth state is part of the replicated state.
    let mut other = svc.clone();
    other.apply(Command::Auth(role_add("more")));
    assert!(other != svc);

    // A restore keeps the service's AuthShared and publishes to it.
    let mut fresh = KvService::new();
    let shared = fresh.auth_shared();
    fresh.restore(Some(&image)).unwrap();
    assert!(Arc::ptr_eq(&shared, &fresh.auth_shared()));
    assert!(shared.enabled());
    assert_eq!(*shared.current(), *svc.auth());
    fresh.restore(None).unwrap();
    assert!(!shared.enabled());
    assert_eq!(*shared.current(), AuthStore::default());
    // A refused restore publishes nothing.
    fresh.restore(Some(&image)).unwrap();
    assert!(fresh.restore(Some(&image[..image.len() - 1])).is_err());
    assert!(shared.enabled());
}

#[test]
fn kkv2_until_auth_is_used_then_kkv3() {
    let mut h = Harness::new();
    h.cmd(put("a", "1"));
    h.cmd(Command::LeaseGrant { id: 3, ttl: 100 });
    // Never used: KKV2, which binaries from before auth read, and no
    // auth section.
    let svc = h.svc().clone();
    let old = svc.snapshot_vec();
    assert_eq!(&old[..4], b"KKV2");
    let back = KvService::decode_snapshot(&old).unwrap();
    assert!(back == svc);
    assert_eq!(*back.auth(), AuthStore::default());
    // Used once: KKV3 with the auth section, also after it is undone (the
    // revision has moved).
    h.cmd(Command::Auth(role_add("r")));
    h.cmd(Command::Auth(AuthCommand::RoleDelete { name: "r".into() }));
    let svc = h.svc().clone();
    let image = svc.snapshot_vec();
    assert_eq!(&image[..4], b"KKV3");
    let back = KvService::decode_snapshot(&image).unwrap();
    assert!(back == svc);
    assert_eq!(back.auth().revision(), 2);
    let tail = crate::tests_etcd::FRESH_AUTH.len();
    assert_eq!(image.len(), old.len() + tail);
    // A KKV2 snapshot has no auth section; a KKV3 needs one.
    let mut v2_with_auth = b"KKV2".to_vec();
    v2_with_auth.extend_from_slice(&image[4..]);
    assert!(KvService::decode_snapshot(&v2_with_auth).is_err());
    let mut v3_without = b"KKV3".to_vec();
    v3_without.extend_from_slice(&old[4..]);
    assert!(KvService::decode_snapshot(&v3_without).is_err());
}

/// Writes an auth section by hand.
struct Section(Vec<u8>);

impl Section {
    fn new(enabled: bool, revision: u64) -> Section {
        let mut s = Section(vec![u8::from(enabled)]);
        s.u64(revision).bytes(b"");
        s
    }
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    /// A user with no password.
    fn user(&mut self, name: &str, generation: u64, roles: &[&str]) -> &mut Self {
        self.bytes(name.as_bytes()).u8(0).u64(generation);
        self.u32(roles.len() as u32);
        for r in roles {
            self.bytes(r.as_bytes());
        }
        self
    }
    /// A role with permissions (kind, key, range end).
    fn role(&mut self, name: &str, perms: &[(u8, &str, &str)]) -> &mut Self {
        self.bytes(name.as_bytes()).u32(perms.len() as u32);
        for (kind, key, end) in perms {
            self.u8(*kind).bytes(key.as_bytes()).bytes(end.as_bytes());
        }
        self
    }
}

/// An empty service's snapshot with `section` as its auth state.
fn with_section(section: &[u8]) -> Vec<u8> {
    // A fresh service's KKV2 snapshot, as KKV3 with `section` after it.
    let image = KvService::new().snapshot_vec();
    [&b"KKV3"[..], &image[4..], section].concat()
}

#[test]
fn restore_checks_the_auth_state() {
    // A good one first: the crafted format is the real one.
    let mut good = Section::new(true, 5);
    good.u32(2)
        .user("alice", 3, &["r"])
        .user(ROOT, 1, &[ROOT])
        .u32(1)
        .role("r", &[(0, "a", ""), (1, "a", "c"), (2, "b", "\0")]);
    let svc = KvService::decode_snapshot(&with_section(&good.0)).unwrap();
    assert!(svc.auth().enabled());
    assert_eq!(
        svc.auth().role("r").unwrap().perms,
        vec![
            perm(PermKind::Read, "a", ""),
            perm(PermKind::Write, "a", "c"),
            perm(PermKind::ReadWrite, "b", "\0"),
        ]
    );
    assert_eq!(svc.snapshot_vec(), with_section(&good.0));

    let cases: Vec<(Section, &str)> = vec![
        {
            let mut s = Section::new(false, 5);
            s.u32(1).user("alice", 3, &["nope"]).u32(0);
            (s, "role \"nope\", which does not exist")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(2).user("b", 3, &[]).user("a", 3, &[]).u32(0);
            (s, "user names must be increasing")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(2).user("a", 3, &[]).user("a", 3, &[]).u32(0);
            (s, "user names must be increasing")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(1).user("a", 3, &["r", "r"]).u32(1).role("r", &[]);
            (s, "roles must be increasing")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(1).user("a", 6, &[]).u32(0);
            (s, "generation 6")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(1).user("", 1, &[]).u32(0);
            (s, "empty user name")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(0).u32(1).role("r", &[(1, "b", ""), (1, "a", "")]);
            (s, "out of order")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(0).u32(1).role("r", &[(1, "a", "c"), (2, "a", "c")]);
            (s, "out of order")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(0).u32(1).role("r", &[(3, "a", "")]);
            (s, "permission type")
        },
        {
            let mut s = Section::new(false, 5);
            let huge = "x".repeat(MAX_KEY_LEN + 1);
            s.u32(0).u32(1).role("r", &[(0, &huge, "")]);
            (s, "too large")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(0).u32(2).role("r", &[]).role("r", &[]);
            (s, "role names must be increasing")
        },
        {
            let mut s = Section::new(true, 5);
            s.u32(1).user(ROOT, 1, &[]).u32(0);
            (s, "without a root user")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(1).bytes(&[0xff, 0xfe]).u8(0).u64(1).u32(0).u32(0);
            (s, "UTF-8")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(0).u32(0).u8(0);
            (s, "trailing")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(1_000_000);
            (s, "truncated")
        },
        {
            let mut s = Section::new(false, 5);
            s.u32(1).bytes(b"a").u8(2).u64(1).u32(0).u32(0);
            (s, "invalid boolean")
        },
    ];
    for (section, want) in cases {
        let image = with_section(&section.0);
        let e = KvService::decode_snapshot(&image).unwrap_err().to_string();
        assert!(e.contains(want), "wanted {want:?}, got {e:?}");
        let mut s = KvService::new();
        assert!(s.restore(Some(&image)).is_err());
    }
}

#[test]
fn a_damaged_auth_section_is_an_error_not_a_panic() {
    let svc = service_with_auth();
    let image = svc.snapshot_vec();
    let auth_len = crate::tests_etcd::FRESH_AUTH.len() + svc.auth().contents_len() as usize;
    let start = image.len() - auth_len;
    let mut accepted = 0;
    for at in start..image.len() {
        for byte in [0u8, 1, 2, 3, 0x7f, 0xff, image[at].wrapping_add(1)] {
            let mut bad = image.clone();
            bad[at] = byte;
            if let Ok(other) = KvService::decode_snapshot(&bad) {
                // Accepted: a consistent state that snapshots to itself.
                accepted += 1;
                let again = other.snapshot_vec();
                assert!(KvService::decode_snapshot(&again).unwrap() == other);
            }
        }
        assert!(KvService::decode_snapshot(&image[..at]).is_err());
    }
    assert!(accepted > 0, "some bytes (a password, a revision) are free");
}

/// Is `x` (a non-empty key) in `[key, end)` by etcd's rules?
fn selects(key: &[u8], end: &[u8], x: &[u8]) -> bool {
    match end {
        [] => x == key,
        [0] => x >= key,
        _ => key <= x && x < end,
    }
}

/// Does the union of `perms` hold every key of the request `[key, end)`
/// (a non-empty range)? If some key is outside, so is the largest of the
/// request's first key and the permissions' ends below it, so those are
/// the only keys to try.
fn model_covers(perms: &[(Vec<u8>, Vec<u8>)], key: &[u8], end: &[u8]) -> bool {
    // The request's first key: keys are never empty.
    let first = if key.is_empty() {
        vec![0]
    } else {
        key.to_vec()
    };
    let mut tries = vec![first];
    for (k, e) in perms {
        match e.as_slice() {
            [] => tries.push([&k[..], &[0]].concat()),
            [0] => {}
            e => tries.push(e.to_vec()),
        }
    }
    tries
        .iter()
        .filter(|x| selects(key, end, x))
        .all(|x| perms.iter().any(|(k, e)| selects(k, e, x)))
}

fn model_key() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec!["a", "b", "c", "ab", "b\0", "c\0", "\0", "\0\0"])
        .prop_map(|s| s.as_bytes().to_vec())
}

fn model_end() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![
        "", "", "\0", "a", "b", "c", "d", "ab", "b\0", "c\0", "\0\0",
    ])
    .prop_map(|s| s.as_bytes().to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// `check_range` agrees with a key-by-key model of etcd's range
    /// rules, for any permissions of any kinds split over two roles.
    #[test]
    fn coverage_matches_a_model(
        perms in prop::collection::vec((0i32..3, model_key(), model_end(), any::<bool>()), 0..6),
        key in prop_oneof![model_key(), Just(Vec::new())],
        end in model_end(),
        write in any::<bool>(),
    ) {
        let access = if write { Access::Write } else { Access::Read };
        let mut s = enabled_store();
        ok(&mut s, &[role_add("r2"), grant_role("alice", "r2")]);
        let mut held = Vec::new();
        for (kind, k, e, second) in &perms {
            let kind = PermKind::from_i32(*kind).unwrap();
            let role = if *second { "r2" } else { "r" };
            let p = Permission { kind, key: Bytes::from(k.clone()), range_end: Bytes::from(e.clone()) };
            ok(&mut s, &[grant(role, p)]);
        }
        // What each role holds after merging, of the kind asked for.
        for role in ["r", "r2"] {
            for p in &s.role(role).unwrap().perms {
                if p.kind.allows(access) {
                    held.push((p.key.to_vec(), p.range_end.to_vec()));
                }
            }
        }
        // An empty request (end at or before its key) is checked as its key.
        let empty = !matches!(end.as_slice(), [] | [0]) && end <= key;
        prop_assume!(!(key.is_empty() && end.is_empty()));
        let want = if empty {
            model_covers(&held, &key, &[])
        } else {
            model_covers(&held, &key, &end)
        };
        let got = s.check_range(ALICE, access, &key, &end);
        prop_assert_eq!(got.is_ok(), want, "{:?} {:?} {:?}", held, key, end);
        if !want {
            prop_assert_eq!(got, Err(KvError::PermissionDenied));
        }
    }
}

/// `q` for `user` as the etcd API sends it once auth is in use.
fn query_as(user: Option<&str>, generation: u64, q: Query) -> Query {
    Query::As {
        user: user.map(str::to_string),
        generation,
        query: Box::new(q),
    }
}

#[test]
fn a_stale_generation_is_refused_when_applied_and_read() {
    let mut h = auth_harness();
    h.cmd(root(Command::Auth(grant(
        "r",
        perm(PermKind::ReadWrite, "k", ""),
    ))));
    let g = h.svc().auth().user("alice").unwrap().generation;
    let put_as = |generation| Command::As {
        user: Some("alice".into()),
        generation,
        command: Box::new(put("k", "v")),
    };
    // The generation alice's token names: runs; 0: not checked.
    assert!(matches!(h.cmd(put_as(g)), Response::Put { .. }));
    assert!(matches!(h.cmd(put_as(0)), Response::Put { .. }));
    // A new password: tokens naming the old generation are refused, even
    // if the member that checked one had not applied the change yet.
    h.cmd(root(Command::Auth(AuthCommand::UserChangePassword {
        name: "alice".into(),
        password: b("new"),
    })));
    let rev = h.svc().revision();
    let r = h.cmd(put_as(g));
    assert_eq!(code(&r), ErrorCode::InvalidAuthToken);
    assert_eq!(h.svc().revision(), rev, "nothing changed");
    let get = Query::Get { key: b("k") };
    let r = h.svc().read(&query_as(Some("alice"), g, get.clone()));
    assert_eq!(code(&r), ErrorCode::InvalidAuthToken);
    let g2 = h.svc().auth().user("alice").unwrap().generation;
    assert!(g2 > g);
    assert!(matches!(
        h.svc().read(&query_as(Some("alice"), g2, get.clone())),
        Response::Get { kv: Some(_), .. }
    ));
    // A deleted user's name re-added is another generation again.
    h.cmd(root(Command::Auth(AuthCommand::UserDelete {
        name: "alice".into(),
    })));
    h.cmd(root(Command::Auth(user_add("alice"))));
    h.cmd(root(Command::Auth(grant_role("alice", "r"))));
    assert_eq!(code(&h.cmd(put_as(g2))), ErrorCode::InvalidAuthToken);
}

#[test]
fn queries_as_a_user_are_checked_against_the_state_they_read() {
    let mut h = auth_harness();
    h.cmd(put("k", "v"));
    h.cmd(put("secret", "s"));
    h.cmd(root(Command::LeaseGrant { id: 7, ttl: 100 }));
    h.cmd(root(Command::PutReq(PutRequest {
        lease: 7,
        ..PutRequest::new("k2", "v")
    })));
    h.cmd(root(Command::PutReq(PutRequest {
        lease: 7,
        ..PutRequest::new("secret2", "s")
    })));
    h.cmd(root(Command::Auth(grant(
        "r",
        perm(PermKind::Read, "k", "l"),
    ))));
    let svc = h.svc().clone();
    let read = |user, q: Query| svc.read(&query_as(user, 0, q));
    let get = |k: &str| Query::Get { key: b(k) };
    assert!(matches!(
        read(ALICE, get("k")),
        Response::Get { kv: Some(_), .. }
    ));
    assert_eq!(
        code(&read(ALICE, get("secret"))),
        ErrorCode::PermissionDenied
    );
    assert_eq!(code(&read(None, get("k"))), ErrorCode::UserEmpty);
    // A lease's key names only to a user who may read all of them
    // (etcd's fix of CVE-2023-32082); its TTL to any known user.
    let ttl = |keys| Query::LeaseTimeToLive {
        id: 7,
        keys,
        now: 0,
    };
    assert_eq!(code(&read(ALICE, ttl(true))), ErrorCode::PermissionDenied);
    assert!(matches!(
        read(ALICE, ttl(false)),
        Response::LeaseTimeToLive { .. }
    ));
    assert!(matches!(
        read(Some(ROOT), ttl(true)),
        Response::LeaseTimeToLive { keys, .. } if keys.len() == 2
    ));
    // A plain read of keys while on is no one's (a member that did not
    // know auth was on sent it): refused. Status is answered.
    assert_eq!(
        code(&svc.read(&Query::RangeReq(RangeRequest::new("k", "")))),
        ErrorCode::UserEmpty
    );
    assert!(matches!(svc.read(&Query::Status), Response::Status { .. }));
    // Off: anyone.
    h.cmd(root(Command::Auth(AuthCommand::Disable)));
    assert!(matches!(
        h.svc().read(&query_as(None, 0, get("secret"))),
        Response::Get { kv: Some(_), .. }
    ));
    // Nested, and round trips.
    let nested = query_as(None, 0, query_as(None, 0, get("k")));
    assert_eq!(nested.validate(), Err(KvError::NestedAs));
    let q = query_as(Some("alice"), 9, Query::Txn(TxnRequest::default()));
    assert_eq!(Query::decode(&q.encode()), Ok(q));
    let mut data = vec![22u8, 0];
    data.extend_from_slice(&0u64.to_le_bytes());
    data.extend_from_slice(&query_as(None, 0, get("k")).encode());
    assert_eq!(Query::decode(&data), Err(KvError::NestedAs));
}

#[test]
fn revoking_a_lease_without_keys_needs_a_user() {
    let mut h = auth_harness();
    h.cmd(root(Command::LeaseGrant { id: 5, ttl: 100 }));
    let r = h.cmd(as_user(None, Command::LeaseRevoke { id: 5 }));
    assert_eq!(code(&r), ErrorCode::UserEmpty);
    assert!(h.svc().leases().contains(5));
    let r = h.cmd(as_user(ALICE, Command::LeaseRevoke { id: 5 }));
    assert!(matches!(r, Response::LeaseRevoke { .. }), "{r:?}");
}

#[test]
fn an_empty_key_permission_is_the_whole_key_space() {
    // etcdctl role grant-permission --prefix r readwrite ''
    let s = alice_with(&[perm(PermKind::ReadWrite, "", "\0")]);
    assert!(can(&s, Access::Write, "a", ""));
    assert!(can(&s, Access::Read, "\0", "\0"));
    assert!(can(&s, Access::Read, "", "\0"));
    let mut h = auth_harness();
    let grant_all = Command::Auth(grant("r", perm(PermKind::ReadWrite, "", "\0")));
    assert_eq!(grant_all.validate(), Ok(()));
    h.cmd(root(grant_all));
    assert!(matches!(
        h.cmd(as_user(ALICE, put("anything", "v"))),
        Response::Put { .. }
    ));
}

#[test]
fn debug_output_hides_secrets_and_password_hashes() {
    let mut s = AuthStore::default();
    let secret = b("the-secret-bytes");
    let hash = b("the-password-hash");
    let cmds = [
        AuthCommand::UserAdd {
            name: ROOT.into(),
            password: Some(hash.clone()),
        },
        AuthCommand::UserChangePassword {
            name: ROOT.into(),
            password: hash.clone(),
        },
        grant_role(ROOT, ROOT),
        AuthCommand::Enable {
            secret: secret.clone(),
        },
    ];
    for c in &cmds {
        s.apply(c).unwrap();
        let shown = format!("{:?}", Command::Auth(c.clone()));
        assert!(!shown.contains("the-"), "{shown}");
    }
    let shown = format!("{s:?}");
    assert!(shown.contains("root") && !shown.contains("the-"), "{shown}");
}

#[test]
fn plain_etcd_requests_are_no_ones_while_auth_is_on() {
    let mut h = auth_harness();
    let before = h.svc().clone();
    for c in [
        Command::PutReq(PutRequest::new("k", "v")),
        Command::DeleteRangeReq(DeleteRangeRequest {
            key: b("k"),
            ..Default::default()
        }),
        Command::Txn(TxnRequest::default()),
        Command::LeaseGrant { id: 1, ttl: 10 },
        Command::LeaseRevoke { id: 1 },
        Command::Auth(role_add("x")),
    ] {
        assert!(c.needs_a_caller(), "{c:?}");
        assert_eq!(code(&h.cmd(c)), ErrorCode::UserEmpty);
    }
    assert_eq!(h.svc().store(), before.store());
    assert_eq!(h.svc().auth(), before.auth());
    // The native protocol's own commands and compaction are taken.
    for c in [put("n", "v"), Command::Compact { revision: 1 }] {
        assert!(!c.needs_a_caller());
        assert!(!matches!(h.cmd(c), Response::Error { .. }));
    }
    // While off, nothing is refused.
    h.cmd(root(Command::Auth(AuthCommand::Disable)));
    assert!(matches!(
        h.cmd(Command::PutReq(PutRequest::new("k", "v"))),
        Response::PutResp(_)
    ));
}
