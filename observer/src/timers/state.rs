//! What the timer records tell, kept between scrapes: live timers, short-lived churn and
//! creates per process. (The ID high-water mark is kept in the kernel.)
//!
//! Creates per process: the first `--timers.top-processes` names seen keep their own series
//! for the agent's life, and every name after them counts as `comm="other"`. Re-ranking at each
//! scrape would make a name that drops out lose its series (its rate reads as a reset) and one
//! that climbs in appear with its whole history at once; these counters only ever grow.

use std::collections::HashMap;

use observer_common::{
    EventKind,
    timers::{GONE_EXEC, TimerEvent},
};

use crate::{metrics::Family, record::comm_str};

/// A timer event: `timer_created` (its ID where it could be read, and whether it was made in
/// restore mode), `timer_armed` and `timer_deleted` (the ID), `timer_owner_gone` (exit or exec).
///
/// The one value a record becomes: the metrics are counted from it and the stream writes it,
/// so what is counted is what is reported. The fields only the metrics read are left out of
/// the stream (which has the process, the time and the comm from the record's header already).
#[derive(Debug, serde::Serialize)]
pub struct TimerChange {
    /// Which change (the event's name).
    #[serde(skip)]
    pub kind: EventKind,
    /// The process whose timer it is.
    #[serde(skip)]
    pub pid: u32,
    /// When it happened (the record's timestamp).
    #[serde(skip)]
    pub at_ns: u64,
    /// The process's name, for the creates by process.
    #[serde(skip)]
    pub comm: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer_id: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

impl TimerChange {
    /// What a record of `kind` says: a function of the record alone.
    pub fn from_record(kind: EventKind, event: &TimerEvent) -> Self {
        let mut change = Self {
            kind,
            pid: event.header.pid,
            at_ns: event.header.ts_ns,
            comm: comm_str(&event.header.comm),
            timer_id: Some(event.timer_id),
            restore: None,
            reason: None,
        };
        match kind {
            EventKind::TimerCreated => {
                // No ID where it could not be read (lockdown=confidentiality): absent rather
                // than a made-up number, and the timer is not followed.
                change.timer_id = (event.timer_id >= 0).then_some(event.timer_id);
                change.restore = Some(event.detail != 0);
            }
            EventKind::TimerArmed | EventKind::TimerDeleted => {}
            _ => {
                change.timer_id = None;
                change.reason = Some(if event.detail == GONE_EXEC {
                    "exec"
                } else {
                    "exit"
                });
            }
        }
        change
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

/// The label of the series that counts every name without a series of its own. A process
/// that is itself named `other` counts there: two series with one label set would be invalid.
const OTHER: &str = "other";
/// Live timers tracked; beyond this, creates are counted but not followed to their deletion.
const MAX_TRACKED_TIMERS: usize = 262_144;

/// What the records tell, kept between scrapes.
#[derive(Debug)]
pub struct TimerState {
    settings: TimerSettings,
    live: HashMap<u32, HashMap<i32, LiveTimer>>,
    live_count: usize,
    untracked: u64,
    short_lived: u64,
    /// At most `top_processes` names, kept once they are in: memory bounded by the flag.
    creates_by_comm: HashMap<String, u64>,
    creates_other: u64,
}

impl TimerState {
    pub fn new(settings: TimerSettings) -> Self {
        Self {
            settings,
            live: HashMap::new(),
            live_count: 0,
            untracked: 0,
            short_lived: 0,
            creates_by_comm: HashMap::new(),
            creates_other: 0,
        }
    }

    /// A create by process `comm`; without its ID (`None`: it could not be read) the create is
    /// counted for its process, but the timer is not followed.
    fn created(&mut self, pid: u32, id: Option<i32>, at_ns: u64, comm: &str) {
        if let Some(count) = self.creates_by_comm.get_mut(comm) {
            *count += 1;
        } else if self.creates_by_comm.len() < self.settings.top_processes && comm != OTHER {
            self.creates_by_comm.insert(comm.to_owned(), 1);
        } else {
            self.creates_other += 1;
        }
        let Some(id) = id else {
            return;
        };
        if self.live_count >= MAX_TRACKED_TIMERS {
            self.untracked += 1;
            return;
        }
        let timer = LiveTimer {
            created_ns: at_ns,
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

    fn armed(&mut self, pid: u32, id: i32) {
        if let Some(timer) = self.live.get_mut(&pid).and_then(|t| t.get_mut(&id)) {
            timer.armed = true;
        }
    }

    fn deleted(&mut self, pid: u32, id: i32, at_ns: u64) {
        let Some(timers) = self.live.get_mut(&pid) else {
            return;
        };
        let Some(timer) = timers.remove(&id) else {
            return;
        };
        self.live_count -= 1;
        if timers.is_empty() {
            self.live.remove(&pid);
        }
        let age = at_ns.saturating_sub(timer.created_ns);
        if !timer.armed && age < self.settings.short_lived_ns {
            self.short_lived += 1;
        }
    }

    /// The process exited or exec'd: its timers are gone without timer_delete.
    fn owner_gone(&mut self, pid: u32) {
        if let Some(timers) = self.live.remove(&pid) {
            self.live_count -= timers.len();
        }
    }

    /// Counts one change: from the event the stream gets, never from the raw record.
    pub fn count(&mut self, change: &TimerChange) {
        let (pid, at_ns) = (change.pid, change.at_ns);
        match (change.kind, change.timer_id) {
            (EventKind::TimerCreated, id) => self.created(pid, id, at_ns, &change.comm),
            (EventKind::TimerArmed, Some(id)) => self.armed(pid, id),
            (EventKind::TimerDeleted, Some(id)) => self.deleted(pid, id, at_ns),
            (EventKind::TimerArmed | EventKind::TimerDeleted, None) => {}
            _ => self.owner_gone(pid),
        }
    }

    /// The names with their own series, by name (a stable order between scrapes), and the
    /// count of all others.
    fn creators(&self) -> (Vec<(&str, u64)>, u64) {
        let mut named: Vec<(&str, u64)> = self
            .creates_by_comm
            .iter()
            .map(|(c, n)| (c.as_str(), *n))
            .collect();
        named.sort_unstable();
        (named, self.creates_other)
    }

    pub fn gather(&self, families: &mut Vec<Family>) {
        families.push(Family::gauge(
            "posix_timer_live",
            "POSIX timers created while the observer watched and not yet deleted or destroyed by exit/exec.",
        ).single(self.live_count as f64));

        families.push(Family::counter(
            "posix_timer_short_lived_total",
            "POSIX timers deleted within --timers.short-lived of creation without ever being armed (timer-ID churn).",
        ).single(self.short_lived as f64));

        families.push(Family::counter(
            "posix_timer_untracked_total",
            "POSIX timer creates not followed to their deletion because the live-timer table was full.",
        ).single(self.untracked as f64));

        let mut by_comm = Family::counter(
            "posix_timer_creates_by_process_total",
            "Successful timer_create calls by process name: the first --timers.top-processes names seen keep \
             their own series for the agent's life; every later name counts as comm=\"other\".",
        );
        let (named, other) = self.creators();
        for (comm, count) in named {
            by_comm.add(&[("comm", comm)], count as f64);
        }
        if other > 0 {
            by_comm.add(&[("comm", OTHER)], other as f64);
        }
        families.push(by_comm);
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
                ts_ns,
                ..EventHeader::default()
            },
            timer_id: id,
            detail: 0,
        }
    }

    /// Hands the state a record of `kind` for timer `id` of process `pid` at `ts_ns`.
    fn feed(s: &mut TimerState, kind: EventKind, pid: u32, id: i32, ts_ns: u64, comm: &str) {
        let mut record = event(kind, pid, id, ts_ns);
        record.header.comm[..comm.len()].copy_from_slice(comm.as_bytes());
        s.count(&TimerChange::from_record(kind, &record));
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
    }

    #[test]
    fn creates_without_an_id_count_for_their_process_only() {
        let mut s = state(10);
        feed(&mut s, EventKind::TimerCreated, 1, -1, 0, "a");
        feed(&mut s, EventKind::TimerCreated, 1, -1, 5, "a");
        assert_eq!(s.live_count, 0);
        assert_eq!(s.creates_by_comm.get("a"), Some(&2));
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

    /// `n` creates by `comm`.
    fn creates(s: &mut TimerState, comm: &str, n: i32) {
        for i in 0..n {
            feed(s, EventKind::TimerCreated, 1, i, 0, comm);
        }
    }

    #[test]
    fn the_first_names_keep_their_series_and_later_ones_are_other() {
        let mut s = state(2);
        creates(&mut s, "a", 1);
        creates(&mut s, "b", 2);
        // Later names with more creates do not push the first ones out.
        creates(&mut s, "c", 50);
        creates(&mut s, "d", 7);
        assert_eq!(s.creators(), (vec![("a", 1), ("b", 2)], 57));
        // The first names' series go on growing; the later ones' go on counting as other.
        creates(&mut s, "a", 3);
        creates(&mut s, "c", 1);
        assert_eq!(s.creators(), (vec![("a", 4), ("b", 2)], 58));
    }

    #[test]
    fn a_process_named_other_counts_as_other() {
        let mut s = state(3);
        creates(&mut s, "other", 2);
        creates(&mut s, "a", 1);
        assert_eq!(s.creators(), (vec![("a", 1)], 2));
        let mut families = Vec::new();
        s.gather(&mut families);
        let text = String::from_utf8(crate::metrics::render(families).unwrap()).unwrap();
        let by_process = text
            .lines()
            .filter(|l| l.starts_with("observer_posix_timer_creates_by_process_total{"))
            .collect::<Vec<_>>();
        assert_eq!(
            by_process,
            [
                "observer_posix_timer_creates_by_process_total{comm=\"a\"} 1",
                "observer_posix_timer_creates_by_process_total{comm=\"other\"} 2",
            ]
        );
    }

    #[test]
    fn comm_table_is_bounded() {
        let mut s = state(3);
        for i in 0..10_000 {
            feed(&mut s, EventKind::TimerCreated, 1, 1, 0, &format!("p{i}"));
        }
        assert_eq!(s.creates_by_comm.len(), 3);
        let (named, other) = s.creators();
        assert_eq!(named, vec![("p0", 1), ("p1", 1), ("p2", 1)]);
        assert_eq!(other, 10_000 - 3);
    }
}
