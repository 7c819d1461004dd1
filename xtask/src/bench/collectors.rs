//! What the timer collector costs the rest of the host: on kernels where it attaches by
//! syscall tracepoints, every task takes the slow syscall path. A `getppid` loop (a syscall no
//! hook watches) bare, beside the observer with `--no-collector.timers`, and beside the
//! observer as installed.
use std::{collections::BTreeSet, fmt::Write as _, process::Command};

use anyhow::{Context as _, bail};

use super::{
    Report, Verdict, bpftool,
    tracers::{self, Tools, Tracer},
};
use crate::stats::{median, quartiles};

const CONFIGURATIONS: [Tracer; 3] = [Tracer::Bare, Tracer::ObserverTimersOff, Tracer::Observer];
/// The goal: with timers off, a syscall costs within this share of bare.
const WITHIN: f64 = 0.03;

/// Fails clearly, before anything is measured, when the agent has no collector flags.
pub fn require_flag(tools: &Tools) -> anyhow::Result<()> {
    let help = Command::new(&tools.observer)
        .arg("--help")
        .output()
        .with_context(|| format!("running {} --help", tools.observer.display()))?;
    if !String::from_utf8_lossy(&help.stdout).contains("--no-collector.timers") {
        bail!(
            "{} --help lists no --no-collector.timers flag: this agent cannot switch the timer \
             collector off, which the collector benchmark measures",
            tools.observer.display()
        );
    }
    Ok(())
}

/// What the observer has loaded with timers off: its programs' names and its metric families.
fn timers_off_state(running: &tracers::Running) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let pid = running.pid().context("the observer has no process")?;
    let ids = tracers::program_ids(pid)?;
    let names: BTreeSet<String> = bpftool(&["prog", "show"])?
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_u64().is_some_and(|id| ids.contains(&id)))
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    let addr = running.addr.context("the observer has no address")?;
    let (_, metrics) = tracers::get(addr, "/metrics")?;
    let timer_families = testkit::prom::families(&metrics)
        .into_iter()
        .map(|f| f.name)
        .filter(|name| name.starts_with("observer_posix_timer"))
        .collect();
    Ok((names.into_iter().collect(), timer_families))
}

pub fn section(
    tools: &Tools,
    rounds: usize,
    calls: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CONFIGURATIONS.len()];
    let mut timers_off = None;
    for round in 0..rounds {
        for i in 0..CONFIGURATIONS.len() {
            let index = (i + round) % CONFIGURATIONS.len();
            let running = tracers::start(CONFIGURATIONS[index], tools)?;
            if CONFIGURATIONS[index] == Tracer::ObserverTimersOff && timers_off.is_none() {
                timers_off = Some(timers_off_state(&running)?);
            }
            samples[index].push(tools.ns_per_op("other", calls)?);
        }
        eprintln!("bench: collector round {}/{rounds} done", round + 1);
    }
    let (programs, families) = timers_off.context("the timers-off configuration never ran")?;
    let timer_programs: Vec<&String> = programs
        .iter()
        .filter(|n| n.starts_with("timers_"))
        .collect();
    if !timer_programs.is_empty() || !families.is_empty() {
        bail!(
            "with --no-collector.timers the observer still loaded {timer_programs:?} and exported \
             {families:?}"
        );
    }

    let medians: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    // Each round's sample over the same round's bare one: the three ran back to back, so a
    // slow minute of this shared machine moves both sides of a ratio alike.
    let paired = |index: usize| -> Vec<f64> {
        samples[index]
            .iter()
            .zip(&samples[0])
            .map(|(sample, bare)| sample / bare)
            .collect()
    };
    let text = &mut report.text;
    writeln!(
        text,
        "## Collector flags: what the timer collector costs every other syscall\n\n\
         ns per getppid call ({calls} calls per sample; a syscall no hook watches), {rounds} \
         interleaved rounds. Paired ratio: each round's sample over the same round's bare sample \
         (the configurations of a round run back to back), median and p25-p75 over the rounds.\n\n\
         | configuration | ns/getppid median | p25-p75 | paired ratio to bare | p25-p75 |\n\
         | --- | --- | --- | --- | --- |"
    )?;
    for (index, tracer) in CONFIGURATIONS.iter().enumerate() {
        let (p25, p75) = quartiles(&samples[index]);
        let ratios = paired(index);
        let (r25, r75) = quartiles(&ratios);
        writeln!(
            text,
            "| {} | {:.1} | {p25:.1}-{p75:.1} | {:.3} | {r25:.3}-{r75:.3} |",
            tracer.name(),
            medians[index],
            median(&ratios),
        )?;
    }
    let off = median(&paired(1));
    let on = median(&paired(2));
    let met = off <= 1.0 + WITHIN;
    writeln!(
        text,
        "\nWith `--no-collector.timers` the observer had loaded, by bpftool, {} program(s), none \
         named `timers_*`: {}; and its /metrics had no `observer_posix_timer*` family. A getppid \
         costs **{off:.3}** of bare with timers off (paired median; goal: within {:.0}%: {}) and **{on:.3}** \
         with the default collectors.\n",
        programs.len(),
        if programs.is_empty() {
            "none".to_owned()
        } else {
            programs
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        WITHIN * 100.0,
        if met { "met" } else { "not met" },
    )?;
    report.verdicts.push(Verdict {
        target: format!(
            "getppid with `--no-collector.timers` within {:.0}% of bare",
            WITHIN * 100.0
        ),
        measured: format!("{off:.3} of bare, paired median (default collectors: {on:.3})"),
        met,
    });
    Ok(())
}
