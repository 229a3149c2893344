//! etcd v3-style requests and responses carried by the native protocol:
//! range (with every etcd option), put, delete range, txn (compares and
//! nested operations), watch events; their binary encoding and etcd's
//! request validation (`checkTxnRequest`, `checkIntervals`,
//! `checkPutRequest`). Field types mirror etcd's protobufs (`int64` stays
//! `i64`) so a gRPC front end translates field by field.
//!
//! # Encoding (see `proto` for the primitives)
//!
//! ```text
//! RangeRequest        key, range_end, limit:i64, revision:i64, sort_order:u8,
//!                     sort_target:u8, keys_only:bool, count_only:bool,
//!                     min_mod_revision:i64, max_mod_revision:i64,
//!                     min_create_revision:i64, max_create_revision:i64
//! PutRequest          key, value, lease:i64, prev_kv:bool, ignore_value:bool,
//!                     ignore_lease:bool
//! DeleteRangeRequest  key, range_end, prev_kv:bool
//! TxnCompare          key, range_end, result:u8, target:u8, then i64
//!                     (VERSION 0, CREATE 1, MOD 2, LEASE 4) or bytes (VALUE 3)
//! RequestOp           1 Range | 2 Put | 3 DeleteRange | 4 Txn, then the request
//! TxnRequest          List<TxnCompare>, success:List<RequestOp>,
//!                     failure:List<RequestOp>
//! RangeResponse       revision, kvs:List<KeyValue>, more:bool, count:u64
//! PutResponse         revision, prev_kv:Option<KeyValue>
//! DeleteRangeResponse revision, deleted:u64, prev_kvs:List<KeyValue>
//! ResponseOp          1 Range | 2 Put | 3 DeleteRange | 4 Txn, then the response
//! TxnResponse         revision, succeeded:bool, responses:List<ResponseOp>
//! WatchEvent          type:u8 (0 PUT, 1 DELETE), kv:KeyValue, prev_kv:Option<KeyValue>
//! ```
//!
//! Enum numbers are etcd's: sort order NONE 0, ASCEND 1, DESCEND 2; sort
//! target KEY 0, VERSION 1, CREATE 2, MOD 3, VALUE 4; compare result
//! EQUAL 0, GREATER 1, LESS 2, NOT_EQUAL 3.

use crate::codec::{Reader, Writer};
use crate::error::KvError;
use crate::proto::{check_bound, check_key, check_value, KeyValue, MIN_KV_LEN};
use bytes::Bytes;
use std::collections::BTreeSet;

/// etcd's default `--max-txn-ops`: compares, and operations per branch, in
/// one txn (nested txns get what their parent leaves, as in etcd).
pub const MAX_TXN_OPS: usize = 128;
/// Deepest txn nesting a decoder accepts: txns nested this many levels
/// below the top one (etcd's op limit allows 128, each level one op).
pub const MAX_TXN_DEPTH: usize = 128;

/// Order of a range's results (etcd `RangeRequest.SortOrder`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SortOrder {
    #[default]
    None = 0,
    Ascend = 1,
    Descend = 2,
}

/// What a range sorts by (etcd `RangeRequest.SortTarget`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SortTarget {
    #[default]
    Key = 0,
    Version = 1,
    Create = 2,
    Mod = 3,
    Value = 4,
}

impl SortOrder {
    pub fn from_u8(b: u8) -> Result<SortOrder, KvError> {
        Ok(match b {
            0 => SortOrder::None,
            1 => SortOrder::Ascend,
            2 => SortOrder::Descend,
            found => {
                return Err(KvError::UnknownTag {
                    what: "sort order",
                    found,
                    expected: "0..=2",
                })
            }
        })
    }
}

impl SortTarget {
    pub fn from_u8(b: u8) -> Result<SortTarget, KvError> {
        Ok(match b {
            0 => SortTarget::Key,
            1 => SortTarget::Version,
            2 => SortTarget::Create,
            3 => SortTarget::Mod,
            4 => SortTarget::Value,
            found => {
                return Err(KvError::UnknownTag {
                    what: "sort target",
                    found,
                    expected: "0..=4",
                })
            }
        })
    }
}

/// etcd `RangeRequest` (without `serializable`, which is the front end's
/// choice of read path). Bounds as in `Query::Range`: an empty `range_end`
/// is the single key, `[0]` every key `>= key`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeRequest {
    pub key: Bytes,
    pub range_end: Bytes,
    /// At most this many keys; `<= 0` means no limit.
    pub limit: i64,
    /// Read at this revision; `<= 0` means the current one.
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    /// Each filter is off when 0.
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

impl RangeRequest {
    /// A plain range over `[key, range_end)` at the current revision.
    pub fn new(key: impl Into<Bytes>, range_end: impl Into<Bytes>) -> RangeRequest {
        RangeRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..RangeRequest::default()
        }
    }
}

/// etcd `RangeResponse`. `revision` is the store revision the read was
/// served at (the header revision), not the requested one; `count` is the
/// number of keys in the range at the requested revision, before `limit`
/// and before the min/max filters (as etcd counts).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeResponse {
    pub revision: u64,
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: u64,
}

/// etcd `PutRequest`. `lease` 0 means no lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PutRequest {
    pub key: Bytes,
    pub value: Bytes,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

impl PutRequest {
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> PutRequest {
        PutRequest {
            key: key.into(),
            value: value.into(),
            ..PutRequest::default()
        }
    }
}

/// etcd `PutResponse`; `revision` is the revision of the write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PutResponse {
    pub revision: u64,
    pub prev_kv: Option<KeyValue>,
}

/// etcd `DeleteRangeRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeleteRangeRequest {
    pub key: Bytes,
    pub range_end: Bytes,
    pub prev_kv: bool,
}

/// etcd `DeleteRangeResponse`; `revision` is the write's revision if
/// anything was deleted (or, in a txn, written before), else the current one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DeleteRangeResponse {
    pub revision: u64,
    pub deleted: u64,
    pub prev_kvs: Vec<KeyValue>,
}

/// etcd `Compare.CompareResult`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompareResult {
    #[default]
    Equal = 0,
    Greater = 1,
    Less = 2,
    NotEqual = 3,
}

impl CompareResult {
    pub fn from_u8(b: u8) -> Result<CompareResult, KvError> {
        Ok(match b {
            0 => CompareResult::Equal,
            1 => CompareResult::Greater,
            2 => CompareResult::Less,
            3 => CompareResult::NotEqual,
            found => {
                return Err(KvError::UnknownTag {
                    what: "compare result",
                    found,
                    expected: "0..=3",
                })
            }
        })
    }
}

/// etcd `Compare.CompareTarget` with its operand.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    Value(Bytes),
    Lease(i64),
}

/// etcd `Compare`: `target <result> operand` must hold for the key, or for
/// every key in `[key, range_end)` (an absent key compares as all zeros,
/// except that a VALUE compare on no key at all fails).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TxnCompare {
    pub key: Bytes,
    pub range_end: Bytes,
    pub result: CompareResult,
    pub target: CompareTarget,
}

impl TxnCompare {
    pub fn new(key: impl Into<Bytes>, result: CompareResult, target: CompareTarget) -> Self {
        TxnCompare {
            key: key.into(),
            range_end: Bytes::new(),
            result,
            target,
        }
    }
}

/// One operation of a txn branch.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

/// etcd `TxnRequest`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TxnRequest {
    pub compare: Vec<TxnCompare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

/// The answer to one operation of a txn.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

/// etcd `TxnResponse`. `revision` is the store revision after the txn; for
/// a nested txn it is 0, as etcd leaves nested headers empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TxnResponse {
    pub revision: u64,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// etcd `mvccpb.Event.EventType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Put = 0,
    Delete = 1,
}

/// One change, as a watcher sees it. For a PUT, `kv` is the key as written;
/// for a DELETE, `kv` is etcd's tombstone: the key, `mod_revision` = the
/// delete's revision, everything else empty or 0. `prev_kv` is the key's
/// state before the change (None if it did not exist, or if that state was
/// compacted away). The revision of the event is `kv.mod_revision`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    pub kind: EventType,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

impl WatchEvent {
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }

    pub fn encode(&self) -> Bytes {
        let mut w = Writer::raw();
        self.encode_into(&mut w);
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<WatchEvent, KvError> {
        let mut r = Reader::new(data, "watch event");
        let e = WatchEvent::decode_from(&mut r)?;
        r.finish()?;
        Ok(e)
    }

    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.u8(self.kind as u8);
        self.kv.encode_into(w);
        encode_opt(w, &self.prev_kv);
    }

    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<WatchEvent, KvError> {
        let kind = match r.u8()? {
            0 => EventType::Put,
            1 => EventType::Delete,
            found => {
                return Err(KvError::UnknownTag {
                    what: "event type",
                    found,
                    expected: "0 or 1",
                })
            }
        };
        Ok(WatchEvent {
            kind,
            kv: KeyValue::decode_from(r)?,
            prev_kv: decode_opt(r)?,
        })
    }
}

/// Smallest encoding of a `WatchEvent`.
pub(crate) const MIN_EVENT_LEN: usize = 1 + MIN_KV_LEN + 1;

// ---- encoding helpers shared with `proto` ----

pub(crate) fn encode_opt(w: &mut Writer, kv: &Option<KeyValue>) {
    match kv {
        Some(kv) => {
            w.bool(true);
            kv.encode_into(w);
        }
        None => {
            w.bool(false);
        }
    }
}

pub(crate) fn decode_opt(r: &mut Reader<'_>) -> Result<Option<KeyValue>, KvError> {
    if r.bool()? {
        Ok(Some(KeyValue::decode_from(r)?))
    } else {
        Ok(None)
    }
}

pub(crate) fn encode_list(w: &mut Writer, kvs: &[KeyValue]) {
    w.count(kvs.len());
    for kv in kvs {
        kv.encode_into(w);
    }
}

pub(crate) fn decode_list(r: &mut Reader<'_>) -> Result<Vec<KeyValue>, KvError> {
    let n = r.count(MIN_KV_LEN)?;
    let mut kvs = Vec::with_capacity(n);
    for _ in 0..n {
        kvs.push(KeyValue::decode_from(r)?);
    }
    Ok(kvs)
}

const MIN_COMPARE_LEN: usize = 4 + 4 + 1 + 1 + 4;
const MIN_REQUEST_OP_LEN: usize = 1 + 4 + 4 + 1;
const MIN_RESPONSE_OP_LEN: usize = 1 + 8 + 1;

impl RangeRequest {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.range_end)
            .i64(self.limit)
            .i64(self.revision)
            .u8(self.sort_order as u8)
            .u8(self.sort_target as u8)
            .bool(self.keys_only)
            .bool(self.count_only)
            .i64(self.min_mod_revision)
            .i64(self.max_mod_revision)
            .i64(self.min_create_revision)
            .i64(self.max_create_revision);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<RangeRequest, KvError> {
        Ok(RangeRequest {
            key: r.bytes()?,
            range_end: r.bytes()?,
            limit: r.i64()?,
            revision: r.i64()?,
            sort_order: SortOrder::from_u8(r.u8()?)?,
            sort_target: SortTarget::from_u8(r.u8()?)?,
            keys_only: r.bool()?,
            count_only: r.bool()?,
            min_mod_revision: r.i64()?,
            max_mod_revision: r.i64()?,
            min_create_revision: r.i64()?,
            max_create_revision: r.i64()?,
        })
    }
    /// Checks key limits (`key` may be empty only with a `range_end`).
    pub fn validate(&self) -> Result<(), KvError> {
        crate::proto::check_range(&self.key, &self.range_end)
    }
}

impl PutRequest {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.value)
            .i64(self.lease)
            .bool(self.prev_kv)
            .bool(self.ignore_value)
            .bool(self.ignore_lease);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<PutRequest, KvError> {
        Ok(PutRequest {
            key: r.bytes()?,
            value: r.bytes()?,
            lease: r.i64()?,
            prev_kv: r.bool()?,
            ignore_value: r.bool()?,
            ignore_lease: r.bool()?,
        })
    }
    /// etcd's `checkPutRequest` plus size limits.
    pub fn validate(&self) -> Result<(), KvError> {
        check_key(&self.key)?;
        check_value(&self.value)?;
        if self.ignore_value && !self.value.is_empty() {
            return Err(KvError::ValueProvided);
        }
        if self.ignore_lease && self.lease != 0 {
            return Err(KvError::LeaseProvided);
        }
        Ok(())
    }
}

impl DeleteRangeRequest {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.key).bytes(&self.range_end).bool(self.prev_kv);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<DeleteRangeRequest, KvError> {
        Ok(DeleteRangeRequest {
            key: r.bytes()?,
            range_end: r.bytes()?,
            prev_kv: r.bool()?,
        })
    }
    pub fn validate(&self) -> Result<(), KvError> {
        crate::proto::check_range(&self.key, &self.range_end)
    }
}

impl TxnCompare {
    fn encode_into(&self, w: &mut Writer) {
        w.bytes(&self.key)
            .bytes(&self.range_end)
            .u8(self.result as u8);
        match &self.target {
            CompareTarget::Version(v) => w.u8(0).i64(*v),
            CompareTarget::Create(v) => w.u8(1).i64(*v),
            CompareTarget::Mod(v) => w.u8(2).i64(*v),
            CompareTarget::Value(v) => w.u8(3).bytes(v),
            CompareTarget::Lease(v) => w.u8(4).i64(*v),
        };
    }
    fn decode_from(r: &mut Reader<'_>) -> Result<TxnCompare, KvError> {
        let key = r.bytes()?;
        let range_end = r.bytes()?;
        let result = CompareResult::from_u8(r.u8()?)?;
        let target = match r.u8()? {
            0 => CompareTarget::Version(r.i64()?),
            1 => CompareTarget::Create(r.i64()?),
            2 => CompareTarget::Mod(r.i64()?),
            3 => CompareTarget::Value(r.bytes()?),
            4 => CompareTarget::Lease(r.i64()?),
            found => {
                return Err(KvError::UnknownTag {
                    what: "compare target",
                    found,
                    expected: "0..=4",
                })
            }
        };
        Ok(TxnCompare {
            key,
            range_end,
            result,
            target,
        })
    }
    fn validate(&self) -> Result<(), KvError> {
        check_key(&self.key)?;
        check_bound(&self.range_end)?;
        if let CompareTarget::Value(v) = &self.target {
            check_value(v)?;
        }
        Ok(())
    }
}

impl RequestOp {
    fn encode_into(&self, w: &mut Writer) {
        match self {
            RequestOp::Range(r) => {
                w.u8(1);
                r.encode_into(w);
            }
            RequestOp::Put(p) => {
                w.u8(2);
                p.encode_into(w);
            }
            RequestOp::DeleteRange(d) => {
                w.u8(3);
                d.encode_into(w);
            }
            RequestOp::Txn(t) => {
                w.u8(4);
                t.encode_into(w);
            }
        }
    }
    fn decode_from(r: &mut Reader<'_>, depth: usize) -> Result<RequestOp, KvError> {
        Ok(match r.u8()? {
            1 => RequestOp::Range(RangeRequest::decode_from(r)?),
            2 => RequestOp::Put(PutRequest::decode_from(r)?),
            3 => RequestOp::DeleteRange(DeleteRangeRequest::decode_from(r)?),
            4 => RequestOp::Txn(TxnRequest::decode_at(r, depth + 1)?),
            found => {
                return Err(KvError::UnknownTag {
                    what: "txn operation",
                    found,
                    expected: "1..=4",
                })
            }
        })
    }
    fn name(&self) -> &'static str {
        match self {
            RequestOp::Range(_) => "range",
            RequestOp::Put(_) => "put",
            RequestOp::DeleteRange(_) => "delete range",
            RequestOp::Txn(_) => "txn",
        }
    }
}

impl TxnRequest {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.count(self.compare.len());
        for c in &self.compare {
            c.encode_into(w);
        }
        for ops in [&self.success, &self.failure] {
            w.count(ops.len());
            for op in ops {
                op.encode_into(w);
            }
        }
    }

    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<TxnRequest, KvError> {
        TxnRequest::decode_at(r, 0)
    }

    fn decode_at(r: &mut Reader<'_>, depth: usize) -> Result<TxnRequest, KvError> {
        if depth > MAX_TXN_DEPTH {
            return Err(KvError::TxnTooDeep {
                depth,
                max: MAX_TXN_DEPTH,
            });
        }
        let n = r.count(MIN_COMPARE_LEN)?;
        let mut compare = Vec::with_capacity(n);
        for _ in 0..n {
            compare.push(TxnCompare::decode_from(r)?);
        }
        let mut branches = [Vec::new(), Vec::new()];
        for ops in &mut branches {
            let n = r.count(MIN_REQUEST_OP_LEN)?;
            ops.reserve(n);
            for _ in 0..n {
                ops.push(RequestOp::decode_from(r, depth)?);
            }
        }
        let [success, failure] = branches;
        Ok(TxnRequest {
            compare,
            success,
            failure,
        })
    }

    /// etcd's `checkTxnRequest` (with `MAX_TXN_OPS`) and `checkIntervals`
    /// on both branches, plus Keel's size limits.
    pub fn validate(&self) -> Result<(), KvError> {
        self.check(MAX_TXN_OPS as i64)?;
        check_intervals(&self.success)?;
        check_intervals(&self.failure)?;
        Ok(())
    }

    fn check(&self, max_ops: i64) -> Result<(), KvError> {
        let opc = self
            .compare
            .len()
            .max(self.success.len())
            .max(self.failure.len()) as i64;
        if opc > max_ops {
            return Err(KvError::TooManyOps);
        }
        for c in &self.compare {
            c.validate()?;
        }
        for op in self.success.iter().chain(&self.failure) {
            match op {
                RequestOp::Range(r) => r.validate()?,
                RequestOp::Put(p) => p.validate()?,
                RequestOp::DeleteRange(d) => d.validate()?,
                RequestOp::Txn(t) => t.check(max_ops - opc)?,
            }
        }
        Ok(())
    }

    /// etcd's `isTxnReadonly`: no operation of either branch is a write or
    /// a nested txn.
    pub fn is_read_only(&self) -> bool {
        self.success
            .iter()
            .chain(&self.failure)
            .all(|op| matches!(op, RequestOp::Range(_)))
    }

    /// Fails unless no branch, at any depth, writes (for `Query::Txn`).
    pub fn check_reads_only(&self) -> Result<(), KvError> {
        for op in self.success.iter().chain(&self.failure) {
            match op {
                RequestOp::Range(_) => {}
                RequestOp::Txn(t) => t.check_reads_only()?,
                other => return Err(KvError::TxnNotReadOnly(other.name())),
            }
        }
        Ok(())
    }
}

/// A deleted interval as etcd's `adt.NewStringAffineInterval` sees it:
/// `[begin, end)` with an empty `end` meaning +infinity. A single-key delete
/// is the point `[key, key + "\0")`.
struct Interval {
    begin: Bytes,
    end: Bytes,
}

impl Interval {
    /// Does the point `key` fall in the interval? With etcd's affine
    /// comparison this is `begin <= key < end`; note that a "from key"
    /// range end of `"\0"` makes an empty interval, as in etcd.
    fn contains(&self, key: &[u8]) -> bool {
        key >= &self.begin[..] && (self.end.is_empty() || key < &self.end[..])
    }
}

fn overlaps(dels: &[Interval], key: &[u8]) -> bool {
    dels.iter().any(|iv| iv.contains(key))
}

/// etcd's `checkIntervals`: no key may be put twice or put and deleted in
/// one txn (across nested txns; the success and failure branches of one
/// nested txn may put the same key, as only one runs).
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Bytes>, Vec<Interval>), KvError> {
    let mut dels: Vec<Interval> = Vec::new();
    for op in ops {
        if let RequestOp::DeleteRange(d) = op {
            let end = if d.range_end.is_empty() {
                let mut e = d.key.to_vec();
                e.push(0);
                Bytes::from(e)
            } else {
                d.range_end.clone()
            };
            dels.push(Interval {
                begin: d.key.clone(),
                end,
            });
        }
    }
    let mut puts: BTreeSet<Bytes> = BTreeSet::new();
    for op in ops {
        let RequestOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || overlaps(&dels, k) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            if puts.contains(k) && !puts_then.contains(k) {
                return Err(KvError::DuplicateKey);
            }
            if overlaps(&dels, k) {
                return Err(KvError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || overlaps(&dels, &p.key) {
            return Err(KvError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

impl RangeResponse {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.u64(self.revision);
        encode_list(w, &self.kvs);
        w.bool(self.more).u64(self.count);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<RangeResponse, KvError> {
        Ok(RangeResponse {
            revision: r.u64()?,
            kvs: decode_list(r)?,
            more: r.bool()?,
            count: r.u64()?,
        })
    }
}

impl PutResponse {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.u64(self.revision);
        encode_opt(w, &self.prev_kv);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<PutResponse, KvError> {
        Ok(PutResponse {
            revision: r.u64()?,
            prev_kv: decode_opt(r)?,
        })
    }
}

impl DeleteRangeResponse {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.u64(self.revision).u64(self.deleted);
        encode_list(w, &self.prev_kvs);
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<DeleteRangeResponse, KvError> {
        Ok(DeleteRangeResponse {
            revision: r.u64()?,
            deleted: r.u64()?,
            prev_kvs: decode_list(r)?,
        })
    }
}

impl ResponseOp {
    fn encode_into(&self, w: &mut Writer) {
        match self {
            ResponseOp::Range(r) => {
                w.u8(1);
                r.encode_into(w);
            }
            ResponseOp::Put(p) => {
                w.u8(2);
                p.encode_into(w);
            }
            ResponseOp::DeleteRange(d) => {
                w.u8(3);
                d.encode_into(w);
            }
            ResponseOp::Txn(t) => {
                w.u8(4);
                t.encode_into(w);
            }
        }
    }
    fn decode_from(r: &mut Reader<'_>, depth: usize) -> Result<ResponseOp, KvError> {
        Ok(match r.u8()? {
            1 => ResponseOp::Range(RangeResponse::decode_from(r)?),
            2 => ResponseOp::Put(PutResponse::decode_from(r)?),
            3 => ResponseOp::DeleteRange(DeleteRangeResponse::decode_from(r)?),
            4 => ResponseOp::Txn(TxnResponse::decode_at(r, depth + 1)?),
            found => {
                return Err(KvError::UnknownTag {
                    what: "txn response",
                    found,
                    expected: "1..=4",
                })
            }
        })
    }
}

impl TxnResponse {
    pub(crate) fn encode_into(&self, w: &mut Writer) {
        w.u64(self.revision).bool(self.succeeded);
        w.count(self.responses.len());
        for r in &self.responses {
            r.encode_into(w);
        }
    }
    pub(crate) fn decode_from(r: &mut Reader<'_>) -> Result<TxnResponse, KvError> {
        TxnResponse::decode_at(r, 0)
    }
    fn decode_at(r: &mut Reader<'_>, depth: usize) -> Result<TxnResponse, KvError> {
        if depth > MAX_TXN_DEPTH {
            return Err(KvError::TxnTooDeep {
                depth,
                max: MAX_TXN_DEPTH,
            });
        }
        let revision = r.u64()?;
        let succeeded = r.bool()?;
        let n = r.count(MIN_RESPONSE_OP_LEN)?;
        let mut responses = Vec::with_capacity(n);
        for _ in 0..n {
            responses.push(ResponseOp::decode_from(r, depth)?);
        }
        Ok(TxnResponse {
            revision,
            succeeded,
            responses,
        })
    }
}
