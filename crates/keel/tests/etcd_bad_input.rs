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

/// The space quota over raw gRPC on a 3-node cluster (runs without
/// etcdctl): a put past it gets etcd's ResourceExhausted error and raises
/// the receiving member's NOSPACE alarm, which every member lists (alarms
/// are per member, so a member asks the others, as etcdctl round-robins
/// over endpoints); a disarm sent to another member lowers it there, and
/// each member counts its refusals in `keel_admission_refusals_total`.
#[test]
fn space_quota_alarms_are_listed_and_disarmed_from_any_member() {
    use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    let (c, http) = TestCluster::start_with_http(3, "kv_quota_bytes = 20000\n");
    c.wait_for_leader(Duration::from_secs(10));
    let ids: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
    let nospace = |member_id| AlarmMember {
        member_id,
        alarm: AlarmType::Nospace as i32,
    };
    c.rt.block_on(async {
        let mut maint = Vec::new();
        for n in &c.nodes {
            maint.push(MaintenanceClient::new(common::etcd_channel(&n.etcd).await));
        }
        let get = AlarmRequest {
            action: alarm_request::AlarmAction::Get as i32,
            ..Default::default()
        };
        let list = |m: &MaintenanceClient<Channel>| {
            let mut m = m.clone();
            async move { m.alarm(get).await.expect("alarm list").into_inner().alarms }
        };
        assert_eq!(list(&maint[1]).await, []);

        // Fill the quota through member 0 (a put finding no leader yet is
        // retried; the refusal must come within 40 puts of 1 KB).
        let mut kv = connect(&c.nodes[0].etcd).await;
        let mut stored = 0;
        let refusal = loop {
            assert!(stored < 40, "40 puts of 1 KB passed a 20 KB quota");
            match kv
                .put(put_req(format!("k{stored}").as_bytes(), vec![b'v'; 1000]))
                .await
            {
                Ok(_) => stored += 1,
                Err(e) if e.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => break e,
            }
        };
        assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
        assert_eq!(
            refusal.message(),
            "etcdserver: mvcc: database space exceeded"
        );
        assert!((15..=19).contains(&stored), "{stored} puts stored");

        // Every member lists member 0's alarm.
        for m in &maint {
            assert_eq!(list(m).await, [nospace(ids[0])]);
        }
        // A refusal on member 2 raises its alarm too (after a linearizable
        // read through it: it has applied every put, so its estimate is
        // as full as member 0's).
        let mut kv2 = connect(&c.nodes[2].etcd).await;
        kv2.range(RangeRequest {
            key: b"k0".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect("read through member 2");
        let e = kv2
            .put(put_req(b"more", vec![b'v'; 1000]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert_eq!(list(&maint[1]).await, [nospace(ids[0]), nospace(ids[2])]);
        // Each member counts the writes it refused.
        for (addr, refused) in http.iter().zip([1.0, 0.0, 1.0]) {
            let (code, text) = common::http_get(addr, "/metrics");
            assert_eq!(code, 200, "{text}");
            let counted = common::metric(&text, "keel_admission_refusals_total");
            assert_eq!(counted, Some(refused), "{addr}");
        }

        // Disarming member 0's alarm on member 1 lowers it on member 0.
        let disarm = |member_id| AlarmRequest {
            action: alarm_request::AlarmAction::Deactivate as i32,
            member_id,
            alarm: AlarmType::Nospace as i32,
        };
        let lowered = maint[1].alarm(disarm(ids[0])).await.expect("disarm");
        assert_eq!(lowered.into_inner().alarms, [nospace(ids[0])]);
        assert_eq!(list(&maint[0]).await, [nospace(ids[2])]);
        // Member 0 (the whole cluster) lowers the rest.
        let lowered = maint[0].alarm(disarm(0)).await.expect("disarm all");
        assert_eq!(lowered.into_inner().alarms, [nospace(ids[2])]);
        assert_eq!(list(&maint[2]).await, []);
        // Raising one by hand is refused.
        let activate = AlarmRequest {
            action: alarm_request::AlarmAction::Activate as i32,
            ..disarm(ids[1])
        };
        let e = maint[1].alarm(activate).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        // Reads go on.
        let got = kv
            .range(RangeRequest {
                key: b"k0".to_vec().into(),
                ..Default::default()
            })
            .await
            .expect("get");
        assert_eq!(got.into_inner().kvs[0].value.as_ref(), &[b'v'; 1000][..]);
    });
}

/// MoveLeader answers once the target leads, as etcd's does (etcdctl then
/// prints that leadership moved); a transfer to a member that is down fails
/// with etcd's code and message for a transfer that took too long.
#[test]
fn move_leader_answers_once_the_target_leads_or_times_out_like_etcd() {
    use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    let mut c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let target = (1..=3).find(|&id| id != leader).expect("a follower");
    let down = (1..=3)
        .find(|&id| id != leader && id != target)
        .expect("another");
    let endpoint = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let (leader_at, target_at) = (endpoint(leader), endpoint(target));
    c.rt.block_on(async {
        let mut m = MaintenanceClient::new(common::etcd_channel(&leader_at).await);
        m.move_leader(MoveLeaderRequest { target_id: target })
            .await
            .expect("move leader");
        let mut t = MaintenanceClient::new(common::etcd_channel(&target_at).await);
        let status = t
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(status.leader, target, "answered before the target led");
    });
    c.kill(down);
    c.rt.block_on(async {
        let mut t = MaintenanceClient::new(common::etcd_channel(&target_at).await);
        let e = t
            .move_leader(MoveLeaderRequest { target_id: down })
            .await
            .expect_err("a transfer to a stopped member");
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert_eq!(
            e.message(),
            "etcdserver: request timed out, leader transfer took too long"
        );
    });
}
