//! Each release file proven the way an operator uses it: the tarball's binary is static and
//! runs here; the .deb is lintian-clean, installs into a fresh Debian 12 root and purges without
//! a trace, and runs under the shipped unit with systemd as PID 1 in a QEMU guest (its pins
//! too: see `pins`); the OCI archive is read back by skopeo and umoci and its entrypoint runs;
//! the same inputs give the same digests; the Kubernetes manifests name the image dist builds.

use std::{collections::BTreeSet, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

use testkit::prom::Sample;

use super::{
    Artifacts, IMAGE, VERSION, archive, debian,
    guest::{self, Report},
    oci, output, sha256,
};
use crate::workspace_root;

/// What the checks run besides cargo: Debian's packaging and image tools, QEMU for the guest.
const HOST_PACKAGES: &[&str] = &[
    "binutils",
    "busybox-static",
    "cpio",
    "e2fsprogs",
    "kmod",
    "lintian",
    "mmdebstrap",
    "qemu-system-x86",
    "skopeo",
    "umoci",
    "xz-utils",
    "zstd",
];

pub fn run(artifacts: &Artifacts) -> anyhow::Result<()> {
    let started = Instant::now();
    crate::setup::apt_install(HOST_PACKAGES)?;
    let scratch = Scratch::new()?;
    let scratch = scratch.0.as_path();
    let root = workspace_root();

    tarball(artifacts, scratch)?;
    reproducible(artifacts, scratch)?;
    let lintian = debian::lintian(&artifacts.deb)?;
    eprintln!("dist: PASS lintian, with its overrides:\n{lintian}");
    manifests(&root)?;
    image(artifacts, scratch)?;
    let bookworm = debian::bookworm_root(&root.join(".cache/dist"))?;
    debian::install_and_purge(&bookworm, &artifacts.deb, scratch)?;
    let (report, second_boot) = guest::boot(
        &bookworm,
        &artifacts.deb,
        scratch,
        &root.join(".cache/dist/logs"),
    )?;
    under_systemd(&report)?;
    super::pins::first_boot(&report)?;
    super::boot::early_start(&second_boot)?;
    super::pins::purged(&report, &second_boot)?;
    super::pins::stop_lines(&report)?;
    let sums = output(
        Command::new("sha256sum")
            .args(["--check", "--strict"])
            .arg(&artifacts.sums)
            .current_dir(artifacts.sums.parent().context("SHA256SUMS's folder")?),
    )?;
    eprintln!("dist: PASS SHA256SUMS\n{sums}");
    eprintln!(
        "dist: every check passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The check's scratch space, removed when dropped: in memory where /dev/shm is (two Debian
/// roots unpacked and deleted on a disk mounted with `discard` cost minutes), else in the
/// temporary folder. About 1 GiB at most.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!("observer-dist.{}", std::process::id()));
        // A leftover from a killed run with a recycled process ID.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Unpacked like an operator would: the expected files, a static binary that runs here.
fn tarball(artifacts: &Artifacts, scratch: &Path) -> anyhow::Result<()> {
    let dir = scratch.join("tarball");
    fs::create_dir_all(&dir)?;
    crate::run(
        Command::new("tar")
            .arg("--extract")
            .arg("--file")
            .arg(&artifacts.tarball)
            .arg("--directory")
            .arg(&dir),
    )?;
    let top = dir.join(archive::tarball_name());
    for file in [
        "observer",
        "README.md",
        "docs/operators.md",
        "docs/kernel-developers.md",
        "docs/development.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "man/observer.8",
        "completions/observer.bash",
        "completions/_observer",
        "completions/observer.fish",
        "dashboards/fleet-overview.json",
        "dashboards/alerts.yml",
        "deploy/systemd/observer.service",
        "deploy/default/observer",
        "deploy/kubernetes/daemonset.yaml",
        "deploy/kubernetes/unpin/daemonset.yaml",
    ] {
        ensure!(top.join(file).is_file(), "the tarball has no {file}");
    }
    let binary = top.join("observer");
    static_elf(&binary)?;
    let version = output(Command::new(&binary).arg("--version"))?;
    ensure!(
        version == format!("observer {VERSION}\n"),
        "--version printed {version:?}"
    );
    let probes = output(Command::new(&binary).arg("probes"))?;
    ensure!(
        probes.ends_with('\n') && probes.lines().count() > 2,
        "`observer probes` printed {probes:?}"
    );
    eprintln!(
        "dist: PASS tarball: static binary, {}, `probes` lists {} lines",
        version.trim(),
        probes.lines().count()
    );
    Ok(())
}

/// No ELF interpreter (PT_INTERP) and no shared library needed: runs on any x86_64 distribution.
pub fn static_elf(path: &Path) -> anyhow::Result<()> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let field = |at: usize, len: usize| -> anyhow::Result<u64> {
        let slice = bytes.get(at..at + len).context("a truncated ELF file")?;
        Ok(slice
            .iter()
            .rev()
            .fold(0u64, |value, byte| value << 8 | u64::from(*byte)))
    };
    ensure!(
        bytes.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let table = usize::try_from(field(0x20, 8)?)?;
    let entry_size = usize::try_from(field(0x36, 2)?)?;
    let entries = usize::try_from(field(0x38, 2)?)?;
    const PT_INTERP: u64 = 3;
    for index in 0..entries {
        if field(table + index * entry_size, 4)? == PT_INTERP {
            bail!("{} has an ELF interpreter (PT_INTERP)", path.display());
        }
    }
    let dynamic = output(Command::new("readelf").arg("--dynamic").arg(path))?;
    ensure!(
        !dynamic.contains("(NEEDED)"),
        "{} needs shared libraries:\n{dynamic}",
        path.display()
    );
    Ok(())
}

/// The archives built again from the same staged files must be the same bytes.
fn reproducible(artifacts: &Artifacts, scratch: &Path) -> anyhow::Result<()> {
    let again = scratch.join("again");
    fs::create_dir_all(&again)?;
    let root = workspace_root();
    let stage = root.join("target/dist/stage");
    let rebuilt = [
        (
            &artifacts.tarball,
            archive::tarball(&root, &stage, &again, artifacts.epoch)?,
        ),
        (&artifacts.oci, oci::image(&stage, &again, artifacts.epoch)?),
        (
            &artifacts.deb,
            debian::package(&root, &again, artifacts.epoch)?,
        ),
    ];
    for (first, second) in &rebuilt {
        ensure!(
            sha256(first)? == sha256(second)?,
            "{} is not reproducible: built twice from the same files, the digests differ",
            first.display()
        );
    }
    eprintln!("dist: PASS tarball, OCI archive and .deb are the same bytes when built again");
    Ok(())
}

/// The DaemonSets (the agent's, and the one that unpins) and their kustomizations name the
/// image `dist` builds, with its version tag.
fn manifests(root: &Path) -> anyhow::Result<()> {
    let reference = format!("{IMAGE}:{VERSION}");
    for folder in ["deploy/kubernetes", "deploy/kubernetes/unpin"] {
        let daemonset = fs::read_to_string(root.join(folder).join("daemonset.yaml"))?;
        ensure!(
            daemonset
                .lines()
                .any(|l| l.trim() == format!("image: {reference}")),
            "{folder}/daemonset.yaml does not use image {reference}"
        );
        let kustomization = fs::read_to_string(root.join(folder).join("kustomization.yaml"))?;
        ensure!(
            kustomization.contains(&format!("- name: {IMAGE}\n"))
                && kustomization.contains(&format!("newTag: \"{VERSION}\"\n")),
            "{folder}/kustomization.yaml does not pin {reference}"
        );
    }
    eprintln!("dist: PASS the Kubernetes manifests name {reference}");
    Ok(())
}

/// skopeo reads the archive (labels, platform) and copies it; umoci unpacks the copy; the
/// entrypoint found in it runs.
fn image(artifacts: &Artifacts, scratch: &Path) -> anyhow::Result<()> {
    let source = format!("oci-archive:{}:{VERSION}", artifacts.oci.display());
    let inspect: Value =
        serde_json::from_str(&output(Command::new("skopeo").args(["inspect", &source]))?)
            .context("skopeo inspect's JSON")?;
    for (label, want) in [
        ("org.opencontainers.image.version", VERSION),
        (
            "org.opencontainers.image.source",
            "https://github.com/observer-ebpf/observer",
        ),
        ("org.opencontainers.image.licenses", "MIT OR Apache-2.0"),
    ] {
        ensure!(
            inspect["Labels"][label] == want,
            "image label {label}: {} (want {want})",
            inspect["Labels"][label]
        );
    }
    ensure!(
        inspect["Architecture"] == "amd64" && inspect["Os"] == "linux",
        "image platform: {inspect}"
    );
    let copy = scratch.join("oci-copy");
    crate::run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &source,
        &format!("oci:{}:{VERSION}", copy.display()),
    ]))?;
    let bundle = scratch.join("oci-bundle");
    crate::run(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{VERSION}", copy.display()))
            .arg(&bundle),
    )?;
    let runtime: Value = serde_json::from_slice(&fs::read(bundle.join("config.json"))?)?;
    let args: Vec<&str> = runtime["process"]["args"]
        .as_array()
        .context("the bundle's process.args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        args.first() == Some(&"/usr/bin/observer"),
        "the image's entrypoint: {args:?}"
    );
    let binary = bundle.join("rootfs/usr/bin/observer");
    static_elf(&binary)?;
    let version = output(Command::new(&binary).arg("--version"))?;
    ensure!(
        version == format!("observer {VERSION}\n"),
        "the image's binary printed {version:?}"
    );
    eprintln!("dist: PASS OCI archive read by skopeo and umoci; entrypoint {args:?} runs");
    Ok(())
}

/// The guest's report: installed, enabled and started under the unit as shipped (with --pin
/// and bpffs writable), every hook attached by fentry/fexit where offered, the module load
/// counted, a clean stop (what it leaves in the kernel: `pins::first_boot`).
fn under_systemd(report: &Report) -> anyhow::Result<()> {
    for step in ["dpkg-install", "enable-now", "modprobe", "stop"] {
        let rc = report.line(&format!("rc {step}"))?;
        ensure!(rc == "0", "in the systemd guest, {step} exited {rc}");
    }
    let state = report.line("state")?;
    ensure!(
        state == "enabled=enabled active=active",
        "after `systemctl enable --now observer`: {state}"
    );
    let unit = report.section("unit")?;
    for setting in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectKernelModules=yes",
        "PrivateDevices=yes",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=cap_sys_admin cap_perfmon cap_bpf",
        "ProtectKernelTunables=yes",
    ] {
        ensure!(
            unit.lines().any(|l| l == setting),
            "the running unit lacks {setting}:\n{unit}"
        );
    }
    ensure!(
        unit.lines()
            .any(|l| l.starts_with("SystemCallFilter=") && l.contains("bpf")),
        "the running unit has no system call filter:\n{unit}"
    );
    // The pins' directory writable (ProtectKernelTunables= makes the rest of bpffs read-only).
    ensure!(
        unit.lines()
            .any(|l| l == "ReadWritePaths=-/sys/fs/bpf/observer"),
        "the running unit does not make the pins' directory writable:\n{unit}"
    );
    ensure!(
        unit.lines()
            .any(|l| l.starts_with("ExecStart=") && l.contains("argv[]=/usr/bin/observer --pin ")),
        "the running unit does not start the agent with --pin:\n{unit}"
    );

    let before = report.section("metrics-before")?;
    let after = report.section("metrics-after")?;
    let attached = samples(&before, "observer_probe_attached");
    ensure!(
        !attached.is_empty(),
        "no observer_probe_attached:\n{before}"
    );
    let probes: BTreeSet<&str> = attached.iter().filter_map(|s| s.label("probe")).collect();
    let unattached: BTreeSet<&str> = probes
        .iter()
        .copied()
        .filter(|p| {
            !attached
                .iter()
                .any(|s| s.label("probe") == Some(p) && s.value == 1.0)
        })
        .collect();
    // The one hook Debian's 6.12 lacks: the hash-based integrity check is in no released
    // kernel; the guest's own symbol table confirms it is absent.
    let absent = report.section("kallsyms")?;
    ensure!(
        unattached.iter().copied().eq([ABSENT_HOOK]) && absent.trim() == "0",
        "probes not attached: {unattached:?} (only {ABSENT_HOOK} may be, and only when \
         /proc/kallsyms lacks it: {} matches)",
        absent.trim()
    );
    let by_trampoline: BTreeSet<&str> = attached
        .iter()
        .filter(|s| s.value == 1.0)
        .filter(|s| {
            s.label("mechanism")
                .is_some_and(|m| m.contains("fentry") || m.contains("fexit"))
        })
        .filter_map(|s| s.label("probe"))
        .collect();
    for probe in TRAMPOLINE_PROBES {
        ensure!(
            by_trampoline.contains(probe),
            "probe {probe} is not attached by fentry/fexit: {attached:?}"
        );
    }
    let trampolines = by_trampoline.len();
    let loaded = |text: &str| -> f64 {
        samples(text, "observer_module_loads_total")
            .iter()
            .filter(|s| s.label("outcome") == Some("loaded"))
            .map(|s| s.value)
            .sum()
    };
    let counted = loaded(&after) - loaded(&before);
    ensure!(
        counted == 1.0,
        "`modprobe crc7` in the guest counted {counted} loads (want 1):\n{after}"
    );

    let journal = report.section("journal")?;
    ensure!(
        journal.contains("serving metrics on http://127.0.0.1:9745/metrics"),
        "journalctl -u observer has no start line:\n{journal}"
    );
    let stopped = report.section("stopped")?;
    for want in [
        "ActiveState=inactive",
        "Result=success",
        "ExecMainCode=1",
        "ExecMainStatus=0",
    ] {
        ensure!(
            stopped.lines().any(|l| l == want),
            "after `systemctl stop observer`, not {want}:\n{stopped}"
        );
    }
    let baseline = tracing_programs(&report.section("bpf-before")?)?;
    let running = tracing_programs(&report.section("bpf-running")?)?;
    let left = tracing_programs(&report.section("bpf-after")?)?;
    let observers: Vec<&(u64, String)> = running.difference(&baseline).collect();
    ensure!(
        observers.len() >= trampolines,
        "bpftool listed {} new programs while the agent ran: {observers:?}",
        observers.len()
    );
    // The security programs stay pinned: `pins::first_boot` checks that they alone do.
    let remaining: Vec<&(u64, String)> = left.difference(&baseline).collect();
    ensure!(
        remaining.len() < observers.len(),
        "every program stayed in the kernel after `systemctl stop observer`: {remaining:?}"
    );
    eprintln!(
        "dist: PASS under systemd: {} of {} probes attached ({trampolines} by fentry/fexit; \
         {ABSENT_HOOK} is not in this kernel), the module load counted, {} programs loaded, \
         {} left pinned after a clean stop",
        probes.len() - unattached.len(),
        probes.len(),
        observers.len(),
        remaining.len()
    );
    Ok(())
}

/// The probe the guest kernel does not offer (its function is not in 6.12).
pub const ABSENT_HOOK: &str = "module_hash_check";
/// Probes whose primary mechanism is a trampoline, which Debian's 6.12 offers.
const TRAMPOLINE_PROBES: [&str; 4] = [
    "lockdown_decision",
    "module_load",
    "module_sig_check",
    "kernel_taint",
];

/// Programs other than systemd's own per-cgroup ones (which come and go with units), by ID
/// and name.
pub(super) fn tracing_programs(json: &str) -> anyhow::Result<BTreeSet<(u64, String)>> {
    let list: Value =
        serde_json::from_str(json.trim()).with_context(|| format!("bpftool's JSON: {json}"))?;
    Ok(list
        .as_array()
        .context("bpftool's program list")?
        .iter()
        .filter(|p| !p["type"].as_str().unwrap_or_default().starts_with("cgroup"))
        .map(|p| {
            (
                p["id"].as_u64().unwrap_or_default(),
                p["name"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The samples of one metric (the Prometheus text format, as testkit reads it).
fn samples(text: &str, metric: &str) -> Vec<Sample> {
    testkit::prom::parse(text)
        .into_iter()
        .filter(|s| s.name == metric)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples() {
        let text = "# HELP x y\nobserver_probe_attached{probe=\"a\",mechanism=\"fentry\"} 1\n\
                    observer_probe_attached_other 3\nobserver_up 1\n";
        let found = samples(text, "observer_probe_attached");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].label("mechanism"), Some("fentry"));
        assert_eq!(found[0].value, 1.0);
        assert_eq!(samples(text, "observer_up")[0].value, 1.0);
    }

    #[test]
    fn refuses_a_dynamic_binary() {
        // Any dynamically linked program on this machine has an interpreter.
        assert!(static_elf(Path::new("/bin/sh")).is_err());
    }
}
