//! Compiles Keel's etcd v3 `.proto` files with `protox` (pure Rust, no
//! `protoc` binary) and generates prost messages plus tonic server and
//! client stubs from the resulting descriptor set.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "etcdserverpb/rpc.proto",
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let fds = protox::compile(PROTOS, [&root])?;

    // JSON for etcd's grpc-gateway (`POST /v3/kv/range` and the like):
    // serde impls following the proto3 JSON mapping, with etcd's field
    // names as written in the protos (the gateway's `OrigName`), int64s as
    // strings, bytes as base64, and unknown fields ignored as the gateway
    // does.
    let descriptors = prost::Message::encode_to_vec(&fds);
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Unimplemented RPCs answer `Unimplemented` unless a service overrides them.
        .generate_default_stubs(true)
        // `bytes` fields decode zero-copy into `bytes::Bytes`.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
