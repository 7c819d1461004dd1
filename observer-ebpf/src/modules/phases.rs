//! Where a signature check spends its time: parsing the PKCS#7 message, hashing the module,
//! looking up the key, verifying the signature with it.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use observer_common::modules::{
    PHASE_DIGEST, PHASE_KEY_LOOKUP, PHASE_PARSE, PHASE_PUBLIC_KEY_VERIFY, PHASES,
};

use super::{current_load, now, signature};

/// Phases of a signature check: counted only inside a module load (the same functions also
/// serve kexec, firmware and IMA), each call's time added to its phase.
///
/// The phase starts at the last thing the entry program does and ends at the first thing the
/// exit program does; what the two programs spend outside that window (the lookup before it,
/// the bookkeeping after it) is added to `probe_ns`, so that the check's remainder (`other`)
/// can leave the observer's own work out.
#[inline(always)]
fn phase_enter(phase: usize) -> u32 {
    let start = now();
    if let Some(load) = current_load()
        && phase < PHASES
    {
        let entry = now();
        load.marks.phase_entry_ns[phase] = entry;
        load.phases.probe_ns += entry - start;
    }
    0
}

#[inline(always)]
fn phase_exit(phase: usize) -> u32 {
    let exit = now();
    if let Some(load) = current_load()
        && phase < PHASES
        && load.marks.phase_entry_ns[phase] != 0
    {
        load.phases.ns[phase] += exit - load.marks.phase_entry_ns[phase];
        load.phases.calls[phase] += 1;
        load.marks.phase_entry_ns[phase] = 0;
        load.phases.probe_ns += now() - exit;
    }
    0
}

#[fentry(function = "pkcs7_parse_message")]
pub fn modules_parse_enter(_ctx: FEntryContext) -> u32 {
    phase_enter(PHASE_PARSE)
}

#[fexit(function = "pkcs7_parse_message")]
pub fn modules_parse_exit(_ctx: FExitContext) -> u32 {
    phase_exit(PHASE_PARSE)
}

#[fentry(function = "pkcs7_digest")]
pub fn modules_digest_enter(_ctx: FEntryContext) -> u32 {
    phase_enter(PHASE_DIGEST)
}

#[fexit(function = "pkcs7_digest")]
pub fn modules_digest_exit(_ctx: FExitContext) -> u32 {
    phase_exit(PHASE_DIGEST)
}

#[fentry(function = "find_asymmetric_key")]
pub fn modules_key_lookup_enter(_ctx: FEntryContext) -> u32 {
    phase_enter(PHASE_KEY_LOOKUP)
}

/// The phase ends first; then the key found, if any (see `signature`): the return slot after
/// the five arguments (`keyring, id_0, id_1, id_2, partial`, 5.18+), typed by the verifier as
/// the `struct key *` it is.
#[fexit(function = "find_asymmetric_key")]
pub fn modules_key_lookup_exit(ctx: FExitContext) -> u32 {
    key_lookup_end(ctx.arg(5))
}

/// The same before 5.18 (no `id_2`): the agent attaches the one this kernel's prototype fits.
#[fexit(function = "find_asymmetric_key")]
pub fn modules_key_lookup_exit_4(ctx: FExitContext) -> u32 {
    key_lookup_end(ctx.arg(4))
}

#[inline(always)]
fn key_lookup_end(key: usize) -> u32 {
    phase_exit(PHASE_KEY_LOOKUP);
    if let Some(load) = current_load() {
        signature::note_signer(load, key);
    }
    0
}

#[fentry(function = "public_key_verify_signature")]
pub fn modules_public_key_enter(_ctx: FEntryContext) -> u32 {
    phase_enter(PHASE_PUBLIC_KEY_VERIFY)
}

#[fexit(function = "public_key_verify_signature")]
pub fn modules_public_key_exit(_ctx: FExitContext) -> u32 {
    phase_exit(PHASE_PUBLIC_KEY_VERIFY)
}
