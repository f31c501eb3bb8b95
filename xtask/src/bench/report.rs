//! The bench's output: the table on stdout, the target checks, the Markdown page and the
//! SVG chart of connect rates.

use std::{collections::BTreeMap, fmt::Write as _};

use super::stats::Summary;

/// A figure measured per variant and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Figure {
    ConnectRate,
    EndToEndRate,
    ConnectP50,
    ConnectP99,
    ConcurrentRate,
    Stream,
    KernelNs,
}

/// A figure of bypass's own start-up, measured per start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StartFigure {
    Attached,
    RunTrue,
    Rss,
    PeakRss,
}

/// Every sample of one bench run.
#[derive(Debug, Default)]
pub struct Results {
    pub variants: Vec<String>,
    /// Samples by variant index and figure, one per round.
    pub samples: BTreeMap<(usize, Figure), Vec<f64>>,
    pub start: BTreeMap<StartFigure, Vec<f64>>,
}

/// Variant indexes the target checks compare; `None` when the run left one out.
#[derive(Clone, Debug, Default)]
pub struct Roles {
    pub direct: usize,
    pub default_log: Option<usize>,
    pub many_rules: Option<usize>,
    pub no_match: Option<usize>,
    pub iptables: Option<usize>,
    pub bypass: Vec<usize>,
}

/// A target of the bench and whether this run met it.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

impl Results {
    pub fn add(&mut self, variant: usize, figure: Figure, value: f64) {
        self.samples
            .entry((variant, figure))
            .or_default()
            .push(value);
    }

    pub fn add_start(&mut self, figure: StartFigure, value: f64) {
        self.start.entry(figure).or_default().push(value);
    }

    pub fn summary(&self, variant: usize, figure: Figure) -> Option<Summary> {
        Summary::of(self.samples.get(&(variant, figure))?)
    }

    pub fn start_summary(&self, figure: StartFigure) -> Option<Summary> {
        Summary::of(self.start.get(&figure)?)
    }

    /// Returns `variant`'s figure as a multiple of `base`'s: the median over the rounds of
    /// their quotient within one round. Runs of one round are close together in time, so a
    /// machine that slows down between rounds moves both. When the sample counts differ,
    /// returns the quotient of the two medians.
    fn ratio(&self, variant: usize, base: usize, figure: Figure) -> Option<f64> {
        let ours = self.samples.get(&(variant, figure))?;
        let theirs = self.samples.get(&(base, figure))?;
        if ours.len() == theirs.len() {
            let paired: Vec<f64> = ours
                .iter()
                .zip(theirs)
                .filter(|&(_, &base)| base != 0.0)
                .map(|(value, base)| value / base)
                .collect();
            if let Some(summary) = Summary::of(&paired) {
                return Some(summary.median);
            }
        }
        self.summary(variant, figure)?
            .ratio_to(&self.summary(base, figure)?)
    }

    /// The per-variant table, as Markdown (also readable on a terminal).
    pub fn table(&self, direct: usize) -> String {
        let mut out = String::from(
            "| variant | connect/s | x direct | end-to-end/s | x direct | connect p50 µs | \
             connect p99 µs | 8 clients connect/s | x direct | stream GiB/s | x direct | \
             in-kernel ns/call |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (index, name) in self.variants.iter().enumerate() {
            let cell = |figure, format: fn(f64) -> String| {
                self.summary(index, figure)
                    .map_or("-".to_owned(), |s| range_cell(&s, format))
            };
            let ratio = |figure| {
                self.ratio(index, direct, figure)
                    .map_or("-".to_owned(), |r| format!("{r:.3}"))
            };
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(Figure::ConnectRate, format_rate),
                ratio(Figure::ConnectRate),
                cell(Figure::EndToEndRate, format_rate),
                ratio(Figure::EndToEndRate),
                cell(Figure::ConnectP50, format_micros),
                cell(Figure::ConnectP99, format_micros),
                cell(Figure::ConcurrentRate, format_rate),
                ratio(Figure::ConcurrentRate),
                cell(Figure::Stream, format_gibps),
                ratio(Figure::Stream),
                cell(Figure::KernelNs, |ns| format!("{ns:.0}")),
            );
        }
        out
    }

    /// The start-up table: time to attached, `bypass run -- true`, and memory.
    pub fn start_table(&self) -> String {
        let mut out = String::from("| bypass start-up | median (min..max) |\n|---|---:|\n");
        let rows = [
            (
                StartFigure::Attached,
                "`bypass attach`: start to attached, ms",
            ),
            (
                StartFigure::RunTrue,
                "`bypass run -- true`: total wall time, ms",
            ),
            (StartFigure::Rss, "`bypass attach`: RSS after attach, MiB"),
            (StartFigure::PeakRss, "`bypass attach`: peak RSS, MiB"),
        ];
        for (figure, label) in rows {
            if let Some(summary) = self.start_summary(figure) {
                let _ = writeln!(
                    out,
                    "| {label} | {} |",
                    range_cell(&summary, |x| format!("{x:.1}"))
                );
            }
        }
        out
    }

    /// Checks this run against the targets.
    pub fn checks(&self, roles: &Roles) -> Vec<Check> {
        let mut checks = Vec::new();
        let direct = roles.direct;
        let mut ratio_check = |variant: Option<usize>, figure, minimum: f64, what: &str| {
            if let Some(ratio) = variant.and_then(|v| self.ratio(v, direct, figure)) {
                checks.push(Check {
                    target: format!("{what} >= {minimum} x direct"),
                    measured: format!("{ratio:.3}"),
                    met: ratio >= minimum,
                });
            }
        };
        ratio_check(
            roles.default_log,
            Figure::ConnectRate,
            0.97,
            "connect rate, default log",
        );
        ratio_check(
            roles.many_rules,
            Figure::ConnectRate,
            0.97,
            "connect rate, 100,000 rules",
        );
        ratio_check(
            roles.no_match,
            Figure::ConnectRate,
            0.99,
            "connect rate, no rule matches",
        );
        ratio_check(roles.default_log, Figure::Stream, 0.97, "stream throughput");
        self.check_kernel_time(roles, &mut checks);
        self.check_start(&mut checks);
        self.check_iptables(roles, &mut checks);
        checks
    }

    fn check_kernel_time(&self, roles: &Roles, checks: &mut Vec<Check>) {
        let worst = roles
            .bypass
            .iter()
            .filter_map(|&v| self.summary(v, Figure::KernelNs))
            .map(|s| s.median)
            .fold(None, |worst: Option<f64>, ns| {
                Some(worst.map_or(ns, |w| w.max(ns)))
            });
        if let Some(ns) = worst {
            checks.push(Check {
                target: "in-kernel time per call < 150 ns (slowest variant)".into(),
                measured: format!("{ns:.0} ns"),
                met: ns < 150.0,
            });
        }
    }

    fn check_start(&self, checks: &mut Vec<Check>) {
        let limits = [
            (
                StartFigure::Attached,
                10.0,
                "start to attached < 10 ms",
                "ms",
            ),
            (
                StartFigure::RunTrue,
                30.0,
                "`bypass run -- true` < 30 ms",
                "ms",
            ),
            (StartFigure::Rss, 8.0, "RSS after attach < 8 MiB", "MiB"),
        ];
        for (figure, limit, target, unit) in limits {
            if let Some(summary) = self.start_summary(figure) {
                checks.push(Check {
                    target: target.into(),
                    measured: format!("{:.1} {unit}", summary.median),
                    met: summary.median < limit,
                });
            }
        }
    }

    /// Ahead of iptables DNAT on every connection figure: every bypass variant that
    /// redirects, against iptables, on rates (higher is better) and latencies (lower).
    fn check_iptables(&self, roles: &Roles, checks: &mut Vec<Check>) {
        let Some(iptables) = roles.iptables else {
            return;
        };
        let figures = [
            (Figure::ConnectRate, true),
            (Figure::EndToEndRate, true),
            (Figure::ConcurrentRate, true),
            (Figure::ConnectP50, false),
            (Figure::ConnectP99, false),
        ];
        let mut behind = Vec::new();
        for &variant in roles.bypass.iter().filter(|&&v| Some(v) != roles.no_match) {
            for (figure, higher_is_better) in figures {
                let (Some(ours), Some(theirs)) = (
                    self.summary(variant, figure),
                    self.summary(iptables, figure),
                ) else {
                    continue;
                };
                let ahead = if higher_is_better {
                    ours.median > theirs.median
                } else {
                    ours.median < theirs.median
                };
                if !ahead {
                    behind.push(format!("{} {figure:?}", self.variants[variant]));
                }
            }
        }
        checks.push(Check {
            target: "ahead of iptables DNAT on every connection figure".into(),
            measured: if behind.is_empty() {
                "yes".into()
            } else {
                format!("behind: {}", behind.join(", "))
            },
            met: behind.is_empty(),
        });
    }

    /// The SVG bar chart of median connect rates, with min..max whiskers.
    pub fn connect_chart(&self) -> String {
        let bars: Vec<(String, Summary)> = self
            .variants
            .iter()
            .enumerate()
            .filter_map(|(i, name)| Some((name.clone(), self.summary(i, Figure::ConnectRate)?)))
            .collect();
        bar_chart(
            "Sequential connect() + close() per second (median, min..max)",
            &bars,
        )
    }
}

/// Formats the table of checks.
pub fn checks_table(checks: &[Check]) -> String {
    let mut out = String::from("| target | measured | met |\n|---|---:|---|\n");
    for check in checks {
        let met = if check.met { "yes" } else { "**no**" };
        let _ = writeln!(out, "| {} | {} | {met} |", check.target, check.measured);
    }
    out
}

fn range_cell(summary: &Summary, format: fn(f64) -> String) -> String {
    format!(
        "{} ({}..{})",
        format(summary.median),
        format(summary.min),
        format(summary.max)
    )
}

/// Formats a rate per second, e.g. `41.2k`.
pub fn format_rate(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.1}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

fn format_micros(nanos: f64) -> String {
    format!("{:.1}", nanos / 1e3)
}

fn format_gibps(bytes_per_second: f64) -> String {
    format!("{:.2}", bytes_per_second / f64::from(1u32 << 30))
}

const CHART_WIDTH: f64 = 760.0;
const LABEL_WIDTH: f64 = 220.0;
const VALUE_WIDTH: f64 = 90.0;
const BAR_HEIGHT: f64 = 22.0;
const ROW_HEIGHT: f64 = 32.0;
const TOP: f64 = 40.0;

/// Draws a horizontal bar per row, scaled to the largest maximum.
pub fn bar_chart(title: &str, bars: &[(String, Summary)]) -> String {
    let height = TOP + ROW_HEIGHT * bars.len() as f64 + 10.0;
    let scale_max = bars
        .iter()
        .map(|(_, s)| s.max)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    let plot_width = CHART_WIDTH - LABEL_WIDTH - VALUE_WIDTH;
    let x = |value: f64| LABEL_WIDTH + plot_width * value / scale_max;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{CHART_WIDTH}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    for (row, (label, summary)) in bars.iter().enumerate() {
        let top = TOP + ROW_HEIGHT * row as f64;
        let middle = top + BAR_HEIGHT / 2.0;
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>\n\
             <rect x=\"{LABEL_WIDTH}\" y=\"{top:.1}\" width=\"{:.1}\" height=\"{BAR_HEIGHT}\" fill=\"#4a7ab5\"/>\n\
             <line x1=\"{:.1}\" y1=\"{middle:.1}\" x2=\"{:.1}\" y2=\"{middle:.1}\" stroke=\"black\"/>\n\
             <text x=\"{:.1}\" y=\"{middle:.1}\" dominant-baseline=\"middle\">{}</text>\n",
            LABEL_WIDTH - 8.0,
            middle,
            escape(label),
            x(summary.median) - LABEL_WIDTH,
            x(summary.min),
            x(summary.max),
            x(summary.max) + 6.0,
            format_rate(summary.median),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        let mut results = Results {
            variants: vec!["direct".into(), "bypass".into(), "iptables".into()],
            ..Results::default()
        };
        for (variant, rates) in [
            (0, [100.0, 110.0, 90.0]),
            (1, [99.0, 98.0, 101.0]),
            (2, [80.0, 75.0, 85.0]),
        ] {
            for rate in rates {
                results.add(variant, Figure::ConnectRate, rate);
            }
        }
        results.add(1, Figure::KernelNs, 70.0);
        results.add_start(StartFigure::Attached, 12.0);
        results
    }

    #[test]
    fn table_has_ratio_and_range() {
        let table = results().table(0);
        let bypass_row = table
            .lines()
            .find(|line| line.starts_with("| bypass"))
            .unwrap();
        assert!(
            bypass_row.contains("| 99 (98..101) | 0.990 |"),
            "{bypass_row}"
        );
        assert!(bypass_row.ends_with("| 70 (70..70) |"), "{bypass_row}");
        assert_eq!(table.lines().count(), 2 + 3);
    }

    #[test]
    fn ratio_pairs_samples_of_the_same_round() {
        let mut drifting = Results::default();
        // The machine halves its speed after the first round: the ratio of the medians
        // (50 / 100 = 0.5) hides that bypass ran at 0.9 of direct in every round.
        for (direct, bypass) in [(200.0, 180.0), (100.0, 90.0), (100.0, 90.0)] {
            drifting.add(0, Figure::ConnectRate, direct);
            drifting.add(1, Figure::ConnectRate, bypass);
        }
        let ratio = drifting.ratio(1, 0, Figure::ConnectRate).unwrap();
        assert!((ratio - 0.9).abs() < 1e-9, "{ratio}");

        drifting.add(1, Figure::ConnectRate, 90.0);
        let unpaired = drifting.ratio(1, 0, Figure::ConnectRate).unwrap();
        assert!((unpaired - 0.9).abs() < 1e-9, "{unpaired}");
    }

    #[test]
    fn checks_report_misses() {
        let roles = Roles {
            direct: 0,
            default_log: Some(1),
            iptables: Some(2),
            bypass: vec![1],
            ..Roles::default()
        };
        let checks = results().checks(&roles);
        let connect = &checks[0];
        assert_eq!(connect.target, "connect rate, default log >= 0.97 x direct");
        assert!(connect.met);
        let start = checks
            .iter()
            .find(|c| c.target.starts_with("start to attached"))
            .unwrap();
        assert!(!start.met);
        assert_eq!(start.measured, "12.0 ms");
        let iptables = checks.last().unwrap();
        assert!(iptables.met, "{iptables:?}");
        assert!(checks_table(&checks).contains("| start to attached < 10 ms | 12.0 ms | **no** |"));
    }

    #[test]
    fn chart_draws_a_bar_per_variant() {
        let svg = results().connect_chart();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("fill=\"#4a7ab5\"").count(), 3);
        // The largest maximum (110) spans the whole plot width.
        assert!(svg.contains("x2=\"670.0\""), "{svg}");
    }

    #[test]
    fn chart_escapes_labels() {
        let summary = Summary {
            median: 1.0,
            min: 1.0,
            max: 1.0,
        };
        let svg = bar_chart("a & b", &[("<x>".into(), summary)]);
        assert!(svg.contains("a &amp; b"));
        assert!(svg.contains("&lt;x&gt;"));
    }

    #[test]
    fn rates_are_compact() {
        assert_eq!(format_rate(41_234.0), "41.2k");
        assert_eq!(format_rate(1_500_000.0), "1.50M");
        assert_eq!(format_rate(950.0), "950");
    }
}
