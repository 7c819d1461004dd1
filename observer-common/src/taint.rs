//! Kernel taint: one record per taint bit the kernel adds while watched.

use crate::{EventHeader, Names, modules::NAME_LEN};

pub const NAMES: Names = Names {
    programs: &["taint_add_taint"],
    maps: &[],
    globals: &[],
};

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
// SAFETY: plain `#[repr(C)]` integers and arrays; any bit pattern is valid.
unsafe impl aya::Pod for TaintEvent {}
