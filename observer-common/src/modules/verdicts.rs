//! A load attempt's verdict, decided in the kernel by the program that sees it and counted
//! there: its outcome, the integrity method that proved it, and the reason (the check's
//! finding, or the policy that refused it). The eBPF programs and the agent share these
//! functions, so the labels mean what the kernel decided.

use super::{
    ModuleLoad, SEEN_FROM_FILE, SEEN_HASH_CHECK, SEEN_IDEMPOTENT, SEEN_IMA_DATA_REFUSED,
    SEEN_LOAD_DATA, SEEN_LOCKDOWN_REFUSED, SEEN_LSM_REFUSED, SEEN_READ, SEEN_READ_REFUSED,
    SEEN_SIG_CHECK, SEEN_VERIFY_SIG, TAINT_UNSIGNED_MODULE,
};
/// What became of a load attempt ([`ModuleLoad::outcome`], the `outcome` label), decided in the
/// kernel by [`load_outcome`] or [`early_outcome`] and counted there.
pub const OUTCOME_LOADED: u32 = 0;
pub const OUTCOME_REJECTED_SIGNATURE: u32 = 1;
pub const OUTCOME_REJECTED_LOCKDOWN: u32 = 2;
pub const OUTCOME_REJECTED_IMA: u32 = 3;
pub const OUTCOME_REJECTED_LSM: u32 = 4;
pub const OUTCOME_REJECTED_PERMISSION: u32 = 5;
pub const OUTCOME_DUPLICATE: u32 = 6;
pub const OUTCOME_FAILED: u32 = 7;
/// The `outcome` label of each outcome, by number.
pub const OUTCOMES: [&str; 8] = [
    "loaded",
    "rejected_signature",
    "rejected_lockdown",
    "rejected_ima",
    "rejected_lsm",
    "rejected_permission",
    "duplicate",
    "failed",
];

/// Which integrity check proved the module (the `method` label), by [`method`].
pub const METHOD_SIGNATURE: u32 = 0;
pub const METHOD_HASH: u32 = 1;
pub const METHOD_NONE: u32 = 2;
pub const METHODS: [&str; 3] = ["signature", "hash", "none"];

/// Why a load was refused, or what its integrity check found ([`ModuleLoad::reason`], the
/// `reason` label), decided in the kernel by [`load_reason`] or [`early_reason`]: the kernel's
/// own distinctions (`module_sig_check`, `mod_verify_sig`'s errors, IMA, the LSM hooks).
/// The signature (or proof) verified against a trusted key.
pub const REASON_VERIFIED: u32 = 0;
/// No signature (-ENODATA): loads with taint E unless enforced.
pub const REASON_UNSIGNED: u32 = 1;
/// Signed, by no key the kernel trusts (-ENOKEY): loads with taint E unless enforced.
pub const REASON_UNKNOWN_KEY: u32 = 2;
/// An algorithm the kernel lacks (-ENOPKG): loads with taint E unless enforced.
pub const REASON_UNSUPPORTED_CRYPTO: u32 = 3;
/// The signature does not verify (-EKEYREJECTED): refused even without enforcement.
pub const REASON_BAD_SIGNATURE: u32 = 4;
/// The signature cannot be parsed (-EBADMSG): refused even without enforcement.
pub const REASON_MALFORMED: u32 = 5;
/// Any other error of the check (-ENOMEM, -EINVAL...): refused.
pub const REASON_ERROR: u32 = 6;
/// `module.sig_enforce=1` (or CONFIG_MODULE_SIG_FORCE) refused an unsigned, unknown-key or
/// unsupported module.
pub const REASON_ENFORCED: u32 = 7;
/// Lockdown refused it (`security_locked_down(LOCKDOWN_MODULE_SIGNATURE)`).
pub const REASON_LOCKDOWN: u32 = 8;
/// IMA's appraisal of the module's file refused it.
pub const REASON_IMA_APPRAISAL: u32 = 9;
/// IMA refused init_module(2)'s bytes (an appraise policy for modules has no file to appraise).
pub const REASON_IMA_INIT_MODULE: u32 = 10;
/// Another security module refused the module's data.
pub const REASON_LSM: u32 = 11;
/// No CAP_SYS_MODULE, or kernel.modules_disabled=1.
pub const REASON_PERMISSION: u32 = 12;
/// No integrity check ran (a duplicate, a failure before the check).
pub const REASON_NONE: u32 = 13;
pub const REASONS: [&str; 14] = [
    "verified",
    "unsigned",
    "unknown_key",
    "unsupported_crypto",
    "bad_signature",
    "malformed",
    "error",
    "enforced",
    "lockdown",
    "ima_appraisal",
    "ima_init_module",
    "lsm",
    "permission",
    "none",
];

/// Size of the `MODULE_VERDICTS` per-CPU array: one slot per outcome, method and reason.
pub const VERDICT_SLOTS: u32 = (OUTCOMES.len() * METHODS.len() * REASONS.len()) as u32;

/// The `MODULE_VERDICTS` slot of an outcome, a method and a reason.
#[inline(always)]
pub const fn verdict_slot(outcome: u32, method: u32, reason: u32) -> u32 {
    (outcome * METHODS.len() as u32 + method) * REASONS.len() as u32 + reason
}

/// The outcome, method and reason of a `MODULE_VERDICTS` slot.
pub const fn verdict_of_slot(slot: u32) -> (u32, u32, u32) {
    let (pair, reason) = (slot / REASONS.len() as u32, slot % REASONS.len() as u32);
    (
        pair / METHODS.len() as u32,
        pair % METHODS.len() as u32,
        reason,
    )
}

/// The reason an outcome and method usually come with: the `MODULE_VERDICTS` series the agent
/// shows from the start, zeros included, so that rates and alerts see the first increment.
pub const fn usual_reason(outcome: u32, method: u32) -> u32 {
    match outcome {
        OUTCOME_LOADED if method == METHOD_NONE => REASON_UNSIGNED,
        OUTCOME_DUPLICATE | OUTCOME_FAILED if method == METHOD_NONE => REASON_NONE,
        OUTCOME_LOADED | OUTCOME_DUPLICATE | OUTCOME_FAILED => REASON_VERIFIED,
        OUTCOME_REJECTED_SIGNATURE if method == METHOD_NONE => REASON_ENFORCED,
        OUTCOME_REJECTED_SIGNATURE => REASON_BAD_SIGNATURE,
        OUTCOME_REJECTED_LOCKDOWN => REASON_LOCKDOWN,
        OUTCOME_REJECTED_IMA => REASON_IMA_APPRAISAL,
        OUTCOME_REJECTED_LSM => REASON_LSM,
        OUTCOME_REJECTED_PERMISSION => REASON_PERMISSION,
        _ => REASON_NONE,
    }
}

/// The outcome and method a reason usually comes with (the other half of the series shown
/// from the start: see [`usual_reason`]).
pub const fn usual_verdict(reason: u32) -> (u32, u32) {
    match reason {
        REASON_VERIFIED | REASON_UNKNOWN_KEY | REASON_UNSUPPORTED_CRYPTO => {
            (OUTCOME_LOADED, METHOD_SIGNATURE)
        }
        REASON_UNSIGNED => (OUTCOME_LOADED, METHOD_NONE),
        REASON_BAD_SIGNATURE | REASON_MALFORMED | REASON_ERROR => {
            (OUTCOME_REJECTED_SIGNATURE, METHOD_SIGNATURE)
        }
        REASON_ENFORCED => (OUTCOME_REJECTED_SIGNATURE, METHOD_NONE),
        REASON_LOCKDOWN => (OUTCOME_REJECTED_LOCKDOWN, METHOD_NONE),
        REASON_IMA_APPRAISAL | REASON_IMA_INIT_MODULE => (OUTCOME_REJECTED_IMA, METHOD_NONE),
        REASON_LSM => (OUTCOME_REJECTED_LSM, METHOD_NONE),
        REASON_PERMISSION => (OUTCOME_REJECTED_PERMISSION, METHOD_NONE),
        _ => (OUTCOME_FAILED, METHOD_NONE),
    }
}

/// Whether a `MODULE_VERDICTS` slot is shown from the start, zeros included: an outcome and
/// method with its usual reason, or a reason with its usual outcome and method (29 of the 336).
pub const fn shown_from_start(slot: u32) -> bool {
    let (outcome, method, reason) = verdict_of_slot(slot);
    let (usual_outcome, usual_method) = usual_verdict(reason);
    reason == usual_reason(outcome, method) || (outcome == usual_outcome && method == usual_method)
}

/// The syscalls a load attempt comes by (`MODULE_SYSCALLS`: `syscall * ERRNO_SLOTS + errno`).
pub const SYSCALL_INIT_MODULE: u32 = 0;
pub const SYSCALL_FINIT_MODULE: u32 = 1;
pub const SYSCALL_NAMES: [&str; 2] = ["init_module", "finit_module"];
pub const SYSCALL_SLOTS: u32 = SYSCALL_NAMES.len() as u32 * crate::ERRNO_SLOTS;

const EPERM: i32 = 1;
const EEXIST: i32 = 17;
const ENODATA: i32 = 61;
const ENOPKG: i32 = 65;
const EBADMSG: i32 = 74;
const ENOKEY: i32 = 126;
const EKEYREJECTED: i32 = 129;

/// The integrity method of a load: which check ran in it.
#[inline(always)]
pub const fn method(seen: u32) -> u32 {
    if seen & SEEN_HASH_CHECK != 0 {
        METHOD_HASH
    } else if seen & SEEN_VERIFY_SIG != 0 {
        METHOD_SIGNATURE
    } else {
        METHOD_NONE
    }
}

/// The outcome of a load that reached `load_module`, from its result and (where the policy
/// step is traceable) the policy step's.
#[inline(always)]
pub const fn load_outcome(seen: u32, load_ret: i32, sig_check_ret: i32) -> u32 {
    if load_ret == 0 {
        return OUTCOME_LOADED;
    }
    // A module of that name is loaded already (or was being loaded, and the wait ended).
    if load_ret == -EEXIST {
        return OUTCOME_DUPLICATE;
    }
    // module_sig_check returns the lockdown verdict for an unsigned module, or the signature
    // error when signatures are enforced; without that hook (inlined before 5.19),
    // load_module's error says the same, except that its -EPERM may also be a blacklisted
    // module's: a lockdown refusal then only where the lockdown program saw it.
    let sig_checked = seen & SEEN_SIG_CHECK != 0;
    let policy_ret = if sig_checked { sig_check_ret } else { load_ret };
    match -policy_ret {
        0 => OUTCOME_FAILED,
        EPERM if sig_checked || seen & SEEN_LOCKDOWN_REFUSED != 0 => OUTCOME_REJECTED_LOCKDOWN,
        EPERM => OUTCOME_FAILED,
        EKEYREJECTED | ENOKEY | ENOPKG | EBADMSG => OUTCOME_REJECTED_SIGNATURE,
        _ if sig_checked => OUTCOME_REJECTED_SIGNATURE,
        _ => OUTCOME_FAILED,
    }
}

/// What a load's integrity check found, from the results of `mod_verify_sig` (or the hash-based
/// check) and `module_sig_check`, and its `outcome`: a finding the policy may let pass (no
/// signature, no trusted key, unsupported crypto) becomes the policy that refused it.
#[inline(always)]
pub const fn load_reason(load: &ModuleLoad) -> u32 {
    let (seen, outcome) = (load.seen, load.outcome);
    let (checked, ret) = if seen & SEEN_HASH_CHECK != 0 {
        (true, load.hash.ret)
    } else {
        (seen & SEEN_VERIFY_SIG != 0, load.verify.ret)
    };
    let finding = if checked {
        match -ret {
            0 => REASON_VERIFIED,
            ENODATA => REASON_UNSIGNED,
            ENOKEY => REASON_UNKNOWN_KEY,
            ENOPKG => REASON_UNSUPPORTED_CRYPTO,
            EKEYREJECTED => REASON_BAD_SIGNATURE,
            EBADMSG => REASON_MALFORMED,
            _ => REASON_ERROR,
        }
    } else if seen & SEEN_SIG_CHECK != 0
        || load.taints & (1 << TAINT_UNSIGNED_MODULE) != 0
        || outcome == OUTCOME_REJECTED_SIGNATURE
    {
        // module_sig_check found no signature marker: mod_verify_sig never ran. Where
        // module_sig_check is inlined (before 5.19) the kernel says so by tainting E as it
        // loads the module, or by refusing it under enforcement.
        REASON_UNSIGNED
    } else {
        REASON_NONE
    };
    let allowed_unenforced = matches!(
        finding,
        REASON_UNSIGNED | REASON_UNKNOWN_KEY | REASON_UNSUPPORTED_CRYPTO
    );
    match outcome {
        OUTCOME_REJECTED_LOCKDOWN => REASON_LOCKDOWN,
        OUTCOME_REJECTED_SIGNATURE if allowed_unenforced => REASON_ENFORCED,
        _ => finding,
    }
}

/// The reason of an attempt that ended before `load_module`, with its [`early_outcome`].
#[inline(always)]
pub const fn early_reason(seen: u32, outcome: u32) -> u32 {
    match outcome {
        OUTCOME_REJECTED_IMA if seen & SEEN_IMA_DATA_REFUSED != 0 => REASON_IMA_INIT_MODULE,
        OUTCOME_REJECTED_IMA => REASON_IMA_APPRAISAL,
        OUTCOME_REJECTED_LSM => REASON_LSM,
        OUTCOME_REJECTED_PERMISSION => REASON_PERMISSION,
        _ => REASON_NONE,
    }
}

/// The outcome of an attempt that ended before `load_module`, at its syscall's exit with `ret`.
#[inline(always)]
pub const fn early_outcome(seen: u32, ret: i32) -> u32 {
    if seen & (SEEN_READ_REFUSED | SEEN_IMA_DATA_REFUSED) != 0 {
        // IMA refused it: its appraisal of the read, or init_module's bytes.
        OUTCOME_REJECTED_IMA
    } else if seen & SEEN_LSM_REFUSED != 0 {
        OUTCOME_REJECTED_LSM
    } else if seen & (SEEN_IDEMPOTENT | SEEN_FROM_FILE) == SEEN_IDEMPOTENT {
        // It waited for an identical finit_module and returns that one's result, whatever it
        // was (an EPERM there is the other call's lockdown refusal, not a permission).
        OUTCOME_DUPLICATE
    } else if seen & (SEEN_READ | SEEN_LOAD_DATA | SEEN_IDEMPOTENT) == 0 {
        // No hook past `may_init_module` ran: the syscall ended there (no CAP_SYS_MODULE, or
        // kernel.modules_disabled=1), or, where `idempotent_init_module` cannot be traced, it
        // waited on an identical finit_module in progress (the kernel hands the waiter that
        // load's result without loading again).
        if ret == 0 {
            OUTCOME_DUPLICATE
        } else if ret == -EPERM {
            OUTCOME_REJECTED_PERMISSION
        } else {
            OUTCOME_FAILED
        }
    } else {
        // Decompression, the read or the copy failed.
        OUTCOME_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::{SEEN_DECOMPRESS, SEEN_FILE};

    #[test]
    fn verdict_slots_round_trip() {
        for outcome in 0..OUTCOMES.len() as u32 {
            for method in 0..METHODS.len() as u32 {
                for reason in 0..REASONS.len() as u32 {
                    let slot = verdict_slot(outcome, method, reason);
                    assert!(slot < VERDICT_SLOTS);
                    assert_eq!(verdict_of_slot(slot), (outcome, method, reason));
                }
            }
        }
    }

    #[test]
    fn outcomes_follow_the_signature_policy() {
        let signed = SEEN_SIG_CHECK | SEEN_VERIFY_SIG;
        assert_eq!(load_outcome(signed, 0, 0), OUTCOME_LOADED);
        assert_eq!(
            load_outcome(SEEN_SIG_CHECK, -1, -1),
            OUTCOME_REJECTED_LOCKDOWN
        );
        assert_eq!(
            load_outcome(SEEN_SIG_CHECK, -EKEYREJECTED, -EKEYREJECTED),
            OUTCOME_REJECTED_SIGNATURE
        );
        assert_eq!(load_outcome(SEEN_SIG_CHECK, -EEXIST, 0), OUTCOME_DUPLICATE);
        assert_eq!(load_outcome(SEEN_SIG_CHECK, -8, 0), OUTCOME_FAILED);
        // Without module_sig_check (inlined before 5.19), load_module's error decides; an
        // EPERM is lockdown's only where the lockdown program saw it refuse (else a
        // blacklisted module's, say).
        assert_eq!(
            load_outcome(SEEN_LOCKDOWN_REFUSED, -1, 0),
            OUTCOME_REJECTED_LOCKDOWN
        );
        assert_eq!(load_outcome(0, -1, 0), OUTCOME_FAILED);
        assert_eq!(
            load_outcome(0, -EKEYREJECTED, 0),
            OUTCOME_REJECTED_SIGNATURE
        );
        assert_eq!(load_outcome(0, -8, 0), OUTCOME_FAILED);
        assert_eq!(method(signed), METHOD_SIGNATURE);
        assert_eq!(method(signed | SEEN_HASH_CHECK), METHOD_HASH);
        assert_eq!(method(SEEN_SIG_CHECK), METHOD_NONE);
    }

    /// A load that reached `load_module`'s exit with these results.
    fn finished(seen: u32, load_ret: i32, sig_check_ret: i32, verify_ret: i32) -> ModuleLoad {
        // SAFETY: all-zero is a valid ModuleLoad (integers and arrays).
        let mut load: ModuleLoad = unsafe { core::mem::zeroed() };
        load.seen = seen;
        load.load_ret = load_ret;
        load.sig_check.ret = sig_check_ret;
        load.verify.ret = verify_ret;
        load.outcome = load_outcome(seen, load_ret, sig_check_ret);
        load
    }

    #[test]
    fn reasons_follow_module_sig_check() {
        let signed = SEEN_SIG_CHECK | SEEN_VERIFY_SIG;
        let reason = |seen, load_ret, sig_ret, verify_ret| {
            let load = finished(seen, load_ret, sig_ret, verify_ret);
            REASONS[load_reason(&load) as usize]
        };
        assert_eq!(reason(signed, 0, 0, 0), "verified");
        assert_eq!(reason(SEEN_SIG_CHECK, 0, 0, 0), "unsigned");
        // Not enforced: a missing key only taints.
        assert_eq!(reason(signed, 0, 0, -ENOKEY), "unknown_key");
        assert_eq!(reason(signed, 0, 0, -ENOPKG), "unsupported_crypto");
        // Enforced: module_sig_check answers EKEYREJECTED for all three.
        let enforced = -EKEYREJECTED;
        assert_eq!(reason(signed, enforced, enforced, -ENOKEY), "enforced");
        assert_eq!(reason(SEEN_SIG_CHECK, enforced, enforced, 0), "enforced");
        // Lockdown: EPERM.
        assert_eq!(reason(SEEN_SIG_CHECK, -EPERM, -EPERM, 0), "lockdown");
        assert_eq!(reason(signed, -EPERM, -EPERM, -ENOKEY), "lockdown");
        // Refused whatever the policy.
        let bad = -EKEYREJECTED;
        assert_eq!(reason(signed, bad, bad, bad), "bad_signature");
        assert_eq!(reason(signed, -EBADMSG, -EBADMSG, -EBADMSG), "malformed");
        assert_eq!(reason(signed, -12, -12, -12), "error");
        assert_eq!(reason(0, -EEXIST, 0, 0), "none");
        // Before 5.19 (module_sig_check inlined): taint E says the module was unsigned, an
        // enforced refusal without a signature check that it had none.
        let mut tainted = finished(0, 0, 0, 0);
        tainted.taints = 1 << TAINT_UNSIGNED_MODULE;
        assert_eq!(load_reason(&tainted), REASON_UNSIGNED);
        assert_eq!(reason(0, 0, 0, 0), "none");
        assert_eq!(reason(0, enforced, 0, 0), "enforced");
        assert_eq!(reason(SEEN_LOCKDOWN_REFUSED, -EPERM, 0, 0), "lockdown");
        assert_eq!(reason(0, -EPERM, 0, 0), "none");
        let mut hashed = finished(SEEN_SIG_CHECK | SEEN_HASH_CHECK, 0, 0, 0);
        assert_eq!(load_reason(&hashed), REASON_VERIFIED);
        hashed.hash.ret = -ENOKEY;
        assert_eq!(load_reason(&hashed), REASON_UNKNOWN_KEY);
        assert_eq!(
            early_reason(SEEN_IMA_DATA_REFUSED, OUTCOME_REJECTED_IMA),
            REASON_IMA_INIT_MODULE
        );
        assert_eq!(
            early_reason(SEEN_READ_REFUSED, OUTCOME_REJECTED_IMA),
            REASON_IMA_APPRAISAL
        );
        assert_eq!(
            early_reason(0, OUTCOME_REJECTED_PERMISSION),
            REASON_PERMISSION
        );
    }

    /// The records a kernel with the hash-based patch set's v5 produces: the policy step is
    /// `module_auth_check` (SEEN_SIG_CHECK), the PKCS#7 check `module_sig_check`
    /// (SEEN_VERIFY_SIG), the Merkle check `module_hash_check` (SEEN_HASH_CHECK), whose -ENOKEY
    /// (a proof that does not lead to the built-in root) and -ENOPKG (a proof of the wrong size)
    /// the policy treats as it treats signatures.
    #[test]
    fn hash_v5_records() {
        let verdict = |seen, load_ret, policy_ret, verify_ret, hash_ret| {
            let mut load = finished(seen, load_ret, policy_ret, verify_ret);
            load.hash.ret = hash_ret;
            (
                OUTCOMES[load.outcome as usize],
                METHODS[method(seen) as usize],
                REASONS[load_reason(&load) as usize],
            )
        };
        let (signed, proof) = (
            SEEN_SIG_CHECK | SEEN_VERIFY_SIG,
            SEEN_SIG_CHECK | SEEN_HASH_CHECK,
        );
        let rejected = -EKEYREJECTED;
        let cases = [
            // A module signed with the build's key, verified by PKCS#7.
            ((signed, 0, 0, 0, 0), ("loaded", "signature", "verified")),
            (
                (signed, 0, 0, -ENOKEY, 0),
                ("loaded", "signature", "unknown_key"),
            ),
            // A proof that matches the root.
            ((proof, 0, 0, 0, 0), ("loaded", "hash", "verified")),
            // A flipped bit: loads with taint E unless enforced.
            ((proof, 0, 0, 0, -ENOKEY), ("loaded", "hash", "unknown_key")),
            // A proof of the wrong size.
            (
                (proof, 0, 0, 0, -ENOPKG),
                ("loaded", "hash", "unsupported_crypto"),
            ),
            // module.sig_enforce=1: "Loading of module with unavailable key is rejected".
            (
                (proof, rejected, rejected, 0, -ENOKEY),
                ("rejected_signature", "hash", "enforced"),
            ),
            // lockdown=integrity.
            (
                (proof, -EPERM, -EPERM, 0, -ENOKEY),
                ("rejected_lockdown", "hash", "lockdown"),
            ),
            // A bare module reaches module_auth_check alone.
            ((SEEN_SIG_CHECK, 0, 0, 0, 0), ("loaded", "none", "unsigned")),
            (
                (SEEN_SIG_CHECK, rejected, rejected, 0, 0),
                ("rejected_signature", "none", "enforced"),
            ),
            (
                (SEEN_SIG_CHECK, -EPERM, -EPERM, 0, 0),
                ("rejected_lockdown", "none", "lockdown"),
            ),
        ];
        for ((seen, load_ret, policy_ret, verify_ret, hash_ret), want) in cases {
            assert_eq!(
                verdict(seen, load_ret, policy_ret, verify_ret, hash_ret),
                want,
                "seen {seen:#x} load {load_ret} policy {policy_ret} verify {verify_ret} hash {hash_ret}"
            );
        }
    }

    #[test]
    fn the_series_shown_from_the_start() {
        // The usual pairings, built up one by one (no_std: no sets here).
        let mut usual = [false; VERDICT_SLOTS as usize];
        for outcome in 0..OUTCOMES.len() as u32 {
            for method in 0..METHODS.len() as u32 {
                usual[verdict_slot(outcome, method, usual_reason(outcome, method)) as usize] = true;
            }
        }
        for reason in 0..REASONS.len() as u32 {
            let (outcome, method) = usual_verdict(reason);
            usual[verdict_slot(outcome, method, reason) as usize] = true;
        }
        for slot in 0..VERDICT_SLOTS {
            assert_eq!(shown_from_start(slot), usual[slot as usize], "slot {slot}");
        }
        assert_eq!(usual.iter().filter(|&&u| u).count(), 29);
    }

    #[test]
    fn every_reason_and_verdict_has_a_series_from_the_start() {
        for reason in 0..REASONS.len() as u32 {
            let (outcome, method) = usual_verdict(reason);
            assert!(verdict_slot(outcome, method, reason) < VERDICT_SLOTS);
        }
        assert_eq!(usual_reason(OUTCOME_LOADED, METHOD_NONE), REASON_UNSIGNED);
        assert_eq!(
            usual_reason(OUTCOME_LOADED, METHOD_SIGNATURE),
            REASON_VERIFIED
        );
    }

    #[test]
    fn attempts_that_never_reach_load_module() {
        let read = SEEN_READ | SEEN_FILE;
        assert_eq!(
            early_outcome(read | SEEN_READ_REFUSED, -13),
            OUTCOME_REJECTED_IMA
        );
        assert_eq!(
            early_outcome(read | SEEN_LSM_REFUSED, -1),
            OUTCOME_REJECTED_LSM
        );
        assert_eq!(
            early_outcome(SEEN_LOAD_DATA | SEEN_LSM_REFUSED, -13),
            OUTCOME_REJECTED_LSM
        );
        assert_eq!(early_outcome(0, -EPERM), OUTCOME_REJECTED_PERMISSION);
        assert_eq!(early_outcome(SEEN_IDEMPOTENT, -EPERM), OUTCOME_DUPLICATE);
        assert_eq!(early_outcome(SEEN_IDEMPOTENT, 0), OUTCOME_DUPLICATE);
        assert_eq!(
            early_outcome(SEEN_IDEMPOTENT | SEEN_FROM_FILE, -26),
            OUTCOME_FAILED
        );
        assert_eq!(early_outcome(0, 0), OUTCOME_DUPLICATE);
        assert_eq!(early_outcome(0, -9), OUTCOME_FAILED);
        assert_eq!(early_outcome(read | SEEN_DECOMPRESS, -95), OUTCOME_FAILED);
    }
}
