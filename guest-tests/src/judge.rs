//! Judges a scenario inside its guest: the console's lines, `observer probes`' table, the
//! agent's /metrics, then the scenario's own judge. `guest-tool judge` prints one
//! `CHECK-FAILED ...` line per failure and `JUDGED ...` last, which the host reads.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::bail;
use testkit::prom;

use crate::{
    Series,
    scenarios::{Check, Scenario, expand},
};

/// Where the agent listens in the guest (init.sh starts it there).
pub const AGENT: &str = "127.0.0.1:9745";
/// How long the judge keeps scraping for the counts to settle: events reach the agent through a
/// ring buffer, so the last ones may land just after the scenario's steps.
const SETTLE: Duration = Duration::from_secs(5);

/// Every check of `scenario` on `series` against `console` and the agent at [`AGENT`]: what
/// failed, and the last scrape.
pub fn judge(scenario: &Scenario, series: Series, console: &str) -> (Vec<String>, String) {
    let addr: SocketAddr = AGENT.parse().expect("a socket address");
    let modules = series.scenario_modules();
    let checks: Vec<&Check> = scenario.checks_on(series).collect();
    let mut failures: Vec<String> = checks
        .iter()
        .filter_map(|c| check_console(c, console, modules))
        .collect();
    let metric_checks: Vec<&Check> = checks
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Check::Metric(..) | Check::MetricSum(..) | Check::SumAtMost(..)
            )
        })
        .collect();
    let until = Instant::now() + SETTLE;
    let (text, failed) = settle_metrics(addr, &metric_checks, modules, until);
    failures.extend(failed);
    if let Some(own) = scenario.judge
        && let Err(e) = own(addr, console)
    {
        failures.push(format!("{e:#}"));
    }
    (failures, text)
}

/// The kernel's scenario module names, for the checks' `{M1}`... (see `scenarios::expand`).
pub type Modules = [&'static str; 3];

/// A console or probes check's failure, if it is one and fails.
pub fn check_console(check: &Check, console: &str, modules: Modules) -> Option<String> {
    match check {
        Check::Console(text) => {
            let text = expand(text, modules);
            (!console.lines().any(|l| l.contains(text.as_ref())))
                .then(|| format!("no console line contains {text:?}"))
        }
        Check::Probes(words) => {
            let section = console
                .split("PROBES-BEGIN")
                .nth(1)
                .and_then(|s| s.split("PROBES-END").next())
                .unwrap_or_default();
            let found = section.lines().any(|line| {
                let line = line.to_lowercase();
                words.iter().all(|w| line.contains(&w.to_lowercase()))
            });
            (!found).then(|| format!("no line of `observer probes` contains all of {words:?}"))
        }
        Check::Metric(..) | Check::MetricSum(..) | Check::SumAtMost(..) => None,
    }
}

/// `labels` with the kernel's module names filled in.
fn expand_labels(
    labels: &[(&'static str, &'static str)],
    modules: Modules,
) -> Vec<(&'static str, String)> {
    labels
        .iter()
        .map(|(k, v)| (*k, expand(v, modules).into_owned()))
        .collect()
}

fn check_metric(check: &Check, text: &str, modules: Modules) -> Option<String> {
    let (what, value, want) = match check {
        Check::Metric(name, labels, want) => {
            let owned = expand_labels(labels, modules);
            let labels: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (
                format!("{name}{}", show_labels(&labels)),
                prom::value(text, name, &labels),
                want,
            )
        }
        Check::MetricSum(name, labels, want) => {
            let owned = expand_labels(labels, modules);
            let labels: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
            (
                format!("sum of {name}{}", show_labels(&labels)),
                prom::sum_with_labels(text, name, &labels),
                want,
            )
        }
        Check::SumAtMost(parts, (whole_name, whole_labels)) => {
            let part_values: Vec<Option<f64>> =
                parts.iter().map(|(n, l)| prom::value(text, n, l)).collect();
            let whole = prom::value(text, whole_name, whole_labels);
            let sum: Option<f64> = part_values.iter().copied().sum();
            return match (sum, whole) {
                (Some(sum), Some(whole)) if sum <= whole => None,
                _ => Some(format!(
                    "parts {parts:?} = {part_values:?} (sum {sum:?}) must be at most \
                     {whole_name}{} = {whole:?}",
                    show_labels(whole_labels)
                )),
            };
        }
        Check::Console(_) | Check::Probes(_) => return None,
    };
    (!want.holds(value)).then(|| {
        let got = value.map_or("no sample".to_owned(), |v| v.to_string());
        format!("{what}: want {want:?}, got {got}")
    })
}

fn show_labels(labels: &[(&str, &str)]) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{{{}}}", inner.join(","))
}

/// Scrapes until every check holds or `until` passes; the last scrape and what still failed.
pub fn settle_metrics(
    addr: SocketAddr,
    checks: &[&Check],
    modules: Modules,
    until: Instant,
) -> (String, Vec<String>) {
    loop {
        let (text, failed) = match scrape(addr) {
            Ok(text) => {
                let failed: Vec<String> = checks
                    .iter()
                    .filter_map(|c| check_metric(c, &text, modules))
                    .collect();
                (text, failed)
            }
            Err(e) => (String::new(), vec![format!("scraping /metrics: {e:#}")]),
        };
        if failed.is_empty() || Instant::now() >= until {
            return (text, failed);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = testkit::http::get(addr, "/metrics", Duration::from_secs(10))?;
    if status != 200 {
        bail!("HTTP {status}");
    }
    Ok(body)
}
