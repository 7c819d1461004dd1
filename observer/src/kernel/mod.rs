//! Facts read from the running kernel at start and at scrape time, one module per job: BTF
//! (`btf`), the pseudo file systems (`mounts`), the taint (`taint`), the lockdown level
//! (`lockdown`); here the release and module support.

mod btf;
mod lockdown;
mod mounts;
mod taint;

use std::{fs, path::Path};

pub use self::{
    btf::KernelBtf,
    lockdown::lockdown_level,
    mounts::{ensure_bpffs, ensure_securityfs, ensure_tracefs, fs_magic},
    taint::{TAINT_FLAGS, taint_flag, taint_mask, taint_name},
};

/// The kernel release (`uname -r`).
pub fn release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

/// A release's major and minor version (`6.1.0-18-amd64`: (6, 1)); `None` unless it starts
/// with both.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    }
}

/// What uname(2) says of the running kernel, for `observer_kernel_info`.
pub struct Uname {
    /// `uname -r`: 6.1.0-18-amd64.
    pub release: String,
    /// `uname -v`: the build's number and date, #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (...).
    pub version: String,
    /// `uname -m`: x86_64.
    pub machine: String,
}

pub fn uname() -> Uname {
    // SAFETY: a zeroed utsname for the kernel to fill; its fields are NUL-terminated then.
    let names = unsafe {
        let mut names: libc::utsname = std::mem::zeroed();
        (libc::uname(&raw mut names) == 0).then_some(names)
    };
    let field = |chars: &[libc::c_char]| {
        let bytes: Vec<u8> = chars
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    match names {
        Some(n) => Uname {
            release: field(&n.release),
            version: field(&n.version),
            machine: field(&n.machine),
        },
        None => Uname {
            release: "unknown".into(),
            version: "unknown".into(),
            machine: "unknown".into(),
        },
    }
}

/// Whether this kernel can load modules at all (CONFIG_MODULES).
pub fn has_modules() -> Result<(), String> {
    if Path::new("/proc/modules").exists() {
        Ok(())
    } else {
        Err("this kernel has no module support (CONFIG_MODULES unset)".into())
    }
}

/// How many modules this kernel has on disk (lines of modules.dep), if known.
pub fn module_count() -> Option<u64> {
    let path = Path::new("/lib/modules")
        .join(release())
        .join("modules.dep");
    let text = fs::read_to_string(path).ok()?;
    let count = text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    (count > 0).then_some(count)
}

/// True when the tracepoint exists in this kernel.
pub fn has_tracepoint(tracefs: &Path, category: &str, name: &str) -> bool {
    tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("id")
        .exists()
}

/// `kernel.modules_disabled` (absent without module support).
pub fn modules_disabled() -> Option<bool> {
    let text = fs::read_to_string("/proc/sys/kernel/modules_disabled").ok()?;
    Some(text.trim() == "1")
}
