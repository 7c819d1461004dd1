//! Module loading and its integrity checks: signatures, taint, lockdown and enforcement,
//! compressed modules, the absent hash-based path.
use std::net::SocketAddr;

use anyhow::ensure;

use super::{
    CURRENT, Check, EVERY_KERNEL, Labels, Scenario, Want,
    stream::{the_load_with_reason, validated_events},
    timers,
};
use crate::Series;

pub const LOADS: &str = "observer_module_loads_total";
pub const INTEGRITY_COUNT: &str = "observer_module_integrity_check_duration_seconds_count";
pub const TAINTS: &str = "observer_kernel_taint_events_total";
pub const LOCKDOWN: &str = "observer_lockdown_decisions_total";
pub const OWN_CHECKS: &str = "observer_lockdown_own_checks_total";
pub const ATTACHED: &str = "observer_probe_attached";
pub const LOAD_COUNT: &str = "observer_module_load_duration_seconds_count";
pub const PHASE_COUNT: &str = "observer_module_integrity_phase_duration_seconds_count";
pub const PHASE_SUM: &str = "observer_module_integrity_phase_duration_seconds_sum";
pub const INTEGRITY_SUM: &str = "observer_module_integrity_check_duration_seconds_sum";

pub const LOADED_SIGNED: Labels = &[
    ("outcome", "loaded"),
    ("method", "signature"),
    ("reason", "verified"),
];
pub const LOADED_UNSIGNED: Labels = &[
    ("outcome", "loaded"),
    ("method", "none"),
    ("reason", "unsigned"),
];
pub const SIGNATURE_OK: Labels = &[("method", "signature"), ("result", "ok")];
pub const MODULE_SIGNATURE_DENIED: Labels =
    &[("reason", "module_signature"), ("verdict", "denied")];
pub const ALL: Labels = &[];

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

pub const SIGNED: Scenario = Scenario {
    judge: None,
    alone: false,
    // With the research instruments (off by default), whose estimate it checks.
    agent_args: "--modules.research",
    before_agent: "",
    name: "signed",
    about: "two signed modules load; each signature is verified; nothing taints",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "load /vm/mods/$M1.ko /vm/mods/$M2.ko\n\
            echo \"tainted=$(cat /proc/sys/kernel/tainted)\"\n",
    checks: &[&[
        Check::Console("finit_module {M1}.ko rc=0"),
        Check::Console("finit_module {M2}.ko rc=0"),
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
        // No process but the agent's loaded a program: the verifier's questions as the
        // agent's programs loaded (may they read kernel memory?) are its own, counted apart.
        Check::MetricSum(LOCKDOWN, &[("reason", "bpf_read")], Want::ZeroOrAbsent),
        Check::Metric(OWN_CHECKS, ALL, Want::AtLeast(1.0)),
    ]],
    kernel_checks: &[
        (&[Series::V5_10], POLICY_STEP_INLINED),
        (&[Series::V5_10], WITHOUT_IMA),
    ],
};

/// Debian 11's kernel has no IMA: its probes are not attached, and no IMA check is reported.
const WITHOUT_IMA: &[Check] = &[
    Check::Console("probe module_ima_digest: fentry+fexit unavailable"),
    Check::Metric(
        ATTACHED,
        &[
            ("probe", "module_ima_digest"),
            ("mechanism", "fentry+fexit"),
        ],
        Want::Eq(0.0),
    ),
    Check::Metric(
        ATTACHED,
        &[
            ("probe", "module_ima_appraise"),
            ("mechanism", "fentry+fexit"),
        ],
        Want::Eq(0.0),
    ),
    Check::Metric(
        ATTACHED,
        &[("probe", "module_ima_load_data"), ("mechanism", "fexit")],
        Want::Eq(0.0),
    ),
    Check::MetricSum(
        INTEGRITY_COUNT,
        &[("method", "ima_hash")],
        Want::ZeroOrAbsent,
    ),
    Check::MetricSum(LOADS, &[("outcome", "rejected_ima")], Want::ZeroOrAbsent),
];

/// Before 5.19 `module_sig_check` is inlined into `load_module`: its probe says so (attached
/// 0, a warning), and outcomes come from `load_module`'s result, the rest as on later kernels.
pub const POLICY_STEP_INLINED: &[Check] = &[
    Check::Console(
        "probe module_sig_check: fentry+fexit unavailable: module_sig_check is not a traceable \
         function in this kernel",
    ),
    Check::Metric(
        ATTACHED,
        &[("probe", "module_sig_check"), ("mechanism", "fentry+fexit")],
        Want::Eq(0.0),
    ),
    Check::Metric(
        ATTACHED,
        &[("probe", "module_load"), ("mechanism", "fentry+fexit")],
        Want::Eq(1.0),
    ),
    // find_asymmetric_key has four arguments there: its own exit program reads the key.
    Check::Metric(
        ATTACHED,
        &[
            ("probe", "module_sig_key_lookup"),
            ("mechanism", "fentry+fexit"),
        ],
        Want::Eq(1.0),
    ),
];

pub const UNSIGNED: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "unsigned",
    about: "default boot: an unsigned module loads and taints the kernel with E",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "load /vm/mods/$M1-unsigned.ko\n\
            echo \"tainted=$(cat /proc/sys/kernel/tainted)\"\n\
            echo \"$M1 taint=$(cat /sys/module/$(echo $M1 | tr - _)/taint)\"\n",
    checks: &[&[
        Check::Console("finit_module {M1}-unsigned.ko rc=0"),
        Check::Console("tainted=8192"),
        Check::Console("{M1} taint=E"),
        Check::Console(
            "module verification failed: signature and/or required key missing - tainting kernel",
        ),
        Check::Metric(LOADS, LOADED_UNSIGNED, Want::Eq(1.0)),
        Check::MetricSum(LOADS, ALL, Want::Eq(1.0)),
        Check::Metric(
            TAINTS,
            &[("flag", "E"), ("module", "{M1.name}")],
            Want::Eq(1.0),
        ),
        Check::MetricSum(TAINTS, ALL, Want::Eq(1.0)),
        Check::MetricSum(LOCKDOWN, MODULE_SIGNATURE_DENIED, Want::ZeroOrAbsent),
        // No signature, so no integrity check and no phase of one.
        Check::MetricSum(INTEGRITY_COUNT, ALL, Want::ZeroOrAbsent),
        Check::MetricSum(PHASE_COUNT, ALL, Want::ZeroOrAbsent),
    ]],
    kernel_checks: &[],
};

/// The lockdown scenarios' guest script: the attach table, an unsigned load refused by lockdown
/// and a signed one loaded, then the timer life cycles; the same under `lockdown=integrity` and
/// `lockdown=confidentiality` (which includes integrity), so their checks are the same too.
macro_rules! lockdown_guest {
    () => {
        "probes\nload /vm/mods/$M1-unsigned.ko /vm/mods/$M2.ko\n/vm/guest-tool timer-life\n"
    };
}
pub const LOCKDOWN_GUEST: &str = lockdown_guest!();
pub const LOCKDOWN_REFUSES_UNSIGNED: &[Check] = &[
    Check::Console("finit_module {M1}-unsigned.ko errno=EPERM"),
    Check::Console("finit_module {M2}.ko rc=0"),
    Check::Metric(
        LOADS,
        &[
            ("outcome", "rejected_lockdown"),
            ("method", "none"),
            ("reason", "lockdown"),
        ],
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
];

pub const LOCKDOWN_INTEGRITY: Scenario = Scenario {
    judge: Some(check_lockdown_event),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "lockdown-integrity",
    about: "lockdown=integrity: the unsigned module is refused by lockdown, a signed one loads; \
            timer life cycles",
    cmdline: "lockdown=integrity",
    kernels: EVERY_KERNEL,
    guest: concat!(
        lockdown_guest!(),
        "sleep 2\necho EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n"
    ),
    checks: &[
        &[
            Check::Console("lockdown: none [integrity] confidentiality"),
            // The kernel's own word for the refusal. Not checked under confidentiality: there
            // its lockdown messages are rate-limited (10 in 5 s) and the agent's start, whose
            // feature probes read kernel memory, is refused a few times just before.
            Check::Console("Lockdown: guest-tool: unsigned module loading is restricted"),
            // The default agent runs no research instrument: no estimate for the signed load,
            // no probe-gap program.
            Check::MetricSum(
                "observer_module_hash_check_estimate_seconds_count",
                ALL,
                Want::ZeroOrAbsent,
            ),
            Check::MetricSum(
                "observer_probe_attached",
                &[("probe", "module_probe_gap")],
                Want::ZeroOrAbsent,
            ),
        ],
        LOCKDOWN_REFUSES_UNSIGNED,
        timers::LIFE_CALLS,
        timers::LIFE,
        timers::LIFE_TOTALS,
        timers::UNTIMED,
    ],
    kernel_checks: &[],
};

/// The refused load's event, as the stream prints it: refused by lockdown, before any signature
/// check (the module carries none), named after its file.
fn check_lockdown_event(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let refused = the_load_with_reason(&events, "lockdown")?;
    ensure!(
        refused["outcome"] == "rejected_lockdown"
            && refused["method"] == "none"
            && refused["result"] == "eperm"
            && refused["comm"] == "guest-tool"
            && refused.get("digest").is_none()
            && refused.get("signer").is_none(),
        "{refused}"
    );
    println!("vm: lockdown-integrity: {refused}");
    Ok(())
}

pub const SIG_ENFORCE: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "sig-enforce",
    about: "module.sig_enforce=1: the unsigned module is refused by the signature check",
    cmdline: "module.sig_enforce=1",
    kernels: EVERY_KERNEL,
    guest: "load /vm/mods/$M1-unsigned.ko /vm/mods/$M2.ko\n",
    checks: &[&[
        Check::Console("finit_module {M1}-unsigned.ko errno=EKEYREJECTED"),
        Check::Console("finit_module {M2}.ko rc=0"),
        Check::Console("Loading of unsigned module is rejected"),
        Check::Metric(
            LOADS,
            &[
                ("outcome", "rejected_signature"),
                ("method", "none"),
                ("reason", "enforced"),
            ],
            Want::Eq(1.0),
        ),
        Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(1.0)),
        Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
        // Enforcement refuses before lockdown is asked.
        Check::MetricSum(LOCKDOWN, MODULE_SIGNATURE_DENIED, Want::ZeroOrAbsent),
        Check::MetricSum(TAINTS, ALL, Want::ZeroOrAbsent),
    ]],
    kernel_checks: &[],
};

pub const COMPRESSED: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "compressed",
    about: "finit_module(MODULE_INIT_COMPRESSED_FILE) on a .ko.xz; without the flag it is not ELF",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "load /vm/mods/$M1.ko.xz\n\
            load --compressed /vm/mods/$M1.ko.xz\n",
    checks: &[&[
        // The signature check passes (unsigned, not enforced), then the ELF check refuses.
        Check::Console("finit_module {M1}.ko.xz errno=ENOEXEC"),
    ]],
    kernel_checks: &[
        (
            // CONFIG_MODULE_DECOMPRESS.
            CURRENT,
            &[
                Check::Console("finit_module {M1}.ko.xz compressed rc=0"),
                Check::MetricSum(
                    LOADS,
                    &[("outcome", "failed"), ("method", "none")],
                    Want::Eq(1.0),
                ),
                Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(1.0)),
                Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
                Check::Metric(INTEGRITY_COUNT, SIGNATURE_OK, Want::Eq(1.0)),
                // The kernel decompressed it: one decompress sample for the load.
                Check::Metric(PHASE_COUNT, &[("phase", "decompress")], Want::Eq(1.0)),
                Check::Metric(PHASE_COUNT, &[("phase", "digest")], Want::Eq(1.0)),
            ],
        ),
        (
            // No CONFIG_MODULE_DECOMPRESS: refused after the read, before load_module runs,
            // and counted failed at finit_module's exit (with the ELF refusal: two).
            &[Series::V6_1],
            &[Check::Console(
                "finit_module {M1}.ko.xz compressed errno=EOPNOTSUPP",
            )],
        ),
        (&[Series::V6_1, Series::V5_10], NOT_DECOMPRESSED),
        (
            // Before 5.17 finit_module knows no MODULE_INIT_COMPRESSED_FILE: EINVAL before the
            // read, counted failed at the syscall's exit.
            &[Series::V5_10],
            &[
                Check::Console("finit_module {M1}.ko.xz compressed errno=EINVAL"),
                Check::MetricSum(PHASE_COUNT, &[("phase", "decompress")], Want::ZeroOrAbsent),
            ],
        ),
    ],
};

/// Where the kernel does not decompress modules: both attempts failed (the flag refused, and
/// the compressed bytes not ELF), only the one without the flag reaching `load_module`.
const NOT_DECOMPRESSED: &[Check] = &[
    Check::MetricSum(
        LOADS,
        &[("outcome", "failed"), ("method", "none")],
        Want::Eq(2.0),
    ),
    Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
    Check::MetricSum(LOAD_COUNT, ALL, Want::Eq(1.0)),
    Check::MetricSum(LOADS, &[("outcome", "loaded")], Want::ZeroOrAbsent),
];

pub const HASH_PATH: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "hash-path",
    about: "Debian's kernels have no hash-based module integrity: reported absent, never timed",
    cmdline: "",
    kernels: CURRENT,
    guest: "probes\nload /vm/mods/$M1.ko\n",
    checks: &[&[
        Check::Console("PROBES-END rc=0"),
        Check::Console("finit_module {M1}.ko rc=0"),
        Check::Probes(&["hash", " no "]),
        Check::MetricSum(INTEGRITY_COUNT, &[("method", "hash")], Want::ZeroOrAbsent),
        Check::Metric(INTEGRITY_COUNT, SIGNATURE_OK, Want::Eq(1.0)),
    ]],
    kernel_checks: &[],
};
