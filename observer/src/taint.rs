//! Kernel taint: the flags set now (read at scrape time) and the taints added while watched,
//! each with the module whose load added it, counted in the kernel (records add the event
//! stream's detail only).

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashSet},
};

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use observer_common::{
    EventKind,
    taint::{
        EVENTS_MAP, FLAG_SLOTS, MODULE_FROM_FILE, MODULE_FROM_NAME, NAMES, TaintEvent, TaintKey,
        UNATTRIBUTED_MAP,
    },
};

use crate::{
    family::{Context, Event, HookFamily, RecordKind, Registration, no_flags},
    kernel,
    maps::{self, Maps},
    metrics::Family,
    plan::{Hook, fentry},
    record::{comm_str, module_name_from_file, read_record},
};

pub const FAMILY: Registration = Registration {
    name: "taint",
    about: "kernel taint flags, and each taint added with the module that caused it",
    names: &NAMES,
    flags: no_flags,
    kept_pinned: true,
    build: TaintFamily::build,
};

const RECORDS: &[RecordKind] = &[RecordKind::of::<TaintEvent>(EventKind::Taint)];

/// Distinct module names that get their own series; later ones share `module="other"`.
const MAX_MODULE_LABELS: usize = 512;

#[derive(Default)]
pub struct TaintFamily {
    maps: Option<TaintMaps>,
    /// Module names given their own series, in the order first seen: a name keeps its series.
    module_labels: RefCell<HashSet<String>>,
}

struct TaintMaps {
    events: PerCpuHashMap<MapData, TaintKey, u64>,
    unattributed: PerCpuArray<MapData, u64>,
}

impl TaintFamily {
    fn build(_context: &Context<'_>) -> anyhow::Result<Box<dyn HookFamily>> {
        Ok(Box::new(Self::default()))
    }

    fn module_label(&self, name: String) -> String {
        let mut labels = self.module_labels.borrow_mut();
        if labels.contains(&name) || labels.len() < MAX_MODULE_LABELS {
            labels.insert(name.clone());
            name
        } else {
            "other".into()
        }
    }

    /// Taints by flag letter and module label, from the kernel's counts.
    fn counts(&self, maps: &TaintMaps) -> anyhow::Result<BTreeMap<(String, String), u64>> {
        let mut counts = BTreeMap::new();
        let mut entries = maps::sum_per_cpu_hash(&maps.events)?;
        // Names get their labels in a stable order when several are new at once.
        entries.sort_by_key(|(key, _)| key.module);
        for (key, count) in entries {
            let module = module_of(key.module_source, &key.module);
            // A taint no module caused (a warning, a forced load of nothing) is `none`, not an
            // empty label, which Prometheus reads as no label at all.
            let label = if module.is_empty() {
                "none".to_owned()
            } else {
                self.module_label(module)
            };
            *counts
                .entry((kernel::taint_flag(key.flag), label))
                .or_default() += count;
        }
        let unattributed = maps::sum_per_cpu(&maps.unattributed, FLAG_SLOTS)?;
        for (flag, count) in unattributed.iter().enumerate().filter(|(_, n)| **n > 0) {
            *counts
                .entry((kernel::taint_flag(flag as u32), "other".into()))
                .or_default() += count;
        }
        Ok(counts)
    }
}

/// A taint event: the flag's letter, and the module whose load set it, where one did.
#[derive(Debug, serde::Serialize)]
pub struct Tainted {
    pub flag: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Tainted {
    /// What a record says: a function of the record alone.
    fn from_record(record: &TaintEvent) -> Self {
        let module = module_of(record.module_source, &record.module);
        Self {
            flag: kernel::taint_flag(record.flag),
            module: (!module.is_empty()).then_some(module),
        }
    }
}

/// The module a taint names, as the kernel spells module names.
fn module_of(source: u32, module: &[u8]) -> String {
    match source {
        MODULE_FROM_NAME => comm_str(module),
        MODULE_FROM_FILE => module_name_from_file(module).unwrap_or_default(),
        _ => String::new(),
    }
}

impl HookFamily for TaintFamily {
    fn hooks(&self) -> Vec<Hook> {
        vec![Hook {
            name: "kernel_taint",
            options: vec![vec![fentry("taint_add_taint", "add_taint")]],
            requires: None,
        }]
    }

    fn take_maps(&mut self, maps: &mut Maps<'_>) -> anyhow::Result<()> {
        self.maps = Some(TaintMaps {
            events: maps.per_cpu_hash(EVENTS_MAP)?,
            unattributed: maps.per_cpu_array(UNATTRIBUTED_MAP)?,
        });
        Ok(())
    }

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn decode(&mut self, _kind: EventKind, bytes: &[u8], want_event: bool) -> Option<Event> {
        let tainted = Tainted::from_record(&read_record::<TaintEvent>(bytes)?);
        // Nothing to count from it here: the kernel counts every taint in its map (also those
        // whose record was lost), and the records add the stream's detail.
        want_event.then(|| Event::of("taint", &tainted)).flatten()
    }

    fn collect(&self, out: &mut Vec<Family>) -> anyhow::Result<()> {
        let mut tainted = Family::gauge(
            "kernel_tainted",
            "1 for each taint flag set in /proc/sys/kernel/tainted, 0 for the others: flag is the kernel's letter, name its meaning (include/linux/panic.h).",
        );
        if let Some(mask) = kernel::taint_mask() {
            let bits = (kernel::TAINT_FLAGS.len() as u32).max(64 - mask.leading_zeros());
            for bit in 0..bits {
                tainted.add(
                    &[
                        ("flag", &kernel::taint_flag(bit)),
                        ("name", &kernel::taint_name(bit)),
                    ],
                    f64::from(u8::from(mask & (1 << bit) != 0)),
                );
            }
        }
        out.push(tainted);

        let mut events = Family::counter(
            "kernel_taint_events_total",
            "Taints added while watched, counted in the kernel, by flag; module names the module whose load \
             caused it (empty otherwise; other past 512 names).",
        );
        if let Some(maps) = &self.maps {
            for ((flag, module), count) in self.counts(maps)? {
                events.add(&[("flag", &flag), ("module", &module)], count as f64);
            }
        }
        out.push(events);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use observer_common::{EventHeader, modules::NAME_LEN, taint::MODULE_NONE};

    use super::*;

    fn taint(flag: u32, source: u32, module: &[u8]) -> Vec<u8> {
        let mut name = [0u8; NAME_LEN];
        name[..module.len()].copy_from_slice(module);
        let event = TaintEvent {
            header: EventHeader {
                kind: EventKind::Taint as u32,
                pid: 1,
                tid: 1,
                ..EventHeader::default()
            },
            flag,
            module_source: source,
            module: name,
        };
        crate::record::record_bytes(&event)
    }

    #[test]
    fn taint_events_name_their_module_from_its_name_or_file() {
        let mut family = TaintFamily::default();
        let fields = family
            .decode(
                EventKind::Taint,
                &taint(13, MODULE_FROM_NAME, b"crc7"),
                true,
            )
            .unwrap();
        assert_eq!(fields.name, "taint");
        let fields = fields.fields;
        assert_eq!(fields["flag"], "E");
        assert_eq!(fields["module"], "crc7");
        let from_file = family
            .decode(
                EventKind::Taint,
                &taint(12, MODULE_FROM_FILE, b"crc-itu-t.ko.xz"),
                true,
            )
            .unwrap()
            .fields;
        assert_eq!(from_file["module"], "crc_itu_t");
        let outside = family
            .decode(EventKind::Taint, &taint(13, MODULE_NONE, b""), true)
            .unwrap()
            .fields;
        assert!(!outside.contains_key("module"), "no filler for no module");
        assert!(
            family
                .decode(EventKind::Taint, &taint(13, MODULE_NONE, b""), false)
                .is_none()
        );
    }

    #[test]
    fn module_labels_are_capped_and_kept() {
        let family = TaintFamily::default();
        for i in 0..(MAX_MODULE_LABELS + 10) {
            assert_eq!(
                family.module_label(format!("m{i}")),
                if i < MAX_MODULE_LABELS {
                    format!("m{i}")
                } else {
                    "other".into()
                }
            );
        }
        assert_eq!(family.module_label("m0".into()), "m0");
    }
}
