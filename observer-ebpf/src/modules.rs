//! Module loading: fentry/fexit on `load_module` brackets each attempt by thread; the integrity
//! checks inside it (`module_sig_check`, `mod_verify_sig`, the hash-based check where a kernel
//! has one) and `add_taint` add their time, results and bits to that attempt; `load_module`'s
//! exit sends it whole. Names come from `do_init_module` (or `module:module_load`) for loads
//! that got that far, or from the file `finit_module` read (refused loads).
//!
//! Kernel memory is read with plain loads through the BTF-typed pointers fentry/fexit programs
//! receive, at offsets from the running kernel's BTF (frozen read-only globals, so constants to
//! the verifier, which checks each load against the type). `bpf_probe_read_kernel` is refused
//! under `lockdown=confidentiality`, and a program calling it does not even load there.

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_buf},
    macros::{fentry, fexit, map, tracepoint},
    maps::{LruHashMap, PerCpuArray},
    programs::{FEntryContext, FExitContext, TracePointContext},
};
use observer_common::{
    EventKind, TrackedMap,
    modules::{
        ModuleLoad, NAME_LEN, OUTCOME_LOADED, PendingLoad, SEEN_DECOMPRESS, SEEN_FILE,
        SEEN_FILE_NOT_INLINE, SEEN_HASH_CHECK, SEEN_LOAD_MODULE, SEEN_NAME, SEEN_READ,
        SEEN_SIG_CHECK, SEEN_VERIFY_SIG, SYSCALL_SLOTS, VERDICT_SLOTS, WATCHED_NAMES, load_outcome,
        load_reason, method, verdict_slot,
    },
};

use observer_common::taint::{LOAD_TAINT_FLAGS, MODULE_FROM_FILE, MODULE_FROM_NAME, MODULE_NONE};

// A load's taint source is computed as a sum of these (see `emit_load_taints`).
const _: () = assert!(MODULE_NONE == 0);

pub(crate) use crate::loads::{current_load, tid};
use crate::{
    header, increment,
    loads::{begin_load, end_load},
    map_full, since,
};

mod attempts;
mod ima;
mod phases;
mod requests;
mod signature;

/// `file.f_path.dentry`, `dentry.d_name.len` and the dentry's inline name (`d_iname`, or
/// `d_shortname` from 6.14) with its size, from the running kernel's BTF (0: unknown).
#[unsafe(no_mangle)]
static FILE_DENTRY_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_NAME_LEN_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_INLINE_NAME_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DENTRY_INLINE_NAME_SIZE: Global<u32> = Global::new(0);
/// `module.name` and its size (MODULE_NAME_LEN), from BTF (0: unknown).
#[unsafe(no_mangle)]
static MODULE_NAME_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MODULE_NAME_SIZE: Global<u32> = Global::new(0);
/// `enum kernel_read_file_id` values meaning a module (the second only where it exists).
#[unsafe(no_mangle)]
static READING_MODULE: Global<u32> = Global::new(2);
#[unsafe(no_mangle)]
static READING_MODULE_COMPRESSED: Global<u32> = Global::new(u32::MAX);
/// `load_info.len` offset, from BTF.
#[unsafe(no_mangle)]
static LOAD_INFO_LEN_OFFSET: Global<u32> = Global::new(0);
/// `enum kernel_load_data_id`'s LOADING_MODULE (init_module's data), from BTF.
#[unsafe(no_mangle)]
static LOADING_MODULE: Global<u32> = Global::new(u32::MAX);

/// The starting value of a pending load: all zero (from a static, not the stack).
static ZERO_PENDING: PendingLoad = unsafe { core::mem::zeroed() };

/// What a thread did just before its `load_module` (read the file, decompressed it).
#[map]
static MODULE_PENDING: LruHashMap<u32, PendingLoad> = LruHashMap::with_max_entries(1024, 0);

/// Autoload requests (`request_module`).
#[map]
static MODULE_AUTOLOADS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Every load attempt's verdict, by outcome and method ([`verdict_slot`]): counted by the
/// program that decides it, so no lost record can hide one.
#[map]
static MODULE_VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICT_SLOTS, 0);

/// Modules whose load completed while a program watched, by name ([`WATCHED_MAP`]).
#[map]
static MODULE_WATCHED: LruHashMap<[u8; NAME_LEN], u64> =
    LruHashMap::with_max_entries(WATCHED_NAMES, 0);

/// init_module and finit_module calls by result: `syscall * ERRNO_SLOTS + errno`.
#[map]
static MODULE_SYSCALLS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SYSCALL_SLOTS, 0);

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// This thread's pending-load record, created if absent, emptied if an earlier attempt left
/// it (one of its exit programs skipped: see [`observer_common::modules::EXIT_PROGRAMS`]).
#[inline(always)]
fn pending() -> Option<&'static mut PendingLoad> {
    let tid = tid();
    if let Some(stale) = MODULE_PENDING.get_ptr_mut(tid)
        // SAFETY: the map's value for this thread, only touched by this thread.
        && unsafe { (*stale).exits_run } != 0
    {
        // SAFETY: as above; zeroed from the static, not via the stack.
        unsafe { core::ptr::copy_nonoverlapping(&raw const ZERO_PENDING, stale, 1) };
    }
    if MODULE_PENDING.get_ptr_mut(tid).is_none() {
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "copy from the static, not the stack"
        )]
        if MODULE_PENDING.insert(tid, &ZERO_PENDING, 0).is_err() {
            map_full(TrackedMap::ModulePending);
        }
    }
    // SAFETY: the map's value for this thread, only touched by this thread.
    MODULE_PENDING.get_ptr_mut(tid).map(|p| unsafe { &mut *p })
}

/// Copies the first `size` bytes (whole words, at most [`NAME_LEN`]) of the array at `offset` in
/// the kernel object `base` points to. Plain loads: `base` must be a BTF-typed pointer and
/// `offset`, `size` verifier constants; each step is written out, because a load at a variable
/// offset from such a pointer is refused.
#[inline(always)]
unsafe fn copy_inline(base: usize, offset: u32, size: u32, out: &mut [u8; NAME_LEN]) {
    let (src, dst) = (base + offset as usize, out.as_mut_ptr().cast::<u64>());
    macro_rules! word {
        ($i:literal) => {
            if ($i + 1) * 8 <= size {
                // SAFETY: inside the array (checked above and by the verifier) and `out`.
                unsafe {
                    dst.add($i)
                        .write_unaligned(core::ptr::read_volatile((src + $i * 8) as *const u64))
                };
            }
        };
    }
    word!(0);
    word!(1);
    word!(2);
    word!(3);
    word!(4);
    word!(5);
    word!(6);
    word!(7);
}

#[fentry(function = "security_kernel_read_file")]
pub fn modules_read_file(ctx: FEntryContext) -> u32 {
    let id: u32 = ctx.arg(1);
    if id != READING_MODULE.load() && id != READING_MODULE_COMPRESSED.load() {
        return 0;
    }
    let Some(pending) = pending() else { return 0 };
    // A new read of a module: IMA's check of it starts afresh (it may take two calls of its
    // hook, which add up: see `ima`).
    ima::start_read(pending);
    pending.seen |= SEEN_READ;
    let (dentry_offset, inline_size) = (FILE_DENTRY_OFFSET.load(), DENTRY_INLINE_NAME_SIZE.load());
    if dentry_offset == 0 || inline_size == 0 {
        return 0;
    }
    let file: usize = ctx.arg(0);
    // SAFETY: `file` is the BTF-typed `struct file *` argument; `f_path.dentry` is a `struct
    // dentry *`, so the verifier types the loaded pointer too; offsets from BTF.
    unsafe {
        let dentry = core::ptr::read_volatile((file + dentry_offset as usize) as *const usize);
        if dentry == 0 {
            return 0;
        }
        let len = core::ptr::read_volatile(
            (dentry + DENTRY_NAME_LEN_OFFSET.load() as usize) as *const u32,
        );
        // A name shorter than the inline array is kept in it (d_alloc); a longer one is behind
        // a `char *`, which only bpf_probe_read_kernel could follow.
        if len >= inline_size {
            pending.seen |= SEEN_FILE_NOT_INLINE;
            return 0;
        }
        copy_inline(
            dentry,
            DENTRY_INLINE_NAME_OFFSET.load(),
            inline_size,
            &mut pending.file,
        );
        pending.seen |= SEEN_FILE;
    }
    0
}

/// The module's own name, as `load_module` hands the module to its init.
#[fentry(function = "do_init_module")]
pub fn modules_init_name(ctx: FEntryContext) -> u32 {
    let size = MODULE_NAME_SIZE.load();
    let Some(load) = current_load() else { return 0 };
    if size == 0 {
        return 0;
    }
    let module: usize = ctx.arg(0);
    // SAFETY: the BTF-typed `struct module *` argument; `name` is a char array in it.
    unsafe { copy_inline(module, MODULE_NAME_OFFSET.load(), size, &mut load.name) };
    load.seen |= SEEN_NAME;
    0
}

/// Decompression runs before `load_module` (finit_module with MODULE_INIT_COMPRESSED_FILE):
/// timed into the pending record, which the load then takes over.
#[fentry(function = "module_decompress")]
pub fn modules_decompress_enter(_ctx: FEntryContext) -> u32 {
    if let Some(pending) = pending() {
        pending.decompress_start_ns = now();
    }
    0
}

#[fexit(function = "module_decompress")]
pub fn modules_decompress_exit(_ctx: FExitContext) -> u32 {
    if let Some(pending) = pending() {
        pending.decompress_ns += since(pending.decompress_start_ns);
        pending.seen |= SEEN_DECOMPRESS;
    }
    0
}

#[fentry(function = "load_module")]
pub fn modules_load_enter(ctx: FEntryContext) -> u32 {
    let tid = tid();
    if !begin_load(tid) {
        map_full(TrackedMap::ModuleLoads);
        aya_log_ebpf::warn!(
            &ctx,
            "module load by thread {} not followed: 1024 loads already in progress",
            tid
        );
        return 0;
    }
    let Some(load) = current_load() else { return 0 };
    load.header = header(EventKind::ModuleLoad);
    load.start_ns = now();
    // SAFETY: the map's value for this thread, only touched by this thread.
    if let Some(pending) = MODULE_PENDING.get_ptr_mut(tid)
        && unsafe { (*pending).exits_run } == 0
    {
        let taken = unsafe { &*pending };
        load.file = taken.file;
        load.decompress_ns = taken.decompress_ns;
        load.ima = taken.ima;
        load.seen |= taken.seen;
        // Kept, emptied, for the exit to mark: an update in place costs a fraction of the
        // insert a removed entry would need again (hash inserts were the module programs'
        // largest cost in the kernel's BPF statistics).
        // SAFETY: the entry is this thread's; zeroed from the static, not via the stack.
        unsafe { core::ptr::copy_nonoverlapping(&raw const ZERO_PENDING, pending, 1) };
    } else {
        // No hook before load_module made one: made here, for the exit to mark.
        let _ = pending();
    }
    requests::note_request(load);
    0
}

#[fexit(function = "load_module")]
pub fn modules_load_exit(ctx: FExitContext) -> u32 {
    // load_module(info, uargs, flags)
    let ret = crate::fexit::ret::<3>(&ctx) as i32;
    if let Some(load) = current_load() {
        finish_load(load, ret);
    }
    0
}

/// A load's end: its verdict counted, its record sent, the taints it added counted. At
/// `load_module`'s exit, or at its syscall's exit when the kernel skipped that program (its
/// `total_ns` then runs to the syscall's end, which returns `load_module`'s result).
#[inline(always)]
fn finish_load(load: &mut ModuleLoad, ret: i32) {
    let tid = tid();
    load.total_ns = since(load.start_ns);
    load.load_ret = ret;
    load.outcome = load_outcome(load.seen, ret, load.sig_check.ret);
    load.reason = load_reason(load);
    // The verdict, counted before anything that could fail.
    increment(
        &MODULE_VERDICTS,
        verdict_slot(load.outcome, method(load.seen), load.reason),
    );
    signature::count_signer(load);
    if load.outcome == OUTCOME_LOADED && load.seen & SEEN_NAME != 0 {
        // An LRU map: the oldest name makes room, so the insert does not fail for want of it.
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "from the map value, not a copy on the stack"
        )]
        let _ = MODULE_WATCHED.insert(&load.name, &load.start_ns, 0);
    }
    match crate::SECURITY_EVENTS.reserve::<ModuleLoad>(0) {
        Some(mut entry) => {
            // SAFETY: copies the map value into the reserved entry directly (not via the stack).
            unsafe {
                core::ptr::copy_nonoverlapping(load as *const ModuleLoad, entry.as_mut_ptr(), 1)
            };
            entry.submit(crate::security_wakeup());
        }
        None => increment(&crate::EVENTS_LOST, EventKind::ModuleLoad as u32),
    }
    // Tells the syscall's exit that this attempt is counted (the entry load_module's entry
    // left: a lookup, no insert).
    // SAFETY: the map's value for this thread, only touched by this thread.
    if let Some(pending) = MODULE_PENDING.get_ptr_mut(tid).map(|p| unsafe { &mut *p }) {
        pending.seen = SEEN_LOAD_MODULE;
    }
    // Last but the entry's removal: the verifier walks what follows the taint loop once for
    // each way out of it.
    emit_load_taints(load);
    end_load(tid);
}

#[fentry(function = "module_sig_check")]
pub fn modules_sig_check_enter(_ctx: FEntryContext) -> u32 {
    if let Some(load) = current_load() {
        load.marks.policy_entry_ns = now();
    }
    0
}

#[fexit(function = "module_sig_check")]
pub fn modules_sig_check_exit(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        load.sig_check.ns += since(load.marks.policy_entry_ns);
        // The policy step takes (info, flags) in every shape it is attached in (see the agent's
        // `shape`).
        load.sig_check.ret = crate::fexit::ret::<2>(&ctx) as i32;
        load.seen |= SEEN_SIG_CHECK;
    }
    0
}

/// Entry times nest: `mod_verify_sig` runs inside `module_sig_check`, so each keeps its own.
#[fentry(function = "mod_verify_sig")]
pub fn modules_verify_enter(_ctx: FEntryContext) -> u32 {
    let start = now();
    if let Some(load) = current_load() {
        load.marks.verify_entry_ns = now();
        trampoline_gap(load, start);
    }
    0
}

/// A second program on `mod_verify_sig`'s entry, so that the time between two programs of one
/// trampoline (one program's exit, the next one's entry) is measured once per load: the part of
/// each phase probe's cost no program can time from inside, taken out of `other` per call.
#[fentry(function = "mod_verify_sig")]
pub fn modules_verify_gap(_ctx: FEntryContext) -> u32 {
    let start = now();
    if let Some(load) = current_load() {
        trampoline_gap(load, start);
    }
    0
}

/// The first of the two programs to run leaves a mark as its last step; the second measures
/// from it to its own first step (`start`). Either may run first.
#[inline(always)]
fn trampoline_gap(load: &mut ModuleLoad, start: u64) {
    if load.marks.gap_mark_ns != 0 {
        load.gap_ns = start - load.marks.gap_mark_ns;
        load.marks.gap_mark_ns = 0;
    } else if load.gap_ns == 0 {
        load.marks.gap_mark_ns = now();
    }
}

/// The signature check's end: `mod_verify_sig(mod, info)`.
#[fexit(function = "mod_verify_sig")]
pub fn modules_verify_exit(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        verify_end(load, crate::fexit::ret::<2>(&ctx));
        // mod_verify_sig(mod, info) has cut the signature off info->len: the bytes hashed.
        let info: usize = ctx.arg(1);
        let offset = LOAD_INFO_LEN_OFFSET.load() as usize;
        if offset != 0 && info != 0 {
            // SAFETY: the BTF-typed `struct load_info *` argument; offset from BTF.
            load.verify.hashed_len =
                unsafe { core::ptr::read_volatile((info + offset) as *const u64) };
        }
    }
    0
}

/// The same where the hash-based patch set's v5 made the PKCS#7 check a function of its own,
/// `module_sig_check(const void *mod, size_t mod_len, const void *sig, size_t sig_len)`: a
/// program of its own, so that each reads its return slot at a constant offset (the agent
/// attaches the one this kernel's prototype fits).
#[fexit(function = "mod_verify_sig")]
pub fn modules_verify_exit_buffers(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        verify_end(load, crate::fexit::ret::<4>(&ctx));
        load.verify.hashed_len = ctx.arg(1);
    }
    0
}

#[inline(always)]
fn verify_end(load: &mut ModuleLoad, ret: i64) {
    load.verify.ns = since(load.marks.verify_entry_ns);
    load.verify.ret = ret as i32;
    load.seen |= SEEN_VERIFY_SIG;
}

/// The hash-based check: the agent attaches these to whichever of its names this kernel has.
#[fentry]
pub fn modules_hash_enter(_ctx: FEntryContext) -> u32 {
    if let Some(load) = current_load() {
        load.marks.hash_entry_ns = now();
    }
    0
}

#[fexit]
pub fn modules_hash_exit(ctx: FExitContext) -> u32 {
    if let Some(load) = current_load() {
        load.hash.ns = since(load.marks.hash_entry_ns);
        // Only patched 7.x kernels have it, with two to four arguments by version: the helper
        // is there (5.17+), and loads only where the agent attaches this program.
        load.hash.ret = ctx.ret::<i64>().unwrap_or(0) as i32;
        load.seen |= SEEN_HASH_CHECK;
    }
    0
}

/// `__data_loc char[] name` of module:module_load, after `unsigned int taints` (stable since 2.6).
const MODULE_LOAD_NAME_LOC: usize = 12;

#[tracepoint]
pub fn modules_loaded_name(ctx: TracePointContext) -> u32 {
    let Some(load) = current_load() else { return 0 };
    if read_data_loc(&ctx, MODULE_LOAD_NAME_LOC, &mut load.name) {
        load.seen |= SEEN_NAME;
    }
    0
}

/// Copies a tracepoint record's `__data_loc char[]` field (its location word at `loc_offset`;
/// at most [`NAME_LEN`] bytes, the NUL included) into `out`: true when read.
#[inline(always)]
fn read_data_loc(ctx: &TracePointContext, loc_offset: usize, out: &mut [u8; NAME_LEN]) -> bool {
    // SAFETY: the offset is inside the tracepoint's record.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(loc_offset) }) else {
        return false;
    };
    let (offset, len) = ((loc & 0xffff) as usize, (loc >> 16) as usize);
    let len = if len > NAME_LEN { NAME_LEN } else { len };
    let text = (ctx.as_ptr() as usize + offset) as *const u8;
    // SAFETY: reads the record through the fault-tolerant helper.
    unsafe { bpf_probe_read_kernel_buf(text, &mut out[..len]) }.is_ok()
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

/// Sends the taints a load added, each with the load's module name (known only late in the
/// load: see `taint.rs`). Called at the load's end, by the thread that loaded, after its record
/// was sent: the name it counts by may be the file's, copied over the record's own.
#[inline(always)]
fn emit_load_taints(load: &mut ModuleLoad) {
    // Where the name comes from, without a branch: the verifier would walk the loop below once
    // for each source a branch told apart (a different constant in a live register).
    let named = (load.seen & SEEN_NAME != 0) as u32;
    let from_file = (load.seen & SEEN_FILE != 0) as u32 & (named ^ 1);
    if from_file != 0 {
        load.name = load.file;
    }
    let source = named * MODULE_FROM_NAME + from_file * MODULE_FROM_FILE;
    let module = &load.name;
    let mut bits = load.taints;
    // One iteration per set bit; the bound is for the verifier, which walks every iteration
    // the bound allows at each agent start (`add_taint` keeps no higher bit in a load).
    for _ in 0..LOAD_TAINT_FLAGS {
        if bits == 0 {
            break;
        }
        let flag = bits.trailing_zeros();
        crate::count_taint(flag, source, module);
        crate::send_taint(flag, source, module);
        bits &= bits - 1;
    }
}
