//! The kernel's taint: its mask and what each bit's letter and name are, shared by the taint
//! family and the module inventory.

use std::fs;

/// The current taint mask from /proc/sys/kernel/tainted.
pub fn taint_mask() -> Option<u64> {
    fs::read_to_string("/proc/sys/kernel/tainted")
        .ok()?
        .trim()
        .parse()
        .ok()
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

#[cfg(test)]
mod tests {
    use super::*;

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
