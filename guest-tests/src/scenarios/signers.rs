//! Who signed a module, why a check failed, what exactly was loaded: each scenario module in a
//! variant (see `vm::fixtures`: Debian-signed, re-signed with a key of our own the kernel does
//! not trust and marked out of tree, a corrupted signature, an unparsable one, unsigned, one
//! with a digest the kernel does not support; and a caller without CAP_SYS_MODULE), with
//! its reason counted exactly, and each event's signer and key id compared with the guest's
//! /proc/keys and the fixture's own key, its digest with the hash of the right bytes computed on
//! the host (the manifest), or absent where the kernel computed none.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use crate::Series;

use super::{
    CURRENT, Check, EVERY_KERNEL, Labels, Scenario, Want,
    modules::{ALL, LOADS, TAINTS},
    stream::{console_module, manifest, validated_events},
};

const BY_SIGNER: &str = "observer_module_loads_by_signer_total";

const LOADED_VERIFIED: Labels = &[
    ("outcome", "loaded"),
    ("method", "signature"),
    ("reason", "verified"),
];
const LOADED_UNKNOWN_KEY: Labels = &[
    ("outcome", "loaded"),
    ("method", "signature"),
    ("reason", "unknown_key"),
];
const BAD_SIGNATURE: Labels = &[
    ("outcome", "rejected_signature"),
    ("method", "signature"),
    ("reason", "bad_signature"),
];
const MALFORMED: Labels = &[
    ("outcome", "rejected_signature"),
    ("method", "signature"),
    ("reason", "malformed"),
];
const LOADED_UNSIGNED: Labels = &[
    ("outcome", "loaded"),
    ("method", "none"),
    ("reason", "unsigned"),
];
const UNSUPPORTED_CRYPTO: Labels = &[
    ("outcome", "loaded"),
    ("method", "signature"),
    ("reason", "unsupported_crypto"),
];
const NO_PERMISSION: Labels = &[
    ("outcome", "rejected_permission"),
    ("method", "none"),
    ("reason", "permission"),
];
const ENFORCED_SIGNED: Labels = &[
    ("outcome", "rejected_signature"),
    ("method", "signature"),
    ("reason", "enforced"),
];
const ENFORCED_UNSIGNED: Labels = &[
    ("outcome", "rejected_signature"),
    ("method", "none"),
    ("reason", "enforced"),
];

/// The guest's trusted keys and the host's manifest on the console, the variants loaded, then
/// the event stream.
const GUEST: &str = "echo \"kernel $(uname -r)\"\n\
    grep ' asymmetri ' /proc/keys | sed 's/^/KEY /'\n\
    sed 's/^/MANIFEST /' /vm/mods/manifest\n\
    echo \"signed-load $M1.ko\"\n\
    load /vm/mods/$M1.ko /vm/mods/$M2-foreign.ko /vm/mods/$M3-corrupt.ko \
    /vm/mods/$M3-malformed.ko /vm/mods/$M3-unsigned.ko\n\
    rmmod $(echo $M3 | tr - _) && load /vm/mods/$M3-md5.ko\n\
    load --uid 65534 /vm/mods/$M3.ko\n\
    echo \"tainted=$(cat /proc/sys/kernel/tainted)\"\n\
    sleep 2\n\
    echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n";

pub const SIGNERS: Scenario = Scenario {
    judge: Some(check_signers),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "signers",
    about: "signed, foreign-key (out of tree), corrupted, unparsable and unsigned copies: exact \
            reasons, signer and key id as /proc/keys and the fixture key say, digests as the host \
            hashed them",
    cmdline: "",
    kernels: EVERY_KERNEL,
    guest: GUEST,
    checks: &[&[
        Check::Console("finit_module {M1}.ko rc=0"),
        Check::Console("finit_module {M2}-foreign.ko rc=0"),
        // Not verified: on 6.1 (RSA) the padding check fails first, but pkcs7_validate_trust
        // hands back EKEYREJECTED for any failed verification.
        Check::Console("finit_module {M3}-corrupt.ko errno=EKEYREJECTED"),
        Check::Console("finit_module {M3}-malformed.ko errno=EBADMSG"),
        Check::Console("finit_module {M3}-unsigned.ko rc=0"),
        Check::Console("finit_module {M3}-md5.ko rc=0"),
        Check::Console("finit_module {M3}.ko errno=EPERM"),
        // E (unsigned or untrusted) and O (out of tree).
        Check::Console("tainted=12288"),
        Check::Console("EVENTS-END"),
        Check::Metric(LOADS, LOADED_VERIFIED, Want::Eq(1.0)),
        Check::Metric(LOADS, BAD_SIGNATURE, Want::Eq(1.0)),
        Check::Metric(LOADS, MALFORMED, Want::Eq(1.0)),
        Check::Metric(LOADS, LOADED_UNSIGNED, Want::Eq(1.0)),
        Check::Metric(LOADS, NO_PERMISSION, Want::Eq(1.0)),
        Check::MetricSum(LOADS, ALL, Want::Eq(7.0)),
        // Only the verified load counts for its signer.
        Check::MetricSum(BY_SIGNER, ALL, Want::Eq(1.0)),
        Check::Metric(BY_SIGNER, &[("signer", "other")], Want::Eq(0.0)),
        Check::Metric(
            TAINTS,
            &[("flag", "O"), ("module", "{M2.name}")],
            Want::Eq(1.0),
        ),
    ]],
    kernel_checks: &[
        // From 6.12 the kernel's PKCS#7 parser knows no MD5 (ENOPKG); 5.10's and 6.1's still
        // do, and find the copy signed by a key they do not trust.
        (
            CURRENT,
            &[
                Check::Metric(LOADS, LOADED_UNKNOWN_KEY, Want::Eq(1.0)),
                Check::Metric(LOADS, UNSUPPORTED_CRYPTO, Want::Eq(1.0)),
            ],
        ),
        (
            &[Series::V6_1, Series::V5_10],
            &[
                Check::Metric(LOADS, LOADED_UNKNOWN_KEY, Want::Eq(2.0)),
                Check::Metric(LOADS, UNSUPPORTED_CRYPTO, Want::Eq(0.0)),
            ],
        ),
    ],
};

pub const SIGNERS_ENFORCED: Scenario = Scenario {
    judge: Some(check_enforced),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "signers-enforced",
    about: "module.sig_enforce=1: the foreign-key copy and the unsigned one are refused as \
            enforced, the foreign key's id still named",
    cmdline: "module.sig_enforce=1",
    kernels: CURRENT,
    guest: "load /vm/mods/$M2-foreign.ko /vm/mods/$M3-unsigned.ko /vm/mods/$M1.ko\n\
            sleep 2\n\
            sed 's/^/MANIFEST /' /vm/mods/manifest\n\
            echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n",
    checks: &[&[
        Check::Console("finit_module {M2}-foreign.ko errno=EKEYREJECTED"),
        Check::Console("finit_module {M3}-unsigned.ko errno=EKEYREJECTED"),
        Check::Console("finit_module {M1}.ko rc=0"),
        Check::Console("EVENTS-END"),
        Check::Metric(LOADS, ENFORCED_SIGNED, Want::Eq(1.0)),
        Check::Metric(LOADS, ENFORCED_UNSIGNED, Want::Eq(1.0)),
        Check::Metric(LOADS, LOADED_VERIFIED, Want::Eq(1.0)),
        Check::MetricSum(LOADS, ALL, Want::Eq(3.0)),
    ]],
    kernel_checks: &[],
};

/// The asymmetric keys' descriptions from the guest's /proc/keys (`KEY ` lines): the fields
/// after the type, less the summary after the last ": ".
fn trusted_keys(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("KEY "))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let rest = fields.get(8..)?.join(" ");
            Some(
                rest.rsplit_once(": ")
                    .map_or(rest.clone(), |(d, _)| d.to_owned()),
            )
        })
        .collect()
}

/// The first module_load event of `module`.
fn load_event<'a>(events: &'a [Value], module: &str) -> anyhow::Result<&'a Value> {
    events
        .iter()
        .find(|e| e["event"] == "module_load" && e["module"] == module)
        .with_context(|| format!("no module_load for {module} in {events:?}"))
}

/// The digest the manifest computed for `file` with the event's algorithm.
fn manifest_digest<'a>(
    manifest: &'a BTreeMap<String, BTreeMap<String, String>>,
    file: &str,
    algo: &str,
) -> anyhow::Result<&'a str> {
    let entry = manifest
        .get(file)
        .with_context(|| format!("{file} not in the manifest"))?;
    entry
        .get(&format!("content_{}", algo.replace('-', "_")))
        .map(String::as_str)
        .with_context(|| format!("no content_{algo} for {file} in the manifest"))
}

/// The event's digest is the host's hash of the signed content, with the signature's algorithm.
fn digest_matches(
    event: &Value,
    manifest: &BTreeMap<String, BTreeMap<String, String>>,
    file: &str,
) -> anyhow::Result<()> {
    let algo = event["hash_algo"]
        .as_str()
        .with_context(|| format!("no hash_algo: {event}"))?;
    let want_algo = manifest[file].get("sig_hash").map(String::as_str);
    ensure!(
        want_algo == Some(algo),
        "{file}: hash_algo {algo}, manifest {want_algo:?}"
    );
    let want = manifest_digest(manifest, file, algo)?;
    ensure!(
        event["digest"] == want && event["digest_of"] == "module",
        "{file}: digest {} (of {}), want {want}",
        event["digest"],
        event["digest_of"]
    );
    Ok(())
}

fn check_signers(guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let manifest = manifest(console)?;
    let keys = trusted_keys(console);
    let signed = console_module(console, "signed-load ")?;

    // The Debian-signed load: its signer is one of the guest's trusted keys, its key id the
    // id in that key's description.
    let verified = load_event(&events, &signed)?;
    let signer = verified["signer"]
        .as_str()
        .with_context(|| format!("no signer: {verified}"))?;
    ensure!(
        keys.iter().any(|k| k == signer),
        "signer {signer:?} is none of /proc/keys' {keys:?}"
    );
    let key_id = signer.rsplit_once(": ").map(|(_, id)| id).unwrap_or("");
    ensure!(
        verified["reason"] == "verified" && verified["key_id"] == key_id,
        "{verified}"
    );
    let signed_file = manifest_file(&manifest, ".ko", verified)?;
    digest_matches(verified, &manifest, &signed_file)?;
    let (status, text) = testkit::http::get(guest, "/metrics", Duration::from_secs(10))?;
    ensure!(status == 200, "/metrics answered {status}");
    let by_signer = testkit::prom::value(&text, BY_SIGNER, &[("signer", signer)]);
    ensure!(
        by_signer == Some(1.0),
        "{BY_SIGNER}{{signer={signer:?}}} is {by_signer:?}"
    );

    // The others, by reason.
    let by_reason = |reason: &str| -> anyhow::Result<&Value> {
        events
            .iter()
            .find(|e| e["event"] == "module_load" && e["reason"] == reason)
            .with_context(|| format!("no module_load with reason {reason} in {events:?}"))
    };
    let foreign = by_reason("unknown_key")?;
    let foreign_file = manifest_file(&manifest, "-foreign.ko", foreign)?;
    let fixture = &manifest[&foreign_file];
    ensure!(
        foreign["outcome"] == "loaded"
            && foreign.get("signer").is_none()
            && foreign["key_id"] == fixture["key_serial"].as_str()
            && foreign["key_issuer"] == fixture["key_issuer_cn"].as_str()
            && foreign["out_of_tree"] == true
            && foreign["taints"]
                .as_str()
                .is_some_and(|t| t.contains('O') && t.contains('E')),
        "{foreign} against {fixture:?}"
    );
    digest_matches(foreign, &manifest, &foreign_file)?;

    let corrupt = by_reason("bad_signature")?;
    let corrupt_file = manifest_file(&manifest, "-corrupt.ko", corrupt)?;
    ensure!(
        corrupt["outcome"] == "rejected_signature"
            && corrupt["result"] == "ekeyrejected"
            && corrupt["signer"] == signer
            && corrupt["out_of_tree"] == false,
        "{corrupt}"
    );
    // The content is the signed module's; only the signature's bytes were changed.
    digest_matches(corrupt, &manifest, &corrupt_file)?;

    let malformed = by_reason("malformed")?;
    ensure!(
        malformed["outcome"] == "rejected_signature"
            && malformed["result"] == "ebadmsg"
            && malformed.get("digest").is_none()
            && malformed.get("signer").is_none(),
        "{malformed}"
    );
    let unsigned = by_reason("unsigned")?;
    ensure!(
        unsigned["outcome"] == "loaded"
            && ["digest", "signer", "key_id", "hash_algo"]
                .iter()
                .all(|f| unsigned.get(f).is_none()),
        "{unsigned}"
    );
    // MD5: refused by the PKCS#7 parser, before any key lookup or digest; 6.1's parser still
    // knows it, and finds the signer untrusted.
    let md5 = if console.contains("kernel 6.1.") || console.contains("kernel 5.10.") {
        let md5 = events
            .iter()
            .find(|e| e["reason"] == "unknown_key" && e["hash_algo"] == "md5")
            .with_context(|| format!("no unknown_key load with an MD5 digest in {events:?}"))?;
        ensure!(
            md5["outcome"] == "loaded" && md5.get("signer").is_none(),
            "{md5}"
        );
        md5
    } else {
        let md5 = by_reason("unsupported_crypto")?;
        ensure!(
            md5["outcome"] == "loaded"
                && md5["method"] == "signature"
                && ["digest", "signer", "key_id"]
                    .iter()
                    .all(|f| md5.get(f).is_none())
                && md5["taints"].as_str().is_some_and(|t| t.contains('E')),
            "{md5}"
        );
        md5
    };
    // Refused before anything was read: named after its file, by the caller's uid.
    let refused = by_reason("permission")?;
    ensure!(
        refused["outcome"] == "rejected_permission"
            && refused["result"] == "eperm"
            && refused["uid"] == 65534,
        "{refused}"
    );
    for event in [
        verified, foreign, corrupt, malformed, unsigned, md5, refused,
    ] {
        println!("vm: signers: {event}");
    }
    Ok(())
}

/// The manifest's file ending in `suffix` whose module the event names.
fn manifest_file(
    manifest: &BTreeMap<String, BTreeMap<String, String>>,
    suffix: &str,
    event: &Value,
) -> anyhow::Result<String> {
    let module = event["module"].as_str().unwrap_or("");
    manifest
        .keys()
        // A loaded module has its own name; a refused one is named after its file.
        .find(|f| {
            f.strip_suffix(suffix).is_some_and(|stem| {
                stem.replace('-', "_") == module
                    || f.trim_end_matches(".ko").replace('-', "_") == module
            })
        })
        .cloned()
        .with_context(|| format!("no manifest file *{suffix} for module {module}"))
}

fn check_enforced(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let manifest = manifest(console)?;
    let enforced: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "module_load" && e["reason"] == "enforced")
        .collect();
    let [first, second] = enforced.as_slice() else {
        bail!("want two enforced refusals, got {enforced:?}");
    };
    let (foreign, unsigned) = if first.get("key_id").is_some() {
        (first, second)
    } else {
        (second, first)
    };
    let foreign_file = manifest_file(&manifest, "-foreign.ko", foreign)?;
    ensure!(
        foreign["method"] == "signature"
            && foreign["result"] == "ekeyrejected"
            && foreign["key_id"] == manifest[&foreign_file]["key_serial"].as_str(),
        "{foreign}"
    );
    ensure!(
        unsigned["method"] == "none" && unsigned.get("key_id").is_none(),
        "{unsigned}"
    );
    println!("vm: signers-enforced: {foreign}");
    Ok(())
}
