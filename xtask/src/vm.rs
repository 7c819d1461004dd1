//! Scenarios in a QEMU guest running Debian's kernel, where modules, fentry/fexit, BPF LSM and
//! lockdown levels exist (the host kernel has no modules and refuses fentry).
//!
//! Each scenario boots its own guest: the kernel command line picks the scenario and the lockdown
//! or signature policy; /init starts the observer, runs the scenario's system calls, and waits
//! while the host scrapes /metrics through a forwarded port and checks the scenario's table.
//! Consoles and scrapes are kept in `.cache/vm/logs/`.
pub mod bench_modules;
mod initramfs;
pub(crate) mod kernel;
mod metrics;
mod qemu;
mod scenarios;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use self::{
    kernel::{Kernel, Series},
    metrics::{check_console, scrape_until_ok, settle_metrics},
    qemu::{Boot, Vm},
    scenarios::{Check, SCENARIOS, Scenario},
};

const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "zstd",
    "xz-utils",
];
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// How long the host keeps scraping for the counts to settle: events reach the agent through a
/// ring buffer, so the last ones may land just after the guest's ACTIONS-DONE.
const SETTLE: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct Options {
    /// Scenarios to run (all when none are named; see --list).
    pub scenarios: Vec<String>,
    /// Kernel series: `all` runs each scenario on the kernels it lists, a series runs the named
    /// scenarios (or all that list it) on that series only.
    #[arg(long, value_enum, default_value_t = KernelChoice::All)]
    pub kernel: KernelChoice,
    /// Seconds one guest may take from start to power-off before it is killed.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
    /// Copy each guest's console to stderr as it runs.
    #[arg(long)]
    pub verbose: bool,
    /// The observer's log level in the guest (RUST_LOG syntax, e.g. `debug`).
    #[arg(long, value_name = "LEVEL")]
    pub agent_log: Option<String>,
    /// Use the agent already in target/static instead of building it.
    #[arg(long)]
    pub no_build: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Guests run at once (each keeps about one core busy under TCG).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub guests: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scenarios: Vec::new(),
            kernel: KernelChoice::All,
            timeout: 180,
            verbose: false,
            agent_log: None,
            no_build: false,
            list: false,
            guests: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    #[value(name = "6.12")]
    V6_12,
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.18")]
    V6_18,
    #[value(name = "7.3")]
    V7_3,
    All,
}

impl KernelChoice {
    /// The one series chosen, or `None` for all.
    fn series(self) -> Option<Series> {
        match self {
            KernelChoice::V6_12 => Some(Series::V6_12),
            KernelChoice::V6_1 => Some(Series::V6_1),
            KernelChoice::V6_18 => Some(Series::V6_18),
            KernelChoice::V7_3 => Some(Series::V7_3),
            KernelChoice::All => None,
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.list {
        for s in SCENARIOS {
            let kernels: Vec<_> = s.kernels.iter().map(|k| k.label()).collect();
            println!("{:<20} [{}] {}", s.name, kernels.join(", "), s.about);
        }
        return Ok(());
    }
    let plan = plan(options)?;
    crate::setup::apt_install(HOST_PACKAGES)?;
    let root = crate::workspace_root();
    let cache = root.join(".cache/vm");
    let logs = cache.join("logs");
    fs::create_dir_all(&logs)?;

    let guest_tool = build_static("xtask", "guest-tool")?;
    let observer = if options.no_build {
        let path = static_binary("observer");
        path.exists().then_some(path)
    } else {
        match build_static("observer", "observer") {
            Ok(path) => Some(path),
            Err(e) => {
                eprintln!("vm: the agent did not build ({e:#}); the guests run without it");
                None
            }
        }
    };

    if plan.iter().any(|(_, s)| s.host_agent)
        && let Err(e) = crate::cargo(&["build", "--release", "--package", "observer"])
    {
        // The host step builds it again and fails its own scenario, with the reason.
        eprintln!("vm: the host's agent did not build ({e:#})");
    }
    // Every kernel and its initramfs first, then the guests, `options.guests` at a time.
    let mut guests: Vec<(Arc<Kernel>, Arc<PathBuf>, &'static Scenario)> = Vec::new();
    for series in Series::ALL {
        let scenarios: Vec<&Scenario> = plan
            .iter()
            .filter(|(s, _)| *s == series)
            .map(|(_, sc)| *sc)
            .collect();
        if scenarios.is_empty() {
            continue;
        }
        let kernel = Arc::new(kernel::ensure(&cache, series)?);
        eprintln!(
            "vm: kernel {} ({}), {} scenario(s)",
            kernel.release,
            kernel.package,
            scenarios.len()
        );
        let work = cache.join("work").join(series.label());
        fs::create_dir_all(&work)?;
        let started = Instant::now();
        let initramfs = Arc::new(initramfs::build(&initramfs::Inputs {
            kernel: &kernel,
            busybox: Path::new("/bin/busybox"),
            guest_tool: &guest_tool,
            observer: observer.as_deref(),
            scenarios: &scenarios,
            work: &work,
        })?);
        eprintln!(
            "vm: initramfs {} ({} KiB) in {:.1} s",
            initramfs.display(),
            fs::metadata(initramfs.as_ref())?.len() / 1024,
            started.elapsed().as_secs_f64()
        );
        for scenario in scenarios {
            guests.push((Arc::clone(&kernel), Arc::clone(&initramfs), scenario));
        }
    }
    let started = Instant::now();
    let results = run_guests(&guests, options, &logs);
    let wall = started.elapsed();

    let failed = results.iter().filter(|r| !r.failures.is_empty()).count();
    eprintln!("\nvm: summary");
    for r in &results {
        let verdict = if r.failures.is_empty() {
            "PASS"
        } else {
            "FAIL"
        };
        eprintln!(
            "  {verdict}  {:<5} {:<20} {}",
            r.series.label(),
            r.name,
            r.timings()
        );
    }
    eprintln!(
        "{} passed, {failed} failed; {} guest(s) in {:.0} s, {} at a time",
        results.len() - failed,
        results.len(),
        wall.as_secs_f64(),
        options.guests
    );
    if failed > 0 {
        bail!("{failed} of {} VM scenarios failed", results.len());
    }
    Ok(())
}

/// Runs the guests on `options.guests` threads; the results in the order of `guests`.
fn run_guests(
    guests: &[(Arc<Kernel>, Arc<PathBuf>, &'static Scenario)],
    options: &Options,
    logs: &Path,
) -> Vec<ScenarioResult> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, ScenarioResult)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..options.guests {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some((kernel, initramfs, scenario)) = guests.get(index) else {
                        return;
                    };
                    let result = run_scenario(kernel, initramfs, scenario, options, logs);
                    result.report();
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((index, result));
                }
            });
        }
    });
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, result)| result).collect()
}

/// Which scenario runs on which kernel.
fn plan(options: &Options) -> anyhow::Result<Vec<(Series, &'static Scenario)>> {
    let named: Vec<&'static Scenario> = options
        .scenarios
        .iter()
        .map(|name| {
            scenarios::find(name).with_context(|| {
                let names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
                format!("no scenario {name:?}; there are: {}", names.join(", "))
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let chosen: Vec<&'static Scenario> = if named.is_empty() {
        SCENARIOS.to_vec()
    } else {
        named.clone()
    };
    let mut plan = Vec::new();
    for series in Series::ALL {
        for &scenario in &chosen {
            let wanted = match options.kernel.series() {
                None => scenario.kernels.contains(&series),
                Some(chosen) => series == chosen,
            };
            // A series given explicitly runs named scenarios even where they are not listed.
            let listed = scenario.kernels.contains(&series) || !named.is_empty();
            if wanted && listed {
                plan.push((series, scenario));
            }
        }
    }
    if plan.is_empty() {
        bail!("no scenario runs on the chosen kernel");
    }
    Ok(plan)
}

fn static_binary(name: &str) -> PathBuf {
    crate::workspace_root()
        .join("target/static")
        .join(GUEST_TARGET)
        .join("release")
        .join(name)
}

/// A statically linked (static-pie glibc) build, which runs in the busybox guest.
fn build_static(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(
        Command::new(cargo)
            .args(["build", "--release", "--package", package, "--bin", bin])
            .args(["--target", GUEST_TARGET, "--target-dir", "target/static"])
            // For the guest's target only: not for build scripts, nor the eBPF programs'
            // inner build, which the agent's build script runs for the BPF target.
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .current_dir(crate::workspace_root()),
    )?;
    Ok(static_binary(bin))
}

struct ScenarioResult {
    series: Series,
    name: &'static str,
    failures: Vec<String>,
    /// Moments since QEMU started, in order.
    marks: Vec<(&'static str, Duration)>,
    console: String,
    log: PathBuf,
}

impl ScenarioResult {
    fn timings(&self) -> String {
        self.marks
            .iter()
            .map(|(what, at)| format!("{what} {:.1} s", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn report(&self) {
        let label = self.series.label();
        if self.failures.is_empty() {
            eprintln!("vm: PASS {label} {} ({})", self.name, self.timings());
            return;
        }
        eprintln!("vm: FAIL {label} {} ({})", self.name, self.timings());
        for failure in &self.failures {
            eprintln!("  - {failure}");
        }
        let lines: Vec<&str> = self.console.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!(
            "  console, last {} lines (all of it in {}):",
            tail.len(),
            self.log.display()
        );
        for line in tail {
            eprintln!("  | {line}");
        }
    }
}

fn run_scenario(
    kernel: &Kernel,
    initramfs: &Path,
    scenario: &'static Scenario,
    options: &Options,
    logs: &Path,
) -> ScenarioResult {
    let series = kernel.series;
    let stem = format!("{}-{}", series.label(), scenario.name);
    eprintln!("vm: running {stem}");
    // A scrape left from an earlier run would pass for this run's.
    let _ = fs::remove_file(logs.join(format!("{stem}.metrics.txt")));
    let mut result = ScenarioResult {
        series,
        name: scenario.name,
        failures: Vec::new(),
        marks: Vec::new(),
        console: String::new(),
        log: logs.join(format!("{stem}.console.log")),
    };
    let boot = Boot {
        vmlinux: &kernel.vmlinux,
        initramfs,
        cmdline: format!(
            "console=ttyS0 panic=-1 quiet observer_scenario={}{} {}",
            scenario.name,
            options
                .agent_log
                .as_ref()
                .map_or(String::new(), |level| format!(" observer_log={level}")),
            scenario.cmdline
        ),
        log: result.log.clone(),
        echo: options.verbose,
    };
    let deadline = Instant::now() + Duration::from_secs(options.timeout);
    let mut vm = match Vm::start(&boot) {
        Ok(vm) => vm,
        Err(e) => {
            result.failures.push(format!("{e:#}"));
            return result;
        }
    };
    drive(
        &mut vm,
        scenario,
        series,
        deadline,
        logs,
        &stem,
        &mut result,
    );
    if vm.wait_exit(deadline) {
        result.marks.push(("exit", vm.started.elapsed()));
    } else {
        result.marks.push(("killed", vm.started.elapsed()));
        result.failures.push(format!(
            "timed out: the guest was still running after {} s and was killed",
            options.timeout
        ));
    }
    result.console = vm.console();
    let want = format!("RESULT {} rc=0", scenario.name);
    if !result.console.lines().any(|l| l.trim_end() == want) {
        let got = result.console.lines().find(|l| l.starts_with("RESULT "));
        result.failures.push(format!(
            "expected the guest to end with `{want}`, got {}",
            got.map_or("no RESULT line".to_owned(), |l| format!("`{l}`"))
        ));
    }
    result
}

/// The host's side of the protocol in xtask/guest/init.sh; failures go into `result`.
fn drive(
    vm: &mut Vm,
    scenario: &Scenario,
    series: Series,
    deadline: Instant,
    logs: &Path,
    stem: &str,
    result: &mut ScenarioResult,
) {
    let failures = &mut result.failures;
    if vm.wait_for_line(&["vm: kernel"], deadline).is_none() {
        failures.push("the guest never reached /init".into());
        return;
    }
    result.marks.push(("init", vm.started.elapsed()));
    let Some(agent) = vm.wait_for_line(&["AGENT-READY", "AGENT-FAILED"], deadline) else {
        failures.push("the guest never said AGENT-READY or AGENT-FAILED".into());
        return;
    };
    let agent_up = agent.starts_with("AGENT-READY");
    if agent_up {
        result.marks.push(("agent", vm.started.elapsed()));
        // Through the forwarded port, as a Prometheus on the host would.
        let until = deadline.min(Instant::now() + Duration::from_secs(30));
        match scrape_until_ok(vm.metrics, until) {
            Ok(_) => {}
            Err(e) => failures.push(format!("the host could not scrape /metrics: {e:#}")),
        }
    } else {
        failures.push(format!("the observer did not start: {agent}"));
    }
    if vm.wait_for_line(&["ACTIONS-DONE"], deadline).is_none() {
        failures.push("the guest never said ACTIONS-DONE".into());
        return;
    }
    result.marks.push(("actions", vm.started.elapsed()));
    let console = vm.console();
    let checks: Vec<&Check> = scenario.checks_on(series).collect();
    let modules = series.scenario_modules();
    failures.extend(
        checks
            .iter()
            .filter_map(|c| check_console(c, &console, modules)),
    );

    let metric_checks: Vec<&Check> = checks
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Check::Metric(..) | Check::MetricSum(..) | Check::SumAtMost(..)
            )
        })
        .collect();
    if agent_up && !metric_checks.is_empty() {
        let until = deadline.min(Instant::now() + SETTLE);
        let (text, failed) = settle_metrics(vm.metrics, &metric_checks, modules, until);
        let _ = fs::write(logs.join(format!("{stem}.metrics.txt")), &text);
        failures.extend(failed);
        result.marks.push(("checked", vm.started.elapsed()));
    } else if !metric_checks.is_empty() {
        failures.push(format!(
            "{} metric check(s) not made: no observer",
            metric_checks.len()
        ));
    }
    if let Some(host) = scenario.host
        && agent_up
        && let Err(e) = host(vm.metrics, &vm.console())
    {
        failures.push(format!("{e:#}"));
    }
    let until = deadline.min(Instant::now() + Duration::from_secs(20));
    if let Err(e) = release_guest(vm.control, until) {
        failures.push(format!("could not tell the guest to finish: {e:#}"));
    }
}

/// Says "finish" until the guest answers "bye" (see `guest-tool await-host`).
fn release_guest(addr: SocketAddr, until: Instant) -> anyhow::Result<()> {
    let mut last = "no time left before the deadline".to_owned();
    while Instant::now() < until {
        let attempt = || -> anyhow::Result<()> {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            (&stream).write_all(b"finish\n")?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            if line.trim() != "bye" {
                bail!("answer {line:?}");
            }
            Ok(())
        };
        match attempt() {
            Ok(()) => return Ok(()),
            Err(e) => {
                last.clear();
                let _ = write!(last, "{e:#}");
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("no answer: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(names: &[&str], kernel: KernelChoice) -> Vec<(Series, &'static str)> {
        let options = Options {
            scenarios: names.iter().map(|n| (*n).to_owned()).collect(),
            kernel,
            ..Options::default()
        };
        plan(&options)
            .unwrap()
            .into_iter()
            .map(|(series, s)| (series, s.name))
            .collect()
    }

    #[test]
    fn plans() {
        let all = planned(&[], KernelChoice::All);
        // The benchmark never; dashboards once; every other scenario on each kernel it lists.
        let listed: usize = SCENARIOS.iter().map(|s| s.kernels.len()).sum();
        assert_eq!(all.len(), listed);
        assert!(all.iter().all(|(_, name)| *name != "bench-modules"));
        assert_eq!(all.iter().filter(|(_, n)| *n == "dashboards").count(), 1);
        // Every kernel runs the module and timer scenarios.
        for series in Series::ALL {
            for name in ["signed", "unsigned", "lockdown-integrity", "timers"] {
                assert!(all.contains(&(series, name)), "{name} on {series:?}");
            }
        }
        assert_eq!(
            planned(&["signed"], KernelChoice::All),
            [
                (Series::V6_12, "signed"),
                (Series::V6_1, "signed"),
                (Series::V6_18, "signed"),
                (Series::V7_3, "signed")
            ]
        );
        // 6.18 and 7.3 run every scenario but the benchmark and the dashboards.
        assert_eq!(planned(&[], KernelChoice::V6_18).len(), SCENARIOS.len() - 2);
        assert_eq!(planned(&[], KernelChoice::V7_3).len(), SCENARIOS.len() - 1);
        assert_eq!(
            planned(&["fentry-path"], KernelChoice::V6_1),
            [(Series::V6_1, "fentry-path")]
        );
        assert_eq!(
            planned(&["fentry-path"], KernelChoice::All),
            [
                (Series::V6_12, "fentry-path"),
                (Series::V6_18, "fentry-path"),
                (Series::V7_3, "fentry-path")
            ]
        );
        assert!(
            plan(&Options {
                scenarios: vec!["nope".into()],
                ..Options::default()
            })
            .is_err()
        );
    }
}
