//! Checks the generated messages against etcd's wire contract by encoding
//! with prost and decoding the bytes by hand: every field must appear with
//! etcd's field number and wire type (tag = field_number << 3 | wire_type).

use keel_etcd_proto::etcdserverpb::{
    alarm_request::AlarmAction, compare, range_request, request_op, watch_create_request,
    watch_request, AlarmType, Compare, DeleteRangeRequest, LeaseGrantRequest, Member, PutRequest,
    RangeRequest, RequestOp, ResponseHeader, StatusResponse, TxnRequest, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use keel_etcd_proto::mvccpb::{event::EventType, Event, KeyValue};
use prost::Message;

const VARINT: u8 = 0;
const LEN: u8 = 2;

/// One decoded field: (number, wire type, payload). Varints are returned as
/// their value in `int`; length-delimited payloads in `bytes`.
#[derive(Debug, Clone, PartialEq)]
struct Field {
    number: u32,
    wire_type: u8,
    int: u64,
    bytes: Vec<u8>,
}

fn varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*pos];
        *pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

/// Decodes a message's top-level fields in wire order.
fn fields(buf: &[u8]) -> Vec<Field> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos);
        let number = u32::try_from(tag >> 3).unwrap();
        let wire_type = (tag & 7) as u8;
        let mut f = Field {
            number,
            wire_type,
            int: 0,
            bytes: Vec::new(),
        };
        match wire_type {
            VARINT => f.int = varint(buf, &mut pos),
            LEN => {
                let len = usize::try_from(varint(buf, &mut pos)).unwrap();
                f.bytes = buf[pos..pos + len].to_vec();
                pos += len;
            }
            other => panic!("unexpected wire type {other} for field {number}"),
        }
        out.push(f);
    }
    out
}

/// (field number, wire type) pairs in wire order.
fn layout(buf: &[u8]) -> Vec<(u32, u8)> {
    fields(buf)
        .iter()
        .map(|f| (f.number, f.wire_type))
        .collect()
}

fn field(buf: &[u8], number: u32) -> Field {
    let found: Vec<Field> = fields(buf)
        .into_iter()
        .filter(|f| f.number == number)
        .collect();
    assert_eq!(found.len(), 1, "field {number} in {:?}", fields(buf));
    found[0].clone()
}

#[test]
fn range_request_field_numbers() {
    let req = RangeRequest {
        key: "a".into(),
        range_end: "b".into(),
        limit: 3,
        revision: 4,
        sort_order: range_request::SortOrder::Descend as i32,
        sort_target: range_request::SortTarget::Mod as i32,
        serializable: true,
        keys_only: true,
        count_only: true,
        min_mod_revision: 10,
        max_mod_revision: 11,
        min_create_revision: 12,
        max_create_revision: 13,
    };
    let buf = req.encode_to_vec();
    assert_eq!(
        layout(&buf),
        vec![
            (1, LEN),
            (2, LEN),
            (3, VARINT),
            (4, VARINT),
            (5, VARINT),
            (6, VARINT),
            (7, VARINT),
            (8, VARINT),
            (9, VARINT),
            (10, VARINT),
            (11, VARINT),
            (12, VARINT),
            (13, VARINT),
        ]
    );
    assert_eq!(field(&buf, 1).bytes, b"a");
    assert_eq!(field(&buf, 2).bytes, b"b");
    for n in [3, 4, 10, 11, 12, 13] {
        assert_eq!(field(&buf, n).int, u64::from(n));
    }
    assert_eq!(field(&buf, 5).int, 2, "SortOrder.DESCEND = 2");
    assert_eq!(field(&buf, 6).int, 3, "SortTarget.MOD = 3");
    // Exact bytes for the first fields: tag 0x0a = (1 << 3) | 2, etc.
    assert_eq!(&buf[..6], &[0x0a, 1, b'a', 0x12, 1, b'b']);
    assert_eq!(&buf[6..8], &[0x18, 3]);
    assert_eq!(RangeRequest::decode(buf.as_slice()).unwrap(), req);
}

#[test]
fn range_request_enum_values() {
    use range_request::{SortOrder, SortTarget};
    assert_eq!(
        [SortOrder::None, SortOrder::Ascend, SortOrder::Descend].map(|v| v as i32),
        [0, 1, 2]
    );
    assert_eq!(
        [
            SortTarget::Key,
            SortTarget::Version,
            SortTarget::Create,
            SortTarget::Mod,
            SortTarget::Value
        ]
        .map(|v| v as i32),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(SortTarget::Create.as_str_name(), "CREATE");
}

#[test]
fn put_and_delete_field_numbers() {
    let put = PutRequest {
        key: "k".into(),
        value: "v".into(),
        lease: 7,
        prev_kv: true,
        ignore_value: true,
        ignore_lease: true,
    };
    let buf = put.encode_to_vec();
    assert_eq!(
        layout(&buf),
        vec![
            (1, LEN),
            (2, LEN),
            (3, VARINT),
            (4, VARINT),
            (5, VARINT),
            (6, VARINT)
        ]
    );
    assert_eq!(field(&buf, 2).bytes, b"v");
    assert_eq!(field(&buf, 3).int, 7);

    let del = DeleteRangeRequest {
        key: "k".into(),
        range_end: "l".into(),
        prev_kv: true,
    };
    assert_eq!(
        layout(&del.encode_to_vec()),
        vec![(1, LEN), (2, LEN), (3, VARINT)]
    );
}

#[test]
fn txn_request_field_numbers() {
    let txn = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::NotEqual as i32,
            target: compare::CompareTarget::Lease as i32,
            key: "k".into(),
            range_end: "l".into(),
            target_union: Some(compare::TargetUnion::Lease(99)),
        }],
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: "k".into(),
                value: "v".into(),
                ..Default::default()
            })),
        }],
        failure: vec![
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: "k".into(),
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: "k".into(),
                        ..Default::default()
                    },
                )),
            },
            RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest::default())),
            },
        ],
    };
    let buf = txn.encode_to_vec();
    assert_eq!(
        layout(&buf),
        vec![(1, LEN), (2, LEN), (3, LEN), (3, LEN), (3, LEN)]
    );

    // Compare: result = 1, target = 2, key = 3, lease (target_union) = 8, range_end = 64.
    let cmp = field(&buf, 1).bytes;
    assert_eq!(
        layout(&cmp),
        vec![(1, VARINT), (2, VARINT), (3, LEN), (8, VARINT), (64, LEN)]
    );
    assert_eq!(field(&cmp, 1).int, 3, "CompareResult.NOT_EQUAL = 3");
    assert_eq!(field(&cmp, 2).int, 4, "CompareTarget.LEASE = 4");
    assert_eq!(field(&cmp, 8).int, 99);
    // Field 64 with wire type 2 is the two-byte tag varint 0x82 0x04.
    let pos = cmp.windows(2).position(|w| w == [0x82, 0x04]);
    assert!(pos.is_some(), "range_end tag 64 in {cmp:?}");

    for (union, number) in [
        (compare::TargetUnion::Version(1), 4),
        (compare::TargetUnion::CreateRevision(1), 5),
        (compare::TargetUnion::ModRevision(1), 6),
        (compare::TargetUnion::Value("x".into()), 7),
        (compare::TargetUnion::Lease(1), 8),
    ] {
        let c = Compare {
            target_union: Some(union),
            ..Default::default()
        };
        assert_eq!(layout(&c.encode_to_vec())[0].0, number);
    }

    // RequestOp: request_range = 1, request_put = 2, request_delete_range = 3, request_txn = 4.
    let ops: Vec<Field> = fields(&buf).into_iter().skip(1).collect();
    assert_eq!(layout(&ops[0].bytes), vec![(2, LEN)]);
    assert_eq!(layout(&ops[1].bytes), vec![(1, LEN)]);
    assert_eq!(layout(&ops[2].bytes), vec![(3, LEN)]);
    assert_eq!(layout(&ops[3].bytes), vec![(4, LEN)]);

    use compare::{CompareResult, CompareTarget};
    assert_eq!(
        [
            CompareResult::Equal,
            CompareResult::Greater,
            CompareResult::Less,
            CompareResult::NotEqual
        ]
        .map(|v| v as i32),
        [0, 1, 2, 3]
    );
    assert_eq!(
        [
            CompareTarget::Version,
            CompareTarget::Create,
            CompareTarget::Mod,
            CompareTarget::Value,
            CompareTarget::Lease
        ]
        .map(|v| v as i32),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(TxnRequest::decode(buf.as_slice()).unwrap(), txn);
}

#[test]
fn watch_request_field_numbers() {
    let create = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: "a".into(),
                range_end: "b".into(),
                start_revision: 3,
                progress_notify: true,
                filters: vec![
                    watch_create_request::FilterType::Noput as i32,
                    watch_create_request::FilterType::Nodelete as i32,
                ],
                prev_kv: true,
                watch_id: 7,
                fragment: true,
            },
        )),
    };
    let buf = create.encode_to_vec();
    assert_eq!(layout(&buf), vec![(1, LEN)]);
    let inner = field(&buf, 1).bytes;
    // filters (5) is a packed repeated enum in proto3.
    assert_eq!(
        layout(&inner),
        vec![
            (1, LEN),
            (2, LEN),
            (3, VARINT),
            (4, VARINT),
            (5, LEN),
            (6, VARINT),
            (7, VARINT),
            (8, VARINT),
        ]
    );
    assert_eq!(
        field(&inner, 5).bytes,
        vec![0, 1],
        "NOPUT = 0, NODELETE = 1"
    );
    assert_eq!(field(&inner, 7).int, 7);

    let cancel = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: 5 },
        )),
    };
    let buf = cancel.encode_to_vec();
    assert_eq!(layout(&buf), vec![(2, LEN)]);
    assert_eq!(layout(&field(&buf, 2).bytes), vec![(1, VARINT)]);

    let progress = WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    };
    // Empty message still present: tag 0x1a = (3 << 3) | 2, length 0.
    assert_eq!(progress.encode_to_vec(), vec![0x1a, 0]);
}

#[test]
fn watch_response_and_mvcc_field_numbers() {
    let kv = KeyValue {
        key: "k".into(),
        create_revision: 2,
        mod_revision: 3,
        version: 4,
        value: "v".into(),
        lease: 6,
    };
    let kv_buf = kv.encode_to_vec();
    assert_eq!(
        layout(&kv_buf),
        vec![
            (1, LEN),
            (2, VARINT),
            (3, VARINT),
            (4, VARINT),
            (5, LEN),
            (6, VARINT)
        ]
    );
    for n in [2, 3, 4, 6] {
        assert_eq!(field(&kv_buf, n).int, u64::from(n));
    }

    let resp = WatchResponse {
        header: Some(ResponseHeader {
            cluster_id: 1,
            member_id: 2,
            revision: 3,
            raft_term: 4,
        }),
        watch_id: 2,
        created: true,
        canceled: true,
        compact_revision: 5,
        cancel_reason: "r".into(),
        fragment: true,
        events: vec![Event {
            r#type: EventType::Delete as i32,
            kv: Some(kv.clone()),
            prev_kv: Some(kv),
        }],
    };
    let buf = resp.encode_to_vec();
    assert_eq!(
        layout(&buf),
        vec![
            (1, LEN),
            (2, VARINT),
            (3, VARINT),
            (4, VARINT),
            (5, VARINT),
            (6, LEN),
            (7, VARINT),
            (11, LEN),
        ]
    );
    let header = field(&buf, 1).bytes;
    assert_eq!(
        layout(&header),
        vec![(1, VARINT), (2, VARINT), (3, VARINT), (4, VARINT)]
    );
    for n in 1..=4 {
        assert_eq!(field(&header, n).int, u64::from(n));
    }
    let event = field(&buf, 11).bytes;
    assert_eq!(layout(&event), vec![(1, VARINT), (2, LEN), (3, LEN)]);
    assert_eq!(field(&event, 1).int, 1, "EventType.DELETE = 1");
}

#[test]
fn lease_cluster_maintenance_field_numbers() {
    let grant = LeaseGrantRequest { ttl: 10, id: 20 };
    let buf = grant.encode_to_vec();
    assert_eq!(buf, vec![0x08, 10, 0x10, 20], "TTL = 1, ID = 2");

    let member = Member {
        id: 1,
        name: "n".into(),
        peer_ur_ls: vec!["p".into()],
        client_ur_ls: vec!["c".into()],
        is_learner: true,
    };
    let buf = member.encode_to_vec();
    assert_eq!(
        layout(&buf),
        vec![(1, VARINT), (2, LEN), (3, LEN), (4, LEN), (5, VARINT)]
    );
    assert_eq!(field(&buf, 3).bytes, b"p");
    assert_eq!(field(&buf, 4).bytes, b"c");

    let status = StatusResponse {
        header: Some(ResponseHeader::default()),
        version: "3.4.0".into(),
        db_size: 3,
        leader: 4,
        raft_index: 5,
        raft_term: 6,
        raft_applied_index: 7,
        errors: vec!["e".into()],
        db_size_in_use: 9,
        is_learner: true,
        ..Default::default()
    };
    let buf = status.encode_to_vec();
    assert_eq!(
        layout(&buf),
        vec![
            (1, LEN),
            (2, LEN),
            (3, VARINT),
            (4, VARINT),
            (5, VARINT),
            (6, VARINT),
            (7, VARINT),
            (8, LEN),
            (9, VARINT),
            (10, VARINT),
        ]
    );
    for n in [3, 4, 5, 6, 7, 9] {
        assert_eq!(field(&buf, n).int, u64::from(n));
    }

    assert_eq!(
        [AlarmType::None, AlarmType::Nospace, AlarmType::Corrupt].map(|v| v as i32),
        [0, 1, 2]
    );
    assert_eq!(
        [
            AlarmAction::Get,
            AlarmAction::Activate,
            AlarmAction::Deactivate
        ]
        .map(|v| v as i32),
        [0, 1, 2]
    );
}
