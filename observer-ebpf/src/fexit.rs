//! What an fexit program's function returned: the context slot after its arguments, where
//! every kernel with trampolines stores it, read like an argument. Not `bpf_get_func_ret`
//! (aya's `FExitContext::ret`): 5.17 added that helper, and a program calling it is refused
//! at load by older kernels (EINVAL after the verifier passed, on 5.10), which would leave
//! every module load uncounted there. Where a function's number of arguments changed between
//! kernels, each count has a program of its own (a slot chosen at run time is a modified
//! context pointer, which the verifier refuses), and the agent attaches the one BTF fits.

use aya_ebpf::programs::FExitContext;

/// The return value of a function taking `ARGS` arguments.
#[inline(always)]
pub fn ret<const ARGS: usize>(ctx: &FExitContext) -> i64 {
    ctx.arg(ARGS)
}
