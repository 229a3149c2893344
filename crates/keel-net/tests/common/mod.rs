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
