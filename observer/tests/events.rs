//! The event stream against this machine's kernel: a process in a child cgroup of its own,
//! under another user, makes a timer and meets a lockdown denial; its events name the time,
//! the user, the exact cgroup path, and validate against schemas/events.schema.json. The file
//! route: appended, reopened on SIGHUP, and write errors counted without stopping the agent; a
//! stdout nobody reads drops events (counted) and never stops the metrics.

#[path = "support/features.rs"]
mod features;
mod support;

use std::{
    ffi::CString,
    fs,
    path::{Path, PathBuf},
    sync::{PoisonError, RwLock, RwLockReadGuard},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;
use support::{Agent, http_get, timer_create, timer_delete, timer_pair, timer_storm};

const SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/events.schema.json");
const NOBODY: u32 = 65_534;

/// Where the cgroup v2 hierarchy is mounted here (`/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (mount, fs) = l.split_once(" - ")?;
            fs.starts_with("cgroup2 ")
                .then(|| PathBuf::from(mount.split_whitespace().nth(4).unwrap()))
        })
        .expect("a cgroup2 mount")
}

/// A child cgroup of the root, removed when dropped.
struct ChildCgroup(PathBuf);

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// Forks a child that joins `cgroup`, is denied a debugfs write open by lockdown (as root),
/// then as `nobody` creates and deletes a timer; returns its pid once it has exited.
fn child_in(cgroup: &Path) -> i32 {
    let procs = CString::new(cgroup.join("cgroup.procs").to_str().unwrap()).unwrap();
    let debugfs = CString::new(support::DEBUGFS_FILE).unwrap();
    // SAFETY: the child makes raw syscalls only and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the child; async-signal-safe calls only.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, c"obst-events".as_ptr());
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            let joined = fd >= 0 && libc::write(fd, c"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            let denied = libc::open(debugfs.as_ptr(), libc::O_WRONLY);
            if denied >= 0 {
                libc::close(denied);
            }
            if !joined || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0 {
                libc::_exit(2);
            }
            let mut id = 0;
            let created = timer_create(libc::CLOCK_MONOTONIC.into(), &mut id);
            let deleted = timer_delete(id);
            libc::_exit(if created == 0 && deleted == 0 { 0 } else { 3 });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child failed: {status:#x}"
    );
    pid
}

/// The events written so far: whole lines only (the agent may be appending the last one while
/// the test reads the file).
fn events_in(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn wait_for(path: &Path, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(event) = events_in(path).into_iter().find(&matches) {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no event for {what} in {}:\n{}",
            path.display(),
            fs::read_to_string(path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn validate_all(path: &Path) {
    let schema: Value = serde_json::from_str(&fs::read_to_string(SCHEMA).unwrap()).unwrap();
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let events = events_in(path);
    assert!(!events.is_empty());
    for event in events {
        let errors: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{event}: {errors:?}");
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("events-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn time_of(event: &Value) -> SystemTime {
    let text = event["time"].as_str().unwrap();
    // `date` reads RFC 3339 with nanoseconds: one parser that is not ours.
    let out = std::process::Command::new("date")
        .args(["-u", "-d", text, "+%s%N"])
        .output()
        .unwrap();
    let ns: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns)
}

/// Each agent sees every process's timers, so the storm test fills every running agent's
/// ring buffer, and an event another test waits for could be lost in it: the storm runs
/// alone, the other tests together.
static RING: RwLock<()> = RwLock::new(());

fn sharing_the_ring() -> RwLockReadGuard<'static, ()> {
    RING.read().unwrap_or_else(PoisonError::into_inner)
}

/// The agent with the event stream going to `file`.
fn writing_events_to(file: &Path) -> Agent {
    Agent::start(&[
        "--events",
        "json",
        "--events.output",
        file.to_str().unwrap(),
    ])
}

#[test]
fn events_name_the_time_the_user_and_the_cgroup_and_follow_the_schema() {
    let _ring = sharing_the_ring();
    let dir = scratch("cgroup");
    let file = dir.join("events.json");
    let agent = writing_events_to(&file);
    let name = format!("observer-test-{}", std::process::id());
    let cgroup = ChildCgroup(cgroup2_root().join(&name));
    fs::create_dir(&cgroup.0).unwrap();
    support::ensure_debugfs();
    let before = SystemTime::now();
    let pid = child_in(&cgroup.0);
    let after = SystemTime::now();

    let created = wait_for(&file, "the child's timer", |e| {
        e["event"] == "timer_created" && e["pid"] == pid
    });
    assert_eq!(created["uid"], NOBODY);
    assert_eq!(created["tid"], pid);
    assert_eq!(created["comm"], "obst-events");
    assert_eq!(created["cgroup"], format!("/{name}"));
    assert!(created.get("container_id").is_none());
    // Where it comes from: this host, this boot, this schema.
    let read = |path: &str| fs::read_to_string(path).unwrap().trim().to_owned();
    assert_eq!(created["host"], read("/proc/sys/kernel/hostname"));
    assert_eq!(created["boot_id"], read("/proc/sys/kernel/random/boot_id"));
    assert_eq!(created["schema_version"], 1);
    let time = time_of(&created);
    assert!(
        before <= time && time <= after,
        "{created} not within the test's window"
    );
    let deleted = wait_for(&file, "the child's delete", |e| {
        e["event"] == "timer_deleted" && e["pid"] == pid
    });
    assert_eq!(deleted["cgroup"], format!("/{name}"));
    assert!(time_of(&deleted) >= time);

    if features::kernel_has(
        "lockdown",
        support::lockdown_level().is_some_and(|level| level != "none"),
        "this kernel runs without lockdown: no denial to name",
    ) {
        let denial = wait_for(&file, "the child's lockdown denial", |e| {
            e["event"] == "lockdown_decision" && e["pid"] == pid
        });
        assert_eq!(
            (&denial["reason"], &denial["verdict"], &denial["uid"]),
            (
                &Value::from("debugfs"),
                &Value::from("denied"),
                &Value::from(0)
            )
        );
        assert_eq!(denial["cgroup"], format!("/{name}"));
        let time = time_of(&denial);
        assert!(
            before <= time && time <= after,
            "{denial} not within the test's window"
        );
    }
    drop(agent);
    validate_all(&file);
}

/// `outer` in the hierarchy's root and `outer/inner` below it, removed when dropped.
struct Nested {
    outer: PathBuf,
    inner: PathBuf,
}

impl Nested {
    fn new(name: &str) -> Self {
        let outer = cgroup2_root().join(format!("observer-{name}-{}", std::process::id()));
        let inner = outer.join("inner");
        fs::create_dir_all(&inner).unwrap();
        Self { outer, inner }
    }
}

impl Drop for Nested {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.inner);
        let _ = fs::remove_dir(&self.outer);
    }
}

/// The agent writing events to `file`, in a private mount namespace where `mounts` (shell
/// commands) ran first: the test's mounts go away with the agent.
fn writing_events_after(mounts: &str, file: &Path, extra: &[&str]) -> Agent {
    let script = format!("set -e; {mounts}; exec \"$@\"");
    let mut args = vec![
        "--events",
        "json",
        "--events.output",
        file.to_str().unwrap(),
    ];
    args.extend(extra);
    Agent::start_through(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ],
        &args,
    )
}

#[test]
fn cgroup_root_names_cgroups_from_the_hierarchy_it_is_given() {
    let _ring = sharing_the_ring();
    let dir = scratch("cgroup-root");
    let (file, view) = (dir.join("events.json"), dir.join("view"));
    let nested = Nested::new("root");
    // The outer cgroup alone, bind-mounted: a cgroup2 directory, below the hierarchy's root.
    let mounts = format!(
        "mkdir -p {view}; mount --bind {outer} {view}",
        view = view.display(),
        outer = nested.outer.display()
    );
    let agent = writing_events_after(&mounts, &file, &["--cgroup.root", view.to_str().unwrap()]);
    let pid = child_in(&nested.inner);
    let created = wait_for(&file, "the child's timer", |e| {
        e["event"] == "timer_created" && e["pid"] == pid
    });
    // The path under the root given, not under the mount table's cgroup2 mount.
    assert_eq!(created["cgroup"], "/inner");
    let warned = agent.stderr.lock().unwrap().iter().any(|l| {
        l.contains(&format!(
            "--cgroup.root {}: a cgroup below the hierarchy's root",
            view.display()
        ))
    });
    assert!(warned, "{:?}", agent.stderr.lock().unwrap());
}

#[test]
fn the_mount_showing_the_whole_hierarchy_names_cgroups() {
    let _ring = sharing_the_ring();
    let dir = scratch("cgroup-whole");
    let (file, whole) = (dir.join("events.json"), dir.join("host-cgroup"));
    let nested = Nested::new("whole");
    // As in a pod with a cgroup namespace of its own: the usual mount point shows one cgroup's
    // part of the hierarchy (a bind mount of the outer cgroup over it), and the whole
    // hierarchy is mounted elsewhere, later in the mount table.
    let mounts = format!(
        "mount --bind {outer} {usual}; mkdir -p {whole}; mount -t cgroup2 none {whole}",
        outer = nested.outer.display(),
        usual = cgroup2_root().display(),
        whole = whole.display()
    );
    let _agent = writing_events_after(&mounts, &file, &[]);
    let pid = child_in(&nested.inner);
    let created = wait_for(&file, "the child's timer", |e| {
        e["event"] == "timer_created" && e["pid"] == pid
    });
    let outer = nested.outer.file_name().unwrap().to_str().unwrap();
    assert_eq!(created["cgroup"], format!("/{outer}/inner"));
}

#[test]
fn the_events_file_is_reopened_on_sighup() {
    let _ring = sharing_the_ring();
    let dir = scratch("rotate");
    let file = dir.join("events.json");
    let agent = writing_events_to(&file);
    timer_pair();
    let me = std::process::id();
    wait_for(&file, "a timer before rotation", |e| e["pid"] == me);
    // logrotate's move-then-signal.
    let rotated = dir.join("events.json.1");
    fs::rename(&file, &rotated).unwrap();
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(Instant::now() < deadline, "the file was not reopened");
        timer_pair();
        std::thread::sleep(Duration::from_millis(100));
    }
    timer_pair();
    wait_for(&file, "a timer after rotation", |e| e["pid"] == me);
    let metrics = agent.metrics();
    assert_eq!(
        metrics.value("observer_events_output_errors_total", &[]),
        0.0
    );
    drop(agent);
    validate_all(&rotated);
    validate_all(&file);
}

#[test]
fn write_errors_are_counted_and_the_metrics_go_on() {
    let _ring = sharing_the_ring();
    let agent = Agent::start(&["--events", "json", "--events.output", "/dev/full"]);
    timer_pair();
    let metrics = agent.metrics_until("a failed write counted", |m| {
        m.value("observer_events_output_errors_total", &[]) >= 1.0
    });
    assert!(metrics.value("observer_events_total", &[("kind", "timer_created")]) >= 1.0);
    timer_pair();
    // Still serving, still counting.
    agent.metrics_until("a second failed write", |m| {
        m.value("observer_events_output_errors_total", &[]) >= 2.0
    });
    assert_eq!(agent.stop(), 0);
}

#[test]
fn a_stdout_nobody_reads_drops_events_and_the_metrics_go_on() {
    let _alone = RING.write().unwrap_or_else(PoisonError::into_inner);
    let (agent, _unread) = Agent::start_with_stdout_unread(&["--events", "json"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = timer_storm(1, stop.clone());
    // The pipe (64 KiB) fills within a few hundred events; then the writer blocks, its queue
    // fills, and further events are dropped and counted while scrapes keep answering.
    let full = agent.metrics_until("events dropped behind the unread stdout", |m| {
        m.value("observer_events_output_dropped_total", &[]) >= 1.0
    });
    let received =
        |m: &support::Metrics| m.value("observer_events_total", &[("kind", "timer_created")]);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = full;
    while Instant::now() < deadline {
        let started = Instant::now();
        assert_eq!(http_get(agent.addr, "/healthz").unwrap().0, 200);
        let now = agent.metrics();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a scrape took {:?} behind a blocked stdout",
            started.elapsed()
        );
        assert!(received(&now) >= received(&last), "records still counted");
        last = now;
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    storm.into_iter().for_each(|t| {
        t.join().unwrap();
    });
    timer_pair();
    let end = agent.metrics_until("a record after the storm", |m| {
        received(m) > received(&last)
    });
    assert!(end.value("observer_events_output_dropped_total", &[]) >= 1.0);
}
