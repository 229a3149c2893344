//! Three nodes in one process over the in-memory transport (the same
//! `PeerSender` interface as TCP): writes, reads, and a leader cut off from
//! the others being replaced, with every acknowledged write kept.

use bytes::Bytes;
use keel_client::{Client, ClientOptions};
use keel_kv::{Command, KvService, Query, Response};
use keel_net::mem::MemNetwork;
use keel_node::runtime::{start_with, Transport};
use keel_node::{NodeConfig, NodeHandle, PeerConfig};
use std::time::{Duration, Instant};

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("127.0.0.1:{}", l.local_addr().expect("addr").port())
}

fn wait_leader(nodes: &[NodeHandle], isolated: Option<u64>) -> u64 {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let leader = nodes
            .iter()
            .map(NodeHandle::status)
            .filter(|s| s.role == "leader" && Some(s.id) != isolated)
            .max_by_key(|s| s.term)
            .map(|s| s.id);
        if let Some(l) = leader {
            return l;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no leader within 10 s");
}

#[test]
fn three_nodes_in_one_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let net = MemNetwork::new();
    let clients: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let cfg = NodeConfig {
            id,
            cluster_id: 7,
            data_dir: tmp.path().join(format!("n{id}")),
            peer_addr: "memory:0".into(),
            client_addr: clients[(id - 1) as usize].clone(),
            http_addr: None,
            etcd_addr: None,
            durability: Default::default(),
            service: "kv".into(),
            heartbeat_ms: 20,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_every_bytes: 1 << 20,
            queue_depth: 1024,
            max_request_bytes: 1 << 20,
            join: false,
            peers: (1..=3u64)
                .filter(|&p| p != id)
                .map(|p| PeerConfig {
                    id: p,
                    peer_addr: "memory:0".into(),
                    client_addr: clients[(p - 1) as usize].clone(),
                    etcd_addr: None,
                })
                .collect(),
        };
        let service = Box::new(KvService::default());
        nodes.push(start_with(cfg, service, Transport::Memory(net.clone())).expect("start"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut client = Client::new(ClientOptions::new(clients.clone())).expect("client");
    let put = |client: &mut Client, k: &str| {
        let cmd = Command::Put {
            key: Bytes::from(k.to_string()),
            value: Bytes::from_static(b"v"),
        };
        let r = rt.block_on(client.write(cmd.encode())).expect("put");
        assert!(matches!(Response::decode(&r), Ok(Response::Put { .. })));
    };
    let first = wait_leader(&nodes, None);
    for i in 0..20 {
        put(&mut client, &format!("a{i}"));
    }
    net.isolate(first);
    let second = wait_leader(&nodes, Some(first));
    assert_ne!(first, second);
    for i in 0..20 {
        put(&mut client, &format!("b{i}"));
    }
    net.heal();
    let keys = (0..20)
        .map(|i| format!("a{i}"))
        .chain((0..20).map(|i| format!("b{i}")));
    for k in keys {
        let q = Query::Get {
            key: Bytes::from(k.clone()),
        };
        let r = rt.block_on(client.read(q.encode())).expect("get");
        match Response::decode(&r) {
            Ok(Response::Get { kv: Some(kv), .. }) => assert_eq!(&kv.value[..], b"v"),
            other => panic!("{k}: {other:?}"),
        }
    }
    for n in &nodes {
        n.shutdown();
    }
    for n in nodes {
        n.wait().expect("clean stop");
    }
}
