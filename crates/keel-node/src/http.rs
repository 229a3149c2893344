//! A minimal HTTP/1.1 endpoint for operators: `GET /metrics` (Prometheus
//! text) and `GET /status` (JSON). Anything else is a 404; one request per
//! connection. With `http_tls_cert_file` it is HTTPS only (and with
//! `http_tls_trusted_ca_file` a client must present a certificate that CA
//! signs, as a Prometheus `tls_config` can).
//!
//! Anyone who reaches the port can open connections: each must send its
//! request and take the answer within `REQUEST_WAIT`, at most
//! `MAX_CONNECTIONS` are served at once (more are closed as they come), and
//! a failing accept (out of descriptors) pauses the loop instead of
//! spinning on it.

use crate::metrics::Metrics;
use keel_net::codec::NodeStatus;
use keel_net::tcp::NetStats;
use keel_net::tls::ServerTls;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

/// How long a connection has for its TLS handshake, its request, and the
/// answer, in all.
const REQUEST_WAIT: Duration = Duration::from_secs(10);

/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;

pub async fn serve(
    addr: &str,
    status: Arc<Mutex<NodeStatus>>,
    metrics: Arc<Metrics>,
    net: Arc<NetStats>,
    tls: Option<ServerTls>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("http_addr: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!("http_addr: {remote} closed: {MAX_CONNECTIONS} connections being served");
                continue;
            };
            let (status, metrics, net) = (status.clone(), metrics.clone(), net.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let served = async {
                    match tls {
                        None => answer(stream, &status, &metrics, &net).await,
                        Some(tls) => match tls.acceptor().accept(stream).await {
                            Ok(s) => answer(s, &status, &metrics, &net).await,
                            Err(e) => debug!("http_addr: TLS handshake with {remote}: {e}"),
                        },
                    }
                };
                if tokio::time::timeout(REQUEST_WAIT, served).await.is_err() {
                    debug!("http_addr: {remote} not served within {REQUEST_WAIT:?}: closed");
                }
            });
        }
    });
    Ok(())
}

/// Reads one request from `s` (up to the end of its head, at most 4 KiB)
/// and writes the answer.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    status: &Mutex<NodeStatus>,
    metrics: &Metrics,
    net: &NetStats,
) {
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
    let req = String::from_utf8_lossy(&buf[..n]);
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
