//! The POSIX timer syscalls the timer hooks watch, made raw: glibc's wrappers keep bookkeeping
//! of their own (and SIGEV_THREAD timers start threads), which would add calls the tests and
//! benchmarks do not mean to make.
use std::io;

/// The kernel's `struct sigevent` (64 bytes on Linux), as timer_create reads it.
#[repr(C)]
pub struct SigEvent {
    pub value: u64,
    pub signo: libc::c_int,
    pub notify: libc::c_int,
    pub pad: [u64; 6],
}

impl SigEvent {
    /// No notification: the timer never signals, so arming it is harmless.
    pub const fn none() -> Self {
        Self {
            value: 0,
            signo: 0,
            notify: libc::SIGEV_NONE,
            pad: [0; 6],
        }
    }
}

/// `timer_create(clock, SIGEV_NONE, id)`: what the kernel returned (0, or -1 with errno set).
/// The kernel writes the new ID to `id`; in restore mode it reads the wanted ID from it.
pub fn timer_create(clock: libc::c_long, id: &mut libc::c_int) -> i64 {
    let mut event = SigEvent::none();
    // SAFETY: valid pointers to a sigevent for the kernel to read and an int to read and write.
    unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            clock,
            &raw mut event,
            std::ptr::from_mut(id),
        )
    }
}

/// `timer_delete(id)`: what the kernel returned.
pub fn timer_delete(id: libc::c_int) -> i64 {
    // SAFETY: a plain syscall on a timer ID of this process (or a bad one, which fails).
    unsafe { libc::syscall(libc::SYS_timer_delete, libc::c_long::from(id)) }
}

/// `timer_settime(id, 0, {it_value: seconds}, NULL)`: arms a one-shot timer; what the kernel
/// returned.
pub fn timer_arm(id: libc::c_int, seconds: libc::time_t) -> i64 {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: seconds,
            tv_nsec: 0,
        },
    };
    // SAFETY: a valid itimerspec for the kernel to read; no old value wanted.
    unsafe {
        libc::syscall(
            libc::SYS_timer_settime,
            libc::c_long::from(id),
            0 as libc::c_long,
            &raw const spec,
            std::ptr::null_mut::<libc::itimerspec>(),
        )
    }
}

/// One timer_create + timer_delete on CLOCK_MONOTONIC (SIGEV_NONE).
pub fn timer_pair() -> io::Result<()> {
    let mut id = 0;
    if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0 {
        return Err(io::Error::last_os_error());
    }
    if timer_delete(id) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `prctl(PR_TIMER_CREATE_RESTORE_IDS, on)` (Linux 6.15+): in restore mode timer_create takes
/// the ID the caller asks for. Returns whether the kernel accepted it.
pub fn restore_ids_mode(on: bool) -> bool {
    const PR_TIMER_CREATE_RESTORE_IDS: libc::c_int = 77;
    // SAFETY: a plain prctl on this process.
    unsafe {
        libc::prctl(
            PR_TIMER_CREATE_RESTORE_IDS,
            libc::c_ulong::from(on),
            0,
            0,
            0,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigevent_has_the_kernels_size() {
        assert_eq!(size_of::<SigEvent>(), 64);
    }

    #[test]
    fn real_syscalls() {
        timer_pair().unwrap();
        let mut id = -1;
        assert_eq!(timer_create(libc::CLOCK_MONOTONIC.into(), &mut id), 0);
        assert!(id >= 0);
        assert_eq!(timer_arm(id, 3600), 0);
        assert_eq!(timer_delete(id), 0);
        // Deleted: a second delete and a bad clock fail with EINVAL.
        assert_eq!(timer_delete(id), -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(timer_create(9999, &mut id), -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EINVAL)
        );
    }
}
