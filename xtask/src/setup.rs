//! Makes this machine able to build the eBPF programs, installing only what is missing.
//!
//! The programs build with `-Z build-std=core` for `bpfel-unknown-none`, which needs the Rust
//! library source of the exact compiler, and link with bpf-linker, which needs an LLVM at least
//! as new as that compiler's. Where rustup's nightly has rust-src, that is used. Otherwise
//! (rustup here cannot download rust-src) Debian's rustc-web 1.96 with its source, and LLVM 22
//! for bpf-linker, come from apt, and the Debian toolchain is linked into rustup as
//! `debian-1.96`, which observer/build.rs picks.
use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

const DEBIAN_RUST: &str = "1.96.0+dfsg1-1~deb12u2";
const LINKED_TOOLCHAIN: &str = "debian-1.96";
const BPF_LINKER: &str = "bpf-linker@0.13.0";
const LLVM: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    if !nightly_has_rust_src() {
        debian_toolchain()?;
    }
    bpf_linker()?;
    Ok(())
}

fn nightly_has_rust_src() -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    out.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .is_dir()
}

fn debian_toolchain() -> anyhow::Result<()> {
    let rustc_ok = Command::new("/usr/bin/rustc")
        .arg("--version")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).starts_with("rustc 1.96"));
    let source_ok = Path::new("/usr/lib/rustlib/src/rust/library/core").is_dir();
    let llvm_ok = Path::new(LLVM).join("bin/llvm-config").exists();
    if !(rustc_ok && source_ok && llvm_ok) {
        let pin = |p: &str| format!("{p}={DEBIAN_RUST}");
        let packages = [
            pin("rustc-web"),
            pin("cargo-web"),
            pin("rust-web-src"),
            "llvm-22-dev".into(),
            "libpolly-22-dev".into(),
            "libzstd-dev".into(),
            "zlib1g-dev".into(),
            "clang-22".into(),
            "bpftool".into(),
        ];
        apt_install(&packages.iter().map(String::as_str).collect::<Vec<_>>())?;
    }
    let linked = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.starts_with(LINKED_TOOLCHAIN))
        });
    if !linked {
        eprintln!("setup: linking Debian's Rust 1.96 into rustup as {LINKED_TOOLCHAIN}");
        crate::run(Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("setup: installing {BPF_LINKER} against LLVM 22 (about 1.5 minutes)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(
        Command::new(cargo)
            .args([
                "install",
                "--locked",
                BPF_LINKER,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_SYS_221_PREFIX", LLVM)
            // Without this its build script finds /usr/bin/llvm-config (an older LLVM).
            .env("LLVM_PREFIX", LLVM),
    )
    .context("installing bpf-linker")?;
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}

/// Installs Debian packages that are missing, saying which; fails with what to do when it can't.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !dpkg_has(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    if !root || which("apt-get").is_none() {
        bail!(
            "missing packages: {}.\nInstall them as root on Debian 12 (bookworm, with \
             bookworm-security enabled):\n  apt-get update && apt-get install -y --no-install-recommends {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    crate::run(Command::new("apt-get").arg("update").arg("-q"))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Debian's Prometheus: `promtool` checks real scrapes in the integration tests and the rules
/// in the dashboards check, which also runs `prometheus` itself (never as a service).
pub fn prometheus() -> anyhow::Result<()> {
    let installing = !dpkg_has("prometheus");
    apt_install(&["prometheus"])?;
    if installing && Path::new("/run/systemd/system").is_dir() {
        // The package starts and enables its own service on :9090; a machine that only
        // installed it for these checks wants no server left on.
        crate::run(Command::new("systemctl").args(["disable", "--now", "prometheus"]))?;
    }
    Ok(())
}

/// True when the package (optionally `name=version`) is installed at that version.
fn dpkg_has(package: &str) -> bool {
    let (name, version) = package
        .split_once('=')
        .map_or((package, None), |(n, v)| (n, Some(v)));
    let Ok(out) = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}|${Version}", name])
        .output()
    else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some((status, installed)) = text.split_once('|') else {
        return false;
    };
    status.ends_with("installed")
        && status.starts_with("install")
        && version.is_none_or(|v| v == installed)
}

pub fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
