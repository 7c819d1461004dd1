//! The scenarios: what the guest does, on which kernel command line, and what must hold after it.
//! Each scenario's checks are one table; metric names and labels appear only here.
//!
//! Guest scripts run under /init (xtask/guest/init.sh) after the observer answers /metrics. Module
//! files in the guest: `/vm/mods/NAME.ko` (signed), `NAME.ko.xz` (signed, compressed),
//! `NAME-unsigned.ko` (signature cut off), for NAME in crc7, crc-itu-t, crc8. `load [--compressed]
//! FILE...` prints `finit_module FILE[ compressed] rc=0` or `... errno=NAME` per call.
use std::net::SocketAddr;

use super::kernel::Series;

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
    pub checks: &'static [Check],
    /// Checks that hold only on one kernel series.
    pub kernel_checks: &'static [(Series, &'static [Check])],
    /// Run on the host after the checks, while the guest's agent still serves (given its
    /// forwarded metrics address and the console so far).
    pub host: Option<fn(SocketAddr, &str) -> anyhow::Result<()>>,
}

impl Scenario {
    pub fn checks_on(&self, series: Series) -> impl Iterator<Item = &Check> {
        self.checks.iter().chain(
            self.kernel_checks
                .iter()
                .filter(move |(s, _)| *s == series)
                .flat_map(|(_, checks)| checks.iter()),
        )
    }
}

const LOADS: &str = "observer_module_loads_total";
const INTEGRITY_COUNT: &str = "observer_module_integrity_check_duration_seconds_count";
const TAINTS: &str = "observer_kernel_taint_events_total";
const LOCKDOWN: &str = "observer_lockdown_decisions_total";
const ATTACHED: &str = "observer_probe_attached";
const TIMERS: &str = "observer_posix_timer_syscalls_total";
const LOAD_COUNT: &str = "observer_module_load_duration_seconds_count";
const PHASE_COUNT: &str = "observer_module_integrity_phase_duration_seconds_count";
const PHASE_SUM: &str = "observer_module_integrity_phase_duration_seconds_sum";
const INTEGRITY_SUM: &str = "observer_module_integrity_check_duration_seconds_sum";

const LOADED_SIGNED: Labels = &[("outcome", "loaded"), ("method", "signature")];
const LOADED_UNSIGNED: Labels = &[("outcome", "loaded"), ("method", "none")];
const SIGNATURE_OK: Labels = &[("method", "signature"), ("result", "ok")];
const MODULE_SIGNATURE_DENIED: Labels = &[("reason", "module_signature"), ("verdict", "denied")];
const ALL: Labels = &[];

/// The timed phases of a signature check lie within the whole check.
const PHASES_WITHIN_CHECK: Check = Check::SumAtMost(
    &[
        (PHASE_SUM, &[("phase", "parse")]),
        (PHASE_SUM, &[("phase", "digest")]),
        (PHASE_SUM, &[("phase", "key_lookup")]),
        (PHASE_SUM, &[("phase", "public_key_verify")]),
    ],
    (INTEGRITY_SUM, SIGNATURE_OK),
);

const BOTH: &[Series] = &[Series::V6_12, Series::V6_1];
const NEWEST: &[Series] = &[Series::V6_12];

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        host: None,
        name: "signed",
        about: "two signed modules load; each signature is verified; nothing taints",
        cmdline: "",
        kernels: BOTH,
        guest: "load /vm/mods/crc7.ko /vm/mods/crc-itu-t.ko\n\
                echo \"tainted=$(cat /proc/sys/kernel/tainted)\"\n",
        checks: &[
            Check::Console("finit_module crc7.ko rc=0"),
            Check::Console("finit_module crc-itu-t.ko rc=0"),
            Check::Console("tainted=0"),
            Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(2.0)),
            Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
            Check::Metric(INTEGRITY_COUNT, SIGNATURE_OK, Want::Eq(2.0)),
            Check::Metric(LOAD_COUNT, &[("outcome", "loaded")], Want::Eq(2.0)),
            Check::MetricSum(TAINTS, ALL, Want::ZeroOrAbsent),
            // One sample per phase that ran, per signed load; nothing decompressed.
            Check::Metric(PHASE_COUNT, &[("phase", "parse")], Want::Eq(2.0)),
            Check::Metric(PHASE_COUNT, &[("phase", "digest")], Want::Eq(2.0)),
            Check::Metric(PHASE_COUNT, &[("phase", "key_lookup")], Want::Eq(2.0)),
            Check::Metric(
                PHASE_COUNT,
                &[("phase", "public_key_verify")],
                Want::Eq(2.0),
            ),
            Check::Metric(PHASE_COUNT, &[("phase", "other")], Want::Eq(2.0)),
            Check::MetricSum(PHASE_COUNT, &[("phase", "decompress")], Want::ZeroOrAbsent),
            PHASES_WITHIN_CHECK,
            // And what a hash-based check would have cost, for each of them.
            Check::Metric(
                "observer_module_hash_check_estimate_seconds_count",
                ALL,
                Want::Eq(2.0),
            ),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "unsigned",
        about: "default boot: an unsigned module loads and taints the kernel with E",
        cmdline: "",
        kernels: BOTH,
        guest: "load /vm/mods/crc7-unsigned.ko\n\
                echo \"tainted=$(cat /proc/sys/kernel/tainted)\"\n\
                echo \"crc7 taint=$(cat /sys/module/crc7/taint)\"\n",
        checks: &[
            Check::Console("finit_module crc7-unsigned.ko rc=0"),
            Check::Console("tainted=8192"),
            Check::Console("crc7 taint=E"),
            Check::Console(
                "module verification failed: signature and/or required key missing - tainting kernel",
            ),
            Check::Metric(LOADS, LOADED_UNSIGNED, Want::Eq(1.0)),
            Check::MetricSum(LOADS, ALL, Want::Eq(1.0)),
            Check::Metric(TAINTS, &[("flag", "E"), ("module", "crc7")], Want::Eq(1.0)),
            Check::MetricSum(TAINTS, ALL, Want::Eq(1.0)),
            Check::MetricSum(LOCKDOWN, MODULE_SIGNATURE_DENIED, Want::ZeroOrAbsent),
            // No signature, so no integrity check and no phase of one.
            Check::MetricSum(INTEGRITY_COUNT, ALL, Want::ZeroOrAbsent),
            Check::MetricSum(PHASE_COUNT, ALL, Want::ZeroOrAbsent),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "lockdown-integrity",
        about: "lockdown=integrity: the unsigned module is refused by lockdown, a signed one loads",
        cmdline: "lockdown=integrity",
        kernels: BOTH,
        guest: "load /vm/mods/crc7-unsigned.ko /vm/mods/crc-itu-t.ko\n",
        checks: &[
            Check::Console("lockdown: none [integrity] confidentiality"),
            Check::Console("finit_module crc7-unsigned.ko errno=EPERM"),
            Check::Console("finit_module crc-itu-t.ko rc=0"),
            Check::Console("Lockdown: guest-tool: unsigned module loading is restricted"),
            Check::Metric(
                LOADS,
                &[("outcome", "rejected_lockdown"), ("method", "none")],
                Want::Eq(1.0),
            ),
            Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(1.0)),
            Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
            // One check, seen by fexit on security_locked_down.
            Check::Metric(LOCKDOWN, MODULE_SIGNATURE_DENIED, Want::Eq(1.0)),
            Check::Metric(
                ATTACHED,
                &[("probe", "lockdown_decision"), ("mechanism", "fexit")],
                Want::Eq(1.0),
            ),
            Check::MetricSum(TAINTS, ALL, Want::ZeroOrAbsent),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "sig-enforce",
        about: "module.sig_enforce=1: the unsigned module is refused by the signature check",
        cmdline: "module.sig_enforce=1",
        kernels: BOTH,
        guest: "load /vm/mods/crc7-unsigned.ko /vm/mods/crc-itu-t.ko\n",
        checks: &[
            Check::Console("finit_module crc7-unsigned.ko errno=EKEYREJECTED"),
            Check::Console("finit_module crc-itu-t.ko rc=0"),
            Check::Console("Loading of unsigned module is rejected"),
            Check::Metric(
                LOADS,
                &[("outcome", "rejected_signature"), ("method", "none")],
                Want::Eq(1.0),
            ),
            Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(1.0)),
            Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
            // Enforcement refuses before lockdown is asked.
            Check::MetricSum(LOCKDOWN, MODULE_SIGNATURE_DENIED, Want::ZeroOrAbsent),
            Check::MetricSum(TAINTS, ALL, Want::ZeroOrAbsent),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "compressed",
        about: "finit_module(MODULE_INIT_COMPRESSED_FILE) on a .ko.xz; without the flag it is not ELF",
        cmdline: "",
        kernels: BOTH,
        guest: "load /vm/mods/crc7.ko.xz\n\
                load --compressed /vm/mods/crc7.ko.xz\n",
        checks: &[
            // The signature check passes (unsigned, not enforced), then the ELF check refuses.
            Check::Console("finit_module crc7.ko.xz errno=ENOEXEC"),
            Check::Metric(
                LOADS,
                &[("outcome", "failed"), ("method", "none")],
                Want::Eq(1.0),
            ),
        ],
        kernel_checks: &[
            (
                Series::V6_12,
                &[
                    Check::Console("finit_module crc7.ko.xz compressed rc=0"),
                    Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(1.0)),
                    Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
                    Check::Metric(INTEGRITY_COUNT, SIGNATURE_OK, Want::Eq(1.0)),
                    // The kernel decompressed it: one decompress sample for the load.
                    Check::Metric(PHASE_COUNT, &[("phase", "decompress")], Want::Eq(1.0)),
                    Check::Metric(PHASE_COUNT, &[("phase", "digest")], Want::Eq(1.0)),
                ],
            ),
            (
                // No CONFIG_MODULE_DECOMPRESS: refused before load_module runs.
                Series::V6_1,
                &[
                    Check::Console("finit_module crc7.ko.xz compressed errno=EOPNOTSUPP"),
                    Check::MetricSum(LOADS, &[("outcome", "loaded")], Want::ZeroOrAbsent),
                ],
            ),
        ],
    },
    Scenario {
        host: None,
        name: "fentry-path",
        about: "the primary mechanisms attach; timer syscalls are counted exactly",
        cmdline: "",
        kernels: NEWEST,
        guest: "probes\n/vm/guest-tool timers 50\n",
        checks: &[
            Check::Console("PROBES-END rc=0"),
            Check::Console(
                "timers created=50 deleted=50 bad_create errno=EINVAL bad_delete errno=EINVAL",
            ),
            Check::Probes(&["security_locked_down", "fexit", " yes "]),
            Check::MetricSum(ATTACHED, &[("mechanism", "fexit")], Want::AtLeast(1.0)),
            Check::MetricSum(ATTACHED, &[("mechanism", "fentry")], Want::AtLeast(1.0)),
            Check::Metric(
                TIMERS,
                &[("syscall", "timer_create"), ("result", "ok")],
                Want::Eq(50.0),
            ),
            Check::Metric(
                TIMERS,
                &[("syscall", "timer_delete"), ("result", "ok")],
                Want::Eq(50.0),
            ),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "confidentiality",
        about: "lockdown=confidentiality: tracefs and kprobes are refused, the agent still serves",
        cmdline: "lockdown=confidentiality",
        kernels: NEWEST,
        guest: "probes\n",
        checks: &[
            Check::Console("lockdown: none integrity [confidentiality]"),
            Check::Console("AGENT-READY"),
            Check::Console("PROBES-END rc=0"),
            // Hooks that needed tracefs say so.
            Check::Probes(&["tracepoint", " no "]),
            Check::MetricSum(ATTACHED, &[("mechanism", "fexit")], Want::AtLeast(1.0)),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "hash-path",
        about: "Debian's kernel has no hash-based module integrity: reported absent, never timed",
        cmdline: "",
        kernels: NEWEST,
        guest: "probes\nload /vm/mods/crc7.ko\n",
        checks: &[
            Check::Console("PROBES-END rc=0"),
            Check::Console("finit_module crc7.ko rc=0"),
            Check::Probes(&["hash", " no "]),
            Check::MetricSum(INTEGRITY_COUNT, &[("method", "hash")], Want::ZeroOrAbsent),
            Check::Metric(INTEGRITY_COUNT, SIGNATURE_OK, Want::Eq(1.0)),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: None,
        name: "profile",
        about: "observer profile times integrity checks per module and estimates a hash-based check",
        cmdline: "",
        kernels: NEWEST,
        guest: "/observer profile --duration 20s --format json >/tmp/profile.json 2>/tmp/profile.err &\n\
                profile=$!\n\
                until grep -q watching /tmp/profile.err; do sleep 0.2; done\n\
                load /vm/mods/crc7.ko /vm/mods/crc-itu-t.ko /vm/mods/crc8.ko\n\
                kill -INT $profile; wait $profile; echo \"profile rc=$?\"\n\
                echo PROFILE-BEGIN; cat /tmp/profile.json; echo PROFILE-END\n",
        checks: &[
            Check::Console("profile rc=0"),
            Check::Console("\"module\": \"crc7\""),
            Check::Console("\"module\": \"crc_itu_t\""),
            Check::Console("\"module\": \"crc8\""),
            Check::Console("\"signature\": {"),
            Check::Console("\"digest\":"),
            // Debian's 6.12 package has thousands of modules: a 13-level Merkle tree.
            Check::Console("\"merkle_levels\": 13"),
            Check::Console("\"estimated_to_signature_ratio\":"),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: Some(dashboards_against_guest),
        name: "dashboards",
        about: "every dashboard panel and alert rule, through a real Prometheus scraping this guest",
        cmdline: "",
        kernels: NEWEST,
        guest: "load /vm/mods/crc7.ko /vm/mods/crc8-unsigned.ko\n\
                load --compressed /vm/mods/crc-itu-t.ko.xz\n\
                /vm/guest-tool timers 5\n",
        checks: &[
            Check::Console("finit_module crc7.ko rc=0"),
            Check::Console("finit_module crc8-unsigned.ko rc=0"),
            Check::Console("finit_module crc-itu-t.ko.xz compressed rc=0"),
            Check::MetricSum(LOADS, ALL, Want::Eq(3.0)),
        ],
        kernel_checks: &[],
    },
    Scenario {
        host: Some(super::bench_modules::module_path_report),
        name: "bench-modules",
        about: "benchmark (not a test): signed module load time without and with the observer, interleaved",
        cmdline: "",
        // Run by `cargo xtask bench` only.
        kernels: &[],
        // Detaching trampolines keeps the guest busy for seconds after the agent stops (and
        // attaching, after it starts): each side waits that out before its loads.
        guest: "for round in 1 2 3 4 5; do\n\
                kill -INT $agent_pid; wait $agent_pid; sleep 6\n\
                /vm/guest-tool loadtime without /vm/mods/crc7.ko /vm/mods/crc-itu-t.ko /vm/mods/crc8.ko\n\
                start_agent >/dev/null; sleep 6\n\
                /vm/guest-tool loadtime with /vm/mods/crc7.ko /vm/mods/crc-itu-t.ko /vm/mods/crc8.ko\n\
                done\n",
        checks: &[Check::Console("loadtime with crc8")],
        kernel_checks: &[],
    },
];

/// The dashboards' proof with the guest's agent as a second target: module panels need data.
fn dashboards_against_guest(guest: SocketAddr, _console: &str) -> anyhow::Result<()> {
    crate::dashboards::run_with_targets(&[guest.to_string()])
}

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
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
}
