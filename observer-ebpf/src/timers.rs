//! POSIX timers. Counts and the create latency are aggregated here; only what userspace must
//! correlate (a created, armed or deleted ID; a timer owner's death) goes through the ring buffer.
//!
//! Every syscall is handled at its exit alone, where the return value and the arguments are both
//! at hand (fexit: the syscall's `pt_regs` argument; syscall tracepoints: the task's saved user
//! registers; raw tracepoints: the `pt_regs` argument): no per-thread state between entry and
//! exit, and one program run per call instead of two. Only timer_create's latency needs its
//! entry: a timestamp per thread, so it is measured only when asked for (`TIMER_LATENCY`).
//! Without per-timer records (`TIMER_PER_TIMER` off) a create+delete pair is counted and its ID
//! kept as a high-water mark in per-CPU arrays alone: no ring buffer, no hash map. The
//! programs, per mechanism, are in [`hooks`].

mod hooks;

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use observer_common::{
    ERRNO_SLOTS, EventKind, LOG2_SLOTS, errno_slot, syscall_slot,
    timers::{
        GONE_EXEC, GONE_EXIT, InFlight, PR_TIMER_CREATE_RESTORE_IDS,
        PR_TIMER_CREATE_RESTORE_IDS_OFF, PR_TIMER_CREATE_RESTORE_IDS_ON, SYSCALL_COUNTER_SLOTS,
        SYSCALL_TIMER_CREATE, SYSCALL_TIMER_DELETE, SYSCALL_TIMER_SETTIME, TimerEvent,
    },
};

use crate::{emit, header, increment, observe_ns};

/// Calls per syscall and result: `syscall * ERRNO_SLOTS + errno` (0 for success).
#[map]
static TIMER_SYSCALLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SYSCALL_COUNTER_SLOTS, 0);

/// timer_create calls made in restore mode, per result.
#[map]
static TIMER_RESTORE_CREATES: PerCpuArray<u64> = PerCpuArray::with_max_entries(ERRNO_SLOTS, 0);

/// timer_create latency, log2 nanoseconds.
#[map]
static TIMER_CREATE_LATENCY: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOG2_SLOTS, 0);

/// timer_create calls between entry and exit, by thread, for the latency. A plain
/// (preallocated) hash, cheaper than an LRU on this hot path; a thread that exits mid-call has
/// its entry removed at its exit.
#[map]
static TIMER_IN_FLIGHT: HashMap<u32, InFlight> = HashMap::with_max_entries(16384, 0);

/// The highest timer ID created, plus one (0: none yet), per CPU.
#[map]
static TIMER_ID_MAX: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Set once any process has turned restore mode on: until then timer_create skips the lookup.
#[map]
static TIMER_RESTORE_SEEN: Array<u32> = Array::with_max_entries(1, 0);

/// Processes that turned restore mode on (prctl 77), by tgid.
#[map]
static TIMER_RESTORE_MODE: LruHashMap<u32, u32> = LruHashMap::with_max_entries(4096, 0);

/// Processes that created a timer while watched, by tgid: their exit or exec must be reported.
#[map]
static TIMER_OWNERS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// `struct __kernel_itimerspec`: it_interval, then it_value (two 8-byte fields each).
const IT_VALUE_SEC: usize = 16;
const IT_VALUE_NSEC: usize = 24;

#[inline(always)]
fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

#[inline(always)]
fn count(syscall: u32, ret: i64) {
    increment(&TIMER_SYSCALLS, syscall_slot(syscall, ret));
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

/// timer_create's entry: when it started, for the latency.
#[inline(always)]
fn create_started() {
    let (_, tid) = current_ids();
    let call = InFlight {
        // SAFETY: a helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_ns() },
        arg: 0,
        syscall: SYSCALL_TIMER_CREATE,
        flag: 0,
    };
    // A full map only happens with 16k threads mid-syscall: that call goes untimed.
    if TIMER_IN_FLIGHT.insert(tid, call, 0).is_err() {
        crate::map_full(observer_common::TrackedMap::TimerInFlight);
    }
}

/// A thread that exits mid-call leaves no in-flight entry behind (only kept when timing).
#[inline(always)]
fn thread_gone(tid: u32) {
    if TIMER_LATENCY.load() != 0 {
        let _ = TIMER_IN_FLIGHT.remove(tid);
    }
}

/// True when the calling process is in restore mode (one array lookup until any process
/// has turned it on).
#[inline(always)]
fn in_restore_mode(tgid: u32) -> bool {
    if TIMER_RESTORE_SEEN.get(0).copied().unwrap_or(0) == 0 {
        return false;
    }
    // SAFETY: the value is read, not kept.
    unsafe { TIMER_RESTORE_MODE.get(tgid) }.is_some()
}

/// Raises this CPU's ID high-water mark to `id`.
#[inline(always)]
fn note_id(id: i32) {
    if let Some(max) = TIMER_ID_MAX.get_ptr_mut(0) {
        let seen = id as u64 + 1;
        // SAFETY: this CPU's own slot.
        unsafe {
            if seen > *max {
                *max = seen;
            }
        }
    }
}

/// timer_create returned `ret`; `id_ptr` is its third argument, where the kernel wrote the ID.
#[inline(always)]
fn create_done(ret: i64, id_ptr: u64) {
    count(SYSCALL_TIMER_CREATE, ret);
    let (tgid, tid) = current_ids();
    // SAFETY: the value is copied out before the entry is removed.
    if TIMER_LATENCY.load() != 0
        && let Some(call) = unsafe { TIMER_IN_FLIGHT.get(tid) }.copied()
    {
        let _ = TIMER_IN_FLIGHT.remove(tid);
        // An entry left by a create in flight when the programs attached is overwritten by
        // that thread's next create's entry; `since` keeps a bad start from becoming a huge
        // duration.
        observe_ns(&TIMER_CREATE_LATENCY, crate::since(call.start_ns));
    }
    let restore = in_restore_mode(tgid);
    if restore {
        increment(&TIMER_RESTORE_CREATES, errno_slot(ret));
    }
    if ret != 0 {
        return;
    }
    // SAFETY: a user pointer the kernel just wrote the new ID through; a fault is Err.
    // Under lockdown=confidentiality aya 0.14 rewrites this helper into the legacy
    // `bpf_probe_read` (its feature probe for `bpf_probe_read_kernel` fails there), which the
    // kernel refuses: the timer syscalls then go unwatched. `bpf_copy_from_user` would need a
    // sleepable fexit, which Debian's kernels refuse on syscalls (no FUNCTION_ERROR_INJECTION).
    let id = if TIMER_USER_READS.load() == 0 {
        -1
    } else {
        let Ok(id) = (unsafe { bpf_probe_read_user(id_ptr as *const i32) }) else {
            return;
        };
        id
    };
    if id >= 0 {
        note_id(id);
    }
    if TIMER_PER_TIMER.load() == 0 {
        return;
    }
    // SAFETY: only presence is checked; a lookup is cheaper than an update.
    if unsafe { TIMER_OWNERS.get(tgid) }.is_none() && TIMER_OWNERS.insert(tgid, 1, 0).is_err() {
        // Without an owner entry its exit would go unseen: say so rather than lie later.
        crate::map_full(observer_common::TrackedMap::TimerOwners);
    }
    send(EventKind::TimerCreated, id, u32::from(restore));
}

/// timer_delete(`id`) returned `ret`. Only a successful delete is sent: a failed one changed
/// nothing.
#[inline(always)]
fn delete_done(ret: i64, id: u64) {
    count(SYSCALL_TIMER_DELETE, ret);
    if ret == 0 && TIMER_PER_TIMER.load() != 0 {
        send(EventKind::TimerDeleted, id as i32, 0);
    }
}

/// timer_settime(`id`, _, `spec`) returned `ret`: a successful call with a non-zero it_value
/// arms the timer.
#[inline(always)]
fn settime_done(ret: i64, id: u64, spec: u64) {
    count(SYSCALL_TIMER_SETTIME, ret);
    if ret != 0 || TIMER_USER_READS.load() == 0 || TIMER_PER_TIMER.load() == 0 {
        return;
    }
    let spec = spec as usize;
    // SAFETY: user pointers the kernel has just read; a fault returns Err.
    let arms = unsafe {
        let sec = bpf_probe_read_user((spec + IT_VALUE_SEC) as *const i64).unwrap_or(0);
        let nsec = bpf_probe_read_user((spec + IT_VALUE_NSEC) as *const i64).unwrap_or(0);
        sec != 0 || nsec != 0
    };
    if arms {
        send(EventKind::TimerArmed, id as i32, 0);
    }
}

/// prctl(`option`, `mode`) returned `ret`: restore mode switched on or off.
#[inline(always)]
fn prctl_done(ret: i64, option: u64, mode: u64) {
    if option != PR_TIMER_CREATE_RESTORE_IDS || ret != 0 {
        return;
    }
    let (tgid, _) = current_ids();
    if mode == PR_TIMER_CREATE_RESTORE_IDS_ON {
        let _ = TIMER_RESTORE_MODE.insert(tgid, 1, 0);
        let _ = TIMER_RESTORE_SEEN.set(0, 1, 0);
    } else if mode == PR_TIMER_CREATE_RESTORE_IDS_OFF {
        let _ = TIMER_RESTORE_MODE.remove(tgid);
    }
}

/// The current process's timers are gone (`GONE_EXIT` or `GONE_EXEC`): report it if it had any.
#[inline(always)]
fn owner_gone(tgid: u32, reason: u32) {
    if TIMER_OWNERS.remove(tgid).is_ok() {
        if reason == GONE_EXIT {
            let _ = TIMER_RESTORE_MODE.remove(tgid);
        }
        send(EventKind::TimerOwnerGone, 0, reason);
    }
}

/// Where the agent says the first three syscall arguments are in `struct pt_regs` (from BTF).
/// 0 where user memory cannot be read: under lockdown=confidentiality aya 0.14 rewrites
/// `bpf_probe_read_user` into the legacy `bpf_probe_read` (its feature probe for
/// `bpf_probe_read_kernel` fails there), which lockdown refuses. Frozen at load, so with 0 the
/// verifier drops the reads and the programs still load: calls are counted and timed, creates
/// are sent without their ID, and nothing is armed.
#[unsafe(no_mangle)]
static TIMER_USER_READS: Global<u32> = Global::new(1);

/// Whether timer_create is timed (`--timers.latency`): its entry program attached, a hash-map
/// entry per call. Frozen at load: with 0 the verifier drops the lookup from the exit. Off by
/// default, as the flag is.
#[unsafe(no_mangle)]
static TIMER_LATENCY: Global<u32> = Global::new(0);

/// Whether creates, deletes and arming are sent as records for live timers, churn and
/// per-process creates (off with `--timers.counts-only`). Frozen at load.
#[unsafe(no_mangle)]
static TIMER_PER_TIMER: Global<u32> = Global::new(1);

#[unsafe(no_mangle)]
static PT_REGS_ARG_OFFSETS: Global<[u32; 3]> = Global::new([112, 104, 96]);

/// The three first syscall arguments from a `struct pt_regs` the verifier knows the type of
/// (fexit's argument, `bpf_task_pt_regs`): plain loads, checked against the type at load time,
/// no helper call (and none that `lockdown=confidentiality` refuses).
#[inline(always)]
fn typed_regs_args(regs: usize) -> [u64; 3] {
    // SAFETY: `regs` is a BTF-typed pointer; the offsets are frozen globals (constants to the
    // verifier), so each load is checked against the pt_regs layout.
    PT_REGS_ARG_OFFSETS
        .load()
        .map(|offset| unsafe { core::ptr::read_volatile((regs + offset as usize) as *const u64) })
}

const _: () = assert!(GONE_EXEC != GONE_EXIT);
