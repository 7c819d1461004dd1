//! A hook family: everything about one thing the observer watches (its hooks, what its programs
//! need from the running kernel, its maps, the records it decodes, the metrics it exports),
//! behind one trait. The agent, the pipeline and `main` loop over the registered families and
//! route records by kind; none of them names a family.

use observer_common::{EventKind, Names};

use crate::{
    maps::Maps,
    metrics::Family,
    plan::{Hook, KernelView},
};

/// A record kind a family decodes, with the size a record of that kind has at least.
#[derive(Clone, Copy, Debug)]
pub struct RecordKind {
    pub kind: EventKind,
    pub size: usize,
}

impl RecordKind {
    pub const fn of<T>(kind: EventKind) -> Self {
        Self {
            kind,
            size: size_of::<T>(),
        }
    }
}

/// An event's own fields, for the event stream (`--events json`); the pipeline adds those every
/// event has (time, process, thread, comm).
pub type EventFields = serde_json::Map<String, serde_json::Value>;

/// An event for the stream: its name (the `event` field) and its own fields, serialised from the
/// family's own event type (a `Serialize` struct per event, whose fields schemas/events.schema.json
/// describes; a test checks each against it).
#[derive(Debug)]
pub struct Event {
    pub name: &'static str,
    pub fields: EventFields,
}

impl Event {
    /// The event `name` with `value`'s fields (a struct serialising as a JSON object).
    pub fn of(name: &'static str, value: &impl serde::Serialize) -> Option<Self> {
        match serde_json::to_value(value) {
            Ok(serde_json::Value::Object(fields)) => Some(Self { name, fields }),
            _ => None,
        }
    }
}

/// The globals the programs read, set from the running kernel before the object is loaded.
#[derive(Default)]
pub struct LoadSettings {
    pub globals: Vec<(&'static str, Vec<u8>)>,
    /// Maps the configured programs never use: created one entry small.
    pub unused_maps: Vec<&'static str>,
}

impl LoadSettings {
    /// Sets global `name` (which must exist in the object) to `value`'s bytes.
    pub fn global<T: aya::Pod>(&mut self, name: &'static str, value: &T) {
        // SAFETY: `T: Pod` is plain data with no padding that matters; its bytes are its value.
        let bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>())
        };
        self.globals.push((name, bytes.to_vec()));
    }
}

/// What a family is built from.
pub struct Context<'a> {
    /// The whole command line: a family reads its own flags (see [`Registration::flags`]).
    pub matches: &'a clap::ArgMatches,
    pub kernel: &'a KernelView,
    /// `observer profile`: where the module family puts every load it decodes, for the report.
    pub samples: Option<crate::modules::load::Samples>,
}

pub trait HookFamily: Send {
    /// The attach plan's rows: each hook with its mechanisms, preferred first.
    fn hooks(&self) -> Vec<Hook>;

    /// Globals its programs need from the running kernel (BTF offsets, enum values).
    fn configure(&self, _kernel: &KernelView, _load: &mut LoadSettings) {}

    /// Takes the maps it reads out of the loaded object.
    fn take_maps(&mut self, _maps: &mut Maps<'_>) -> anyhow::Result<()> {
        Ok(())
    }

    /// What it decided about this kernel beyond the attach table, for `observer probes` (one
    /// line, or none).
    fn kernel_notes(&self) -> Option<String> {
        None
    }

    /// The record kinds it decodes.
    fn records(&self) -> &'static [RecordKind];

    /// Takes one record of one of its kinds (at least as long as declared) into its state;
    /// returns its event when `want_event` and the record makes one. Every family does it in
    /// one shape: it parses the record into its own event type (a function of the record and
    /// of its read-only configuration, such as names tables), counts its metrics from that
    /// value only, and serialises the same value for the stream. One source of truth: what is
    /// counted is what is reported (fields only the metrics need are `#[serde(skip)]`).
    fn decode(&mut self, kind: EventKind, bytes: &[u8], want_event: bool) -> Option<Event>;

    /// Events that come from no record (an inventory taken at start): asked for after every
    /// drain of the rings.
    fn take_events(&mut self) -> Vec<Event> {
        Vec::new()
    }

    /// Its metric families, now (kernel maps and its state). An error (a kernel map that
    /// cannot be read) fails this collector's part of the scrape, visibly.
    fn collect(&self, out: &mut Vec<Family>) -> anyhow::Result<()>;
}

/// One line of the registry.
pub struct Registration {
    /// The collector's name: `--collector.<name>`, `--no-collector.<name>`.
    pub name: &'static str,
    /// One line for `--help`.
    pub about: &'static str,
    /// The programs, maps and globals it uses in the eBPF object.
    pub names: &'static Names,
    /// Adds its own flags to the command line, if it has any.
    pub flags: fn(clap::Command) -> clap::Command,
    /// Whether `--pin` keeps its programs watching while no agent runs: rare paths whose
    /// programs cost nothing measurable while idle (the security families). A family on a hot
    /// path (timers: every timer syscall) detaches with the agent.
    pub kept_pinned: bool,
    pub build: fn(&Context<'_>) -> anyhow::Result<Box<dyn HookFamily>>,
}

/// For families without flags of their own.
pub fn no_flags(command: clap::Command) -> clap::Command {
    command
}
