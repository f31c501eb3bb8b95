//! Reading the hit log that the programs write through aya-log, and the exit summary.
//!
//! The reader drains the ring buffer on a timer instead of waiting for each record. A reader
//! blocked on the buffer is woken for new records, often by an inter-processor interrupt that
//! costs the connecting process microseconds. A reader that drains it every
//! [`FLUSH_INTERVAL`] is never blocked on it, so no record has a reader to wake.

use std::time::Duration;

use aya::maps::{MapData, PerCpuArray};
use aya_log::EbpfLogger;
use bypass_common::{
    LOG_STATS_MAP, LogStat, PROTO_TCP,
    hit::{AddrForm, HitRecord, Hook},
};
use tokio::{sync::oneshot, task::JoinHandle, time};

use crate::{loader::Redirector, rule::RuleSet, rulemap::ipv6_from_words};

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
        let check_rule_id = redirector.check_rule_id();
        let ebpf = redirector.ebpf_mut();
        let stats = ebpf
            .take_map(LOG_STATS_MAP)
            .and_then(|map| PerCpuArray::<MapData, u64>::try_from(map).ok());
        let logger = match EbpfLogger::init_with_logger(ebpf, HitLines { check_rule_id }) {
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
    mut logger: EbpfLogger<HitLines>,
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

/// Passes the records of the programs on to the global logger, hit records turned into their
/// line (see [`bypass_common::hit`]). The hit of the check after attaching, whose connection
/// bypass made itself, goes to the debug level.
struct HitLines {
    check_rule_id: u32,
}

impl log::Log for HitLines {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        log::logger().enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let text = record.args().to_string();
        let hit = HitRecord::parse(&text);
        let level = match hit {
            Some(hit) if hit.rule_id == self.check_rule_id => log::Level::Debug,
            _ => record.level(),
        };
        if !log::logger().enabled(
            &log::Metadata::builder()
                .level(level)
                .target(record.target())
                .build(),
        ) {
            return;
        }
        let line = hit.map_or(text, |hit| format_hit(&hit));
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{line}"))
                .level(level)
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

/// Formats a hit as `redirect HOOK PROTOCOL FROM -> TO rule ID pid PID comm COMM`.
pub fn format_hit(hit: &HitRecord) -> String {
    let hook = Hook::from_u8(hit.hook).map_or("?", Hook::name);
    let protocol = if hit.protocol == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    };
    let form = hit.addr_form().unwrap_or(AddrForm::Ipv6);
    let from = format_addr(form, hit.from_addr, hit.from_port);
    let to = format_addr(form, hit.to_addr, hit.to_port);
    let comm: String = hit
        .comm
        .iter()
        .take_while(|&&byte| byte != 0)
        .map(|&byte| {
            if byte.is_ascii_graphic() || byte == b' ' {
                char::from(byte)
            } else {
                '?'
            }
        })
        .collect();
    format!(
        "redirect {hook} {protocol} {from} -> {to} rule {} pid {} comm {comm}",
        hit.rule_id, hit.pid
    )
}

fn format_addr(form: AddrForm, words: [u32; 4], port: u16) -> String {
    let port = u16::from_be(port);
    let ip = ipv6_from_words(words);
    match (form, ip.to_ipv4_mapped()) {
        (AddrForm::Ipv4, Some(ip4)) => format!("{ip4}:{port}"),
        (AddrForm::Ipv4Mapped, Some(ip4)) => format!("::ffff:{ip4}:{port}"),
        _ => format!("[{ip}]:{port}"),
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

    fn hit(form: AddrForm, from: [u32; 4], to: [u32; 4]) -> HitRecord {
        HitRecord {
            from_addr: from,
            to_addr: to,
            from_port: 80u16.to_be(),
            to_port: 3000u16.to_be(),
            rule_id: 2,
            pid: 4242,
            hook: Hook::Connect4 as u8,
            protocol: PROTO_TCP,
            form: form as u8,
            _pad: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    fn mapped(ip: [u8; 4]) -> [u32; 4] {
        bypass_common::ipv4_to_mapped(u32::from_ne_bytes(ip))
    }

    #[test]
    fn hit_lines_show_each_address_form() {
        let v4 = hit(
            AddrForm::Ipv4,
            mapped([10, 0, 0, 22]),
            mapped([10, 0, 0, 23]),
        );
        assert_eq!(
            format_hit(&v4),
            "redirect connect4 tcp 10.0.0.22:80 -> 10.0.0.23:3000 rule 2 pid 4242 comm curl"
        );
        let on_v6_socket = HitRecord {
            hook: Hook::Sendmsg6 as u8,
            protocol: bypass_common::PROTO_UDP,
            form: AddrForm::Ipv4Mapped as u8,
            ..v4
        };
        assert_eq!(
            format_hit(&on_v6_socket),
            "redirect sendmsg6 udp ::ffff:10.0.0.22:80 -> ::ffff:10.0.0.23:3000 rule 2 pid 4242 \
             comm curl"
        );
        let fd00 = |last: u8| {
            let mut octets = [0u8; 16];
            octets[0] = 0xfd;
            octets[15] = last;
            crate::rulemap::ipv6_words(octets)
        };
        let v6 = hit(AddrForm::Ipv6, fd00(0x22), fd00(1));
        assert_eq!(
            format_hit(&v6),
            "redirect connect4 tcp [fd00::22]:80 -> [fd00::1]:3000 rule 2 pid 4242 comm curl"
        );
    }

    #[test]
    fn hit_lines_replace_odd_command_bytes() {
        let mut odd = hit(
            AddrForm::Ipv4,
            mapped([10, 0, 0, 22]),
            mapped([10, 0, 0, 22]),
        );
        odd.comm = *b"a\tb\xffc\0\0\0\0\0\0\0\0\0\0\0";
        assert!(
            format_hit(&odd).ends_with("comm a?b?c"),
            "{}",
            format_hit(&odd)
        );
    }

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
