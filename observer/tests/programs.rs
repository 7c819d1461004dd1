//! The observer's own programs as the kernel counts them (`bpf_prog_info`), through /metrics:
//! runs of a timer program against a known number of syscalls, with kernel.bpf_stats_enabled
//! switched on for the test and back after. Its own test binary: no other test of this run
//! makes timers while it counts.

mod support;

use support::{Agent, Metrics, require_root, timer_pair};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Switches the kernel's BPF run-time statistics on, and back to what they were when dropped.
struct StatsOn {
    before: String,
}

impl StatsOn {
    fn new() -> Self {
        let before = std::fs::read_to_string(STATS_SYSCTL).expect(STATS_SYSCTL);
        std::fs::write(STATS_SYSCTL, "1").expect("switching kernel.bpf_stats_enabled on");
        Self { before }
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(STATS_SYSCTL, self.before.trim());
    }
}

const CREATE_EXIT: &[(&str, &str)] = &[("collector", "timers"), ("program", "timers_create_exit")];

fn runs(m: &Metrics) -> f64 {
    m.value("observer_bpf_program_runs_total", CREATE_EXIT)
}

#[test]
fn a_timer_programs_runs_are_counted_exactly_and_none_is_missed() {
    require_root();
    let stats = StatsOn::new();
    let agent = Agent::start(&["--collector.disable-defaults", "--collector.timers"]);
    let before = agent.metrics();
    assert_eq!(before.get("observer_bpf_stats_enabled", &[]), Some(1.0));
    const PAIRS: usize = 100;
    for _ in 0..PAIRS {
        timer_pair();
    }
    let after = agent.metrics();
    // The exit program of sys_exit_timer_create runs once per call, this test's only.
    assert_eq!(runs(&after) - runs(&before), PAIRS as f64);
    let seconds = |m: &Metrics| m.value("observer_bpf_program_run_seconds_total", CREATE_EXIT);
    assert!(seconds(&after) > seconds(&before), "no run time counted");

    // Every loaded program is listed with its collector; none was skipped by the kernel.
    let missed: Vec<_> = testkit::prom::parse(&after.0)
        .into_iter()
        .filter(|s| s.name == "observer_bpf_program_missed_runs_total")
        .collect();
    assert!(
        missed
            .iter()
            .any(|s| s.label("program") == Some("timers_delete_exit")),
        "{missed:?}"
    );
    for sample in &missed {
        assert_eq!(sample.label("collector"), Some("timers"), "{sample:?}");
        assert_eq!(sample.value, 0.0, "{sample:?}");
    }
    drop(stats);
    assert_eq!(
        agent.metrics().get("observer_bpf_stats_enabled", &[]),
        Some(f64::from(u8::from(
            std::fs::read_to_string(STATS_SYSCTL).unwrap().trim() == "1"
        )))
    );
}
