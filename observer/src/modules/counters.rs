//! The module family's counters kept in the kernel, and the metrics they make.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use observer_common::modules::{
    AUTOLOADS_MAP, METHODS, NAME_LEN, OUTCOMES, REASONS, SIGNERS_MAP, SIGNERS_OTHER_MAP,
    SYSCALL_NAMES, SYSCALL_SLOTS, SYSCALLS_MAP, VERDICT_SLOTS, VERDICTS_MAP, WATCHED_MAP,
    shown_from_start, verdict_of_slot,
};

use super::signers;
use crate::{
    kernel,
    maps::{self, Maps},
    metrics::{Family, add_syscall_results},
};

/// The counters kept in the kernel: verdicts, signers, syscall results, autoload requests.
pub struct ModuleMaps {
    autoloads: PerCpuArray<MapData, u64>,
    verdicts: PerCpuArray<MapData, u64>,
    signers: PerCpuHashMap<MapData, i32, u64>,
    signers_other: PerCpuArray<MapData, u64>,
    syscalls: PerCpuArray<MapData, u64>,
    watched: HashMap<MapData, [u8; NAME_LEN], u64>,
}

impl ModuleMaps {
    pub fn take(maps: &mut Maps<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            autoloads: maps.per_cpu_array(AUTOLOADS_MAP)?,
            verdicts: maps.per_cpu_array(VERDICTS_MAP)?,
            signers: maps.per_cpu_hash(SIGNERS_MAP)?,
            signers_other: maps.per_cpu_array(SIGNERS_OTHER_MAP)?,
            syscalls: maps.per_cpu_array(SYSCALLS_MAP)?,
            watched: HashMap::try_from(maps.take(WATCHED_MAP)?)
                .with_context(|| format!("map {WATCHED_MAP}"))?,
        })
    }

    /// The modules whose load a program saw complete (also programs pinned by an earlier
    /// agent, while none ran).
    pub fn watched_names(&self) -> BTreeSet<String> {
        self.watched
            .keys()
            .filter_map(Result::ok)
            .map(|name| crate::record::comm_str(&name))
            .collect()
    }

    pub fn gather(
        &self,
        families: &mut Vec<Family>,
        keys: &signers::KeyNames,
    ) -> anyhow::Result<()> {
        let mut loads = Family::counter(
            "module_loads_total",
            "Module load attempts, counted in the kernel, by outcome (loaded; rejected_signature, \
             rejected_lockdown: by the signature policy; rejected_ima: IMA's appraisal of the read; \
             rejected_lsm: a security module refused the module's data; rejected_permission: no \
             CAP_SYS_MODULE or kernel.modules_disabled=1; duplicate: the module was loaded or being \
             loaded already; failed), integrity method (signature, hash, none: no signature or \
             proof was checked) and reason (what the check found: verified, unsigned, unknown_key, \
             unsupported_crypto, bad_signature, malformed, error; or what refused it: enforced, \
             lockdown, ima_appraisal, ima_init_module, lsm, permission; none: no check ran).",
        );
        let verdicts = maps::sum_per_cpu(&self.verdicts, VERDICT_SLOTS)?;
        // Every verdict seen, and from the start (zeros included, so that rates and alerts see
        // the first increment) the usual ones: 29 series, not all 336 combinations.
        for (slot, count) in verdicts.iter().enumerate() {
            if *count == 0 && !shown_from_start(slot as u32) {
                continue;
            }
            let (outcome, method, reason) = verdict_of_slot(slot as u32);
            loads.add(
                &[
                    ("outcome", OUTCOMES[outcome as usize]),
                    ("method", METHODS[method as usize]),
                    ("reason", REASONS[reason as usize]),
                ],
                *count as f64,
            );
        }
        families.push(loads);

        let mut by_signer = Family::counter(
            "module_loads_by_signer_total",
            "Loads whose signature verified, counted in the kernel by the trusted key that \
             verified it (its description in /proc/keys); keys past the first 16 count as other.",
        );
        let mut named: BTreeMap<String, u64> = BTreeMap::new();
        for (serial, count) in maps::sum_per_cpu_hash(&self.signers)? {
            *named.entry(keys.name(serial)).or_default() += count;
        }
        named.insert(
            "other".into(),
            maps::sum_per_cpu(&self.signers_other, 1)?[0],
        );
        for (signer, count) in &named {
            by_signer.add(&[("signer", signer)], *count as f64);
        }
        families.push(by_signer);

        let mut calls = Family::counter(
            "module_syscalls_total",
            "init_module and finit_module calls by result (ok, or the errno), counted at their exit.",
        );
        let counts = maps::sum_per_cpu(&self.syscalls, SYSCALL_SLOTS)?;
        add_syscall_results(&mut calls, &counts, &SYSCALL_NAMES);
        families.push(calls);

        families.push(
            Family::counter(
                "module_autoload_requests_total",
                "Requests to load a module on demand (request_module).",
            )
            .single(maps::sum_per_cpu(&self.autoloads, 1)?[0] as f64),
        );
        let mut disabled = Family::gauge(
            "modules_disabled",
            "1 when kernel.modules_disabled is set: no module can be loaded until reboot.",
        );
        if let Some(value) = kernel::modules_disabled() {
            disabled.add(&[], f64::from(u8::from(value)));
        }
        families.push(disabled);
        Ok(())
    }
}
