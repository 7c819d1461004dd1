//! POSIX timers: syscall counts, the ID high-water mark and (with `--timers.latency`) create
//! latency from kernel maps; live timers, short-lived churn and per-process creates from ring
//! buffer records (not with `--timers.counts-only`).
//!
//! Why latency is opt-in and the counts-only mode exists (the kernel's BPF statistics on this
//! project's benchmark host, per create+delete pair, see BENCHMARKS.md): timing timer_create
//! takes an entry program and a hash-map entry per call, about 30% of the programs' cost, for a
//! syscall that takes microseconds; the per-timer records take about half of it and carry what
//! only this family reports (live timers, churn, creates per process), so they stay on by
//! default. Without both, the programs do what a minimal bpftrace script for the same counts
//! does, in per-CPU arrays only.

mod state;

use std::time::Duration;

use aya::maps::{MapData, PerCpuArray};
use observer_common::{
    ERRNO_SLOTS, EventKind, LOG2_SLOTS,
    timers::{
        COUNTED_SYSCALLS, CREATE_LATENCY_MAP, ID_MAX_MAP, IN_FLIGHT_MAP, NAMES, OWNERS_MAP,
        RESTORE_CREATES_MAP, SYSCALL_COUNTER_SLOTS, SYSCALLS_MAP, TimerEvent, globals,
    },
};

use self::state::{TimerChange, TimerSettings, TimerState};
use crate::{
    family::{Context, Event, HookFamily, LoadSettings, RecordKind, Registration},
    kernel::KernelBtf,
    maps::{self, Maps},
    metrics::{Family, Log2Histogram, add_syscall_results, result_label},
    plan::{Hook, KernelView, fentry, fexit, raw_tracepoint, tracepoint},
    record::read_record,
};

pub const FAMILY: Registration = Registration {
    name: "timers",
    about: "POSIX timer syscalls, live timers, ID churn and restore-mode creates",
    names: &NAMES,
    flags: <Flags as clap::Args>::augment_args,
    kept_pinned: false,
    build: TimerFamily::build,
};

// The timer family's own flags (a plain comment: clap would take a doc comment here for the
// command's description).
#[derive(clap::Args, Debug)]
pub struct Flags {
    /// Which timer syscall hooks to prefer; the others are the fallbacks, in this order:
    /// fentry/fexit, syscall tracepoints, raw syscall tracepoints.
    #[arg(long = "timers.hook", value_enum, default_value = "fentry")]
    pub hook: SyscallHook,
    /// A timer deleted this soon after creation, never armed, counts as short-lived churn.
    #[arg(long = "timers.short-lived", default_value = "10ms", value_parser = crate::parse::parse_duration, conflicts_with = "counts_only")]
    pub short_lived: Duration,
    /// How many process names get their own series in the per-process timer metric: the first
    /// this many names seen keep theirs for the agent's life; later names count as "other".
    #[arg(long = "timers.top-processes", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000), conflicts_with = "counts_only")]
    pub top_processes: u16,
    /// Also time timer_create (a histogram): one more program per create, on its entry.
    #[arg(long = "timers.latency", conflicts_with = "counts_only")]
    pub latency: bool,
    /// Count calls by result and keep the ID high-water mark only: no live timers, churn or
    /// per-process creates, and no ring buffer record per call.
    #[arg(long = "timers.counts-only")]
    pub counts_only: bool,
}

const RECORDS: &[RecordKind] = &[
    RecordKind::of::<TimerEvent>(EventKind::TimerCreated),
    RecordKind::of::<TimerEvent>(EventKind::TimerDeleted),
    RecordKind::of::<TimerEvent>(EventKind::TimerArmed),
    RecordKind::of::<TimerEvent>(EventKind::TimerOwnerGone),
];

pub struct TimerFamily {
    hook: SyscallHook,
    latency: bool,
    per_timer: bool,
    /// `exit_itimers` takes the task (6.0+; a `struct signal_struct *` before), as its
    /// programs read it.
    itimers_take_task: bool,
    state: TimerState,
    maps: Option<TimerMaps>,
}

impl TimerFamily {
    fn build(context: &Context<'_>) -> anyhow::Result<Box<dyn HookFamily>> {
        let flags = <Flags as clap::FromArgMatches>::from_arg_matches(context.matches)?;
        let mut family = Self::with_flags(&flags);
        family.itimers_take_task = itimers_take_task(context.kernel.btf.as_ref().ok());
        Ok(Box::new(family))
    }

    pub fn with_flags(flags: &Flags) -> Self {
        Self {
            hook: flags.hook,
            latency: flags.latency,
            per_timer: !flags.counts_only,
            itimers_take_task: true,
            state: TimerState::new(TimerSettings {
                short_lived_ns: u64::try_from(flags.short_lived.as_nanos()).unwrap_or(u64::MAX),
                top_processes: usize::from(flags.top_processes),
            }),
            maps: None,
        }
    }
}

impl HookFamily for TimerFamily {
    fn hooks(&self) -> Vec<Hook> {
        hooks(
            self.hook,
            self.latency,
            self.per_timer,
            self.itimers_take_task,
        )
    }

    fn configure(&self, kernel: &KernelView, load: &mut LoadSettings) {
        let confidential = crate::kernel::lockdown_level().as_deref() == Some("confidentiality");
        if confidential {
            log::warn!(
                "lockdown=confidentiality: timer IDs and arming are not read (the user-memory read \
                 helper is refused there); syscalls are counted and timed, creates counted per \
                 process, owners' exits seen; live timers, the ID high-water mark and churn are not"
            );
        }
        load.global(globals::TIMER_USER_READS, &u32::from(!confidential));
        load.global(globals::TIMER_LATENCY, &u32::from(self.latency));
        load.global(globals::TIMER_PER_TIMER, &u32::from(self.per_timer));
        if !self.latency {
            load.unused_maps.extend([IN_FLIGHT_MAP, CREATE_LATENCY_MAP]);
        }
        if !self.per_timer {
            load.unused_maps.push(OWNERS_MAP);
        }
        let btf = kernel.btf.as_ref().ok();
        let offset = |s: &str, m: &str| btf.and_then(|b| b.member_offset(s, m)).unwrap_or(0);
        let (signal, live) = (
            offset("task_struct", "signal"),
            offset("signal_struct", "live"),
        );
        if signal == 0 || live == 0 {
            log::warn!(
                "no BTF offsets for task_struct.signal/signal_struct.live: a process's timers are taken to die with its main thread"
            );
        }
        // PF_EXITING in task_struct.flags tells exit_itimers at exit from exit_itimers at exec.
        let flags = offset("task_struct", "flags");
        load.global(globals::TASK_FLAGS_OFFSET, &flags);
        load.global(globals::TASK_SIGNAL_OFFSET, &signal);
        load.global(globals::SIGNAL_LIVE_OFFSET, &live);
        load.global(globals::SYS_TIMER_CREATE, &(libc::SYS_timer_create as u64));
        load.global(globals::SYS_TIMER_DELETE, &(libc::SYS_timer_delete as u64));
        load.global(
            globals::SYS_TIMER_SETTIME,
            &(libc::SYS_timer_settime as u64),
        );
        load.global(globals::SYS_PRCTL, &(libc::SYS_prctl as u64));
        // Where the saved user registers keep the first three syscall arguments and the
        // syscall number (x86_64: di, si, dx, orig_ax), for the raw syscall tracepoints.
        let register = |name: &str, default: u32| {
            btf.and_then(|b| b.member_offset("pt_regs", name))
                .unwrap_or(default)
        };
        let arguments: [u32; 3] = [register("di", 112), register("si", 104), register("dx", 96)];
        load.global(globals::PT_REGS_ARG_OFFSETS, &arguments);
        load.global(globals::PT_REGS_NR_OFFSET, &register("orig_ax", 120));
    }

    fn take_maps(&mut self, maps: &mut Maps<'_>) -> anyhow::Result<()> {
        self.maps = Some(TimerMaps::take(maps)?);
        Ok(())
    }

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn decode(&mut self, kind: EventKind, bytes: &[u8], want_event: bool) -> Option<Event> {
        // One value per record, counted and then written: the stream says what the metrics
        // count.
        let change = TimerChange::from_record(kind, &read_record::<TimerEvent>(bytes)?);
        self.state.count(&change);
        want_event
            .then(|| Event::of(change.kind.label(), &change))
            .flatten()
    }

    fn collect(&self, out: &mut Vec<Family>) -> anyhow::Result<()> {
        if let Some(maps) = &self.maps {
            maps.gather(out, self.latency)?;
        }
        // Without records there is nothing to say about live timers or churn: no series
        // rather than zeros.
        if self.per_timer {
            self.state.gather(out);
        }
        Ok(())
    }
}

const SYSCALL_NAMES: [&str; COUNTED_SYSCALLS as usize] =
    ["timer_create", "timer_delete", "timer_settime"];

/// Which syscall hooks the timer family prefers (`--timers.hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyscallHook {
    /// fexit on the syscalls' kernel functions (fentry too, for timer_create's latency), where
    /// the kernel has BPF trampolines: cost only on the watched calls, and the least there.
    Fentry,
    /// The syscall tracepoints: cost only on the watched syscalls, but each builds a record and
    /// any syscall tracepoint puts every task on the slow syscall path.
    Tracepoint,
    /// The raw syscall tracepoints: a filter on every syscall of the system.
    RawTracepoint,
}

/// The kernel functions behind the timer syscalls on this architecture, with their
/// `(const struct pt_regs *)` wrappers; `None` where the programs do not know the register layout.
const SYSCALL_FUNCTIONS: Option<[&str; 4]> = if cfg!(target_arch = "x86_64") {
    Some([
        "__x64_sys_timer_create",
        "__x64_sys_timer_delete",
        "__x64_sys_timer_settime",
        "__x64_sys_prctl",
    ])
} else {
    None
};

/// Whether `exit_itimers` takes the task, as its programs read it: from 6.0, and in the stable
/// kernels that took the fix (Debian 11's 5.10.262 does); a `struct signal_struct *` before,
/// which they would misread as the task. Without BTF to say, fentry does not load anyway.
fn itimers_take_task(btf: Option<&KernelBtf>) -> bool {
    match btf.and_then(|btf| btf.function_params("exit_itimers")) {
        Some(params) if params != ["struct task_struct *"] => {
            log::warn!(
                "exit_itimers takes ({}), not the task: timer owners' exits and execs are seen \
                 on the sched tracepoints instead",
                params.join(", ")
            );
            false
        }
        _ => true,
    }
}

fn hooks(
    preferred: SyscallHook,
    latency: bool,
    per_timer: bool,
    itimers_take_task: bool,
) -> Vec<Hook> {
    // Every syscall is handled at its exit alone; only timer_create's entry is hooked, and only
    // for its latency. The programs name their x86_64 functions; other architectures skip this
    // option (the attach fails by name and the plan moves on).
    let [create, delete, settime, prctl] = SYSCALL_FUNCTIONS.unwrap_or([
        "sys_timer_create",
        "sys_timer_delete",
        "sys_timer_settime",
        "sys_prctl",
    ]);
    let trampolines = vec![
        latency.then(|| fentry("timers_create_fentry", create)),
        Some(fexit("timers_create_fexit", create)),
        Some(fexit("timers_delete_fexit", delete)),
        Some(fexit("timers_settime_fexit", settime)),
        Some(fexit("timers_prctl_fexit", prctl)),
    ];
    let per_syscall = vec![
        latency.then(|| tracepoint("timers_create_enter", "syscalls", "sys_enter_timer_create")),
        Some(tracepoint(
            "timers_create_exit",
            "syscalls",
            "sys_exit_timer_create",
        )),
        Some(tracepoint(
            "timers_delete_exit",
            "syscalls",
            "sys_exit_timer_delete",
        )),
        Some(tracepoint(
            "timers_settime_exit",
            "syscalls",
            "sys_exit_timer_settime",
        )),
        // prctl: restore mode (PR_TIMER_CREATE_RESTORE_IDS) switched on and off.
        Some(tracepoint(
            "timers_prctl_exit",
            "syscalls",
            "sys_exit_prctl",
        )),
    ];
    let raw = vec![
        // On every syscall of the system: only when timing creates.
        latency.then(|| raw_tracepoint("timers_raw_enter", "sys_enter")),
        Some(raw_tracepoint("timers_raw_exit", "sys_exit")),
    ];
    let [trampolines, per_syscall, raw] = [trampolines, per_syscall, raw]
        .map(|option| option.into_iter().flatten().collect::<Vec<_>>());
    let options = match preferred {
        SyscallHook::Fentry => vec![trampolines, per_syscall, raw],
        SyscallHook::Tracepoint => vec![per_syscall, raw, trampolines],
        SyscallHook::RawTracepoint => vec![raw, per_syscall, trampolines],
    };
    // A process's timers die in exit_itimers, at its last thread's exit and at exec: fentry
    // there costs nothing to other exits; the sched tracepoints are the fallbacks.
    let owner = |name, trampoline, program, tp| Hook {
        name,
        options: [
            itimers_take_task.then(|| vec![fentry(trampoline, "exit_itimers")]),
            Some(vec![tracepoint(program, "sched", tp)]),
        ]
        .into_iter()
        .flatten()
        .collect(),
        requires: None,
    };
    let syscalls = Hook {
        // timer_create, timer_delete, timer_settime, and prctl for restore mode.
        name: "timer_syscalls",
        options,
        requires: None,
    };
    // Owners' ends only end live timers, which need the records.
    if !per_timer {
        return vec![syscalls];
    }
    vec![
        syscalls,
        owner(
            "timer_owner_exit",
            "timers_itimers_exit",
            "timers_process_exit",
            "sched_process_exit",
        ),
        owner(
            "timer_owner_exec",
            "timers_itimers_exec",
            "timers_process_exec",
            "sched_process_exec",
        ),
    ]
}

/// The timer family's kernel maps.
struct TimerMaps {
    syscalls: PerCpuArray<MapData, u64>,
    restore_creates: PerCpuArray<MapData, u64>,
    create_latency: PerCpuArray<MapData, u64>,
    id_max: PerCpuArray<MapData, u64>,
}

impl TimerMaps {
    fn take(maps: &mut Maps<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            syscalls: maps.per_cpu_array(SYSCALLS_MAP)?,
            restore_creates: maps.per_cpu_array(RESTORE_CREATES_MAP)?,
            create_latency: maps.per_cpu_array(CREATE_LATENCY_MAP)?,
            id_max: maps.per_cpu_array(ID_MAX_MAP)?,
        })
    }
}

impl TimerMaps {
    fn gather(&self, families: &mut Vec<Family>, latency: bool) -> anyhow::Result<()> {
        let mut calls = Family::counter(
            "posix_timer_syscalls_total",
            "POSIX timer syscalls by syscall and result (ok, or the errno).",
        );
        let counts = maps::sum_per_cpu(&self.syscalls, SYSCALL_COUNTER_SLOTS)?;
        add_syscall_results(&mut calls, &counts, &SYSCALL_NAMES);
        families.push(calls);

        let mut restore = Family::counter(
            "posix_timer_restore_creates_total",
            "timer_create calls that asked for a specific ID under restore mode (PR_TIMER_CREATE_RESTORE_IDS), by result.",
        );
        let counts = maps::sum_per_cpu(&self.restore_creates, ERRNO_SLOTS)?;
        for (slot, count) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            restore.add(&[("result", &result_label(slot as u32))], *count as f64);
        }
        families.push(restore);

        let mut id_max = Family::gauge(
            "posix_timer_id_max",
            "The highest POSIX timer ID handed out that the observer has seen.",
        );
        // The programs keep the ID plus one: 0 means no ID seen yet (no series).
        if let Some(max) = maps::max_per_cpu(&self.id_max, 0)?.checked_sub(1) {
            id_max.add(&[], max as f64);
        }
        families.push(id_max);

        if latency {
            let mut histogram = Family::histogram(
                "posix_timer_create_duration_seconds",
                "timer_create syscall latency (--timers.latency).",
            );
            let slots = maps::sum_per_cpu(&self.create_latency, LOG2_SLOTS)?;
            histogram.add_histogram(&[], &Log2Histogram::from_slots(&slots));
            families.push(histogram);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf_writer::BtfWriter;

    fn exit_itimers(param: &str) -> KernelBtf {
        let mut w = BtfWriter::default();
        let id = w.c_type(param);
        w.function("exit_itimers", &[id]);
        KernelBtf::from_bytes(&w.finish()).expect("test BTF parses")
    }

    /// Owners' ends move to the sched tracepoints where `exit_itimers` takes the signal_struct.
    #[test]
    fn exit_itimers_is_hooked_only_where_it_takes_the_task() {
        let owner_mechanisms = |take_task| -> Vec<usize> {
            hooks(SyscallHook::Fentry, false, true, take_task)
                .iter()
                .filter(|h| h.name.starts_with("timer_owner_"))
                .map(|h| h.options.len())
                .collect()
        };
        assert!(itimers_take_task(Some(&exit_itimers(
            "struct task_struct *"
        ))));
        assert!(!itimers_take_task(Some(&exit_itimers(
            "struct signal_struct *"
        ))));
        assert!(itimers_take_task(None));
        assert_eq!(owner_mechanisms(true), [2, 2]);
        assert_eq!(owner_mechanisms(false), [1, 1]);
    }
}
