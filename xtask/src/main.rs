//! Project tasks: `setup` (toolchain), `run` (the agent), `test` (everything CI runs), `vm`
//! (scenarios in a QEMU guest running a distro kernel).
mod bench;
mod dashboards;
mod deploy;
mod dist;
mod doc_links;
mod setup;
mod stats;
mod test;
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "observer's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs (fast when all is in place).
    Setup,
    /// Set up, build, and run the agent; arguments after `--` go to the agent.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test: lints, unit tests, host integration tests, VM scenarios.
    Test(test::Options),
    /// Boot Debian's kernel in QEMU and run the named scenarios (all when none are named).
    Vm(vm::Options),
    /// Measure what observing costs (against bpftrace) and write BENCHMARKS.md.
    Bench(bench::Options),
    /// Check the Grafana dashboards and alert rules against the agent and a real Prometheus.
    Dashboards {
        /// Another agent to scrape too (a loopback host:port, such as a QEMU guest's).
        #[arg(long)]
        target: Vec<String>,
    },
    /// Validate the deployment files (systemd unit, Kubernetes manifests) offline.
    Deploy,
    /// Build the release files into target/dist (static tarball, .deb, OCI image archive);
    /// --check proves each as an operator installs it.
    Dist(dist::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Run { args } => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "observer"])?;
            let status = Command::new(workspace_root().join("target/release/observer"))
                .args(args)
                .status()
                .context("starting target/release/observer")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Test(options) => test::run(&options),
        Task::Bench(options) => bench::run(&options),
        Task::Dashboards { target } => {
            setup::run()?;
            dashboards::run_with_targets(&target)
        }
        Task::Deploy => deploy::run(),
        Task::Dist(options) => {
            setup::run()?;
            dist::run(&options)
        }
        Task::Vm(options) => {
            setup::run()?;
            vm::run(&options)
        }
    }
}

/// The workspace's top folder.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Runs cargo (the one running this task) in the workspace, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(workspace_root()))
}

/// Runs a command, echoing it, failing on a non-zero exit.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// A temporary folder for one task's run, removed when dropped (also when the task errors out).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(task: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("observer-{task}.{}", std::process::id()));
        // A leftover from a killed run with a recycled process ID.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
