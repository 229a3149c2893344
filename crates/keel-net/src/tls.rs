//! TLS for the peer links (`PeerTls`), for the native client port and
//! `http_addr` (`ServerTls`, and `ClientTls` for the native port's
//! clients), and the PEM loading the etcd API's TLS shares with them.
//!
//! A client connection's handshake runs on the network threads; once done,
//! the connection is a `TlsWire` served as a plain one is (see below).
//!
//! With `PeerTls` every peer connection is mutual TLS: the dialer checks the
//! accepting node's certificate against the trusted CA and the host of the
//! peer address it dialed, and the accepting node requires a certificate
//! from the dialer, signed by the same CA, that names the host of the peer
//! address the hello's node has in its configuration (`check_peer_name`):
//! a certificate speaks for the node at the address it names, not for any
//! node of the cluster. Only after the handshake is the hello said, so
//! nobody without a certificate from the cluster's CA can open a link (a
//! hello alone names a node but proves nothing).
//!
//! Once the hello is done, a link's connection is a `TlsWire`: the socket
//! and rustls' connection state behind a lock, used as the plain TCP
//! transport uses its socket. Any thread with messages to send encrypts
//! them and writes with non-blocking writes (the consensus thread, once per
//! turn), the link's task writes what the socket did not take, and the
//! reader decrypts what arrives. Records that reading produces to send (an
//! alert) go out with the next write, or through the link's task when the
//! socket is full (`TlsWire::on_records_held`).
//!
//! Every TLS configuration a node serves with (this module's, and the etcd
//! API's) is `Reloading`: its files are read again every second, and a
//! change is taken without a restart, so certificates and CAs can be
//! rotated on a running cluster.

use bytes::BytesMut;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The certificates of a PEM file named `what` (a configuration key) at
/// `path`; an error names both, and says so if there is none.
pub fn certificates(
    what: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file named `what` at `path`.
pub fn private_key(what: &str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("{what} {}: no PEM private key in it ({e})", path.display()))
}

/// The CA certificates of a PEM file named `what` at `path`, as roots.
pub fn roots(what: &str, path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates(what, path, pem)? {
        roots
            .add(ca)
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// The crypto provider: ring, as tonic's `tls-ring` uses (aws-lc-rs,
/// rustls' default, with post-quantum key exchange, builds a C library
/// with cmake). rustls deprecates ring's provider for lacking post-quantum
/// key exchange.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file named `what` (a configuration key).
pub fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// How often a `Reloading` configuration reads its files again.
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// What `Reloading` builds a configuration from: the files' contents, in
/// the order they were named.
pub type Build<T> = Box<dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync>;

/// A TLS configuration built from files, and built again from them when
/// their contents change, so a certificate, its key or a trusted CA can be
/// replaced on a running node (renewed before it expires, say) without a
/// restart, as etcd takes renewed certificates. A thread of its own reads
/// the files every `RELOAD_CHECK` and, if they changed, builds the
/// configuration again: a connection never waits for a file or a build
/// (the consensus thread dials peers), and takes the configuration as last
/// built (`current`). Connections already open keep the configuration they
/// opened with.
///
/// Contents that do not make a configuration (a key that is not the
/// certificate's, a file caught half written, one missing for a moment)
/// leave the last good configuration in use, with one warning, until the
/// files change again: a rotation that writes the certificate and then the
/// key is taken once both are written.
pub struct Reloading<T> {
    shared: Arc<Shared<T>>,
    /// Dropped with the configuration, which ends the reloading thread.
    _stop: mpsc::Sender<()>,
}

struct Shared<T> {
    /// Each file's configuration key and path.
    files: Vec<(&'static str, PathBuf)>,
    build: Build<T>,
    /// The configuration in use, and how many times it was built again.
    loaded: Mutex<(Arc<T>, u64)>,
    /// The reloading thread's own state.
    files_state: Mutex<FilesState>,
}

struct FilesState {
    /// What the configuration in use was built from.
    contents: Vec<Vec<u8>>,
    /// Contents that failed to build, or why the files could not be read:
    /// warned of once.
    refused: Option<Result<Vec<Vec<u8>>, String>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads the files (each named by its configuration key, in errors
    /// too) and builds the configuration; an error if that fails.
    pub fn load(files: Vec<(&'static str, PathBuf)>, build: Build<T>) -> Result<Self, String> {
        Self::load_checking_every(files, build, RELOAD_CHECK)
    }

    /// `load`, with the files read again every `check_every` (1 ms at
    /// least).
    pub fn load_checking_every(
        files: Vec<(&'static str, PathBuf)>,
        build: Build<T>,
        check_every: Duration,
    ) -> Result<Self, String> {
        let (contents, current) = first_load(&files, &build)?;
        let shared = Arc::new(Shared {
            files,
            build,
            loaded: Mutex::new((Arc::new(current), 0)),
            files_state: Mutex::new(FilesState {
                contents,
                refused: None,
            }),
        });
        let (stop, stopped) = mpsc::channel::<()>();
        let reloads = shared.clone();
        let every = check_every.max(Duration::from_millis(1));
        std::thread::Builder::new()
            .name("keel-tls-reload".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let run = std::panic::AssertUnwindSafe(|| reloads.reload());
                    if let Err(p) = std::panic::catch_unwind(run) {
                        let what = panic_text(p.as_ref());
                        tracing::error!(
                            "TLS files {}: loading them again panicked ({what}); the \
                             certificates last loaded stay in use",
                            reloads.names()
                        );
                    }
                }
            })
            .map_err(|e| format!("starting the TLS files' reloading thread: {e}"))?;
        Ok(Reloading {
            shared,
            _stop: stop,
        })
    }

    /// `load_checking_every` of a certificate, its key and a trusted CA
    /// (named by `keys`, at `paths`), built by `build` from their contents.
    pub fn load_cert_key_ca(
        keys: [&'static str; 3],
        paths: [&Path; 3],
        check_every: Duration,
        build: impl Fn(&[u8], &[u8], &[u8]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Self, String> {
        let files = keys.into_iter().zip(paths.map(Path::to_path_buf)).collect();
        let build = move |c: &[Vec<u8>]| match c {
            [cert, key, ca] => build(cert, key, ca),
            _ => Err("three files expected".to_string()),
        };
        Self::load_checking_every(files, Box::new(build), check_every)
    }

    /// The configuration to use now.
    pub fn current(&self) -> Arc<T> {
        self.current_with_generation().0
    }

    /// `current`, and how many times it was built again since the first
    /// load (what was made from an older one, a cached connection to
    /// another node, may be made again).
    pub fn current_with_generation(&self) -> (Arc<T>, u64) {
        lock_unpoisoned(&self.shared.loaded).clone()
    }

    /// How many times the configuration was built again since the first
    /// load.
    pub fn generation(&self) -> u64 {
        lock_unpoisoned(&self.shared.loaded).1
    }
}

impl<T> Shared<T> {
    /// Reads the files, and builds the configuration again if they changed
    /// (on the reloading thread).
    fn reload(&self) {
        let read = read_all(&self.files);
        let mut state = lock_unpoisoned(&self.files_state);
        if read.as_ref().is_ok_and(|c| *c == state.contents) {
            state.refused = None;
            return;
        }
        if state.refused.as_ref() == Some(&read) {
            return;
        }
        let names = self.names();
        let contents = match read {
            Ok(contents) => contents,
            Err(e) => {
                tracing::warn!(
                    "TLS files {names}: {e}; the certificates last loaded stay in use until the \
                     files can be read"
                );
                state.refused = Some(Err(e));
                return;
            }
        };
        // (A build that panics is refused as one that fails: once.)
        let build = std::panic::AssertUnwindSafe(|| (self.build)(&contents));
        let built = std::panic::catch_unwind(build).unwrap_or_else(|p| {
            Err(format!(
                "loading them panicked ({})",
                panic_text(p.as_ref())
            ))
        });
        match built {
            Ok(built) => {
                {
                    let mut loaded = lock_unpoisoned(&self.loaded);
                    loaded.0 = Arc::new(built);
                    loaded.1 += 1;
                }
                state.contents = contents;
                state.refused = None;
                tracing::info!(
                    "TLS files {names} changed: loaded again, for connections from now on"
                );
            }
            Err(e) => {
                tracing::warn!(
                    "TLS files {names} changed, but do not load: {e}; the certificates last \
                     loaded stay in use until the files change again"
                );
                state.refused = Some(Ok(contents));
            }
        }
    }

    fn names(&self) -> String {
        let keys: Vec<&str> = self.files.iter().map(|(k, _)| *k).collect();
        keys.join(", ")
    }
}

/// How long a start waits to read files that did not load once more, in
/// case a rotation was under way (a certificate written, its key not
/// yet); and how many times it does while they keep changing.
const START_RETRY_WAIT: Duration = Duration::from_millis(250);
const START_RETRIES: usize = 8;

/// The first load of `files`: if they do not load, they are read again
/// after `START_RETRY_WAIT`, and tried again if they changed meanwhile (a
/// node restarted while its certificates are replaced takes the new set,
/// rather than refusing to start on a certificate without its key).
fn first_load<T>(
    files: &[(&'static str, PathBuf)],
    build: &Build<T>,
) -> Result<(Vec<Vec<u8>>, T), String> {
    let mut read = read_all(files);
    for _ in 0..START_RETRIES {
        let e = match &read {
            Ok(contents) => match build(contents) {
                Ok(built) => return Ok((contents.clone(), built)),
                Err(e) => e,
            },
            Err(e) => e.clone(),
        };
        std::thread::sleep(START_RETRY_WAIT);
        let again = read_all(files);
        if again == read {
            return Err(e);
        }
        read = again;
    }
    let contents = read?;
    let built = build(&contents)?;
    Ok((contents, built))
}

/// A panic's message.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

fn read_all(files: &[(&'static str, PathBuf)]) -> Result<Vec<Vec<u8>>, String> {
    files.iter().map(|(k, p)| read_file(k, p)).collect()
}

fn lock_unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The PEM files of the peer links' TLS (the configuration keys
/// `peer_cert_file`, `peer_key_file` and `peer_trusted_ca_file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerTlsFiles {
    /// This node's certificate chain: presented both when it dials a peer
    /// and when a peer dials it, so it must be valid for both uses (TLS
    /// server and client authentication, or no extended key usage at all)
    /// and name the host of this node's peer address as the others dial it.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// The CA(s) that sign every node's certificate.
    pub trusted_ca_file: PathBuf,
}

/// TLS for the peer links, loaded from `PeerTlsFiles` (and again when
/// they change: `Reloading`).
#[derive(Clone)]
pub struct PeerTls(Arc<Reloading<PeerConfigs>>);

struct PeerConfigs {
    connector: TlsConnector,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

impl PeerTls {
    /// Reads and checks the files; an error names the file and the problem.
    pub fn load(files: &PeerTlsFiles) -> Result<PeerTls, String> {
        Self::load_checking_every(files, RELOAD_CHECK)
    }

    /// `load`, the files read again every `check_every`.
    pub fn load_checking_every(
        files: &PeerTlsFiles,
        check_every: Duration,
    ) -> Result<PeerTls, String> {
        let paths = files.clone();
        Reloading::load_cert_key_ca(
            ["peer_cert_file", "peer_key_file", "peer_trusted_ca_file"],
            [&files.cert_file, &files.key_file, &files.trusted_ca_file],
            check_every,
            move |cert, key, ca| peer_configs(&paths, cert, key, ca),
        )
        .map(|r| PeerTls(Arc::new(r)))
    }

    pub(crate) fn connector(&self) -> TlsConnector {
        self.0.current().connector.clone()
    }

    /// How many times the files were loaded again since the start.
    pub fn generation(&self) -> u64 {
        self.0.generation()
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.0.current().acceptor.clone()
    }
}

/// Checks that this node's certificate is one the other nodes can take
/// (as they check it, but for the name): signed by the CA they trust (the
/// same file), within its validity dates, and for TLS server and client
/// use. A node whose certificate is not would start (or take it on a
/// reload) and then fail every link it opens. A certificate not valid
/// *yet* is taken with a warning: that may be this machine's clock, or an
/// issuer that does not backdate, and it comes right by itself.
fn check_own_certificate(
    files: &PeerTlsFiles,
    certs: &[CertificateDer<'static>],
    roots: &rustls::RootCertStore,
    verifier: &dyn rustls::server::danger::ClientCertVerifier,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<(), String> {
    use rustls::CertificateError as C;
    let cert_file = files.cert_file.display();
    let [leaf, intermediates @ ..] = certs else {
        return Err(format!("peer_cert_file {cert_file}: no certificate"));
    };
    let now = rustls::pki_types::UnixTime::now();
    let checked = rustls::server::ParsedCertificate::try_from(leaf)
        .and_then(|parsed| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                provider.signature_verification_algorithms.all,
            )
        })
        .and_then(|()| {
            verifier
                .verify_client_cert(leaf, intermediates, now)
                .map(|_| ())
        });
    let why = match checked {
        Ok(()) => return Ok(()),
        Err(rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => {
            tracing::warn!(
                "peer_cert_file {cert_file}: the certificate is not valid yet by this machine's \
                 clock; the other nodes refuse it until it is"
            );
            return Ok(());
        }
        Err(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => format!(
            "it is not signed by a CA in peer_trusted_ca_file {}, which must sign every \
             node's certificate (intermediate certificates go after it in peer_cert_file)",
            files.trusted_ca_file.display()
        ),
        Err(rustls::Error::InvalidCertificate(e @ (C::Expired | C::ExpiredContext { .. }))) => {
            format!("it has expired ({e})")
        }
        Err(rustls::Error::InvalidCertificate(
            C::InvalidPurpose | C::InvalidPurposeContext { .. },
        )) => "its extended key usage does not allow both TLS server and client use (a node \
             presents it both ways)"
            .to_string(),
        Err(e) => e.to_string(),
    };
    Err(format!(
        "peer_cert_file {cert_file}: the other nodes would refuse this certificate: {why}"
    ))
}

fn peer_configs(
    files: &PeerTlsFiles,
    cert: &[u8],
    key: &[u8],
    ca: &[u8],
) -> Result<PeerConfigs, String> {
    let certs = certificates("peer_cert_file", &files.cert_file, cert)?;
    let key = private_key("peer_key_file", &files.key_file, key)?;
    let roots = Arc::new(roots("peer_trusted_ca_file", &files.trusted_ca_file, ca)?);
    let provider = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("peer_trusted_ca_file: {e}"))?;
    check_own_certificate(files, &certs, &roots, verifier.as_ref(), &provider)?;
    let both = "peer_cert_file and peer_key_file";
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|e| format!("{both}: {e}"))?;
    // A link is one long connection: nothing to resume.
    server.send_tls13_tickets = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| format!("{both}: {e}"))?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok(PeerConfigs {
        connector: TlsConnector::from(Arc::new(client)),
        acceptor: TlsAcceptor::from(Arc::new(server)),
    })
}

/// The TLS error inside an I/O error of a TLS stream (tokio-rustls makes
/// every rustls error an `InvalidData` I/O error), if it is one.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Is `e` the other side's TLS alert (a refusal: of a certificate, say)?
pub fn alert_received(e: &io::Error) -> bool {
    matches!(tls_error(e), Some(rustls::Error::AlertReceived(_)))
}

/// Did TLS fail on a certificate, this side's or the other's: refused by
/// the other side (its alert), or not trusted here? Such a failure comes
/// back every time until a certificate or a CA changes.
pub fn certificate_refused(e: &io::Error) -> bool {
    use rustls::AlertDescription as A;
    match tls_error(e) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => true,
        Some(rustls::Error::AlertReceived(alert)) => matches!(
            alert,
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
                | A::HandshakeFailure
        ),
        _ => false,
    }
}

/// Did the other side answer a TLS handshake with something that is not
/// TLS (an HTTP or gRPC server, say)?
pub fn not_tls(e: &io::Error) -> bool {
    matches!(tls_error(e), Some(rustls::Error::InvalidMessage(_)))
}

/// Checks that the certificate the peer of `conn` presented (already
/// verified against the trusted CA by the handshake) names `name`: the
/// host of the peer address of the node its hello named.
pub(crate) fn check_peer_name(
    conn: &rustls::ServerConnection,
    name: &ServerName<'_>,
) -> Result<(), String> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert).map_err(|e| e.to_string())?;
    rustls::client::verify_server_name(&parsed, name).map_err(|e| e.to_string())
}

/// The configuration keys of a port's server TLS: its certificate, its
/// key, and the CA that must sign clients' certificates (named in errors
/// and in the reload's log lines).
pub type ServerTlsKeys = [&'static str; 3];

/// The native client port's (`client_addr`) TLS settings.
pub const CLIENT_PORT_TLS: ServerTlsKeys = [
    "client_tls_cert_file",
    "client_tls_key_file",
    "client_tls_trusted_ca_file",
];

/// The operators' HTTP port's (`http_addr`) TLS settings.
pub const HTTP_PORT_TLS: ServerTlsKeys = [
    "http_tls_cert_file",
    "http_tls_key_file",
    "http_tls_trusted_ca_file",
];

/// Server TLS on a node's port (the native client port, `http_addr`): its
/// certificate, and with a trusted CA, clients must present a certificate
/// it signs. Loaded again when the files change (`Reloading`).
#[derive(Clone)]
pub struct ServerTls(Arc<Reloading<TlsAcceptor>>);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    /// Reads and checks the files (the configuration keys `keys` name
    /// them, in errors too): the certificate, its key and, for client
    /// certificates, the CA that must sign them.
    pub fn load(
        keys: ServerTlsKeys,
        cert_file: &Path,
        key_file: &Path,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let [cert_key, key_key, ca_key] = keys;
        let mut files = vec![
            (cert_key, cert_file.to_path_buf()),
            (key_key, key_file.to_path_buf()),
        ];
        files.extend(ca_file.map(|ca| (ca_key, ca.to_path_buf())));
        let paths = files.clone();
        let build = move |c: &[Vec<u8>]| {
            let ([(_, cert_file), (_, key_file), ..], [cert, key, ..]) = (&paths[..], c) else {
                return Err("two files expected".to_string());
            };
            let certs = certificates(cert_key, cert_file, cert)?;
            let key = private_key(key_key, key_file, key)?;
            let provider = provider();
            let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS: {e}"))?;
            let builder = match (paths.get(2), c.get(2)) {
                (Some((_, ca)), Some(pem)) => {
                    let roots = Arc::new(roots(ca_key, ca, pem)?);
                    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        roots, provider,
                    )
                    .build()
                    .map_err(|e| format!("{ca_key}: {e}"))?;
                    builder.with_client_cert_verifier(verifier)
                }
                _ => builder.with_no_client_auth(),
            };
            let config = builder
                .with_single_cert(certs, key)
                .map_err(|e| format!("{cert_key} and {key_key}: {e}"))?;
            Ok(TlsAcceptor::from(Arc::new(config)))
        };
        Reloading::load(files, Box::new(build)).map(|r| ServerTls(Arc::new(r)))
    }

    /// The acceptor for a connection opening now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::clone(&self.0.current())
    }
}

/// A native-protocol client's TLS: the CA that signs the nodes' client-port
/// certificates, and the client's own certificate if the nodes ask for one.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Reads and checks the files, named in errors as the `keel` command's
    /// flags `--cacert`, `--cert` and `--key` name them.
    pub fn load(ca_file: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, String> {
        let roots = roots("--cacert", ca_file, &read_file("--cacert", ca_file)?)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert, key)) => {
                let certs = certificates("--cert", cert, &read_file("--cert", cert)?)?;
                let key = private_key("--key", key, &read_file("--key", key)?)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("--cert and --key: {e}"))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// TLS over `tcp`, connected to the node at `addr` (host:port), whose
    /// certificate must name its host.
    pub async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = server_name(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.connector.connect(name, tcp).await
    }
}

/// The name a dialer checks the certificate of the node at `addr`
/// (host:port) against: its IP address, or its DNS name.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("address {addr:?}: {host:?} cannot name a TLS certificate ({e})"))
}

/// Plaintext taken into TLS records per step: records are made only once
/// the ones before are written, so a connection holds at most about this
/// much encrypted beyond what its owner counts.
const CHUNK: usize = 64 << 10;

/// A TLS connection past its handshake, shared by the threads that write
/// to it and the task that reads it (see the module's text). Whoever
/// touches the socket holds `conn`'s lock, so records never interleave.
pub(crate) struct TlsWire {
    sock: TcpStream,
    conn: Mutex<rustls::Connection>,
    /// Called when records are left to write that no writer will write
    /// (`on_records_held`).
    records_held: OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// The socket as `io::Read` and `io::Write`, non-blocking (a full or empty
/// socket is `WouldBlock`).
struct Sock<'a>(&'a TcpStream);

impl Read for Sock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for Sock<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TlsWire {
    pub(crate) fn new(sock: TcpStream, mut conn: rustls::Connection) -> Arc<TlsWire> {
        // Its owner bounds what it hands over (`CHUNK` at a time).
        conn.set_buffer_limit(None);
        Arc::new(TlsWire {
            sock,
            conn: Mutex::new(conn),
            records_held: OnceLock::new(),
        })
    }

    /// Sets what is called when reading left records to send (an alert)
    /// and the socket did not take them: the owner's writer must then write
    /// them (`write_all` with nothing more), since no write of its own may
    /// come.
    /// (Set once; later calls change nothing.)
    pub(crate) fn on_records_held(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.records_held.set(f);
    }

    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes the records held, without waiting: true once none are left.
    fn push(&self, conn: &mut rustls::Connection) -> io::Result<bool> {
        while conn.wants_write() {
            match conn.write_tls(&mut Sock(&self.sock)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Records are held that the socket has not taken yet.
    pub(crate) fn pending(&self) -> bool {
        self.lock().wants_write()
    }

    /// A non-blocking write of (the start of) `buf`: the bytes taken into
    /// records, `CHUNK` at a time while the socket takes every record, or
    /// `WouldBlock` while records made before are still held. The last
    /// chunk taken may stay held in records the socket did not take
    /// (`pending`): the caller's writer must then finish (`write_all`).
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        let mut conn = self.lock();
        let mut taken = 0;
        loop {
            match self.push(&mut conn) {
                Ok(true) => {}
                Ok(false) => break,
                // (What was taken is the writer's to finish: it meets the
                // error again, and the link ends.)
                Err(e) if taken == 0 => return Err(e),
                Err(_) => break,
            }
            if taken == buf.len() {
                break;
            }
            let rest = &buf[taken..];
            match conn.writer().write(&rest[..rest.len().min(CHUNK)]) {
                Ok(0) => break,
                Ok(n) => taken += n,
                Err(e) if taken == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if taken == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    /// Writes all of `buf` and every record held, waiting for the socket.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        loop {
            let written = {
                let mut conn = self.lock();
                if self.push(&mut conn)? {
                    if buf.is_empty() {
                        return Ok(());
                    }
                    let n = conn.writer().write(&buf[..buf.len().min(CHUNK)])?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    buf = &buf[n..];
                    self.push(&mut conn)?
                } else {
                    false
                }
            };
            if !written {
                self.sock.writable().await?;
            }
        }
    }

    /// Reads decrypted bytes into `buf`'s spare room (which the caller
    /// makes): their number, or 0 at the end of the stream (the peer's
    /// close, with or without TLS's own close message: frames carry their
    /// lengths, so a cut is seen as a partial frame).
    pub(crate) async fn read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut eof = false;
        loop {
            let held = {
                let mut conn = self.lock();
                let state = match conn.process_new_packets() {
                    Ok(state) => state,
                    Err(e) => {
                        // The alert that says why, if the socket takes it.
                        let _ = self.push(&mut conn);
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("TLS: {e}"),
                        ));
                    }
                };
                let ready = state.plaintext_bytes_to_read();
                if ready > 0 {
                    let room = (buf.capacity() - buf.len()).max(1);
                    let n = ready.min(room);
                    let start = buf.len();
                    buf.resize(start + n, 0);
                    conn.reader().read_exact(&mut buf[start..])?;
                    return Ok(n);
                }
                if eof || state.peer_has_closed() {
                    return Ok(0);
                }
                // Records processing made (an alert).
                !self.push(&mut conn).unwrap_or(true)
            };
            if held {
                if let Some(f) = self.records_held.get() {
                    f();
                }
            }
            self.sock.readable().await?;
            let mut conn = self.lock();
            match conn.read_tls(&mut Sock(&self.sock)) {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    /// A `Reloading` of a number written in a file: built again when the
    /// contents change, not when they stay the same; contents that do not
    /// build, or a file gone, leave the last good one in use, and are
    /// built once, not on every look. (The looks are made here, one by
    /// one: the reloading thread's first is an hour away.)
    #[test]
    fn a_reloading_configuration_follows_its_files_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("number");
        let write = |text: &str| std::fs::write(&path, text).expect("write");
        write("1");
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        let build: Build<u32> = Box::new(move |c| {
            counted.fetch_add(1, Ordering::Relaxed);
            let [text] = c else {
                return Err("one file expected".into());
            };
            String::from_utf8_lossy(text)
                .parse()
                .map_err(|e| format!("not a number: {e}"))
        });
        let r = Reloading::load_checking_every(
            vec![("number_file", path.clone())],
            build,
            Duration::from_secs(3600),
        )
        .expect("load");
        // (What is in use after a look at the files, how many times it was
        // built again, and how many builds there were in all.)
        let look = || {
            r.shared.reload();
            let (n, generation) = r.current_with_generation();
            (*n, generation, builds.load(Ordering::Relaxed))
        };
        assert_eq!(look(), (1, 0, 1));
        write("2");
        assert_eq!((look(), look()), ((2, 1, 2), (2, 1, 2)));
        write("two");
        assert_eq!((look(), look()), ((2, 1, 3), (2, 1, 3)));
        std::fs::remove_file(&path).expect("remove");
        assert_eq!((look(), look()), ((2, 1, 3), (2, 1, 3)));
        write("two");
        // (Refused before the file went: tried again, as it came back.)
        assert_eq!(look(), (2, 1, 4));
        write("3");
        assert_eq!((look(), look()), ((3, 2, 5), (3, 2, 5)));
        write("3");
        assert_eq!(look(), (3, 2, 5));
    }

    /// A build that panics is refused as one that fails: the last good
    /// configuration stays, and it is not built again until the files
    /// change.
    #[test]
    fn a_build_that_panics_is_refused_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("text");
        std::fs::write(&path, "fine").expect("write");
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        let build: Build<String> = Box::new(move |c| {
            counted.fetch_add(1, Ordering::Relaxed);
            let [text] = c else {
                return Err("one file expected".into());
            };
            let text = String::from_utf8_lossy(text).into_owned();
            assert_ne!(text, "panic", "told to");
            Ok(text)
        });
        let r = Reloading::load_checking_every(
            vec![("text_file", path.clone())],
            build,
            Duration::from_secs(3600),
        )
        .expect("load");
        std::fs::write(&path, "panic").expect("write");
        r.shared.reload();
        r.shared.reload();
        assert_eq!(*r.current(), "fine");
        assert_eq!(builds.load(Ordering::Relaxed), 2);
        std::fs::write(&path, "fine again").expect("write");
        r.shared.reload();
        assert_eq!(
            r.current_with_generation(),
            (Arc::new("fine again".into()), 1)
        );
    }

    /// The reloading thread looks at the files by itself: a change is
    /// taken with no connection asking.
    #[test]
    fn the_files_are_read_again_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("text");
        std::fs::write(&path, "1").expect("write");
        let build: Build<String> = Box::new(|c| {
            let [text] = c else {
                return Err("one file expected".into());
            };
            Ok(String::from_utf8_lossy(text).into_owned())
        });
        let r = Reloading::load_checking_every(
            vec![("text_file", path.clone())],
            build,
            Duration::from_millis(5),
        )
        .expect("load");
        assert_eq!(*r.current(), "1");
        // (Written whole: a look between a truncation and a write would
        // load an empty file.)
        let staged = dir.path().join("text.new");
        std::fs::write(&staged, "2").expect("write");
        std::fs::rename(&staged, &path).expect("rename");
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.generation() == 0 {
            assert!(Instant::now() < deadline, "never read again");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(r.current_with_generation(), (Arc::new("2".to_string()), 1));
    }

    /// A start that finds files that do not load (a rotation under way)
    /// reads them again shortly, and takes them if they changed: here the
    /// first build itself finishes the rotation. Files that stay as they
    /// were are refused after one more look.
    #[test]
    fn a_start_during_a_rotation_waits_for_the_files_to_settle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("number");
        std::fs::write(&path, "half written").expect("write");
        let builds = Arc::new(AtomicUsize::new(0));
        let (counted, rotated) = (builds.clone(), path.clone());
        let build: Build<u32> = Box::new(move |c| {
            counted.fetch_add(1, Ordering::Relaxed);
            let [text] = c else {
                return Err("one file expected".into());
            };
            let parsed = String::from_utf8_lossy(text).parse();
            if parsed.is_err() {
                std::fs::write(&rotated, "7").expect("write");
            }
            parsed.map_err(|e| format!("not a number: {e}"))
        });
        let r = Reloading::load(vec![("number_file", path.clone())], build).expect("load");
        assert_eq!((*r.current(), builds.load(Ordering::Relaxed)), (7, 2));

        std::fs::write(&path, "never a number").expect("write");
        let build: Build<u32> = Box::new(|c| {
            let [text] = c else {
                return Err("one file expected".into());
            };
            String::from_utf8_lossy(text)
                .parse()
                .map_err(|e| format!("not a number: {e}"))
        });
        let e = Reloading::load(vec![("number_file", path)], build)
            .err()
            .expect("files that do not load");
        assert!(e.starts_with("not a number"), "{e}");
    }

    #[test]
    fn a_file_that_cannot_be_read_at_first_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nothing-here.pem");
        let build: Build<()> = Box::new(|_| Ok(()));
        let e = Reloading::load(vec![("some_file", path)], build)
            .err()
            .expect("a missing file");
        assert!(
            e.starts_with("some_file ") && e.contains("nothing-here.pem"),
            "{e}"
        );
    }
}
