//! Bad input on the etcd API port of a real node: garbage bytes, a cut-off
//! HTTP/2 preface, oversized requests, out-of-range enums, empty keys and
//! misuse of put options get etcd's errors (or a closed connection), and
//! the node keeps serving with every acknowledged write intact.

mod common;

use common::TestCluster;
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::*;
use std::io::Write;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

async fn connect(addr: &str) -> KvClient<Channel> {
    KvClient::new(common::etcd_channel(addr).await).max_encoding_message_size(16 << 20)
}

fn put_req(k: &[u8], v: Vec<u8>) -> PutRequest {
    PutRequest {
        key: k.to_vec().into(),
        value: v.into(),
        ..Default::default()
    }
}

#[test]
fn bad_requests_get_etcds_errors_and_the_node_keeps_serving() {
    let c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    let addr = c.nodes[1].etcd.clone();

    // Raw garbage and a cut-off HTTP/2 preface: that connection is closed.
    for junk in [
        &b"\x00\x01\x02garbage that is not HTTP/2 at all\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n"[..],
        &[0xff; 4096][..],
    ] {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let _ = s.write_all(junk);
        drop(s);
    }

    c.rt.block_on(async {
        let mut kv = connect(&addr).await;
        kv.put(put_req(b"before", b"1".to_vec()))
            .await
            .expect("put");

        let status = |r: Result<tonic::Response<PutResponse>, tonic::Status>| {
            r.expect_err("must be refused")
        };
        // Over etcd's 1.5 MiB request limit.
        let e = status(kv.put(put_req(b"big", vec![7; 2 << 20])).await);
        assert!(
            matches!(
                e.code(),
                Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
            ),
            "{e:?}"
        );
        let e = status(kv.put(put_req(b"big", vec![7; 1600 * 1024])).await);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(e.message(), "etcdserver: request is too large");
        // Empty key.
        let e = status(kv.put(put_req(b"", b"x".to_vec())).await);
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(e.message(), "etcdserver: key is not provided");
        // ignore_value with a value; ignore_lease on a missing key.
        let mut p = put_req(b"before", b"x".to_vec());
        p.ignore_value = true;
        let e = status(kv.put(p).await);
        assert_eq!(e.message(), "etcdserver: value is provided");
        let mut p = put_req(b"missing", Vec::new());
        p.ignore_lease = true;
        let e = status(kv.put(p).await);
        assert_eq!(e.message(), "etcdserver: key not found");
        // A lease that does not exist.
        let mut p = put_req(b"k", b"v".to_vec());
        p.lease = 12345;
        let e = status(kv.put(p).await);
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "etcdserver: requested lease not found");
        // Out-of-range enums and a future revision.
        let e = kv
            .range(RangeRequest {
                key: "a".into(),
                sort_order: 9,
                ..Default::default()
            })
            .await
            .expect_err("bad sort order");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = kv
            .range(RangeRequest {
                key: "a".into(),
                revision: 1_000_000,
                ..Default::default()
            })
            .await
            .expect_err("future revision");
        assert_eq!(e.code(), Code::OutOfRange);
        assert_eq!(
            e.message(),
            "etcdserver: mvcc: required revision is a future revision"
        );
        // A txn operation with no request in it.
        let e = kv
            .txn(TxnRequest {
                success: vec![RequestOp { request: None }],
                ..Default::default()
            })
            .await
            .expect_err("empty op");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

        // Nothing above changed anything, and the node still serves.
        kv.put(put_req(b"after", b"2".to_vec())).await.expect("put");
        let r = kv
            .range(RangeRequest {
                key: "\0".into(),
                range_end: vec![0].into(),
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner();
        let keys: Vec<&[u8]> = r.kvs.iter().map(|kv| &kv.key[..]).collect();
        assert_eq!(keys, [&b"after"[..], &b"before"[..]]);
        assert_eq!(r.kvs[1].value, &b"1"[..]);
    });
}
