//! What was loaded before the agent started: an unsigned module and one signed by a foreign
//! key out of tree are loaded before the observer starts (as udev's coldplug does on a real
//! host), besides the network driver's modules; a third loads once it runs. The inventory names
//! each module loaded before, once, exactly as /proc/modules lists it, counts them by taint,
//! and leaves out the one whose load it saw; `observer profile --since-start` sums up what the
//! running agent measured.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, ensure};
use serde_json::Value;

use super::{Check, EVERY_KERNEL, Scenario, Want, modules::LOADS, stream::validated_events};

const PRESENT: &str = "observer_modules_present_at_start";

pub const INVENTORY: Scenario = Scenario {
    judge: Some(check_inventory),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "load /vm/mods/$M1-unsigned.ko /vm/mods/$M2-foreign.ko\n",
    name: "inventory",
    about: "an unsigned and a foreign-key module loaded before the agent starts: one \
            module_present event each (and one per network module), counts by taint, the later \
            load not among them",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "echo \"later-load $M3\"\n\
            load /vm/mods/$M3.ko\n\
            sleep 4\n\
            sed 's/^/PROCMOD /' /proc/modules\n\
            /observer profile --since-start | sed 's/^/SINCE /'\n\
            echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n",
    checks: &[&[
        Check::Console("finit_module {M1}-unsigned.ko rc=0"),
        Check::Console("finit_module {M2}-foreign.ko rc=0"),
        Check::Console("finit_module {M3}.ko rc=0"),
        Check::Console("EVENTS-END"),
        // The running agent's own summary.
        Check::Console(
            "SINCE since the agent at 127.0.0.1:9745 started: 1 module load attempts, 1 loaded \
             (verified 1)",
        ),
        Check::Console("SINCE integrity checks by signature: 1, "),
        Check::Console("SINCE integrity checks by hash: none"),
        Check::Console("SINCE signature and hash checks: "),
        Check::Metric(PRESENT, &[("taint", "E")], Want::Eq(1.0)),
        Check::Metric(PRESENT, &[("taint", "EO")], Want::Eq(1.0)),
        // Only the load it saw is counted as a load.
        Check::MetricSum(LOADS, &[], Want::Eq(1.0)),
    ]],
    kernel_checks: &[],
};

/// `/proc/modules` as the guest printed it at the end: name → (size, taint letters sorted).
fn proc_modules(console: &str) -> BTreeMap<String, (u64, String)> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("PROCMOD "))
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let size = fields.get(1)?.parse().ok()?;
            let mut letters: Vec<char> = fields
                .get(6)
                .and_then(|t| t.strip_prefix('(')?.strip_suffix(')'))
                .unwrap_or("")
                .chars()
                .collect();
            letters.sort_unstable();
            Some((
                (*fields.first()?).to_owned(),
                (size, letters.into_iter().collect()),
            ))
        })
        .collect()
}

fn check_inventory(guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let mut listed = proc_modules(console);
    let later = super::stream::console_module(console, "later-load ")?;
    ensure!(
        listed.remove(&later).is_some(),
        "{later} not in /proc/modules: {listed:?}"
    );
    let present: BTreeMap<String, &Value> = events
        .iter()
        .filter(|e| e["event"] == "module_present")
        .map(|e| (e["module"].as_str().unwrap_or("").to_owned(), e))
        .collect();
    let named: Vec<&String> = present.keys().collect();
    let want: Vec<&String> = listed.keys().collect();
    ensure!(
        named == want,
        "module_present for {named:?}, /proc/modules less the later load has {want:?}"
    );
    ensure!(
        events
            .iter()
            .filter(|e| e["event"] == "module_present")
            .count()
            == present.len(),
        "a module named twice"
    );
    let mut by_taint: BTreeMap<String, f64> = BTreeMap::new();
    for (module, (size, letters)) in &listed {
        let event = present[module];
        let taints: Vec<String> = letters.chars().map(String::from).collect();
        ensure!(
            event["size_bytes"] == *size
                && event["taints"] == taints.join(",")
                && event["state"] == "live"
                && event["out_of_tree"] == letters.contains('O'),
            "{module}: {event} against /proc/modules ({size}, {letters:?})"
        );
        let label = if letters.is_empty() {
            "none"
        } else {
            letters.as_str()
        };
        *by_taint.entry(label.to_owned()).or_default() += 1.0;
    }
    let (status, text) = testkit::http::get(guest, "/metrics", Duration::from_secs(10))?;
    ensure!(status == 200, "/metrics answered {status}");
    for (taint, count) in &by_taint {
        let value = testkit::prom::value(&text, PRESENT, &[("taint", taint)]);
        ensure!(
            value == Some(*count),
            "{PRESENT}{{taint={taint:?}}} is {value:?}, /proc/modules says {count}"
        );
    }
    let loads: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "module_load")
        .collect();
    ensure!(
        loads.len() == 1 && loads[0]["module"] == later.as_str(),
        "want the later load alone: {loads:?}"
    );
    let summary = format!(
        "SINCE loaded before the agent started: {} modules",
        present.len()
    );
    ensure!(console.contains(&summary), "no line {summary:?}");
    let example = present
        .values()
        .find(|e| e["taints"] != "")
        .context("no tainted module_present")?;
    println!(
        "vm: inventory: {} modules present at start, by taint {by_taint:?}; e.g. {example}",
        present.len()
    );
    Ok(())
}
