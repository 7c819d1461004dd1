//! `observer profile`: integrity-check cost per module and in total, from live loads.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::modules::LoadRecord;

/// Order statistics of a set of durations, in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub sum_ns: u64,
}

impl Stats {
    pub fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        // Nearest-rank percentiles: the smallest value with at least p% of the values at or below.
        let rank = |p: usize| values[(values.len() * p).div_ceil(100).max(1) - 1];
        if values.is_empty() {
            return Self::default();
        }
        Self {
            count: values.len(),
            p50_ns: rank(50),
            p90_ns: rank(90),
            p99_ns: rank(99),
            max_ns: *values.last().unwrap_or(&0),
            sum_ns: values.iter().sum(),
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ns as f64 / self.count as f64)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub loads: usize,
    pub load: Stats,
    /// Integrity-check time by method (signature, hash).
    pub integrity: BTreeMap<&'static str, Stats>,
    /// Integrity-check time as a share of whole-load time (0..1), over loads that had a check.
    pub integrity_share_of_load: Option<f64>,
    /// Mean hash-check time over mean signature-check time, when both were seen.
    pub hash_to_signature_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub duration_seconds: f64,
    pub modules: Vec<ModuleReport>,
    pub total: ModuleReport,
}

fn summarize(module: &str, loads: &[&LoadRecord]) -> ModuleReport {
    let mut integrity: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let (mut checked_load_ns, mut check_ns) = (0u64, 0u64);
    for load in loads {
        if let Some(ns) = load.integrity_check_ns {
            integrity.entry(load.method).or_default().push(ns);
            checked_load_ns += load.total_ns;
            check_ns += ns;
        }
    }
    let integrity: BTreeMap<&'static str, Stats> = integrity
        .into_iter()
        .map(|(m, v)| (m, Stats::of(v)))
        .collect();
    let ratio = match (
        integrity.get("hash").and_then(Stats::mean),
        integrity.get("signature").and_then(Stats::mean),
    ) {
        (Some(hash), Some(signature)) if signature > 0.0 => Some(hash / signature),
        _ => None,
    };
    ModuleReport {
        module: module.to_owned(),
        loads: loads.len(),
        load: Stats::of(loads.iter().map(|l| l.total_ns).collect()),
        integrity,
        integrity_share_of_load: (checked_load_ns > 0)
            .then(|| check_ns as f64 / checked_load_ns as f64),
        hash_to_signature_ratio: ratio,
    }
}

pub fn report(samples: &[LoadRecord], duration_seconds: f64) -> Report {
    let mut by_module: BTreeMap<&str, Vec<&LoadRecord>> = BTreeMap::new();
    for sample in samples {
        by_module.entry(&sample.module).or_default().push(sample);
    }
    let modules = by_module
        .iter()
        .map(|(m, loads)| summarize(m, loads))
        .collect();
    let all: Vec<&LoadRecord> = samples.iter().collect();
    Report {
        duration_seconds,
        modules,
        total: summarize("(total)", &all),
    }
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

/// The report as a table: one line per module and method, then the totals.
pub fn text(report: &Report) -> String {
    let mut out = format!(
        "module loads watched for {:.1}s: {} loads\n{:<24} {:>5} {:<9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
        report.duration_seconds,
        report.total.loads,
        "MODULE",
        "LOADS",
        "METHOD",
        "CHECKS",
        "P50_US",
        "P90_US",
        "P99_US",
        "MAX_US",
        "SHARE",
    );
    for m in report.modules.iter().chain(std::iter::once(&report.total)) {
        if m.integrity.is_empty() {
            out.push_str(&format!("{:<24} {:>5} {:<9}\n", m.module, m.loads, "none"));
        }
        for (method, s) in &m.integrity {
            let share = m
                .integrity_share_of_load
                .map_or_else(|| "-".into(), |s| format!("{:.1}%", s * 100.0));
            out.push_str(&format!(
                "{:<24} {:>5} {:<9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
                m.module,
                m.loads,
                method,
                s.count,
                us(s.p50_ns),
                us(s.p90_ns),
                us(s.p99_ns),
                us(s.max_ns),
                share
            ));
        }
    }
    match report.total.hash_to_signature_ratio {
        Some(ratio) => out.push_str(&format!("hash/signature check time: {ratio:.3}\n")),
        None => out.push_str("hash/signature check time: needs loads checked by both methods\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(module: &str, method: &'static str, total_ns: u64, check: Option<u64>) -> LoadRecord {
        LoadRecord {
            event: "module_load",
            pid: 1,
            comm: "t".into(),
            module: module.into(),
            outcome: "loaded",
            method,
            result: "ok".into(),
            total_ns,
            sig_check_ns: check,
            integrity_check_ns: check,
            taints: String::new(),
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of((1..=100).collect());
        assert_eq!(
            (s.count, s.p50_ns, s.p90_ns, s.p99_ns, s.max_ns, s.sum_ns),
            (100, 50, 90, 99, 100, 5050)
        );
        assert_eq!(Stats::of(vec![7]).p99_ns, 7);
        assert_eq!(Stats::of(vec![]), Stats::default());
    }

    #[test]
    fn shares_and_ratio() {
        let samples = vec![
            record("a", "signature", 1000, Some(400)),
            record("a", "signature", 1000, Some(600)),
            record("b", "hash", 1000, Some(100)),
            record("c", "none", 1000, None),
        ];
        let r = report(&samples, 1.0);
        let a = &r.modules[0];
        assert_eq!(a.integrity["signature"].count, 2);
        assert_eq!(a.integrity_share_of_load, Some(0.5));
        assert_eq!(r.total.hash_to_signature_ratio, Some(0.2));
        assert_eq!(r.total.loads, 4);
        assert!(text(&r).contains("hash/signature check time: 0.200"));
    }
}
