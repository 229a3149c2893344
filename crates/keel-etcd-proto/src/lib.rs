//! etcd v3 API wire contract for Keel.
//!
//! This crate owns Keel's own `.proto` definitions of etcd's v3 client API
//! (`proto/`) and the Rust code generated from them at build time (prost
//! messages, tonic server traits and clients). The definitions reproduce
//! etcd's package, service, method, message and field names, field numbers
//! and enum values, so etcdctl and etcd client libraries interoperate with a
//! server built on these types.
//!
//! Services: `etcdserverpb.{KV, Watch, Lease, Cluster, Maintenance}`,
//! `v3lockpb.Lock` and `v3electionpb.Election` (the server-side lock and
//! election recipes; etcdctl's `lock` and `elect` build the same recipes
//! client-side from KV, Lease and Watch), and `etcdserverpb.Auth` with
//! its record types in `authpb`.
//!
//! Generated server traits have default methods that answer
//! `Unimplemented`, so a service implements only what it supports. Fields of
//! protobuf type `bytes` are [`bytes::Bytes`](prost::bytes::Bytes).
//!
//! Every message and enum also implements serde's `Serialize` and
//! `Deserialize` with the JSON of etcd's grpc-gateway: the protos' own field
//! names (`create_revision`, `TTL`, `dbSize`), 64-bit integers as strings,
//! `bytes` as base64, enums by name (numbers are accepted too), default
//! values left out, unknown fields ignored.
//!
//! Rust field names are prost's snake_case of etcd's names, e.g. `TTL` ->
//! `ttl`, `ID` -> `id`, `peerURLs` -> `peer_ur_ls`, `dbSizeInUse` ->
//! `db_size_in_use`.

/// etcd's `etcdserverpb` package: KV, Watch, Lease, Cluster, Maintenance and Auth.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// etcd's `authpb` package: the permission and user options the Auth
/// service's messages carry.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// etcd's `mvccpb` package: `KeyValue` and watch `Event`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// etcd's `v3lockpb` package: the Lock service.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

/// etcd's `v3electionpb` package: the Election service.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}
