//! Who asked for an autoload. `request_module` runs in the thread that needs a module (a
//! socket(2) of a family not loaded yet, a mount of an unknown file system type) and has the
//! kernel start modprobe as a user-mode helper: a process of its own, whose parent is a kernel
//! worker, so nothing about the loading process names the one that asked. The request is
//! followed through the helper's own structure instead:
//! `module:module_request` (the asking thread, once every check that could refuse the request
//! has passed) → `call_usermodehelper_exec(sub_info, wait)` (the same thread: the request moves
//! to its `subprocess_info`) → `call_usermodehelper_exec_async(sub_info)` (the helper's new
//! process, before it becomes modprobe: the request moves to its pid) → every load that process
//! makes (modprobe loads the alias's module and its dependencies). A helper waited for
//! (`request_module`, not `_nowait`) is forgotten when it has exited.
//!
//! The kernel runs at most 50 modprobe helpers at once (`kmod_concurrent_max`), so maps of 1024
//! entries lose no request in flight however many requests a user makes; LRU maps, so that one
//! left behind (a helper that failed to start) never takes room for good.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fentry, fexit, map, tracepoint},
    maps::LruHashMap,
    programs::{FEntryContext, FExitContext, TracePointContext},
};
use observer_common::{
    EventKind,
    modules::{ModuleLoad, ModuleRequest, NAME_LEN, SEEN_REQUESTED},
};

use super::tid;
use crate::header;

/// Requests by the thread that asked, until it starts the helper.
#[map]
static MODULE_REQUESTS: LruHashMap<u32, ModuleRequest> = LruHashMap::with_max_entries(1024, 0);
/// Requests by the helper's `struct subprocess_info`, while the helper starts.
#[map]
static MODULE_REQUEST_HELPERS: LruHashMap<u64, ModuleRequest> =
    LruHashMap::with_max_entries(1024, 0);
/// Requests by the helper's process id, for the loads it makes.
#[map]
static MODULE_REQUEST_TASKS: LruHashMap<u32, ModuleRequest> = LruHashMap::with_max_entries(1024, 0);

/// `__data_loc char[] name` of module:module_request, after `unsigned long ip` and `bool wait`
/// (stable since 2.6.33).
const MODULE_REQUEST_NAME_LOC: usize = 20;
/// `enum umh_wait`'s UMH_WAIT_PROC: the caller waits until the helper has exited.
const UMH_WAIT_PROC: u32 = 2;

#[inline(always)]
fn pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[tracepoint]
pub fn modules_request_asked(ctx: TracePointContext) -> u32 {
    let mut request = ModuleRequest {
        requester: header(EventKind::ModuleLoad),
        helper_pid: 0,
        _pad: 0,
        alias: [0; NAME_LEN],
    };
    if !super::read_data_loc(&ctx, MODULE_REQUEST_NAME_LOC, &mut request.alias) {
        return 0;
    }
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "the value by reference, not copied again on the stack"
    )]
    let _ = MODULE_REQUESTS.insert(tid(), &request, 0);
    0
}

/// `int call_usermodehelper_exec(struct subprocess_info *sub_info, int wait)`, in the asking
/// thread: a request of this thread's goes with the helper it starts.
#[fentry(function = "call_usermodehelper_exec")]
pub fn modules_request_handoff(ctx: FEntryContext) -> u32 {
    let tid = tid();
    // SAFETY: the map's value, read before the entry is removed.
    let Some(request) = (unsafe { MODULE_REQUESTS.get(tid) }) else {
        return 0;
    };
    let sub_info: u64 = ctx.arg(0);
    let _ = MODULE_REQUEST_HELPERS.insert(sub_info, request, 0);
    let _ = MODULE_REQUESTS.remove(tid);
    0
}

/// `int call_usermodehelper_exec_async(void *data)`: the helper's process, just started, with
/// its `subprocess_info`.
#[fentry(function = "call_usermodehelper_exec_async")]
pub fn modules_request_adopt(ctx: FEntryContext) -> u32 {
    let sub_info: u64 = ctx.arg(0);
    let Some(request) = MODULE_REQUEST_HELPERS.get_ptr_mut(sub_info) else {
        return 0;
    };
    let pid = pid();
    // SAFETY: the map's value; the helper starts once per request.
    unsafe {
        (*request).helper_pid = pid;
        #[expect(
            clippy::needless_borrows_for_generic_args,
            reason = "copy from the other map's value, not via the stack"
        )]
        let _ = MODULE_REQUEST_TASKS.insert(pid, &*request, 0);
    }
    0
}

/// The asking thread gets its answer: a helper it waited for has exited (its status, not a
/// negative error: a caller killed while waiting leaves the helper running, and its loads
/// still to come).
#[fexit(function = "call_usermodehelper_exec")]
pub fn modules_request_done(ctx: FExitContext) -> u32 {
    let sub_info: u64 = ctx.arg(0);
    let wait: u32 = ctx.arg(1);
    let ret: i64 = ctx.arg(2);
    // SAFETY: the map's value, read before the entry is removed.
    let Some(helper) = (unsafe { MODULE_REQUEST_HELPERS.get(sub_info) }).map(|r| r.helper_pid)
    else {
        return 0;
    };
    if wait & UMH_WAIT_PROC != 0 && ret as i32 >= 0 && helper != 0 {
        let _ = MODULE_REQUEST_TASKS.remove(helper);
    }
    let _ = MODULE_REQUEST_HELPERS.remove(sub_info);
    0
}

/// Marks a load made by an autoload's helper with the request (from the entry of
/// `load_module`, or where an attempt ends before it).
#[inline(always)]
pub fn note_request(load: &mut ModuleLoad) {
    // SAFETY: the map's value, copied whole into the record (not via the stack).
    if let Some(request) = unsafe { MODULE_REQUEST_TASKS.get(pid()) } {
        unsafe { core::ptr::copy_nonoverlapping(request, &mut load.request, 1) };
        load.seen |= SEEN_REQUESTED;
    }
}
