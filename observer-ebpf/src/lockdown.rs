//! Lockdown decisions. Preferred: fexit on `security_locked_down`, which sees the reason and the
//! verdict of every check (a BPF LSM program would not: the lockdown LSM runs first and the hook
//! chain stops at its denial). Fallback: the "Lockdown: ..." lines on `printk:console`, which
//! the kernel prints for denials only, rate-limited.

use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::bpf_probe_read_kernel_buf,
    macros::{fexit, map, tracepoint},
    maps::PerCpuArray,
    programs::{FExitContext, TracePointContext},
};
use observer_common::{
    EventKind,
    lockdown::{
        CONSOLE_TEXT_LEN, DECISION_SLOTS, LockdownConsole, LockdownDecision, decision_slot,
    },
    modules::SEEN_LOCKDOWN_REFUSED,
};

use crate::{EVENTS_LOST, SECURITY_EVENTS, emit, header, increment};

/// `enum lockdown_reason`'s LOCKDOWN_MODULE_SIGNATURE, from BTF.
#[unsafe(no_mangle)]
static LOCKDOWN_MODULE_SIGNATURE: Global<u32> = Global::new(1);

/// Checks the agent's own process made (see [`crate::in_agent`]).
#[map]
static LOCKDOWN_OWN_CHECKS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Checks per reason and verdict ([`decision_slot`]).
#[map]
static LOCKDOWN_DECISIONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECISION_SLOTS, 0);

/// Denials seen on the console (the fallback) whose record the ring buffer had no room for:
/// still counted, as reason `unknown` (only the record names the reason).
#[map]
static LOCKDOWN_CONSOLE_UNRECORDED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[fexit(function = "security_locked_down")]
pub fn lockdown_security_locked_down(ctx: FExitContext) -> u32 {
    // The agent's own work is not a decision about the host: as each of its programs loads,
    // the verifier asks whether it may read kernel memory (LOCKDOWN_BPF_READ, dozens at start).
    if crate::in_agent() {
        increment(&LOCKDOWN_OWN_CHECKS, 0);
        return 0;
    }
    let reason: u32 = ctx.arg(0);
    // security_locked_down(what)
    let ret = crate::fexit::ret::<1>(&ctx) as i32;
    let denied = (ret != 0) as u32;
    increment(&LOCKDOWN_DECISIONS, decision_slot(reason, denied));
    if denied != 0 {
        // Inside a module load: what tells its -EPERM apart where the policy step that
        // returns this verdict cannot be traced (inlined before 5.19).
        if reason == LOCKDOWN_MODULE_SIGNATURE.load()
            && let Some(load) = crate::loads::current_load()
        {
            load.seen |= SEEN_LOCKDOWN_REFUSED;
        }
        let kind = EventKind::LockdownDecision;
        emit(
            kind,
            LockdownDecision {
                header: header(kind),
                reason,
                denied,
            },
        );
    }
    0
}

const PREFIX: &[u8; 10] = b"Lockdown: ";
/// `__data_loc char[] msg` of printk:console: offset in the low 16 bits, length in the high.
const MSG_LOC: usize = 8;

#[tracepoint]
pub fn lockdown_console(ctx: TracePointContext) -> u32 {
    // SAFETY: MSG_LOC is inside printk:console's record.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(MSG_LOC) }) else {
        return 0;
    };
    let (offset, len) = ((loc & 0xffff) as usize, (loc >> 16) as usize);
    let msg = (ctx.as_ptr() as usize + offset) as *const u8;
    let mut prefix = [0u8; 10];
    // SAFETY: reads the record through the fault-tolerant helper.
    if unsafe { bpf_probe_read_kernel_buf(msg, &mut prefix) }.is_err() || &prefix != PREFIX {
        return 0;
    }
    let kind = EventKind::LockdownConsole;
    let Some(mut entry) = SECURITY_EVENTS.reserve::<LockdownConsole>(0) else {
        increment(&EVENTS_LOST, kind as u32);
        increment(&LOCKDOWN_CONSOLE_UNRECORDED, 0);
        return 0;
    };
    let record = entry.as_mut_ptr();
    let len = if len > CONSOLE_TEXT_LEN {
        CONSOLE_TEXT_LEN
    } else {
        len
    };
    // SAFETY: `record` is the reserved entry; the text is copied in place, not on the stack.
    unsafe {
        (*record).header = header(kind);
        (*record).len = len as u32;
        (*record)._pad = 0;
        let text = &mut *core::ptr::addr_of_mut!((*record).text);
        if bpf_probe_read_kernel_buf(msg, &mut text[..len]).is_err() {
            (*record).len = 0;
        }
    }
    entry.submit(crate::security_wakeup());
    0
}
