//! TLS on the native client port (`client_tls_cert_file`,
//! `client_tls_key_file`, and with `client_tls_trusted_ca_file` client
//! certificates) on a 3-node cluster of `keel server` processes,
//! certificates made here by rcgen: the `keel` command with `--cacert`,
//! `--cert` and `--key` writes and reads, and `cluster status` asks every
//! node; the client library does the same; a client without TLS, without
//! a certificate, or with one from another CA is refused, and the node's
//! log says why. Incomplete settings are refused at start.

mod common;

use common::{https_get, keel, tls_files, TestCluster, TlsFiles};
use keel_client::{Client, ClientOptions};
use keel_net::tls::ClientTls;
use std::path::Path;
use std::time::{Duration, Instant};

fn p(path: &Path) -> &str {
    path.to_str().expect("path")
}

/// The TOML lines that serve the client port over TLS, requiring client
/// certificates.
fn client_tls(files: &TlsFiles) -> String {
    format!(
        "client_tls_cert_file = {:?}\nclient_tls_key_file = {:?}\nclient_tls_trusted_ca_file = {:?}\n",
        files.server_cert, files.server_key, files.ca
    )
}

/// Waits until a node answers, over TLS, that it knows a leader.
fn wait_for_leader(c: &TestCluster, tls: &ClientTls) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let start = Instant::now();
    loop {
        let known = c.endpoints().iter().any(|e| {
            rt.block_on(Client::status_with(
                e,
                Duration::from_millis(500),
                Some(tls),
            ))
            .is_ok_and(|s| s.leader.is_some())
        });
        if known {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no leader over TLS{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_client_port_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let c = TestCluster::start(3, &client_tls(&files));
    let tls = ClientTls::load(&files.ca, Some((&files.client_cert, &files.client_key)))
        .expect("client TLS");
    wait_for_leader(&c, &tls);
    let with_tls = [
        "--cacert",
        p(&files.ca),
        "--cert",
        p(&files.client_cert),
        "--key",
        p(&files.client_key),
    ];
    let kv = |args: &[&str], tls: &[&str]| {
        let all: Vec<&str> = args.iter().chain(tls).copied().collect();
        c.keel_cli(&all)
    };
    let (code, out) = kv(&["kv", "put", "greeting", "hello"], &with_tls);
    assert_eq!(code, 0, "{out}");
    let (code, out) = kv(&["kv", "get", "greeting"], &with_tls);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("hello"), "{out}");
    let (code, out) = kv(&["cluster", "status"], &with_tls);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("leader"), "{out}");

    // The client library, with the same files.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut opts = ClientOptions::new(c.endpoints());
    opts.tls = Some(tls);
    let mut client = Client::new(opts).expect("client");
    let put = keel_kv::proto::Command::Put {
        key: "library".into(),
        value: "over TLS".into(),
    };
    rt.block_on(client.write(put.encode()))
        .expect("a write over TLS");

    // Refused: no TLS (the node names it), no client certificate, or one
    // from another CA.
    let (code, out) = kv(&["kv", "get", "greeting", "--timeout", "2"], &[]);
    assert_ne!(code, 0, "read without TLS: {out}");
    assert!(
        out.contains("answer TLS") && out.contains("--cacert"),
        "{out}"
    );
    c.wait_log(
        1,
        "not TLS, and client_addr takes only TLS",
        "a node said a client came without TLS",
    );
    let (code, out) = kv(
        &["kv", "get", "greeting", "--timeout", "2"],
        &["--cacert", p(&files.ca)],
    );
    assert_ne!(code, 0, "read without a client certificate: {out}");
    assert!(
        out.contains("TLS refused by") && out.contains("CertificateRequired"),
        "{out}"
    );
    // A write the nodes refuse at TLS was not applied, and is said so
    // (not "outcome unknown").
    let (code, out) = kv(
        &["kv", "put", "refused", "x", "--timeout", "5"],
        &["--cacert", p(&files.ca)],
    );
    assert_ne!(code, 0, "write without a client certificate: {out}");
    assert!(
        out.contains("TLS refused by") && !out.contains("outcome unknown"),
        "{out}"
    );
    let (code, out) = kv(
        &["kv", "get", "greeting", "--timeout", "2"],
        &[
            "--cacert",
            p(&files.ca),
            "--cert",
            p(&files.rogue_cert),
            "--key",
            p(&files.rogue_key),
        ],
    );
    assert_ne!(code, 0, "read with another CA's certificate: {out}");
    assert!(out.contains("UnknownCA"), "{out}");
    // A client that trusts another CA refuses the nodes.
    let (code, out) = kv(
        &["kv", "get", "greeting", "--timeout", "2"],
        &[
            "--cacert",
            p(&files.rogue_cert),
            "--cert",
            p(&files.client_cert),
            "--key",
            p(&files.client_key),
        ],
    );
    assert_ne!(code, 0, "trusted a node it should not: {out}");
    assert!(out.contains("UnknownIssuer"), "{out}");
    // (`--cert` without `--key`, or either without `--cacert`, is refused.)
    let (code, out) = kv(
        &["kv", "get", "greeting"],
        &["--cert", p(&files.client_cert)],
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("--cert needs --key"), "{out}");
    let (code, out) = kv(
        &["kv", "get", "greeting"],
        &[
            "--cert",
            p(&files.client_cert),
            "--key",
            p(&files.client_key),
        ],
    );
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("need --cacert"), "{out}");
}

/// The node's client-port certificate is replaced while it runs: a
/// certificate without its new key is refused with a warning and the old
/// pair stays in use; once both are written, new connections get the new
/// certificate (clients that trust only the old CA are refused).
#[test]
fn a_client_port_certificate_replaced_on_disk_is_taken_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let c = TestCluster::start(1, &client_tls(&files));
    let identity = Some((files.client_cert.as_path(), files.client_key.as_path()));
    let old_ca = ClientTls::load(&files.ca, identity).expect("client TLS");
    let new_ca = ClientTls::load(&files.rogue_ca, identity).expect("client TLS");
    wait_for_leader(&c, &old_ca);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = &c.endpoints()[0];
    let status = |tls: &ClientTls| {
        rt.block_on(Client::status_with(
            endpoint,
            Duration::from_secs(2),
            Some(tls),
        ))
    };
    // Half a rotation: the certificate (written whole), not yet its key.
    // (The node reads its files again every second.)
    let staged = files.server_cert.with_extension("new");
    std::fs::copy(&files.rogue_server_cert, &staged).expect("copy");
    std::fs::rename(&staged, &files.server_cert).expect("rename");
    let start = Instant::now();
    while !c
        .log_of(1)
        .contains("the certificates last loaded stay in use")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a certificate without its key was not refused{}",
            c.logs()
        );
        status(&old_ca).expect("the old certificate is still served");
        std::thread::sleep(Duration::from_millis(100));
    }
    status(&old_ca).expect("the old certificate is still served");
    assert!(status(&new_ca).is_err(), "the half-rotated pair was served");
    files.rotate_server_to_rogue_ca();
    let start = Instant::now();
    while let Err(e) = status(&new_ca) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new certificate was not served: {e}{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_log(1, "changed: loaded again", "the node said it loaded them");
    let e = status(&old_ca).expect_err("a client trusting the old CA only");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

/// `http_addr` over HTTPS with client certificates (`http_tls_*`):
/// /metrics and /status answer a client with a certificate from the CA; a
/// client without one gets nothing, and plain HTTP is told to use HTTPS;
/// a connection that says nothing is closed after the port's 10 s.
#[test]
fn http_addr_over_tls_with_client_certificates() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let extra = format!(
        "http_tls_cert_file = {:?}\nhttp_tls_key_file = {:?}\nhttp_tls_trusted_ca_file = {:?}\n",
        files.server_cert, files.server_key, files.ca
    );
    let (c, http) = TestCluster::start_with_http(1, &extra);
    let addr = &http[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = Some((files.client_cert.as_path(), files.client_key.as_path()));
    let get = |identity, path| rt.block_on(https_get(&files.ca, identity, addr, path));
    let start = Instant::now();
    let metrics = loop {
        match get(client, "/metrics") {
            Ok(m) => break m,
            // (The node may still be binding.)
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}{}", c.logs()),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut idle = std::net::TcpStream::connect(addr).expect("connect");
    let idle_since = Instant::now();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("keel_role"), "{metrics}");
    let status = get(client, "/status").expect("GET /status");
    assert!(
        status.starts_with("HTTP/1.1 200") && status.contains("\"role\""),
        "{status}"
    );
    // Refused: no client certificate; plain HTTP.
    let refused = get(None, "/metrics");
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRequired")),
        "{refused:?}"
    );
    let (code, body) = common::http_get(addr, "/metrics");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("takes only HTTPS"), "{body}");
    // Both refusals are counted.
    let metrics = get(client, "/metrics").expect("GET /metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_http_rejected_connections_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no refusal count: {metrics}"));
    assert!(refused >= 2, "{refused} refusals counted");
    // The silent connection is closed (no handshake within 10 s).
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let read = idle.read(&mut byte);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut),
        "{read:?}"
    );
    assert!(
        idle_since.elapsed() >= Duration::from_secs(9),
        "closed after {:?}",
        idle_since.elapsed()
    );
}

#[test]
fn incomplete_client_tls_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let server = |data: &str, tls: &[&str]| {
        let data = dir.path().join(data);
        let mut args = vec![
            "server",
            "--id",
            "1",
            "--data-dir",
            p(&data),
            "--peer-addr",
            "127.0.0.1:0",
            "--client-addr",
            "127.0.0.1:0",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(tls.iter().map(|s| s.to_string()));
        let out = keel(args);
        assert!(!data.exists(), "a refused start wrote its data directory");
        out
    };
    let (code, text) = server("a", &["--client-tls-cert-file", p(&files.server_cert)]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("client TLS needs both"), "{text}");
    let (code, text) = server("b", &["--client-tls-trusted-ca-file", p(&files.ca)]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("client_tls_trusted_ca_file needs client TLS"),
        "{text}"
    );
    let (code, text) = server(
        "c",
        &[
            "--client-tls-cert-file",
            p(&files.server_cert),
            "--client-tls-key-file",
            p(&files.client_key),
        ],
    );
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("client_tls_cert_file and client_tls_key_file"),
        "{text}"
    );
}
