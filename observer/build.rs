//! Builds the eBPF programs (observer-ebpf) for the BPF target and leaves them in OUT_DIR, where
//! the agent includes them.
//!
//! The programs need a Rust toolchain with its library source (for `-Z build-std=core`).
//! `cargo xtask setup` provides one; this picks it in order: `OBSERVER_EBPF_TOOLCHAIN` if set,
//! else the `debian-1.96` toolchain that setup links into rustup, else rustup's nightly.
use std::process::Command;

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const LINKED_TOOLCHAIN: &str = "debian-1.96";

fn main() -> anyhow::Result<()> {
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
