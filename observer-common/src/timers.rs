//! POSIX timers: what the timer programs count in the kernel and send through the ring buffer.

use crate::{EventHeader, Names};

/// The maps the agent reads: counts by syscall and result, restore-mode creates, create latency,
/// the ID high-water mark.
pub const SYSCALLS_MAP: &str = "TIMER_SYSCALLS";
pub const ID_MAX_MAP: &str = "TIMER_ID_MAX";
pub const RESTORE_CREATES_MAP: &str = "TIMER_RESTORE_CREATES";
pub const CREATE_LATENCY_MAP: &str = "TIMER_CREATE_LATENCY";

/// Creates being timed, by thread (only with `--timers.latency`).
pub const IN_FLIGHT_MAP: &str = "TIMER_IN_FLIGHT";
/// Live timers' owners (only with per-timer records).
pub const OWNERS_MAP: &str = "TIMER_OWNERS";

pub const NAMES: Names = Names {
    programs: &[
        "timers_create_fentry",
        "timers_create_fexit",
        "timers_delete_fexit",
        "timers_settime_fexit",
        "timers_prctl_fexit",
        "timers_itimers_exit",
        "timers_itimers_exec",
        "timers_create_enter",
        "timers_create_exit",
        "timers_delete_exit",
        "timers_settime_exit",
        "timers_prctl_exit",
        "timers_raw_enter",
        "timers_raw_exit",
        "timers_process_exit",
        "timers_process_exec",
    ],
    maps: &[
        SYSCALLS_MAP,
        RESTORE_CREATES_MAP,
        CREATE_LATENCY_MAP,
        ID_MAX_MAP,
        IN_FLIGHT_MAP,
        "TIMER_RESTORE_SEEN",
        "TIMER_RESTORE_MODE",
        OWNERS_MAP,
    ],
    globals: globals::ALL,
};

crate::object_names! {
    /// The timer programs' globals, set at load.
    globals {
        TASK_FLAGS_OFFSET,
        TASK_SIGNAL_OFFSET,
        SIGNAL_LIVE_OFFSET,
        SYS_TIMER_CREATE,
        SYS_TIMER_DELETE,
        SYS_TIMER_SETTIME,
        SYS_PRCTL,
        PT_REGS_ARG_OFFSETS,
        TIMER_USER_READS,
        TIMER_LATENCY,
        TIMER_PER_TIMER,
        PT_REGS_NR_OFFSET,
    }
}

/// Syscalls counted in `TIMER_SYSCALLS`; the index times [`crate::ERRNO_SLOTS`] plus the errno
/// slot is the counter's index.
pub const SYSCALL_TIMER_CREATE: u32 = 0;
pub const SYSCALL_TIMER_DELETE: u32 = 1;
pub const SYSCALL_TIMER_SETTIME: u32 = 2;
/// Number of counted syscalls.
pub const COUNTED_SYSCALLS: u32 = 3;
/// Size of the `TIMER_SYSCALLS` per-CPU array.
pub const SYSCALL_COUNTER_SLOTS: u32 = COUNTED_SYSCALLS * crate::ERRNO_SLOTS;

/// `prctl(PR_TIMER_CREATE_RESTORE_IDS, ...)` (Linux 6.15): with it ON, `timer_create` takes the
/// ID to create from `*created_timer_id`.
pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
pub const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
pub const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;

/// A timer_create call between its entry and exit (for its latency), keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub start_ns: u64,
    /// Unused: the exit reads the arguments itself.
    pub arg: u64,
    pub syscall: u32,
    /// Unused.
    pub flag: u32,
}

/// [`TimerEvent::detail`] of a `TimerOwnerGone` record.
pub const GONE_EXIT: u32 = 0;
pub const GONE_EXEC: u32 = 1;

/// One record for every timer kind: `TimerCreated` (detail: 1 if a restore-mode create),
/// `TimerDeleted`, `TimerArmed`, and `TimerOwnerGone` (the process exited or exec'd, destroying
/// its timers; detail: [`GONE_EXIT`] or [`GONE_EXEC`]; timer_id unused).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerEvent {
    pub header: EventHeader,
    pub timer_id: i32,
    pub detail: u32,
}

#[cfg(feature = "user")]
// SAFETY: plain `#[repr(C)]` integers; any bit pattern is valid.
unsafe impl aya::Pod for TimerEvent {}
