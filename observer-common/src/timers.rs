//! POSIX timers: what the timer programs count in the kernel and send through the ring buffer.

use crate::EventHeader;

/// Syscalls counted in `TIMER_SYSCALLS`; the index times [`crate::ERRNO_SLOTS`] plus the errno
/// slot is the counter's index.
pub const SYSCALL_TIMER_CREATE: u32 = 0;
pub const SYSCALL_TIMER_DELETE: u32 = 1;
pub const SYSCALL_TIMER_SETTIME: u32 = 2;
/// Only tracked in flight (restore-mode switches), never counted.
pub const SYSCALL_PRCTL: u32 = 3;
/// Number of counted syscalls.
pub const COUNTED_SYSCALLS: u32 = 3;
/// Size of the `TIMER_SYSCALLS` per-CPU array.
pub const SYSCALL_COUNTER_SLOTS: u32 = COUNTED_SYSCALLS * crate::ERRNO_SLOTS;

/// `prctl(PR_TIMER_CREATE_RESTORE_IDS, ...)` (Linux 6.15): with it ON, `timer_create` takes the
/// ID to create from `*created_timer_id`.
pub const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
pub const PR_TIMER_CREATE_RESTORE_IDS_OFF: u64 = 0;
pub const PR_TIMER_CREATE_RESTORE_IDS_ON: u64 = 1;

/// A timer syscall between its enter and exit tracepoints, keyed by thread id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlight {
    pub start_ns: u64,
    /// timer_create: the user pointer to the created ID; timer_delete/settime: the timer ID;
    /// prctl: the restore-mode argument.
    pub arg: u64,
    pub syscall: u32,
    /// timer_create: 1 when the process is in restore mode; timer_settime: 1 when it arms.
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
