//! `cargo xtask bench`: what observing costs, measured the way users judge it, written to
//! BENCHMARKS.md. Every comparison runs its configurations interleaved, round by round, in the
//! same run, and reports medians, spreads and ratios: these machines are noisy.
use std::{
    fmt::Write as _,
    io::Read as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Args;

use testkit::prom;

use crate::{
    cargo, setup,
    stats::{median, percentile, quartiles},
    workspace_root,
};

#[derive(Args, Debug)]
pub struct Options {
    /// Interleaved rounds per comparison.
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// Timer create+delete pairs per measurement.
    #[arg(long, default_value_t = 200_000)]
    pairs: u64,
}

/// What runs beside the timer load in one configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracer {
    Bare,
    /// bpftrace with empty programs on the same four tracepoints: the cost of the tracepoint
    /// machinery alone, the floor any tool on them pays.
    EmptyPrograms,
    Observer,
    /// The observer with `--timers.hook raw-tracepoint`.
    ObserverRaw,
    Bpftrace,
}

impl Tracer {
    const fn name(self) -> &'static str {
        match self {
            Self::Bare => "bare",
            Self::EmptyPrograms => "empty programs (floor)",
            Self::Observer => "observer (syscall tracepoints, default)",
            Self::ObserverRaw => "observer (raw tracepoints)",
            Self::Bpftrace => "bpftrace",
        }
    }
}

/// bpftrace doing what the observer's timer path does: count by syscall and result, and read
/// the created ID through the user pointer saved at entry.
const BPFTRACE_EQUIVALENT: &str = r#"
tracepoint:syscalls:sys_enter_timer_create { @ptr[tid] = args->created_timer_id; }
tracepoint:syscalls:sys_exit_timer_create {
  @calls["timer_create", args->ret] = count();
  if (args->ret == 0) { @id = max(*(int32*)uptr(@ptr[tid])); }
  delete(@ptr[tid]);
}
tracepoint:syscalls:sys_enter_timer_delete { @del[tid] = args->timer_id; }
tracepoint:syscalls:sys_exit_timer_delete { @calls["timer_delete", args->ret] = count(); delete(@del[tid]); }
"#;

const BPFTRACE_EMPTY: &str = r"
tracepoint:syscalls:sys_enter_timer_create { }
tracepoint:syscalls:sys_exit_timer_create { }
tracepoint:syscalls:sys_enter_timer_delete { }
tracepoint:syscalls:sys_exit_timer_delete { }
";

/// What was changed for speed and what it bought, measured with this benchmark before and after.
const HISTORY: &str = "
## What changed, and what it bought

Measured with this benchmark on the same machine, before and after each change.

| change | before | after |
| --- | --- | --- |
| The programs wake the agent only when a quarter of the ring buffer (at most 64 KiB) waits, instead of on every record; the agent drains on a timer otherwise | every record woke the agent: a cross-CPU wakeup per timer syscall | no wakeups below the threshold |
| The in-flight map is a preallocated hash instead of an LRU hash; timer_delete sends its record at entry (no in-flight state); the restore-mode lookup is skipped until a process turns restore mode on; the owner map is looked up before it is updated | observer overhead 2,681 ns/pair (0.97 of bpftrace's) | 2,222 ns/pair (0.89) |
| The drain interval backs off from 50 ms to 1 s while drains find nothing | idle CPU 0.30% of a core | 0.00% (10 s sample) |
| The kernel's BTF is memory-mapped instead of parsed where the kernel allows it, and the parsed copy is freed and trimmed after start-up | RSS 35.8 MiB, peak 80 MiB | RSS 7.4 MiB, peak 42 MiB |
| `--timers.hook raw-tracepoint` (raw `sys_enter`/`sys_exit`, no per-event record) | | 1,847 ns/pair (0.74 of bpftrace's), but +185 ns on every other syscall instead of +81: not the default |

What the targets need and what stands in the way:

- **Timer path at most half of bpftrace's overhead**: not met, and not reachable with these
  hooks on this kernel: half of bpftrace's overhead is below the cost of empty programs on the
  same four syscall tracepoints (the per-event record the kernel builds, and the slow syscall
  path every task takes once any syscall tracepoint is on), give or take this machine's noise.
  Above that floor the observer's programs cost less than bpftrace's (0.57 to 0.89 of it across
  runs; the whole overhead 0.81 to 0.94 of bpftrace's). Kernels that allow trampolines could time
  `do_timer_create` with fentry/fexit at a fraction of the cost; this host refuses them.
- **1 million records per second on one core**: the storm from both cores here makes about a
  million records per second and the agent drains all of them with no loss at about 15% of one
  core (1.6% per 100k records/s); the generator, not the agent, is the limit.
- **RSS under 32 MiB, idle CPU under 0.1%**: met.
";

struct Tools {
    observer: PathBuf,
    timer_load: PathBuf,
    scripts: PathBuf,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::run()?;
    setup::apt_install(&["bpftrace"])?;
    cargo(&["build", "--release", "--package", "observer"])?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "xtask",
        "--bin",
        "timer-load",
    ])?;
    let root = workspace_root();
    let scripts = root.join("target/bench");
    std::fs::create_dir_all(&scripts)?;
    std::fs::write(scripts.join("equivalent.bt"), BPFTRACE_EQUIVALENT)?;
    std::fs::write(scripts.join("empty.bt"), BPFTRACE_EMPTY)?;
    let tools = Tools {
        observer: root.join("target/release/observer"),
        timer_load: root.join("target/release/timer-load"),
        scripts,
    };

    let mut report = String::new();
    writeln!(report, "# Benchmarks\n")?;
    writeln!(
        report,
        "Written by `cargo xtask bench` (options: {options:?}). {}\n",
        machine()
    )?;
    timer_overhead(&tools, options, &mut report)?;
    startup(&tools, &mut report)?;
    footprint_and_throughput(&tools, &mut report)?;
    scrape_cost(&tools, &mut report)?;
    module_path(&mut report)?;
    report.push_str(HISTORY);
    std::fs::write(root.join("BENCHMARKS.md"), &report)?;
    println!("{report}");
    Ok(())
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("Machine: {cores} cores, {cpu}; kernel {}.", kernel.trim())
}

/// A running tracer, stopped on drop.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            // SAFETY: signals our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    testkit::free_loopback_port().context("finding a free loopback port")
}

fn start_observer(tools: &Tools, port: u16, extra: &[&str]) -> anyhow::Result<Child> {
    let child = Command::new(&tools.observer)
        .args([
            "--web.listen-address",
            &format!("127.0.0.1:{port}"),
            "--log.level",
            "warn",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the observer")?;
    wait_http(port, Duration::from_secs(60))?;
    Ok(child)
}

fn start(tracer: Tracer, tools: &Tools) -> anyhow::Result<Running> {
    let script = match tracer {
        Tracer::Bare => return Ok(Running(None)),
        Tracer::Observer => return Ok(Running(Some(start_observer(tools, free_port()?, &[])?))),
        Tracer::ObserverRaw => {
            let raw = ["--timers.hook", "raw-tracepoint"];
            return Ok(Running(Some(start_observer(tools, free_port()?, &raw)?)));
        }
        Tracer::EmptyPrograms => tools.scripts.join("empty.bt"),
        Tracer::Bpftrace => tools.scripts.join("equivalent.bt"),
    };
    let mut child = Command::new("bpftrace")
        .arg(script)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting bpftrace")?;
    // bpftrace prints "Attaching N probes..." and attaches right after.
    let mut stdout = child.stdout.take().context("bpftrace stdout")?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&seen).contains("Attaching") {
        let mut byte = [0u8; 1];
        if stdout.read(&mut byte)? == 0 || Instant::now() > deadline {
            bail!("bpftrace did not attach");
        }
        seen.push(byte[0]);
    }
    thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    thread::sleep(Duration::from_millis(500));
    Ok(Running(Some(child)))
}

/// Runs `timer-load MODE N` and returns the nanoseconds per operation it printed.
fn ns_per_op(tools: &Tools, mode: &str, n: u64) -> anyhow::Result<f64> {
    let out = Command::new(&tools.timer_load)
        .args([mode, &n.to_string()])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("timer-load output")
}

fn timer_overhead(tools: &Tools, options: &Options, report: &mut String) -> anyhow::Result<()> {
    let tracers = [
        Tracer::Bare,
        Tracer::EmptyPrograms,
        Tracer::Observer,
        Tracer::ObserverRaw,
        Tracer::Bpftrace,
    ];
    // Per configuration: ns per timer pair, and ns per unwatched syscall.
    let mut pairs: Vec<Vec<f64>> = vec![Vec::new(); tracers.len()];
    let mut other: Vec<Vec<f64>> = vec![Vec::new(); tracers.len()];
    for round in 0..options.rounds {
        // Rotate the order each round so no configuration always follows the same one.
        for i in 0..tracers.len() {
            let index = (i + round) % tracers.len();
            let _running = start(tracers[index], tools)?;
            pairs[index].push(ns_per_op(tools, "pairs", options.pairs)?);
            other[index].push(ns_per_op(tools, "other", options.pairs * 4)?);
        }
        eprintln!("bench: timer round {}/{} done", round + 1, options.rounds);
    }
    let medians =
        |samples: &[Vec<f64>]| -> Vec<f64> { samples.iter().map(|s| median(s)).collect() };
    let (pair_medians, other_medians) = (medians(&pairs), medians(&other));
    writeln!(
        report,
        "## 1. Hook overhead on the timer path\n\nns per timer_create+timer_delete pair ({} pairs per sample), and ns \
         per getppid call (a syscall no hook watches: what a tracer costs the rest of the system), {} interleaved \
         rounds; overhead = median minus the bare median.\n\n| configuration | ns/pair median | p25-p75 | overhead \
         ns/pair | ns/getppid median | overhead ns/getppid |\n| --- | --- | --- | --- | --- | --- |",
        options.pairs, options.rounds
    )?;
    for (index, tracer) in tracers.iter().enumerate() {
        let (p25, p75) = quartiles(&pairs[index]);
        writeln!(
            report,
            "| {} | {:.0} | {p25:.0}-{p75:.0} | {:+.0} | {:.0} | {:+.1} |",
            tracer.name(),
            pair_medians[index],
            pair_medians[index] - pair_medians[0],
            other_medians[index],
            other_medians[index] - other_medians[0],
        )?;
    }
    let overhead = |index: usize| pair_medians[index] - pair_medians[0];
    let (floor, observer, raw, bpftrace) = (overhead(1), overhead(2), overhead(3), overhead(4));
    writeln!(
        report,
        "\nObserver overhead / bpftrace overhead: **{:.2}** with syscall tracepoints, **{:.2}** with raw tracepoints \
         (target at most 0.5). Observer overhead / empty-program floor: {:.2} and {:.2}.\n\nThe floor is what \
         any program on the four syscall tracepoints costs before doing anything: half of bpftrace's overhead is \
         {:.0} ns, {} the floor's {:.0} ns. What each tool adds above the floor (its programs' own work): observer \
         {:.0} ns, bpftrace {:.0} ns, a ratio of **{:.2}**.\n",
        observer / bpftrace,
        raw / bpftrace,
        observer / floor,
        raw / floor,
        bpftrace / 2.0,
        if bpftrace / 2.0 < floor {
            "below"
        } else {
            "above"
        },
        floor,
        observer - floor,
        bpftrace - floor,
        (observer - floor) / (bpftrace - floor),
    )?;
    Ok(())
}

fn wait_http(port: u16, limit: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if get(port, "/healthz").is_ok_and(|(status, _)| status == 200) {
            return Ok(start.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
    bail!("nothing answered on port {port} within {limit:?}")
}

fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    Ok(testkit::http::get(
        SocketAddr::from(([127, 0, 0, 1], port)),
        path,
        Duration::from_secs(10),
    )?)
}

fn startup(tools: &Tools, report: &mut String) -> anyhow::Result<()> {
    let mut times = Vec::new();
    for _ in 0..7 {
        let port = free_port()?;
        let mut child = Command::new(&tools.observer)
            .args([
                "--web.listen-address",
                &format!("127.0.0.1:{port}"),
                "--log.level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // /healthz answers only once every probe is attached.
        let took = wait_http(port, Duration::from_secs(60));
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait()?;
        times.push(took?.as_secs_f64() * 1000.0);
    }
    let (p25, p75) = quartiles(&times);
    writeln!(
        report,
        "## 5. Start-up\n\nExec to every probe attached and /healthz answering: median **{:.0} ms** (p25-p75 \
         {p25:.0}-{p75:.0} ms, 7 starts).\n",
        median(&times)
    )?;
    Ok(())
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn footprint_and_throughput(tools: &Tools, report: &mut String) -> anyhow::Result<()> {
    let port = free_port()?;
    let child = Running(Some(start_observer(tools, port, &[])?));
    let pid = child.0.as_ref().map_or(0, Child::id);
    thread::sleep(Duration::from_secs(2));
    let idle_rss = proc_status_kib(pid, "VmRSS:");
    let cpu0 = cpu_seconds(pid);
    thread::sleep(Duration::from_secs(10));
    let idle_cpu = (cpu_seconds(pid) - cpu0) / 10.0 * 100.0;

    // A storm from every core: each pair is two records (created, deleted).
    let before = get(port, "/metrics")?.1;
    let cpu1 = cpu_seconds(pid);
    let start = Instant::now();
    let storms: Vec<Child> = (0..thread::available_parallelism().map_or(1, std::num::NonZero::get))
        .map(|_| {
            Command::new(&tools.timer_load)
                .args(["storm", "10"])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut peak_rss = 0;
    while start.elapsed() < Duration::from_secs(10) {
        peak_rss = peak_rss.max(proc_status_kib(pid, "VmRSS:"));
        thread::sleep(Duration::from_millis(200));
    }
    for storm in storms {
        storm.wait_with_output()?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    thread::sleep(Duration::from_secs(1));
    let load_cpu = cpu_seconds(pid) - cpu1;
    let after = get(port, "/metrics")?.1;
    let kinds = ["timer_created", "timer_deleted"];
    let delta = |name: &str| -> f64 {
        kinds
            .iter()
            .map(|k| {
                let value = |text: &str| prom::value(text, name, &[("kind", k)]).unwrap_or(0.0);
                value(&after) - value(&before)
            })
            .sum()
    };
    let (received, lost) = (
        delta("observer_events_total"),
        delta("observer_events_lost_total"),
    );
    let rate = received / elapsed;
    writeln!(
        report,
        "## 2. Event pipeline throughput\n\nA timer storm from every core for 10 s (each create+delete pair is two \
         records): **{rate:.0} records/s** received, {lost:.0} lost (counted in the kernel), agent CPU {:.1}% of \
         one core while draining. The storm's rate is bounded by the syscalls themselves on this machine; the \
         agent's share of a core per 100k records/s is **{:.1}%**.\n",
        load_cpu / elapsed * 100.0,
        load_cpu / elapsed * 100.0 / (rate / 100_000.0)
    )?;
    writeln!(
        report,
        "## 3. Agent footprint\n\n| | value |\n| --- | --- |\n| RSS idle | {:.1} MiB |\n| RSS peak under the storm | \
         {:.1} MiB |\n| CPU idle (10 s) | {idle_cpu:.3}% of one core |\n",
        idle_rss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    )?;
    Ok(())
}

fn scrape_cost(tools: &Tools, report: &mut String) -> anyhow::Result<()> {
    let port = free_port()?;
    let _child = Running(Some(start_observer(tools, port, &[])?));
    // Fill the per-process family past its cap: creates under 5,000 distinct process names.
    let status = Command::new(&tools.timer_load)
        .args(["comms", "5000"])
        .status()?;
    if !status.success() {
        bail!("timer-load comms failed");
    }
    thread::sleep(Duration::from_secs(1));
    let body = get(port, "/metrics")?.1;
    let series = body.lines().filter(|l| !l.starts_with('#')).count();
    let mut times = Vec::new();
    for _ in 0..500 {
        let start = Instant::now();
        get(port, "/metrics")?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    writeln!(
        report,
        "## 4. Scrape cost\n\n500 scrapes of /metrics after timer creates under 5,000 distinct process names \
         ({series} series, {} bytes): p50 **{:.2} ms**, p99 **{:.2} ms**.\n",
        body.len(),
        median(&times),
        percentile(&times, 99)
    )?;
    Ok(())
}

/// Section 6, the module path, in one guest: the same signed modules loaded without and with
/// the observer, interleaved (ratios only: TCG emulates the CPU).
fn module_path(report: &mut String) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(crate::vm::bench_modules::report_path());
    let options = crate::vm::Options {
        scenarios: vec!["bench-modules".into()],
        kernel: crate::vm::KernelChoice::V6_12,
        timeout: 600,
        ..crate::vm::Options::default()
    };
    crate::vm::run(&options)?;
    let part = std::fs::read_to_string(crate::vm::bench_modules::report_path())
        .context("the VM scenario wrote no report")?;
    report.push_str(&part);
    Ok(())
}
