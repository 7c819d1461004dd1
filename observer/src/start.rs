//! Start-up: builds the enabled families, loads the eBPF object with what they need from the
//! running kernel, attaches their hooks, and hands each its maps.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader,
    maps::{Array, MapData, RingBuf},
};
use observer_common::{
    AGENT_MAP, EVENT_DETAIL_GLOBAL, EVENTS_LOST_MAP, EVENTS_MAP, EventKind, MAP_FULL_MAP,
    SECURITY_EVENTS_MAP, WAKEUP_BYTES_GLOBAL, agent_slot,
};

use crate::{
    agent::{Agent, Families, RecordCounts},
    cli::RunArgs,
    family::{Context, HookFamily, LoadSettings},
    kernel,
    maps::Maps,
    pins::{self, Pins},
    plan::{self, Attached, Hook, KernelView, ProbeStatus},
    registry,
};

/// The eBPF programs, built by build.rs.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// What the command line asks for: which families, with which settings.
pub struct Selection<'a> {
    pub matches: &'a clap::ArgMatches,
    pub args: &'a RunArgs,
    /// Only these collectors, whatever the flags say (a subcommand that needs only some).
    pub only: Option<&'static [&'static str]>,
    /// `observer profile`: every module load, for its report.
    pub samples: Option<crate::modules::load::Samples>,
}

/// The families built, enabled or not, in registry order.
pub struct Built {
    pub enabled: Vec<(&'static str, Box<dyn HookFamily>)>,
    pub collectors: Vec<(&'static str, bool)>,
    /// The hooks of the switched-off families, for `observer probes`.
    pub disabled_hooks: Vec<(&'static str, Hook)>,
    /// The maps of the switched-off families, created at their smallest.
    pub disabled_maps: Vec<&'static str>,
    /// The enabled families `--pin` keeps watching while no agent runs, and their programs
    /// and maps.
    pub kept: Vec<&'static str>,
    pub kept_programs: Vec<&'static str>,
    pub kept_maps: Vec<&'static str>,
}

/// The maps every kept program writes besides its family's own (the security ring, the lost
/// and full counters, the agent map).
const KEPT_SHARED_MAPS: [&str; 4] = [
    SECURITY_EVENTS_MAP,
    EVENTS_LOST_MAP,
    MAP_FULL_MAP,
    AGENT_MAP,
];
/// Shared maps that the kept programs and this agent's own programs both write: read from
/// both when adopting.
const COUNTED_TWICE: [&str; 2] = [EVENTS_LOST_MAP, MAP_FULL_MAP];

pub fn build(selection: &Selection<'_>, kernel: &KernelView) -> anyhow::Result<Built> {
    let context = Context {
        matches: selection.matches,
        kernel,
        samples: selection.samples.clone(),
    };
    let mut built = Built {
        enabled: Vec::new(),
        collectors: Vec::new(),
        disabled_hooks: Vec::new(),
        disabled_maps: Vec::new(),
        kept: Vec::new(),
        kept_programs: Vec::new(),
        kept_maps: Vec::new(),
    };
    for (registration, on) in registry::enabled(selection.matches) {
        let on = on
            && selection
                .only
                .is_none_or(|only| only.contains(&registration.name));
        let family = (registration.build)(&context)
            .with_context(|| format!("setting up the {} collector", registration.name))?;
        built.collectors.push((registration.name, on));
        if on && registration.kept_pinned {
            built.kept.push(registration.name);
            built.kept_programs.extend(registration.names.programs);
            built.kept_maps.extend(registration.names.maps);
        }
        if on {
            built.enabled.push((registration.name, family));
        } else {
            for hook in family.hooks() {
                built.disabled_hooks.push((registration.name, hook));
            }
            built.disabled_maps.extend(registration.names.maps);
        }
    }
    if !built.kept.is_empty() {
        built.kept_maps.extend(KEPT_SHARED_MAPS);
    }
    if built.enabled.is_empty() {
        bail!("every collector is switched off: nothing to observe");
    }
    Ok(built)
}

fn hooks(enabled: &[(&'static str, Box<dyn HookFamily>)]) -> Vec<Hook> {
    enabled.iter().flat_map(|(_, f)| f.hooks()).collect()
}

/// The name of the pins this build makes with these settings: the object, the revision, and
/// everything the kept programs are loaded with (their globals, the event detail, which of
/// them are on).
fn build_name(kernel: &KernelView, args: &RunArgs, built: &Built) -> String {
    let mut parts: Vec<Vec<u8>> = vec![
        PROGRAMS.to_vec(),
        env!("OBSERVER_REVISION").as_bytes().to_vec(),
        vec![u8::from(args.events.is_some())],
    ];
    for (name, family) in built.enabled.iter().filter(|(n, _)| built.kept.contains(n)) {
        parts.push(name.as_bytes().to_vec());
        let mut settings = LoadSettings::default();
        family.configure(kernel, &mut settings);
        settings.globals.sort();
        for (global, bytes) in settings.globals {
            parts.push(global.as_bytes().to_vec());
            parts.push(bytes);
        }
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    pins::build_name(&parts)
}

/// Loads the object with every enabled family's globals, and attaches their hooks. When
/// `adopted` pins are given, the kept families' programs are not loaded (the pinned ones
/// watch) and their maps are created at their smallest.
pub fn load(
    kernel: &KernelView,
    args: &RunArgs,
    built: &Built,
    adopted: Option<&Pins>,
) -> anyhow::Result<Loaded> {
    let enabled = &built.enabled;
    let mut settings = LoadSettings::default();
    for (_, family) in enabled {
        family.configure(kernel, &mut settings);
    }
    let buffer_size = args.events_buffer_size;
    // Wake the agent at a quarter full, or 64 KiB, whichever comes first.
    let wakeup_bytes = u64::from(buffer_size / 4).min(64 * 1024);
    let event_detail = u32::from(args.events.is_some());
    let mut loader = EbpfLoader::new();
    loader
        .btf(kernel.aya_btf.as_ref())
        .map_max_entries(EVENTS_MAP, buffer_size)
        .override_global(WAKEUP_BYTES_GLOBAL, &wakeup_bytes, true)
        .override_global(EVENT_DETAIL_GLOBAL, &event_detail, true);
    for (name, bytes) in &settings.globals {
        loader.override_global(name, bytes.as_slice(), true);
    }
    let loaded = |name: &str| adopted.is_none() || !built.kept.contains(&name);
    // A ring no family loaded here writes to is kept at its smallest (one page).
    let kinds: Vec<EventKind> = enabled
        .iter()
        .filter(|(name, _)| loaded(name))
        .flat_map(|(_, f)| f.records().iter().map(|r| r.kind))
        .collect();
    if !kinds.iter().any(|k| !k.is_security()) {
        loader.map_max_entries(EVENTS_MAP, page_size());
    }
    if !kinds.iter().any(|k| k.is_security()) {
        loader.map_max_entries(SECURITY_EVENTS_MAP, page_size());
    }
    // Maps no loaded program uses still exist in the object: keep them one entry small
    // (a switched-off family's or option's tables would otherwise take their full size in
    // kernel memory).
    for map in built.disabled_maps.iter().chain(&settings.unused_maps) {
        loader.map_max_entries(map, 1);
    }
    if adopted.is_some() {
        for map in built
            .kept_maps
            .iter()
            .filter(|m| !KEPT_SHARED_MAPS.contains(m))
        {
            loader.map_max_entries(map, 1);
        }
    }
    let mut ebpf = loader
        .load(PROGRAMS)
        .context("loading the eBPF object (maps and programs)")?;
    // Before any program loads: the verifier's lockdown checks of our own programs are ours.
    let tgid = u64::from(std::process::id());
    let adopted_agent_map = match adopted {
        Some(pins) => {
            let mut map = Array::try_from(pins.map(AGENT_MAP)?)?;
            map.set(agent_slot::TGID, tgid, 0)
                .context("writing the pinned agent map")?;
            Some(map)
        }
        None => {
            let map = ebpf
                .map_mut(AGENT_MAP)
                .context("the eBPF object has no agent map")?;
            Array::<_, u64>::try_from(map)?
                .set(agent_slot::TGID, tgid, 0)
                .context("writing the agent map")?;
            None
        }
    };
    let (loaded_families, kept): (Vec<_>, Vec<_>) =
        enabled.iter().partition(|(name, _)| loaded(name));
    let own_hooks: Vec<Hook> = loaded_families
        .iter()
        .flat_map(|(_, f)| f.hooks())
        .collect();
    let (mut statuses, links) = plan::attach(&mut ebpf, &own_hooks, kernel);
    if let Some(pins) = adopted {
        let kept_hooks: Vec<Hook> = kept.iter().flat_map(|(_, f)| f.hooks()).collect();
        statuses.extend(plan::adopted(&kept_hooks, |p| pins.linked(p)));
    }
    Ok(Loaded {
        ebpf,
        statuses,
        links,
        adopted_agent_map,
    })
}

/// The loaded object and what attaching it did.
pub struct Loaded {
    pub ebpf: aya::Ebpf,
    pub statuses: Vec<ProbeStatus>,
    /// The programs attached, with their links (the kept ones are pinned from these).
    pub links: Vec<Attached>,
    /// The adopted build's agent map (the one the pinned programs read).
    adopted_agent_map: Option<Array<MapData, u64>>,
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

pub fn missing_probes(hooks: &[Hook], statuses: &[ProbeStatus]) -> Vec<&'static str> {
    hooks
        .iter()
        .filter(|h| !statuses.iter().any(|s| s.probe == h.name && s.attached))
        .map(|h| h.name)
        .collect()
}

/// The loaded, attached programs and the agent reading them.
pub struct Started {
    pub ebpf: aya::Ebpf,
    pub agent: Arc<Agent>,
    /// The security ring buffer, then the timer ring buffer.
    pub rings: Vec<RingBuf<MapData>>,
}

/// Loads and attaches everything this kernel allows for the selected families, and builds the
/// agent around them.
pub fn start(selection: &Selection<'_>) -> anyhow::Result<Started> {
    kernel::ensure_securityfs();
    let kernel = KernelView::read();
    let built = build(selection, &kernel)?;
    let args = selection.args;
    // Only the agent itself handles pins: `observer profile` leaves them alone.
    let pins = if selection.only.is_none() {
        let pin = args.pin
            && kernel::ensure_bpffs(&args.pin_path)
                .map_err(|why| {
                    log::warn!("pins: not pinned (--pin): {why}; the security collectors stop with the agent");
                })
                .is_ok();
        Pins::find(&args.pin_path, pin, build_name(&kernel, args, &built))?
    } else {
        Pins::untouched()
    };
    let Loaded {
        mut ebpf,
        statuses: probes,
        links,
        adopted_agent_map,
    } = load(&kernel, args, &built, pins.adopting().then_some(&pins))?;
    let Built {
        mut enabled,
        collectors,
        kept,
        kept_programs,
        kept_maps,
        ..
    } = built;
    let hooks = hooks(&enabled);
    let missing = missing_probes(&hooks, &probes);
    let reasons = |only_missing: bool| {
        probes
            .iter()
            .filter(|s| !only_missing || missing.contains(&s.probe))
            .map(|s| format!("{} ({}): {}", s.probe, s.mechanism, s.detail))
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    if missing.len() == hooks.len() {
        bail!(
            "no probe could attach on this kernel:\n  {}",
            reasons(false)
        );
    }
    if args.strict && !missing.is_empty() {
        bail!("--strict: probes not attached:\n  {}", reasons(true));
    }
    let kept_links: Vec<Attached> = links
        .into_iter()
        .filter(|a| kept_programs.contains(&a.program))
        .collect();
    let pin_status = pins.keep(&mut ebpf, kept_links, &kept_maps, !kept.is_empty())?;

    let adopted = pins.adopting();
    let mut maps = Maps::new(&mut ebpf);
    if adopted {
        maps = maps.with_pins(&pins, &kept_maps, &COUNTED_TWICE);
    }
    let mut rings = Vec::new();
    for name in [SECURITY_EVENTS_MAP, EVENTS_MAP] {
        rings.push(
            RingBuf::try_from(maps.take(name)?).with_context(|| format!("ring buffer {name}"))?,
        );
    }
    for (name, family) in &mut enabled {
        family
            .take_maps(&mut maps)
            .with_context(|| format!("the {name} collector's maps"))?;
    }
    let agent_map = match adopted_agent_map {
        Some(map) => map,
        None => Array::try_from(maps.take(AGENT_MAP)?)?,
    };
    let events_lost = maps.per_cpu_arrays(EVENTS_LOST_MAP)?;
    let map_full = maps.per_cpu_arrays(MAP_FULL_MAP)?;
    let pinned_programs = if adopted { pins.programs() } else { Vec::new() };
    let agent = Arc::new(Agent {
        events_lost,
        map_full,
        families: Families::new(enabled),
        counts: RecordCounts::default(),
        probes,
        collectors,
        kernel_release: kernel::release(),
        programs: crate::programs::ProgramStats::new(&ebpf, pinned_programs),
        pins: pin_status.with_map(agent_map),
    });
    drop(kernel);
    // Parsing the kernel's BTF (twice: ours and aya's) takes tens of MiB that are free now;
    // hand them back so the resident size reflects what the agent keeps.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    Ok(Started { ebpf, agent, rings })
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    use observer_common::{Names, SHARED_NAMES};

    use super::*;
    use crate::plan::Mechanism;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// What the object holds: program names, map names, and global variables (symbols in the
    /// data sections), without loading it into a kernel.
    fn object_names() -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
        let parsed = aya_obj::Object::parse(PROGRAMS).unwrap();
        let programs = parsed.programs.keys().cloned().collect();
        let maps = parsed
            .maps
            .keys()
            .filter(|m| !m.starts_with('.'))
            .cloned()
            .collect();
        let elf = object::File::parse(PROGRAMS).unwrap();
        let globals = elf
            .symbols()
            .filter(|s| s.is_global() && !s.is_undefined())
            .filter(|s| {
                s.section_index()
                    .and_then(|i| elf.section_by_index(i).ok())
                    .and_then(|section| section.name().ok().map(str::to_owned))
                    .is_some_and(|name| [".rodata", ".data", ".bss"].contains(&name.as_str()))
            })
            .filter_map(|s| s.name().ok().map(str::to_owned))
            .collect();
        (programs, maps, globals)
    }

    /// aya-log's own map and level global, which its crates name.
    const LOG_MAPS: &[&str] = &["AYA_LOGS"];
    const LOG_GLOBALS: &[&str] = &["AYA_LOG_LEVEL"];

    #[test]
    fn the_object_holds_exactly_the_names_the_families_use() {
        let all: Vec<&Names> = registry::FAMILIES
            .iter()
            .map(|f| f.names)
            .chain([&SHARED_NAMES])
            .collect();
        let union = |pick: fn(&Names) -> &'static [&'static str]| {
            all.iter()
                .flat_map(|n| pick(n))
                .copied()
                .collect::<Vec<_>>()
        };
        let (programs, maps, globals) = object_names();
        assert_eq!(programs, set(&union(|n| n.programs)));
        let mut expected_maps = union(|n| n.maps);
        expected_maps.extend(LOG_MAPS);
        assert_eq!(maps, set(&expected_maps));
        let mut expected_globals = union(|n| n.globals);
        expected_globals.extend(LOG_GLOBALS);
        assert_eq!(globals, set(&expected_globals));
    }

    /// Each family's hooks (under every flag that changes them) name only its programs, and all
    /// of them under some flags; its configuration sets exactly its globals.
    #[test]
    fn every_family_uses_exactly_its_names() {
        let kernel = KernelView::without_kernel();
        let mut used: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for flags in [
            &["observer"][..],
            &["observer", "--timers.hook", "raw-tracepoint"],
            &["observer", "--timers.latency"],
            &["observer", "--timers.counts-only"],
            &["observer", "--modules.research"],
        ] {
            let matches = crate::cli::command().try_get_matches_from(flags).unwrap();
            let context = Context {
                matches: &matches,
                kernel: &kernel,
                samples: None,
            };
            for registration in registry::FAMILIES {
                let family = (registration.build)(&context).unwrap();
                let programs: Vec<&str> = family
                    .hooks()
                    .iter()
                    .flat_map(|h| h.options.iter().flatten().map(|a| a.program))
                    .collect();
                assert!(
                    set(&programs).is_subset(&set(registration.names.programs)),
                    "{} {flags:?}",
                    registration.name
                );
                used.entry(registration.name)
                    .or_default()
                    .extend(set(&programs));
                let mut settings = LoadSettings::default();
                family.configure(&kernel, &mut settings);
                let globals: Vec<&str> = settings.globals.iter().map(|(n, _)| *n).collect();
                assert_eq!(
                    set(&globals),
                    set(registration.names.globals),
                    "{}",
                    registration.name
                );
                assert!(
                    set(&settings.unused_maps).is_subset(&set(registration.names.maps)),
                    "{}",
                    registration.name
                );
                // fentry/fexit programs name the function they attach to in the object too.
                for attachment in family
                    .hooks()
                    .iter()
                    .flat_map(|h| h.options.iter().flatten())
                {
                    if let Mechanism::FEntry { .. } | Mechanism::FExit { .. } = attachment.mechanism
                    {
                        assert!(programs.contains(&attachment.program));
                    }
                }
            }
        }
        for registration in registry::FAMILIES {
            assert_eq!(
                used[registration.name],
                set(registration.names.programs),
                "{}",
                registration.name
            );
        }
    }
}
