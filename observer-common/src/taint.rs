//! Kernel taint: one record per taint bit the kernel adds while watched.

use crate::{EventHeader, Names, modules::NAME_LEN};

/// Taints by flag and module ([`TaintKey`]), counted in the kernel.
pub const EVENTS_MAP: &str = "TAINT_EVENTS";
/// Taints [`EVENTS_MAP`] had no room for, by flag: the agent's `module="other"`.
pub const UNATTRIBUTED_MAP: &str = "TAINT_UNATTRIBUTED";
/// Bits counted in [`UNATTRIBUTED_MAP`].
pub const FLAG_SLOTS: u32 = 64;
/// The flags a load keeps to name its module when it ends (every kernel's flags so far, 0-19,
/// and room for more): a higher flag is counted when the kernel adds it, without the module.
/// Each flag the bound allows is an iteration the verifier walks in every program that ends
/// a load.
pub const LOAD_TAINT_FLAGS: u32 = 32;
/// Entries of [`EVENTS_MAP`]: the agent gives 512 module names their own series.
pub const EVENT_KEYS: u32 = 1024;

pub const NAMES: Names = Names {
    programs: &["taint_add_taint"],
    maps: &[EVENTS_MAP, UNATTRIBUTED_MAP],
    globals: &[],
};

/// The key of a taint counted by module: the flag and the module's name where a load added it
/// (zeros and [`MODULE_NONE`] outside a load).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaintKey {
    pub flag: u32,
    pub module_source: u32,
    pub module: [u8; NAME_LEN],
}

/// Where [`TaintEvent::module`] comes from.
pub const MODULE_NONE: u32 = 0;
/// The name the module gave itself (`module:module_load`).
pub const MODULE_FROM_NAME: u32 = 1;
/// The file `finit_module` read: the name is its stem.
pub const MODULE_FROM_FILE: u32 = 2;

/// A taint the kernel added. Taints added inside a module load are sent when the load ends, so
/// they carry the module's name even when the name is known only late in the load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaintEvent {
    pub header: EventHeader,
    /// The kernel's taint bit (`TAINT_*`).
    pub flag: u32,
    /// `MODULE_NONE`, `MODULE_FROM_NAME` or `MODULE_FROM_FILE`.
    pub module_source: u32,
    pub module: [u8; NAME_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays; any bit pattern is valid.
    unsafe impl aya::Pod for super::TaintEvent {}
    unsafe impl aya::Pod for super::TaintKey {}
}
