//! What one load attempt's record tells (outcome, method, name, phases), and the load metrics
//! kept between scrapes.

use std::collections::BTreeMap;

use observer_common::modules::{
    self, METHODS, ModuleLoad, OUTCOMES, PHASES, REASONS, SEEN_DECOMPRESS, SEEN_FILE,
    SEEN_FILE_NOT_INLINE, SEEN_INIT_MODULE, SEEN_LOAD_DATA, SEEN_NAME, SEEN_NO_LOAD, SEEN_READ,
    SEEN_READ_REFUSED, SEEN_SIG_CHECK,
};
use serde::Serialize;

use super::{
    ima::{self, ImaVerdict},
    requests::{RequestedBy, requested_by},
    signers::{self, KeyId, KeyNames},
};
use crate::{
    kernel, merkle,
    metrics::{Family, Log2Histogram},
    record::{comm_str, module_name_from_file},
};

/// The `phase` label of each signature-check phase, by index ([`observer_common::modules`]).
pub const PHASE_NAMES: [&str; PHASES] = ["parse", "digest", "key_lookup", "public_key_verify"];

/// Loads kept for `observer profile`.
const MAX_SAMPLES: usize = 100_000;

/// What became of a load attempt, as the kernel decided and counted it.
pub fn outcome(load: &ModuleLoad) -> &'static str {
    OUTCOMES
        .get(load.outcome as usize)
        .copied()
        .unwrap_or("failed")
}

/// Why it was refused, or what its integrity check found, as the kernel decided and counted it.
pub fn reason(load: &ModuleLoad) -> &'static str {
    REASONS.get(load.reason as usize).copied().unwrap_or("none")
}

/// `TAINT_OOT_MODULE`: the module has no `intree` tag.
const TAINT_OUT_OF_TREE: u64 = 1 << 12;

/// How its integrity was proven (or not): which check ran.
pub fn method(load: &ModuleLoad) -> &'static str {
    METHODS[modules::method(load.seen) as usize]
}

/// The syscall an attempt came by: init_module's data is asked for by
/// `security_kernel_load_data`, finit_module's file read by `security_kernel_read_file`.
fn syscall(seen: u32) -> Option<&'static str> {
    if seen & (SEEN_INIT_MODULE | SEEN_LOAD_DATA) != 0 {
        Some("init_module")
    } else if seen & SEEN_READ != 0 {
        Some("finit_module")
    } else {
        None
    }
}

/// The module's name: from the kernel when the load got that far, else from its file name
/// (`crc-itu-t.ko.xz` is module `crc_itu_t`), else "unknown".
pub fn module_name(load: &ModuleLoad) -> String {
    if load.seen & SEEN_NAME != 0 {
        return comm_str(&load.name);
    }
    if load.seen & SEEN_FILE != 0
        && let Some(name) = module_name_from_file(&load.file)
    {
        return name;
    }
    if load.seen & SEEN_FILE_NOT_INLINE != 0 {
        // Names this long sit outside the dentry, behind a pointer only a helper the programs
        // do not use (refused under lockdown=confidentiality) could follow.
        log::debug!("a refused module's file name is too long to read: module \"unknown\"");
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
    // A hash-checked load also passes through mod_verify_sig in v5 of the hash-based patch
    // set: the signature phases belong to signature checks only.
    if method(load) == "signature" {
        let mut accounted = 0u64;
        for (index, name) in PHASE_NAMES.iter().enumerate() {
            if load.phases.calls[index] > 0 {
                phases.insert(*name, load.phases.ns[index]);
                accounted = accounted.saturating_add(load.phases.ns[index]);
            }
        }
        phases.insert("other", other_ns(load, accounted));
    }
    ima::phases(load, &mut phases);
    phases
}

/// What the signature check spent outside its timed phases, less the observer's own work there:
/// what the phase programs measured of themselves (`probe_ns`), and per phase call the part of
/// its trampolines no program can time from inside, estimated by the gap between two programs
/// on one trampoline measured in the same load (`gap_ns`).
fn other_ns(load: &ModuleLoad, accounted: u64) -> u64 {
    let calls: u64 = load.phases.calls.iter().map(|&c| u64::from(c)).sum();
    load.verify
        .ns
        .saturating_sub(accounted)
        .saturating_sub(load.phases.probe_ns)
        .saturating_sub(load.gap_ns.saturating_mul(calls))
}

/// One load, as `observer profile` and `--events json` see it.
///
/// The one value a record becomes: the load metrics are counted from it, `observer profile`
/// keeps it and the stream writes it, so what is counted is what is reported. The fields only
/// the metrics read are left out of the stream.
#[derive(Clone, Debug, Serialize)]
pub struct LoadRecord {
    pub module: String,
    pub outcome: &'static str,
    pub method: &'static str,
    /// Why it was refused, or what its check found (`unknown_key`, `bad_signature`, ...).
    pub reason: &'static str,
    /// The trusted key that the signature named (its description in /proc/keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// The key's id (also when no trusted key matched), and its issuer when the signature
    /// names issuer and serial.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyId>,
    /// What the kernel hashed the module to, and with which algorithm: the signature check's
    /// digest where it ran, else IMA's of the file; absent where the kernel computed none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_algo: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// What `digest` covers: `module` (the module without its signature) or `file` (the
    /// file as stored, which IMA hashed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest_of: Option<&'static str>,
    /// The autoload that asked for this load: who asked, and for what.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<RequestedBy>,
    /// The module has no `intree` tag (taint O): built outside the kernel's tree (DKMS).
    pub out_of_tree: bool,
    /// The syscall the attempt came by, when a hook on its path said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syscall: Option<&'static str>,
    pub result: String,
    pub total_ns: u64,
    /// `load_module` ran: the attempt was neither refused at its read nor ended before it.
    /// Only then is `total_ns` a load duration.
    #[serde(skip)]
    pub ran_load_module: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig_check_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity_check_ns: Option<u64>,
    /// What the check timed by `integrity_check_ns` found: `ok` or `fail`.
    #[serde(skip)]
    pub integrity_check_result: Option<&'static str>,
    /// IMA's appraisal of the module's read, when IMA appraised it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ima: Option<ImaVerdict>,
    /// Time per phase: decompress, the signature-check phases, and `other` (the rest of the
    /// signature check).
    pub phases_ns: BTreeMap<&'static str, u64>,
    /// Bytes the signature check hashed (the module without its signature).
    pub hashed_bytes: u64,
    pub taints: String,
}

impl LoadRecord {
    /// What a load attempt's record says: a function of the record and of the key names.
    pub fn from_record(load: &ModuleLoad, keys: &KeyNames) -> Self {
        let method = method(load);
        let integrity_check = match method {
            "signature" => Some((load.verify.ns, load.verify.ret)),
            "hash" => Some((load.hash.ns, load.hash.ret)),
            _ => None,
        };
        let (signer, key) = signers::key_of(load, keys);
        let digest = signers::digest_hex(load)
            .map(|hex| (comm_str(&load.signed_digest.algo), hex, "module"))
            .or_else(|| ima::file_digest(load).map(|(algo, hex)| (algo.to_owned(), hex, "file")));
        Self {
            module: module_name(load),
            outcome: outcome(load),
            method,
            reason: reason(load),
            signer,
            key,
            hash_algo: digest
                .as_ref()
                .map(|(algo, _, _)| algo.clone())
                .filter(|a| !a.is_empty()),
            digest_of: digest.as_ref().map(|(_, _, of)| *of),
            digest: digest.map(|(_, hex, _)| hex),
            requested_by: requested_by(load),
            out_of_tree: load.taints & TAINT_OUT_OF_TREE != 0,
            syscall: syscall(load.seen),
            result: crate::metrics::result_label(
                load.load_ret
                    .unsigned_abs()
                    .min(observer_common::ERRNO_SLOTS - 1),
            ),
            total_ns: load.total_ns,
            ran_load_module: load.seen & (SEEN_READ_REFUSED | SEEN_NO_LOAD) == 0,
            sig_check_ns: (load.seen & SEEN_SIG_CHECK != 0).then_some(load.sig_check.ns),
            integrity_check_ns: integrity_check.map(|(ns, _)| ns),
            integrity_check_result: integrity_check
                .map(|(_, ret)| if ret == 0 { "ok" } else { "fail" }),
            ima: ima::verdict(load),
            phases_ns: phases(load),
            hashed_bytes: load.verify.hashed_len,
            taints: taint_letters(load.taints),
        }
    }
}

fn taint_letters(mask: u64) -> String {
    (0..64)
        .filter(|b| mask & (1 << b) != 0)
        .map(kernel::taint_flag)
        .collect::<Vec<_>>()
        .join(",")
}

/// What the loads tell, kept between scrapes.
#[derive(Debug, Default)]
pub struct ModuleState {
    integrity: BTreeMap<(&'static str, &'static str), Log2Histogram>,
    load_duration: BTreeMap<&'static str, Log2Histogram>,
    phases: BTreeMap<&'static str, Log2Histogram>,
    /// Estimated hash-based check time per signed load (see [`merkle::estimate_ns`]).
    hash_estimate: Log2Histogram,
    /// Levels of a Merkle tree over this kernel's modules, when their number is known.
    merkle_levels: Option<u32>,
    /// Where every load seen goes, for `observer profile` (bounded).
    pub samples: Option<Samples>,
    /// Export the hash-check estimate (`--modules.research`).
    research: bool,
}

/// The loads `observer profile` reports on: the module family adds each one it decodes.
pub type Samples = std::sync::Arc<std::sync::Mutex<Vec<LoadRecord>>>;

impl ModuleState {
    pub fn new(samples: Option<Samples>, merkle_leaves: Option<u64>, research: bool) -> Self {
        Self {
            samples,
            research,
            merkle_levels: merkle_leaves.map(merkle::levels),
            ..Self::default()
        }
    }

    /// Counts one load: from the event the stream gets, never from the raw record.
    pub fn count(&mut self, load: &LoadRecord) {
        if load.ran_load_module {
            self.load_duration
                .entry(load.outcome)
                .or_default()
                .observe(load.total_ns);
        }
        if let Some(check) = &load.ima {
            self.integrity
                .entry((check.method, check.result))
                .or_default()
                .observe(check.check_ns);
        }
        if let (Some(ns), Some(result)) = (load.integrity_check_ns, load.integrity_check_result) {
            self.integrity
                .entry((load.method, result))
                .or_default()
                .observe(ns);
        }
        for (phase, ns) in &load.phases_ns {
            self.phases.entry(phase).or_default().observe(*ns);
        }
        if let (Some(levels), Some(digest)) = (self.merkle_levels, load.phases_ns.get("digest"))
            && let Some(per_node) = merkle::per_node_ns(*digest, load.hashed_bytes)
        {
            let estimate = merkle::estimate_ns(*digest as f64, per_node, levels) as u64;
            self.hash_estimate.observe(estimate);
        }
        if let Some(samples) = &self.samples {
            let mut samples = samples
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if samples.len() < MAX_SAMPLES {
                samples.push(load.clone());
            }
        }
    }

    pub fn gather(&self, families: &mut Vec<Family>) {
        let mut integrity = Family::histogram(
            "module_integrity_check_duration_seconds",
            "Time proving a module's integrity, by method and result: signature (mod_verify_sig), hash \
             (module_hash_check), and IMA's appraisal of the file's read (ima_hash: a SHA digest in \
             security.ima; ima_signature: an imasig).",
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
             other (the rest of the signature check), and IMA's ima_digest (hashing the file) and ima_appraise \
             (comparing with security.ima).",
        );
        for (phase, histogram) in &self.phases {
            phases.add_histogram(&[("phase", phase)], histogram);
        }
        families.push(phases);

        if !self.research {
            return;
        }
        let mut estimate = Family::histogram(
            "module_hash_check_estimate_seconds",
            "What a hash-based (Merkle) check would have cost for each signature-checked load: its measured digest \
             plus one node hash per tree level over this kernel's modules, at the per-block cost of that digest.",
        );
        if self.hash_estimate.count() > 0 {
            estimate.add_histogram(&[], &self.hash_estimate);
        }
        families.push(estimate);
    }
}

#[cfg(test)]
mod tests {
    use observer_common::{
        EventHeader,
        modules::{SEEN_HASH_CHECK, SEEN_VERIFY_SIG},
    };

    use super::*;

    /// Counts `load` into `state` as the family does, and returns its event.
    fn count(state: &mut ModuleState, load: &ModuleLoad) -> LoadRecord {
        let record = LoadRecord::from_record(load, &KeyNames::default());
        state.count(&record);
        record
    }

    fn load(load_ret: i32, seen: u32, sig_check_ret: i32) -> ModuleLoad {
        // SAFETY: all-zero is a valid ModuleLoad.
        let mut l: ModuleLoad = unsafe { std::mem::zeroed() };
        l.header = EventHeader {
            kind: 7,
            pid: 1,
            tid: 1,
            ..EventHeader::default()
        };
        l.load_ret = load_ret;
        l.seen = seen;
        l.sig_check.ret = sig_check_ret;
        l
    }

    #[test]
    fn outcomes_are_the_kernels_and_early_ends_have_no_load_duration() {
        let mut l = load(-libc::EACCES, SEEN_READ_REFUSED | SEEN_NO_LOAD, 0);
        l.outcome = modules::OUTCOME_REJECTED_IMA;
        assert_eq!(outcome(&l), "rejected_ima");
        l.outcome = 99;
        assert_eq!(outcome(&l), "failed", "a number no outcome has");
        let mut state = ModuleState::default();
        let record = count(&mut state, &load(-libc::EOPNOTSUPP, SEEN_NO_LOAD, 0));
        assert_eq!(record.outcome, "loaded", "outcome 0");
        assert!(
            state.load_duration.is_empty(),
            "no load_module, no load duration"
        );
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
    fn hash_v5_loads_are_timed_by_the_check_that_ran() {
        // v5 of the hash-based patch set: module_auth_check (the policy) hands a proof to
        // module_hash_check and a PKCS#7 signature to module_sig_check, never both.
        let mut state = ModuleState::default();
        let mut proof = load(0, SEEN_SIG_CHECK | SEEN_HASH_CHECK, 0);
        proof.hash.ns = 8000;
        proof.hash.ret = -libc::ENOKEY;
        proof.reason = modules::REASON_UNKNOWN_KEY;
        let record = count(&mut state, &proof);
        assert_eq!(
            (record.method, record.reason, record.integrity_check_ns),
            ("hash", "unknown_key", Some(8000))
        );
        assert!(record.phases_ns.is_empty());
        let mut signed = load(0, SEEN_SIG_CHECK | SEEN_VERIFY_SIG, 0);
        signed.verify.ns = 20_000;
        signed.verify.hashed_len = 6400;
        let record = count(&mut state, &signed);
        assert_eq!(
            (
                record.method,
                record.integrity_check_ns,
                record.hashed_bytes
            ),
            ("signature", Some(20_000), 6400)
        );
        assert_eq!(state.integrity[&("hash", "fail")].count(), 1);
        assert_eq!(state.integrity[&("signature", "ok")].count(), 1);
    }

    #[test]
    fn other_leaves_out_the_phase_programs_own_time() {
        let mut l = load(0, SEEN_SIG_CHECK | SEEN_VERIFY_SIG, 0);
        l.verify.ns = 10_000;
        l.phases.calls[0] = 1;
        l.phases.ns[0] = 3_000;
        l.phases.probe_ns = 500;
        assert_eq!(phases(&l)["other"], 6_500);
        // One gap per phase call.
        l.gap_ns = 100;
        l.phases.calls[1] = 2;
        assert_eq!(phases(&l)["other"], 6_200);
    }

    #[test]
    fn an_unsigned_load_is_loaded_without_a_check() {
        let mut state = ModuleState::default();
        let mut l = load(0, SEEN_SIG_CHECK | SEEN_NAME, 0);
        l.name[..4].copy_from_slice(b"crc7");
        l.taints = 1 << 13;
        let record = count(&mut state, &l);
        assert_eq!(
            (
                record.outcome,
                record.method,
                record.module.as_str(),
                record.taints.as_str()
            ),
            ("loaded", "none", "crc7", "E")
        );
        assert!(
            state.integrity.is_empty(),
            "no integrity sample without a check"
        );
    }

    #[test]
    fn the_hash_estimate_is_digest_plus_node_hashes() {
        // 6400 bytes: 100 blocks of 64; digest 1000 ns: 10 ns a block, 20 ns a node.
        let mut state = ModuleState::new(None, Some(4256), true);
        let mut l = load(0, SEEN_SIG_CHECK | SEEN_VERIFY_SIG, 0);
        l.phases.calls[modules::PHASE_DIGEST] = 1;
        l.phases.ns[modules::PHASE_DIGEST] = 1000;
        l.verify.ns = 5000;
        l.verify.hashed_len = 6400;
        count(&mut state, &l);
        assert_eq!(state.hash_estimate.count(), 1);
        assert_eq!(state.hash_estimate.sum_ns, 1260);
    }
}
