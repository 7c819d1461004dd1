//! The host side of the `bench-timers` scenario: in one guest, rounds of timer pairs and
//! getppid calls with the observer on fentry/fexit, without it, on the syscall tracepoints and
//! on fentry/fexit with `--timers.counts-only`, with the programs' own time from the kernel's
//! BPF statistics (read in the guest by the guest tool: there is no bpftool there). Written to
//! [`super::bench_output`] for `cargo xtask bench`. Times are emulated (TCG): only ratios carry
//! over.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use anyhow::bail;

use crate::stats::{median, quartiles};

/// The configurations, in the guest's order: the agent's default (fentry/fexit), none,
/// `--timers.hook tracepoint`, and `--timers.counts-only` (fentry/fexit).
const CONFIGS: [&str; 4] = ["fentry", "bare", "tracepoint", "counts"];
const TARGET: f64 = 0.5;

/// One round of one configuration.
#[derive(Debug, Default, Clone)]
struct Round {
    pair_ns: Option<f64>,
    getppid_ns: Option<f64>,
    pairs: f64,
    /// Per program (`ID NAME`): run count and run time before and after the pairs.
    before: BTreeMap<String, (u64, u64)>,
    after: BTreeMap<String, (u64, u64)>,
}

impl Round {
    /// Per program name: (runs per pair, ns per run) over this round's pairs.
    fn programs(&self) -> BTreeMap<String, (f64, f64)> {
        let mut out = BTreeMap::new();
        for (key, (cnt, ns)) in &self.after {
            let (cnt0, ns0) = self.before.get(key).copied().unwrap_or((0, 0));
            let (runs, time) = (cnt.saturating_sub(cnt0), ns.saturating_sub(ns0));
            if runs == 0 || self.pairs == 0.0 {
                continue;
            }
            let name = key.split_once(' ').map_or(key.as_str(), |(_, n)| n);
            let entry = out.entry(name.to_owned()).or_insert((0.0, 0.0));
            // Two programs can share a shown name (the kernel cuts names to 15 bytes): their
            // runs and times add up.
            let total_runs = entry.0 * self.pairs + runs as f64;
            let total_time = entry.1 * entry.0 * self.pairs + time as f64;
            *entry = (total_runs / self.pairs, total_time / total_runs);
        }
        out
    }

    /// The programs' own time per pair.
    fn program_ns_per_pair(&self) -> f64 {
        self.programs()
            .values()
            .map(|(runs, ns)| runs * ns)
            .sum::<f64>()
            // An empty sum is -0.0, which would print as "-0".
            + 0.0
    }
}

/// `CONFIG timer-pairs N ns=T`, `CONFIG getppid N ns=T`, `CONFIG before|after bpf-stats ID NAME
/// run_cnt=C run_time_ns=T` lines, in order: a `timer-pairs` line ends the config's round.
fn rounds(console: &str) -> BTreeMap<&'static str, Vec<Round>> {
    let mut out: BTreeMap<&'static str, Vec<Round>> = BTreeMap::new();
    let mut open: BTreeMap<&'static str, Round> = BTreeMap::new();
    for line in console.lines().map(str::trim) {
        let Some((config, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some(config) = CONFIGS.iter().copied().find(|c| *c == config) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let value = |field: &str, name: &str| {
            field
                .strip_prefix(name)
                .and_then(|v| v.strip_prefix('='))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let round = open.entry(config).or_default();
        match fields.as_slice() {
            [side @ ("before" | "after"), stats @ ..] => {
                if let Some(program) = guest_tests::ProgramStats::parse(stats) {
                    let map = if *side == "before" {
                        &mut round.before
                    } else {
                        &mut round.after
                    };
                    map.insert(
                        format!("{} {}", program.id, program.name),
                        (program.runs, program.run_ns),
                    );
                }
            }
            ["timer-pairs", n, ns] => {
                if let (Ok(n), Some(ns)) = (n.parse::<f64>(), value(ns, "ns")) {
                    round.pairs = n;
                    round.pair_ns = Some(ns / n);
                }
            }
            ["getppid", n, ns] => {
                if let (Ok(n), Some(ns)) = (n.parse::<f64>(), value(ns, "ns")) {
                    round.getppid_ns = Some(ns / n);
                    // The last measurement of a round.
                    let done = std::mem::take(round);
                    out.entry(config).or_default().push(done);
                }
            }
            _ => {}
        }
    }
    out
}

pub fn timer_path_report(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let rounds = rounds(console);
    if CONFIGS
        .iter()
        .any(|c| rounds.get(c).is_none_or(Vec::is_empty))
    {
        bail!("the guest printed no complete round for every configuration");
    }
    let (section, verdict) = section(&rounds)?;
    super::save_bench("timers", &section, &verdict)
}

fn section(rounds: &BTreeMap<&str, Vec<Round>>) -> anyhow::Result<(String, serde_json::Value)> {
    let of = |config: &str| rounds.get(config).map(Vec::as_slice).unwrap_or_default();
    let med = |config: &str, f: &dyn Fn(&Round) -> Option<f64>| {
        let values: Vec<f64> = of(config).iter().filter_map(f).collect();
        (median(&values), quartiles(&values))
    };
    let mut text = String::from(
        "## Timer path in a guest (VM): fentry/fexit against the syscall tracepoints\n\n\
         Debian 6.12 under QEMU TCG, one guest, interleaved rounds: the observer on fentry/fexit (its \
         default), no observer, the observer with `--timers.hook tracepoint`, the observer with \
         `--timers.counts-only` on fentry/fexit (stopped and restarted between). Per round: timer_create+timer_delete pairs, then getppid calls (a syscall nothing \
         watches); the programs' own time from the kernel's BPF statistics (`kernel.bpf_stats_enabled=1`, \
         read by the guest tool). Times are emulated: only the ratios carry over.\n\n\
         | configuration | ns/pair median | programs' ns/pair median | ns/getppid median (p25-p75) | getppid / bare |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    let (bare_getppid, _) = med("bare", &|r| r.getppid_ns);
    for config in CONFIGS {
        let (pair, _) = med(config, &|r| r.pair_ns);
        let (programs, _) = med(config, &|r| Some(r.program_ns_per_pair()));
        let (getppid, (p25, p75)) = med(config, &|r| r.getppid_ns);
        writeln!(
            text,
            "| {config} | {pair:.0} | {programs:.0} | {getppid:.0} ({p25:.0}-{p75:.0}) | {:.3} |",
            getppid / bare_getppid
        )?;
    }
    text.push_str("\nPer program (median over rounds; the kernel keeps 15 bytes of a name, so an entry and \
                   an exit program of one syscall can share a row, their runs added):\n\n| configuration | program | runs per pair | ns per run |\n| --- | --- | --- | --- |\n");
    for config in ["fentry", "tracepoint", "counts"] {
        let mut names: Vec<String> = of(config)
            .iter()
            .flat_map(|r| r.programs().into_keys())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let (runs, _) = med(config, &|r| r.programs().get(&name).map(|p| p.0));
            let (ns, _) = med(config, &|r| r.programs().get(&name).map(|p| p.1));
            writeln!(text, "| {config} | `{name}` | {runs:.2} | {ns:.0} |")?;
        }
    }
    let programs = |config: &str| med(config, &|r| Some(r.program_ns_per_pair())).0;
    let (fentry, tracepoint, counts) = (
        programs("fentry"),
        programs("tracepoint"),
        programs("counts"),
    );
    let ratio = fentry / tracepoint;
    let met = ratio <= TARGET;
    writeln!(
        text,
        "\nfentry/fexit programs' time per pair over the tracepoint path's, same configuration: \
         **{ratio:.2}** (target at most {TARGET}: {}); the programs do the same work on both \
         mechanisms. `--timers.counts-only` on fentry/fexit: **{:.2}** of the tracepoint path's \
         default, {:.2} of fentry/fexit's default. Unwatched getppid: {:.3} of bare with \
         fentry/fexit, {:.3} with the tracepoints, {:.3} counts-only.\n",
        if met { "met" } else { "not met" },
        counts / tracepoint,
        counts / fentry,
        med("fentry", &|r| r.getppid_ns).0 / bare_getppid,
        med("tracepoint", &|r| r.getppid_ns).0 / bare_getppid,
        med("counts", &|r| r.getppid_ns).0 / bare_getppid,
    )?;
    let verdict = serde_json::json!({
        "target": format!("timer programs on fentry/fexit at most {TARGET} of the tracepoint path's (VM, BPF statistics, same configuration)"),
        "measured": format!("{ratio:.2} ({fentry:.0} against {tracepoint:.0} emulated ns per pair; counts-only on fentry/fexit {:.2})", counts / tracepoint),
        "met": met,
    });
    Ok((text, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_and_program_costs_from_console_lines() {
        let console = "fentry before bpf-stats 7 timers_create_f run_cnt=10 run_time_ns=1000\n\
                       fentry before bpf-stats 8 timers_create_f run_cnt=0 run_time_ns=0\n\
                       fentry timer-pairs 100 ns=500000\n\
                       fentry after bpf-stats 7 timers_create_f run_cnt=110 run_time_ns=21000\n\
                       fentry after bpf-stats 8 timers_create_f run_cnt=100 run_time_ns=10000\n\
                       fentry getppid 1000 ns=200000\n\
                       bare timer-pairs 100 ns=300000\n\
                       bare getppid 1000 ns=190000\n";
        let rounds = rounds(console);
        let fentry = &rounds["fentry"][0];
        assert_eq!(fentry.pair_ns, Some(5000.0));
        assert_eq!(fentry.getppid_ns, Some(200.0));
        // Two programs under one cut name: 200 runs, 30000 ns over 100 pairs.
        let programs = fentry.programs();
        assert_eq!(programs["timers_create_f"], (2.0, 150.0));
        assert_eq!(fentry.program_ns_per_pair(), 300.0);
        assert_eq!(rounds["bare"][0].program_ns_per_pair(), 0.0);
    }
}
