//! The second boot of the systemd guest: the agent enabled by the first, its unit starting it
//! before udev's coldplug and `systemd-modules-load`. Every module loaded during that boot is
//! either a load the agent counted with its verdict (udev's driver for the guest's virtio
//! balloon, the `modules-load.d` entry) or, loaded before it started (the initramfs's disk and
//! file-system drivers, the virtio RNG driver PID 1 loads itself), in its inventory: exactly
//! what /proc/modules lists, each once.
//! `observer profile --since-start` then prints the boot's integrity cost. The boot ends with
//! `dpkg --purge observer`, which must leave no program of the observer's and no pin (see
//! `pins::purged`).

use std::collections::BTreeSet;

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::guest::Report;

/// Drivers for the guest's devices (`-device virtio-rng-pci`, `virtio-balloon-pci`): udev's
/// coldplug loads the balloon's; the RNG's PID 1 loads itself at its start, before any unit
/// (systemd's kmod-setup loads virtio_rng early for entropy, where the device exists).
pub const UDEV_MODULES: &[&str] = &["virtio_balloon", "virtio_rng"];
const LOADED_BY_UDEV: &str = "virtio_balloon";
const LOADED_BY_PID1: &str = "virtio_rng";
/// The `/etc/modules-load.d` entry `systemd-modules-load` loads.
pub const MODULES_LOAD: &str = "crc8";

/// Runs in the guest's second boot, in place of the first boot's steps.
pub const SECOND_BOOT: &str = r#"    mark "second boot"
    for _ in $(seq 600); do scrape >/dev/null && break; sleep 0.5; done
    # The inventory is published a moment after the agent attached.
    sleep 4
    section boot-order systemctl show observer.service systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service --property=Id,ActiveEnterTimestampMonotonic,ExecMainStartTimestampMonotonic
    section boot-metrics scrape
    section proc-modules cat /proc/modules
    section boot-summary observer profile --since-start
    section boot-events journalctl --boot --unit=observer --no-pager --output=cat
    section cycles sh -c "journalctl --boot --no-pager --output=cat | grep -ci 'ordering cycle'"
    # Its prerm stops the agent, which leaves its security programs pinned, and unpins them;
    # its postrm removes what would be left.
    dpkg --purge observer >/tmp/purge.log 2>&1; mark "rc purge $?"
    section purge cat /tmp/purge.log
    settle 'modules|taint|lockdown|timers' 0
    section bpf-purged bpftool --json prog show
    mark "purged-pins $([ -e /sys/fs/bpf/observer ] && echo present || echo absent)"
    mark "boot-done"
    sync
    systemctl poweroff --force --force
    exit 0"#;

/// `Id=` and a timestamp property per unit, from `systemctl show` of several units.
fn timestamps(text: &str) -> Vec<(String, u64, u64)> {
    text.split("\n\n")
        .filter_map(|block| {
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}=")))
                    .map(str::to_owned)
            };
            let number = |name: &str| field(name).and_then(|v| v.parse().ok()).unwrap_or(0);
            Some((
                field("Id")?,
                number("ActiveEnterTimestampMonotonic"),
                number("ExecMainStartTimestampMonotonic"),
            ))
        })
        .collect()
}

pub fn early_start(report: &Report) -> anyhow::Result<()> {
    // Started before the units that load the boot's modules.
    let order = timestamps(&report.section("boot-order")?);
    let observer = order
        .iter()
        .find(|(id, ..)| id == "observer.service")
        .map(|(_, active, _)| *active)
        .filter(|t| *t > 0)
        .context("observer.service never became active in the second boot")?;
    for (id, _, started) in order.iter().filter(|(id, ..)| id != "observer.service") {
        ensure!(
            *started > observer,
            "{id} started at {started} µs, before the agent was up at {observer} µs: {order:?}"
        );
    }
    let cycles = report.section("cycles")?;
    ensure!(
        cycles.trim() == "0",
        "systemd found an ordering cycle this boot"
    );

    let events: Vec<Value> = report
        .section("boot-events")?
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let names = |kind: &str| -> BTreeSet<String> {
        events
            .iter()
            .filter(|e| e["event"] == kind && (kind != "module_load" || e["outcome"] == "loaded"))
            .filter_map(|e| e["module"].as_str().map(str::to_owned))
            .collect()
    };
    let (loaded, present) = (names("module_load"), names("module_present"));
    let listed: BTreeSet<String> = report
        .section("proc-modules")?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    ensure!(
        loaded.is_disjoint(&present),
        "modules both loaded and present at start: {:?}",
        loaded.intersection(&present).collect::<Vec<_>>()
    );
    let seen: BTreeSet<String> = loaded.union(&present).cloned().collect();
    ensure!(
        seen == listed,
        "/proc/modules lists {listed:?}; the agent saw loads of {loaded:?} and found {present:?}"
    );
    for module in [LOADED_BY_UDEV, MODULES_LOAD] {
        let load = events
            .iter()
            .find(|e| e["event"] == "module_load" && e["module"] == *module)
            .with_context(|| format!("no load of {module} this boot: {loaded:?}"))?;
        ensure!(
            load["outcome"] == "loaded" && load["reason"] == "verified",
            "{load}"
        );
    }
    for module in ["virtio_blk", "ext4", LOADED_BY_PID1] {
        ensure!(
            present.contains(module),
            "{module} (the initramfs's, or PID 1's) not in the inventory: {present:?}"
        );
    }
    let metrics = report.section("boot-metrics")?;
    let sum = |metric: &str, outcome: Option<&str>| -> f64 {
        testkit::prom::parse(&metrics)
            .iter()
            .filter(|s| s.name == metric)
            .filter(|s| outcome.is_none_or(|o| s.has_labels(&[("outcome", o)])))
            .map(|s| s.value)
            .sum()
    };
    ensure!(
        sum("observer_modules_present_at_start", None) == present.len() as f64
            && sum("observer_module_loads_total", Some("loaded")) == loaded.len() as f64,
        "metrics: {} present at start, {} loaded; events: {present:?}, {loaded:?}",
        sum("observer_modules_present_at_start", None),
        sum("observer_module_loads_total", Some("loaded"))
    );
    let summary = report.section("boot-summary")?;
    let checks = sum(
        "observer_module_integrity_check_duration_seconds_count",
        None,
    );
    ensure!(
        summary.contains(&format!(
            "loaded before the agent started: {} modules",
            present.len()
        )) && summary.contains("of the modules' load time"),
        "observer profile --since-start:\n{summary}"
    );
    eprintln!(
        "dist: PASS early start: the agent was up before udev and systemd-modules-load; {} \
         loads seen ({} integrity checks), {} modules present at start; its summary:\n{summary}",
        loaded.len(),
        checks,
        present.len()
    );
    Ok(())
}
