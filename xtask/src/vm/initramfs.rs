//! The guest's whole root file system, one per kernel: busybox, /init, the observer, the guest
//! tool, the network driver's modules, the scenarios' modules and their scripts. Everything the
//! guest needs travels in it, so no shared folder (and no 9p modules) is involved.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use guest_tests::scenarios::Scenario;

use super::{
    fixtures,
    kernel::{Kernel, pipe_through},
};

const INIT: &str = include_str!("../../guest/init.sh");

/// Modules for the network driver (virtio_pci is built in on 6.12, a module on 6.1).
const NETWORK_MODULES: &[&str] = &["virtio_pci", "virtio_net"];
/// What an unprivileged socket(2) of family AF_CAN has the kernel autoload (`net-pf-29` is
/// `can`, its raw protocol `can-proto-1` is `can_raw`), as the package stores them (signed,
/// compressed from 6.12), for the `autoload` scenario's modprobe.
const AUTOLOAD_MODULES: &[&str] = &["can_raw"];

pub struct Inputs<'a> {
    pub kernel: &'a Kernel,
    pub busybox: &'a Path,
    pub guest_tool: &'a Path,
    /// The agent, when it built.
    pub observer: Option<&'a Path>,
    pub scenarios: &'a [&'a Scenario],
    pub work: &'a Path,
}

/// Builds `<work>/initramfs.cpio.gz` and returns its path.
pub fn build(inputs: &Inputs) -> anyhow::Result<PathBuf> {
    let kernel = inputs.kernel;
    let stage = inputs.work.join("root");
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "vm/net",
        "vm/mods",
        "vm/autoload",
        "vm/scenarios",
    ] {
        fs::create_dir_all(stage.join(dir))?;
    }
    write_executable(&stage.join("init"), INIT.as_bytes())?;
    fs::copy(inputs.busybox, stage.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", stage.join("bin/sh"))?;
    fs::copy(inputs.guest_tool, stage.join("vm/guest-tool"))?;
    if let Some(observer) = inputs.observer {
        // Without debug info the archive is several times smaller; symbols stay for backtraces.
        let stripped = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(observer)
            .arg(stage.join("observer"))
            .status()
            .is_ok_and(|s| s.success());
        if !stripped {
            fs::copy(observer, stage.join("observer"))?;
        }
    }

    // Debian's own kmod (the host's: bookworm's kmod 30, as Debian 12 ships it), for the
    // scenarios that load as a distribution does: its modprobe and insmod decompress a
    // `.ko.xz` themselves and call init_module(2). Under /usr/sbin, apart from busybox's applets.
    add_kmod(&stage)?;

    let mut order = String::new();
    for module in kernel.modules_with_deps(NETWORK_MODULES)? {
        let name = plain_name(&module)?;
        fs::write(stage.join("vm/net").join(&name), read_module(&module)?)?;
        order.push_str(&name);
        order.push('\n');
    }
    fs::write(stage.join("vm/net/order"), order)?;
    for module in kernel.modules_with_deps(AUTOLOAD_MODULES)? {
        let file = module
            .file_name()
            .context("module path without a file name")?;
        fs::copy(&module, stage.join("vm/autoload").join(file))?;
    }
    // The kernel's module list: `observer profile` counts the modules a Merkle tree would cover.
    let modules_dir = Path::new("lib/modules").join(&kernel.release);
    fs::create_dir_all(stage.join(&modules_dir))?;
    fs::copy(
        kernel.root.join(&modules_dir).join("modules.dep"),
        stage.join(&modules_dir).join("modules.dep"),
    )?;

    // The kernel's scenario modules (see `Series::scenario_modules`), each as `NAME.ko.xz`
    // (signed, compressed) and the uncompressed variants of `fixtures` (signed, unsigned, signed
    // by a foreign key, with a corrupt or a malformed signature), with their manifest; the
    // scripts know them as $M1 $M2 $M3 from /vm/mods/names.
    let names = kernel.series.scenario_modules();
    let mut variables = String::new();
    for (i, name) in names.iter().enumerate() {
        variables.push_str(&format!("M{}={name}\n", i + 1));
    }
    let mods = stage.join("vm/mods");
    fs::write(mods.join("names"), variables)?;
    // One key per build, kept with the build's other files and never reused.
    let key = fixtures::SigningKey::generate(&inputs.work.join("signing"))?;
    fs::write(mods.join("foreign-cert.der"), &key.cert_der)?;
    let mut manifest = String::new();
    for name in names {
        let path = kernel.standalone_module(name)?;
        let file = plain_name(&path)?;
        let stem = file.trim_end_matches(".ko");
        let plain = read_module(&path)?;
        let compressed = if path.extension().is_some_and(|e| e == "xz") {
            fs::read(&path)?
        } else {
            // The kernel's decompressor takes CRC32 checks only.
            pipe_through(&["xz", "-cq", "--check=crc32"], &plain)?
        };
        fs::write(mods.join(format!("{file}.xz")), compressed)?;
        manifest.push_str(
            &fixtures::write_variants(&mods, stem, &plain, &key)
                .with_context(|| format!("the variants of {}", path.display()))?,
        );
    }
    fs::write(mods.join("manifest"), manifest)?;

    // Per scenario: its steps, the observer's arguments, the steps before the observer starts.
    for scenario in inputs.scenarios {
        for (suffix, text) in [
            ("sh", format!(". /vm/mods/names\n{}", scenario.guest)),
            ("agent", scenario.agent_args.to_owned()),
            (
                "pre",
                format!(". /vm/mods/names\n{}", scenario.before_agent),
            ),
        ] {
            fs::write(
                stage
                    .join("vm/scenarios")
                    .join(format!("{}.{suffix}", scenario.name)),
                text,
            )?;
        }
    }

    let archive = inputs.work.join("initramfs.cpio.gz");
    // cpio reads the file list from find; -R 0:0 makes root own everything in the guest.
    crate::run(
        Command::new("sh")
            .args([
                "-ec",
                "cd \"$1\" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 >\"$2\"",
                "sh",
            ])
            .arg(&stage)
            .arg(&archive),
    )
    .context("packing the initramfs (packages cpio, gzip)")?;
    Ok(archive)
}

/// The host's kmod and the shared libraries it needs (as `ldd` finds them), with its
/// modprobe, insmod and depmod names.
fn add_kmod(stage: &Path) -> anyhow::Result<()> {
    let kmod = Path::new("/usr/bin/kmod");
    let listed = Command::new("ldd")
        .arg(kmod)
        .output()
        .context("ldd /usr/bin/kmod (package kmod)")?;
    ensure!(listed.status.success(), "ldd /usr/bin/kmod failed");
    let text = String::from_utf8_lossy(&listed.stdout);
    // `libzstd.so.1 => /lib/x86_64-linux-gnu/libzstd.so.1 (0x...)` and the loader's own line.
    for path in text.split_whitespace().filter(|word| word.starts_with('/')) {
        let target = stage.join(path.trim_start_matches('/'));
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(path, &target).with_context(|| format!("copying {path}"))?;
    }
    let sbin = stage.join("usr/sbin");
    fs::create_dir_all(&sbin)?;
    fs::copy(kmod, sbin.join("kmod"))?;
    for name in ["modprobe", "insmod", "depmod", "rmmod"] {
        std::os::unix::fs::symlink("kmod", sbin.join(name))?;
    }
    Ok(())
}

/// `crc7.ko` for both `.../crc7.ko` and `.../crc7.ko.xz`.
fn plain_name(path: &Path) -> anyhow::Result<String> {
    let name = path
        .file_name()
        .context("module path without a file name")?
        .to_string_lossy();
    Ok(name.trim_end_matches(".xz").to_owned())
}

/// The uncompressed module (busybox and plain finit_module take those).
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "xz") {
        pipe_through(&["xz", "-dcq"], &bytes)
    } else {
        Ok(bytes)
    }
}

fn write_executable(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}
