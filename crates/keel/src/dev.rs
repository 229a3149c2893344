//! `keel dev`: a local cluster of real `keel server` processes on loopback,
//! data and logs under one directory, stopped gracefully with Ctrl-C.

use anyhow::{bail, Context as _, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of nodes, 1 to 9 (1, 3 or 5 make sense). A new --dir: default
    /// 3. An existing one keeps the number it was created with (recorded in
    /// its keel-dev.toml).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: Option<u64>,
    /// Where data, configs and logs go (node N's under DIR/nodeN: keel.toml,
    /// keel.log, data/). Run again with the same --dir to restart the
    /// cluster from its data.
    #[arg(long, default_value = "./keel-data")]
    dir: PathBuf,
    /// Node N's client port is BASE+N, its peer port BASE+100+N, its HTTP port BASE+200+N.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// sync or replicated (as `keel server --durability`); set anew by each
    /// run, not kept from the last.
    #[arg(long, default_value = "sync", value_parser = ["sync", "replicated"])]
    durability: String,
    /// Node ids that should lead whenever they can, comma-separated (as
    /// `keel server --preferred-leaders`, given to every node): a leader
    /// not listed hands leadership to a listed node that answers it
    /// steadily. Set anew by each run, not kept from the last.
    #[arg(long, value_delimiter = ',')]
    preferred_leaders: Vec<u64>,
    /// The replicated service: kv, echo, lock, matching. A new --dir:
    /// default kv. An existing one keeps the service it was created with
    /// (recorded in its keel-dev.toml).
    #[arg(long, value_parser = ["kv", "echo", "lock", "matching"])]
    service: Option<String>,
    /// With the kv service, node N serves the etcd v3 API on port
    /// BASE + 10000*(N-1), like etcd's own local clusters: 2379, 12379, 22379...
    /// (0 turns the etcd API off).
    #[arg(long, default_value_t = 2379)]
    etcd_base_port: u16,
    /// Seed every node from this backup (`etcdctl snapshot save` against a
    /// Keel member) before starting: the cluster starts with its data. The
    /// --dir must be new.
    #[arg(long)]
    restore: Option<PathBuf>,
}

/// What `keel dev` fixed when it created a cluster's --dir: its nodes keep
/// their membership in their data, and replay their log into the service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fixed {
    nodes: u64,
    service: String,
}

/// The file in --dir that records `Fixed`.
const FIXED_FILE: &str = "keel-dev.toml";

impl Fixed {
    fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FIXED_FILE);
        let text = format!(
            "# Written by `keel dev` when it created this cluster. Its nodes keep their\n\
             # membership and replay their log into the service: to change these, start\n\
             # a new cluster (another --dir, or delete this one).\n\
             nodes = {}\nservice = \"{}\"\n",
            self.nodes, self.service
        );
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn read(path: &Path) -> Result<Fixed> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        let nodes = t.get("nodes").and_then(|v| v.as_integer());
        let service = t.get("service").and_then(|v| v.as_str());
        match (nodes, service) {
            (Some(n), Some(s)) if (1..=9).contains(&n) => Ok(Fixed {
                nodes: n as u64,
                service: s.to_string(),
            }),
            _ => bail!(
                "{} does not name the cluster's nodes (1-9) and service",
                path.display()
            ),
        }
    }
}

/// The state of --dir before this run.
enum DirState {
    /// No cluster yet: this run creates it (and removes what it made if
    /// the cluster does not come up). `existed`: the directory was there
    /// (empty).
    New { existed: bool },
    /// A cluster an earlier run created.
    Made(Fixed),
}

/// Looks at --dir (absolute `dir`; `shown` as given).
fn inspect(dir: &Path, shown: &Path) -> Result<DirState> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(DirState::New { existed: false })
        }
        Err(e) => return Err(e).with_context(|| format!("reading --dir {}", shown.display())),
    };
    let fixed = dir.join(FIXED_FILE);
    if fixed.exists() {
        return Fixed::read(&fixed)
            .map(DirState::Made)
            .with_context(|| format!("delete {} to start a new cluster there", shown.display()));
    }
    if entries.next().is_none() {
        return Ok(DirState::New { existed: true });
    }
    // A cluster made by a `keel dev` from before FIXED_FILE: its node 1
    // configuration says what it was created with, unless a later run
    // rewrote it with other flags.
    let node1 = dir.join("node1").join("keel.toml");
    if node1.exists() {
        let cfg = keel_node::NodeConfig::load(&node1)?;
        let f = Fixed {
            nodes: cfg.peers.len() as u64 + 1,
            service: cfg.service,
        };
        f.write(dir)?;
        eprintln!(
            "{}: a {}-node {} cluster (recorded in {FIXED_FILE}, from node1/keel.toml)",
            shown.display(),
            f.nodes,
            f.service
        );
        return Ok(DirState::Made(f));
    }
    bail!(
        "--dir {} is not empty and holds no keel dev cluster (no {FIXED_FILE}): give a new or \
         empty directory",
        shown.display()
    )
}

/// The cluster this run starts: what --dir fixed, or the flags for a new one.
fn settle(a: &DevArgs, state: &DirState) -> Result<Fixed> {
    let DirState::Made(f) = state else {
        return Ok(Fixed {
            nodes: a.nodes.unwrap_or(3),
            service: a.service.clone().unwrap_or_else(|| "kv".into()),
        });
    };
    let dir = a.dir.display();
    if a.restore.is_some() {
        bail!(
            "--restore seeds a new cluster, but --dir {dir} already holds one (a {}-node {} \
             cluster): give another --dir, or delete {dir} first",
            f.nodes,
            f.service
        );
    }
    let mut asked = Vec::new();
    if let Some(n) = a.nodes.filter(|&n| n != f.nodes) {
        asked.push(format!("--nodes {n}"));
    }
    if let Some(s) = a.service.as_ref().filter(|&s| *s != f.service) {
        asked.push(format!("--service {s}"));
    }
    if !asked.is_empty() {
        bail!(
            "--dir {dir} holds a {}-node {} cluster, created by an earlier `keel dev`; it cannot \
             restart with {}: its nodes keep the membership and service they were created with. \
             Leave out --nodes and --service to restart it as it is, or start a new cluster with \
             another --dir (or delete {dir} first)",
            f.nodes,
            f.service,
            asked.join(" and ")
        );
    }
    Ok(f.clone())
}

/// Node `id`'s etcd API port, if it serves one.
fn etcd_port(a: &DevArgs, service: &str, id: u64) -> Result<Option<u16>> {
    if service != "kv" || a.etcd_base_port == 0 {
        return Ok(None);
    }
    port(a.etcd_base_port, 10_000 * (id - 1))
        .map(Some)
        .context("etcd port out of range: lower --etcd-base-port")
}

fn port(base: u16, offset: u64) -> Result<u16> {
    u16::try_from(u64::from(base) + offset).context("port out of range: lower --base-port")
}

/// One node of a dev cluster.
pub struct DevNode {
    pub id: u64,
    /// Its configuration file (absolute).
    pub config: PathBuf,
    /// Its log file, as shown to the user (under --dir as given).
    pub log_shown: PathBuf,
    /// The log file's size before this run.
    pub log_start: u64,
    pub client: String,
    pub peer: String,
    pub http: String,
    pub etcd: Option<String>,
}

/// Writes node configs for a local cluster of `fixed` in `dir` (absolute,
/// so a config names the node's data directory wherever it is used from;
/// `shown`: --dir as given); returns the nodes.
fn write_configs(a: &DevArgs, fixed: &Fixed, dir: &Path, shown: &Path) -> Result<Vec<DevNode>> {
    let mut preferred = std::collections::BTreeSet::new();
    for &p in &a.preferred_leaders {
        if !(1..=fixed.nodes).contains(&p) || !preferred.insert(p) {
            bail!(
                "--preferred-leaders {}: node {p} is {}",
                a.preferred_leaders
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                if preferred.contains(&p) {
                    "listed twice".to_string()
                } else {
                    format!("not one of this cluster's nodes (1 to {})", fixed.nodes)
                }
            );
        }
    }
    let mut nodes = Vec::new();
    for id in 1..=fixed.nodes {
        let client = format!("127.0.0.1:{}", port(a.base_port, id)?);
        let peer = format!("127.0.0.1:{}", port(a.base_port, 100 + id)?);
        let http = format!("127.0.0.1:{}", port(a.base_port, 200 + id)?);
        let etcd = etcd_port(a, &fixed.service, id)?.map(|p| format!("127.0.0.1:{p}"));
        nodes.push((id, client, peer, http, etcd));
    }
    let mut out = Vec::new();
    for (id, client, peer, http, etcd) in &nodes {
        let node_dir = dir.join(format!("node{id}"));
        std::fs::create_dir_all(&node_dir)
            .with_context(|| format!("creating {}", node_dir.display()))?;
        let mut toml = format!(
            "# keel dev: node {id}\nid = {id}\ndata_dir = {:?}\npeer_addr = \"{peer}\"\nclient_addr = \"{client}\"\nhttp_addr = \"{http}\"\ndurability = \"{}\"\nservice = \"{}\"\n",
            node_dir.join("data").display().to_string(),
            a.durability,
            fixed.service
        );
        if let Some(e) = etcd {
            toml.push_str(&format!("etcd_addr = \"{e}\"\n"));
        }
        if !a.preferred_leaders.is_empty() {
            toml.push_str(&format!("preferred_leaders = {:?}\n", a.preferred_leaders));
        }
        for (pid, pclient, ppeer, _, petcd) in &nodes {
            if pid != id {
                toml.push_str(&format!(
                    "\n[[peers]]\nid = {pid}\npeer_addr = \"{ppeer}\"\nclient_addr = \"{pclient}\"\n"
                ));
                if let Some(e) = petcd {
                    toml.push_str(&format!("etcd_addr = \"{e}\"\n"));
                }
            }
        }
        let path = node_dir.join("keel.toml");
        std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
        let log_start = std::fs::metadata(node_dir.join("keel.log")).map_or(0, |m| m.len());
        out.push(DevNode {
            id: *id,
            log_start,
            config: path,
            log_shown: shown.join(format!("node{id}")).join("keel.log"),
            client: client.clone(),
            peer: peer.clone(),
            http: http.clone(),
            etcd: etcd.clone(),
        });
    }
    Ok(out)
}

/// The file a node writes into its data directory when it learns it was
/// removed from the cluster.
fn removed_marker(n: &DevNode) -> PathBuf {
    n.config
        .with_file_name("data")
        .join(keel_node::runtime::REMOVED_FILE)
}

fn spawn(exe: &Path, config: &Path, log: &Path) -> Result<Child> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = log_file.try_clone()?;
    Command::new(exe)
        .arg("server")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {} server", exe.display()))
}

/// SIGTERM to every node (each flushes and syncs its storage, then exits);
/// waits for them, SIGKILL after 30 s. Reports unclean exits if `report`.
fn stop(children: &mut Vec<(u64, Child)>, report: bool) {
    for (_, c) in children.iter() {
        let pid = libc::pid_t::try_from(c.id()).unwrap_or(0);
        if pid > 0 {
            // SAFETY: kill(2) with a pid we spawned and a valid signal.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let until = Instant::now() + Duration::from_secs(30);
    for (id, c) in children.iter_mut() {
        let status = loop {
            match c.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    eprintln!("node {id} did not stop within 30 s of SIGTERM: killing it");
                    let _ = c.kill();
                    break c.wait().ok();
                }
                Err(_) => break None,
            }
        };
        if let Some(status) = status.filter(|s| report && !s.success()) {
            eprintln!("node {id} exited with {status}");
        }
    }
    children.clear();
}

/// Why a node stopped, from what this run added to its log (from byte
/// `from` on): the last `error:` line (how `keel server` reports it), else
/// the last lines.
fn why_stopped(config: &Path, from: u64) -> String {
    let log = std::fs::read(config.with_file_name("keel.log")).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(usize::MAX).min(log.len());
    let log = String::from_utf8_lossy(&log[start..]);
    if let Some(e) = log.lines().rev().find_map(|l| l.strip_prefix("error: ")) {
        return e.to_string();
    }
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n  ");
    format!("its log ends:\n  {tail}")
}

/// Waits until every node answers on its client port. Fails if one exits
/// first (saying why, from its log) or `within` passes.
async fn wait_until_up(
    children: &mut [(u64, Child)],
    nodes: &[DevNode],
    within: Duration,
) -> Result<()> {
    // Where this run's lines begin in each node's log.
    let from: Vec<u64> = nodes.iter().map(|n| n.log_start).collect();
    let started = Instant::now();
    let mut up = vec![false; nodes.len()];
    loop {
        for (((id, c), n), &from) in children.iter_mut().zip(nodes).zip(&from) {
            if let Ok(Some(status)) = c.try_wait() {
                bail!(
                    "node {id} could not start ({status}): {}",
                    why_stopped(&n.config, from)
                );
            }
        }
        for (i, n) in nodes.iter().enumerate() {
            if !up[i] {
                up[i] = keel_client::Client::status_of(&n.client, Duration::from_millis(500))
                    .await
                    .is_ok();
            }
        }
        if up.iter().all(|&u| u) {
            return Ok(());
        }
        if started.elapsed() > within {
            let down: Vec<String> = nodes
                .iter()
                .zip(&up)
                .filter(|(_, &u)| !u)
                .map(|(n, _)| format!("node {} ({})", n.id, n.client))
                .collect();
            bail!(
                "{} did not answer on its client port within {within:?}",
                down.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Removes what a first run made in `dir` (`existed`: the directory was
/// there, empty, before).
fn remove_new_dir(dir: &Path, existed: bool) -> std::io::Result<()> {
    if !existed {
        return std::fs::remove_dir_all(dir);
    }
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// What to do about a port another program holds.
const PORT_HINT: &str = "Another program (a `keel dev` left running, etcd) holds a port this \
cluster needs: stop it, or choose other ports with --base-port and --etcd-base-port.";

pub fn run(a: DevArgs) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the keel executable")?;
    let shown = a.dir.clone();
    let dir = std::path::absolute(&a.dir)
        .with_context(|| format!("resolving --dir {}", shown.display()))?;
    let state = inspect(&dir, &shown)?;
    let fixed = settle(&a, &state)?;
    let new = match state {
        DirState::New { existed } => Some(existed),
        DirState::Made(_) => None,
    };
    // A first run that fails leaves nothing behind: a half-made --dir would
    // be taken for a cluster by the next run.
    let undo = |e: anyhow::Error| -> anyhow::Error {
        let Some(existed) = new else {
            return e;
        };
        match remove_new_dir(&dir, existed) {
            Ok(()) => anyhow::anyhow!(
                "{e:#}\n(the new cluster's files are removed from {}: nothing is left behind)",
                shown.display()
            ),
            Err(r) => anyhow::anyhow!(
                "{e:#}\n(removing the new cluster's files from {} failed: {r}; delete it before \
                 running keel dev with it again)",
                shown.display()
            ),
        }
    };
    let nodes = write_configs(&a, &fixed, &dir, &shown).map_err(undo)?;
    // A node removed from the cluster refuses to start on its data (it
    // exited when it learned of its removal): the others run without it.
    let (gone, nodes): (Vec<DevNode>, Vec<DevNode>) =
        nodes.into_iter().partition(|n| removed_marker(n).exists());
    for n in &gone {
        println!(
            "node {} was removed from the cluster ({} says so): not starting it",
            n.id,
            removed_marker(n).display()
        );
    }
    if nodes.is_empty() {
        return Err(undo(anyhow::anyhow!(
            "every node of the cluster in {} was removed",
            shown.display()
        )));
    }
    // Every port free first: servers a killed `keel dev` left running would
    // answer on them, and the new ones be taken for up until they fail.
    let busy = nodes
        .iter()
        .flat_map(|n| {
            [
                Some(&n.client),
                Some(&n.peer),
                Some(&n.http),
                n.etcd.as_ref(),
            ]
        })
        .flatten()
        .find(|addr| std::net::TcpListener::bind(addr.as_str()).is_err());
    if let Some(addr) = busy {
        return Err(undo(anyhow::anyhow!("{addr} is in use. {PORT_HINT}")));
    }
    // Restored only once the ports are known free, so a busy port is
    // reported before the work (and no "Restored" line precedes it).
    if let Some(backup) = &a.restore {
        let restored = nodes.iter().try_for_each(|n| {
            let cfg = keel_node::NodeConfig::load(&n.config)?;
            let service = crate::restore_check(&cfg)?;
            // A dev cluster has the default cluster id, as most backed-up
            // clusters do; it runs on its own loopback ports.
            keel_node::restore_backup(&cfg, service, backup, true)
                .with_context(|| format!("restoring node {} from {}", n.id, backup.display()))?;
            anyhow::Ok(())
        });
        restored.map_err(undo)?;
        println!("Restored every node from {}", backup.display());
    }
    let mut children = Vec::new();
    for n in &nodes {
        match spawn(&exe, &n.config, &n.config.with_file_name("keel.log")) {
            Ok(c) => children.push((n.id, c)),
            Err(e) => {
                stop(&mut children, false);
                return Err(undo(e));
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut term = rt.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    })?;
    let up = rt.block_on(async {
        tokio::select! {
            r = wait_until_up(&mut children, &nodes, Duration::from_secs(30)) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted while starting")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated while starting")),
        }
    });
    if let Err(e) = up {
        stop(&mut children, false);
        let e = if format!("{e:#}").contains("Address already in use") {
            anyhow::anyhow!("{e:#}\n{PORT_HINT}")
        } else {
            e
        };
        return Err(undo(e));
    }
    if new.is_some() {
        if let Err(e) = fixed.write(&dir) {
            stop(&mut children, false);
            return Err(undo(e));
        }
    }
    let endpoints: Vec<&str> = nodes.iter().map(|n| n.client.as_str()).collect();
    // The cluster's size as created, and how many of its nodes run now
    // when some were removed from it.
    let running = match gone.len() {
        0 => String::new(),
        _ => format!(" ({} running, {} removed)", nodes.len(), gone.len()),
    };
    println!(
        "Keel dev cluster: {} node{}{running}, {} service, {} durability, data under {}",
        fixed.nodes,
        if fixed.nodes == 1 { "" } else { "s" },
        fixed.service,
        a.durability,
        shown.display()
    );
    if !a.preferred_leaders.is_empty() {
        println!("  preferred leaders: {:?}", a.preferred_leaders);
    }
    for n in &nodes {
        let etcd = n
            .etcd
            .as_ref()
            .map(|e| format!("  etcd {e}"))
            .unwrap_or_default();
        println!(
            "  node {}: client {}{etcd}  status http://{}/status  log {}",
            n.id,
            n.client,
            n.http,
            n.log_shown.display()
        );
    }
    let ep = endpoints.join(",");
    let default = ep == crate::DEFAULT_ENDPOINTS;
    let flag = if default {
        String::new()
    } else {
        format!(" --endpoints {ep}")
    };
    println!(
        "\nIn another terminal (with `cargo run --release -p keel --` in place of `keel` from a \
         checkout):"
    );
    if fixed.service == "kv" {
        println!("  keel kv{flag} put greeting hello");
        println!("  keel kv{flag} get greeting");
    }
    println!("  keel cluster{flag} status");
    let etcd: Vec<&str> = nodes.iter().filter_map(|n| n.etcd.as_deref()).collect();
    if !etcd.is_empty() {
        println!(
            "  etcdctl --endpoints {} put greeting hello   # the etcd v3 API",
            etcd.join(",")
        );
        println!(
            "  etcdctl --endpoints {} member list -w table",
            etcd.join(",")
        );
    }
    println!(
        "  kill -9 <pid of the leader>   # pids: {}",
        children
            .iter()
            .map(|(id, c)| format!("node {id} = {}", c.id()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Ctrl-C stops the cluster (data is kept: run keel dev again with this --dir to restart \
         it, or with another --dir for a new cluster)."
    );

    let ran = rt.block_on(async {
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = check.tick() => {
                    for (id, c) in children.iter_mut() {
                        if let Ok(Some(status)) = c.try_wait() {
                            let removed = nodes
                                .iter()
                                .find(|n| n.id == *id)
                                .is_some_and(|n| removed_marker(n).exists());
                            if removed {
                                eprintln!(
                                    "node {id} was removed from the cluster and stopped for good \
                                     (see its log); keel dev runs the others without it"
                                );
                            } else {
                                eprintln!("node {id} exited ({status}); see its log. Restart `keel dev` to bring it back.");
                            }
                        }
                    }
                    children.retain_mut(|(_, c)| !matches!(c.try_wait(), Ok(Some(_))));
                    if children.is_empty() {
                        bail!("every node has exited");
                    }
                }
            }
        }
        anyhow::Ok(())
    });
    println!("stopping…");
    stop(&mut children, true);
    ran?;
    Ok(0)
}
