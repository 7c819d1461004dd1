//! The module load in progress on each thread: what several families' programs share. The
//! module programs fill it from `load_module`'s entry to its exit; the taint and lockdown
//! programs mark it (a taint added, or a signature refusal made, inside a load is that load's).

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::map, maps::HashMap};
use observer_common::modules::ModuleLoad;

/// The starting value of a load attempt: all zero. A static, because the record is too large
/// for the 512-byte BPF stack together with everything else.
pub static ZERO_LOAD: ModuleLoad = unsafe { core::mem::zeroed() };

/// Load attempts in progress, by thread.
#[map]
static MODULE_LOADS: HashMap<u32, ModuleLoad> = HashMap::with_max_entries(1024, 0);

/// The current thread's ID (the kernel's pid).
#[inline(always)]
pub fn tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

/// Starts this thread's load attempt, all zero; false when the table is full.
#[inline(always)]
pub fn begin_load(tid: u32) -> bool {
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "copy from the static, not the stack"
    )]
    MODULE_LOADS.insert(tid, &ZERO_LOAD, 0).is_ok()
}

/// Ends this thread's load attempt.
#[inline(always)]
pub fn end_load(tid: u32) {
    let _ = MODULE_LOADS.remove(tid);
}

/// This thread's load in progress, if any.
#[inline(always)]
pub fn current_load() -> Option<&'static mut ModuleLoad> {
    // SAFETY: the pointer is the map's value for this thread, only touched by this thread.
    MODULE_LOADS.get_ptr_mut(tid()).map(|p| unsafe { &mut *p })
}
