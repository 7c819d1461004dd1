//! IMA appraisal of module reads (`appraise func=MODULE_CHECK`): the kernel hashes the module
//! file and compares the digest with its `security.ima` attribute before `load_module` runs, so
//! a hash-based module check can be measured on released kernels, beside the signature check
//! of the same load. A read IMA refuses is a load `rejected_ima` that never reached
//! `load_module`.

use std::collections::BTreeMap;

use observer_common::modules::{
    DIGEST_LEN, IMA_READ_ID_ARG, ModuleLoad, SEEN_IMA_APPRAISE, SEEN_IMA_DIGEST,
    SEEN_IMA_FILE_DIGEST, SEEN_IMA_READ, SEEN_IMA_SIGNATURE, hash_algo_name,
};
use serde::Serialize;

use super::{bracket, signers::hex, single};
use crate::{
    kernel::KernelBtf,
    plan::{Hook, fentry, fexit},
};

/// The `method` label of an IMA check: a digest in `security.ima` (compared, no key) or an
/// imasig (verified with a key on the IMA keyring).
pub const METHODS: [&str; 2] = ["ima_hash", "ima_signature"];

/// `enum integrity_status` values that pass: INTEGRITY_PASS, INTEGRITY_PASS_IMMUTABLE (the
/// enum's first two members since 4.16).
const PASSED: [i32; 2] = [0, 1];

/// The function whose fentry/fexit bracket IMA's check of a read, and the type of the argument
/// the program reads ([`IMA_READ_ID_ARG`]: which kind of file is read).
const READ_HOOK: &str = "security_kernel_post_read_file";
const READ_ID_TYPE: &str = "enum kernel_read_file_id";

/// What IMA decided about one module read, when it appraised it (no policy rule for modules, or
/// a result cached from an earlier read of the same file: no check, no verdict).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImaVerdict {
    pub method: &'static str,
    pub result: &'static str,
    pub check_ns: u64,
    /// What IMA hashed the whole file to, and with which algorithm: absent where it computed
    /// no hash for this read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_algo: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// IMA's hash of the module's file (as stored: a `.ko.xz` compressed), with its algorithm.
pub fn file_digest(load: &ModuleLoad) -> Option<(&'static str, String)> {
    let len = (load.ima.digest_len as usize).min(DIGEST_LEN);
    if load.seen & SEEN_IMA_FILE_DIGEST == 0 || len == 0 {
        return None;
    }
    let algo = hash_algo_name(load.ima.algo)?;
    Some((algo, hex(&load.ima.digest[..len])))
}

pub fn verdict(load: &ModuleLoad) -> Option<ImaVerdict> {
    if load.seen & SEEN_IMA_READ == 0 || load.seen & (SEEN_IMA_DIGEST | SEEN_IMA_APPRAISE) == 0 {
        return None;
    }
    let method = if load.seen & SEEN_IMA_SIGNATURE != 0 {
        METHODS[1]
    } else {
        METHODS[0]
    };
    // Appraisal's own verdict where it was timed; else the hook's (0 unless IMA refused).
    let passed = if load.seen & SEEN_IMA_APPRAISE != 0 {
        PASSED.contains(&load.ima.status)
    } else {
        load.ima.ret == 0
    };
    let (hash_algo, digest) = file_digest(load).unzip();
    Some(ImaVerdict {
        method,
        result: if passed { "ok" } else { "fail" },
        check_ns: load.ima.check_ns,
        hash_algo,
        digest,
    })
}

/// IMA's phases of one load: hashing the file (`ima_digest`) and comparing the result with
/// `security.ima` (`ima_appraise`).
pub fn phases(load: &ModuleLoad, phases: &mut BTreeMap<&'static str, u64>) {
    if load.seen & SEEN_IMA_DIGEST != 0 {
        phases.insert("ima_digest", load.ima.digest_ns);
    }
    if load.seen & SEEN_IMA_APPRAISE != 0 {
        phases.insert("ima_appraise", load.ima.appraise_ns);
    }
}

/// The IMA hooks, where this kernel's `security_kernel_post_read_file` has the prototype the
/// program reads (else none: the read's kind would be misread).
pub fn hooks(btf: Option<&KernelBtf>) -> Vec<Hook> {
    let params = btf.and_then(|b| b.function_params(READ_HOOK));
    if let Some(params) = &params
        && params.get(IMA_READ_ID_ARG).map(String::as_str) != Some(READ_ID_TYPE)
    {
        log::warn!(
            "{READ_HOOK} has arguments ({}) of no known shape: IMA appraisal of modules not observed",
            params.join(", ")
        );
        return Vec::new();
    }
    vec![
        bracket(
            "module_ima_check",
            "modules_ima_enter",
            "modules_ima_exit",
            READ_HOOK,
        ),
        bracket(
            "module_ima_digest",
            "modules_ima_digest_enter",
            "modules_ima_digest_exit",
            "ima_calc_buffer_hash",
        ),
        // What IMA hashed the file to: a byte array only bpf_probe_read_kernel reads (refused
        // under lockdown=confidentiality), so a program of its own, after the timing ones.
        single(
            "module_ima_digest_value",
            fexit("modules_ima_digest_value", "ima_calc_buffer_hash"),
        ),
        bracket(
            "module_ima_appraise",
            "modules_ima_appraise_enter",
            "modules_ima_appraise_exit",
            "ima_appraise_measurement",
        ),
        single(
            "module_ima_signature",
            fentry("modules_ima_signature", "integrity_digsig_verify"),
        ),
        // IMA refusing init_module(2)'s bytes (it cannot appraise a module without a file):
        // `rejected_ima` rather than a security module's `rejected_lsm`.
        single(
            "module_ima_load_data",
            fexit("modules_ima_load_data", "ima_load_data"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use observer_common::modules::SEEN_READ_REFUSED;

    use super::*;

    fn read(seen: u32, ret: i32, status: i32) -> ModuleLoad {
        // SAFETY: all-zero is a valid ModuleLoad.
        let mut load: ModuleLoad = unsafe { std::mem::zeroed() };
        load.seen = seen;
        load.ima.ret = ret;
        load.ima.status = status;
        load.ima.check_ns = 5000;
        load.ima.digest_ns = 3000;
        load.ima.appraise_ns = 500;
        load
    }

    #[test]
    fn verdicts() {
        let hashed = SEEN_IMA_READ | SEEN_IMA_DIGEST | SEEN_IMA_APPRAISE;
        assert_eq!(
            verdict(&read(hashed, 0, 0)),
            Some(ImaVerdict {
                method: "ima_hash",
                result: "ok",
                check_ns: 5000,
                hash_algo: None,
                digest: None,
            })
        );
        // With the file's hash: uapi's HASH_ALGO_SHA256 is 4.
        let mut digested = read(hashed | SEEN_IMA_FILE_DIGEST, 0, 0);
        digested.ima.algo = 4;
        digested.ima.digest_len = 32;
        digested.ima.digest[..2].copy_from_slice(&[0xab, 0x01]);
        let check = verdict(&digested).unwrap();
        assert_eq!(check.hash_algo, Some("sha256"));
        assert_eq!(check.digest.as_deref().map(str::len), Some(64));
        assert!(check.digest.unwrap().starts_with("ab01"));
        // INTEGRITY_FAIL (2), refused with EACCES.
        let refused = read(hashed | SEEN_READ_REFUSED, -libc::EACCES, 2);
        assert_eq!(verdict(&refused).map(|v| v.result), Some("fail"));
        // Appraisal failed but IMA only logs (ima_appraise=log): still a failed check.
        assert_eq!(verdict(&read(hashed, 0, 4)).map(|v| v.result), Some("fail"));
        assert_eq!(
            verdict(&read(hashed | SEEN_IMA_SIGNATURE, 0, 0)).map(|v| v.method),
            Some("ima_signature")
        );
        // Without its appraisal timed, the hook's return decides.
        assert_eq!(
            verdict(&read(SEEN_IMA_READ | SEEN_IMA_DIGEST, -libc::EACCES, 0)).map(|v| v.result),
            Some("fail")
        );
        // The hook ran but IMA did nothing (no rule for modules, or a cached result).
        assert_eq!(verdict(&read(SEEN_IMA_READ, 0, 0)), None);
        assert_eq!(verdict(&read(0, 0, 0)), None);
    }

    #[test]
    fn phases_that_ran() {
        let mut out = BTreeMap::new();
        phases(&read(SEEN_IMA_READ | SEEN_IMA_DIGEST, 0, 0), &mut out);
        assert_eq!(out, BTreeMap::from([("ima_digest", 3000)]));
    }
}
