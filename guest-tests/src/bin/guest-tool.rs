//! Runs inside the QEMU guest (built static): makes the system calls a scenario needs and prints
//! exactly what the kernel returned, one line per call, then judges the scenario (`judge`).
//!
//! busybox insmod is not used for the scenarios' modules: after a refused finit_module it retries
//! with init_module, so every refused load would be seen (and counted) twice.
// Beside this file rather than in src/bin/, where cargo would take it for a binary of its own.
#[path = "guest-tool/bench.rs"]
mod bench;
#[path = "guest-tool/judge.rs"]
mod judge;
#[path = "guest-tool/timer_life.rs"]
mod timer_life;

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant},
};

/// Lets the kernel decompress the module (include/uapi/linux/module.h).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

const USAGE: &str = "usage: guest-tool load [--compressed] [--uid N] [--threads N] FILE... | \
                     timers COUNT | \
                     timer-life | timer-restore | await-host PORT SECONDS | \
                     loadtime LABEL FILE... | ima-digest [--wrong] FILE... | \
                     timer-pairs N | timer-storm SECONDS THREADS | getppid N | \
                     bpf-stats PREFIX | socket [--uid N] FAMILY TYPE PROTOCOL | \
                     judge SCENARIO SERIES CONSOLE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("load") => load(&args[1..]),
        Some("loadtime") => load_time(&args[1..]),
        Some("ima-digest") => ima_digest(&args[1..]),
        Some("socket") => socket(&args[1..]),
        Some("timer-pairs") => count_arg(&args).and_then(bench::timer_pairs),
        Some("getppid") => count_arg(&args).and_then(bench::getppid),
        Some("timer-storm") => match (
            args.get(1).and_then(|s| s.parse().ok()),
            args.get(2).and_then(|t| t.parse().ok()),
        ) {
            (Some(seconds), Some(threads)) => bench::timer_storm(seconds, threads),
            _ => Err(USAGE.to_owned()),
        },
        Some("bpf-stats") => args
            .get(1)
            .ok_or_else(|| USAGE.to_owned())
            .and_then(|prefix| bench::stats(prefix)),
        Some("timers") => args
            .get(1)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| USAGE.to_owned())
            .and_then(timers),
        Some("timer-life") => timer_life::life(),
        Some("timer-restore") => timer_life::restore(),
        Some("judge") => judge::run(&args[1..]),
        Some("await-host") => match (
            args.get(1).and_then(|p| p.parse().ok()),
            args.get(2).and_then(|s| s.parse().ok()),
        ) {
            (Some(port), Some(seconds)) => await_host(port, seconds),
            _ => Err(USAGE.to_owned()),
        },
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("guest-tool: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The count a subcommand takes as its one argument.
fn count_arg(args: &[String]) -> Result<u64, String> {
    args.get(1)
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| USAGE.to_owned())
}

/// `load [--compressed] [--uid N] [--threads N] FILE...`: `finit_module(fd, "", flags)` for
/// each file; prints `finit_module NAME rc=0` or `finit_module NAME errno=NAME` per call. A
/// refused load is a result, not a failure of this tool. `--uid N`: as user N, without
/// capabilities (an unprivileged caller). `--threads N`: N threads call it on the same file at
/// once (as udev's workers do at boot), released together.
fn load(args: &[String]) -> Result<(), String> {
    let mut flags = 0;
    let mut uid = None;
    let mut threads = 1usize;
    let mut rest = args;
    loop {
        match rest {
            [flag, tail @ ..] if flag == "--compressed" => {
                flags = MODULE_INIT_COMPRESSED_FILE;
                rest = tail;
            }
            [flag, value, tail @ ..] if flag == "--uid" => {
                uid = Some(value.parse::<u32>().map_err(|_| USAGE.to_owned())?);
                rest = tail;
            }
            [flag, value, tail @ ..] if flag == "--threads" => {
                threads = value.parse().map_err(|_| USAGE.to_owned())?;
                rest = tail;
            }
            _ => break,
        }
    }
    let files = rest;
    if files.is_empty() || threads == 0 {
        return Err(USAGE.to_owned());
    }
    if let Some(uid) = uid {
        become_uid(uid)?;
    }
    for file in files {
        let name = Path::new(file)
            .file_name()
            .map_or(file.as_str().into(), |n| n.to_string_lossy());
        let shown = if flags & MODULE_INIT_COMPRESSED_FILE != 0 {
            format!("{name} compressed")
        } else {
            name.into_owned()
        };
        let start = std::sync::Arc::new(std::sync::Barrier::new(threads));
        let calls: Vec<_> = (0..threads)
            .map(|_| {
                let (file, start) = (file.clone(), start.clone());
                std::thread::spawn(move || finit_module(&file, flags, &start))
            })
            .collect();
        for call in calls {
            let result = call
                .join()
                .map_err(|_| "a load thread panicked".to_owned())?;
            println!("finit_module {shown} {}", result?);
        }
    }
    Ok(())
}

fn become_uid(uid: u32) -> Result<(), String> {
    // SAFETY: plain syscalls; leaving root drops every capability (no keep-caps).
    if unsafe { libc::setresgid(uid, uid, uid) } != 0
        || unsafe { libc::setresuid(uid, uid, uid) } != 0
    {
        return Err(format!(
            "becoming uid {uid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// One socket(2) call, as any user may make: a family whose module is not loaded has the
/// kernel ask for it (`request_module("net-pf-N")`), and so may its protocol.
fn socket(args: &[String]) -> Result<(), String> {
    let (uid, rest) = match args {
        [flag, value, rest @ ..] if flag == "--uid" => (
            Some(value.parse::<u32>().map_err(|_| USAGE.to_owned())?),
            rest,
        ),
        rest => (None, rest),
    };
    let [family, kind, protocol] = rest else {
        return Err(USAGE.to_owned());
    };
    let number = |s: &String| s.parse::<libc::c_int>().map_err(|_| USAGE.to_owned());
    let (family, kind, protocol) = (number(family)?, number(kind)?, number(protocol)?);
    if let Some(uid) = uid {
        become_uid(uid)?;
    }
    println!("socket by pid {}", std::process::id());
    // SAFETY: a plain syscall; the descriptor is closed at once.
    let fd = unsafe { libc::socket(family, kind, protocol) };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        println!(
            "socket {family} {kind} {protocol} errno={}",
            errno_name(errno)
        );
    } else {
        println!("socket {family} {kind} {protocol} rc=0");
        // SAFETY: the descriptor just opened.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// One `finit_module` call on its own descriptor, once every thread is ready.
fn finit_module(
    file: &str,
    flags: libc::c_uint,
    start: &std::sync::Barrier,
) -> Result<String, String> {
    let params = CString::default();
    let module = std::fs::File::open(file).map_err(|e| format!("opening {file}: {e}"))?;
    start.wait();
    // SAFETY: a valid open fd and a NUL-terminated parameter string that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            module.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    Ok(outcome(rc))
}

/// `security.ima` type 0x04 (IMA_XATTR_DIGEST_NG: a digest with its algorithm), and the
/// kernel's `enum hash_algo` value of SHA-256.
const IMA_XATTR_DIGEST_NG: u8 = 4;
const HASH_ALGO_SHA256: u8 = 4;

/// `ima-digest [--wrong] FILE...`: writes each file's SHA-256 into its `security.ima` attribute,
/// as IMA appraisal compares it (`--wrong`: with one bit flipped); prints
/// `ima-digest NAME set` or `... wrong`.
fn ima_digest(args: &[String]) -> Result<(), String> {
    use sha2::Digest as _;
    let (wrong, files) = match args.first().map(String::as_str) {
        Some("--wrong") => (true, &args[1..]),
        _ => (false, args),
    };
    if files.is_empty() {
        return Err(USAGE.to_owned());
    }
    for file in files {
        let bytes = std::fs::read(file).map_err(|e| format!("reading {file}: {e}"))?;
        let mut value = vec![IMA_XATTR_DIGEST_NG, HASH_ALGO_SHA256];
        value.extend_from_slice(&sha2::Sha256::digest(&bytes));
        if wrong {
            value[2] ^= 1;
        }
        let path = CString::new(file.as_str()).map_err(|e| e.to_string())?;
        // SAFETY: NUL-terminated path and name; `value` outlives the call.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"security.ima".as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(format!(
                "setting security.ima on {file}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let name = Path::new(file)
            .file_name()
            .map_or(file.as_str().into(), |n| n.to_string_lossy());
        println!("ima-digest {name} {}", if wrong { "wrong" } else { "set" });
    }
    Ok(())
}

/// `loadtime LABEL FILE...`: loads each module with `finit_module`, timing the call, then
/// unloads it; prints `loadtime LABEL NAME ns=N` (the benchmark compares labels).
fn load_time(args: &[String]) -> Result<(), String> {
    let (label, files) = args.split_first().ok_or_else(|| USAGE.to_owned())?;
    let params = CString::default();
    for file in files {
        let module = std::fs::File::open(file).map_err(|e| format!("opening {file}: {e}"))?;
        let start = Instant::now();
        // SAFETY: a valid open fd and a NUL-terminated parameter string that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                module.as_raw_fd(),
                params.as_ptr(),
                0,
            )
        };
        let ns = start.elapsed().as_nanos();
        if rc != 0 {
            return Err(format!("loading {file}: {}", outcome(rc)));
        }
        let stem = Path::new(file)
            .file_name()
            .map_or(file.clone(), |n| n.to_string_lossy().into_owned());
        let name = stem.split(".ko").next().unwrap_or(&stem).replace('-', "_");
        let c_name = CString::new(name.clone()).map_err(|e| e.to_string())?;
        // SAFETY: a NUL-terminated module name.
        let removed =
            unsafe { libc::syscall(libc::SYS_delete_module, c_name.as_ptr(), libc::O_NONBLOCK) };
        if removed != 0 {
            return Err(format!("unloading {name}: {}", outcome(removed)));
        }
        println!("loadtime {label} {name} ns={ns}");
    }
    Ok(())
}

/// A fixed sequence of POSIX timer system calls, made directly (glibc's wrappers add their own
/// bookkeeping), so the observer's counts can be compared with what was really asked for:
/// `count` successful creates and deletes, then one create with an invalid clock and one delete
/// of an ID that does not exist, both EINVAL.
fn timers(count: u32) -> Result<(), String> {
    let mut created = 0;
    let mut deleted = 0;
    let mut ids = Vec::new();
    for _ in 0..count {
        // SAFETY: sigevent is plain data; all-zero then SIGEV_NONE is a valid request.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_NONE;
        let mut id: libc::c_int = -1;
        // SAFETY: pointers to live locals of the types the kernel writes/reads.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_timer_create,
                libc::CLOCK_MONOTONIC,
                &raw mut event,
                &raw mut id,
            )
        };
        if rc == 0 {
            created += 1;
            ids.push(id);
        } else {
            println!("timer_create {}", outcome(rc));
        }
    }
    for id in ids {
        // SAFETY: plain integer argument.
        let rc = unsafe { libc::syscall(libc::SYS_timer_delete, id) };
        if rc == 0 {
            deleted += 1;
        } else {
            println!("timer_delete id={id} {}", outcome(rc));
        }
    }
    let mut id: libc::c_int = -1;
    // SAFETY: a NULL sigevent is allowed; `id` is a live local.
    let bad_create = unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            1000 as libc::clockid_t,
            std::ptr::null_mut::<libc::sigevent>(),
            &raw mut id,
        )
    };
    let bad_create = outcome(bad_create);
    // SAFETY: plain integer argument.
    let bad_delete = outcome(unsafe { libc::syscall(libc::SYS_timer_delete, 0x7fff_fff0) });
    println!(
        "timers created={created} deleted={deleted} bad_create {bad_create} bad_delete {bad_delete}"
    );
    Ok(())
}

/// Waits until the host says "finish" on `port` (reached through a QEMU hostfwd), answers "bye",
/// and returns; gives up after `seconds` so a guest never outlives a vanished host by much.
///
/// The host retries until it reads the answer, because QEMU's user network accepts the host's
/// connection even before anything in the guest listens.
fn await_host(port: u16, seconds: u64) -> Result<(), String> {
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("listening on {port}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        let Ok((stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_ok() && line.trim() == "finish" {
            // Best effort: the host treats a lost answer like no listener and retries.
            let _ = (&stream).write_all(b"bye\n");
            return Ok(());
        }
    }
    Err(format!("the host did not say finish within {seconds} s"))
}

/// `rc=N` for success, else `errno=NAME` from the thread's errno.
fn outcome(rc: libc::c_long) -> String {
    if rc >= 0 {
        return format!("rc={rc}");
    }
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    format!("errno={}", errno_name(errno))
}

fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ENOEXEC => "ENOEXEC",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::ENOSYS => "ENOSYS",
        libc::ENODATA => "ENODATA",
        libc::ENOPKG => "ENOPKG",
        libc::EBADMSG => "EBADMSG",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOKEY => "ENOKEY",
        libc::EKEYEXPIRED => "EKEYEXPIRED",
        libc::EKEYREVOKED => "EKEYREVOKED",
        libc::EKEYREJECTED => "EKEYREJECTED",
        _ => return errno.to_string(),
    };
    name.to_owned()
}
