//! Checks the generated gRPC surface: etcd's service names and method paths,
//! server traits with default `Unimplemented` methods, and an in-process
//! round trip over tonic's TCP transport (server and client features).

use keel_etcd_proto::etcdserverpb::{
    cluster_server::{Cluster, ClusterServer},
    kv_client::KvClient,
    kv_server::{Kv, KvServer},
    lease_server::{Lease, LeaseServer},
    maintenance_client::MaintenanceClient,
    maintenance_server::{Maintenance, MaintenanceServer},
    watch_client::WatchClient,
    watch_server::{Watch, WatchServer},
    RangeRequest, RangeResponse, ResponseHeader, StatusRequest, WatchRequest, WatchResponse,
};
use keel_etcd_proto::mvccpb::KeyValue;
use tonic::codegen::tokio_stream::{self, StreamExt};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

/// Implements only Range and Watch; everything else uses the default stubs.
#[derive(Default)]
struct Fake;

#[tonic::async_trait]
impl Kv for Fake {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(RangeResponse {
            header: Some(ResponseHeader {
                revision: 42,
                ..Default::default()
            }),
            kvs: vec![KeyValue {
                key: req.key,
                value: "v".into(),
                ..Default::default()
            }],
            more: false,
            count: 1,
        }))
    }
}

#[tonic::async_trait]
impl Watch for Fake {
    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<WatchResponse>>, Status> {
        // Answer the first request on the stream with a "created" response.
        let first = req.into_inner().message().await?;
        if first.is_none() {
            return Err(Status::cancelled("stream closed before a request"));
        }
        let created = WatchResponse {
            watch_id: 9,
            created: true,
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(created)]))))
    }
}

impl Lease for Fake {}
impl Cluster for Fake {}
impl Maintenance for Fake {}

#[test]
fn service_names_match_etcd() {
    assert_eq!(<KvServer<Fake> as NamedService>::NAME, "etcdserverpb.KV");
    assert_eq!(
        <WatchServer<Fake> as NamedService>::NAME,
        "etcdserverpb.Watch"
    );
    assert_eq!(
        <LeaseServer<Fake> as NamedService>::NAME,
        "etcdserverpb.Lease"
    );
    assert_eq!(
        <ClusterServer<Fake> as NamedService>::NAME,
        "etcdserverpb.Cluster"
    );
    assert_eq!(
        <MaintenanceServer<Fake> as NamedService>::NAME,
        "etcdserverpb.Maintenance"
    );
}

#[test]
fn method_paths_match_etcd() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    let expected = [
        "KV/Range",
        "KV/Put",
        "KV/DeleteRange",
        "KV/Txn",
        "KV/Compact",
        "Watch/Watch",
        "Lease/LeaseGrant",
        "Lease/LeaseRevoke",
        "Lease/LeaseKeepAlive",
        "Lease/LeaseTimeToLive",
        "Lease/LeaseLeases",
        "Cluster/MemberAdd",
        "Cluster/MemberRemove",
        "Cluster/MemberUpdate",
        "Cluster/MemberList",
        "Cluster/MemberPromote",
        "Maintenance/Alarm",
        "Maintenance/Status",
        "Maintenance/Defragment",
        "Maintenance/Hash",
        "Maintenance/HashKV",
        "Maintenance/Snapshot",
        "Maintenance/MoveLeader",
    ];
    for m in expected {
        let path = format!("\"/etcdserverpb.{m}\"");
        assert!(generated.contains(&path), "missing method path {path}");
    }
}

#[tokio::test]
async fn round_trip_over_tcp() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(KvServer::new(Fake))
            .add_service(WatchServer::new(Fake))
            .add_service(MaintenanceServer::new(Fake))
            .serve_with_incoming(incoming),
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let resp = KvClient::new(channel.clone())
        .range(RangeRequest {
            key: "foo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.header.unwrap().revision, 42);
    assert_eq!(&resp.kvs[0].key[..], b"foo");

    let mut watch = WatchClient::new(channel.clone())
        .watch(tokio_stream::iter(vec![WatchRequest::default()]))
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(first.created);
    assert_eq!(first.watch_id, 9);

    // Not overridden: the default stub answers Unimplemented.
    let err = MaintenanceClient::new(channel)
        .status(StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    server.abort();
}
