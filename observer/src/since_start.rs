//! `observer profile --since-start`: what the running agent has measured since it started, read
//! from its own /metrics: how many modules it saw verified and by which method, the time their
//! integrity checks took and its share of the modules' load time, and how many were loaded
//! before it started. Started early in boot (see the shipped unit), that is the boot's module
//! integrity cost.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;
use testkit::prom::{self, Sample};

use crate::cli::ProfileFormat;

/// The integrity methods in the order they are reported.
const METHODS: [&str; 4] = ["signature", "hash", "ima_hash", "ima_signature"];

#[derive(Debug, Default, PartialEq, Serialize)]
pub struct Check {
    pub count: u64,
    pub total_seconds: f64,
}

#[derive(Debug, Default, PartialEq, Serialize)]
pub struct SinceStart {
    /// Load attempts counted, and those that loaded.
    pub attempts: u64,
    pub loaded: u64,
    /// Loads by reason (`verified`, `unsigned`, ...).
    pub reasons: BTreeMap<String, u64>,
    /// Integrity checks by method.
    pub checks: BTreeMap<String, Check>,
    /// `load_module` time, summed over the loads that reached it.
    pub load_seconds: f64,
    /// The signature and hash checks' time over `load_module`'s (IMA's runs before it, and
    /// is not part of it).
    pub check_share_of_load: Option<f64>,
    /// Modules loaded before the agent started, by taint letters.
    pub present_at_start: BTreeMap<String, u64>,
}

/// A label's value, empty where the sample has none.
fn label<'a>(sample: &'a Sample, name: &str) -> &'a str {
    sample.label(name).unwrap_or("")
}

pub fn summarize(text: &str) -> SinceStart {
    let mut out = SinceStart::default();
    for sample in prom::parse(text) {
        let value = sample.value;
        match sample.name.as_str() {
            "observer_module_loads_total" => {
                out.attempts += value as u64;
                if label(&sample, "outcome") == "loaded" {
                    out.loaded += value as u64;
                }
                if value > 0.0 {
                    *out.reasons
                        .entry(label(&sample, "reason").to_owned())
                        .or_default() += value as u64;
                }
            }
            "observer_module_integrity_check_duration_seconds_count" => {
                let method = label(&sample, "method").to_owned();
                out.checks.entry(method).or_default().count += value as u64;
            }
            "observer_module_integrity_check_duration_seconds_sum" => {
                let method = label(&sample, "method").to_owned();
                out.checks.entry(method).or_default().total_seconds += value;
            }
            "observer_module_load_duration_seconds_sum" => out.load_seconds += value,
            "observer_modules_present_at_start" => {
                let taint = label(&sample, "taint").to_owned();
                *out.present_at_start.entry(taint).or_default() += value as u64;
            }
            _ => {}
        }
    }
    let in_load: f64 = ["signature", "hash"]
        .iter()
        .filter_map(|m| out.checks.get(*m))
        .map(|c| c.total_seconds)
        .sum();
    out.check_share_of_load = (out.load_seconds > 0.0).then(|| in_load / out.load_seconds);
    out
}

pub fn text(summary: &SinceStart, from: SocketAddr) -> String {
    let ms = |s: f64| format!("{:.1} ms", s * 1000.0);
    let reasons: Vec<String> = summary
        .reasons
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let mut out = format!(
        "since the agent at {from} started: {} module load attempts, {} loaded ({})\n",
        summary.attempts,
        summary.loaded,
        if reasons.is_empty() {
            "none".to_owned()
        } else {
            reasons.join(", ")
        }
    );
    for method in METHODS {
        match summary.checks.get(method).filter(|c| c.count > 0) {
            Some(c) => out.push_str(&format!(
                "integrity checks by {method}: {}, {} in total, {} each on average\n",
                c.count,
                ms(c.total_seconds),
                ms(c.total_seconds / c.count as f64)
            )),
            None => out.push_str(&format!("integrity checks by {method}: none\n")),
        }
    }
    match summary.check_share_of_load {
        Some(share) => out.push_str(&format!(
            "signature and hash checks: {:.1}% of the modules' load time ({})\n",
            share * 100.0,
            ms(summary.load_seconds)
        )),
        None => out.push_str("signature and hash checks: no load timed yet\n"),
    }
    let before: u64 = summary.present_at_start.values().sum();
    let by_taint: Vec<String> = summary
        .present_at_start
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    out.push_str(&format!(
        "loaded before the agent started: {before} modules (taint: {})\n",
        if by_taint.is_empty() {
            "-".to_owned()
        } else {
            by_taint.join(", ")
        }
    ));
    out
}

/// Reads the agent's /metrics at `from` (plain HTTP: an agent serving TLS is read with a client
/// that has its certificates, such as curl) and prints the summary.
pub fn run(from: SocketAddr, path: &str, format: ProfileFormat) -> anyhow::Result<()> {
    let (status, body) = testkit::http::get(from, path, Duration::from_secs(10))
        .with_context(|| format!("reading the agent's metrics at http://{from}{path}"))?;
    if status != 200 {
        bail!(
            "http://{from}{path} answered {status} (an agent with TLS or basic auth is not read)"
        );
    }
    let summary = summarize(&body);
    match format {
        ProfileFormat::Text => print!("{}", text(&summary, from)),
        ProfileFormat::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
observer_module_loads_total{outcome=\"loaded\",method=\"signature\",reason=\"verified\"} 3
observer_module_loads_total{outcome=\"loaded\",method=\"none\",reason=\"unsigned\"} 1
observer_module_loads_total{outcome=\"rejected_signature\",method=\"none\",reason=\"enforced\"} 0
observer_module_integrity_check_duration_seconds_count{method=\"signature\",result=\"ok\"} 3
observer_module_integrity_check_duration_seconds_sum{method=\"signature\",result=\"ok\"} 0.06
observer_module_load_duration_seconds_count{outcome=\"loaded\"} 4
observer_module_load_duration_seconds_sum{outcome=\"loaded\"} 0.08
observer_modules_present_at_start{taint=\"none\"} 5
observer_modules_present_at_start{taint=\"E\"} 1
";

    #[test]
    fn the_summary_adds_up_the_agents_metrics() {
        let s = summarize(METRICS);
        assert_eq!((s.attempts, s.loaded), (4, 4));
        assert_eq!(s.reasons["verified"], 3);
        assert!(!s.reasons.contains_key("enforced"), "zeros left out");
        assert_eq!(s.checks["signature"].count, 3);
        assert!((s.check_share_of_load.unwrap() - 0.75).abs() < 1e-9);
        assert_eq!(s.present_at_start["E"], 1);
        let text = text(&s, "127.0.0.1:9745".parse().unwrap());
        assert!(text.contains("4 module load attempts, 4 loaded (unsigned 1, verified 3)"));
        assert!(text.contains("integrity checks by signature: 3, 60.0 ms in total, 20.0 ms each"));
        assert!(text.contains("integrity checks by hash: none"));
        assert!(text.contains("75.0% of the modules' load time (80.0 ms)"));
        assert!(text.contains("loaded before the agent started: 6 modules (taint: E 1, none 5)"));
    }
}
