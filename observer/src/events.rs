//! The event stream (`--events json`): one JSON object per record, with what every event has
//! (time, kind, process, thread, user, comm, cgroup, container) around the family's own fields,
//! written to stdout or appended to a file that SIGHUP reopens (for logrotate), by a thread of
//! its own behind a bounded queue. A write that fails, or events the queue had no room for, are
//! counted and logged, never fatal, and never stop the metrics.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
};

use anyhow::Context as _;
use observer_common::EventHeader;

use crate::{
    cgroups::CgroupNames,
    family::{Event, EventFields},
    record::comm_str,
};

/// Where the stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Output {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "-" => Ok(Self::Stdout),
            "" => Err("give a file path, or - for stdout".into()),
            path => Ok(Self::File(path.into())),
        }
    }
}

/// Formats events into lines and hands them, a batch at a time, to the writer thread
/// ([`Writer`]) through a bounded queue: the reader of records never waits on the output, and
/// a batch the queue has no room for is dropped and counted, never buffered without bound.
pub struct EventStream {
    /// Wall-clock time minus boot time, taken again at every drain (see [`Self::resync`]):
    /// the records' CLOCK_BOOTTIME stamps plus this are UTC nanoseconds.
    wall_offset_ns: i128,
    /// Which host and which boot of it every event comes from, so that lines merged from a
    /// fleet stay apart (the kernel's host name and its boot id, read at start).
    host: String,
    boot_id: String,
    cgroups: CgroupNames,
    lines: String,
    pending: u64,
    queue: SyncSender<Batch>,
}

/// Lines for the writer, and how many.
struct Batch {
    text: String,
    lines: u64,
}

/// Batches the writer may have waiting: with a drain's batch at most a few thousand lines,
/// a few MiB at most while an output is slow.
const QUEUED_BATCHES: usize = 16;

/// The version of `schemas/events.schema.json` the events follow: raised when a field changes
/// meaning or goes away (fields added to a kind leave it).
pub const SCHEMA_VERSION: u32 = 1;

/// Wall-clock time minus boot time, now.
fn wall_offset_ns() -> i128 {
    let boot = clock_ns(libc::CLOCK_BOOTTIME);
    clock_ns(libc::CLOCK_REALTIME) - boot
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut now) };
    i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec)
}

/// The output's end of the stream: the file or stdout, written on a thread of its own.
pub struct Writer {
    output: Output,
    file: Option<File>,
    /// Set by SIGHUP: reopen the file before the next write.
    pub reopen: Arc<AtomicBool>,
    failing: bool,
    batches: Receiver<Batch>,
}

impl EventStream {
    /// Opens the output (a file that cannot be opened is an error at start, not later); the
    /// writer runs once [`Writer::spawn`] is called.
    /// Cgroups are named from `cgroup_root` (`--cgroup.root`), or from the mount table's.
    pub fn open(output: Output, cgroup_root: Option<PathBuf>) -> anyhow::Result<(Self, Writer)> {
        let file = match &output {
            Output::Stdout => None,
            Output::File(path) => Some(append(path)?),
        };
        let (queue, batches) = sync_channel(QUEUED_BATCHES);
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
        };
        Ok((
            Self {
                wall_offset_ns: wall_offset_ns(),
                host: read("/proc/sys/kernel/hostname"),
                boot_id: read("/proc/sys/kernel/random/boot_id"),
                cgroups: CgroupNames::new(cgroup_root),
                lines: String::new(),
                pending: 0,
                queue,
            },
            Writer {
                output,
                file,
                reopen: Arc::new(AtomicBool::new(false)),
                failing: false,
                batches,
            },
        ))
    }

    /// Takes the wall clock's offset again (at each drain): a clock stepped after start (no
    /// RTC at boot, a restored VM, chrony's makestep) moves only the events recorded after the
    /// step's drain, not every later one.
    pub fn resync(&mut self) {
        self.wall_offset_ns = wall_offset_ns();
    }

    /// Adds one event: the family's `fields` come last, so a family may name the event or the
    /// process more precisely (a lockdown console line names its own process).
    pub fn push(&mut self, header: &EventHeader, event: Event) {
        self.push_labelled(header, event);
    }

    /// An event of the agent's own (an inventory taken at start): now, and the agent as its
    /// process.
    pub fn push_own(&mut self, event: Event) {
        let mut header = EventHeader {
            pid: std::process::id(),
            tid: std::process::id(),
            // SAFETY: plain getters.
            uid: unsafe { libc::getuid() },
            ts_ns: u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0),
            ..EventHeader::default()
        };
        header.comm[..8].copy_from_slice(b"observer");
        self.push_labelled(&header, event);
    }

    fn push_labelled(&mut self, header: &EventHeader, Event { name, fields }: Event) {
        let mut event = EventFields::new();
        let wall = i128::from(header.ts_ns) + self.wall_offset_ns;
        event.insert("time".into(), rfc3339_nanos(wall).into());
        event.insert("event".into(), name.into());
        event.insert("schema_version".into(), SCHEMA_VERSION.into());
        event.insert("host".into(), self.host.clone().into());
        event.insert("boot_id".into(), self.boot_id.clone().into());
        event.insert("pid".into(), header.pid.into());
        event.insert("tid".into(), header.tid.into());
        event.insert("uid".into(), header.uid.into());
        event.insert("comm".into(), comm_str(&header.comm).into());
        event.insert("cgroup_id".into(), header.cgroup_id.into());
        self.name_cgroup(&mut event, header.cgroup_id);
        event.extend(fields);
        // Another task an event names (an autoload's requester) gets its cgroup named too.
        if let Some(serde_json::Value::Object(requester)) = event.get_mut("requested_by")
            && let Some(id) = requester
                .get("cgroup_id")
                .and_then(serde_json::Value::as_u64)
        {
            self.name_cgroup(requester, id);
        }
        if let Ok(line) = serde_json::to_string(&event) {
            self.lines.push_str(&line);
            self.lines.push('\n');
            self.pending += 1;
        }
    }

    /// The lines written so far and not yet queued (for tests of what a line holds).
    #[cfg(test)]
    pub fn take_lines(&mut self) -> String {
        self.pending = 0;
        std::mem::take(&mut self.lines)
    }

    /// Adds the cgroup's path and, where its naming shows one, the container id.
    fn name_cgroup(&mut self, fields: &mut EventFields, cgroup_id: u64) {
        if let Some(path) = self.cgroups.path(cgroup_id) {
            if let Some(id) = crate::cgroups::container_id(path) {
                fields.insert("container_id".into(), id.into());
            }
            fields.insert("cgroup".into(), path.into());
        }
    }

    /// Hands what was pushed to the writer; counts the events in `dropped` when its queue is
    /// full (the output is slower than the events, or nobody reads it).
    pub fn flush(&mut self, dropped: &AtomicU64) {
        if self.pending == 0 {
            return;
        }
        let batch = Batch {
            text: std::mem::take(&mut self.lines),
            lines: std::mem::take(&mut self.pending),
        };
        if let Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) =
            self.queue.try_send(batch)
        {
            dropped.fetch_add(batch.lines, Ordering::Relaxed);
        }
    }
}

impl Writer {
    /// Writes batches until the stream is dropped; counts a failed write in `errors` (each
    /// event in it).
    pub fn spawn(mut self, agent: Arc<crate::agent::Agent>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("event-writer".into())
            .spawn(move || {
                while let Ok(batch) = self.batches.recv() {
                    self.write(&batch, &agent.counts.output_errors);
                }
            })
    }

    fn write(&mut self, batch: &Batch, errors: &AtomicU64) {
        if self.reopen.swap(false, Ordering::Relaxed)
            && let Output::File(path) = &self.output
        {
            match append(path) {
                Ok(file) => {
                    log::info!("reopened {}", path.display());
                    self.file = Some(file);
                }
                Err(err) => log::warn!("{err:#}; still writing to the file open before"),
            }
        }
        let result = match &mut self.file {
            Some(file) => file.write_all(batch.text.as_bytes()),
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(batch.text.as_bytes())
                    .and_then(|()| out.flush())
            }
        };
        match result {
            Ok(()) => self.failing = false,
            Err(err) => {
                errors.fetch_add(1, Ordering::Relaxed);
                // Once per run of failures, not once per write.
                if !self.failing {
                    log::warn!(
                        "writing events: {err}; counting failures in observer_events_output_errors_total"
                    );
                }
                self.failing = true;
            }
        }
    }
}

fn append(path: &PathBuf) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} for events", path.display()))
}

/// `2026-11-29T05:30:00.123456789Z` for nanoseconds since the epoch (UTC).
pub fn rfc3339_nanos(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        day_secs / 3_600,
        day_secs % 3_600 / 60,
        day_secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_with_nanoseconds() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(1_796_016_600_123_456_789),
            "2026-11-30T05:30:00.123456789Z"
        );
        // A leap day.
        assert_eq!(
            rfc3339_nanos(1_709_164_800_000_000_001),
            "2024-02-29T00:00:00.000000001Z"
        );
    }

    #[test]
    fn outputs() {
        assert_eq!("-".parse::<Output>(), Ok(Output::Stdout));
        assert_eq!(
            "/var/log/observer/events.json".parse::<Output>(),
            Ok(Output::File("/var/log/observer/events.json".into()))
        );
        assert!("".parse::<Output>().is_err());
    }
}
