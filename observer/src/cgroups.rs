//! Names a task's cgroup (v2) from the ID its records carry: the path under the cgroup2 mount
//! (`/kubepods.slice/...`), and the container ID where a runtime's naming shows one.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Paths kept; a fleet node has hundreds of cgroups, not tens of thousands.
const MAX_CACHED: usize = 16_384;
/// Directories read in one scan at most: a bound on the time a scan can take.
const MAX_SCANNED: usize = 65_536;
/// A miss for an ID at or below the highest one seen (a cgroup already gone, or unreadable)
/// rescans the hierarchy at most this often: a storm of its events must not become a storm of
/// scans. An ID above every one seen is a cgroup made since the last scan (kernfs hands out
/// IDs in increasing order) and is looked for at once: each new cgroup costs one scan.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// How long an ID that a scan did not find stays unknown before it is looked for again: a
/// cgroup the agent cannot see (another cgroup namespace, a hierarchy not mounted here) would
/// otherwise cost a full scan per event, and short-lived scopes make that a storm.
const UNKNOWN_FOR: Duration = Duration::from_secs(30);

/// statfs(2)'s f_type for cgroup2 (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// The root cgroup's ID, which is its directory's inode number (kernfs numbers from 1).
const ROOT_CGROUP_ID: u64 = 1;

/// Every cgroup v2 mount point in a mount table, in its order: `/sys/fs/cgroup` on unified
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones, and any other view mounted into this
/// namespace (a container's host hierarchy, `/host/sys/fs/cgroup`).
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next() == Some("cgroup2"))
                .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .collect()
}

/// The mount to name cgroups from: the first that shows the whole hierarchy, else the first.
/// In a container with a cgroup namespace of its own, its /sys/fs/cgroup shows only its own
/// cgroups, and every other container's would stay unnamed; the host's hierarchy mounted into
/// it (as the DaemonSet mounts it) shows them all, wherever it is mounted.
pub fn pick_mount(mounts: Vec<PathBuf>, whole: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    match mounts.iter().position(|m| whole(m)) {
        Some(index) => mounts.into_iter().nth(index),
        None => mounts.into_iter().next(),
    }
}

/// Whether a cgroup2 directory is the hierarchy's root (not a namespace's or a bind mount's
/// part of it).
fn shows_whole_hierarchy(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.ino() == ROOT_CGROUP_ID)
}

/// `--cgroup.root`: a directory of a cgroup2 file system.
pub fn parse_root(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    match crate::kernel::fs_magic(&path) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(path),
        Ok(magic) => Err(format!(
            "{text} is not a cgroup2 mount (its file system's magic is {magic:#x}, cgroup2's \
             {CGROUP2_SUPER_MAGIC:#x}); give a directory a cgroup2 hierarchy is mounted on (the \
             cgroup2 lines of /proc/self/mountinfo name them)"
        )),
        Err(err) => Err(format!("{text}: {err}")),
    }
}

/// The container ID a runtime's cgroup naming shows: systemd scopes (`docker-<id>.scope`,
/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`) and cgroupfs paths
/// (`/docker/<id>`, `/kubepods/.../<id>`), with a 64-hex-digit ID.
pub fn container_id(path: &str) -> Option<&str> {
    const PREFIXES: [&str; 5] = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ];
    path.rsplit('/').find_map(|component| {
        let name = component.strip_suffix(".scope").unwrap_or(component);
        let id = PREFIXES
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    })
}

/// Cgroup IDs to paths, from scans of the hierarchy (the ID is the directory's inode number).
pub struct CgroupNames {
    root: Option<PathBuf>,
    /// Look for the mount again at each scan while it is missing (it may be mounted later).
    discover: bool,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
    /// The highest ID the last scan found.
    highest: u64,
    /// IDs a scan did not find, and when (at most [`MAX_CACHED`]).
    unknown: HashMap<u64, Instant>,
    /// Scans made (for the tests).
    scans: u64,
}

impl CgroupNames {
    /// Names from `root` (`--cgroup.root`), or from the mount table's cgroup2 mounts.
    pub fn new(root: Option<PathBuf>) -> Self {
        if let Some(root) = root {
            if !shows_whole_hierarchy(&root) {
                log::warn!(
                    "--cgroup.root {}: a cgroup below the hierarchy's root; paths are relative \
                     to it, and tasks outside it name no cgroup",
                    root.display()
                );
            }
            return Self::at(Some(root));
        }
        let mut names = Self::at(mounted());
        if names.root.is_none() {
            log::warn!("no cgroup2 mount yet: events name no cgroup until one appears");
        }
        names.discover = true;
        names
    }

    pub fn at(root: Option<PathBuf>) -> Self {
        Self {
            root,
            discover: false,
            paths: HashMap::new(),
            last_scan: None,
            highest: 0,
            unknown: HashMap::new(),
            scans: 0,
        }
    }

    /// The cgroup's path under the hierarchy's root (`/` for the root), if it can be found.
    pub fn path(&mut self, id: u64) -> Option<&str> {
        let known_unknown = self
            .unknown
            .get(&id)
            .is_some_and(|since| since.elapsed() < UNKNOWN_FOR);
        if !self.paths.contains_key(&id) && !known_unknown {
            self.rescan(id > self.highest);
            // Remembered only after a scan of a hierarchy: without one (not mounted yet), the
            // miss says nothing about the ID.
            if !self.paths.contains_key(&id) && self.root.is_some() {
                if self.unknown.len() >= MAX_CACHED {
                    self.unknown.clear();
                }
                self.unknown.insert(id, Instant::now());
            }
        }
        self.paths.get(&id).map(String::as_str)
    }

    fn rescan(&mut self, newer_than_seen: bool) {
        if !newer_than_seen
            && self
                .last_scan
                .is_some_and(|last| last.elapsed() < RESCAN_INTERVAL)
        {
            return;
        }
        self.last_scan = Some(Instant::now());
        self.scans += 1;
        if self.root.is_none() && self.discover {
            self.root = mounted();
        }
        let Some(root) = self.root.clone() else {
            return;
        };
        // Paths of cgroups that are gone drop out; their IDs are never reused.
        self.paths.clear();
        let mut pending = vec![root.clone()];
        let mut scanned = 0;
        while let Some(dir) = pending.pop() {
            scanned += 1;
            if scanned > MAX_SCANNED || self.paths.len() >= MAX_CACHED {
                log::debug!("cgroup scan stopped at {scanned} directories");
                break;
            }
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            self.highest = self.highest.max(meta.ino());
            self.paths.insert(meta.ino(), relative(&root, &dir));
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
    }
}

fn mounted() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    pick_mount(cgroup2_mounts(&text), shows_whole_hierarchy)
}

fn relative(root: &Path, dir: &Path) -> String {
    let rest = dir.strip_prefix(root).unwrap_or(dir);
    format!("/{}", rest.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_unified_and_hybrid_hosts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mounts(hybrid),
            [PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let unified = "30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mounts(unified), [PathBuf::from("/sys/fs/cgroup")]);
        assert!(cgroup2_mounts("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n").is_empty());
    }

    #[test]
    fn the_mount_showing_the_whole_hierarchy_is_preferred() {
        // A pod with its own cgroup namespace, and the host's hierarchy mounted at
        // /host/sys/fs/cgroup: the second is the whole hierarchy.
        let pod = "700 690 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup ro\n\
                   710 690 0:26 /../../.. /host/sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        let mounts = cgroup2_mounts(pod);
        let host = PathBuf::from("/host/sys/fs/cgroup");
        assert_eq!(
            pick_mount(mounts.clone(), |m| m == host),
            Some(host.clone())
        );
        // Where none shows it all, the first.
        assert_eq!(
            pick_mount(mounts, |_| false),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(pick_mount(Vec::new(), |_| true), None);
    }

    #[test]
    fn a_cgroup_root_must_be_a_cgroup2_directory() {
        let err = parse_root("/proc").unwrap_err();
        assert!(
            err.starts_with("/proc is not a cgroup2 mount (its file system's magic is 0x9fa0,"),
            "{err}"
        );
        let err = parse_root("/nonexistent/cgroup").unwrap_err();
        assert_eq!(
            err,
            "/nonexistent/cgroup: No such file or directory (os error 2)"
        );
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
        for mount in cgroup2_mounts(&text) {
            assert_eq!(parse_root(mount.to_str().unwrap()), Ok(mount));
        }
    }

    #[test]
    fn container_ids_from_runtime_naming() {
        let id = "4f1b8c3e9a2d7f6e5b4a39281706f5e4d3c2b1a0998877665544332211aabbcc";
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope"
            ),
            format!("/system.slice/docker-{id}.scope"),
            format!("/kubepods.slice/kubepods-pod2.slice/crio-{id}.scope"),
            format!("/machine.slice/libpod-{id}.scope"),
            format!("/docker/{id}"),
            format!("/kubepods/burstable/pod3/{id}"),
        ] {
            assert_eq!(container_id(&path), Some(id), "{path}");
        }
        assert_eq!(container_id("/system.slice/observer.service"), None);
        assert_eq!(
            container_id("/user.slice/user-0.slice/session-3.scope"),
            None
        );
        assert_eq!(container_id("/"), None);
    }

    #[test]
    fn paths_come_from_a_scan_of_the_hierarchy() {
        let root = std::env::temp_dir().join(format!("observer-cgroups-{}", std::process::id()));
        let child = root.join("a.slice/b.scope");
        fs::create_dir_all(&child).unwrap();
        let id = fs::metadata(&child).unwrap().ino();
        let mut names = CgroupNames::at(Some(root.clone()));
        assert_eq!(names.path(id), Some("/a.slice/b.scope"));
        let root_id = fs::metadata(&root).unwrap().ino();
        assert_eq!(names.path(root_id), Some("/"));
        // Within the rescan interval, a miss above the highest ID seen (a new cgroup, in
        // kernfs's increasing order) scans again; one at or below it does not.
        let (newer, older) = (root.join("c.scope"), root.join("d.scope"));
        fs::create_dir(&newer).unwrap();
        fs::create_dir(&older).unwrap();
        let (newer_id, older_id) = (
            fs::metadata(&newer).unwrap().ino(),
            fs::metadata(&older).unwrap().ino(),
        );
        names.highest = older_id.max(newer_id + 1);
        assert_eq!(names.path(older_id), None);
        names.highest = newer_id - 1;
        assert_eq!(names.path(newer_id), Some("/c.scope"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_id_no_scan_finds_is_not_looked_for_at_every_event() {
        let root = std::env::temp_dir().join(format!("observer-unseen-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        let mut names = CgroupNames::at(Some(root.clone()));
        // An ID above every one the hierarchy has (a cgroup of another namespace).
        let unseen = u64::MAX - 1;
        assert_eq!(names.path(unseen), None);
        let scans = names.scans;
        for _ in 0..1000 {
            assert_eq!(names.path(unseen), None);
        }
        assert_eq!(
            names.scans, scans,
            "one scan for the unseen ID, not one per event"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
