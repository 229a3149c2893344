//! Results: percentiles from HdrHistogram, the markdown section rewrite,
//! and the PNG plots.

use anyhow::{anyhow, Context as _, Result};
use hdrhistogram::Histogram;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A latency histogram in nanoseconds, 1 ns to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Latency percentiles in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }

    /// (label, value in ns) for plotting and tables.
    pub fn labelled(&self) -> [(&'static str, u64); 6] {
        [
            ("p50", self.p50),
            ("p90", self.p90),
            ("p99", self.p99),
            ("p99.9", self.p999),
            ("p99.99", self.p9999),
            ("max", self.max),
        ]
    }
}

/// Nanoseconds as microseconds: one decimal below 100 µs, whole above;
/// "—" for 0 (no samples: every recorded latency is at least 1 ns).
pub fn us(ns: u64) -> String {
    if ns == 0 {
        return "—".into();
    }
    let v = ns as f64 / 1e3;
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Nanoseconds as milliseconds with 2 decimals (3 below 1 ms); "—" for 0.
pub fn ms(ns: u64) -> String {
    if ns == 0 {
        return "—".into();
    }
    let v = ns as f64 / 1e6;
    if v < 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.2}")
    }
}

/// `current` with the section between `<!-- name:start -->` and
/// `<!-- name:end -->` replaced by `body` (or appended, with the markers,
/// when absent). Everything else is left byte for byte.
pub fn replace_section(current: &str, name: &str, body: &str) -> String {
    let (start, end) = (
        format!("<!-- {name}:start -->"),
        format!("<!-- {name}:end -->"),
    );
    let body = if body.ends_with('\n') {
        body.to_string()
    } else {
        format!("{body}\n")
    };
    let block = format!("{start}\n{body}{end}");
    match current.find(&start) {
        Some(a) => match current[a..].find(&end) {
            Some(b) => format!(
                "{}{}{}",
                &current[..a],
                block,
                &current[a + b + end.len()..]
            ),
            None => format!("{}\n{}\n", current.trim_end(), block),
        },
        None if current.trim().is_empty() => format!("# Benchmarks\n\n{block}\n"),
        None => format!("{}\n\n{}\n", current.trim_end(), block),
    }
}

/// Rewrites this benchmark's section of the markdown file at `path`.
pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let current = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    std::fs::write(path, replace_section(&current, name, body))
        .with_context(|| format!("writing {}", path.display()))
}

/// The PNG written next to the markdown file: `<dir of out>/<file>`.
pub fn beside(out: &Path, file: &str) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(file),
        _ => PathBuf::from(file),
    }
}

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub color: RGBColor,
    /// Thicker lines for the headline series.
    pub width: u32,
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Colours for up to six percentiles, light to dark.
pub const PERCENTILE_COLORS: [RGBColor; 6] = [
    RGBColor(0x4c, 0xaf, 0x50),
    RGBColor(0x21, 0x96, 0xf3),
    RGBColor(0x3f, 0x51, 0xb5),
    RGBColor(0x9c, 0x27, 0xb0),
    RGBColor(0xe9, 0x1e, 0x63),
    RGBColor(0x42, 0x42, 0x42),
];

const FONT_CANDIDATES: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
];

/// plotters draws text with ab_glyph from a TrueType file read at run
/// time (no fontconfig); registered once as "sans-serif".
fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("KEEL_BENCH_FONT") {
            candidates.push(p.into());
        }
        candidates.extend(FONT_CANDIDATES.iter().map(PathBuf::from));
        let Some((path, bytes)) = candidates
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|b| (p.clone(), b)))
        else {
            return Err(
                "no TrueType font for the plot's text: install one with \
                 `apt-get install -y fonts-dejavu-core`, or set KEEL_BENCH_FONT=/path/to/font.ttf"
                    .to_string(),
            );
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Draws `panels` side by side (up to 2 per row) with log-scale axes:
/// x is the offered rate, y a latency in microseconds. Points must be
/// positive.
pub fn plot(path: &Path, title: &str, x_desc: &str, y_desc: &str, panels: &[Panel]) -> Result<()> {
    register_font()?;
    let cols = panels.len().clamp(1, 2);
    let rows = panels.len().div_ceil(2).max(1);
    let (w, h) = (720 * cols as u32, 80 + 520 * rows as u32);
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 26))
        .map_err(|e| err(&e))?;
    let areas = root.split_evenly((rows, cols));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let pts = panel.series.iter().flat_map(|s| s.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts.filter(|(x, y)| *x > 0.0 && *y > 0.0) {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            continue; // nothing to draw
        }
        // Pad the log ranges so single points and flat lines show.
        let (x0, x1) = (x0 / 1.3, x1 * 1.3);
        let (y0, y1) = (y0 / 1.5, y1 * 1.5);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| human(*v))
            .y_label_formatter(&|v| duration_us(*v))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for s in &panel.series {
            let points: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| *x > 0.0 && *y > 0.0)
                .collect();
            let style = s.color.stroke_width(s.width);
            let color = s.color;
            chart
                .draw_series(LineSeries::new(points, style).point_size(3))
                .map_err(|e| err(&e))?
                .label(&s.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A latency in microseconds for an axis label: "50 µs", "1.5 ms", "2 s".
pub fn duration_us(v: f64) -> String {
    if v >= 1e6 {
        format!("{} s", human(v / 1e6))
    } else if v >= 1e3 {
        format!("{} ms", human(v / 1e3))
    } else {
        format!("{} µs", human(v))
    }
}

/// 1500 -> "1.5k", 200000 -> "200k", 0.25 -> "0.25".
pub fn human(v: f64) -> String {
    let (n, suffix) = if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if n >= 100.0 || (n - n.round()).abs() < 1e-9 {
        format!("{n:.0}")
    } else if n >= 10.0 {
        format!("{n:.1}")
    } else {
        format!("{n:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_only_its_own_section() {
        let doc = "# Benchmarks\n\nintro\n<!-- echo:start -->\nold\n<!-- echo:end -->\n\n<!-- kv:start -->\nkv\n<!-- kv:end -->\ntail\n";
        let next = replace_section(doc, "echo", "## New\n\nrows");
        assert_eq!(
            next,
            "# Benchmarks\n\nintro\n<!-- echo:start -->\n## New\n\nrows\n<!-- echo:end -->\n\n<!-- kv:start -->\nkv\n<!-- kv:end -->\ntail\n"
        );
        // Idempotent.
        assert_eq!(replace_section(&next, "echo", "## New\n\nrows"), next);
        // The other section is untouched when this one changes.
        let kv = replace_section(&next, "kv", "fresh\n");
        assert!(kv.contains("<!-- kv:start -->\nfresh\n<!-- kv:end -->\ntail\n"));
        assert!(kv.contains("## New\n\nrows\n<!-- echo:end -->"));
    }

    #[test]
    fn appends_a_missing_section_and_creates_a_file() {
        let next = replace_section("# Benchmarks\n\nintro\n", "echo", "body\n");
        assert_eq!(
            next,
            "# Benchmarks\n\nintro\n\n<!-- echo:start -->\nbody\n<!-- echo:end -->\n"
        );
        assert_eq!(
            replace_section("", "kv", "x"),
            "# Benchmarks\n\n<!-- kv:start -->\nx\n<!-- kv:end -->\n"
        );
        // A start marker without its end marker: append a whole new block
        // rather than swallow the rest of the file.
        let broken = "a\n<!-- kv:start -->\nb\n";
        assert!(replace_section(broken, "kv", "c").starts_with(broken.trim_end()));
    }

    #[test]
    fn percentiles_from_a_histogram() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v * 1000).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 10_000);
        // 3 significant digits: within 0.1%.
        let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001;
        assert!(near(p.p50, 5_000_000), "{p:?}");
        assert!(near(p.p99, 9_900_000), "{p:?}");
        assert!(near(p.p999, 9_990_000), "{p:?}");
        assert!(near(p.max, 10_000_000), "{p:?}");
        assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.p9999);
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    #[test]
    fn the_longest_possible_latency_is_recorded_unclamped() {
        // A message due at the start of the longest window (--duration
        // 3600) answered at the end of the longest drain (--drain 600).
        let longest = (3600 + 600) * 1_000_000_000u64;
        let mut h = histogram();
        h.saturating_record(longest);
        assert!(h.max() >= longest, "{} < {longest}", h.max());
    }

    #[test]
    fn number_formats() {
        assert_eq!(us(12_345), "12.3");
        assert_eq!(us(1_234_567), "1235");
        assert_eq!(ms(1_234_567), "1.23");
        assert_eq!(ms(456_789), "0.457");
        assert_eq!(us(0), "—");
        assert_eq!(ms(0), "—");
        assert_eq!(human(1500.0), "1.5k");
        assert_eq!(human(200_000.0), "200k");
        assert_eq!(human(1_000_000.0), "1M");
        assert_eq!(human(0.25), "0.25");
        assert_eq!(human(10.0), "10");
        assert_eq!(duration_us(50.0), "50 µs");
        assert_eq!(duration_us(1500.0), "1.5 ms");
        assert_eq!(duration_us(2_000_000.0), "2 s");
    }
}
