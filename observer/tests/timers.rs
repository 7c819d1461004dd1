//! POSIX timer observation against this machine's kernel: real timer syscalls from child
//! processes with names of their own, asserted through /metrics.

#[path = "support/features.rs"]
mod features;
mod support;

use std::{sync::Mutex, time::Duration};

use support::{Agent, Metrics, timer_create, timer_delete, unique_comm};

/// The tests share the kernel's global counters: one at a time, so deltas are theirs.
static SERIAL: Mutex<()> = Mutex::new(());

const CLOCK_MONOTONIC: libc::c_long = 1;
const PR_TIMER_CREATE_RESTORE_IDS: libc::c_long = 77;

fn timer_arm(id: libc::c_int) -> i64 {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: 3600,
            tv_nsec: 0,
        },
    };
    // SAFETY: a valid itimerspec; no old value wanted.
    unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            id,
            0,
            &raw const spec,
            std::ptr::null_mut::<libc::itimerspec>(),
        )
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Runs `body` in a forked child named `comm`, which then waits for a byte on a pipe before it
/// exits (or execs `/bin/true` when `exec_at_end`). Returns the child's pid, what it wrote, and
/// a function that lets it finish and reaps it.
fn in_child(
    comm: &str,
    exec_at_end: bool,
    body: fn() -> Vec<i64>,
) -> (i32, Vec<i64>, impl FnOnce() + use<>) {
    let (mut to_parent, mut to_child) = ([0; 2], [0; 2]);
    // SAFETY: pipe(2) into two-int arrays.
    unsafe {
        assert_eq!(libc::pipe(to_parent.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(to_child.as_mut_ptr()), 0);
    }
    let name = std::ffi::CString::new(comm).unwrap();
    let true_path = c"/bin/true";
    // SAFETY: the child only makes raw syscalls, writes to a pipe and exits or execs.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: in the child; async-signal-safe calls only.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr());
            let results = body();
            let bytes = results.len() * 8;
            libc::write(to_parent[1], results.as_ptr().cast(), bytes);
            libc::close(to_parent[1]);
            let mut byte = 0u8;
            libc::read(to_child[0], (&raw mut byte).cast(), 1);
            if exec_at_end {
                let argv = [true_path.as_ptr(), std::ptr::null()];
                libc::execv(true_path.as_ptr(), argv.as_ptr());
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of the child's ends; reading what it wrote.
    let results = unsafe {
        libc::close(to_parent[1]);
        libc::close(to_child[0]);
        let mut buf = [0i64; 64];
        let n = libc::read(to_parent[0], buf.as_mut_ptr().cast(), size_of_val(&buf));
        libc::close(to_parent[0]);
        buf[..(n.max(0) as usize / 8)].to_vec()
    };
    let finish = move || {
        // SAFETY: releasing and reaping our own child.
        unsafe {
            libc::write(to_child[1], [1u8].as_ptr().cast(), 1);
            libc::close(to_child[1]);
            let mut status = 0;
            libc::waitpid(pid, &raw mut status, 0);
        }
    };
    (pid, results, finish)
}

fn created(m: &Metrics, result: &str) -> f64 {
    m.value(
        "observer_posix_timer_syscalls_total",
        &[("syscall", "timer_create"), ("result", result)],
    )
}

#[test]
fn timer_syscalls_are_counted_by_result_and_process() {
    counted_by_result_and_process("tracepoint", true);
}

#[test]
fn timer_syscalls_are_counted_the_same_through_raw_tracepoints() {
    counted_by_result_and_process("raw-tracepoint", false);
}

/// The calls of [`lifecycle`] in a child named `comm`, checked against what the kernel returned.
fn run_lifecycle(comm: &str) {
    let (_, results, finish) = in_child(comm, false, lifecycle);
    assert_eq!(
        results,
        vec![0, 0, 0, 0, 0, 0, -1, 22, -1, 0, 0, 0, 3],
        "what the kernel returned"
    );
    finish();
}

/// Three quick create+delete pairs, a failed create and delete (EINVAL), an armed timer deleted.
fn lifecycle() -> Vec<i64> {
    let mut out = Vec::new();
    let mut id = 0;
    for _ in 0..3 {
        out.push(timer_create(CLOCK_MONOTONIC, &mut id));
        out.push(timer_delete(id));
    }
    // An unknown clock: EINVAL.
    out.push(timer_create(9999, &mut id));
    out.push(i64::from(errno()));
    // Deleting a timer that does not exist: EINVAL.
    out.push(timer_delete(123_456));
    out.push(timer_create(CLOCK_MONOTONIC, &mut id));
    out.push(timer_arm(id));
    out.push(timer_delete(id));
    out.push(i64::from(id));
    out
}

/// With `--timers.latency` creates are timed; without it there is no latency series at all.
fn counted_by_result_and_process(hook: &str, latency: bool) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut flags = vec!["--timers.hook", hook];
    if latency {
        flags.push("--timers.latency");
    }
    let agent = Agent::start(&flags);
    let mechanism = hook.replace('-', "_");
    let attached = [
        ("probe", "timer_syscalls"),
        ("mechanism", mechanism.as_str()),
    ];
    assert_eq!(
        agent.metrics().get("observer_probe_attached", &attached),
        Some(1.0)
    );
    let before = agent.metrics();
    let comm = unique_comm(if hook == "tracepoint" {
        "obst-sys"
    } else {
        "obst-raw"
    });
    run_lifecycle(&comm);

    let comm_labels = [("comm", comm.as_str())];
    let after = agent.metrics_until("the child's creates", |m| {
        m.value(
            "observer_posix_timer_creates_by_process_total",
            &comm_labels,
        ) >= 4.0
    });
    // Exact for the child's own name.
    assert_eq!(
        after.get(
            "observer_posix_timer_creates_by_process_total",
            &comm_labels
        ),
        Some(4.0)
    );
    // Lower bounds where other processes may add.
    let delta = |name: &str, labels: &[(&str, &str)]| {
        after.value(name, labels) - before.value(name, labels)
    };
    assert!(created(&after, "ok") - created(&before, "ok") >= 4.0);
    assert!(created(&after, "einval") - created(&before, "einval") >= 1.0);
    let syscalls = "observer_posix_timer_syscalls_total";
    assert!(delta(syscalls, &[("syscall", "timer_delete"), ("result", "ok")]) >= 4.0);
    assert!(
        delta(
            syscalls,
            &[("syscall", "timer_delete"), ("result", "einval")]
        ) >= 1.0
    );
    assert!(delta(syscalls, &[("syscall", "timer_settime"), ("result", "ok")]) >= 1.0);
    let timed = "observer_posix_timer_create_duration_seconds_count";
    if latency {
        // Every create, failed or not, is timed.
        assert!(delta(timed, &[]) >= 5.0);
    } else {
        assert_eq!(
            after.get(timed, &[]),
            None,
            "creates timed without --timers.latency"
        );
    }
    // The three quick deletes are churn; the armed timer is not (exact under SERIAL unless
    // another process churns timers at the same moment).
    assert!(delta("observer_posix_timer_short_lived_total", &[]) >= 3.0);
    assert!(after.value("observer_posix_timer_id_max", &[]) >= 3.0);
    assert!(delta("observer_events_total", &[("kind", "timer_created")]) >= 4.0);
    assert!(delta("observer_events_total", &[("kind", "timer_armed")]) >= 1.0);
    assert_eq!(
        after.value("observer_events_lost_total", &[("kind", "timer_created")]),
        0.0
    );
    assert_eq!(agent.stop(), 0, "SIGTERM exits 0");
}

/// `--timers.counts-only`: calls by result and the ID high-water mark, from per-CPU arrays
/// alone; no record is sent and nothing per timer or process is exported.
#[test]
fn counts_only_counts_calls_and_the_highest_id() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = Agent::start(&["--timers.hook", "tracepoint", "--timers.counts-only"]);
    let before = agent.metrics();
    run_lifecycle(&unique_comm("obst-cnt"));
    let after = agent.metrics_until("the child's creates", |m| {
        created(m, "ok") - created(&before, "ok") >= 4.0
    });
    let delta = |labels: &[(&str, &str)]| {
        let name = "observer_posix_timer_syscalls_total";
        after.value(name, labels) - before.value(name, labels)
    };
    assert!(delta(&[("syscall", "timer_create"), ("result", "einval")]) >= 1.0);
    assert!(delta(&[("syscall", "timer_delete"), ("result", "ok")]) >= 4.0);
    assert!(delta(&[("syscall", "timer_delete"), ("result", "einval")]) >= 1.0);
    assert!(after.value("observer_posix_timer_id_max", &[]) >= 3.0);
    let families: Vec<String> = after.families().into_iter().map(|f| f.name).collect();
    for absent in [
        "observer_posix_timer_live",
        "observer_posix_timer_short_lived_total",
        "observer_posix_timer_creates_by_process_total",
        "observer_posix_timer_create_duration_seconds",
    ] {
        assert!(!families.iter().any(|f| f == absent), "{absent} exported");
    }
    assert_eq!(
        after.sum("observer_events_total", &[("kind", "timer_created")]),
        0.0
    );
    // Only the syscalls hook: owners' ends matter to live timers alone.
    assert!(!after.0.contains("probe=\"timer_owner_exit\""));
    assert_eq!(agent.stop(), 0, "SIGTERM exits 0");
}

#[test]
fn restore_mode_creates_with_requested_ids() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = Agent::start(&["--events", "json"]);
    let before = agent.metrics();
    let comm = unique_comm("obst-rst");
    let (pid, results, finish) = in_child(&comm, false, || {
        // SAFETY: plain prctl.
        let on = unsafe { libc::prctl(PR_TIMER_CREATE_RESTORE_IDS as i32, 1, 0, 0, 0) };
        let mut id = 424_242;
        let first = timer_create(CLOCK_MONOTONIC, &mut id);
        let mut again = 424_242;
        let taken = timer_create(CLOCK_MONOTONIC, &mut again);
        vec![
            i64::from(on),
            first,
            i64::from(id),
            taken,
            i64::from(errno()),
        ]
    });
    finish();
    if !features::kernel_has(
        "timer-restore-ids",
        results.first() != Some(&-1),
        "this kernel has no PR_TIMER_CREATE_RESTORE_IDS (Linux 6.15+)",
    ) {
        return;
    }
    assert_eq!(
        results,
        vec![0, 0, 424_242, -1, 16],
        "restore ON, the ID granted, then EBUSY"
    );
    let restore = "observer_posix_timer_restore_creates_total";
    // Kernel counters show at once; what records carry shows when the agent drains them.
    let after = agent.metrics_until("the restore-mode creates", |m| {
        m.value(restore, &[("result", "ebusy")]) - before.value(restore, &[("result", "ebusy")])
            >= 1.0
            && m.value("observer_posix_timer_id_max", &[]) >= 424_242.0
            && m.value(
                "observer_posix_timer_creates_by_process_total",
                &[("comm", comm.as_str())],
            ) >= 1.0
    });
    assert!(
        after.value(restore, &[("result", "ok")]) - before.value(restore, &[("result", "ok")])
            >= 1.0
    );
    assert!(after.value("observer_posix_timer_id_max", &[]) >= 424_242.0);
    assert_eq!(
        after.get(
            "observer_posix_timer_creates_by_process_total",
            &[("comm", comm.as_str())]
        ),
        Some(1.0)
    );
    // The event stream names the process, the ID and restore mode, and nothing else.
    let wanted = serde_json::json!({
        "event": "timer_created", "pid": pid, "tid": pid, "comm": comm,
        "timer_id": 424_242, "restore": true,
    });
    // Besides what every event has (time, uid, cgroup: see tests/events.rs).
    let own = |e: &serde_json::Value| {
        let mut e = e.clone();
        for common in [
            "time",
            "uid",
            "cgroup_id",
            "cgroup",
            "host",
            "boot_id",
            "schema_version",
        ] {
            e.as_object_mut().unwrap().remove(common);
        }
        e
    };
    wait_for_event(&agent, "the restore-mode create", |e| own(e) == wanted);
}

/// `N` timers created (and left to die with the process).
fn create_timers<const N: usize>() -> Vec<i64> {
    (0..N)
        .map(|_| {
            let mut id = 0;
            timer_create(CLOCK_MONOTONIC, &mut id)
        })
        .collect()
}

/// Runs `body` in a child named `comm`, lets it exit, and checks every create succeeded.
fn creates_in_child(comm: &str, body: fn() -> Vec<i64>) {
    let (_, results, finish) = in_child(comm, false, body);
    finish();
    assert!(results.iter().all(|&r| r == 0), "{comm}: {results:?}");
}

/// The per-process series are not re-ranked: with one series, the first name seen keeps it
/// (and it grows), and a later name with more creates counts as `other`.
#[test]
fn the_first_process_names_keep_their_series() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    const BY_PROCESS: &str = "observer_posix_timer_creates_by_process_total";
    let (first, second) = (unique_comm("obst-1st"), unique_comm("obst-2nd"));
    let series = |m: &Metrics, comm: &str| m.get(BY_PROCESS, &[("comm", comm)]);
    let other = |m: &Metrics| m.value(BY_PROCESS, &[("comm", "other")]);
    // Another process on the host may create a timer first and take the one series: then the
    // test starts over with a fresh agent.
    let taken_by = |m: &Metrics| {
        testkit::prom::parse(&m.0)
            .into_iter()
            .filter(|s| s.name == BY_PROCESS)
            .flat_map(|s| s.labels)
            .find(|(_, comm)| *comm != first && comm != "other")
            .map(|(_, comm)| comm)
    };
    for attempt in 1..=3 {
        let agent = Agent::start(&["--timers.top-processes", "1"]);
        creates_in_child(&first, create_timers::<3>);
        let m = agent.metrics_until("the first name's creates", |m| {
            series(m, &first).unwrap_or(0.0) >= 3.0 || taken_by(m).is_some()
        });
        if let Some(comm) = taken_by(&m) {
            eprintln!("attempt {attempt}: {comm:?} created a timer first; again");
            continue;
        }
        assert_eq!(series(&m, &first), Some(3.0));
        let other_before = other(&m);

        // More creates than the first name: they count as other, and the first series stays.
        creates_in_child(&second, create_timers::<5>);
        let m = agent.metrics_until("the second name's creates", |m| {
            other(m) - other_before >= 5.0
        });
        assert_eq!(series(&m, &first), Some(3.0), "{}", m.0);
        assert_eq!(series(&m, &second), None, "{}", m.0);

        // The first name again: its own series grows by exactly its creates.
        creates_in_child(&first, create_timers::<2>);
        let m = agent.metrics_until("the first name's further creates", |m| {
            series(m, &first).unwrap_or(0.0) >= 5.0
        });
        assert_eq!(series(&m, &first), Some(5.0), "{}", m.0);
        assert_eq!(series(&m, &second), None, "{}", m.0);
        assert!(other(&m) - other_before >= 5.0);
        let names = testkit::prom::parse(&m.0)
            .into_iter()
            .filter(|s| s.name == BY_PROCESS)
            .count();
        assert_eq!(names, 2, "one name and other: {}", m.0);
        assert_eq!(agent.stop(), 0);
        return;
    }
    panic!("other processes created timers first on three agents in a row");
}

#[test]
fn timers_die_with_their_process_at_exit_and_exec() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = Agent::start(&["--events", "json"]);
    let live = |m: &Metrics| m.value("observer_posix_timer_live", &[]);
    let before = agent.metrics();
    let make_three = || {
        let mut out = Vec::new();
        for _ in 0..3 {
            let mut id = 0;
            out.push(timer_create(CLOCK_MONOTONIC, &mut id));
        }
        out
    };
    let (exit_pid, results, finish_exit) = in_child(&unique_comm("obst-exit"), false, make_three);
    assert_eq!(results, vec![0, 0, 0]);
    let (exec_pid, results, finish_exec) = in_child(&unique_comm("obst-exec"), true, make_three);
    assert_eq!(results, vec![0, 0, 0]);
    let during = agent.metrics_until("six live timers", |m| live(m) - live(&before) >= 6.0);
    finish_exit();
    finish_exec();
    let after = agent.metrics_until("the timers' owners gone", |m| {
        live(&during) - live(m) >= 6.0
    });
    assert!(
        after.value("observer_events_total", &[("kind", "timer_owner_gone")])
            - before.value("observer_events_total", &[("kind", "timer_owner_gone")])
            >= 2.0
    );
    let lines = agent.stdout.lock().unwrap().clone();
    let gone = |pid: i32, reason: &str| {
        events(&lines)
            .iter()
            .any(|e| e["event"] == "timer_owner_gone" && e["pid"] == pid && e["reason"] == reason)
    };
    assert!(
        gone(exit_pid, "exit"),
        "no exit event for {exit_pid}: {lines:?}"
    );
    assert!(
        gone(exec_pid, "exec"),
        "no exec event for {exec_pid}: {lines:?}"
    );
}

#[test]
fn a_thread_exiting_does_not_end_its_process_timers() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = Agent::start(&["--events", "json"]);
    let (pid, results, finish) = in_child(&unique_comm("obst-thr"), false, || {
        let mut id = 0;
        let created = timer_create(CLOCK_MONOTONIC, &mut id);
        // A second thread comes and goes: the process and its timer live on.
        let handle = std::thread::spawn(|| ());
        let joined = i64::from(handle.join().is_ok());
        vec![created, joined]
    });
    assert_eq!(results, vec![0, 1]);
    // A sentinel after the thread's exit: once its event is through, so is anything the exit
    // made (the ring buffer keeps order), whatever the agent's drain interval.
    let mut sentinel = 0;
    assert_eq!(timer_create(libc::CLOCK_MONOTONIC.into(), &mut sentinel), 0);
    assert_eq!(timer_delete(sentinel), 0);
    let me = std::process::id();
    wait_for_event(&agent, "the sentinel", |e| {
        e["event"] == "timer_deleted" && e["pid"] == me && e["timer_id"] == sentinel
    });
    let gone_for = |pid: i32| {
        events(&agent.stdout.lock().unwrap())
            .iter()
            .any(|e| e["event"] == "timer_owner_gone" && e["pid"] == pid)
    };
    assert!(
        !gone_for(pid),
        "a thread's exit was taken for the process's"
    );
    finish();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gone_for(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the process's exit was not seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON events among the agent's output lines.
fn events(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits (up to 10 s) for an event the agent printed that `matches`.
fn wait_for_event(agent: &Agent, what: &str, matches: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !events(&agent.stdout.lock().unwrap()).iter().any(&matches) {
        assert!(
            std::time::Instant::now() < deadline,
            "no event for {what}: {:?}",
            agent.stdout.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
