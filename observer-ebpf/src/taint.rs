//! Kernel taint: fentry on `add_taint`. Taints are counted in the kernel by flag and module: one
//! added outside a module load at once (module none), and sent; one added inside a load is kept
//! in the load's record and counted and sent when `load_module` returns (by `modules.rs`), so
//! it can name the module: the module's own name is known only late in the load.

use aya_ebpf::{
    macros::{fentry, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::FEntryContext,
};
use observer_common::{
    TrackedMap,
    modules::NAME_LEN,
    taint::{EVENT_KEYS, FLAG_SLOTS, MODULE_NONE, TaintKey},
};

use crate::{increment, map_full, modules::current_load, send_taint};

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

/// Counts a taint by flag and module; a full table is counted (the flag's own count still
/// holds the taint: the agent reports the difference as `module="other"`).
#[inline(always)]
pub fn count_by_module(flag: u32, module_source: u32, module: &[u8; NAME_LEN]) {
    let key = TaintKey {
        flag,
        module_source,
        module: *module,
    };
    for _ in 0..2 {
        if let Some(count) = TAINT_EVENTS.get_ptr_mut(&key) {
            // SAFETY: this CPU's value of the entry.
            unsafe { *count += 1 };
            return;
        }
        match TAINT_EVENTS.insert(&key, &1, BPF_NOEXIST) {
            Ok(()) => return,
            // Another CPU inserted it first: add to it.
            Err(err) if err == -EEXIST => continue,
            Err(_) => {
                map_full(TrackedMap::TaintEvents);
                increment(&TAINT_UNATTRIBUTED, flag & (FLAG_SLOTS - 1));
                return;
            }
        }
    }
}

#[fentry(function = "add_taint")]
pub fn taint_add_taint(ctx: FEntryContext) -> u32 {
    let flag: u32 = ctx.arg(0);
    if let Some(load) = current_load() {
        load.taints |= 1u64 << (flag & 63);
    } else {
        let none = [0; NAME_LEN];
        count_by_module(flag, MODULE_NONE, &none);
        send_taint(flag, MODULE_NONE, &none);
    }
    0
}
