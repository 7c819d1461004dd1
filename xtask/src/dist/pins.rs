//! The security collectors' pins under systemd (the unit runs the agent with `--pin`), judged
//! from the systemd guest's report. First boot: while the agent runs, one build directory in
//! bpffs; `systemctl stop` leaves exactly the security programs (modules, taint, lockdown) in
//! the kernel, the timer programs gone; a module loaded while no agent runs is counted by the
//! pinned programs, and the next start adopts them (the same program IDs, the load counter
//! going on from where it was, the waiting record read); a restart's time until /metrics answers
//! again; a load racing a restart counted once; another build's pins replaced. Second boot: the
//! agent pins afresh, and `dpkg --purge` leaves no program of the observer's and no pin.

use std::collections::BTreeSet;

use anyhow::{Context as _, ensure};

use super::{VERSION, check, guest::Report};

/// Loaded while the agent is stopped, and while it restarts: small library modules without
/// dependencies that the guest's kernel ships, other than the first boot's `crc7`, the second
/// boot's `modules-load.d` entry and ext4's crc16 (each module loads once a boot).
pub const STOPPED_MODULE: &str = "crc-itu-t";
pub const RACE_MODULE: &str = "ts_kmp";
/// The build directory the guest's own is renamed to, to stand for pins left by another build
/// (bpffs refuses dots in names: the agent writes a version's dots as underscores).
pub const OTHER_BUILD: &str = "0_0_0-0000000000000000";
/// The agent's default `--pin.path`, which the unit keeps.
const PIN_PATH: &str = "/sys/fs/bpf/observer";
/// The program name prefixes of the collectors that are pinned, and of the one that is not
/// (`<family>_<hook>`; the kernel keeps 15 characters of a name, more than any prefix).
const SECURITY: [&str; 3] = ["modules_", "taint_", "lockdown_"];
const TIMERS: &str = "timers_";

/// Programs by ID and name, as `check::tracing_programs` lists them.
type Programs = BTreeSet<(u64, String)>;

fn is_security(name: &str) -> bool {
    SECURITY.iter().any(|p| name.starts_with(p))
}

/// The observer's programs in a bpftool list (those the first boot's baseline does not hold),
/// split into the security collectors' and the timer collector's; any other new program is an
/// error, so that nothing of the agent's goes unclassified.
fn observers(report: &Report, section: &str, baseline: &Programs) -> anyhow::Result<[Programs; 2]> {
    let list = check::tracing_programs(&report.section(section)?)?;
    let new: Programs = list.difference(baseline).cloned().collect();
    let (security, rest): (Programs, Programs) = new.into_iter().partition(|(_, n)| is_security(n));
    let (timers, other): (Programs, Programs) =
        rest.into_iter().partition(|(_, n)| n.starts_with(TIMERS));
    ensure!(
        other.is_empty(),
        "bpftool ({section}) lists new programs of no collector: {other:?}"
    );
    Ok([security, timers])
}

/// A metric's samples summed, over those carrying `labels`; 0 when there is none.
fn sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    testkit::prom::sum_with_labels(text, metric, labels).unwrap_or(0.0)
}

fn loaded(text: &str) -> f64 {
    sum(
        text,
        "observer_module_loads_total",
        &[("outcome", "loaded")],
    )
}

/// A gauge that must be there, with one value.
fn gauge(text: &str, metric: &str, section: &str) -> anyhow::Result<f64> {
    testkit::prom::value(text, metric, &[])
        .with_context(|| format!("no {metric} in the {section} scrape"))
}

fn rc(report: &Report, step: &str) -> anyhow::Result<()> {
    let rc = report.line(&format!("rc {step}"))?;
    ensure!(rc == "0", "in the systemd guest, {step} exited {rc}");
    Ok(())
}

/// The first boot's pin checks (after `check::under_systemd`'s); prints its PASS line.
pub fn first_boot(report: &Report) -> anyhow::Result<()> {
    for step in [
        "modprobe-stopped",
        "start-adopt",
        "restart",
        "modprobe-race",
        "restart-race",
        "stop-upgrade",
        "rename",
        "start-upgrade",
    ] {
        rc(report, step)?;
    }
    let (build, pinned) = build_directory(report)?;
    let baseline = check::tracing_programs(&report.section("bpf-before")?)?;
    let [security, timers] = observers(report, "bpf-running", &baseline)?;
    ensure!(
        !security.is_empty() && !timers.is_empty(),
        "while the agent ran, bpftool listed security programs {security:?} and timer \
         programs {timers:?}: both collectors should have some"
    );
    ensure!(
        pinned == security.len(),
        "{pinned} programs pinned in {PIN_PATH}/{build}/programs, but the kernel held {} of \
         the security collectors: {security:?}",
        security.len()
    );
    let first = report.section("journal-first")?;
    ensure!(
        first.contains("pins: pinned"),
        "the first start's journal does not say `pins: pinned`:\n{first}"
    );
    stopped(report, &baseline, &security)?;

    // Started again over the pins: the same security programs, a load seen meanwhile counted.
    let [adopted_security, adopted_timers] = observers(report, "bpf-adopted", &baseline)?;
    ensure!(
        adopted_security == security,
        "the start after the stop loaded security programs again: {adopted_security:?}, \
         where {security:?} were pinned"
    );
    ensure!(
        adopted_timers.len() == timers.len() && adopted_timers.is_disjoint(&timers),
        "the timer programs are not loaded afresh by the start after the stop: {adopted_timers:?} \
         (before: {timers:?})"
    );
    let adopted = report.section("journal-adopted")?;
    ensure!(
        adopted.contains("pins: adopted"),
        "the start after the stop does not say `pins: adopted`:\n{adopted}"
    );
    let before_stop = report.section("metrics-after")?;
    let after_start = report.section("metrics-adopted")?;
    let counted = loaded(&after_start) - loaded(&before_stop);
    ensure!(
        counted == 1.0,
        "`modprobe {STOPPED_MODULE}` while the agent was stopped: the load counter went from {} \
         before the stop to {} after the start (want one more: it goes on)",
        loaded(&before_stop),
        loaded(&after_start)
    );
    let lockdown = |text: &str| sum(text, "observer_lockdown_decisions_total", &[]);
    ensure!(
        lockdown(&after_start) >= lockdown(&before_stop),
        "observer_lockdown_decisions_total went back from {} to {} over the stop and start",
        lockdown(&before_stop),
        lockdown(&after_start)
    );
    let drained = sum(
        &after_start,
        "observer_events_total",
        &[("kind", "module_load")],
    );
    ensure!(
        drained == 1.0,
        "the adopting agent read {drained} module_load records (want 1: the load of \
         {STOPPED_MODULE} recorded while no agent ran)"
    );
    for (metric, want) in [
        ("observer_security_pinned", 1.0),
        ("observer_security_adopted", 1.0),
    ] {
        let value = gauge(&after_start, metric, "adopted")?;
        ensure!(
            value == want,
            "after the adopting start, {metric} is {value}"
        );
    }
    // The inventory: crc7's load and the load while stopped were seen by the pinned programs,
    // so the modules present at start are those of the first start.
    let present = |text: &str| sum(text, "observer_modules_present_at_start", &[]);
    let first_start = report.section("metrics-before")?;
    ensure!(
        present(&after_start) == present(&first_start),
        "the adopting start found {} modules present at start, the first start {}: a load a \
         pinned program saw is in the inventory",
        present(&after_start),
        present(&first_start)
    );

    let restart_ms: u64 = report
        .line("restart-ms")?
        .parse()
        .context("the guest's restart-ms line")?;
    let race_before = report.section("metrics-race-before")?;
    let race_after = report.section("metrics-race")?;
    let raced = loaded(&race_after) - loaded(&race_before);
    ensure!(
        raced == 1.0,
        "`modprobe {RACE_MODULE}` during `systemctl restart observer` counted {raced} loads \
         (want 1)"
    );

    let upgrade = upgraded(report, &build, &baseline, &security)?;
    eprintln!(
        "dist: PASS pins: build {build} pinned (links, programs, maps); after a stop its {} \
         security programs alone stay in the kernel and `observer probes` says `pinned:`; a \
         load while stopped counted by them and the next start adopted them (the load counter \
         {} -> {}, the waiting record read); restart to serving again in {restart_ms} ms; a \
         load during a restart counted once; {upgrade}",
        security.len(),
        loaded(&before_stop),
        loaded(&after_start)
    );
    Ok(())
}

/// `ls -1R` of the pin path while the agent ran: one directory, named `<version>-<16 hex>`
/// (the version's dots as underscores), with links/, programs/ and maps/, none empty. Its name
/// and how many programs it pins.
fn build_directory(report: &Report) -> anyhow::Result<(String, usize)> {
    let listing = report.section("pins")?;
    let mut blocks = listing.split("\n\n").map(|block| {
        let mut lines = block.lines().filter(|l| !l.is_empty());
        let head = lines.next().unwrap_or_default().trim_end_matches(':');
        (
            head.to_owned(),
            lines.map(str::to_owned).collect::<Vec<_>>(),
        )
    });
    let (top, builds) = blocks
        .next()
        .context("`ls -1R` of the pins printed nothing")?;
    ensure!(
        top == PIN_PATH && builds.len() == 1,
        "want one build directory in {PIN_PATH}:\n{listing}"
    );
    let build = builds[0].clone();
    let version = VERSION.replace('.', "_");
    let hex = build
        .strip_prefix(&format!("{version}-"))
        .unwrap_or_default();
    ensure!(
        hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "the build directory {build} is not <version {version}>-<16 hex digits>"
    );
    let blocks: Vec<(String, Vec<String>)> = blocks.collect();
    let dir = format!("{PIN_PATH}/{build}");
    let entries = |sub: &str| {
        blocks
            .iter()
            .find(|(head, _)| *head == format!("{dir}/{sub}"))
            .map(|(_, entries)| entries.len())
            .unwrap_or_default()
    };
    for sub in ["links", "programs", "maps"] {
        ensure!(entries(sub) > 0, "no pins in {dir}/{sub}:\n{listing}");
    }
    Ok((build, entries("programs")))
}

/// After `systemctl stop`: exactly the security programs left (the same IDs as while the agent
/// ran), no timer program; `observer probes` names the pins.
fn stopped(report: &Report, baseline: &Programs, security: &Programs) -> anyhow::Result<()> {
    let [left, timers] = observers(report, "bpf-after", baseline)?;
    ensure!(
        left == *security && timers.is_empty(),
        "after `systemctl stop observer` the kernel holds security programs {left:?} and timer \
         programs {timers:?}; want exactly the security programs pinned while it ran, \
         {security:?}"
    );
    let probes = report.section("probes-stopped")?;
    ensure!(
        probes.lines().any(|l| {
            l.starts_with("pinned:") && l.contains(PIN_PATH) && l.contains("observer unpin")
        }),
        "`observer probes` with the agent stopped has no `pinned:` line naming {PIN_PATH} and \
         `observer unpin`:\n{probes}"
    );
    Ok(())
}

/// The first run's lines from its SIGTERM on do not say the security programs were detached
/// (they stay pinned). Checked after everything else, both boots included: what the agent says
/// matters less than what the kernel shows.
pub fn stop_lines(report: &Report) -> anyhow::Result<()> {
    let journal = report.section("journal-first")?;
    let stop: Vec<&str> = journal
        .lines()
        .skip_while(|l| !l.contains("SIGTERM"))
        .collect();
    ensure!(
        !stop.is_empty(),
        "the first run's journal has no line about its SIGTERM:\n{journal}"
    );
    let wrong: Vec<&&str> = stop.iter().filter(|l| says_all_detached(l)).collect();
    ensure!(
        wrong.is_empty(),
        "at its stop the agent says it detaches its programs, but the security programs stay \
         pinned (the kernel still holds them): {wrong:?}"
    );
    eprintln!(
        "dist: PASS the stop's journal says nothing of detaching the security programs: {stop:?}"
    );
    Ok(())
}

/// A stop line that claims every program, or the security ones, detached.
fn says_all_detached(line: &str) -> bool {
    let line = line.to_lowercase();
    line.contains("detach")
        && !line.contains("timer")
        && (line.contains("security") || !line.contains("pin"))
}

/// The start over another build's pins: replaced, the time unwatched exported, one directory
/// left (the real build's), new security programs in place of the old, counts from zero.
fn upgraded(
    report: &Report,
    build: &str,
    baseline: &Programs,
    security: &Programs,
) -> anyhow::Result<String> {
    let journal = report.section("journal-upgraded")?;
    ensure!(
        journal.contains("pins: replaced"),
        "the start over {OTHER_BUILD}'s pins does not say `pins: replaced`:\n{journal}"
    );
    let metrics = report.section("metrics-upgraded")?;
    let unwatched = gauge(&metrics, "observer_security_unwatched_seconds", "upgraded")?;
    ensure!(
        unwatched >= 0.0,
        "observer_security_unwatched_seconds is {unwatched}"
    );
    ensure!(
        gauge(&metrics, "observer_security_pinned", "upgraded")? == 1.0,
        "after replacing the pins, observer_security_pinned is not 1"
    );
    let dirs = report.section("pins-upgraded")?;
    ensure!(
        dirs.lines().eq([build]),
        "after replacing {OTHER_BUILD}'s pins, {PIN_PATH} holds {:?} (want only {build})",
        dirs.lines().collect::<Vec<_>>()
    );
    let [replaced, _] = observers(report, "bpf-upgraded", baseline)?;
    let names = |p: &Programs| {
        let mut names: Vec<String> = p.iter().map(|(_, n)| n.clone()).collect();
        names.sort_unstable();
        names
    };
    ensure!(
        replaced.is_disjoint(security) && names(&replaced) == names(security),
        "after the replacement the kernel holds security programs {replaced:?}; want new ones \
         of the same names as {security:?}, the old ones gone"
    );
    let counted = loaded(&metrics);
    ensure!(
        counted == 0.0,
        "after replacing another build's pins the load counter is {counted} (want 0: new maps)"
    );
    Ok(format!(
        "another build's pins replaced ({unwatched} s unwatched), {} new security programs in \
         place of the old",
        replaced.len()
    ))
}

/// The second boot: its start pinned afresh; `dpkg --purge` then left no program of the
/// observer's (by name against the first boot's baseline: IDs start again each boot) and no
/// pin.
pub fn purged(first: &Report, second: &Report) -> anyhow::Result<()> {
    let journal = second.section("boot-events")?;
    ensure!(
        journal.contains("pins: pinned"),
        "the second boot's start does not say `pins: pinned`:\n{journal}"
    );
    let metrics = second.section("boot-metrics")?;
    ensure!(
        gauge(&metrics, "observer_security_pinned", "second boot's")? == 1.0,
        "in the second boot, observer_security_pinned is not 1"
    );
    let purge = second.section("purge")?;
    rc(second, "purge").with_context(|| format!("dpkg --purge observer printed:\n{purge}"))?;
    // prerm's `observer unpin` says what it removed (postrm's `rm -rf` would say nothing).
    ensure!(
        purge.contains(&format!("removed {PIN_PATH}/")),
        "`dpkg --purge observer` did not run `observer unpin` on the pins; it printed:\n{purge}"
    );
    let names = |programs: Programs| -> BTreeSet<String> {
        programs.into_iter().map(|(_, name)| name).collect()
    };
    let baseline = names(check::tracing_programs(&first.section("bpf-before")?)?);
    let after = names(check::tracing_programs(&second.section("bpf-purged")?)?);
    let left: Vec<&String> = after.difference(&baseline).collect();
    let ours: Vec<&String> = after
        .iter()
        .filter(|n| is_security(n) || n.starts_with(TIMERS))
        .collect();
    ensure!(
        left.is_empty() && ours.is_empty(),
        "after `dpkg --purge observer` the kernel holds programs {left:?} (the observer's: \
         {ours:?}); dpkg printed:\n{purge}"
    );
    let pins = second.line("purged-pins")?;
    ensure!(
        pins == "absent",
        "after `dpkg --purge observer`, {PIN_PATH} is {pins}; dpkg printed:\n{purge}"
    );
    eprintln!(
        "dist: PASS purge: the second boot's agent pinned afresh; `dpkg --purge observer` left \
         no program of the observer's and no {PIN_PATH}; dpkg printed:\n{}",
        purge.trim_end()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(console: String) -> Report {
        Report { console }
    }

    #[test]
    fn reads_the_build_directory_from_ls() {
        let version = VERSION.replace('.', "_");
        let build = format!("{version}-0123456789abcdef");
        let listing = format!(
            "@@dist begin pins\n{PIN_PATH}:\n{build}\n\n{PIN_PATH}/{build}:\nlinks\nmaps\n\
             programs\n\n{PIN_PATH}/{build}/links:\nmodules_load_enter\n\n\
             {PIN_PATH}/{build}/maps:\nAGENT\n\n{PIN_PATH}/{build}/programs:\n\
             modules_load_enter\ntaint_add_taint\n@@dist end\n"
        );
        assert_eq!(
            build_directory(&report(listing.clone())).unwrap(),
            (build.clone(), 2)
        );
        let empty_links = listing.replace("links:\nmodules_load_enter\n", "links:\n");
        assert!(build_directory(&report(empty_links)).is_err());
        let dotted = listing.replace(&build, &format!("{VERSION}-0123456789abcdef"));
        assert!(build_directory(&report(dotted)).is_err());
    }

    #[test]
    fn a_stop_line_that_keeps_the_pins_is_not_a_detach_of_all() {
        assert!(says_all_detached("SIGTERM: detaching and exiting"));
        assert!(says_all_detached("detached the security programs"));
        assert!(!says_all_detached(
            "SIGTERM: detaching the timer programs; the security programs stay pinned"
        ));
        assert!(!says_all_detached(
            "serving metrics on http://127.0.0.1:9745/metrics"
        ));
    }
}
