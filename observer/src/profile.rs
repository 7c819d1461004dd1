//! `observer profile`: integrity-check cost per module and in total, from live loads.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::bail;

use crate::{
    cli::ProfileFormat,
    merkle,
    modules::{self, LoadRecord},
    privileges,
    start::{self, Selection, Started},
};

/// What `observer profile` loads: the module family alone.
pub const COLLECTORS: &[&str] = &[modules::FAMILY.name];

/// Order statistics of a set of durations, in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    pub count: usize,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub sum_ns: u64,
}

impl Stats {
    pub fn of(mut values: Vec<u64>) -> Self {
        values.sort_unstable();
        // Nearest-rank percentiles: the smallest value with at least p% of the values at or below.
        let rank = |p: usize| values[(values.len() * p).div_ceil(100).max(1) - 1];
        if values.is_empty() {
            return Self::default();
        }
        Self {
            count: values.len(),
            p50_ns: rank(50),
            p90_ns: rank(90),
            p99_ns: rank(99),
            max_ns: *values.last().unwrap_or(&0),
            sum_ns: values.iter().sum(),
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ns as f64 / self.count as f64)
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub loads: usize,
    pub load: Stats,
    /// Integrity-check time by method (signature, hash, and IMA's ima_hash, ima_signature).
    pub integrity: BTreeMap<&'static str, Stats>,
    /// Integrity-check time as a share of whole-load time (0..1), over loads that had a check.
    pub integrity_share_of_load: Option<f64>,
    /// Mean hash-check time over mean signature-check time, when both were seen.
    pub hash_to_signature_ratio: Option<f64>,
    /// Mean IMA hash check (appraisal of the file's read) over mean signature check, when both
    /// were seen: a hash-based module check measured on a released kernel.
    pub ima_hash_to_signature_ratio: Option<f64>,
    /// Mean time per phase over the loads where it ran (decompress, parse, digest, key_lookup,
    /// public_key_verify, other).
    pub phases_mean_ns: BTreeMap<&'static str, f64>,
    /// What a hash-based check would cost instead of the signature check, from the measured parts.
    pub hash_estimate: Option<HashEstimate>,
    /// The estimate over the measured hash check, where a kernel has both (the hash-based patch
    /// set): how far the estimate is off (1.0: exact).
    pub estimated_to_measured_hash_ratio: Option<f64>,
    /// Loads by reason (`verified`, `unknown_key`, ...), the signers and key ids named, and the
    /// digests the checks computed (`algorithm:hex`).
    pub reasons: BTreeMap<&'static str, usize>,
    pub signers: BTreeSet<String>,
    pub key_ids: BTreeSet<String>,
    pub digests: BTreeSet<String>,
}

/// A Merkle-tree check still hashes the whole module (the measured `digest` phase) and then
/// `levels` node hashes of 64 bytes (two SHA-256 children) up to the root built into the kernel.
/// The per-node cost comes from the same digest: SHA-256 works in 64-byte blocks, so a node
/// (two blocks with padding) costs what two blocks of the module cost.
#[derive(Clone, Debug, Serialize)]
pub struct HashEstimate {
    pub merkle_leaves: u64,
    pub merkle_levels: u32,
    pub digest_ns: f64,
    pub per_node_ns: f64,
    pub estimated_hash_check_ns: f64,
    pub measured_signature_check_ns: f64,
    /// Estimated hash check over measured signature check.
    pub estimated_to_signature_ratio: f64,
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn estimate(loads: &[&LoadRecord], leaves: Option<u64>) -> Option<HashEstimate> {
    let leaves = leaves?;
    let signed: Vec<&&LoadRecord> = loads
        .iter()
        .filter(|l| {
            l.method == "signature" && l.phases_ns.contains_key("digest") && l.hashed_bytes > 0
        })
        .collect();
    let digest = mean(
        &signed
            .iter()
            .map(|l| l.phases_ns["digest"] as f64)
            .collect::<Vec<_>>(),
    )?;
    let per_node = mean(
        &signed
            .iter()
            .filter_map(|l| merkle::per_node_ns(l.phases_ns["digest"], l.hashed_bytes))
            .collect::<Vec<_>>(),
    )?;
    let signature = mean(
        &signed
            .iter()
            .filter_map(|l| l.integrity_check_ns)
            .map(|ns| ns as f64)
            .collect::<Vec<_>>(),
    )?;
    let levels = merkle::levels(leaves);
    let estimated = merkle::estimate_ns(digest, per_node, levels);
    Some(HashEstimate {
        merkle_leaves: leaves,
        merkle_levels: levels,
        digest_ns: digest,
        per_node_ns: per_node,
        estimated_hash_check_ns: estimated,
        measured_signature_check_ns: signature,
        estimated_to_signature_ratio: if signature > 0.0 {
            estimated / signature
        } else {
            0.0
        },
    })
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub duration_seconds: f64,
    pub modules: Vec<ModuleReport>,
    pub total: ModuleReport,
}

fn summarize(module: &str, loads: &[&LoadRecord], leaves: Option<u64>) -> ModuleReport {
    let mut integrity: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let (mut checked_load_ns, mut check_ns) = (0u64, 0u64);
    for load in loads {
        if let Some(ns) = load.integrity_check_ns {
            integrity.entry(load.method).or_default().push(ns);
            checked_load_ns += load.total_ns;
            check_ns += ns;
        }
        // IMA's check runs before load_module: not part of the load's time or its share.
        if let Some(ima) = &load.ima {
            integrity.entry(ima.method).or_default().push(ima.check_ns);
        }
    }
    let integrity: BTreeMap<&'static str, Stats> = integrity
        .into_iter()
        .map(|(m, v)| (m, Stats::of(v)))
        .collect();
    let to_signature = |method: &str| match (
        integrity.get(method).and_then(Stats::mean),
        integrity.get("signature").and_then(Stats::mean),
    ) {
        (Some(check), Some(signature)) if signature > 0.0 => Some(check / signature),
        _ => None,
    };
    let (hash_to_signature_ratio, ima_hash_to_signature_ratio) =
        (to_signature("hash"), to_signature("ima_hash"));
    let mut phase_values: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for load in loads {
        for (phase, ns) in &load.phases_ns {
            phase_values.entry(phase).or_default().push(*ns as f64);
        }
    }
    let hash_estimate = estimate(loads, leaves);
    let estimated_to_measured_hash_ratio = hash_estimate
        .as_ref()
        .zip(integrity.get("hash").and_then(Stats::mean))
        .filter(|(_, measured)| *measured > 0.0)
        .map(|(e, measured)| e.estimated_hash_check_ns / measured);
    let mut reasons: BTreeMap<&'static str, usize> = BTreeMap::new();
    let (mut signers, mut key_ids, mut digests) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for load in loads {
        *reasons.entry(load.reason).or_default() += 1;
        signers.extend(load.signer.clone());
        key_ids.extend(load.key.as_ref().map(|k| k.key_id.clone()));
        if let Some(digest) = &load.digest {
            let algo = load.hash_algo.as_deref().unwrap_or("unknown");
            digests.insert(format!("{algo}:{digest}"));
        }
    }
    ModuleReport {
        reasons,
        signers,
        key_ids,
        digests,
        phases_mean_ns: phase_values
            .iter()
            .filter_map(|(p, v)| Some((*p, mean(v)?)))
            .collect(),
        estimated_to_measured_hash_ratio,
        hash_estimate,
        module: module.to_owned(),
        loads: loads.len(),
        load: Stats::of(loads.iter().map(|l| l.total_ns).collect()),
        integrity,
        integrity_share_of_load: (checked_load_ns > 0)
            .then(|| check_ns as f64 / checked_load_ns as f64),
        hash_to_signature_ratio,
        ima_hash_to_signature_ratio,
    }
}

/// `leaves`: the number of modules a Merkle tree would cover (this kernel's module count).
pub fn report(samples: &[LoadRecord], duration_seconds: f64, leaves: Option<u64>) -> Report {
    let mut by_module: BTreeMap<&str, Vec<&LoadRecord>> = BTreeMap::new();
    for sample in samples {
        by_module.entry(&sample.module).or_default().push(sample);
    }
    let modules = by_module
        .iter()
        .map(|(m, loads)| summarize(m, loads, leaves))
        .collect();
    let all: Vec<&LoadRecord> = samples.iter().collect();
    Report {
        duration_seconds,
        modules,
        total: summarize("(total)", &all, leaves),
    }
}

/// A module's reasons, signers, key ids and digests, on one indented line (none for the total).
fn verdict_line(m: &ModuleReport) -> String {
    if m.module == "(total)" {
        return String::new();
    }
    let reasons: Vec<String> = m.reasons.iter().map(|(r, n)| format!("{r} x{n}")).collect();
    let list = |set: &BTreeSet<String>| {
        if set.is_empty() {
            "-".to_owned()
        } else {
            set.iter().cloned().collect::<Vec<_>>().join(", ")
        }
    };
    format!(
        "    reasons: {}; signer: {}; key id: {}; digest: {}\n",
        reasons.join(", "),
        list(&m.signers),
        list(&m.key_ids),
        list(&m.digests)
    )
}

fn us(ns: u64) -> String {
    format!("{:.1}", ns as f64 / 1000.0)
}

/// The report as a table: one line per module and method, then the totals.
pub fn text(report: &Report) -> String {
    let mut out = format!(
        "module loads watched for {:.1}s: {} loads\n{:<24} {:>5} {:<9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
        report.duration_seconds,
        report.total.loads,
        "MODULE",
        "LOADS",
        "METHOD",
        "CHECKS",
        "P50_US",
        "P90_US",
        "P99_US",
        "MAX_US",
        "SHARE",
    );
    for m in report.modules.iter().chain(std::iter::once(&report.total)) {
        if m.integrity.is_empty() {
            out.push_str(&format!("{:<24} {:>5} {:<9}\n", m.module, m.loads, "none"));
        }
        for (method, s) in &m.integrity {
            let share = m
                .integrity_share_of_load
                .map_or_else(|| "-".into(), |s| format!("{:.1}%", s * 100.0));
            out.push_str(&format!(
                "{:<24} {:>5} {:<9} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}\n",
                m.module,
                m.loads,
                method,
                s.count,
                us(s.p50_ns),
                us(s.p90_ns),
                us(s.p99_ns),
                us(s.max_ns),
                share
            ));
        }
        out.push_str(&verdict_line(m));
    }
    match report.total.hash_to_signature_ratio {
        Some(ratio) => out.push_str(&format!(
            "hash/signature check time (measured): {ratio:.3}\n"
        )),
        None => out.push_str(
            "hash/signature check time (measured): needs loads checked by both methods\n",
        ),
    }
    out.push_str(&format!("\n{:<24} {}\n", "MODULE", "MEAN PHASE TIME (us)"));
    for m in report.modules.iter().chain(std::iter::once(&report.total)) {
        if m.phases_mean_ns.is_empty() {
            continue;
        }
        let phases: Vec<String> = m
            .phases_mean_ns
            .iter()
            .map(|(p, ns)| format!("{p}={:.1}", ns / 1000.0))
            .collect();
        out.push_str(&format!("{:<24} {}\n", m.module, phases.join(" ")));
    }
    out.push_str(&format!(
        "\n{:<24} {:>10} {:>10} {:>12} {:>12} {:>8}\n",
        "MODULE", "DIGEST_US", "NODE_US", "EST_HASH_US", "SIG_US", "RATIO"
    ));
    for m in report.modules.iter().chain(std::iter::once(&report.total)) {
        if let Some(e) = &m.hash_estimate {
            out.push_str(&format!(
                "{:<24} {:>10.1} {:>10.3} {:>12.1} {:>12.1} {:>8.3}\n",
                m.module,
                e.digest_ns / 1000.0,
                e.per_node_ns / 1000.0,
                e.estimated_hash_check_ns / 1000.0,
                e.measured_signature_check_ns / 1000.0,
                e.estimated_to_signature_ratio
            ));
        }
    }
    match &report.total.hash_estimate {
        Some(e) => out.push_str(&format!(
            "estimated hash-based check = digest + {} levels x per-node cost ({} modules): {:.3} of the signature check\n",
            e.merkle_levels, e.merkle_leaves, e.estimated_to_signature_ratio
        )),
        None => out.push_str("estimated hash-based check: needs signed loads with a timed digest, and the module count\n"),
    }
    // A kernel with the hash-based patch set measures what the estimate predicts.
    if let (Some(ratio), Some(e), Some(measured)) = (
        report.total.estimated_to_measured_hash_ratio,
        &report.total.hash_estimate,
        report.total.integrity.get("hash").and_then(Stats::mean),
    ) {
        out.push_str(&format!(
            "estimated hash check {:.1} us against measured {:.1} us: estimate/measured {ratio:.3} ({:+.1}%)\n",
            e.estimated_hash_check_ns / 1000.0,
            measured / 1000.0,
            (ratio - 1.0) * 100.0
        ));
    }
    out.push_str(&hash_checks_side_by_side(report));
    out
}

/// The same module's measured IMA hash check, measured signature check and estimated Merkle
/// check, side by side (mean microseconds; "-" where that check did not run).
fn hash_checks_side_by_side(report: &Report) -> String {
    let mut out = format!(
        "\n{:<24} {:>12} {:>12} {:>14} {:>8} {:>11}\n",
        "MODULE", "IMA_HASH_US", "SIG_US", "EST_MERKLE_US", "IMA/SIG", "MERKLE/SIG"
    );
    let cell = |value: Option<f64>, scale: f64, precision: usize| {
        value.map_or_else(|| "-".to_owned(), |v| format!("{:.precision$}", v / scale))
    };
    for m in report.modules.iter().chain(std::iter::once(&report.total)) {
        let ima = m.integrity.get("ima_hash").and_then(Stats::mean);
        if ima.is_none() {
            continue;
        }
        let signature = m.integrity.get("signature").and_then(Stats::mean);
        let merkle = m.hash_estimate.as_ref();
        out.push_str(&format!(
            "{:<24} {:>12} {:>12} {:>14} {:>8} {:>11}\n",
            m.module,
            cell(ima, 1000.0, 1),
            cell(signature, 1000.0, 1),
            cell(merkle.map(|e| e.estimated_hash_check_ns), 1000.0, 1),
            cell(m.ima_hash_to_signature_ratio, 1.0, 3),
            cell(merkle.map(|e| e.estimated_to_signature_ratio), 1.0, 3),
        ));
    }
    match report.total.ima_hash_to_signature_ratio {
        Some(ratio) => out.push_str(&format!(
            "IMA hash check/signature check time (measured): {ratio:.3}\n"
        )),
        None => out.push_str(
            "IMA hash check/signature check time (measured): needs loads IMA appraised (policy \
             `appraise func=MODULE_CHECK`, a digest in security.ima) and signature-checked\n",
        ),
    }
    out
}

/// `observer profile`: watches module loads for `duration`, then prints the report.
pub fn run(
    selection: &Selection<'_>,
    duration: Duration,
    format: ProfileFormat,
    leaves: Option<u64>,
) -> anyhow::Result<()> {
    privileges::check()?;
    crate::memlock::raise_for_maps(&crate::kernel::release());
    let Started { ebpf, agent, rings } = start::start(selection)?;
    if !agent
        .probes
        .iter()
        .any(|p| p.probe == "module_load" && p.attached)
    {
        bail!("module loads cannot be observed on this kernel (see `observer probes`)");
    }
    eprintln!(
        "watching module loads for {}s (Ctrl-C to stop early)",
        duration.as_secs_f64()
    );
    let started = std::time::Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = crate::pipeline::Reader::new(rings, agent.clone(), None).spawn(stop.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            () = tokio::time::sleep(duration) => Ok(()),
            signal = crate::shutdown_signal() => signal.map(|_| ()),
        }
    });
    // Loads that finished just before the end are in the ring buffer still: the reader takes
    // them in before it ends.
    stop.store(true, Ordering::Relaxed);
    if reader.join().is_err() {
        bail!("the ring buffer reader panicked");
    }
    result?;
    let elapsed = started.elapsed().as_secs_f64();
    let samples = selection
        .samples
        .as_ref()
        .map(|s| std::mem::take(&mut *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)))
        .unwrap_or_default();
    let report = report(&samples, elapsed, leaves);
    match format {
        ProfileFormat::Text => print!("{}", text(&report)),
        ProfileFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    drop(agent);
    drop(ebpf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::ImaVerdict;

    fn record(module: &str, method: &'static str, total_ns: u64, check: Option<u64>) -> LoadRecord {
        LoadRecord {
            module: module.into(),
            outcome: "loaded",
            method,
            reason: "verified",
            signer: None,
            key: None,
            hash_algo: None,
            digest: None,
            digest_of: None,
            requested_by: None,
            out_of_tree: false,
            syscall: Some("finit_module"),
            result: "ok".into(),
            total_ns,
            ran_load_module: true,
            sig_check_ns: check,
            integrity_check_ns: check,
            integrity_check_result: check.map(|_| "ok"),
            ima: None,
            phases_ns: check
                .map(|c| [("digest", c / 2), ("other", c / 2)].into_iter().collect())
                .unwrap_or_default(),
            hashed_bytes: 6400,
            taints: String::new(),
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = Stats::of((1..=100).collect());
        assert_eq!(
            (s.count, s.p50_ns, s.p90_ns, s.p99_ns, s.max_ns, s.sum_ns),
            (100, 50, 90, 99, 100, 5050)
        );
        assert_eq!(Stats::of(vec![7]).p99_ns, 7);
        assert_eq!(Stats::of(vec![]), Stats::default());
    }

    #[test]
    fn ima_beside_signature_and_merkle() {
        let mut load = record("a", "signature", 1000, Some(400));
        load.ima = Some(ImaVerdict {
            method: "ima_hash",
            result: "ok",
            check_ns: 100,
            hash_algo: None,
            digest: None,
        });
        let r = report(&[load], 1.0, Some(4256));
        assert_eq!(r.modules[0].ima_hash_to_signature_ratio, Some(0.25));
        assert_eq!(r.modules[0].integrity["ima_hash"].count, 1);
        let text = text(&r);
        assert!(text.contains("IMA hash check/signature check time (measured): 0.250"));
        assert!(
            text.lines()
                .any(|l| l.starts_with('a') && l.contains(" 0.1 ") && l.contains(" 0.4 ")),
            "{text}"
        );
    }

    #[test]
    fn shares_and_ratio() {
        let samples = vec![
            record("a", "signature", 1000, Some(400)),
            record("a", "signature", 1000, Some(600)),
            record("b", "hash", 1000, Some(100)),
            record("c", "none", 1000, None),
        ];
        let r = report(&samples, 1.0, Some(4256));
        let a = &r.modules[0];
        assert_eq!(a.integrity["signature"].count, 2);
        assert_eq!(a.integrity_share_of_load, Some(0.5));
        assert_eq!(r.total.hash_to_signature_ratio, Some(0.2));
        assert_eq!(r.total.loads, 4);
        let text = text(&r);
        assert!(text.contains("hash/signature check time (measured): 0.200"));
        // The estimate from a's digests (250 ns + 13 levels of 5 ns) against b's 100 ns.
        assert_eq!(r.total.estimated_to_measured_hash_ratio, Some(3.15));
        assert!(
            text.contains("estimated hash check 0.3 us against measured 0.1 us: estimate/measured 3.150 (+215.0%)"),
            "{text}"
        );
    }

    #[test]
    fn the_hash_estimate_adds_merkle_nodes_to_the_digest() {
        // Two loads: digest 200 and 300 ns over 6400 bytes (100 blocks): 2 blocks per node.
        let samples = vec![
            record("a", "signature", 1000, Some(400)),
            record("a", "signature", 1000, Some(600)),
        ];
        let e = report(&samples, 1.0, Some(4256))
            .total
            .hash_estimate
            .unwrap();
        assert_eq!(e.digest_ns, 250.0);
        assert_eq!(e.per_node_ns, 5.0);
        assert_eq!(e.estimated_hash_check_ns, 250.0 + 13.0 * 5.0);
        assert_eq!(e.measured_signature_check_ns, 500.0);
        assert_eq!(e.estimated_to_signature_ratio, 315.0 / 500.0);
        assert!(report(&samples, 1.0, None).total.hash_estimate.is_none());
    }
}
