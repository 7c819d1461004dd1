//! Module loading and integrity verification: load outcomes and methods, integrity-check and
//! load latency, taint events attributed to the load that caused them, autoload requests.

use std::collections::{BTreeMap, HashSet};

use aya::maps::{MapData, PerCpuArray};
use observer_common::modules::{
    ModuleLoad, PHASES, SEEN_DECOMPRESS, SEEN_FILE, SEEN_HASH_CHECK, SEEN_NAME, SEEN_SIG_CHECK,
    SEEN_VERIFY_SIG, TaintEvent,
};
use serde::Serialize;

use crate::{
    kernel,
    maps::{self, Maps},
    metrics::{Family, Log2Histogram},
    pipeline::comm_str,
    plan::{Hook, fentry, fexit, tracepoint},
};

pub fn hooks() -> Vec<Hook> {
    let bracket = |name, enter, exit, function| Hook {
        name,
        options: vec![vec![fentry(enter, function), fexit(exit, function)]],
        requires: Some(kernel::has_modules),
    };
    let single = |name, attachment| Hook {
        name,
        options: vec![vec![attachment]],
        requires: Some(kernel::has_modules),
    };
    vec![
        bracket(
            "module_load",
            "modules_load_enter",
            "modules_load_exit",
            "load_module",
        ),
        bracket(
            "module_sig_check",
            "modules_sig_check_enter",
            "modules_sig_check_exit",
            "module_sig_check",
        ),
        bracket(
            "module_verify_sig",
            "modules_verify_enter",
            "modules_verify_exit",
            "mod_verify_sig",
        ),
        // The Merkle-tree check of the hash-based integrity patch set (unmerged as of 2026).
        // Only `module_hash_check` is timed: `module_integrity_check`, where present, is the
        // dispatcher that also runs the signature path.
        bracket(
            "module_hash_check",
            "modules_hash_enter",
            "modules_hash_exit",
            "module_hash_check",
        ),
        single(
            "module_file",
            fentry("modules_read_file", "security_kernel_read_file"),
        ),
        single(
            "module_name",
            tracepoint("modules_loaded_name", "module", "module_load"),
        ),
        single("module_taint", fentry("modules_add_taint", "add_taint")),
        bracket(
            "module_decompress",
            "modules_decompress_enter",
            "modules_decompress_exit",
            "module_decompress",
        ),
        // Where a signature check spends its time (counted inside a load only).
        bracket(
            "module_sig_parse",
            "modules_parse_enter",
            "modules_parse_exit",
            "pkcs7_parse_message",
        ),
        bracket(
            "module_sig_digest",
            "modules_digest_enter",
            "modules_digest_exit",
            "pkcs7_digest",
        ),
        bracket(
            "module_sig_key_lookup",
            "modules_key_lookup_enter",
            "modules_key_lookup_exit",
            "find_asymmetric_key",
        ),
        bracket(
            "module_sig_public_key",
            "modules_public_key_enter",
            "modules_public_key_exit",
            "public_key_verify_signature",
        ),
        Hook {
            name: "module_autoload",
            options: vec![
                vec![fentry(
                    "modules_request_fentry",
                    "security_kernel_module_request",
                )],
                vec![tracepoint(
                    "modules_request_tracepoint",
                    "module",
                    "module_request",
                )],
            ],
            requires: Some(kernel::has_modules),
        },
    ]
}

pub const OUTCOMES: [&str; 4] = [
    "loaded",
    "rejected_signature",
    "rejected_lockdown",
    "failed",
];
pub const METHODS: [&str; 3] = ["signature", "hash", "none"];
/// The `phase` label of each signature-check phase, by index ([`observer_common::modules`]).
pub const PHASE_NAMES: [&str; PHASES] = ["parse", "digest", "key_lookup", "public_key_verify"];

const EPERM: i32 = 1;
/// Distinct module names that get their own taint series; later ones share `module="other"`.
const MAX_MODULE_LABELS: usize = 512;
/// Loads kept for `observer profile`.
const MAX_SAMPLES: usize = 100_000;

/// What became of a load attempt.
pub fn outcome(load: &ModuleLoad) -> &'static str {
    if load.load_ret == 0 {
        return "loaded";
    }
    // module_sig_check returns the lockdown verdict for an unsigned module, or the signature
    // error when signatures are enforced; without that hook, load_module's error says the same.
    let policy_ret = if load.seen & SEEN_SIG_CHECK != 0 {
        load.sig_check_ret
    } else {
        load.load_ret
    };
    match -policy_ret {
        0 => "failed",
        EPERM => "rejected_lockdown",
        e if e == libc::EKEYREJECTED
            || e == libc::ENOKEY
            || e == libc::ENOPKG
            || e == libc::EBADMSG =>
        {
            "rejected_signature"
        }
        _ if load.seen & SEEN_SIG_CHECK != 0 => "rejected_signature",
        _ => "failed",
    }
}

/// How its integrity was proven (or not): which check ran.
pub fn method(load: &ModuleLoad) -> &'static str {
    if load.seen & SEEN_HASH_CHECK != 0 {
        "hash"
    } else if load.seen & SEEN_VERIFY_SIG != 0 {
        "signature"
    } else {
        "none"
    }
}

/// The module's name: from the kernel when the load got that far, else from its file name
/// (`crc-itu-t.ko.xz` is module `crc_itu_t`), else "unknown".
pub fn module_name(load: &ModuleLoad) -> String {
    if load.seen & SEEN_NAME != 0 {
        return comm_str(&load.name);
    }
    if load.seen & SEEN_FILE != 0 {
        let file = comm_str(&load.file);
        let stem = file.split(".ko").next().unwrap_or(&file);
        if !stem.is_empty() {
            return stem.replace('-', "_");
        }
    }
    "unknown".into()
}

/// Time per phase of one load: only phases that ran; `other` is what the signature check spent
/// outside the timed phases.
pub fn phases(load: &ModuleLoad) -> BTreeMap<&'static str, u64> {
    let mut phases = BTreeMap::new();
    if load.seen & SEEN_DECOMPRESS != 0 {
        phases.insert("decompress", load.decompress_ns);
    }
    if load.seen & SEEN_VERIFY_SIG != 0 {
        let mut accounted = 0u64;
        for (index, name) in PHASE_NAMES.iter().enumerate() {
            if load.phase_calls[index] > 0 {
                phases.insert(*name, load.phase_ns[index]);
                accounted += load.phase_ns[index];
            }
        }
        phases.insert("other", load.verify_ns.saturating_sub(accounted));
    }
    phases
}

/// One load, as `observer profile` and `--events json` see it.
#[derive(Clone, Debug, Serialize)]
pub struct LoadRecord {
    pub event: &'static str,
    pub pid: u32,
    pub comm: String,
    pub module: String,
    pub outcome: &'static str,
    pub method: &'static str,
    pub result: String,
    pub total_ns: u64,
    pub sig_check_ns: Option<u64>,
    pub integrity_check_ns: Option<u64>,
    /// Time per phase: decompress, the signature-check phases, and `other` (the rest of the
    /// signature check).
    pub phases_ns: BTreeMap<&'static str, u64>,
    /// Bytes the signature check hashed (the module without its signature).
    pub hashed_bytes: u64,
    pub taints: String,
}

#[derive(Debug, Serialize)]
pub struct TaintRecord {
    pub event: &'static str,
    pub pid: u32,
    pub comm: String,
    pub flag: String,
}

fn taint_letters(mask: u64) -> String {
    (0..64)
        .filter(|b| mask & (1 << b) != 0)
        .map(kernel::taint_flag)
        .collect::<Vec<_>>()
        .join(",")
}

/// What the records tell, kept between scrapes.
#[derive(Debug, Default)]
pub struct ModuleState {
    loads: BTreeMap<(&'static str, &'static str), u64>,
    integrity: BTreeMap<(&'static str, &'static str), Log2Histogram>,
    load_duration: BTreeMap<&'static str, Log2Histogram>,
    phases: BTreeMap<&'static str, Log2Histogram>,
    taint_events: BTreeMap<(String, String), u64>,
    module_labels: HashSet<String>,
    /// Estimated hash-based check time per signed load (see [`hash_estimate_ns`]).
    hash_estimate: Log2Histogram,
    /// Levels of a Merkle tree over this kernel's modules, when their number is known.
    merkle_levels: Option<u32>,
    /// Every load seen, for `observer profile` (bounded).
    pub samples: Vec<LoadRecord>,
    pub keep_samples: bool,
}

/// What a hash-based (Merkle) check of this signed load would cost: the measured digest of the
/// module, plus one 64-byte node hash per tree level, each costing what two SHA-256 blocks of
/// the module's own digest cost. The reasoning is in the README.
pub fn hash_estimate_ns(digest_ns: u64, hashed_bytes: u64, levels: u32) -> Option<u64> {
    let blocks = hashed_bytes.div_ceil(64);
    (blocks > 0).then(|| digest_ns + u64::from(levels) * 2 * digest_ns / blocks)
}

impl ModuleState {
    pub fn new(keep_samples: bool, merkle_leaves: Option<u64>) -> Self {
        Self {
            keep_samples,
            merkle_levels: merkle_leaves.map(crate::profile::merkle_levels),
            ..Self::default()
        }
    }

    fn module_label(&mut self, name: &str) -> String {
        if self.module_labels.contains(name) || self.module_labels.len() < MAX_MODULE_LABELS {
            self.module_labels.insert(name.to_owned());
            name.to_owned()
        } else {
            "other".into()
        }
    }

    pub fn load(&mut self, load: &ModuleLoad) -> LoadRecord {
        let (outcome, method) = (outcome(load), method(load));
        let module = module_name(load);
        *self.loads.entry((outcome, method)).or_default() += 1;
        self.load_duration
            .entry(outcome)
            .or_default()
            .observe(load.total_ns);
        let integrity_check_ns = match method {
            "signature" => Some((load.verify_ns, load.verify_ret)),
            "hash" => Some((load.hash_ns, load.hash_ret)),
            _ => None,
        }
        .map(|(ns, ret)| {
            let result = if ret == 0 { "ok" } else { "fail" };
            self.integrity
                .entry((method, result))
                .or_default()
                .observe(ns);
            ns
        });
        let phases_ns = phases(load);
        for (phase, ns) in &phases_ns {
            self.phases.entry(phase).or_default().observe(*ns);
        }
        if let (Some(levels), Some(digest)) = (self.merkle_levels, phases_ns.get("digest"))
            && let Some(estimate) = hash_estimate_ns(*digest, load.hashed_len, levels)
        {
            self.hash_estimate.observe(estimate);
        }
        if load.taints != 0 {
            let label = self.module_label(&module);
            for bit in (0..64).filter(|b| load.taints & (1 << b) != 0) {
                *self
                    .taint_events
                    .entry((kernel::taint_flag(bit), label.clone()))
                    .or_default() += 1;
            }
        }
        let record = LoadRecord {
            event: "module_load",
            pid: load.header.pid,
            comm: comm_str(&load.header.comm),
            module,
            outcome,
            method,
            result: crate::timers::result_label(
                load.load_ret
                    .unsigned_abs()
                    .min(observer_common::ERRNO_SLOTS - 1),
            ),
            total_ns: load.total_ns,
            sig_check_ns: (load.seen & SEEN_SIG_CHECK != 0).then_some(load.sig_check_ns),
            integrity_check_ns,
            phases_ns,
            hashed_bytes: load.hashed_len,
            taints: taint_letters(load.taints),
        };
        if self.keep_samples && self.samples.len() < MAX_SAMPLES {
            self.samples.push(record.clone());
        }
        record
    }

    pub fn taint(&mut self, event: &TaintEvent) -> TaintRecord {
        let flag = kernel::taint_flag(event.flag);
        *self
            .taint_events
            .entry((flag.clone(), String::new()))
            .or_default() += 1;
        TaintRecord {
            event: "taint",
            pid: event.header.pid,
            comm: comm_str(&event.header.comm),
            flag,
        }
    }

    pub fn gather(&self, families: &mut Vec<Family>) {
        let mut loads = Family::counter(
            "module_loads_total",
            "Module load attempts by outcome (loaded, rejected_signature, rejected_lockdown, failed) and \
             integrity method (signature, hash, none: the module carried no signature or proof).",
        );
        // Every combination, zeros included, so alerts and rates see a series from the start.
        for outcome in OUTCOMES {
            for method in METHODS {
                let count = self.loads.get(&(outcome, method)).copied().unwrap_or(0);
                loads.add(&[("outcome", outcome), ("method", method)], count as f64);
            }
        }
        families.push(loads);

        let mut integrity = Family::histogram(
            "module_integrity_check_duration_seconds",
            "Time proving a module's integrity: signature (mod_verify_sig) or hash (module_hash_check), by result.",
        );
        for ((method, result), histogram) in &self.integrity {
            integrity.add_histogram(&[("method", method), ("result", result)], histogram);
        }
        families.push(integrity);

        let mut duration = Family::histogram(
            "module_load_duration_seconds",
            "Whole load_module time, by outcome.",
        );
        for (outcome, histogram) in &self.load_duration {
            duration.add_histogram(&[("outcome", outcome)], histogram);
        }
        families.push(duration);

        let mut phases = Family::histogram(
            "module_integrity_phase_duration_seconds",
            "Where module integrity checking spends its time, per load: decompress, and the signature check's \
             parse, digest (hashing the module: what a hash-based check keeps), key_lookup, public_key_verify, \
             and other (the rest of the signature check).",
        );
        for (phase, histogram) in &self.phases {
            phases.add_histogram(&[("phase", phase)], histogram);
        }
        families.push(phases);

        let mut estimate = Family::histogram(
            "module_hash_check_estimate_seconds",
            "What a hash-based (Merkle) check would have cost for each signature-checked load: its measured digest \
             plus one node hash per tree level over this kernel's modules, at the per-block cost of that digest.",
        );
        if self.hash_estimate.count() > 0 {
            estimate.add_histogram(&[], &self.hash_estimate);
        }
        families.push(estimate);

        let mut taints = Family::counter(
            "kernel_taint_events_total",
            "Taints added while watched, by flag; module names the module whose load caused it (empty otherwise).",
        );
        for ((flag, module), count) in &self.taint_events {
            taints.add(&[("flag", flag), ("module", module)], *count as f64);
        }
        families.push(taints);
    }
}

/// The autoload counter, kept in the kernel.
pub struct ModuleMaps {
    autoloads: PerCpuArray<MapData, u64>,
}

impl ModuleMaps {
    pub fn take(maps: &mut Maps<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            autoloads: maps.per_cpu_array("MODULE_AUTOLOADS")?,
        })
    }

    pub fn gather(&self, families: &mut Vec<Family>) {
        families.push(
            Family::counter(
                "module_autoload_requests_total",
                "Requests to load a module on demand (request_module).",
            )
            .single(maps::sum_per_cpu(&self.autoloads, 1)[0] as f64),
        );
    }
}

#[cfg(test)]
mod tests {
    use observer_common::EventHeader;

    use super::*;

    fn load(load_ret: i32, seen: u32, sig_check_ret: i32) -> ModuleLoad {
        // SAFETY: all-zero is a valid ModuleLoad.
        let mut l: ModuleLoad = unsafe { std::mem::zeroed() };
        l.header = EventHeader {
            kind: 7,
            pid: 1,
            tid: 1,
            _pad: 0,
            ts_ns: 0,
            comm: [0; 16],
        };
        l.load_ret = load_ret;
        l.seen = seen;
        l.sig_check_ret = sig_check_ret;
        l
    }

    #[test]
    fn outcomes_follow_the_signature_policy() {
        assert_eq!(
            outcome(&load(0, SEEN_SIG_CHECK | SEEN_VERIFY_SIG, 0)),
            "loaded"
        );
        assert_eq!(outcome(&load(-1, SEEN_SIG_CHECK, -1)), "rejected_lockdown");
        assert_eq!(
            outcome(&load(
                -libc::EKEYREJECTED,
                SEEN_SIG_CHECK,
                -libc::EKEYREJECTED
            )),
            "rejected_signature"
        );
        assert_eq!(outcome(&load(-libc::EEXIST, SEEN_SIG_CHECK, 0)), "failed");
        // Without module_sig_check (kernels before 5.19 inline it), load_module's error decides.
        assert_eq!(outcome(&load(-1, 0, 0)), "rejected_lockdown");
        assert_eq!(
            outcome(&load(-libc::EKEYREJECTED, 0, 0)),
            "rejected_signature"
        );
        assert_eq!(outcome(&load(-libc::ENOEXEC, 0, 0)), "failed");
    }

    #[test]
    fn methods_and_names() {
        assert_eq!(
            method(&load(0, SEEN_SIG_CHECK | SEEN_VERIFY_SIG, 0)),
            "signature"
        );
        assert_eq!(method(&load(0, SEEN_SIG_CHECK, 0)), "none");
        assert_eq!(method(&load(0, SEEN_HASH_CHECK, 0)), "hash");
        let mut l = load(-1, SEEN_FILE, 0);
        l.file[..15].copy_from_slice(b"crc-itu-t.ko.xz");
        assert_eq!(module_name(&l), "crc_itu_t");
        l.name[..4].copy_from_slice(b"crc7");
        l.seen |= SEEN_NAME;
        assert_eq!(module_name(&l), "crc7");
        assert_eq!(module_name(&load(0, 0, 0)), "unknown");
    }

    #[test]
    fn an_unsigned_load_taints_with_its_name() {
        let mut state = ModuleState::default();
        let mut l = load(0, SEEN_SIG_CHECK | SEEN_NAME, 0);
        l.name[..4].copy_from_slice(b"crc7");
        l.taints = 1 << 13;
        let record = state.load(&l);
        assert_eq!(
            (record.outcome, record.method, record.taints.as_str()),
            ("loaded", "none", "E")
        );
        assert_eq!(
            state.taint_events.get(&("E".into(), "crc7".into())),
            Some(&1)
        );
        assert!(
            state.integrity.is_empty(),
            "no integrity sample without a check"
        );
    }

    #[test]
    fn the_hash_estimate_is_digest_plus_node_hashes() {
        // 6400 bytes: 100 blocks of 64; digest 1000 ns: 10 ns a block, 20 ns a node.
        assert_eq!(hash_estimate_ns(1000, 6400, 13), Some(1000 + 13 * 20));
        assert_eq!(hash_estimate_ns(1000, 0, 13), None);
        let mut state = ModuleState::new(false, Some(4256));
        let mut l = load(0, SEEN_SIG_CHECK | SEEN_VERIFY_SIG, 0);
        l.phase_calls[observer_common::modules::PHASE_DIGEST] = 1;
        l.phase_ns[observer_common::modules::PHASE_DIGEST] = 1000;
        l.verify_ns = 5000;
        l.hashed_len = 6400;
        state.load(&l);
        assert_eq!(state.hash_estimate.count(), 1);
        assert_eq!(state.hash_estimate.sum_ns, 1260);
    }

    #[test]
    fn module_labels_are_capped() {
        let mut state = ModuleState::default();
        for i in 0..(MAX_MODULE_LABELS + 10) {
            assert_eq!(
                state.module_label(&format!("m{i}")),
                if i < MAX_MODULE_LABELS {
                    format!("m{i}")
                } else {
                    "other".into()
                }
            );
        }
    }
}
