//! Automatic compaction, as etcd's `--auto-compaction-mode` and
//! `--auto-compaction-retention`: the KV store keeps every revision until a
//! client compacts, and Keel keeps that history in memory, so a store that
//! nobody compacts grows without bound. With a retention set, the leader
//! proposes a `Compact` through the log like any client would (every node
//! applies it at the same point, so replicas never diverge); followers only
//! watch, and a new leader takes over where the old one stopped.
//!
//! - `revision` mode keeps at least the newest *retention* revisions: the
//!   leader looks every second and compacts to `revision - retention` once
//!   that is a tenth of the retention (at least one revision) past the
//!   last compaction, so the history holds at most 1.1 × retention
//!   revisions and a busy store is compacted in batches, not on every put.
//! - `periodic` mode keeps at least the last *retention* of time: the leader
//!   notes the revision every tenth of the retention (between 1 s and an
//!   hour) and compacts to the newest noted revision that is at least the
//!   retention old. A node that becomes leader starts noting afresh, so its
//!   first compaction comes one retention after it took over.
//!
//! The retention is written as etcd takes it: a count of revisions in
//! `revision` mode; in `periodic` mode a duration (`30m`, `1h30m`, `90s`,
//! `1.5h`) or a bare number of hours. `0` turns it off (the default).

use crate::Api;
use keel_kv::{Command, Response};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to keep when compacting automatically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AutoCompaction {
    /// Only clients compact (etcd's default).
    #[default]
    Off,
    /// Keep at least this many of the newest revisions.
    Revisions(u64),
    /// Keep at least this much of the newest history.
    Period(Duration),
}

impl AutoCompaction {
    /// Parses etcd's pair of settings: `mode` is `periodic` or `revision`,
    /// `retention` as described in the module docs.
    pub fn parse(mode: &str, retention: &str) -> Result<AutoCompaction, String> {
        let retention = retention.trim();
        match mode {
            "revision" => {
                let n: u64 = retention.parse().map_err(|_| {
                    format!(
                        "auto_compaction_retention {retention:?}: revision mode keeps a \
                         number of revisions (a whole number, 0 for off)"
                    )
                })?;
                Ok(if n == 0 {
                    AutoCompaction::Off
                } else {
                    AutoCompaction::Revisions(n)
                })
            }
            "periodic" => {
                let d = parse_duration(retention)
                    .map_err(|e| format!("auto_compaction_retention {retention:?}: {e}"))?;
                Ok(if d.is_zero() {
                    AutoCompaction::Off
                } else {
                    AutoCompaction::Period(d)
                })
            }
            other => Err(format!(
                "auto_compaction_mode {other:?}: expected \"periodic\" or \"revision\""
            )),
        }
    }

    /// How often the leader looks.
    pub fn interval(&self) -> Duration {
        match *self {
            AutoCompaction::Off => Duration::MAX,
            AutoCompaction::Revisions(_) => Duration::from_secs(1),
            AutoCompaction::Period(p) => {
                (p / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
            }
        }
    }
}

/// A duration as etcd's retention takes it: a Go-style duration (`1h30m`,
/// `90s`, `1.5h`, `500ms`), or a bare number meaning hours; at most 10
/// years (longer is as good as off, and the bound keeps the arithmetic on
/// `Instant`s safe). The node's configuration check uses the same rules.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    keel_node::config::retention_secs(s).map(Duration::from_secs_f64)
}

/// Decides when to compact and to which revision; pure, so the policy is
/// tested without a cluster (`run` feeds it).
#[derive(Debug)]
pub struct Planner {
    mode: AutoCompaction,
    /// Periodic mode: (when, revision) noted while leader, oldest first.
    noted: VecDeque<(Instant, u64)>,
}

impl Planner {
    pub fn new(mode: AutoCompaction) -> Planner {
        Planner {
            mode,
            noted: VecDeque::new(),
        }
    }

    /// This node stopped leading: what it noted is no reference for the
    /// next time it leads.
    pub fn not_leader(&mut self) {
        self.noted.clear();
    }

    /// At `now`, as leader, with the store at `revision` and compacted at
    /// `compacted`: the revision to compact to, if it is time.
    pub fn plan(&mut self, now: Instant, revision: u64, compacted: i64) -> Option<i64> {
        let compacted = u64::try_from(compacted).unwrap_or(0);
        let target = match self.mode {
            AutoCompaction::Off => return None,
            AutoCompaction::Revisions(keep) => {
                let target = revision.saturating_sub(keep);
                let step = (keep / 10).max(1);
                (target >= compacted.saturating_add(step)).then_some(target)?
            }
            AutoCompaction::Period(keep) => {
                if self.noted.back().is_none_or(|&(_, r)| r != revision) {
                    self.noted.push_back((now, revision));
                }
                let mut target = None;
                while let Some(&(at, r)) = self.noted.front() {
                    if now.saturating_duration_since(at) < keep {
                        break;
                    }
                    target = Some(r);
                    self.noted.pop_front();
                }
                let target = target?;
                (target > compacted).then_some(target)?
            }
        };
        i64::try_from(target).ok()
    }
}

/// The leader-side loop: runs on the API's runtime until the node stops.
pub(crate) async fn run(api: Arc<Api>, mode: AutoCompaction) {
    if mode == AutoCompaction::Off {
        return;
    }
    let mut planner = Planner::new(mode);
    let mut tick = tokio::time::interval(mode.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!("auto-compaction on: {mode:?}");
    loop {
        tick.tick().await;
        if api.node.is_stopped() {
            return;
        }
        if api.node.status().role != "leader" {
            planner.not_leader();
            continue;
        }
        let (revision, compacted, _) = match api.local_revision().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("auto-compaction: reading the revision: {e}");
                continue;
            }
        };
        let Some(target) = planner.plan(Instant::now(), revision, compacted) else {
            continue;
        };
        match api.write(&Command::Compact { revision: target }).await {
            Ok(Response::Compact { .. }) => {
                tracing::info!("auto-compaction: compacted to revision {target}")
            }
            Ok(other) => tracing::warn!("auto-compaction: unexpected answer {other:?}"),
            // Already compacted further (a client did), or leadership moved:
            // the next look decides again.
            Err(e) => tracing::info!("auto-compaction to revision {target}: {}", e.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn settings_parse_as_etcd_takes_them() {
        let p = AutoCompaction::parse;
        assert_eq!(p("periodic", "0"), Ok(AutoCompaction::Off));
        assert_eq!(p("revision", "0"), Ok(AutoCompaction::Off));
        assert_eq!(p("revision", "1000"), Ok(AutoCompaction::Revisions(1000)));
        let hours = |h: f64| AutoCompaction::Period(Duration::from_secs_f64(h * 3600.0));
        assert_eq!(p("periodic", "1"), Ok(hours(1.0)));
        assert_eq!(p("periodic", "1.5"), Ok(hours(1.5)));
        assert_eq!(p("periodic", "1h30m"), Ok(hours(1.5)));
        assert_eq!(p("periodic", "30m"), Ok(hours(0.5)));
        assert_eq!(
            p("periodic", "90s"),
            Ok(AutoCompaction::Period(Duration::from_secs(90)))
        );
        assert_eq!(
            p("periodic", "1500ms"),
            Ok(AutoCompaction::Period(Duration::from_millis(1500)))
        );
        for (mode, retention, says) in [
            ("hourly", "1", "auto_compaction_mode \"hourly\""),
            ("revision", "1h", "a whole number"),
            ("revision", "-5", "a whole number"),
            ("periodic", "", "empty"),
            ("periodic", "5d", "unknown unit \"d\""),
            ("periodic", "h", "\"\" is not a number"),
            ("periodic", "1.2.3h", "not a number"),
            ("periodic", "5m3", "no unit"),
            ("periodic", "99999999h", "longer than"),
        ] {
            let e = p(mode, retention).expect_err(retention);
            assert!(e.contains(says), "{mode} {retention}: {e}");
        }
    }

    proptest! {
        /// Any text gives a duration or an error, never a panic, and a
        /// written-out duration reads back as itself.
        #[test]
        fn durations_never_panic(s in "\\PC{0,12}") {
            let _ = parse_duration(&s);
        }

        #[test]
        fn durations_read_back(h in 0u64..1000, m in 0u64..60, s in 0u64..60) {
            let text = format!("{h}h{m}m{s}s");
            prop_assert_eq!(
                parse_duration(&text),
                Ok(Duration::from_secs(h * 3600 + m * 60 + s))
            );
        }
    }

    #[test]
    fn revision_mode_keeps_the_retention_and_compacts_in_tenths() {
        let mut p = Planner::new(AutoCompaction::Revisions(1000));
        let now = Instant::now();
        assert_eq!(p.plan(now, 500, 0), None, "less history than the retention");
        assert_eq!(p.plan(now, 1099, 0), None, "not yet a tenth past it");
        assert_eq!(p.plan(now, 1100, 0), Some(100));
        assert_eq!(p.plan(now, 1150, 100), None);
        assert_eq!(p.plan(now, 1200, 100), Some(200));
        // A client compacted further: nothing to do until a tenth past that.
        assert_eq!(p.plan(now, 5000, 4900), None);
        assert_eq!(p.plan(now, 6000, 4900), Some(5000));
        let mut small = Planner::new(AutoCompaction::Revisions(5));
        assert_eq!(small.plan(now, 6, 0), Some(1), "at least one revision");
    }

    #[test]
    fn periodic_mode_compacts_to_what_was_current_a_retention_ago() {
        let keep = Duration::from_secs(600);
        let mut p = Planner::new(AutoCompaction::Period(keep));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(p.plan(at(0), 10, 0), None);
        assert_eq!(p.plan(at(60), 70, 0), None);
        assert_eq!(p.plan(at(120), 70, 0), None, "no writes: noted once");
        assert_eq!(p.plan(at(599), 500, 0), None, "nothing a retention old yet");
        assert_eq!(p.plan(at(600), 510, 0), Some(10));
        assert_eq!(p.plan(at(659), 520, 10), None);
        assert_eq!(p.plan(at(700), 530, 10), Some(70));
        // Leadership lost and regained: a retention must pass again.
        p.not_leader();
        assert_eq!(p.plan(at(800), 600, 70), None);
        assert_eq!(p.plan(at(1399), 610, 70), None);
        assert_eq!(p.plan(at(1400), 620, 70), Some(600));
        // Already compacted past what was noted: nothing.
        let mut q = Planner::new(AutoCompaction::Period(keep));
        assert_eq!(q.plan(at(0), 10, 0), None);
        assert_eq!(q.plan(at(600), 20, 15), None);
    }

    #[test]
    fn intervals() {
        assert_eq!(
            AutoCompaction::Revisions(10).interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            AutoCompaction::Period(Duration::from_secs(5)).interval(),
            Duration::from_secs(1)
        );
        assert_eq!(
            AutoCompaction::Period(Duration::from_secs(600)).interval(),
            Duration::from_secs(60)
        );
        assert_eq!(
            AutoCompaction::Period(Duration::from_secs(100 * 3600)).interval(),
            Duration::from_secs(3600)
        );
    }
}
