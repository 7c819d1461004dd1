//! The running agent: the enabled families (each behind its own lock, shared by the event
//! pipeline and the scrapes), the records' routing by kind, and the agent's own metrics.

use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, PerCpuArray};
use observer_common::{EVENT_KIND_SLOTS, EventKind};

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

    /// One family, by collector name.
    pub fn lock(&self, name: &str) -> Option<MutexGuard<'_, Box<dyn HookFamily>>> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .map(|s| lock(&s.family))
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
}

impl Default for RecordCounts {
    fn default() -> Self {
        Self {
            received: std::array::from_fn(|_| AtomicU64::new(0)),
            decode_errors: AtomicU64::new(0),
            output_errors: AtomicU64::new(0),
        }
    }
}

pub struct Agent {
    pub families: Families,
    pub counts: RecordCounts,
    pub events_lost: PerCpuArray<MapData, u64>,
    pub probes: Vec<ProbeStatus>,
    /// Every registered collector and whether it is on.
    pub collectors: Vec<(&'static str, bool)>,
    pub kernel_release: String,
}

impl Agent {
    /// Every metric, as Prometheus text.
    pub fn scrape(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut families = Vec::new();
        self.self_metrics(&mut families);
        for slot in self.families.slots() {
            lock(&slot.family).collect(&mut families);
        }
        self.record_counts(&mut families);
        crate::metrics::render(families)
    }

    fn self_metrics(&self, families: &mut Vec<Family>) {
        let mut info = Family::gauge(
            "build_info",
            "The observer's version and the kernel it runs on.",
        );
        info.add(
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("kernel", &self.kernel_release),
            ],
            1.0,
        );
        families.push(info);

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
    }

    fn record_counts(&self, families: &mut Vec<Family>) {
        let mut total =
            Family::counter("events_total", "Records received from the kernel, by kind.");
        let mut lost = Family::counter(
            "events_lost_total",
            "Records the kernel could not hand over (ring buffer full), by kind: counted in the kernel.",
        );
        let lost_counts = maps::sum_per_cpu(&self.events_lost, EVENT_KIND_SLOTS);
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
    }
}
