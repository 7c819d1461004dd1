//! Everything CI runs, in the order a failure is cheapest to find.
use clap::Args;

use crate::{cargo, setup, vm};

#[derive(Args, Debug, Default)]
pub struct Options {
    /// Skip the QEMU scenarios (for quick local runs; CI runs them).
    #[arg(long)]
    pub no_vm: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    setup::run()?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The integration tests start the real agent as root against this machine's kernel.
    cargo(&["test", "--release", "--workspace"])?;
    if options.no_vm {
        eprintln!("test: --no-vm given: the QEMU scenarios did not run");
        return Ok(());
    }
    vm::run(&vm::Options::default())
}
