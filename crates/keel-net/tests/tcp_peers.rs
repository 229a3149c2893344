//! The TCP peer transport between two nodes in one process: messages sent
//! from a plain thread (as the consensus thread does) arrive complete and in
//! order, including bursts far larger than a socket buffer (which the
//! link's task finishes writing), and after the link is re-established.

mod common;
use common::{free_addr, numbered_append, receive_numbered, runtime, seq_of};
use keel_core::{Body, Message, NodeId};
use keel_net::codec::{self, Frame};
use keel_net::tcp::{start_peers, NetStats, Peers, TransportConfig};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLUSTER: u64 = 0x7e57;

fn config(id: NodeId) -> TransportConfig {
    TransportConfig {
        cluster_id: CLUSTER,
        node_id: id,
        max_frame: 64 << 20,
        peer_queue: 1 << 20,
        tls: None,
        handshakes: None,
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
    let rt = runtime();
    let a2 = free_addr();
    let (one, _, _) = dialing_one(&rt, &a2);
    let (tx, received) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let two = rt
        .block_on(start_peers(
            config(2),
            &a2,
            &[(1, free_addr())],
            Arc::new(move |m| {
                let _ = tx.lock().expect("lock").send(m);
            }),
            Arc::new(NetStats::default()),
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
    receive_numbered(&p.received, first, count, size, Duration::from_secs(20));
    drop(p.rt);
}

#[test]
fn messages_flow_again_after_the_sending_side_restarts() {
    let mut p = pair();
    let first = wait_link_up(p.one.as_ref().expect("peers"), &p.received, 0);
    // Node 1's transport goes away (its link task stops and closes the
    // connection); a new one on a fresh address dials node 2 again.
    drop(p.one.take());
    let (again, _, _) = dialing_one(&p.rt, &p.two_addr);
    let next = wait_link_up(&again, &p.received, first + 1_000);
    again.send(message(next, 100));
    again.flush();
    let m = p
        .received
        .recv_timeout(Duration::from_secs(10))
        .expect("a message after the reconnect");
    assert_eq!(seq_of(&m), next);
}

/// Node 2's transport, which accepts node 1's connections (the lower id
/// dials), its address and its counters; this test plays node 1 on raw
/// sockets.
fn accepting_two(rt: &tokio::runtime::Runtime) -> (String, Peers, Arc<NetStats>) {
    let a2 = free_addr();
    let stats = Arc::new(NetStats::default());
    let two = rt
        .block_on(start_peers(
            config(2),
            &a2,
            &[(1, free_addr())],
            Arc::new(|_| {}),
            stats.clone(),
        ))
        .expect("peers 2");
    (a2, two, stats)
}

/// An append from 1 to 2 carrying `heartbeat = seq` and `size` payload bytes.
fn message(seq: u64, size: usize) -> Message {
    numbered_append(CLUSTER, 1, 2, seq, size)
}

/// Node 1's hello, from a raw socket.
fn hello_of_one() -> Vec<u8> {
    common::peer_hello(CLUSTER, 1)
}

/// `message(seq, size)` from node 2 to node 1.
fn to_one(seq: u64, size: usize) -> Message {
    let mut m = message(seq, size);
    (m.from, m.to) = (2, 1);
    m
}

/// A "node 1" connected to node 2 at `a2` that said hello and never
/// reads, with node 2's link to it stuck writing: its socket is full.
fn stuck_one(a2: &str, two: &Peers) -> std::net::TcpStream {
    use std::io::Write;
    let mut stuck = std::net::TcpStream::connect(a2).expect("connect");
    stuck.write_all(&hello_of_one()).expect("hello");
    // 64 MiB, far more than loopback buffers hold.
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..64u64 {
        assert!(Instant::now() < deadline, "never got to fill the socket");
        two.send(to_one(i, 1 << 20));
        two.flush();
        std::thread::sleep(Duration::from_millis(5));
    }
    stuck
}

/// A peer that stopped reading (a partition: its socket buffers full, no
/// reset) must not keep its newer connection waiting: the accepting side
/// switches to the replacement even while a write to the old one is stuck.
#[test]
fn a_replacement_connection_wins_over_one_stuck_writing() {
    use std::io::{Read, Write};
    let rt = runtime();
    let (a2, two, _) = accepting_two(&rt);
    let stuck = stuck_one(&a2, &two);
    // Node 1 comes back on a new connection and reads.
    let mut fresh = std::net::TcpStream::connect(&a2).expect("connect again");
    fresh.write_all(&hello_of_one()).expect("hello");
    fresh
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let marker = 1_000_000u64;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    'wait: loop {
        assert!(
            Instant::now() < deadline,
            "the replacement connection never got a message"
        );
        two.send(to_one(marker, 10));
        two.flush();
        match fresh.read(&mut buf) {
            Ok(0) => panic!("the replacement connection was closed"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => continue, // timed out: send another marker
        }
        while let Some((f, n)) = codec::decode(&got, 64 << 20).expect("decode") {
            got.drain(..n);
            if let Frame::Peer(m) = f {
                if seq_of(&m) == marker {
                    break 'wait;
                }
            }
        }
    }
    drop(stuck);
}

/// A transport dropped (its node stopping) while a write to a peer that
/// stopped reading is stuck ends that link once its grace for what it
/// holds (200 ms) is over, not when TCP gives up on the peer, on the
/// accepting side (which also lets its listening address go) and on the
/// dialing side.
#[test]
fn a_dropped_transport_ends_links_stuck_writing_and_frees_its_address() {
    let rt = runtime();
    let gone = |stats: &NetStats, peer: NodeId| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.peer_protocols() != vec![(peer, 0)] {
            assert!(Instant::now() < deadline, "the stuck link is still up");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Stuck indeed: the link held 8 MiB the socket did not take.
    let stuck_writing = |stats: &NetStats| {
        assert!(stats.peer_messages_dropped.load(Ordering::Relaxed) > 0);
    };
    // Node 2 accepting a node 1 that does not read.
    let (a2, mut two, stats) = accepting_two(&rt);
    two.set_byte_limit(8 << 20);
    let stuck = stuck_one(&a2, &two);
    assert_eq!(stats.peer_protocols(), vec![(1, codec::PEER_VERSION)]);
    stuck_writing(&stats);
    drop(two);
    gone(&stats, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::net::TcpListener::bind(&a2) {
        assert!(Instant::now() < deadline, "{a2} is still taken: {e}");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stuck);
    // Node 1 dialing a node 2 that does not read.
    let fake = fake_node(|_| Take::Deaf);
    let (mut one, received, stats) = dialing_one(&rt, &fake.addr);
    one.set_byte_limit(8 << 20);
    received
        .recv_timeout(Duration::from_secs(10))
        .expect("the fake node's vote never came");
    for i in 0..64u64 {
        one.send(message(i, 1 << 20));
        one.flush();
    }
    assert_eq!(stats.peer_protocols(), vec![(2, codec::PEER_VERSION)]);
    stuck_writing(&stats);
    drop(one);
    gone(&stats, 2);
    drop(rt);
}

/// A vote from `from` to `to` that says entry 40 of term 2 is committed.
fn vote(from: NodeId, to: NodeId) -> Message {
    Message {
        cluster_id: CLUSTER,
        from,
        to,
        term: 3,
        body: Body::VoteResp {
            granted: true,
            amnesic: false,
            committed: (40, 2),
        },
    }
}

/// Reads whole frames from `s` into `got` until one is there: its version
/// byte and the frame. `None` if the connection closed first.
fn read_frame(s: &mut std::net::TcpStream, got: &mut Vec<u8>) -> Option<(u8, Frame)> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        if let Some((f, n)) = codec::decode(got, 64 << 20).expect("a frame") {
            let version = got[4];
            got.drain(..n);
            return Some((version, f));
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// What a fake node 2 does with a hello offering a version.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Take {
    /// Closes the connection without a word, as a node older than the
    /// offer does.
    Refuse,
    /// Speaks the offer without answering, as a node of version 4 or 5
    /// does with its own.
    Unanswered,
    /// Answers with a hello of this version and speaks it.
    Answer(u8),
    /// Reads the hello and says nothing, until the connection closes.
    Silent,
    /// Answers in the offer, sends its vote and then reads nothing more
    /// (a stalled process), holding the connection open.
    Deaf,
}

/// A fake node 2, accepting node 1's connections and doing with each
/// hello what `take` says for the version it offers. On a connection it
/// speaks on, it sends one `vote` of its own in that version and hands on
/// each peer message with the version its frame carried.
struct FakeNode {
    addr: String,
    /// The versions offered, in order, and what was done with each.
    offers: Arc<std::sync::Mutex<Vec<(u8, Take)>>>,
    messages: mpsc::Receiver<(u8, Message)>,
    /// When a silent connection was closed by node 1.
    silent_closed: mpsc::Receiver<Instant>,
}

fn fake_node(take: impl Fn(u8) -> Take + Send + 'static) -> FakeNode {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let offers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, messages) = mpsc::channel();
    let (closed_tx, silent_closed) = mpsc::channel();
    let seen = offers.clone();
    std::thread::spawn(move || {
        let mut deaf = Vec::new();
        for s in listener.incoming() {
            let mut s = s.expect("accept");
            let mut got = Vec::new();
            let offer = match read_frame(&mut s, &mut got) {
                Some((
                    v,
                    Frame::Hello {
                        cluster_id: CLUSTER,
                        node_id: 1,
                        version,
                    },
                )) => {
                    assert_eq!(v, version);
                    v
                }
                other => panic!("expected node 1's hello, got {other:?}"),
            };
            let took = take(offer);
            seen.lock().expect("lock").push((offer, took));
            let version = match took {
                Take::Refuse => continue, // closed
                Take::Silent => {
                    let mut rest = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut s, &mut rest);
                    let _ = closed_tx.send(Instant::now());
                    continue;
                }
                Take::Unanswered => offer,
                Take::Answer(_) | Take::Deaf => {
                    let v = match took {
                        Take::Answer(v) => v,
                        _ => offer,
                    };
                    let mut answer = Vec::new();
                    codec::encode(
                        &Frame::Hello {
                            cluster_id: CLUSTER,
                            node_id: 2,
                            version: v,
                        },
                        &mut answer,
                    );
                    s.write_all(&answer).expect("answer");
                    v
                }
            };
            let mut mine = Vec::new();
            codec::encode_message(&vote(2, 1), version, &mut mine);
            s.write_all(&mine).expect("write");
            if took == Take::Deaf {
                deaf.push(s);
                continue;
            }
            while let Some((v, f)) = read_frame(&mut s, &mut got) {
                match f {
                    Frame::Peer(m) => {
                        if tx.send((v, m)).is_err() {
                            return;
                        }
                    }
                    other => panic!("{other:?} after the hello"),
                }
            }
        }
    });
    FakeNode {
        addr,
        offers,
        messages,
        silent_closed,
    }
}

/// `vote(from, to)` as a link of peer protocol `version` carries it.
fn vote_in(from: NodeId, to: NodeId, version: u8) -> Message {
    let mut m = vote(from, to);
    if let Body::VoteResp { committed, .. } = &mut m.body {
        if version < 5 {
            *committed = (0, 0);
        }
    }
    m
}

/// Node 1's transport, which dials node 2 at `two`, the messages it
/// receives, and its counters.
fn dialing_one(
    rt: &tokio::runtime::Runtime,
    two: &str,
) -> (Peers, mpsc::Receiver<Message>, Arc<NetStats>) {
    let (tx, received) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let stats = Arc::new(NetStats::default());
    let one = rt
        .block_on(start_peers(
            config(1),
            &free_addr(),
            &[(2, two.to_string())],
            Arc::new(move |m| {
                let _ = tx.lock().expect("lock").send(m);
            }),
            stats.clone(),
        ))
        .expect("peers 1");
    (one, received, stats)
}

/// Node 1 dials the fake node 2: the versions it offered and what the
/// fake did with each, once a vote has crossed the link both ways, and
/// the version node 1's vote came in.
fn dial_fake(take: impl Fn(u8) -> Take + Send + 'static) -> (Vec<(u8, Take)>, u8) {
    let rt = runtime();
    let fake = fake_node(take);
    let (one, received, stats) = dialing_one(&rt, &fake.addr);
    let got = received
        .recv_timeout(Duration::from_secs(10))
        .expect("the fake node's vote never came");
    let offers = fake.offers.lock().expect("lock").clone();
    let (_, took) = *offers.last().expect("an offer");
    let version = match took {
        Take::Answer(v) => v,
        _ => offers.last().expect("an offer").0,
    };
    assert_eq!(got, vote_in(2, 1, version));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (sent_in, m) = loop {
        assert!(Instant::now() < deadline, "node 1's vote never came");
        one.send(vote(1, 2));
        one.flush();
        if let Ok(x) = fake.messages.recv_timeout(Duration::from_millis(50)) {
            break x;
        }
    };
    assert_eq!(m, vote_in(1, 2, sent_in));
    // (What the metric `keel_peer_protocol` shows.)
    assert_eq!(stats.peer_protocols(), vec![(2, sent_in)]);
    drop(one);
    drop(rt);
    (offers, sent_in)
}

/// Rolling upgrades: a node dialing one of an older peer protocol is
/// refused its own version (twice: once could be a node of its version
/// stopping mid-hello) and steps down until one is taken, then speaks it
/// both ways: to a node of 4, its votes go without what 4 cannot carry.
#[test]
fn a_link_to_a_node_of_an_older_protocol_speaks_its_version() {
    use Take::*;
    let only = |old: u8| move |v: u8| if v == old { Unanswered } else { Refuse };
    assert_eq!(
        dial_fake(only(5)),
        (vec![(6, Refuse), (6, Refuse), (5, Unanswered)], 5)
    );
    assert_eq!(
        dial_fake(only(4)),
        (
            vec![
                (6, Refuse),
                (6, Refuse),
                (5, Refuse),
                (5, Refuse),
                (4, Unanswered)
            ],
            4
        )
    );
}

/// A dialing node speaks the version the answer to its hello names: its
/// own from a node of its version, an older one if the answer says so.
#[test]
fn a_dialing_node_speaks_the_version_it_is_answered_with() {
    assert_eq!(
        dial_fake(|_| Take::Answer(6)),
        (vec![(6, Take::Answer(6))], 6)
    );
    assert_eq!(
        dial_fake(|_| Take::Answer(5)),
        (vec![(6, Take::Answer(5))], 5)
    );
}

/// A node shutting down while its hello waits for an answer closes the
/// connection then, not when the wait for the answer (5 s) runs out.
#[test]
fn a_hello_waiting_for_its_answer_ends_with_the_transport() {
    let rt = runtime();
    let fake = fake_node(|_| Take::Silent);
    let (one, _, _) = dialing_one(&rt, &fake.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.offers.lock().expect("lock").is_empty() {
        assert!(Instant::now() < deadline, "no hello came");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dropped = Instant::now();
    drop(one);
    let closed = fake
        .silent_closed
        .recv_timeout(Duration::from_secs(10))
        .expect("the connection was never closed");
    assert!(
        closed.duration_since(dropped) < Duration::from_secs(4),
        "closed {:?} after the transport was dropped: at the answer's timeout",
        closed.duration_since(dropped)
    );
    drop(rt);
}

/// This node's side of a connection `offer`ing a version, from node 1 to
/// an accepting node 2 at `addr`: the answer to its hello, if one came
/// before the first peer message, and that message with its version.
fn dial_offering(addr: &str, offer: u8, two: &Peers) -> (Option<(u8, Frame)>, (u8, Message)) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let mut hello = Vec::new();
    codec::encode(
        &Frame::Hello {
            cluster_id: CLUSTER,
            node_id: 1,
            version: offer,
        },
        &mut hello,
    );
    s.write_all(&hello).expect("hello");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut answer = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "node 2 never sent a message");
        two.send(vote(2, 1));
        two.flush();
        match read_frame(&mut s, &mut got) {
            Some((v, Frame::Peer(m))) => return (answer, (v, m)),
            Some((v, f)) => {
                assert!(answer.is_none(), "a second hello: {f:?}");
                answer = Some((v, f));
            }
            None => {} // timed out (a read timeout ends `read_frame` too)
        }
    }
}

/// Node 2 accepts: a dialer of version 6 is answered in 6; one of a newer
/// version (its hello's layout never changes) is answered in this node's
/// 6 and spoken to in it; one of 5 or 4 is not answered (it would not
/// expect an answer) and is spoken to in its own version, its votes
/// without what 4 cannot carry.
#[test]
fn an_accepting_node_answers_in_the_version_the_link_speaks() {
    let rt = runtime();
    let (a2, two, _) = accepting_two(&rt);
    let answer = |v| {
        Some((
            v,
            Frame::Hello {
                cluster_id: CLUSTER,
                node_id: 2,
                version: v,
            },
        ))
    };
    let claimed = vote(2, 1);
    let mut unclaimed = vote(2, 1);
    if let Body::VoteResp { committed, .. } = &mut unclaimed.body {
        *committed = (0, 0);
    }
    assert_eq!(
        dial_offering(&a2, 6, &two),
        (answer(6), (6, claimed.clone()))
    );
    assert_eq!(
        dial_offering(&a2, 9, &two),
        (answer(6), (6, claimed.clone()))
    );
    assert_eq!(dial_offering(&a2, 5, &two), (None, (5, claimed)));
    assert_eq!(dial_offering(&a2, 4, &two), (None, (4, unclaimed)));
    drop(two);
    drop(rt);
}

/// A peer that refuses every version (one older than 4, or one that
/// refuses this node: another cluster's) is offered each version twice,
/// newest first, then again after the link's backoff, which grows: not
/// every 20 ms for good.
#[test]
fn a_peer_refusing_every_version_is_offered_them_in_turn_with_backoff() {
    let rt = runtime();
    let fake = fake_node(|_| Take::Refuse);
    let (one, _, stats) = dialing_one(&rt, &fake.addr);
    std::thread::sleep(Duration::from_secs(3));
    drop(one);
    let offers: Vec<u8> = fake
        .offers
        .lock()
        .expect("lock")
        .iter()
        .map(|&(v, _)| v)
        .collect();
    assert!(offers.len() >= 12, "{offers:?}");
    assert_eq!(&offers[..12], &[6, 6, 5, 5, 4, 4, 6, 6, 5, 5, 4, 4]);
    // Six offers 20 ms apart per round, then 40, 80, 160, 320, 640 ms,
    // 1 s: some seven rounds in 3 s, against some 150 offers without it.
    assert!(
        offers.len() <= 60,
        "{} offers in 3 s: {offers:?}",
        offers.len()
    );
    // Closed, the link says it is down (it may have been up at 5 or 4 a
    // moment before the fake node closed it).
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.peer_protocols() != vec![(2, 0)] {
        assert!(Instant::now() < deadline, "{:?}", stats.peer_protocols());
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(rt);
}
