//! IMA appraisal of a module's read: `finit_module` reads the file, and IMA's hook on that read
//! (`security_kernel_post_read_file` → `process_measurement`) hashes it and compares the digest
//! with its `security.ima` attribute, before `load_module` runs. Its time, phases and verdict go
//! into the thread's pending record, which `load_module` takes over; a read IMA refuses never
//! reaches `load_module`: its syscall's exit counts it and sends its record.
//!
//! `security_kernel_post_read_file` rather than `process_measurement`: the latter also runs for
//! every file opened, executed or mapped, and a trampoline there would tax every `open(2)`;
//! kernel reads of whole files are rare. IMA is the only LSM of mainline with this hook.

use aya_ebpf::{
    Global,
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use observer_common::modules::{
    IMA_READ_ID_ARG, ImaCheck, PendingLoad, SEEN_IMA_APPRAISE, SEEN_IMA_DATA_REFUSED,
    SEEN_IMA_DIGEST, SEEN_IMA_FILE_DIGEST, SEEN_IMA_READ, SEEN_IMA_SIGNATURE, SEEN_READ_REFUSED,
};

use super::{
    LOADING_MODULE, MODULE_PENDING, READING_MODULE, READING_MODULE_COMPRESSED, now, pending, tid,
};
use crate::since;

/// `struct ima_digest_data`'s `algo`, `length` and `digest` (0: unknown), from BTF.
#[unsafe(no_mangle)]
static IMA_DIGEST_ALGO_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static IMA_DIGEST_LENGTH_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static IMA_DIGEST_DATA_OFFSET: Global<u32> = Global::new(0);

/// This thread's pending record while IMA checks its module read.
#[inline(always)]
fn checking() -> Option<&'static mut PendingLoad> {
    // SAFETY: the map's value for this thread, only touched by this thread.
    let pending = MODULE_PENDING
        .get_ptr_mut(tid())
        .map(|p| unsafe { &mut *p })?;
    (pending.ima_start_ns != 0).then_some(pending)
}

#[fentry(function = "security_kernel_post_read_file")]
pub fn modules_ima_enter(ctx: FEntryContext) -> u32 {
    // Checked against the running kernel's BTF by the agent, which does not attach on a mismatch.
    let id: u32 = ctx.arg(IMA_READ_ID_ARG);
    if id != READING_MODULE.load() && id != READING_MODULE_COMPRESSED.load() {
        return 0;
    }
    if let Some(pending) = pending() {
        pending.ima_start_ns = now();
    }
    0
}

/// Called where a module's read begins (`security_kernel_read_file`): from 6.19 a compressed
/// module's read takes two calls of the hook, both added here: on the compressed bytes, where IMA
/// only hashes them, and after decompression, where it appraises with that hash.
#[inline(always)]
pub(super) fn start_read(pending: &mut PendingLoad) {
    pending.ima = ImaCheck::default();
    pending.seen &= !(SEEN_IMA_READ
        | SEEN_IMA_DIGEST
        | SEEN_IMA_APPRAISE
        | SEEN_IMA_SIGNATURE
        | SEEN_IMA_FILE_DIGEST);
}

#[fexit(function = "security_kernel_post_read_file")]
pub fn modules_ima_exit(ctx: FExitContext) -> u32 {
    let Some(pending) = checking() else { return 0 };
    pending.ima.check_ns += since(pending.ima_start_ns);
    pending.ima_start_ns = 0;
    // security_kernel_post_read_file(file, buf, size, id), as the agent checks in BTF.
    pending.ima.ret = crate::fexit::ret::<4>(&ctx) as i32;
    pending.seen |= SEEN_IMA_READ;
    // Refused: finit_module's exit counts it (`rejected_ima`) and sends its record.
    if pending.ima.ret != 0 {
        pending.seen |= SEEN_READ_REFUSED;
    }
    0
}

/// Ends a phase begun at `*start` (0: not begun inside this check), adding it to `*total`.
#[inline(always)]
fn phase_end(start: &mut u64, total: &mut u64) -> bool {
    if *start == 0 {
        return false;
    }
    *total += since(*start);
    *start = 0;
    true
}

/// Hashing the module's bytes, timed only inside IMA's check of a module read (IMA also hashes
/// executables and firmware).
#[fentry(function = "ima_calc_buffer_hash")]
pub fn modules_ima_digest_enter(_ctx: FEntryContext) -> u32 {
    if let Some(pending) = checking() {
        pending.ima_digest_start_ns = now();
    }
    0
}

#[fexit(function = "ima_calc_buffer_hash")]
pub fn modules_ima_digest_exit(_ctx: FExitContext) -> u32 {
    if let Some(pending) = checking()
        && phase_end(&mut pending.ima_digest_start_ns, &mut pending.ima.digest_ns)
    {
        pending.seen |= SEEN_IMA_DIGEST;
    }
    0
}

/// What IMA hashed the module's file to: `ima_calc_buffer_hash(buf, len, hash)` fills
/// `hash->digest` (`hash->length` bytes, algorithm `hash->algo`). The first hash of a read is
/// kept: from 6.19 a compressed module's second call of the hook appraises with the hash of the
/// file as stored. A program of its own: the digest is a flexible array, which only
/// `bpf_probe_read_kernel` reads (refused under lockdown=confidentiality).
#[fexit(function = "ima_calc_buffer_hash")]
pub fn modules_ima_digest_value(ctx: FExitContext) -> u32 {
    let Some(pending) = checking() else { return 0 };
    let ret: i64 = ctx.arg(3);
    let data_offset = IMA_DIGEST_DATA_OFFSET.load() as usize;
    let length_offset = IMA_DIGEST_LENGTH_OFFSET.load() as usize;
    let algo_offset = IMA_DIGEST_ALGO_OFFSET.load() as usize;
    if ret as i32 != 0 || pending.seen & SEEN_IMA_FILE_DIGEST != 0 || data_offset == 0 {
        return 0;
    }
    let hash: usize = ctx.arg(2);
    // SAFETY: `hash` is the BTF-typed `struct ima_digest_data *` argument, whose `algo` and
    // `length` are plain loads (offsets from BTF); the digest is read through the helper.
    unsafe {
        let length = core::ptr::read_volatile((hash + length_offset) as *const u8);
        let algo = core::ptr::read_volatile((hash + algo_offset) as *const u8);
        if !super::signature::read_digest(
            &mut pending.ima.digest,
            hash + data_offset,
            u32::from(length),
        ) {
            return 0;
        }
        pending.ima.digest_len = u32::from(length);
        pending.ima.algo = u32::from(algo);
    }
    pending.seen |= SEEN_IMA_FILE_DIGEST;
    0
}

/// Comparing the hash with `security.ima`; its return is the appraisal's verdict.
#[fentry(function = "ima_appraise_measurement")]
pub fn modules_ima_appraise_enter(_ctx: FEntryContext) -> u32 {
    if let Some(pending) = checking() {
        pending.ima_appraise_start_ns = now();
    }
    0
}

#[fexit(function = "ima_appraise_measurement")]
pub fn modules_ima_appraise_exit(ctx: FExitContext) -> u32 {
    if let Some(pending) = checking()
        && phase_end(
            &mut pending.ima_appraise_start_ns,
            &mut pending.ima.appraise_ns,
        )
    {
        // Seven arguments: trampolines take that many from 6.4, which have the helper (5.17+).
        pending.ima.status = ctx.ret::<i64>().unwrap_or(0) as i32;
        pending.seen |= SEEN_IMA_APPRAISE;
    }
    0
}

/// An imasig (`security.ima` type 3) is verified with a key; a digest never reaches this.
#[fentry(function = "integrity_digsig_verify")]
pub fn modules_ima_signature(_ctx: FEntryContext) -> u32 {
    if let Some(pending) = checking() {
        pending.seen |= SEEN_IMA_SIGNATURE;
    }
    0
}

/// `int ima_load_data(enum kernel_load_data_id id, bool contents)`: IMA's word on
/// init_module(2)'s bytes, which it refuses under an appraisal policy for modules.
#[fexit(function = "ima_load_data")]
pub fn modules_ima_load_data(ctx: FExitContext) -> u32 {
    let id: u32 = ctx.arg(0);
    let ret: i64 = ctx.arg(2);
    if id == LOADING_MODULE.load()
        && ret as i32 != 0
        && let Some(pending) = pending()
    {
        pending.seen |= SEEN_IMA_DATA_REFUSED;
    }
    0
}
