//! The `keel` command's own behaviour: `keel dev` keeps a cluster's size
//! and service, writes configs that work from anywhere and leaves nothing
//! behind when a first start fails; `keel kv` and `keel cluster` name what
//! went wrong (an etcd port given as an endpoint, a malformed endpoint, a
//! refused membership change, a node that is down); node logs are plain
//! text with each span once; the flags and their help match the README.

mod common;

use common::{free_port, keel, keel_exe, TestCluster};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A base port for `keel dev --nodes 1`: its node's client, peer and HTTP
/// ports (BASE+1, BASE+101, BASE+201) are free.
/// The tests that run clusters, one at a time: a dev cluster's ports are
/// picked free, but its peer and HTTP ports (client port + 100, + 200) are
/// not reserved, so another test's pick could land on them meanwhile.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn dev_base_port() -> u16 {
    loop {
        let base = free_port() - 1;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if base < 60_000 && free(base + 101) && free(base + 201) {
            return base;
        }
    }
}

/// A running `keel dev`; stopped (SIGTERM: it stops its nodes) when dropped.
struct Dev {
    child: Option<Child>,
    out: PathBuf,
}

impl Dev {
    /// Starts `keel dev args` in `cwd`, its output to a file there.
    fn start(cwd: &Path, args: &[&str]) -> Dev {
        let out = cwd.join(format!("dev-{}.out", free_port()));
        let file = std::fs::File::create(&out).expect("output file");
        let child = Command::new(keel_exe())
            .arg("dev")
            .args(args)
            .current_dir(cwd)
            .env("KEEL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone"))
            .stderr(file)
            .spawn()
            .expect("spawn keel dev");
        Dev {
            child: Some(child),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits for it to exit by itself; None if it still runs after `within`.
    fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut().expect("running");
        while start.elapsed() < within {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Waits until the node at `client` answers and `keel dev` has said
    /// the cluster is up.
    fn wait_up(&mut self, client: &str) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("wait"))
            {
                panic!("keel dev exited ({status}):\n{}", self.output());
            }
            let status = rt.block_on(keel_client::Client::status_of(
                client,
                Duration::from_millis(500),
            ));
            if status.is_ok() && self.output().contains("Ctrl-C stops the cluster") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("keel dev's node did not come up:\n{}", self.output());
    }

    /// SIGTERM; waits for the exit (SIGKILL after 20 s).
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: signalling a child we spawned.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(status) = child.try_wait().expect("wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        self.stop();
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs `keel dev args` in `cwd`, expecting it to fail by itself at once;
/// returns its output.
fn dev_fails(cwd: &Path, args: &[&str]) -> String {
    let mut dev = Dev::start(cwd, args);
    match dev.exit_within(Duration::from_secs(20)) {
        Some(status) => {
            assert!(!status.success(), "keel dev {args:?}:\n{}", dev.output());
            dev.output()
        }
        None => {
            dev.stop();
            panic!(
                "keel dev {args:?} started instead of refusing:\n{}",
                dev.output()
            );
        }
    }
}

/// A --dir keeps the node count and service it was created with: other
/// values are refused with what to do instead (they used to be written
/// into the configs and broke the cluster), and a run without them
/// restarts it as it was. The generated configs name the data directory
/// absolutely, so `keel server --config` run from anywhere finds it.
#[test]
fn dev_keeps_the_size_and_service_a_dir_was_created_with() {
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let base = dev_base_port().to_string();
    let etcd_port = free_port();
    let etcd = etcd_port.to_string();
    let client = format!("127.0.0.1:{}", base.parse::<u16>().expect("port") + 1);
    let flags = [
        "--dir",
        "keel-data",
        "--base-port",
        &base,
        "--etcd-base-port",
        &etcd,
    ];
    let with = |more: &[&str]| -> Vec<String> {
        flags.iter().chain(more).map(|s| s.to_string()).collect()
    };

    let mut dev = Dev::start(cwd, &strs(&with(&["--nodes", "1"])));
    dev.wait_up(&client);
    let config = std::fs::read_to_string(cwd.join("keel-data/node1/keel.toml")).expect("config");
    let data_dir = cwd
        .canonicalize()
        .expect("cwd")
        .join("keel-data/node1/data");
    assert!(
        config.contains(&format!("data_dir = {:?}", data_dir.display().to_string())),
        "the config's data_dir is not {}:\n{config}",
        data_dir.display()
    );
    let (code, text) = keel(["kv", "--endpoints", &client, "put", "greeting", "hello"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("OK (revision 2)"), "{text}");
    // The etcd port given to `keel kv`: named at once, not retried.
    let started = Instant::now();
    let (code, text) = keel([
        "kv",
        "--endpoints",
        &format!("127.0.0.1:{etcd_port}"),
        "get",
        "greeting",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("answers HTTP/gRPC") && text.contains("client_addr"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{text}");
    let status = dev.stop().expect("status");
    assert!(status.success(), "{status}:\n{}", dev.output());
    let log = std::fs::read_to_string(cwd.join("keel-data/node1/keel.log")).expect("log");
    assert!(
        !log.contains('\x1b'),
        "colour escapes in a log file:\n{log}"
    );
    assert!(log.contains("INFO node{id=1}: "), "{log}");

    for (more, says) in [
        (&["--nodes", "3"][..], "--nodes 3"),
        (&["--service", "echo"][..], "--service echo"),
        (&["--nodes", "1", "--service", "lock"][..], "--service lock"),
    ] {
        let text = dev_fails(cwd, &strs(&with(more)));
        assert!(
            text.contains("holds a 1-node kv cluster")
                && text.contains(says)
                && text.contains("another --dir"),
            "{more:?}:\n{text}"
        );
    }
    let backup = cwd.join("backup.keel");
    std::fs::write(&backup, b"not a backup").expect("write");
    let text = dev_fails(
        cwd,
        &strs(&with(&["--restore", backup.to_str().expect("utf-8")])),
    );
    assert!(
        text.contains("--restore seeds a new cluster") && text.contains("another --dir"),
        "{text}"
    );

    // Without --nodes and --service: the cluster as it was, data and all.
    let mut dev = Dev::start(cwd, &strs(&with(&[])));
    dev.wait_up(&client);
    let (code, text) = keel(["kv", "--endpoints", &client, "get", "greeting"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("hello"), "{text}");
    assert!(
        dev.output().contains("1 node, kv service"),
        "{}",
        dev.output()
    );
    let status = dev.stop().expect("status");
    assert!(status.success(), "{status}:\n{}", dev.output());
}

/// A first start that fails (a port in use, a backup that does not
/// restore) removes what it made: a half-made --dir would be taken for a
/// cluster by the next run.
#[test]
fn a_failed_first_dev_start_leaves_nothing_behind() {
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let base = dev_base_port();
    let etcd = free_port();
    let flags = |dir: &str| -> Vec<String> {
        [
            "--dir",
            dir,
            "--nodes",
            "1",
            "--base-port",
            &base.to_string(),
            "--etcd-base-port",
            &etcd.to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |args: Vec<String>| dev_fails(cwd, &strs(&args));

    // The node's client port, then its etcd port, taken by someone else
    // (found before any node starts: a leftover server answering on them
    // would pass for the new node).
    for port in [base + 1, etcd] {
        let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
        let text = run(flags("new"));
        let says = format!("127.0.0.1:{port} is in use");
        assert!(
            text.contains(&says) && text.contains("--base-port"),
            "{text}"
        );
        assert!(
            !cwd.join("new").exists(),
            "a failed first start left {}:\n{text}",
            cwd.join("new").display()
        );
    }

    let backup = cwd.join("junk.keel");
    std::fs::write(&backup, b"junk").expect("write");
    let with_restore = |dir: &str| {
        let mut a = flags(dir);
        a.extend(["--restore".to_string(), backup.display().to_string()]);
        a
    };
    let text = run(with_restore("new"));
    assert!(text.contains("not a Keel backup"), "{text}");
    assert!(!cwd.join("new").exists(), "{text}");
    // A port in use is found before any restoring (which said "Restored
    // every node" and then failed on the port).
    {
        let _taken = std::net::TcpListener::bind(("127.0.0.1", base + 1)).expect("bind");
        let text = run(with_restore("new"));
        assert!(
            text.contains(&format!("127.0.0.1:{} is in use", base + 1))
                && !text.contains("not a Keel backup"),
            "{text}"
        );
        assert!(!cwd.join("new").exists(), "{text}");
    }
    // A directory that was there (empty) stays, empty.
    std::fs::create_dir(cwd.join("empty")).expect("mkdir");
    let text = run(with_restore("empty"));
    assert!(text.contains("not a Keel backup"), "{text}");
    let left: Vec<_> = std::fs::read_dir(cwd.join("empty"))
        .expect("empty dir kept")
        .collect();
    assert!(left.is_empty(), "{left:?}\n{text}");

    // A directory with other things in it is not taken for a cluster.
    std::fs::write(cwd.join("empty/notes.txt"), "mine").expect("write");
    let text = run(flags("empty"));
    assert!(text.contains("holds no keel dev cluster"), "{text}");
    assert!(!cwd.join("empty/node1").exists(), "{text}");

    // After all that, a first start there works.
    let mut dev = Dev::start(cwd, &strs(&flags("new")));
    dev.wait_up(&format!("127.0.0.1:{}", base + 1));
    assert!(cwd.join("new/keel-dev.toml").exists());
    assert!(dev.stop().expect("status").success(), "{}", dev.output());
}

/// `keel kv` and `keel cluster` say what went wrong: a refused membership
/// change is a refusal (it was reported as an unknown outcome after a
/// follower's "not the leader"), an etcd API port is named as such, a
/// status of a down node does not talk of leaders, and a node's log lines
/// show its span once.
#[test]
fn the_cluster_commands_name_what_went_wrong() {
    let _one_at_a_time = serial();
    let c = TestCluster::start(3, "");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let endpoints = format!("{},{}", c.node(follower).client, c.node(leader).client);
    let (code, text) = keel(["cluster", "--endpoints", &endpoints, "remove", "9"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("refused") && text.contains("node 9 is not a member"),
        "{text}"
    );
    assert!(!text.contains("outcome unknown"), "{text}");

    let started = Instant::now();
    let (code, text) = keel(["kv", "--endpoints", &c.node(1).etcd, "get", "k"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("answers HTTP/gRPC (an etcd API"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5), "{text}");

    let down = format!("127.0.0.1:{}", free_port());
    let (code, text) = keel(["cluster", "--endpoints", &down, "status"]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(&format!("{down:<22} unreachable: connect")),
        "{text}"
    );
    assert!(!text.contains("no leader"), "{text}");

    let log = c.log_of(1);
    assert!(log.contains("link to node"), "{log}");
    assert!(!log.contains("node{id=1}:node{id=1}"), "{log}");
    assert!(!log.contains('\x1b'), "{log}");
}

#[test]
fn connection_flags_are_checked_at_once() {
    for (args, says) in [
        (
            &["kv", "--endpoints", "nonsense", "get", "x"][..],
            "\"nonsense\" is not host:port",
        ),
        (
            &["kv", "--endpoints", "127.0.0.1:7101,", "get", "x"][..],
            "is not host:port",
        ),
        (
            &["cluster", "--timeout", "0", "status"][..],
            "give at least 1",
        ),
    ] {
        let started = Instant::now();
        let (code, text) = keel(args);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{args:?}: {text}"
        );
    }
}

/// `--cluster-id` takes hex as the README writes it, and boolean flags can
/// turn off a config file's `true` (`keel restore` shows what the
/// configuration came to before it touches anything).
#[test]
fn server_flags_take_hex_and_switch_booleans_off() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("keel.toml");
    std::fs::write(
        &config,
        format!(
            "id = 1\ndata_dir = {:?}\npeer_addr = \"127.0.0.1:1\"\nclient_addr = \"127.0.0.1:2\"\n\
             join = true\nlease_reads = true\n",
            tmp.path().join("data")
        ),
    )
    .expect("write");
    let config = config.to_str().expect("utf-8");
    let restore = |more: &[&str]| {
        keel(
            ["restore", "/nonexistent/backup.keel", "--config", config]
                .iter()
                .chain(more),
        )
    };
    let (code, text) = restore(&[]);
    assert_ne!(code, 0);
    assert!(text.contains("join = true"), "{text}");
    for more in [
        &["--join=false"][..],
        &[
            "--join=false",
            "--lease-reads=false",
            "--etcd-client-cert-auth=false",
        ],
        &["--join=false", "--cluster-id", "0x6b65656c"],
        &["--join=false", "--cluster-id", "1802921324"],
    ] {
        let (code, text) = restore(more);
        assert_ne!(code, 0);
        assert!(
            text.contains("reading backup /nonexistent/backup.keel"),
            "{more:?}: {text}"
        );
    }
    let (code, text) = restore(&["--cluster-id", "0xzz"]);
    assert_eq!(code, 2);
    assert!(text.contains("decimal or 0x hex"), "{text}");
}

/// The `--long` flags of `keel <args> --help`, each with its help text.
fn flags_with_help(args: &[&str]) -> Vec<(String, String)> {
    let (code, text) = keel(args.iter().chain(&["--help"]));
    assert_eq!(code, 0, "{text}");
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t
            .strip_prefix("--")
            .filter(|_| line.starts_with("      --"))
        {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            flags.push((format!("--{name}"), String::new()));
        } else if t.starts_with("-h, --help") || t.starts_with("-V, --version") {
            flags.push((String::new(), String::new()));
        } else if let Some((_, help)) = flags.last_mut() {
            help.push_str(t);
            help.push(' ');
        }
    }
    flags.retain(|(f, _)| !f.is_empty());
    flags
}

/// Every `keel server` flag has help text and is in the README's list, and
/// the help says what the code does.
#[test]
fn server_flags_are_documented() {
    let flags = flags_with_help(&["server"]);
    assert!(flags.len() > 25, "{flags:?}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README");
    let section = readme
        .split("## Running a node")
        .nth(1)
        .and_then(|s| s.split("| key |").next())
        .expect("the README's Running a node section");
    for (flag, help) in &flags {
        assert!(!help.trim().is_empty(), "{flag} has no help text");
        if flag != "--config" {
            assert!(
                section.contains(&format!("`{flag}")),
                "the README's flag list lacks {flag}"
            );
        }
    }
    let help = |name: &str| {
        flags
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, h)| h.clone())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert!(
        help("--net-threads").contains("at most 256"),
        "{}",
        help("--net-threads")
    );
    let lease = help("--lease-reads");
    assert!(
        lease.contains("may differ between nodes") && !lease.contains("must have the same"),
        "{lease}"
    );
    assert!(
        help("--cluster-id").contains("0x"),
        "{}",
        help("--cluster-id")
    );
}

/// `--timeout` bounds the whole command: a `keel kv` attempt is cut to the
/// time left (a 2 s attempt made `--timeout 1` take 2 s and `--timeout 3`
/// 4 s), and `keel cluster status` asks every endpoint at once within it
/// (it waited 2 s per endpoint whatever the flag said).
#[test]
fn commands_end_within_their_timeout() {
    // Listening, never accepting: connections are taken, nothing answers.
    let silent: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", free_port())).expect("bind"))
        .collect();
    let addrs: Vec<String> = silent
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    for (timeout, within) in [(1, 1800), (3, 3800)] {
        let started = Instant::now();
        let t = timeout.to_string();
        let (code, text) = keel(["kv", "get", "x", "--endpoints", &addrs[0], "--timeout", &t]);
        let took = started.elapsed();
        assert_eq!(code, 2, "{text}");
        assert!(text.contains("no leader reachable"), "{text}");
        assert!(
            took >= Duration::from_secs(timeout) && took < Duration::from_millis(within),
            "--timeout {timeout} took {took:?}: {text}"
        );
    }
    let started = Instant::now();
    let both = addrs.join(",");
    let (code, text) = keel(["cluster", "status", "--endpoints", &both, "--timeout", "1"]);
    let took = started.elapsed();
    assert_eq!(code, 1, "{text}");
    for a in &addrs {
        assert!(
            text.contains(&format!("{a:<22} unreachable: no answer within 1s")),
            "{text}"
        );
    }
    assert!(took < Duration::from_millis(1800), "took {took:?}: {text}");
}

/// The columns of `keel cluster status`'s row for `endpoint`: commit,
/// applied and lag.
fn status_row(text: &str, endpoint: &str) -> Option<(u64, u64, u64)> {
    let row = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(endpoint))?;
    let cols: Vec<u64> = row
        .split_whitespace()
        .skip(7)
        .map(|c| c.parse().ok())
        .collect::<Option<_>>()?;
    match cols[..] {
        [commit, applied, lag] => Some((commit, applied, lag)),
        _ => None,
    }
}

/// What the README's tour runs, against a cluster: a node's HTTP port
/// given as an endpoint is named as such (it never answers a Keel frame,
/// and was "no answer within 2s"); `cluster status` without the leader
/// among the endpoints counts lag from the highest commit position it
/// sees, and says so (it showed 0 for a follower with applied 33 and
/// commit 92); a membership change is reported in words; `keel restore`
/// with another service than the backup's names the backup's.
#[test]
fn the_tour_commands_say_what_they_see() {
    use keel_etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
    use keel_etcd_proto::etcdserverpb::SnapshotRequest;
    let _one_at_a_time = serial();
    // Followers apply at most once a second: their applied position trails
    // their commit position meanwhile.
    let (mut c, http) = TestCluster::start_with_http(3, "follower_apply_interval_ms = 1000");
    let (leader, _) = c.wait_for_leader(Duration::from_secs(10));
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");

    for args in [&["kv", "get", "k"][..], &["cluster", "status"]] {
        let started = Instant::now();
        let (code, text) = keel(args.iter().chain(&["--endpoints", &http[0]]));
        assert_ne!(code, 0, "{args:?}: {text}");
        assert!(
            text.contains(&format!("{} answers HTTP/gRPC", http[0]))
                && text.contains("give a node's client_addr"),
            "{args:?}: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{args:?}: {text}"
        );
    }

    let endpoint = c.node(follower).client.clone();
    let mut client = c.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (commit, applied, lag, text) = loop {
        assert!(
            Instant::now() < deadline,
            "node {follower}'s applied position never trailed its commit position"
        );
        c.put(&mut client, "k", "v");
        let (code, text) = keel(["cluster", "status", "--endpoints", &endpoint]);
        assert_eq!(code, 0, "{text}");
        let (commit, applied, lag) =
            status_row(&text, &endpoint).unwrap_or_else(|| panic!("no row: {text}"));
        if applied < commit {
            break (commit, applied, lag, text);
        }
    };
    assert_eq!(lag, commit - applied, "{text}");
    assert!(
        text.contains("the leader is not among the endpoints: lag is counted from the highest"),
        "{text}"
    );
    let (code, text) = c.keel_cli(&["cluster", "status"]);
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("the leader is not among"), "{text}");

    // A backup of this kv cluster, restored with other services.
    let backup = c._tmp.path().join("backup.keel");
    let etcd = c.node(leader).etcd.clone();
    let file = c.rt.block_on(async {
        let mut m = MaintenanceClient::new(common::etcd_channel(&etcd).await);
        let mut stream = m
            .snapshot(SnapshotRequest {})
            .await
            .expect("snapshot")
            .into_inner();
        let mut file = Vec::new();
        while let Some(piece) = stream.message().await.expect("snapshot stream") {
            file.extend_from_slice(&piece.blob);
        }
        file
    });
    std::fs::write(&backup, file).expect("write backup");
    for service in ["echo", "lock", "matching"] {
        let data = c._tmp.path().join(format!("restored-{service}"));
        let (code, text) = keel([
            "restore",
            backup.to_str().expect("utf-8"),
            "--id",
            "1",
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--peer-addr",
            "127.0.0.1:1",
            "--client-addr",
            "127.0.0.1:2",
            "--cluster-id",
            "5",
            "--service",
            service,
        ]);
        assert_eq!(code, 2, "{text}");
        assert!(
            text.contains(&format!(
                "the backup is not a state the {service:?} service"
            )) && text.contains("it holds the kv service's state")
                && text.contains("--service kv"),
            "{text}"
        );
        assert!(!text.contains("[75, 75, 86, 50]"), "{text}");
        assert!(!data.exists(), "{text}");
    }

    let other = (1..=3)
        .find(|&i| i != leader && i != follower)
        .expect("another follower");
    let (code, text) = c.keel_cli(&["cluster", "remove", &other.to_string()]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text.trim(),
        format!("node {other} removed from the cluster (membership change committed)")
    );
}

/// `keel kv` against a cluster running another service says so, and which
/// flag chooses the service (it printed "decoding the service's answer:
/// response has 1 trailing bytes after its last field"); `keel dev`'s hint
/// runs the release build, as the README does.
#[test]
fn kv_against_another_service_names_the_service_flag() {
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = dev_base_port();
    let client = format!("127.0.0.1:{}", base + 1);
    let mut dev = Dev::start(
        tmp.path(),
        &[
            "--dir",
            "echo",
            "--nodes",
            "1",
            "--service",
            "echo",
            "--base-port",
            &base.to_string(),
        ],
    );
    dev.wait_up(&client);
    assert!(
        dev.output()
            .contains("with `cargo run --release -p keel --` in place of `keel`"),
        "{}",
        dev.output()
    );
    for args in [&["put", "a", "b"][..], &["get", "a"], &["range", "a"]] {
        let (code, text) = keel(["kv", "--endpoints", &client].iter().chain(args));
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(
            text.contains("does not seem to run the kv service") && text.contains("--service kv"),
            "{args:?}: {text}"
        );
    }
    assert!(dev.stop().expect("status").success(), "{}", dev.output());
}

/// A node removed from a dev cluster exits (its data directory refuses to
/// start again); `keel dev` says so, keeps the others running, and a later
/// `keel dev` on the same --dir starts the others without it.
#[test]
fn a_removed_dev_node_is_named_and_left_out() {
    let _one_at_a_time = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    // Ports above those `free_port` hands the other tests of this binary
    // (20000–32000), which would otherwise take a node's meanwhile: node n
    // listens on base + n, + 100 + n and + 200 + n, and serves the etcd
    // API on the etcd base port + 10000 × (n − 1).
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let base = (36_000..38_000u16)
        .step_by(301)
        .find(|&b| (1..=3).all(|n| [b + n, b + 100 + n, b + 200 + n].into_iter().all(free)))
        .expect("nine free dev ports");
    let etcd_base = (33_000..35_000u16)
        .step_by(97)
        .find(|&p| {
            (0..3).all(|n| std::net::TcpListener::bind(("127.0.0.1", p + 10_000 * n)).is_ok())
        })
        .expect("three free etcd ports");
    let (b, e) = (base.to_string(), etcd_base.to_string());
    let client = |id: u16| format!("127.0.0.1:{}", base + id);
    let flags = [
        "--dir",
        "keel-data",
        "--base-port",
        &b,
        "--etcd-base-port",
        &e,
    ];
    let mut dev = Dev::start(cwd, &flags);
    dev.wait_up(&client(1));
    let endpoints = format!("{},{}", client(1), client(2));
    let (code, text) = keel(["cluster", "--endpoints", &endpoints, "remove", "3"]);
    assert_eq!(code, 0, "{text}");
    let start = Instant::now();
    while !dev.output().contains("node 3 was removed from the cluster") {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "keel dev did not report the removal:\n{}",
            dev.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        cwd.join("keel-data/node3/data/REMOVED").exists(),
        "{}",
        dev.output()
    );
    let (code, text) = keel(["kv", "--endpoints", &endpoints, "put", "k", "v"]);
    assert_eq!(code, 0, "{text}");
    let status = dev.stop().expect("status");
    assert!(status.success(), "{status}:\n{}", dev.output());

    let mut dev = Dev::start(cwd, &flags);
    dev.wait_up(&client(1));
    assert!(
        dev.output()
            .contains("node 3 was removed from the cluster (")
            && dev.output().contains("not starting it")
            && dev.output().contains("3 nodes (2 running, 1 removed)"),
        "{}",
        dev.output()
    );
    let (code, text) = keel(["kv", "--endpoints", &endpoints, "get", "k"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains('v'), "{text}");
    let status = dev.stop().expect("status");
    assert!(status.success(), "{status}:\n{}", dev.output());
}
