//! Builds the eBPF programs (observer-ebpf) for the BPF target and leaves them in OUT_DIR, where
//! the agent includes them, and records what `observer_build_info` reports: the git commit the
//! agent is built from (`OBSERVER_REVISION`) and the compiler's version (`OBSERVER_RUSTC`).
//!
//! The programs need a Rust toolchain with its library source (for `-Z build-std=core`).
//! `cargo xtask setup` provides one; this picks it in order: `OBSERVER_EBPF_TOOLCHAIN` if set,
//! else the `debian-1.96` toolchain that setup links into rustup, else rustup's nightly.
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const LINKED_TOOLCHAIN: &str = "debian-1.96";

fn main() -> anyhow::Result<()> {
    build_info();
    println!("cargo:rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain = match std::env::var("OBSERVER_EBPF_TOOLCHAIN") {
        Ok(name) => name,
        Err(_) if rustup_has(LINKED_TOOLCHAIN) => LINKED_TOOLCHAIN.to_owned(),
        Err(_) => "nightly".to_owned(),
    };
    if toolchain != "nightly" {
        // A stable compiler takes -Z build-std only with this; aya-build reads it from our env.
        // SAFETY: the build script is single-threaded here.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let metadata = cargo_metadata_dir()?;
    let ebpf = Package {
        name: "observer-ebpf",
        root_dir: &metadata,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain)).with_context(|| {
        format!(
            "building the eBPF programs with toolchain {toolchain} failed; \
             run `cargo xtask setup` to install what they need"
        )
    })
}

/// The commit and compiler, for `observer_build_info{revision, rustc}`. `OBSERVER_REVISION` set
/// in the environment wins (a build from a source tarball, outside git, can still name its
/// commit); outside git and without it the revision is `unknown`.
fn build_info() {
    println!("cargo:rerun-if-env-changed=OBSERVER_REVISION");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&manifest)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let revision = std::env::var("OBSERVER_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| git(&["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // A checkout rewrites HEAD and a commit appends to HEAD's reflog: the revision is taken
    // again then (watching a file that does not exist would rerun this on every build).
    for file in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", file])
            && std::path::Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    println!("cargo:rustc-env=OBSERVER_REVISION={revision}");

    // `rustc 1.95.0 (59807616e 2026-04-14)`: the version word, as go_info's `version` has Go's.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split_whitespace().nth(1).map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=OBSERVER_RUSTC={version}");
}

fn rustup_has(name: &str) -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with(name))
        })
        .unwrap_or(false)
}

fn cargo_metadata_dir() -> anyhow::Result<String> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let dir = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("no workspace above {manifest}"))?
        .join("observer-ebpf");
    Ok(dir.to_string_lossy().into_owned())
}
