//! Load for the timer-path benchmarks: real timer_create/timer_delete syscall pairs.
//!
//! `timer-load pairs N`: N create+delete pairs; prints nanoseconds per pair.
//! `timer-load comms K`: one create+delete under each of K distinct process names.
//! `timer-load storm SECONDS`: pairs as fast as possible for that long; prints pairs per second.
//! `timer-load other N`: N getppid calls (no hook watches it); prints nanoseconds per call.
use std::time::{Duration, Instant};

/// One create+delete pair; a failure ends the load (a benchmark of failing calls measures
/// something else).
fn pair() {
    if let Err(e) = testkit::timers::timer_pair() {
        eprintln!("timer-load: timer_create/timer_delete failed: {e}");
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let number = |i: usize| -> u64 {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: timer-load pairs N | comms K | storm SECONDS | other N");
            std::process::exit(2)
        })
    };
    match args.get(1).map(String::as_str) {
        Some("pairs") => {
            let n = number(2);
            let start = Instant::now();
            for _ in 0..n {
                pair();
            }
            println!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64);
        }
        Some("comms") => {
            for i in 0..number(2) {
                testkit::set_thread_name(&format!("tl-{i}"));
                pair();
            }
        }
        Some("other") => {
            // A syscall no hook watches: what a tracer costs everything else.
            let n = number(2);
            let start = Instant::now();
            for _ in 0..n {
                // SAFETY: a plain syscall.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            println!("{:.1}", start.elapsed().as_nanos() as f64 / n as f64);
        }
        Some("storm") => {
            let until = Instant::now() + Duration::from_secs(number(2));
            let (start, mut pairs) = (Instant::now(), 0u64);
            while Instant::now() < until {
                for _ in 0..1000 {
                    pair();
                }
                pairs += 1000;
            }
            println!("{:.0}", pairs as f64 / start.elapsed().as_secs_f64());
        }
        _ => {
            eprintln!("usage: timer-load pairs N | comms K | storm SECONDS | other N");
            std::process::exit(2);
        }
    }
}
