//! Privileges: what the agent needs to start, and dropping all of it once started. After the
//! programs are attached, the listener bound and the files read, reading maps through the file
//! descriptors it holds and serving HTTP need no capability at all.

use anyhow::{Context as _, bail};

const CAP_SETPCAP: u32 = 8;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// A capability set from /proc/self/status (`CapEff`, `CapPrm`, `CapBnd`...).
pub fn capabilities(field: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// Fails with what to do when this process cannot load eBPF programs.
pub fn check() -> anyhow::Result<()> {
    let effective = capabilities("CapEff:").unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!(
        "observer must run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) to load eBPF programs; \
         try `sudo observer`"
    )
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// What must stay after start-up on this kernel. Before Linux 6.5 the bpf(2) syscall refused
/// every command, even a lookup in a map the process already holds, without CAP_BPF (or
/// CAP_SYS_ADMIN before 5.8) when unprivileged BPF is disabled, as distributions set it.
pub fn needed_after_start(release: &str) -> u64 {
    // An unreadable release keeps the most: it is taken for the oldest.
    let version = crate::kernel::version(release).unwrap_or((0, 0));
    if version >= (6, 5) {
        0
    } else if version >= (5, 8) {
        1 << CAP_BPF
    } else {
        1 << CAP_SYS_ADMIN
    }
}

/// Drops every capability but `keep` (bounding, ambient, effective, permitted, inheritable)
/// and forbids gaining any back through exec.
pub fn drop_all_but(keep: u64) -> anyhow::Result<()> {
    // SAFETY: prctl and capset with valid arguments; failures are checked.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            bail!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error());
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
        // Emptying the bounding set needs CAP_SETPCAP; without it (a unit or pod that did not
        // grant it) no_new_privs and empty permitted sets already make the drop permanent.
        let bounding = capabilities("CapBnd:").unwrap_or(0);
        let can_drop_bounding = capabilities("CapEff:").unwrap_or(0) & (1 << CAP_SETPCAP) != 0;
        for cap in (0..64)
            .filter(|cap| can_drop_bounding && bounding & (1 << cap) != 0 && keep & (1 << cap) == 0)
        {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                bail!(
                    "dropping capability {cap} from the bounding set: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        for (word, data) in data.iter_mut().enumerate() {
            let bits = (keep >> (32 * word)) as u32;
            (data.effective, data.permitted) = (bits, bits);
        }
        if libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) != 0 {
            bail!("capset: {}", std::io::Error::last_os_error());
        }
    }
    let left = capabilities("CapEff:")? | capabilities("CapPrm:")?;
    if left & !keep != 0 {
        bail!("capabilities left after dropping them: {:#x}", left & !keep);
    }
    if keep == 0 {
        log::info!("dropped every capability");
    } else {
        log::info!(
            "dropped every capability but {keep:#x} (this kernel's bpf(2) needs it to read maps)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_stays_depends_on_the_kernel() {
        assert_eq!(needed_after_start("6.18.44-fc-v669"), 0);
        assert_eq!(needed_after_start("6.5.0"), 0);
        assert_eq!(needed_after_start("6.1.0-37-amd64"), 1 << CAP_BPF);
        assert_eq!(needed_after_start("5.4.0"), 1 << CAP_SYS_ADMIN);
    }
}
