//! Building Prometheus metric families from values read at scrape time (kernel maps, /proc,
//! securityfs, family state), and rendering them as text.

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType},
};

use observer_common::{ERRNO_SLOTS, LOG2_BUCKETS, LOG2_SUM_SLOT, syscall_of_slot};

/// Every metric's prefix.
pub const PREFIX: &str = "observer_";

/// One metric family under construction.
pub struct Family {
    inner: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, kind: MetricType) -> Self {
        let mut inner = MetricFamily::default();
        inner.set_name(format!("{PREFIX}{name}"));
        inner.set_help(help.to_owned());
        inner.set_field_type(kind);
        Self { inner }
    }

    pub fn counter(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::COUNTER)
    }

    pub fn gauge(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::GAUGE)
    }

    /// A family under its own full name, outside the `observer_` prefix: the `process_*`
    /// metrics every Prometheus client library exports under these names.
    pub fn standard(name: &str, help: &str, counter: bool) -> Self {
        let mut family = Self::new(
            name,
            help,
            if counter {
                MetricType::COUNTER
            } else {
                MetricType::GAUGE
            },
        );
        family.inner.set_name(name.to_owned());
        family
    }

    pub fn histogram(name: &str, help: &str) -> Self {
        Self::new(name, help, MetricType::HISTOGRAM)
    }

    /// Adds a sample to a counter or gauge family.
    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let mut metric = Metric::default();
        metric.set_label(label_pairs(labels));
        if self.inner.get_field_type() == MetricType::COUNTER {
            let mut counter = Counter::default();
            counter.set_value(value);
            metric.set_counter(counter);
        } else {
            let mut gauge = Gauge::default();
            gauge.set_value(value);
            metric.set_gauge(gauge);
        }
        self.inner.mut_metric().push(metric);
        self
    }

    /// The family with one unlabelled sample: for the many metrics that are a single number.
    pub fn single(mut self, value: f64) -> Self {
        self.add(&[], value);
        self
    }

    /// Adds a histogram sample set from a kernel log2 histogram (see [`Log2Histogram`]).
    pub fn add_histogram(
        &mut self,
        labels: &[(&str, &str)],
        histogram: &Log2Histogram,
    ) -> &mut Self {
        let mut metric = Metric::default();
        metric.set_label(label_pairs(labels));
        metric.set_histogram(histogram.to_proto());
        self.inner.mut_metric().push(metric);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.inner.get_metric().is_empty()
    }

    pub fn build(self) -> MetricFamily {
        self.inner
    }
}

fn label_pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(name, value)| {
            let mut pair = LabelPair::default();
            pair.set_name((*name).to_owned());
            pair.set_value((*value).to_owned());
            pair
        })
        .collect()
}

/// Exported bucket bounds are powers of two nanoseconds from 2^10 (about 1 µs) to 2^33 (about
/// 8.6 s): fine enough for syscalls and signature checks, few enough to keep series down.
pub const FIRST_EXPORTED_LOG2: u32 = 10;
pub const LAST_EXPORTED_LOG2: u32 = 33;

/// A latency histogram as the kernel keeps it: `buckets[i]` counts durations in
/// `[2^i, 2^(i+1))` nanoseconds, plus the sum of all durations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Log2Histogram {
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
}

impl Log2Histogram {
    /// From a histogram array's slots as summed over CPUs (buckets, then the sum slot).
    pub fn from_slots(slots: &[u64]) -> Self {
        let buckets = slots.iter().take(LOG2_BUCKETS as usize).copied().collect();
        let sum_ns = slots.get(LOG2_SUM_SLOT as usize).copied().unwrap_or(0);
        Self { buckets, sum_ns }
    }

    /// Records one duration (for histograms kept in userspace).
    pub fn observe(&mut self, ns: u64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; LOG2_BUCKETS as usize];
        }
        self.buckets[observer_common::log2_bucket(ns) as usize] += 1;
        self.sum_ns += ns;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Cumulative count of durations below `2^exp` ns.
    fn below(&self, exp: u32) -> u64 {
        self.buckets.iter().take(exp as usize).sum()
    }

    fn to_proto(&self) -> Histogram {
        let buckets = (FIRST_EXPORTED_LOG2..=LAST_EXPORTED_LOG2)
            .map(|exp| {
                let mut bucket = Bucket::default();
                bucket.set_upper_bound((1u64 << exp) as f64 / 1e9);
                bucket.set_cumulative_count(self.below(exp));
                bucket
            })
            .collect();
        let mut histogram = Histogram::default();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(self.count());
        histogram.set_sample_sum(self.sum_ns as f64 / 1e9);
        histogram
    }
}

/// The `result` label of an errno slot (see [`observer_common::errno_slot`]): `ok`, the errno's
/// name in lowercase, or `other` for the last, shared slot.
pub fn result_label(slot: u32) -> String {
    match slot {
        0 => "ok".into(),
        s if s == ERRNO_SLOTS - 1 => "other".into(),
        s => {
            let name = format!("{:?}", nix::errno::Errno::from_raw(s as i32));
            if name == "UnknownErrno" {
                format!("errno{s}")
            } else {
                name.to_lowercase()
            }
        }
    }
}

/// Adds a syscall counter array's nonzero slots ([`observer_common::syscall_slot`]) to
/// `family`, labelled `syscall` (by `names`, the syscalls' order) and `result`.
pub fn add_syscall_results(family: &mut Family, counts: &[u64], names: &[&str]) {
    for (slot, count) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
        let (syscall, result) = syscall_of_slot(slot as u32);
        family.add(
            &[
                ("syscall", names[syscall as usize]),
                ("result", &result_label(result)),
            ],
            *count as f64,
        );
    }
}

/// Renders families as Prometheus text (version 0.0.4), dropping empty ones.
pub fn render(families: Vec<Family>) -> Result<Vec<u8>, prometheus::Error> {
    let families: Vec<MetricFamily> = families
        .into_iter()
        .filter(|f| !f.is_empty())
        .map(Family::build)
        .collect();
    let mut out = Vec::with_capacity(16 * 1024);
    TextEncoder::new().encode(&families, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_histogram_renders_cumulative_buckets() {
        let mut h = Log2Histogram::default();
        h.observe(1500); // 2^10 <= 1500 < 2^11
        h.observe(100); // below the first exported bound
        h.observe(3_000_000_000); // ~3 s
        let mut family = Family::histogram("test_seconds", "test");
        family.add_histogram(&[("a", "b")], &h);
        let text = String::from_utf8(render(vec![family]).unwrap()).unwrap();
        assert!(
            text.contains("observer_test_seconds_bucket{a=\"b\",le=\"0.000001024\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("observer_test_seconds_bucket{a=\"b\",le=\"0.000002048\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("observer_test_seconds_bucket{a=\"b\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("observer_test_seconds_count{a=\"b\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("observer_test_seconds_sum{a=\"b\"} 3.0000016\n"),
            "{text}"
        );
    }

    #[test]
    fn result_labels() {
        assert_eq!(result_label(0), "ok");
        assert_eq!(result_label(22), "einval");
        assert_eq!(result_label(16), "ebusy");
        assert_eq!(result_label(ERRNO_SLOTS - 1), "other");
    }

    #[test]
    fn syscall_results_are_labelled_by_syscall_and_errno() {
        let mut counts = vec![0; 2 * ERRNO_SLOTS as usize];
        counts[observer_common::syscall_slot(0, 0) as usize] = 3;
        counts[observer_common::syscall_slot(1, -1) as usize] = 2;
        let mut family = Family::counter("calls_total", "c");
        add_syscall_results(&mut family, &counts, &["a", "b"]);
        let text = String::from_utf8(render(vec![family]).unwrap()).unwrap();
        assert!(
            text.contains("observer_calls_total{syscall=\"a\",result=\"ok\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("observer_calls_total{syscall=\"b\",result=\"eperm\"} 2\n"),
            "{text}"
        );
        assert_eq!(text.matches("observer_calls_total{").count(), 2, "{text}");
    }

    #[test]
    fn empty_families_are_dropped() {
        let text = render(vec![Family::counter("nothing_total", "n")]).unwrap();
        assert!(text.is_empty());
    }
}
