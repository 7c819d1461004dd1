//! `--pin` against this machine's kernel: the security programs stay attached while no agent
//! runs (a real lockdown denial made then is read by the next agent), an agent of the same
//! build adopts them after SIGTERM and after SIGKILL, another build's pins are replaced, an
//! agent without `--pin` leaves them alone, and `observer unpin` removes every one of them.

#[path = "support/features.rs"]
mod features;
mod support;

use std::{fs, path::Path, process::Command};

use support::{Agent, OBSERVER, lockdown_level, write_open_debugfs};

/// The tests count the kernel's programs by name: one agent at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The kernel's name of the program the host's lockdown hook attaches (15 characters kept).
const CONSOLE_PROGRAM: &str = "lockdown_consol";

fn builds(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// How many programs of this name the kernel has loaded (whoever loaded them).
fn loaded(name: &str) -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .count()
}

/// Waits until the kernel has `want` programs of this name: a program goes once the last
/// reference does, which the kernel finishes after the unlink returns (deferred work).
fn loaded_settles(name: &str, want: usize) -> usize {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let count = loaded(name);
        if count == want || std::time::Instant::now() > deadline {
            return count;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn stderr(agent: &Agent) -> String {
    agent.stderr.lock().unwrap().join("\n")
}

/// One denial, made while `agent` (if any) runs.
fn deny() {
    let err = write_open_debugfs();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
}

/// Waits for the denial records an agent drained from the pinned ring.
fn drained(agent: &Agent, want: f64) -> support::Metrics {
    agent.metrics_until("the records written while no agent ran", |m| {
        m.value("observer_events_total", &[("kind", "lockdown_console")]) >= want
    })
}

#[test]
fn pinned_security_programs_outlive_the_agent_and_are_adopted() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !features::kernel_has(
        "lockdown",
        lockdown_level().is_some_and(|l| l != "none"),
        "this kernel runs without lockdown: nothing to see while no agent runs",
    ) {
        return;
    }
    let root = Path::new("/sys/fs/bpf").join(format!("observer-test-{}", std::process::id()));
    let root_arg = root.to_str().unwrap();
    let pin = ["--pin", "--pin.path", root_arg];
    let before = loaded(CONSOLE_PROGRAM);

    // Pinned afresh: one build directory.
    let agent = Agent::start(&pin);
    let m = agent.metrics();
    assert_eq!(
        m.value("observer_security_pinned", &[]),
        1.0,
        "{}",
        stderr(&agent)
    );
    assert_eq!(m.value("observer_security_adopted", &[]), 0.0);
    let build = builds(&root);
    assert_eq!(build.len(), 1, "{build:?}");
    assert!(stderr(&agent).contains("pins: pinned"));
    assert!(root.join(&build[0]).join("links/lockdown_console").exists());
    assert_eq!(agent.stop(), 0);

    // Stopped: the pinned program is still loaded and records a denial.
    assert_eq!(
        loaded_settles(CONSOLE_PROGRAM, before + 1),
        before + 1,
        "the pinned program stays"
    );
    deny();

    // Adopted: nothing loaded again, the waiting record read.
    let agent = Agent::start(&pin);
    let m = drained(&agent, 1.0);
    assert_eq!(
        m.value("observer_events_total", &[("kind", "lockdown_console")]),
        1.0,
        "exactly the one denial made while no agent ran"
    );
    assert_eq!(
        m.value(
            "observer_lockdown_decisions_total",
            &[("reason", "debugfs"), ("verdict", "denied")]
        ),
        1.0
    );
    assert_eq!(m.value("observer_security_adopted", &[]), 1.0);
    assert!(
        stderr(&agent).contains("pins: adopted"),
        "{}",
        stderr(&agent)
    );
    assert_eq!(
        loaded(CONSOLE_PROGRAM),
        before + 1,
        "adopted, not loaded again"
    );
    assert_eq!(
        m.value(
            "observer_probe_attached",
            &[("probe", "lockdown_decision"), ("mechanism", "tracepoint")]
        ),
        1.0
    );

    // SIGKILL leaves the pins as they were: the next start adopts them too.
    let mut agent = agent;
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    deny();
    let agent = Agent::start(&pin);
    let m = drained(&agent, 1.0);
    assert_eq!(m.value("observer_security_adopted", &[]), 1.0);
    assert_eq!(
        m.value("observer_events_total", &[("kind", "lockdown_console")]),
        1.0
    );
    assert_eq!(builds(&root), build, "the same build, adopted");
    assert_eq!(agent.stop(), 0);

    // An agent without --pin leaves them alone (another agent may be using them).
    let plain = Agent::start(&["--pin.path", root_arg]);
    assert!(
        stderr(&plain).contains("go on watching beside this agent"),
        "{}",
        stderr(&plain)
    );
    assert_eq!(plain.stop(), 0);
    assert_eq!(builds(&root), build);

    // Another build's pins are replaced: ours attach, theirs go, the gap is reported.
    let other = "0_0_0-0000000000000000";
    fs::rename(root.join(&build[0]), root.join(other)).unwrap();
    let agent = Agent::start(&pin);
    let m = agent.metrics();
    assert_eq!(m.value("observer_security_adopted", &[]), 0.0);
    assert_eq!(m.value("observer_security_pinned", &[]), 1.0);
    assert!(m.value("observer_security_unwatched_seconds", &[]) > 0.0);
    assert!(
        stderr(&agent).contains(&format!(
            "pins: replaced the security programs of build {other}"
        )),
        "{}",
        stderr(&agent)
    );
    assert_eq!(builds(&root), build, "only this build's pins are left");
    assert_eq!(
        loaded_settles(CONSOLE_PROGRAM, before + 1),
        before + 1,
        "the old program went"
    );
    assert_eq!(agent.stop(), 0);

    // `observer probes` names them; `observer unpin` removes them all.
    let probes = Command::new(OBSERVER)
        .args(["probes", "--pin.path", root_arg])
        .output()
        .unwrap();
    let probes = String::from_utf8_lossy(&probes.stdout);
    assert!(
        probes.contains(&format!("pinned: {root_arg}/{}", build[0]))
            && probes.contains("observer unpin"),
        "{probes}"
    );
    let unpin = Command::new(OBSERVER)
        .args(["unpin", "--pin.path", root_arg])
        .output()
        .unwrap();
    assert!(unpin.status.success());
    assert!(
        String::from_utf8_lossy(&unpin.stdout)
            .contains(&format!("removed {root_arg}/{}", build[0]))
    );
    assert!(!root.exists());
    assert_eq!(
        loaded_settles(CONSOLE_PROGRAM, before),
        before,
        "nothing of ours left"
    );
    let again = Command::new(OBSERVER)
        .args(["unpin", "--pin.path", root_arg])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing pinned"));
}

/// Where nothing can be pinned (a directory that is not on bpffs), the agent says so and runs
/// as without `--pin`: the pinning is lost, never a hook.
#[test]
fn a_pin_path_off_bpffs_is_a_warning_and_a_metric() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = std::env::temp_dir().join(format!("observer-not-bpffs-{}", std::process::id()));
    let agent = Agent::start(&["--pin", "--pin.path", path.to_str().unwrap()]);
    let m = agent.metrics();
    assert_eq!(m.value("observer_security_pinned", &[]), 0.0);
    assert!(
        stderr(&agent).contains("pins: not pinned (--pin)")
            && stderr(&agent).contains("not on a bpffs mount"),
        "{}",
        stderr(&agent)
    );
    assert_eq!(
        m.value(
            "observer_probe_attached",
            &[("probe", "lockdown_decision"), ("mechanism", "tracepoint")]
        ),
        1.0,
        "the hooks attach as without --pin"
    );
    assert_eq!(agent.stop(), 0);
    assert!(!path.exists(), "nothing made there");
}
