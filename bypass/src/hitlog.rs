//! Reading the hit log that the programs write through aya-log, and the exit summary.
//!
//! The reader drains the ring buffer on a timer instead of waiting for each record. A reader
//! blocked on the buffer is woken for new records, often by an inter-processor interrupt that
//! costs the connecting process microseconds. A reader that drains it every
//! [`FLUSH_INTERVAL`] is never blocked on it, so no record has a reader to wake.

use std::time::Duration;

use aya::maps::{MapData, PerCpuArray};
use aya_log::EbpfLogger;
use bypass_common::{LOG_STATS_MAP, LogStat};
use tokio::{sync::oneshot, task::JoinHandle, time};

use crate::{loader::Redirector, rule::RuleSet};

/// How often the reader drains the ring buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// Minimum time between two warnings about rate-limited hit log lines.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(5);

/// The running hit log reader.
pub struct HitLog {
    stop: oneshot::Sender<()>,
    task: JoinHandle<LogTotals>,
}

/// Hit log lines written and rate-limited over the life of the attachment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogTotals {
    pub written: u64,
    pub rate_limited: u64,
}

impl HitLog {
    /// Takes the log maps out of `redirector` and starts draining them. Returns `None` (after
    /// a warning) when the hit log cannot be read; redirects and counters work regardless.
    pub fn start(redirector: &mut Redirector) -> Option<Self> {
        let ebpf = redirector.ebpf_mut();
        let stats = ebpf
            .take_map(LOG_STATS_MAP)
            .and_then(|map| PerCpuArray::<MapData, u64>::try_from(map).ok());
        let logger = match EbpfLogger::init_with_logger(ebpf, TrimPadding) {
            Ok(logger) => logger,
            Err(err) => {
                log::warn!("the hit log is off: {err}");
                return None;
            }
        };
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(drain(logger, stats, stopped));
        Some(Self { stop, task })
    }

    /// Drains what is left and returns the totals.
    pub async fn stop(self) -> LogTotals {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

async fn drain(
    mut logger: EbpfLogger<TrimPadding>,
    stats: Option<PerCpuArray<MapData, u64>>,
    mut stopped: oneshot::Receiver<()>,
) -> LogTotals {
    let mut interval = time::interval(FLUSH_INTERVAL);
    let mut reported_drops = 0;
    let mut last_warning = time::Instant::now() - DROP_WARNING_INTERVAL;
    loop {
        let stopping = tokio::select! {
            _ = interval.tick() => false,
            _ = &mut stopped => true,
        };
        logger.flush();
        let totals = read_totals(stats.as_ref());
        if totals.rate_limited > reported_drops && last_warning.elapsed() >= DROP_WARNING_INTERVAL {
            log::warn!(
                "{} hits not logged because the hit log limit (--log-rate, per CPU) was \
                 reached; hit counters still count them",
                totals.rate_limited - reported_drops
            );
            reported_drops = totals.rate_limited;
            last_warning = time::Instant::now();
        }
        if stopping {
            return totals;
        }
    }
}

/// Passes hit log records on to the global logger without the NUL padding of the command
/// name, which the programs log as a fixed 16-byte string, always as the last field.
struct TrimPadding;

impl log::Log for TrimPadding {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{}", text.trim_end_matches('\0')))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

fn read_totals(stats: Option<&PerCpuArray<MapData, u64>>) -> LogTotals {
    let Some(stats) = stats else {
        return LogTotals::default();
    };
    let sum = |stat: LogStat| {
        stats
            .get(&(stat as u32), 0)
            .map_or(0, |values| values.iter().sum::<u64>())
    };
    LogTotals {
        written: sum(LogStat::Written),
        rate_limited: sum(LogStat::RateLimited),
    }
}

/// Logs the hits of each rule, and the hit log totals, at info.
pub fn log_summary(rules: &RuleSet, redirector: &Redirector, totals: Option<LogTotals>) {
    match redirector.hits() {
        Ok(hits) => {
            for ((rule, _), count) in rules.iter().zip(hits) {
                log::info!("{}", format_hits(&rule.to_string(), count));
            }
        }
        Err(err) => log::warn!("cannot read hit counters: {err}"),
    }
    if let Some(totals) = totals.filter(|totals| totals.rate_limited > 0) {
        log::info!(
            "hit log: {} lines written, {} hits not logged (rate limit)",
            totals.written,
            totals.rate_limited
        );
    }
}

/// Formats one line of the exit summary.
pub fn format_hits(rule: &str, count: u64) -> String {
    let noun = if count == 1 { "hit" } else { "hits" };
    format!("{count} {noun}: {rule}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_counts_hits() {
        assert_eq!(
            format_hits("tcp/10.0.0.22:80=10.0.0.22:3000", 1),
            "1 hit: tcp/10.0.0.22:80=10.0.0.22:3000"
        );
        assert_eq!(
            format_hits("udp/[::1]:53=[::1]:5353", 0),
            "0 hits: udp/[::1]:53=[::1]:5353"
        );
    }
}
