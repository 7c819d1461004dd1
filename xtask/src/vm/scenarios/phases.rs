//! The signature check's phases as the observer times them, against the kernel's own tracer:
//! ftrace's `function_graph` on `mod_verify_sig` and the phase functions, both attached at once
//! for the same loads. Per-load means are compared phase by phase, `other` (the check minus its
//! four timed phases) included; the table goes to `target/bench/vm-phases-<release>.md`.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use testkit::prom;

use super::{Check, Scenario};

/// Measured rounds; each loads the kernel's three scenario modules once.
const ROUNDS: usize = 3;
const LOADS: f64 = (ROUNDS * 3) as f64;

/// The traced functions: the check, then each phase with its `phase` label.
const CHECK_FUNCTION: &str = "mod_verify_sig";
const PHASE_FUNCTIONS: [(&str, &str); 4] = [
    ("parse", "pkcs7_parse_message"),
    ("digest", "pkcs7_digest"),
    ("key_lookup", "find_asymmetric_key"),
    ("public_key_verify", "public_key_verify_signature"),
];

/// How close the observer's mean must be to ftrace's, per phase: (share, or at least µs).
/// ftrace's time of a function includes the observer's trampolines on it, which the observer's
/// own window (from its entry program's last step to its exit program's first) leaves out: a
/// timed phase reads lower by up to one trampoline pair (10-25 µs per call under emulation in
/// these guests), hence the 25 µs floor. `other` must not contain the observer's probes:
/// within 15% or 10 µs of ftrace's remainder.
fn tolerance(phase: &str) -> (f64, f64) {
    match phase {
        "parse" | "key_lookup" => (0.35, 25.0),
        "other" => (0.15, 10.0),
        _ => (0.10, 25.0),
    }
}

const PHASE_SUM: &str = "observer_module_integrity_phase_duration_seconds_sum";
const PHASE_COUNT: &str = "observer_module_integrity_phase_duration_seconds_count";
const CHECK_SUM: &str = "observer_module_integrity_check_duration_seconds_sum";
const CHECK_COUNT: &str = "observer_module_integrity_check_duration_seconds_count";
const SIGNATURE_OK: &[(&str, &str)] = &[("method", "signature"), ("result", "ok")];

pub const PHASES_VS_FTRACE: Scenario = Scenario {
    host: Some(compare_with_ftrace),
    host_agent: false,
    name: "phases-vs-ftrace",
    about: "signature-check phases (other included) against ftrace's function_graph on the same loads",
    cmdline: "",
    // A measurement run by name (`cargo xtask vm --kernel K phases-vs-ftrace`): on 6.18 and 7.3
    // `other` is outside its tolerance of the ftrace remainder (see README, "Phase times").
    kernels: &[],
    // One warm-up load first: under emulation the first call through new trampolines is slow.
    guest: "T=/sys/kernel/tracing\n\
            unload() { for m in \"$@\"; do rmmod $(echo $m | tr - _); done; }\n\
            load /vm/mods/$M1.ko; unload $M1; sleep 2\n\
            for f in mod_verify_sig pkcs7_parse_message pkcs7_digest find_asymmetric_key \
            public_key_verify_signature; do echo $f >>$T/set_ftrace_filter || echo \"ftrace: no $f\"; done\n\
            echo 0 >$T/options/funcgraph-irqs; echo 1 >$T/options/funcgraph-tail\n\
            echo function_graph >$T/current_tracer && echo \"ftrace: function_graph on\"\n\
            echo PHASES-BEFORE-BEGIN\n\
            wget -q -O - http://127.0.0.1:9745/metrics | grep -E '^observer_module_integrity_(phase|check)_duration_seconds_(sum|count)'\n\
            echo PHASES-BEFORE-END\n\
            for round in 1 2 3; do load /vm/mods/$M1.ko /vm/mods/$M2.ko /vm/mods/$M3.ko; \
            unload $M1 $M2 $M3; done\n\
            echo 0 >$T/tracing_on\n\
            echo FTRACE-BEGIN; grep -E ' us +\\|' $T/trace; echo FTRACE-END\n",
    checks: &[&[
        Check::Console("ftrace: function_graph on"),
        Check::Console("FTRACE-END"),
    ]],
    kernel_checks: &[],
};

/// Per-function total µs and calls from function_graph lines (`funcgraph-tail` on): a leaf
/// is `name();`, a function with traced callees closes with `} /* name */`.
fn ftrace_totals(trace: &str) -> BTreeMap<String, (f64, u32)> {
    let mut totals: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for line in trace.lines() {
        let Some((left, right)) = line.split_once('|') else {
            continue;
        };
        let right = right.trim();
        let name = right.strip_suffix("();").or_else(|| {
            right
                .strip_prefix("} /* ")
                .and_then(|r| r.strip_suffix(" */"))
        });
        // The duration is the number just before "us"; markers like `+` or `!` may precede it.
        let tokens: Vec<&str> = left.split_whitespace().collect();
        let us = tokens
            .windows(2)
            .find(|w| w[1] == "us")
            .and_then(|w| w[0].parse::<f64>().ok());
        if let (Some(name), Some(us)) = (name, us) {
            let entry = totals.entry(name.trim().to_owned()).or_default();
            entry.0 += us;
            entry.1 += 1;
        }
    }
    totals
}

fn section<'a>(console: &'a str, begin: &str, end: &str) -> anyhow::Result<&'a str> {
    console
        .split(begin)
        .nth(1)
        .and_then(|s| s.split(end).next())
        .with_context(|| format!("no {begin} ... {end} section on the console"))
}

/// Mean µs per load of a phase (or of the whole check) between two scrapes.
fn observer_mean_us(
    before: &str,
    after: &str,
    sum: &str,
    count: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    let get = |text: &str, name: &str| prom::value(text, name, labels).unwrap_or(0.0);
    let calls = get(after, count) - get(before, count);
    (calls > 0.0).then(|| (get(after, sum) - get(before, sum)) * 1e6 / calls)
}

fn compare_with_ftrace(guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let before = section(console, "PHASES-BEFORE-BEGIN", "PHASES-BEFORE-END")?;
    let trace = section(console, "FTRACE-BEGIN", "FTRACE-END")?;
    let release = console
        .lines()
        .find_map(|l| l.split("vm: kernel ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap_or("unknown")
        .to_owned();
    let want = prom::value(before, CHECK_COUNT, SIGNATURE_OK).unwrap_or(0.0) + LOADS;
    // The last loads' records reach the agent within its drain interval.
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let (_, text) = testkit::http::get(guest, "/metrics", Duration::from_secs(10))?;
        if prom::value(&text, CHECK_COUNT, SIGNATURE_OK).unwrap_or(0.0) >= want
            || Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let totals = ftrace_totals(trace);
    let check = totals
        .get(CHECK_FUNCTION)
        .with_context(|| format!("ftrace recorded no {CHECK_FUNCTION}"))?;
    if f64::from(check.1) != LOADS {
        bail!(
            "ftrace saw {} calls of {CHECK_FUNCTION}, want {LOADS}",
            check.1
        );
    }
    let per_load = |function: &str| totals.get(function).map_or(0.0, |(us, _)| us / LOADS);
    let mut rows: Vec<(&str, f64, Option<f64>)> = Vec::new();
    let observer_check = observer_mean_us(before, &after, CHECK_SUM, CHECK_COUNT, SIGNATURE_OK);
    rows.push((
        "mod_verify_sig (whole check)",
        per_load(CHECK_FUNCTION),
        observer_check,
    ));
    let mut phases_us = 0.0;
    for (phase, function) in PHASE_FUNCTIONS {
        let ftrace_us = per_load(function);
        phases_us += ftrace_us;
        let labels = [("phase", phase)];
        rows.push((
            phase,
            ftrace_us,
            observer_mean_us(before, &after, PHASE_SUM, PHASE_COUNT, &labels),
        ));
    }
    let labels = [("phase", "other")];
    rows.push((
        "other",
        per_load(CHECK_FUNCTION) - phases_us,
        observer_mean_us(before, &after, PHASE_SUM, PHASE_COUNT, &labels),
    ));
    let mut table = format!(
        "Kernel {release}, {LOADS} signed loads after one warm-up, ftrace function_graph and the observer \
         attached together (emulated µs per load)\n\n\
         | phase | ftrace µs | observer µs | observer / ftrace | tolerance | within |\n\
         | --- | ---: | ---: | ---: | --- | --- |\n"
    );
    let mut failures = Vec::new();
    for (phase, ftrace_us, observer_us) in &rows {
        let key = phase.split(' ').next().unwrap_or(phase);
        let (share, floor) = if key == CHECK_FUNCTION {
            (0.10, 25.0)
        } else {
            tolerance(key)
        };
        let allowed = (ftrace_us.abs() * share).max(floor);
        let within = observer_us.is_some_and(|o| (o - ftrace_us).abs() <= allowed);
        let shown = observer_us.map_or("none".to_owned(), |o| format!("{o:.1}"));
        let ratio = observer_us.map_or("-".to_owned(), |o| format!("{:.3}", o / ftrace_us));
        let _ = writeln!(
            table,
            "| {phase} | {ftrace_us:.1} | {shown} | {ratio} | ±{:.0}% or ±{floor:.0} µs | {} |",
            share * 100.0,
            if within { "yes" } else { "no" }
        );
        if !within {
            failures.push(format!(
                "{phase}: observer {shown} µs, ftrace {ftrace_us:.1} µs (allowed ±{allowed:.1})"
            ));
        }
    }
    // The ftrace remainder also holds what lies around the observer's own window on
    // mod_verify_sig (ftrace's entry and exit records, the observer's outer trampoline): the
    // same remainder inside the observer's window, for reading the table (not asserted).
    if let Some(observer_check) = observer_check {
        let inner = observer_check - phases_us;
        let observer_other = rows.last().and_then(|r| r.2);
        let _ = writeln!(
            table,
            "| other in the observer's window (its check − ftrace's phases) | {inner:.1} | {} | {} | not asserted | - |",
            observer_other.map_or("none".to_owned(), |o| format!("{o:.1}")),
            observer_other.map_or("-".to_owned(), |o| format!("{:.3}", o / inner)),
        );
    }
    println!("{table}");
    let path = crate::workspace_root().join(format!("target/bench/vm-phases-{release}.md"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    if !failures.is_empty() {
        bail!("phase means differ from ftrace's: {}", failures.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_graph_lines() {
        let trace = " 1)               |  mod_verify_sig() {\n\
                     1) + 52.100 us    |    pkcs7_parse_message();\n\
                     1) ! 310.250 us   |    pkcs7_digest();\n\
                     1) ! 901.000 us   |  } /* mod_verify_sig */\n\
                     0)   9.500 us     |  find_asymmetric_key();\n";
        let totals = ftrace_totals(trace);
        assert_eq!(totals["mod_verify_sig"], (901.0, 1));
        assert_eq!(totals["pkcs7_parse_message"], (52.1, 1));
        assert_eq!(totals["pkcs7_digest"], (310.25, 1));
        assert_eq!(totals["find_asymmetric_key"], (9.5, 1));
        assert!(!totals.contains_key("mod_verify_sig()"));
    }
}
