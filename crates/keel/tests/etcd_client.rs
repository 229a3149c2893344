//! The `etcd-client` crate as a second real etcd client: starts a 3-node
//! cluster and runs the tests of the separate cargo project
//! `compat/etcd-client` against its etcd API endpoints (`KEEL_ETCD_ENDPOINTS`):
//! put/get/delete and ranges, txns, leases with keep-alive, revocation and
//! expiry, a watch through the leader that survives two leadership moves
//! (MoveLeader) with every event exactly once, in order, and the crate's
//! lock and election calls (etcd's Lock and Election services); and, on a
//! cluster of its own, its authentication (users, roles, `with_user`, and
//! its token refresh when auth is turned off and on).
//!
//! That project is not part of the workspace because etcd-client's build
//! script needs `protoc`; without it (and without `PROTOC`) this test is
//! skipped, or fails when `CI=true`. It builds into `target/compat`, so the
//! first run also compiles etcd-client and its dependencies.

mod common;

use common::TestCluster;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn protoc_available() -> bool {
    if std::env::var_os("PROTOC").is_some() {
        return true;
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("protoc").is_file()))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Runs the compat project's test binary `test` against a new 3-node
/// cluster (skipped without protoc, as the module says).
fn run_compat(test: &str) {
    if !protoc_available() {
        let msg = "protoc not found (etcd-client's build script needs it): \
                   apt-get install -y protobuf-compiler, or set PROTOC";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipping the etcd-client tests: {msg}");
        return;
    }
    let root = repo_root();
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(15));
    let endpoints: Vec<&str> = c.nodes.iter().map(|n| n.etcd.as_str()).collect();
    // Cargo tells tests where it is; else the one on PATH.
    let cargo = std::env::var("CARGO")
        .ok()
        .or_else(|| option_env!("CARGO").map(str::to_string))
        .unwrap_or_else(|| "cargo".to_string());
    let started = Instant::now();
    let out = Command::new(&cargo)
        .arg("test")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(root.join("compat/etcd-client/Cargo.toml"))
        .arg("--target-dir")
        .arg(root.join("target/compat"))
        .args(["--test", test])
        .args(["--", "--test-threads=1", "--nocapture"])
        .env("KEEL_ETCD_ENDPOINTS", endpoints.join(","))
        .output()
        .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "--- compat/etcd-client, tests/{test}.rs ({:.1?}, endpoints {}) ---\n{stdout}\n{stderr}",
        started.elapsed(),
        endpoints.join(",")
    );
    assert!(
        out.status.success(),
        "the etcd-client tests failed ({}); output above{}",
        out.status,
        c.logs()
    );
    assert!(
        stdout.contains("test result: ok"),
        "no test results in the output"
    );
}

#[test]
fn etcd_client_crate_works_against_keel() {
    run_compat("keel");
}

/// On a cluster of its own: it turns auth on.
#[test]
fn etcd_client_crate_authenticates_against_keel() {
    run_compat("auth");
}
