//! Reading one histogram from a server's Prometheus text metrics, for the
//! benchmarks' disk-sync figures (Keel's `keel_log_fsync_seconds`, etcd's
//! `etcd_disk_wal_fsync_duration_seconds`).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A histogram as scraped: cumulative counts by upper bound (ascending,
/// the last `+Inf`), the sum of the observations and their count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hist {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Hist {
    /// The histogram `name` in Prometheus (or OpenMetrics) text, if it is
    /// there and whole: none for a missing or malformed one.
    pub fn parse(text: &str, name: &str) -> Option<Hist> {
        let mut h = Hist::default();
        let (mut sum, mut count) = (None, None);
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            // (The value is the first field after the series; OpenMetrics
            // may append an exemplar or a timestamp.)
            if let Some(labelled) = rest.strip_prefix("_bucket{") {
                let (labels, after) = labelled.split_once('}')?;
                let le = labels
                    .split(',')
                    .find_map(|l| l.trim().strip_prefix("le=\""))?
                    .split('"')
                    .next()?;
                let bound = match le {
                    "+Inf" | "Inf" | "inf" => f64::INFINITY,
                    b => b.parse().ok()?,
                };
                h.buckets
                    .push((bound, count_of(after.split_whitespace().next()?)?));
                continue;
            }
            let mut fields = rest.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some("_sum"), Some(v)) => sum = v.parse::<f64>().ok(),
                (Some("_count"), Some(v)) => count = Some(count_of(v)?),
                _ => {}
            }
        }
        h.sum = sum?;
        h.count = count?;
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let whole = h.buckets.last().is_some_and(|b| b.0.is_infinite())
            && h.buckets.windows(2).all(|w| w[0].1 <= w[1].1);
        whole.then_some(h)
    }

    /// What was observed after `earlier` (a scrape of the same series).
    pub fn since(&self, earlier: &Hist) -> Hist {
        Hist {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|b| b.0 == le)
                        .map_or(0, |b| b.1);
                    (le, n.saturating_sub(before))
                })
                .collect(),
            sum: (self.sum - earlier.sum).max(0.0),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// Adds another member's histogram of the same buckets.
    pub fn add(&mut self, other: &Hist) {
        if self.buckets.is_empty() {
            self.buckets = other.buckets.clone();
        } else {
            for (b, o) in self.buckets.iter_mut().zip(&other.buckets) {
                b.1 += o.1;
            }
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The `q` quantile, interpolated linearly within its bucket (as
    /// Prometheus' `histogram_quantile`): only as fine as the buckets.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let (mut lower, mut below) = (0.0, 0u64);
        for &(le, n) in &self.buckets {
            if n as f64 >= rank && n > below {
                if le.is_infinite() {
                    return Some(lower);
                }
                let share = (rank - below as f64) / (n - below) as f64;
                return Some(lower + (le - lower) * share.clamp(0.0, 1.0));
            }
            (lower, below) = (le, n);
        }
        Some(lower)
    }
}

fn count_of(value: &str) -> Option<u64> {
    // Counts print as integers, or as floats ("12.0", "1.2e3") by some
    // clients.
    value.parse::<u64>().ok().or_else(|| {
        let f = value.parse::<f64>().ok()?;
        (f.is_finite() && f >= 0.0).then_some(f as u64)
    })
}

/// `GET /metrics` from `addr` (host:port) over plain HTTP/1.0, blocking
/// (loopback servers the benchmark started: a few milliseconds).
pub fn scrape(addr: &str) -> Result<String> {
    let timeout = Duration::from_secs(5);
    let get = || -> std::io::Result<Vec<u8>> {
        let sock = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let mut s = TcpStream::connect_timeout(&sock, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
        let mut body = Vec::new();
        s.take(64 << 20).read_to_end(&mut body)?;
        Ok(body)
    };
    let body = get().with_context(|| format!("{addr}/metrics"))?;
    let text = String::from_utf8_lossy(&body);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("{addr}/metrics: not an HTTP response");
    };
    if head.split(' ').nth(1) != Some("200") {
        bail!(
            "{addr}/metrics: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_string())
}

/// Histogram `name` summed over the members at `addrs`; none if any
/// member's could not be read.
pub fn scrape_sum(addrs: &[String], name: &str) -> Option<Hist> {
    let mut total = Hist::default();
    for a in addrs {
        let text = scrape(a).ok()?;
        total.add(&Hist::parse(&text, name)?);
    }
    Some(total)
}

/// Keel's histogram of its log's fdatasyncs.
pub const KEEL_FSYNC: &str = "keel_log_fsync_seconds";

/// Observations per 1000 of `done` (requests or messages completed in the
/// same window).
pub fn per_1000(h: &Hist, done: u64) -> Option<f64> {
    (done > 0).then(|| h.count as f64 * 1000.0 / done as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEEL: &str = "# HELP keel_log_fsync_seconds each fdatasync of the log.\n\
        # TYPE keel_log_fsync_seconds histogram\n\
        keel_log_fsync_seconds_sum 0.0035\n\
        keel_log_fsync_seconds_count 10\n\
        keel_log_fsync_seconds_bucket{le=\"0.0001\"} 0\n\
        keel_log_fsync_seconds_bucket{le=\"0.0002\"} 4\n\
        keel_log_fsync_seconds_bucket{le=\"0.0004\"} 9\n\
        keel_log_fsync_seconds_bucket{le=\"+Inf\"} 10\n\
        keel_log_fsync_seconds_other 3\n\
        # EOF\n";

    const ETCD: &str = "etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 80\n\
        etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 100\n\
        etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 100\n\
        etcd_disk_wal_fsync_duration_seconds_sum 0.07\n\
        etcd_disk_wal_fsync_duration_seconds_count 100\n";

    #[test]
    fn reads_both_servers_histograms_and_their_quantiles() {
        let k = Hist::parse(KEEL, "keel_log_fsync_seconds").expect("keel");
        assert_eq!(k.count, 10);
        assert_eq!(k.buckets.len(), 4);
        assert!((k.mean().expect("mean") - 0.00035).abs() < 1e-12);
        // Rank 5 of 10: the first of the 5 in (0.0002, 0.0004].
        let p50 = k.quantile(0.5).expect("p50");
        assert!((p50 - 0.00024).abs() < 1e-9, "{p50}");
        // In the +Inf bucket: its lower bound.
        assert_eq!(k.quantile(1.0), Some(0.0004));

        let e = Hist::parse(ETCD, "etcd_disk_wal_fsync_duration_seconds").expect("etcd");
        let p99 = e.quantile(0.99).expect("p99");
        assert!((p99 - 0.00195).abs() < 1e-9, "{p99}");
        assert_eq!(Hist::parse(ETCD, "keel_log_fsync_seconds"), None);
        assert_eq!(Hist::default().quantile(0.5), None);
    }

    #[test]
    fn quantiles_follow_prometheus_histogram_quantile() {
        let h = Hist {
            buckets: vec![
                (0.1, 0),
                (0.2, 0),
                (0.4, 10),
                (0.8, 10),
                (f64::INFINITY, 10),
            ],
            sum: 3.0,
            count: 10,
        };
        let near = |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 1e-12);
        // Rank 5 of the 10 in (0.2, 0.4]: halfway.
        assert!(near(h.quantile(0.5), 0.3), "{:?}", h.quantile(0.5));
        // The whole count is reached in (0.2, 0.4]: its upper bound, not
        // the empty buckets above it.
        assert!(near(h.quantile(1.0), 0.4), "{:?}", h.quantile(1.0));
        assert!(near(h.quantile(0.99), 0.398), "{:?}", h.quantile(0.99));
        // Empty buckets below are skipped: the lowest is the lower bound of
        // the first non-empty one.
        assert!(near(h.quantile(0.0), 0.2), "{:?}", h.quantile(0.0));
        // Every observation above the largest finite bound: that bound.
        let over = Hist {
            buckets: vec![(0.1, 0), (f64::INFINITY, 5)],
            sum: 9.0,
            count: 5,
        };
        assert_eq!(over.quantile(0.5), Some(0.1));
        // The first bucket's lower bound is 0.
        let low = Hist {
            buckets: vec![(0.001, 4), (0.002, 4), (f64::INFINITY, 4)],
            sum: 0.002,
            count: 4,
        };
        assert!(near(low.quantile(0.5), 0.0005), "{:?}", low.quantile(0.5));
    }

    #[test]
    fn a_window_is_the_difference_of_two_scrapes_summed_over_members() {
        let before = Hist::parse(KEEL, "keel_log_fsync_seconds").expect("keel");
        let mut after = before.clone();
        after.buckets[3].1 += 2;
        after.buckets[2].1 += 2;
        after.count += 2;
        after.sum += 0.0006;
        let w = after.since(&before);
        assert_eq!(w.count, 2);
        assert_eq!(w.buckets[1].1, 0);
        assert_eq!(w.buckets[2].1, 2);
        let mut total = Hist::default();
        total.add(&w);
        total.add(&w);
        assert_eq!(total.count, 4);
        assert!((total.mean().expect("mean") - 0.0003).abs() < 1e-12);
    }

    #[test]
    fn a_histogram_with_a_part_missing_is_none() {
        let no_inf = KEEL.replace("le=\"+Inf\"", "le=\"1\"");
        assert_eq!(Hist::parse(&no_inf, "keel_log_fsync_seconds"), None);
        let no_count = KEEL.replace("keel_log_fsync_seconds_count 10\n", "");
        assert_eq!(Hist::parse(&no_count, "keel_log_fsync_seconds"), None);
        let bad = KEEL.replace("} 4", "} four");
        assert_eq!(Hist::parse(&bad, "keel_log_fsync_seconds"), None);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "(keel_h(_bucket\\{le=\"[0-9.+Inf]{0,5}\"?\\}|_sum|_count)? ?[0-9.e+-]{0,6}\n){0,8}") {
            if let Some(h) = Hist::parse(&text, "keel_h") {
                let _ = h.quantile(0.99);
                let _ = h.since(&h);
            }
        }
    }
}
