//! The operator's path under a real systemd: the Debian 12 root (with systemd as PID 1) booted
//! in QEMU on Debian's 6.12 kernel, the .deb installed with dpkg, `systemctl enable --now
//! observer` under the unit as shipped, a module loaded, the agent stopped with its security
//! programs left pinned, then started, restarted and upgraded over those pins (see `pins`);
//! then a second boot with the agent enabled, which its unit starts before udev (see `boot`),
//! ending with the package purged. The guest prints what it saw between markers on the serial
//! console; `check` judges it on the host.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::debian::unpack_root;
use crate::vm::kernel::{self, Kernel, Series};

/// The module the guest loads while the agent watches (no dependencies, no hardware).
const MODULE: &str = "crc7";
/// Marks the guest's report lines on the console.
const MARK: &str = "@@dist";

/// Runs in the guest as a oneshot unit once the system is up, writing to the serial console.
const GUEST_SCRIPT: &str = r#"#!/bin/bash
set -u
mark() { echo "@@dist $*"; }
section() { mark "begin $1"; shift; "$@" 2>&1; mark "end"; }
scrape() { curl --silent --fail --max-time 10 http://127.0.0.1:9745/metrics; }
loads() { scrape | awk '/^observer_module_loads_total[{ ]/ { sum += $NF } END { print sum + 0 }'; }
serving() { for _ in $(seq 600); do scrape >/dev/null && return 0; sleep 0.5; done; return 1; }
# An agent that does not serve: its journal, and the end of this boot (the host reports it).
fatal() {
    mark "fatal $1"
    section fatal-journal journalctl --unit=observer --no-pager --output=cat
    mark "done"; sync; systemctl poweroff --force --force; exit 0
}
# One run of the agent's lines: each start of the unit has an invocation ID of its own.
invocation() { systemctl show --property=InvocationID --value observer; }
run_journal() { journalctl --sync; journalctl --no-pager --output=cat _SYSTEMD_INVOCATION_ID="$1"; }
# How many of the observer's programs of these families the kernel holds (bpftool's compact
# JSON); a program whose last link or pin went is freed by the kernel a moment later.
programs() { bpftool --json prog show | grep -oE "\"name\":\"($1)_" | wc -l; }
settle() { for _ in $(seq 40); do [ "$(programs "$1")" = "$2" ] && return; sleep 0.25; done; }
# The inventory of modules present at start is published a moment after the agent attached.
inventoried() {
    for _ in $(seq 60); do
        scrape | grep -q '^observer_modules_present_at_start' && return
        sleep 0.25
    done
}
mark "started systemd=$(readlink /proc/1/exe) kernel=$(uname -r)"
if [ -e /var/lib/observer-check/second-boot ]; then
__SECOND_BOOT__
fi
section bpf-before bpftool --json prog show
dpkg --install /root/observer.deb >/dev/null 2>&1; mark "rc dpkg-install $?"
systemctl enable --now observer; started=$?; mark "rc enable-now $started"
mark "state enabled=$(systemctl is-enabled observer) active=$(systemctl is-active observer)"
[ $started = 0 ] && serving || fatal "no /metrics after systemctl enable --now observer"
first=$(invocation)
section bpf-running bpftool --json prog show
security=$(programs 'modules|taint|lockdown')
inventoried
section metrics-before scrape
section kallsyms grep --count --word-regexp __ABSENT__ /proc/kallsyms
before=$(loads)
modprobe __MODULE__; mark "rc modprobe $?"
for _ in $(seq 120); do [ "$(loads)" != "$before" ] && break; sleep 0.5; done
section metrics-after scrape
section pins ls -1R /sys/fs/bpf/observer
build=$(ls /sys/fs/bpf/observer)
section unit systemctl show observer --property=NoNewPrivileges,CapabilityBoundingSet,SystemCallFilter,ProtectSystem,ProtectKernelModules,PrivateDevices,RestrictAddressFamilies,MemoryDenyWriteExecute,ProtectKernelTunables,ReadWritePaths,ExecStart
systemctl stop observer; mark "rc stop $?"
section stopped systemctl show observer --property=ActiveState,Result,ExecMainCode,ExecMainStatus
journalctl --sync
section journal journalctl --unit=observer --no-pager --output=cat
section journal-first run_journal "$first"
settle timers 0
section bpf-after bpftool --json prog show
section probes-stopped observer probes
# Seen only by the pinned programs: no agent runs.
modprobe __STOPPED_MODULE__; mark "rc modprobe-stopped $?"
systemctl start observer; started=$?; mark "rc start-adopt $started"
[ $started = 0 ] && serving || fatal "no /metrics after the start over the pins"
adopted=$(invocation)
section bpf-adopted bpftool --json prog show
inventoried
section metrics-adopted scrape
section journal-adopted run_journal "$adopted"
# From the restart's start until /metrics answers again.
started=$(date +%s%N)
systemctl restart observer; restarted=$?
for _ in $(seq 6000); do scrape >/dev/null && break; sleep 0.01; done
mark "restart-ms $(( ($(date +%s%N) - started) / 1000000 ))"
mark "rc restart $restarted"
# A load racing a restart: counted once, whichever agent (or none) runs when it happens.
section metrics-race-before scrape
modprobe __RACE_MODULE__ & load=$!
systemctl restart observer; restarted=$?
wait $load; mark "rc modprobe-race $?"
mark "rc restart-race $restarted"
serving || fatal "no /metrics after the restart during a load"
section metrics-race scrape
# An upgrade: the pins left by another build (the same pins, renamed to another build's
# directory) are replaced.
systemctl stop observer; mark "rc stop-upgrade $?"
mv "/sys/fs/bpf/observer/$build" /sys/fs/bpf/observer/__OTHER_BUILD__; mark "rc rename $?"
systemctl start observer; started=$?; mark "rc start-upgrade $started"
[ $started = 0 ] && serving || fatal "no /metrics after the start over another build's pins"
upgraded=$(invocation)
settle 'modules|taint|lockdown' "$security"
section bpf-upgraded bpftool --json prog show
section metrics-upgraded scrape
section journal-upgraded run_journal "$upgraded"
section pins-upgraded ls -1 /sys/fs/bpf/observer
mark "build $build"
# For the second boot: the agent enabled (it starts before udev), its events in the journal,
# a module for systemd-modules-load.
echo 'OBSERVER_ARGS="--web.listen-address=127.0.0.1:9745 --events json"' >/etc/default/observer
echo __BOOT_MODULE__ >/etc/modules-load.d/observer-check.conf
mkdir -p /var/lib/observer-check && touch /var/lib/observer-check/second-boot
mark "done"
sync
systemctl poweroff --force --force
"#;

const CHECK_UNIT: &str = "[Unit]
Description=Check of the observer package under systemd
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/observer-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
";

/// Loads the modules that reach the root disk, then hands over to systemd.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in /modules/*.ko; do insmod "$module" || echo "insmod $module failed"; done
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do sleep 0.1; tries=$((tries + 1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "@@dist fatal: cannot mount the root disk"
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"#;

/// The guest's report: each marked section's lines, and each `rc`/`state` line.
pub struct Report {
    pub console: String,
}

impl Report {
    pub fn section(&self, name: &str) -> anyhow::Result<String> {
        let begin = format!("{MARK} begin {name}\n");
        let start = self
            .console
            .find(&begin)
            .with_context(|| format!("the guest printed no {name} section"))?
            + begin.len();
        let end = self.console[start..]
            .find(&format!("{MARK} end"))
            .with_context(|| format!("the {name} section has no end"))?;
        Ok(self.console[start..start + end].to_owned())
    }

    /// The value after `@@dist <prefix> ` on its line.
    pub fn line(&self, prefix: &str) -> anyhow::Result<String> {
        let start = format!("{MARK} {prefix} ");
        self.console
            .lines()
            .find_map(|l| l.strip_prefix(start.as_str()))
            .map(str::to_owned)
            .with_context(|| format!("the guest printed no `{start}` line"))
    }
}

/// Builds the disk and the initramfs, boots twice (the package installed and checked; then
/// with the agent enabled, started early by its unit), and returns each boot's console.
pub fn boot(
    root_tar: &Path,
    deb: &Path,
    scratch: &Path,
    logs: &Path,
) -> anyhow::Result<(Report, Report)> {
    let workspace = crate::workspace_root();
    let kernel = kernel::ensure(&workspace.join(".cache/vm"), Series::V6_12)?;
    let rootfs = scratch.join("guest-root");
    unpack_root(root_tar, &rootfs)?;
    prepare_root(&rootfs, &kernel, deb)?;
    let disk = scratch.join("guest.ext4");
    crate::run(Command::new("truncate").args(["--size=2G"]).arg(&disk))?;
    crate::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&rootfs)
            .arg(&disk),
    )?;
    let initramfs = initramfs(&kernel, scratch)?;
    fs::create_dir_all(logs)?;
    let boots = Boot {
        kernel: &kernel,
        initramfs: &initramfs,
        disk: &disk,
    };
    let first = boots.run(&logs.join("dist-systemd-guest.log"), "done")?;
    // The first boot ended early (its agent did not serve): no second boot to make.
    if let Ok(why) = first.line("fatal") {
        bail!(
            "the systemd guest stopped early: {why}; the agent's journal:\n{}",
            first.section("fatal-journal")?
        );
    }
    let second = boots.run(&logs.join("dist-systemd-guest-boot2.log"), "boot-done")?;
    Ok((first, second))
}

/// What each boot of the guest starts from.
struct Boot<'a> {
    kernel: &'a Kernel,
    initramfs: &'a Path,
    disk: &'a Path,
}

/// Boots the guest gets when its kernel dies of an int3 oops before anything of the check ran.
const MAX_BOOTS: u32 = 3;

impl Boot<'_> {
    /// [`Self::boot`], again when the kernel died of the int3 oops TCG with two vCPUs sometimes
    /// gives while the kernel patches its own text at boot (seen on 6.12 and 7.3; the VM
    /// scenarios boot again too). Nothing of the guest's check ran then, and the disk was not
    /// mounted: the next boot starts where this one would have.
    fn run(&self, console: &Path, end: &str) -> anyhow::Result<Report> {
        let mut boots = 1;
        loop {
            let result = self.boot(console, end);
            let text = fs::read(console).map(|b| String::from_utf8_lossy(&b).into_owned());
            let died_booting = text.is_ok_and(|t| {
                t.contains("Oops: int3") && t.contains("Kernel panic") && !t.contains(MARK)
            });
            if result.is_ok() || !died_booting || boots == MAX_BOOTS {
                return result;
            }
            let kept = console.with_extension(format!("boot-{boots}.log"));
            let _ = fs::rename(console, &kept);
            eprintln!(
                "dist: the systemd guest's kernel died booting (int3 oops; console in {}): booting again",
                kept.display()
            );
            boots += 1;
        }
    }

    /// One boot, until the guest powers itself off having printed `@@dist <end>`. The virtio
    /// RNG and balloon devices are there for udev's coldplug to load their drivers.
    fn boot(&self, console: &Path, end: &str) -> anyhow::Result<Report> {
        let started = Instant::now();
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", "2"])
            .args([
                "-bios",
                "/usr/share/qemu/qboot.rom",
                "-nodefaults",
                "-no-reboot",
            ])
            .args(["-display", "none", "-serial"])
            .arg(format!("file:{}", console.display()))
            .args(["-device", "virtio-rng-pci", "-device", "virtio-balloon-pci"])
            .arg("-kernel")
            .arg(&self.kernel.vmlinux)
            .arg("-initrd")
            .arg(self.initramfs)
            .args([
                "-append",
                "console=ttyS0 panic=-1 quiet loglevel=3 systemd.show_status=false",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                self.disk.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        // TCG on a shared 2-CPU machine: systemd's boot, dpkg and the agent's start take
        // minutes at worst; the guest powers itself off when done.
        let deadline = started + Duration::from_secs(600);
        let status = loop {
            if let Some(status) = qemu.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = qemu.kill();
                let _ = qemu.wait();
                bail!(
                    "the systemd guest did not finish in 600 s; console in {}",
                    console.display()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        // The guest's terminal ends lines with CR LF.
        let text = fs::read(console)
            .map(|b| String::from_utf8_lossy(&b).replace("\r\n", "\n"))
            .with_context(|| format!("reading {}", console.display()))?;
        eprintln!(
            "dist: systemd guest ran {:.0} s (console in {})",
            started.elapsed().as_secs_f64(),
            console.display()
        );
        ensure!(
            status.success() && text.contains(&format!("{MARK} {end}\n")),
            "the systemd guest stopped before its end ({status}); console in {}",
            console.display()
        );
        Ok(Report { console: text })
    }
}

/// The package, the check and its unit, and the kernel's small library modules (so that one
/// can be loaded) go into the root; the serial login prompt stays off the console.
fn prepare_root(rootfs: &Path, kernel: &Kernel, deb: &Path) -> anyhow::Result<()> {
    fs::copy(deb, rootfs.join("root/observer.deb"))?;
    let script = rootfs.join("usr/local/sbin/observer-check");
    fs::write(
        &script,
        GUEST_SCRIPT
            .replace("__SECOND_BOOT__", super::boot::SECOND_BOOT)
            .replace("__MODULE__", MODULE)
            .replace("__STOPPED_MODULE__", super::pins::STOPPED_MODULE)
            .replace("__RACE_MODULE__", super::pins::RACE_MODULE)
            .replace("__OTHER_BUILD__", super::pins::OTHER_BUILD)
            .replace("__BOOT_MODULE__", super::boot::MODULES_LOAD)
            .replace("__ABSENT__", super::check::ABSENT_HOOK),
    )?;
    crate::run(Command::new("chmod").arg("0755").arg(&script))?;
    let units = rootfs.join("etc/systemd/system");
    fs::write(units.join("observer-check.service"), CHECK_UNIT)?;
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    std::os::unix::fs::symlink(
        "/etc/systemd/system/observer-check.service",
        wants.join("observer-check.service"),
    )?;
    std::os::unix::fs::symlink("/dev/null", units.join("serial-getty@ttyS0.service"))?;
    fs::write(rootfs.join("etc/hostname"), "observer-guest\n")?;

    let from = kernel.root.join("lib/modules").join(&kernel.release);
    let to = rootfs.join("lib/modules").join(&kernel.release);
    fs::create_dir_all(to.join("kernel"))?;
    crate::run(
        Command::new("cp")
            .arg("-a")
            .arg(from.join("kernel/lib"))
            .arg(to.join("kernel/")),
    )?;
    for entry in fs::read_dir(&from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    // What udev's coldplug loads for the guest's devices (see `boot`).
    for path in kernel.modules_with_deps(super::boot::UDEV_MODULES)? {
        let relative = path
            .strip_prefix(&from)
            .with_context(|| format!("{} outside {}", path.display(), from.display()))?;
        let target = to.join(relative);
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(&path, &target)?;
    }
    // modules.dep for the modules present.
    crate::run(
        Command::new("depmod")
            .arg("-b")
            .arg(rootfs)
            .arg(&kernel.release),
    )
}

/// busybox and the uncompressed modules for virtio disks and ext4, in load order.
fn initramfs(kernel: &Kernel, scratch: &Path) -> anyhow::Result<PathBuf> {
    let stage = scratch.join("initramfs");
    let modules = stage.join("modules");
    fs::create_dir_all(stage.join("bin"))?;
    fs::create_dir_all(&modules)?;
    fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .context("copying /bin/busybox (package busybox-static)")?;
    let init = stage.join("init");
    fs::write(&init, INIT)?;
    crate::run(Command::new("chmod").arg("0755").arg(&init))?;
    let wanted = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
    for (index, path) in kernel.modules_with_deps(&wanted)?.iter().enumerate() {
        // busybox insmod takes uncompressed modules only.
        let plain = if path.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz")
                .arg("--decompress")
                .arg("--stdout")
                .arg(path)
                .output()
                .context("running xz (package xz-utils)")?;
            ensure!(out.status.success(), "xz -d {} failed", path.display());
            out.stdout
        } else {
            fs::read(path).with_context(|| format!("reading {}", path.display()))?
        };
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .context("a module file name")?;
        fs::write(modules.join(format!("{index:02}-{name}.ko")), plain)?;
    }
    let out = scratch.join("initramfs.cpio.gz");
    crate::run(
        Command::new("sh")
            .args([
                "-c",
                "cd \"$1\" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1 >\"$2\"",
                "sh",
            ])
            .arg(&stage)
            .arg(&out),
    )?;
    Ok(out)
}
