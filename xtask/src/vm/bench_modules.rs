//! The host side of the `bench-modules` scenario: the guest loads the same signed modules
//! without and with the observer, interleaved, and prints each load's time; this turns those
//! times and the integrity-check time the guest's agent measured into a section of
//! BENCHMARKS.md, left at [`super::bench_output`] for `cargo xtask bench`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use testkit::prom;

use crate::stats::{median, quartiles};

const CHECK: &str = "observer_module_integrity_check_duration_seconds";
const SIGNATURE_OK: &[(&str, &str)] = &[("method", "signature"), ("result", "ok")];
/// The target: the observer adds less than this share of an integrity check to a load.
const TARGET_PERCENT: f64 = 1.0;

/// Medians of the guest's load times and the agent's mean integrity-check time, written to
/// [`super::bench_output`].
pub fn module_path_report(guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let times = load_times(console);
    // The last loads' records reach the agent's state within its drain interval.
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let (_, text) = testkit::http::get(guest, "/metrics", Duration::from_secs(10))?;
        let count = prom::value(&text, &format!("{CHECK}_count"), SIGNATURE_OK);
        if count.is_some_and(|c| c > 0.0) || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(250));
    };
    let check_sum = prom::value(&metrics, &format!("{CHECK}_sum"), SIGNATURE_OK).unwrap_or(0.0);
    let check_count = prom::value(&metrics, &format!("{CHECK}_count"), SIGNATURE_OK).unwrap_or(0.0);
    if check_count == 0.0 || times.is_empty() {
        bail!("no load times or integrity checks from the guest");
    }
    let mean_check_ns = check_sum / check_count * 1e9;
    let with_loads = times
        .iter()
        .filter(|((_, label), _)| *label == "with")
        .map(|(_, t)| t.len())
        .sum::<usize>();
    let programs_ns = programs_ns_per_load(console, with_loads);
    let (section, verdict) = section(&times, mean_check_ns, programs_ns)?;
    super::save_bench("modules", &section, &verdict)
}

/// `loadtime LABEL MODULE ns=N` lines: nanoseconds per (module, label).
fn load_times(console: &str) -> BTreeMap<(&str, &str), Vec<f64>> {
    let mut times: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for line in console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("loadtime "))
    {
        let mut fields = line.split_whitespace();
        let (Some(label), Some(module), Some(ns)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if let Some(ns) = ns.strip_prefix("ns=").and_then(|n| n.parse::<f64>().ok()) {
            times.entry((module, label)).or_default().push(ns);
        }
    }
    times
}

/// The module programs' own run time (the kernel's BPF statistics, every round's `bpf-stats`
/// lines) per load made with the observer, and their runs per load.
fn programs_ns_per_load(console: &str, loads: usize) -> Option<(f64, f64)> {
    let (runs, ns) = console
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            guest_tests::ProgramStats::parse(&fields).map(|s| (s.runs, s.run_ns))
        })
        .fold((0u64, 0u64), |(r, n), (runs, ns)| (r + runs, n + ns));
    (loads > 0 && runs > 0).then(|| (ns as f64 / loads as f64, runs as f64 / loads as f64))
}

/// The report's section and its verdict: the module programs' own time per load as a share of
/// the integrity check (`programs`: ns and runs per load), beside the load times' medians
/// (whose spread is larger than the effect).
fn section(
    times: &BTreeMap<(&str, &str), Vec<f64>>,
    mean_check_ns: f64,
    programs: Option<(f64, f64)>,
) -> anyhow::Result<(String, serde_json::Value)> {
    let mut section = String::from(
        "## Module path (VM)\n\nDebian 6.12 under QEMU TCG, one guest: crc7, crc-itu-t and crc8 (signed) loaded \
         with `finit_module` and unloaded, 5 interleaved rounds without and with the observer (stopped and \
         restarted between). Times are emulated: only the ratios carry over.\n\n| module | load median without \
         | with | ratio |\n| --- | --- | --- | --- |\n",
    );
    let (mut all_without, mut all_with) = (Vec::new(), Vec::new());
    let modules: BTreeSet<&str> = times.keys().map(|(m, _)| *m).collect();
    for module in modules {
        let (Some(without), Some(with)) = (
            times.get(&(module, "without")),
            times.get(&(module, "with")),
        ) else {
            continue;
        };
        all_without.extend(without);
        all_with.extend(with);
        let (a, b) = (median(without), median(with));
        writeln!(
            section,
            "| {module} | {:.1} ms | {:.1} ms | {:.3} |",
            a / 1e6,
            b / 1e6,
            b / a
        )?;
    }
    let (a, b) = (median(&all_without), median(&all_with));
    let (p25, p75) = quartiles(&all_without);
    let load_percent = (b - a) / mean_check_ns * 100.0;
    writeln!(
        section,
        "\nAll loads: median {:.1} ms without (p25-p75 {:.1}-{:.1} ms), {:.1} ms with, ratio {:.3}: the \
         difference in load medians is {load_percent:.1}% of the integrity check the observer measured ({:.1} ms \
         on average), within a p25-p75 spread of {:.1} ms, {:.1} times that difference.\n",
        a / 1e6,
        p25 / 1e6,
        p75 / 1e6,
        b / 1e6,
        b / a,
        mean_check_ns / 1e6,
        (p75 - p25) / 1e6,
        (p75 - p25) / (b - a).abs().max(1.0),
    )?;
    let Some((programs_ns, runs)) = programs else {
        bail!("no BPF statistics of the module programs from the guest");
    };
    let percent = programs_ns / mean_check_ns * 100.0;
    let met = percent < TARGET_PERCENT;
    let verdict = if met { "met" } else { "not met" };
    writeln!(
        section,
        "The module programs' own time, from the kernel's BPF statistics (`kernel.bpf_stats_enabled=1` in the \
         guest, every program named `modules_*`): **{:.1} µs per load** in {runs:.1} runs, **{percent:.2}%** of the \
         integrity check (target under {TARGET_PERCENT:.0}%: {verdict}). The trampolines around the programs are \
         not in that figure.\n",
        programs_ns / 1e3,
    )?;
    let verdict = serde_json::json!({
        "target": format!(
            "module load: the observer's programs take under {TARGET_PERCENT:.0}% of an integrity check (VM, BPF statistics)"
        ),
        "measured": format!("{percent:.2}% ({:.1} µs of {:.1} ms)", programs_ns / 1e3, mean_check_ns / 1e6),
        "met": met,
    });
    Ok((section, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_from_console_lines() {
        let console = "loadtime without crc7 ns=2000000\nloadtime with crc7 ns=2010000\n\
                       loadtime without crc7 ns=2000000\nloadtime with crc7 ns=2010000\n\
                       loadtime with crc8 garbage\n";
        let times = load_times(console);
        assert_eq!(times[&("crc7", "without")], [2e6, 2e6]);
        assert!(!times.contains_key(&("crc8", "with")));
        let stats = "bpf-stats 7 modules_load_en run_cnt=2 run_time_ns=3000\n\
                     bpf-stats 8 modules_load_ex run_cnt=2 run_time_ns=5000\n";
        let programs = programs_ns_per_load(stats, 2);
        assert_eq!(programs, Some((4000.0, 2.0)));
        let (text, verdict) = section(&times, 2e6, programs).unwrap();
        assert_eq!(verdict["met"], true);
        assert!(
            text.contains("| crc7 | 2.0 ms | 2.0 ms | 1.005 |"),
            "{text}"
        );
        assert!(text.contains("0.5% of the integrity check"), "{text}");
        assert!(
            text.contains("**4.0 µs per load** in 2.0 runs, **0.20%**"),
            "{text}"
        );
        assert!(section(&times, 2e6, None).is_err());
    }
}
