//! The proof of dashboards/: the Grafana dashboards and the Prometheus alert rules, checked
//! against the real agent and a real Prometheus on loopback.
//!
//! 1. Each dashboard's JSON is linted: unique panel ids (rows' nested panels included), the
//!    `${datasource}` variable on every panel and target (no data source UID written in), a
//!    unit on every panel, `datasource` and `instance` variables.
//! 2. promtool checks the rules, runs their unit tests, and checks the sample configuration.
//! 3. The agent starts on a free loopback port, and a Prometheus (Debian's, run here, never as a
//!    service) scrapes it every second, with the rules loaded. Real timer syscalls (churn, an
//!    armed timer, a bad clock, restore-mode creates) and a real lockdown denial happen on this
//!    host, twice, so counters move between scrapes. Then every panel's and every template
//!    variable's query, and every rule's expression, goes to Prometheus's query API: each must
//!    parse, every rule must evaluate without error, and every panel target must return series.
//!
//! Some panels can only have data where the host can produce it: module loads and their
//! per-phase timings need a kernel with module support (this host's has none: a QEMU guest's
//! agent, passed in as an extra target, does), a taint panel needs a tainted kernel, and so on.
//! Such a panel says so in its description as `Needs: TOKEN` (see [`Need`]); when this run
//! cannot produce that data its empty result is reported as skipped, never hidden.
mod activity;
mod lint;
mod processes;

use std::{
    fmt::Write as _,
    fs,
    net::IpAddr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use self::{
    activity::{CHURN, lockdown_denial, timer_activity},
    lint::{Need, lint, load_dashboards},
    processes::{Prometheus, start_agent, start_prometheus, wait_until},
};
use crate::Scratch;

/// What this run could produce, deciding which `Needs:` panels must have data.
#[derive(Debug, Default)]
struct Have {
    module_loads: bool,
    kernel_taint: bool,
    integrity_phases: bool,
    restore_mode: bool,
}

impl Have {
    fn has(&self, need: Need) -> bool {
        match need {
            Need::ModuleLoads => self.module_loads,
            Need::KernelTaint => self.kernel_taint,
            Need::IntegrityPhases => self.integrity_phases,
            Need::RestoreMode => self.restore_mode,
        }
    }
}

/// Checks dashboards/, with `extra` (loopback `host:port` addresses of other agents, such as a
/// QEMU guest's forwarded port) scraped too. With extra targets, panels that need module loads
/// (and their phase timings) must have data.
pub fn run_with_targets(extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    for target in extra {
        check_loopback(target)?;
    }
    crate::setup::prometheus()?;
    let root = crate::workspace_root();
    let dir = root.join("dashboards");

    let dashboards = load_dashboards(&dir)?;
    let (queries, problems) = lint(&dashboards);
    if !problems.is_empty() {
        bail!("dashboard lint failed:\n  {}", problems.join("\n  "));
    }
    eprintln!(
        "dashboards: {} dashboards, {} queries: lint passed",
        dashboards.len(),
        queries.len()
    );

    let promtool =
        |args: &[&str]| crate::run(Command::new("promtool").args(args).current_dir(&dir));
    promtool(&["check", "rules", "alerts.yml"])?;
    promtool(&[
        "test",
        "rules",
        "alerts_test.yml",
        "alerts_modules_test.yml",
    ])?;
    promtool(&["check", "config", "prometheus.yml"])?;

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the agent loads eBPF programs: run this as root");
    }
    crate::cargo(&["build", "--release", "--package", "observer"])?;
    let scratch = Scratch::new("dashboards")?;
    let (agent_addr, _agent) = start_agent(&root, &scratch)?;
    let targets: Vec<String> = std::iter::once(agent_addr.to_string())
        .chain(extra.iter().cloned())
        .collect();
    let (prometheus, _prometheus_process) = start_prometheus(&dir, &scratch, &targets)?;
    let agent_instance = agent_addr.to_string();

    eprintln!("dashboards: making timer syscalls and a lockdown denial on this host, twice");
    let mut have = Have {
        module_loads: !extra.is_empty(),
        ..Have::default()
    };
    for round in 1..=2 {
        have.restore_mode = timer_activity(round)?;
        lockdown_denial()?;
        wait_until(
            &format!("Prometheus to scrape activity round {round}"),
            Duration::from_secs(30),
            || {
                let denials = prometheus.value(&format!(
                    r#"sum(observer_lockdown_decisions_total{{instance="{agent_instance}", reason="debugfs", verdict="denied"}})"#
                ))?;
                let churn = prometheus.value(&format!(
                    r#"observer_posix_timer_short_lived_total{{instance="{agent_instance}"}}"#
                ))?;
                Ok(denials >= Some(f64::from(round))
                    && churn >= Some((CHURN * i64::from(round)) as f64))
            },
        )?;
    }
    // A few more scrapes and rule evaluations after the last activity.
    thread::sleep(Duration::from_secs(3));
    have.kernel_taint = prometheus.count("max(observer_kernel_tainted) == 1")? > 0;
    have.integrity_phases = have.module_loads
        || prometheus.count("count(observer_module_integrity_phase_duration_seconds_count)")? > 0;

    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for query in &queries {
        let (series, verdict) = match prometheus.query(&query.expr)? {
            Err(error) => {
                failures.push(format!(
                    "{} / {} / {}: {error}\n      {}",
                    query.dashboard, query.panel, query.target, query.expr
                ));
                ("-".to_owned(), "ERROR".to_owned())
            }
            Ok(0) => match query.need {
                Some(need) if !have.has(need) => {
                    ("0".to_owned(), format!("skipped (needs {})", need.token()))
                }
                _ => {
                    failures.push(format!(
                        "{} / {} / {}: no data{}\n      {}",
                        query.dashboard,
                        query.panel,
                        query.target,
                        query
                            .need
                            .map(|n| format!(" (needs {}, which this run has)", n.token()))
                            .unwrap_or_default(),
                        query.expr
                    ));
                    ("0".to_owned(), "NO DATA".to_owned())
                }
            },
            Ok(n) => (n.to_string(), "ok".to_owned()),
        };
        rows.push([
            query.dashboard.clone(),
            query.panel.clone(),
            query.target.clone(),
            series,
            verdict,
        ]);
    }
    print_table(&["dashboard", "panel", "query", "series", "result"], &rows);

    let rules = check_rules(&prometheus, &dir, &mut failures)?;
    print_table(&["alert", "health", "state", "series now"], &rules);

    let skipped = rows.iter().filter(|r| r[4].starts_with("skipped")).count();
    println!(
        "dashboards: {} queries ({} skipped for data this run cannot make), {} alert rules, {} failures, {:.0?}",
        rows.len(),
        skipped,
        rules.len(),
        failures.len(),
        started.elapsed()
    );
    if !failures.is_empty() {
        bail!("dashboards check failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

/// Extra targets are other agents forwarded to this machine: nothing else is scraped.
fn check_loopback(target: &str) -> anyhow::Result<()> {
    let host = target
        .rsplit_once(':')
        .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
        .with_context(|| format!("extra target {target:?} is not host:port"))?;
    if host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        Ok(())
    } else {
        bail!("extra target {target:?} is not a loopback address")
    }
}

/// Loads every alerting rule into Prometheus's view, then checks each evaluated cleanly and
/// that its expression parses; returns the table rows.
fn check_rules(
    prometheus: &Prometheus,
    dir: &Path,
    failures: &mut Vec<String>,
) -> anyhow::Result<Vec<[String; 4]>> {
    let text = fs::read_to_string(dir.join("alerts.yml"))?;
    let written = text
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    let mut rules = Vec::new();
    wait_until(
        "Prometheus to evaluate every rule",
        Duration::from_secs(30),
        || {
            let data = prometheus.api("/api/v1/rules?type=alert")?;
            rules = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            Ok(rules.len() == written && rules.iter().all(|r| r["health"] != "unknown"))
        },
    )
    .with_context(|| format!("alerts.yml has {written} alerts"))?;
    let mut rows = Vec::new();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?").to_owned();
        let health = rule["health"].as_str().unwrap_or("?").to_owned();
        if health != "ok" {
            failures.push(format!(
                "alert {name}: health {health}: {}",
                rule["lastError"].as_str().unwrap_or_default()
            ));
        }
        let expr = rule["query"].as_str().unwrap_or_default();
        let series = match prometheus.query(expr)? {
            Ok(n) => n.to_string(),
            Err(e) => {
                failures.push(format!("alert {name}: {e}"));
                "-".into()
            }
        };
        let state = rule["state"].as_str().unwrap_or("?").to_owned();
        rows.push([name, health, state, series]);
    }
    Ok(rows)
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (cell, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "{cell:<w$}  ");
        }
        out.trim_end().to_owned()
    };
    println!("{}", line(header));
    println!(
        "{}",
        line(&widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str))
    );
    for row in rows {
        println!("{}", line(&row.each_ref().map(String::as_str)));
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_targets_only() {
        assert!(check_loopback("127.0.0.1:9745").is_ok());
        assert!(check_loopback("[::1]:9745").is_ok());
        assert!(check_loopback("localhost:1").is_ok());
        assert!(check_loopback("10.0.0.1:9745").is_err());
        assert!(check_loopback("9745").is_err());
    }
}
