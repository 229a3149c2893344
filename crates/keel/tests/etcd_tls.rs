//! The etcd API over TLS with client certificate authentication (etcd's
//! `--cert-file`, `--key-file`, `--trusted-ca-file`, `--client-cert-auth`)
//! on a 3-node cluster, certificates made here by rcgen: gRPC with a client
//! certificate works on every member, including a request a follower passes
//! on to the leader over TLS; no certificate, one from another CA, or plain
//! TCP are refused; HTTP/1.1 over TLS (ALPN `http/1.1`) answers `/health`;
//! etcdctl works with `--cacert`, `--cert` and `--key` (with CI=true a
//! missing etcdctl fails the test; elsewhere that part is skipped). A node
//! given an incomplete set of TLS files refuses to start, saying why. A
//! certificate replaced on disk is served without a restart.

mod common;

use common::{etcdctl_available, https_get, keel, tls_files, TestCluster, TlsFiles};
use keel_etcd_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::{MemberRemoveRequest, PutRequest, RangeRequest};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A channel to `addr` over TLS, with the client certificate `cert`/`key`
/// if given; the connection error if it fails.
async fn channel(
    files: &TlsFiles,
    addr: &str,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Channel, tonic::transport::Error> {
    channel_trusting(&files.ca, addr, identity).await
}

/// `channel`, trusting the CA in `ca`.
async fn channel_trusting(
    ca: &std::path::Path,
    addr: &str,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |p: &std::path::Path| std::fs::read(p).expect("read PEM");
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert), read(key)));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A put through `ch`: Ok, or the gRPC status.
async fn put(ch: Channel, key: &str) -> Result<(), tonic::Status> {
    KvClient::new(ch)
        .put(PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: b"v".to_vec().into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[test]
fn etcd_api_over_tls_with_client_certificates() {
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(certs_dir.path());
    let c = TestCluster::start(3, &files.config(true));
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let follower = if leader == 1 { 2 } else { 1 };
    let addr = |id: u64| c.nodes[(id - 1) as usize].etcd.clone();
    let client = Some((files.client_cert.as_path(), files.client_key.as_path()));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        // Every member answers a client with a certificate from the CA
        // (the node may still be binding: retry the first connection).
        for id in 1..=3 {
            let mut tries = 0;
            let ch = loop {
                match channel(&files, &addr(id), client).await {
                    Ok(ch) => break ch,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let _ = e;
                    }
                    Err(e) => panic!("member {id}: {e:?}"),
                }
            };
            put(ch.clone(), &format!("k{id}"))
                .await
                .unwrap_or_else(|e| panic!("put through member {id}: {e}"));
            let got = KvClient::new(ch)
                .range(RangeRequest {
                    key: format!("k{id}").into_bytes().into(),
                    ..Default::default()
                })
                .await
                .expect("range");
            assert_eq!(got.into_inner().count, 1);
        }
        // A follower passes cluster changes to the leader over TLS: an
        // unknown member gets the leader's answer, not "unreachable".
        let ch = channel(&files, &addr(follower), client)
            .await
            .expect("connect");
        let e = ClusterClient::new(ch)
            .member_remove(MemberRemoveRequest { id: 0xdead })
            .await
            .expect_err("removing an unknown member");
        assert!(
            !e.message().contains("unreachable") && !e.message().contains("TLS"),
            "{e:?}"
        );
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

        // Refused: no client certificate, another CA's, plain TCP.
        let refused = |r: Result<(), String>, what: &str| {
            assert!(r.is_err(), "{what} was served");
        };
        let no_cert = match channel(&files, &addr(leader), None).await {
            Ok(ch) => put(ch, "x").await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        refused(no_cert, "a client without a certificate");
        let rogue = Some((files.rogue_cert.as_path(), files.rogue_key.as_path()));
        let rogue = match channel(&files, &addr(leader), rogue).await {
            Ok(ch) => put(ch, "x").await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        refused(rogue, "a client certificate from another CA");
        let plain = match Channel::from_shared(format!("http://{}", addr(leader)))
            .expect("url")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await
        {
            Ok(ch) => put(ch, "x").await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        refused(plain, "plain TCP");

        // HTTP/1.1 over TLS.
        let client = Some((files.client_cert.as_path(), files.client_key.as_path()));
        let health = https_get(&files.ca, client, &addr(follower), "/health")
            .await
            .expect("GET /health over TLS");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.ends_with(r#"{"health":"true"}"#), "{health}");
    });

    if etcdctl_available() {
        let endpoints: Vec<String> = (1..=3).map(|id| format!("https://{}", addr(id))).collect();
        let etcdctl = |args: &[&str], with_cert: bool| {
            let mut cmd = std::process::Command::new("etcdctl");
            cmd.env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", endpoints.join(",")))
                .arg(format!("--cacert={}", files.ca.display()))
                .arg("--command-timeout=10s")
                .arg("--dial-timeout=3s");
            if with_cert {
                cmd.arg(format!("--cert={}", files.client_cert.display()))
                    .arg(format!("--key={}", files.client_key.display()));
            }
            cmd.args(args).output().expect("run etcdctl")
        };
        let out = etcdctl(&["put", "tls-key", "over-tls"], true);
        assert!(out.status.success(), "{out:?}");
        let out = etcdctl(&["get", "tls-key", "--print-value-only"], true);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over-tls");
        let out = etcdctl(&["endpoint", "health"], true);
        assert!(out.status.success(), "{out:?}");
        let out = etcdctl(&["get", "tls-key"], false);
        assert!(!out.status.success(), "served without a client certificate");
    }
}

/// A member's certificate replaced on disk (by one from another CA) is
/// what clients connecting afterwards are shown, without a restart.
#[test]
fn a_certificate_replaced_on_disk_is_served_without_a_restart() {
    let certs_dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(certs_dir.path());
    let c = TestCluster::start(1, &files.config(true));
    c.wait_for_leader(Duration::from_secs(10));
    let addr = c.nodes[0].etcd.clone();
    let client = Some((files.client_cert.as_path(), files.client_key.as_path()));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // A put through a new connection trusting `ca`: Ok, or why not.
    let put_trusting = |ca: &std::path::Path| {
        rt.block_on(async {
            match channel_trusting(ca, &addr, client).await {
                Ok(ch) => put(ch, "k").await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("{e:?}")),
            }
        })
    };
    let start = std::time::Instant::now();
    while let Err(e) = put_trusting(&files.ca) {
        // (The node may still be binding.)
        assert!(start.elapsed() < Duration::from_secs(10), "{e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    files.rotate_server_to_rogue_ca();
    let start = std::time::Instant::now();
    while let Err(e) = put_trusting(&files.rogue_ca) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new certificate was not served: {e}{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        put_trusting(&files.ca).is_err(),
        "the old certificate is still served"
    );
    c.wait_log(1, "changed: loaded again", "the node said it loaded them");
    if etcdctl_available() {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://{addr}"))
            .arg(format!("--cacert={}", files.rogue_ca.display()))
            .arg(format!("--cert={}", files.client_cert.display()))
            .arg(format!("--key={}", files.client_key.display()))
            .args(["--command-timeout=10s", "put", "rotated", "yes"])
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "{out:?}");
    }
}

#[test]
fn incomplete_tls_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let (code, text) = keel([
        "server",
        "--id",
        "1",
        "--data-dir",
        dir.path().join("data").to_str().expect("path"),
        "--peer-addr",
        "127.0.0.1:0",
        "--client-addr",
        "127.0.0.1:0",
        "--etcd-addr",
        "127.0.0.1:0",
        "--service",
        "kv",
        "--etcd-cert-file",
        files.server_cert.to_str().expect("path"),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("etcd_trusted_ca_file"), "{text}");
    // A key that does not belong to the certificate: named, not a panic.
    let (code, text) = keel([
        "server",
        "--id",
        "1",
        "--data-dir",
        dir.path().join("data2").to_str().expect("path"),
        "--peer-addr",
        "127.0.0.1:0",
        "--client-addr",
        "127.0.0.1:0",
        "--etcd-addr",
        "127.0.0.1:0",
        "--service",
        "kv",
        "--etcd-cert-file",
        files.server_cert.to_str().expect("path"),
        "--etcd-key-file",
        files.ca.to_str().expect("path"),
        "--etcd-trusted-ca-file",
        files.ca.to_str().expect("path"),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("etcd_key_file"), "{text}");
    // A key that parses but belongs to another certificate (the client's):
    // refused before the node starts, so nothing is written to its data
    // directory.
    let data3 = dir.path().join("data3");
    let (code, text) = keel([
        "server",
        "--id",
        "1",
        "--data-dir",
        data3.to_str().expect("path"),
        "--peer-addr",
        "127.0.0.1:0",
        "--client-addr",
        "127.0.0.1:0",
        "--etcd-addr",
        "127.0.0.1:0",
        "--service",
        "kv",
        "--etcd-cert-file",
        files.server_cert.to_str().expect("path"),
        "--etcd-key-file",
        files.client_key.to_str().expect("path"),
        "--etcd-trusted-ca-file",
        files.ca.to_str().expect("path"),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("etcd_cert_file and etcd_key_file"), "{text}");
    let written: Vec<_> = std::fs::read_dir(&data3)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "the failed start wrote {written:?}");
}
