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
use std::{
    collections::HashSet,
    fmt::Write as _,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use testkit::timers::{restore_ids_mode, timer_arm, timer_create, timer_delete};

use crate::Scratch;

/// The data source reference every panel and target must carry.
const DATASOURCE_UID: &str = "${datasource}";
/// What Grafana would put for its built-in variables: a rate window of four 15 s scrapes, and a
/// range long enough to cover everything this run scraped.
const BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval_ms", "15000"),
    ("__interval", "15s"),
    ("__range_s", "600"),
    ("__range_ms", "600000"),
    ("__range", "10m"),
];
/// Every dashboard variable stands for all its values, as its "All" option does.
const ALL_VALUES: &str = ".+";
/// Timer churn per round: creates deleted at once, never armed.
const CHURN: i64 = 25;
/// The thread that makes the timer syscalls: its name is the `comm` the agent reports.
const TIMER_THREAD: &str = "dash-timers";

/// Data a panel needs that not every run can produce, named in its description as
/// `Needs: TOKEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Module loads: only a kernel with module support makes them (the QEMU guest's agent).
    ModuleLoads,
    /// A tainted kernel among the scraped hosts.
    KernelTaint,
    /// `observer_module_integrity_phase_duration_seconds`: compressed or signed module loads.
    IntegrityPhases,
    /// Restore-mode timer creates (PR_TIMER_CREATE_RESTORE_IDS, Linux 6.15+).
    RestoreMode,
}

impl Need {
    const ALL: [Need; 4] = [
        Need::ModuleLoads,
        Need::KernelTaint,
        Need::IntegrityPhases,
        Need::RestoreMode,
    ];

    fn token(self) -> &'static str {
        match self {
            Need::ModuleLoads => "module-loads",
            Need::KernelTaint => "kernel-taint",
            Need::IntegrityPhases => "integrity-phases",
            Need::RestoreMode => "restore-mode",
        }
    }

    /// The need a panel description declares, if any.
    fn declared(description: &str) -> Result<Option<Need>, String> {
        let Some((_, rest)) = description.split_once("Needs: ") else {
            return Ok(None);
        };
        let token: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        Need::ALL
            .into_iter()
            .find(|n| n.token() == token)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "unknown `Needs: {token}` (known: {})",
                    Need::ALL.map(Need::token).join(", ")
                )
            })
    }
}

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

/// One PromQL expression to try: a panel target or a template variable's query.
struct Query {
    dashboard: String,
    panel: String,
    target: String,
    expr: String,
    need: Option<Need>,
}

/// Checks dashboards/, with `extra` (loopback `host:port` addresses of other agents, such as a
/// QEMU guest's forwarded port) scraped too. With extra targets, panels that need module loads
/// (and their phase timings) must have data.
pub fn run_with_targets(extra: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    for target in extra {
        check_loopback(target)?;
    }
    let installing = !Path::new("/usr/bin/prometheus").exists();
    crate::setup::apt_install(&["prometheus"])?;
    if installing && Path::new("/run/systemd/system").is_dir() {
        // The package starts and enables its own service on :9090; this check runs its own
        // Prometheus, and a machine that only installed it for this wants no server left on.
        crate::run(Command::new("systemctl").args(["disable", "--now", "prometheus"]))?;
    }
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
    promtool(&["test", "rules", "alerts_test.yml"])?;
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

fn load_dashboards(dir: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "json"));
    files.sort();
    if files.is_empty() {
        bail!("no dashboard JSON in {}", dir.display());
    }
    files
        .iter()
        .map(|file| {
            let name = file
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = fs::read_to_string(file).with_context(|| format!("reading {name}"))?;
            let json =
                serde_json::from_str(&text).with_context(|| format!("{name} is not valid JSON"))?;
            Ok((name, json))
        })
        .collect()
}

/// Every panel, those nested in collapsed rows included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

fn is_datasource_variable(value: &Value) -> bool {
    value["type"] == "prometheus" && value["uid"] == DATASOURCE_UID
}

/// Lints the dashboards and gathers their queries (template variables substituted).
fn lint(dashboards: &[(String, Value)]) -> (Vec<Query>, Vec<String>) {
    let mut queries = Vec::new();
    let mut problems = Vec::new();
    let mut uids = HashSet::new();
    for (file, dashboard) in dashboards {
        let mut problem = |what: String| problems.push(format!("{file}: {what}"));
        if !dashboard["id"].is_null() {
            problem("\"id\" must be null so that importing creates the dashboard".into());
        }
        match dashboard["uid"].as_str() {
            Some(uid) if !uid.is_empty() => {
                if !uids.insert(uid.to_owned()) {
                    problem(format!("uid {uid:?} is used by another dashboard"));
                }
            }
            _ => problem("no uid".into()),
        }
        hard_coded_datasources(dashboard, "$", &mut problem);

        let variables = dashboard["templating"]["list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let variable = |name: &str| variables.iter().find(|v| v["name"] == name);
        match variable("datasource") {
            Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
            _ => problem("no `datasource` variable of type datasource (query prometheus)".into()),
        }
        if !variable("instance").is_some_and(|v| v["type"] == "query") {
            problem("no `instance` query variable".into());
        }
        let names: Vec<String> = variables
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect();
        for v in variables.iter().filter(|v| v["type"] == "query") {
            let name = v["name"].as_str().unwrap_or("?");
            if !is_datasource_variable(&v["datasource"]) {
                problem(format!(
                    "variable {name}: datasource must be {DATASOURCE_UID}"
                ));
            }
            let text = v["query"]
                .as_str()
                .or_else(|| v["query"]["query"].as_str())
                .unwrap_or_default();
            match label_values(text)
                .ok_or_else(|| {
                    format!("variable {name}: {text:?} is not label_values(selector, label)")
                })
                .and_then(|expr| substitute(&expr, &names))
            {
                Ok(expr) => queries.push(Query {
                    dashboard: file.clone(),
                    panel: format!("${name}"),
                    target: "variable".into(),
                    expr,
                    need: None,
                }),
                Err(e) => problem(e),
            }
        }

        let mut ids = HashSet::new();
        for panel in all_panels(dashboard) {
            let title = panel["title"].as_str().unwrap_or("?");
            let Some(id) = panel["id"].as_u64() else {
                problem(format!("panel {title:?} has no numeric id"));
                continue;
            };
            let label = format!("#{id} {title}");
            if !ids.insert(id) {
                problem(format!("panel id {id} is used twice"));
            }
            if !panel["gridPos"]["w"].is_u64() || !panel["gridPos"]["h"].is_u64() {
                problem(format!("{label}: no gridPos"));
            }
            if panel["type"] == "row" {
                continue;
            }
            if !is_datasource_variable(&panel["datasource"]) {
                problem(format!("{label}: datasource must be {DATASOURCE_UID}"));
            }
            if panel["fieldConfig"]["defaults"]["unit"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                problem(format!("{label}: no unit (fieldConfig.defaults.unit)"));
            }
            let need = match Need::declared(panel["description"].as_str().unwrap_or_default()) {
                Ok(need) => need,
                Err(e) => {
                    problem(format!("{label}: {e}"));
                    None
                }
            };
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problem(format!("{label}: no targets"));
            }
            let mut refs = HashSet::new();
            for target in &targets {
                let ref_id = target["refId"].as_str().unwrap_or("?").to_owned();
                if !refs.insert(ref_id.clone()) {
                    problem(format!("{label}: refId {ref_id} is used twice"));
                }
                if !is_datasource_variable(&target["datasource"]) {
                    problem(format!(
                        "{label} {ref_id}: datasource must be {DATASOURCE_UID}"
                    ));
                }
                let expr = target["expr"].as_str().unwrap_or_default();
                if expr.trim().is_empty() {
                    problem(format!("{label} {ref_id}: no expr"));
                    continue;
                }
                match substitute(expr, &names) {
                    Ok(expr) => queries.push(Query {
                        dashboard: file.clone(),
                        panel: label.clone(),
                        target: ref_id,
                        expr,
                        need,
                    }),
                    Err(e) => problem(format!("{label} {ref_id}: {e}")),
                }
            }
        }
    }
    (queries, problems)
}

/// Any `datasource` in the dashboard other than the variable: a data source UID written in
/// would break on every Grafana but the one it came from.
fn hard_coded_datasources(value: &Value, path: &str, problem: &mut impl FnMut(String)) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let here = format!("{path}.{key}");
                if key == "datasource" && !is_datasource_variable(child) {
                    problem(format!(
                        "{here} is {child}, not the {DATASOURCE_UID} variable"
                    ));
                } else {
                    hard_coded_datasources(child, &here, problem);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                hard_coded_datasources(child, &format!("{path}[{i}]"), problem);
            }
        }
        _ => {}
    }
}

/// `label_values(selector, label)` as a query with one series per value.
fn label_values(query: &str) -> Option<String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some(format!("count by ({}) ({})", label.trim(), selector.trim()))
}

/// Replaces Grafana's variables the way a dashboard showing all hosts would; an unknown
/// variable is an error.
fn substitute(expr: &str, variables: &[String]) -> Result<String, String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        let (name, after) = if let Some(braced) = rest.strip_prefix('{') {
            let end = braced.find('}').ok_or("an unclosed ${")?;
            // `${name:format}`: the format does not matter for one regex of all values.
            let name = braced[..end].split(':').next().unwrap_or_default();
            (name, &braced[end + 1..])
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        let value = BUILTINS
            .iter()
            .find(|(builtin, _)| *builtin == name)
            .map(|(_, value)| *value)
            .or_else(|| variables.iter().any(|v| v == name).then_some(ALL_VALUES))
            .ok_or_else(|| format!("unknown variable ${name}"))?;
        out.push_str(value);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
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

/// A process this run started, stopped (SIGTERM, then SIGKILL) when dropped, on success or
/// failure alike.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(name: &'static str, command: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = fs::File::create(&log)?;
        let err = out.try_clone()?;
        eprintln!("+ {command:?} > {}", log.display());
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    /// Fails with the end of its log when it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of its log:\n{}",
                self.name,
                tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "dashboards: {} ignored SIGTERM for 10 s: killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<SocketAddr> {
    testkit::free_loopback_addr().context("finding a free loopback port")
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = ready();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let why = last.err().map(|e| format!(": {e:#}")).unwrap_or_default();
            bail!("timed out after {timeout:?} waiting for {what}{why}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn start_agent(root: &Path, scratch: &Scratch) -> anyhow::Result<(SocketAddr, Process)> {
    // CARGO_TARGET_DIR moves the build; honour it to run the binary just built.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let addr = free_port()?;
    let mut agent = Process::start(
        "the agent",
        Command::new(target_dir.join("release/observer"))
            .args(["--web.listen-address", &addr.to_string()]),
        scratch.0.join("observer.log"),
    )?;
    wait_until("the agent's /healthz", Duration::from_secs(60), || {
        agent.check_running()?;
        Ok(http_get(addr, "/healthz")
            .is_ok_and(|(status, body)| status == 200 && body.trim() == "ok"))
    })?;
    Ok((addr, agent))
}

fn start_prometheus(
    dir: &Path,
    scratch: &Scratch,
    targets: &[String],
) -> anyhow::Result<(Prometheus, Process)> {
    let rules = dir.join("alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: observer\n    static_configs:\n      - targets: {}\n",
        serde_json::to_string(&rules.to_string_lossy())?,
        serde_json::to_string(targets)?,
    );
    let config_file = scratch.0.join("prometheus.yml");
    fs::write(&config_file, config)?;
    let addr = free_port()?;
    let mut process = Process::start(
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.0.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}")),
        scratch.0.join("prometheus.log"),
    )?;
    let prometheus = Prometheus { addr };
    wait_until("Prometheus to be ready", Duration::from_secs(60), || {
        process.check_running()?;
        Ok(http_get(addr, "/-/ready").is_ok_and(|(status, _)| status == 200))
    })?;
    eprintln!(
        "dashboards: Prometheus on {addr} scraping {}",
        targets.join(", ")
    );
    wait_until(
        "Prometheus to scrape every target",
        Duration::from_secs(60),
        || {
            process.check_running()?;
            Ok(
                prometheus.value(r#"count(up{job="observer"} == 1)"#)?
                    == Some(targets.len() as f64),
            )
        },
    )?;
    Ok((prometheus, process))
}

struct Prometheus {
    addr: SocketAddr,
}

impl Prometheus {
    /// The `data` of a successful API answer.
    fn api(&self, path: &str) -> anyhow::Result<Value> {
        let (_, body) = http_get(self.addr, path)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered {path} with {body:?}"))?;
        if answer["status"] != "success" {
            bail!("{}", answer["error"].as_str().unwrap_or(&body));
        }
        Ok(answer["data"].clone())
    }

    /// The number of series a query returns, or Prometheus's error for it (a parse error, or an
    /// error evaluating it).
    fn query(&self, expr: &str) -> anyhow::Result<Result<usize, String>> {
        let (_, body) = http_get(self.addr, &format!("/api/v1/query?query={}", encode(expr)))?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("Prometheus answered a query with {body:?}"))?;
        if answer["status"] != "success" {
            return Ok(Err(answer["error"].as_str().unwrap_or(&body).to_owned()));
        }
        let data = &answer["data"];
        Ok(Ok(match data["resultType"].as_str() {
            Some("vector" | "matrix") => data["result"].as_array().map_or(0, Vec::len),
            Some("scalar" | "string") => 1,
            _ => 0,
        }))
    }

    fn count(&self, expr: &str) -> anyhow::Result<usize> {
        self.query(expr)?
            .map_err(|e| anyhow::anyhow!("{expr}: {e}"))
    }

    /// The value of a query returning at most one series.
    fn value(&self, expr: &str) -> anyhow::Result<Option<f64>> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)))?;
        let result = data["result"].as_array().cloned().unwrap_or_default();
        Ok(result
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok()))
    }
}

/// A GET for Prometheus's API and the agent's /healthz.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(testkit::http::get(addr, path, Duration::from_secs(30))?)
}

/// Percent-encodes a query parameter value.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Timer syscalls from a thread of their own name: churn (created and deleted at once), one
/// armed timer, one bad clock (EINVAL), and where the kernel has restore mode, a create asking
/// for an ID and a second asking for the same one (EBUSY). Returns whether restore mode worked.
fn timer_activity(round: u32) -> anyhow::Result<bool> {
    let worker = thread::Builder::new()
        .name(TIMER_THREAD.into())
        .spawn(move || -> Result<bool, String> {
            for _ in 0..CHURN {
                let mut id = 0;
                if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0 || timer_delete(id) != 0 {
                    return Err(format!("timer_create/delete: {}", std::io::Error::last_os_error()));
                }
            }
            let mut id = 0;
            if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0
                || timer_arm(id, 3600) != 0
                || timer_delete(id) != 0
            {
                return Err(format!("an armed timer: {}", std::io::Error::last_os_error()));
            }
            let mut unused = 0;
            if timer_create(99, &mut unused) != -1 {
                return Err("timer_create on clock 99 did not fail".into());
            }
            if !restore_ids_mode(true) {
                return Ok(false);
            }
            let wanted = 700_000 + round as libc::c_int;
            let (mut first, mut again) = (wanted, wanted);
            let granted = timer_create(libc::CLOCK_MONOTONIC.into(), &mut first) == 0;
            let taken = timer_create(libc::CLOCK_MONOTONIC.into(), &mut again) == -1;
            restore_ids_mode(false);
            if granted {
                timer_delete(first);
            }
            if !(granted && taken && first == wanted) {
                return Err(format!(
                    "restore mode: asked for ID {wanted}, got {first} (granted {granted}, then taken {taken})"
                ));
            }
            Ok(true)
        })?;
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the timer thread panicked"))?
        .map_err(|e| anyhow::anyhow!("timer activity: {e}"))
}

/// A write open of a debugfs file, which lockdown (integrity and above) refuses.
fn lockdown_denial() -> anyhow::Result<()> {
    let file = Path::new("/sys/kernel/debug/clear_warn_once");
    if !file.exists() {
        crate::run(Command::new("mount").args(["-t", "debugfs", "none", "/sys/kernel/debug"]))?;
    }
    match fs::OpenOptions::new().write(true).open(file) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        Err(e) => bail!(
            "opening {} for write: {e}, not the lockdown's EPERM",
            file.display()
        ),
        Ok(_) => bail!(
            "{} opened for write: this kernel is not locked down, so the lockdown panels would \
             have no denial to show (boot with lockdown=integrity)",
            file.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_become_all_values_and_builtins() {
        let vars = ["job".to_owned(), "instance".to_owned()];
        assert_eq!(
            substitute(
                r#"rate(x{job=~"$job", instance=~"${instance:regex}"}[$__rate_interval]) / $__range_s"#,
                &vars
            )
            .unwrap(),
            r#"rate(x{job=~".+", instance=~".+"}[1m]) / 600"#
        );
        assert!(substitute("x[$nope]", &vars).is_err());
    }

    #[test]
    fn needs_are_read_from_descriptions() {
        assert_eq!(Need::declared("Plain."), Ok(None));
        assert_eq!(
            Need::declared("Latency. Needs: module-loads (no data until ...)."),
            Ok(Some(Need::ModuleLoads))
        );
        assert!(Need::declared("Needs: unicorns").is_err());
    }

    #[test]
    fn label_values_queries() {
        assert_eq!(
            label_values(r#"label_values(observer_build_info{job=~"$job"}, instance)"#).as_deref(),
            Some(r#"count by (instance) (observer_build_info{job=~"$job"})"#)
        );
        assert_eq!(label_values("up"), None);
    }

    #[test]
    fn loopback_targets_only() {
        assert!(check_loopback("127.0.0.1:9745").is_ok());
        assert!(check_loopback("[::1]:9745").is_ok());
        assert!(check_loopback("localhost:1").is_ok());
        assert!(check_loopback("10.0.0.1:9745").is_err());
        assert!(check_loopback("9745").is_err());
    }
}
