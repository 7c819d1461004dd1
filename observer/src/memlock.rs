//! RLIMIT_MEMLOCK for the eBPF maps. Kernels before 5.11 charge every BPF map and program to
//! the locked memory of the process that creates it, against RLIMIT_MEMLOCK (often 64 KiB or
//! 8 MiB, under the 10 MiB the agent's maps take), and refuse a map past it with EPERM; 5.11
//! charges the memory cgroup instead. On those older kernels the limit is lifted before
//! anything is loaded.

use std::io;

/// Whether a kernel release (`uname -r`) charges BPF maps to RLIMIT_MEMLOCK. A release whose
/// version cannot be read counts as one: lifting the limit costs nothing where it is not used.
pub fn charges_maps(release: &str) -> bool {
    crate::kernel::version(release).is_none_or(|version| version < (5, 11))
}

/// Lifts RLIMIT_MEMLOCK where the running kernel charges maps to it, and says so in one line;
/// where it cannot be lifted, the line says what may fail and why.
pub fn raise_for_maps(release: &str) {
    if !charges_maps(release) {
        return;
    }
    match lift() {
        Ok(false) => {}
        Ok(true) => log::info!(
            "kernel {release} charges BPF maps to RLIMIT_MEMLOCK (before 5.11): raised it to unlimited"
        ),
        Err((err, now)) => log::warn!(
            "kernel {release} charges BPF maps to RLIMIT_MEMLOCK (before 5.11), and raising it to \
             unlimited was refused ({err}): it stays at {now} bytes, and the kernel may refuse the \
             agent's maps (about 10 MiB) with \"Operation not permitted\". Start the agent with a \
             higher limit (LimitMEMLOCK=infinity in its unit, the container runtime's memlock \
             ulimit) or with CAP_SYS_RESOURCE"
        ),
    }
}

/// Sets both limits to unlimited: Ok(true) when it did, Ok(false) when the soft one already
/// was. Without CAP_SYS_RESOURCE only the soft limit can move, and only up to the hard one:
/// it goes there, and the error comes back with the soft limit now in force.
pub fn lift() -> Result<bool, (io::Error, u64)> {
    let (soft, hard) = get().map_err(|err| (err, 0))?;
    if soft == libc::RLIM_INFINITY {
        return Ok(false);
    }
    match set(libc::RLIM_INFINITY, libc::RLIM_INFINITY) {
        Ok(()) => Ok(true),
        Err(err) => {
            let now = if set(hard, hard).is_ok() { hard } else { soft };
            Err((err, now))
        }
    }
}

pub fn get() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit for the kernel to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

pub fn set(soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a valid rlimit for the kernel to read.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_11_charge_maps_to_memlock() {
        for release in [
            "5.10.0-28-amd64",
            "5.4.0-150-generic",
            "4.19.0",
            "5.8",
            "4.18.0-553.el8_10.x86_64",
        ] {
            assert!(charges_maps(release), "{release}");
        }
        for release in [
            "5.11.0",
            "5.15.0-91-generic",
            "6.1.0-18-amd64",
            "6.18.44-fc-v1045",
            "10.0",
        ] {
            assert!(!charges_maps(release), "{release}");
        }
    }

    #[test]
    fn an_unreadable_release_counts_as_charging() {
        for release in ["", "unknown", "v5.15", "6"] {
            assert!(charges_maps(release), "{release:?}");
        }
    }

    /// The limits are the test process's own: lowered to 64 KiB, then lifted as the agent
    /// lifts them. With CAP_SYS_RESOURCE (root) both become unlimited; without, the soft limit
    /// goes up to the hard one and the refusal comes back.
    #[test]
    fn lift_raises_a_low_limit_as_far_as_it_may() {
        let (_, hard) = get().unwrap();
        set(64 << 10, hard).unwrap();
        match lift() {
            Ok(raised) => {
                assert!(raised);
                assert_eq!(get().unwrap(), (libc::RLIM_INFINITY, libc::RLIM_INFINITY));
                assert!(!lift().unwrap(), "already unlimited: nothing to do");
            }
            Err((err, now)) => {
                assert_eq!(err.raw_os_error(), Some(libc::EPERM));
                assert_eq!(get().unwrap(), (hard, hard));
                assert_eq!(now, hard);
            }
        }
    }
}
