//! observer: watches how the kernel verifies what it loads, whom lockdown refuses, and POSIX
//! timer-ID churn, and serves it all as Prometheus metrics.

mod agent;
mod cli;
mod generate;
mod http;
mod kernel;
mod lockdown;
mod maps;
mod metrics;
mod modules;
mod pipeline;
mod plan;
mod privileges;
mod profile;
mod timers;
mod webconfig;

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use aya::{EbpfLoader, maps::RingBuf};
use clap::Parser as _;

use crate::{
    agent::{Agent, State},
    cli::{Cli, Command, ProfileFormat, RunArgs},
    lockdown::{Lockdown, LockdownMaps},
    maps::Maps,
    modules::{ModuleMaps, ModuleState},
    plan::{Hook, KernelView, ProbeStatus},
    timers::{TimerMaps, TimerSettings, TimerState},
};

/// The eBPF programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

fn main() {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.run.log_level)
        .parse_default_env()
        .format_target(false)
        .init();
    let result = match cli.command {
        None => run_agent(&cli.run),
        Some(Command::Probes) => print_probes(&cli.run),
        Some(Command::Generate { artifact }) => generate::run(artifact),
        Some(Command::Profile {
            duration,
            format,
            merkle_leaves,
        }) => run_profile(
            &cli.run,
            duration,
            format,
            merkle_leaves.or_else(kernel::module_count),
        ),
    };
    if let Err(err) = result {
        eprintln!("observer: error: {err:#}");
        std::process::exit(1);
    }
}

/// Every hook of every family, in the order they attach.
fn all_hooks(timer_hook: timers::SyscallHook) -> Vec<Hook> {
    [
        timers::hooks(timer_hook),
        lockdown::hooks(),
        modules::hooks(),
    ]
    .concat()
}

/// Loads the programs with what this kernel needs them to know, and attaches every hook.
fn load(kernel: &KernelView, args: &RunArgs) -> anyhow::Result<(aya::Ebpf, Vec<ProbeStatus>)> {
    let buffer_size = args.events_buffer_size;
    let btf = kernel.btf.as_ref().ok();
    let offset = |s: &str, m: &str| btf.and_then(|b| b.member_offset(s, m)).unwrap_or(0);
    let (signal, live) = (
        offset("task_struct", "signal"),
        offset("signal_struct", "live"),
    );
    if signal == 0 || live == 0 {
        log::warn!(
            "no BTF offsets for task_struct.signal/signal_struct.live: a process's timers are taken to die with its main thread"
        );
    }
    let file_dentry = offset("file", "f_path") + offset("path", "dentry");
    let dentry_name = offset("dentry", "d_name") + offset("qstr", "name");
    let read_ids = btf
        .map(|b| b.enum_values("kernel_read_file_id"))
        .unwrap_or_default();
    let read_id = |name: &str| {
        read_ids
            .iter()
            .find(|(_, n)| *n == name)
            .map_or(u32::MAX, |(v, _)| *v)
    };
    let (reading_module, reading_compressed) = (
        read_id("READING_MODULE"),
        read_id("READING_MODULE_COMPRESSED"),
    );
    // Where the saved user registers keep the first three syscall arguments and the syscall
    // number (x86_64: di, si, dx, orig_ax), for the raw syscall tracepoints.
    let register = |name: &str, default: u32| {
        btf.and_then(|b| b.member_offset("pt_regs", name))
            .unwrap_or(default)
    };
    let pt_regs_args: [u32; 3] = [register("di", 112), register("si", 104), register("dx", 96)];
    let pt_regs_nr = register("orig_ax", 120);
    // Wake the agent at a quarter full, or 64 KiB, whichever comes first.
    let wakeup_bytes = u64::from(buffer_size / 4).min(64 * 1024);
    let mut ebpf = EbpfLoader::new()
        .btf(kernel.aya_btf.as_ref())
        .map_max_entries("EVENTS", buffer_size)
        .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
        .override_global("TASK_SIGNAL_OFFSET", &signal, true)
        .override_global("SIGNAL_LIVE_OFFSET", &live, true)
        .override_global("FILE_DENTRY_OFFSET", &file_dentry, true)
        .override_global("DENTRY_NAME_OFFSET", &dentry_name, true)
        .override_global("READING_MODULE", &reading_module, true)
        .override_global("READING_MODULE_COMPRESSED", &reading_compressed, true)
        .override_global("SYS_TIMER_CREATE", &(libc::SYS_timer_create as u64), true)
        .override_global("SYS_TIMER_DELETE", &(libc::SYS_timer_delete as u64), true)
        .override_global("SYS_TIMER_SETTIME", &(libc::SYS_timer_settime as u64), true)
        .override_global("SYS_PRCTL", &(libc::SYS_prctl as u64), true)
        .override_global("PT_REGS_ARG_OFFSETS", &pt_regs_args, true)
        .override_global("PT_REGS_NR_OFFSET", &pt_regs_nr, true)
        .override_global("LOAD_INFO_LEN_OFFSET", &offset("load_info", "len"), true)
        .load(PROGRAMS)
        .context("loading the eBPF object (maps and programs)")?;
    let statuses = plan::attach(&mut ebpf, &all_hooks(args.timers_hook), kernel);
    Ok((ebpf, statuses))
}

fn missing_probes(hooks: &[Hook], statuses: &[ProbeStatus]) -> Vec<&'static str> {
    hooks
        .iter()
        .filter(|h| !statuses.iter().any(|s| s.probe == h.name && s.attached))
        .map(|h| h.name)
        .collect()
}

/// The loaded, attached programs and the agent reading them.
struct Started {
    ebpf: aya::Ebpf,
    agent: Arc<Agent>,
    ring: RingBuf<aya::maps::MapData>,
}

/// Loads and attaches everything this kernel allows and builds the agent's state.
fn start(args: &RunArgs, keep_samples: bool) -> anyhow::Result<Started> {
    kernel::ensure_securityfs();
    let kernel = KernelView::read();
    let (mut ebpf, probes) = load(&kernel, args)?;
    let hooks = all_hooks(args.timers_hook);
    let missing = missing_probes(&hooks, &probes);
    if missing.len() == hooks.len() {
        let reasons: Vec<String> = probes
            .iter()
            .map(|s| format!("{} ({}): {}", s.probe, s.mechanism, s.detail))
            .collect();
        bail!(
            "no probe could attach on this kernel:\n  {}",
            reasons.join("\n  ")
        );
    }
    if args.strict && !missing.is_empty() {
        let reasons: Vec<String> = probes
            .iter()
            .filter(|s| missing.contains(&s.probe))
            .map(|s| format!("{} ({}): {}", s.probe, s.mechanism, s.detail))
            .collect();
        bail!("--strict: probes not attached:\n  {}", reasons.join("\n  "));
    }

    let mut maps = Maps::new(&mut ebpf);
    let ring = RingBuf::try_from(maps.take("EVENTS")?).context("map EVENTS")?;
    let settings = TimerSettings {
        short_lived_ns: u64::try_from(args.timers_short_lived.as_nanos()).unwrap_or(u64::MAX),
        top_processes: usize::from(args.timers_top_processes),
    };
    let state = State {
        events: Default::default(),
        decode_errors: 0,
        timers: TimerState::new(settings),
        lockdown: Lockdown::new(kernel.btf.as_ref().ok()),
        modules: ModuleState::new(keep_samples, kernel::module_count()),
    };
    let agent = Arc::new(Agent {
        timer_maps: TimerMaps::take(&mut maps)?,
        module_maps: ModuleMaps::take(&mut maps)?,
        lockdown_maps: LockdownMaps::take(&mut maps)?,
        events_lost: maps.per_cpu_array("EVENTS_LOST")?,
        state: std::sync::Mutex::new(state),
        probes,
        kernel_release: kernel::release(),
    });
    drop(kernel);
    // Parsing the kernel's BTF (twice: ours and aya's) takes tens of MiB that are free now;
    // hand them back so the resident size reflects what the agent keeps.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    Ok(Started { ebpf, agent, ring })
}

fn run_agent(args: &RunArgs) -> anyhow::Result<()> {
    privileges::check()?;
    // Bind first: a taken port should fail before anything is loaded into the kernel.
    let listener = std::net::TcpListener::bind(args.listen_address).map_err(|err| {
        let hint = match err.kind() {
            std::io::ErrorKind::AddrInUse => {
                "; is another observer running? pick another with --web.listen-address"
            }
            std::io::ErrorKind::AddrNotAvailable => "; that address is not on this host",
            _ => "",
        };
        anyhow!("cannot listen on {}: {err}{hint}", args.listen_address)
    })?;
    listener.set_nonblocking(true)?;
    let web = match &args.web_config_file {
        Some(path) => webconfig::WebConfig::load(path)?,
        None => webconfig::WebConfig::default(),
    };
    let Started {
        mut ebpf,
        agent,
        ring,
    } = start(args, false)?;
    // The programs' own log lines, forwarded into ours (before capabilities go: it takes a map).
    let kernel_logs = aya_log::EbpfLogger::init(&mut ebpf)
        .map_err(|err| log::warn!("no log lines from the eBPF programs: {err}"))
        .ok();
    // Everything privileged is done: programs attached, port bound, files read.
    privileges::drop_all_but(privileges::needed_after_start(&agent.kernel_release))?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        log::info!(
            "serving metrics on http://{}{}",
            args.listen_address,
            args.telemetry_path
        );
        let mut pipeline = pipeline::Pipeline::new(ring, agent.clone(), args.events.is_some())?;
        let server = http::serve(
            listener,
            agent.clone(),
            args.telemetry_path.as_str().into(),
            Arc::new(web),
        );
        let kernel_logs = async {
            match kernel_logs {
                Some(logger) => pipeline::forward_kernel_logs(logger).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            result = pipeline.run() => result.context("event pipeline"),
            result = kernel_logs => result.context("eBPF log lines"),
            () = server => Ok(()),
            signal = shutdown_signal() => {
                log::info!("{}: detaching and exiting", signal?);
                Ok(())
            }
        };
        pipeline.drain_now();
        result
    })?;
    drop(agent);
    drop(ebpf);
    Ok(())
}

fn run_profile(
    args: &RunArgs,
    duration: Duration,
    format: ProfileFormat,
    leaves: Option<u64>,
) -> anyhow::Result<()> {
    privileges::check()?;
    let Started { ebpf, agent, ring } = start(args, true)?;
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut pipeline = pipeline::Pipeline::new(ring, agent.clone(), false)?;
        let result = tokio::select! {
            result = pipeline.run() => result.context("event pipeline"),
            () = tokio::time::sleep(duration) => Ok(()),
            signal = shutdown_signal() => signal.map(|_| ()),
        };
        // Loads that finished just before the end are in the ring buffer still.
        pipeline.drain_now();
        result
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let samples = {
        let mut state = agent
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::take(&mut state.modules.samples)
    };
    let report = profile::report(&samples, elapsed, leaves);
    match format {
        ProfileFormat::Text => print!("{}", profile::text(&report)),
        ProfileFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    drop(agent);
    drop(ebpf);
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    })
}

fn print_probes(args: &RunArgs) -> anyhow::Result<()> {
    privileges::check()?;
    kernel::ensure_securityfs();
    let kernel = KernelView::read();
    let (ebpf, statuses) = load(&kernel, args)?;
    println!("kernel {}", kernel::release());
    println!(
        "{:<22} {:<15} {:<9} DETAIL",
        "PROBE", "MECHANISM", "ATTACHED"
    );
    for s in &statuses {
        println!(
            "{:<22} {:<15} {:<9} {}",
            s.probe,
            s.mechanism,
            if s.attached { "yes" } else { "no" },
            s.detail
        );
    }
    let missing = missing_probes(&all_hooks(args.timers_hook), &statuses);
    if !missing.is_empty() {
        println!("not attached: {}", missing.join(", "));
    }
    drop(ebpf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_names_a_program_in_the_object() {
        let ebpf = aya_obj_programs();
        for hook in all_hooks(timers::SyscallHook::Tracepoint)
            .into_iter()
            .chain(all_hooks(timers::SyscallHook::RawTracepoint))
        {
            for attachment in hook.options.iter().flatten() {
                assert!(
                    ebpf.contains(&attachment.program.to_owned()),
                    "{} missing from the object",
                    attachment.program
                );
            }
        }
    }

    /// Program names in the built object, read without loading it into a kernel.
    fn aya_obj_programs() -> Vec<String> {
        let text = PROGRAMS;
        let mut names = Vec::new();
        for hook in all_hooks(timers::SyscallHook::Tracepoint)
            .into_iter()
            .chain(all_hooks(timers::SyscallHook::RawTracepoint))
        {
            for attachment in hook.options.iter().flatten() {
                if text
                    .windows(attachment.program.len())
                    .any(|w| w == attachment.program.as_bytes())
                {
                    names.push(attachment.program.to_owned());
                }
            }
        }
        names
    }
}
