//! The whole cost of watching the timer path, as a user feels it: nanoseconds per real
//! create+delete pair beside each tool, against bare, and what each tool costs a syscall it does
//! not watch.
use std::fmt::Write as _;

use super::{
    Options, Report,
    tracers::{self, Tools, Tracer},
};
use crate::stats::{median, quartiles};

const CONFIGURATIONS: [Tracer; 7] = [
    Tracer::Bare,
    Tracer::EmptyPeer,
    Tracer::EmptyPair,
    Tracer::Bpftrace,
    Tracer::Observer,
    Tracer::ObserverCountsOnly,
    Tracer::ObserverRaw,
];

pub fn section(tools: &Tools, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    // Per configuration: ns per timer pair, and ns per unwatched syscall.
    let mut pairs: Vec<Vec<f64>> = vec![Vec::new(); CONFIGURATIONS.len()];
    let mut other: Vec<Vec<f64>> = vec![Vec::new(); CONFIGURATIONS.len()];
    for round in 0..options.rounds {
        // Rotate the order each round so no configuration always follows the same one.
        for i in 0..CONFIGURATIONS.len() {
            let index = (i + round) % CONFIGURATIONS.len();
            let _running = tracers::start(CONFIGURATIONS[index], tools)?;
            pairs[index].push(tools.ns_per_op("pairs", options.pairs)?);
            other[index].push(tools.ns_per_op("other", options.pairs * 4)?);
        }
        eprintln!("bench: timer round {}/{} done", round + 1, options.rounds);
    }
    let pair_medians: Vec<f64> = pairs.iter().map(|s| median(s)).collect();
    let other_medians: Vec<f64> = other.iter().map(|s| median(s)).collect();
    let text = &mut report.text;
    writeln!(
        text,
        "## Hook overhead on the timer path\n\n\
         ns per timer_create+timer_delete pair ({} pairs per sample), and ns per getppid call (a \
         syscall no hook watches: what a tracer costs the rest of the system), {} interleaved \
         rounds; overhead = median minus the bare median. The bpftrace program is the minimal \
         one for the observer's timer outputs (counts by syscall and result, highest timer ID):\n\n\
         ```\n{}```\n\n\
         | configuration | ns/pair median | p25-p75 | overhead ns/pair | ns/getppid median | \
         overhead ns/getppid |\n| --- | --- | --- | --- | --- | --- |",
        options.pairs,
        options.rounds,
        Tracer::Bpftrace.script().map_or("", |(_, s)| s),
    )?;
    for (index, tracer) in CONFIGURATIONS.iter().enumerate() {
        let (p25, p75) = quartiles(&pairs[index]);
        writeln!(
            text,
            "| {} | {:.0} | {p25:.0}-{p75:.0} | {:+.0} | {:.0} | {:+.1} |",
            tracer.name(),
            pair_medians[index],
            pair_medians[index] - pair_medians[0],
            other_medians[index],
            other_medians[index] - other_medians[0],
        )?;
    }
    let overhead = |tracer: Tracer| {
        let index = CONFIGURATIONS
            .iter()
            .position(|t| *t == tracer)
            .unwrap_or(0);
        pair_medians[index] - pair_medians[0]
    };
    let bpftrace = overhead(Tracer::Bpftrace);
    let observer = overhead(Tracer::Observer);
    let counts_only = overhead(Tracer::ObserverCountsOnly);
    let raw = overhead(Tracer::ObserverRaw);
    let (floor_peer, floor_pair) = (overhead(Tracer::EmptyPeer), overhead(Tracer::EmptyPair));
    // Whole-loop timing is noisy on a shared machine: reported, not judged (the programs'
    // own cost below, from the kernel's statistics, carries the verdict).
    writeln!(
        text,
        "\nObserver overhead / bpftrace overhead: **{:.2}** by default, **{:.2}** with \
         `--timers.counts-only` (the same outputs as bpftrace's), **{:.2}** with raw tracepoints. \
         Empty programs on the observer's two tracepoints cost {floor_pair:.0} ns, on bpftrace's \
         three {floor_peer:.0} ns: the slow syscall path any syscall tracepoint turns on is most \
         of both. Above those floors: observer {:.0} ns by default, {:.0} ns counts-only, \
         bpftrace {:.0} ns.\n",
        observer / bpftrace,
        counts_only / bpftrace,
        raw / bpftrace,
        observer - floor_pair,
        counts_only - floor_pair,
        bpftrace - floor_peer,
    )?;
    Ok(())
}
