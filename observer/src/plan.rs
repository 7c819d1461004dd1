//! The attach plan: each hook with its preferred mechanism and its fallbacks, decided against the
//! running kernel at start. A hook that cannot attach is a warning and a metric, not a crash.

use std::{path::PathBuf, time::Instant};

use aya::{
    Btf, Ebpf,
    programs::{
        FEntry, FExit, ProgramError, ProgramInfo, RawTracePoint, TracePoint, fentry::FEntryLinkId,
        fexit::FExitLinkId, raw_trace_point::RawTracePointLinkId, trace_point::TracePointLinkId,
    },
};

use crate::kernel::{self, KernelBtf};

/// How one program attaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
    RawTracepoint {
        name: &'static str,
    },
    FEntry {
        function: &'static str,
    },
    FExit {
        function: &'static str,
    },
}

impl Mechanism {
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Tracepoint { .. } => "tracepoint",
            Self::RawTracepoint { .. } => "raw_tracepoint",
            Self::FEntry { .. } => "fentry",
            Self::FExit { .. } => "fexit",
        }
    }

    fn target(&self) -> String {
        match self {
            Self::Tracepoint { category, name } => format!("{category}:{name}"),
            Self::RawTracepoint { name } => format!("raw {name}"),
            Self::FEntry { function } | Self::FExit { function } => (*function).to_owned(),
        }
    }
}

/// One program of the eBPF object and where it attaches.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub program: &'static str,
    pub mechanism: Mechanism,
}

pub const fn tracepoint(
    program: &'static str,
    category: &'static str,
    name: &'static str,
) -> Attachment {
    Attachment {
        program,
        mechanism: Mechanism::Tracepoint { category, name },
    }
}

pub const fn raw_tracepoint(program: &'static str, name: &'static str) -> Attachment {
    Attachment {
        program,
        mechanism: Mechanism::RawTracepoint { name },
    }
}

pub const fn fexit(program: &'static str, function: &'static str) -> Attachment {
    Attachment {
        program,
        mechanism: Mechanism::FExit { function },
    }
}

pub const fn fentry(program: &'static str, function: &'static str) -> Attachment {
    Attachment {
        program,
        mechanism: Mechanism::FEntry { function },
    }
}

/// Something the agent observes, with the ways to attach it, preferred first. An option is
/// used when every program in it attaches.
#[derive(Clone, Debug)]
pub struct Hook {
    /// The `probe` label.
    pub name: &'static str,
    pub options: Vec<Vec<Attachment>>,
    /// A kernel feature the hook needs whatever the mechanism; why not when it is missing.
    pub requires: Option<fn() -> Result<(), String>>,
}

/// What happened to one option of one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeStatus {
    pub probe: &'static str,
    pub mechanism: &'static str,
    pub attached: bool,
    /// Where it attached, or why it did not.
    pub detail: String,
}

/// The link one attached program holds, for taking it out of the program (to pin it).
#[derive(Debug)]
pub enum LinkId {
    Tracepoint(TracePointLinkId),
    RawTracepoint(RawTracePointLinkId),
    FEntry(FEntryLinkId),
    FExit(FExitLinkId),
}

/// An attached program and its link.
#[derive(Debug)]
pub struct Attached {
    pub program: &'static str,
    pub link: LinkId,
}

/// What the plan needs to know about the kernel.
pub struct KernelView {
    pub tracefs: Result<PathBuf, String>,
    pub btf: Result<KernelBtf, String>,
    /// aya's own parse of the same BTF, for loading fentry/fexit programs.
    pub aya_btf: Option<Btf>,
}

impl KernelView {
    pub fn read() -> Self {
        let btf = KernelBtf::load().map_err(|e| format!("{e:#}"));
        let aya_btf = btf.as_ref().ok().and_then(|_| Btf::from_sys_fs().ok());
        Self {
            tracefs: kernel::ensure_tracefs(),
            btf,
            aya_btf,
        }
    }

    /// A kernel with nothing to read: no tracefs, no BTF (for tests of what needs neither).
    #[cfg(test)]
    pub fn without_kernel() -> Self {
        Self {
            tracefs: Err("no tracefs".into()),
            btf: Err("no BTF".into()),
            aya_btf: None,
        }
    }

    /// Why this attachment cannot work here, if that is known before trying.
    fn unavailable(&self, mechanism: &Mechanism) -> Option<String> {
        match mechanism {
            Mechanism::Tracepoint { category, name } => match &self.tracefs {
                Err(why) => Some(why.clone()),
                Ok(tracefs) if !kernel::has_tracepoint(tracefs, category, name) => Some(format!(
                    "tracepoint {category}:{name} is not in this kernel"
                )),
                Ok(_) => None,
            },
            // Resolved by name in the kernel, without tracefs: trying is the test.
            Mechanism::RawTracepoint { .. } => None,
            Mechanism::FEntry { function } | Mechanism::FExit { function } => match &self.btf {
                Err(why) => Some(format!("no kernel BTF: {why}")),
                Ok(btf) if !btf.has_function(function) => Some(format!(
                    "{function} is not a traceable function in this kernel (absent or inlined)"
                )),
                Ok(_) => None,
            },
        }
    }
}

/// The `mechanism` label of an option: its mechanisms in order, e.g. `fentry+fexit`.
fn option_label(option: &[Attachment]) -> &'static str {
    let labels: Vec<&str> =
        option
            .iter()
            .map(|a| a.mechanism.label())
            .fold(Vec::new(), |mut seen, label| {
                if !seen.contains(&label) {
                    seen.push(label);
                }
                seen
            });
    match labels.as_slice() {
        ["fentry", "fexit"] => "fentry+fexit",
        [single] => single,
        _ => "mixed",
    }
}

/// Attaches every hook by its first option that works; returns what happened to each option
/// tried, and the programs attached. Options after the one that attached are not tried.
pub fn attach(
    ebpf: &mut Ebpf,
    hooks: &[Hook],
    kernel: &KernelView,
) -> (Vec<ProbeStatus>, Vec<Attached>) {
    let mut statuses = Vec::new();
    let mut links = Vec::new();
    for hook in hooks {
        if let Some(Err(why)) = hook.requires.map(|requires| requires()) {
            // One warning per missing kernel feature, not one per hook that needs it.
            if statuses.iter().any(|s: &ProbeStatus| s.detail == why) {
                log::debug!("probe {}: unavailable: {why}", hook.name);
            } else {
                log::warn!("probe {} and others: unavailable: {why}", hook.name);
            }
            for option in &hook.options {
                let mechanism = option_label(option);
                statuses.push(ProbeStatus {
                    probe: hook.name,
                    mechanism,
                    attached: false,
                    detail: why.clone(),
                });
            }
            continue;
        }
        for option in &hook.options {
            let mechanism = option_label(option);
            let result = option
                .iter()
                .try_for_each(|a| match kernel.unavailable(&a.mechanism) {
                    Some(why) => Err(why),
                    None => Ok(()),
                })
                .and_then(|()| attach_option(ebpf, option, kernel));
            let attached = result.is_ok();
            let detail = match result {
                Ok(attached) => {
                    links.extend(attached);
                    option
                        .iter()
                        .map(|a| a.mechanism.target())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
                Err(why) => why,
            };
            if attached {
                log::info!("probe {}: attached by {mechanism} ({detail})", hook.name);
            } else {
                log::warn!("probe {}: {mechanism} unavailable: {detail}", hook.name);
            }
            statuses.push(ProbeStatus {
                probe: hook.name,
                mechanism,
                attached,
                detail,
            });
            if attached {
                break;
            }
        }
    }
    (statuses, links)
}

/// The statuses of hooks whose programs an earlier agent attached and pinned (`--pin`): each
/// hook by the first option whose programs all have a pinned link, as that agent chose.
pub fn adopted(hooks: &[Hook], pinned: impl Fn(&str) -> bool) -> Vec<ProbeStatus> {
    let mut statuses = Vec::new();
    for hook in hooks {
        let chosen = hook
            .options
            .iter()
            .position(|option| option.iter().all(|a| pinned(a.program)));
        for (index, option) in hook.options.iter().enumerate() {
            let attached = Some(index) == chosen;
            statuses.push(ProbeStatus {
                probe: hook.name,
                mechanism: option_label(option),
                attached,
                detail: if attached {
                    let targets: Vec<String> =
                        option.iter().map(|a| a.mechanism.target()).collect();
                    format!("{} (pinned)", targets.join(", "))
                } else {
                    "not attached by the agent that pinned the programs (its log says why)".into()
                },
            });
            if attached {
                break;
            }
        }
    }
    statuses
}

/// Loads and attaches every program of one option; on a failure, unloads what it attached.
fn attach_option(
    ebpf: &mut Ebpf,
    option: &[Attachment],
    kernel: &KernelView,
) -> Result<Vec<Attached>, String> {
    let mut links = Vec::new();
    for (done, attachment) in option.iter().enumerate() {
        match attach_one(ebpf, attachment, kernel) {
            Ok(link) => links.push(Attached {
                program: attachment.program,
                link,
            }),
            Err(err) => {
                for earlier in &option[..done] {
                    unload(ebpf, earlier);
                }
                return Err(format!(
                    "{} on {}: {}",
                    attachment.mechanism.label(),
                    attachment.mechanism.target(),
                    explain(&err)
                ));
            }
        }
    }
    Ok(links)
}

fn attach_one(
    ebpf: &mut Ebpf,
    attachment: &Attachment,
    kernel: &KernelView,
) -> Result<LinkId, ProgramError> {
    let program = ebpf
        .program_mut(attachment.program)
        .ok_or_else(|| ProgramError::UnexpectedProgramType)?;
    let btf = || {
        kernel
            .aya_btf
            .as_ref()
            .ok_or(ProgramError::UnexpectedProgramType)
    };
    let started = Instant::now();
    Ok(match &attachment.mechanism {
        Mechanism::Tracepoint { category, name } => {
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            log_load(attachment.program, started, || program.info());
            LinkId::Tracepoint(program.attach(category, name)?)
        }
        Mechanism::RawTracepoint { name } => {
            let program: &mut RawTracePoint = program.try_into()?;
            program.load()?;
            log_load(attachment.program, started, || program.info());
            LinkId::RawTracepoint(program.attach(name)?)
        }
        Mechanism::FEntry { function } => {
            let program: &mut FEntry = program.try_into()?;
            program.load(function, btf()?)?;
            log_load(attachment.program, started, || program.info());
            LinkId::FEntry(program.attach()?)
        }
        Mechanism::FExit { function } => {
            let program: &mut FExit = program.try_into()?;
            program.load(function, btf()?)?;
            log_load(attachment.program, started, || program.info());
            LinkId::FExit(program.attach()?)
        }
    })
}

/// What a program's load cost (most of it the verifier's walk, which the kernel counts from
/// 5.16): the agent's start time is mostly this, so a program that grows shows here first.
///
/// The program's information (a syscall) is asked for only where the line is logged.
fn log_load(
    program: &str,
    started: Instant,
    info: impl FnOnce() -> Result<ProgramInfo, ProgramError>,
) {
    if !log::log_enabled!(log::Level::Debug) {
        return;
    }
    let verified = info()
        .ok()
        .and_then(|info| info.verified_instruction_count())
        .map_or_else(String::new, |count| {
            format!(", {count} instructions verified")
        });
    log::debug!(
        "{program}: loaded in {} ms{verified}",
        started.elapsed().as_millis()
    );
}

/// Detaches and unloads one program (part of an option that did not fully attach).
fn unload(ebpf: &mut Ebpf, attachment: &Attachment) {
    let Some(program) = ebpf.program_mut(attachment.program) else {
        return;
    };
    let result = match &attachment.mechanism {
        Mechanism::Tracepoint { .. } => {
            <&mut TracePoint>::try_from(program).map(TracePoint::unload)
        }
        Mechanism::RawTracepoint { .. } => {
            <&mut RawTracePoint>::try_from(program).map(RawTracePoint::unload)
        }
        Mechanism::FEntry { .. } => <&mut FEntry>::try_from(program).map(FEntry::unload),
        Mechanism::FExit { .. } => <&mut FExit>::try_from(program).map(FExit::unload),
    };
    if let Ok(Err(err)) | Err(err) = result {
        log::warn!("unloading {}: {err}", attachment.program);
    }
}

/// A load error with the kernel's reason first: the verifier log is long and the errno is what
/// tells an operator whether the kernel refuses this program type.
fn explain(err: &ProgramError) -> String {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            if log.trim().is_empty() {
                format!("the kernel refused to load it ({io_error})")
            } else {
                format!(
                    "the kernel refused to load it ({io_error}); verifier: {}",
                    // The refused instruction and the reason, then the three lines of totals.
                    last_lines(&log, 5)
                )
            }
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
