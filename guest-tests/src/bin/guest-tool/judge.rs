//! `judge SCENARIO SERIES CONSOLE`: the scenario's checks, inside the guest, against what this
//! guest printed (CONSOLE, which init.sh copies the console into) with the kernel's log, and
//! against the agent's /metrics.
use std::{
    fs,
    process::Command,
    time::{Duration, Instant},
};

use guest_tests::{Series, judge::judge, scenarios};

/// The line init.sh prints just before the judge: once the copy holds it, it holds all before.
const BEGIN: &str = "JUDGE-BEGIN";

pub fn run(args: &[String]) -> Result<(), String> {
    let [name, series, console] = args else {
        return Err("usage: guest-tool judge SCENARIO SERIES CONSOLE".to_owned());
    };
    let scenario = scenarios::find(name).ok_or_else(|| format!("no scenario {name:?}"))?;
    let series =
        Series::from_label(series).ok_or_else(|| format!("no kernel series {series:?}"))?;
    let mut text = read_console(console)?;
    // Lines the kernel printed itself (an oops, a warning) are on the serial console only.
    if let Ok(out) = Command::new("dmesg").output() {
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let (failures, _) = judge(scenario, series, &text);
    for failure in &failures {
        println!("CHECK-FAILED {}", failure.replace('\n', " "));
    }
    let total = scenario.checks_on(series).count() + usize::from(scenario.judge.is_some());
    println!("JUDGED {name}: {} of {total} failed", failures.len());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {total} checks failed", failures.len()))
    }
}

/// The console copy once it has caught up with [`BEGIN`] (the copy runs a moment behind).
fn read_console(path: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
        if text.lines().any(|l| l.trim() == BEGIN) {
            return Ok(text);
        }
        if Instant::now() >= deadline {
            return Err(format!("{path} never showed {BEGIN}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
