//! etcd's Maintenance and Cluster services on a real 3-node cluster, where
//! they must answer as etcd 3.4 does (clientv3 matches errors by their
//! text): alarm listings of one alarm type, member update (a no-op one is
//! taken, a member that does not exist and URLs another member has get
//! etcd's errors), membership changes made one after another (each answered
//! once in force), removing the leader itself, and the refusal to remove
//! the last voter. The expected texts and codes are etcd 3.4.23's answers
//! to the same requests.

mod common;

use common::TestCluster;
use keel_etcd_proto::etcdserverpb::cluster_client::ClusterClient;
use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use keel_etcd_proto::etcdserverpb::*;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// Runs `call` until it answers something other than Unavailable (no
/// leader yet, say), for up to 20 s.
async fn until_available<T, F, Fut>(what: &str, mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) if e.code() == Code::Unavailable => panic!("{what}: still {e:?} after 20 s"),
            r => return r.map(tonic::Response::into_inner),
        }
    }
}

fn sorted<const N: usize>(mut ids: [u64; N]) -> [u64; N] {
    ids.sort_unstable();
    ids
}

fn ids(members: &[Member]) -> Vec<u64> {
    let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    ids
}

#[test]
fn maintenance_and_cluster_edge_cases_answer_as_etcd() {
    // (Node 4, a spare, is added as a learner that never runs.)
    let c = TestCluster::start_with_spares(3, 1, "kv_quota_bytes = 20000\n");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let peer_url = |id: u64| format!("http://{}", c.nodes[id as usize - 1].peer);
    let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    c.rt.block_on(async {
        let channel = |id| {
            let addr = at(id);
            async move { common::etcd_channel(&addr).await }
        };
        let maint = |ch: &Channel| MaintenanceClient::new(ch.clone());
        let cluster = |ch: &Channel| ClusterClient::new(ch.clone());
        // A removal, retried while there is no leader.
        let remove = |ch: &Channel, id: u64| {
            let ch = ch.clone();
            until_available("member remove", move || {
                let mut c = ClusterClient::new(ch.clone());
                async move { c.member_remove(MemberRemoveRequest { id }).await }
            })
        };
        let (ch1, ch2) = (channel(1).await, channel(2).await);

        // Alarms: fill the quota through member 1, which raises NOSPACE.
        let kv = KvClient::new(ch1.clone());
        let mut stored = 0;
        let refusal = loop {
            assert!(stored < 40, "40 puts of 1 KB passed a 20 KB quota");
            let put = PutRequest {
                key: format!("k{stored}").into_bytes().into(),
                value: vec![b'v'; 1000].into(),
                ..Default::default()
            };
            let put = || {
                let (mut kv, put) = (kv.clone(), put.clone());
                async move { kv.put(put).await }
            };
            match until_available("put", put).await {
                Ok(_) => stored += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
        // A listing of one type holds only alarms of that type, as etcd's;
        // asked of member 2, which passes the request on to member 1.
        let list = |alarm: AlarmType| AlarmRequest {
            action: alarm_request::AlarmAction::Get as i32,
            member_id: 0,
            alarm: alarm as i32,
        };
        let nospace = AlarmMember {
            member_id: 1,
            alarm: AlarmType::Nospace as i32,
        };
        for (alarm, listed) in [
            (AlarmType::None, vec![nospace]),
            (AlarmType::Nospace, vec![nospace]),
            (AlarmType::Corrupt, vec![]),
        ] {
            let got = maint(&ch2).alarm(list(alarm)).await.expect("alarm list");
            assert_eq!(got.into_inner().alarms, listed, "listing {alarm:?}");
        }

        // Member update: Keel's URLs come from the configuration, so an
        // update to the URLs a member has is taken (as etcd takes it) and
        // the refusals are etcd's.
        let update = |id: u64, urls: &[String]| MemberUpdateRequest {
            id,
            peer_ur_ls: urls.to_vec(),
        };
        let e = cluster(&ch2)
            .member_update(update(99, &[peer_url(2)]))
            .await
            .expect_err("update of no member");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(e.message(), "etcdserver: member not found");
        let e = cluster(&ch2)
            .member_update(update(2, &[peer_url(3)]))
            .await
            .expect_err("update to another member's URL");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(e.message(), "etcdserver: Peer URLs already exists");
        let same = cluster(&ch2)
            .member_update(update(2, &[peer_url(2)]))
            .await
            .expect("update to the URLs member 2 has")
            .into_inner();
        assert_eq!(ids(&same.members), [1, 2, 3]);
        let e = cluster(&ch2)
            .member_update(update(2, &["http://127.0.0.1:1".to_string()]))
            .await
            .expect_err("a new URL");
        assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

        // Changes one after another through one client, as a script makes
        // them: each is answered once it is in force (committed), as
        // etcd's, so the next one is never refused as "already in
        // progress".
        let (a, b) = (followers[0], followers[1]);
        let lch = channel(leader).await;
        let left = remove(&lch, b).await.expect("remove a follower");
        assert_eq!(ids(&left.members), sorted([leader, a]));
        let add = |id: u64| {
            let mut c = cluster(&lch);
            let req = MemberAddRequest {
                peer_ur_ls: vec![peer_url(id)],
                is_learner: true,
            };
            async move { c.member_add(req).await }
        };
        // A removed id is never added again: etcd's answer to one.
        let e = add(b).await.expect_err("add it back at once");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(
            e.message().starts_with(&format!(
                "etcdserver: member not found (member {b:x}, id = {b} in [[peers]], was removed \
                 from the cluster and its id is never used again"
            )),
            "{e:?}"
        );
        let added = add(4).await.expect("a new id at once, as a learner");
        assert!(
            added
                .into_inner()
                .member
                .expect("the added member")
                .is_learner
        );
        let left = remove(&lch, 4).await.expect("remove the learner at once");
        assert_eq!(ids(&left.members), sorted([leader, a]));
        // Removing the leader itself, through the leader: the answer lists
        // the member left, which then leads.
        let left = remove(&lch, leader).await.expect("remove the leader");
        assert_eq!(ids(&left.members), [a]);
        let cha = channel(a).await;
        // The last voter stays, with etcd's refusal (gRPC Unknown in 3.4).
        let e = remove(&cha, a).await.expect_err("removing the last voter");
        assert_eq!(e.code(), Code::Unknown, "{e:?}");
        assert_eq!(
            e.message(),
            "etcdserver: re-configuration failed due to not enough started members"
        );
        let list = cluster(&cha)
            .member_list(MemberListRequest::default())
            .await
            .expect("member list")
            .into_inner();
        assert_eq!(ids(&list.members), [a]);
    });
}

/// A member cut off from its quorum, as etcd's: `endpoint status` lists
/// "etcdserver: no leader" among its errors, and `snapshot save` still
/// saves what the member has (a backup is what an operator takes then;
/// refused, etcdctl would retry it forever).
#[test]
fn a_member_without_a_leader_reports_it_and_still_saves_a_snapshot() {
    let mut c = TestCluster::start(3, "");
    c.wait_for_leader(Duration::from_secs(10));
    let addr = c.nodes[0].etcd.clone();
    let status = |m: &mut MaintenanceClient<Channel>| {
        let mut m = m.clone();
        async move {
            m.status(StatusRequest {})
                .await
                .expect("status")
                .into_inner()
        }
    };
    let mut m = c.rt.block_on(async {
        let ch = common::etcd_channel(&addr).await;
        let put = PutRequest {
            key: b"kept".to_vec().into(),
            value: b"1".to_vec().into(),
            ..Default::default()
        };
        let kv = KvClient::new(ch.clone());
        until_available("put", || {
            let (mut kv, put) = (kv.clone(), put.clone());
            async move { kv.put(put).await }
        })
        .await
        .expect("put");
        let mut m = MaintenanceClient::new(ch);
        let st = status(&mut m).await;
        assert!(st.leader != 0 && st.errors.is_empty(), "{st:?}");
        m
    });
    c.kill(2);
    c.kill(3);
    c.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            let st = status(&mut m).await;
            if st.leader == 0 {
                break st;
            }
            assert!(Instant::now() < deadline, "still a leader: {st:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(st.errors, ["etcdserver: no leader"], "{st:?}");

        let save = async {
            let mut stream = m
                .snapshot(SnapshotRequest {})
                .await
                .expect("snapshot without a leader")
                .into_inner();
            let (mut bytes, mut last) = (0, None);
            while let Some(piece) = stream.message().await.expect("snapshot piece") {
                bytes += piece.blob.len();
                last = Some(piece.remaining_bytes);
            }
            (bytes, last)
        };
        let (bytes, last) = tokio::time::timeout(Duration::from_secs(5), save)
            .await
            .expect("the snapshot within 5 s");
        assert!(bytes > 0, "an empty snapshot");
        assert_eq!(last, Some(0), "the stream ends with nothing remaining");
    });
}

/// etcd 3.4 takes at most one learner: a second learner's addition is
/// refused with its code and text (after the check that the URLs are
/// new), through the leader as through a follower, and taken once the
/// first is gone. And `hashkv` at a negative revision answers the hash of
/// no entries, as etcd's (1084519789, what etcd 3.4 answers whatever its
/// keys), not the current state's. Learners 3 and 4 are spares every
/// configuration lists and are never started: a learner's addition commits
/// without it. A removed learner's id is not taken again.
#[test]
fn one_learner_at_most_and_hashkv_below_zero_as_etcd() {
    let c = TestCluster::start_with_spares(2, 2, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let at = |id: u64| c.nodes[id as usize - 1].etcd.clone();
    let peer_url = |id: u64| format!("http://{}", c.nodes[id as usize - 1].peer);
    let voter = 3 - leader;
    let (x, y) = (3, 4);
    c.rt.block_on(async {
        let lch = common::etcd_channel(&at(leader)).await;
        let vch = common::etcd_channel(&at(voter)).await;
        let remove = |id: u64| {
            let ch = lch.clone();
            until_available("member remove", move || {
                let mut c = ClusterClient::new(ch.clone());
                async move { c.member_remove(MemberRemoveRequest { id }).await }
            })
        };
        let add = |ch: &Channel, id: u64| {
            let ch = ch.clone();
            let req = MemberAddRequest {
                peer_ur_ls: vec![peer_url(id)],
                is_learner: true,
            };
            until_available("member add", move || {
                let (mut c, req) = (ClusterClient::new(ch.clone()), req.clone());
                async move { c.member_add(req).await }
            })
        };

        // hashkv: a few keys, so the current state's hash is another.
        let kv = KvClient::new(lch.clone());
        for k in ["a", "b"] {
            let put = PutRequest {
                key: k.as_bytes().to_vec().into(),
                value: b"1".to_vec().into(),
                ..Default::default()
            };
            until_available("put", || {
                let (mut kv, put) = (kv.clone(), put.clone());
                async move { kv.put(put).await }
            })
            .await
            .expect("put");
        }
        let m = MaintenanceClient::new(lch.clone());
        let hash = |revision: i64| {
            let mut m = m.clone();
            async move {
                m.hash_kv(HashKvRequest { revision })
                    .await
                    .expect("hashkv")
                    .into_inner()
            }
        };
        let (now, below) = (hash(0).await, hash(-1).await);
        assert_eq!(below.hash, 1_084_519_789, "{below:?}");
        assert_eq!(hash(-100).await.hash, 1_084_519_789);
        assert_ne!(now.hash, below.hash, "{now:?}");
        assert_eq!(below.compact_revision, now.compact_revision);

        // Learners: one, then no second until the first is gone.
        let added = add(&lch, x).await.expect("a first learner");
        assert!(added.member.expect("the added member").is_learner);
        // Through a follower, which passes it on to the leader, and
        // through the leader: etcd's refusal either way.
        for ch in [&vch, &lch] {
            let e = add(ch, y).await.expect_err("a second learner");
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert_eq!(
                e.message(),
                "etcdserver: too many learner members in cluster"
            );
        }
        // The URLs are checked first, as etcd does.
        let e = add(&lch, x).await.expect_err("the learner again");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(e.message(), "etcdserver: Peer URLs already exists");
        remove(x).await.expect("remove the learner");
        let e = add(&lch, x).await.expect_err("the removed learner again");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        let added = add(&vch, y)
            .await
            .expect("a learner, once the first is gone");
        assert!(added.member.expect("the added member").is_learner);
        let list = ClusterClient::new(lch.clone())
            .member_list(MemberListRequest::default())
            .await
            .expect("member list")
            .into_inner();
        assert_eq!(ids(&list.members), sorted([leader, voter, y]));
    });
}
