//! Facts read from the running kernel at start and at scrape time: BTF (which functions exist,
//! enum values, struct member offsets), tracefs, the taint mask, the lockdown level.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use btf_rs::{Backend, Btf, Type};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const SECURITYFS: &str = "/sys/kernel/security";
const TRACEFS_MAGIC: i64 = 0x7472_6163;
const SECURITYFS_MAGIC: i64 = 0x7363_6673;

/// The running kernel's type information, when it has any.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> anyhow::Result<Self> {
        // Mapped and read on demand where the kernel lets sysfs BTF be mapped (6.16+): far less
        // memory than parsing every type; parsed otherwise.
        let btf = Btf::from_file_with_backend(BTF_PATH, Backend::Mmap)
            .or_else(|_| Btf::from_file(BTF_PATH))
            .with_context(|| {
                format!("reading {BTF_PATH} (a kernel built with CONFIG_DEBUG_INFO_BTF has it)")
            })?;
        Ok(Self { btf })
    }

    /// Type information from raw BTF bytes (one a test wrote).
    #[cfg(test)]
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        Ok(Self {
            btf: Btf::from_bytes(bytes).context("parsing BTF")?,
        })
    }

    /// The parameter types of function `name`, written as C would (`struct load_info *`,
    /// `const void *`, `size_t`, `int`), when the kernel has that function.
    pub fn function_params(&self, name: &str) -> Option<Vec<String>> {
        let types = self.btf.resolve_types_by_name(name).ok()?;
        let func = types.iter().find_map(|t| match t {
            Type::Func(f) => Some(f.clone()),
            _ => None,
        })?;
        let Ok(Type::FuncProto(proto)) = self.btf.resolve_chained_type(&func) else {
            return None;
        };
        Some(
            proto
                .parameters
                .iter()
                .map(|p| match self.btf.resolve_chained_type(p) {
                    Ok(t) => self.type_text(&t, 0),
                    Err(_) => "?".into(),
                })
                .collect(),
        )
    }

    /// A type as C writes it; `depth` bounds the walk through pointers and qualifiers.
    fn type_text(&self, t: &Type, depth: u32) -> String {
        let named = |kind: &str, item: &dyn btf_rs::BtfType| {
            let name = self.btf.resolve_name(item).unwrap_or_default();
            if kind.is_empty() {
                name
            } else {
                format!("{kind} {name}")
            }
        };
        let inner = |item: &dyn btf_rs::BtfType| match self
            .btf
            .resolve_type_by_id(item.get_type_id().unwrap_or(0))
        {
            Ok(next) if depth < 8 => self.type_text(&next, depth + 1),
            _ => "?".into(),
        };
        match t {
            Type::Void => "void".into(),
            Type::Int(i) => named("", i),
            Type::Float(f) => named("", f),
            Type::Typedef(td) => named("", td),
            Type::Struct(st) => named("struct", st),
            Type::Union(u) => named("union", u),
            Type::Enum(e) => named("enum", e),
            Type::Enum64(e) => named("enum", e),
            Type::Fwd(f) => named("struct", f),
            Type::Ptr(p) => format!("{} *", inner(p)),
            Type::Const(c) => format!("const {}", inner(c)),
            Type::Volatile(v) => format!("volatile {}", inner(v)),
            Type::Restrict(r) => inner(r),
            Type::TypeTag(tt) => inner(tt),
            Type::FuncProto(_) => "function".into(),
            _ => "?".into(),
        }
    }

    /// Size in bytes of `member` in `struct <name>` (an array's whole length).
    pub fn member_size(&self, name: &str, member: &str) -> Option<u32> {
        let (_, id) = self.find_member_in(name, member)?;
        let mut t = self.btf.resolve_type_by_id(id).ok()?;
        // Through typedefs and qualifiers to the type that has a size.
        for _ in 0..8 {
            t = match t {
                Type::Typedef(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Const(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Volatile(ref x) => self.btf.resolve_chained_type(x).ok()?,
                _ => break,
            };
        }
        let size = match t {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Enum(e) => e.size(),
            Type::Array(a) => {
                let element = self.btf.resolve_chained_type(&a).ok()?;
                let element_size = match element {
                    Type::Int(i) => i.size(),
                    Type::Ptr(_) => 8,
                    Type::Struct(s) | Type::Union(s) => s.size(),
                    _ => return None,
                };
                a.len() * element_size
            }
            _ => return None,
        };
        u32::try_from(size).ok()
    }

    /// True when the kernel has a (non-inlined) function of that name.
    pub fn has_function(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .is_ok_and(|types| types.iter().any(|t| matches!(t, Type::Func(_))))
    }

    /// The enumerators of `enum <name>`, by value.
    pub fn enum_values(&self, name: &str) -> BTreeMap<u32, String> {
        let mut values = BTreeMap::new();
        for t in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            if let Type::Enum(e) = t {
                for member in &e.members {
                    if let Ok(member_name) = self.btf.resolve_name(member) {
                        values.insert(member.val(), member_name);
                    }
                }
            }
        }
        values
    }

    /// Byte offset of `member` in `struct <name>`, looking through anonymous members.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        self.find_member_in(name, member).map(|(offset, _)| offset)
    }

    /// Byte offset and type id of `member` in `struct <name>`.
    fn find_member_in(&self, name: &str, member: &str) -> Option<(u32, u32)> {
        self.btf
            .resolve_types_by_name(name)
            .ok()?
            .iter()
            .find_map(|t| match t {
                Type::Struct(s) => self.find_member(s, member, 0),
                _ => None,
            })
    }

    fn find_member(&self, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Option<(u32, u32)> {
        use btf_rs::BtfType as _;
        for m in &s.members {
            let bits = base_bits + m.bit_offset();
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == member {
                return Some((bits / 8, m.get_type_id().unwrap_or(0)));
            }
            if name.is_empty()
                && let Ok(Type::Struct(inner) | Type::Union(inner)) =
                    self.btf.resolve_chained_type(m)
                && let Some(found) = self.find_member(&inner, member, bits)
            {
                return Some(found);
            }
        }
        None
    }
}

/// The kernel release (`uname -r`).
pub fn release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

/// A release's major and minor version (`6.1.0-18-amd64`: (6, 1)); `None` unless it starts
/// with both.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(str::parse::<u32>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
        _ => None,
    }
}

/// What uname(2) says of the running kernel, for `observer_kernel_info`.
pub struct Uname {
    /// `uname -r`: 6.1.0-18-amd64.
    pub release: String,
    /// `uname -v`: the build's number and date, #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (...).
    pub version: String,
    /// `uname -m`: x86_64.
    pub machine: String,
}

pub fn uname() -> Uname {
    // SAFETY: a zeroed utsname for the kernel to fill; its fields are NUL-terminated then.
    let names = unsafe {
        let mut names: libc::utsname = std::mem::zeroed();
        (libc::uname(&raw mut names) == 0).then_some(names)
    };
    let field = |chars: &[libc::c_char]| {
        let bytes: Vec<u8> = chars
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    match names {
        Some(n) => Uname {
            release: field(&n.release),
            version: field(&n.version),
            machine: field(&n.machine),
        },
        None => Uname {
            release: "unknown".into(),
            version: "unknown".into(),
            machine: "unknown".into(),
        },
    }
}

fn is_mounted(path: &Path, magic: i64) -> bool {
    fs_magic(path).is_ok_and(|found| found == magic)
}

/// The magic number of the file system `path` is on (statfs(2)'s f_type).
pub fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    // SAFETY: a valid C string and a zeroed statfs buffer for the kernel to fill.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c_path.as_ptr(), &raw mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(st.f_type as i64)
    }
}

fn mount(fstype: &str, target: &Path) -> std::io::Result<()> {
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(std::io::Error::other);
    let (source, target_c, fstype_c) = (
        c(b"nodev")?,
        c(target.as_os_str().as_encoded_bytes())?,
        c(fstype.as_bytes())?,
    );
    // SAFETY: valid C strings; no mount data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where tracefs is, mounting it at /sys/kernel/tracing when absent; why not when it can't be.
pub fn ensure_tracefs() -> Result<PathBuf, String> {
    for path in [TRACEFS, "/sys/kernel/debug/tracing"] {
        if is_mounted(Path::new(path), TRACEFS_MAGIC) {
            return Ok(path.into());
        }
    }
    match mount("tracefs", Path::new(TRACEFS)) {
        Ok(()) => {
            log::info!("mounted tracefs at {TRACEFS}");
            Ok(TRACEFS.into())
        }
        Err(err) => Err(format!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({err}); \
             mount it with `mount -t tracefs nodev {TRACEFS}`"
        )),
    }
}

/// Mounts securityfs (for the lockdown level) when absent; a failure only loses that gauge.
pub fn ensure_securityfs() {
    if !is_mounted(Path::new(SECURITYFS), SECURITYFS_MAGIC)
        && let Err(err) = mount("securityfs", Path::new(SECURITYFS))
    {
        log::warn!(
            "securityfs is not mounted at {SECURITYFS} and mounting it failed ({err}): no lockdown level"
        );
    }
}

/// Whether this kernel can load modules at all (CONFIG_MODULES).
pub fn has_modules() -> Result<(), String> {
    if Path::new("/proc/modules").exists() {
        Ok(())
    } else {
        Err("this kernel has no module support (CONFIG_MODULES unset)".into())
    }
}

/// How many modules this kernel has on disk (lines of modules.dep), if known.
pub fn module_count() -> Option<u64> {
    let path = Path::new("/lib/modules")
        .join(release())
        .join("modules.dep");
    let text = fs::read_to_string(path).ok()?;
    let count = text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    (count > 0).then_some(count)
}

/// True when the tracepoint exists in this kernel.
pub fn has_tracepoint(tracefs: &Path, category: &str, name: &str) -> bool {
    tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("id")
        .exists()
}

/// The current taint mask from /proc/sys/kernel/tainted.
pub fn taint_mask() -> Option<u64> {
    fs::read_to_string("/proc/sys/kernel/tainted")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `kernel.modules_disabled` (absent without module support).
pub fn modules_disabled() -> Option<bool> {
    let text = fs::read_to_string("/proc/sys/kernel/modules_disabled").ok()?;
    Some(text.trim() == "1")
}

/// Letters of the taint bits (include/linux/panic.h); later bits are named `bitN`.
pub const TAINT_FLAGS: [&str; 20] = [
    "P", "F", "S", "R", "M", "B", "U", "D", "A", "W", "C", "I", "O", "E", "L", "K", "X", "T", "N",
    "J",
];

/// What each taint bit means, as include/linux/panic.h names it (`TAINT_*`, lowercased),
/// beside the letter: the label a dashboard can show without a table.
pub const TAINT_NAMES: [&str; 20] = [
    "proprietary_module",
    "forced_module",
    "cpu_out_of_spec",
    "forced_rmmod",
    "machine_check",
    "bad_page",
    "user",
    "die",
    "overridden_acpi_table",
    "warn",
    "crap",
    "firmware_workaround",
    "oot_module",
    "unsigned_module",
    "softlockup",
    "livepatch",
    "aux",
    "randstruct",
    "test",
    "fwctl",
];

/// The name of taint bit `bit` (`bitN` past the known ones).
pub fn taint_name(bit: u32) -> String {
    TAINT_NAMES
        .get(bit as usize)
        .map_or_else(|| format!("bit{bit}"), |&f| f.to_owned())
}

/// The taint flag letter of bit `bit`.
pub fn taint_flag(bit: u32) -> String {
    TAINT_FLAGS
        .get(bit as usize)
        .map_or_else(|| format!("bit{bit}"), |&f| f.to_owned())
}

/// The active lockdown level, from securityfs's "none [integrity] confidentiality".
pub fn lockdown_level() -> Option<String> {
    let text = fs::read_to_string(Path::new(SECURITYFS).join("lockdown")).ok()?;
    parse_lockdown_level(&text)
}

pub fn parse_lockdown_level(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(text[start + 1..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockdown_levels() {
        assert_eq!(
            parse_lockdown_level("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(
            parse_lockdown_level("[none] integrity confidentiality").as_deref(),
            Some("none")
        );
        assert_eq!(parse_lockdown_level("garbage"), None);
    }

    #[test]
    fn taint_flags() {
        assert_eq!(taint_flag(13), "E");
        assert_eq!(taint_flag(12), "O");
        assert_eq!(taint_flag(0), "P");
        assert_eq!(taint_flag(19), "J");
        assert_eq!(taint_flag(20), "bit20");
        assert_eq!(taint_name(13), "unsigned_module");
        assert_eq!(taint_name(12), "oot_module");
        assert_eq!(taint_name(20), "bit20");
        assert_eq!(TAINT_NAMES.len(), TAINT_FLAGS.len());
    }
}
