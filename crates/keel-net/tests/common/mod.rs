//! Helpers shared by the transport tests.

/// A loopback address nothing listens on right now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
}

/// A two-worker runtime, as a node's network runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The hello a peer transport's node `node_id` of cluster `cluster_id` opens
/// its connections with, in this node's peer protocol: for tests playing a
/// node on raw sockets. (Not every test binary plays one.)
#[allow(dead_code)]
pub fn peer_hello(cluster_id: u64, node_id: u64) -> Vec<u8> {
    use keel_net::codec::{self, Frame};
    let mut b = Vec::new();
    codec::encode(
        &Frame::Hello {
            cluster_id,
            node_id,
            version: codec::PEER_VERSION,
        },
        &mut b,
    );
    b
}

/// An append of cluster `cluster` from `from` to `to` carrying `heartbeat
/// = seq` and one entry of `size` bytes of `seq as u8`, for tests that
/// send numbered messages and check their order and bytes. (Not every test
/// binary sends them.)
#[allow(dead_code)]
pub fn numbered_append(
    cluster: u64,
    from: u64,
    to: u64,
    seq: u64,
    size: usize,
) -> keel_core::Message {
    use keel_core::{Body, Entry, EntryKind, Message};
    Message {
        cluster_id: cluster,
        from,
        to,
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
                data: bytes::Bytes::from(vec![seq as u8; size]),
            }],
            to_voter: true,
        },
    }
}

/// The number of a `numbered_append`.
#[allow(dead_code)]
pub fn seq_of(m: &keel_core::Message) -> u64 {
    match &m.body {
        keel_core::Body::Append { heartbeat, .. } => *heartbeat,
        other => panic!("unexpected {other:?}"),
    }
}

/// Receives `count` `numbered_append`s numbered from `first` on `received`,
/// each within `within`, checking their order and bytes (`size` each).
#[allow(dead_code)]
pub fn receive_numbered(
    received: &std::sync::mpsc::Receiver<keel_core::Message>,
    first: u64,
    count: u64,
    size: usize,
    within: std::time::Duration,
) {
    for i in 0..count {
        let m = received
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("message {i} of {count} never arrived"));
        assert_eq!(seq_of(&m), first + i, "out of order");
        match &m.body {
            keel_core::Body::Append { entries, .. } => {
                assert_eq!(entries[0].data.len(), size);
                assert!(entries[0].data.iter().all(|&b| b == (first + i) as u8));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
