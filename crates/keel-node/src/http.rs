//! A minimal HTTP/1.1 endpoint for operators: `GET /metrics` (Prometheus
//! text) and `GET /status` (JSON). Anything else is a 404; one request per
//! connection. With `http_tls_cert_file` it is HTTPS only (and with
//! `http_tls_trusted_ca_file` a client must present a certificate that CA
//! signs, as a Prometheus `tls_config` can).
//!
//! Anyone who reaches the port can open connections: each must send its
//! request and take the answer within `REQUEST_WAIT`; at most
//! `CONNECTIONS.all` are served at once, `CONNECTIONS.per_host` from one
//! host (more are closed as they come); a failing accept (out of
//! descriptors) pauses the loop instead of spinning on it. Plain HTTP on an
//! HTTPS port is answered, in plain HTTP, that the port takes HTTPS; TLS
//! on a plain port is closed. Refusals are counted in
//! `keel_http_rejected_connections_total`, and they and failed accepts are
//! logged as warnings at most once per 10 s each.

use crate::metrics::Metrics;
use keel_net::codec::NodeStatus;
use keel_net::tcp::{linger, tls_opening, Bounds, Hosts, NetStats, Opening, Quiet};
use keel_net::tls::ServerTls;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// How long a connection has for its TLS handshake, its request, and the
/// answer, in all.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// Connections served at once.
const CONNECTIONS: Bounds = Bounds {
    all: 256,
    per_host: 64,
};

pub async fn serve(
    addr: &str,
    status: Arc<Mutex<NodeStatus>>,
    metrics: Arc<Metrics>,
    net: Arc<NetStats>,
    tls: Option<ServerTls>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let hosts = Hosts::default();
    let quiet = Arc::new(Quiet::default());
    let accept_failures = Quiet::default();
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    accept_failures.say(format!("http_addr: accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = hosts.take(remote.ip(), CONNECTIONS) else {
                metrics.http_rejected_connections.inc();
                quiet.say(format!(
                    "http_addr: {remote} refused: {} connections at once from one host, {} in \
                     all, are served",
                    CONNECTIONS.per_host, CONNECTIONS.all
                ));
                continue;
            };
            let (status, metrics, net) = (status.clone(), metrics.clone(), net.clone());
            let (tls, quiet) = (tls.clone(), quiet.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let deadline = tokio::time::Instant::now() + REQUEST_WAIT;
                let refused = |why: String| {
                    metrics.http_rejected_connections.inc();
                    quiet.say(format!("http_addr: {remote} refused: {why}"));
                };
                let served = async {
                    let opening = tls_opening(&stream, deadline).await;
                    match (opening, tls) {
                        (Opening::Closed | Opening::Silent, _) => {}
                        (Opening::Failed(e), _) => debug!("http_addr: {remote}: {e}"),
                        (Opening::NotTls, None) => answer(stream, &status, &metrics, &net).await,
                        (Opening::Tls, Some(tls)) => {
                            match tls.acceptor().accept(stream).into_fallible().await {
                                Ok(s) => answer(s, &status, &metrics, &net).await,
                                Err((e, stream)) => {
                                    refused(format!("TLS handshake failed: {e}"));
                                    linger(stream).await;
                                }
                            }
                        }
                        (Opening::NotTls, Some(_)) => {
                            refused(
                                "plain HTTP, and this port takes only HTTPS (http_tls_cert_file \
                                 is set)"
                                    .into(),
                            );
                            plain_refusal(stream).await;
                        }
                        (Opening::Tls, None) => {
                            refused(
                                "TLS, and this port takes only plain HTTP (http_tls_cert_file is \
                                 not set)"
                                    .into(),
                            );
                            linger(stream).await;
                        }
                    }
                };
                if tokio::time::timeout_at(deadline, served).await.is_err() {
                    debug!("http_addr: {remote} not served within {REQUEST_WAIT:?}: closed");
                }
            });
        }
    });
    Ok(())
}

/// Tells a plain HTTP client on an HTTPS port to use HTTPS (after its
/// request head, so the answer is not lost to a reset).
async fn plain_refusal(mut s: TcpStream) {
    read_head(&mut s).await;
    let body = "this port takes only HTTPS: use https://\n";
    respond(s, "400 Bad Request", "text/plain", body).await;
}

/// Reads one request from `s` and writes the answer.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    status: &Mutex<NodeStatus>,
    metrics: &Metrics,
    net: &NetStats,
) {
    let head = read_head(&mut s).await;
    let req = String::from_utf8_lossy(&head);
    let path = req.split_whitespace().nth(1).unwrap_or("");
    let (code, ctype, body) = match path {
        "/metrics" => (
            "200 OK",
            crate::metrics::CONTENT_TYPE,
            metrics.render_with(net),
        ),
        "/status" => {
            let st = status.lock().map(|s| s.clone()).unwrap_or_default();
            let links = net.peer_protocols();
            ("200 OK", "application/json", status_json(&st, &links))
        }
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n".into(),
        ),
    };
    respond(s, code, ctype, &body).await;
}

/// A request's head (up to its blank line, at most 4 KiB), or what came
/// of it before the connection ended.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    buf.truncate(n);
    buf
}

/// Writes an answer and ends the connection.
async fn respond<S: AsyncWrite + Unpin>(mut s: S, code: &str, ctype: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {code}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    // (A TLS stream sends its close_notify here; a plain one its FIN.)
    let _ = s.shutdown().await;
}

/// `GET /status`: the node's status, and the peer protocol each of its
/// links speaks (`links`, 0 while down; `NetStats::peer_protocols`).
pub fn status_json(s: &NodeStatus, links: &[(u64, u8)]) -> String {
    serde_json::json!({
        "id": s.id,
        "role": s.role,
        "term": s.term,
        "leader": s.leader,
        "append_position": s.append,
        "durable_position": s.durable,
        "commit_position": s.commit,
        "applied_position": s.applied,
        "voters": s.voters,
        "learners": s.learners,
        "followers": s.followers.iter().map(|(id, m)| serde_json::json!({"id": id, "matched": m, "lag": s.append.saturating_sub(*m)})).collect::<Vec<_>>(),
        "peer_links": links.iter().map(|(id, v)| serde_json::json!({"id": id, "peer_protocol": v})).collect::<Vec<_>>(),
    })
    .to_string()
}
