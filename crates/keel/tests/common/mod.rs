//! Test harness: clusters of real `keel server` processes on loopback, with
//! SIGKILL / SIGSTOP / SIGCONT / wipe / restart, and a KV client.
#![allow(dead_code)]

pub mod proxy;

use bytes::Bytes;
use keel_client::{Client, ClientOptions};
use keel_kv::{Command, Query, Response};
use keel_net::codec::NodeStatus;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

pub const ELECTION_MAX_MS: u64 = 1000;

/// The test clusters' heartbeat and election timeouts, as TOML lines,
/// but for those `extra` sets itself (TOML refuses a key given twice).
fn timing_defaults(extra: &str) -> String {
    let defaults = [
        ("heartbeat_ms", 50),
        ("election_timeout_min_ms", 500),
        ("election_timeout_max_ms", ELECTION_MAX_MS),
    ];
    let set = |key: &str| {
        extra.lines().any(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
    };
    defaults
        .iter()
        .filter(|(key, _)| !set(key))
        .map(|(key, value)| format!("{key} = {value}\n"))
        .collect()
}

pub struct TestNode {
    pub id: u64,
    pub client: String,
    pub peer: String,
    /// Where the node serves the etcd v3 API.
    pub etcd: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    /// Environment variables the node's process is started with, beside
    /// the harness's own (see `set_env`).
    pub env: Vec<(String, String)>,
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    pub _tmp: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    /// Every write the cluster acknowledged: key → value.
    pub acked: BTreeMap<String, String>,
    /// With `start_proxied`: the proxy on each pair's peer link, by (lower
    /// id, higher id).
    pub links: BTreeMap<(u64, u64), proxy::LinkProxy>,
}

/// A loopback port for a test server. Asking the OS for port 0 and
/// releasing it races twice: another test thread may be handed the same
/// port, and an outgoing connection may take it as its ephemeral port
/// before the server binds it. So ports come from below Linux's ephemeral
/// range (32768-60999), from a counter shared by the whole test binary,
/// starting at an offset drawn from the process id so concurrent binaries
/// rarely meet; each is checked to be bindable.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (offset + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN);
}

pub fn keel_exe() -> &'static str {
    env!("CARGO_BIN_EXE_keel")
}

impl TestCluster {
    /// `extra`: more TOML lines for every node's config.
    pub fn start(n: u64, extra: &str) -> TestCluster {
        TestCluster::start_inner(n, 0, extra, false)
    }

    /// Like `start`, plus `spares` nodes (ids `n + 1` on) that every node's
    /// `[[peers]]` lists but that are no members: not started, configured
    /// with `join = true`, ready for `spawn` and `keel cluster add-learner`
    /// (a removed id is never added again, so a node added to a cluster
    /// needs an id of its own). As an operator adds nodes: the first `n`
    /// start with one another as peers (their initial voters), then are
    /// restarted one at a time with the spares' addresses too.
    pub fn start_with_spares(n: u64, spares: u64, extra: &str) -> TestCluster {
        TestCluster::start_inner(n, spares, extra, false)
    }

    /// Like `start`, with every peer link through a `proxy::LinkProxy`
    /// (`cut`, `black_hole`, `delay`, `heal`). The lower id of a pair dials
    /// the other, so its configuration names the proxy as the other's
    /// peer address.
    pub fn start_proxied(n: u64, extra: &str) -> TestCluster {
        TestCluster::start_inner(n, 0, extra, true)
    }

    /// The proxy on the link between `a` and `b` (a proxied cluster's).
    pub fn link(&self, a: u64, b: u64) -> &proxy::LinkProxy {
        self.links
            .get(&(a.min(b), a.max(b)))
            .unwrap_or_else(|| panic!("no proxy between {a} and {b}: start_proxied"))
    }

    /// The proxies on every link of node `id` (a proxied cluster's).
    pub fn links_of(&self, id: u64) -> Vec<&proxy::LinkProxy> {
        let n = self.nodes.len() as u64;
        (1..=n)
            .filter(|&o| o != id)
            .map(|o| self.link(id, o))
            .collect()
    }

    fn start_inner(members: u64, spares: u64, extra: &str, proxied: bool) -> TestCluster {
        assert!(!proxied || spares == 0, "no spares in a proxied cluster");
        let n = members + spares;
        let tmp = tempfile::tempdir().expect("tempdir");
        let addrs: Vec<(String, String, String)> = (0..n)
            .map(|_| {
                (
                    format!("127.0.0.1:{}", free_port()),
                    format!("127.0.0.1:{}", free_port()),
                    format!("127.0.0.1:{}", free_port()),
                )
            })
            .collect();
        let mut links = BTreeMap::new();
        if proxied {
            for a in 1..=n {
                for b in a + 1..=n {
                    let target = &addrs[(b - 1) as usize].1;
                    links.insert((a, b), proxy::LinkProxy::start(target));
                }
            }
        }
        let mut nodes = Vec::new();
        for id in 1..=n {
            let dir = tmp.path().join(format!("node{id}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            let (client, peer, etcd) = addrs[(id - 1) as usize].clone();
            let mut toml = format!(
                "{}id = {id}\ndata_dir = {:?}\npeer_addr = \"{peer}\"\nclient_addr = \"{client}\"\netcd_addr = \"{etcd}\"\n{}{extra}\n",
                if id > members { "join = true\n" } else { "" },
                dir.join("data").display().to_string(),
                timing_defaults(extra),
            );
            // A member's first start: the other members only.
            let mut first = None;
            for pid in 1..=n {
                if pid == members + 1 && id <= members {
                    first = Some(toml.clone());
                }
                if pid != id {
                    let (pc, pp, pe) = &addrs[(pid - 1) as usize];
                    let pp = links.get(&(id, pid)).map_or(pp, |l| &l.addr);
                    toml.push_str(&format!(
                        "\n[[peers]]\nid = {pid}\npeer_addr = \"{pp}\"\nclient_addr = \"{pc}\"\netcd_addr = \"{pe}\"\n"
                    ));
                }
            }
            let config = dir.join("keel.toml");
            std::fs::write(&config, first.as_ref().unwrap_or(&toml)).expect("write config");
            if first.is_some() {
                std::fs::write(dir.join("keel.toml.full"), &toml).expect("write config");
            }
            nodes.push(TestNode {
                id,
                client,
                peer,
                etcd,
                dir,
                config,
                child: None,
                env: Vec::new(),
            });
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut c = TestCluster {
            nodes,
            _tmp: tmp,
            rt,
            acked: BTreeMap::new(),
            links,
        };
        for id in 1..=members {
            c.spawn(id);
        }
        if spares > 0 {
            // Once each has started (recorded the members as its initial
            // voters), it is restarted knowing the spares' addresses.
            let ids: Vec<u64> = (1..=members).collect();
            for id in 1..=members {
                c.wait_status(id, |s| s.voters == ids);
                let dir = &c.node(id).dir;
                std::fs::rename(dir.join("keel.toml.full"), dir.join("keel.toml")).expect("config");
                c.terminate(id, Duration::from_secs(20));
                c.spawn(id);
                c.wait_status(id, |s| s.voters == ids);
            }
        }
        c
    }

    /// Waits (20 s at most) until node `id` answers a status that `ok`.
    pub fn wait_status(&self, id: u64, ok: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
        let start = Instant::now();
        loop {
            match self.status(id) {
                Some(s) if ok(&s) => return s,
                s => assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "node {id}'s status: {s:?}{}",
                    self.logs()
                ),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[(id - 1) as usize]
    }

    pub fn spawn(&mut self, id: u64) {
        let node = &mut self.nodes[(id - 1) as usize];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("keel.log"))
            .expect("log file");
        let err = log.try_clone().expect("log clone");
        let child = Proc::new(keel_exe())
            .args(["server", "--config"])
            .arg(&node.config)
            .env("KEEL_LOG", "info")
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("spawn keel server");
        node.child = Some(child);
    }

    /// Node `id`'s process starts with `env` from its next `spawn` on
    /// (a restart, too), as well as the harness's own variables.
    pub fn set_env(&mut self, id: u64, env: &[(&str, &str)]) {
        self.nodes[(id - 1) as usize].env = env
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Restarts node `id` (SIGKILL, then `spawn`) with `env` (`set_env`).
    pub fn restart_with_env(&mut self, id: u64, env: &[(&str, &str)]) {
        self.kill(id);
        self.set_env(id, env);
        self.spawn(id);
    }

    fn signal(&self, id: u64, sig: i32) {
        let child = self.node(id).child.as_ref().expect("node not running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: signalling a child we spawned.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    pub fn kill(&mut self, id: u64) {
        self.signal(id, libc::SIGKILL);
        if let Some(mut c) = self.nodes[(id - 1) as usize].child.take() {
            let _ = c.wait();
        }
    }
    pub fn pause(&self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }
    pub fn resume(&self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }
    pub fn wipe(&mut self, id: u64) {
        let d = self.node(id).dir.join("data");
        std::fs::remove_dir_all(&d).expect("wipe");
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    pub fn client(&self) -> Client {
        let mut o = ClientOptions::new(self.endpoints());
        o.call_timeout = Duration::from_secs(20);
        o.attempt_timeout = Duration::from_secs(2);
        Client::new(o).expect("client")
    }

    pub fn status(&self, id: u64) -> Option<NodeStatus> {
        let addr = self.node(id).client.clone();
        self.rt
            .block_on(Client::status_of(&addr, Duration::from_millis(500)))
            .ok()
    }

    /// Waits until some running node is leader and a majority of its
    /// voters agrees.
    pub fn wait_for_leader(&self, within: Duration) -> (u64, u64) {
        let start = Instant::now();
        while start.elapsed() < within {
            let running: Vec<u64> = self
                .nodes
                .iter()
                .filter(|n| n.child.is_some())
                .map(|n| n.id)
                .collect();
            let statuses: Vec<NodeStatus> =
                running.iter().filter_map(|&id| self.status(id)).collect();
            if let Some(l) = statuses
                .iter()
                .filter(|s| s.role == "leader")
                .max_by_key(|s| s.term)
            {
                let agree = statuses
                    .iter()
                    .filter(|s| s.leader == Some(l.id) && s.term == l.term)
                    .count();
                if agree * 2 > l.voters.len() {
                    return (l.id, l.term);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no leader within {within:?}; {}", self.logs());
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let log = std::fs::read_to_string(n.dir.join("keel.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            s.push_str(&format!("\n--- node {} log (last lines) ---\n", n.id));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    pub fn put(&mut self, client: &mut Client, key: &str, value: &str) {
        let cmd = Command::Put {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(value.to_string()),
        };
        let r = self
            .rt
            .block_on(client.write(cmd.encode()))
            .unwrap_or_else(|e| panic!("put {key}: {e}{}", self.logs()));
        match Response::decode(&r) {
            Ok(Response::Put { .. }) => {
                self.acked.insert(key.to_string(), value.to_string());
            }
            other => panic!("put {key}: unexpected {other:?}"),
        }
    }

    pub fn get(&self, client: &mut Client, key: &str) -> Option<String> {
        let q = Query::Get {
            key: Bytes::from(key.to_string()),
        };
        let r = self
            .rt
            .block_on(client.read(q.encode()))
            .unwrap_or_else(|e| panic!("get {key}: {e}{}", self.logs()));
        match Response::decode(&r) {
            Ok(Response::Get { kv, .. }) => {
                kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            }
            other => panic!("get {key}: unexpected {other:?}"),
        }
    }

    /// Every acknowledged write is readable (linearizably) with its value.
    pub fn check_acked(&self, client: &mut Client) {
        for (k, v) in self.acked.clone() {
            assert_eq!(
                self.get(client, &k).as_deref(),
                Some(v.as_str()),
                "acknowledged write {k} lost"
            );
        }
    }

    /// Waits until node `id` has applied at least `pos`.
    pub fn wait_applied(&self, id: u64, pos: u64, within: Duration) {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.status(id).is_some_and(|s| s.applied >= pos) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node {id} did not apply up to {pos} within {within:?}: {:?}{}",
            self.status(id),
            self.logs()
        );
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let pid = libc::pid_t::try_from(c.id()).unwrap_or(0);
                // SAFETY: signalling our own child; SIGCONT first in case it is stopped.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

// ----- HTTP endpoints, graceful stops, the CLI (appended helpers) ---------

impl TestCluster {
    /// Like `start`, but every node also serves /metrics and /status over
    /// HTTP; returns the cluster and each node's HTTP address (index id - 1).
    /// (The nodes `start` spawned are killed at once and restarted with the
    /// HTTP address in their configuration.)
    pub fn start_with_http(n: u64, extra: &str) -> (TestCluster, Vec<String>) {
        let mut c = TestCluster::start(n, extra);
        for id in 1..=n {
            c.kill(id);
        }
        let http: Vec<String> = (1..=n).map(|id| c.enable_http(id)).collect();
        for id in 1..=n {
            c.spawn(id);
        }
        (c, http)
    }

    /// Gives node `id` an HTTP address (from its next start on); returns it.
    pub fn enable_http(&mut self, id: u64) -> String {
        let config = self.node(id).config.clone();
        let text = std::fs::read_to_string(&config).expect("read config");
        if let Some(addr) = text.lines().find_map(|l| {
            l.strip_prefix("http_addr = \"")
                .and_then(|r| r.strip_suffix('"'))
        }) {
            return addr.to_string();
        }
        let addr = format!("127.0.0.1:{}", free_port());
        // Top-level keys go before the [[peers]] tables.
        std::fs::write(&config, format!("http_addr = \"{addr}\"\n{text}")).expect("write config");
        addr
    }

    /// SIGTERM: a graceful stop. Waits for the process and returns its exit
    /// status.
    pub fn terminate(&mut self, id: u64, within: Duration) -> std::process::ExitStatus {
        self.signal(id, libc::SIGTERM);
        let mut child = self.nodes[(id - 1) as usize]
            .child
            .take()
            .expect("node not running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("node {id} did not stop within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole log file of node `id`.
    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(self.node(id).dir.join("keel.log")).unwrap_or_default()
    }

    /// Waits until node `id`'s log contains `needle` (at most 20 s, else
    /// fails saying `what` did not happen, with the cluster's logs).
    pub fn wait_log(&self, id: u64, needle: &str, what: &str) {
        let start = Instant::now();
        while !self.log_of(id).contains(needle) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "node {id}: {what} ({needle:?} not logged within 20 s){}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the `keel` command with `--endpoints` of this cluster; returns
    /// the exit code and stdout + stderr.
    pub fn keel_cli(&self, args: &[&str]) -> (i32, String) {
        let endpoints = self.endpoints().join(",");
        keel(
            args.iter()
                .copied()
                .chain(["--endpoints", endpoints.as_str()]),
        )
    }
}

/// Runs the `keel` command with `args`; returns the exit code and stdout +
/// stderr.
pub fn keel<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>) -> (i32, String) {
    let out = Proc::new(keel_exe()).args(args).output().expect("run keel");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `GET path` from an HTTP endpoint; returns the status code and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "")
}

/// `method path` with `body` to an HTTP endpoint over HTTP/1.1; returns the
/// status code and the body (a chunked one joined, with no framing).
pub fn http_request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request_with(addr, method, path, &[], body)
}

/// `http_request` with more header lines (`name`, `value`).
pub fn http_request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    // (Longer than the etcd API's request timeout, 7 s, which a request
    // that finds no leader waits out before its answer, as etcd's does.)
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    if !chunked {
        return (code, body.to_string());
    }
    // Chunks: a hex size line, that many bytes, CRLF; size 0 ends.
    let (mut rest, mut joined) = (body, String::new());
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?} in {raw:?}"));
        if n == 0 {
            break;
        }
        joined.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    (code, joined)
}

/// Checks that `text` is an OpenMetrics exposition as Prometheus' parser
/// takes it: every sample follows the `# TYPE` of its family and is named
/// as that type allows (a counter `c` has samples `c_total`), no family is
/// declared twice, every value is a number, and `# EOF` ends it.
pub fn assert_openmetrics(text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no end marker:\n{text}");
    let mut declared = std::collections::HashSet::new();
    let mut family: Option<(&str, &str)> = None;
    for line in &lines[..lines.len() - 1] {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let (name, kind) = decl.split_once(' ').unwrap_or((decl, ""));
            assert!(declared.insert(name), "{name} declared twice:\n{text}");
            family = Some((name, kind));
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment {line:?}");
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let (fam, kind) = family.unwrap_or_else(|| panic!("{name}: a sample before any # TYPE"));
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "summary" => &["", "_count", "_sum", "_created"],
            "info" => &["_info"],
            "gauge" | "stateset" | "unknown" => &[""],
            other => panic!("{fam}: unknown type {other:?}"),
        };
        let suffix = name.strip_prefix(fam).unwrap_or("(another family)");
        assert!(
            suffixes.contains(&suffix),
            "sample {name} in the {kind} family {fam}: a {kind}'s samples are named \
             {fam}{{{}}}",
            suffixes.join(",")
        );
        let after_labels = match line[name_end..].strip_prefix('{') {
            Some(rest) => &rest[rest.rfind('}').expect("labels end") + 1..],
            None => &line[name_end..],
        };
        let value = after_labels.split_whitespace().next().unwrap_or("");
        assert!(value.parse::<f64>().is_ok(), "{line:?}: value {value:?}");
    }
}

/// The value of metric `name` (no labels) in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Waits until metric `name` of the node serving HTTP at `addr` satisfies
/// `ok`; returns its value.
pub fn wait_metric(addr: &str, name: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let start = Instant::now();
    loop {
        let (code, body) = http_get(addr, "/metrics");
        assert_eq!(code, 200, "{body}");
        let v = metric(&body, name);
        if let Some(v) = v.filter(|&v| ok(v)) {
            return v;
        }
        if start.elapsed() > within {
            panic!("{name} at {addr} is {v:?} after {within:?}:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A gRPC channel to a node's etcd API, retried for up to 10 s while the
/// node starts.
pub async fn etcd_channel(addr: &str) -> tonic::transport::Channel {
    let url = format!("http://{addr}");
    for _ in 0..100 {
        let endpoint = tonic::transport::Channel::from_shared(url.clone()).expect("url");
        if let Ok(ch) = endpoint.connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not connect to {url}");
}

// ------------------------------------------------------------- etcd process

/// The etcd binary: `ETCD_BIN`, else `etcd` on PATH.
pub fn find_etcd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// A single-member etcd on loopback ports, in its own data directory; killed
/// when dropped.
pub struct EtcdProc {
    child: Child,
    pub client: String,
    log: PathBuf,
}

impl EtcdProc {
    pub fn start(bin: &std::path::Path, dir: &std::path::Path) -> EtcdProc {
        let client = format!("127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log = dir.join("etcd.log");
        let out = std::fs::File::create(&log).expect("etcd log");
        let err = out.try_clone().expect("etcd log clone");
        let child = Proc::new(bin)
            .arg("--name")
            .arg("d1")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen-client-urls")
            .arg(format!("http://{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://{client}"))
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("d1={peer}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        EtcdProc { child, client, log }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The etcd binary for a test that compares with etcd, or `None` (the
/// test skips, saying so) where it is missing; under `CI=true` a missing
/// etcd fails the test, since CI installs it.
pub fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_etcd();
    if found.is_none() {
        let msg = "etcd not found (set ETCD_BIN or install Debian's etcd-server: \
                   apt-get install -y etcd-server)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipping {test}: {msg}");
    }
    found
}

/// libfaketime, which moves one process's clocks (Debian's `faketime`),
/// or `None`: `what` (a test, or the part of one that needs it) is
/// skipped, saying so; under `CI=true` a missing one fails the test, since
/// CI installs it.
pub fn faketime_or_skip(what: &str) -> Option<PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    if found.is_none() {
        let msg = "libfaketime not found (apt-get install -y faketime; .ci/run does)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("skipping {what}: {msg}");
    }
    found
}

// ------------------------------------------------------------- etcdctl, TLS

/// Is Debian's `etcdctl` installed? Under `CI=true` a missing one fails the
/// test (CI installs it); elsewhere the test skips, saying so.
pub fn etcdctl_available() -> bool {
    let found = Proc::new("etcdctl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("etcdctl is not installed: `apt-get install -y etcd-client` (.ci/run does)");
        }
        eprintln!("SKIPPED: etcdctl is not installed (apt-get install -y etcd-client)");
    }
    found
}

/// PEM files for TLS tests, written by `tls_files`: a CA, a certificate
/// for 127.0.0.1 and localhost (every member's), a client certificate, and
/// from another CA (whose certificate is `rogue_ca`) a client certificate
/// and one for 127.0.0.1 and localhost.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_ca: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
    pub rogue_server_cert: PathBuf,
    pub rogue_server_key: PathBuf,
    /// Another certificate from the CA for 127.0.0.1 and localhost, with
    /// its key: the members' after a renewal.
    pub renewed_server_cert: PathBuf,
    pub renewed_server_key: PathBuf,
}

impl TlsFiles {
    /// The TOML that serves a node's etcd API with these files.
    pub fn config(&self, client_cert_auth: bool) -> String {
        format!(
            "etcd_cert_file = {:?}\netcd_key_file = {:?}\netcd_trusted_ca_file = {:?}\n\
             etcd_client_cert_auth = {client_cert_auth}\n",
            self.server_cert, self.server_key, self.ca
        )
    }
}

impl TlsFiles {
    /// Replaces the members' certificate and key (`server_cert`,
    /// `server_key`) with `rogue_server_cert` and its key, as a rotation
    /// to another CA would, each file written whole in one rename.
    pub fn rotate_server_to_rogue_ca(&self) {
        self.replace_server(&self.rogue_server_cert, &self.rogue_server_key);
    }

    /// Replaces the members' certificate and key with `cert` and `key`,
    /// each file written whole in one rename (the certificate first).
    pub fn replace_server(&self, cert: &std::path::Path, key: &std::path::Path) {
        for (from, to) in [(cert, &self.server_cert), (key, &self.server_key)] {
            let staged = to.with_extension("new");
            std::fs::copy(from, &staged).expect("copy PEM");
            std::fs::rename(&staged, to).expect("rename PEM");
        }
    }
}

/// `GET path` from `addr` over TLS (ALPN `http/1.1`), trusting the CA in
/// `ca` for 127.0.0.1, with the client certificate and key `identity` if
/// given: the whole answer, or why there is none.
pub async fn https_get(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
    addr: &str,
    path: &str,
) -> Result<String, String> {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("ca cert")).expect("add ca");
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let certs: Vec<_> = CertificateDer::pem_file_iter(cert)
                .expect("client cert")
                .map(|c| c.expect("cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).expect("client key");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    // (The server may close without close_notify after the answer. With
    // TLS 1.3 a refused client certificate shows here, as an alert.)
    let read = tls.read_to_end(&mut answer).await;
    if answer.is_empty() {
        return Err(format!("no answer: {read:?}"));
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Generates the files of `TlsFiles` in `dir`.
pub fn tls_files(dir: &std::path::Path) -> TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("ca cert");
        (cert.pem(), Issuer::new(p, key))
    };
    let leaf = |names: &[&str], issuer: &Issuer<'_, KeyPair>| {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names.clone()).expect("params");
        p.distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    };
    let (ca_pem, issuer) = ca("keel test CA");
    let (rogue_ca_pem, rogue_issuer) = ca("another CA");
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    let (server_cert, server_key) = leaf(&["127.0.0.1", "localhost"], &issuer);
    let (client_cert, client_key) = leaf(&["client"], &issuer);
    let (rogue_cert, rogue_key) = leaf(&["rogue"], &rogue_issuer);
    let (rogue_server_cert, rogue_server_key) = leaf(&["127.0.0.1", "localhost"], &rogue_issuer);
    let (renewed_server_cert, renewed_server_key) = leaf(&["127.0.0.1", "localhost"], &issuer);
    TlsFiles {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
        rogue_ca: write("rogue-ca.pem", &rogue_ca_pem),
        rogue_cert: write("rogue.pem", &rogue_cert),
        rogue_key: write("rogue-key.pem", &rogue_key),
        rogue_server_cert: write("rogue-server.pem", &rogue_server_cert),
        rogue_server_key: write("rogue-server-key.pem", &rogue_server_key),
        renewed_server_cert: write("renewed-server.pem", &renewed_server_cert),
        renewed_server_key: write("renewed-server-key.pem", &renewed_server_key),
    }
}
