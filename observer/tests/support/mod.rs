//! Shared by the integration tests: start the real agent, scrape it over HTTP, read metrics,
//! and run real syscalls in child processes with names of their own.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

pub const OBSERVER: &str = env!("CARGO_BIN_EXE_observer");

/// Fails the test run early and clearly when it cannot load programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the integration tests load eBPF programs: run them as root"
    );
}

/// A free loopback port (the listener is closed before the agent binds it).
pub fn free_port() -> u16 {
    testkit::free_loopback_port().expect("no free loopback port")
}

/// A running agent, stopped with SIGTERM when dropped.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    pub stdout: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    pub fn start(extra: &[&str]) -> Self {
        let agent = Self::spawn(extra);
        agent.wait_ready();
        agent
    }

    /// Starts the agent with its stdout a pipe that nobody reads (the pipe stays open, so
    /// writes block once it is full, as with a stalled log collector).
    pub fn start_with_stdout_unread(extra: &[&str]) -> (Self, std::process::ChildStdout) {
        let mut agent = Self::spawn_with(extra, false);
        let stdout = agent.child.stdout.take().unwrap();
        agent.wait_ready();
        (agent, stdout)
    }

    /// Starts the agent without waiting for it (for endpoints plain HTTP cannot reach).
    pub fn spawn(extra: &[&str]) -> Self {
        Self::spawn_with(extra, true)
    }

    /// Starts the agent through a program that ends by executing its arguments (`unshare ...
    /// sh -c 'mount ...; exec "$@"' sh`): the agent keeps that process, so signals reach it.
    pub fn start_through(wrapper: &[&str], extra: &[&str]) -> Self {
        let agent = Self::spawn_through(wrapper, extra, true);
        agent.wait_ready();
        agent
    }

    fn spawn_with(extra: &[&str], read_stdout: bool) -> Self {
        Self::spawn_through(&[], extra, read_stdout)
    }

    fn spawn_through(wrapper: &[&str], extra: &[&str], read_stdout: bool) -> Self {
        require_root();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(OBSERVER);
                command
            }
            None => Command::new(OBSERVER),
        };
        let mut child = command
            .arg("--web.listen-address")
            .arg(addr.to_string())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = if read_stdout {
            collect_lines(child.stdout.take().unwrap())
        } else {
            Arc::default()
        };
        let stderr = collect_lines(child.stderr.take().unwrap());
        Self {
            child,
            addr,
            stdout,
            stderr,
        }
    }

    /// A field of the agent's /proc status, e.g. `CapEff:` or `VmRSS:`.
    pub fn status_field(&self, field: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {field} in the agent's status"))
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok((200, _)) = http_get(self.addr, "/healthz") {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the agent did not answer /healthz within 60 s; stderr:\n{}",
            self.stderr.lock().unwrap().join("\n")
        );
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = http_get(self.addr, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        Metrics(body)
    }

    /// Scrapes until `done` holds (records reach userspace asynchronously), or panics.
    pub fn metrics_until(&self, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = self.metrics();
            if done(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last scrape:\n{}",
                metrics.0
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn stop(mut self) -> i32 {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        status.code().unwrap_or(-1)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signals our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

fn collect_lines(stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// A plain HTTP/1.1 request over a real socket; returns the status and the body (chunked
/// transfer encoding undone).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    testkit::http::request(addr, method, path, Duration::from_secs(10))
}

pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path)
}

/// A scrape's text.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample with exactly these labels (in any order), if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        testkit::prom::value(&self.0, name, labels)
    }

    /// Like [`Self::get`], 0 when the sample is absent (counters not yet incremented).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum over the samples that carry at least these labels, 0 when there are none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        testkit::prom::sum_with_labels(&self.0, name, labels).unwrap_or(0.0)
    }

    /// The families the scrape declares, with their types and label names.
    pub fn families(&self) -> Vec<testkit::prom::Family> {
        testkit::prom::families(&self.0)
    }
}

/// A unique process name for this test run (comm holds 15 bytes).
pub fn unique_comm(prefix: &str) -> String {
    let suffix = std::process::id() % 100_000;
    let mut comm = format!("{prefix}{suffix}");
    comm.truncate(15);
    comm
}

/// Creates and deletes timers from `threads` threads until `stop` is set; returns the pairs made.
pub fn timer_storm(
    threads: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<thread::JoinHandle<u64>> {
    (0..threads)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut pairs = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..100 {
                        timer_pair();
                    }
                    pairs += 100;
                }
                pairs
            })
        })
        .collect()
}

/// timer_create with SIGEV_NONE on `clock`, the raw syscall; returns what the kernel returned
/// and writes the ID to `id` (in restore mode, reads the wanted ID from it).
pub fn timer_create(clock: libc::c_long, id: &mut libc::c_int) -> i64 {
    testkit::timers::timer_create(clock, id)
}

pub fn timer_delete(id: libc::c_int) -> i64 {
    testkit::timers::timer_delete(id)
}

/// Names the calling thread (its comm); false when the kernel refuses.
pub fn set_thread_name(name: &str) -> bool {
    testkit::set_thread_name(name)
}

/// One timer_create + timer_delete (SIGEV_NONE, CLOCK_MONOTONIC).
pub fn timer_pair() {
    testkit::timers::timer_pair().expect("timer_create/timer_delete");
}

/// The active lockdown level (`none`, `integrity`, `confidentiality`), from securityfs.
pub fn lockdown_level() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    let start = text.find('[')?;
    let end = text.find(']')?;
    Some(text[start + 1..end].to_owned())
}

/// A debugfs file the lockdown LSM refuses to open for write (LOCKDOWN_DEBUGFS) from the
/// integrity level up.
pub const DEBUGFS_FILE: &str = "/sys/kernel/debug/clear_warn_once";

/// Mounts debugfs where it is not mounted yet.
pub fn ensure_debugfs() {
    if !std::path::Path::new(DEBUGFS_FILE).exists() {
        let status = Command::new("mount")
            .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
            .status()
            .unwrap();
        assert!(status.success(), "mounting debugfs");
    }
}

/// Opens [`DEBUGFS_FILE`] for write, which lockdown refuses: the kernel's answer.
pub fn write_open_debugfs() -> std::io::Error {
    ensure_debugfs();
    std::fs::OpenOptions::new()
        .write(true)
        .open(DEBUGFS_FILE)
        .unwrap_err()
}
