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
}

fn port(base: u16, offset: u64) -> Result<u16> {
    u16::try_from(u64::from(base) + offset).context("port out of range: lower --base-port")
}

/// Writes node configs for a local cluster; returns their paths.
pub fn write_configs(a: &DevArgs) -> Result<Vec<(u64, PathBuf, String, String)>> {
    let mut nodes = Vec::new();
    for id in 1..=a.nodes {
        let client = format!("127.0.0.1:{}", port(a.base_port, id)?);
        let peer = format!("127.0.0.1:{}", port(a.base_port, 100 + id)?);
        let http = format!("127.0.0.1:{}", port(a.base_port, 200 + id)?);
        nodes.push((id, client, peer, http));
    }
    let mut out = Vec::new();
    for (id, client, peer, http) in &nodes {
        let dir = a.dir.join(format!("node{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut toml = format!(
            "# keel dev: node {id}\nid = {id}\ndata_dir = {:?}\npeer_addr = \"{peer}\"\nclient_addr = \"{client}\"\nhttp_addr = \"{http}\"\ndurability = \"{}\"\nservice = \"{}\"\n",
            dir.join("data").display().to_string(),
            a.durability,
            a.service
        );
        for (pid, pclient, ppeer, _) in &nodes {
            if pid != id {
                toml.push_str(&format!(
                    "\n[[peers]]\nid = {pid}\npeer_addr = \"{ppeer}\"\nclient_addr = \"{pclient}\"\n"
                ));
            }
        }
        let path = dir.join("keel.toml");
        std::fs::write(&path, toml).with_context(|| format!("writing {}", path.display()))?;
        out.push((*id, path, client.clone(), http.clone()));
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
    let mut children = Vec::new();
    for (id, config, _, _) in &nodes {
        let log = config.with_file_name("keel.log");
        children.push((*id, spawn(&exe, config, &log)?));
    }
    let endpoints: Vec<&str> = nodes.iter().map(|n| n.2.as_str()).collect();
    println!(
        "Keel dev cluster: {} nodes, {} service, {} durability, data under {}",
        a.nodes,
        a.service,
        a.durability,
        a.dir.display()
    );
    for (id, config, client, http) in &nodes {
        println!(
            "  node {id}: client {client}  status http://{http}/status  log {}",
            config.with_file_name("keel.log").display()
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
