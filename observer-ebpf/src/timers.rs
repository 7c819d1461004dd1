//! POSIX timers, from the syscall tracepoints. Counts and the create latency are aggregated here;
//! only what userspace must correlate (a created, armed or deleted ID; a timer owner's death)
//! goes through the ring buffer, so the per-syscall cost stays a map update or two.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns},
    helpers::{bpf_probe_read_kernel, bpf_probe_read_user},
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, TracePointContext},
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

/// Syscalls between enter and exit, by thread. A plain (preallocated) hash, cheaper than an LRU
/// on this hot path; a thread that exits mid-call has its entry removed at its exit.
#[map]
static TIMER_IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);

/// Set once any process has turned restore mode on: until then timer_create skips the lookup.
#[map]
static TIMER_RESTORE_SEEN: Array<u32> = Array::with_max_entries(1, 0);

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
    // A full map only happens with 16k threads mid-syscall: that call goes untimed.
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

/// What a timer syscall's entry records, whichever mechanism saw it: `args` are the first three
/// syscall arguments.
#[inline(always)]
fn on_enter(syscall: u32, args: [u64; 3]) {
    match syscall {
        SYSCALL_TIMER_CREATE => {
            let restore = if TIMER_RESTORE_SEEN.get(0).copied().unwrap_or(0) == 0 {
                0
            } else {
                let (tgid, _) = current_ids();
                // SAFETY: the value is read, not kept.
                unsafe { TIMER_RESTORE_MODE.get(tgid) }
                    .copied()
                    .unwrap_or(0)
            };
            start(SYSCALL_TIMER_CREATE, args[2], restore);
        }
        // Sent at entry, with the ID, so the exit needs no state: a delete that then fails
        // names a timer userspace does not track (IDs are per process), and changes nothing.
        SYSCALL_TIMER_DELETE => send(EventKind::TimerDeleted, args[0] as i32, 0),
        SYSCALL_TIMER_SETTIME => {
            // Arming means a non-zero it_value; an unreadable spec fails the syscall anyway.
            let spec = args[2] as usize;
            // SAFETY: user pointers; a fault returns Err.
            let arms = unsafe {
                let sec = bpf_probe_read_user((spec + IT_VALUE_SEC) as *const i64).unwrap_or(0);
                let nsec = bpf_probe_read_user((spec + IT_VALUE_NSEC) as *const i64).unwrap_or(0);
                sec != 0 || nsec != 0
            };
            start(SYSCALL_TIMER_SETTIME, args[0], arms as u32);
        }
        _ => {
            let (option, mode) = (args[0], args[1]);
            if option == PR_TIMER_CREATE_RESTORE_IDS
                && (mode == PR_TIMER_CREATE_RESTORE_IDS_ON
                    || mode == PR_TIMER_CREATE_RESTORE_IDS_OFF)
            {
                start(SYSCALL_PRCTL, mode, 0);
            }
        }
    }
}

/// What a timer syscall's return records.
#[inline(always)]
fn on_exit(syscall: u32, ret: i64) {
    match syscall {
        SYSCALL_TIMER_CREATE => {
            count(SYSCALL_TIMER_CREATE, ret);
            let Some(call) = finish(SYSCALL_TIMER_CREATE) else {
                return;
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
                return;
            }
            // SAFETY: a user pointer the kernel just wrote the new ID through; a fault is Err.
            let Ok(id) = (unsafe { bpf_probe_read_user(call.arg as *const i32) }) else {
                return;
            };
            let (tgid, _) = current_ids();
            // SAFETY: only presence is checked; a lookup is cheaper than an update.
            if unsafe { TIMER_OWNERS.get(tgid) }.is_none()
                && TIMER_OWNERS.insert(tgid, 1, 0).is_err()
            {
                // Without an owner entry its exit would go unseen: say so rather than lie later.
                increment(&crate::EVENTS_LOST, EventKind::TimerOwnerGone as u32);
            }
            send(EventKind::TimerCreated, id, call.flag);
        }
        SYSCALL_TIMER_DELETE => count(SYSCALL_TIMER_DELETE, ret),
        SYSCALL_TIMER_SETTIME => {
            count(SYSCALL_TIMER_SETTIME, ret);
            if let Some(call) = finish(SYSCALL_TIMER_SETTIME)
                && ret == 0
                && call.flag != 0
            {
                send(EventKind::TimerArmed, call.arg as i32, 0);
            }
        }
        _ => {
            if let Some(call) = finish(SYSCALL_PRCTL)
                && ret == 0
            {
                let (tgid, _) = current_ids();
                if call.arg == PR_TIMER_CREATE_RESTORE_IDS_ON {
                    let _ = TIMER_RESTORE_MODE.insert(tgid, 1, 0);
                    let _ = TIMER_RESTORE_SEEN.set(0, 1, 0);
                } else {
                    let _ = TIMER_RESTORE_MODE.remove(tgid);
                }
            }
        }
    }
}

/// The syscall tracepoints: one program per syscall and direction, arguments from the record.
#[inline(always)]
fn tracepoint_enter(ctx: &TracePointContext, syscall: u32) -> u32 {
    // SAFETY: the argument slots are inside every sys_enter record (unused ones read as 0).
    let args = unsafe { [ARG0, ARG1, ARG2].map(|offset| ctx.read_at::<u64>(offset).unwrap_or(0)) };
    on_enter(syscall, args);
    0
}

#[inline(always)]
fn tracepoint_exit(ctx: &TracePointContext, syscall: u32) -> u32 {
    // SAFETY: RET is inside every sys_exit record.
    if let Ok(ret) = unsafe { ctx.read_at::<i64>(RET) } {
        on_exit(syscall, ret);
    }
    0
}

#[tracepoint]
pub fn timers_create_enter(ctx: TracePointContext) -> u32 {
    tracepoint_enter(&ctx, SYSCALL_TIMER_CREATE)
}

#[tracepoint]
pub fn timers_create_exit(ctx: TracePointContext) -> u32 {
    tracepoint_exit(&ctx, SYSCALL_TIMER_CREATE)
}

#[tracepoint]
pub fn timers_delete_enter(ctx: TracePointContext) -> u32 {
    tracepoint_enter(&ctx, SYSCALL_TIMER_DELETE)
}

#[tracepoint]
pub fn timers_delete_exit(ctx: TracePointContext) -> u32 {
    tracepoint_exit(&ctx, SYSCALL_TIMER_DELETE)
}

#[tracepoint]
pub fn timers_settime_enter(ctx: TracePointContext) -> u32 {
    tracepoint_enter(&ctx, SYSCALL_TIMER_SETTIME)
}

#[tracepoint]
pub fn timers_settime_exit(ctx: TracePointContext) -> u32 {
    tracepoint_exit(&ctx, SYSCALL_TIMER_SETTIME)
}

#[tracepoint]
pub fn timers_prctl_enter(ctx: TracePointContext) -> u32 {
    tracepoint_enter(&ctx, SYSCALL_PRCTL)
}

#[tracepoint]
pub fn timers_prctl_exit(ctx: TracePointContext) -> u32 {
    tracepoint_exit(&ctx, SYSCALL_PRCTL)
}

/// This architecture's numbers for the watched syscalls, set by the agent.
#[unsafe(no_mangle)]
static SYS_TIMER_CREATE: Global<u64> = Global::new(222);
#[unsafe(no_mangle)]
static SYS_TIMER_DELETE: Global<u64> = Global::new(226);
#[unsafe(no_mangle)]
static SYS_TIMER_SETTIME: Global<u64> = Global::new(223);
#[unsafe(no_mangle)]
static SYS_PRCTL: Global<u64> = Global::new(157);
/// `struct pt_regs` offsets of the first three syscall arguments and of the syscall number
/// (x86_64 defaults; the agent sets them from BTF).
#[unsafe(no_mangle)]
static PT_REGS_ARG_OFFSETS: Global<[u32; 3]> = Global::new([112, 104, 96]);
#[unsafe(no_mangle)]
static PT_REGS_NR_OFFSET: Global<u32> = Global::new(120);

#[inline(always)]
fn watched(nr: u64) -> Option<u32> {
    if nr == SYS_TIMER_CREATE.load() {
        Some(SYSCALL_TIMER_CREATE)
    } else if nr == SYS_TIMER_DELETE.load() {
        Some(SYSCALL_TIMER_DELETE)
    } else if nr == SYS_TIMER_SETTIME.load() {
        Some(SYSCALL_TIMER_SETTIME)
    } else if nr == SYS_PRCTL.load() {
        Some(SYSCALL_PRCTL)
    } else {
        None
    }
}

/// The raw syscall tracepoints: two programs for every syscall on the system, filtering by
/// number, without the per-event record the syscall tracepoints build.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn timers_raw_enter(ctx: RawTracePointContext) -> i32 {
    let nr: u64 = ctx.arg(1);
    let Some(syscall) = watched(nr) else { return 0 };
    let regs: usize = ctx.arg(0);
    let offsets = PT_REGS_ARG_OFFSETS.load();
    // SAFETY: the saved user registers, read with the fault-tolerant helper.
    let args = offsets.map(|offset| {
        unsafe { bpf_probe_read_kernel((regs + offset as usize) as *const u64) }.unwrap_or(0)
    });
    on_enter(syscall, args);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn timers_raw_exit(ctx: RawTracePointContext) -> i32 {
    let regs: usize = ctx.arg(0);
    // SAFETY: the saved user registers, read with the fault-tolerant helper.
    let Ok(nr) = (unsafe {
        bpf_probe_read_kernel((regs + PT_REGS_NR_OFFSET.load() as usize) as *const u64)
    }) else {
        return 0;
    };
    let Some(syscall) = watched(nr) else { return 0 };
    on_exit(syscall, ctx.arg::<i64>(1));
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
    // A thread that dies mid-syscall leaves no entry behind.
    let _ = TIMER_IN_FLIGHT.remove(tid);
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
