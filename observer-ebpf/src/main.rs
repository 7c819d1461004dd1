//! The observer's eBPF programs: one module per hook family, sharing the two ring buffers (timer
//! records; security records) and the lost-record and full-table counters defined here.
#![no_std]
#![no_main]

mod fexit;
mod loads;
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
    maps::PerCpuHashMap,
    maps::{Array, PerCpuArray, RingBuf},
};
use observer_common::{
    EVENT_KIND_SLOTS, EventHeader, EventKind, LOG2_SUM_SLOT, MAP_FULL_SLOTS, TrackedMap,
    agent_slot, log2_bucket,
    modules::NAME_LEN,
    taint::{EVENT_KEYS, FLAG_SLOTS, TaintKey},
};

/// The timer family's records. 1 MiB holds about 16,000 of them: tens of milliseconds of a
/// timer storm, while the agent drains it continuously. Sized at load time
/// (`--events.buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// The security families' records (module loads, taints, lockdown denials): a ring of their
/// own, so that a timer storm, which any local user can start, cannot take their room. 256 KiB
/// holds about 500 module load records. Their verdicts are counted in maps besides: a record
/// lost here costs detail (names, phases, the event stream), never a count.
#[map]
static SECURITY_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

/// Records a ring buffer had no room for, per [`EventKind`]: nothing is lost silently.
#[map]
static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(EVENT_KIND_SLOTS, 0);

/// Inserts refused because a kernel table was full, per [`TrackedMap`].
#[map]
static MAP_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAP_FULL_SLOTS, 0);

/// What the running agent tells the programs ([`agent_slot`]), written by the agent: a map,
/// because pinned programs outlive the agent that loaded them.
#[map]
static OBSERVER_AGENT: Array<u64> = Array::with_max_entries(agent_slot::SLOTS, 0);

/// Whether the current task belongs to the running agent's process.
#[inline(always)]
fn in_agent() -> bool {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    OBSERVER_AGENT
        .get(agent_slot::TGID)
        .is_some_and(|agent| *agent == tgid)
}

/// Counts an insert that `map`, being full, refused.
#[inline(always)]
fn map_full(map: TrackedMap) {
    increment(&MAP_FULL, map as u32);
}

/// The ring buffer records of `kind` go through.
#[inline(always)]
fn ring(kind: EventKind) -> &'static RingBuf {
    if kind.is_security() {
        &SECURITY_EVENTS
    } else {
        &EVENTS
    }
}

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

/// Nanoseconds since `start` (a `bpf_ktime_get_ns` reading), or 0 when there is no start: an
/// entry program that never ran for this call (attached mid-call) leaves 0, which must not
/// become an uptime-long duration.
#[inline(always)]
fn since(start: u64) -> u64 {
    if start == 0 {
        return 0;
    }
    // SAFETY: a helper without preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }.saturating_sub(start)
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
fn wakeup_flags(ring: &RingBuf) -> u64 {
    // SAFETY: a helper without preconditions.
    let sample = unsafe { bpf_get_prandom_u32() } % WAKEUP_SAMPLE == 0;
    if sample && ring.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BYTES.load() {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Security records wake the agent at once: they are rare, and an alert waits on them.
#[inline(always)]
fn security_wakeup() -> u64 {
    u64::from(BPF_RB_FORCE_WAKEUP)
}

/// The submission flags for a record of `kind`.
#[inline(always)]
fn submit_flags(kind: EventKind) -> u64 {
    if kind.is_security() {
        security_wakeup()
    } else {
        wakeup_flags(&EVENTS)
    }
}

/// Sends `record` through its kind's ring buffer, or counts it as lost.
#[inline(always)]
fn emit<T: 'static>(kind: EventKind, record: T) {
    match ring(kind).reserve::<T>(0) {
        Some(mut entry) => {
            entry.write(record);
            entry.submit(submit_flags(kind));
        }
        None => increment(&EVENTS_LOST, kind as u32),
    }
}

// Taints are counted here, beside `send_taint`, because both the taint family (outside a load)
// and the module family (at a load's end, with the module's name) count them.

/// Taints the full [`TAINT_EVENTS`] table could not take, by bit: counted still, as
/// `module="other"`.
#[map]
static TAINT_UNATTRIBUTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(FLAG_SLOTS, 0);

/// Taints by flag and module. Per-CPU values: no atomics; a new key is inserted for all CPUs
/// at once (the others' values start at 0).
#[map]
static TAINT_EVENTS: PerCpuHashMap<TaintKey, u64> = PerCpuHashMap::with_max_entries(EVENT_KEYS, 0);

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Adds one to `key`'s count in a per-CPU hash of counters, inserting it when new; returns
/// false when the full table refused a new key (the caller counts it elsewhere).
#[inline(always)]
fn count_by_key<K>(counts: &PerCpuHashMap<K, u64>, key: &K) -> bool {
    for _ in 0..2 {
        if let Some(count) = counts.get_ptr_mut(key) {
            // SAFETY: this CPU's value of the entry.
            unsafe { *count += 1 };
            return true;
        }
        match counts.insert(key, 1, BPF_NOEXIST) {
            Ok(()) => return true,
            // Another CPU inserted it first: add to it.
            Err(err) if err == -EEXIST => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Counts a taint by flag and module; one the full table cannot take is counted by flag in
/// [`TAINT_UNATTRIBUTED`] (the agent's `module="other"`), and the full table in `MAP_FULL`.
#[inline(always)]
fn count_taint(flag: u32, module_source: u32, module: &[u8; NAME_LEN]) {
    let key = TaintKey {
        flag,
        module_source,
        module: *module,
    };
    if !count_by_key(&TAINT_EVENTS, &key) {
        map_full(TrackedMap::TaintEvents);
        increment(&TAINT_UNATTRIBUTED, flag & (FLAG_SLOTS - 1));
    }
}

/// Sends one taint record (`taint.rs` for taints outside a load, `modules.rs` for those a load
/// added, at its end).
#[inline(always)]
fn send_taint(flag: u32, module_source: u32, module: &[u8; NAME_LEN]) {
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
