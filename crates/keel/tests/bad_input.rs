//! Bad input gets a clear error and loses nothing: garbage, truncated and
//! oversized frames on the client and peer ports, a peer from another
//! cluster, oversized requests and keys, and CLI mistakes. The node keeps
//! serving throughout, and every acknowledged write is readable at the end.

mod common;

use bytes::Bytes;
use common::{keel, TestCluster};
use keel_client::ClientError;
use keel_net::codec::{self, Frame};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Sends `bytes` and returns true if the server then closes the connection.
fn closed_after(addr: &str, bytes: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(bytes).expect("write");
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn garbage_and_hostile_frames_close_only_their_connection() {
    // Elections after 2-4 s without a heartbeat, not 0.5-1 s: the test
    // checks that bad input deposes no leader, and a loaded machine's
    // stall should not do it either.
    let mut c = TestCluster::start(
        3,
        "max_request_bytes = 65536\n\
         election_timeout_min_ms = 2000\n\
         election_timeout_max_ms = 4000",
    );
    let (leader, term) = c.wait_for_leader(Duration::from_secs(15));
    let mut client = c.client();
    c.put(&mut client, "before", "1");
    let node = c.node(leader).client.clone();
    let peer = c.node(leader).peer.clone();

    // Client port: random garbage, a frame with a wrong version, a declared
    // length over the limit (closed before the body is even sent).
    let garbage: Vec<u8> = (0..2000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert!(closed_after(&node, &garbage), "garbage on the client port");
    let mut bad_version = Vec::new();
    codec::encode(
        &Frame::Request(codec::ClientRequest {
            id: 1,
            client: 1,
            seq: 1,
            op: codec::ClientOp::Status,
        }),
        &mut bad_version,
    );
    bad_version[4] = 99;
    assert!(closed_after(&node, &bad_version), "wrong version byte");
    assert!(
        closed_after(&node, &u32::MAX.to_le_bytes()),
        "oversized declared length"
    );
    // Requests before a bad frame in the same write still run, and their
    // answers arrive before the connection closes.
    {
        let mut bytes = Vec::new();
        for (id, key) in [(7u64, "before-garbage-1"), (8, "before-garbage-2")] {
            let put = keel_kv::Command::Put {
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Bytes::from_static(b"v"),
            };
            codec::encode(
                &Frame::Request(codec::ClientRequest {
                    id,
                    client: keel_core::SESSIONLESS,
                    seq: 0x5eed_0000 + id,
                    op: codec::ClientOp::Write(put.encode()),
                }),
                &mut bytes,
            );
        }
        bytes.extend_from_slice(&garbage);
        let mut s = TcpStream::connect(&node).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(&bytes).expect("write");
        let mut got = Vec::new();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let closed = loop {
            match s.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(e) => panic!("no close after the bad frame: {e}"),
            }
            while let Ok(Some((f, n))) = codec::decode(&buf, 1 << 20) {
                buf.drain(..n);
                match f {
                    Frame::Response(r) => {
                        if !matches!(r.result, codec::ClientResult::Ok(_)) {
                            for i in 1..=3u64 {
                                let l = std::fs::read_to_string(c.node(i).dir.join("keel.log"))
                                    .unwrap_or_default();
                                eprintln!("==== node {i}\n{l}");
                            }
                            panic!("{:?}", r.result);
                        }
                        got.push(r.id);
                    }
                    other => panic!("unexpected frame {other:?}"),
                }
            }
        };
        assert!(closed);
        assert_eq!(
            got,
            vec![7, 8],
            "answers to the requests before the garbage"
        );
    }
    // A truncated frame followed by a close: nothing to answer, nothing breaks.
    {
        let mut s = TcpStream::connect(&node).expect("connect");
        s.write_all(&bad_version[..7]).expect("write");
    }
    // A truncated frame left open: the connection waits for the rest; the
    // node goes on answering everyone else, on that port too.
    let mut good = Vec::new();
    codec::encode(
        &Frame::Request(codec::ClientRequest {
            id: 2,
            client: 1,
            seq: 1,
            op: codec::ClientOp::Status,
        }),
        &mut good,
    );
    let mut dangling = TcpStream::connect(&node).expect("connect");
    dangling.write_all(&good[..good.len() - 1]).expect("write");
    let s = c.rt.block_on(keel_client::Client::status_of(
        &node,
        Duration::from_secs(2),
    ));
    let got = s
        .map(|s| (s.role, s.term))
        .expect("status after truncated frames");
    if got != ("leader".to_string(), term) {
        for i in 1..=3u64 {
            let l = std::fs::read_to_string(c.node(i).dir.join("keel.log")).unwrap_or_default();
            eprintln!("==== node {i}\n{l}");
        }
    }
    assert_eq!(got, ("leader".to_string(), term));
    c.put(&mut client, "after-truncated-client-frames", "1");
    drop(dangling);

    // Peer port: garbage, and a hello from another cluster.
    assert!(closed_after(&peer, &garbage), "garbage on the peer port");
    let mut hello = Vec::new();
    codec::encode(
        &Frame::Hello {
            cluster_id: 0xdead,
            node_id: 1,
            version: codec::PEER_VERSION,
        },
        &mut hello,
    );
    assert!(closed_after(&peer, &hello), "hello from another cluster");
    // Truncated frames on the peer port: a hello cut short then closed, and
    // one cut short and held open (refused after the hello timeout).
    let mut ours = Vec::new();
    codec::encode(
        &Frame::Hello {
            cluster_id: 0x6b65_656c,
            node_id: 99,
            version: codec::PEER_VERSION,
        },
        &mut ours,
    );
    {
        let mut s = TcpStream::connect(&peer).expect("connect");
        s.write_all(&ours[..ours.len() / 2]).expect("write");
    }
    let mut held = TcpStream::connect(&peer).expect("connect");
    held.write_all(&ours[..ours.len() - 1]).expect("write");
    c.put(&mut client, "after-truncated-peer-frames", "1");
    // (The truncated hello's refusal is logged once its close is seen.)
    let start = Instant::now();
    let log = loop {
        let log = c.log_of(leader);
        if log.contains("refused: connection closed") || start.elapsed() > Duration::from_secs(10) {
            break log;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(log.contains("cluster 0xdead"), "refusal not logged:\n{log}");
    assert!(log.contains("bad frame"), "bad frame not logged:\n{log}");
    assert!(
        log.contains("refused: connection closed"),
        "truncated hello not logged:\n{log}"
    );
    drop(held);

    // An oversized request is refused with a reason; an empty key gets
    // the service's error; neither changes anything.
    let big = keel_kv::Command::Put {
        key: Bytes::from_static(b"big"),
        value: Bytes::from(vec![b'x'; 100_000]),
    };
    match c.rt.block_on(client.write(big.encode())) {
        Err(ClientError::Refused(m)) => assert!(m.contains("exceeds the 65536-byte limit"), "{m}"),
        other => panic!("oversized request: {other:?}"),
    }
    let empty_key = keel_kv::Command::Put {
        key: Bytes::new(),
        value: Bytes::from_static(b"v"),
    };
    let r =
        c.rt.block_on(client.write(empty_key.encode()))
            .expect("write");
    match keel_kv::Response::decode(&r) {
        Ok(keel_kv::Response::Error { message, .. }) => {
            assert!(message.contains("key is empty"), "{message}")
        }
        other => panic!("empty key: {other:?}"),
    }
    let garbage_cmd =
        c.rt.block_on(client.write(Bytes::from_static(b"\x07nonsense")))
            .expect("write");
    assert!(matches!(
        keel_kv::Response::decode(&garbage_cmd),
        Ok(keel_kv::Response::Error { .. })
    ));

    // The same leader still serves, in the same term, and nothing was lost.
    c.put(&mut client, "after", "2");
    let s = c.status(leader).expect("status");
    assert_eq!((s.role.as_str(), s.term), ("leader", term));
    assert_eq!(c.get(&mut client, "big"), None);
    c.check_acked(&mut client);
}

#[test]
fn cli_mistakes_get_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["kv", "pt", "a", "b"], "unrecognized subcommand 'pt'"),
        (&["server", "--durability", "fast"], "invalid value 'fast'"),
        (&["server", "--service-thread", "own"], "invalid value 'own'"),
        (&["server"], "without --config, these flags are required: --id, --data-dir, --peer-addr, --client-addr"),
        (&["server", "--config", "/nonexistent/keel.toml"], "cannot read config file /nonexistent/keel.toml"),
        (
            &["server", "--id", "1", "--data-dir", "/tmp/x", "--peer-addr", "127.0.0.1:1", "--client-addr", "127.0.0.1:2", "--peer", "2=oops"],
            "expected ID=PEER_ADDR,CLIENT_ADDR",
        ),
        (
            &["server", "--id", "1", "--data-dir", "/tmp/x", "--peer-addr", "127.0.0.1:1", "--client-addr", "127.0.0.1:2", "--replicated-sync-interval-ms", "0"],
            "replicated_sync_interval_ms (0) must be between 1 and 60000",
        ),
        (
            &["server", "--id", "1", "--data-dir", "/tmp/x", "--peer-addr", "127.0.0.1:1", "--client-addr", "127.0.0.1:2", "--follower-apply-interval-ms", "2000"],
            "follower_apply_interval_ms (2000) must be at most 1000",
        ),
        (
            &["server", "--id", "1", "--data-dir", "/tmp/x", "--peer-addr", "127.0.0.1:1", "--client-addr", "127.0.0.1:2", "--lease-reads", "--clock-drift-ppm", "600000"],
            "clock_drift_ppm (600000) must be at most 500000",
        ),
        (&["kv", "cas", "k", "v"], "give exactly one of --expect-value, --expect-version, --expect-absent"),
        (&["kv", "--endpoints", "127.0.0.1:1", "--timeout", "1", "get", "x"], "no leader reachable"),
        (&["dev", "--nodes", "0"], "0 is not in 1..=9"),
        (
            &["bench", "kv", "--no-write", "--etcd-endpoints", "etcd-host"],
            "--etcd-endpoints: \"etcd-host\" is not host:port",
        ),
        (
            &["bench", "kv", "--no-write", "--systems", "keel", "--etcd-endpoints", "127.0.0.1:1"],
            "--etcd-endpoints given, but --systems does not include etcd",
        ),
        (
            &["restore", "/nonexistent/backup.keel", "--id", "1", "--data-dir", "/nonexistent/data", "--peer-addr", "127.0.0.1:1", "--client-addr", "127.0.0.1:2"],
            "reading backup /nonexistent/backup.keel",
        ),
        (&["restore", "backup.keel"], "without --config, these flags are required"),
    ];
    for (args, expected) in cases {
        let (code, text) = keel(args.iter());
        assert_ne!(code, 0, "keel {args:?} succeeded:\n{text}");
        assert!(
            text.contains(expected),
            "keel {args:?}: expected {expected:?} in:\n{text}"
        );
    }
    let (code, text) = keel(["--help"]);
    assert_eq!(code, 0);
    for sub in ["server", "dev", "kv", "cluster", "restore", "bench"] {
        assert!(text.contains(sub), "--help does not mention {sub}:\n{text}");
    }
}

#[test]
fn a_bad_config_file_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("keel.toml");
    std::fs::write(
        &path,
        "id = 1\ndata_dir = \"d\"\npeer_addr = \"127.0.0.1:1\"\nclient_addr = \"127.0.0.1:2\"\nheartbeat_msec = 5\n",
    )
    .expect("write");
    let (code, text) = keel(["server", "--config", path.to_str().expect("utf-8 path")]);
    assert_ne!(code, 0);
    assert!(text.contains("heartbeat_msec"), "{text}");
    // A retention etcd would not take either, refused before anything
    // starts: on a node without etcd_addr too (those passed silently).
    for (etcd, mode, retention, says) in [
        (true, "periodic", "5d", "unknown unit \"d\""),
        (true, "revision", "1h", "a whole number"),
        (true, "daily", "1", "expected \"periodic\" or \"revision\""),
        (
            false,
            "hourly",
            "0",
            "expected \"periodic\" or \"revision\"",
        ),
        (
            false,
            "periodic",
            "abc",
            "auto_compaction_retention \"abc\"",
        ),
        (false, "revision", "1h", "a whole number"),
    ] {
        let etcd = if etcd {
            "etcd_addr = \"127.0.0.1:3\"\n"
        } else {
            ""
        };
        std::fs::write(
            &path,
            format!(
                "id = 1\ndata_dir = {:?}\npeer_addr = \"127.0.0.1:1\"\nclient_addr = \"127.0.0.1:2\"\n\
                 {etcd}auto_compaction_mode = \"{mode}\"\n\
                 auto_compaction_retention = \"{retention}\"\n",
                dir.path().join("d")
            ),
        )
        .expect("write");
        let (code, text) = keel(["server", "--config", path.to_str().expect("utf-8 path")]);
        assert_ne!(code, 0, "{mode} {retention}");
        assert!(
            text.contains("auto_compaction") && text.contains(says),
            "{mode} {retention}: {text}"
        );
        assert!(
            !dir.path().join("d").exists(),
            "{mode} {retention}: a data directory was created"
        );
    }
}

/// The node's check of the auto-compaction settings (made on every node)
/// takes exactly what the etcd API's parser takes.
#[test]
fn auto_compaction_is_checked_as_the_etcd_api_reads_it() {
    let modes = ["periodic", "revision", "hourly", "", "Periodic"];
    let retentions = [
        "0",
        "1",
        "30m",
        "1h30m",
        "1.5h",
        "500ms",
        "90s",
        " 2 ",
        "",
        "abc",
        "5d",
        "1h30",
        "1..5h",
        ".",
        "-1",
        "1e3",
        "100000000",
        "87600",
        "87601",
        "h",
        "1hm",
        "18446744073709551615",
    ];
    for mode in modes {
        for retention in retentions {
            let etcd = keel_etcd::compactor::AutoCompaction::parse(mode, retention);
            let node = keel_node::config::check_auto_compaction(mode, retention);
            assert_eq!(
                etcd.as_ref().err(),
                node.as_ref().err(),
                "{mode:?} {retention:?}"
            );
        }
    }
}

/// HTTP/2 (etcdctl pointed at the client port), HTTP/1.1 and a TLS
/// handshake on the native client port are named in the log, with the port
/// to use, instead of the length their first bytes declare as a frame
/// ("frame declares 541676112 bytes"); the connection is still closed.
#[test]
fn other_protocols_on_the_client_port_are_named() {
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    let node = c.node(1).client.clone();
    let peer = c.node(1).peer.clone();
    let tls_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    assert!(
        closed_after(&node, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        "HTTP/2"
    );
    assert!(
        closed_after(&node, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
        "HTTP/1.1"
    );
    assert!(closed_after(&node, &tls_hello), "TLS");
    assert!(
        closed_after(&peer, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        "HTTP/2, peer port"
    );
    // (Each was logged before its connection closed.)
    let log = c.log_of(1);
    for says in [
        "closing connection: HTTP/2 on the native client port, which speaks only Keel's client \
         protocol; etcd clients use etcd_addr",
        "closing connection: HTTP/1.1 on the native client port",
        "closing connection: TLS on the native client port",
        "refused: HTTP/2 on the peer port",
    ] {
        assert!(log.contains(says), "{says:?} not in:\n{log}");
    }
    assert!(!log.contains("541676112"), "{log}");
}

/// A node's peer port given as the endpoint (`--endpoints <peer_addr>`, a
/// mistake for its client_addr) is named at once, by kv commands and by
/// cluster status: before, the client took the peer port's closing of the
/// connection for a node restarting and retried "connection closed" until
/// the whole --timeout ran out (a write then ended "outcome unknown").
/// Nothing is written.
#[test]
fn a_peer_port_given_as_the_endpoint_is_named_at_once() {
    let c = TestCluster::start(1, "");
    c.wait_for_leader(Duration::from_secs(10));
    let peer = c.node(1).peer.clone();
    let says = "this is a peer port, use the node's client_addr";
    for args in [
        &["kv", "--endpoints", &peer, "put", "peer-port", "v"][..],
        &["kv", "--endpoints", &peer, "get", "peer-port"],
        &["cluster", "--endpoints", &peer, "status"],
    ] {
        let started = Instant::now();
        let (code, text) = keel(args);
        let took = started.elapsed();
        assert_ne!(code, 0, "keel {args:?} succeeded:\n{text}");
        assert!(
            text.contains(says) && text.contains(&peer),
            "keel {args:?}: expected {says:?} and {peer} in:\n{text}"
        );
        // (The default --timeout is 10 s.)
        assert!(took < Duration::from_secs(5), "keel {args:?} took {took:?}");
    }
    let mut client = c.client();
    assert_eq!(c.get(&mut client, "peer-port"), None);
}
