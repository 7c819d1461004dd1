//! The guests of one run: each boots, runs its scenario, and is judged; `Settings::guests` of
//! them at a time.
use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;

use guest_tests::{judge::scrape, scenarios::Scenario};

use super::{
    host_steps,
    kernel::{Kernel, Series},
    qemu::{Boot, Vm},
};

/// What the command line says about running guests.
pub struct Settings {
    /// Seconds one guest may take from start to power-off before it is killed.
    pub timeout: u64,
    /// Copy each guest's console to stderr.
    pub verbose: bool,
    /// The guest agent's log level.
    pub agent_log: Option<String>,
    /// Guests at once.
    pub guests: u8,
}

/// One guest: its kernel, that kernel's initramfs, the scenario.
pub type Guest = (
    std::sync::Arc<Kernel>,
    std::sync::Arc<PathBuf>,
    &'static Scenario,
);

/// Boots a guest gets when its kernel dies before /init.
const MAX_BOOTS: u32 = 3;
/// /init runs 3-10 s after QEMU starts: a kernel not there in this time has hung (seen on 7.3
/// under TCG: no console output at all).
const BOOT_LIMIT: Duration = Duration::from_secs(60);
const NEVER_REACHED_INIT: &str = "the guest never reached /init";

/// Runs the guests on `options.guests` threads; the results in the order of `guests`.
pub fn run_guests(guests: &[Guest], options: &Settings, logs: &Path) -> Vec<ScenarioResult> {
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
                    let mut result = run_scenario(kernel, initramfs, scenario, options, logs);
                    let mut boots = 1;
                    while result.kernel_died_booting() && boots < MAX_BOOTS {
                        // Seen under TCG with two vCPUs: an int3 oops while the kernel patches
                        // its own text at boot (twice in a row once, on 7.3). Not the
                        // scenario's doing, so another boot, said aloud and kept in the summary.
                        let kept = result.log.with_extension(format!("boot-{boots}.log"));
                        let _ = fs::rename(&result.log, &kept);
                        eprintln!(
                            "vm: {} {}: the kernel died before /init; booting it again \
                             (that console in {})",
                            result.series.label(),
                            result.name,
                            kept.display()
                        );
                        result = run_scenario(kernel, initramfs, scenario, options, logs);
                        boots += 1;
                        result.boots = boots;
                    }
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

pub struct ScenarioResult {
    pub series: Series,
    pub name: &'static str,
    pub failures: Vec<String>,
    /// Moments since QEMU started, in order.
    marks: Vec<(&'static str, Duration)>,
    console: String,
    log: PathBuf,
    /// Boots it took: more than one when the kernel died before /init.
    pub boots: u32,
}

impl ScenarioResult {
    pub fn timings(&self) -> String {
        let mut marks: Vec<String> = self
            .marks
            .iter()
            .map(|(what, at)| format!("{what} {:.1} s", at.as_secs_f64()))
            .collect();
        if self.boots > 1 {
            marks.push(format!(
                "boot {}: the ones before died before /init",
                self.boots
            ));
        }
        marks.join(", ")
    }

    /// The kernel panicked or hung before /init ran: nothing of the scenario happened yet.
    fn kernel_died_booting(&self) -> bool {
        self.failures
            .iter()
            .any(|f| f.starts_with(NEVER_REACHED_INIT))
            && !self.console.contains("vm: kernel")
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
    options: &Settings,
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
        boots: 1,
    };
    let boot = Boot {
        vmlinux: &kernel.vmlinux,
        initramfs,
        cmdline: format!(
            "console=ttyS0 panic=-1 quiet observer_scenario={} observer_series={}{} {}",
            scenario.name,
            series.label(),
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
    drive(&mut vm, scenario, deadline, logs, &stem, &mut result);
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
    deadline: Instant,
    logs: &Path,
    stem: &str,
    result: &mut ScenarioResult,
) {
    let failures = &mut result.failures;
    if vm
        .wait_for_line(&["vm: kernel"], deadline.min(vm.started + BOOT_LIMIT))
        .is_none()
    {
        failures.push(format!(
            "{NEVER_REACHED_INIT} (within {} s)",
            BOOT_LIMIT.as_secs()
        ));
        // A panicked kernel has stopped already; a hung one is stopped here.
        vm.kill();
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
    // The guest has judged itself (guest-tests); what it found is on its console.
    let console = vm.console();
    failures.extend(
        console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("CHECK-FAILED "))
            .map(str::to_owned),
    );
    if !console.lines().any(|l| l.trim().starts_with("JUDGED ")) {
        failures.push("the guest's judge did not run to the end".into());
    }
    if let Err(e) = keep_reports(&console) {
        failures.push(format!("keeping the guest's reports: {e:#}"));
    }
    if agent_up {
        match scrape(vm.metrics) {
            Ok(text) => {
                let _ = fs::write(logs.join(format!("{stem}.metrics.txt")), &text);
            }
            Err(e) => failures.push(format!("the host's last scrape: {e:#}")),
        }
    }
    if let Some(step) = host_steps::of(scenario.name)
        && agent_up
        && let Err(e) = (step.run)(vm.metrics, &console)
    {
        failures.push(format!("{e:#}"));
    }
    let until = deadline.min(Instant::now() + Duration::from_secs(20));
    if let Err(e) = release_guest(vm.control, until) {
        failures.push(format!("could not tell the guest to finish: {e:#}"));
    }
}

/// The tables a guest printed for the host to keep (`guest_tests::report`), under target/bench/.
fn keep_reports(console: &str) -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("target/bench");
    for (file, text) in guest_tests::report::read(console) {
        let plain = !file.is_empty()
            && file
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
        anyhow::ensure!(plain && !file.starts_with('.'), "a report named {file:?}");
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(file), text)?;
    }
    Ok(())
}

/// QEMU accepts on the forwarded port before the guest listens, so only a real 200 counts.
fn scrape_until_ok(addr: SocketAddr, until: Instant) -> anyhow::Result<String> {
    loop {
        match scrape(addr) {
            Ok(text) => return Ok(text),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
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
