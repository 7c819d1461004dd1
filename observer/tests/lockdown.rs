//! Lockdown observation against this machine's kernel: a real denial (a write open of a debugfs
//! file under lockdown), the active level, and the taint flags, asserted through /metrics.

#[path = "support/features.rs"]
mod features;
mod support;

use std::{fs, path::Path};

use support::Agent;

fn active_level() -> Option<String> {
    let text = fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    let start = text.find('[')?;
    let end = text.find(']')?;
    Some(text[start + 1..end].to_owned())
}

/// A debugfs file opened for write: the lockdown LSM refuses it (LOCKDOWN_DEBUGFS) from the
/// integrity level up.
fn write_open_debugfs() -> std::io::Error {
    if !Path::new("/sys/kernel/debug/clear_warn_once").exists() {
        let status = std::process::Command::new("mount")
            .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
            .status()
            .unwrap();
        assert!(status.success(), "mounting debugfs");
    }
    fs::OpenOptions::new()
        .write(true)
        .open("/sys/kernel/debug/clear_warn_once")
        .unwrap_err()
}

#[test]
fn a_debugfs_denial_is_counted_by_reason() {
    let agent = Agent::start(&[]);
    let level = active_level();
    let m = agent.metrics();
    // The level gauge mirrors securityfs exactly.
    for name in ["none", "integrity", "confidentiality"] {
        let want = f64::from(u8::from(level.as_deref() == Some(name)));
        assert_eq!(
            m.get("observer_lockdown_level", &[("level", name)]),
            Some(want),
            "level {name}"
        );
    }
    if !features::kernel_has(
        "lockdown",
        level.as_deref() != Some("none"),
        "this kernel runs without lockdown: nothing is denied",
    ) {
        return;
    }
    let labels = [("reason", "debugfs"), ("verdict", "denied")];
    let before = m.value("observer_lockdown_decisions_total", &labels);
    let err = write_open_debugfs();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "the kernel's answer: {err}"
    );
    let after = agent.metrics_until("the debugfs denial", |m| {
        m.value("observer_lockdown_decisions_total", &labels) > before
    });
    // One denied open, one denial: nothing else in this test binary touches debugfs.
    assert_eq!(
        after.value("observer_lockdown_decisions_total", &labels) - before,
        1.0
    );
}

#[test]
fn taint_flags_mirror_the_kernel() {
    let agent = Agent::start(&[]);
    let m = agent.metrics();
    let mask: u64 = fs::read_to_string("/proc/sys/kernel/tainted")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let letters = [
        "P", "F", "S", "R", "M", "B", "U", "D", "A", "W", "C", "I", "O", "E", "L", "K", "X", "T",
        "N", "J",
    ];
    for (bit, letter) in letters.iter().enumerate() {
        let want = f64::from(u8::from(mask & (1 << bit) != 0));
        assert_eq!(
            m.get("observer_kernel_tainted", &[("flag", letter)]),
            Some(want),
            "flag {letter}"
        );
    }
}
