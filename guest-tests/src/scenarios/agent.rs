//! The agent itself: which mechanisms attach, what it still does under
//! `lockdown=confidentiality`, `observer profile`, and the dashboards against a guest.
use super::{
    CURRENT, Check, Scenario, Want,
    modules::{ALL, ATTACHED, LOADS, LOCKDOWN_GUEST, LOCKDOWN_REFUSES_UNSIGNED, TAINTS},
    timers,
};
use crate::Series;

const TIMERS: &str = "observer_posix_timer_syscalls_total";

pub const FENTRY_PATH: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "fentry-path",
    about: "the primary mechanisms attach; timer syscalls are counted exactly",
    cmdline: "",
    kernels: CURRENT,
    guest: "probes\n/vm/guest-tool timers 50\n",
    checks: &[&[
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
    ]],
    kernel_checks: &[],
};

/// The same actions and the same checks as `lockdown-integrity`: confidentiality includes
/// integrity, and the observer is meant to see as much under it.
pub const CONFIDENTIALITY: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "confidentiality",
    about: "lockdown=confidentiality: tracefs, kprobes and kernel reads are refused; loads, \
            lockdown decisions and timer life cycles are seen as under integrity",
    cmdline: "lockdown=confidentiality",
    kernels: CURRENT,
    guest: LOCKDOWN_GUEST,
    checks: &[
        &[
            Check::Console("lockdown: none integrity [confidentiality]"),
            Check::Console("AGENT-READY"),
            Check::Console("PROBES-END rc=0"),
            // Lockdown's decisions come from fexit, which needs neither tracefs nor kernel reads.
            Check::Probes(&["lockdown_decision", "fexit", " yes "]),
            Check::MetricSum(ATTACHED, &[("mechanism", "fexit")], Want::AtLeast(1.0)),
        ],
        LOCKDOWN_REFUSES_UNSIGNED,
        timers::LIFE_CALLS,
        timers::LIFE_WITHOUT_USER_READS,
    ],
    kernel_checks: &[],
};

pub const PROFILE: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "profile",
    about: "observer profile times integrity checks per module and estimates a hash-based check",
    cmdline: "",
    kernels: CURRENT,
    guest: "start_profile --duration 20s --format json\n\
            load /vm/mods/$M1.ko /vm/mods/$M2.ko /vm/mods/$M3.ko\n\
            stop_profile\n",
    checks: &[&[
        Check::Console("profile rc=0"),
        Check::Console("\"module\": \"{M1.name}\""),
        Check::Console("\"module\": \"{M2.name}\""),
        Check::Console("\"module\": \"{M3.name}\""),
        Check::Console("\"signature\": {"),
        Check::Console("\"digest\":"),
        // Debian's packages have 4,096 to 8,191 modules each: a 13-level Merkle tree.
        Check::Console("\"merkle_levels\": 13"),
        Check::Console("\"estimated_to_signature_ratio\":"),
    ]],
    kernel_checks: &[],
};

pub const DASHBOARDS: Scenario = Scenario {
    judge: None,
    alone: false,
    // The hash-check estimate's panel needs the research instruments.
    agent_args: "--modules.research",
    before_agent: "",
    name: "dashboards",
    about: "every dashboard panel and alert rule, through a real Prometheus scraping this guest",
    cmdline: "",
    // A real Prometheus run costs a minute: once, on the newest kernel.
    kernels: &[Series::V7_3],
    // Last, a load IMA appraisal refuses (a wrong digest), for the IMA panels and alert.
    guest: "load /vm/mods/$M1.ko /vm/mods/$M3-unsigned.ko\n\
            load --compressed /vm/mods/$M2.ko.xz\n\
            /vm/guest-tool timers 5\n\
            cp /vm/mods/$M1.ko /tmp/ima-$M1.ko\n\
            /vm/guest-tool ima-digest --wrong /tmp/ima-$M1.ko\n\
            echo 'appraise func=MODULE_CHECK' >/sys/kernel/security/ima/policy\n\
            load /tmp/ima-$M1.ko\n",
    checks: &[&[
        Check::Console("finit_module {M1}.ko rc=0"),
        Check::Console("finit_module {M3}-unsigned.ko rc=0"),
        Check::Console("finit_module {M2}.ko.xz compressed rc=0"),
        Check::Console("finit_module ima-{M1}.ko errno=EACCES"),
        Check::MetricSum(LOADS, ALL, Want::Eq(4.0)),
        Check::Metric(
            TAINTS,
            &[("flag", "E"), ("module", "{M3.name}")],
            Want::Eq(1.0),
        ),
    ]],
    kernel_checks: &[],
};

pub const BENCH_MODULES: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "bench-modules",
    about: "benchmark (not a test): signed module load time without and with the observer, interleaved",
    cmdline: "",
    // Run by `cargo xtask bench` only.
    kernels: &[],
    // Detaching trampolines keeps the guest busy for seconds after the agent stops (and
    // attaching, after it starts): each side waits that out before its loads.
    // The kernel's BPF statistics time the module programs' own runs in each round (a
    // restarted agent's programs start from zero).
    guest: "echo 1 >/proc/sys/kernel/bpf_stats_enabled\n\
            for round in 1 2 3 4 5; do\n\
            kill -INT $agent_pid; wait $agent_pid; sleep 6\n\
            /vm/guest-tool loadtime without /vm/mods/$M1.ko /vm/mods/$M2.ko /vm/mods/$M3.ko\n\
            start_agent >/dev/null; sleep 6\n\
            /vm/guest-tool loadtime with /vm/mods/$M1.ko /vm/mods/$M2.ko /vm/mods/$M3.ko\n\
            /vm/guest-tool bpf-stats modules_\n\
            done\n",
    checks: &[&[Check::Console("loadtime with {M3.name}")]],
    kernel_checks: &[],
};

pub const BENCH_TIMERS: Scenario = Scenario {
    judge: None,
    alone: false,
    agent_args: "",
    before_agent: "",
    name: "bench-timers",
    about: "benchmark (not a test): timer pairs and unwatched getppid with the observer on fentry/fexit, \
            without it, on the syscall tracepoints and with --timers.counts-only, interleaved, with \
            the programs' own time",
    cmdline: "",
    // Run by `cargo xtask bench` only.
    kernels: &[],
    // Each side waits out the trampolines' attach and detach work (seconds under TCG).
    guest: "echo 1 >/proc/sys/kernel/bpf_stats_enabled\n\
            measure() {\n\
                /vm/guest-tool bpf-stats timers_ | sed \"s/^/$1 before /\"\n\
                /vm/guest-tool timer-pairs 20000 | sed \"s/^/$1 /\"\n\
                /vm/guest-tool bpf-stats timers_ | sed \"s/^/$1 after /\"\n\
                /vm/guest-tool getppid 200000 | sed \"s/^/$1 /\"\n\
            }\n\
            for round in 1 2 3 4 5; do\n\
                sleep 6; measure fentry\n\
                stop_agent; sleep 6\n\
                measure bare\n\
                start_agent --timers.hook tracepoint >/dev/null; sleep 6\n\
                measure tracepoint\n\
                stop_agent; start_agent --timers.counts-only >/dev/null; sleep 6\n\
                measure counts\n\
                stop_agent; start_agent >/dev/null\n\
            done\n",
    checks: &[&[Check::Console("counts getppid 200000 ns=")]],
    kernel_checks: &[],
};
