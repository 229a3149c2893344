//! The `etcd-client` crate's authentication against a running Keel
//! cluster of its own (`KEEL_ETCD_ENDPOINTS`; crates/keel/tests/etcd_client.rs
//! starts one just for this, since it turns auth on): users, roles and a
//! prefix permission set up through the crate, a client logged in with
//! `with_user` that may use its prefix only, a wrong password refused, and
//! the crate's automatic token refresh when auth is turned off and on
//! again (which makes every earlier token invalid).

use etcd_client::{Client, ConnectOptions, Permission};
use std::time::Duration;

fn endpoints() -> Vec<String> {
    let eps = std::env::var("KEEL_ETCD_ENDPOINTS").expect(
        "KEEL_ETCD_ENDPOINTS is not set: these tests run against a Keel cluster \
         (cargo test -p keel --test etcd_client starts one and runs them)",
    );
    eps.split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(10))
}

async fn connect_as(user: &str, password: &str) -> Result<Client, etcd_client::Error> {
    Client::connect(
        endpoints(),
        Some(
            options()
                .with_user(user, password)
                .with_auto_token_refresh(true),
        ),
    )
    .await
}

/// The message of a failed call's gRPC status.
fn status(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test]
async fn users_roles_permissions_and_token_refresh() {
    let mut open = Client::connect(endpoints(), Some(options()))
        .await
        .expect("connect");
    open.user_add("root", "rootpw", None).await.expect("add root");
    open.role_add("root").await.expect("add role root");
    open.user_grant_role("root", "root").await.expect("grant root");
    open.user_add("app", "apppw", None).await.expect("add app");
    open.role_add("app").await.expect("add role app");
    open.role_grant_permission("app", Permission::read_write("auth/").with_prefix())
        .await
        .expect("grant prefix");
    open.user_grant_role("app", "app").await.expect("grant app");
    open.auth_enable().await.expect("auth enable");

    // Without a user: refused as etcd refuses it.
    let e = status(open.get("auth/x", None).await.expect_err("no user"));
    assert_eq!(e, "etcdserver: user name is empty");
    // A wrong password: the connection's login fails.
    let Err(e) = connect_as("app", "wrong").await else {
        panic!("logged in with a wrong password");
    };
    assert!(
        e.to_string().contains("authentication failed"),
        "{e}"
    );

    let mut app = connect_as("app", "apppw").await.expect("app logs in");
    app.put("auth/x", "1", None).await.expect("app puts under auth/");
    let got = app.get("auth/x", None).await.expect("app gets");
    assert_eq!(got.kvs()[0].value(), b"1");
    let e = status(app.put("elsewhere", "1", None).await.expect_err("outside"));
    assert_eq!(e, "etcdserver: permission denied");

    // Auth off and on again: every earlier token is invalid; the crate
    // logs in again by itself on "invalid auth token" and retries.
    let mut root = connect_as("root", "rootpw").await.expect("root logs in");
    root.auth_disable().await.expect("auth disable");
    root.auth_enable().await.expect("auth enable again");
    let got = app.get("auth/x", None).await.expect("app after a refresh");
    assert_eq!(got.kvs()[0].value(), b"1");

    // Leave the cluster as it was found.
    let mut root = connect_as("root", "rootpw").await.expect("root again");
    root.auth_disable().await.expect("auth disable");
}
