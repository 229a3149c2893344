//! TLS on the etcd API port, as etcd's `--cert-file`, `--key-file`,
//! `--trusted-ca-file` and `--client-cert-auth`: every connection (gRPC,
//! the JSON gateway, `/health`, `/metrics`) is TLS, offered with ALPN `h2`
//! and `http/1.1`; with client certificate authentication a client must
//! present a certificate signed by the trusted CA. A member passes some
//! requests on to another (cluster changes to the leader, alarm listings
//! to every member): those calls verify the other member's certificate
//! against the trusted CA and present this member's own certificate.
//! The files are read again every second (`Reloading`): a renewed
//! certificate is taken without a restart.

use keel_net::tls::Reloading;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;

/// How long a client may take over its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files TLS is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// This member's certificate chain.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// The CA(s) that sign clients' certificates (with `client_cert_auth`)
    /// and the other members' certificates.
    pub trusted_ca_file: PathBuf,
    /// Refuse clients without a certificate signed by the trusted CA.
    pub client_cert_auth: bool,
}

/// TLS loaded from `TlsFiles` (and again when they change:
/// `keel_net::tls::Reloading`): the acceptor for this member's port, and
/// the configuration of its calls to other members.
#[derive(Clone)]
pub struct Tls(Arc<Reloading<Parts>>);

struct Parts {
    acceptor: TlsAcceptor,
    client: tonic::transport::ClientTlsConfig,
}

impl Tls {
    /// Reads and checks the files; an error names the file and the problem.
    pub fn load(files: &TlsFiles) -> Result<Tls, String> {
        let paths = files.clone();
        Reloading::load_cert_key_ca(
            ["etcd_cert_file", "etcd_key_file", "etcd_trusted_ca_file"],
            [&files.cert_file, &files.key_file, &files.trusted_ca_file],
            keel_net::tls::RELOAD_CHECK,
            move |cert, key, ca| parts(&paths, cert, key, ca),
        )
        .map(|r| Tls(Arc::new(r)))
    }

    /// The acceptor for a connection opening now.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.0.current().acceptor.clone()
    }

    /// The configuration of a connection to another member made now, and
    /// its generation (`Reloading::current_with_generation`): a connection
    /// made with an older one is made again, as tonic's channels reconnect
    /// with the configuration they were made with.
    pub fn client(&self) -> (tonic::transport::ClientTlsConfig, u64) {
        let (parts, generation) = self.0.current_with_generation();
        (parts.client.clone(), generation)
    }

    /// How many times the files were loaded again since the start.
    pub fn generation(&self) -> u64 {
        self.0.generation()
    }
}

fn parts(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_pem: &[u8],
) -> Result<Parts, String> {
    use keel_net::tls::{certificates, private_key, provider, roots};
    let certs = certificates("etcd_cert_file", &files.cert_file, cert_pem)?;
    let key = private_key("etcd_key_file", &files.key_file, key_pem)?;
    let roots = roots("etcd_trusted_ca_file", &files.trusted_ca_file, ca_pem)?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = if files.client_cert_auth {
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("etcd_trusted_ca_file: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("etcd_cert_file and etcd_key_file: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let client = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    Ok(Parts {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        client,
    })
}

/// The connections `listener` accepts, each after its TLS handshake. A
/// handshake runs on a task of its own, so a slow or failing client holds
/// up no other; a failed one is logged at debug level and dropped.
pub fn accept(
    listener: TcpListener,
    tls: Tls,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, say: pause rather than spin.
                        tracing::warn!("accepting an etcd API connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            // Small responses must not wait for a delayed ACK.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY on an etcd API connection: {e}");
            }
            // (As last loaded: the files are looked at again every second.)
            let (acceptor, tx) = (tls.acceptor(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!("TLS handshake with {peer}: {e}"),
                    Err(_) => tracing::debug!(
                        "TLS handshake with {peer} not done within {HANDSHAKE_TIMEOUT:?}"
                    ),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
