//! Every hook family, in the order they attach, and the collector flags they get from being here
//! (`--collector.<name>`, `--no-collector.<name>`, node_exporter style). Adding a family is its
//! three files (record, eBPF program, agent module) and one line here.

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

/// Adds every family's collector switch and own flags to the command line.
pub fn augment(mut command: clap::Command) -> clap::Command {
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
    command
}

/// Whether each family is switched on: every one is unless `--no-collector.<name>` came last.
pub fn enabled(matches: &ArgMatches) -> Vec<(&'static Registration, bool)> {
    FAMILIES
        .iter()
        .map(|family| {
            let off = matches
                .try_get_one::<bool>(&disable_flag(family.name))
                .ok()
                .flatten()
                .copied()
                .unwrap_or(false);
            (family, !off)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Vec<(&'static str, bool)> {
        let command = augment(clap::Command::new("observer"));
        let matches = command
            .try_get_matches_from(std::iter::once("observer").chain(args.iter().copied()))
            .unwrap();
        enabled(&matches)
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
    fn names_are_unique() {
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len());
    }
}
