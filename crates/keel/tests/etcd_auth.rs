//! etcd's authentication on a real 3-node Keel cluster: users, roles and
//! key-range permissions managed and used through Debian's `etcdctl` 3.4
//! (`user`, `role`, `auth enable`/`disable`, `--user`), and through raw
//! gRPC: a token issued by one member works at the others and after a
//! restart, a changed password ends older tokens, watches and txns are
//! checked, admin calls are refused to other users, and the JSON gateway
//! takes the token in its `Authorization` header.
//!
//! The etcdctl test needs `etcdctl` (`apt-get install -y etcd-client`,
//! which `.ci/run` does): with CI=true a missing etcdctl fails it;
//! elsewhere it is skipped with a printed reason.

mod common;

use common::{etcd_channel, etcdctl_available, TestCluster};
use keel_etcd_proto::authpb;
use keel_etcd_proto::etcdserverpb::auth_client::AuthClient;
use keel_etcd_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::lease_client::LeaseClient;
use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_etcd_proto::etcdserverpb::watch_client::WatchClient;
use keel_etcd_proto::etcdserverpb::*;
use keel_etcd_proto::v3lockpb::lock_client::LockClient;
use keel_etcd_proto::v3lockpb::{LockRequest, UnlockRequest};
use std::process::{Command, Output};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// etcdctl at `endpoints`, as `user` ("name:password") if given.
fn etcdctl(endpoints: &str, user: Option<&str>, args: &[&str]) -> Output {
    etcdctl_in(endpoints, user, args, "")
}

/// `etcdctl` with `stdin` as its input.
fn etcdctl_in(endpoints: &str, user: Option<&str>, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--command-timeout=15s");
    if let Some(user) = user {
        cmd.arg(format!("--user={user}"));
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("etcdctl's input");
    child.wait_with_output().expect("etcdctl's output")
}

/// etcdctl's stdout; panics with its stderr if it failed.
fn ok(endpoints: &str, user: Option<&str>, args: &[&str]) -> String {
    let out = etcdctl(endpoints, user, args);
    assert!(
        out.status.success(),
        "etcdctl {args:?} as {user:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// etcdctl's stderr, which must say `why`; panics if it succeeded.
fn refused(endpoints: &str, user: Option<&str>, args: &[&str], why: &str) {
    let out = etcdctl(endpoints, user, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "etcdctl {args:?} as {user:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(why),
        "etcdctl {args:?} as {user:?}: expected {why:?}, got {stderr}"
    );
}

#[test]
fn etcdctl_users_roles_and_permissions() {
    if !etcdctl_available() {
        return;
    }
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(20));
    let all: Vec<String> = c.nodes.iter().map(|n| n.etcd.clone()).collect();
    let all = all.join(",");
    let root = Some("root:rootpw");
    let alice = Some("alice:alicepw");

    // Before auth is on anyone manages users; enable needs a root user.
    refused(&all, None, &["auth", "enable"], "root user does not exist");
    assert!(ok(&all, None, &["user", "add", "root:rootpw"]).contains("User root created"));
    assert!(ok(&all, None, &["role", "add", "reader"]).contains("Role reader created"));
    assert!(ok(&all, None, &["user", "add", "alice:alicepw"]).contains("User alice created"));
    ok(
        &all,
        None,
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "app/",
            "--prefix",
        ],
    );
    ok(&all, None, &["user", "grant-role", "alice", "reader"]);
    refused(
        &all,
        None,
        &["user", "add", "alice:again"],
        "user name already exists",
    );
    refused(
        &all,
        None,
        &["user", "grant-role", "alice", "nosuch"],
        "role name not found",
    );
    // etcdctl adds the root role and grants it to root when enable asks.
    assert!(ok(&all, None, &["auth", "enable"]).contains("Authentication Enabled"));

    // Without a user: refused, as etcd refuses it.
    refused(&all, None, &["get", "app/x"], "user name is empty");
    refused(
        &all,
        Some("root:wrong"),
        &["get", "app/x"],
        "authentication failed",
    );

    // Root may do anything; alice may read app/ only.
    ok(&all, root, &["put", "app/x", "1"]);
    ok(&all, root, &["put", "secret", "s"]);
    assert_eq!(ok(&all, alice, &["get", "app/x"]), "app/x\n1\n");
    assert_eq!(
        ok(&all, alice, &["get", "app/", "--prefix", "--keys-only"]).trim(),
        "app/x"
    );
    refused(&all, alice, &["put", "app/y", "2"], "permission denied");
    refused(&all, alice, &["get", "secret"], "permission denied");
    refused(&all, alice, &["get", "", "--prefix"], "permission denied");
    refused(&all, alice, &["user", "list"], "permission denied");
    let one = &c.nodes[0].etcd;
    refused(
        one,
        alice,
        &["snapshot", "save", "/dev/null"],
        "permission denied",
    );
    refused(&all, alice, &["member", "remove", "2"], "permission denied");
    // Each member checks it (a follower answers serializable reads itself).
    for ep in &c.nodes {
        refused(
            &ep.etcd,
            alice,
            &["get", "secret", "--consistency=s"],
            "permission denied",
        );
        assert_eq!(
            ok(&ep.etcd, alice, &["get", "app/x", "--consistency=s"]),
            "app/x\n1\n"
        );
    }

    // A wider grant takes effect at once.
    ok(
        &all,
        root,
        &[
            "role",
            "grant-permission",
            "reader",
            "readwrite",
            "app/",
            "--prefix",
        ],
    );
    ok(&all, alice, &["put", "app/y", "2"]);
    let role = ok(&all, root, &["role", "get", "reader"]);
    assert!(
        role.contains("KV Read:") && role.contains("KV Write:"),
        "{role}"
    );
    // A txn touching a key outside the grant is refused whole.
    let out = etcdctl_in(
        &all,
        alice,
        &["txn"],
        "\nput app/z 3\nput secret hacked\n\n\n",
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    assert_eq!(
        ok(&all, root, &["get", "secret", "--print-value-only"]),
        "s\n"
    );
    assert_eq!(
        ok(&all, root, &["get", "app/z"]),
        "",
        "nothing of the txn ran"
    );

    // Users and roles as etcdctl lists them.
    assert_eq!(ok(&all, root, &["user", "list"]), "alice\nroot\n");
    assert_eq!(ok(&all, root, &["role", "list"]), "reader\nroot\n");
    let user = ok(&all, root, &["user", "get", "alice"]);
    assert!(
        user.contains("User: alice") && user.contains("reader"),
        "{user}"
    );
    refused(
        &all,
        root,
        &["user", "delete", "root"],
        "invalid auth management",
    );

    // A new password ends the old one.
    let out = etcdctl_in(
        &all,
        root,
        &["user", "passwd", "alice", "--interactive=false"],
        "newpw\n",
    );
    assert!(out.status.success(), "{out:?}");
    refused(&all, alice, &["get", "app/x"], "authentication failed");
    let alice = Some("alice:newpw");
    assert_eq!(ok(&all, alice, &["get", "app/x"]), "app/x\n1\n");

    // A revoked role takes its permissions with it.
    ok(&all, root, &["user", "revoke-role", "alice", "reader"]);
    refused(&all, alice, &["get", "app/x"], "permission denied");

    // Off again: anyone, as before.
    assert!(ok(&all, root, &["auth", "disable"]).contains("Authentication Disabled"));
    assert_eq!(
        ok(&all, None, &["get", "secret", "--print-value-only"]),
        "s\n"
    );
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("token", token.parse().expect("token as metadata"));
    r
}

async fn login(ch: &Channel, name: &str, password: &str) -> Result<String, tonic::Status> {
    AuthClient::new(ch.clone())
        .authenticate(AuthenticateRequest {
            name: name.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

async fn get(ch: &Channel, token: &str, key: &str) -> Result<RangeResponse, tonic::Status> {
    KvClient::new(ch.clone())
        .range(with_token(
            RangeRequest {
                key: key.to_string().into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn put(ch: &Channel, token: &str, key: &str, value: &str) -> Result<(), tonic::Status> {
    KvClient::new(ch.clone())
        .put(with_token(
            PutRequest {
                key: key.to_string().into(),
                value: value.to_string().into(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map(|_| ())
}

/// Sets up root (admin) and bob (read-write on `bob/`), then enables auth.
async fn set_up(ch: &Channel) {
    let mut auth = AuthClient::new(ch.clone());
    for (name, password) in [("root", "rootpw"), ("bob", "bobpw")] {
        auth.user_add(AuthUserAddRequest {
            name: name.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .expect("user add");
    }
    for role in ["root", "bobs"] {
        auth.role_add(AuthRoleAddRequest { name: role.into() })
            .await
            .expect("role add");
    }
    auth.role_grant_permission(AuthRoleGrantPermissionRequest {
        name: "bobs".into(),
        perm: Some(authpb::Permission {
            perm_type: authpb::permission::Type::Readwrite as i32,
            key: "bob/".into(),
            range_end: "bob0".into(),
        }),
    })
    .await
    .expect("grant permission");
    for (user, role) in [("root", "root"), ("bob", "bobs")] {
        auth.user_grant_role(AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        })
        .await
        .expect("grant role");
    }
    auth.auth_enable(AuthEnableRequest {})
        .await
        .expect("auth enable");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn tokens_work_at_every_member_and_after_a_restart() {
    let mut c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(20));
    runtime().block_on(tokens_at_every_member(&mut c));
}

async fn tokens_at_every_member(c: &mut TestCluster) {
    let ch: Vec<Channel> = {
        let mut v = Vec::new();
        for n in &c.nodes {
            v.push(etcd_channel(&n.etcd).await);
        }
        v
    };
    set_up(&ch[0]).await;

    // Status says so; the auth revision counts the changes.
    let st = AuthClient::new(ch[2].clone())
        .auth_status(AuthStatusRequest {})
        .await
        .expect("auth status")
        .into_inner();
    assert!(st.enabled, "{st:?}");
    assert!(st.auth_revision >= 8, "{st:?}");

    // A token from member 1 works at members 2 and 3.
    let bob = login(&ch[0], "bob", "bobpw").await.expect("login");
    for m in &ch {
        put(m, &bob, "bob/k", "v").await.expect("put as bob");
        let r = get(m, &bob, "bob/k").await.expect("get as bob");
        assert_eq!(r.kvs.len(), 1);
        let e = put(m, &bob, "other", "v").await.expect_err("outside bob/");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert_eq!(e.message(), "etcdserver: permission denied");
    }

    // No token, a forged one, a wrong password.
    let e = KvClient::new(ch[1].clone())
        .range(RangeRequest {
            key: "bob/k".into(),
            ..Default::default()
        })
        .await
        .expect_err("no token");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(e.message(), "etcdserver: user name is empty");
    let forged = bob.replacen("626f62", "726f6f74", 1); // "bob" -> "root"
    let e = get(&ch[1], &forged, "bob/k")
        .await
        .expect_err("forged token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(e.message(), "etcdserver: invalid auth token");
    let e = login(&ch[1], "bob", "nope")
        .await
        .expect_err("wrong password");
    assert_eq!(
        e.message(),
        "etcdserver: authentication failed, invalid user ID or password"
    );

    // A watch outside bob/ is refused with the reason; inside it runs.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut watch = WatchClient::new(ch[2].clone())
        .watch(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &bob,
        ))
        .await
        .expect("watch")
        .into_inner();
    for key in ["other", "bob/"] {
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: key.to_string().into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("send");
        let r = watch.message().await.expect("watch answer").expect("open");
        assert!(r.created, "{r:?}");
        if key == "other" {
            assert!(r.canceled, "{r:?}");
            // etcd's words, and the id asked for.
            assert_eq!(
                r.cancel_reason,
                "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
            );
            assert_eq!(r.watch_id, 0);
        } else {
            assert!(!r.canceled, "{r:?}");
        }
    }

    // Admin calls are refused to bob, taken from root.
    let root = login(&ch[1], "root", "rootpw").await.expect("root login");
    let e = AuthClient::new(ch[1].clone())
        .user_list(with_token(AuthUserListRequest {}, &bob))
        .await
        .expect_err("bob lists users");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = MaintenanceClient::new(ch[1].clone())
        .hash_kv(with_token(HashKvRequest { revision: 0 }, &bob))
        .await
        .expect_err("bob hashes");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = ClusterClient::new(ch[1].clone())
        .member_remove(with_token(MemberRemoveRequest { id: 3 }, &bob))
        .await
        .expect_err("bob removes a member");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let users = AuthClient::new(ch[1].clone())
        .user_list(with_token(AuthUserListRequest {}, &root))
        .await
        .expect("root lists users")
        .into_inner()
        .users;
    assert_eq!(users, ["bob", "root"]);
    // Bob may look at himself.
    let me = AuthClient::new(ch[2].clone())
        .user_get(with_token(AuthUserGetRequest { name: "bob".into() }, &bob))
        .await
        .expect("bob gets bob")
        .into_inner();
    assert_eq!(me.roles, ["bobs"]);

    // The users, roles and the token secret are replicated state: a
    // restarted member checks the same token.
    c.kill(3);
    c.spawn(3);
    let ch3 = etcd_channel(&c.nodes[2].etcd).await;
    let mut served = None;
    for _ in 0..100 {
        match get(&ch3, &bob, "bob/k").await {
            Ok(r) => {
                served = Some(r);
                break;
            }
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("after restart: {e:?}"),
        }
    }
    assert_eq!(served.expect("member 3 back").kvs.len(), 1);
    // And refuses what comes without one, linearizable or not.
    for serializable in [false, true] {
        let e = KvClient::new(ch3.clone())
            .range(RangeRequest {
                key: "bob/k".into(),
                serializable,
                ..Default::default()
            })
            .await
            .expect_err("no token at the restarted member");
        assert_eq!(e.message(), "etcdserver: user name is empty", "{e:?}");
    }

    // The Lock service runs its requests for bob under bob/ (the
    // recipe's own reads and writes are not refused), not elsewhere.
    let mut locks = LockClient::new(ch[1].clone());
    let held = locks
        .lock(with_token(
            LockRequest {
                name: "bob/lock".into(),
                lease: 0,
            },
            &bob,
        ))
        .await
        .expect("bob locks bob/lock")
        .into_inner();
    assert!(held.key.starts_with(b"bob/lock/"), "{held:?}");
    locks
        .unlock(with_token(UnlockRequest { key: held.key }, &bob))
        .await
        .expect("bob unlocks");
    let e = locks
        .lock(with_token(
            LockRequest {
                name: "other".into(),
                lease: 0,
            },
            &bob,
        ))
        .await
        .expect_err("bob locks other");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // A lease's keys are shown only to a caller who may read them all.
    let lease = LeaseClient::new(ch[0].clone())
        .lease_grant(with_token(LeaseGrantRequest { ttl: 60, id: 0 }, &bob))
        .await
        .expect("bob grants a lease")
        .into_inner()
        .id;
    for (key, token) in [("bob/leased", &bob), ("other", &root)] {
        KvClient::new(ch[0].clone())
            .put(with_token(
                PutRequest {
                    key: key.to_string().into(),
                    lease,
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect("put with the lease");
    }
    let ttl = |token: String| {
        let ch = ch[2].clone();
        async move {
            LeaseClient::new(ch)
                .lease_time_to_live(with_token(
                    LeaseTimeToLiveRequest {
                        id: lease,
                        keys: true,
                    },
                    &token,
                ))
                .await
        }
    };
    let e = ttl(bob.clone()).await.expect_err("bob sees other's name");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let keys = ttl(root.clone()).await.expect("root").into_inner().keys;
    assert_eq!(keys.len(), 2, "{keys:?}");

    // A changed password ends the tokens issued under the old one.
    AuthClient::new(ch[0].clone())
        .user_change_password(with_token(
            AuthUserChangePasswordRequest {
                name: "bob".into(),
                password: "new".into(),
                ..Default::default()
            },
            &root,
        ))
        .await
        .expect("change password");
    let e = get(&ch[0], &bob, "bob/k").await.expect_err("old token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let bob = login(&ch[1], "bob", "new").await.expect("login again");
    get(&ch[1], &bob, "bob/k").await.expect("new token");
}

/// The JSON gateway takes the token in the `Authorization` header.
#[test]
fn the_gateway_takes_the_token_in_its_authorization_header() {
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(20));
    runtime().block_on(gateway_token(&c));
}

async fn gateway_token(c: &TestCluster) {
    let ch = etcd_channel(&c.nodes[0].etcd).await;
    set_up(&ch).await;
    let bob = login(&ch, "bob", "bobpw").await.expect("login");
    put(&ch, &bob, "bob/k", "v").await.expect("put");
    let post = |path: &str, token: Option<&str>, body: &str| {
        let headers: Vec<(&str, &str)> = token.map(|t| ("Authorization", t)).into_iter().collect();
        common::http_request_with(&c.nodes[0].etcd, "POST", path, &headers, body)
    };
    // "bob/k" and "other" in base64.
    let (status, body) = post("/v3/kv/range", Some(&bob), r#"{"key":"Ym9iL2s="}"#);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""value":"dg==""#), "{body}");
    let (status, body) = post("/v3/kv/range", Some(&bob), r#"{"key":"b3RoZXI="}"#);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("permission denied"), "{body}");
    let (status, body) = post("/v3/kv/range", None, r#"{"key":"Ym9iL2s="}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("user name is empty"), "{body}");
    // /health needs no user (it reads no keys), as etcd's.
    let (status, body) = common::http_get(&c.nodes[0].etcd, "/health");
    assert_eq!((status, body.as_str()), (200, r#"{"health":"true"}"#));
    // Logging in through the gateway gives a token gRPC takes.
    let (status, body) = post(
        "/v3/auth/authenticate",
        None,
        r#"{"name":"bob","password":"bobpw"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let token = v["token"].as_str().expect("token");
    get(&ch, token, "bob/k")
        .await
        .expect("gateway token over gRPC");
}

/// What one etcdctl run showed: whether it succeeded, its output, and its
/// `Error:` lines (etcdctl's stderr also logs retries, naming endpoints).
#[derive(Debug, PartialEq, Eq)]
struct Shown {
    ok: bool,
    stdout: String,
    errors: Vec<String>,
}

fn shown(out: Output) -> Shown {
    let stderr = String::from_utf8_lossy(&out.stderr);
    Shown {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        errors: stderr
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .map(str::to_string)
            .collect(),
    }
}

/// The same etcdctl session against etcd 3.4 and Keel shows the same:
/// users, roles and permissions as etcdctl prints them, and every refusal
/// with etcd's words. `KEEL_DIFF_VERBOSE=1` prints each step with what
/// etcd showed.
#[test]
fn etcdctl_auth_matches_etcd() {
    if !etcdctl_available() {
        return;
    }
    let Some(bin) = common::etcd_or_skip("etcdctl_auth_matches_etcd") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = common::EtcdProc::start(&bin, dir.path());
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(20));
    let keel: Vec<String> = c.nodes.iter().map(|n| n.etcd.clone()).collect();
    let keel = keel.join(",");
    // etcd answers once it has elected itself.
    let start = std::time::Instant::now();
    while !etcdctl(&etcd.client, None, &["put", "ready", "1"])
        .status
        .success()
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "etcd did not start: {}",
            etcd.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let root = Some("root:rootpw");
    let alice = Some("alice:alicepw");
    let steps: &[(Option<&str>, &[&str], &str)] = &[
        (None, &["auth", "enable"], ""),
        (None, &["user", "add", "root:rootpw"], ""),
        (None, &["user", "add", "root:other"], ""),
        (None, &["user", "add", "alice:alicepw"], ""),
        (None, &["user", "add", "nopass", "--no-password"], ""),
        (None, &["role", "add", "reader"], ""),
        (None, &["role", "add", "reader"], ""),
        (
            None,
            &[
                "role",
                "grant-permission",
                "reader",
                "read",
                "app/",
                "--prefix",
            ],
            "",
        ),
        (
            None,
            &["role", "grant-permission", "reader", "write", "app/b"],
            "",
        ),
        (
            None,
            &[
                "role",
                "grant-permission",
                "reader",
                "readwrite",
                "k1",
                "k5",
            ],
            "",
        ),
        (
            None,
            &["role", "grant-permission", "reader", "readwrite", "app/b"],
            "",
        ),
        (None, &["role", "get", "reader"], ""),
        (None, &["role", "revoke-permission", "reader", "app/b"], ""),
        (None, &["role", "revoke-permission", "reader", "app/b"], ""),
        (None, &["role", "revoke-permission", "nosuch", "x"], ""),
        (None, &["role", "get", "nosuch"], ""),
        (None, &["user", "grant-role", "alice", "reader"], ""),
        (None, &["user", "grant-role", "alice", "nosuch"], ""),
        (None, &["user", "grant-role", "bob", "reader"], ""),
        (None, &["user", "revoke-role", "alice", "nosuch"], ""),
        (None, &["user", "get", "alice"], ""),
        (None, &["user", "get", "bob"], ""),
        (None, &["user", "list"], ""),
        (None, &["role", "list"], ""),
        (None, &["auth", "enable"], ""),
        (None, &["auth", "enable"], ""),
        (None, &["get", "app/x"], ""),
        (Some("root:wrong"), &["get", "app/x"], ""),
        (Some("nopass:"), &["get", "app/x"], ""),
        (root, &["put", "app/x", "1"], ""),
        (root, &["put", "secret", "s"], ""),
        (root, &["put", "k2", "v"], ""),
        (alice, &["get", "app/x"], ""),
        (alice, &["get", "app/", "--prefix"], ""),
        (alice, &["get", "secret"], ""),
        (alice, &["get", "k1", "k5"], ""),
        (alice, &["get", "k1", "k6"], ""),
        (alice, &["put", "k3", "v"], ""),
        (alice, &["put", "app/y", "v"], ""),
        (alice, &["del", "app/x"], ""),
        (alice, &["del", "k1", "k5"], ""),
        (alice, &["txn"], "\nput k4 v\n\nput secret x\n\n"),
        (alice, &["user", "list"], ""),
        (alice, &["user", "get", "alice"], ""),
        (alice, &["user", "get", "root"], ""),
        (alice, &["role", "get", "reader"], ""),
        (alice, &["role", "add", "mine"], ""),
        (alice, &["auth", "disable"], ""),
        (root, &["user", "delete", "root"], ""),
        (root, &["role", "delete", "root"], ""),
        (root, &["user", "revoke-role", "root", "root"], ""),
        (root, &["user", "get", "root"], ""),
        (root, &["role", "delete", "reader"], ""),
        (alice, &["get", "app/x"], ""),
        (root, &["user", "delete", "alice"], ""),
        (alice, &["get", "app/x"], ""),
        (root, &["auth", "disable"], ""),
        (None, &["get", "secret"], ""),
        (None, &["auth", "disable"], ""),
        (None, &["user", "list"], ""),
    ];
    let mut differ = Vec::new();
    for (i, (user, args, stdin)) in steps.iter().enumerate() {
        let want = shown(etcdctl_in(&etcd.client, *user, args, stdin));
        let got = shown(etcdctl_in(&keel, *user, args, stdin));
        if std::env::var_os("KEEL_DIFF_VERBOSE").is_some() {
            eprintln!("step {i}: etcdctl {args:?} as {user:?}: {want:?}");
        }
        if want != got {
            differ.push(format!(
                "step {i}: etcdctl {args:?} as {user:?}\n  etcd: {want:?}\n  keel: {got:?}"
            ));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}

/// Users and roles are added only while every member serves Auth: one that
/// does not answer (stopped here; a node of an older Keel would answer
/// Unimplemented) would miss their log entries.
#[test]
fn the_first_user_waits_for_every_member() {
    let mut c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(20));
    c.kill(3);
    runtime().block_on(async {
        let ch = etcd_channel(&c.nodes[0].etcd).await;
        let add = || {
            let ch = ch.clone();
            async move {
                AuthClient::new(ch)
                    .user_add(AuthUserAddRequest {
                        name: "root".into(),
                        password: "pw".into(),
                        ..Default::default()
                    })
                    .await
            }
        };
        let e = add().await.expect_err("member 3 is down");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("every member") && e.message().contains("member 3"),
            "{e:?}"
        );
        assert!(add().await.is_err());
    });
    c.spawn(3);
    runtime().block_on(async {
        let ch = etcd_channel(&c.nodes[0].etcd).await;
        let mut added = None;
        for _ in 0..100 {
            let r = AuthClient::new(ch.clone())
                .user_add(AuthUserAddRequest {
                    name: "root".into(),
                    password: "pw".into(),
                    ..Default::default()
                })
                .await;
            if r.is_ok() {
                added = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(added.is_some(), "user add once member 3 is back");
        // From then on nothing is asked: it is in use.
        let users = AuthClient::new(ch.clone())
            .user_list(AuthUserListRequest {})
            .await
            .expect("list")
            .into_inner()
            .users;
        assert_eq!(users, ["root"]);
    });
}

/// A watch opened without a token while auth was off is canceled, with
/// etcd's reason, once auth is turned on, before it gets any event written
/// after (where etcd would keep it).
#[test]
fn a_watch_from_before_auth_ends_when_auth_comes_on() {
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(20));
    runtime().block_on(async {
        let ch = etcd_channel(&c.nodes[0].etcd).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut watch = WatchClient::new(ch.clone())
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: "k".into(),
                    watch_id: 7,
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("send");
        let created = watch.message().await.expect("answer").expect("open");
        assert!(created.created && !created.canceled, "{created:?}");
        set_up(&ch).await;
        let root = login(&ch, "root", "rootpw").await.expect("root login");
        put(&ch, &root, "k", "after").await.expect("put as root");
        let r = watch.message().await.expect("answer").expect("open");
        assert!(r.canceled && r.events.is_empty(), "{r:?}");
        assert_eq!(r.watch_id, 7);
        assert_eq!(
            r.cancel_reason,
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        );
    });
}
