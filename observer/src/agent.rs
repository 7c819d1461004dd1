//! The running agent: the enabled families (each behind its own lock, shared by the event
//! pipeline and the scrapes), the records' routing by kind, and the agent's own metrics.

use std::{
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use aya::maps::{MapData, PerCpuArray};
use observer_common::{EVENT_KIND_SLOTS, EventKind, MAP_FULL_SLOTS, TrackedMap};

use crate::{family::HookFamily, maps, metrics::Family, plan::ProbeStatus};

/// One enabled family.
pub struct Slot {
    pub name: &'static str,
    pub family: Mutex<Box<dyn HookFamily>>,
}

/// The enabled families and which of them takes each record kind.
pub struct Families {
    slots: Vec<Slot>,
    /// By kind number: the slot that decodes it and the size its records have at least.
    routes: [Option<(usize, usize)>; EVENT_KIND_SLOTS as usize],
}

impl Families {
    pub fn new(families: Vec<(&'static str, Box<dyn HookFamily>)>) -> Self {
        let mut routes = [None; EVENT_KIND_SLOTS as usize];
        for (index, (_, family)) in families.iter().enumerate() {
            for record in family.records() {
                routes[record.kind as usize] = Some((index, record.size));
            }
        }
        let slots = families
            .into_iter()
            .map(|(name, family)| Slot {
                name,
                family: Mutex::new(family),
            })
            .collect();
        Self { slots, routes }
    }

    /// The slot that decodes `kind` and its records' least size, when its family is enabled.
    pub fn route(&self, kind: EventKind) -> Option<(usize, usize)> {
        self.routes[kind as usize]
    }

    /// Every family locked, in registry order (the pipeline holds them for one drain; scrapes
    /// take one at a time, so the order cannot deadlock).
    pub fn lock_all(&self) -> Vec<MutexGuard<'_, Box<dyn HookFamily>>> {
        self.slots.iter().map(|s| lock(&s.family)).collect()
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the pipeline counts of the records it reads.
pub struct RecordCounts {
    pub received: [AtomicU64; EVENT_KIND_SLOTS as usize],
    pub decode_errors: AtomicU64,
    /// Event-stream writes that failed.
    pub output_errors: AtomicU64,
    /// Events the stream's writer could not take in time (its queue was full).
    pub output_dropped: AtomicU64,
}

impl Default for RecordCounts {
    fn default() -> Self {
        Self {
            received: std::array::from_fn(|_| AtomicU64::new(0)),
            decode_errors: AtomicU64::new(0),
            output_errors: AtomicU64::new(0),
            output_dropped: AtomicU64::new(0),
        }
    }
}

pub struct Agent {
    pub families: Families,
    pub counts: RecordCounts,
    /// The lost-record and full-table counters: the object's, and the pinned programs' when
    /// adopted (each program writes its own object's).
    pub events_lost: Vec<PerCpuArray<MapData, u64>>,
    pub map_full: Vec<PerCpuArray<MapData, u64>>,
    pub probes: Vec<ProbeStatus>,
    /// Every registered collector and whether it is on.
    pub collectors: Vec<(&'static str, bool)>,
    pub kernel_release: String,
    /// The kernel's statistics of the loaded programs.
    pub programs: crate::programs::ProgramStats,
    pub pins: crate::pins::PinStatus,
}

impl Agent {
    /// Every metric, as Prometheus text. A collector whose kernel maps cannot be read leaves
    /// its metrics out and says so (`observer_scrape_collector_success 0`, and a log line).
    pub fn scrape(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut families = Vec::new();
        self.self_metrics(&mut families);
        let mut success = Family::gauge(
            "scrape_collector_success",
            "1 when the collector's part of this scrape succeeded, 0 when its kernel maps could not be read.",
        );
        let mut duration = Family::gauge(
            "scrape_collector_duration_seconds",
            "How long the collector's part of this scrape took.",
        );
        for (name, result, seconds) in self.collect_families(&mut families) {
            if let Err(err) = &result {
                log::warn!("collector {name}: {err:#}");
            }
            success.add(&[("collector", name)], f64::from(u8::from(result.is_ok())));
            duration.add(&[("collector", name)], seconds);
        }
        families.push(success);
        families.push(duration);
        // The standard process_* families last, after the agent's own.
        crate::process::gather(&mut families);
        crate::metrics::render(families)
    }

    /// Each enabled collector's families (and the agent's own, as collector `agent`), with
    /// each one's result and time.
    pub fn collect_families(
        &self,
        families: &mut Vec<Family>,
    ) -> Vec<(&'static str, anyhow::Result<()>, f64)> {
        let mut results = Vec::new();
        let timed = |collect: &dyn Fn(&mut Vec<Family>) -> anyhow::Result<()>,
                     families: &mut Vec<Family>| {
            let start = Instant::now();
            let mut own = Vec::new();
            let result = collect(&mut own);
            if result.is_ok() {
                families.extend(own);
            }
            (result, start.elapsed().as_secs_f64())
        };
        for slot in self.families.slots() {
            let (result, seconds) = timed(&|out| lock(&slot.family).collect(out), families);
            results.push((slot.name, result, seconds));
        }
        let (result, seconds) = timed(&|out| self.record_counts(out), families);
        results.push(("agent", result, seconds));
        results
    }

    fn self_metrics(&self, families: &mut Vec<Family>) {
        let mut info = Family::gauge(
            "build_info",
            "The observer's version, the git commit it was built from and the rustc that built it.",
        );
        info.add(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("revision", env!("OBSERVER_REVISION")),
                ("rustc", env!("OBSERVER_RUSTC")),
            ],
            1.0,
        );
        families.push(info);

        // The kernel apart from the binary, as node_exporter's node_uname_info: a kernel
        // upgrade changes this series, not build_info's.
        let uname = crate::kernel::uname();
        let mut kernel = Family::gauge(
            "kernel_info",
            "The running kernel, as uname(2) gives it: release (uname -r), version (uname -v), machine (uname -m).",
        );
        kernel.add(
            &[
                ("release", &uname.release),
                ("version", &uname.version),
                ("machine", &uname.machine),
            ],
            1.0,
        );
        families.push(kernel);

        let mut enabled = Family::gauge(
            "collector_enabled",
            "1 for each collector (hook family) switched on, 0 for those switched off with --no-collector.<name>.",
        );
        for (name, on) in &self.collectors {
            enabled.add(&[("collector", name)], f64::from(u8::from(*on)));
        }
        families.push(enabled);

        let mut attached = Family::gauge(
            "probe_attached",
            "1 when the probe is attached by this mechanism, 0 when the mechanism was tried and is unavailable here.",
        );
        for status in &self.probes {
            attached.add(
                &[("probe", status.probe), ("mechanism", status.mechanism)],
                f64::from(u8::from(status.attached)),
            );
        }
        families.push(attached);

        let pins = &self.pins;
        families.push(
            Family::gauge(
                "security_pinned",
                "1 while the security collectors' programs are pinned (--pin): they keep watching \
                 when the agent stops, and the next agent of this build adopts them.",
            )
            .single(f64::from(u8::from(pins.pinned))),
        );
        families.push(
            Family::gauge(
                "security_adopted",
                "1 when this agent adopted pinned security programs from an earlier one (their \
                 counters went on instead of starting at zero).",
            )
            .single(f64::from(u8::from(pins.adopted))),
        );
        families.push(
            Family::gauge(
                "security_unwatched_seconds",
                "How long, when this agent started, the counts of the pinned security programs it \
                 replaced (another build or configuration) had gone unread by any agent: what \
                 they counted in that time is not in this agent's counters. 0 when nothing was \
                 replaced.",
            )
            .single(pins.unwatched_seconds),
        );
    }

    fn record_counts(&self, families: &mut Vec<Family>) -> anyhow::Result<()> {
        let mut total =
            Family::counter("events_total", "Records received from the kernel, by kind.");
        let mut lost = Family::counter(
            "events_lost_total",
            "Records a ring buffer had no room for, by kind, counted in the kernel: detail lost (names, phases, \
             event lines). Timer records and security records (modules, taint, lockdown) have separate \
             ring buffers; module, taint and lockdown verdicts are counted in kernel maps and never lost.",
        );
        let lost_counts = maps::sum_per_cpu_all(&self.events_lost, EVENT_KIND_SLOTS)?;
        // Only the kinds of enabled families: a family switched off exports nothing.
        for kind in EventKind::ALL
            .into_iter()
            .filter(|k| self.families.route(*k).is_some())
        {
            let received = self.counts.received[kind as usize].load(Ordering::Relaxed);
            total.add(&[("kind", kind.label())], received as f64);
            lost.add(&[("kind", kind.label())], lost_counts[kind as usize] as f64);
        }
        families.push(total);
        families.push(lost);
        self.programs.collect(families)?;

        families.push(
            Family::counter(
                "events_decode_errors_total",
                "Records too short or of an unknown kind.",
            )
            .single(self.counts.decode_errors.load(Ordering::Relaxed) as f64),
        );
        families.push(
            Family::counter(
                "events_output_errors_total",
                "Writes of the event stream (--events json) that failed; the events in them are lost.",
            )
            .single(self.counts.output_errors.load(Ordering::Relaxed) as f64),
        );
        families.push(
            Family::counter(
                "events_output_dropped_total",
                "Events of the stream (--events json) dropped because its writer fell behind (a slow or \
                 stopped reader of its output); metrics are unaffected.",
            )
            .single(self.counts.output_dropped.load(Ordering::Relaxed) as f64),
        );
        let mut full = Family::counter(
            "kernel_map_full_total",
            "Inserts a full kernel table refused, by table: what it would have tracked is missing detail \
             (module_loads, module_pending: a load's phases and name; timer_owners: a process's exit; \
             timer_in_flight: a create's latency; taint_events: a taint's module, counted as other).",
        );
        let counts = maps::sum_per_cpu_all(&self.map_full, MAP_FULL_SLOTS)?;
        for map in TrackedMap::ALL {
            full.add(&[("map", map.label())], counts[map as usize] as f64);
        }
        families.push(full);
        Ok(())
    }
}
