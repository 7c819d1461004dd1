//! The event pipeline: drains the ring buffers on a thread of its own, decodes each record
//! (bytes from the kernel are checked, never trusted), hands it to its family, and optionally
//! passes it to the event stream.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use observer_common::{EventHeader, EventKind};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    agent::{Agent, Families, RecordCounts},
    events::EventStream,
    family::{Event, HookFamily},
    record::read_record,
};

/// A record taken by its family, with the event it makes (when asked for).
pub struct Decoded {
    pub header: EventHeader,
    pub event: Event,
}

/// Decodes one record and hands it to its family (`locked`: every family, locked, in the
/// order of [`Families`]); returns the event when `want_event` and the record makes one.
pub fn dispatch(
    families: &Families,
    locked: &mut [MutexGuard<'_, Box<dyn HookFamily>>],
    counts: &RecordCounts,
    bytes: &[u8],
    want_event: bool,
) -> Option<Decoded> {
    let error = || {
        counts.decode_errors.fetch_add(1, Ordering::Relaxed);
        None
    };
    let Some(header) = read_record::<EventHeader>(bytes) else {
        return error();
    };
    let Some(kind) = EventKind::from_u32(header.kind) else {
        return error();
    };
    // A kind no enabled family takes, or a record shorter than its kind's, is not trusted.
    let Some((slot, size)) = families.route(kind) else {
        return error();
    };
    if bytes.len() < size {
        return error();
    }
    let event = locked[slot].decode(kind, bytes, want_event);
    counts.received[kind as usize].fetch_add(1, Ordering::Relaxed);
    Some(Decoded {
        header,
        event: event?,
    })
}

/// How often the reader drains without being woken: the timer programs wake it only once a
/// quarter of their ring buffer (at most 64 KiB) waits, so a trickle of records reaches
/// /metrics within this delay. The interval doubles while drains find nothing, up to
/// IDLE_DRAIN_INTERVAL, so an idle host costs one wakeup a second. Security records wake it at
/// once.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_secs(1);

/// Records taken from one ring buffer while the families are locked: a scrape waits for at most
/// one batch, however long a storm lasts.
const BATCH: usize = 1024;

/// The reader of the ring buffers: a thread of its own, so that no storm of records can keep
/// the HTTP server from answering. The security ring is read before each batch of the timer
/// ring.
pub struct Reader {
    /// The security ring first.
    rings: Vec<RingBuf<MapData>>,
    agent: Arc<Agent>,
    events: Option<EventStream>,
}

impl Reader {
    pub fn new(
        rings: Vec<RingBuf<MapData>>,
        agent: Arc<Agent>,
        events: Option<EventStream>,
    ) -> Self {
        Self {
            rings,
            agent,
            events,
        }
    }

    /// Reads until `stop` is set, then takes in what is still waiting (at exit, nothing
    /// already recorded is left unread).
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("ring-reader".into())
            .spawn(move || {
                let mut fds = self.pollfds();
                let mut interval = DRAIN_INTERVAL;
                while !stop.load(Ordering::Relaxed) {
                    wait(&mut fds, interval);
                    let drained = self.drain();
                    self.agent.pins.drained();
                    interval = if drained > 0 {
                        DRAIN_INTERVAL
                    } else {
                        (interval * 2).min(IDLE_DRAIN_INTERVAL)
                    };
                }
                self.drain();
            })
    }

    /// What [`wait`] polls: the rings' descriptors, which stay the same while they live.
    fn pollfds(&self) -> Vec<libc::pollfd> {
        self.rings
            .iter()
            .map(|r| libc::pollfd {
                fd: r.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect()
    }

    /// Drains every ring in batches until all are empty, the security ring before each batch
    /// of the others; returns how many records.
    pub fn drain(&mut self) -> usize {
        if let Some(events) = &mut self.events {
            events.resync();
        }
        self.push_family_events();
        let mut total = 0;
        loop {
            let mut full_batches = 0;
            for index in 0..self.rings.len() {
                let taken = self.drain_batch(index);
                total += taken;
                full_batches += usize::from(taken == BATCH);
            }
            if let Some(events) = &mut self.events {
                events.flush(&self.agent.counts.output_dropped);
            }
            if full_batches == 0 {
                return total;
            }
        }
    }

    /// The events families make of no record (taken whether or not a stream is written: taking
    /// them is what publishes them), as the agent's own: once per drain, flushed with its
    /// first batch.
    fn push_family_events(&mut self) {
        for mut family in self.agent.families.lock_all() {
            for event in family.take_events() {
                if let Some(events) = &mut self.events {
                    events.push_own(event);
                }
            }
        }
    }

    /// At most [`BATCH`] records of one ring, with the families locked.
    fn drain_batch(&mut self, index: usize) -> usize {
        let agent = &self.agent;
        let mut locked = agent.families.lock_all();
        let ring = &mut self.rings[index];
        let mut taken = 0;
        while taken < BATCH {
            let Some(item) = ring.next() else { break };
            taken += 1;
            let decoded = dispatch(
                &agent.families,
                &mut locked,
                &agent.counts,
                &item,
                self.events.is_some(),
            );
            if let (Some(events), Some(decoded)) = (self.events.as_mut(), decoded) {
                events.push(&decoded.header, decoded.event);
            }
        }
        taken
    }
}

/// Sleeps until a ring buffer in `fds` has records to read, or `timeout`.
fn wait(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of pollfd for its length. An error (EINTR) only ends the
    // wait early.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
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

#[cfg(test)]
mod tests {
    use observer_common::timers::TimerEvent;
    use proptest::prelude::*;

    use super::*;
    use crate::{
        family::{Context, EventFields},
        plan::KernelView,
        registry,
    };

    /// Every registered family, built with its default flags, or only those `enabled` names.
    fn families(enabled: &[&str]) -> Families {
        let matches = crate::cli::command()
            .try_get_matches_from(["observer"])
            .unwrap();
        let kernel = KernelView::without_kernel();
        let context = Context {
            matches: &matches,
            kernel: &kernel,
            samples: None,
        };
        Families::new(
            registry::FAMILIES
                .iter()
                .filter(|f| enabled.is_empty() || enabled.contains(&f.name))
                .map(|f| (f.name, (f.build)(&context).unwrap()))
                .collect(),
        )
    }

    /// Feeds one record; returns the event's own fields, records received, decode errors.
    fn feed(families: &Families, bytes: &[u8]) -> (Option<EventFields>, u64, u64) {
        let (event, received, errors) = feed_event(families, bytes);
        (event.map(|e| e.fields), received, errors)
    }

    /// [`feed`], with the event's name.
    fn feed_event(families: &Families, bytes: &[u8]) -> (Option<Event>, u64, u64) {
        let counts = RecordCounts::default();
        let mut locked = families.lock_all();
        let line = dispatch(families, &mut locked, &counts, bytes, true).map(|d| d.event);
        let received = counts
            .received
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        (line, received, counts.decode_errors.load(Ordering::Relaxed))
    }

    fn timer_created(id: i32) -> Vec<u8> {
        let event = TimerEvent {
            header: EventHeader {
                kind: EventKind::TimerCreated as u32,
                pid: 7,
                tid: 8,
                comm: *b"churn\0\0\0\0\0\0\0\0\0\0\0",
                ..EventHeader::default()
            },
            timer_id: id,
            detail: 1,
        };
        crate::record::record_bytes(&event)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        /// Any bytes, with any kind number in front, are either taken or counted as a decode
        /// error, exactly one of the two: never a panic.
        #[test]
        fn arbitrary_records_never_panic(kind in 0u32..12, body in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut bytes = kind.to_le_bytes().to_vec();
            bytes.extend(body);
            let (_, received, errors) = feed(&families(&[]), &bytes);
            prop_assert_eq!(received + errors, 1);
        }

        /// A record of a known kind cut anywhere short of its kind's size (inside the header
        /// or after it) is refused and counted.
        #[test]
        fn short_records_are_counted(kind_index in 0usize..EventKind::ALL.len(), cut in 0.0f64..1.0) {
            let families = families(&[]);
            let kind = EventKind::ALL[kind_index];
            let (_, size) = families.route(kind).unwrap();
            let len = ((size as f64 * cut) as usize).max(4).min(size - 1);
            let mut bytes = vec![0u8; len];
            bytes[..4].copy_from_slice(&(kind as u32).to_le_bytes());
            let (line, received, errors) = feed(&families, &bytes);
            prop_assert!(line.is_none());
            prop_assert_eq!((received, errors), (0, 1));
        }
    }

    /// A record of `kind` with every field zero but its header's.
    fn zeroed<T: aya::Pod>(kind: EventKind) -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<T>()];
        bytes[..4].copy_from_slice(&(kind as u32).to_le_bytes());
        bytes
    }

    /// Each family's event types, as the stream writes them, against schemas/events.schema.json:
    /// a field a type adds, renames or drops that the schema does not say fails here.
    #[test]
    fn every_event_type_follows_the_schema() {
        use observer_common::{lockdown::LockdownDecision, modules::ModuleLoad, taint::TaintEvent};

        let schema: serde_json::Value = serde_json::from_str(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../schemas/events.schema.json"
        )))
        .unwrap();
        let validator = jsonschema::draft202012::new(&schema).unwrap();
        let families = families(&[]);
        let mut records = vec![timer_created(42), timer_created(-1)];
        for kind in [
            EventKind::TimerArmed,
            EventKind::TimerDeleted,
            EventKind::TimerOwnerGone,
        ] {
            let mut record = timer_created(7);
            record[..4].copy_from_slice(&(kind as u32).to_le_bytes());
            records.push(record);
        }
        records.push(zeroed::<LockdownDecision>(EventKind::LockdownDecision));
        records.push(zeroed::<ModuleLoad>(EventKind::ModuleLoad));
        records.push(zeroed::<TaintEvent>(EventKind::Taint));
        let mut events: Vec<(EventHeader, Event)> = records
            .iter()
            .map(|bytes| {
                let header = read_record::<EventHeader>(bytes).unwrap();
                (header, feed_event(&families, bytes).0.unwrap())
            })
            .collect();
        let present = crate::modules::present_for_tests();
        events.push((
            EventHeader::default(),
            Event::of("module_present", &present).unwrap(),
        ));
        let names: std::collections::BTreeSet<&str> = events.iter().map(|(_, e)| e.name).collect();
        assert_eq!(
            names.len(),
            8,
            "every event kind the schema lists: {names:?}"
        );
        let dir = std::env::temp_dir().join(format!("observer-schema-{}", std::process::id()));
        let (mut stream, _writer) =
            EventStream::open(crate::events::Output::File(dir.clone()), None).unwrap();
        for (header, event) in events {
            stream.push(&header, event);
        }
        for line in stream.take_lines().lines() {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&event)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{event}: {errors:?}");
        }
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn records_reach_their_family_and_become_events_without_filler() {
        let (fields, received, errors) = feed(&families(&[]), &timer_created(42));
        assert_eq!((received, errors), (1, 0));
        assert_eq!(
            serde_json::Value::Object(fields.unwrap()),
            serde_json::json!({"timer_id": 42, "restore": true})
        );
    }

    #[test]
    fn kinds_of_switched_off_families_and_unknown_kinds_are_decode_errors() {
        let (line, received, errors) = feed(&families(&["lockdown"]), &timer_created(1));
        assert_eq!((line, received, errors), (None, 0, 1));
        let mut unknown = timer_created(1);
        unknown[..4].copy_from_slice(&15u32.to_le_bytes());
        assert_eq!(feed(&families(&[]), &unknown), (None, 0, 1));
    }
}
