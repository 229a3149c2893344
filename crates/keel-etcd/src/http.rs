//! etcd's plain-HTTP endpoints, served on the etcd API's own port next to
//! gRPC as etcd serves them on its client URL, for the probes, scrapers and
//! tools that expect them there (Kubernetes liveness probes on `/health`,
//! Prometheus jobs scraping `<client URL>/metrics`, `etcdctl check
//! datascale`):
//!
//! - `GET /health`: `{"health":"true"}` (200) when this member has no
//!   NOSPACE alarm, knows a leader and a linearizable read through it
//!   succeeds within a second, as etcd 3.4 checks; otherwise
//!   `{"health":"false","reason":"…"}` with 503. As in etcd,
//!   `?exclude=NOSPACE` (repeatable) ignores that alarm and
//!   `?serializable=true` reads this member's own state instead (a
//!   liveness probe's check: Kubernetes' etcd probe asks for both, so a
//!   full quota or a slow cluster does not get the member restarted); any
//!   other method than GET is 405.
//! - `GET /version`: `{"etcdserver":"3.4.30","etcdcluster":"3.4.0"}`.
//! - `GET /metrics`: the node's Prometheus metrics (the same as its status
//!   address serves), with etcd's `etcd_server_has_leader`,
//!   `etcd_server_is_leader`, `etcd_server_leader_changes_seen_total`,
//!   `etcd_debugging_mvcc_watch_stream_total` and
//!   `etcd_debugging_mvcc_watcher_total` added for the dashboards and
//!   alerts written against etcd.
//!
//! The JSON gateway (`POST /v3/...`) is `crate::gateway`. Anything else is
//! a 404 that says what is served; a gRPC call of an unknown method still
//! gets gRPC's `Unimplemented`.
//!
//! CORS (`Cors`, the `etcd_cors` setting, etcd's `--cors`): answers to a
//! request from an allowed web origin carry etcd's CORS headers, and a
//! preflight `OPTIONS` from one is answered 200, as etcd answers them. By
//! default no origin is allowed (etcd allows any), and unlike etcd a
//! request from an origin not allowed is refused (403) rather than run,
//! on every path of the port (`crate::origin`). There is no check of the
//! `Host` header (etcd's `--host-whitelist`): a DNS-rebinding page's
//! POSTs carry its origin and are refused, but its GETs of /health,
//! /version and /metrics (no keys in them) are answered.

use crate::maintenance::ETCD_VERSION;
use crate::{gateway, Api};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_kv::Query;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How long `/health` waits for its linearizable read (etcd 3.4: 1 s).
pub const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The cluster version `/version` reports (etcd reports major.minor.0).
pub const CLUSTER_VERSION: &str = "3.4.0";

/// What the 404 says.
const NOT_FOUND: &str = "404 page not found: this is a Keel member's etcd API address; it \
serves etcd's gRPC API, its JSON gateway (POST /v3/kv/range and the like) and GET /health, \
/version and /metrics\n";

/// The routes above and the JSON gateway's (`crate::gateway`, bodies of
/// up to `ApiConfig::max_body_bytes`), for the etcd API server
/// (`crate::serve`, which puts them and the gRPC services behind
/// `origin::OriginCheck`).
pub fn router(api: Arc<Api>) -> axum::Router {
    axum::Router::new()
        .route("/health", axum::routing::any(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .merge(gateway::router(api.config.max_body_bytes()))
        .fallback(not_found)
        .with_state(api)
}

/// The web origins whose pages may read the HTTP answers.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Cors {
    /// None: no CORS headers.
    #[default]
    Off,
    /// Any origin (`*`).
    Any,
    /// These origins (`scheme://host[:port]`, lowercase).
    Origins(Vec<String>),
}

impl Cors {
    /// From `etcd_cors`: origins such as `https://dash.example.com:8443`,
    /// or `*` for any; an error names an entry that is no origin.
    pub fn parse(origins: &[String]) -> Result<Cors, String> {
        if origins.iter().any(|o| o.trim() == "*") {
            return Ok(Cors::Any);
        }
        let mut out = Vec::new();
        for o in origins {
            let mut origin = o.trim().trim_end_matches('/').to_ascii_lowercase();
            // A browser's Origin leaves out the scheme's default port.
            for (scheme, port) in [("https://", ":443"), ("http://", ":80")] {
                if origin.starts_with(scheme) && origin.ends_with(port) {
                    origin.truncate(origin.len() - port.len());
                }
            }
            // Any scheme: browser extensions and app shells have their own
            // (`chrome-extension://…`, `app://…`).
            let valid = origin.split_once("://").is_some_and(|(scheme, host)| {
                scheme.starts_with(|c: char| c.is_ascii_lowercase())
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+.-".contains(c))
                    && !host.is_empty()
                    && !host.contains(['/', '?', '#', '@'])
                    && !host.contains(char::is_whitespace)
            });
            if !valid {
                return Err(format!(
                    "etcd_cors: {o:?} is not a web origin: expected scheme://host[:port] (e.g. \
                     https://dash.example.com or chrome-extension://<id>), or * for any"
                ));
            }
            out.push(origin);
        }
        Ok(if out.is_empty() {
            Cors::Off
        } else {
            Cors::Origins(out)
        })
    }

    /// The `Access-Control-Allow-Origin` a request from `origin` gets.
    pub fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self {
            Cors::Off => None,
            Cors::Any => Some(HeaderValue::from_static("*")),
            Cors::Origins(list) => {
                let origin = origin?;
                let text = origin.to_str().ok()?.to_ascii_lowercase();
                list.contains(&text).then(|| origin.clone())
            }
        }
    }
}

/// What a `/health` request asks to be checked (its query, as etcd reads
/// it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheck {
    /// Alarms not to count (`exclude`, repeatable: `exclude=NOSPACE`).
    pub excluded: Vec<String>,
    /// Read this member's own state rather than through the log
    /// (`serializable=true`).
    pub serializable: bool,
}

impl HealthCheck {
    /// From a request's query string (`exclude=NOSPACE&serializable=true`).
    pub fn from_query(query: Option<&str>) -> HealthCheck {
        let mut check = HealthCheck::default();
        for pair in query.unwrap_or("").split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "exclude" if !value.is_empty() => check.excluded.push(value.to_string()),
                "serializable" => check.serializable = value == "true",
                _ => {}
            }
        }
        check
    }
}

/// Why this member is not healthy, if it is not (etcd 3.4's checks, in
/// its order: alarms not excluded, a leader, a read, through the log
/// unless `serializable`).
pub async fn unhealthy(api: &Api, check: &HealthCheck) -> Option<String> {
    let nospace = api.config.quota.as_ref().is_some_and(|q| q.alarm());
    if nospace && !check.excluded.iter().any(|a| a == "NOSPACE") {
        return Some("ALARM NOSPACE".into());
    }
    if api.node.status().leader.is_none() {
        return Some("RAFT NO LEADER".into());
    }
    // (etcd reads the key "health"; a read of the store's status takes
    // the same path, the leader's confirmation unless serializable, and
    // reads no keys, so it needs no user while auth is on.)
    let read = api.read(&Query::Status, check.serializable);
    let kind = if check.serializable {
        "serializable"
    } else {
        "linearizable"
    };
    match tokio::time::timeout(HEALTH_READ_TIMEOUT, read).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("{kind} read failed: {}", e.message())),
        Err(_) => Some(format!(
            "{kind} read not answered within {HEALTH_READ_TIMEOUT:?}"
        )),
    }
}

/// `/health`'s body for the outcome of `unhealthy`.
pub fn health_body(reason: Option<&str>) -> String {
    match reason {
        None => r#"{"health":"true"}"#.to_string(),
        Some(r) => serde_json::json!({"health": "false", "reason": r}).to_string(),
    }
}

fn json(code: StatusCode, body: String) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// etcd answers `/health` as plain text (its JSON body is not labelled).
fn health_text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn health(State(api): State<Arc<Api>>, method: axum::http::Method, uri: Uri) -> Response {
    if method != axum::http::Method::GET {
        let mut r = health_text(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match unhealthy(&api, &HealthCheck::from_query(uri.query())).await {
        None => health_text(StatusCode::OK, health_body(None)),
        Some(reason) => {
            tracing::debug!("/health: unhealthy: {reason}");
            // (etcd's error answer ends with a newline.)
            health_text(
                StatusCode::SERVICE_UNAVAILABLE,
                health_body(Some(&reason)) + "\n",
            )
        }
    }
}

async fn version() -> Response {
    json(
        StatusCode::OK,
        format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{CLUSTER_VERSION}"}}"#),
    )
}

/// The node's metrics followed by etcd's leader metrics, in the same
/// OpenMetrics text (before its end marker).
pub fn metrics_text(api: &Api) -> String {
    let mut text = api.node.render_metrics();
    let st = api.node.status();
    let has_leader = u8::from(st.leader.is_some());
    let is_leader = u8::from(st.leader == Some(api.node.id()));
    let changes = api.node.metrics().leaders_seen.get();
    let streams = api.watch_gauges.streams.load(Ordering::Relaxed);
    let watchers = api.watch_gauges.watchers.load(Ordering::Relaxed);
    let etcd = format!(
        "# HELP etcd_server_has_leader Whether a leader exists: 1 if this member knows one, 0 \
         if not.\n# TYPE etcd_server_has_leader gauge\netcd_server_has_leader {has_leader}\n\
         # HELP etcd_server_is_leader Whether this member is the leader: 1 if it is, 0 if \
         not.\n# TYPE etcd_server_is_leader gauge\netcd_server_is_leader {is_leader}\n\
         # HELP etcd_server_leader_changes_seen The number of leader changes seen.\n\
         # TYPE etcd_server_leader_changes_seen counter\n\
         etcd_server_leader_changes_seen_total {changes}\n\
         # HELP etcd_debugging_mvcc_watch_stream_total The watch streams open on this member.\n\
         # TYPE etcd_debugging_mvcc_watch_stream_total gauge\n\
         etcd_debugging_mvcc_watch_stream_total {streams}\n\
         # HELP etcd_debugging_mvcc_watcher_total The watches open on this member.\n\
         # TYPE etcd_debugging_mvcc_watcher_total gauge\n\
         etcd_debugging_mvcc_watcher_total {watchers}\n"
    );
    match text.rfind("# EOF") {
        Some(at) => text.insert_str(at, &etcd),
        None => text.push_str(&etcd),
    }
    text
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    (
        [(header::CONTENT_TYPE, keel_node::metrics::CONTENT_TYPE)],
        metrics_text(&api),
    )
        .into_response()
}

/// A 404 for HTTP requests; for a gRPC call of a method no service has,
/// gRPC's `Unimplemented` (what the server answers without a fallback).
async fn not_found(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented("").into_http::<axum::body::Body>()
    } else {
        (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            NOT_FOUND,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_parse_and_match() {
        let parse = |v: &[&str]| Cors::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(parse(&[]), Ok(Cors::Off));
        assert_eq!(parse(&["https://a.example", "*"]), Ok(Cors::Any));
        let c = parse(&[
            "HTTPS://Dash.example:8443/",
            "http://localhost:3000",
            "https://a.example:443",
            "http://b.example:80",
            "http://c.example:443",
        ])
        .unwrap();
        assert_eq!(
            c,
            Cors::Origins(vec![
                "https://dash.example:8443".into(),
                "http://localhost:3000".into(),
                "https://a.example".into(),
                "http://b.example".into(),
                "http://c.example:443".into(),
            ])
        );
        assert_eq!(
            parse(&["chrome-extension://abcdef"]),
            Ok(Cors::Origins(vec!["chrome-extension://abcdef".into()]))
        );
        for bad in [
            "dash.example",
            "1http://x",
            "ht_tp://x",
            "https://",
            "https://a/b",
            "https://a b",
        ] {
            let e = parse(&[bad]).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        let origin = HeaderValue::from_static("https://dash.example:8443");
        assert_eq!(c.allow(Some(&origin)), Some(origin.clone()));
        let other = HeaderValue::from_static("https://evil.example");
        assert_eq!(c.allow(Some(&other)), None);
        assert_eq!(c.allow(None), None);
        assert_eq!(Cors::Off.allow(Some(&origin)), None);
        assert_eq!(Cors::Any.allow(None), Some(HeaderValue::from_static("*")));
    }

    #[test]
    fn health_bodies_are_etcds_json() {
        assert_eq!(health_body(None), r#"{"health":"true"}"#);
        let v: serde_json::Value =
            serde_json::from_str(&health_body(Some("RAFT \"NO\" LEADER"))).expect("json");
        assert_eq!(v["health"], "false");
        assert_eq!(v["reason"], "RAFT \"NO\" LEADER");
    }
}
