//! One QEMU guest: TCG (KVM does not work on these machines), PVH boot through qboot, the serial
//! console captured to a log file and kept in memory for the markers, two host ports forwarded to
//! the guest. The process is killed when the value is dropped, so no path leaves a guest behind.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

/// Where the guest's observer listens.
pub const GUEST_METRICS_PORT: u16 = 9745;
/// Where the guest waits for the host's "finish".
pub const GUEST_CONTROL_PORT: u16 = 9746;

const QBOOT: &str = "/usr/share/qemu/qboot.rom";

pub struct Boot<'a> {
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    pub cmdline: String,
    pub log: PathBuf,
    /// Copy the console to stderr as it comes.
    pub echo: bool,
}

pub struct Vm {
    child: Child,
    console: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    pub metrics: SocketAddr,
    pub control: SocketAddr,
    pub started: Instant,
}

impl Vm {
    pub fn start(boot: &Boot) -> anyhow::Result<Vm> {
        let metrics = free_port()?;
        let control = free_port()?;
        let netdev = format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{metrics}-:{GUEST_METRICS_PORT},\
             hostfwd=tcp:127.0.0.1:{control}-:{GUEST_CONTROL_PORT}"
        );
        let mut command = Command::new("qemu-system-x86_64");
        command
            .args(["-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", "2"])
            .args(["-bios", QBOOT, "-nographic", "-no-reboot", "-nodefaults"])
            .args(["-serial", "stdio", "-kernel"])
            .arg(boot.vmlinux)
            .arg("-initrd")
            .arg(boot.initramfs)
            .args(["-append", &boot.cmdline, "-netdev", &netdev])
            // An empty romfile skips loading the iPXE option ROM.
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting qemu-system-x86_64")?;
        let started = Instant::now();
        let console = Arc::new(Mutex::new(String::new()));
        let mut log =
            File::create(&boot.log).with_context(|| format!("creating {}", boot.log.display()))?;
        let mut stdout = child.stdout.take().context("no stdout")?;
        let mut stderr = child.stderr.take().context("no stderr")?;
        let echo = boot.echo;
        let shared = Arc::clone(&console);
        // QEMU's own complaints, read on their own so a full pipe never blocks it.
        let complaints = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // A character's bytes can arrive in two reads (the serial port trickles): the
            // unfinished tail waits for the next read instead of becoming U+FFFD.
            let mut pending: Vec<u8> = Vec::new();
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                pending.extend_from_slice(&buf[..n]);
                let whole = complete_utf8(&pending);
                let text = String::from_utf8_lossy(&pending[..whole]).replace('\r', "");
                pending.drain(..whole);
                let _ = log.write_all(text.as_bytes());
                if echo {
                    eprint!("{text}");
                }
                shared.lock().expect("console lock").push_str(&text);
            }
            let rest = complaints.join().unwrap_or_default();
            if !rest.is_empty() {
                let text = format!("[qemu] {}", rest.trim_end());
                let _ = writeln!(log, "{text}");
                let mut console = shared.lock().expect("console lock");
                console.push('\n');
                console.push_str(&text);
                console.push('\n');
            }
        });
        Ok(Vm {
            child,
            console,
            reader: Some(reader),
            metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, metrics)),
            control: SocketAddr::from((Ipv4Addr::LOCALHOST, control)),
            started,
        })
    }

    /// Everything the console printed so far.
    pub fn console(&self) -> String {
        self.console.lock().expect("console lock").clone()
    }

    /// Waits for a console line starting with one of `markers` and returns that line; `None` when
    /// QEMU exits or `deadline` passes first.
    pub fn wait_for_line(&mut self, markers: &[&str], deadline: Instant) -> Option<String> {
        let find = |console: String| {
            console
                .lines()
                .find(|l| markers.iter().any(|m| l.starts_with(m)))
                .map(str::to_owned)
        };
        loop {
            if let Some(line) = find(self.console()) {
                return Some(line);
            }
            if !self.running() {
                // A last look: the line may have come with QEMU's exit.
                self.join_reader();
                return find(self.console());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for QEMU to exit; kills it at `deadline`. True when it exited by itself.
    pub fn wait_exit(&mut self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if !self.running() {
                self.join_reader();
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        false
    }

    pub fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.join_reader();
    }

    fn join_reader(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port on 127.0.0.1 that nothing listens on now. QEMU binds it a moment later; another
/// process taking it in between makes QEMU fail at start, which the scenario reports.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// How many leading bytes of `bytes` to decode now: all but an unfinished character at the end.
fn complete_utf8(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        // Invalid bytes before the end are decoded (lossily) now; only a tail that may still
        // complete waits.
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_character_split_across_reads_waits_for_its_rest() {
        let micro = "µs".as_bytes();
        assert_eq!(super::complete_utf8(&micro[..1]), 0);
        assert_eq!(super::complete_utf8(micro), micro.len());
        assert_eq!(super::complete_utf8(b"ab\xff"), 3);
    }
}
