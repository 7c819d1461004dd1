//! Who asked for an autoload: an unprivileged process in a container's cgroup opens an AF_CAN
//! socket, so the kernel asks for `net-pf-29` (modprobe loads `can`) and then for `can-proto-1`
//! (`can_raw`). Each load is modprobe's (uid 0, in the root cgroup); its event names the process
//! that asked, its uid, cgroup and container, and the alias it asked for.
use std::net::SocketAddr;

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{
    Check, EVERY_KERNEL, Scenario, Want,
    modules::{ALL, LOADED_SIGNED, LOADS},
    stream::validated_events,
};

/// A container's scope as systemd names Docker's (the ID is 64 hex digits).
macro_rules! container_id {
    () => {
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    };
}
const CONTAINER_ID: &str = container_id!();
const ASKER_UID: u64 = 65534;

/// The kernel's modprobe is Debian's kmod (under /usr/sbin here), over a module tree holding
/// the CAN modules; the asker runs in the container's cgroup as nobody.
const GUEST: &str = concat!(
    "echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe\n\
    can=/lib/modules/$(uname -r)/kernel/net/can\n\
    mkdir -p $can && cp /vm/autoload/* $can/ && /usr/sbin/depmod && echo depmod done\n\
    mount -t cgroup2 none /sys/fs/cgroup\n\
    scope=/sys/fs/cgroup/system.slice/docker-",
    container_id!(),
    ".scope\n\
    mkdir -p $scope\n\
    (echo 0 >$scope/cgroup.procs && /vm/guest-tool socket --uid 65534 29 3 1)\n\
    grep -oE '^can(_raw)? ' /proc/modules | sed 's/^/present /'\n\
    sleep 2\n\
    echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n"
);

pub const AUTOLOAD: Scenario = Scenario {
    judge: Some(check_requesters),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "autoload",
    about: "an unprivileged socket(AF_CAN) in a container's cgroup autoloads can and can_raw \
            through modprobe: each load names the asking process, uid, cgroup, container and alias",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: GUEST,
    checks: &[&[
        Check::Console("depmod done"),
        Check::Console("socket by pid "),
        Check::Console("present can "),
        Check::Console("present can_raw "),
        Check::Metric(LOADS, LOADED_SIGNED, Want::Eq(2.0)),
        Check::MetricSum(LOADS, ALL, Want::Eq(2.0)),
        // The kernel may ask for more (crypto templates, from inside the first signature check).
        Check::Metric(
            "observer_module_autoload_requests_total",
            ALL,
            Want::AtLeast(2.0),
        ),
    ]],
    kernel_checks: &[],
};

fn check_requesters(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let asker: u64 = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("socket by pid "))
        .and_then(|pid| pid.trim().parse().ok())
        .context("no `socket by pid` line")?;
    let requested: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "module_load" && e.get("requested_by").is_some())
        .collect();
    ensure!(
        requested.len() == 2,
        "want two loads asked for, got {requested:?}"
    );
    let cgroup = format!("/system.slice/docker-{CONTAINER_ID}.scope");
    for (module, alias) in [("can", "net-pf-29"), ("can_raw", "can-proto-1")] {
        let load = requested
            .iter()
            .find(|e| e["module"] == module)
            .with_context(|| format!("no requested load of {module} in {requested:?}"))?;
        let by = &load["requested_by"];
        ensure!(
            load["outcome"] == "loaded"
                && load["reason"] == "verified"
                && load["comm"] == "modprobe"
                && load["uid"] == 0
                && load["cgroup"] == "/"
                && load.get("container_id").is_none(),
            "the load itself is modprobe's: {load}"
        );
        ensure!(
            by["request"] == alias
                && by["pid"] == asker
                && by["uid"] == ASKER_UID
                && by["comm"] == "guest-tool"
                && by["cgroup"] == cgroup.as_str()
                && by["container_id"] == CONTAINER_ID,
            "{module}: want {alias} asked by pid {asker} (uid {ASKER_UID}) in {cgroup}: {load}"
        );
        println!("vm: autoload: {load}");
    }
    Ok(())
}
