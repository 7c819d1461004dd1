//! Static checks of the dashboards' JSON, and the PromQL each panel and template variable
//! would send, with Grafana's variables replaced the way a dashboard showing all hosts would.
use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

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

/// Data a panel needs that not every run can produce, named in its description as
/// `Needs: TOKEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
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
    pub const ALL: [Need; 4] = [
        Need::ModuleLoads,
        Need::KernelTaint,
        Need::IntegrityPhases,
        Need::RestoreMode,
    ];

    pub fn token(self) -> &'static str {
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

/// One PromQL expression to try: a panel target or a template variable's query.
pub struct Query {
    pub dashboard: String,
    pub panel: String,
    pub target: String,
    pub expr: String,
    pub need: Option<Need>,
}

pub fn load_dashboards(dir: &Path) -> anyhow::Result<Vec<(String, Value)>> {
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
pub fn lint(dashboards: &[(String, Value)]) -> (Vec<Query>, Vec<String>) {
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
}
