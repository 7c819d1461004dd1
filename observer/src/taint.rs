//! Kernel taint: the flags set now (read at scrape time) and the taints added while watched,
//! each with the module whose load added it.

use std::{
    any::Any,
    collections::{BTreeMap, HashSet},
};

use observer_common::{
    EventKind,
    taint::{MODULE_FROM_FILE, MODULE_FROM_NAME, NAMES, TaintEvent},
};

use crate::{
    family::{Context, EventFields, HookFamily, RecordKind, Registration, no_flags},
    kernel,
    metrics::Family,
    plan::{Hook, fentry},
    record::{comm_str, module_name_from_file, read_record},
};

pub const FAMILY: Registration = Registration {
    name: "taint",
    about: "kernel taint flags, and each taint added with the module that caused it",
    names: &NAMES,
    flags: no_flags,
    build: TaintFamily::build,
};

const RECORDS: &[RecordKind] = &[RecordKind::of::<TaintEvent>(EventKind::Taint)];

/// Distinct module names that get their own series; later ones share `module="other"`.
const MAX_MODULE_LABELS: usize = 512;

#[derive(Default)]
pub struct TaintFamily {
    /// Taints added, by flag letter and module (empty outside a module load).
    events: BTreeMap<(String, String), u64>,
    module_labels: HashSet<String>,
}

impl TaintFamily {
    fn build(_context: &Context<'_>) -> anyhow::Result<Box<dyn HookFamily>> {
        Ok(Box::new(Self::default()))
    }

    fn module_label(&mut self, name: String) -> String {
        if self.module_labels.contains(&name) || self.module_labels.len() < MAX_MODULE_LABELS {
            self.module_labels.insert(name.clone());
            name
        } else {
            "other".into()
        }
    }
}

/// The module an event names, as the kernel spells module names.
fn module_of(event: &TaintEvent) -> String {
    match event.module_source {
        MODULE_FROM_NAME => comm_str(&event.module),
        MODULE_FROM_FILE => module_name_from_file(&event.module).unwrap_or_default(),
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

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn decode(&mut self, _kind: EventKind, bytes: &[u8], want_event: bool) -> Option<EventFields> {
        let event = read_record::<TaintEvent>(bytes)?;
        let flag = kernel::taint_flag(event.flag);
        let module = module_of(&event);
        let label = if module.is_empty() {
            module.clone()
        } else {
            self.module_label(module.clone())
        };
        *self.events.entry((flag.clone(), label)).or_default() += 1;
        let mut fields = EventFields::new();
        fields.insert("flag".into(), flag.into());
        if !module.is_empty() {
            fields.insert("module".into(), module.into());
        }
        want_event.then_some(fields)
    }

    fn collect(&self, out: &mut Vec<Family>) {
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
        out.push(tainted);

        let mut events = Family::counter(
            "kernel_taint_events_total",
            "Taints added while watched, by flag; module names the module whose load caused it (empty otherwise).",
        );
        for ((flag, module), count) in &self.events {
            events.add(&[("flag", flag), ("module", module)], *count as f64);
        }
        out.push(events);
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
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
    fn taints_name_their_module_from_its_name_or_file() {
        let mut family = TaintFamily::default();
        let fields = family
            .decode(
                EventKind::Taint,
                &taint(13, MODULE_FROM_NAME, b"crc7"),
                true,
            )
            .unwrap();
        assert_eq!(fields["flag"], "E");
        assert_eq!(fields["module"], "crc7");
        family.decode(
            EventKind::Taint,
            &taint(12, MODULE_FROM_FILE, b"crc-itu-t.ko.xz"),
            false,
        );
        let outside = family
            .decode(EventKind::Taint, &taint(13, MODULE_NONE, b""), true)
            .unwrap();
        assert!(!outside.contains_key("module"), "no filler for no module");
        let counts: Vec<_> = family.events.iter().collect();
        assert_eq!(
            counts,
            [
                (&("E".into(), String::new()), &1),
                (&("E".into(), "crc7".into()), &1),
                (&("O".into(), "crc_itu_t".into()), &1),
            ]
        );
    }

    #[test]
    fn module_labels_are_capped() {
        let mut family = TaintFamily::default();
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
    }
}
