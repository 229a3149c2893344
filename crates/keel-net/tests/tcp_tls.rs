//! The peer transport over mutual TLS (`TransportConfig::tls`), between
//! two nodes in one process: messages cross complete and in order both
//! ways, in bursts far larger than a socket buffer, and again after a
//! reconnect; a node whose certificate the other's CA did not sign, whose
//! certificate does not name the address it is dialed at, or that speaks
//! plain TCP to a TLS node (or the reverse) gets no link. Files changed
//! while nodes run are taken for the connections opened after.

mod common;
use common::{free_addr, runtime};
use keel_core::{Message, NodeId};
use keel_net::codec;
use keel_net::tcp::{start_peers, NetStats, Peers, TransportConfig};
use keel_net::tls::{PeerTls, PeerTlsFiles};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLUSTER: u64 = 0x7157;

/// PEM files: a CA, a node certificate it signs for `names`, and (as
/// `rogue`) one from another CA for the same names.
struct Certs {
    _dir: tempfile::TempDir,
    good: PeerTlsFiles,
    rogue: PeerTlsFiles,
    /// Signed by the CA, for "localhost" only.
    localhost_only: PeerTlsFiles,
    /// Signed by the CA, valid in 2000 only.
    expired: PeerTlsFiles,
    /// Signed by the CA, valid from 2090.
    future: PeerTlsFiles,
    /// Signed by the CA, for TLS client use only.
    client_only: PeerTlsFiles,
}

fn certs() -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("ca cert");
        (cert.pem(), Issuer::new(p, key))
    };
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let leaf = |name: &str, names: &[&str], issuer: &Issuer<'_, KeyPair>, ca: &Path| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).expect("params");
        p.distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        match name {
            "expired" => {
                p.not_before = rcgen::date_time_ymd(2000, 1, 1);
                p.not_after = rcgen::date_time_ymd(2000, 12, 31);
            }
            "future" => {
                p.not_before = rcgen::date_time_ymd(2090, 1, 1);
                p.not_after = rcgen::date_time_ymd(2091, 1, 1);
            }
            "client-only" => {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            }
            _ => {}
        }
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, issuer).expect("cert");
        PeerTlsFiles {
            cert_file: write(&format!("{name}.pem"), &cert.pem()),
            key_file: write(&format!("{name}-key.pem"), &key.serialize_pem()),
            trusted_ca_file: ca.to_path_buf(),
        }
    };
    let (ca_pem, issuer) = ca("keel test CA");
    let (rogue_ca_pem, rogue_issuer) = ca("another CA");
    let ca = write("ca.pem", &ca_pem);
    let rogue_ca = write("rogue-ca.pem", &rogue_ca_pem);
    Certs {
        good: leaf("node", &["127.0.0.1", "localhost"], &issuer, &ca),
        rogue: leaf(
            "rogue",
            &["127.0.0.1", "localhost"],
            &rogue_issuer,
            &rogue_ca,
        ),
        localhost_only: leaf("localhost", &["localhost"], &issuer, &ca),
        expired: leaf("expired", &["127.0.0.1", "localhost"], &issuer, &ca),
        future: leaf("future", &["127.0.0.1", "localhost"], &issuer, &ca),
        client_only: leaf("client-only", &["127.0.0.1", "localhost"], &issuer, &ca),
        _dir: dir,
    }
}

/// Hellos are said on a runtime of their own, as a node says them on its
/// network threads (`TransportConfig::handshakes`).
fn handshakes() -> tokio::runtime::Handle {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(runtime).handle().clone()
}

fn config(id: NodeId, tls: Option<&PeerTlsFiles>) -> TransportConfig {
    TransportConfig {
        cluster_id: CLUSTER,
        node_id: id,
        max_frame: 64 << 20,
        peer_queue: 1 << 20,
        // (The files are looked at again every 10 ms, so that a test's
        // change to them is soon taken.)
        tls: tls.map(|f| {
            PeerTls::load_checking_every(f, Duration::from_millis(10)).expect("load TLS files")
        }),
        handshakes: Some(handshakes()),
    }
}

/// An append from `from` to `to` carrying `heartbeat = seq` and `size`
/// payload bytes of `seq as u8`.
fn message(from: NodeId, to: NodeId, seq: u64, size: usize) -> Message {
    common::numbered_append(CLUSTER, from, to, seq, size)
}

/// One node's transport: node `id` at `addr`, whose one peer is `peer` at
/// `peer_addr`; what it receives, and its counters.
struct End {
    peers: Peers,
    received: mpsc::Receiver<Message>,
    stats: Arc<NetStats>,
    tls: Option<PeerTls>,
}

fn start(
    rt: &tokio::runtime::Runtime,
    id: NodeId,
    addr: &str,
    peer: (NodeId, &str),
    tls: Option<&PeerTlsFiles>,
) -> End {
    start_gated(rt, id, addr, peer, tls, None)
}

/// `start`, and with `gate` each message waits for `gate` to let it
/// through before it is received (holding up the connection's reading).
fn start_gated(
    rt: &tokio::runtime::Runtime,
    id: NodeId,
    addr: &str,
    peer: (NodeId, &str),
    tls: Option<&PeerTlsFiles>,
    gate: Option<Arc<Gate>>,
) -> End {
    let (tx, received) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let stats = Arc::new(NetStats::default());
    let config = config(id, tls);
    let tls = config.tls.clone();
    let peers = rt
        .block_on(start_peers(
            config,
            addr,
            &[(peer.0, peer.1.to_string())],
            Arc::new(move |m| {
                if let Some(g) = &gate {
                    g.pass();
                }
                let _ = tx.lock().expect("lock").send(m);
            }),
            stats.clone(),
        ))
        .expect("start peers");
    End {
        peers,
        received,
        stats,
        tls,
    }
}

/// Nodes 1 (dialing) and 2 (accepting), with these TLS files each.
fn pair(
    rt: &tokio::runtime::Runtime,
    one: Option<&PeerTlsFiles>,
    two: Option<&PeerTlsFiles>,
) -> (End, End) {
    let (a1, a2) = (free_addr(), free_addr());
    let e2 = start(rt, 2, &a2, (1, &a1), two);
    let e1 = start(rt, 1, &a1, (2, &a2), one);
    (e1, e2)
}

/// Sends probes from `from` until one arrives at `to` (messages sent while
/// the link is down are dropped); returns the next unused sequence number.
fn wait_link_up(from: &End, to: &End, ids: (NodeId, NodeId), mut seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the link never came up");
        from.peers.send(message(ids.0, ids.1, seq, 1));
        from.peers.flush();
        seq += 1;
        if to.received.recv_timeout(Duration::from_millis(50)).is_ok() {
            while to.received.recv_timeout(Duration::from_millis(100)).is_ok() {}
            return seq;
        }
    }
}

/// Receives `count` messages at `to`, checking each one's order and bytes.
fn receive_all(to: &End, first: u64, count: u64, size: usize) {
    common::receive_numbered(&to.received, first, count, size, Duration::from_secs(30));
}

#[test]
fn tls_links_carry_bursts_larger_than_the_socket_buffer_both_ways() {
    let c = certs();
    let rt = runtime();
    let (one, two) = pair(&rt, Some(&c.good), Some(&c.good));
    let first = wait_link_up(&one, &two, (1, 2), 0);
    let back = wait_link_up(&two, &one, (2, 1), 0);
    assert_eq!(one.stats.peer_protocols(), vec![(2, codec::PEER_VERSION)]);
    assert_eq!(two.stats.peer_protocols(), vec![(1, codec::PEER_VERSION)]);
    // 64 MiB each way at once, in bursts of 8 MiB per flush: the socket
    // takes a part of each, the links' tasks finish the records held.
    let (count, size) = (4096u64, 16 << 10);
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..count {
                one.peers.send(message(1, 2, first + i, size));
                if i % 512 == 511 {
                    one.peers.flush();
                }
            }
            one.peers.flush();
        });
        s.spawn(|| {
            for i in 0..count {
                two.peers.send(message(2, 1, back + i, size));
                if i % 512 == 511 {
                    two.peers.flush();
                }
            }
            two.peers.flush();
        });
        // (What arrives waits in unbounded channels meanwhile.)
        receive_all(&two, first, count, size);
        receive_all(&one, back, count, size);
    });
    // One message larger than a TLS record and than the writes' chunks.
    let big = first + count;
    one.peers.send(message(1, 2, big, 8 << 20));
    one.peers.flush();
    receive_all(&two, big, 1, 8 << 20);
    assert_eq!(one.stats.peer_messages_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(two.stats.bad_frames.load(Ordering::Relaxed), 0);
    assert_eq!(two.stats.rejected_connections.load(Ordering::Relaxed), 0);
    drop(rt);
}

/// Closed until `open`; opened when dropped too, so that a failed
/// assertion does not leave a reader blocked.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn pass(&self) {
        let mut open = self.open.lock().expect("lock");
        while !*open {
            open = self.opened.wait(open).expect("wait");
        }
    }

    fn open(&self) {
        *self.open.lock().expect("lock") = true;
        self.opened.notify_all();
    }
}

struct OpenOnDrop(Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// Small writes into a socket the peer does not read for a while: each
/// flush's records are made at once, the socket takes a part of them, and
/// the link's task must write the rest (and no later flush may pass it).
#[test]
fn small_flushes_into_a_full_socket_all_arrive_in_order() {
    let c = certs();
    let rt = runtime();
    let (a1, a2) = (free_addr(), free_addr());
    let gate = Arc::new(Gate::default());
    let _open = OpenOnDrop(gate.clone());
    let two = start_gated(&rt, 2, &a2, (1, &a1), Some(&c.good), Some(gate.clone()));
    let one = start(&rt, 1, &a1, (2, &a2), Some(&c.good));
    // The first probe to arrive holds node 2's reading at the gate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 0;
    while one.stats.peer_protocols() != vec![(2, codec::PEER_VERSION)] {
        assert!(Instant::now() < deadline, "the link never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
    one.peers.send(message(1, 2, seq, 1));
    one.peers.flush();
    seq += 1;
    // 24 MiB in flushes of one 1 KiB message each: far more than the
    // loopback socket buffers hold while node 2 does not read.
    let (count, size) = (24 * 1024u64, 1024);
    for i in 0..count {
        one.peers.send(message(1, 2, seq + i, size));
        one.peers.flush();
    }
    gate.open();
    receive_all(&two, 0, 1, 1);
    receive_all(&two, seq, count, size);
    assert_eq!(one.stats.peer_messages_dropped.load(Ordering::Relaxed), 0);
    drop(rt);
}

#[test]
fn a_tls_link_comes_back_after_the_dialing_node_restarts() {
    let c = certs();
    let rt = runtime();
    let (a1, a2) = (free_addr(), free_addr());
    let two = start(&rt, 2, &a2, (1, &a1), Some(&c.good));
    let one = start(&rt, 1, &a1, (2, &a2), Some(&c.good));
    let next = wait_link_up(&one, &two, (1, 2), 0);
    drop(one);
    let again = start(&rt, 1, &free_addr(), (2, &a2), Some(&c.good));
    let next = wait_link_up(&again, &two, (1, 2), next + 1000);
    again.peers.send(message(1, 2, next, 100));
    again.peers.flush();
    receive_all(&two, next, 1, 100);
    drop(rt);
}

/// Certificates are rotated on running nodes: a CA added to both nodes'
/// trusted files lets a node whose certificate it signed link (no
/// restart), and a node's certificate replaced by one that does not name
/// its address is what the next dialer gets (and refuses), while the link
/// already open stays up.
#[test]
fn certificates_and_cas_are_taken_from_their_files_while_nodes_run() {
    let c = certs();
    let rt = runtime();
    let (a1, a2) = (free_addr(), free_addr());
    let two = start(&rt, 2, &a2, (1, &a1), Some(&c.good));
    let one = start(&rt, 1, &a1, (2, &a2), Some(&c.rogue));
    refused(&one, &two, &two);
    let read = |p: &Path| std::fs::read_to_string(p).expect("read PEM");
    let both = read(&c.good.trusted_ca_file) + &read(&c.rogue.trusted_ca_file);
    std::fs::write(&c.good.trusted_ca_file, &both).expect("write");
    std::fs::write(&c.rogue.trusted_ca_file, &both).expect("write");
    let next = wait_link_up(&one, &two, (1, 2), 0);

    // Node 2's certificate, now for localhost only: node 1 dials it at
    // 127.0.0.1. Once node 2 has loaded it (the new certificate with the
    // old key does not load), the open link is not touched...
    let two_tls = two.tls.clone().expect("TLS");
    let loaded = two_tls.generation();
    assert!(loaded >= 1, "node 2 never loaded its CA file again");
    std::fs::write(&c.good.cert_file, read(&c.localhost_only.cert_file)).expect("write");
    std::fs::write(&c.good.key_file, read(&c.localhost_only.key_file)).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while two_tls.generation() == loaded {
        assert!(
            Instant::now() < deadline,
            "node 2 never loaded its new files"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    one.peers.send(message(1, 2, next, 10));
    one.peers.flush();
    receive_all(&two, next, 1, 10);
    // ... and a node dialing afresh is shown the new certificate.
    drop(one);
    let rejected = two.stats.rejected_connections.load(Ordering::Relaxed);
    let again = start(&rt, 1, &free_addr(), (2, &a2), Some(&c.rogue));
    let deadline = Instant::now() + Duration::from_secs(20);
    while two.stats.rejected_connections.load(Ordering::Relaxed) < rejected + 3 {
        assert!(Instant::now() < deadline, "no connection was refused");
        again.peers.send(message(1, 2, 1, 1));
        again.peers.flush();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(again.stats.peer_protocols(), vec![(2, 0)], "linked");
    assert!(two.received.try_recv().is_err(), "a message crossed");
    drop(rt);
}

/// Waits for `which` to refuse connections (a few, so that a dialer that
/// took a refusal for an older peer protocol would have stepped down and
/// counted its link up: TLS links never step below the first TLS
/// version), checking all the while that the link is down on both sides,
/// then that nothing crossed. (A plain dialer does step down, and may
/// count its link up for a moment at protocol 4, which a closed
/// connection does not answer: `plain_dialer` leaves its side unchecked.)
fn refused_with(one: &End, two: &End, which: &End, plain_dialer: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while which.stats.rejected_connections.load(Ordering::Relaxed) < 5 {
        assert!(Instant::now() < deadline, "no connection was refused");
        one.peers.send(message(1, 2, 1, 1));
        one.peers.flush();
        if !plain_dialer {
            assert_eq!(
                one.stats.peer_protocols(),
                vec![(2, 0)],
                "node 1's link is up"
            );
        }
        assert_eq!(
            two.stats.peer_protocols(),
            vec![(1, 0)],
            "node 2's link is up"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(two.received.try_recv().is_err(), "a message crossed");
    assert!(one.received.try_recv().is_err(), "a message crossed");
    assert_eq!(
        two.stats.peer_protocols(),
        vec![(1, 0)],
        "node 2's link is up"
    );
}

fn refused(one: &End, two: &End, which: &End) {
    refused_with(one, two, which, false);
}

#[test]
fn a_certificate_from_another_ca_gets_no_link_either_way() {
    let c = certs();
    let rt = runtime();
    // The dialer's certificate is refused by the accepting node...
    let (one, two) = pair(&rt, Some(&c.rogue), Some(&c.good));
    refused(&one, &two, &two);
    drop((one, two));
    // ... and the accepting node's by the dialer, which tells it so.
    let (one, two) = pair(&rt, Some(&c.good), Some(&c.rogue));
    refused(&one, &two, &two);
    drop(rt);
}

#[test]
fn a_certificate_that_does_not_name_the_dialed_address_gets_no_link() {
    let c = certs();
    let rt = runtime();
    // Node 2 is dialed at 127.0.0.1; its certificate names localhost only.
    let (one, two) = pair(&rt, Some(&c.good), Some(&c.localhost_only));
    refused(&one, &two, &two);
    drop(rt);
}

/// The accepting node takes a certificate from the CA only for the node
/// whose peer address (as it has it) the certificate names: node 1's
/// certificate names localhost only, so node 2 refuses it while it lists
/// node 1 at 127.0.0.1, and takes it once it lists node 1 at localhost.
#[test]
fn a_certificate_speaks_only_for_the_node_at_the_address_it_names() {
    let c = certs();
    let rt = runtime();
    let (one, two) = pair(&rt, Some(&c.localhost_only), Some(&c.good));
    refused(&one, &two, &two);
    drop((one, two));
    let (a1, a2) = (free_addr(), free_addr());
    let port = a1.rsplit_once(':').expect("port").1;
    let two = start(
        &rt,
        2,
        &a2,
        (1, &format!("localhost:{port}")),
        Some(&c.good),
    );
    let one = start(&rt, 1, &a1, (2, &a2), Some(&c.localhost_only));
    wait_link_up(&one, &two, (1, 2), 0);
    assert_eq!(two.stats.rejected_connections.load(Ordering::Relaxed), 0);
    drop(rt);
}

/// More connections from one host saying hello at once than a node lets
/// one host have are closed as they come; once they are gone, a peer from
/// that host links again (the places are given back).
#[test]
fn idle_connections_from_one_host_are_bounded_and_give_their_places_back() {
    let c = certs();
    let rt = runtime();
    let (a1, a2) = (free_addr(), free_addr());
    let two = start(&rt, 2, &a2, (1, &a1), Some(&c.good));
    // Connections that say nothing, from 127.0.0.1.
    let idle: Vec<_> = (0..9)
        .map(|_| std::net::TcpStream::connect(&a2).expect("connect"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while two.stats.rejected_connections.load(Ordering::Relaxed) < 1 {
        assert!(
            Instant::now() < deadline,
            "nine idle connections were all taken"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(idle);
    let one = start(&rt, 1, &a1, (2, &a2), Some(&c.good));
    wait_link_up(&one, &two, (1, 2), 0);
    drop(rt);
}

#[test]
fn a_plain_node_and_a_tls_node_get_no_link_either_way() {
    let c = certs();
    let rt = runtime();
    let (one, two) = pair(&rt, None, Some(&c.good));
    refused_with(&one, &two, &two, true);
    drop((one, two));
    let (one, two) = pair(&rt, Some(&c.good), None);
    refused(&one, &two, &two);
    drop(rt);
}

#[test]
fn bad_tls_files_are_refused_with_the_file_named() {
    let c = certs();
    let mut missing = c.good.clone();
    missing.key_file = c.good.key_file.with_file_name("nothing-here.pem");
    let e = PeerTls::load(&missing).expect_err("a missing key file");
    assert!(
        e.starts_with("peer_key_file ") && e.contains("nothing-here.pem"),
        "{e}"
    );
    let mut swapped = c.good.clone();
    swapped.key_file = c.good.cert_file.clone();
    let e = PeerTls::load(&swapped).expect_err("a certificate as the key");
    assert!(
        e.starts_with("peer_key_file ") && e.contains("no PEM private key"),
        "{e}"
    );
    let mut no_ca = c.good.clone();
    no_ca.trusted_ca_file = c.good.key_file.clone();
    let e = PeerTls::load(&no_ca).expect_err("a key as the CA");
    assert!(
        e.starts_with("peer_trusted_ca_file ") && e.contains("no PEM certificate"),
        "{e}"
    );
    let mut mismatched = c.good.clone();
    mismatched.key_file = c.rogue.key_file.clone();
    let e = PeerTls::load(&mismatched).expect_err("another certificate's key");
    assert!(e.starts_with("peer_cert_file and peer_key_file"), "{e}");
    // A certificate the other nodes would refuse: from a CA the trusted
    // file does not hold, expired, or not for TLS server use.
    let mut other_ca = c.rogue.clone();
    other_ca.trusted_ca_file = c.good.trusted_ca_file.clone();
    let e = PeerTls::load(&other_ca).expect_err("a certificate from another CA");
    let refused = "the other nodes would refuse this certificate: ";
    assert!(
        e.starts_with("peer_cert_file ")
            && e.contains(&format!(
                "{refused}it is not signed by a CA in peer_trusted_ca_file"
            )),
        "{e}"
    );
    let e = PeerTls::load(&c.expired).expect_err("an expired certificate");
    assert!(
        e.starts_with("peer_cert_file ") && e.contains(&format!("{refused}it has expired")),
        "{e}"
    );
    let e = PeerTls::load(&c.client_only).expect_err("a client-only certificate");
    assert!(
        e.starts_with("peer_cert_file ") && e.contains("extended key usage"),
        "{e}"
    );
    // One not valid yet may be this machine's clock: taken, with a warning.
    PeerTls::load(&c.future).expect("a certificate not valid yet");
    // A peer address whose host cannot be a certificate's name.
    let rt = runtime();
    let e = rt
        .block_on(start_peers(
            config(1, Some(&c.good)),
            &free_addr(),
            &[(2, "bad_host!:7001".to_string())],
            Arc::new(|_| {}),
            Arc::new(NetStats::default()),
        ))
        .err()
        .expect("a peer address that names no certificate");
    assert!(e.to_string().contains("bad_host!"), "{e}");
}
