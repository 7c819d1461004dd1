//! The Debian package (cargo-deb, from `[package.metadata.deb]` in observer/Cargo.toml) and a
//! fresh Debian 12 root (mmdebstrap) to install it into, cached under `.cache/dist/`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

use super::{CARGO_DEB_VERSION, output};

/// Builds the .deb from the staged files into `dist`; returns its path.
pub fn package(root: &Path, dist: &Path, epoch: u64) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let installed = Command::new(&cargo)
        .args(["deb", "--version"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !installed.contains(CARGO_DEB_VERSION) {
        crate::run(Command::new(&cargo).args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    // The binary is already built (static) and stripped; cargo-deb only assembles.
    crate::run(
        Command::new(&cargo)
            .args([
                "deb",
                "--quiet",
                "--package",
                "observer",
                "--no-build",
                "--no-strip",
            ])
            .arg("--output")
            .arg(dist)
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .current_dir(root),
    )?;
    let mut debs = Vec::new();
    for entry in fs::read_dir(dist)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            debs.push(path);
        }
    }
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        _ => bail!("cargo deb left {debs:?} in {}", dist.display()),
    }
}

/// What the test root holds beyond minbase: systemd as PID 1 for the guest, kmod for modprobe,
/// bpftool to list programs, curl to scrape. Change `ROOT_RECIPE` with it, to rebuild the cache.
const INCLUDE: &str = "systemd,systemd-sysv,udev,kmod,bpftool,curl";
const ROOT_RECIPE: &str = "bookworm-minbase-systemd-1";

/// A Debian 12 root as a tar, made once by mmdebstrap from the mirror this machine's apt uses.
pub fn bookworm_root(cache: &Path) -> anyhow::Result<PathBuf> {
    let tar = cache.join(format!("{ROOT_RECIPE}.tar"));
    if tar.is_file() {
        return Ok(tar);
    }
    fs::create_dir_all(cache)?;
    let mirror = apt_mirror()?;
    eprintln!("dist: making a Debian 12 root with mmdebstrap from {mirror}");
    let partial = cache.join(format!("{ROOT_RECIPE}.tar.partial"));
    crate::run(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--mode=root", "--format=tar"])
            .arg(format!("--include={INCLUDE}"))
            .args(["bookworm"])
            .arg(&partial)
            .arg(format!("deb {mirror} bookworm main")),
    )?;
    fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// The URI of the first enabled `deb` source for bookworm in this machine's apt configuration
/// (one-line `.list` or deb822 `.sources`): no archive host is written into the repository.
pub fn apt_mirror() -> anyhow::Result<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            deb822_mirror(&text)
        } else if name.ends_with(".list") {
            one_line_mirror(&text)
        } else {
            None
        };
        if let Some(uri) = found {
            return Ok(uri);
        }
    }
    bail!("no enabled `deb` source for bookworm in /etc/apt/sources.list{{,.d/*}}")
}

fn one_line_mirror(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("deb ")?.trim_start();
        // Options in brackets ([arch=amd64 signed-by=...]) come before the URI.
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == "bookworm").then(|| uri.to_owned())
    })
}

fn deb822_mirror(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let deb = field("Types")?.split_whitespace().any(|t| t == "deb");
        let bookworm = field("Suites")?.split_whitespace().any(|s| s == "bookworm");
        let uri = field("URIs")?.split_whitespace().next()?;
        (enabled && deb && bookworm).then(|| uri.to_owned())
    })
}

/// Unpacks the cached root into `dir` (owners, modes and device nodes kept).
pub fn unpack_root(root_tar: &Path, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    crate::run(
        Command::new("tar")
            .args(["--extract", "--numeric-owner", "--preserve-permissions"])
            .arg("--file")
            .arg(root_tar)
            .arg("--directory")
            .arg(dir),
    )
}

/// Installs the .deb into a fresh root with dpkg, runs the binary there, purges the package and
/// compares the root's file list with the one before the install.
pub fn install_and_purge(root_tar: &Path, deb: &Path, scratch: &Path) -> anyhow::Result<()> {
    let dir = scratch.join("chroot");
    unpack_root(root_tar, &dir)?;
    fs::copy(deb, dir.join("tmp/observer.deb"))?;
    let before = file_list(&dir)?;
    let chroot = |args: &[&str]| output(Command::new("chroot").arg(&dir).args(args));
    chroot(&["dpkg", "--install", "/tmp/observer.deb"])?;
    let version = chroot(&["observer", "--version"])?;
    ensure!(
        version.trim() == format!("observer {}", super::VERSION),
        "observer --version in the Debian 12 root printed {version:?}"
    );
    let listed = chroot(&["dpkg", "--listfiles", "observer"])?;
    for path in [
        "/usr/bin/observer",
        "/etc/default/observer",
        "/usr/lib/systemd/system/observer.service",
        "/usr/share/man/man8/observer.8.gz",
        "/usr/share/bash-completion/completions/observer",
        "/usr/share/zsh/vendor-completions/_observer",
        "/usr/share/fish/vendor_completions.d/observer.fish",
        "/usr/share/observer/dashboards/fleet-overview.json",
        "/usr/share/observer/alerts.yml",
        "/usr/share/observer/allowlist.example.yml",
        "/usr/share/doc/observer/copyright",
        "/usr/share/doc/observer/docs/operators.md",
        "/usr/share/lintian/overrides/observer",
    ] {
        ensure!(
            listed.lines().any(|l| l == path),
            "the package does not install {path}; it lists:\n{listed}"
        );
    }
    // The unit installed is the repository's, hardening and all: only the binary's path differs.
    let shipped = fs::read_to_string(dir.join("usr/lib/systemd/system/observer.service"))?;
    let repository =
        fs::read_to_string(crate::workspace_root().join("deploy/systemd/observer.service"))?;
    ensure!(
        shipped
            == repository.replace(
                "ExecStart=/usr/local/bin/observer ",
                "ExecStart=/usr/bin/observer "
            ),
        "the packaged observer.service differs from deploy/systemd/observer.service beyond \
         the ExecStart path"
    );
    let conffiles = chroot(&[
        "dpkg-query",
        "--show",
        "--showformat=${Conffiles}",
        "observer",
    ])?;
    ensure!(
        conffiles.contains("/etc/default/observer "),
        "/etc/default/observer is not a conffile: {conffiles:?}"
    );
    // Enabled per Debian policy (started too, where systemd runs: not in a chroot).
    let wants = dir.join("etc/systemd/system/multi-user.target.wants/observer.service");
    ensure!(
        wants.is_symlink(),
        "installing did not enable observer.service ({} is missing)",
        wants.display()
    );
    chroot(&["dpkg", "--purge", "observer"])?;
    let after = file_list(&dir)?;
    let left: Vec<&String> = after
        .iter()
        .filter(|p| !before.contains(p) && !dpkg_bookkeeping(p))
        .collect();
    let removed: Vec<&String> = before
        .iter()
        .filter(|p| !after.contains(p) && !dpkg_bookkeeping(p))
        .collect();
    ensure!(
        left.is_empty() && removed.is_empty(),
        "purging observer changed the root's files: left behind {left:?}, removed {removed:?}"
    );
    eprintln!(
        "dist: PASS .deb installs into a fresh Debian 12 root, runs ({}), purges to the same {} files",
        version.trim(),
        after.len()
    );
    Ok(())
}

/// dpkg's log, which the first dpkg run in a fresh root creates (its database files exist
/// already; a package's own entries under /var/lib/dpkg/info must be gone after a purge).
fn dpkg_bookkeeping(path: &str) -> bool {
    path == "var/log/dpkg.log"
}

/// Every path under `dir` (relative, sorted), with its type, on this file system only.
fn file_list(dir: &Path) -> anyhow::Result<Vec<String>> {
    let text = output(Command::new("find").arg(dir).args([
        "-xdev",
        "-mindepth",
        "1",
        "-printf",
        "%P\\n",
    ]))?;
    let mut paths: Vec<String> = text.lines().map(str::to_owned).collect();
    paths.sort();
    Ok(paths)
}

/// lintian's verdict on the package, at every level down to pedantic: an error listing each
/// tag, or when clean the overridden tags (the package ships the reason for each).
pub fn lintian(deb: &Path) -> anyhow::Result<String> {
    let run = |extra: &[&str]| -> anyhow::Result<(bool, String)> {
        let out = Command::new("lintian")
            .args(["--display-level", ">=pedantic"])
            .args(extra)
            .arg(deb)
            .output()
            .context("running lintian")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok((out.status.success(), text))
    };
    let (clean, found) = run(&["--info", "--fail-on", "error,warning,info,pedantic"])?;
    ensure!(clean, "lintian found problems:\n{found}");
    // Overridden tags are shown apart: with --show-overrides, --fail-on counts them too.
    let (_, overridden) = run(&["--show-overrides"])?;
    Ok(overridden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_both_formats() {
        let deb822 = "Types: deb-src\nURIs: http://a.example/debian\nSuites: bookworm\n\n\
                      Types: deb\nURIs: http://b.example/debian\nSuites: bookworm bookworm-updates\n\
                      Components: main\n";
        assert_eq!(
            deb822_mirror(deb822).as_deref(),
            Some("http://b.example/debian")
        );
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://c.example/\nSuites: bookworm\n";
        assert_eq!(deb822_mirror(disabled), None);
        let list = "# comment\ndeb-src http://a.example/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://d.example/debian bookworm main\n";
        assert_eq!(
            one_line_mirror(list).as_deref(),
            Some("http://d.example/debian")
        );
        assert_eq!(
            one_line_mirror("deb http://e.example/debian bookworm main").as_deref(),
            Some("http://e.example/debian")
        );
        assert_eq!(
            one_line_mirror("deb http://e.example/debian trixie main"),
            None
        );
    }
}
