//! Debian kernels for the guest, cached under `.cache/vm/`: the package is downloaded once,
//! unpacked, given a modules.dep, and its ELF vmlinux extracted for a PVH boot.
//!
//! Layout: `debs/` (the .deb files), `apt-<suite>/` (a temporary apt configuration for each
//! suite the machine's apt does not list), `kernels/<series>/{root/,vmlinux,package,ready}`. A series
//! whose `ready` exists is used as it is, without asking apt; delete `kernels/<series>` to move to
//! Debian's newest build of that series.
mod archive;
mod image;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

pub use self::image::pipe_through;
use self::{archive::Archive, image::extract_vmlinux};

pub use guest_tests::Series;

/// Packages from a suite the machine's apt does not list, pinned to the build the scenarios
/// were written against.
struct Pinned {
    /// The packages that together hold the image and the modules.
    packages: &'static [&'static str],
    version: &'static str,
    /// The archive suite they come from.
    suite: &'static str,
}

/// The suite the newest kernels come from.
const BACKPORTS: &str = "trixie-backports";
/// Debian 11's kernel updates.
const BULLSEYE_SECURITY: &str = "bullseye-security";

/// Where each series' packages come from and how their names read.
trait Packaged {
    fn pinned(self) -> Option<Pinned>;
    fn image_prefix(self) -> &'static str;
    fn build_of(self, package: &str) -> Option<u32>;
}

impl Packaged for Series {
    /// Where a newest-kernel series comes from; `None` for the machine's own apt sources.
    fn pinned(self) -> Option<Pinned> {
        match self {
            Series::V6_12 | Series::V6_1 => None,
            Series::V5_10 => Some(Pinned {
                packages: &["linux-image-5.10.0-46-amd64"],
                version: "5.10.262-1",
                suite: BULLSEYE_SECURITY,
            }),
            Series::V6_18 => Some(Pinned {
                packages: &["linux-image-6.18.15+deb13-amd64"],
                version: "6.18.15-1~bpo13+1",
                suite: BACKPORTS,
            }),
            // From 6.19 linux-image-* is a meta package over these two.
            Series::V7_3 => Some(Pinned {
                packages: &[
                    "linux-binary-7.3.4+deb13-amd64",
                    "linux-modules-7.3.4+deb13-amd64",
                ],
                version: "7.3.4-1~bpo13+1",
                suite: BACKPORTS,
            }),
        }
    }

    /// The prefix of the package names apt is asked for (the one holding the image).
    fn image_prefix(self) -> &'static str {
        match self {
            Series::V5_10 => "linux-image-5.10.0-",
            Series::V6_12 => "linux-image-6.12.",
            Series::V6_1 => "linux-image-6.1.0-",
            Series::V6_18 => "linux-image-6.18.",
            Series::V7_3 => "linux-binary-7.3.",
        }
    }

    /// The build number in a package name of this series, e.g. 117 in
    /// `linux-image-6.12.117+deb12-amd64`, 56 in `linux-image-6.1.0-56-amd64`, 4 in
    /// `linux-binary-7.3.4+deb13-amd64`.
    fn build_of(self, package: &str) -> Option<u32> {
        let rest = package.strip_prefix(self.image_prefix())?;
        let number = match self {
            Series::V5_10 | Series::V6_1 => rest.strip_suffix("-amd64")?,
            Series::V6_12 | Series::V6_18 | Series::V7_3 => {
                rest.strip_suffix("-amd64")?
                    .split_once("+deb")
                    .filter(|(_, debian)| debian.chars().all(|c| c.is_ascii_digit()))?
                    .0
            }
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
        // Without modules.builtin (7.3's packages ship none) modprobe cannot tell a built-in
        // name from a missing one: only names with a module file are asked for.
        let files = self.module_names()?;
        let names: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| files.contains(&n.replace('-', "_")))
            .collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&self.root)
            .args(["-S", &self.release, "--show-depends", "-a"])
            .args(&names)
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

    /// The names of the package's module files (`-` written `_`, as the kernel names them).
    fn module_names(&self) -> anyhow::Result<Vec<String>> {
        let dep = self
            .root
            .join("lib/modules")
            .join(&self.release)
            .join("modules.dep");
        let text =
            fs::read_to_string(&dep).with_context(|| format!("reading {}", dep.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter_map(|path| path.rsplit('/').next())
            .filter_map(|file| file.split(".ko").next())
            .map(|name| name.replace('-', "_"))
            .collect())
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
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let (packages, version) = match series.pinned() {
        None => {
            let (package, version) = newest_package(series)?;
            if find_deb(&debs, &package, &version)?.is_none() {
                eprintln!("vm: downloading {package} {version}");
                crate::run(
                    Command::new("apt-get")
                        .args(["download", "-q", &format!("{package}={version}")])
                        .current_dir(&debs),
                )?;
            }
            (vec![package], version)
        }
        Some(pinned) => pinned_packages(cache, series, &pinned, &debs)?,
    };
    let mut files = Vec::new();
    for package in &packages {
        files.push(
            find_deb(&debs, package, &version)?
                .with_context(|| format!("apt-get download left no .deb of {package}"))?,
        );
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let root = dir.join("root");
    fs::create_dir_all(&root)?;
    for deb in &files {
        eprintln!("vm: unpacking {}", deb.display());
        crate::run(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
    }
    // From Debian 13 the modules live under usr/lib; depmod -b and modprobe -d look in lib/.
    if !root.join("lib").exists() && root.join("usr/lib/modules").is_dir() {
        std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    }
    let release = only_child(&root.join("lib/modules"))?;
    // The .deb leaves modules.dep to the postinst script.
    crate::run(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
    // 6.1 to 6.18 keep the image in boot/, 7.3 beside its modules.
    let image = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        root.join("lib/modules").join(&release).join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no vmlinuz of {release} in {}", packages.join(", ")))?;
    let bzimage = fs::read(&image).with_context(|| format!("reading {}", image.display()))?;
    fs::write(dir.join("vmlinux"), extract_vmlinux(&bzimage)?)?;
    fs::write(
        dir.join("package"),
        format!("{} {version} {release}\n", packages.join(",")),
    )?;
    fs::write(dir.join("ready"), "")?;
    load_cached(&dir, series)?.context("the kernel cache was just written")
}

/// The pinned packages of a series from another suite, downloaded into `debs` through a
/// temporary apt configuration; when the archive no longer has the pinned build, the newest
/// build of the same series, and it says so.
fn pinned_packages(
    cache: &Path,
    series: Series,
    pinned: &Pinned,
    debs: &Path,
) -> anyhow::Result<(Vec<String>, String)> {
    let mut have = true;
    for package in pinned.packages {
        have &= find_deb(debs, package, pinned.version)?.is_some();
    }
    if have {
        return Ok((owned(pinned.packages), pinned.version.to_owned()));
    }
    let suite = pinned.suite;
    let mut archive = Archive::new(cache.join(format!("apt-{suite}")), suite);
    // The index in the cache may be old: the archive drops builds as new ones come.
    archive.update()?;
    let mut chosen = (owned(pinned.packages), pinned.version.to_owned());
    let mut listed = true;
    for package in pinned.packages {
        listed &= archive
            .versions(package)?
            .iter()
            .any(|v| v == pinned.version);
    }
    if !listed {
        let newest = archive
            .names(series.image_prefix())?
            .into_iter()
            .filter_map(|n| series.build_of(&n).map(|b| (b, n)))
            .max()
            .map(|(_, name)| name)
            .with_context(|| {
                format!(
                    "{suite} has neither {} {} nor any other build of the {} series",
                    pinned.packages.join(", "),
                    pinned.version,
                    series.label()
                )
            })?;
        let packages = siblings(series, pinned.packages, &newest);
        let version = archive
            .versions(&newest)?
            .into_iter()
            .next()
            .with_context(|| format!("apt lists no version of {newest}"))?;
        eprintln!(
            "vm: NOTE {suite} no longer has {} {}: using {} {version}, the newest build of \
             the {} series",
            pinned.packages.join(", "),
            pinned.version,
            packages.join(", "),
            series.label()
        );
        chosen = (packages, version);
    }
    for package in &chosen.0 {
        if find_deb(debs, package, &chosen.1)?.is_none() {
            eprintln!("vm: downloading {package} {}", chosen.1);
            archive.download(package, &chosen.1, debs)?;
        }
    }
    Ok(chosen)
}

/// The names of `pinned`'s packages for the build that `image` (the image package's name)
/// belongs to: `linux-modules-7.3.4+deb13-amd64` beside `linux-binary-7.3.5+deb13-amd64` becomes
/// `linux-modules-7.3.5+deb13-amd64`.
fn siblings(series: Series, pinned: &[&str], image: &str) -> Vec<String> {
    let build = image.trim_start_matches(series.image_prefix());
    pinned
        .iter()
        .map(|p| {
            let kind = p.split(series.label()).next().unwrap_or(p);
            format!("{kind}{}.{build}", series.label())
        })
        .collect()
}

fn owned(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
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

/// The `.deb` of `package` at `version` already in `debs` (apt writes the epoch's colon as
/// `%3a`; no kernel package here has one).
fn find_deb(debs: &Path, package: &str, version: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = format!("{package}_{version}_");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_build_keeps_the_package_split() {
        let pinned = Series::V7_3.pinned().unwrap();
        assert_eq!(
            siblings(
                Series::V7_3,
                pinned.packages,
                "linux-binary-7.3.5+deb13-amd64"
            ),
            [
                "linux-binary-7.3.5+deb13-amd64",
                "linux-modules-7.3.5+deb13-amd64"
            ]
        );
        let pinned = Series::V6_18.pinned().unwrap();
        assert_eq!(
            siblings(
                Series::V6_18,
                pinned.packages,
                "linux-image-6.18.16+deb13-amd64"
            ),
            ["linux-image-6.18.16+deb13-amd64"]
        );
    }

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
            Series::V5_10.build_of("linux-image-5.10.0-46-amd64"),
            Some(46)
        );
        assert_eq!(
            Series::V5_10.build_of("linux-image-5.10.0-46-rt-amd64"),
            None
        );
        assert_eq!(
            Series::V6_1.build_of("linux-image-6.18.15+deb13-amd64"),
            None
        );
        assert_eq!(
            Series::V6_18.build_of("linux-image-6.18.15+deb13-amd64"),
            Some(15)
        );
        assert_eq!(
            Series::V6_18.build_of("linux-image-6.18.15+deb13-rt-amd64"),
            None
        );
        assert_eq!(
            Series::V7_3.build_of("linux-binary-7.3.4+deb13-amd64"),
            Some(4)
        );
        // The meta package holds no files.
        assert_eq!(Series::V7_3.build_of("linux-image-7.3.4+deb13-amd64"), None);
        assert_eq!(
            Series::V7_3.build_of("linux-binary-7.3.4+deb13-cloud-amd64"),
            None
        );
        assert_eq!(
            Series::V6_1.build_of("linux-image-6.1.0-56-amd64-unsigned"),
            None
        );
    }
}
