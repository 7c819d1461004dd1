//! `cargo xtask dist`: the release files an operator installs, in `target/dist/`:
//! - `observer-<version>-x86_64-unknown-linux-gnu.tar.gz`: the static binary, README, licences,
//!   dashboards, deployment files, man page and shell completions;
//! - `observer_<version>_amd64.deb`, built by cargo-deb from `[package.metadata.deb]`;
//! - `observer-<version>-oci.tar`: an OCI image layout archive (for `skopeo copy`);
//! - `SHA256SUMS`.
//!
//! With `--check` (and from `cargo xtask test`) each is then proven the way an operator uses it:
//! see `check`. Times are set from the last commit (SOURCE_DATE_EPOCH), archive entries sorted
//! and owned by root, gzip without a timestamp, so that the same commit gives the same files.
mod archive;
mod boot;
mod check;
mod debian;
mod guest;
mod oci;
mod pins;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Args;

use crate::workspace_root;

#[derive(Args, Debug, Default)]
pub struct Options {
    /// Then prove each file: static binary, .deb in a Debian 12 root and under systemd in a
    /// QEMU guest, OCI archive through skopeo.
    #[arg(long)]
    pub check: bool,
}

/// The version of every file (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The only target released: the eBPF side is built for x86_64 kernels.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where the image is published; the DaemonSet and kustomization name it with the version tag.
pub const IMAGE: &str = "ghcr.io/observer-ebpf/observer";
/// cargo-deb, pinned so that the package's layout does not change under us.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The files `run` writes.
pub struct Artifacts {
    pub tarball: PathBuf,
    pub deb: PathBuf,
    pub oci: PathBuf,
    pub sums: PathBuf,
    pub epoch: u64,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let artifacts = build()?;
    if options.check {
        check::run(&artifacts)?;
    }
    Ok(())
}

/// What `cargo xtask test` runs: build, then prove each file.
pub fn check() -> anyhow::Result<()> {
    run(&Options { check: true })
}

pub fn build() -> anyhow::Result<Artifacts> {
    let root = workspace_root();
    let dist = root.join("target/dist");
    let stage = dist.join("stage");
    if dist.exists() {
        fs::remove_dir_all(&dist).with_context(|| format!("clearing {}", dist.display()))?;
    }
    fs::create_dir_all(stage.join("completions"))?;
    fs::create_dir_all(stage.join("systemd"))?;
    let epoch = source_date_epoch()?;

    let binary = stage.join("observer");
    // The debug info stays in target/static; the released binary is stripped (as a Debian
    // package's must be, .comment included) and the same in all three files.
    crate::run(
        Command::new("strip")
            .args(["--strip-all", "--remove-section=.comment", "-o"])
            .arg(&binary)
            .arg(build_static()?),
    )?;
    generate(&binary, "man", &stage.join("observer.8"))?;
    generate(&binary, "bash", &stage.join("completions/observer.bash"))?;
    generate(&binary, "zsh", &stage.join("completions/_observer"))?;
    generate(&binary, "fish", &stage.join("completions/observer.fish"))?;
    // The repository's unit serves the tarball's /usr/local install; the package's binary is
    // in /usr/bin.
    let unit = fs::read_to_string(root.join("deploy/systemd/observer.service"))?;
    if !unit.contains("ExecStart=/usr/local/bin/observer ") {
        bail!("deploy/systemd/observer.service: no ExecStart=/usr/local/bin/observer to rewrite");
    }
    fs::write(
        stage.join("systemd/observer.service"),
        unit.replace(
            "ExecStart=/usr/local/bin/observer ",
            "ExecStart=/usr/bin/observer ",
        ),
    )?;

    let tarball = archive::tarball(&root, &stage, &dist, epoch)?;
    let deb = debian::package(&root, &dist, epoch)?;
    let oci = oci::image(&stage, &dist, epoch)?;
    let sums = archive::sha256sums(&dist, &[&tarball, &deb, &oci])?;
    eprintln!("dist: wrote {}:", dist.display());
    for file in [&tarball, &deb, &oci, &sums] {
        eprintln!("  {}", file.strip_prefix(&dist).unwrap_or(file).display());
    }
    println!("image {IMAGE}:{VERSION}");
    Ok(Artifacts {
        tarball,
        deb,
        oci,
        sums,
        epoch,
    })
}

/// The agent linked statically against glibc (static-pie: no ELF interpreter), as the VM
/// guests run it; the same target folder, so the two share the build.
fn build_static() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "--package",
                "observer",
                "--bin",
                "observer",
            ])
            .args(["--target", TARGET, "--target-dir", "target/static"])
            // For the agent's target only: not for build scripts, nor the eBPF programs'
            // inner build for the BPF target.
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .current_dir(workspace_root()),
    )?;
    Ok(workspace_root()
        .join("target/static")
        .join(TARGET)
        .join("release/observer"))
}

/// The man page or a completion script, from the binary's own command line definition.
fn generate(binary: &Path, artifact: &str, out: &Path) -> anyhow::Result<()> {
    let output = Command::new(binary)
        .args(["generate", artifact])
        .output()
        .with_context(|| format!("running {} generate {artifact}", binary.display()))?;
    if !output.status.success() || output.stdout.is_empty() {
        bail!(
            "observer generate {artifact} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    fs::write(out, output.stdout).with_context(|| format!("writing {}", out.display()))
}

/// The last commit's time: every timestamp in the files (reproducible-builds.org's convention).
fn source_date_epoch() -> anyhow::Result<u64> {
    if let Ok(value) = std::env::var("SOURCE_DATE_EPOCH") {
        return value
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={value:?} is not a number"));
    }
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(workspace_root())
        .output()
        .context("running git (the release time is the last commit's)")?;
    if !out.status.success() {
        bail!(
            "git log failed (set SOURCE_DATE_EPOCH outside a git checkout): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("git log printed {text:?}, not a time"))
}

/// A program's output, failing with its stderr when it exits non-zero.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The hex SHA-256 of a file (coreutils' sha256sum).
pub fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = output(Command::new("sha256sum").arg("--binary").arg(path))?;
    out.split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .map(str::to_owned)
        .with_context(|| format!("sha256sum printed {out:?}"))
}
