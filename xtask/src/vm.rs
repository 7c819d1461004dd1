//! Scenarios in a QEMU guest running Debian's kernel, where modules, fentry/fexit, BPF LSM and
//! lockdown levels exist (the host kernel has no modules and refuses fentry).
//!
//! Each scenario boots its own guest: the kernel command line picks the scenario and the lockdown
//! or signature policy; /init starts the observer, runs the scenario's system calls, and waits
//! while the host scrapes /metrics through a forwarded port and checks the scenario's table.
//! Consoles and scrapes are kept in `.cache/vm/logs/`.
pub mod bench_modules;
pub mod bench_timers;
mod fixtures;
mod guest;
mod host_steps;
mod initramfs;
pub(crate) mod kernel;
mod qemu;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use guest_tests::scenarios::{self, SCENARIOS, Scenario};

use self::kernel::Series;

const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "zstd",
    "xz-utils",
];
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

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
    #[value(name = "5.10")]
    V5_10,
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
            KernelChoice::V5_10 => Some(Series::V5_10),
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
        for (name, series, why) in scenarios::NOT_ON {
            println!("{name} does not run on {}: {why}", series.label());
        }
        return Ok(());
    }
    let plan = plan(options)?;
    crate::setup::apt_install(HOST_PACKAGES)?;
    let root = crate::workspace_root();
    let cache = root.join(".cache/vm");
    let logs = cache.join("logs");
    fs::create_dir_all(&logs)?;

    let guest_tool = build_static("guest-tests", "guest-tool")?;
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

    if plan
        .iter()
        .any(|(_, s)| host_steps::of(s.name).is_some_and(|step| step.host_agent))
        && let Err(e) = crate::cargo(&["build", "--release", "--package", "observer"])
    {
        // The host step builds it again and fails its own scenario, with the reason.
        eprintln!("vm: the host's agent did not build ({e:#})");
    }
    // This run's own initramfs files: another `cargo xtask vm` (or bench) at the same time
    // builds its own, for its own scenarios, and must not replace ours between two guests.
    let run_work = cache
        .join("work")
        .join(format!("run-{}", std::process::id()));
    // Every kernel and its initramfs first, then the guests, `options.guests` at a time.
    let mut guests: Vec<guest::Guest> = Vec::new();
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
        let work = run_work.join(series.label());
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
    // The longest guest (a host step with a real Prometheus) first, so the others overlap it.
    guests.sort_by_key(|(_, _, scenario)| {
        !host_steps::of(scenario.name).is_some_and(|step| step.host_agent)
    });
    let settings = guest::Settings {
        timeout: options.timeout,
        verbose: options.verbose,
        agent_log: options.agent_log.clone(),
        guests: options.guests,
    };
    let (alone, shared): (Vec<_>, Vec<_>) = guests.into_iter().partition(|(_, _, s)| s.alone);
    let mut results = guest::run_guests(&shared, &settings, &logs);
    results.extend(guest::run_guests(
        &alone,
        &guest::Settings {
            guests: 1,
            ..settings
        },
        &logs,
    ));
    let wall = started.elapsed();
    // Best effort: a leftover folder only takes space.
    let _ = fs::remove_dir_all(&run_work);

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
        // The reasons again where a log's tail is all that is read.
        for failure in &r.failures {
            eprintln!("        {}", failure.lines().next().unwrap_or_default());
        }
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

/// Where a guest benchmark (`bench-NAME`) leaves its section of BENCHMARKS.md and its verdict
/// (`{"target", "measured", "met"}`) for `cargo xtask bench`.
pub fn bench_output(name: &str) -> (PathBuf, PathBuf) {
    let dir = crate::workspace_root().join("target/bench");
    (
        dir.join(format!("vm-{name}.md")),
        dir.join(format!("vm-{name}.json")),
    )
}

fn save_bench(name: &str, section: &str, verdict: &serde_json::Value) -> anyhow::Result<()> {
    let (section_path, verdict_path) = bench_output(name);
    if let Some(dir) = section_path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(section_path, section)?;
    fs::write(verdict_path, verdict.to_string())?;
    Ok(())
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
                (Series::V7_3, "signed"),
                (Series::V5_10, "signed")
            ]
        );
        // 7.3 runs every test scenario (the benchmarks list no kernel), 6.18 all but dashboards.
        let tests: Vec<&str> = SCENARIOS
            .iter()
            .filter(|s| !s.kernels.is_empty())
            .map(|s| s.name)
            .collect();
        let names =
            |kernel| -> Vec<&str> { planned(&[], kernel).into_iter().map(|(_, n)| n).collect() };
        assert_eq!(names(KernelChoice::V7_3), tests);
        let without_dashboards: Vec<&str> = tests
            .iter()
            .copied()
            .filter(|n| *n != "dashboards")
            .collect();
        assert_eq!(names(KernelChoice::V6_18), without_dashboards);
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
