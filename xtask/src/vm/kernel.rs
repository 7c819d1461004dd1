//! Debian kernels for the guest, cached under `.cache/vm/`: the package is downloaded once,
//! unpacked, given a modules.dep, and its ELF vmlinux extracted for a PVH boot.
//!
//! Layout: `debs/` (the .deb files), `kernels/<series>/{root/,vmlinux,package,ready}`. A series
//! whose `ready` exists is used as it is, without asking apt; delete `kernels/<series>` to move to
//! Debian's newest build of that series.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use clap::ValueEnum;

/// The kernel lines the scenarios run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Series {
    /// Debian 12's backported 6.12: fentry/fexit, BPF LSM, compressed modules, MODULE_DECOMPRESS.
    #[value(name = "6.12")]
    V6_12,
    /// Debian 12's own 6.1: older BTF and lockdown enum, uncompressed modules.
    #[value(name = "6.1")]
    V6_1,
}

impl Series {
    pub const ALL: [Series; 2] = [Series::V6_12, Series::V6_1];

    pub fn label(self) -> &'static str {
        match self {
            Series::V6_12 => "6.12",
            Series::V6_1 => "6.1",
        }
    }

    /// The build number in a package name of this series, e.g. 117 in
    /// `linux-image-6.12.117+deb12-amd64` or 56 in `linux-image-6.1.0-56-amd64`.
    fn build_of(self, package: &str) -> Option<u32> {
        let number = match self {
            Series::V6_12 => {
                package
                    .strip_prefix("linux-image-6.12.")?
                    .strip_suffix("-amd64")?
                    .split_once("+deb")
                    .filter(|(_, debian)| debian.chars().all(|c| c.is_ascii_digit()))?
                    .0
            }
            Series::V6_1 => package
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64")?,
        };
        number.parse().ok()
    }
}

/// An unpacked kernel package ready to boot.
#[derive(Debug)]
pub struct Kernel {
    pub series: Series,
    /// Package name and version, as apt names them.
    pub package: String,
    /// `uname -r` of the kernel, the folder name under lib/modules.
    pub release: String,
    /// The unpacked package.
    pub root: PathBuf,
    /// The uncompressed ELF kernel, which qboot starts through its PVH entry point.
    pub vmlinux: PathBuf,
}

impl Kernel {
    /// The module files to load, in order, so that `names` and their dependencies load; built-in
    /// names are skipped.
    pub fn modules_with_deps(&self, names: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&self.root)
            .args(["-S", &self.release, "--show-depends", "-a"])
            .args(names)
            .output()
            .context("running modprobe --show-depends (package kmod)")?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {names:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut paths: Vec<PathBuf> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.trim());
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
        Ok(paths)
    }

    /// The file of one module that has no dependencies (the scenarios load them one by one).
    pub fn standalone_module(&self, name: &str) -> anyhow::Result<PathBuf> {
        let paths = self.modules_with_deps(&[name])?;
        match paths.as_slice() {
            [path] => Ok(path.clone()),
            [] => bail!("module {name} is not in {}", self.package),
            _ => bail!(
                "module {name} of {} has dependencies: {paths:?}",
                self.package
            ),
        }
    }
}

/// The cached kernel of `series`, downloading and unpacking it first if needed.
pub fn ensure(cache: &Path, series: Series) -> anyhow::Result<Kernel> {
    let dir = cache.join("kernels").join(series.label());
    if let Some(kernel) = load_cached(&dir, series)? {
        return Ok(kernel);
    }
    let (package, version) = newest_package(series)?;
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = match find_deb(&debs, &package)? {
        Some(deb) => deb,
        None => {
            eprintln!("vm: downloading {package} {version}");
            crate::run(
                Command::new("apt-get")
                    .args(["download", "-q", &format!("{package}={version}")])
                    .current_dir(&debs),
            )?;
            find_deb(&debs, &package)?.context("apt-get download left no .deb")?
        }
    };
    eprintln!("vm: unpacking {}", deb.display());
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    crate::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let release = only_child(&root.join("lib/modules"))?;
    // The .deb leaves modules.dep to the postinst script.
    crate::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    let bzimage = fs::read(root.join("boot").join(format!("vmlinuz-{release}")))
        .context("reading the package's vmlinuz")?;
    fs::write(dir.join("vmlinux"), extract_vmlinux(&bzimage)?)?;
    fs::write(
        dir.join("package"),
        format!("{package} {version} {release}\n"),
    )?;
    fs::write(dir.join("ready"), "")?;
    load_cached(&dir, series)?.context("the kernel cache was just written")
}

fn load_cached(dir: &Path, series: Series) -> anyhow::Result<Option<Kernel>> {
    if !dir.join("ready").exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(dir.join("package"))?;
    let mut words = text.split_whitespace();
    let (Some(name), Some(version), Some(release)) = (words.next(), words.next(), words.next())
    else {
        bail!(
            "{} is malformed: delete {}",
            dir.join("package").display(),
            dir.display()
        );
    };
    Ok(Some(Kernel {
        series,
        package: format!("{name} {version}"),
        release: release.to_owned(),
        root: dir.join("root"),
        vmlinux: dir.join("vmlinux"),
    }))
}

/// The newest image package of the series that apt knows, and its candidate version.
fn newest_package(series: Series) -> anyhow::Result<(String, String)> {
    let mut updated = false;
    loop {
        let out = Command::new("apt-cache")
            .args(["pkgnames", "linux-image-6."])
            .output()
            .context("running apt-cache")?;
        let names = String::from_utf8_lossy(&out.stdout);
        let newest = names
            .lines()
            .filter_map(|n| series.build_of(n).map(|b| (b, n.to_owned())))
            .max();
        if let Some((_, name)) = newest {
            let version = candidate_version(&name)?;
            return Ok((name, version));
        }
        if updated {
            bail!(
                "apt knows no linux-image package of the {} series (Debian 12 with \
                 bookworm-security has them)",
                series.label()
            );
        }
        // apt's lists may be missing or old on a fresh machine.
        crate::run(Command::new("apt-get").args(["update", "-q"]))?;
        updated = true;
    }
}

fn candidate_version(package: &str) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["policy", package])
        .output()
        .context("running apt-cache policy")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .map(str::to_owned)
        .with_context(|| format!("apt has no candidate version of {package}"))
}

/// A `.deb` of `package` already in `debs`.
fn find_deb(debs: &Path, package: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(debs)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn only_child(dir: &Path) -> anyhow::Result<String> {
    let mut names = fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(
        names.len() == 1,
        "expected one kernel in {}, found {names:?}",
        dir.display()
    );
    Ok(names.remove(0))
}

/// The ELF kernel inside a bzImage. The x86 boot header says where the compressed payload is
/// (`setup_sects` at 0x1f1, `payload_offset`/`payload_length` at 0x248, boot protocol 2.08+); the
/// build appends the uncompressed size as 4 little-endian bytes, which decompressors must not see.
fn extract_vmlinux(bzimage: &[u8]) -> anyhow::Result<Vec<u8>> {
    ensure!(
        bzimage.get(0x202..0x206) == Some(b"HdrS"),
        "not a bzImage (no HdrS boot header)"
    );
    let u32_at = |at: usize| -> anyhow::Result<u32> {
        let bytes = bzimage
            .get(at..at + 4)
            .context("bzImage header cut short")?;
        Ok(u32::from_le_bytes(bytes.try_into()?))
    };
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + usize::try_from(u32_at(0x248)?)?;
    let length = usize::try_from(u32_at(0x24c)?)?;
    let payload = bzimage
        .get(start..start + length)
        .context("bzImage payload out of bounds")?;
    let (compressed, size) = payload.split_at(length - 4);
    let size = u32::from_le_bytes(size.try_into()?) as usize;
    let tool: &[&str] = if compressed.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        &["zstd", "-dcq"]
    } else if compressed.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        &["xz", "-dcq"]
    } else if compressed.starts_with(&[0x1f, 0x8b]) {
        &["gzip", "-dcq"]
    } else {
        bail!(
            "unknown kernel compression (payload starts {:02x?})",
            &compressed[..compressed.len().min(6)]
        );
    };
    let vmlinux = pipe_through(tool, compressed)?;
    ensure!(
        vmlinux.starts_with(b"\x7fELF") && vmlinux.len() == size,
        "the decompressed kernel is not the {size}-byte ELF the bzImage announces"
    );
    Ok(vmlinux)
}

/// Runs `tool` with `input` on its standard input and returns its standard output.
pub fn pipe_through(tool: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tool[0]))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?
        .with_context(|| format!("feeding {}", tool[0]))?;
    ensure!(out.status.success(), "{tool:?} failed: {}", out.status);
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_by_series() {
        assert_eq!(
            Series::V6_12.build_of("linux-image-6.12.117+deb12-amd64"),
            Some(117)
        );
        assert_eq!(
            Series::V6_12.build_of("linux-image-6.12.117+deb12-amd64-dbg"),
            None
        );
        assert_eq!(
            Series::V6_12.build_of("linux-image-6.12.117+deb12-cloud-amd64"),
            None
        );
        assert_eq!(Series::V6_12.build_of("linux-image-6.12-amd64"), None);
        assert_eq!(
            Series::V6_1.build_of("linux-image-6.1.0-56-amd64"),
            Some(56)
        );
        assert_eq!(Series::V6_1.build_of("linux-image-6.1.0-56-rt-amd64"), None);
        assert_eq!(
            Series::V6_1.build_of("linux-image-6.1.0-56-amd64-unsigned"),
            None
        );
    }
}
