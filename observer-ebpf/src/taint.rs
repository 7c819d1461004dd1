//! Kernel taint: fentry on `add_taint`. Taints are counted in the kernel by flag and module: one
//! added outside a module load at once (module none), and sent; one added inside a load is kept
//! in the load's record and counted and sent when `load_module` returns (by `modules.rs`), so
//! it can name the module: the module's own name is known only late in the load.

use aya_ebpf::{macros::fentry, programs::FEntryContext};
use observer_common::{
    modules::NAME_LEN,
    taint::{LOAD_TAINT_FLAGS, MODULE_NONE},
};

use crate::{count_taint, loads::current_load, send_taint};

#[fentry(function = "add_taint")]
pub fn taint_add_taint(ctx: FEntryContext) -> u32 {
    let flag: u32 = ctx.arg(0);
    if flag < LOAD_TAINT_FLAGS
        && let Some(load) = current_load()
    {
        load.taints |= 1u64 << flag;
    } else {
        let none = [0; NAME_LEN];
        count_taint(flag, MODULE_NONE, &none);
        send_taint(flag, MODULE_NONE, &none);
    }
    0
}
