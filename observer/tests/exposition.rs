//! The exposition itself: the metric families a real scrape of this host's agent carries (name,
//! type, label names) against a golden file, and `promtool check metrics` on the same scrape.
//! A family renamed, retyped, relabelled, added or dropped fails here, not in a dashboard.
//!
//! The golden file is for the CI host (this machine's kind: syscall tracepoints, printk lockdown
//! fallback, no modules). `OBSERVER_UPDATE_GOLDEN=1 cargo test --release --test exposition`
//! rewrites it; review the difference like code.

#[path = "support/features.rs"]
mod features;
mod support;

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
};

use support::{Agent, Metrics, timer_pair};

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/golden/host-families.txt"
);

/// `name type label,label` for every family in a scrape.
fn families(scrape: &Metrics) -> BTreeSet<String> {
    scrape
        .families()
        .into_iter()
        .map(|f| {
            // `le` and `quantile` belong to the type, not to the family.
            let labels: Vec<String> = f
                .label_names
                .into_iter()
                .filter(|l| l != "le" && l != "quantile")
                .collect();
            format!("{} {} {}", f.name, f.kind, labels.join(","))
                .trim_end()
                .to_owned()
        })
        .collect()
}

/// A scrape after the host's hooks have each seen something: a timer pair, a lockdown denial.
/// With `--timers.latency`, so that every family the agent can export is in it.
fn scrape_with_data() -> (Metrics, bool) {
    let agent = Agent::start(&["--timers.latency"]);
    timer_pair();
    let denied = features::kernel_has(
        "lockdown",
        support::lockdown_level().is_some_and(|level| level != "none"),
        "this kernel runs without lockdown: the decisions family stays empty",
    );
    if denied {
        support::write_open_debugfs();
    }
    let scrape = agent.metrics_until("the timer pair and the denial", |m| {
        m.value("observer_events_total", &[("kind", "timer_deleted")]) >= 1.0
            && (!denied
                || m.get(
                    "observer_lockdown_decisions_total",
                    &[("reason", "debugfs"), ("verdict", "denied")],
                )
                .is_some())
    });
    (scrape, denied)
}

#[test]
fn a_real_scrape_has_exactly_the_golden_families_and_passes_promtool() {
    let (scrape, denied) = scrape_with_data();
    let found = families(&scrape);
    if std::env::var_os("OBSERVER_UPDATE_GOLDEN").is_some() {
        let mut lines: Vec<&str> = found.iter().map(String::as_str).collect();
        lines.push("");
        std::fs::write(GOLDEN, lines.join("\n")).unwrap();
    }
    let golden: BTreeSet<String> = std::fs::read_to_string(GOLDEN)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .filter(|l| denied || !l.starts_with("observer_lockdown_decisions_total "))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        found.difference(&golden).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "families in the scrape, not in {GOLDEN}"
    );
    assert_eq!(
        golden.difference(&found).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "families in {GOLDEN}, not in the scrape"
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask test installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.0.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One line of a program's output, trimmed; None when it cannot run or fails.
fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn build_info_names_the_build_and_kernel_info_the_running_kernel() {
    let scrape = Agent::start(&[]).metrics();

    // The build script's values reach this test too. The revision must be a commit of this
    // repository (HEAD itself may have moved on since the build), and the compiler the one
    // cargo runs here.
    let revision = env!("OBSERVER_REVISION");
    match output_of(
        "git",
        &["rev-parse", "--verify", &format!("{revision}^{{commit}}")],
    ) {
        Some(commit) => assert_eq!(commit, revision, "a full commit id"),
        None => assert_eq!(revision, "unknown", "not a commit of this repository"),
    }
    let rustc = output_of("rustc", &["--version"]).expect("rustc --version");
    assert_eq!(
        rustc.split_whitespace().nth(1),
        Some(env!("OBSERVER_RUSTC"))
    );
    assert_eq!(
        scrape.get(
            "observer_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", revision),
                ("rustc", env!("OBSERVER_RUSTC")),
            ],
        ),
        Some(1.0),
        "{}",
        scrape.0
    );

    let uname = |flag| output_of("uname", &[flag]).expect("uname");
    assert_eq!(
        scrape.get(
            "observer_kernel_info",
            &[
                ("release", &uname("-r")),
                ("version", &uname("-v")),
                ("machine", &uname("-m")),
            ],
        ),
        Some(1.0),
        "{}",
        scrape.0
    );
}
