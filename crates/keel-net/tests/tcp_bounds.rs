//! Bounded memory on the TCP transport's edges: a client connection whose
//! requests are answered later (as the node answers them, after a
//! consensus turn) and that never reads its answers is not read past a few
//! MiB of answers held and expected, while other clients are served; and a
//! peer link whose peer stops reading holds a bounded number of bytes, not
//! a number of frames of any size.

mod common;
use bytes::Bytes;
use common::{free_addr, runtime};
use keel_core::{Body, Message};
use keel_net::codec::{self, ClientOp, ClientRequest, ClientResponse, ClientResult, Frame};
use keel_net::tcp::{self, start_clients, start_peers, NetStats, ResponseSink, TransportConfig};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// `count` status requests, ids from `first`.
fn requests(first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for id in first..first + count {
        let req = ClientRequest {
            id,
            client: 1,
            seq: id,
            op: ClientOp::Status,
        };
        codec::encode(&Frame::Request(req), &mut out);
    }
    out
}

/// Reads answers until `count` have come, in order from `first`, each
/// `size` bytes of the id's low byte.
fn read_answers(conn: &mut std::net::TcpStream, first: u64, count: u64, size: usize) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut next = first;
    while next < first + count {
        let n = conn
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("answer {next} never came: {e}"));
        assert!(n > 0, "connection closed before answer {next}");
        buf.extend_from_slice(&chunk[..n]);
        let mut off = 0;
        while let Some((frame, used)) = codec::decode(&buf[off..], 64 << 20).expect("decode") {
            off += used;
            let Frame::Response(ClientResponse {
                id,
                result: ClientResult::Ok(body),
            }) = frame
            else {
                panic!("unexpected frame {frame:?}");
            };
            assert_eq!(id, next, "out of order");
            assert_eq!(body.len(), size, "answer {id}'s size");
            assert!(body.iter().all(|&b| b == id as u8), "answer {id} mangled");
            next += 1;
        }
        buf.drain(..off);
    }
}

/// Waits until `n` stops growing (unchanged for half a second); returns it.
fn settled(n: &AtomicU64) -> u64 {
    let mut last = u64::MAX;
    let mut since = Instant::now();
    loop {
        let now = n.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > Duration::from_millis(500) {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that pipelines requests and never reads, against a node that
/// answers them later, in turns (as the consensus thread does): the node
/// stops taking its requests once the answers held and those expected for
/// the requests in flight reach a few MiB. Before, only answers already
/// held counted, and the requests in flight were not: the connection's
/// requests were all read while the first turn's answers were still being
/// made (50,000 requests, 200 MiB of answers here). Another client is
/// served meanwhile; once the first reads, it gets every answer in order.
#[test]
fn a_client_that_never_reads_answers_given_later_is_not_read_past_a_few_mib() {
    const ANSWER: usize = 4 << 10;
    const COUNT: u64 = 50_000;
    let rt = runtime();
    let addr = free_addr();
    let taken = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<(Vec<ClientRequest>, ResponseSink)>();
    let tx = Mutex::new(tx);
    let count = taken.clone();
    let handler: tcp::RequestHandler = Arc::new(move |reqs, sink: &ResponseSink| {
        count.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        let _ = tx.lock().expect("lock").send((reqs, sink.clone()));
    });
    let stats = Arc::new(NetStats::default());
    rt.block_on(start_clients(&addr, 1, 16 << 20, handler, stats.clone()))
        .expect("listen");
    // Answers in turns of 5 ms, from a thread that defers its writes.
    let responder = std::thread::spawn(move || {
        tcp::defer_flushes();
        loop {
            std::thread::sleep(Duration::from_millis(5));
            let mut turn = Vec::new();
            loop {
                match rx.try_recv() {
                    Ok(x) => turn.push(x),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            for (reqs, sink) in turn {
                for r in reqs {
                    sink.send(ClientResponse {
                        id: r.id,
                        result: ClientResult::Ok(Bytes::from(vec![r.id as u8; ANSWER])),
                    });
                }
            }
            tcp::flush_deferred();
        }
    });
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut w = conn.try_clone().expect("clone");
    // From another thread: once the node stops reading, the write blocks.
    let writer = std::thread::spawn(move || w.write_all(&requests(0, COUNT)).expect("write"));
    let held = settled(&taken);
    eprintln!(
        "{held} of {COUNT} requests taken from a client reading nothing; reading paused {} times",
        stats.client_reads_paused.load(Ordering::Relaxed)
    );
    // 4 MiB held and expected, and what the socket buffers at both ends
    // took: far below all.
    assert!(
        held * (ANSWER as u64) < 32 << 20,
        "{held} of {COUNT} requests taken ({} MiB of answers) from a client reading none",
        (held * ANSWER as u64) >> 20
    );
    assert!(stats.client_reads_paused.load(Ordering::Relaxed) > 0);
    // Meanwhile another client is served.
    let mut other = std::net::TcpStream::connect(&addr).expect("connect");
    other
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    other.write_all(&requests(7, 3)).expect("write");
    read_answers(&mut other, 7, 3, ANSWER);
    // The first client reads at last: every answer, in order.
    read_answers(&mut conn, 0, COUNT, ANSWER);
    writer.join().expect("writer");
    assert_eq!(taken.load(Ordering::Relaxed), COUNT + 3);
    drop((conn, other));
    drop(rt);
    responder.join().expect("responder");
}

const CLUSTER: u64 = 0x7e57;

fn config(id: u64) -> TransportConfig {
    TransportConfig {
        cluster_id: CLUSTER,
        node_id: id,
        max_frame: 64 << 20,
        // Frames alone would not bound these links.
        peer_queue: 1 << 20,
        tls: None,
        handshakes: None,
    }
}

/// An append from 2 to 1 with `heartbeat = seq` and `size` payload bytes.
fn message(seq: u64, size: usize) -> Message {
    common::numbered_append(CLUSTER, 2, 1, seq, size)
}

/// Reads from `s` until a whole peer message has come; returns it.
fn read_message(s: &mut std::net::TcpStream, got: &mut Vec<u8>) -> Option<Message> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        if let Some((f, n)) = codec::decode(got, 64 << 20).expect("decode") {
            got.drain(..n);
            match f {
                Frame::Peer(m) => return Some(m),
                // Node 2's answer to this test's hello.
                Frame::Hello { node_id: 2, .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        match s.read(&mut buf) {
            Ok(0) => panic!("the link was closed"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None, // timed out
        }
    }
}

/// A peer link whose peer has stopped reading holds at most its byte limit
/// (here 8 MiB): of 100 appends of 1 MiB, most are dropped (counted, as
/// past the frame limit: Raft sends them again). Before, only frames were
/// counted, and all 100 MiB were held for the stuck peer. A message larger
/// than the limit still goes on a link that holds nothing.
#[test]
fn a_peer_link_holds_a_bounded_number_of_bytes_for_a_peer_that_stopped_reading() {
    let rt = runtime();
    let a2 = free_addr();
    let stats = Arc::new(NetStats::default());
    // Node 2 accepts node 1's connection (the lower id dials); "node 1" is
    // this test, on a raw socket.
    let mut two = rt
        .block_on(start_peers(
            config(2),
            &a2,
            &[(1, free_addr())],
            Arc::new(|_| {}),
            stats.clone(),
        ))
        .expect("peers 2");
    two.set_byte_limit(8 << 20);
    let mut one = std::net::TcpStream::connect(&a2).expect("connect");
    one.write_all(&common::peer_hello(CLUSTER, 1))
        .expect("hello");
    one.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    // Probes until the link is up (messages before are dropped as on a
    // down link, not counted).
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seq = 0;
    loop {
        assert!(Instant::now() < deadline, "the link never came up");
        two.send(message(seq, 10));
        two.flush();
        seq += 1;
        if read_message(&mut one, &mut got).is_some() {
            break;
        }
    }
    let dropped_before = stats.peer_messages_dropped.load(Ordering::Relaxed);
    assert_eq!(dropped_before, 0);
    // "Node 1" stops reading; node 2 sends 100 MiB.
    let sent = 100;
    for i in 0..sent {
        two.send(message(1_000 + i, 1 << 20));
        two.flush();
    }
    // (The link's task may still be writing what the socket takes.)
    std::thread::sleep(Duration::from_millis(200));
    let dropped = stats.peer_messages_dropped.load(Ordering::Relaxed);
    eprintln!("{dropped} of {sent} messages of 1 MiB dropped for a peer reading nothing");
    // 8 MiB held, and what the socket buffers at both ends took.
    assert!(
        dropped >= sent / 2,
        "only {dropped} of {sent} messages of 1 MiB dropped for a peer reading nothing"
    );

    // A message larger than the limit goes whole on a link holding nothing.
    // "Node 1" reads again: what was held arrives, then the big one.
    let big = 1_000_000u64;
    let mut sent_big = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "the large message never came");
        // Taken once the held messages are written; dropped (and sent
        // again) while they are not.
        if !sent_big {
            let d = stats.peer_messages_dropped.load(Ordering::Relaxed);
            two.send(message(big, 20 << 20));
            two.flush();
            sent_big = stats.peer_messages_dropped.load(Ordering::Relaxed) == d;
        }
        let Some(m) = read_message(&mut one, &mut got) else {
            continue; // nothing within 100 ms: send again
        };
        let Body::Append {
            heartbeat, entries, ..
        } = &m.body
        else {
            panic!("unexpected {m:?}");
        };
        if *heartbeat == big {
            assert_eq!(entries[0].data.len(), 20 << 20);
            break;
        }
    }
}
