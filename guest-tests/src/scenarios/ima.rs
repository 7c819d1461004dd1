//! IMA appraisal of modules (`appraise func=MODULE_CHECK`): the kernel hashes each module file
//! and compares the digest with its `security.ima` attribute before `load_module`. One module
//! has the right digest (five copies: IMA appraises a file once, so each load needs a file of its
//! own), one a wrong digest, one no attribute, and a compressed one with its compressed file's
//! digest (IMA appraises the file as read, before the kernel decompresses it). The files sit on
//! /tmp (a tmpfs: the guest's ramfs root keeps no extended attributes); `finit_module` reads
//! them; kmod's insmod of a `.ko.xz` (init_module(2), a buffer without a file) is refused
//! outright under such a policy, and counted `rejected_ima` too.
//! `observer profile` watches the same loads.
//! On every kernel; 6.1 cannot time the appraisal step on its own (see its checks).
use std::net::SocketAddr;

use anyhow::ensure;

use super::{
    CURRENT, Check, Labels, Scenario, WITH_IMA, Want,
    modules::{
        ALL, ATTACHED, INTEGRITY_COUNT, INTEGRITY_SUM, LOAD_COUNT, LOADS, PHASE_COUNT, PHASE_SUM,
        SIGNATURE_OK,
    },
    stream::{the_load_with_reason, validated_events},
};
use crate::Series;

const IMA_OK: Labels = &[("method", "ima_hash"), ("result", "ok")];
const IMA_FAIL: Labels = &[("method", "ima_hash"), ("result", "fail")];
const PUBLIC_KEY: Labels = &[("phase", "public_key_verify")];
const IMA_DIGEST: Labels = &[("phase", "ima_digest")];

/// The exact counts, given the loads that went through (five copies of one module, and where
/// the kernel decompresses modules, the compressed one) and those IMA passed that failed before
/// `load_module` (6.1's compressed one); three more refused by IMA (two reads, one
/// init_module).
macro_rules! counts {
    (loaded: $loaded:literal, failed: $failed:literal) => {
        [
            Check::Metric(
                LOADS,
                &[
                    ("outcome", "loaded"),
                    ("method", "signature"),
                    ("reason", "verified"),
                ],
                Want::Eq($loaded),
            ),
            Check::MetricSum(LOADS, &[("outcome", "failed")], Want::Eq($failed)),
            Check::MetricSum(LOADS, ALL, Want::Eq($loaded + $failed + 3.0)),
            // load_module ran for those that went through only.
            Check::MetricSum(LOAD_COUNT, ALL, Want::Eq($loaded)),
            Check::Metric(INTEGRITY_COUNT, IMA_OK, Want::Eq($loaded + $failed)),
            Check::Metric(INTEGRITY_COUNT, SIGNATURE_OK, Want::Eq($loaded)),
            Check::Metric(PHASE_COUNT, PUBLIC_KEY, Want::Eq($loaded)),
            // Every appraisal hashed the file.
            Check::Metric(PHASE_COUNT, IMA_DIGEST, Want::Eq($loaded + $failed + 2.0)),
        ]
    };
}

pub const IMA: Scenario = Scenario {
    judge: Some(check_init_module_event),
    alone: false,
    agent_args: "--events json --events.output /tmp/events.json",
    before_agent: "",
    name: "ima",
    about: "IMA appraisal: a module with the right digest in security.ima loads (IMA hash check, \
            then its signature check); a wrong digest and a missing one are refused (rejected_ima)",
    cmdline: "",
    kernels: WITH_IMA,
    guest: "probes\n\
            m1=$(echo $M1 | tr - _)\n\
            for i in 1 2 3 4 5; do cp /vm/mods/$M1.ko /tmp/$M1-$i.ko; done\n\
            cp /vm/mods/$M2.ko /vm/mods/$M3.ko /vm/mods/$M2.ko.xz /tmp/\n\
            /vm/guest-tool ima-digest /tmp/$M1-1.ko /tmp/$M1-2.ko /tmp/$M1-3.ko /tmp/$M1-4.ko /tmp/$M1-5.ko\n\
            /vm/guest-tool ima-digest --wrong /tmp/$M2.ko\n\
            /vm/guest-tool ima-digest /tmp/$M2.ko.xz\n\
            echo 'appraise func=MODULE_CHECK' >/sys/kernel/security/ima/policy && echo 'ima policy set'\n\
            start_profile --duration 120s --format text\n\
            for i in 1 2 3 4 5; do load /tmp/$M1-$i.ko; rmmod $m1 || echo \"rmmod $m1 failed\"; done\n\
            load /tmp/$M2.ko /tmp/$M3.ko\n\
            load --compressed /tmp/$M2.ko.xz\n\
            /usr/sbin/insmod /vm/mods/$M3.ko.xz || echo \"insmod $M3.ko.xz refused\"\n\
            stop_profile\n\
            row=$(sed -n '/IMA_HASH_US/,$p' /tmp/profile.out | grep \"^$m1 \")\n\
            case \"$row\" in *' - '*|'') echo \"ima-row incomplete: $row\";; \
            *) echo \"ima-row complete for $m1\";; esac\n\
            dmesg | grep -oE 'cause=[a-z-]+' | sed 's/^/kmsg ima: /'\n\
            echo EVENTS-BEGIN; cat /tmp/events.json; echo EVENTS-END\n",
    checks: &[&[
        Check::Console("ima-digest {M2}.ko wrong"),
        Check::Console("ima policy set"),
        Check::Console("finit_module {M1}-5.ko rc=0"),
        Check::Console("finit_module {M2}.ko errno=EACCES"),
        Check::Console("finit_module {M3}.ko errno=EACCES"),
        // The kernel's own reasons (its audit lines).
        Check::Console("kmsg ima: cause=invalid-hash"),
        Check::Console("kmsg ima: cause=missing-hash"),
        Check::Probes(&["module_ima_check", "fentry+fexit", " yes "]),
        Check::Probes(&["module_ima_digest", "fentry+fexit", " yes "]),
        Check::Metric(
            ATTACHED,
            &[("probe", "module_ima_check"), ("mechanism", "fentry+fexit")],
            Want::Eq(1.0),
        ),
        // Two reads IMA's appraisal refused, and kmod's init_module(2), which IMA refuses
        // outright under this policy (it has no file to appraise).
        Check::Console("insmod {M3}.ko.xz refused"),
        Check::Console("impossible to appraise a module without a file descriptor"),
        Check::MetricSum(
            LOADS,
            &[("outcome", "rejected_ima"), ("method", "none")],
            Want::Eq(3.0),
        ),
        Check::Metric(
            LOADS,
            &[
                ("outcome", "rejected_ima"),
                ("method", "none"),
                ("reason", "ima_appraisal"),
            ],
            Want::Eq(2.0),
        ),
        Check::Metric(
            LOADS,
            &[
                ("outcome", "rejected_ima"),
                ("method", "none"),
                ("reason", "ima_init_module"),
            ],
            Want::Eq(1.0),
        ),
        Check::Metric(
            "observer_module_syscalls_total",
            &[("syscall", "init_module"), ("result", "eacces")],
            Want::Eq(1.0),
        ),
        Check::Metric(INTEGRITY_COUNT, IMA_FAIL, Want::Eq(2.0)),
        Check::MetricSum(
            INTEGRITY_COUNT,
            &[("method", "ima_signature")],
            Want::ZeroOrAbsent,
        ),
        // Timed, not only counted: the loaded ones' checks too.
        Check::Metric(INTEGRITY_SUM, IMA_OK, Want::AtLeast(1e-6)),
        Check::Metric(PHASE_SUM, &[("phase", "ima_digest")], Want::AtLeast(1e-6)),
        // `observer profile`: the same module's three numbers in one line.
        Check::Console("profile rc=0"),
        Check::Console("IMA hash check/signature check time (measured): 0."),
        // Its row of the side-by-side table has all three numbers and both ratios.
        Check::Console("ima-row complete for {M1.name}"),
    ]],
    kernel_checks: &[
        (
            CURRENT,
            &[
                // IMA appraises the file as read: a compressed module's digest is of its
                // compressed bytes (from 6.19 IMA hashes them at the read and appraises after
                // decompression: two calls of its hook, one check).
                Check::Console("finit_module {M2}.ko.xz compressed rc=0"),
                Check::Metric(PHASE_COUNT, &[("phase", "decompress")], Want::Eq(1.0)),
                Check::Probes(&["module_ima_appraise", "fentry+fexit", " yes "]),
                Check::Metric(PHASE_COUNT, &[("phase", "ima_appraise")], Want::Eq(8.0)),
            ],
        ),
        (CURRENT, &counts!(loaded: 6.0, failed: 0.0)),
        (&[Series::V6_1], &counts!(loaded: 5.0, failed: 1.0)),
        // ima_appraise_measurement has seven arguments: 6.1's trampolines take at most six
        // (ENOTSUPP). The verdict then comes from the hook's return, and the rest is the same.
        // 6.1 does not decompress modules: EOPNOTSUPP after IMA passed the read, a failed
        // attempt sent at finit_module's exit.
        (
            &[Series::V6_1],
            &[
                Check::Console("finit_module {M2}.ko.xz compressed errno=EOPNOTSUPP"),
                Check::Probes(&["module_ima_appraise", "fentry+fexit", " no "]),
                Check::MetricSum(
                    PHASE_COUNT,
                    &[("phase", "ima_appraise")],
                    Want::ZeroOrAbsent,
                ),
            ],
        ),
    ],
};

/// kmod's insmod of a `.ko.xz` (init_module(2): bytes without a file) as the stream prints it:
/// refused by IMA before `load_module`.
fn check_init_module_event(_guest: SocketAddr, console: &str) -> anyhow::Result<()> {
    let events = validated_events(console)?;
    let refused = the_load_with_reason(&events, "ima_init_module")?;
    ensure!(
        refused["outcome"] == "rejected_ima"
            && refused["method"] == "none"
            && refused["syscall"] == "init_module"
            && refused["result"] == "eacces"
            && refused["comm"] == "insmod",
        "{refused}"
    );
    println!("vm: ima: {refused}");
    Ok(())
}
