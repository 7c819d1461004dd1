//! Where a load attempt begins and ends outside `load_module`: the security hooks on the
//! module's data (`security_kernel_read_file`, `security_kernel_load_data`), finit_module's
//! idempotent wait (6.6+), and the syscalls' exits, which count every call by result and give
//! their verdict to the attempts that never reached `load_module`.

use aya_ebpf::{
    macros::{fentry, fexit},
    programs::{FEntryContext, FExitContext},
};
use observer_common::{
    EventKind,
    modules::{
        EXIT_PROGRAMS, ModuleLoad, PendingLoad, SEEN_FROM_FILE, SEEN_IDEMPOTENT, SEEN_INIT_MODULE,
        SEEN_LOAD_DATA, SEEN_LOAD_MODULE, SEEN_LSM_REFUSED, SEEN_NO_LOAD, SYSCALL_FINIT_MODULE,
        SYSCALL_INIT_MODULE, early_outcome, early_reason, method, verdict_slot,
    },
    syscall_slot,
};

use super::{
    LOADING_MODULE, MODULE_PENDING, MODULE_SYSCALLS, MODULE_VERDICTS, READING_MODULE,
    READING_MODULE_COMPRESSED, ZERO_PENDING, current_load, pending, tid,
};
use crate::{header, increment, loads::ZERO_LOAD};

/// A security module refusing the read (LoadPin, SELinux, a BPF LSM program) ends the attempt
/// before `load_module`: its syscall's exit counts it as `rejected_lsm`.
#[fexit(function = "security_kernel_read_file")]
pub fn modules_read_file_exit(ctx: FExitContext) -> u32 {
    let id: u32 = ctx.arg(1);
    // `int security_kernel_read_file(struct file *, enum kernel_read_file_id, bool)`.
    let ret: i64 = ctx.arg(3);
    if ret as i32 != 0
        && (id == READING_MODULE.load() || id == READING_MODULE_COMPRESSED.load())
        && let Some(pending) = pending()
    {
        pending.seen |= SEEN_LSM_REFUSED;
    }
    0
}

/// init_module(2)'s copy of the module from user memory asks the security modules first
/// (`security_kernel_load_data(LOADING_MODULE)`): IMA refuses it under an appraisal policy for
/// modules (it cannot appraise bytes without a file), LoadPin always.
#[fexit(function = "security_kernel_load_data")]
pub fn modules_load_data_exit(ctx: FExitContext) -> u32 {
    let id: u32 = ctx.arg(0);
    // `int security_kernel_load_data(enum kernel_load_data_id, bool contents)`.
    let ret: i64 = ctx.arg(2);
    if id != LOADING_MODULE.load() {
        return 0;
    }
    if let Some(pending) = pending() {
        pending.seen |= SEEN_LOAD_DATA;
        if ret as i32 != 0 {
            pending.seen |= SEEN_LSM_REFUSED;
        }
    }
    0
}

/// finit_module past `may_init_module` (6.6+): the call either loads the file itself
/// (`init_module_from_file`) or waits for an identical load already in progress.
#[fentry(function = "idempotent_init_module")]
pub fn modules_idempotent(_ctx: FEntryContext) -> u32 {
    if let Some(pending) = pending() {
        pending.seen |= SEEN_IDEMPOTENT;
    }
    0
}

#[fentry(function = "init_module_from_file")]
pub fn modules_from_file(_ctx: FEntryContext) -> u32 {
    if let Some(pending) = pending() {
        pending.seen |= SEEN_FROM_FILE;
    }
    0
}

/// The record of an attempt that never reached `load_module`, from what its thread did before
/// (the file, IMA's check, decompression): `ret` is the syscall's result, `seen` where it ended.
#[inline(always)]
fn send_without_load(pending: &PendingLoad, ret: i32, seen: u32, outcome: u32, reason: u32) {
    let Some(mut entry) = crate::SECURITY_EVENTS.reserve::<ModuleLoad>(0) else {
        increment(&crate::EVENTS_LOST, EventKind::ModuleLoad as u32);
        return;
    };
    let load = entry.as_mut_ptr();
    // SAFETY: `load` is the reserved entry, written field by field after being zeroed from
    // the static (not via the stack: the record is larger than the BPF stack allows).
    unsafe {
        core::ptr::copy_nonoverlapping(&raw const ZERO_LOAD, load, 1);
        (*load).header = header(EventKind::ModuleLoad);
        (*load).file = pending.file;
        (*load).decompress_ns = pending.decompress_ns;
        (*load).ima = pending.ima;
        (*load).load_ret = ret;
        (*load).seen = seen;
        (*load).outcome = outcome;
        (*load).reason = reason;
        super::requests::note_request(&mut *load);
    }
    entry.submit(crate::security_wakeup());
}

/// A load syscall's end, whatever became of it: counted by result, and an attempt that never
/// reached `load_module` (refused by `may_init_module`, a security module or IMA; a duplicate
/// that waited on an identical load; a failed read or decompression) gets its verdict here, as
/// does a load whose `load_module` exit program the kernel skipped.
///
/// Two programs run this at each exit ([`EXIT_PROGRAMS`]), in an order the kernel chooses:
/// the first to run ends the attempt, the last removes the thread's entry. Each counts itself
/// in the entry; the first makes one where no hook before did.
#[inline(always)]
fn attempt_end(syscall: u32, ret: i64) -> u32 {
    // A load whose `load_module` exit did not run: ended here, with the syscall's result
    // (`load_module`'s own), so it cannot take a later taint either. First, from the one state
    // the program starts in: the verifier walks the load's end (its taint loop most of all)
    // once for each state that reaches it. The other exit program finds no load to end.
    let finished_here = match current_load() {
        Some(load) => {
            super::finish_load(load, ret as i32);
            true
        }
        None => false,
    };
    let tid = tid();
    match MODULE_PENDING.get_ptr_mut(tid) {
        Some(entry) => {
            // SAFETY: the map's value for this thread, only touched by this thread.
            let entry = unsafe { &mut *entry };
            entry.exits_run += 1;
            // The last to run: the first ended the attempt.
            if entry.exits_run >= EXIT_PROGRAMS {
                let _ = MODULE_PENDING.remove(tid);
                return 0;
            }
        }
        None => {
            // Marked as ended for the other exit program, which removes it.
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "copy from the static, not the stack"
            )]
            let _ = MODULE_PENDING.insert(tid, &ZERO_PENDING, 0);
            if let Some(made) = MODULE_PENDING.get_ptr_mut(tid) {
                // SAFETY: as above.
                unsafe { (*made).exits_run = 1 };
            }
        }
    }
    increment(&MODULE_SYSCALLS, syscall_slot(syscall, ret));
    if finished_here {
        return 0;
    }
    // SAFETY: as above.
    let pending = MODULE_PENDING
        .get_ptr(tid)
        .map_or(&ZERO_PENDING, |p| unsafe { &*p });
    if pending.seen & SEEN_LOAD_MODULE == 0 {
        let mut seen = pending.seen;
        if syscall == SYSCALL_INIT_MODULE {
            seen |= SEEN_INIT_MODULE;
        }
        let outcome = early_outcome(seen, ret as i32);
        let reason = early_reason(seen, outcome);
        increment(
            &MODULE_VERDICTS,
            verdict_slot(outcome, method(seen), reason),
        );
        send_without_load(pending, ret as i32, seen | SEEN_NO_LOAD, outcome, reason);
    }
    0
}

/// `long __x64_sys_finit_module(const struct pt_regs *)`: the return is the second slot.
#[fexit(function = "__x64_sys_finit_module")]
pub fn modules_finit_exit(ctx: FExitContext) -> u32 {
    attempt_end(SYSCALL_FINIT_MODULE, ctx.arg(1))
}

/// The same end as [`modules_finit_exit`], as a separate program (see [`attempt_end`]).
#[fexit(function = "__x64_sys_finit_module")]
pub fn modules_finit_exit_backup(ctx: FExitContext) -> u32 {
    attempt_end(SYSCALL_FINIT_MODULE, ctx.arg(1))
}

#[fexit(function = "__x64_sys_init_module")]
pub fn modules_init_exit(ctx: FExitContext) -> u32 {
    attempt_end(SYSCALL_INIT_MODULE, ctx.arg(1))
}

#[fexit(function = "__x64_sys_init_module")]
pub fn modules_init_exit_backup(ctx: FExitContext) -> u32 {
    attempt_end(SYSCALL_INIT_MODULE, ctx.arg(1))
}
