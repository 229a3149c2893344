//! etcd's JSON gateway (`POST /v3/...` on the etcd API port), compared with
//! a real etcd 3.4 (Debian's `etcd`, one member on loopback): one script of
//! HTTP requests runs against etcd and against a 3-node Keel cluster, and
//! each answer's HTTP status and JSON must match after normalization:
//!
//! - An answer's header keeps only its revision (cluster and member ids and
//!   the raft term are each system's own); headers inside a txn's answer
//!   carry only a revision in both and are compared whole.
//! - A lease's remaining `TTL` depends on timing and is dropped.
//! - Error messages are compared, except for bodies that are not valid
//!   requests (Go's JSON errors and serde's differ; code and status are).
//! - Watch streams are compared as their list of events and their
//!   `created` answers (how a server batches events into responses is its
//!   own).
//!
//! Known difference, not in the script: base64 whose last symbol carries
//! bits past the data (`"Zm9="` for `"Zm8="`) is accepted by etcd (Go's
//! lenient decoder) and refused by Keel as not a valid request.
//!
//! Also compared with etcd: CORS (`cors_answers_as_etcds`) and streams
//! whose body is sent in chunks (`streams_take_requests_as_they_are_sent`).
//!
//! Needs etcd (`apt-get install -y etcd-server`, which `.ci/run` does):
//! with CI=true a missing etcd fails the test; elsewhere it is skipped with
//! a printed reason.

mod common;

use common::{EtcdProc, TestCluster};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// An HTTP answer: status and the body's JSON documents (one, or one per
/// line of a stream).
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The header fields, names in lowercase.
    headers: Vec<(String, String)>,
    docs: Vec<Value>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `method path` with `body` to `addr` over HTTP/1.1; reads the answer
/// until it ends or `enough` holds for the documents read so far.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    enough: &dyn Fn(&[Value]) -> bool,
) -> Answer {
    exchange(addr, method, path, "", body, enough)
}

/// `request` with `extra` header lines (each ending in CRLF).
fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
    enough: &dyn Fn(&[Value]) -> bool,
) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n{extra}\r\n",
        body.len()
    )
    .expect("write request");
    // A server may answer a body it refuses before reading all of it.
    if let Err(e) = s.write_all(body.as_bytes()) {
        eprintln!("{path}: the server stopped reading the body: {e}");
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {line:?}"));
    let (mut chunked, mut length) = (false, None);
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).expect("header line");
        let h = line.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = line.trim_end().split_once(':') {
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        if h == "transfer-encoding: chunked" {
            chunked = true;
        }
        if let Some(n) = h.strip_prefix("content-length: ") {
            length = n.parse::<usize>().ok();
        }
    }
    let mut text = String::new();
    let docs = |text: &str| -> Vec<Value> {
        // Complete documents only: whole lines of a stream, or the body.
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n') || !chunked)
            .filter(|l| !l.trim().is_empty())
            // (Plain-text answers, e.g. to a GET, are kept as strings.)
            .map(|l| serde_json::from_str(l.trim()).unwrap_or_else(|_| l.trim().into()))
            .collect()
    };
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim(), 16)
                .unwrap_or_else(|_| panic!("{path}: chunk size {line:?}"));
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).expect("chunk");
            text.push_str(std::str::from_utf8(&chunk[..size]).expect("utf-8"));
            if enough(&docs(&text)) {
                break;
            }
        }
    } else if let Some(n) = length {
        let mut buf = vec![0; n];
        r.read_exact(&mut buf).expect("body");
        text = String::from_utf8(buf).expect("utf-8");
    } else {
        r.read_to_string(&mut text).expect("body");
    }
    // etcd's error answers end with a gRPC trailer line; it is no JSON.
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("Grpc-Trailer"))
        .map(|l| {
            let end = l.find("Grpc-Trailer").unwrap_or(l.len());
            format!("{}\n", &l[..end])
        })
        .collect();
    Answer {
        status,
        headers,
        docs: docs(&text),
    }
}

/// Keeps only the revision of an answer's own `header` (a stream line's
/// too), drops `TTL` where `drop_ttl`. Headers inside a txn's answer are
/// compared whole: both systems give them only their revision.
fn normalize(v: &mut Value, drop_ttl: bool) {
    let own_header = |answer: &mut Value| {
        if let Some(Value::Object(h)) = answer.get_mut("header") {
            h.retain(|k, _| k == "revision");
        }
    };
    own_header(v);
    if let Some(result) = v.get_mut("result") {
        own_header(result);
    }
    drop_ttls(v, drop_ttl);
}

fn drop_ttls(v: &mut Value, drop_ttl: bool) {
    match v {
        Value::Object(m) => {
            if drop_ttl {
                m.remove("TTL");
            }
            for (_, x) in m.iter_mut() {
                drop_ttls(x, drop_ttl);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| drop_ttls(x, drop_ttl)),
        _ => {}
    }
}

/// How a step's answers are compared.
#[derive(Clone, Copy, PartialEq)]
enum Compare {
    /// Status and normalized JSON.
    All,
    /// Status, and the gRPC code of the error (not its message).
    Code,
    /// Status only.
    Status,
    /// The events of a watch stream (read until `n` events arrived).
    Events(usize),
    /// All, without lease TTLs.
    NoTtl,
}

struct Step {
    method: &'static str,
    path: &'static str,
    body: String,
    compare: Compare,
}

fn post(path: &'static str, body: impl Into<String>) -> Step {
    Step {
        method: "POST",
        path,
        body: body.into(),
        compare: Compare::All,
    }
}

/// A put of `key` with a value of `len` bytes.
fn big_put(len: usize) -> Step {
    let value = "A".repeat(len.div_ceil(3) * 4);
    post(
        "/v3/kv/put",
        format!(r#"{{"key":"Zm9v","value":"{value}"}}"#),
    )
}

fn with(mut s: Step, compare: Compare) -> Step {
    s.compare = compare;
    s
}

fn events(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .filter_map(|d| d["result"]["events"].as_array())
        .flatten()
        .cloned()
        .collect()
}

/// A watch stream's answers that say a watch was created.
fn created(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .filter(|d| d["result"]["created"] == true)
        .cloned()
        .collect()
}

fn run(addr: &str, step: &Step) -> Answer {
    let enough = |docs: &[Value]| match step.compare {
        Compare::Events(n) => events(docs).len() >= n,
        _ => false,
    };
    request(addr, step.method, step.path, &step.body, &enough)
}

fn wait_healthy(addr: &str) {
    let start = Instant::now();
    loop {
        let ok = TcpStream::connect(addr).is_ok()
            && request(addr, "GET", "/health", "", &|_| false).status == 200;
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr} not healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// etcd (one member) and a 3-node Keel cluster, both answering /health:
/// (etcd's data directory, etcd, Keel, Keel's etcd API address); None
/// (skipped with the reason) where etcd is missing outside CI.
fn etcd_and_keel(test: &str) -> Option<(tempfile::TempDir, EtcdProc, TestCluster, String)> {
    let etcd_bin = common::etcd_or_skip(test)?;
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdProc::start(&etcd_bin, tmp.path());
    let keel = TestCluster::start(3, "");
    keel.wait_for_leader(Duration::from_secs(10));
    let keel_addr = keel.nodes[0].etcd.clone();
    wait_healthy(&etcd.client);
    wait_healthy(&keel_addr);
    Some((tmp, etcd, keel, keel_addr))
}

#[test]
fn gateway_answers_as_etcds() {
    let Some((_tmp, etcd, _keel, keel_addr)) = etcd_and_keel("the JSON gateway comparison") else {
        return;
    };

    // foo = Zm9v, bar = YmFy, baz = YmF6, fop = Zm9w, fo = Zm8=, fp = ZnA=,
    // 1 = MQ==.
    let steps = vec![
        post("/v3/kv/put", r#"{"key":"Zm9v","value":"YmFy"}"#),
        post(
            "/v3/kv/put",
            r#"{"key":"Zm9w","value":"MQ==","prev_kv":true}"#,
        ),
        post("/v3/kv/range", r#"{"key":"Zm9v"}"#),
        post("/v3/kv/range", r#"{"key":"bm9uZQ=="}"#),
        // A prefix, newest first; numbers and enum numbers for strings.
        post(
            "/v3/kv/range",
            r#"{"key":"Zm8=","range_end":"ZnA=","sort_order":"DESCEND","sort_target":3,"limit":1}"#,
        ),
        post(
            "/v3/kv/range",
            r#"{"key":"Zm9v","keys_only":true,"bogus":1}"#,
        ),
        post("/v3beta/kv/range", r#"{"key":"Zm9v","count_only":true}"#),
        post("/v3/kv/range", r#"{"key":"Zm9v","revision":"99"}"#),
        post("/v3/kv/range", ""),
        // What follows the request is ignored; keys given twice: the last.
        post("/v3/kv/range", r#"{"key":"Zm9v"} trailing"#),
        post("/v3/kv/range", r#"{"key":"bm9uZQ==","key":"Zm9v"}"#),
        // A body that is null is the empty request; one that is no object
        // is no request.
        post("/v3/kv/range", "null"),
        with(post("/v3/kv/range", "5"), Compare::Code),
        with(post("/v3/lease/keepalive", "[]"), Compare::Code),
        with(post("/v3/lease/keepalive", r#"{"ID":"1000"#), Compare::Code),
        // null is a field's default value.
        post(
            "/v3/kv/range",
            r#"{"key":"Zm9v","range_end":null,"limit":null,"sort_order":null}"#,
        ),
        // Over the request limit (1.5 MiB): etcd's own refusal; over the
        // gRPC message limit (2 MiB), gRPC's; a body too large to read
        // (4 MiB of JSON), the same.
        big_put(1600 * 1024),
        with(big_put(2100 * 1024), Compare::Code),
        with(big_put(3200 * 1024), Compare::Code),
        with(post("/v3/kv/range", "garbage"), Compare::Code),
        with(
            post("/v3/kv/range", r#"{"key":"not base64!"}"#),
            Compare::Code,
        ),
        with(
            post("/v3/kv/range", r#"{"key":"Zm9v","limit":"x"}"#),
            Compare::Code,
        ),
        post(
            "/v3/kv/txn",
            r#"{"compare":[{"target":"MOD","key":"Zm9v","mod_revision":"2"}],
                "success":[{"request_put":{"key":"Zm9v","value":"YmF6"}}],
                "failure":[{"request_range":{"key":"Zm9v"}}]}"#,
        ),
        post(
            "/v3/kv/txn",
            r#"{"compare":[{"target":"VALUE","key":"Zm9v","value":"YmFy"}],
                "success":[{"request_put":{"key":"Zm9v","value":"YmFy"}}],
                "failure":[{"request_range":{"key":"Zm9v"}}]}"#,
        ),
        post("/v3/kv/deleterange", r#"{"key":"Zm9w","prev_kv":true}"#),
        post("/v3/lease/grant", r#"{"TTL":30,"ID":1000}"#),
        // FailedPrecondition is 412.
        post("/v3/lease/grant", r#"{"TTL":30,"ID":1000}"#),
        post(
            "/v3/kv/put",
            r#"{"key":"bGVhc2Vk","value":"MQ==","lease":"1000"}"#,
        ),
        with(
            post("/v3/lease/timetolive", r#"{"ID":"1000","keys":true}"#),
            Compare::NoTtl,
        ),
        with(
            post("/v3/kv/lease/timetolive", r#"{"ID":"1000"}"#),
            Compare::NoTtl,
        ),
        post("/v3/lease/leases", "{}"),
        // Two requests in one body: two answers, then the stream ends.
        with(
            post("/v3/lease/keepalive", r#"{"ID":"1000"} {"ID":"1000"}"#),
            Compare::NoTtl,
        ),
        post("/v3/lock/lock", r#"{"name":"bGs=","lease":"1000"}"#),
        post("/v3/lock/unlock", r#"{"key":"bGsvM2U4"}"#),
        post(
            "/v3/election/campaign",
            r#"{"name":"ZWw=","value":"djE=","lease":"1000"}"#,
        ),
        post("/v3/election/leader", r#"{"name":"ZWw="}"#),
        post("/v3/lease/revoke", r#"{"ID":"1000"}"#),
        post("/v3/kv/lease/revoke", r#"{"ID":"1000"}"#),
        post("/v3/kv/range", r#"{"key":"bGVhc2Vk"}"#),
        // foo's history: the put and the first txn's put.
        with(
            post(
                "/v3/watch",
                r#"{"create_request":{"key":"Zm9v","start_revision":"1"}}"#,
            ),
            Compare::Events(2),
        ),
        post("/v3/kv/compaction", r#"{"revision":"4"}"#),
        post("/v3/kv/range", r#"{"key":"Zm9v","revision":"3"}"#),
        post("/v3/kv/compaction", r#"{"revision":"4"}"#),
        // etcd's exact texts, which clients match.
        post("/v3/cluster/member/remove", r#"{"ID":"12345"}"#),
        post("/v3/cluster/member/promote", r#"{"ID":"12345"}"#),
        with(post("/v3/maintenance/status", "{}"), Compare::Status),
        with(post("/v3/cluster/member/list", "{}"), Compare::Status),
        with(
            Step {
                method: "GET",
                path: "/v3/kv/range",
                body: String::new(),
                compare: Compare::All,
            },
            Compare::Status,
        ),
    ];

    let mut failures = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let mut want = run(&etcd.client, step);
        let mut got = run(&keel_addr, step);
        let drop_ttl = step.compare == Compare::NoTtl;
        for d in want.docs.iter_mut().chain(got.docs.iter_mut()) {
            normalize(d, drop_ttl);
        }
        let same = want.status == got.status
            && match step.compare {
                Compare::All | Compare::NoTtl => want.docs == got.docs,
                Compare::Code => {
                    let code = |a: &Answer| a.docs.first().map(|d| d["code"].clone());
                    code(&want) == code(&got)
                }
                Compare::Status => true,
                Compare::Events(_) => {
                    events(&want.docs) == events(&got.docs)
                        && created(&want.docs) == created(&got.docs)
                }
            };
        if !same {
            failures.push(format!(
                "step {i}: {} {} {}\n  etcd: {} {:?}\n  keel: {} {:?}",
                step.method,
                step.path,
                shortened(&step.body),
                want.status,
                shortened(&format!("{:?}", want.docs)),
                got.status,
                shortened(&format!("{:?}", got.docs))
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} steps differ:\n{}\n(etcd's log:\n{})",
        failures.len(),
        steps.len(),
        failures.join("\n"),
        etcd.log_tail()
    );
}

/// `text`, or its start if it is long (a big request's body).
fn shortened(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}… ({} bytes)", &text[..at], text.len()),
        None => text.to_string(),
    }
}

/// CORS, compared with etcd's (whose default allows any origin): a
/// preflight `OPTIONS`, a gateway call and `/health` from a web origin.
/// Then Keel's own settings: none by default, or a list of origins, and
/// requests from other origins refused before they run.
#[test]
fn cors_answers_as_etcds() {
    let Some(etcd_bin) = common::etcd_or_skip("the CORS comparison") else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdProc::start(&etcd_bin, tmp.path());
    let keel = TestCluster::start(1, "etcd_cors = [\"*\"]\n");
    let keel_addr = keel.nodes[0].etcd.clone();
    wait_healthy(&etcd.client);
    wait_healthy(&keel_addr);
    let origin = "origin: https://dash.example\r\n";
    let preflight = "access-control-request-method: POST\r\n\
                     access-control-request-headers: content-type\r\n";
    let cors = |a: &Answer| {
        let h = |n: &str| a.header(n).map(str::to_string);
        (
            a.status,
            h("access-control-allow-origin"),
            h("access-control-allow-methods"),
            h("access-control-allow-headers"),
        )
    };
    let calls = [
        (
            "OPTIONS",
            "/v3/kv/range",
            format!("{origin}{preflight}"),
            "",
        ),
        (
            "POST",
            "/v3/kv/range",
            origin.to_string(),
            r#"{"key":"Zm9v"}"#,
        ),
        ("GET", "/health", origin.to_string(), ""),
    ];
    for (method, path, extra, body) in &calls {
        let want = exchange(&etcd.client, method, path, extra, body, &|_| false);
        let got = exchange(&keel_addr, method, path, extra, body, &|_| false);
        assert_eq!(cors(&got), cors(&want), "{method} {path}");
        assert_eq!(
            want.header("access-control-allow-origin"),
            Some("*"),
            "{method} {path}: etcd's default"
        );
    }

    // Keel's default: no origin is allowed; its requests are refused
    // before they run (a "simple" POST would write), and so is a
    // preflight. Without an Origin (a program, not a page): answered.
    let off = TestCluster::start(1, "");
    let off_addr = off.nodes[0].etcd.clone();
    wait_healthy(&off_addr);
    let extra = format!("{origin}{preflight}");
    let put = r#"{"key":"d2Vi","value":"MQ=="}"#;
    let a = exchange(&off_addr, "OPTIONS", "/v3/kv/range", &extra, "", &|_| false);
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.header("access-control-allow-origin"), None);
    let a = exchange(&off_addr, "POST", "/v3/kv/put", origin, put, &|_| false);
    assert_eq!(
        (a.status, a.docs[0]["code"].as_i64()),
        (403, Some(7)),
        "{a:?}"
    );
    assert_eq!(a.header("access-control-allow-origin"), None);
    // The gRPC routes too: tonic takes a call over HTTP/1.1 whatever its
    // content type, which a page can send (a gRPC frame: no compression,
    // length, PutRequest{key: "web", value: "1"}).
    let grpc_put = "\0\0\0\0\x08\x0a\x03web\x12\x011";
    let a = exchange(
        &off_addr,
        "POST",
        "/etcdserverpb.KV/Put",
        origin,
        grpc_put,
        &|_| false,
    );
    assert_eq!(
        (a.status, a.docs[0]["code"].as_i64()),
        (403, Some(7)),
        "{a:?}"
    );
    // And over HTTP/2, as a gRPC client that sent an Origin would.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let refused = rt.block_on(async {
        use keel_etcd_proto::etcdserverpb::kv_client::KvClient;
        use keel_etcd_proto::etcdserverpb::PutRequest;
        let channel = common::etcd_channel(&off_addr).await;
        let mut kv = KvClient::with_interceptor(channel, |mut r: tonic::Request<()>| {
            let evil = "https://evil.example".parse().expect("metadata value");
            r.metadata_mut().insert("origin", evil);
            Ok(r)
        });
        let put = PutRequest {
            key: "web".into(),
            value: "1".into(),
            ..Default::default()
        };
        kv.put(put)
            .await
            .expect_err("a put from a web origin is refused")
    });
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let range = r#"{"key":"d2Vi"}"#;
    let a = exchange(&off_addr, "POST", "/v3/kv/range", "", range, &|_| false);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.docs[0]["count"], Value::Null, "a refused put ran: {a:?}");

    // A list: an allowed origin gets itself back; another is refused.
    let listed = TestCluster::start(1, "etcd_cors = [\"https://dash.example:443\"]\n");
    let listed_addr = listed.nodes[0].etcd.clone();
    wait_healthy(&listed_addr);
    let a = exchange(&listed_addr, "OPTIONS", "/v3/kv/range", &extra, "", &|_| {
        false
    });
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.header("access-control-allow-origin"),
        Some("https://dash.example")
    );
    assert_eq!(a.header("vary"), Some("origin"));
    let a = exchange(&listed_addr, "POST", "/v3/kv/put", origin, put, &|_| false);
    assert_eq!(a.status, 200, "{a:?}");
    let evil = "origin: https://evil.example\r\n";
    let a = exchange(
        &listed_addr,
        "POST",
        "/v3/kv/deleterange",
        evil,
        range,
        &|_| false,
    );
    assert_eq!(
        (
            a.status,
            a.header("access-control-allow-origin"),
            a.header("vary")
        ),
        (403, None, Some("origin"))
    );
    let a = exchange(&listed_addr, "POST", "/v3/kv/range", "", range, &|_| false);
    assert_eq!(a.docs[0]["count"], "1", "the refused delete ran: {a:?}");
    // An answer to a program (no Origin) varies with the origin too.
    let a = exchange(&listed_addr, "GET", "/health", "", "", &|_| false);
    assert_eq!((a.status, a.header("vary")), (200, Some("origin")), "{a:?}");
}

/// A streaming call whose request body is sent in chunks while its answer
/// is read, line by line, as it comes.
struct Chunked {
    w: TcpStream,
    r: BufReader<TcpStream>,
    head_read: bool,
    text: String,
}

impl Chunked {
    fn open(addr: &str, path: &str) -> Chunked {
        let w = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        w.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut c = Chunked {
            r: BufReader::new(w.try_clone().expect("clone")),
            w,
            head_read: false,
            text: String::new(),
        };
        write!(
            c.w,
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             transfer-encoding: chunked\r\n\r\n"
        )
        .expect("write head");
        c
    }

    /// Sends `text` as one chunk of the body.
    fn send(&mut self, text: &str) {
        write!(self.w, "{:x}\r\n{text}\r\n", text.len()).expect("write chunk");
    }

    /// Ends the body.
    fn finish(&mut self) {
        self.w.write_all(b"0\r\n\r\n").expect("write last chunk");
    }

    /// The answer's next JSON line, or None where the answer ends.
    fn next(&mut self) -> Option<Value> {
        let mut line = String::new();
        if !self.head_read {
            self.r.read_line(&mut line).expect("status line");
            assert!(line.contains(" 200 "), "{line}");
            loop {
                line.clear();
                self.r.read_line(&mut line).expect("header");
                if line.trim().is_empty() {
                    break;
                }
            }
            self.head_read = true;
        }
        loop {
            if let Some(end) = self.text.find('\n') {
                let doc: String = self.text.drain(..=end).collect();
                if !doc.trim().is_empty() {
                    return Some(serde_json::from_str(doc.trim()).expect("a JSON line"));
                }
                continue;
            }
            line.clear();
            self.r.read_line(&mut line).expect("chunk size");
            let size = usize::from_str_radix(line.trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size {line:?}"));
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.r.read_exact(&mut chunk).expect("chunk");
            self.text
                .push_str(std::str::from_utf8(&chunk[..size]).expect("utf-8"));
        }
    }

    /// Watch events until `n` have come, as (watch id, event), sorted.
    fn events(&mut self, n: usize) -> Vec<(String, Value)> {
        let mut got = Vec::new();
        while got.len() < n {
            let doc = self.next().expect("the watch stream ended");
            let id = doc["result"]["watch_id"]
                .as_str()
                .unwrap_or("0")
                .to_string();
            for e in doc["result"]["events"].as_array().into_iter().flatten() {
                got.push((id.clone(), e.clone()));
            }
        }
        got.sort_by_key(|(id, e)| (id.clone(), e.to_string()));
        got
    }
}

/// Streams whose request body is sent in chunks (`transfer-encoding:
/// chunked`), compared with etcd's: requests sent over time, then the
/// body ended, are all answered; a watch goes on after the body ends; a
/// stream whose first request is no request is an error. Then what etcd
/// 3.4 does not do over HTTP/1.1 (its Go server reads the whole body
/// before it sends the answer's head): Keel answers each request as it
/// arrives, so a client can keep one keep-alive or watch call open and
/// send more requests on it.
#[test]
fn streams_take_requests_as_they_are_sent() {
    let Some((_tmp, etcd, _keel, keel_addr)) = etcd_and_keel("the gateway stream comparison")
    else {
        return;
    };
    let call = |addr: &str, path, body: &str| request(addr, "POST", path, body, &|_| false);
    let put = |addr: &str, v: &str| {
        let a = call(
            addr,
            "/v3/kv/put",
            &format!(r#"{{"key":"Y2g=","value":"{v}"}}"#),
        );
        assert_eq!(a.status, 200, "{a:?}");
    };
    let keep_alive = r#"{"ID":"2000"}"#;
    let create = r#"{"create_request":{"key":"Y2g="}}"#;
    let create_prev = r#"{"create_request":{"key":"Y2g=","prev_kv":true}}"#;

    let transcript = |addr: &str| -> Vec<Value> {
        let mut out = Vec::new();
        let mut note = |mut v: Value| {
            normalize(&mut v, true);
            out.push(v);
        };
        note(call(addr, "/v3/lease/grant", r#"{"TTL":60,"ID":2000}"#).docs[0].clone());
        let mut k = Chunked::open(addr, "/v3/lease/keepalive");
        k.send(keep_alive);
        k.send(keep_alive);
        k.finish();
        for _ in 0..2 {
            note(k.next().expect("a keep-alive answer"));
        }
        note(Value::from(format!("then {:?}", k.next())));

        let mut w = Chunked::open(addr, "/v3/watch");
        w.send(create);
        w.send(create_prev);
        w.finish();
        for _ in 0..2 {
            note(w.next().expect("created"));
        }
        put(addr, "MQ==");
        note(Value::from(format!("{:?}", w.events(2))));

        for path in ["/v3/watch", "/v3/lease/keepalive"] {
            let a = call(addr, path, "garbage");
            note(Value::from(format!(
                "{path}: {} {}",
                a.status, a.docs[0]["code"]
            )));
        }
        out
    };
    let want = transcript(&etcd.client);
    let got = transcript(&keel_addr);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g, w, "step {i}");
    }
    assert_eq!(got.len(), want.len());

    // Keel: each request answered before the next is sent.
    let mut k = Chunked::open(&keel_addr, "/v3/lease/keepalive");
    for _ in 0..3 {
        k.send(keep_alive);
        let a = k.next().expect("a keep-alive answer");
        assert_eq!(a["result"]["ID"], "2000", "{a}");
    }
    k.finish();
    assert_eq!(k.next(), None);
    let mut w = Chunked::open(&keel_addr, "/v3/watch");
    w.send(create);
    assert_eq!(w.next().expect("created")["result"]["created"], true);
    put(&keel_addr, "Mg==");
    let got = w.events(1);
    assert_eq!(got[0].1["kv"]["value"], "Mg==", "{got:?}");
    w.send(create_prev);
    let second = w.next().expect("created");
    assert_eq!(second["result"]["created"], true, "{second}");
    put(&keel_addr, "Mw==");
    let got = w.events(2);
    assert_eq!(got[1].1["prev_kv"]["value"], "Mg==", "{got:?}");
}
