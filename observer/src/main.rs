//! observer: watches how the kernel verifies what it loads, whom lockdown refuses, and POSIX
//! timer-ID churn, and serves it all as Prometheus metrics.

mod agent;
/// Hand-made BTF for the tests that decide from prototypes.
#[cfg(test)]
mod btf_writer;
mod cgroups;
mod cli;
mod events;
mod family;
mod generate;
mod http;
mod kernel;
mod listen;
mod lockdown;
mod logging;
mod maps;
mod memlock;
mod merkle;
mod metrics;
mod modules;
mod notify;
mod parse;
mod pins;
mod pipeline;
mod plan;
mod privileges;
mod process;
mod profile;
mod programs;
mod record;
mod registry;
mod since_start;
mod start;
mod taint;
mod timers;
mod webconfig;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context as _;

use crate::{
    cli::{Command, RunArgs},
    plan::KernelView,
    start::{Built, Selection, Started},
};

fn main() {
    let (cli, matches) = cli::parse();
    logging::init(cli.run.log_level, cli.run.log_format);
    let result = match cli.command {
        None => run_agent(&matches, &cli.run),
        Some(Command::Probes) => print_probes(&matches, &cli.run),
        Some(Command::Unpin) => privileges::check()
            .and_then(|()| pins::unpin(&cli.run.pin_path))
            .map(|report| print!("{report}")),
        Some(Command::Generate { artifact }) => generate::run(artifact),
        Some(Command::Profile {
            since_start: true,
            from,
            format,
            ..
        }) => since_start::run(from, &cli.run.telemetry_path, format),
        Some(Command::Profile {
            duration,
            format,
            merkle_leaves,
            ..
        }) => profile::run(
            &Selection {
                matches: &matches,
                args: &cli.run,
                only: Some(profile::COLLECTORS),
                samples: Some(modules::load::Samples::default()),
            },
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

fn run_agent(matches: &clap::ArgMatches, args: &RunArgs) -> anyhow::Result<()> {
    privileges::check()?;
    memlock::raise_for_maps(&kernel::release());
    // Bind first: a taken port should fail before anything is loaded into the kernel.
    let listeners = listen::bind_all(&args.listen_addresses)?;
    let web = match &args.web_config_file {
        Some(path) => webconfig::WebConfig::load(path)?,
        None => webconfig::WebConfig::default(),
    };
    // The events file is opened while the agent may still create it anywhere.
    let (events, writer) = match args.events {
        Some(_) => {
            let (stream, writer) =
                events::EventStream::open(args.events_output.clone(), args.cgroup_root.clone())?;
            (Some(stream), Some(writer))
        }
        None => (None, None),
    };
    let reopen = writer.as_ref().map(|w| w.reopen.clone());
    let Started {
        mut ebpf,
        agent,
        rings,
    } = start::start(&Selection {
        matches,
        args,
        only: None,
        samples: None,
    })?;
    // The programs' own log lines, forwarded into ours (before capabilities go: it takes a map).
    let kernel_logs = aya_log::EbpfLogger::init(&mut ebpf)
        .map_err(|err| log::warn!("no log lines from the eBPF programs: {err}"))
        .ok();
    // Everything privileged is done: programs attached, port bound, files read.
    privileges::drop_all_but(privileges::needed_after_start(&agent.kernel_release))?;
    // Every kind of map the scrapes read, read once now: a capability the drop took that
    // reading needs is an error at start, not a scrape that fails later.
    for (collector, result, _) in agent.collect_families(&mut Vec::new()) {
        result.with_context(|| {
            format!("after dropping capabilities, the {collector} collector cannot read its maps")
        })?;
    }

    // Watching: a unit that starts the agent early (before udev) lets the boot go on now.
    notify::ready();
    // Threads started after the drop have only what is left (capabilities are per thread).
    let writer = writer.map(|w| w.spawn(agent.clone())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = pipeline::Reader::new(rings, agent.clone(), events).spawn(stop.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let reopen_on_hangup = async {
            let mut hangup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            loop {
                hangup.recv().await;
                if let Some(reopen) = &reopen {
                    reopen.store(true, Ordering::Relaxed);
                }
            }
            #[expect(unreachable_code, reason = "gives the loop's error type")]
            anyhow::Ok(())
        };
        let server = listen::serve_all(listeners, agent.clone(), &args.telemetry_path, web);
        let kernel_logs = async {
            match kernel_logs {
                Some(logger) => pipeline::forward_kernel_logs(logger).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = kernel_logs => result.context("eBPF log lines"),
            result = reopen_on_hangup => result.context("SIGHUP"),
            () = server => Ok(()),
            signal = shutdown_signal() => {
                let signal = signal?;
                if agent.pins.pinned {
                    log::info!(
                        "{signal}: detaching the timer programs and exiting; the security programs \
                         stay pinned under {} and keep watching (`observer unpin` removes them)",
                        args.pin_path.display()
                    );
                } else {
                    log::info!("{signal}: detaching and exiting");
                }
                Ok(())
            }
        }
    });
    // The reader takes in what is still waiting, hands it to the writer and ends; the writer
    // ends once it has written everything queued (a stopped reader of stdout cannot hold the
    // exit: the writer thread is not waited for then).
    stop.store(true, Ordering::Relaxed);
    if reader.join().is_err() {
        log::warn!("the ring buffer reader panicked");
    }
    if let Some(writer) = writer {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !writer.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    result?;
    drop(agent);
    drop(ebpf);
    Ok(())
}

pub async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    })
}

fn print_probes(matches: &clap::ArgMatches, args: &RunArgs) -> anyhow::Result<()> {
    privileges::check()?;
    memlock::raise_for_maps(&kernel::release());
    kernel::ensure_securityfs();
    let kernel = KernelView::read();
    let selection = Selection {
        matches,
        args,
        only: None,
        samples: None,
    };
    let built = start::build(&selection, &kernel)?;
    let start::Loaded {
        ebpf,
        statuses,
        links,
        ..
    } = start::load(&kernel, args, &built, None)?;
    let Built {
        enabled,
        disabled_hooks,
        ..
    } = built;
    let mut out = format!("kernel {}\n", kernel::release());
    out += &format!(
        "{:<22} {:<15} {:<9} DETAIL\n",
        "PROBE", "MECHANISM", "ATTACHED"
    );
    for s in &statuses {
        out += &format!(
            "{:<22} {:<15} {:<9} {}\n",
            s.probe,
            s.mechanism,
            if s.attached { "yes" } else { "no" },
            s.detail
        );
    }
    for (collector, hook) in &disabled_hooks {
        out += &format!(
            "{:<22} {:<15} {:<9} --no-collector.{collector}\n",
            hook.name, "-", "disabled"
        );
    }
    for note in enabled.iter().filter_map(|(_, f)| f.kernel_notes()) {
        out += &format!("{note}\n");
    }
    let hooks: Vec<_> = enabled.iter().flat_map(|(_, f)| f.hooks()).collect();
    let missing = start::missing_probes(&hooks, &statuses);
    if !missing.is_empty() {
        out += &format!("not attached: {}\n", missing.join(", "));
    }
    for (dir, programs) in pins::list(&args.pin_path) {
        out += &format!(
            "pinned: {} ({programs} programs of the security collectors, left by an agent run \
             with --pin; they watch while no agent runs): remove with `observer unpin`\n",
            dir.display()
        );
    }
    // One write, ending in a newline: log lines that follow start on their own line.
    print!("{out}");
    drop(links);
    drop(ebpf);
    Ok(())
}
