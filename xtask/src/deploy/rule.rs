//! The alert rules as a prometheus-operator `PrometheusRule`, for clusters that load rules
//! that way: `deploy/kubernetes/prometheusrule.yaml` is `dashboards/alerts.yml`'s groups
//! under `spec:`, kept equal to it by `cargo xtask deploy` (which rewrites it with
//! `OBSERVER_UPDATE_GOLDEN=1`) and validated against the CRD's schema with the other
//! manifests.

use std::{fs, path::Path};

use anyhow::Context as _;

use super::Checks;

const HEADER: &str =
    "# Generated from dashboards/alerts.yml by `OBSERVER_UPDATE_GOLDEN=1 cargo xtask deploy`:
# change the rules there. Needs the Prometheus Operator (remove it from kustomization.yaml
# without), and a Prometheus whose ruleSelector takes the label below.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: observer
  namespace: observer
  labels:
    app.kubernetes.io/name: observer
spec:
";

/// The rule file's groups, indented under `spec:` (its comments and block scalars as they
/// are: indentation is all YAML nests by).
pub fn render(alerts: &str) -> String {
    let mut out = HEADER.to_owned();
    for line in alerts.lines().skip_while(|l| !l.starts_with("groups:")) {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

pub fn check(root: &Path, checks: &mut Checks) -> anyhow::Result<()> {
    let alerts = fs::read_to_string(root.join("dashboards/alerts.yml"))
        .context("reading dashboards/alerts.yml")?;
    let path = root.join("deploy/kubernetes/prometheusrule.yaml");
    let want = render(&alerts);
    if std::env::var_os("OBSERVER_UPDATE_GOLDEN").is_some() {
        fs::write(&path, &want).with_context(|| format!("writing {}", path.display()))?;
    }
    let what = "prometheusrule.yaml holds dashboards/alerts.yml's rules";
    if fs::read_to_string(&path).is_ok_and(|have| have == want) {
        checks.pass(what);
    } else {
        checks.fail(
            what,
            "it differs: regenerate it with `OBSERVER_UPDATE_GOLDEN=1 cargo xtask deploy`",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_groups_go_under_spec() {
        let rendered = super::render("# a comment\ngroups:\n  - name: g\n    rules: []\n");
        assert!(rendered.ends_with("spec:\n  groups:\n    - name: g\n      rules: []\n"));
        assert!(rendered.contains("kind: PrometheusRule"));
    }
}
