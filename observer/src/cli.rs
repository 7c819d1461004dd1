//! The command line: subcommands and the agent's flags, exporter style (`--web.listen-address`).

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::timers;

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
        artifact: crate::generate::Artifact,
    },
    /// Print, for this kernel, each hook: the mechanism tried, whether it attached, and why not.
    Probes,
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
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Address to serve metrics on.
    #[arg(
        long = "web.listen-address",
        default_value = "127.0.0.1:9745",
        value_name = "ADDR:PORT"
    )]
    pub listen_address: SocketAddr,
    /// TLS and basic-auth settings, in the Prometheus exporter-toolkit format.
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<std::path::PathBuf>,
    /// Path under which to expose metrics.
    #[arg(long = "web.telemetry-path", default_value = "/metrics", value_parser = parse_path)]
    pub telemetry_path: String,
    /// Also write one object per event to stdout.
    #[arg(long, value_enum)]
    pub events: Option<EventsFormat>,
    /// Size of the ring buffer carrying records to the agent, in bytes: a power of two from
    /// 4096 to 1 GiB. Records that find it full are counted in observer_events_lost_total.
    #[arg(long = "events.buffer-size", default_value_t = DEFAULT_BUFFER_SIZE, value_parser = parse_buffer_size)]
    pub events_buffer_size: u32,
    /// Which timer syscall hooks to prefer (the other is the fallback).
    #[arg(long = "timers.hook", value_enum, default_value = "tracepoint")]
    pub timers_hook: timers::SyscallHook,
    /// Exit with an error when any probe cannot attach (by default it is a warning and a metric).
    #[arg(long)]
    pub strict: bool,
    /// A timer deleted this soon after creation, never armed, counts as short-lived churn.
    #[arg(long = "timers.short-lived", default_value = "10ms", value_parser = parse_duration)]
    pub timers_short_lived: Duration,
    /// How many process names get their own series in the per-process timer metric.
    #[arg(long = "timers.top-processes", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub timers_top_processes: u16,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long = "log.level", default_value = "info")]
    pub log_level: log::LevelFilter,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EventsFormat {
    Json,
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

/// Parses durations like `10ms`, `500us`, `2s`, `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or("needs a unit: ns, us, ms, s or m")?;
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a whole number"))?;
    match unit {
        "ns" => Ok(Duration::from_nanos(value)),
        "us" | "µs" => Ok(Duration::from_micros(value)),
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value.saturating_mul(60))),
        other => Err(format!("unknown unit {other:?}: use ns, us, ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("10h").is_err());
    }

    #[test]
    fn telemetry_paths() {
        assert!(parse_path("/metrics").is_ok());
        assert!(parse_path("metrics").is_err());
        assert!(parse_path("/healthz").is_err());
    }
}
