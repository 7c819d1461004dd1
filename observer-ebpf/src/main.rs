//! The observer's eBPF programs: one module per hook family, sharing the ring buffer and the
//! lost-event counters defined here.
#![no_std]
#![no_main]

mod lockdown;
mod modules;
mod taint;
mod timers;

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_prandom_u32, bpf_ktime_get_boot_ns,
    },
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use observer_common::{EVENT_KIND_SLOTS, EventHeader, EventKind, LOG2_SUM_SLOT, log2_bucket};

/// Records for userspace. 1 MiB holds about 16,000 timer records: tens of milliseconds of a
/// timer storm, while the agent drains it continuously. Sized at load time
/// (`--events.buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Records the ring buffer had no room for, per [`EventKind`]: nothing is lost silently.
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_KIND_SLOTS, 0);

/// Adds one to slot `index` of a per-CPU counter array. Per-CPU slots need no atomics.
#[inline(always)]
fn increment(counters: &PerCpuArray<u64>, index: u32) {
    add(counters, index, 1);
}

#[inline(always)]
fn add(counters: &PerCpuArray<u64>, index: u32, value: u64) {
    if let Some(slot) = counters.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map and is this CPU's own slot.
        unsafe { *slot += value };
    }
}

/// Records a duration in a log2 histogram array (buckets, then the running sum).
#[inline(always)]
fn observe_ns(histogram: &PerCpuArray<u64>, ns: u64) {
    increment(histogram, log2_bucket(ns));
    add(histogram, LOG2_SUM_SLOT, ns);
}

/// Whether the agent writes the event stream: then records also carry the task's uid and
/// cgroup, and every record its command name. Frozen at load, so when it is off the verifier
/// drops those calls: the hot paths cost nothing more.
#[unsafe(no_mangle)]
static EVENT_DETAIL: Global<u32> = Global::new(0);

/// The header of a record made now by the current task.
#[inline(always)]
fn header(kind: EventKind) -> EventHeader {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (uid, cgroup_id) = if EVENT_DETAIL.load() != 0 {
        // SAFETY: helpers without preconditions.
        unsafe {
            (
                bpf_get_current_uid_gid() as u32,
                bpf_get_current_cgroup_id(),
            )
        }
    } else {
        (0, 0)
    };
    // Without the stream only a create's command name is used (creates per process); the
    // helper costs about 100 ns a record on the timer path.
    let comm = if EVENT_DETAIL.load() != 0 || kind as u32 == EventKind::TimerCreated as u32 {
        bpf_get_current_comm().unwrap_or_default()
    } else {
        [0; 16]
    };
    EventHeader {
        kind: kind as u32,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        uid,
        // SAFETY: a helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        cgroup_id,
        comm,
    }
}

/// Unread bytes past which a submission wakes the agent (set from the ring buffer's size).
/// Below it the agent is not woken per record (a wakeup costs more than the record); it drains
/// on its own short timer instead.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(64 * 1024);
/// One submission in this many asks how much is unread.
const WAKEUP_SAMPLE: u32 = 16;

/// Submission flags: wake the reader only when enough has piled up. How much has is asked on
/// one submission in [`WAKEUP_SAMPLE`] (at random): the answer reads the consumer's position,
/// a cache line the agent writes from another CPU, which cost about 120 ns a record when asked
/// every time. The wakeup then comes a few records later, far below the buffer's size.
#[inline(always)]
fn wakeup_flags() -> u64 {
    // SAFETY: a helper without preconditions.
    let sample = unsafe { bpf_get_prandom_u32() } % WAKEUP_SAMPLE == 0;
    if sample && EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BYTES.load() {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Sends `record` through the ring buffer, or counts it as lost.
#[inline(always)]
fn emit<T: 'static>(kind: EventKind, record: T) {
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(wakeup_flags());
        }
        None => increment(&EVENTS_LOST, kind as u32),
    }
}

/// Sends one taint record (`taint.rs` for taints outside a load, `modules.rs` for those a load
/// added, at its end).
#[inline(always)]
fn send_taint(flag: u32, module_source: u32, module: &[u8; observer_common::modules::NAME_LEN]) {
    emit(
        EventKind::Taint,
        observer_common::taint::TaintEvent {
            header: header(EventKind::Taint),
            flag,
            module_source,
            module: *module,
        },
    );
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
