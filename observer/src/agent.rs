//! The running agent: the loaded programs, the kernel maps read at scrape time, and the state
//! the event pipeline keeps. Scrapes render from here.

use std::sync::Mutex;

use aya::maps::{MapData, PerCpuArray};
use observer_common::{EVENT_KIND_SLOTS, EventKind};

use crate::{
    kernel,
    lockdown::{Lockdown, LockdownMaps},
    maps,
    metrics::Family,
    modules::{ModuleMaps, ModuleState},
    plan::ProbeStatus,
    timers::{TimerMaps, TimerState},
};

/// What the event pipeline updates.
pub struct State {
    pub events: [u64; EVENT_KIND_SLOTS as usize],
    pub decode_errors: u64,
    pub timers: TimerState,
    pub lockdown: Lockdown,
    pub modules: ModuleState,
}

pub struct Agent {
    pub state: Mutex<State>,
    pub timer_maps: TimerMaps,
    pub module_maps: ModuleMaps,
    pub lockdown_maps: LockdownMaps,
    pub events_lost: PerCpuArray<MapData, u64>,
    pub probes: Vec<ProbeStatus>,
    pub kernel_release: String,
}

impl Agent {
    /// Every metric, as Prometheus text.
    pub fn scrape(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut families = Vec::new();
        self.self_metrics(&mut families);
        self.timer_maps.gather(&mut families);
        self.module_maps.gather(&mut families);
        let lockdown_counts = self.lockdown_maps.counts();
        {
            let state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.timers.gather(&mut families);
            state.lockdown.gather(&lockdown_counts, &mut families);
            state.modules.gather(&mut families);
            self.event_counts(&state, &mut families);
        }
        taint(&mut families);
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

    fn event_counts(&self, state: &State, families: &mut Vec<Family>) {
        let mut total =
            Family::counter("events_total", "Records received from the kernel, by kind.");
        let mut lost = Family::counter(
            "events_lost_total",
            "Records the kernel could not hand over (ring buffer full), by kind: counted in the kernel.",
        );
        let lost_counts = maps::sum_per_cpu(&self.events_lost, EVENT_KIND_SLOTS);
        for kind in EventKind::ALL {
            total.add(
                &[("kind", kind.label())],
                state.events[kind as usize] as f64,
            );
            lost.add(&[("kind", kind.label())], lost_counts[kind as usize] as f64);
        }
        families.push(total);
        families.push(lost);

        families.push(
            Family::counter(
                "events_decode_errors_total",
                "Records too short or of an unknown kind.",
            )
            .single(state.decode_errors as f64),
        );
    }
}

/// `observer_kernel_tainted{flag}`: each taint bit, read now.
fn taint(families: &mut Vec<Family>) {
    let mut tainted = Family::gauge(
        "kernel_tainted",
        "1 for each taint flag set in /proc/sys/kernel/tainted.",
    );
    if let Some(mask) = kernel::taint_mask() {
        let bits = (kernel::TAINT_FLAGS.len() as u32).max(64 - mask.leading_zeros());
        for bit in 0..bits {
            tainted.add(
                &[("flag", &kernel::taint_flag(bit))],
                f64::from(u8::from(mask & (1 << bit) != 0)),
            );
        }
    }
    families.push(tainted);
}
