//! `keel dev`: a local cluster of real `keel server` processes on loopback,
//! data and logs under one directory, stopped gracefully with Ctrl-C.

use anyhow::{bail, Context as _, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of nodes (1, 3 or 5 make sense).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Where data, configs and logs go.
    #[arg(long, default_value = "./keel-data")]
    dir: PathBuf,
    /// Node N's client port is BASE+N, its peer port BASE+100+N, its HTTP port BASE+200+N.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// sync or replicated.
    #[arg(long, default_value = "sync", value_parser = ["sync", "replicated"])]
    durability: String,
    /// The replicated service: kv, echo, lock, matching.
    #[arg(long, default_value = "kv", value_parser = ["kv", "echo", "lock", "matching"])]
    service: String,
    /// With the kv service, node N serves the etcd v3 API on port
    /// BASE + 10000*(N-1), like etcd's own local clusters: 2379, 12379, 22379...
    /// (0 turns the etcd API off).
    #[arg(long, default_value_t = 2379)]
    etcd_base_port: u16,
    /// Seed every node from this backup (`etcdctl snapshot save` against a
    /// Keel member) before starting: the cluster starts with its data. The
    /// nodes' data directories must be new (give a fresh --dir).
    #[arg(long)]
    restore: Option<PathBuf>,
}

/// Node `id`'s etcd API port, if it serves one.
fn etcd_port(a: &DevArgs, id: u64) -> Result<Option<u16>> {
    if a.service != "kv" || a.etcd_base_port == 0 {
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
    pub config: PathBuf,
    pub client: String,
    pub http: String,
    pub etcd: Option<String>,
}

/// Writes node configs for a local cluster; returns their paths.
pub fn write_configs(a: &DevArgs) -> Result<Vec<DevNode>> {
    let mut nodes = Vec::new();
    for id in 1..=a.nodes {
        let client = format!("127.0.0.1:{}", port(a.base_port, id)?);
        let peer = format!("127.0.0.1:{}", port(a.base_port, 100 + id)?);
        let http = format!("127.0.0.1:{}", port(a.base_port, 200 + id)?);
        let etcd = etcd_port(a, id)?.map(|p| format!("127.0.0.1:{p}"));
        nodes.push((id, client, peer, http, etcd));
    }
    let mut out = Vec::new();
    for (id, client, peer, http, etcd) in &nodes {
        let dir = a.dir.join(format!("node{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut toml = format!(
            "# keel dev: node {id}\nid = {id}\ndata_dir = {:?}\npeer_addr = \"{peer}\"\nclient_addr = \"{client}\"\nhttp_addr = \"{http}\"\ndurability = \"{}\"\nservice = \"{}\"\n",
            dir.join("data").display().to_string(),
            a.durability,
            a.service
        );
        if let Some(e) = etcd {
            toml.push_str(&format!("etcd_addr = \"{e}\"\n"));
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
        let path = dir.join("keel.toml");
        std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
        out.push(DevNode {
            id: *id,
            config: path,
            client: client.clone(),
            http: http.clone(),
            etcd: etcd.clone(),
        });
    }
    Ok(out)
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

pub fn run(a: DevArgs) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the keel executable")?;
    let nodes = write_configs(&a)?;
    if let Some(backup) = &a.restore {
        for n in &nodes {
            let cfg = keel_node::NodeConfig::load(&n.config)?;
            let (service, _) = crate::make_service(&cfg)?;
            // A dev cluster has the default cluster id, as most backed-up
            // clusters do; it runs on its own loopback ports.
            keel_node::restore_backup(&cfg, service, backup, true).with_context(|| {
                format!(
                    "restoring node {} from {} (--restore needs a fresh --dir)",
                    n.id,
                    backup.display()
                )
            })?;
        }
        println!("Restored every node from {}", backup.display());
    }
    let mut children = Vec::new();
    for n in &nodes {
        let log = n.config.with_file_name("keel.log");
        children.push((n.id, spawn(&exe, &n.config, &log)?));
    }
    let endpoints: Vec<&str> = nodes.iter().map(|n| n.client.as_str()).collect();
    println!(
        "Keel dev cluster: {} nodes, {} service, {} durability, data under {}",
        a.nodes,
        a.service,
        a.durability,
        a.dir.display()
    );
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
            n.config.with_file_name("keel.log").display()
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
        "\nIn another terminal (with `cargo run -p keel --` in place of `keel` from a checkout):"
    );
    println!("  keel kv{flag} put greeting hello");
    println!("  keel kv{flag} get greeting");
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
    println!("Ctrl-C stops the cluster (data is kept; run again to restart it).");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut check = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = check.tick() => {
                    for (id, c) in children.iter_mut() {
                        if let Ok(Some(status)) = c.try_wait() {
                            eprintln!("node {id} exited ({status}); see its log. Restart `keel dev` to bring it back.");
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
    })?;
    println!("stopping…");
    for (_, c) in &children {
        // SIGTERM: each node flushes and syncs its storage, then exits.
        let pid = libc::pid_t::try_from(c.id()).unwrap_or(0);
        if pid > 0 {
            // SAFETY: kill(2) with a pid we spawned and a valid signal.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    for (id, c) in children.iter_mut() {
        let status = c.wait()?;
        if !status.success() {
            eprintln!("node {id} exited with {status}");
        }
    }
    Ok(0)
}
