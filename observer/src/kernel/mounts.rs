//! The pseudo file systems the agent reads: tracefs (tracepoint ids) and securityfs (the
//! lockdown level), mounted where absent.

use std::path::{Path, PathBuf};

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const SECURITYFS: &str = "/sys/kernel/security";
const TRACEFS_MAGIC: i64 = 0x7472_6163;
const SECURITYFS_MAGIC: i64 = 0x7363_6673;
pub const BPFFS: &str = "/sys/fs/bpf";
const BPFFS_MAGIC: i64 = 0xcafe_4a11;

fn is_mounted(path: &Path, magic: i64) -> bool {
    fs_magic(path).is_ok_and(|found| found == magic)
}

/// The magic number of the file system `path` is on (statfs(2)'s f_type).
pub fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: a valid C string and a zeroed statfs buffer for the kernel to fill.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c_path.as_ptr(), &raw mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(st.f_type as i64)
    }
}

fn mount(fstype: &str, target: &Path) -> std::io::Result<()> {
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (source, target_c, fstype_c) = (
        c(b"nodev")?,
        c(target.as_os_str().as_encoded_bytes())?,
        c(fstype.as_bytes())?,
    );
    // SAFETY: valid C strings; no mount data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where tracefs is, mounting it at /sys/kernel/tracing when absent; why not when it can't be.
pub fn ensure_tracefs() -> Result<PathBuf, String> {
    for path in [TRACEFS, "/sys/kernel/debug/tracing"] {
        if is_mounted(Path::new(path), TRACEFS_MAGIC) {
            return Ok(path.into());
        }
    }
    match mount("tracefs", Path::new(TRACEFS)) {
        Ok(()) => {
            log::info!("mounted tracefs at {TRACEFS}");
            Ok(TRACEFS.into())
        }
        Err(err) => Err(format!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({err}); \
             mount it with `mount -t tracefs nodev {TRACEFS}`"
        )),
    }
}

/// Makes sure `pin_path` can be on bpffs: its nearest existing ancestor is on bpffs, or it is
/// under /sys/fs/bpf and bpffs gets mounted there (systemd mounts it at boot; a bare host or a
/// container may not have it). Why not, when it cannot be.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), String> {
    let existing = pin_path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_mounted(existing, BPFFS_MAGIC) {
        return Ok(());
    }
    if !pin_path.starts_with(BPFFS) {
        return Err(format!("{} is not on a bpffs mount", existing.display()));
    }
    match mount("bpf", Path::new(BPFFS)) {
        Ok(()) => {
            log::info!("mounted bpffs at {BPFFS}");
            Ok(())
        }
        Err(err) => Err(format!(
            "bpffs is not mounted at {BPFFS} and mounting it failed ({err}); mount it with \
             `mount -t bpf bpf {BPFFS}`"
        )),
    }
}

/// Mounts securityfs (for the lockdown level) when absent; a failure only loses that gauge.
pub fn ensure_securityfs() {
    if !is_mounted(Path::new(SECURITYFS), SECURITYFS_MAGIC)
        && let Err(err) = mount("securityfs", Path::new(SECURITYFS))
    {
        log::warn!(
            "securityfs is not mounted at {SECURITYFS} and mounting it failed ({err}): no lockdown level"
        );
    }
}
