//! Helpers shared by observer's integration tests, `cargo xtask bench`, the dashboards check and
//! the VM harness, so that each exists once: an HTTP client that reads what a Prometheus server
//! would, a free loopback port, a reader of the Prometheus text exposition format, and the POSIX
//! timer syscalls the timer hooks watch.
//!
//! Plain `std` (and `libc` for the syscalls): errors are `std::io::Error`, so every user can wrap
//! them in its own error type.
pub mod http;
pub mod prom;
pub mod timers;

use std::net::{SocketAddr, TcpListener};

/// A loopback address with a port nobody listens on now (the probe listener is closed before
/// this returns, so whoever binds it next gets it unless another process races for it).
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The port of [`free_loopback_addr`].
pub fn free_loopback_port() -> std::io::Result<u16> {
    free_loopback_addr().map(|addr| addr.port())
}

/// Names the calling thread (its `comm`, what the agent reports as the process name; the kernel
/// keeps 15 bytes). Returns false when the name has a NUL byte or the kernel refuses it.
pub fn set_thread_name(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid C string; PR_SET_NAME copies at most 16 bytes of it.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_loopback_and_bindable() {
        let addr = free_loopback_addr().unwrap();
        assert!(addr.ip().is_loopback());
        assert_ne!(addr.port(), 0);
        TcpListener::bind(addr).unwrap();
    }

    #[test]
    fn thread_names() {
        std::thread::spawn(|| {
            assert!(set_thread_name("testkit-named"));
            let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
            assert_eq!(comm.trim_end(), "testkit-named");
            assert!(!set_thread_name("nul\0byte"));
        })
        .join()
        .unwrap();
    }
}
