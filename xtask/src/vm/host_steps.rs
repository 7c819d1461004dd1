//! What a few scenarios need of the host after the guest has judged itself: a real Prometheus
//! scraping the guest (the dashboards), and the benchmarks' reports, which the host writes. Every
//! other scenario is judged in its guest alone (guest-tests).
use std::net::SocketAddr;

/// A host step of one scenario.
pub struct HostStep {
    pub scenario: &'static str,
    /// Given the guest's forwarded /metrics address and its console.
    pub run: fn(SocketAddr, &str) -> anyhow::Result<()>,
    /// It runs the host's own agent: built before any guest starts, so the build never eats
    /// into a waiting guest's time, and its guest runs first (the longest).
    pub host_agent: bool,
}

const STEPS: &[HostStep] = &[
    HostStep {
        scenario: "dashboards",
        run: dashboards_against_guest,
        host_agent: true,
    },
    HostStep {
        scenario: "bench-modules",
        run: super::bench_modules::module_path_report,
        host_agent: false,
    },
    HostStep {
        scenario: "bench-timers",
        run: super::bench_timers::timer_path_report,
        host_agent: false,
    },
];

pub fn of(scenario: &str) -> Option<&'static HostStep> {
    STEPS.iter().find(|step| step.scenario == scenario)
}

/// The dashboards' proof with the guest's agent as a second target: module panels need data.
fn dashboards_against_guest(guest: SocketAddr, _console: &str) -> anyhow::Result<()> {
    crate::dashboards::run_with_targets(&[guest.to_string()])
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_step_is_a_scenario_s() {
        for step in super::STEPS {
            assert!(
                guest_tests::scenarios::find(step.scenario).is_some(),
                "{}",
                step.scenario
            );
        }
    }
}
