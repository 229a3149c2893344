//! Local clusters for the benchmarks: 3 `keel server` processes or 3 etcd
//! members on loopback, in a fresh temporary directory. Dropping a cluster
//! kills its processes (SIGKILL; the data is thrown away) and removes the
//! directory; processes also die with the benchmark (PR_SET_PDEATHSIG).

use super::NodeThreadArgs;
use anyhow::{bail, Context as _, Result};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `n` distinct loopback ports that are free now (held open together while
/// choosing). They come from below Linux's ephemeral range (32768-60999):
/// a port the kernel picked for port 0 may also be handed to an outgoing
/// connection (the nodes dial each other while they start) before its
/// server binds it. The scan starts at an offset drawn from the process
/// id, so two benchmarks at once rarely meet.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    let mut held = Vec::with_capacity(n);
    for i in 0..SPAN {
        if held.len() == n {
            break;
        }
        let port = (FIRST + (offset + i) % SPAN) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!(
            "only {} of {n} loopback ports free between {FIRST} and {}",
            held.len(),
            FIRST + SPAN
        );
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Child processes killed on drop.
#[derive(Default)]
pub struct Procs {
    children: Vec<(String, Child, PathBuf)>,
}

impl Procs {
    /// Starts `cmd` with stdout and stderr appended to `log`. The child is
    /// killed if this process dies (the spawning thread must outlive it:
    /// call from the main thread).
    pub fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        self.children
            .push((name.to_string(), child, log.to_path_buf()));
        Ok(())
    }

    /// Fails, with the tail of its log, if any process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (name, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "{name} exited ({status}); the end of its log {}:\n{}",
                    log.display(),
                    tail(log, 15)
                );
            }
        }
        Ok(())
    }

    /// The process ids of the children started (running or not).
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c, _)| c.id()).collect()
    }

    fn kill_all(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
        }
        for (_, child, _) in &mut self.children {
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// CPU time (user + system, all threads) used so far by the processes
/// `pids`, or by this process with `None`, in seconds: /proc/<pid>/stat
/// fields 14 and 15, in clock ticks. A process that is gone counts 0.
pub fn cpu_seconds(pids: Option<&[u32]>) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let one = |path: String| -> f64 {
        let Ok(stat) = std::fs::read_to_string(path) else {
            return 0.0;
        };
        stat_cpu_ticks(&stat).unwrap_or(0) as f64 / ticks
    };
    match pids {
        None => one("/proc/self/stat".into()),
        Some(pids) => pids.iter().map(|p| one(format!("/proc/{p}/stat"))).sum(),
    }
}

/// utime + stime (fields 14 and 15, all threads, not children) from the
/// text of /proc/<pid>/stat, in clock ticks.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3, so utime (14) and stime (15) are 11 and 12.
    let field = |i: usize| f.get(i)?.parse::<u64>().ok();
    field(11)?.checked_add(field(12)?)
}

/// The largest peak resident memory (VmHWM: the most the process has
/// held in RAM at any one time since it started) among the processes
/// `pids`, in bytes; `None` if none could be read (a process that is gone
/// counts as nothing).
pub fn peak_rss_bytes(pids: &[u32]) -> Option<u64> {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|status| parse_vm_hwm(&status))
        .max()
}

/// VmHWM from the text of /proc/<pid>/status, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut f = line["VmHWM:".len()..].split_whitespace();
    let kb: u64 = f.next()?.parse().ok()?;
    (f.next() == Some("kB")).then_some(kb.checked_mul(1024)?)
}

/// The machine's CPU time counters (/proc/stat's `cpu` line, in ticks):
/// how much of it the hypervisor stole (a virtual CPU that was runnable
/// but not running on a real one), out of the total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MachineTicks {
    pub steal: u64,
    pub total: u64,
}

impl MachineTicks {
    /// Now; `None` where /proc/stat cannot be read or parsed.
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From /proc/stat's text: the `cpu` line's user, nice, system, idle,
    /// iowait, irq, softirq and steal fields (guest time is already counted
    /// in user).
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        (f.len() == 8).then(|| MachineTicks {
            steal: f[7],
            total: f.iter().sum(),
        })
    }

    /// The share of the machine's time stolen between `earlier` and this.
    pub fn steal_since(&self, earlier: &MachineTicks) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let steal = self.steal.checked_sub(earlier.steal)?;
        (total > 0).then(|| steal as f64 / total as f64)
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(could not read it: {e})"),
    }
}

/// A fresh directory for one cluster, removed on drop unless kept.
pub struct WorkDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl WorkDir {
    pub fn new(parent: &Path, prefix: &str, keep: bool) -> Result<WorkDir> {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(parent)
            .with_context(|| format!("creating a directory under {}", parent.display()))?;
        let path = dir.path().to_path_buf();
        if keep {
            let path = dir.keep();
            return Ok(WorkDir { dir: None, path });
        }
        Ok(WorkDir {
            dir: Some(dir),
            path,
        })
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn kept(&self) -> bool {
        self.dir.is_none()
    }
}

/// True if `path` is on tmpfs/ramfs (where fsync is free, so `sync`
/// durability would be measured wrongly).
pub fn on_memory_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs with a valid C string and a zeroed out-struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let t = st.f_type as i64;
    t == TMPFS_MAGIC || t == RAMFS_MAGIC
}

/// One node's addresses.
#[derive(Clone, Debug)]
pub struct KeelNode {
    pub id: u64,
    pub peer: String,
    pub client: String,
    pub etcd: Option<String>,
    /// HTTP (`/metrics`).
    pub http: Option<String>,
}

/// A 3-node Keel cluster of `keel server` processes. Field order matters:
/// processes are killed before the directory is removed.
pub struct KeelCluster {
    procs: Procs,
    pub nodes: Vec<KeelNode>,
    pub dir: WorkDir,
}

impl KeelCluster {
    /// Starts `nodes` servers running `service` with `durability` and
    /// `threads`, each serving HTTP for its metrics; with `etcd`, each also
    /// serves the etcd v3 API. Returns once started (see
    /// [`KeelCluster::wait_for_leader`]).
    pub fn start(
        parent: &Path,
        keep: bool,
        nodes: u64,
        service: &str,
        durability: &str,
        threads: &NodeThreadArgs,
        etcd: bool,
    ) -> Result<KeelCluster> {
        let exe = std::env::current_exe().context("finding the keel executable")?;
        let dir = WorkDir::new(parent, &format!("keel-bench-{service}-{durability}-"), keep)?;
        let per_node = if etcd { 4 } else { 3 };
        let ports = free_ports(nodes as usize * per_node)?;
        let list: Vec<KeelNode> = (0..nodes as usize)
            .map(|i| KeelNode {
                id: i as u64 + 1,
                peer: format!("127.0.0.1:{}", ports[i * per_node]),
                client: format!("127.0.0.1:{}", ports[i * per_node + 1]),
                etcd: etcd.then(|| format!("127.0.0.1:{}", ports[i * per_node + 2])),
                http: Some(format!("127.0.0.1:{}", ports[i * per_node + per_node - 1])),
            })
            .collect();
        let mut procs = Procs::default();
        for n in &list {
            let node_dir = dir.path().join(format!("node{}", n.id));
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let config = node_dir.join("keel.toml");
            std::fs::write(
                &config,
                node_config(n, &list, &node_dir, service, durability, threads),
            )
            .with_context(|| format!("writing {}", config.display()))?;
            let mut cmd = Command::new(&exe);
            cmd.arg("server").arg("--config").arg(&config);
            procs.spawn(
                &format!("keel node {}", n.id),
                cmd,
                &node_dir.join("keel.log"),
            )?;
        }
        Ok(KeelCluster {
            procs,
            nodes: list,
            dir,
        })
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.procs.check_alive()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }

    /// The nodes' metrics addresses (host:port).
    pub fn metrics_addrs(&self) -> Vec<String> {
        self.nodes.iter().filter_map(|n| n.http.clone()).collect()
    }

    /// Waits until a node reports itself leader and a write through the
    /// native client commits; returns the leader's client address.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> Result<String> {
        let started = Instant::now();
        let mut last = String::from("no node answered yet");
        loop {
            self.check_alive()?;
            super::check_interrupted()?;
            for n in &self.nodes {
                match keel_client::Client::status_of(&n.client, Duration::from_millis(500)).await {
                    Ok(s) if s.role == "leader" => {
                        let mut c = keel_client::Client::new(keel_client::ClientOptions {
                            endpoints: vec![n.client.clone()],
                            attempt_timeout: Duration::from_secs(2),
                            call_timeout: Duration::from_secs(5),
                            client_id: None,
                            tls: None,
                        })?;
                        match c.write(bytes::Bytes::from_static(b"bench: ready?")).await {
                            Ok(_) => return Ok(n.client.clone()),
                            Err(e) => last = format!("node {}: first write: {e}", n.id),
                        }
                    }
                    Ok(s) => last = format!("node {} is {} in term {}", n.id, s.role, s.term),
                    Err(e) => last = format!("node {}: {e}", n.id),
                }
            }
            if started.elapsed() > timeout {
                bail!(
                    "the Keel cluster in {} elected no leader within {timeout:?} (last: {last})",
                    self.dir.path().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Refuses `--keel-config` settings every node would refuse at start (an
/// unknown key, one the benchmark writes itself, a bad value), before any
/// cluster starts: otherwise the mistake shows only once the Keel cluster
/// starts, after the loopback round trip or another system's whole run.
pub fn check_keel_config(threads: &NodeThreadArgs, service: &str, etcd: bool) -> Result<()> {
    if threads.keel_config.is_empty() {
        return Ok(());
    }
    let nodes: Vec<KeelNode> = (1..=3u16)
        .map(|id| KeelNode {
            id: id.into(),
            peer: format!("127.0.0.1:{}", 1000 + id),
            client: format!("127.0.0.1:{}", 2000 + id),
            etcd: etcd.then(|| format!("127.0.0.1:{}", 3000 + id)),
            http: Some(format!("127.0.0.1:{}", 4000 + id)),
        })
        .collect();
    let text = node_config(
        &nodes[0],
        &nodes,
        Path::new("/keel-bench"),
        service,
        "sync",
        threads,
    );
    let config: keel_node::config::NodeConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("--keel-config: {e}"))?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("--keel-config: {e}"))?;
    Ok(())
}

fn node_config(
    n: &KeelNode,
    all: &[KeelNode],
    dir: &Path,
    service: &str,
    durability: &str,
    threads: &NodeThreadArgs,
) -> String {
    let mut toml = format!(
        "# keel bench: node {}\nid = {}\ndata_dir = {:?}\npeer_addr = \"{}\"\nclient_addr = \"{}\"\ndurability = \"{durability}\"\nservice = \"{service}\"\nservice_thread = \"{}\"\nthread_scheduling = \"{}\"\n",
        n.id,
        n.id,
        dir.join("data").display().to_string(),
        n.peer,
        n.client,
        threads.service_thread,
        threads.thread_scheduling,
    );
    if let Some(e) = &n.etcd {
        toml.push_str(&format!("etcd_addr = \"{e}\"\n"));
    }
    if let Some(h) = &n.http {
        toml.push_str(&format!("http_addr = \"{h}\"\n"));
    }
    for line in &threads.keel_config {
        toml.push_str(line);
        toml.push('\n');
    }
    for p in all.iter().filter(|p| p.id != n.id) {
        toml.push_str(&format!(
            "\n[[peers]]\nid = {}\npeer_addr = \"{}\"\nclient_addr = \"{}\"\n",
            p.id, p.peer, p.client
        ));
        if let Some(e) = &p.etcd {
            toml.push_str(&format!("etcd_addr = \"{e}\"\n"));
        }
    }
    toml
}

/// A 3-member etcd cluster on loopback.
pub struct EtcdCluster {
    procs: Procs,
    /// Client addresses (host:port).
    pub clients: Vec<String>,
    pub dir: WorkDir,
}

/// Finds the etcd binary: `--etcd`, else `etcd` on PATH, else /usr/bin/etcd.
pub fn find_etcd(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--etcd {}: no such file", p.display());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("etcd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|p| p.is_file())
        .context(
            "etcd is not installed (no `etcd` on PATH nor /usr/bin/etcd). \
             Install etcd 3.4 with `apt-get install -y etcd-server`, point --etcd at a binary, \
             or measure Keel alone with `--systems keel`",
        )
}

/// `etcd --version`'s first line, e.g. "etcd Version: 3.4.23".
pub fn etcd_version(etcd: &Path) -> String {
    Command::new(etcd)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "etcd (version unknown)".into())
}

impl EtcdCluster {
    /// Starts `members` etcd processes; with `batch`, under the
    /// `SCHED_BATCH` scheduling policy (as Keel's node threads run by
    /// default), so both systems are measured on the same terms.
    pub fn start(
        etcd: &Path,
        parent: &Path,
        keep: bool,
        members: usize,
        batch: bool,
    ) -> Result<EtcdCluster> {
        let dir = WorkDir::new(parent, "keel-bench-etcd-", keep)?;
        let ports = free_ports(members * 2)?;
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[i * 2]);
        let client = |i: usize| format!("127.0.0.1:{}", ports[i * 2 + 1]);
        let initial: Vec<String> = (0..members)
            .map(|i| format!("m{}={}", i + 1, peer(i)))
            .collect();
        let initial = initial.join(",");
        let mut procs = Procs::default();
        for i in 0..members {
            let name = format!("m{}", i + 1);
            let data = dir.path().join(&name);
            let mut cmd = Command::new(etcd);
            cmd.arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://{}", client(i)))
                .arg("--advertise-client-urls")
                .arg(format!("http://{}", client(i)))
                .arg("--listen-peer-urls")
                .arg(peer(i))
                .arg("--initial-advertise-peer-urls")
                .arg(peer(i))
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg("keel-bench")
                .arg("--logger")
                .arg("zap")
                .arg("--log-level")
                .arg("warn");
            if batch {
                // SAFETY: sched_setscheduler is one system call, async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        keel_node::sched::set_current_thread(
                            keel_node::config::ThreadSchedulingConfig::Batch,
                        )
                    });
                }
            }
            procs.spawn(
                &format!("etcd member {name}"),
                cmd,
                &dir.path().join(format!("{name}.log")),
            )?;
        }
        Ok(EtcdCluster {
            procs,
            clients: (0..members).map(client).collect(),
            dir,
        })
    }

    pub fn check_alive(&mut self) -> Result<()> {
        self.procs.check_alive()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_parse_proc_stat_and_reject_garbage() {
        let a =
            MachineTicks::parse("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
                .expect("parses");
        assert_eq!(
            a,
            MachineTicks {
                steal: 35,
                total: 1000
            }
        );
        let b = MachineTicks::parse("cpu  150 0 70 900 10 0 5 65 0 0\n").expect("parses");
        assert_eq!(b.steal_since(&a), Some(0.15));
        assert_eq!(a.steal_since(&b), None, "counters never run backwards");
        assert_eq!(a.steal_since(&a), None, "no time passed");
        assert_eq!(MachineTicks::parse("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(MachineTicks::parse("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(MachineTicks::parse("intr 5\n"), None);
        assert!(MachineTicks::now().is_some(), "this machine's /proc/stat");
    }

    #[test]
    fn peak_rss_reads_vm_hwm_and_rejects_garbage() {
        let status = "Name:\tkeel\nVmPeak:\t 2000 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(1234 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t1000 kB\n"), None, "no VmHWM line");
        assert_eq!(parse_vm_hwm("VmHWM:\tlots kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t12 MB\n"), None, "unknown unit");
        assert_eq!(parse_vm_hwm("VmHWM:\n"), None);
        assert_eq!(parse_vm_hwm(&format!("VmHWM: {} kB\n", u64::MAX)), None);
        // This process holds some memory; a missing one counts as nothing.
        let me = std::process::id();
        assert!(peak_rss_bytes(&[me]).is_some_and(|b| b > 1 << 20));
        assert_eq!(peak_rss_bytes(&[u32::MAX]), None);
        assert_eq!(peak_rss_bytes(&[u32::MAX, me]), peak_rss_bytes(&[me]));
    }

    #[test]
    fn stat_cpu_ticks_are_utime_plus_stime() {
        // Fields: pid (comm) state ppid pgrp session tty tpgid flags minflt
        // cminflt majflt cmajflt utime stime cutime cstime ...
        let stat = "1234 (keel) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    700 300 9000 8000 20 0 9 0 100 1000000 300 \n";
        assert_eq!(
            stat_cpu_ticks(stat),
            Some(1000),
            "children's cutime/cstime not counted"
        );
        // A command name with spaces and parentheses.
        let odd = "77 (a) b (c) R 1 77 77 0 -1 0 0 0 0 0 15 25 0 0 20 0 1 0 5 6 7\n";
        assert_eq!(stat_cpu_ticks(odd), Some(40));
        assert_eq!(stat_cpu_ticks("77 (x) R 1 2 3"), None, "too short");
        assert_eq!(stat_cpu_ticks("no parenthesis"), None);
        let me = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
        assert!(stat_cpu_ticks(&me).is_some());
    }

    #[test]
    fn cpu_seconds_counts_this_process_and_not_missing_ones() {
        let before = cpu_seconds(None);
        // Burn CPU until the count moves (clock ticks are 10 ms; on busy
        // shared cores this thread may get little of the wall time).
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.05 && t.elapsed() < std::time::Duration::from_secs(30) {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            after = cpu_seconds(None);
        }
        assert!(after - before >= 0.05, "{before} -> {after}");
        let me = std::process::id();
        assert!(cpu_seconds(Some(&[me])) >= after - 0.001);
        // No such process (pid_max is below 2^22 on Linux).
        assert_eq!(cpu_seconds(Some(&[u32::MAX])), 0.0);
    }

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let ports = free_ports(6).expect("ports");
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 6, "{ports:?}");
        for p in ports {
            assert!((20_000..32_000).contains(&p), "{p}");
        }
    }

    #[test]
    fn keel_config_the_nodes_would_refuse_is_refused_up_front() {
        let with = |settings: &[&str]| NodeThreadArgs {
            service_thread: "dedicated".into(),
            thread_scheduling: "normal".into(),
            keel_config: settings.iter().map(|s| s.to_string()).collect(),
        };
        assert!(check_keel_config(&with(&[]), "echo", false).is_ok());
        assert!(check_keel_config(&with(&["log_cache_bytes = 0"]), "kv", true).is_ok());
        for (bad, says) in [
            ("durability = \"replicated\"", "duplicate key"),
            ("log_cache_byte = 0", "log_cache_byte"),
            ("heartbeat_ms = 0", "heartbeat_ms"),
        ] {
            let e = check_keel_config(&with(&[bad]), "echo", false).expect_err(bad);
            let e = format!("{e:#}");
            assert!(
                e.contains("--keel-config") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn node_config_lists_the_other_nodes() {
        let nodes: Vec<KeelNode> = (1..=3)
            .map(|id| KeelNode {
                id,
                peer: format!("127.0.0.1:{}", 9000 + id),
                client: format!("127.0.0.1:{}", 9100 + id),
                etcd: Some(format!("127.0.0.1:{}", 9200 + id)),
                http: Some(format!("127.0.0.1:{}", 9300 + id)),
            })
            .collect();
        let threads = NodeThreadArgs {
            service_thread: "shared".into(),
            thread_scheduling: "normal".into(),
            keel_config: vec!["log_cache_bytes = 0".into()],
        };
        let t = node_config(&nodes[1], &nodes, Path::new("/d"), "echo", "sync", &threads);
        let v: toml::Value = toml::from_str(&t).expect("valid TOML");
        assert_eq!(v["id"].as_integer(), Some(2));
        assert_eq!(v["etcd_addr"].as_str(), Some("127.0.0.1:9202"));
        assert_eq!(v["http_addr"].as_str(), Some("127.0.0.1:9302"));
        assert_eq!(v["service"].as_str(), Some("echo"));
        assert_eq!(v["service_thread"].as_str(), Some("shared"));
        assert_eq!(v["thread_scheduling"].as_str(), Some("normal"));
        assert_eq!(v["log_cache_bytes"].as_integer(), Some(0));
        let peers = v["peers"].as_array().expect("peers");
        let ids: Vec<i64> = peers.iter().filter_map(|p| p["id"].as_integer()).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(peers[1]["etcd_addr"].as_str(), Some("127.0.0.1:9203"));
    }
}
