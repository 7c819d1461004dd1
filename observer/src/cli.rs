//! The command line: subcommands and the agent's flags, exporter style (`--web.listen-address`).

use std::{net::SocketAddr, time::Duration};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

use crate::{parse::parse_duration, registry};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "eBPF observer of module integrity, lockdown decisions and POSIX timer churn"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write the man page or a shell's completions to stdout (used to build the packages).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        artifact: Artifact,
    },
    /// Print, for this kernel, each hook: the mechanism tried, whether it attached, and why not.
    Probes,
    /// Remove the security programs, maps and ring buffer pinned under --pin.path (by an agent
    /// run with --pin): they stop watching. Nothing else to do when nothing is pinned.
    Unpin,
    /// Watch module loads live, then print integrity-check cost per module and in total.
    Profile {
        /// How long to watch (Ctrl-C ends it early).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        /// text, or json for scripts.
        #[arg(long, value_enum, default_value = "text")]
        format: ProfileFormat,
        /// Modules a Merkle tree would cover, for the hash-check estimate (default: this
        /// kernel's module count from modules.dep).
        #[arg(long)]
        merkle_leaves: Option<u64>,
        /// Instead of watching: what the running agent measured since it started (its module
        /// verdicts, integrity-check time and share of load time, modules loaded before it),
        /// read from its metrics at --from. Started early in boot, that is the boot's cost.
        #[arg(long, conflicts_with_all = ["duration", "merkle_leaves"])]
        since_start: bool,
        /// The running agent's metrics address, for --since-start.
        #[arg(
            long,
            default_value = "127.0.0.1:9745",
            value_name = "ADDR:PORT",
            requires = "since_start"
        )]
        from: SocketAddr,
    },
}

/// What `observer generate` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Artifact {
    Man,
    Bash,
    Zsh,
    Fish,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Address to serve metrics on: ADDR:PORT, or :PORT for every address of the host; repeat
    /// the flag to serve on several.
    #[arg(
        long = "web.listen-address",
        default_value = "127.0.0.1:9745",
        value_name = "ADDR:PORT",
        value_parser = crate::listen::parse_listen_address,
        action = clap::ArgAction::Append
    )]
    pub listen_addresses: Vec<SocketAddr>,
    /// TLS and basic-auth settings, in the Prometheus exporter-toolkit format.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<std::path::PathBuf>,
    /// Path under which to expose metrics.
    #[arg(long = "web.telemetry-path", default_value = "/metrics", value_parser = parse_path)]
    pub telemetry_path: String,
    /// Also write one JSON object per event (see the schema in schemas/events.schema.json).
    #[arg(long, value_enum)]
    pub events: Option<EventsFormat>,
    /// Where the events go: - for stdout, or a file appended to and reopened on SIGHUP (with
    /// --events).
    #[arg(
        long = "events.output",
        default_value = "-",
        value_name = "PATH",
        requires = "events"
    )]
    pub events_output: crate::events::Output,
    /// The cgroup2 hierarchy the events' cgroup and container_id come from (with --events).
    /// By default the mount table's cgroup2 mount that shows the whole hierarchy, else its
    /// first: in a container with its own cgroup namespace, mount the host's /sys/fs/cgroup
    /// into it (read-only) to name other containers' cgroups.
    #[arg(
        long = "cgroup.root",
        value_name = "PATH",
        value_parser = crate::cgroups::parse_root,
        requires = "events"
    )]
    pub cgroup_root: Option<std::path::PathBuf>,
    /// Size of the ring buffer carrying records to the agent, in bytes: a power of two from
    /// 4096 to 1 GiB. Records that find it full are counted in observer_events_lost_total.
    #[arg(long = "events.buffer-size", default_value_t = DEFAULT_BUFFER_SIZE, value_parser = parse_buffer_size)]
    pub events_buffer_size: u32,
    /// Keep the security collectors (modules, taint, lockdown) watching while no agent runs:
    /// their programs, maps and ring buffer are pinned under --pin.path, and the next agent of
    /// the same build adopts them (counters go on, what was recorded meanwhile is read). The
    /// timer collector detaches on stop as always. `observer unpin` removes the pins.
    #[arg(long)]
    pub pin: bool,
    /// The bpffs directory the pins go under (--pin), one directory per build.
    #[arg(
        long = "pin.path",
        default_value = "/sys/fs/bpf/observer",
        value_name = "DIR",
        global = true
    )]
    pub pin_path: std::path::PathBuf,
    /// Exit with an error when any probe cannot attach (by default it is a warning and a metric).
    #[arg(long)]
    pub strict: bool,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long = "log.level", default_value = "info")]
    pub log_level: log::LevelFilter,
    /// How log lines are written: text, logfmt, or json (one object per line).
    #[arg(long = "log.format", value_enum, default_value = "text")]
    pub log_format: crate::logging::LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EventsFormat {
    Json,
}

/// The whole command line: the fixed flags and subcommands, and every registered family's
/// collector switch and own flags.
pub fn command() -> clap::Command {
    registry::augment(Cli::command())
}

/// Parses the process's arguments (exits with clap's message and status 2 on bad input, and on
/// flags that would have no effect with the others given).
pub fn parse() -> (Cli, clap::ArgMatches) {
    let mut command = command();
    let matches = command.get_matches_mut();
    if let Err(message) = registry::check_flags(&matches) {
        command
            .error(clap::error::ErrorKind::ArgumentConflict, message)
            .exit();
    }
    match Cli::from_arg_matches(&matches) {
        Ok(cli) => (cli, matches),
        Err(err) => err.exit(),
    }
}

pub fn parse_path(text: &str) -> Result<String, String> {
    if text.starts_with('/') && !text.contains(char::is_whitespace) && text != "/healthz" {
        Ok(text.to_owned())
    } else {
        Err("must start with '/', contain no spaces, and not be /healthz".into())
    }
}

/// 1 MiB: about 16,000 timer records, tens of milliseconds of a storm.
const DEFAULT_BUFFER_SIZE: u32 = 1 << 20;

pub fn parse_buffer_size(text: &str) -> Result<u32, String> {
    let size: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if size.is_power_of_two() && (4096..=1 << 30).contains(&size) {
        Ok(size)
    } else {
        Err("must be a power of two from 4096 to 1073741824".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_paths() {
        assert!(parse_path("/metrics").is_ok());
        assert!(parse_path("metrics").is_err());
        assert!(parse_path("/healthz").is_err());
    }
}
