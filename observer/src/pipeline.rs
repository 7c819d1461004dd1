//! The event pipeline: drains the ring buffer, decodes each record (bytes from the kernel are
//! checked, never trusted), hands it to its family, and optionally writes it as JSON.

use std::{io::Write as _, mem::size_of, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use observer_common::{
    EventHeader, EventKind,
    lockdown::{LockdownConsole, LockdownDecision},
    modules::{ModuleLoad, TaintEvent},
    timers::TimerEvent,
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::agent::{Agent, State};

/// Reads a `T` from the front of `bytes`, if they are long enough.
pub fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked and `T` is plain data valid for any bit pattern;
    // read_unaligned makes no alignment assumption about the ring buffer's bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A task's `comm` as text (up to the first NUL).
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Decodes one record and updates the state; returns its JSON form when asked for.
pub fn dispatch(bytes: &[u8], state: &mut State, want_json: bool) -> Option<String> {
    let Some(header) = read_record::<EventHeader>(bytes) else {
        state.decode_errors += 1;
        return None;
    };
    let Some(kind) = EventKind::from_u32(header.kind) else {
        state.decode_errors += 1;
        return None;
    };
    let comm = comm_str(&header.comm);
    let json = match kind {
        EventKind::TimerCreated
        | EventKind::TimerDeleted
        | EventKind::TimerArmed
        | EventKind::TimerOwnerGone => {
            let Some(event) = read_record::<TimerEvent>(bytes) else {
                state.decode_errors += 1;
                return None;
            };
            let record = state.timers.handle(kind, &event, &comm);
            want_json.then(|| serde_json::to_string(&record))
        }
        EventKind::LockdownDecision => {
            let Some(event) = read_record::<LockdownDecision>(bytes) else {
                state.decode_errors += 1;
                return None;
            };
            let record = state.lockdown.decision(&event, &comm);
            want_json.then(|| serde_json::to_string(&record))
        }
        EventKind::LockdownConsole => {
            let Some(event) = read_record::<LockdownConsole>(bytes) else {
                state.decode_errors += 1;
                return None;
            };
            let record = state.lockdown.console(&event);
            record.and_then(|r| want_json.then(|| serde_json::to_string(&r)))
        }
        EventKind::ModuleLoad => {
            let Some(event) = read_record::<ModuleLoad>(bytes) else {
                state.decode_errors += 1;
                return None;
            };
            let record = state.modules.load(&event);
            want_json.then(|| serde_json::to_string(&record))
        }
        EventKind::Taint => {
            let Some(event) = read_record::<TaintEvent>(bytes) else {
                state.decode_errors += 1;
                return None;
            };
            let record = state.modules.taint(&event);
            want_json.then(|| serde_json::to_string(&record))
        }
    };
    state.events[kind as usize] += 1;
    json.and_then(Result::ok)
}

/// How often the agent drains without being woken: the programs wake it only once a quarter of
/// the ring buffer (at most 64 KiB) waits, so a trickle of records reaches /metrics within this
/// delay. The interval doubles while drains find nothing, up to IDLE_DRAIN_INTERVAL, so an idle
/// host costs one wakeup a second.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// The ring buffer reader: drains when the kernel wakes it and on a short timer.
pub struct Pipeline {
    ring: AsyncFd<RingBuf<MapData>>,
    agent: Arc<Agent>,
    want_json: bool,
    lines: Vec<String>,
}

impl Pipeline {
    /// Must be called inside the tokio runtime.
    pub fn new(ring: RingBuf<MapData>, agent: Arc<Agent>, want_json: bool) -> anyhow::Result<Self> {
        // SAFETY: the ring buffer owns its map fd, which stays open and the same while the
        // AsyncFd owns the ring buffer. Readable only: the kernel never signals it writable.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            agent,
            want_json,
            lines: Vec::new(),
        })
    }

    /// Drains until the future is dropped.
    pub async fn run(&mut self) -> anyhow::Result<()> {
        let mut interval = DRAIN_INTERVAL;
        loop {
            let drained = tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let drained = drain(guard.get_inner_mut(), &self.agent, self.want_json, &mut self.lines);
                    guard.clear_ready();
                    drained
                }
                () = tokio::time::sleep(interval) => drain(self.ring.get_mut(), &self.agent, self.want_json, &mut self.lines),
            };
            interval = if drained > 0 {
                DRAIN_INTERVAL
            } else {
                (interval * 2).min(IDLE_DRAIN_INTERVAL)
            };
            self.flush_lines();
        }
    }

    /// Takes in what is still waiting: at exit, nothing already recorded is left unread.
    pub fn drain_now(&mut self) {
        let _ = drain(
            self.ring.get_mut(),
            &self.agent,
            self.want_json,
            &mut self.lines,
        );
        self.flush_lines();
    }

    fn flush_lines(&mut self) {
        if self.lines.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        for line in self.lines.drain(..) {
            // A closed stdout must not stop observation.
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

/// Forwards the programs' log lines (aya-log) into the agent's log until the future is dropped.
/// The programs log only rare conditions; a malformed line is dropped with a warning rather than
/// allowed to stop the agent.
pub async fn forward_kernel_logs(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> anyhow::Result<()> {
    // SAFETY: the logger owns its ring buffer's map fd, which stays open and the same while the
    // AsyncFd owns the logger.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    loop {
        let mut guard = logger.readable_mut().await?;
        let inner = guard.get_inner_mut();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.flush())).is_err() {
            log::warn!("dropped a malformed log record from the eBPF programs");
        }
        guard.clear_ready();
    }
}

/// Drains every record waiting, collecting the JSON lines asked for; returns how many.
fn drain(
    ring: &mut RingBuf<MapData>,
    agent: &Agent,
    want_json: bool,
    lines: &mut Vec<String>,
) -> usize {
    let mut state = agent
        .state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut drained = 0;
    while let Some(item) = ring.next() {
        drained += 1;
        if let Some(line) = dispatch(&item, &mut state, want_json) {
            lines.push(line);
        }
    }
    drained
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{
        lockdown::Lockdown,
        modules::ModuleState,
        timers::{TimerSettings, TimerState},
    };

    fn state() -> State {
        State {
            events: Default::default(),
            decode_errors: 0,
            timers: TimerState::new(TimerSettings {
                short_lived_ns: 10_000_000,
                top_processes: 10,
            }),
            lockdown: Lockdown::default(),
            modules: ModuleState::new(true, Some(4096)),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Any bytes, with any kind number in front, decode or count as an error: never a panic.
        #[test]
        fn arbitrary_records_never_panic(kind in 0u32..12, body in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut bytes = kind.to_le_bytes().to_vec();
            bytes.extend(body);
            let mut state = state();
            let decoded = dispatch(&bytes, &mut state, true).is_some() || state.events.iter().any(|&n| n > 0);
            prop_assert!(decoded || state.decode_errors == 1 || EventKind::from_u32(kind) == Some(EventKind::LockdownConsole));
        }

        /// Truncated records of every kind are refused, counted.
        #[test]
        fn short_records_are_counted(kind in 1u32..9, len in 0usize..40) {
            let mut bytes = vec![0u8; len.max(4)];
            bytes[..4].copy_from_slice(&kind.to_le_bytes());
            bytes.truncate(len);
            let mut state = state();
            prop_assert!(dispatch(&bytes, &mut state, true).is_none());
            prop_assert_eq!(state.decode_errors, 1);
        }
    }

    #[test]
    fn short_and_unknown_records_are_counted_not_trusted() {
        assert_eq!(read_record::<EventHeader>(&[0u8; 8]), None);
        assert!(read_record::<EventHeader>(&[0u8; 40]).is_some());
        assert_eq!(comm_str(b"bash\0\0\0\0garbage!"), "bash");
        assert_eq!(comm_str(b"sixteen-bytes-xx"), "sixteen-bytes-xx");
    }
}
