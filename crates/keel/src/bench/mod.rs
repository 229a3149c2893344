//! `keel bench`: end-to-end benchmarks against real local clusters.
//!
//! - `keel bench echo`: latency vs offered rate (Aeron's method) through a
//!   3-node cluster of `keel server` processes running the echo service.
//! - `keel bench kv`: one etcd v3 load generator run against a 3-node Keel
//!   (serving the etcd API) and a 3-member etcd, side by side.
//!
//! Both start their clusters on loopback in a temporary directory, print a
//! markdown table, rewrite their section of `BENCHMARKS.md` and draw a PNG.

mod cluster;
mod echo;
mod kv;
mod pace;
mod prom;
mod report;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Subcommand, Debug)]
pub enum BenchArgs {
    /// Latency vs offered rate through a 3-node echo cluster (native protocol).
    #[command(long_about = echo::LONG_ABOUT)]
    Echo(echo::EchoArgs),
    /// Keel vs etcd 3.4 over the etcd v3 gRPC API: put, range, txn-CAS.
    #[command(long_about = kv::LONG_ABOUT)]
    Kv(kv::KvArgs),
}

/// Flags shared by both benchmarks.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Seconds measured per step (after the warm-up).
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub duration: f64,
    /// Seconds of load before each measured step (not recorded).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_secs)]
    pub warmup: f64,
    /// Markdown file whose section (between this benchmark's markers) is rewritten.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Print the results only; write neither the markdown nor the plot.
    #[arg(long)]
    pub no_write: bool,
    /// Directory for the clusters' temporary data (a fresh subdirectory,
    /// removed afterwards). Use a real disk: on tmpfs `sync` costs nothing.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    pub dir: PathBuf,
    /// Keep the clusters' data directories and logs (their path is printed).
    #[arg(long)]
    pub keep: bool,
}

/// How each Keel node runs its threads (passed on to `keel server`).
#[derive(Args, Debug, Clone)]
pub struct NodeThreadArgs {
    /// Where each node runs the service: on a thread of its own, or on the
    /// consensus thread (`keel server --service-thread`).
    #[arg(long, default_value = "dedicated", value_parser = ["dedicated", "shared"])]
    pub service_thread: String,
    /// Linux scheduling policy of each node's threads (`keel server
    /// --thread-scheduling`); `keel bench kv` runs etcd's processes under
    /// the same one.
    #[arg(long, default_value = "normal", value_parser = ["normal", "batch"])]
    pub thread_scheduling: String,
    /// A setting added to every Keel node's configuration file, in TOML
    /// (repeatable), e.g. `--keel-config 'log_cache_bytes = 0'` or
    /// `--keel-config 'auto_compaction_retention = "30s"'`. Settings the
    /// benchmark itself writes (addresses, data_dir, durability, service,
    /// service_thread, thread_scheduling) cannot be given again.
    #[arg(long = "keel-config", value_name = "TOML", value_parser = parse_setting)]
    pub keel_config: Vec<String>,
}

/// A `--keel-config` value: TOML key = value settings, no tables.
fn parse_setting(s: &str) -> Result<String, String> {
    let t: toml::Table = toml::from_str(s).map_err(|e| format!("not a TOML setting: {e}"))?;
    if t.is_empty() {
        return Err("no setting (expected key = value)".into());
    }
    if let Some((k, _)) = t.iter().find(|(_, v)| v.is_table() || v.is_array()) {
        return Err(format!("{k}: only plain settings, not tables or lists"));
    }
    Ok(s.to_string())
}

impl NodeThreadArgs {
    /// Whether the nodes (and `kv`'s etcd) run under `SCHED_BATCH`.
    pub fn batch(&self) -> bool {
        self.thread_scheduling == "batch"
    }

    /// The `keel server` flags these stand for.
    pub fn flags(&self) -> String {
        format!(
            "--service-thread {} --thread-scheduling {}",
            self.service_thread, self.thread_scheduling
        )
    }

    /// For the report: the `--keel-config` settings, if any, as
    /// " (configured with `a = 1`, `b = 2`)".
    pub fn settings_note(&self) -> String {
        if self.keel_config.is_empty() {
            return String::new();
        }
        let list: Vec<String> = self
            .keel_config
            .iter()
            .map(|c| format!("`{}`", c.replace('\n', "; ")))
            .collect();
        format!(" (configured with {})", list.join(", "))
    }
}

impl CommonArgs {
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup)
    }

    /// Fails before any measuring if the results could not be written.
    pub fn check_out(&self) -> Result<()> {
        let dir = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            bail!(
                "--out {}: the directory {} does not exist (or use --no-write)",
                self.out.display(),
                dir.display()
            );
        }
        if self.out.is_dir() {
            bail!(
                "--out {}: is a directory, expected a markdown file",
                self.out.display()
            );
        }
        Ok(())
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?}: expected seconds, above 0 and at most 3600")),
    }
}

fn non_negative_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: expected seconds, from 0 to 3600")),
    }
}

/// Parses "1000,10k,2.5k,1m" into rates per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mul) = match t.strip_suffix('k') {
        Some(n) => (n, 1e3),
        None => match t.strip_suffix('m') {
            Some(n) => (n, 1e6),
            None => (t.as_str(), 1.0),
        },
    };
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && (v * mul) >= 1.0 && v * mul <= 1e9 => Ok((v * mul).round() as u64),
        _ => Err(format!(
            "{s:?}: expected a rate per second such as 1000, 10k or 1.5m (1 to 1e9)"
        )),
    }
}

pub fn run(args: BenchArgs) -> Result<i32> {
    watch_signals();
    match args {
        BenchArgs::Echo(a) => echo::run(a),
        BenchArgs::Kv(a) => kv::run(a),
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl-C / SIGTERM set a flag the benchmarks check, so they return an
/// error and their guards stop the clusters and remove the data.
fn watch_signals() {
    let _ = std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut term) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                INTERRUPTED.store(true, Ordering::SeqCst);
            });
        });
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// The overall progress bar: one step per measured run. Hidden when stderr
/// is not a terminal.
pub fn progress(total: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} runs  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Prints a line above the progress bar (or plainly if it is hidden).
pub fn say(pb: &ProgressBar, line: impl AsRef<str>) {
    pb.suspend(|| println!("{}", line.as_ref()));
}

/// The command line that produced a result, for the markdown.
pub fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a.clone()
            }
        })
        .collect();
    format!("cargo run --release -p keel -- {}", quoted.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keel_config_takes_plain_toml_settings_only() {
        assert!(parse_setting("log_cache_bytes = 0").is_ok());
        assert!(parse_setting("auto_compaction_retention = \"30s\"").is_ok());
        for (bad, says) in [
            ("log_cache_bytes", "not a TOML setting"),
            ("", "no setting"),
            ("[peers]\nid = 1", "not tables"),
            ("x = [1]", "not tables or lists"),
        ] {
            let e = parse_setting(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn rates_parse_with_suffixes() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("10k"), Ok(10_000));
        assert_eq!(parse_rate(" 2.5K "), Ok(2500));
        assert_eq!(parse_rate("1m"), Ok(1_000_000));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("2g").is_err());
    }
}
