//! Medians, ranges and percentiles of benchmark samples.

/// The median of a figure over the rounds, with the smallest and largest round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// Summarizes the samples; `None` when there are none. NaN samples are ignored.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let (first, last) = (*sorted.first()?, *sorted.last()?);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Self {
            median,
            min: first,
            max: last,
        })
    }

    /// Returns this median divided by `base`'s, or `None` when `base` is zero.
    pub fn ratio_to(&self, base: &Summary) -> Option<f64> {
        (base.median != 0.0).then(|| self.median / base.median)
    }
}

/// Returns the `p`-th percentile (0 to 100) of sorted values by the nearest-rank method, or
/// 0 for no values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_count() {
        let summary = Summary::of(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!(
            summary,
            Summary {
                median: 3.0,
                min: 1.0,
                max: 5.0
            }
        );
    }

    #[test]
    fn median_of_even_count_averages() {
        let summary = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(summary.median, 2.5);
        assert_eq!(summary.min, 1.0);
        assert_eq!(summary.max, 4.0);
    }

    #[test]
    fn empty_and_nan_samples() {
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(Summary::of(&[f64::NAN, 2.0]).unwrap().median, 2.0);
    }

    #[test]
    fn ratio_against_base() {
        let base = Summary::of(&[200.0]).unwrap();
        let other = Summary::of(&[150.0]).unwrap();
        assert_eq!(other.ratio_to(&base), Some(0.75));
        assert_eq!(base.ratio_to(&Summary::of(&[0.0]).unwrap()), None);
    }

    #[test]
    fn percentile_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50);
        assert_eq!(percentile(&values, 99.0), 99);
        assert_eq!(percentile(&values, 100.0), 100);
        assert_eq!(percentile(&values, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
