//! Who signed a module and what its signature check hashed: the trusted key the check's lookup
//! found (`find_asymmetric_key`'s result), the identifier the signature names its key by (also
//! when no trusted key matches), and the digest `pkcs7_digest` computed; each load whose
//! signature verified is counted by that key's serial.
//!
//! The key's serial is a plain load through the BTF-typed result, so the signer is known under
//! `lockdown=confidentiality` too. The identifier and the digest lie behind byte pointers, which
//! only `bpf_probe_read_kernel` follows: those two programs are separate, so that a kernel
//! refusing them (confidentiality) loses only them.

use aya_ebpf::{
    Global,
    helpers::generated::{bpf_probe_read_kernel, bpf_probe_read_kernel_str},
    macros::{fexit, map},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::FExitContext,
};
use observer_common::{
    TrackedMap,
    modules::{
        DIGEST_LEN, HASH_ALGO_LEN, KEY_ID_LEN, ModuleLoad, REASON_VERIFIED, SEEN_DIGEST,
        SEEN_KEY_FOUND, SEEN_KEY_ID, SIGNER_KEYS,
    },
};

use super::current_load;
use crate::{count_by_key, increment, map_full};

/// `key.serial`, from BTF (0: unknown).
#[unsafe(no_mangle)]
static KEY_SERIAL_OFFSET: Global<u32> = Global::new(0);
/// `pkcs7_signed_info.sig`, and in `public_key_signature`: `digest`, `digest_size`,
/// `hash_algo` (0: unknown).
#[unsafe(no_mangle)]
static SINFO_SIG_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIG_DIGEST_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIG_DIGEST_SIZE_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIG_HASH_ALGO_OFFSET: Global<u32> = Global::new(0);
/// `asymmetric_key_id.data` (after its `unsigned short len`), from BTF (0: unknown).
#[unsafe(no_mangle)]
static KEY_ID_DATA_OFFSET: Global<u32> = Global::new(0);

/// Verified loads by the serial of the key that verified them: the first [`SIGNER_KEYS`] keys
/// seen keep their own entry (a fleet trusts a handful), later ones go to
/// [`MODULE_SIGNERS_OTHER`], so every count only grows.
#[map]
static MODULE_SIGNERS: PerCpuHashMap<i32, u64> = PerCpuHashMap::with_max_entries(SIGNER_KEYS, 0);
#[map]
static MODULE_SIGNERS_OTHER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Pointers at or above this are `ERR_PTR` values.
const MAX_ERRNO: usize = 4095;

/// Counts a load whose signature verified by the key that verified it (at `load_module`'s exit).
#[inline(always)]
pub fn count_signer(load: &ModuleLoad) {
    if load.seen & SEEN_KEY_FOUND == 0 || load.reason != REASON_VERIFIED {
        return;
    }
    if !count_by_key(&MODULE_SIGNERS, &load.signer.serial) {
        map_full(TrackedMap::ModuleSigners);
        increment(&MODULE_SIGNERS_OTHER, 0);
    }
}

/// The trusted key `find_asymmetric_key` returned (called from its exit's timing program, after
/// the phase's end): its serial, which the agent names from /proc/keys.
#[inline(always)]
pub fn note_signer(load: &mut ModuleLoad, key: usize) {
    let offset = KEY_SERIAL_OFFSET.load() as usize;
    if key == 0 || key > usize::MAX - MAX_ERRNO || offset == 0 {
        return;
    }
    // SAFETY: `key` is the BTF-typed `struct key *` result, not an error value (checked above);
    // the offset is from BTF.
    load.signer.serial = unsafe { core::ptr::read_volatile((key + offset) as *const i32) };
    load.seen |= SEEN_KEY_FOUND;
}

/// The identifier the signature names its key by: `find_asymmetric_key(keyring, id_0, id_1,
/// id_2, partial)`'s first identifier that is set (a module signature's signer info gives one).
#[fexit(function = "find_asymmetric_key")]
pub fn modules_key_lookup_id(ctx: FExitContext) -> u32 {
    let Some(load) = current_load() else { return 0 };
    let data_offset = KEY_ID_DATA_OFFSET.load() as usize;
    if data_offset == 0 {
        return 0;
    }
    let (id_0, id_1): (usize, usize) = (ctx.arg(1), ctx.arg(2));
    let id = if id_0 != 0 { id_0 } else { id_1 };
    if id == 0 {
        return 0;
    }
    // SAFETY: `id` is the BTF-typed `struct asymmetric_key_id *` argument; `len` is its first
    // member (a plain load); its data is a flexible array, read through the helper.
    unsafe {
        let len = u32::from(core::ptr::read_volatile(id as *const u16));
        let kept = if len as usize > KEY_ID_LEN {
            KEY_ID_LEN as u32
        } else {
            len
        };
        if kept == 0 {
            return 0;
        }
        let read = bpf_probe_read_kernel(
            load.signer.id.as_mut_ptr().cast(),
            kept,
            (id + data_offset) as *const _,
        );
        if read == 0 {
            load.signer.id_len = len;
            load.seen |= SEEN_KEY_ID;
        }
    }
    0
}

/// Reads a digest of `size` bytes from `src` into `dst`: one constant length per digest size
/// the kernel's hashes have (MD5, SHA-1, SHA-224, SHA-256, SHA-384, SHA-512 and their SHA-3 and
/// SM3 kin), a length the verifier can bound, which a masked variable is not once the compiler
/// has seen through the mask. False for another size, or a read that failed.
///
/// # Safety
/// `src` is a kernel address, read through the fault-tolerant helper.
#[inline(always)]
pub(super) unsafe fn read_digest(dst: &mut [u8; DIGEST_LEN], src: usize, size: u32) -> bool {
    let (dst, src) = (dst.as_mut_ptr().cast(), src as *const _);
    // SAFETY: the helper checks the source; the destination holds DIGEST_LEN (64) bytes.
    let read = unsafe {
        match size {
            16 => bpf_probe_read_kernel(dst, 16, src),
            20 => bpf_probe_read_kernel(dst, 20, src),
            28 => bpf_probe_read_kernel(dst, 28, src),
            32 => bpf_probe_read_kernel(dst, 32, src),
            48 => bpf_probe_read_kernel(dst, 48, src),
            64 => bpf_probe_read_kernel(dst, 64, src),
            _ => return false,
        }
    };
    read == 0
}

/// What `pkcs7_digest(pkcs7, sinfo)` hashed the signed content to: `sinfo->sig->digest`,
/// `digest_size` and `hash_algo`. Without authenticated attributes (sign-file's default) that
/// is the hash of the module's bytes before its signature.
#[fexit(function = "pkcs7_digest")]
pub fn modules_digest_value(ctx: FExitContext) -> u32 {
    let Some(load) = current_load() else { return 0 };
    // pkcs7_digest(pkcs7, sinfo)
    let ret = crate::fexit::ret::<2>(&ctx);
    let sig_offset = SINFO_SIG_OFFSET.load() as usize;
    let digest_offset = SIG_DIGEST_OFFSET.load() as usize;
    let algo_offset = SIG_HASH_ALGO_OFFSET.load() as usize;
    let size_offset = SIG_DIGEST_SIZE_OFFSET.load() as usize;
    if ret != 0 || digest_offset == 0 || size_offset == 0 {
        return 0;
    }
    let sinfo: usize = ctx.arg(1);
    // SAFETY: `sinfo` is the BTF-typed `struct pkcs7_signed_info *` argument, its `sig` a
    // `struct public_key_signature *` (both plain loads, offsets from BTF); the digest and the
    // algorithm's name are byte pointers, read through the helpers into the map value.
    unsafe {
        let sig = core::ptr::read_volatile((sinfo + sig_offset) as *const usize);
        if sig == 0 {
            return 0;
        }
        let size = core::ptr::read_volatile((sig + size_offset) as *const u32);
        let digest = core::ptr::read_volatile((sig + digest_offset) as *const usize);
        if digest == 0 {
            return 0;
        }
        if !read_digest(&mut load.signed_digest.value, digest, size) {
            return 0;
        }
        load.signed_digest.len = size;
        load.seen |= SEEN_DIGEST;
        if algo_offset != 0 {
            let algo = core::ptr::read_volatile((sig + algo_offset) as *const usize);
            if algo != 0 {
                bpf_probe_read_kernel_str(
                    load.signed_digest.algo.as_mut_ptr().cast(),
                    HASH_ALGO_LEN as u32,
                    algo as *const _,
                );
            }
        }
    }
    0
}
