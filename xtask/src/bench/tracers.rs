//! What runs beside the load in one configuration: nothing, bpftrace programs, or the observer;
//! started before a measurement and stopped after it.
use std::{
    collections::BTreeSet,
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The minimal bpftrace program for the same outputs as the observer's timer path.
const PEER: &str = include_str!("peer.bt");
/// Empty programs on the peer's tracepoints, and on the four the observer attaches for a pair.
const EMPTY_PEER: &str = include_str!("empty-peer.bt");
const EMPTY_PAIR: &str = include_str!("empty-pair.bt");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracer {
    Bare,
    /// Empty programs on the bpftrace peer's three tracepoints.
    EmptyPeer,
    /// Empty programs on the two tracepoints the observer uses for a pair by default.
    EmptyPair,
    Bpftrace,
    /// The observer as installed: every collector, syscall tracepoints for timers.
    Observer,
    /// The observer with `--timers.counts-only`: the same outputs as the bpftrace program.
    ObserverCountsOnly,
    /// The observer with `--timers.latency`: also timing every create.
    ObserverLatency,
    /// The observer with `--timers.hook raw-tracepoint`.
    ObserverRaw,
    /// The observer with `--no-collector.timers`.
    ObserverTimersOff,
}

impl Tracer {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::EmptyPeer => "empty programs, bpftrace's 3 tracepoints",
            Self::EmptyPair => "empty programs, the observer's 2 tracepoints",
            Self::Bpftrace => "bpftrace (minimal program)",
            Self::Observer => "observer (default)",
            Self::ObserverCountsOnly => "observer (--timers.counts-only)",
            Self::ObserverLatency => "observer (--timers.latency)",
            Self::ObserverRaw => "observer (--timers.hook raw-tracepoint)",
            Self::ObserverTimersOff => "observer (--no-collector.timers)",
        }
    }

    /// The bpftrace script, for the bpftrace configurations.
    pub const fn script(self) -> Option<(&'static str, &'static str)> {
        match self {
            Self::EmptyPeer => Some(("empty-peer.bt", EMPTY_PEER)),
            Self::EmptyPair => Some(("empty-pair.bt", EMPTY_PAIR)),
            Self::Bpftrace => Some(("peer.bt", PEER)),
            _ => None,
        }
    }

    /// The observer's extra arguments, for the observer configurations.
    const fn observer_args(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Observer => Some(&[]),
            Self::ObserverCountsOnly => Some(&["--timers.counts-only"]),
            Self::ObserverLatency => Some(&["--timers.latency"]),
            Self::ObserverRaw => Some(&["--timers.hook", "raw-tracepoint"]),
            Self::ObserverTimersOff => Some(&["--no-collector.timers"]),
            _ => None,
        }
    }
}

/// The binaries and scripts a run uses.
pub struct Tools {
    pub observer: PathBuf,
    pub timer_load: PathBuf,
    pub scripts: PathBuf,
}

impl Tools {
    /// Writes the bpftrace scripts to `scripts`.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        let scripts = root.join("target/bench");
        std::fs::create_dir_all(&scripts)?;
        for tracer in [Tracer::EmptyPeer, Tracer::EmptyPair, Tracer::Bpftrace] {
            if let Some((file, text)) = tracer.script() {
                std::fs::write(scripts.join(file), text)?;
            }
        }
        Ok(Self {
            observer: root.join("target/release/observer"),
            timer_load: root.join("target/release/timer-load"),
            scripts,
        })
    }

    /// Runs `timer-load MODE N` and returns the nanoseconds per operation it printed.
    pub fn ns_per_op(&self, mode: &str, n: u64) -> anyhow::Result<f64> {
        let out = Command::new(&self.timer_load)
            .args([mode, &n.to_string()])
            .output()
            .context("starting timer-load")?;
        if !out.status.success() {
            bail!(
                "timer-load {mode} {n} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("timer-load's output is not a number")
    }
}

/// A running tracer (none for bare), stopped with SIGINT on drop.
pub struct Running {
    child: Option<Child>,
    /// The observer's metrics address.
    pub addr: Option<SocketAddr>,
    /// What bpftrace printed after attaching (its maps, printed when it stops).
    output: Option<thread::JoinHandle<String>>,
}

impl Running {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the tracer and returns what it printed after attaching (bpftrace's maps).
    pub fn stop(mut self) -> String {
        self.interrupt();
        self.output
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    /// SIGINT (bpftrace prints its maps on it), then SIGKILL if it has not exited in 10 s.
    fn interrupt(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signals our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "bench: {:?} ignored SIGINT for 10 s: killing it",
            child.id()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.interrupt();
    }
}

pub fn start(tracer: Tracer, tools: &Tools) -> anyhow::Result<Running> {
    if let Some(args) = tracer.observer_args() {
        return start_observer(tools, args);
    }
    let Some((file, _)) = tracer.script() else {
        return Ok(Running {
            child: None,
            addr: None,
            output: None,
        });
    };
    ensure_tracefs()?;
    let mut child = Command::new("bpftrace")
        .arg(tools.scripts.join(file))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    // bpftrace prints "Attaching N probes..." and attaches right after. A reader thread, so
    // that a bpftrace that never gets there is a timeout, not a hang.
    let stdout = child.stdout.take().context("bpftrace's stdout")?;
    let mut running = Running {
        child: Some(child),
        addr: None,
        output: None,
    };
    let (attaching, attached) = std::sync::mpsc::channel();
    running.output = Some(thread::spawn(move || {
        let mut stdout = stdout;
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("Attaching") {
            match stdout.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => return String::from_utf8_lossy(&seen).into_owned(),
            }
        }
        let _ = attaching.send(());
        let mut rest = String::new();
        let _ = stdout.read_to_string(&mut rest);
        rest
    }));
    if attached.recv_timeout(Duration::from_secs(60)).is_err() {
        bail!("bpftrace {file} did not say it was attaching within 60 s");
    }
    thread::sleep(Duration::from_millis(500));
    Ok(running)
}

/// The observer on a free loopback port, once /healthz answers (every probe attached).
pub fn start_observer(tools: &Tools, extra: &[&str]) -> anyhow::Result<Running> {
    let addr = testkit::free_loopback_addr().context("finding a free loopback port")?;
    let child = Command::new(&tools.observer)
        .args([
            "--web.listen-address",
            &addr.to_string(),
            "--log.level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the observer")?;
    let running = Running {
        child: Some(child),
        addr: Some(addr),
        output: None,
    };
    wait_healthy(addr, Duration::from_secs(60))?;
    Ok(running)
}

/// Waits for /healthz to answer 200; how long that took.
pub fn wait_healthy(addr: SocketAddr, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if get(addr, "/healthz").is_ok_and(|(status, _)| status == 200) {
            return Ok(start.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
    bail!("nothing answered /healthz on {addr} within {limit:?}")
}

pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(testkit::http::get(addr, path, Duration::from_secs(10))?)
}

/// bpftrace finds tracepoints through tracefs (the observer mounts it itself when it starts).
fn ensure_tracefs() -> anyhow::Result<()> {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").is_dir() {
        return Ok(());
    }
    crate::run(
        Command::new("mount")
            .args(["-t", "tracefs", "tracefs"])
            .arg(tracing),
    )
}

/// The BPF programs a process holds: program file descriptors (the observer keeps them) and
/// perf events with a program attached (bpftrace keeps only those), from bpftool's list.
pub fn program_ids(pid: u32) -> anyhow::Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    let fdinfo = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&fdinfo).with_context(|| format!("reading {fdinfo}"))? {
        let text = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    for event in super::bpftool(&["perf", "show"])?
        .as_array()
        .into_iter()
        .flatten()
    {
        if event["pid"].as_u64() == Some(u64::from(pid))
            && let Some(id) = event["prog_id"].as_u64()
        {
            ids.insert(id);
        }
    }
    Ok(ids)
}
