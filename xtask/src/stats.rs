//! Order statistics for the benchmarks: these machines are noisy, so results are medians and
//! quartiles of interleaved rounds, never means of a few.

/// The median (upper median for an even count); NaN for no values.
pub fn median(values: &[f64]) -> f64 {
    let sorted = sorted(values);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The 25th and 75th percentiles (nearest rank); NaN for no values.
pub fn quartiles(values: &[f64]) -> (f64, f64) {
    let sorted = sorted(values);
    let at = |i: usize| sorted.get(i).copied().unwrap_or(f64::NAN);
    (at(sorted.len() / 4), at(sorted.len() * 3 / 4))
}

/// The value at `percent` (nearest rank below); NaN for no values.
pub fn percentile(values: &[f64], percent: usize) -> f64 {
    let sorted = sorted(values);
    sorted
        .get(sorted.len() * percent / 100)
        .copied()
        .unwrap_or(f64::NAN)
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_statistics() {
        let values = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&values), 3.0);
        assert_eq!(quartiles(&values), (2.0, 4.0));
        assert_eq!(percentile(&values, 99), 5.0);
        assert!(median(&[]).is_nan());
    }
}
