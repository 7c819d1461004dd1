//! Records and constants shared by the eBPF programs and the agent.
//!
//! Every record is `#[repr(C)]`, fixed size, with explicit padding and integers instead of `bool`
//! or `Option`, so both sides agree byte for byte. One module per hook family.
#![no_std]

pub mod lockdown;
pub mod modules;
pub mod taint;
pub mod timers;

/// Declares names the eBPF object holds (a family's globals, or its maps) as constants whose
/// value is their own name, in module `$module`, with `$module::ALL` listing them: one source
/// for [`Names`] and for the agent's code that sets or takes them.
#[macro_export]
macro_rules! object_names {
    ($(#[$meta:meta])* $module:ident { $($name:ident),* $(,)? }) => {
        $(#[$meta])*
        pub mod $module {
            $(pub const $name: &str = stringify!($name);)*
            /// Every one of them.
            pub const ALL: &[&str] = &[$($name),*];
        }
    };
}

/// What the agent looks up by name in the eBPF object for one family (or for all, [`SHARED_NAMES`]).
/// The eBPF side names programs, maps and globals by their Rust identifiers, which macros cannot
/// take from a constant; the agent's test parses the built object and checks it holds exactly the
/// union of these lists, so a rename on either side fails a test rather than a start.
#[derive(Debug)]
pub struct Names {
    pub programs: &'static [&'static str],
    pub maps: &'static [&'static str],
    pub globals: &'static [&'static str],
}

/// The ring buffer of the timer family's records: any unprivileged process can fill it.
pub const EVENTS_MAP: &str = "EVENTS";
/// The ring buffer of the security families' records (modules, taint, lockdown): no volume of
/// timer activity can take its room.
pub const SECURITY_EVENTS_MAP: &str = "SECURITY_EVENTS";
/// Records a ring buffer had no room for, by kind.
pub const EVENTS_LOST_MAP: &str = "EVENTS_LOST";
/// Inserts a full kernel table refused, by [`TrackedMap`].
pub const MAP_FULL_MAP: &str = "MAP_FULL";

/// What the running agent tells the programs, and the programs keep for the next agent: an array
/// of `u64` by [`agent_slot`]. A map, not a global, because pinned programs outlive the agent that
/// loaded them (`--pin`) and the next agent must be able to write it. Its name and layout stay
/// the same across builds: a new build reads an old build's slots to say how long nothing read
/// that build's counts.
pub const AGENT_MAP: &str = "OBSERVER_AGENT";

/// The slots of [`AGENT_MAP`].
pub mod agent_slot {
    /// The running agent's process ID (in the initial PID namespace): its own lockdown checks
    /// are not the host's decisions.
    pub const TGID: u32 = 0;
    /// When the agent last drained the rings, in nanoseconds since the Unix epoch.
    pub const LAST_READ_NS: u32 = 1;
    /// How many slots the map has.
    pub const SLOTS: u32 = 4;
}

/// Unread bytes past which a record wakes the agent.
pub const WAKEUP_BYTES_GLOBAL: &str = "WAKEUP_BYTES";

/// The ring buffer, its lost-record counters and its wakeup threshold, used by every family.
pub const SHARED_NAMES: Names = Names {
    programs: &[],
    maps: &[
        EVENTS_MAP,
        SECURITY_EVENTS_MAP,
        EVENTS_LOST_MAP,
        MAP_FULL_MAP,
        AGENT_MAP,
    ],
    globals: &[WAKEUP_BYTES_GLOBAL, EVENT_DETAIL_GLOBAL],
};

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Declares [`EventKind`] from one list: each kind's number, then its label; the enum, its
/// [`EventKind::ALL`], [`EventKind::from_u32`] and [`EventKind::label`] all come from it.
macro_rules! event_kinds {
    ($($kind:ident = $number:literal, $label:literal;)*) => {
        /// What a ring buffer record carries; the first field of every record's header.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum EventKind {
            $($kind = $number,)*
        }

        impl EventKind {
            /// Every kind, in the order of their numbers (also the index of their lost-event
            /// counter).
            pub const ALL: [Self; [$($number),*].len()] = [$(Self::$kind),*];

            pub const fn from_u32(value: u32) -> Option<Self> {
                match value {
                    $($number => Some(Self::$kind),)*
                    _ => None,
                }
            }

            /// The `kind` label of `observer_events_total` and `observer_events_lost_total`.
            pub const fn label(self) -> &'static str {
                match self {
                    $(Self::$kind => $label,)*
                }
            }
        }
    };
}

event_kinds! {
    TimerCreated = 1, "timer_created";
    TimerDeleted = 2, "timer_deleted";
    TimerArmed = 3, "timer_armed";
    TimerOwnerGone = 4, "timer_owner_gone";
    LockdownDecision = 5, "lockdown_decision";
    LockdownConsole = 6, "lockdown_console";
    ModuleLoad = 7, "module_load";
    Taint = 8, "taint";
}

impl EventKind {
    /// Whether its records go through [`SECURITY_EVENTS_MAP`] (else [`EVENTS_MAP`]).
    pub const fn is_security(self) -> bool {
        !matches!(
            self,
            Self::TimerCreated | Self::TimerDeleted | Self::TimerArmed | Self::TimerOwnerGone
        )
    }
}

/// A kernel table whose inserts can be refused because it is full: each has a slot in
/// [`MAP_FULL_MAP`], exported as `observer_kernel_map_full_total{map}` (a full table is not
/// ring-buffer loss, and says something else to an operator).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackedMap {
    ModuleLoads = 0,
    ModulePending = 1,
    TimerOwners = 2,
    TimerInFlight = 3,
    TaintEvents = 4,
    ModuleSigners = 5,
}

impl TrackedMap {
    pub const ALL: [Self; 6] = [
        Self::ModuleLoads,
        Self::ModulePending,
        Self::TimerOwners,
        Self::TimerInFlight,
        Self::TaintEvents,
        Self::ModuleSigners,
    ];

    /// The `map` label: the map's name in the object, in lower case.
    pub const fn label(self) -> &'static str {
        match self {
            Self::ModuleLoads => "module_loads",
            Self::ModulePending => "module_pending",
            Self::TimerOwners => "timer_owners",
            Self::TimerInFlight => "timer_in_flight",
            Self::TaintEvents => "taint_events",
            Self::ModuleSigners => "module_signers",
        }
    }
}

/// Size of the `MAP_FULL` per-CPU array.
pub const MAP_FULL_SLOTS: u32 = 8;

/// Size of the `EVENTS_LOST` per-CPU array: one slot per [`EventKind`] number, slot 0 unused.
pub const EVENT_KIND_SLOTS: u32 = 16;

/// The start of every ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// The task's real user id: only while the event stream is on ([`EVENT_DETAIL_GLOBAL`]),
    /// else 0.
    pub uid: u32,
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME nanoseconds (which, unlike CLOCK_MONOTONIC,
    /// counts suspend, so one offset turns it into wall-clock time for the whole run).
    pub ts_ns: u64,
    /// The task's cgroup v2 ID (the cgroup directory's inode number): only while the event
    /// stream is on, else 0.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// Set by the agent when it writes the event stream: the programs then also record what only
/// the stream needs (uid, cgroup), and cost nothing more otherwise (a frozen global: the
/// verifier drops the branch).
pub const EVENT_DETAIL_GLOBAL: &str = "EVENT_DETAIL";

/// Number of log2 buckets in an in-kernel latency histogram: bucket `i` counts durations `d` in
/// nanoseconds with `floor(log2(d)) == i` (bucket 0 also takes `d == 0`). 40 buckets reach ~18 min.
pub const LOG2_BUCKETS: u32 = 40;
/// Index of the running sum of nanoseconds in a histogram array, after the buckets.
pub const LOG2_SUM_SLOT: u32 = LOG2_BUCKETS;
/// Size of a histogram array: the buckets and the sum.
pub const LOG2_SLOTS: u32 = LOG2_BUCKETS + 1;

/// The log2 bucket a duration falls in. Branch-light so the verifier and the hot path both like it.
#[inline(always)]
pub const fn log2_bucket(ns: u64) -> u32 {
    if ns == 0 {
        return 0;
    }
    let b = 63 - ns.leading_zeros();
    if b >= LOG2_BUCKETS {
        LOG2_BUCKETS - 1
    } else {
        b
    }
}

/// Syscall results are counted per errno; errnos at or above this share the last slot.
pub const ERRNO_SLOTS: u32 = 160;

/// The counter slot of a syscall return value: 0 for success, else the errno, capped.
#[inline(always)]
pub const fn errno_slot(ret: i64) -> u32 {
    if ret >= 0 {
        0
    } else if -ret >= ERRNO_SLOTS as i64 {
        ERRNO_SLOTS - 1
    } else {
        (-ret) as u32
    }
}

/// The slot of a syscall's result in a counter array of `syscall * ERRNO_SLOTS + errno` (the
/// timer and module syscall counters): the programs count with this, the agent reads with
/// [`syscall_of_slot`].
#[inline(always)]
pub const fn syscall_slot(syscall: u32, ret: i64) -> u32 {
    syscall * ERRNO_SLOTS + errno_slot(ret)
}

/// The syscall index and errno slot of a [`syscall_slot`].
pub const fn syscall_of_slot(slot: u32) -> (u32, u32) {
    (slot / ERRNO_SLOTS, slot % ERRNO_SLOTS)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays with explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for super::EventHeader {}
    unsafe impl aya::Pod for super::timers::InFlight {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_buckets() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket(u64::MAX), LOG2_BUCKETS - 1);
    }

    #[test]
    fn errno_slots() {
        assert_eq!(errno_slot(0), 0);
        assert_eq!(errno_slot(7), 0);
        assert_eq!(errno_slot(-22), 22);
        assert_eq!(errno_slot(-4095), ERRNO_SLOTS - 1);
    }

    #[test]
    fn syscall_slots_round_trip() {
        for syscall in 0..4 {
            for ret in [0, 5, -1, -22, -4095] {
                assert_eq!(
                    syscall_of_slot(syscall_slot(syscall, ret)),
                    (syscall, errno_slot(ret))
                );
            }
        }
    }

    #[test]
    fn kinds_round_trip() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::from_u32(kind as u32), Some(kind));
            assert!((kind as u32) < EVENT_KIND_SLOTS);
        }
        assert_eq!(EventKind::from_u32(0), None);
    }

    #[test]
    fn tracked_maps_fit_and_kinds_split_by_ring() {
        for map in TrackedMap::ALL {
            assert!((map as u32) < MAP_FULL_SLOTS);
            assert_eq!(map.label(), map.label().to_ascii_lowercase());
        }
        let security = EventKind::ALL.map(EventKind::is_security);
        assert_eq!(
            security,
            [false, false, false, false, true, true, true, true],
            "timer kinds on the timer ring, the others on the security ring"
        );
    }

    #[test]
    fn header_layout() {
        assert_eq!(size_of::<EventHeader>(), 48);
    }
}
