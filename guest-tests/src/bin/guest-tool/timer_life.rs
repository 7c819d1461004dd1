//! Timer life cycles for the VM scenarios, each in a child process with a name of its own, so
//! every count the observer reports can be compared with exactly what was asked for:
//!
//! - `tm-churn`: 20 creates, each deleted at once (short-lived churn), then exits;
//! - `tm-armed`: 3 creates, 2 armed, 1 armed one deleted, exits with 2 live;
//! - `tm-exec`: 2 creates, then exec (its timers die there);
//! - `tm-keep`: 4 creates, then stays alive (4 live timers while the host scrapes);
//! - this process: one create on a bad clock, one delete and one settime of an unknown ID.
//!
//! `restore` (Linux 6.15+) runs in `tm-restore`: restore mode on, a create with a requested ID,
//! the same ID again (EBUSY), a negative ID (EINVAL), restore mode off, one ordinary create.
//!
//! Each child prints its own line; the parent waits for it before starting the next, so the
//! console's order is the order of the calls.
use std::{ffi::CString, io::Write as _};

use testkit::timers::{timer_arm, timer_create, timer_delete};

use super::outcome;

const MONOTONIC: libc::c_long = libc::CLOCK_MONOTONIC as libc::c_long;
/// The ID `restore` asks for: far beyond what ordinary creates reach, as a restored process's
/// IDs are.
pub const RESTORE_ID: libc::c_int = 424_242;
const PR_TIMER_CREATE_RESTORE_IDS: libc::c_int = 77;
const RESTORE_OFF: libc::c_ulong = 0;
const RESTORE_ON: libc::c_ulong = 1;
const RESTORE_GET: libc::c_ulong = 2;

pub fn life() -> Result<(), String> {
    in_child("tm-churn", Ending::Exit, || {
        let (mut created, mut deleted, mut max_id) = (0, 0, -1);
        for _ in 0..20 {
            let mut id = -1;
            if timer_create(MONOTONIC, &mut id) == 0 {
                created += 1;
                max_id = max_id.max(id);
                deleted += i32::from(timer_delete(id) == 0);
            }
        }
        format!("timer-life churn created={created} deleted={deleted} max_id={max_id}")
    })?;
    in_child("tm-armed", Ending::Exit, || {
        let ids = create(3);
        let armed: i32 = ids
            .iter()
            .take(2)
            .map(|&id| i32::from(timer_arm(id, 3600) == 0))
            .sum();
        let deleted = ids.first().map_or(-1, |&id| timer_delete(id));
        format!(
            "timer-life armed created={} armed={armed} delete rc={deleted}",
            ids.len()
        )
    })?;
    in_child("tm-exec", Ending::Exec, || {
        format!("timer-life exec created={}", create(2).len())
    })?;
    in_child("tm-keep", Ending::Stay, || {
        format!("timer-life keep created={}", create(4).len())
    })?;
    let mut id = -1;
    let bad_create = outcome(timer_create(1000, &mut id));
    let bad_delete = outcome(timer_delete(0x7fff_fff0));
    let bad_settime = outcome(timer_arm(0x7fff_fff0, 3600));
    println!("timer-life errors create {bad_create} delete {bad_delete} settime {bad_settime}");
    Ok(())
}

pub fn restore() -> Result<(), String> {
    in_child("tm-restore", Ending::Exit, || {
        let prctl = |mode: libc::c_ulong| {
            // SAFETY: a plain prctl on this process.
            let rc = unsafe { libc::prctl(PR_TIMER_CREATE_RESTORE_IDS, mode, 0, 0, 0) };
            outcome(rc.into())
        };
        let on = prctl(RESTORE_ON);
        if on != "rc=0" {
            return format!("timer-restore on {on}: no restore mode on this kernel (6.15+)");
        }
        let mode = prctl(RESTORE_GET);
        let mut first = RESTORE_ID;
        let first_rc = outcome(timer_create(MONOTONIC, &mut first));
        let mut again = RESTORE_ID;
        let again_rc = outcome(timer_create(MONOTONIC, &mut again));
        let mut negative = -5;
        let negative_rc = outcome(timer_create(MONOTONIC, &mut negative));
        let off = prctl(RESTORE_OFF);
        // The kernel moved its ID counter past the requested ID.
        let mut next = -1;
        let next_rc = outcome(timer_create(MONOTONIC, &mut next));
        format!(
            "timer-restore on {on} get {mode} first {first_rc} id={first} again {again_rc} \
             negative {negative_rc} off {off} next {next_rc} id={next}"
        )
    })
}

/// `count` creates; the IDs of those that succeeded.
fn create(count: usize) -> Vec<libc::c_int> {
    (0..count)
        .filter_map(|_| {
            let mut id = -1;
            (timer_create(MONOTONIC, &mut id) == 0).then_some(id)
        })
        .collect()
}

/// How a child ends once it printed its line.
#[derive(Clone, Copy, PartialEq)]
enum Ending {
    Exit,
    /// exec `/bin/true`, which exits at once.
    Exec,
    /// Never: it waits for a signal, so its timers stay live until the guest powers off.
    Stay,
}

/// Runs `body` in a child named `comm` (prctl PR_SET_NAME before any timer call), prints what it
/// returns, and waits until the child has ended (or, for [`Ending::Stay`], printed).
fn in_child(comm: &str, ending: Ending, body: impl FnOnce() -> String) -> Result<(), String> {
    let name = CString::new(comm).map_err(|e| e.to_string())?;
    let true_path = c"/bin/true";
    let mut ready = [0; 2];
    // SAFETY: pipe(2) into a two-int array.
    if unsafe { libc::pipe(ready.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    let _ = std::io::stdout().flush();
    // SAFETY: this tool is single-threaded, so the child may allocate and print.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the child: name it, run the body, report, then end as asked.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr());
            println!("{}", body());
            let _ = std::io::stdout().flush();
            libc::write(ready[1], [1u8].as_ptr().cast(), 1);
            match ending {
                Ending::Exit => libc::_exit(0),
                Ending::Exec => {
                    let argv = [true_path.as_ptr(), std::ptr::null()];
                    libc::execv(true_path.as_ptr(), argv.as_ptr());
                    libc::_exit(127);
                }
                Ending::Stay => loop {
                    libc::pause();
                },
            }
        }
    }
    // SAFETY: our copy of the write end, then one byte from the child.
    unsafe {
        libc::close(ready[1]);
        let mut byte = 0u8;
        libc::read(ready[0], (&raw mut byte).cast(), 1);
        libc::close(ready[0]);
    }
    if ending == Ending::Stay {
        return Ok(());
    }
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &raw mut status, 0) };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{comm} ended with status {status:#x}"));
    }
    Ok(())
}
