//! Everything CI runs, in the order a failure is cheapest to find.
use clap::Args;

use crate::{cargo, setup, vm};

#[derive(Args, Debug, Default)]
pub struct Options {}

pub fn run(_options: &Options) -> anyhow::Result<()> {
    setup::run()?;
    cargo(&["fmt", "--all", "--check"])?;
    // The eBPF crate alone (the agent's `user` feature of observer-common would pull std into
    // it), with panic=abort as its real build has.
    crate::run(
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "clippy",
                "--release",
                "--package",
                "observer-ebpf",
                "--",
                "-D",
                "warnings",
            ])
            .env("CARGO_PROFILE_RELEASE_PANIC", "abort")
            .current_dir(crate::workspace_root()),
    )?;
    cargo(&[
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "observer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // Unit tests, then integration tests that start the real agent as root against this
    // machine's kernel and scrape it over HTTP.
    // What the integration tests drive: a TLS client, certificates, bpftool for counting
    // programs left behind, unshare/setpriv for hostile environments; promtool for checking a
    // real scrape's exposition (installed once here; the dashboards check uses it too).
    setup::apt_install(&["curl", "openssl", "bpftool", "util-linux"])?;
    setup::prometheus()?;
    // The deployment files: offline schema checks and systemd-analyze.
    crate::deploy::run()?;
    cargo(&["test", "--release"])?;
    // The module path and the primary mechanisms, in QEMU guests running Debian's kernels; the
    // `dashboards` scenario runs every dashboard query and alert rule through a real Prometheus
    // scraping this host's agent and the guest's.
    vm::run(&vm::Options::default())
}
