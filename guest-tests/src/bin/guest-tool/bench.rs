//! What the guest's timer benchmark measures with (there is no bpftool in the guest):
//!
//! - `timer-pairs N`: N timer_create + timer_delete pairs; prints `timer-pairs N ns=T`;
//! - `getppid N`: N getppid calls, a syscall nothing watches; prints `getppid N ns=T`;
//! - `bpf-stats PREFIX`: each loaded BPF program whose name starts with PREFIX, with the
//!   kernel's run-time statistics (`kernel.bpf_stats_enabled=1`): `bpf-stats ID NAME
//!   run_cnt=C run_time_ns=T`. Names are the kernel's, cut to 15 bytes.
use std::time::Instant;

use testkit::timers::{timer_create, timer_delete};

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `struct bpf_prog_info` offsets (include/uapi/linux/bpf.h; stable, the struct only grows).
const INFO_NAME: usize = 64;
const INFO_RUN_TIME_NS: usize = 192;
const INFO_RUN_CNT: usize = 200;
/// Room for the fields read; the kernel fills what it has and wants the rest zero.
const INFO_SIZE: usize = 256;

pub fn timer_pairs(count: u64) -> Result<(), String> {
    let started = Instant::now();
    for _ in 0..count {
        let mut id = 0;
        if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0 || timer_delete(id) != 0 {
            return Err(format!("timer pair: {}", std::io::Error::last_os_error()));
        }
    }
    println!("timer-pairs {count} ns={}", started.elapsed().as_nanos());
    Ok(())
}

/// `timer-storm SECONDS THREADS`: THREADS threads make timer_create+timer_delete pairs as fast
/// as they can for SECONDS (the flood any local user can make); prints the pairs made in all.
pub fn timer_storm(seconds: u64, threads: u64) -> Result<(), String> {
    let until = Instant::now() + std::time::Duration::from_secs(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut pairs = 0u64;
                while Instant::now() < until {
                    for _ in 0..256 {
                        let mut id = 0;
                        if timer_create(libc::CLOCK_MONOTONIC.into(), &mut id) != 0
                            || timer_delete(id) != 0
                        {
                            return Err(format!("timer pair: {}", std::io::Error::last_os_error()));
                        }
                    }
                    pairs += 256;
                }
                Ok(pairs)
            })
        })
        .collect();
    let mut total = 0;
    for worker in workers {
        total += worker
            .join()
            .map_err(|_| "a storm thread panicked".to_owned())??;
    }
    println!("timer-storm pairs={total}");
    Ok(())
}

pub fn getppid(count: u64) -> Result<(), String> {
    let started = Instant::now();
    for _ in 0..count {
        // SAFETY: no arguments; the raw syscall, so no libc caching stands in for it.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    println!("getppid {count} ns={}", started.elapsed().as_nanos());
    Ok(())
}

/// `bpf(cmd, attr)` with the attribute's first two words (the rest zero); returns the result
/// and the first word as the kernel left it (where BPF_PROG_GET_NEXT_ID writes the next ID).
fn bpf(cmd: libc::c_long, words: [u64; 2]) -> (libc::c_long, u64) {
    let mut attr = [0u64; 8];
    attr[..2].copy_from_slice(&words);
    // SAFETY: `attr` is a live buffer larger than each command's attribute.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(&attr)) };
    (rc, attr[0])
}

pub fn stats(prefix: &str) -> Result<(), String> {
    let mut id: u32 = 0;
    loop {
        // { __u32 start_id; __u32 next_id; ... }: the next ID comes back in the upper half.
        let (rc, first) = bpf(BPF_PROG_GET_NEXT_ID, [u64::from(id), 0]);
        if rc != 0 {
            break;
        }
        id = (first >> 32) as u32;
        // { __u32 prog_id; ... }
        let (fd, _) = bpf(BPF_PROG_GET_FD_BY_ID, [u64::from(id), 0]);
        if fd < 0 {
            continue;
        }
        let mut info = [0u8; INFO_SIZE];
        // { __u32 bpf_fd; __u32 info_len; __u64 info; }
        let (rc, _) = bpf(
            BPF_OBJ_GET_INFO_BY_FD,
            [
                (fd as u64) | ((INFO_SIZE as u64) << 32),
                info.as_mut_ptr() as u64,
            ],
        );
        // Taken before close, which may set errno again.
        let error = std::io::Error::last_os_error();
        // SAFETY: our own fd.
        unsafe { libc::close(fd as libc::c_int) };
        if rc != 0 {
            return Err(format!("BPF_OBJ_GET_INFO_BY_FD: {error}"));
        }
        let name_bytes = &info[INFO_NAME..INFO_NAME + 16];
        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&name_bytes[..end]);
        if !name.starts_with(prefix) {
            continue;
        }
        let word =
            |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().expect("eight bytes"));
        println!(
            "bpf-stats {id} {name} run_cnt={} run_time_ns={}",
            word(INFO_RUN_CNT),
            word(INFO_RUN_TIME_NS)
        );
    }
    Ok(())
}
