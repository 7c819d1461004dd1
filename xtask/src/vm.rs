//! Scenarios in a QEMU guest running Debian's kernel.
use clap::Args;

#[derive(Args, Debug, Default)]
pub struct Options {
    /// Scenarios to run (all when none are named).
    pub scenarios: Vec<String>,
}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    anyhow::bail!("the VM harness is not built yet")
}
