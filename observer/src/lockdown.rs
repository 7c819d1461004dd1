//! Lockdown decisions and level. With fexit on `security_locked_down` the kernel counts every
//! check by reason and verdict; with the `printk:console` fallback only denials are seen, and
//! only those the kernel's rate limit lets through to the log.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, PerCpuArray};
use observer_common::{
    EventKind,
    lockdown::{
        CONSOLE_UNRECORDED_MAP, DECISION_SLOTS, DECISIONS_MAP, LockdownConsole, LockdownDecision,
        MODULE_SIGNATURE_GLOBAL, NAMES, OWN_CHECKS_MAP, REASON_SLOTS, decision_of_slot,
    },
};

use crate::{
    family::{Context, Event, HookFamily, LoadSettings, RecordKind, Registration, no_flags},
    kernel::{self, KernelBtf},
    maps::{self, Maps},
    metrics::Family,
    plan::{Hook, KernelView, fexit, tracepoint},
    record::read_record,
};

/// A lockdown decision event: the reason (`enum lockdown_reason`'s name), the verdict, and
/// the process a console line names.
///
/// The one value a record becomes: the console's denials are counted from it and the stream
/// writes it, so what is counted is what is reported.
#[derive(Debug, serde::Serialize)]
pub struct Decision {
    pub reason: String,
    pub verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    /// Where it was seen (both mechanisms make the same event; only one is counted here).
    #[serde(skip)]
    pub seen_by: SeenBy,
}

/// The mechanism a decision was seen by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeenBy {
    /// fexit on `security_locked_down`: every check, counted in the kernel.
    Check,
    /// The `printk:console` fallback: a denial's log line, counted by the agent.
    Console,
}

pub const FAMILY: Registration = Registration {
    name: "lockdown",
    about: "lockdown decisions by reason and verdict, and the active lockdown level",
    names: &NAMES,
    flags: no_flags,
    kept_pinned: true,
    build: LockdownFamily::build,
};

const RECORDS: &[RecordKind] = &[
    RecordKind::of::<LockdownDecision>(EventKind::LockdownDecision),
    RecordKind::of::<LockdownConsole>(EventKind::LockdownConsole),
];

pub struct LockdownFamily {
    state: Lockdown,
    maps: Option<LockdownMaps>,
}

impl LockdownFamily {
    fn build(context: &Context<'_>) -> anyhow::Result<Box<dyn HookFamily>> {
        Ok(Box::new(Self {
            state: Lockdown::new(context.kernel.btf.as_ref().ok()),
            maps: None,
        }))
    }
}

impl HookFamily for LockdownFamily {
    fn hooks(&self) -> Vec<Hook> {
        hooks()
    }

    fn configure(&self, _kernel: &KernelView, load: &mut LoadSettings) {
        // A refusal of this reason inside a module load marks that load (the lockdown
        // verdict where the policy step is inlined); 1 since lockdown came (5.4).
        let module_signature = self
            .state
            .reasons
            .iter()
            .find(|(_, label)| *label == "module_signature")
            .map_or(1, |(value, _)| *value);
        load.global(MODULE_SIGNATURE_GLOBAL, &module_signature);
    }

    fn take_maps(&mut self, maps: &mut Maps<'_>) -> anyhow::Result<()> {
        self.maps = Some(LockdownMaps::take(maps)?);
        Ok(())
    }

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn decode(&mut self, kind: EventKind, bytes: &[u8], want_event: bool) -> Option<Event> {
        // One value per record, counted and then written: the stream says what the metrics
        // count.
        let decision = if kind == EventKind::LockdownConsole {
            self.state
                .console_decision(&read_record::<LockdownConsole>(bytes)?)?
        } else {
            self.state
                .check_decision(&read_record::<LockdownDecision>(bytes)?)
        };
        self.state.count(&decision);
        want_event
            .then(|| Event::of("lockdown_decision", &decision))
            .flatten()
    }

    fn collect(&self, out: &mut Vec<Family>) -> anyhow::Result<()> {
        let counts = match &self.maps {
            Some(maps) => maps.counts()?,
            None => KernelCounts::default(),
        };
        self.state.gather(&counts, out);
        Ok(())
    }
}

fn hooks() -> Vec<Hook> {
    vec![Hook {
        name: "lockdown_decision",
        options: vec![
            vec![fexit(
                "lockdown_security_locked_down",
                "security_locked_down",
            )],
            vec![tracepoint("lockdown_console", "printk", "console")],
        ],
        requires: None,
    }]
}

/// The kernel's descriptions of each reason (security/security.c `lockdown_reasons[]`), as the
/// console line prints them, with the enumerator each belongs to.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("unsigned module loading", "LOCKDOWN_MODULE_SIGNATURE"),
    ("/dev/mem,kmem,port", "LOCKDOWN_DEV_MEM"),
    ("/dev/efi_test access", "LOCKDOWN_EFI_TEST"),
    ("kexec of unsigned images", "LOCKDOWN_KEXEC"),
    ("hibernation", "LOCKDOWN_HIBERNATION"),
    ("direct PCI access", "LOCKDOWN_PCI_ACCESS"),
    ("raw io port access", "LOCKDOWN_IOPORT"),
    ("raw MSR access", "LOCKDOWN_MSR"),
    ("modifying ACPI tables", "LOCKDOWN_ACPI_TABLES"),
    ("modifying device tree contents", "LOCKDOWN_DEVICE_TREE"),
    ("direct PCMCIA CIS storage", "LOCKDOWN_PCMCIA_CIS"),
    ("reconfiguration of serial port IO", "LOCKDOWN_TIOCSSERIAL"),
    ("unsafe module parameters", "LOCKDOWN_MODULE_PARAMETERS"),
    ("unsafe mmio", "LOCKDOWN_MMIOTRACE"),
    ("debugfs access", "LOCKDOWN_DEBUGFS"),
    ("xmon write access", "LOCKDOWN_XMON_WR"),
    ("use of bpf to write user RAM", "LOCKDOWN_BPF_WRITE_USER"),
    (
        "use of kgdb/kdb to write kernel RAM",
        "LOCKDOWN_DBG_WRITE_KERNEL",
    ),
    ("RTAS error injection", "LOCKDOWN_RTAS_ERROR_INJECTION"),
    ("Xen guest user action", "LOCKDOWN_XEN_USER_ACTIONS"),
    ("/proc/kcore access", "LOCKDOWN_KCORE"),
    ("use of kprobes", "LOCKDOWN_KPROBES"),
    ("use of bpf to read kernel RAM", "LOCKDOWN_BPF_READ_KERNEL"),
    (
        "use of kgdb/kdb to read kernel RAM",
        "LOCKDOWN_DBG_READ_KERNEL",
    ),
    ("unsafe use of perf", "LOCKDOWN_PERF"),
    ("use of tracefs", "LOCKDOWN_TRACEFS"),
    ("xmon read and write access", "LOCKDOWN_XMON_RW"),
    ("xfrm SA secret", "LOCKDOWN_XFRM_SECRET"),
];

/// One vocabulary for reasons: the enumerator without `LOCKDOWN_`, in lowercase.
pub fn reason_label(enumerator: &str) -> String {
    enumerator.trim_start_matches("LOCKDOWN_").to_lowercase()
}

/// The reason and process of a console line "Lockdown: <comm>: <description> is restricted; ...".
pub fn parse_console(text: &str) -> Option<(String, String)> {
    let rest = text.strip_prefix("Lockdown: ")?;
    let head = &rest[..rest.find(" is restricted")?];
    // Match the description from the end: a process name may itself contain ": ".
    for (description, enumerator) in DESCRIPTIONS {
        if let Some(comm) = head
            .strip_suffix(description)
            .and_then(|h| h.strip_suffix(": "))
        {
            return Some((reason_label(enumerator), comm.to_owned()));
        }
    }
    let (comm, _) = head.split_once(": ")?;
    Some(("unknown".into(), comm.to_owned()))
}

/// The kernel's counters of every check (fexit), by reason and verdict, and of the denials
/// seen on the console (fallback).
struct LockdownMaps {
    decisions: PerCpuArray<MapData, u64>,
    console_unrecorded: PerCpuArray<MapData, u64>,
    own_checks: PerCpuArray<MapData, u64>,
}

/// What the kernel counted.
#[derive(Debug, Default)]
pub struct KernelCounts {
    pub decisions: Vec<u64>,
    /// Console denials whose record was lost.
    pub console_unrecorded: u64,
    /// Checks made in the agent's own process (fexit).
    pub own_checks: u64,
}

impl LockdownMaps {
    fn take(maps: &mut Maps<'_>) -> anyhow::Result<Self> {
        Ok(Self {
            decisions: maps.per_cpu_array(DECISIONS_MAP)?,
            console_unrecorded: maps.per_cpu_array(CONSOLE_UNRECORDED_MAP)?,
            own_checks: maps.per_cpu_array(OWN_CHECKS_MAP)?,
        })
    }

    fn counts(&self) -> anyhow::Result<KernelCounts> {
        Ok(KernelCounts {
            decisions: maps::sum_per_cpu(&self.decisions, DECISION_SLOTS)?,
            console_unrecorded: maps::sum_per_cpu(&self.console_unrecorded, 1)?[0],
            own_checks: maps::sum_per_cpu(&self.own_checks, 1)?[0],
        })
    }
}

/// The lockdown family's state: the reason names of this kernel and the denials counted from
/// console lines (fallback).
#[derive(Debug, Default)]
pub struct Lockdown {
    reasons: BTreeMap<u32, String>,
    console_denials: HashMap<String, u64>,
}

impl Lockdown {
    pub fn new(btf: Option<&KernelBtf>) -> Self {
        let reasons = btf
            .map(|btf| btf.enum_values("lockdown_reason"))
            .unwrap_or_default()
            .into_iter()
            .map(|(value, name)| (value, reason_label(&name)))
            .collect();
        Self {
            reasons,
            console_denials: HashMap::new(),
        }
    }

    fn reason_name(&self, value: u32) -> String {
        if value >= REASON_SLOTS - 1 {
            return "other".into();
        }
        self.reasons
            .get(&value)
            .cloned()
            .unwrap_or_else(|| format!("reason{value}"))
    }

    /// What a check's record says (fexit), named from this kernel's reasons.
    fn check_decision(&self, record: &LockdownDecision) -> Decision {
        Decision {
            reason: self.reason_name(record.reason),
            verdict: if record.denied != 0 {
                "denied"
            } else {
                "allowed"
            },
            comm: None,
            seen_by: SeenBy::Check,
        }
    }

    /// What a console line says (fallback): a denial, with the process the line names (its
    /// `comm` replaces the header's, which is the printing task's). None for a line that is not
    /// a lockdown denial.
    fn console_decision(&self, record: &LockdownConsole) -> Option<Decision> {
        let len = (record.len as usize).min(record.text.len());
        let text = String::from_utf8_lossy(&record.text[..len]);
        let (reason, comm) = parse_console(&text)?;
        Some(Decision {
            reason,
            verdict: "denied",
            comm: Some(comm),
            seen_by: SeenBy::Console,
        })
    }

    /// Counts a decision: the console's denials (the kernel counts the checks fexit sees).
    fn count(&mut self, decision: &Decision) {
        if decision.seen_by == SeenBy::Console {
            *self
                .console_denials
                .entry(decision.reason.clone())
                .or_default() += 1;
        }
    }

    /// `counts`: the kernel's counters ([`LockdownMaps::counts`]).
    pub fn gather(&self, counts: &KernelCounts, families: &mut Vec<Family>) {
        let mut decisions = Family::counter(
            "lockdown_decisions_total",
            "Kernel lockdown checks by reason and verdict. With the printk:console fallback only denials are \
             seen, and only those the kernel's printk rate limit lets through.",
        );
        for (slot, count) in counts.decisions.iter().enumerate().filter(|(_, n)| **n > 0) {
            let (reason, denied) = decision_of_slot(slot as u32);
            let reason = self.reason_name(reason);
            let verdict = if denied { "denied" } else { "allowed" };
            decisions.add(&[("reason", &reason), ("verdict", verdict)], *count as f64);
        }
        // Console denials: a record names the reason; those the kernel counted without one
        // (the ring buffer was full) are `unknown`, like lines of a description not known here.
        let mut console = self.console_denials.clone();
        if counts.console_unrecorded > 0 {
            *console.entry("unknown".into()).or_default() += counts.console_unrecorded;
        }
        for (reason, count) in &console {
            decisions.add(&[("reason", reason), ("verdict", "denied")], *count as f64);
        }
        families.push(decisions);
        let mut own = Family::counter(
            "lockdown_own_checks_total",
            "Lockdown checks the agent's own process made (as each of its programs loads, the \
             verifier asks whether it may read kernel memory), left out of \
             observer_lockdown_decisions_total: they are not decisions about the host.",
        );
        own.add(&[], counts.own_checks as f64);
        families.push(own);

        let mut level = Family::gauge(
            "lockdown_level",
            "1 for the kernel's active lockdown level (securityfs).",
        );
        if let Some(active) = kernel::lockdown_level() {
            for name in ["none", "integrity", "confidentiality"] {
                level.add(&[("level", name)], f64::from(u8::from(name == active)));
            }
        }
        families.push(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_map_to_enumerators() {
        let line = "Lockdown: bash: debugfs access is restricted; see man kernel_lockdown.7\n";
        assert_eq!(parse_console(line), Some(("debugfs".into(), "bash".into())));
        let line =
            "Lockdown: insmod: unsigned module loading is restricted; see man kernel_lockdown.7";
        assert_eq!(
            parse_console(line),
            Some(("module_signature".into(), "insmod".into()))
        );
        let line = "Lockdown: a: b: /proc/kcore access is restricted; see man kernel_lockdown.7";
        assert_eq!(parse_console(line), Some(("kcore".into(), "a: b".into())));
    }

    #[test]
    fn unknown_descriptions_and_other_lines() {
        let line = "Lockdown: x: something new is restricted; see man kernel_lockdown.7";
        assert_eq!(parse_console(line), Some(("unknown".into(), "x".into())));
        assert_eq!(parse_console("Lockdown: nonsense"), None);
        assert_eq!(parse_console("hello"), None);
    }

    /// The console's denials are counted from the event the stream gets; checks are the
    /// kernel's to count. The stream carries neither mechanism.
    #[test]
    fn console_denials_are_counted_from_their_events() {
        let mut family = LockdownFamily {
            state: Lockdown::default(),
            maps: None,
        };
        let line = b"Lockdown: bash: debugfs access is restricted; see man kernel_lockdown.7";
        // SAFETY: all-zero is a valid record.
        let mut console: LockdownConsole = unsafe { std::mem::zeroed() };
        console.text[..line.len()].copy_from_slice(line);
        console.len = line.len() as u32;
        let event = family
            .decode(
                EventKind::LockdownConsole,
                &crate::record::record_bytes(&console),
                true,
            )
            .unwrap();
        assert_eq!(
            serde_json::Value::Object(event.fields),
            serde_json::json!({"reason": "debugfs", "verdict": "denied", "comm": "bash"})
        );
        // SAFETY: all-zero is a valid record.
        let mut check: LockdownDecision = unsafe { std::mem::zeroed() };
        check.denied = 1;
        let event = family
            .decode(
                EventKind::LockdownDecision,
                &crate::record::record_bytes(&check),
                true,
            )
            .unwrap();
        assert_eq!(event.fields["verdict"], "denied");
        assert!(!event.fields.contains_key("comm"));
        assert_eq!(
            family.state.console_denials,
            HashMap::from([("debugfs".to_owned(), 1)])
        );
    }

    #[test]
    fn reason_labels() {
        assert_eq!(
            reason_label("LOCKDOWN_MODULE_SIGNATURE"),
            "module_signature"
        );
        assert_eq!(reason_label("LOCKDOWN_KCORE"), "kcore");
    }
}
