//! Kernel taint: fentry on `add_taint`. A taint added outside a module load is sent at once; one
//! added inside a load is kept in the load's record and sent when `load_module` returns, so it
//! can name the module (the module's own name is known only late in the load).

use aya_ebpf::{macros::fentry, programs::FEntryContext};
use observer_common::{
    EventKind,
    modules::{ModuleLoad, NAME_LEN, SEEN_FILE, SEEN_NAME},
    taint::{MODULE_FROM_FILE, MODULE_FROM_NAME, MODULE_NONE, TaintEvent},
};

use crate::{emit, header, modules::current_load};

#[fentry(function = "add_taint")]
pub fn taint_add_taint(ctx: FEntryContext) -> u32 {
    let flag: u32 = ctx.arg(0);
    if let Some(load) = current_load() {
        load.taints |= 1u64 << (flag & 63);
    } else {
        send(flag, MODULE_NONE, &[0; NAME_LEN]);
    }
    0
}

/// Sends the taints a load added, each with the load's module name. Called at `load_module`'s
/// exit, by the thread that loaded.
#[inline(always)]
pub fn emit_load_taints(load: &ModuleLoad) {
    let (source, module) = if load.seen & SEEN_NAME != 0 {
        (MODULE_FROM_NAME, &load.name)
    } else if load.seen & SEEN_FILE != 0 {
        (MODULE_FROM_FILE, &load.file)
    } else {
        (MODULE_NONE, &load.name)
    };
    let mut bits = load.taints;
    // One iteration per set bit; the bound is for the verifier.
    for _ in 0..64 {
        if bits == 0 {
            break;
        }
        let flag = bits.trailing_zeros();
        send(flag, source, module);
        bits &= bits - 1;
    }
}

#[inline(always)]
fn send(flag: u32, module_source: u32, module: &[u8; NAME_LEN]) {
    emit(
        EventKind::Taint,
        TaintEvent {
            header: header(EventKind::Taint),
            flag,
            module_source,
            module: *module,
        },
    );
}
