//! POSIX timers, from the syscall tracepoints. Counts and the create latency are aggregated here;
//! only what userspace must correlate (a created, armed or deleted ID; a timer owner's death)
//! goes through the ring buffer, so the per-syscall cost stays a map update or two.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns},
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TracePointContext,
};
use observer_common::{
    ERRNO_SLOTS, EventKind, LOG2_SLOTS, errno_slot,
    timers::{
        GONE_EXEC, GONE_EXIT, InFlight, PR_TIMER_CREATE_RESTORE_IDS,
        PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON, SYSCALL_COUNTER_SLOTS,
        SYSCALL_PRCTL, SYSCALL_TIMER_CREATE, SYSCALL_TIMER_DELETE, SYSCALL_TIMER_SETTIME,
        TimerEvent,
    },
};

use crate::{emit, header, increment, observe_ns};

/// Offsets of `task_struct.signal` and `signal_struct.live` from the running kernel's BTF, set
/// by the agent; 0 when unknown (then a leader's exit stands for the whole process's).
#[unsafe(no_mangle)]
static TASK_SIGNAL_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIGNAL_LIVE_OFFSET: Global<u32> = Global::new(0);

/// Calls per syscall and result: `syscall * ERRNO_SLOTS + errno` (0 for success).
#[map]
static TIMER_SYSCALLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SYSCALL_COUNTER_SLOTS, 0);

/// timer_create calls made in restore mode, per result.
#[map]
static TIMER_RESTORE_CREATES: PerCpuArray<u64> = PerCpuArray::with_max_entries(ERRNO_SLOTS, 0);

/// timer_create latency, log2 nanoseconds.
#[map]
static TIMER_CREATE_LATENCY: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOG2_SLOTS, 0);

/// Syscalls between enter and exit, by thread. LRU: a thread killed mid-call leaves no leak.
#[map]
static TIMER_IN_FLIGHT: LruHashMap<u32, InFlight> = LruHashMap::with_max_entries(16384, 0);

/// Processes that turned restore mode on (prctl 77), by tgid.
#[map]
static TIMER_RESTORE_MODE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(4096, 0);

/// Processes that created a timer while watched, by tgid: their exit or exec must be reported.
#[map]
static TIMER_OWNERS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

// Offsets in the syscall tracepoints' records: 8 bytes of common fields, the syscall number,
// then each argument (or the return value) as 8 bytes.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;
/// `struct __kernel_itimerspec`: it_interval, then it_value (two 8-byte fields each).
const IT_VALUE_SEC: usize = 16;
const IT_VALUE_NSEC: usize = 24;

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
fn start(syscall: u32, arg: u64, flag: u32) {
    let (_, tid) = current_ids();
    let call = InFlight {
        // SAFETY: a helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        arg,
        syscall,
        flag,
    };
    // A full map only happens with 16k threads mid-syscall; the LRU evicts the oldest.
    let _ = TIMER_IN_FLIGHT.insert(tid, call, 0);
}

/// The in-flight record of this thread's `syscall`, removed from the map.
#[inline(always)]
fn finish(syscall: u32) -> Option<InFlight> {
    let (_, tid) = current_ids();
    // SAFETY: the value is copied out before the entry is removed.
    let call = *unsafe { TIMER_IN_FLIGHT.get(tid) }?;
    let _ = TIMER_IN_FLIGHT.remove(tid);
    (call.syscall == syscall).then_some(call)
}

#[inline(always)]
fn count(syscall: u32, ret: i64) {
    increment(&TIMER_SYSCALLS, syscall * ERRNO_SLOTS + errno_slot(ret));
}

#[inline(always)]
fn send(kind: EventKind, timer_id: i32, detail: u32) {
    emit(
        kind,
        TimerEvent {
            header: header(kind),
            timer_id,
            detail,
        },
    );
}

#[tracepoint]
pub fn timers_create_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: ARG2 is inside sys_enter_timer_create's record.
    let Ok(id_ptr) = (unsafe { ctx.read_at::<u64>(ARG2) }) else {
        return 0;
    };
    let (tgid, _) = current_ids();
    // SAFETY: the value is read, not kept.
    let restore = unsafe { TIMER_RESTORE_MODE.get(tgid) }
        .copied()
        .unwrap_or(0);
    start(SYSCALL_TIMER_CREATE, id_ptr, restore);
    0
}

#[tracepoint]
pub fn timers_create_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: RET is inside every sys_exit record.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    count(SYSCALL_TIMER_CREATE, ret);
    let Some(call) = finish(SYSCALL_TIMER_CREATE) else {
        return 0;
    };
    // SAFETY: a helper without preconditions.
    observe_ns(
        &TIMER_CREATE_LATENCY,
        unsafe { bpf_ktime_get_ns() } - call.start_ns,
    );
    if call.flag != 0 {
        increment(&TIMER_RESTORE_CREATES, errno_slot(ret));
    }
    if ret != 0 {
        return 0;
    }
    // SAFETY: a user pointer the kernel just wrote the new ID through; a fault returns Err.
    let Ok(id) = (unsafe { bpf_probe_read_user(call.arg as *const i32) }) else {
        return 0;
    };
    let (tgid, _) = current_ids();
    if TIMER_OWNERS.insert(tgid, 1, 0).is_err() {
        // Without an owner entry its exit would go unseen: say so rather than lie later.
        increment(&crate::EVENTS_LOST, EventKind::TimerOwnerGone as u32);
    }
    send(EventKind::TimerCreated, id, call.flag);
    0
}

#[tracepoint]
pub fn timers_delete_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: ARG0 is inside sys_enter_timer_delete's record.
    let Ok(id) = (unsafe { ctx.read_at::<u64>(ARG0) }) else {
        return 0;
    };
    start(SYSCALL_TIMER_DELETE, id, 0);
    0
}

#[tracepoint]
pub fn timers_delete_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: RET is inside every sys_exit record.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    count(SYSCALL_TIMER_DELETE, ret);
    if let Some(call) = finish(SYSCALL_TIMER_DELETE)
        && ret == 0
    {
        send(EventKind::TimerDeleted, call.arg as i32, 0);
    }
    0
}

#[tracepoint]
pub fn timers_settime_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: ARG0 and ARG2 are inside sys_enter_timer_settime's record.
    let (Ok(id), Ok(spec)) = (unsafe { (ctx.read_at::<u64>(ARG0), ctx.read_at::<u64>(ARG2)) })
    else {
        return 0;
    };
    // Arming means a non-zero it_value; an unreadable spec fails the syscall anyway.
    // SAFETY: user pointers; a fault returns Err.
    let arms = unsafe {
        let sec = bpf_probe_read_user((spec as usize + IT_VALUE_SEC) as *const i64).unwrap_or(0);
        let nsec = bpf_probe_read_user((spec as usize + IT_VALUE_NSEC) as *const i64).unwrap_or(0);
        sec != 0 || nsec != 0
    };
    start(SYSCALL_TIMER_SETTIME, id, arms as u32);
    0
}

#[tracepoint]
pub fn timers_settime_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: RET is inside every sys_exit record.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    count(SYSCALL_TIMER_SETTIME, ret);
    if let Some(call) = finish(SYSCALL_TIMER_SETTIME)
        && ret == 0
        && call.flag != 0
    {
        send(EventKind::TimerArmed, call.arg as i32, 0);
    }
    0
}

#[tracepoint]
pub fn timers_prctl_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: ARG0 and ARG1 are inside sys_enter_prctl's record.
    let (Ok(option), Ok(mode)) = (unsafe { (ctx.read_at::<u64>(ARG0), ctx.read_at::<u64>(ARG1)) })
    else {
        return 0;
    };
    if option == PR_TIMER_CREATE_RESTORE_IDS
        && (mode == PR_TIMER_CREATE_RESTORE_IDS_ON || mode == PR_TIMER_CREATE_RESTORE_IDS_OFF)
    {
        start(SYSCALL_PRCTL, mode, 0);
    }
    0
}

#[tracepoint]
pub fn timers_prctl_exit(ctx: TracePointContext) -> u32 {
    // SAFETY: RET is inside every sys_exit record.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return 0;
    };
    if let Some(call) = finish(SYSCALL_PRCTL)
        && ret == 0
    {
        let (tgid, _) = current_ids();
        if call.arg == PR_TIMER_CREATE_RESTORE_IDS_ON {
            let _ = TIMER_RESTORE_MODE.insert(tgid, 1, 0);
        } else {
            let _ = TIMER_RESTORE_MODE.remove(tgid);
        }
    }
    0
}

/// True when the exiting task is the last of its process (timers die with the process, in
/// `exit_itimers`, not with each thread).
#[inline(always)]
fn process_dies(tgid: u32, tid: u32) -> bool {
    let (signal_offset, live_offset) = (TASK_SIGNAL_OFFSET.load(), SIGNAL_LIVE_OFFSET.load());
    if signal_offset == 0 {
        return tgid == tid;
    }
    // SAFETY: kernel pointers read with the fault-tolerant helper; offsets come from BTF.
    unsafe {
        let task = bpf_get_current_task() as usize;
        let Ok(signal) = bpf_probe_read_kernel((task + signal_offset as usize) as *const usize)
        else {
            return tgid == tid;
        };
        // do_exit decrements signal->live before this tracepoint: 0 means the process is gone.
        bpf_probe_read_kernel((signal + live_offset as usize) as *const i32)
            .map_or(tgid == tid, |live| live == 0)
    }
}

#[tracepoint]
pub fn timers_process_exit(_ctx: TracePointContext) -> u32 {
    let (tgid, tid) = current_ids();
    // SAFETY: only presence is checked.
    if unsafe { TIMER_OWNERS.get(tgid) }.is_none() || !process_dies(tgid, tid) {
        return 0;
    }
    let _ = TIMER_OWNERS.remove(tgid);
    let _ = TIMER_RESTORE_MODE.remove(tgid);
    send(EventKind::TimerOwnerGone, 0, GONE_EXIT);
    0
}

#[tracepoint]
pub fn timers_process_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, _) = current_ids();
    if TIMER_OWNERS.remove(tgid).is_ok() {
        send(EventKind::TimerOwnerGone, 0, GONE_EXEC);
    }
    0
}
