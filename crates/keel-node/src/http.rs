//! A minimal HTTP/1.1 endpoint for operators: `GET /metrics` (Prometheus
//! text) and `GET /status` (JSON). Anything else is a 404; one request per
//! connection.

use crate::metrics::Metrics;
use keel_net::codec::NodeStatus;
use keel_net::tcp::NetStats;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub async fn serve(
    addr: &str,
    status: Arc<Mutex<NodeStatus>>,
    metrics: Arc<Metrics>,
    net: Arc<NetStats>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let (status, metrics, net) = (status.clone(), metrics.clone(), net.clone());
            tokio::spawn(async move {
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
                        metrics.render_with(&net),
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
            });
        }
    });
    Ok(())
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
