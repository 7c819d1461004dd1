//! The modules already loaded when the agent starts: udev's coldplug, `systemd-modules-load`
//! and the initramfs load most of a host's modules before any service runs, and each agent
//! restart leaves a gap. What the kernel still tells about them (`/proc/modules`: name, size,
//! state and taint letters such as E and O) becomes one `module_present` event each and a
//! count by taint, so that "an unsigned module was loaded before the agent started" is an alert
//! like any other.
//!
//! The inventory is read once the programs are attached and published a moment later: a load
//! the programs saw in between (its record arrives after the module is already listed live) is
//! that load's, not the inventory's.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::metrics::Family;

/// How long after reading `/proc/modules` the inventory waits for the records of loads that
/// were ending while it was read (a record is sent a few microseconds after its module is
/// listed live; the ring is drained at least every second).
const SETTLE: Duration = Duration::from_secs(2);
/// Names of loads seen since start that are kept for that comparison.
const SEEN_NAMES: usize = 4096;

/// One line of `/proc/modules`: `name size refcount deps state address [(taints)]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Present {
    pub module: String,
    pub size_bytes: u64,
    /// `live`, `loading` (its load in progress when the agent started) or `unloading`.
    pub state: String,
    /// The kernel's taint letters for this module (`E`: unsigned or untrusted, `O`: out of
    /// tree), comma-separated as on load events; empty when untainted.
    pub taints: String,
    pub out_of_tree: bool,
}

pub fn parse_proc_modules(text: &str) -> Vec<Present> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (module, size, state) = (fields.first()?, fields.get(1)?, fields.get(4)?);
            let letters = fields
                .get(6)
                .and_then(|t| t.strip_prefix('(')?.strip_suffix(')'))
                .unwrap_or("");
            let mut letters: Vec<char> = letters.chars().collect();
            letters.sort_unstable();
            Some(Present {
                module: (*module).to_owned(),
                size_bytes: size.parse().ok()?,
                state: state.to_ascii_lowercase(),
                out_of_tree: letters.contains(&'O'),
                taints: letters
                    .iter()
                    .map(char::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            })
        })
        .collect()
}

/// The inventory's life: read after attach, published once settled.
#[derive(Debug, Default)]
pub struct Inventory {
    read: Option<(Instant, Vec<Present>)>,
    /// Modules present at start by their taint letters ("" untainted), once published.
    by_taint: Option<BTreeMap<String, u64>>,
    /// Modules whose load the programs saw while the inventory waited (at most
    /// [`SEEN_NAMES`]).
    loaded: BTreeSet<String>,
}

impl Inventory {
    /// Reads `/proc/modules`. A kernel without module support has none: an empty inventory,
    /// at once (no load can be on its way).
    pub fn take(&mut self) {
        match std::fs::read_to_string("/proc/modules") {
            Ok(text) => self.read = Some((Instant::now(), parse_proc_modules(&text))),
            Err(_) => self.by_taint = Some(BTreeMap::new()),
        }
    }

    /// A load the programs saw: not the inventory's (kept only while the inventory waits).
    pub fn saw_load(&mut self, module: &str) {
        if self.read.is_some() && self.loaded.len() < SEEN_NAMES {
            self.loaded.insert(module.to_owned());
        }
    }

    /// Once settled, the modules present at start (each once), for their events; `watched`:
    /// the modules whose load the kernel programs saw (programs pinned by an earlier agent
    /// saw loads while no agent ran), not present "before".
    pub fn publish(&mut self, watched: &BTreeSet<String>) -> Vec<Present> {
        self.publish_at(Instant::now(), watched)
    }

    fn publish_at(&mut self, now: Instant, watched: &BTreeSet<String>) -> Vec<Present> {
        let settled = self
            .read
            .as_ref()
            .is_some_and(|(read_at, _)| now.duration_since(*read_at) >= SETTLE);
        let Some((_, modules)) = self.read.take_if(|_| settled) else {
            return Vec::new();
        };
        let present: Vec<Present> = modules
            .into_iter()
            .filter(|m| !self.loaded.contains(&m.module) && !watched.contains(&m.module))
            .collect();
        let mut by_taint = BTreeMap::new();
        for module in &present {
            *by_taint.entry(module.taints.replace(',', "")).or_insert(0) += 1;
        }
        self.by_taint = Some(by_taint);
        self.loaded.clear();
        present
    }

    pub fn gather(&self, families: &mut Vec<Family>) {
        let Some(by_taint) = &self.by_taint else {
            return;
        };
        let mut present = Family::gauge(
            "modules_present_at_start",
            "Modules loaded before the agent started (listed in /proc/modules then, their loads \
             unseen), by their taint letters: none, E (unsigned or signed by an untrusted key), O \
             (out of tree), OE... Built-in modules are part of the kernel image and not counted.",
        );
        // The untainted count always, so that an alert on the others has a series to compare.
        present.add(&[("taint", "none")], *by_taint.get("").unwrap_or(&0) as f64);
        for (taint, count) in by_taint.iter().filter(|(t, _)| !t.is_empty()) {
            present.add(&[("taint", taint)], *count as f64);
        }
        families.push(present);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_MODULES: &str = "crc8 12288 0 - Live 0x0000000000000000 (OE)\n\
        can_raw 20480 0 - Live 0xffffffffc0a2c000\n\
        can 28672 1 can_raw, Live 0xffffffffc0a1e000\n\
        crc7 12288 0 - Loading 0x0000000000000000 (E)\n";

    #[test]
    fn proc_modules_lines() {
        let modules = parse_proc_modules(PROC_MODULES);
        assert_eq!(modules.len(), 4);
        assert_eq!(
            modules[0],
            Present {
                module: "crc8".into(),
                size_bytes: 12288,
                state: "live".into(),
                taints: "E,O".into(),
                out_of_tree: true,
            }
        );
        assert_eq!(
            (modules[1].taints.as_str(), modules[1].out_of_tree),
            ("", false)
        );
        assert_eq!(modules[3].state, "loading");
        assert!(parse_proc_modules("garbage\n").is_empty());
    }

    #[test]
    fn a_load_seen_is_not_present_and_the_counts_wait_to_settle() {
        let mut inventory = Inventory::default();
        let start = Instant::now();
        inventory.read = Some((start, parse_proc_modules(PROC_MODULES)));
        inventory.saw_load("can_raw");
        let watched = BTreeSet::from(["can".to_owned()]);
        assert!(
            inventory.publish_at(start, &watched).is_empty(),
            "not settled yet"
        );
        let present = inventory.publish_at(start + SETTLE, &watched);
        let names: Vec<&str> = present.iter().map(|m| m.module.as_str()).collect();
        assert_eq!(names, ["crc8", "crc7"]);
        assert_eq!(
            inventory.by_taint,
            Some(BTreeMap::from([("E".into(), 1), ("EO".into(), 1)]))
        );
        assert!(
            inventory
                .publish_at(start + SETTLE * 2, &watched)
                .is_empty(),
            "once"
        );
        let mut out = Vec::new();
        inventory.gather(&mut out);
        assert_eq!(out.len(), 1);
    }
}
