//! The agent's own costs: how many records it drains per CPU second, its memory and idle CPU,
//! what a scrape costs, and how long it takes to start.
use std::{
    fmt::Write as _,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testkit::prom;

use super::{
    Report, Verdict,
    tracers::{self, Tools},
};
use crate::stats::{median, percentile, quartiles};

const RSS_TARGET_MIB: f64 = 32.0;
const IDLE_CPU_TARGET_PERCENT: f64 = 0.1;
const RECORDS_TARGET: f64 = 1_000_000.0;

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

/// Timer records received and lost, summed over the two timer record kinds.
fn records(metrics: &str) -> (f64, f64) {
    let sum = |name: &str| -> f64 {
        ["timer_created", "timer_deleted"]
            .iter()
            .map(|kind| prom::value(metrics, name, &[("kind", kind)]).unwrap_or(0.0))
            .sum()
    };
    (
        sum("observer_events_total"),
        sum("observer_events_lost_total"),
    )
}

pub fn footprint_and_throughput(tools: &Tools, report: &mut Report) -> anyhow::Result<()> {
    let running = tracers::start_observer(tools, &[])?;
    let pid = running.pid().context("the observer has no process")?;
    let addr = running.addr.context("the observer has no address")?;
    thread::sleep(Duration::from_secs(2));
    let idle_rss = proc_status_kib(pid, "VmRSS:") as f64 / 1024.0;
    let cpu0 = cpu_seconds(pid);
    thread::sleep(Duration::from_secs(10));
    let idle_cpu = (cpu_seconds(pid) - cpu0) / 10.0 * 100.0;

    // A storm from every core: each pair is two records (created, deleted).
    let before = records(&tracers::get(addr, "/metrics")?.1);
    let cpu1 = cpu_seconds(pid);
    let start = Instant::now();
    let cores = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let storms: Vec<Child> = (0..cores)
        .map(|_| {
            Command::new(&tools.timer_load)
                .args(["storm", "10"])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let mut peak_rss_kib = 0;
    while start.elapsed() < Duration::from_secs(10) {
        peak_rss_kib = peak_rss_kib.max(proc_status_kib(pid, "VmRSS:"));
        thread::sleep(Duration::from_millis(200));
    }
    for storm in storms {
        if !storm.wait_with_output()?.status.success() {
            bail!("a timer-load storm failed");
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The last records reach the agent within its drain interval.
    thread::sleep(Duration::from_secs(1));
    let load_cpu = cpu_seconds(pid) - cpu1;
    let after = records(&tracers::get(addr, "/metrics")?.1);
    drop(running);
    let (received, lost) = (after.0 - before.0, after.1 - before.1);
    let rate = received / elapsed;
    let per_cpu_second = received / load_cpu.max(f64::MIN_POSITIVE);
    let peak_rss = peak_rss_kib as f64 / 1024.0;
    writeln!(
        report.text,
        "## Event pipeline throughput\n\n\
         A timer storm from each of the {cores} cores for 10 s (each create+delete pair is two \
         records): **{rate:.0} records/s** received, {lost:.0} lost (counted in the kernel), agent \
         CPU {:.1}% of one core while draining: **{per_cpu_second:.0} records per CPU second** of \
         the agent.\n\n\
         ## Agent footprint\n\n| | value |\n| --- | --- |\n| RSS idle | {idle_rss:.1} MiB |\n\
         | RSS peak under the storm | {peak_rss:.1} MiB |\n| CPU idle (10 s) | {idle_cpu:.3}% of \
         one core |\n",
        load_cpu / elapsed * 100.0,
    )?;
    report.verdicts.extend([
        Verdict {
            target: "1 million records/s on one core, none lost (records per agent CPU second)"
                .into(),
            measured: format!(
                "{per_cpu_second:.0} per CPU second ({rate:.0}/s offered by the storm), {lost:.0} lost"
            ),
            met: per_cpu_second >= RECORDS_TARGET && lost == 0.0,
        },
        Verdict {
            target: format!("RSS under {RSS_TARGET_MIB:.0} MiB, idle"),
            measured: format!("{idle_rss:.1} MiB"),
            met: idle_rss < RSS_TARGET_MIB,
        },
        Verdict {
            target: format!("RSS under {RSS_TARGET_MIB:.0} MiB, under the storm"),
            measured: format!("{peak_rss:.1} MiB peak"),
            met: peak_rss < RSS_TARGET_MIB,
        },
        Verdict {
            target: format!("idle CPU under {IDLE_CPU_TARGET_PERCENT}% of a core"),
            measured: format!("{idle_cpu:.3}%"),
            met: idle_cpu < IDLE_CPU_TARGET_PERCENT,
        },
    ]);
    Ok(())
}

pub fn scrape_cost(tools: &Tools, report: &mut Report) -> anyhow::Result<()> {
    let running = tracers::start_observer(tools, &[])?;
    let addr = running.addr.context("the observer has no address")?;
    // Fill the per-process family past its cap: creates under 5,000 distinct process names.
    let status = Command::new(&tools.timer_load)
        .args(["comms", "5000"])
        .status()?;
    if !status.success() {
        bail!("timer-load comms failed");
    }
    thread::sleep(Duration::from_secs(1));
    let body = tracers::get(addr, "/metrics")?.1;
    let series = prom::parse(&body).len();
    let mut times = Vec::new();
    for _ in 0..500 {
        let start = Instant::now();
        tracers::get(addr, "/metrics")?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    writeln!(
        report.text,
        "## Scrape cost\n\n500 scrapes of /metrics after timer creates under 5,000 distinct \
         process names ({series} series, {} bytes): p50 **{:.2} ms**, p99 **{:.2} ms**.\n",
        body.len(),
        median(&times),
        percentile(&times, 99)
    )?;
    Ok(())
}

pub fn startup(tools: &Tools, report: &mut Report) -> anyhow::Result<()> {
    const STARTS: usize = 7;
    let mut times = Vec::new();
    for _ in 0..STARTS {
        let addr = testkit::free_loopback_addr()?;
        let mut child = Command::new(&tools.observer)
            .args([
                "--web.listen-address",
                &addr.to_string(),
                "--log.level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // /healthz answers only once every probe is attached.
        let took = tracers::wait_healthy(addr, Duration::from_secs(60));
        // SAFETY: signals our own child, not yet reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        child.wait()?;
        times.push(took?.as_secs_f64() * 1000.0);
    }
    let (p25, p75) = quartiles(&times);
    writeln!(
        report.text,
        "## Start-up\n\nExec to every probe attached and /healthz answering: median **{:.0} ms** \
         (p25-p75 {p25:.0}-{p75:.0} ms, {STARTS} starts).\n",
        median(&times)
    )?;
    Ok(())
}
