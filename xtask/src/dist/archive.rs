//! Reproducible archives with GNU tar: entries sorted by name, owned by root, every mtime the
//! release time, gzip without its own timestamp or file name.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{TARGET, VERSION};

/// The tarball's top folder, which is also its name without `.tar.gz`.
pub fn tarball_name() -> String {
    format!("observer-{VERSION}-{TARGET}")
}

/// The documents by audience that the README links to (docs/performance-history.md is the
/// project's record, not a user's document).
pub const USER_DOCS: [&str; 3] = ["operators.md", "kernel-developers.md", "development.md"];

/// The tarball: what an operator unpacks and installs by hand (deploy/README.md says how).
pub fn tarball(root: &Path, stage: &Path, dist: &Path, epoch: u64) -> anyhow::Result<PathBuf> {
    let name = tarball_name();
    let tree = stage.join("tarball");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let top = tree.join(&name);
    fs::create_dir_all(top.join("man"))?;
    copy(&stage.join("observer"), &top.join("observer"))?;
    for file in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        copy(&root.join(file), &top.join(file))?;
    }
    copy(&stage.join("observer.8"), &top.join("man/observer.8"))?;
    copy_tree(&stage.join("completions"), &top.join("completions"))?;
    copy_tree(&root.join("dashboards"), &top.join("dashboards"))?;
    copy_tree(&root.join("deploy"), &top.join("deploy"))?;
    // The README's links lead into docs/: the user documents go with it.
    fs::create_dir_all(top.join("docs"))?;
    for doc in USER_DOCS {
        copy(&root.join("docs").join(doc), &top.join("docs").join(doc))?;
    }
    let out = dist.join(format!("{name}.tar.gz"));
    write_tar(&tree, &[name.as_str()], epoch, &out, true)?;
    Ok(out)
}

/// Writes `entries` (relative to `dir`) into a tar, gzip-compressed when asked.
pub fn write_tar(
    dir: &Path,
    entries: &[&str],
    epoch: u64,
    out: &Path,
    gzip: bool,
) -> anyhow::Result<()> {
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = Command::new("tar");
    tar.arg("--create")
        .arg("--directory")
        .arg(dir)
        .args(["--sort=name", "--format=posix", "--numeric-owner"])
        .args(["--owner=0", "--group=0"])
        .arg(format!("--mtime=@{epoch}"))
        // pax headers would otherwise carry the archiving time and the process ID.
        .arg("--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime")
        // Only the owner's write bit: permissions as installed, whatever the checkout's umask.
        .arg("--mode=go-w,a+rX")
        .arg("--file=-")
        .arg("--")
        .args(entries)
        .stdout(Stdio::piped());
    let mut tar_child = tar.spawn().context("starting tar")?;
    let tar_out = tar_child.stdout.take().context("tar's stdout")?;
    let status = if gzip {
        let gzip_status = Command::new("gzip")
            .args(["-9", "--no-name"])
            .stdin(tar_out)
            .stdout(file)
            .status()
            .context("starting gzip")?;
        if !gzip_status.success() {
            bail!("gzip failed: {gzip_status}");
        }
        tar_child.wait()?
    } else {
        let mut tar_out = tar_out;
        let mut file = file;
        std::io::copy(&mut tar_out, &mut file)?;
        tar_child.wait()?
    };
    if !status.success() {
        bail!("tar of {} failed: {status}", dir.display());
    }
    Ok(())
}

/// `SHA256SUMS` in sha256sum's format, so that `sha256sum -c SHA256SUMS` checks a download.
pub fn sha256sums(dist: &Path, files: &[&PathBuf]) -> anyhow::Result<PathBuf> {
    let mut text = String::new();
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("a release file name")?;
        text.push_str(&format!("{}  {name}\n", super::sha256(file)?));
    }
    let out = dist.join("SHA256SUMS");
    fs::write(&out, text)?;
    Ok(out)
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            copy(&entry.path(), &target)?;
        }
    }
    Ok(())
}
