//! The agent as a user meets it: probes, the HTTP endpoint, signals, and bad input (a clear
//! message and a non-zero exit, never a panic).

#[path = "support/features.rs"]
mod features;
mod support;

use std::{
    net::TcpListener,
    process::{Command, Output},
};

use support::{Agent, OBSERVER, free_port, http_request};

fn run(command: &mut Command) -> (i32, String) {
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A command expected to fail must fail promptly, not serve forever.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(!stderr.contains("panicked"), "a panic: {stderr}");
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn probes_lists_every_hook_with_its_mechanism() {
    support::require_root();
    let out = Command::new(OBSERVER).arg("probes").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for probe in [
        "timer_syscalls",
        "timer_owner_exit",
        "timer_owner_exec",
        "lockdown_decision",
    ] {
        let attached = text.lines().any(|l| {
            l.starts_with(&format!("{probe} ")) && l.split_whitespace().nth(2) == Some("yes")
        });
        assert!(attached, "{probe} not attached:\n{text}");
    }
    // fexit is preferred for lockdown: where this kernel refuses it, probes says so and why.
    let fexit = text
        .lines()
        .find(|l| l.starts_with("lockdown_decision") && l.contains("fexit"))
        .expect("the fexit option is listed");
    if fexit.split_whitespace().nth(2) == Some("no") {
        assert!(
            fexit.contains("refused") || fexit.contains("not"),
            "no reason given: {fexit}"
        );
        assert!(text.lines().any(|l| l.starts_with("lockdown_decision")
            && l.contains("tracepoint")
            && l.contains("yes")));
    }
}

#[test]
fn without_module_support_the_module_probes_say_so() {
    support::require_root();
    if !features::kernel_has(
        "kernel-without-modules",
        !std::path::Path::new("/proc/modules").exists(),
        "this kernel has module support; the VM scenarios cover the module probes",
    ) {
        return;
    }
    let out = Command::new(OBSERVER).arg("probes").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for probe in [
        "module_load",
        "module_sig_check",
        "module_verify_sig",
        "module_hash_check",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{probe} ")))
            .unwrap_or_else(|| panic!("{probe} missing:\n{text}"));
        assert!(
            line.contains(" no ") && line.contains("no module support"),
            "{line}"
        );
    }
}

#[test]
fn endpoint_serves_metrics_health_and_refuses_the_rest() {
    let agent = Agent::start(&["--web.telemetry-path", "/custom"]);
    assert_eq!(
        http_request(agent.addr, "GET", "/healthz").unwrap(),
        (200, "ok\n".into())
    );
    let (status, body) = http_request(agent.addr, "GET", "/custom").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("observer_build_info{"), "{body}");
    assert!(
        body.contains(
            "observer_probe_attached{probe=\"timer_syscalls\",mechanism=\"tracepoint\"} 1"
        ),
        "{body}"
    );
    assert_eq!(http_request(agent.addr, "GET", "/metrics").unwrap().0, 404);
    assert_eq!(http_request(agent.addr, "POST", "/custom").unwrap().0, 405);
    assert_eq!(agent.stop(), 0);
}

#[test]
fn sigint_exits_zero() {
    let agent = Agent::start(&[]);
    // SAFETY: signals our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGINT) };
    let mut agent = agent;
    assert_eq!(agent.child.wait().unwrap().code(), Some(0));
}

#[test]
fn an_invalid_listen_address_is_refused() {
    let (code, stderr) =
        run(Command::new(OBSERVER).args(["--web.listen-address", "not-an-address"]));
    assert_ne!(code, 0);
    assert!(stderr.contains("--web.listen-address"), "{stderr}");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    support::require_root();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run(Command::new(OBSERVER).args(["--web.listen-address", &addr]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("in use"),
        "{stderr}"
    );
}

#[test]
fn without_root_it_says_what_it_needs() {
    let port = free_port().to_string();
    let (code, stderr) = run(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        OBSERVER,
        "--web.listen-address",
        &format!("127.0.0.1:{port}"),
    ]));
    assert_eq!(code, 1);
    assert!(stderr.contains("must run as root"), "{stderr}");
}

/// A private mount namespace where /sys/kernel is an empty read-only tmpfs: no tracefs, nowhere
/// to mount one, and no BTF.
fn in_namespace_without_tracefs(args: &str) -> Command {
    let script = format!("mount -t tmpfs -o ro none /sys/kernel && exec {OBSERVER} {args}");
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    command
}

#[test]
fn without_tracefs_it_says_how_to_mount_it() {
    support::require_root();
    // The hooks that need tracefs say why, with the command to fix it; the timer syscalls
    // fall back to raw tracepoints, which need no tracefs.
    let out = in_namespace_without_tracefs("probes").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Its tracepoint fallback's line (fentry, where tried first, fails for its own reason).
    let owner_exit = text
        .lines()
        .find(|l| l.starts_with("timer_owner_exit") && l.contains("tracepoint"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        owner_exit.contains(" no ")
            && owner_exit.contains("tracefs is not mounted")
            && owner_exit.contains("mount -t tracefs"),
        "{owner_exit}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("timer_syscalls")
            && l.contains("raw_tracepoint")
            && l.contains(" yes ")),
        "{text}"
    );
    // --strict makes every lost hook fatal: one clear message and a non-zero exit.
    let port = free_port();
    let (code, stderr) = run(&mut in_namespace_without_tracefs(&format!(
        "--strict --web.listen-address 127.0.0.1:{port}"
    )));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--strict: probes not attached") && stderr.contains("mount -t tracefs"),
        "{stderr}"
    );
}

#[test]
fn bad_flag_values_are_refused() {
    for args in [
        ["--timers.short-lived", "10"],
        ["--timers.top-processes", "0"],
        ["--web.telemetry-path", "metrics"],
        ["--events", "xml"],
    ] {
        let (code, stderr) = run(Command::new(OBSERVER).args(args));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(args[0]), "{args:?}: {stderr}");
    }
}

#[test]
fn a_cgroup_root_must_be_cgroup2_and_comes_with_events() {
    let (code, stderr) =
        run(Command::new(OBSERVER).args(["--events", "json", "--cgroup.root", "/proc"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "invalid value '/proc' for '--cgroup.root <PATH>': /proc is not a cgroup2 mount \
             (its file system's magic is 0x9fa0, cgroup2's 0x63677270)"
        ),
        "{stderr}"
    );
    // A real cgroup2 mount, but no events to name cgroups in.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cgroup2 = mountinfo
        .lines()
        .find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ")
                .then(|| mount.split_whitespace().nth(4))?
        })
        .expect("a cgroup2 mount");
    let (code, stderr) = run(Command::new(OBSERVER).args(["--cgroup.root", cgroup2]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--events <EVENTS>"), "{stderr}");
}

/// Flags as exporters take them: `:PORT`, the flag repeated, Prometheus durations, the
/// default collectors switched off, log lines as JSON.
#[test]
fn listen_addresses_as_exporters_take_them() {
    let (one, two) = (free_port(), free_port());
    let agent = Agent::start(&[
        "--web.listen-address",
        &format!(":{one}"),
        "--web.listen-address",
        &format!("127.0.0.1:{two}"),
        "--log.format",
        "json",
    ]);
    for addr in [
        format!("127.0.0.1:{one}"),
        format!("[::1]:{one}"),
        format!("127.0.0.1:{two}"),
    ] {
        let (status, body) = http_request(addr.parse().unwrap(), "GET", "/metrics").unwrap();
        assert_eq!(status, 200, "{addr}");
        assert!(body.contains("observer_build_info{"), "{addr}: {body:.200}");
    }
    let lines = agent.stderr.lock().unwrap().clone();
    assert!(!lines.is_empty());
    for line in &lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(
            parsed["msg"].is_string() && parsed["level"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("serving metrics on http://[::]:{one}/metrics"))),
        "{lines:?}"
    );
    assert_eq!(agent.stop(), 0);
}

#[test]
fn only_the_collectors_named_after_disable_defaults() {
    let agent = Agent::start(&["--collector.disable-defaults", "--collector.lockdown"]);
    let metrics = agent.metrics();
    let probes: std::collections::BTreeSet<String> = testkit::prom::parse(&metrics.0)
        .into_iter()
        .filter(|s| s.name == "observer_probe_attached")
        .filter_map(|s| s.label("probe").map(str::to_owned))
        .collect();
    assert_eq!(
        probes.into_iter().collect::<Vec<_>>(),
        ["lockdown_decision"],
        "{}",
        metrics.0
    );
    assert_eq!(agent.stop(), 0);
}

#[test]
fn durations_in_prometheus_syntax() {
    // 1m30s is taken (the agent starts; its own flags are checked before anything loads).
    let agent = Agent::start(&["--timers.short-lived", "1m30s"]);
    assert_eq!(agent.stop(), 0);
    let (code, stderr) = run(Command::new(OBSERVER).args(["--timers.short-lived", "1.5s"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("1500ms"), "{stderr}");
}

#[test]
fn flags_without_effect_are_refused() {
    for (args, says) in [
        (
            &["--no-collector.timers", "--timers.latency"][..],
            "--timers.latency has no effect with the timers collector off",
        ),
        (
            &["--timers.counts-only", "--timers.latency"],
            "cannot be used with",
        ),
        (&["--events.output", "/tmp/events.json"], "--events"),
    ] {
        let (code, stderr) = run(Command::new(OBSERVER).args(args));
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
