//! Keeping the security collectors watching while no agent runs (`--pin`). Their programs,
//! links, maps and ring buffer are pinned in bpffs, under one directory per build and security
//! configuration (`<pin.path>/<version, dots as _>-<hash>/{links,programs,maps}/`); the kernel keeps a
//! pinned link attached and a pinned map alive after the process that made them exits. An agent
//! that finds its own build's directory adopts it: it loads none of those programs again, reads
//! the pinned maps (the counters go on) and drains the pinned ring (what was recorded while no
//! agent ran). Another build's directory is replaced: ours attach first, then the old pins go.
//!
//! Only whole directories count: pins are made under `<build>-partial` and renamed into place
//! once complete, so an agent killed while pinning leaves nothing another would adopt.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData},
    programs::{
        FEntry, FExit, ProgramFd, ProgramInfo, RawTracePoint, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use observer_common::{AGENT_MAP, agent_slot};

use crate::plan::{Attached, LinkId};

const LINKS: &str = "links";
const PROGRAMS: &str = "programs";
const MAPS: &str = "maps";
/// bpffs refuses names with dots ("reserved for future use"): none here.
const PARTIAL: &str = "-partial";

/// The directory name of this build with these security settings: the version, then a hash of
/// the eBPF object and of every setting the pinned programs were loaded with. A different
/// binary or configuration makes a different name, which replaces the pins instead of
/// adopting programs it did not configure.
pub fn build_name(parts: &[&[u8]]) -> String {
    // FNV-1a, 64-bit: stable across Rust releases (std's hashers are not), no dependency.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!(
        "{}-{hash:016x}",
        env!("CARGO_PKG_VERSION").replace('.', "_")
    )
}

/// What this start does with the pins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No `--pin`: nothing is pinned, and pins found are left alone (another agent may be
    /// running with them; `observer unpin` removes them).
    Off,
    /// `--pin`, nothing of this build pinned: ours are pinned once attached.
    Fresh,
    /// `--pin`, this build's pins found: adopted, none of their programs loaded again.
    Adopt,
}

/// The pins under `--pin.path`, and what this start does with them.
#[derive(Debug)]
pub struct Pins {
    root: PathBuf,
    build: String,
    pub mode: Mode,
    /// Directories to remove once ours are attached: other builds' (with `--pin`).
    stale: Vec<PathBuf>,
    /// Directories found and left alone (without `--pin`).
    pub left: Vec<PathBuf>,
}

/// What removing an earlier agent's pins found.
#[derive(Debug)]
pub struct Removed {
    pub build: String,
    /// How long before now no agent had read that build's counts, when it said.
    pub unread_for: Option<Duration>,
}

impl Pins {
    /// Looks under `root` for pins (an absent directory has none); removes half-made ones.
    pub fn find(root: &Path, pin: bool, build: String) -> anyhow::Result<Self> {
        let mut found = Vec::new();
        match fs::read_dir(root) {
            Ok(entries) => {
                for entry in entries {
                    let path = entry?.path();
                    if path.to_string_lossy().ends_with(PARTIAL) {
                        log::warn!(
                            "pins: removing {}, left by an agent that stopped while pinning",
                            path.display()
                        );
                        remove(&path)?;
                    } else if path.is_dir() {
                        found.push(path);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("reading {}", root.display())),
        }
        let ours = root.join(&build);
        let mode = match (pin, found.contains(&ours)) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Adopt,
            (true, false) => Mode::Fresh,
        };
        let (stale, left) = match mode {
            Mode::Off => (Vec::new(), found),
            Mode::Fresh => (found, Vec::new()),
            Mode::Adopt => (
                found.into_iter().filter(|dir| *dir != ours).collect(),
                Vec::new(),
            ),
        };
        Ok(Self {
            root: root.to_owned(),
            build,
            mode,
            stale,
            left,
        })
    }

    /// Pins left alone entirely (a start that is not the agent's: `observer profile`).
    pub fn untouched() -> Self {
        Self {
            root: PathBuf::new(),
            build: String::new(),
            mode: Mode::Off,
            stale: Vec::new(),
            left: Vec::new(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.build)
    }

    pub fn adopting(&self) -> bool {
        self.mode == Mode::Adopt
    }

    /// One of the adopted build's maps.
    pub fn map(&self, name: &str) -> anyhow::Result<Map> {
        let path = self.dir().join(MAPS).join(name);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
    }

    /// Whether `program` of the adopted build has a pinned link (it is attached).
    pub fn linked(&self, program: &str) -> bool {
        self.dir().join(LINKS).join(program).exists()
    }

    /// The adopted build's programs, by name, for their statistics.
    pub fn programs(&self) -> Vec<(String, ProgramFd)> {
        let Ok(entries) = fs::read_dir(self.dir().join(PROGRAMS)) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let fd = ProgramInfo::from_pin(entry.path()).ok()?.fd().ok()?;
                Some((entry.file_name().to_string_lossy().into_owned(), fd))
            })
            .collect()
    }

    /// Why the kept programs' links cannot be pinned on this kernel, if they cannot.
    pub fn unpinnable(links: &[&Attached]) -> Option<String> {
        let perf = links
            .iter()
            .find(|a| matches!(a.link, LinkId::Tracepoint(_)))?;
        (!aya::features().bpf_perf_link()).then(|| {
            format!(
                "{} attaches to its tracepoint by a perf event on this kernel (BPF perf links \
                 are 5.15+), which bpffs cannot hold",
                perf.program
            )
        })
    }

    fn partial(&self) -> PathBuf {
        self.root.join(format!("{}{PARTIAL}", self.build))
    }

    /// Makes the directories [`Self::pin`] fills: before any link is taken out of its program,
    /// so that a bpffs that cannot be written (not mounted, read-only in a sandbox) costs the
    /// pinning only, never a hook.
    fn prepare(&self) -> anyhow::Result<()> {
        let partial = self.partial();
        for sub in [LINKS, PROGRAMS, MAPS] {
            fs::create_dir_all(partial.join(sub))
                .with_context(|| format!("creating {}/{sub}", partial.display()))?;
        }
        Ok(())
    }

    /// Pins the kept programs, their links and `maps` of the loaded object under this build's
    /// directory; returns how many objects were pinned.
    pub fn pin(
        &self,
        ebpf: &mut Ebpf,
        links: Vec<Attached>,
        maps: &[&str],
    ) -> anyhow::Result<usize> {
        let partial = self.partial();
        let mut pinned = 0;
        for name in maps {
            let map = ebpf
                .map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))?;
            map.pin(partial.join(MAPS).join(name))
                .with_context(|| format!("pinning map {name}"))?;
            pinned += 1;
        }
        for attached in links {
            let program = attached.program;
            let link =
                take_link(ebpf, attached).with_context(|| format!("the link of {program}"))?;
            // The pin keeps the link (and through it the program) attached; our descriptor
            // closes with the returned handle.
            let _: PinnedLink = link
                .pin(partial.join(LINKS).join(program))
                .with_context(|| format!("pinning the link of {program}"))?;
            if let Some(loaded) = ebpf.program_mut(program) {
                loaded
                    .pin(partial.join(PROGRAMS).join(program))
                    .with_context(|| format!("pinning program {program}"))?;
            }
            pinned += 2;
        }
        fs::rename(&partial, self.dir())
            .with_context(|| format!("renaming {} into place", partial.display()))?;
        Ok(pinned)
    }

    /// Removes the directories this start replaces (once ours attached), saying what each
    /// build left unread.
    pub fn remove_stale(&self) -> Vec<Removed> {
        let mut removed = Vec::new();
        for dir in &self.stale {
            let unread_for = read_slot(dir, agent_slot::LAST_READ_NS)
                .filter(|ns| *ns > 0)
                .and_then(since_unix_ns);
            match remove(dir) {
                Ok(()) => removed.push(Removed {
                    build: dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    unread_for,
                }),
                Err(err) => log::warn!("pins: removing {}: {err:#}", dir.display()),
            }
        }
        removed
    }

    /// Pins the kept programs (`--pin`, nothing of this build pinned), says what was adopted, and
    /// removes the pins this start replaces: each step one log line.
    pub fn keep(
        &self,
        ebpf: &mut Ebpf,
        links: Vec<Attached>,
        maps: &[&'static str],
        any_kept: bool,
    ) -> anyhow::Result<PinStatus> {
        let dir = self.dir();
        let mut status = PinStatus::default();
        match self.mode {
            Mode::Off => {
                for dir in &self.left {
                    log::warn!(
                        "pins: security programs pinned under {} (by an agent run with --pin) go on \
                         watching beside this agent; `observer unpin` removes them",
                        dir.display()
                    );
                }
            }
            Mode::Fresh if !any_kept => {
                log::warn!("pins: --pin with every security collector off: nothing to pin");
            }
            Mode::Fresh => {
                let refs: Vec<&Attached> = links.iter().collect();
                let why = Self::unpinnable(&refs).or_else(|| {
                    self.prepare().err().map(|err| {
                        let _ = remove(&self.partial());
                        format!("{err:#}")
                    })
                });
                if let Some(why) = why {
                    log::warn!(
                        "pins: not pinned: {why}; the security collectors stop with the agent"
                    );
                } else {
                    let count = self
                        .pin(ebpf, links, maps)
                        .with_context(|| format!("pinning under {} (--pin)", dir.display()))?;
                    log::info!(
                        "pins: pinned {count} objects under {}: the security collectors keep watching \
                         while no agent runs; `observer unpin` removes them",
                        dir.display()
                    );
                    status.pinned = true;
                }
            }
            Mode::Adopt => {
                let unread = self
                    .adopted_unread_for()
                    .map_or_else(|| "unknown".into(), |d| format!("{:.1} s", d.as_secs_f64()));
                log::info!(
                    "pins: adopted the security programs pinned under {}: their counts go on, and \
                     what they recorded while no agent read them ({unread}) is read now",
                    dir.display()
                );
                status.pinned = true;
                status.adopted = true;
            }
        }
        for removed in self.remove_stale() {
            let unread = removed.unread_for.map(|d| d.as_secs_f64());
            log::warn!(
                "pins: replaced the security programs of build {}: their counts since an agent last \
                 read them ({}) are not carried over; this build's counters start at zero",
                removed.build,
                unread.map_or_else(|| "unknown".into(), |s| format!("{s:.1} s ago"))
            );
            status.unwatched_seconds = status.unwatched_seconds.max(unread.unwrap_or(0.0));
        }
        Ok(status)
    }

    /// How long before now no agent had read the adopted build's counts.
    pub fn adopted_unread_for(&self) -> Option<Duration> {
        read_slot(&self.dir(), agent_slot::LAST_READ_NS)
            .filter(|ns| *ns > 0)
            .and_then(since_unix_ns)
    }
}

/// What `--pin` did at start, and the agent map the kept programs read.
#[derive(Default)]
pub struct PinStatus {
    /// The security programs are pinned: they keep watching when this agent stops.
    pub pinned: bool,
    /// This agent adopted them from an earlier one.
    pub adopted: bool,
    /// How long the counts of the pinned programs this start replaced had gone unread.
    pub unwatched_seconds: f64,
    agent_map: Option<Mutex<Array<MapData, u64>>>,
    /// When the rings were last drained, as written to the agent map (Unix seconds).
    last_read_s: AtomicU64,
}

impl PinStatus {
    pub fn with_map(mut self, map: Array<MapData, u64>) -> Self {
        self.agent_map = Some(Mutex::new(map));
        self
    }

    /// Notes in the agent map, at most once a second, that the rings were just drained: the
    /// next agent tells from it how long the pinned programs' counts went unread.
    pub fn drained(&self) {
        let now = SystemTime::now();
        let seconds = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.last_read_s.swap(seconds, Ordering::Relaxed) == seconds {
            return;
        }
        if let Some(map) = &self.agent_map
            && let Err(err) = map.lock().unwrap_or_else(PoisonError::into_inner).set(
                agent_slot::LAST_READ_NS,
                unix_ns(now),
                0,
            )
        {
            log::debug!("writing the agent map: {err}");
        }
    }
}

/// The agent map's `slot` in a pinned build directory (any build: its layout is stable).
fn read_slot(dir: &Path, slot: u32) -> Option<u64> {
    let data = MapData::from_pin(dir.join(MAPS).join(AGENT_MAP)).ok()?;
    let array: Array<MapData, u64> = Array::try_from(Map::from_map_data(data).ok()?).ok()?;
    array.get(&slot, 0).ok()
}

pub fn unix_ns(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn since_unix_ns(ns: u64) -> Option<Duration> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH + Duration::from_nanos(ns))
        .ok()
}

fn take_link(ebpf: &mut Ebpf, attached: Attached) -> anyhow::Result<FdLink> {
    let program = ebpf
        .program_mut(attached.program)
        .context("no such program")?;
    Ok(match attached.link {
        LinkId::FEntry(id) => <&mut FEntry>::try_from(program)?.take_link(id)?.into(),
        LinkId::FExit(id) => <&mut FExit>::try_from(program)?.take_link(id)?.into(),
        LinkId::RawTracepoint(id) => <&mut RawTracePoint>::try_from(program)?
            .take_link(id)?
            .into(),
        LinkId::Tracepoint(id) => {
            FdLink::try_from(<&mut TracePoint>::try_from(program)?.take_link(id)?)?
        }
    })
}

/// Removes a pin directory: each pinned object goes with its file (a link detaches when its
/// last reference does).
fn remove(dir: &Path) -> anyhow::Result<()> {
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The pinned build directories under `root`, with how many programs each holds.
pub fn list(root: &Path) -> Vec<(PathBuf, usize)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut dirs: Vec<(PathBuf, usize)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .map(|dir| {
            let programs = fs::read_dir(dir.join(PROGRAMS)).map_or(0, Iterator::count);
            (dir, programs)
        })
        .collect();
    dirs.sort();
    dirs
}

/// `observer unpin`: removes everything pinned under `root` (the programs stop watching).
pub fn unpin(root: &Path) -> anyhow::Result<String> {
    let dirs = list(root);
    if dirs.is_empty() && !root.exists() {
        return Ok(format!("nothing pinned under {}\n", root.display()));
    }
    let mut out = String::new();
    for (dir, programs) in &dirs {
        remove(dir)?;
        out += &format!("removed {} ({programs} programs)\n", dir.display());
    }
    match fs::remove_dir(root) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => bail!("removing {}: {err}", root.display()),
    }
    if dirs.is_empty() {
        out += &format!("nothing pinned under {}\n", root.display());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_name_changes_with_any_part() {
        let a = build_name(&[b"object", b"settings"]);
        let version = env!("CARGO_PKG_VERSION").replace('.', "_");
        assert!(a.starts_with(&format!("{version}-")));
        assert!(!a.contains('.'), "bpffs refuses dots in names");
        assert_eq!(a.len(), version.len() + 17);
        assert_eq!(a, build_name(&[b"object", b"settings"]));
        assert_ne!(a, build_name(&[b"object", b"setting"]));
        // Parts are delimited: moving a byte from one to the next is a different name.
        assert_ne!(a, build_name(&[b"objects", b"ettings"]));
    }

    #[test]
    fn the_mode_follows_the_flag_and_what_is_pinned() {
        let root = std::env::temp_dir().join(format!("observer-pins-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let none = Pins::find(&root, true, "b1".into()).unwrap();
        assert_eq!((none.mode, none.stale.len()), (Mode::Fresh, 0));
        for dir in ["b1", "b0", "b1-partial"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let adopt = Pins::find(&root, true, "b1".into()).unwrap();
        assert_eq!(adopt.mode, Mode::Adopt);
        assert_eq!(adopt.stale, [root.join("b0")]);
        assert!(!root.join("b1-partial").exists(), "half-made pins removed");
        let other = Pins::find(&root, true, "b2".into()).unwrap();
        assert_eq!((other.mode, other.stale.len()), (Mode::Fresh, 2));
        let off = Pins::find(&root, false, "b1".into()).unwrap();
        assert_eq!(
            (off.mode, off.stale.len(), off.left.len()),
            (Mode::Off, 0, 2)
        );
        assert!(off.remove_stale().is_empty(), "without --pin, left alone");
        assert_eq!(other.remove_stale().len(), 2);
        assert!(list(&root).is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}
