//! The scenarios: what the guest does, on which kernel command line, and what must hold after it.
//! Each scenario is one constant holding its guest steps, its tables of checks and, where a
//! table cannot say it, its judge function beside it; metric names and labels appear only in
//! this module's files (`modules`: loading and integrity, `timers`: POSIX timers, `agent`:
//! attach mechanisms, lockdown, profile, dashboards). All of it is judged inside the guest
//! (`guest-tool judge`, see [`crate::judge`]); the host boots, collects and reports.
//!
//! Guest scripts run under /init (xtask/guest/init.sh) after the observer answers /metrics. Each
//! kernel has three small scenario modules (`Series::scenario_modules`), which the scripts know
//! as `$M1 $M2 $M3` and the checks as `{M1}` `{M2}` `{M3}` (file stems, e.g. `crc-itu-t`) and
//! `{M1.name}`... (the kernel's module name, `crc_itu_t`). Module files in the guest:
//! `/vm/mods/NAME.ko` (signed), `NAME.ko.xz` (signed, compressed), `NAME-unsigned.ko` (signature
//! cut off). `load [--compressed] FILE...` prints `finit_module FILE[ compressed] rc=0` or
//! `... errno=NAME` per call. `start_profile ARGS...` and `stop_profile` run `observer profile`
//! around a scenario's actions and print its report between `PROFILE-BEGIN` and `PROFILE-END`.
mod agent;
mod autoload;
mod events;
mod ima;
mod inventory;
mod modules;
mod names;
mod phases;
mod signers;
mod stream;
mod timers;
mod verdicts;

use std::{borrow::Cow, net::SocketAddr};

use crate::Series;

/// What must hold after a scenario's actions.
#[derive(Debug)]
pub enum Check {
    /// The console has a line containing this text (the kernel's answers, its log, markers).
    Console(&'static str),
    /// One line of `observer probes` output contains all these texts (case-insensitive); the
    /// attached column is matched as " yes " / " no ".
    Probes(&'static [&'static str]),
    /// The sample with exactly this label set.
    Metric(&'static str, Labels, Want),
    /// The sum of the samples that carry at least these labels.
    MetricSum(&'static str, Labels, Want),
    /// The sum of the first samples is at most the second (the parts within the whole).
    SumAtMost(&'static [(&'static str, Labels)], (&'static str, Labels)),
}

pub type Labels = &'static [(&'static str, &'static str)];

/// A scenario's own judgement: the agent's /metrics address and the console; an error says
/// what did not hold.
pub type Judge = fn(SocketAddr, &str) -> anyhow::Result<()>;

#[derive(Debug, Clone, Copy)]
pub enum Want {
    Eq(f64),
    AtLeast(f64),
    /// No such sample, or only zeros: Prometheus cannot tell a counter never incremented apart.
    ZeroOrAbsent,
}

impl Want {
    pub fn holds(self, value: Option<f64>) -> bool {
        match self {
            Want::Eq(want) => value == Some(want),
            Want::AtLeast(want) => value.is_some_and(|v| v >= want),
            Want::ZeroOrAbsent => value.is_none_or(|v| v == 0.0),
        }
    }
}

#[derive(Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Added to the kernel command line.
    pub cmdline: &'static str,
    /// The kernels it runs on when no scenario is named.
    pub kernels: &'static [Series],
    /// Shell lines the guest runs once the observer is up.
    pub guest: &'static str,
    /// Tables of checks that hold on every kernel.
    pub checks: &'static [&'static [Check]],
    /// Checks that hold only on some kernel series.
    pub kernel_checks: &'static [(&'static [Series], &'static [Check])],
    /// What the tables cannot say, judged in the guest after them while its agent still
    /// serves (given the agent's address and the console so far).
    pub judge: Option<Judge>,
    /// Timing-sensitive (a comparison of emulated times): runs after the others, with no other
    /// guest beside it. Two guests at once on this two-core machine move the emulated timings
    /// of a load by up to 30%.
    pub alone: bool,
    /// The observer's arguments (beyond its listen address) when /init starts it. Given here
    /// rather than by restarting it in the script: detaching trampolines while other CPUs run
    /// through the patched functions has crashed a TCG guest (an int3 oops in the text poke).
    pub agent_args: &'static str,
    /// Shell lines the guest runs before it starts the observer (what a host did before its
    /// agent started).
    pub before_agent: &'static str,
}

impl Scenario {
    pub fn checks_on(&self, series: Series) -> impl Iterator<Item = &Check> {
        self.checks.iter().flat_map(|table| table.iter()).chain(
            self.kernel_checks
                .iter()
                .filter(move |(kernels, _)| kernels.contains(&series))
                .flat_map(|(_, checks)| checks.iter()),
        )
    }
}

/// Every guest kernel.
pub const EVERY_KERNEL: &[Series] = &[
    Series::V6_12,
    Series::V6_1,
    Series::V6_18,
    Series::V7_3,
    Series::V5_10,
];
/// The kernels built with IMA (Debian 11's 5.10 is not).
pub const WITH_IMA: &[Series] = &[Series::V6_12, Series::V6_1, Series::V6_18, Series::V7_3];
/// Scenarios that do not run on a kernel of [`EVERY_KERNEL`], and why (`cargo xtask vm --list`
/// prints it). What that kernel lacks is asserted in the scenarios it runs instead.
pub const NOT_ON: &[(&str, Series, &str)] = &[
    (
        "ima",
        Series::V5_10,
        "Debian 11's kernel is built without IMA (CONFIG_IMA unset, no ima/policy to write): \
         its IMA probes unattached are asserted in `signed`",
    ),
    (
        "events",
        Series::V5_10,
        "half of its loads are IMA's to pass or refuse, and Debian 11's kernel has no IMA",
    ),
];
/// The kernels the agent's newer paths are checked on (6.1 runs the module and timer scenarios).
pub const CURRENT: &[Series] = &[Series::V6_12, Series::V6_18, Series::V7_3];
/// Kernels with timer-ID restore mode (PR_TIMER_CREATE_RESTORE_IDS, 6.15+).
pub const RESTORE_MODE: &[Series] = &[Series::V6_18, Series::V7_3];
/// Kernels without it.
pub const NO_RESTORE_MODE: &[Series] = &[Series::V6_12, Series::V6_1, Series::V5_10];

pub const SCENARIOS: &[&Scenario] = &[
    &modules::SIGNED,
    &modules::UNSIGNED,
    &modules::LOCKDOWN_INTEGRITY,
    &modules::SIG_ENFORCE,
    &modules::COMPRESSED,
    &agent::FENTRY_PATH,
    &agent::CONFIDENTIALITY,
    &modules::HASH_PATH,
    &agent::PROFILE,
    &timers::TIMERS,
    &timers::TIMERS_COUNTS_ONLY,
    &agent::DASHBOARDS,
    &events::EVENTS,
    &names::NAMES_INTEGRITY,
    &names::NAMES_CONFIDENTIALITY,
    &ima::IMA,
    &verdicts::STORM,
    &verdicts::STORM_LOCKDOWN,
    &verdicts::LOAD_PATHS,
    &signers::SIGNERS,
    &signers::SIGNERS_ENFORCED,
    &autoload::AUTOLOAD,
    &inventory::INVENTORY,
    &phases::PHASES_VS_FTRACE,
    &agent::BENCH_MODULES,
    &agent::BENCH_TIMERS,
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().copied().find(|s| s.name == name)
}

/// `text` with the kernel's scenario module names for `{M1}`... and `{M1.name}`...
pub fn expand(text: &str, modules: [&str; 3]) -> Cow<'static, str> {
    if !text.contains("{M") {
        return Cow::Owned(text.to_owned());
    }
    let mut out = text.to_owned();
    for (i, stem) in modules.iter().enumerate() {
        let n = i + 1;
        out = out
            .replace(&format!("{{M{n}.name}}"), &stem.replace('-', "_"))
            .replace(&format!("{{M{n}}}"), stem);
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(
                SCENARIOS[..i].iter().all(|o| o.name != s.name),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn wants() {
        assert!(Want::Eq(2.0).holds(Some(2.0)));
        assert!(!Want::Eq(2.0).holds(None));
        assert!(Want::AtLeast(1.0).holds(Some(3.0)));
        assert!(Want::ZeroOrAbsent.holds(None));
        assert!(Want::ZeroOrAbsent.holds(Some(0.0)));
        assert!(!Want::ZeroOrAbsent.holds(Some(1.0)));
    }

    #[test]
    fn module_names_fill_in() {
        let modules = ["crc16", "crc-itu-t", "crc8"];
        assert_eq!(
            expand("finit_module {M1}.ko rc=0, {M2.name} and {M2}", modules),
            "finit_module crc16.ko rc=0, crc_itu_t and crc-itu-t"
        );
        assert_eq!(expand("plain", modules), "plain");
    }

    /// A scenario of every kernel (6.1 among them, unlike the newer paths' ones) runs on each
    /// guest kernel or says why not.
    #[test]
    fn every_kernel_a_scenario_skips_says_why() {
        for scenario in SCENARIOS
            .iter()
            .filter(|s| s.kernels.contains(&Series::V6_1))
        {
            for series in EVERY_KERNEL {
                let said = NOT_ON
                    .iter()
                    .any(|(name, s, _)| *name == scenario.name && s == series);
                assert!(
                    scenario.kernels.contains(series) != said,
                    "{} on {series:?}",
                    scenario.name
                );
            }
        }
        assert!(NOT_ON.iter().all(|(name, ..)| find(name).is_some()));
    }

    #[test]
    fn restore_mode_split_covers_every_kernel() {
        for series in EVERY_KERNEL {
            assert!(RESTORE_MODE.contains(series) != NO_RESTORE_MODE.contains(series));
        }
    }
}
