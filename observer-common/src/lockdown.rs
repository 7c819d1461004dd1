//! Lockdown decisions: what the lockdown programs count in the kernel and send.

use crate::{EventHeader, Names};

/// The map the agent reads: checks by reason and verdict.
pub const DECISIONS_MAP: &str = "LOCKDOWN_DECISIONS";
/// Console lines of denials (the fallback) whose record was lost, counted in the kernel: the
/// agent's `reason="unknown"`, so that the denials' total holds.
pub const CONSOLE_UNRECORDED_MAP: &str = "LOCKDOWN_CONSOLE_UNRECORDED";

/// Checks made in the agent's own process (the verifier asking whether each of its programs
/// may read kernel memory as it loads): not the host's decisions, counted apart.
pub const OWN_CHECKS_MAP: &str = "LOCKDOWN_OWN_CHECKS";
/// `LOCKDOWN_MODULE_SIGNATURE`'s value in this kernel's `enum lockdown_reason`.
pub const MODULE_SIGNATURE_GLOBAL: &str = "LOCKDOWN_MODULE_SIGNATURE";

pub const NAMES: Names = Names {
    programs: &["lockdown_security_locked_down", "lockdown_console"],
    maps: &[DECISIONS_MAP, CONSOLE_UNRECORDED_MAP, OWN_CHECKS_MAP],
    globals: &[MODULE_SIGNATURE_GLOBAL],
};

/// Reasons are counted per `enum lockdown_reason` value below this; larger values share the last
/// slot (and are reported as `reason="other"`).
pub const REASON_SLOTS: u32 = 64;
/// Size of the `LOCKDOWN_DECISIONS` per-CPU array: one slot per reason and verdict.
pub const DECISION_SLOTS: u32 = REASON_SLOTS * 2;

/// The `LOCKDOWN_DECISIONS` slot of a check of `reason` (`enum lockdown_reason`; larger values
/// share the last reason slot) that was `denied` (0 or 1).
#[inline(always)]
pub const fn decision_slot(reason: u32, denied: u32) -> u32 {
    let reason = if reason >= REASON_SLOTS {
        REASON_SLOTS - 1
    } else {
        reason
    };
    reason * 2 + denied
}

/// The reason and whether it was denied, of a `LOCKDOWN_DECISIONS` slot.
pub const fn decision_of_slot(slot: u32) -> (u32, bool) {
    (slot / 2, slot % 2 == 1)
}

/// A decision seen by fexit on `security_locked_down`; sent for denials only (allowed checks
/// are counted in the kernel).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockdownDecision {
    pub header: EventHeader,
    /// The kernel's `enum lockdown_reason` value.
    pub reason: u32,
    /// 1 when the check returned an error.
    pub denied: u32,
}

/// Bytes of a console line kept: "Lockdown: <comm>: <description> is restricted; ..." fits.
pub const CONSOLE_TEXT_LEN: usize = 128;

/// A `printk:console` line that starts with "Lockdown: " (the fallback: denials only, and the
/// kernel rate-limits these lines).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockdownConsole {
    pub header: EventHeader,
    /// Bytes of `text` filled.
    pub len: u32,
    pub _pad: u32,
    pub text: [u8; CONSOLE_TEXT_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays; any bit pattern is valid.
    unsafe impl aya::Pod for super::LockdownDecision {}
    unsafe impl aya::Pod for super::LockdownConsole {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_slots_round_trip() {
        for reason in 0..REASON_SLOTS {
            for denied in [0, 1] {
                let slot = decision_slot(reason, denied);
                assert!(slot < DECISION_SLOTS);
                assert_eq!(decision_of_slot(slot), (reason, denied == 1));
            }
        }
        assert_eq!(decision_slot(1000, 1), decision_slot(REASON_SLOTS - 1, 1));
    }
}
