//! Per-CPU rate limit of hit log lines.
//!
//! Each CPU keeps one [`RateWindow`] in a per-CPU array, so the programs need no lock and no
//! atomic operation: a program runs on one CPU from start to end.

/// Name of the per-CPU array that contains one [`RateWindow`] per CPU.
pub const LOG_WINDOW_MAP: &str = "LOG_WINDOW";

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A one-second counting window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// `bpf_ktime_get_ns()` at the start of the window.
    pub start_ns: u64,
    /// Lines admitted in this window.
    pub admitted: u32,
    /// Always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<RateWindow>() == 16);

#[cfg(feature = "user")]
// SAFETY: `repr(C)` integers only, padding spelled out as a field.
unsafe impl aya::Pod for RateWindow {}

impl RateWindow {
    /// Counts one line at time `now_ns` and returns whether it fits under `per_second`.
    #[inline(always)]
    pub fn admit(&mut self, now_ns: u64, per_second: u32) -> bool {
        if now_ns.wrapping_sub(self.start_ns) >= NANOS_PER_SECOND {
            self.start_ns = now_ns;
            self.admitted = 0;
        }
        if self.admitted < per_second {
            self.admitted += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_rate_per_second() {
        let mut window = RateWindow::default();
        let admitted = (0..10)
            .filter(|i| window.admit(5 * NANOS_PER_SECOND + i, 3))
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn new_second_resets_count() {
        let mut window = RateWindow::default();
        let start = 7 * NANOS_PER_SECOND;
        assert!(window.admit(start, 1));
        assert!(!window.admit(start + 1, 1));
        assert!(window.admit(start + NANOS_PER_SECOND, 1));
    }

    #[test]
    fn zero_rate_admits_nothing() {
        let mut window = RateWindow::default();
        assert!(!window.admit(NANOS_PER_SECOND, 0));
    }
}
