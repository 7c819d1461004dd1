//! `cargo xtask bench`: what observing costs, measured the way users judge it, written to
//! BENCHMARKS.md. Every comparison runs its configurations interleaved, round by round, in the
//! same run, and reports medians, spreads and ratios: these machines are noisy. Every figure and
//! verdict in the file comes from the run that writes it.
mod agent;
mod collectors;
mod program_cost;
mod timer_path;
mod tracers;

use std::{fmt::Write as _, process::Command, thread};

use anyhow::{Context as _, bail};
use clap::Args;

use self::tracers::Tools;
use crate::{cargo, setup, workspace_root};

#[derive(Args, Debug)]
pub struct Options {
    /// Interleaved rounds per comparison.
    #[arg(long, default_value_t = 11)]
    rounds: usize,
    /// Timer create+delete pairs per measurement.
    #[arg(long, default_value_t = 200_000)]
    pairs: u64,
    /// Leave out the guest benchmarks (module path and timer path in QEMU, several minutes);
    /// the report says so.
    #[arg(long)]
    no_vm: bool,
}

/// A target and whether this run met it.
pub struct Verdict {
    target: String,
    measured: String,
    met: bool,
}

/// The sections as they are measured, and the verdicts they reach.
#[derive(Default)]
pub struct Report {
    text: String,
    verdicts: Vec<Verdict>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if options.rounds == 0 || options.pairs == 0 {
        bail!("--rounds and --pairs must be at least 1");
    }
    setup::run()?;
    setup::apt_install(&["bpftrace", "bpftool"])?;
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
    let tools = Tools::new(&root)?;
    collectors::require_flag(&tools)?;

    let mut report = Report::default();
    timer_path::section(&tools, options, &mut report)?;
    program_cost::section(&tools, options.pairs / 2, &mut report)?;
    // Twice the rounds: the goal (within 3% of bare) is finer than this machine's noise.
    collectors::section(&tools, options.rounds * 2, options.pairs * 4, &mut report)?;
    agent::footprint_and_throughput(&tools, &mut report)?;
    agent::scrape_cost(&tools, &mut report)?;
    agent::startup(&tools, &mut report)?;
    if options.no_vm {
        report.text.push_str(
            "## Module path and timer path (VM)\n\nNot measured in this run (`--no-vm`).\n",
        );
    } else {
        module_path(&mut report)?;
    }

    let mut out = String::new();
    writeln!(
        out,
        "# Benchmarks\n\nWritten by `cargo xtask bench` ({options:?}) on {}. {}\n",
        now(),
        machine()
    )?;
    writeln!(
        out,
        "## Targets\n\nEach verdict is computed from this run's figures below.\n\n\
         | target | this run | verdict |\n| --- | --- | --- |"
    )?;
    for v in &report.verdicts {
        let verdict = if v.met { "met" } else { "not met" };
        writeln!(out, "| {} | {} | {verdict} |", v.target, v.measured)?;
    }
    out.push('\n');
    out.push_str(&report.text);
    std::fs::write(root.join("BENCHMARKS.md"), &out)?;
    println!("{out}");
    Ok(())
}

/// `bpftool -j ARGS`, parsed (an empty answer is an empty list).
pub fn bpftool(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("bpftool {} output", args.join(" ")))
}

fn now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
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

/// The guest benchmarks, one guest at a time (ratios only: TCG emulates the CPU): the module
/// path (the same signed modules loaded without and with the observer, interleaved) and the
/// timer path (fentry/fexit against the syscall tracepoints, and unwatched syscalls).
fn module_path(report: &mut Report) -> anyhow::Result<()> {
    const BENCHES: [&str; 2] = ["modules", "timers"];
    let outputs = BENCHES.map(crate::vm::bench_output);
    for (section, verdict) in &outputs {
        let _ = std::fs::remove_file(section);
        let _ = std::fs::remove_file(verdict);
    }
    let options = crate::vm::Options {
        scenarios: BENCHES.iter().map(|name| format!("bench-{name}")).collect(),
        kernel: crate::vm::KernelChoice::V6_12,
        timeout: 600,
        guests: 1,
        ..crate::vm::Options::default()
    };
    crate::vm::run(&options)?;
    for (section, verdict) in &outputs {
        let text = std::fs::read_to_string(section)
            .with_context(|| format!("the VM scenario wrote no {}", section.display()))?;
        let verdict: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(verdict).context("the VM scenario wrote no verdict")?,
        )?;
        report.text.push_str(&text);
        report.verdicts.push(Verdict {
            target: verdict["target"].as_str().unwrap_or_default().to_owned(),
            measured: verdict["measured"].as_str().unwrap_or_default().to_owned(),
            met: verdict["met"].as_bool().unwrap_or(false),
        });
    }
    Ok(())
}
