//! Mutual TLS on the peer links (`peer_cert_file`, `peer_key_file`,
//! `peer_trusted_ca_file`) on a 3-node cluster of `keel server` processes,
//! certificates made here by rcgen: writes commit and survive the leader's
//! kill; a node restarted with a certificate from another CA, or without
//! peer TLS, gets no link, and the logs on both sides say why; back with
//! its certificate it catches up. Incomplete settings, and a certificate
//! the node's own trusted CA did not sign, are refused at start.

mod common;

use common::{keel, tls_files, TestCluster, TlsFiles};
use std::time::Duration;

/// The TOML lines that turn on peer TLS with `cert` and `key`, trusting
/// the cluster's CA.
fn peer_tls(files: &TlsFiles, cert: &std::path::Path, key: &std::path::Path) -> String {
    peer_tls_trusting(&files.ca, cert, key)
}

/// `peer_tls`, trusting the CA(s) in `ca`.
fn peer_tls_trusting(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    format!("peer_cert_file = {cert:?}\npeer_key_file = {key:?}\npeer_trusted_ca_file = {ca:?}\n")
}

/// A node that trusts the cluster's CA and another, with a certificate
/// from the other (a node checks that its own certificate is from a CA it
/// trusts): the cluster refuses it.
fn another_cas_node(files: &TlsFiles, dir: &std::path::Path) -> String {
    let both = dir.join("both-cas.pem");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("read PEM");
    std::fs::write(&both, read(&files.ca) + &read(&files.rogue_ca)).expect("write");
    peer_tls_trusting(&both, &files.rogue_server_cert, &files.rogue_server_key)
}

#[test]
fn a_cluster_replicates_over_peer_tls_and_refuses_nodes_without_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let good = peer_tls(&files, &files.server_cert, &files.server_key);
    let mut c = TestCluster::start(3, &good);
    c.wait_for_leader(Duration::from_secs(20));
    let mut client = c.client();
    for i in 0..20 {
        c.put(&mut client, &format!("before{i}"), "v");
    }
    for id in 1..=3 {
        for other in (1..=3).filter(|&o| o != id) {
            c.wait_log(
                id,
                &format!("link to node {other} up"),
                "a TLS link came up",
            );
        }
    }

    // Node 3 back with a certificate from another CA: nodes 1 and 2 dial
    // it (the lower id dials) and refuse its certificate.
    let config = c.node(3).config.clone();
    let text = std::fs::read_to_string(&config).expect("config");
    let rogue = text.replace(&good, &another_cas_node(&files, dir.path()));
    assert_ne!(rogue, text, "the configuration has no peer TLS lines");
    c.kill(3);
    std::fs::write(&config, &rogue).expect("write config");
    c.spawn(3);
    for id in 1..=2 {
        c.wait_log(
            id,
            "link to node 3 at",
            "a dialer said why the link is down",
        );
        c.wait_log(
            id,
            "TLS handshake failed: invalid peer certificate",
            "a dialer refused node 3's certificate",
        );
    }
    c.wait_log(
        3,
        "refused: TLS handshake failed",
        "node 3 saw its certificate refused",
    );
    // The other two go on without it, and it hears nothing.
    for i in 0..20 {
        c.put(&mut client, &format!("rogue{i}"), "v");
    }
    let s = c.status(3).expect("node 3's status");
    assert_eq!(s.leader, None, "node 3 heard a leader: {s:?}");

    // Node 3 without peer TLS: it refuses the TLS connections it is
    // dialed with, saying what came, and the dialers say it closed them.
    c.kill(3);
    std::fs::write(&config, text.replace(&good, "")).expect("write config");
    c.spawn(3);
    c.wait_log(
        3,
        "TLS on the peer port",
        "node 3 without TLS named the TLS connections it refused",
    );
    c.wait_log(
        1,
        "a node without peer TLS closes TLS connections",
        "node 1 said node 3 may be without TLS",
    );
    for i in 0..20 {
        c.put(&mut client, &format!("plain{i}"), "v");
    }

    // Back with its certificate, it catches up.
    c.kill(3);
    std::fs::write(&config, &text).expect("write config");
    c.spawn(3);
    let (leader, _) = c.wait_for_leader(Duration::from_secs(20));
    let commit = c.status(leader).expect("leader's status").commit;
    c.wait_applied(3, commit, Duration::from_secs(20));

    // Node 1 with a certificate from another CA: it dials the others, and
    // with TLS 1.3 its handshake is done before they check its
    // certificate, so their refusal comes as an alert on its first read.
    // That is said as such, not taken for a peer of an older protocol.
    let config1 = c.node(1).config.clone();
    let text1 = std::fs::read_to_string(&config1).expect("config");
    c.kill(1);
    std::fs::write(
        &config1,
        text1.replace(&good, &another_cas_node(&files, dir.path())),
    )
    .expect("write config");
    c.spawn(1);
    c.wait_log(
        1,
        "the peer ended the TLS connection",
        "node 1 said its certificate was refused",
    );
    c.wait_log(2, "refused: TLS handshake failed", "node 2 refused node 1");
    let stepped_down =
        |log: &str| log.contains("offering 5 next") || log.contains("refuses peer protocols");
    let log = c.log_of(1);
    assert!(
        !stepped_down(&log),
        "a TLS refusal was taken for an older peer protocol:\n{log}"
    );
    // Node 1 with a certificate from the cluster's CA that does not name
    // its peer address (the test's client certificate): the others take
    // the handshake, then close the connection at its hello, which node 1
    // says as a refusal, not as an older peer protocol.
    c.kill(1);
    std::fs::write(
        &config1,
        text1.replace(
            &good,
            &peer_tls(&files, &files.client_cert, &files.client_key),
        ),
    )
    .expect("write config");
    c.spawn(1);
    c.wait_log(
        2,
        "does not name the host of its peer address",
        "node 2 refused node 1's certificate by its name",
    );
    c.wait_log(
        1,
        "closes TLS connections after this node's hello without a word",
        "node 1 said the others refuse it",
    );
    let log = c.log_of(1);
    assert!(
        !stepped_down(&log),
        "a TLS refusal was taken for an older peer protocol:\n{log}"
    );
    c.kill(1);
    std::fs::write(&config1, &text1).expect("write config");
    c.spawn(1);

    // And the cluster survives its leader's kill over TLS.
    let (leader, _) = c.wait_for_leader(Duration::from_secs(20));
    c.kill(leader);
    c.wait_for_leader(Duration::from_secs(20));
    for i in 0..20 {
        c.put(&mut client, &format!("after{i}"), "v");
    }
    c.check_acked(&mut client);
}

#[test]
fn incomplete_peer_tls_settings_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tls_files(dir.path());
    let path = |p: &std::path::Path| p.to_str().expect("path").to_string();
    let server = |data: &str, tls: &[&str]| {
        let mut args: Vec<String> = [
            "server",
            "--id",
            "1",
            "--data-dir",
            &path(&dir.path().join(data)),
            "--peer-addr",
            "127.0.0.1:0",
            "--client-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(tls.iter().map(|s| s.to_string()));
        keel(args)
    };
    let cert = path(&files.server_cert);
    let (code, text) = server("data", &["--peer-cert-file", &cert]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("peer TLS needs all three of peer_cert_file"),
        "{text}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused start wrote its data directory"
    );
    // Another certificate's key: named, and nothing written either.
    let (code, text) = server(
        "data2",
        &[
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &path(&files.client_key),
            "--peer-trusted-ca-file",
            &path(&files.ca),
        ],
    );
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("peer_cert_file and peer_key_file"), "{text}");
    assert!(
        !dir.path().join("data2").exists(),
        "a refused start wrote its data directory"
    );
    // A certificate its own trusted CA did not sign: every link would
    // fail, so the node says so at start.
    let (code, text) = server(
        "data3",
        &[
            "--peer-cert-file",
            &path(&files.rogue_server_cert),
            "--peer-key-file",
            &path(&files.rogue_server_key),
            "--peer-trusted-ca-file",
            &path(&files.ca),
        ],
    );
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("the other nodes would refuse this certificate")
            && text.contains("not signed by a CA in peer_trusted_ca_file"),
        "{text}"
    );
    assert!(
        !dir.path().join("data3").exists(),
        "a refused start wrote its data directory"
    );
}
