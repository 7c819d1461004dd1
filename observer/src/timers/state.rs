//! POSIX timers: syscall counts and create latency from kernel maps; live timers, the ID
//! high-water mark, short-lived churn and per-process creates from ring buffer records.

use std::collections::HashMap;

use aya::maps::{MapData, PerCpuArray};
use observer_common::{
    ERRNO_SLOTS, LOG2_SLOTS,
    timers::{COUNTED_SYSCALLS, GONE_EXEC, SYSCALL_COUNTER_SLOTS, TimerEvent},
};
use serde::Serialize;

use crate::{
    maps::{self, Maps},
    metrics::{Family, Log2Histogram},
    plan::{Hook, raw_tracepoint, tracepoint},
};

const SYSCALL_NAMES: [&str; COUNTED_SYSCALLS as usize] =
    ["timer_create", "timer_delete", "timer_settime"];

/// Which syscall hooks the timer family prefers (`--timers.hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyscallHook {
    /// The syscall tracepoints: cost only on the watched syscalls, but each builds a record.
    Tracepoint,
    /// The raw syscall tracepoints: cheaper per watched syscall, a filter on every other one.
    RawTracepoint,
}

pub fn hooks(preferred: SyscallHook) -> Vec<Hook> {
    let syscalls = |enter_tp, exit_tp, enter, exit| {
        [
            tracepoint(enter, "syscalls", enter_tp),
            tracepoint(exit, "syscalls", exit_tp),
        ]
    };
    let per_syscall: Vec<_> = [
        syscalls(
            "sys_enter_timer_create",
            "sys_exit_timer_create",
            "timers_create_enter",
            "timers_create_exit",
        ),
        syscalls(
            "sys_enter_timer_delete",
            "sys_exit_timer_delete",
            "timers_delete_enter",
            "timers_delete_exit",
        ),
        syscalls(
            "sys_enter_timer_settime",
            "sys_exit_timer_settime",
            "timers_settime_enter",
            "timers_settime_exit",
        ),
        // prctl: restore mode (PR_TIMER_CREATE_RESTORE_IDS) switched on and off.
        syscalls(
            "sys_enter_prctl",
            "sys_exit_prctl",
            "timers_prctl_enter",
            "timers_prctl_exit",
        ),
    ]
    .concat();
    let raw = vec![
        raw_tracepoint("timers_raw_enter", "sys_enter"),
        raw_tracepoint("timers_raw_exit", "sys_exit"),
    ];
    let options = match preferred {
        SyscallHook::Tracepoint => vec![per_syscall, raw],
        SyscallHook::RawTracepoint => vec![raw, per_syscall],
    };
    let sched = |name, program, tp| Hook {
        name,
        options: vec![vec![tracepoint(program, "sched", tp)]],
        requires: None,
    };
    vec![
        // timer_create, timer_delete, timer_settime, and prctl for restore mode.
        Hook {
            name: "timer_syscalls",
            options,
            requires: None,
        },
        sched(
            "timer_owner_exit",
            "timers_process_exit",
            "sched_process_exit",
        ),
        sched(
            "timer_owner_exec",
            "timers_process_exec",
            "sched_process_exec",
        ),
    ]
}

/// The timer family's kernel maps.
pub struct TimerMaps {
    syscalls: PerCpuArray<MapData, u64>,
    restore_creates: PerCpuArray<MapData, u64>,
    create_latency: PerCpuArray<MapData, u64>,
}

impl TimerMaps {
    pub fn take(maps: &mut Maps<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            syscalls: maps.per_cpu_array("TIMER_SYSCALLS")?,
            restore_creates: maps.per_cpu_array("TIMER_RESTORE_CREATES")?,
            create_latency: maps.per_cpu_array("TIMER_CREATE_LATENCY")?,
        })
    }
}

#[derive(Clone, Copy, Debug)]
struct LiveTimer {
    created_ns: u64,
    armed: bool,
}

/// Settings from the command line.
#[derive(Clone, Copy, Debug)]
pub struct TimerSettings {
    pub short_lived_ns: u64,
    pub top_processes: usize,
}

/// Process names kept with their own create count; more go to `other` at once. Top-N is taken
/// from these at scrape time, so memory stays bounded whatever the churn of names.
const MAX_TRACKED_COMMS: usize = 4096;
/// Live timers tracked; beyond this, creates are counted but not followed to their deletion.
const MAX_TRACKED_TIMERS: usize = 262_144;

/// What the records tell, kept between scrapes.
#[derive(Debug)]
pub struct TimerState {
    settings: TimerSettings,
    live: HashMap<u32, HashMap<i32, LiveTimer>>,
    live_count: usize,
    untracked: u64,
    id_max: Option<i32>,
    short_lived: u64,
    creates_by_comm: HashMap<String, u64>,
    creates_untracked_comms: u64,
}

/// A decoded timer record, for `--events json`.
#[derive(Debug, Serialize)]
pub struct TimerRecord {
    pub event: &'static str,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub timer_id: Option<i32>,
    pub restore: Option<bool>,
    pub reason: Option<&'static str>,
}

impl TimerState {
    pub fn new(settings: TimerSettings) -> Self {
        Self {
            settings,
            live: HashMap::new(),
            live_count: 0,
            untracked: 0,
            id_max: None,
            short_lived: 0,
            creates_by_comm: HashMap::new(),
            creates_untracked_comms: 0,
        }
    }

    pub fn created(&mut self, event: &TimerEvent, comm: &str) {
        let (pid, id) = (event.header.pid, event.timer_id);
        self.id_max = Some(self.id_max.map_or(id, |max| max.max(id)));
        if let Some(count) = self.creates_by_comm.get_mut(comm) {
            *count += 1;
        } else if self.creates_by_comm.len() < MAX_TRACKED_COMMS {
            self.creates_by_comm.insert(comm.to_owned(), 1);
        } else {
            self.creates_untracked_comms += 1;
        }
        if self.live_count >= MAX_TRACKED_TIMERS {
            self.untracked += 1;
            return;
        }
        let timer = LiveTimer {
            created_ns: event.header.ts_ns,
            armed: false,
        };
        if self
            .live
            .entry(pid)
            .or_default()
            .insert(id, timer)
            .is_none()
        {
            self.live_count += 1;
        }
    }

    pub fn armed(&mut self, event: &TimerEvent) {
        if let Some(timer) = self
            .live
            .get_mut(&event.header.pid)
            .and_then(|t| t.get_mut(&event.timer_id))
        {
            timer.armed = true;
        }
    }

    pub fn deleted(&mut self, event: &TimerEvent) {
        let pid = event.header.pid;
        let Some(timers) = self.live.get_mut(&pid) else {
            return;
        };
        let Some(timer) = timers.remove(&event.timer_id) else {
            return;
        };
        self.live_count -= 1;
        if timers.is_empty() {
            self.live.remove(&pid);
        }
        let age = event.header.ts_ns.saturating_sub(timer.created_ns);
        if !timer.armed && age < self.settings.short_lived_ns {
            self.short_lived += 1;
        }
    }

    /// The process exited or exec'd: its timers are gone without timer_delete.
    pub fn owner_gone(&mut self, event: &TimerEvent) {
        if let Some(timers) = self.live.remove(&event.header.pid) {
            self.live_count -= timers.len();
        }
    }

    pub fn handle(
        &mut self,
        kind: observer_common::EventKind,
        event: &TimerEvent,
        comm: &str,
    ) -> TimerRecord {
        use observer_common::EventKind as K;
        let (name, timer_id, restore, reason) = match kind {
            K::TimerCreated => {
                self.created(event, comm);
                (
                    "timer_created",
                    Some(event.timer_id),
                    Some(event.detail != 0),
                    None,
                )
            }
            K::TimerArmed => {
                self.armed(event);
                ("timer_armed", Some(event.timer_id), None, None)
            }
            K::TimerDeleted => {
                self.deleted(event);
                ("timer_deleted", Some(event.timer_id), None, None)
            }
            _ => {
                self.owner_gone(event);
                let reason = if event.detail == GONE_EXEC {
                    "exec"
                } else {
                    "exit"
                };
                ("timer_owner_gone", None, None, Some(reason))
            }
        };
        TimerRecord {
            event: name,
            pid: event.header.pid,
            tid: event.header.tid,
            comm: comm.to_owned(),
            timer_id,
            restore,
            reason,
        }
    }

    /// The `top_processes` names with the most creates, and the sum of all others.
    fn top_creators(&self) -> (Vec<(&str, u64)>, u64) {
        let mut all: Vec<(&str, u64)> = self
            .creates_by_comm
            .iter()
            .map(|(c, n)| (c.as_str(), *n))
            .collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let rest = all.split_off(all.len().min(self.settings.top_processes));
        let other = rest.iter().map(|(_, n)| n).sum::<u64>() + self.creates_untracked_comms;
        (all, other)
    }

    pub fn gather(&self, families: &mut Vec<Family>) {
        families.push(Family::gauge(
            "posix_timers_live",
            "POSIX timers created while the observer watched and not yet deleted or destroyed by exit/exec.",
        ).single(self.live_count as f64));

        let mut id_max = Family::gauge(
            "posix_timer_id_max",
            "The highest POSIX timer ID handed out that the observer has seen.",
        );
        if let Some(max) = self.id_max {
            id_max.add(&[], f64::from(max));
        }
        families.push(id_max);

        families.push(Family::counter(
            "posix_timer_short_lived_total",
            "POSIX timers deleted within --timers.short-lived of creation without ever being armed (timer-ID churn).",
        ).single(self.short_lived as f64));

        families.push(Family::counter(
            "posix_timers_untracked_total",
            "POSIX timer creates not followed to their deletion because the live-timer table was full.",
        ).single(self.untracked as f64));

        let mut by_comm = Family::counter(
            "posix_timer_creates_by_process_total",
            "Successful timer_create calls for the top --timers.top-processes process names; the rest as comm=\"other\" \
             (which can move down when a name enters the top).",
        );
        let (top, other) = self.top_creators();
        for (comm, count) in top {
            by_comm.add(&[("comm", comm)], count as f64);
        }
        if other > 0 {
            by_comm.add(&[("comm", "other")], other as f64);
        }
        families.push(by_comm);
    }
}

/// The `result` label of a counter slot: ok, or the errno's name in lowercase.
pub fn result_label(slot: u32) -> String {
    match slot {
        0 => "ok".into(),
        s if s == ERRNO_SLOTS - 1 => "other".into(),
        s => {
            let name = format!("{:?}", nix::errno::Errno::from_raw(s as i32));
            if name == "UnknownErrno" {
                format!("errno{s}")
            } else {
                name.to_lowercase()
            }
        }
    }
}

impl TimerMaps {
    pub fn gather(&self, families: &mut Vec<Family>) {
        let mut calls = Family::counter(
            "posix_timer_syscalls_total",
            "POSIX timer syscalls by syscall and result (ok, or the errno).",
        );
        let counts = maps::sum_per_cpu(&self.syscalls, SYSCALL_COUNTER_SLOTS);
        for (slot, count) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            let (syscall, result) = (slot as u32 / ERRNO_SLOTS, slot as u32 % ERRNO_SLOTS);
            calls.add(
                &[
                    ("syscall", SYSCALL_NAMES[syscall as usize]),
                    ("result", &result_label(result)),
                ],
                *count as f64,
            );
        }
        families.push(calls);

        let mut restore = Family::counter(
            "posix_timer_restore_creates_total",
            "timer_create calls that asked for a specific ID under restore mode (PR_TIMER_CREATE_RESTORE_IDS), by result.",
        );
        let counts = maps::sum_per_cpu(&self.restore_creates, ERRNO_SLOTS);
        for (slot, count) in counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            restore.add(&[("result", &result_label(slot as u32))], *count as f64);
        }
        families.push(restore);

        let mut latency = Family::histogram(
            "posix_timer_create_duration_seconds",
            "timer_create syscall latency.",
        );
        let slots = maps::sum_per_cpu(&self.create_latency, LOG2_SLOTS);
        latency.add_histogram(&[], &Log2Histogram::from_slots(&slots));
        families.push(latency);
    }
}

#[cfg(test)]
mod tests {
    use observer_common::{EventHeader, EventKind};

    use super::*;

    fn event(kind: EventKind, pid: u32, id: i32, ts_ns: u64) -> TimerEvent {
        TimerEvent {
            header: EventHeader {
                kind: kind as u32,
                pid,
                tid: pid,
                _pad: 0,
                ts_ns,
                comm: [0; 16],
            },
            timer_id: id,
            detail: 0,
        }
    }

    /// Hands the state a record of `kind` for timer `id` of process `pid` at `ts_ns`.
    fn feed(s: &mut TimerState, kind: EventKind, pid: u32, id: i32, ts_ns: u64, comm: &str) {
        s.handle(kind, &event(kind, pid, id, ts_ns), comm);
    }

    fn state(top: usize) -> TimerState {
        TimerState::new(TimerSettings {
            short_lived_ns: 10_000_000,
            top_processes: top,
        })
    }

    #[test]
    fn short_lived_needs_quick_delete_without_arming() {
        let mut s = state(10);
        feed(&mut s, EventKind::TimerCreated, 1, 5, 0, "a");
        feed(&mut s, EventKind::TimerDeleted, 1, 5, 1_000, "a");
        assert_eq!(s.short_lived, 1);
        // Armed before deletion: not churn.
        feed(&mut s, EventKind::TimerCreated, 1, 6, 0, "a");
        feed(&mut s, EventKind::TimerArmed, 1, 6, 10, "a");
        feed(&mut s, EventKind::TimerDeleted, 1, 6, 20, "a");
        // Too old: not churn.
        feed(&mut s, EventKind::TimerCreated, 1, 7, 0, "a");
        feed(&mut s, EventKind::TimerDeleted, 1, 7, 20_000_000, "a");
        assert_eq!(s.short_lived, 1);
        assert_eq!(s.live_count, 0);
        assert_eq!(s.id_max, Some(7));
    }

    #[test]
    fn owner_exit_destroys_its_timers_only() {
        let mut s = state(10);
        for id in 1..=3 {
            feed(&mut s, EventKind::TimerCreated, 10, id, 0, "a");
        }
        feed(&mut s, EventKind::TimerCreated, 11, 1, 0, "b");
        feed(&mut s, EventKind::TimerOwnerGone, 10, 0, 5, "a");
        assert_eq!(s.live_count, 1);
        // A delete of an unknown timer changes nothing.
        feed(&mut s, EventKind::TimerDeleted, 10, 2, 6, "a");
        assert_eq!(s.live_count, 1);
    }

    #[test]
    fn top_creators_sum_the_rest_as_other() {
        let mut s = state(2);
        for (comm, n) in [("a", 5), ("b", 3), ("c", 2), ("d", 1)] {
            for i in 0..n {
                feed(&mut s, EventKind::TimerCreated, 1, i, 0, comm);
            }
        }
        let (top, other) = s.top_creators();
        assert_eq!(top, vec![("a", 5), ("b", 3)]);
        assert_eq!(other, 3);
    }

    #[test]
    fn comm_table_is_bounded() {
        let mut s = state(3);
        for i in 0..(MAX_TRACKED_COMMS + 100) {
            feed(&mut s, EventKind::TimerCreated, 1, 1, 0, &format!("p{i}"));
        }
        assert_eq!(s.creates_by_comm.len(), MAX_TRACKED_COMMS);
        let (top, other) = s.top_creators();
        assert_eq!(top.len(), 3);
        assert_eq!(other as usize, MAX_TRACKED_COMMS + 100 - 3);
    }

    #[test]
    fn result_labels() {
        assert_eq!(result_label(0), "ok");
        assert_eq!(result_label(22), "einval");
        assert_eq!(result_label(16), "ebusy");
        assert_eq!(result_label(ERRNO_SLOTS - 1), "other");
    }
}
