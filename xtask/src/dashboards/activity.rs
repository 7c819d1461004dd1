//! Real activity on this host for the panels to show: timer syscalls from a thread of a known
//! name, and a lockdown denial.
use std::{fs, path::Path, process::Command, thread};

use anyhow::bail;
use testkit::timers::{restore_ids_mode, timer_arm, timer_create, timer_delete};

/// Timer churn per round: creates deleted at once, never armed.
pub const CHURN: i64 = 25;
/// The thread that makes the timer syscalls: its name is the `comm` the agent reports.
const TIMER_THREAD: &str = "dash-timers";

/// Timer syscalls from a thread of their own name: churn (created and deleted at once), one
/// armed timer, one bad clock (EINVAL), and where the kernel has restore mode, a create asking
/// for an ID and a second asking for the same one (EBUSY). Returns whether restore mode worked.
pub fn timer_activity(round: u32) -> anyhow::Result<bool> {
    let worker = thread::Builder::new()
        .name(TIMER_THREAD.into())
        .spawn(move || -> Result<bool, String> {
            for _ in 0..CHURN {
                let mut id = 0;
                if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0 || timer_delete(id) != 0 {
                    return Err(format!("timer_create/delete: {}", std::io::Error::last_os_error()));
                }
            }
            let mut id = 0;
            if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0
                || timer_arm(id, 3600) != 0
                || timer_delete(id) != 0
            {
                return Err(format!("an armed timer: {}", std::io::Error::last_os_error()));
            }
            let mut unused = 0;
            if timer_create(99, &mut unused) != -1 {
                return Err("timer_create on clock 99 did not fail".into());
            }
            if !restore_ids_mode(true) {
                return Ok(false);
            }
            let wanted = 700_000 + round as libc::c_int;
            let (mut first, mut again) = (wanted, wanted);
            let granted = timer_create(libc::CLOCK_MONOTONIC.into(), &mut first) == 0;
            let taken = timer_create(libc::CLOCK_MONOTONIC.into(), &mut again) == -1;
            restore_ids_mode(false);
            if granted {
                timer_delete(first);
            }
            if !(granted && taken && first == wanted) {
                return Err(format!(
                    "restore mode: asked for ID {wanted}, got {first} (granted {granted}, then taken {taken})"
                ));
            }
            Ok(true)
        })?;
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the timer thread panicked"))?
        .map_err(|e| anyhow::anyhow!("timer activity: {e}"))
}

/// A write open of a debugfs file, which lockdown (integrity and above) refuses.
pub fn lockdown_denial() -> anyhow::Result<()> {
    let file = Path::new("/sys/kernel/debug/clear_warn_once");
    if !file.exists() {
        crate::run(Command::new("mount").args(["-t", "debugfs", "none", "/sys/kernel/debug"]))?;
    }
    match fs::OpenOptions::new().write(true).open(file) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        Err(e) => bail!(
            "opening {} for write: {e}, not the lockdown's EPERM",
            file.display()
        ),
        Ok(_) => bail!(
            "{} opened for write: this kernel is not locked down, so the lockdown panels would \
             have no denial to show (boot with lockdown=integrity)",
            file.display()
        ),
    }
}
