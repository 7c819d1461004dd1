//! Every hook family, in the order they attach, and the collector flags they get from being here
//! (`--collector.<name>`, `--no-collector.<name>`, node_exporter style). Adding a family is its
//! three modules (record, eBPF programs, agent) and one line here: docs/development.md lists
//! the places, and a test below keeps that list true.

use clap::{Arg, ArgAction, ArgMatches};

use crate::{family::Registration, lockdown, modules, taint, timers};

pub const FAMILIES: &[Registration] = &[
    timers::FAMILY,
    lockdown::FAMILY,
    modules::FAMILY,
    taint::FAMILY,
];

fn enable_flag(name: &str) -> String {
    format!("collector.{name}")
}

fn disable_flag(name: &str) -> String {
    format!("no-collector.{name}")
}

/// Turns every collector off unless `--collector.<name>` names it (node_exporter's flag).
const DISABLE_DEFAULTS: &str = "collector.disable-defaults";

/// Adds every family's collector switch and own flags to the command line.
pub fn augment(mut command: clap::Command) -> clap::Command {
    command = command.arg(
        Arg::new(DISABLE_DEFAULTS)
            .long(DISABLE_DEFAULTS)
            .action(ArgAction::SetTrue)
            .global(true)
            .help("Turn every collector off but those named with --collector.<name>")
            .help_heading("Collectors"),
    );
    // A family's flags come with a doc comment that clap would take for the command's own.
    let (about, long_about) = (
        command.get_about().cloned(),
        command.get_long_about().cloned(),
    );
    for family in FAMILIES {
        let (enable, disable) = (enable_flag(family.name), disable_flag(family.name));
        command = command
            .arg(
                Arg::new(enable.clone())
                    .long(enable.clone())
                    .action(ArgAction::SetTrue)
                    .global(true)
                    .overrides_with(disable.clone())
                    .help(format!("Enable the {} collector (default)", family.name))
                    .long_help(format!(
                        "Enable the {} collector (on by default): {}",
                        family.name, family.about
                    ))
                    .help_heading("Collectors"),
            )
            .arg(
                Arg::new(disable.clone())
                    .long(disable)
                    .action(ArgAction::SetTrue)
                    .global(true)
                    .overrides_with(enable)
                    .help(format!(
                        "Disable the {} collector: none of its programs is loaded",
                        family.name
                    ))
                    .help_heading("Collectors"),
            );
        command = (family.flags)(command);
    }
    if let Some(about) = about {
        command = command.about(about);
    }
    if let Some(long_about) = long_about {
        command = command.long_about(long_about);
    }
    command
}

/// A family's own flags (`--timers.*`): each one's id and long name, from its flag set alone.
fn own_flags(family: &Registration) -> Vec<(String, String)> {
    (family.flags)(clap::Command::new(family.name))
        .get_arguments()
        .map(|a| {
            let id = a.get_id().to_string();
            let long = a.get_long().map_or_else(|| id.clone(), str::to_owned);
            (id, long)
        })
        .collect()
}

/// A family's own flag given while the family is off has no effect: an error, naming both.
pub fn check_flags(matches: &ArgMatches) -> Result<(), String> {
    for (family, on) in enabled(matches) {
        if on {
            continue;
        }
        for (id, long) in own_flags(family) {
            if matches.value_source(&id) == Some(clap::parser::ValueSource::CommandLine) {
                return Err(format!(
                    "--{long} has no effect with the {} collector off (--no-collector.{} or \
                     --collector.disable-defaults without --collector.{})",
                    family.name, family.name, family.name
                ));
            }
        }
    }
    Ok(())
}

/// Whether each family is switched on: every one is unless `--no-collector.<name>` came last;
/// with `--collector.disable-defaults`, only those `--collector.<name>` named last.
pub fn enabled(matches: &ArgMatches) -> Vec<(&'static Registration, bool)> {
    let flag = |id: &str| {
        matches
            .try_get_one::<bool>(id)
            .ok()
            .flatten()
            .copied()
            .unwrap_or(false)
    };
    let defaults_off = flag(DISABLE_DEFAULTS);
    FAMILIES
        .iter()
        .map(|family| {
            let on = if defaults_off {
                flag(&enable_flag(family.name))
            } else {
                !flag(&disable_flag(family.name))
            };
            (family, on)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Vec<(&'static str, bool)> {
        enabled(&matches(args))
            .into_iter()
            .map(|(f, on)| (f.name, on))
            .collect()
    }

    #[test]
    fn every_family_is_on_by_default_and_the_last_switch_wins() {
        assert!(parse(&[]).iter().all(|(_, on)| *on));
        let off = parse(&["--no-collector.timers"]);
        assert_eq!(off.iter().filter(|(_, on)| !on).count(), 1);
        assert!(off.contains(&("timers", false)));
        let back = parse(&["--no-collector.timers", "--collector.timers"]);
        assert!(back.iter().all(|(_, on)| *on));
    }

    #[test]
    fn disable_defaults_keeps_only_the_collectors_named() {
        let only = parse(&["--collector.disable-defaults", "--collector.modules"]);
        let on: Vec<&str> = only.iter().filter(|(_, on)| *on).map(|(n, _)| *n).collect();
        assert_eq!(on, ["modules"]);
        let none = parse(&["--collector.disable-defaults"]);
        assert!(none.iter().all(|(_, on)| !on));
        let named_then_off = parse(&[
            "--collector.disable-defaults",
            "--collector.taint",
            "--no-collector.taint",
        ]);
        assert!(named_then_off.iter().all(|(_, on)| !on));
    }

    fn matches(args: &[&str]) -> ArgMatches {
        augment(clap::Command::new("observer"))
            .try_get_matches_from(std::iter::once("observer").chain(args.iter().copied()))
            .unwrap()
    }

    #[test]
    fn a_flag_of_a_collector_that_is_off_is_an_error() {
        let err =
            check_flags(&matches(&["--no-collector.timers", "--timers.latency"])).unwrap_err();
        assert!(err.starts_with("--timers.latency has no effect with the timers collector off"));
        assert!(
            check_flags(&matches(&[
                "--collector.disable-defaults",
                "--collector.modules",
                "--timers.short-lived",
                "5ms"
            ]))
            .is_err()
        );
        assert!(check_flags(&matches(&["--timers.latency"])).is_ok());
        // Defaults are not given on the command line.
        assert!(check_flags(&matches(&["--no-collector.timers"])).is_ok());
    }

    #[test]
    fn the_command_keeps_its_own_description() {
        let command = augment(clap::Command::new("observer").about("the observer"));
        assert_eq!(
            command.get_about().map(ToString::to_string).as_deref(),
            Some("the observer")
        );
    }

    /// The places docs/development.md's "Adding a hook family" lists, for every registered
    /// family: its three modules and the lines that declare and register them.
    #[test]
    fn a_family_touches_the_listed_places() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap_or_default();
        let guide = read("docs/development.md");
        let section = guide
            .split("## Adding a hook family")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("docs/development.md has its \"Adding a hook family\" section");
        for place in [
            "observer-common/src/<family>.rs",
            "observer-common/src/lib.rs",
            "pub mod <family>;",
            "observer-ebpf/src/<family>.rs",
            "observer-ebpf/src/main.rs",
            "observer/src/<family>.rs",
            "observer/src/<family>/mod.rs",
            "pub const FAMILY: Registration",
            "observer/src/main.rs",
            "observer/src/registry.rs",
            "<family>::FAMILY",
        ] {
            assert!(section.contains(place), "the guide no longer names {place}");
        }
        let registry = read("observer/src/registry.rs");
        for family in FAMILIES {
            let name = family.name;
            let common = read(&format!("observer-common/src/{name}.rs"));
            assert!(
                common.contains("pub const NAMES: Names"),
                "{name}: its NAMES"
            );
            assert!(
                read("observer-common/src/lib.rs").contains(&format!("pub mod {name};")),
                "{name}"
            );
            assert!(
                root.join(format!("observer-ebpf/src/{name}.rs")).exists(),
                "{name}: its programs"
            );
            assert!(
                read("observer-ebpf/src/main.rs").contains(&format!("mod {name};")),
                "{name}"
            );
            let agent = [
                format!("observer/src/{name}.rs"),
                format!("observer/src/{name}/mod.rs"),
            ]
            .iter()
            .map(|p| read(p))
            .find(|text| !text.is_empty())
            .unwrap_or_default();
            assert!(
                agent.contains("pub const FAMILY: Registration"),
                "{name}: its agent module's FAMILY"
            );
            assert!(
                agent.contains("impl HookFamily for"),
                "{name}: its HookFamily"
            );
            assert!(
                read("observer/src/main.rs").contains(&format!("mod {name};")),
                "{name}"
            );
            assert!(
                registry.contains(&format!("    {name}::FAMILY,")),
                "{name}: its registry line"
            );
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
    }
}
