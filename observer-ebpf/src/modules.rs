//! Module loading: fentry/fexit on `load_module` brackets each attempt by thread; the integrity
//! checks inside it (`module_sig_check`, `mod_verify_sig`, the hash-based check where a kernel
//! has one) and `add_taint` add their time, results and bits to that attempt; `load_module`'s
//! exit sends it whole. Names come from `module:module_load` (loads that got that far) or from
//! the file `finit_module` read (refused loads).

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::bpf_probe_read_kernel_str_bytes,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf,
    },
    macros::{fentry, fexit, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{FEntryContext, FExitContext, TracePointContext},
};
use observer_common::{
    EventKind,
    modules::{
        ModuleLoad, NAME_LEN, SEEN_FILE, SEEN_HASH_CHECK, SEEN_NAME, SEEN_SIG_CHECK,
        SEEN_VERIFY_SIG, TaintEvent,
    },
};

use crate::{emit, header, increment};

/// `file.f_path.dentry` and `dentry.d_name.name` offsets from the running kernel's BTF.
#[unsafe(no_mangle)]
static FILE_DENTRY_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_NAME_OFFSET: Global<u32> = Global::new(0);
/// `enum kernel_read_file_id` values meaning a module (the second only where it exists).
#[unsafe(no_mangle)]
static READING_MODULE: Global<u32> = Global::new(2);
#[unsafe(no_mangle)]
static READING_MODULE_COMPRESSED: Global<u32> = Global::new(u32::MAX);

/// Load attempts in progress, by thread.
#[map]
static MODULE_LOADS: HashMap<u32, ModuleLoad> = HashMap::with_max_entries(1024, 0);

/// The module file a thread just read, waiting for its `load_module`.
#[map]
static MODULE_FILES: LruHashMap<u32, [u8; NAME_LEN]> = LruHashMap::with_max_entries(1024, 0);

/// Autoload requests (`request_module`).
#[map]
static MODULE_AUTOLOADS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn tid() -> u32 {
    bpf_get_current_pid_tgid() as u32
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// This thread's load in progress, if any.
#[inline(always)]
fn current_load() -> Option<&'static mut ModuleLoad> {
    // SAFETY: the pointer is the map's value for this thread, only touched by this thread.
    MODULE_LOADS.get_ptr_mut(tid()).map(|p| unsafe { &mut *p })
}

#[fentry(function = "security_kernel_read_file")]
pub fn modules_read_file(ctx: FEntryContext) -> u32 {
    let id: u32 = ctx.arg(1);
    if id != READING_MODULE.load() && id != READING_MODULE_COMPRESSED.load() {
        return 0;
    }
    let file: usize = ctx.arg(0);
    let mut name = [0u8; NAME_LEN];
    // SAFETY: kernel pointers read with the fault-tolerant helpers; offsets come from BTF.
    unsafe {
        let Ok(dentry) =
            bpf_probe_read_kernel((file + FILE_DENTRY_OFFSET.load() as usize) as *const usize)
        else {
            return 0;
        };
        let Ok(text) =
            bpf_probe_read_kernel((dentry + DENTRY_NAME_OFFSET.load() as usize) as *const usize)
        else {
            return 0;
        };
        if bpf_probe_read_kernel_str_bytes(text as *const u8, &mut name).is_err() {
            return 0;
        }
    }
    let _ = MODULE_FILES.insert(tid(), name, 0);
    0
}

#[fentry(function = "load_module")]
pub fn modules_load_enter(_ctx: FEntryContext) -> u32 {
    let tid = tid();
    // SAFETY: all-zero is a valid ModuleLoad (plain integers and arrays).
    let mut load: ModuleLoad = unsafe { core::mem::zeroed() };
    load.header = header(EventKind::ModuleLoad);
    load.start_ns = load.header.ts_ns;
    // SAFETY: the value is copied out before the entry is removed.
    if let Some(file) = unsafe { MODULE_FILES.get(tid) } {
        load.file = *file;
        load.seen |= SEEN_FILE;
        let _ = MODULE_FILES.remove(tid);
    }
    if MODULE_LOADS.insert(tid, load, 0).is_err() {
        increment(&crate::EVENTS_LOST, EventKind::ModuleLoad as u32);
    }
    0
}

#[fexit(function = "load_module")]
pub fn modules_load_exit(ctx: FExitContext) -> u32 {
    let ret = ctx.ret::<i64>().unwrap_or(0) as i32;
    let tid = tid();
    let Some(load) = current_load() else { return 0 };
    load.total_ns = now() - load.start_ns;
    load.load_ret = ret;
    emit(EventKind::ModuleLoad, *load);
    let _ = MODULE_LOADS.remove(tid);
    0
}

#[fentry(function = "module_sig_check")]
pub fn modules_sig_check_enter(_ctx: FEntryContext) -> u32 {
    if let Some(load) = current_load() {
        load.phase_start_ns = now();
    }
    0
}

#[fexit(function = "module_sig_check")]
pub fn modules_sig_check_exit(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        load.sig_check_ns += now() - load.phase_start_ns;
        load.sig_check_ret = ctx.ret::<i64>().unwrap_or(0) as i32;
        load.seen |= SEEN_SIG_CHECK;
    }
    0
}

/// Entry times nest: `mod_verify_sig` runs inside `module_sig_check`, so it keeps its own start
/// in the verify slot until its exit turns it into a duration.
#[fentry(function = "mod_verify_sig")]
pub fn modules_verify_enter(_ctx: FEntryContext) -> u32 {
    if let Some(load) = current_load() {
        load.verify_ns = now();
    }
    0
}

#[fexit(function = "mod_verify_sig")]
pub fn modules_verify_exit(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        load.verify_ns = now() - load.verify_ns;
        load.verify_ret = ctx.ret::<i64>().unwrap_or(0) as i32;
        load.seen |= SEEN_VERIFY_SIG;
    }
    0
}

/// The hash-based check: the agent attaches these to whichever of its names this kernel has.
#[fentry]
pub fn modules_hash_enter(_ctx: FEntryContext) -> u32 {
    if let Some(load) = current_load() {
        load.hash_ns = now();
    }
    0
}

#[fexit]
pub fn modules_hash_exit(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        load.hash_ns = now() - load.hash_ns;
        load.hash_ret = ctx.ret::<i64>().unwrap_or(0) as i32;
        load.seen |= SEEN_HASH_CHECK;
    }
    0
}

#[fentry(function = "add_taint")]
pub fn modules_add_taint(ctx: FEntryContext) -> u32 {
    let flag: u32 = ctx.arg(0);
    if let Some(load) = current_load() {
        load.taints |= 1u64 << (flag & 63);
    } else {
        emit(
            EventKind::Taint,
            TaintEvent {
                header: header(EventKind::Taint),
                flag,
                _pad: 0,
            },
        );
    }
    0
}

/// `__data_loc char[] name` of module:module_load, after `unsigned int taints` (stable since 2.6).
const MODULE_LOAD_NAME_LOC: usize = 12;

#[tracepoint]
pub fn modules_loaded_name(ctx: TracePointContext) -> u32 {
    let Some(load) = current_load() else { return 0 };
    // SAFETY: the offset is inside module:module_load's record.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(MODULE_LOAD_NAME_LOC) }) else {
        return 0;
    };
    let (offset, len) = ((loc & 0xffff) as usize, (loc >> 16) as usize);
    let len = if len > NAME_LEN { NAME_LEN } else { len };
    let text = (ctx.as_ptr() as usize + offset) as *const u8;
    // SAFETY: reads the record through the fault-tolerant helper into the map value.
    if unsafe { bpf_probe_read_kernel_buf(text, &mut load.name[..len]) }.is_ok() {
        load.seen |= SEEN_NAME;
    }
    0
}

#[fentry(function = "security_kernel_module_request")]
pub fn modules_request_fentry(_ctx: FEntryContext) -> u32 {
    increment(&MODULE_AUTOLOADS, 0);
    0
}

#[tracepoint]
pub fn modules_request_tracepoint(_ctx: TracePointContext) -> u32 {
    increment(&MODULE_AUTOLOADS, 0);
    0
}
