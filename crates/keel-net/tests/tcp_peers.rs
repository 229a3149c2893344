//! The TCP peer transport between two nodes in one process: messages sent
//! from a plain thread (as the consensus thread does) arrive complete and in
//! order, including bursts far larger than a socket buffer (which the
//! link's task finishes writing), and after the link is re-established.

use bytes::Bytes;
use keel_core::{Body, Entry, EntryKind, Message, NodeId};
use keel_net::tcp::{start_peers, NetStats, Peers, TransportConfig};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLUSTER: u64 = 0x7e57;

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
}

fn config(id: NodeId) -> TransportConfig {
    TransportConfig {
        cluster_id: CLUSTER,
        node_id: id,
        max_frame: 64 << 20,
        peer_queue: 1 << 20,
    }
}

/// An append from 1 to 2 carrying `heartbeat = seq` and `size` payload bytes.
fn message(seq: u64, size: usize) -> Message {
    Message {
        cluster_id: CLUSTER,
        from: 1,
        to: 2,
        term: 1,
        body: Body::Append {
            prev_pos: 0,
            prev_term: 0,
            commit: 0,
            heartbeat: seq,
            entries: vec![Entry {
                term: 1,
                position: 0,
                timestamp: seq,
                kind: EntryKind::Command { client: 1, seq },
                data: Bytes::from(vec![seq as u8; size]),
            }],
        },
    }
}

fn seq_of(m: &Message) -> u64 {
    match &m.body {
        Body::Append { heartbeat, .. } => *heartbeat,
        other => panic!("unexpected {other:?}"),
    }
}

struct Pair {
    rt: tokio::runtime::Runtime,
    one: Option<Peers>,
    _two: Peers,
    received: mpsc::Receiver<Message>,
    /// Node 2's peer address.
    two_addr: String,
}

fn pair() -> Pair {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (a1, a2) = (free_addr(), free_addr());
    let (tx, received) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let stats = Arc::new(NetStats::default());
    let one = rt
        .block_on(start_peers(
            config(1),
            &a1,
            &[(2, a2.clone())],
            Arc::new(|_| {}),
            stats.clone(),
        ))
        .expect("peers 1");
    let two = rt
        .block_on(start_peers(
            config(2),
            &a2.clone(),
            &[(1, a1)],
            Arc::new(move |m| {
                let _ = tx.lock().expect("lock").send(m);
            }),
            stats,
        ))
        .expect("peers 2");
    Pair {
        rt,
        one: Some(one),
        _two: two,
        received,
        two_addr: a2,
    }
}

/// Sends probes until one arrives (messages sent while the link is down
/// are dropped); returns the next unused sequence number.
fn wait_link_up(peers: &Peers, received: &mpsc::Receiver<Message>, mut seq: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the link never came up");
        peers.send(message(seq, 1));
        peers.flush();
        seq += 1;
        if received.recv_timeout(Duration::from_millis(50)).is_ok() {
            // Drain the other probes in flight.
            while received.recv_timeout(Duration::from_millis(100)).is_ok() {}
            return seq;
        }
    }
}

#[test]
fn bursts_larger_than_the_socket_buffer_arrive_complete_and_in_order() {
    let p = pair();
    let one = p.one.as_ref().expect("peers");
    let first = wait_link_up(one, &p.received, 0);
    // 64 MiB in bursts of 8 MiB per flush: the socket takes a fraction of
    // each at once, the link's task writes the rest while more is sent.
    let (count, size) = (4096u64, 16 << 10);
    for i in 0..count {
        one.send(message(first + i, size));
        if i % 512 == 511 {
            one.flush();
        }
    }
    one.flush();
    for i in 0..count {
        let m = p
            .received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("message {i} of {count} never arrived"));
        assert_eq!(seq_of(&m), first + i, "out of order");
        match &m.body {
            Body::Append { entries, .. } => {
                assert_eq!(entries[0].data.len(), size);
                assert!(entries[0].data.iter().all(|&b| b == (first + i) as u8));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(p.rt);
}

#[test]
fn messages_flow_again_after_the_sending_side_restarts() {
    let mut p = pair();
    let first = wait_link_up(p.one.as_ref().expect("peers"), &p.received, 0);
    // Node 1's transport goes away (its link task stops and closes the
    // connection); a new one on a fresh address dials node 2 again.
    drop(p.one.take());
    let (tx, _rx) = mpsc::channel::<Message>();
    let tx = std::sync::Mutex::new(tx);
    let again =
        p.rt.block_on(start_peers(
            config(1),
            &free_addr(),
            &[(2, p.two_addr.clone())],
            Arc::new(move |m| {
                let _ = tx.lock().expect("lock").send(m);
            }),
            Arc::new(NetStats::default()),
        ))
        .expect("peers 1 again");
    let next = wait_link_up(&again, &p.received, first + 1_000);
    again.send(message(next, 100));
    again.flush();
    let m = p
        .received
        .recv_timeout(Duration::from_secs(10))
        .expect("a message after the reconnect");
    assert_eq!(seq_of(&m), next);
}
