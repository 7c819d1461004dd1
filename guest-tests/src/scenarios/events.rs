//! The event stream in a guest: a module load made from a child cgroup names that cgroup, a
//! taint names its module, IMA's check shows in a load it passed and one it refused, the loads
//! either side of a step of the guest's clock each carry the time they were made, and every
//! event the guest's agent wrote validates against schemas/events.schema.json.
use std::net::SocketAddr;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use super::{
    Check, Scenario, WITH_IMA, Want,
    modules::{ALL, LOADS},
    stream::{console_module, validated_events},
};

/// Seconds the guest steps its clock forward between its first two loads: a day, which no
/// delay of an emulated guest comes near.
macro_rules! clock_step {
    () => {
        "86400"
    };
}

/// The first load's event is in the file (its drain has taken the offset) before the clock
/// steps, so only the second load comes after the step; `wall-clock` lines give the guest's
/// clock just after each of the two (busybox's date has whole seconds only).
const GUEST: &str = concat!(
    "mount -t cgroup2 none /sys/fs/cgroup\n\
    mkdir /sys/fs/cgroup/observer-loader\n\
    echo \"cgroup-load $M1\"\n\
    (echo 0 > /sys/fs/cgroup/observer-loader/cgroup.procs && load /vm/mods/$M1.ko)\n\
    echo \"wall-clock $M1 $(date -u +'%s %Y-%m-%dT%H:%M:%SZ')\"\n\
    timeout 20 sh -c 'until grep -q module_load /tmp/events.json; do usleep 100000; done' \
      || echo 'vm: no module_load in /tmp/events.json'\n\
    date -s @$(( $(date +%s) + ",
    clock_step!(),
    " )) >/dev/null\n\
    load /vm/mods/$M2-unsigned.ko\n\
    echo \"wall-clock $M2 $(date -u +'%s %Y-%m-%dT%H:%M:%SZ')\"\n\
    cp /vm/mods/$M3.ko /tmp/$M3.ko; /vm/guest-tool ima-digest /tmp/$M3.ko\n\
    cp /vm/mods/$M1.ko /tmp/bad.ko; /vm/guest-tool ima-digest --wrong /tmp/bad.ko\n\
    echo \"ima-files $M3.ko $M1.ko\"; sed 's/^/MANIFEST /' /vm/mods/manifest\n\
    echo 'appraise func=MODULE_CHECK' >/sys/kernel/security/ima/policy\n\
    load /tmp/$M3.ko /tmp/bad.ko\n\
    sleep 2\n\
    echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n"
);

pub const EVENTS: Scenario = Scenario {
    judge: Some(check_events),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "events",
    about: "--events json to a file: a load from a child cgroup names it, times hold across a \
            clock step, every event follows the schema",
    cmdline: "",
    kernels: WITH_IMA,
    guest: GUEST,
    checks: &[&[
        Check::Console("finit_module {M1}.ko rc=0"),
        Check::Console("finit_module {M2}-unsigned.ko rc=0"),
        Check::Console("finit_module {M3}.ko rc=0"),
        Check::Console("finit_module bad.ko errno=EACCES"),
        Check::Console("EVENTS-END"),
        Check::MetricSum(LOADS, ALL, Want::Eq(4.0)),
    ]],
    kernel_checks: &[],
};

/// The load from the child cgroup and the unsigned module's taint, exactly, among the events
/// the guest printed (each valid against the schema).
fn check_events(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let module = console_module(console, "cgroup-load ")?;
    let from_cgroup: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "module_load" && e["cgroup"] == "/observer-loader")
        .collect();
    let [load] = from_cgroup.as_slice() else {
        bail!("want one module_load from /observer-loader, got {from_cgroup:?} of {events:?}");
    };
    for (field, want) in [
        ("module", Value::from(module.as_str())),
        ("outcome", "loaded".into()),
        ("method", "signature".into()),
        ("uid", 0.into()),
    ] {
        ensure!(load[field] == want, "{field}: want {want}, got {load}");
    }
    let taints: Vec<&Value> = events.iter().filter(|e| e["event"] == "taint").collect();
    let [taint] = taints.as_slice() else {
        bail!("want one taint event, got {taints:?}");
    };
    ensure!(
        taint["flag"] == "E" && taint["cgroup"] == "/" && taint["module"].is_string(),
        "{taint}"
    );
    let files = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("ima-files "))
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .context("no ima-files line")?;
    let [passed_file, bad_file] = files.as_slice() else {
        bail!("ima-files: {files:?}");
    };
    let manifest = super::stream::manifest(console)?;
    let file_sha256 = |file: &str| {
        manifest
            .get(file)
            .and_then(|m| m.get("file_sha256"))
            .cloned()
            .with_context(|| format!("no file_sha256 for {file} in the manifest"))
    };
    check_ima_events(
        &events,
        &console_module(console, "ima-digest ")?,
        &file_sha256(passed_file)?,
        &file_sha256(bad_file)?,
    )?;
    check_clock_step(&events, console)?;
    println!(
        "vm: events: {} events valid against the schema; the load from /observer-loader named",
        events.len()
    );
    Ok(())
}

/// The load IMA passed carries its check (then its signature check), the one it refused is
/// `rejected_ima` with EACCES and a failed check; each names IMA's hash of its file, which is
/// the host's SHA-256 of the file's bytes (`passed_sha256`, `bad_sha256`). The refused one never
/// reached a signature check: its digest is the file's.
fn check_ima_events(
    events: &[Value],
    passed: &str,
    passed_sha256: &str,
    bad_sha256: &str,
) -> anyhow::Result<()> {
    let load_of = |module: &str| {
        events
            .iter()
            .find(|e| e["event"] == "module_load" && e["module"] == module)
            .with_context(|| format!("no module_load event for {module} in {events:?}"))
    };
    let ok = load_of(passed)?;
    ensure!(
        ok["outcome"] == "loaded"
            && ok["method"] == "signature"
            && ok["ima"]["method"] == "ima_hash"
            && ok["ima"]["result"] == "ok"
            && ok["ima"]["check_ns"].as_u64().is_some_and(|ns| ns > 0)
            && ok["phases_ns"]["ima_digest"]
                .as_u64()
                .is_some_and(|ns| ns > 0)
            && ok["ima"]["hash_algo"] == "sha256"
            && ok["ima"]["digest"] == passed_sha256
            && ok["digest_of"] == "module",
        "{ok}: want IMA's digest {passed_sha256}"
    );
    let refused = load_of("bad")?;
    ensure!(
        refused["outcome"] == "rejected_ima"
            && refused["result"] == "eacces"
            && refused["ima"]["result"] == "fail"
            && refused["ima"]["digest"] == bad_sha256
            && refused["digest"] == bad_sha256
            && refused["digest_of"] == "file"
            && refused["hash_algo"] == "sha256"
            && refused["total_ns"] == 0,
        "{refused}: want the file's digest {bad_sha256}"
    );
    println!("vm: events: IMA passed {ok}");
    println!("vm: events: IMA refused {refused}");
    Ok(())
}

/// How far a load's `time` may be from the guest's clock read just after it: `date` gives
/// whole seconds, and in an emulated guest up to a second or two passes between the kernel
/// stamping the load and `date` reading the clock. An offset not taken again after the step is
/// off by the whole step.
const CLOCK_SLACK_S: f64 = 5.0;

/// Each load either side of the clock step is stamped with the guest's clock at that load:
/// the second a day after the first, not the seconds after it that the offset taken at start
/// would give.
fn check_clock_step(events: &[Value], console: &str) -> anyhow::Result<()> {
    // `wall-clock STEM UNIX_SECONDS UTC`, the module as the kernel names it.
    let reading = |line: &str| -> anyhow::Result<(String, f64, String)> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [stem, unix, utc] = fields[..] else {
            bail!("wall-clock line: {line:?}");
        };
        Ok((stem.replace('-', "_"), unix.parse()?, utc.to_owned()))
    };
    let readings = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("wall-clock "))
        .map(reading)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let [(_, first_s, first_utc), (_, second_s, second_utc)] = readings.as_slice() else {
        bail!("want two wall-clock lines, got {readings:?}");
    };
    let step: f64 = clock_step!().parse()?;
    ensure!(
        second_s - first_s >= step,
        "the guest's clock did not step {step} s: {first_utc} at the first load, {second_utc} \
         at the second"
    );
    for (module, wall, wall_utc) in &readings {
        let load = events
            .iter()
            .find(|e| e["event"] == "module_load" && e["module"] == module.as_str())
            .with_context(|| format!("no module_load event for {module} in {events:?}"))?;
        let time = load["time"]
            .as_str()
            .context("a module_load without time")?;
        let stamped = unix_seconds(time).with_context(|| format!("time {time:?}"))?;
        ensure!(
            (stamped - wall).abs() <= CLOCK_SLACK_S,
            "the module_load of {module} is stamped {time}, but the guest's clock read \
             {wall_utc} just after it ({:+.0} s off; the clock stepped {step} s forward \
             between the first load and the second)",
            stamped - wall
        );
        println!("vm: events: {module} loaded at {wall_utc} by the guest's clock, stamped {time}");
    }
    Ok(())
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-11-30T05:30:00.123456789Z`, as the
/// agent writes it).
fn unix_seconds(time: &str) -> Option<f64> {
    let (date, clock) = time.strip_suffix('Z')?.split_once('T')?;
    let numbers = |text: &str| -> Option<Vec<i64>> {
        text.split(['-', ':']).map(|n| n.parse().ok()).collect()
    };
    let [year, month, day] = numbers(date)?[..] else {
        return None;
    };
    let (hm, second) = clock.rsplit_once(':')?;
    let [hour, minute] = numbers(hm)?[..] else {
        return None;
    };
    // Days from 1970-01-01 to the civil date (Howard Hinnant's days_from_civil).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let minutes = (days * 24 + hour) * 60 + minute;
    Some(minutes as f64 * 60.0 + second.parse::<f64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::unix_seconds;

    #[test]
    fn rfc3339_times() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00.000000000Z"), Some(0.0));
        assert_eq!(
            unix_seconds("2026-11-30T05:30:00.125000000Z"),
            Some(1_796_016_600.125)
        );
        // A leap day, and a time with whole seconds as the guest's date prints it.
        assert_eq!(unix_seconds("2024-02-29T00:00:01Z"), Some(1_709_164_801.0));
        assert_eq!(unix_seconds("2024-02-29 00:00:01"), None);
    }
}
