//! The timer programs, by mechanism: fentry/fexit on the syscalls' kernel functions where the
//! kernel has trampolines (no cost to any other syscall), the syscall tracepoints, the raw
//! syscall tracepoints. Each calls the same `*_done` functions with the same values.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_task_btf, bpf_probe_read_kernel, bpf_task_pt_regs},
    macros::{fentry, fexit, raw_tracepoint, tracepoint},
    programs::{FEntryContext, FExitContext, RawTracePointContext, TracePointContext},
};
use observer_common::timers::{GONE_EXEC, GONE_EXIT};

use super::{
    PT_REGS_ARG_OFFSETS, create_done, create_started, current_ids, delete_done, owner_gone,
    prctl_done, settime_done, thread_gone, typed_regs_args,
};

// --- fentry/fexit on the x86_64 syscall functions (`long __x64_sys_NAME(const struct pt_regs *)`):
// the return value is the context's second slot, the arguments are in the pt_regs.

#[inline(always)]
fn fexit_args(ctx: &FExitContext) -> ([u64; 3], i64) {
    let regs: usize = ctx.arg(0);
    (typed_regs_args(regs), ctx.arg(1))
}

#[fentry(function = "__x64_sys_timer_create")]
pub fn timers_create_fentry(_ctx: FEntryContext) -> u32 {
    create_started();
    0
}

#[fexit(function = "__x64_sys_timer_create")]
pub fn timers_create_fexit(ctx: FExitContext) -> u32 {
    let (args, ret) = fexit_args(&ctx);
    create_done(ret, args[2]);
    0
}

#[fexit(function = "__x64_sys_timer_delete")]
pub fn timers_delete_fexit(ctx: FExitContext) -> u32 {
    let (args, ret) = fexit_args(&ctx);
    delete_done(ret, args[0]);
    0
}

#[fexit(function = "__x64_sys_timer_settime")]
pub fn timers_settime_fexit(ctx: FExitContext) -> u32 {
    let (args, ret) = fexit_args(&ctx);
    settime_done(ret, args[0], args[2]);
    0
}

#[fexit(function = "__x64_sys_prctl")]
pub fn timers_prctl_fexit(ctx: FExitContext) -> u32 {
    let (args, ret) = fexit_args(&ctx);
    prctl_done(ret, args[0], args[1]);
    0
}

/// `task_struct.flags` offset from BTF (set by the agent), and PF_EXITING.
#[unsafe(no_mangle)]
static TASK_FLAGS_OFFSET: Global<u32> = Global::new(0);
const PF_EXITING: u32 = 0x4;

/// True when `task` (BTF-typed) is exiting rather than exec'ing.
#[inline(always)]
fn exiting(task: usize) -> bool {
    // SAFETY: a BTF-typed pointer and an offset that is a constant to the verifier.
    let flags = unsafe {
        core::ptr::read_volatile((task + TASK_FLAGS_OFFSET.load() as usize) as *const u32)
    };
    flags & PF_EXITING != 0
}

/// `exit_itimers(struct task_struct *)` runs once per process when its last thread exits
/// (do_exit, group_dead) and at exec (begin_new_exec): exactly when its timers die, with no
/// cost for every other thread's exit. One program per reason, as the two fallbacks are.
#[fentry(function = "exit_itimers")]
pub fn timers_itimers_exit(ctx: FEntryContext) -> u32 {
    if exiting(ctx.arg(0)) {
        owner_gone(current_ids().0, GONE_EXIT);
    }
    0
}

#[fentry(function = "exit_itimers")]
pub fn timers_itimers_exec(ctx: FEntryContext) -> u32 {
    if !exiting(ctx.arg(0)) {
        owner_gone(current_ids().0, GONE_EXEC);
    }
    0
}

// --- The syscall tracepoints: exit only (the enter one for timer_create's latency); the
// arguments from the task's saved user registers, which the syscall leaves in place.

/// `ret` in a sys_exit record: 8 bytes of common fields, the syscall number, the value.
const RET: usize = 16;

#[inline(always)]
fn tracepoint_exit(ctx: &TracePointContext) -> Option<([u64; 3], i64)> {
    // SAFETY: RET is inside every sys_exit record; the helpers return the current task and its
    // user registers as BTF-typed pointers.
    unsafe {
        let ret = ctx.read_at::<i64>(RET).ok()?;
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as usize;
        Some((typed_regs_args(regs), ret))
    }
}

#[tracepoint]
pub fn timers_create_enter(_ctx: TracePointContext) -> u32 {
    create_started();
    0
}

#[tracepoint]
pub fn timers_create_exit(ctx: TracePointContext) -> u32 {
    if let Some((args, ret)) = tracepoint_exit(&ctx) {
        create_done(ret, args[2]);
    }
    0
}

#[tracepoint]
pub fn timers_delete_exit(ctx: TracePointContext) -> u32 {
    if let Some((args, ret)) = tracepoint_exit(&ctx) {
        delete_done(ret, args[0]);
    }
    0
}

#[tracepoint]
pub fn timers_settime_exit(ctx: TracePointContext) -> u32 {
    if let Some((args, ret)) = tracepoint_exit(&ctx) {
        settime_done(ret, args[0], args[2]);
    }
    0
}

#[tracepoint]
pub fn timers_prctl_exit(ctx: TracePointContext) -> u32 {
    if let Some((args, ret)) = tracepoint_exit(&ctx) {
        prctl_done(ret, args[0], args[1]);
    }
    0
}

// --- The raw syscall tracepoints: every syscall on the system, filtered by number, without the
// record the syscall tracepoints build.

/// This architecture's numbers for the watched syscalls, set by the agent.
#[unsafe(no_mangle)]
static SYS_TIMER_CREATE: Global<u64> = Global::new(222);
#[unsafe(no_mangle)]
static SYS_TIMER_DELETE: Global<u64> = Global::new(226);
#[unsafe(no_mangle)]
static SYS_TIMER_SETTIME: Global<u64> = Global::new(223);
#[unsafe(no_mangle)]
static SYS_PRCTL: Global<u64> = Global::new(157);
/// `struct pt_regs` offset of the syscall number (x86_64 default; the agent sets it from BTF).
#[unsafe(no_mangle)]
static PT_REGS_NR_OFFSET: Global<u32> = Global::new(120);

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn timers_raw_enter(ctx: RawTracePointContext) -> i32 {
    if ctx.arg::<u64>(1) == SYS_TIMER_CREATE.load() {
        create_started();
    }
    0
}

/// A kernel word at `address`, or 0 (raw tracepoint arguments are untyped).
#[inline(always)]
fn kernel_word(address: usize) -> u64 {
    // SAFETY: the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel(address as *const u64) }.unwrap_or(0)
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn timers_raw_exit(ctx: RawTracePointContext) -> i32 {
    let regs: usize = ctx.arg(0);
    let nr = kernel_word(regs + PT_REGS_NR_OFFSET.load() as usize);
    let ret: i64 = ctx.arg(1);
    let arg = |i: usize| kernel_word(regs + PT_REGS_ARG_OFFSETS.load()[i] as usize);
    if nr == SYS_TIMER_CREATE.load() {
        create_done(ret, arg(2));
    } else if nr == SYS_TIMER_DELETE.load() {
        delete_done(ret, arg(0));
    } else if nr == SYS_TIMER_SETTIME.load() {
        settime_done(ret, arg(0), arg(2));
    } else if nr == SYS_PRCTL.load() {
        prctl_done(ret, arg(0), arg(1));
    }
    0
}

// --- Owner exit and exec from the sched tracepoints (fallbacks of `exit_itimers`).

/// Offsets of `task_struct.signal` and `signal_struct.live` from the running kernel's BTF, set
/// by the agent; 0 when unknown (then a leader's exit stands for the whole process's).
#[unsafe(no_mangle)]
static TASK_SIGNAL_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIGNAL_LIVE_OFFSET: Global<u32> = Global::new(0);

/// True when the exiting task is the last of its process (timers die with the process, in
/// `exit_itimers`, not with each thread).
#[inline(always)]
fn process_dies(tgid: u32, tid: u32) -> bool {
    let (signal_offset, live_offset) = (TASK_SIGNAL_OFFSET.load(), SIGNAL_LIVE_OFFSET.load());
    if signal_offset == 0 {
        return tgid == tid;
    }
    // SAFETY: a BTF-typed task pointer; the offsets are constants to the verifier.
    unsafe {
        let task = bpf_get_current_task_btf() as usize;
        let signal = core::ptr::read_volatile((task + signal_offset as usize) as *const usize);
        // do_exit decrements signal->live before this tracepoint: 0 means the process is gone.
        core::ptr::read_volatile((signal + live_offset as usize) as *const i32) == 0
    }
}

#[tracepoint]
pub fn timers_process_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    thread_gone(tid);
    if process_dies(tgid, tid) {
        owner_gone(tgid, GONE_EXIT);
    }
    0
}

#[tracepoint]
pub fn timers_process_exec(_ctx: TracePointContext) -> u32 {
    owner_gone(current_ids().0, GONE_EXEC);
    0
}
