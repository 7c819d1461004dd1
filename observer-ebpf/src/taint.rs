//! Kernel taint: fentry on `add_taint`. A taint added outside a module load is sent at once; one
//! added inside a load is kept in the load's record and sent when `load_module` returns (by
//! `modules.rs`), so it can name the module: the module's own name is known only late in the load.

use aya_ebpf::{macros::fentry, programs::FEntryContext};
use observer_common::{modules::NAME_LEN, taint::MODULE_NONE};

use crate::{modules::current_load, send_taint};

#[fentry(function = "add_taint")]
pub fn taint_add_taint(ctx: FEntryContext) -> u32 {
    let flag: u32 = ctx.arg(0);
    if let Some(load) = current_load() {
        load.taints |= 1u64 << (flag & 63);
    } else {
        send_taint(flag, MODULE_NONE, &[0; NAME_LEN]);
    }
    0
}
