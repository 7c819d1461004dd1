//! The event stream in a guest: a module load made from a child cgroup names that cgroup, a
//! taint names its module, IMA's check shows in a load it passed and one it refused, and every
//! event the guest's agent wrote validates against schemas/events.schema.json.
use std::net::SocketAddr;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use super::{
    Check, EVERY_KERNEL, Scenario, Want,
    modules::{ALL, LOADS},
    stream::{console_module, validated_events},
};

pub const EVENTS: Scenario = Scenario {
    host: Some(check_events),
    host_agent: false,
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "events",
    about: "--events json to a file: a load from a child cgroup names it, every event follows the schema",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: "mount -t cgroup2 none /sys/fs/cgroup\n\
            mkdir /sys/fs/cgroup/observer-loader\n\
            echo \"cgroup-load $M1\"\n\
            (echo 0 > /sys/fs/cgroup/observer-loader/cgroup.procs && load /vm/mods/$M1.ko)\n\
            load /vm/mods/$M2-unsigned.ko\n\
            cp /vm/mods/$M3.ko /tmp/$M3.ko; /vm/guest-tool ima-digest /tmp/$M3.ko\n\
            cp /vm/mods/$M1.ko /tmp/bad.ko; /vm/guest-tool ima-digest --wrong /tmp/bad.ko\n\
            echo \"ima-files $M3.ko $M1.ko\"; sed 's/^/MANIFEST /' /vm/mods/manifest\n\
            echo 'appraise func=MODULE_CHECK' >/sys/kernel/security/ima/policy\n\
            load /tmp/$M3.ko /tmp/bad.ko\n\
            sleep 2\n\
            echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n",
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
