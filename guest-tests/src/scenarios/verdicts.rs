//! Verdicts no flood can hide and no load path can skip: module loads during a timer storm on
//! every vCPU (the timer ring overflows, the security verdicts stay exact), and loads as a
//! distribution makes them (kmod's insmod and modprobe: init_module(2)), refused before
//! `load_module` (no CAP_SYS_MODULE, kernel.modules_disabled=1) or racing each other.
use std::net::SocketAddr;

use anyhow::ensure;
use serde_json::Value;

use super::{
    Check, EVERY_KERNEL, Scenario, Want,
    modules::{
        ALL, LOADED_SIGNED, LOADED_UNSIGNED, LOADS, LOCKDOWN, MODULE_SIGNATURE_DENIED, TAINTS,
    },
    stream::validated_events,
};

const SYSCALLS: &str = "observer_module_syscalls_total";
const LOST: &str = "observer_events_lost_total";
const MAP_FULL: &str = "observer_kernel_map_full_total";

/// The storm: two threads (one per vCPU) make timer pairs for 12 s against a timer ring of one
/// page, so its records are lost by the thousand; the loads run 3 s into it.
const STORM_GUEST: &str = "/vm/guest-tool timer-storm 12 2 &\n\
                           storm=$!\n\
                           sleep 3\n\
                           load /vm/mods/$M1.ko /vm/mods/$M2-unsigned.ko\n\
                           wait $storm\n\
                           echo \"tainted=$(cat /proc/sys/kernel/tainted)\"\n";

/// What holds under either boot: no security record lost, none mistaken for timer loss.
const SECURITY_RING_KEPT: &[Check] = &[
    Check::Console("timer-storm pairs="),
    Check::Console("finit_module {M1}.ko rc=0"),
    Check::Metric(LOST, &[("kind", "module_load")], Want::Eq(0.0)),
    Check::Metric(LOST, &[("kind", "taint")], Want::Eq(0.0)),
    Check::Metric(LOST, &[("kind", "timer_created")], Want::AtLeast(1.0)),
    Check::Metric(MAP_FULL, &[("map", "module_loads")], Want::Eq(0.0)),
    Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(1.0)),
    Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
    Check::Metric(
        SYSCALLS,
        &[("syscall", "finit_module"), ("result", "ok")],
        Want::AtLeast(1.0),
    ),
];

pub const STORM: Scenario = Scenario {
    judge: Some(storm_records_add_up),
    alone: false,
    agent_args: "--events.buffer-size 4096",
    before_agent: "",
    name: "storm",
    about: "a timer storm on every vCPU overflows the timer ring while a signed and an unsigned \
            module load: both verdicts and the unsigned one's taint are exact, and every timer \
            record is received or counted lost",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: STORM_GUEST,
    checks: &[
        SECURITY_RING_KEPT,
        &[
            Check::Console("finit_module {M2}-unsigned.ko rc=0"),
            Check::Console("tainted=8192"),
            Check::Metric(LOADS, LOADED_UNSIGNED, Want::Eq(1.0)),
            Check::Metric(
                TAINTS,
                &[("flag", "E"), ("module", "{M2.name}")],
                Want::Eq(1.0),
            ),
            Check::MetricSum(TAINTS, ALL, Want::Eq(1.0)),
        ],
    ],
    kernel_checks: &[],
};

pub const STORM_LOCKDOWN: Scenario = Scenario {
    judge: Some(storm_records_add_up),
    alone: false,
    agent_args: "--events.buffer-size 4096",
    before_agent: "",
    name: "storm-lockdown",
    about: "lockdown=integrity and a timer storm on every vCPU: the unsigned module's refusal and \
            lockdown's denial are exact, the signed load too",
    cmdline: "lockdown=integrity",
    kernels: EVERY_KERNEL,
    guest: STORM_GUEST,
    checks: &[
        SECURITY_RING_KEPT,
        &[
            Check::Console("finit_module {M2}-unsigned.ko errno=EPERM"),
            Check::Console("tainted=0"),
            Check::Metric(
                LOADS,
                &[
                    ("outcome", "rejected_lockdown"),
                    ("method", "none"),
                    ("reason", "lockdown"),
                ],
                Want::Eq(1.0),
            ),
            Check::Metric(LOCKDOWN, MODULE_SIGNATURE_DENIED, Want::Eq(1.0)),
            Check::Metric(LOST, &[("kind", "lockdown_decision")], Want::Eq(0.0)),
            Check::MetricSum(TAINTS, ALL, Want::ZeroOrAbsent),
        ],
    ],
    kernel_checks: &[],
};

/// Every timer create the kernel counted became a record the agent received or one counted
/// lost: the storm's loss is all accounted for. (Scraped after the storm has ended; the guest
/// makes no other timer syscalls.)
fn storm_records_add_up(addr: SocketAddr, _console: &str) -> anyhow::Result<()> {
    let (status, text) = testkit::http::get(addr, "/metrics", std::time::Duration::from_secs(10))?;
    ensure!(status == 200, "scraping the guest: HTTP {status}");
    let value = |name: &str, labels: &[(&str, &str)]| {
        testkit::prom::value(&text, name, labels).unwrap_or(0.0)
    };
    let creates = value(
        "observer_posix_timer_syscalls_total",
        &[("syscall", "timer_create"), ("result", "ok")],
    );
    let received = value("observer_events_total", &[("kind", "timer_created")]);
    let lost = value(LOST, &[("kind", "timer_created")]);
    println!("storm: {creates} creates, {received} records received, {lost} lost");
    ensure!(
        creates > 0.0 && received + lost == creates,
        "timer creates {creates} != records received {received} + lost {lost}"
    );
    Ok(())
}

/// Module files as modprobe finds them, and the scenario's steps. `insmod` and `modprobe` are
/// Debian's kmod (/usr/sbin): each decompresses the `.ko.xz` itself and calls init_module(2).
const LOAD_PATHS_GUEST: &str = "echo \"kernel $(uname -r)\"\n\
     m2=$(echo $M2 | tr - _)\n\
     extra=/lib/modules/$(uname -r)/extra\n\
     mkdir -p $extra && cp /vm/mods/$M2.ko.xz $extra/\n\
     /usr/sbin/depmod && echo depmod done\n\
     /usr/sbin/insmod /vm/mods/$M1.ko.xz && echo \"insmod $M1.ko.xz rc=0\"\n\
     /usr/sbin/modprobe $m2 && echo \"modprobe $m2 rc=0\"\n\
     load --uid 65534 /vm/mods/$M3.ko\n\
     load --threads 4 /vm/mods/$M3.ko\n\
     echo 1 >/proc/sys/kernel/modules_disabled && echo modules disabled\n\
     load /vm/mods/$M1-unsigned.ko\n\
     /usr/sbin/insmod /vm/mods/$M2.ko.xz || echo \"insmod $M2.ko.xz refused\"\n\
     sleep 2; echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n";

pub const LOAD_PATHS: Scenario = Scenario {
    judge: Some(check_duplicates),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "load-paths",
    about: "kmod's insmod and modprobe (init_module), an unprivileged caller, four racing \
            finit_module calls of one file, then kernel.modules_disabled=1: every attempt counted \
            with its outcome",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: LOAD_PATHS_GUEST,
    checks: &[&[
        Check::Console("depmod done"),
        Check::Console("insmod {M1}.ko.xz rc=0"),
        Check::Console("modprobe {M2.name} rc=0"),
        Check::Console("finit_module {M3}.ko errno=EPERM"),
        Check::Console("finit_module {M3}.ko rc=0"),
        Check::Console("modules disabled"),
        Check::Console("finit_module {M1}-unsigned.ko errno=EPERM"),
        Check::Console("insmod {M2}.ko.xz refused"),
        // insmod's, modprobe's and the race's winner: signatures verified.
        Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(3.0)),
        // The race's three others (waiting on the winner, or finding its module loaded).
        Check::MetricSum(LOADS, &[("outcome", "duplicate")], Want::Eq(3.0)),
        // uid 65534, and both calls once modules are disabled: refused in may_init_module.
        Check::Metric(
            LOADS,
            &[
                ("outcome", "rejected_permission"),
                ("method", "none"),
                ("reason", "permission"),
            ],
            Want::Eq(3.0),
        ),
        Check::MetricSum(LOADS, ALL, Want::Eq(9.0)),
        Check::Metric(
            SYSCALLS,
            &[("syscall", "init_module"), ("result", "ok")],
            Want::Eq(2.0),
        ),
        Check::Metric(
            SYSCALLS,
            &[("syscall", "init_module"), ("result", "eperm")],
            Want::Eq(1.0),
        ),
        Check::Metric(
            SYSCALLS,
            &[("syscall", "finit_module"), ("result", "eperm")],
            Want::Eq(2.0),
        ),
        Check::MetricSum(SYSCALLS, &[("syscall", "finit_module")], Want::Eq(6.0)),
        Check::Metric("observer_modules_disabled", ALL, Want::Eq(1.0)),
        Check::MetricSum(TAINTS, ALL, Want::ZeroOrAbsent),
    ]],
    kernel_checks: &[],
};

/// The race's three losers as the stream prints them: duplicates that waited on the winner
/// (6.6+: no check of their own), or on 5.10 and 6.1, where each call loads for itself, ones whose own
/// signature check passed before the kernel found the module loaded.
fn check_duplicates(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let duplicates: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "module_load" && e["outcome"] == "duplicate")
        .collect();
    let (method, reason) = if console.contains("kernel 6.1.") || console.contains("kernel 5.10.") {
        ("signature", "verified")
    } else {
        ("none", "none")
    };
    ensure!(
        duplicates.len() == 3
            && duplicates
                .iter()
                .all(|e| e["reason"] == reason && e["method"] == method),
        "want three duplicates, {method}/{reason}, got {duplicates:?}"
    );
    println!("vm: load-paths: {}", duplicates[0]);
    Ok(())
}
