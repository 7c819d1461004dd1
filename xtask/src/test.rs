//! Everything CI runs, in the order a failure is cheapest to find.
use std::path::{Path, PathBuf};

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
    // The integration tests log each test they skip (a kernel feature this host lacks) here; a
    // log left from an earlier run would report its skips as this run's.
    let skip_log = skip_log();
    if let Err(e) = std::fs::remove_file(&skip_log)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        anyhow::bail!("removing {}: {e}", skip_log.display());
    }
    let tested = cargo(&["test", "--release"]);
    report_skips(&skip_log);
    tested?;
    // The release files, each proven as an operator installs it (the .deb under systemd in a
    // QEMU guest too).
    crate::dist::check()?;
    // The module path and the primary mechanisms, in QEMU guests running Debian's kernels; the
    // `dashboards` scenario runs every dashboard query and alert rule through a real Prometheus
    // scraping this host's agent and the guest's.
    vm::run(&vm::Options::default())
}

/// cargo's scratch folder for integration tests (CARGO_TARGET_TMPDIR), where they log skips.
fn skip_log() -> PathBuf {
    let root = crate::workspace_root();
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir))
        .join("tmp/skipped-tests.txt")
}

/// Prints the tests skipped for a missing kernel feature, so that no skip goes unseen.
fn report_skips(log: &Path) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    if text.trim().is_empty() {
        return;
    }
    eprintln!("\nskipped (the running kernel lacks a feature):");
    for line in text.lines() {
        eprintln!("  {line}");
    }
    eprintln!();
}
