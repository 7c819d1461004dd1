//! What the observer's own programs cost and what the kernel skipped of them, from the
//! kernel's statistics of each program (`bpf_prog_info`, read through the program's fd at
//! every scrape).
//!
//! - Run time and count are kept by the kernel only while `kernel.bpf_stats_enabled` is 1
//!   (or a process holds a `BPF_ENABLE_STATS` descriptor): they cost two clock reads per run,
//!   so fleets switch them on when they look. The counters are exported always (what the
//!   kernel counted, 0 if it never did) with a gauge saying whether the sysctl is on.
//! - Missed runs (`recursion_misses`, 5.12+) are always kept: a tracing program is not run on
//!   a CPU where the same program is already running (a task preempted inside it, or the
//!   program's own hook reached from inside it). For a security program a missed run is a
//!   decision the observer may not have counted, so it has its own alert.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::programs::ProgramFd;
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

use crate::{metrics::Family, registry};

/// One loaded program: its name in the object, its collector, and a descriptor to ask by.
struct Loaded {
    name: String,
    collector: &'static str,
    fd: ProgramFd,
}

/// The loaded programs of the enabled collectors.
pub struct ProgramStats {
    programs: Vec<Loaded>,
}

/// What the kernel keeps of one program's runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runs {
    pub run_time_ns: u64,
    pub run_count: u64,
    /// `None` on kernels before 5.12, whose `bpf_prog_info` ends before the field.
    pub missed: Option<u64>,
}

impl ProgramStats {
    /// Every program of the object that is loaded (attached, or kept loaded for an attach
    /// still to come); programs whose attach failed were unloaded and have no descriptor.
    /// With `pinned`: the adopted programs an earlier agent pinned (not in this object).
    pub fn new(ebpf: &aya::Ebpf, pinned: Vec<(String, ProgramFd)>) -> Self {
        let mut programs: Vec<Loaded> = ebpf
            .programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?.try_clone().ok()?;
                Some(Loaded {
                    name: name.to_owned(),
                    collector: collector_of(name),
                    fd,
                })
            })
            .collect();
        for (name, fd) in pinned {
            let collector = collector_of(&name);
            programs.push(Loaded {
                name,
                collector,
                fd,
            });
        }
        programs.sort_by(|a, b| a.name.cmp(&b.name));
        Self { programs }
    }

    pub fn collect(&self, families: &mut Vec<Family>) -> anyhow::Result<()> {
        let mut enabled = Family::gauge(
            "bpf_stats_enabled",
            "1 while kernel.bpf_stats_enabled is on: the kernel then times every BPF program's runs (observer_bpf_program_run_seconds_total).",
        );
        enabled.add(&[], f64::from(u8::from(stats_enabled())));
        let mut seconds = Family::counter(
            "bpf_program_run_seconds_total",
            "Time the kernel spent running each of the observer's programs, counted while kernel.bpf_stats_enabled is on.",
        );
        let mut runs = Family::counter(
            "bpf_program_runs_total",
            "Runs of each of the observer's programs, counted while kernel.bpf_stats_enabled is on.",
        );
        let mut missed = Family::counter(
            "bpf_program_missed_runs_total",
            "Runs of each of the observer's programs that the kernel skipped because the same program was already running on that CPU (bpf_prog_info.recursion_misses, 5.12+). A security collector's missed run is a decision that may not have been counted.",
        );
        for program in &self.programs {
            let stats = runs_of(&program.fd)?;
            let labels = [
                ("collector", program.collector),
                ("program", program.name.as_str()),
            ];
            seconds.add(&labels, stats.run_time_ns as f64 / 1e9);
            runs.add(&labels, stats.run_count as f64);
            if let Some(count) = stats.missed {
                missed.add(&labels, count as f64);
            }
        }
        families.extend([enabled, seconds, runs, missed]);
        Ok(())
    }
}

/// The collector whose names list holds `program` (every program has one: a test checks the
/// object against the lists).
fn collector_of(program: &str) -> &'static str {
    registry::FAMILIES
        .iter()
        .find(|f| f.names.programs.contains(&program))
        .map_or("agent", |f| f.name)
}

fn stats_enabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() == "1")
}

/// The kernel's statistics of one program (`BPF_OBJ_GET_INFO_BY_FD`). The kernel fills as much
/// of the structure as it knows and says how much in `info_len`.
pub fn runs_of(fd: &ProgramFd) -> anyhow::Result<Runs> {
    // SAFETY: plain data; all zero is the kernel's "nothing asked for" in every field.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    let size = u32::try_from(size_of::<bpf_prog_info>())?;
    attr.info.bpf_fd = u32::try_from(fd.as_fd().as_raw_fd())?;
    attr.info.info_len = size;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: `attr` is a valid bpf_attr for this command, `info` outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            std::ptr::from_mut(&mut attr),
            size_of::<bpf_attr>(),
        )
    };
    if ret != 0 {
        anyhow::bail!(
            "reading a program's statistics (BPF_OBJ_GET_INFO_BY_FD): {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the union member this command filled.
    let filled = unsafe { attr.info.info_len } as usize;
    let end_of_misses = std::mem::offset_of!(bpf_prog_info, recursion_misses) + 8;
    Ok(Runs {
        run_time_ns: info.run_time_ns,
        run_count: info.run_cnt,
        missed: (filled >= end_of_misses).then_some(info.recursion_misses),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_of_a_family_is_named_for_it() {
        for family in registry::FAMILIES {
            for program in family.names.programs {
                assert_eq!(collector_of(program), family.name, "{program}");
            }
        }
        assert_eq!(collector_of("not_a_program"), "agent");
    }
}
