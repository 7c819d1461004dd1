//! Lockdown observation against this machine's kernel: a real denial (a write open of a debugfs
//! file under lockdown), the active level, and the taint flags, asserted through /metrics.

#[path = "support/features.rs"]
mod features;
mod support;

use std::fs;

use support::{Agent, lockdown_level, write_open_debugfs};

#[test]
fn a_debugfs_denial_is_counted_by_reason() {
    let agent = Agent::start(&[]);
    let level = lockdown_level();
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
        let letter = *letter;
        let want = f64::from(u8::from(mask & (1 << bit) != 0));
        // One series per flag, its meaning beside the letter (E: unsigned_module).
        let series: Vec<_> = testkit::prom::parse(&m.0)
            .into_iter()
            .filter(|s| s.name == "observer_kernel_tainted" && s.has_labels(&[("flag", letter)]))
            .collect();
        assert_eq!(series.len(), 1, "flag {letter}: {series:?}");
        assert_eq!(series[0].value, want, "flag {letter}");
        assert_eq!(series[0].labels.len(), 2, "flag and name: {series:?}");
    }
}
