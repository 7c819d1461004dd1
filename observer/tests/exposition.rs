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
fn families(scrape: &str) -> BTreeSet<String> {
    let mut types = std::collections::BTreeMap::new();
    let mut labels: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').unwrap().0;
        let (sample, label_text) = series.split_once('{').unwrap_or((series, ""));
        // Histogram samples belong to their family; `le` is the type's, not the family's.
        let family = types
            .keys()
            .filter(|f| sample.starts_with(f.as_str()))
            .max_by_key(|f| f.len())
            .cloned()
            .unwrap_or_else(|| panic!("sample {sample} before its TYPE line"));
        let names = labels.entry(family).or_default();
        for pair in label_text.trim_end_matches('}').split("\",") {
            if let Some((name, _)) = pair.split_once("=\"")
                && name != "le"
            {
                names.insert(name.to_owned());
            }
        }
    }
    types
        .into_iter()
        .map(|(name, kind)| {
            let names: Vec<String> = labels
                .remove(&name)
                .unwrap_or_default()
                .into_iter()
                .collect();
            format!("{name} {kind} {}", names.join(","))
                .trim_end()
                .to_owned()
        })
        .collect()
}

/// A scrape after the host's hooks have each seen something: a timer pair, a lockdown denial.
fn scrape_with_data() -> (String, bool) {
    let agent = Agent::start(&[]);
    timer_pair();
    let lockdown = std::fs::read_to_string("/sys/kernel/security/lockdown")
        .is_ok_and(|levels| !levels.contains("[none]"));
    let denied = features::kernel_has(
        "lockdown",
        lockdown,
        "this kernel runs without lockdown: the decisions family stays empty",
    );
    if denied {
        if !std::path::Path::new("/sys/kernel/debug/clear_warn_once").exists() {
            let status = Command::new("mount")
                .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
                .status()
                .unwrap();
            assert!(status.success(), "mounting debugfs");
        }
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open("/sys/kernel/debug/clear_warn_once");
    }
    let Metrics(text) = agent.metrics_until("the timer pair and the denial", |m| {
        m.value("observer_events_total", &[("kind", "timer_deleted")]) >= 1.0
            && (!denied
                || m.get(
                    "observer_lockdown_decisions_total",
                    &[("reason", "debugfs"), ("verdict", "denied")],
                )
                .is_some())
    });
    (text, denied)
}

#[test]
fn a_real_scrape_has_exactly_the_golden_families_and_passes_promtool() {
    let (text, denied) = scrape_with_data();
    let found = families(&text);
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
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
