//! Module loading: one record per load attempt, correlated by task from `load_module`'s entry to
//! its exit, with the integrity checks and taints that happened inside it.

use crate::{EventHeader, Names};

mod verdicts;
pub use verdicts::*;

/// The maps the agent reads: autoload requests, verdicts (outcome × method), syscall results.
pub const AUTOLOADS_MAP: &str = "MODULE_AUTOLOADS";
pub const VERDICTS_MAP: &str = "MODULE_VERDICTS";
pub const SYSCALLS_MAP: &str = "MODULE_SYSCALLS";
/// Names of the modules whose load a program saw complete (value: when, in kernel
/// nanoseconds): the inventory at start leaves them out, also when pinned programs saw them
/// while no agent ran.
pub const WATCHED_MAP: &str = "MODULE_WATCHED";
/// How many names [`WATCHED_MAP`] keeps (least recently loaded dropped first).
pub const WATCHED_NAMES: u32 = 4096;
/// Verified loads by the serial of the key that verified them, and those past its room.
pub const SIGNERS_MAP: &str = "MODULE_SIGNERS";
pub const SIGNERS_OTHER_MAP: &str = "MODULE_SIGNERS_OTHER";
/// Keys that keep their own count (and `signer` label); later ones count as `other`.
pub const SIGNER_KEYS: u32 = 16;
/// Autoload requests by the thread that asked, by the helper that runs modprobe for them, and
/// by that helper's process (see observer-ebpf's `modules/requests.rs`).
pub const REQUESTS_MAP: &str = "MODULE_REQUESTS";
pub const REQUEST_HELPERS_MAP: &str = "MODULE_REQUEST_HELPERS";
pub const REQUEST_TASKS_MAP: &str = "MODULE_REQUEST_TASKS";

pub const NAMES: Names = Names {
    programs: &[
        "modules_read_file",
        "modules_decompress_enter",
        "modules_decompress_exit",
        "modules_load_enter",
        "modules_load_exit",
        "modules_sig_check_enter",
        "modules_sig_check_exit",
        "modules_verify_enter",
        "modules_verify_exit",
        "modules_verify_exit_buffers",
        "modules_verify_gap",
        "modules_parse_enter",
        "modules_parse_exit",
        "modules_digest_enter",
        "modules_digest_exit",
        "modules_key_lookup_enter",
        "modules_key_lookup_exit",
        "modules_key_lookup_exit_4",
        "modules_public_key_enter",
        "modules_public_key_exit",
        "modules_hash_enter",
        "modules_hash_exit",
        "modules_ima_enter",
        "modules_ima_exit",
        "modules_ima_digest_enter",
        "modules_ima_digest_exit",
        "modules_ima_appraise_enter",
        "modules_ima_appraise_exit",
        "modules_ima_signature",
        "modules_ima_load_data",
        "modules_init_name",
        "modules_loaded_name",
        "modules_request_fentry",
        "modules_request_tracepoint",
        "modules_finit_exit",
        "modules_init_exit",
        "modules_finit_exit_backup",
        "modules_init_exit_backup",
        "modules_read_file_exit",
        "modules_load_data_exit",
        "modules_idempotent",
        "modules_from_file",
        "modules_key_lookup_id",
        "modules_digest_value",
        "modules_ima_digest_value",
        "modules_request_asked",
        "modules_request_handoff",
        "modules_request_adopt",
        "modules_request_done",
    ],
    maps: &[
        "MODULE_LOADS",
        "MODULE_PENDING",
        AUTOLOADS_MAP,
        VERDICTS_MAP,
        SYSCALLS_MAP,
        WATCHED_MAP,
        SIGNERS_MAP,
        SIGNERS_OTHER_MAP,
        REQUESTS_MAP,
        REQUEST_HELPERS_MAP,
        REQUEST_TASKS_MAP,
    ],
    globals: globals::ALL,
};

crate::object_names! {
    /// The module programs' globals: offsets and enum values from the running kernel's BTF.
    globals {
        FILE_DENTRY_OFFSET,
        DENTRY_NAME_LEN_OFFSET,
        DENTRY_INLINE_NAME_OFFSET,
        DENTRY_INLINE_NAME_SIZE,
        MODULE_NAME_OFFSET,
        MODULE_NAME_SIZE,
        READING_MODULE,
        READING_MODULE_COMPRESSED,
        LOAD_INFO_LEN_OFFSET,
        LOADING_MODULE,
        KEY_SERIAL_OFFSET,
        SINFO_SIG_OFFSET,
        SIG_DIGEST_OFFSET,
        SIG_DIGEST_SIZE_OFFSET,
        SIG_HASH_ALGO_OFFSET,
        KEY_ID_DATA_OFFSET,
        IMA_DIGEST_ALGO_OFFSET,
        IMA_DIGEST_LENGTH_OFFSET,
        IMA_DIGEST_DATA_OFFSET,
    }
}

/// The index of `security_kernel_post_read_file`'s `enum kernel_read_file_id` argument, which
/// IMA's entry program reads (the agent checks it against the kernel's BTF before attaching).
pub const IMA_READ_ID_ARG: usize = 3;

/// `MODULE_NAME_LEN` is 56; a file name gets the same room.
pub const NAME_LEN: usize = 64;
/// A signature's key identifier kept: a serial number and its issuer's DER name fit (a subject
/// key id is 20 bytes).
pub const KEY_ID_LEN: usize = 128;
/// The longest digest (SHA-512, SHA3-512).
pub const DIGEST_LEN: usize = 64;
/// A hash algorithm's name as the kernel's crypto API has it (`sha256`, `sha3-512`).
pub const HASH_ALGO_LEN: usize = 16;

/// [`ModuleLoad::seen`] bits: which hooks fired inside this load.
pub const SEEN_SIG_CHECK: u32 = 1 << 0;
pub const SEEN_VERIFY_SIG: u32 = 1 << 1;
pub const SEEN_HASH_CHECK: u32 = 1 << 2;
pub const SEEN_NAME: u32 = 1 << 3;
pub const SEEN_FILE: u32 = 1 << 4;
pub const SEEN_DECOMPRESS: u32 = 1 << 5;
/// The file's name is too long to be kept inside its dentry: reading it would take
/// `bpf_probe_read_kernel`, which the programs do not use (lockdown=confidentiality refuses it).
pub const SEEN_FILE_NOT_INLINE: u32 = 1 << 6;
/// IMA's hook on the module's read (`security_kernel_post_read_file`) ran: `ima_ns` and
/// `ima_ret` hold its time and verdict.
pub const SEEN_IMA_READ: u32 = 1 << 7;
/// IMA hashed the module (`ima_calc_buffer_hash`) inside that hook.
pub const SEEN_IMA_DIGEST: u32 = 1 << 8;
/// IMA appraised it (`ima_appraise_measurement`): `ima_status` holds its verdict.
pub const SEEN_IMA_APPRAISE: u32 = 1 << 9;
/// The module's `security.ima` was a signature (`integrity_digsig_verify` ran), not a digest.
pub const SEEN_IMA_SIGNATURE: u32 = 1 << 10;
/// The read was refused: `load_module` never ran and the record was sent at the refusal.
pub const SEEN_READ_REFUSED: u32 = 1 << 11;
/// `finit_module` failed after reading the file and before `load_module` (decompression, the
/// read itself): the record was sent at its exit.
pub const SEEN_NO_LOAD: u32 = 1 << 12;

/// Marks a thread's pending record once `load_module` ran and counted its verdict: the
/// syscall's exit then has nothing left to count.
pub const SEEN_LOAD_MODULE: u32 = 1 << 13;
/// A security hook (`security_kernel_read_file` or `security_kernel_load_data`) refused the
/// module's data before `load_module`.
pub const SEEN_LSM_REFUSED: u32 = 1 << 14;
/// The attempt came through `init_module(2)` (the module's bytes from user memory).
pub const SEEN_INIT_MODULE: u32 = 1 << 15;
/// `security_kernel_read_file` ran for a module file: the caller passed `may_init_module`.
pub const SEEN_READ: u32 = 1 << 16;
/// `security_kernel_load_data` ran for a module: the caller passed `may_init_module`.
pub const SEEN_LOAD_DATA: u32 = 1 << 17;

/// `idempotent_init_module` ran (6.6+): finit_module passed `may_init_module`, and a call that
/// then does not reach `init_module_from_file` waited on an identical load in progress.
pub const SEEN_IDEMPOTENT: u32 = 1 << 18;
/// `init_module_from_file` ran: this finit_module call does the load itself.
pub const SEEN_FROM_FILE: u32 = 1 << 19;

/// IMA refused init_module(2)'s bytes (`ima_load_data`): under an appraisal policy for
/// modules it refuses every module without a file to appraise.
pub const SEEN_IMA_DATA_REFUSED: u32 = 1 << 20;

/// The signature's key lookup found a trusted key: `signer.serial` is its serial.
pub const SEEN_KEY_FOUND: u32 = 1 << 21;
/// `signer.id` holds the identifier the signature names its key by.
pub const SEEN_KEY_ID: u32 = 1 << 22;
/// `signed_digest` holds what the signature check hashed the module to.
pub const SEEN_DIGEST: u32 = 1 << 23;
/// The load was asked for by an autoload (`request_module`): `request` names who asked.
pub const SEEN_REQUESTED: u32 = 1 << 24;
/// IMA hashed the module's file: `ima.digest` holds it ([`ImaCheck::digest_len`] bytes).
pub const SEEN_IMA_FILE_DIGEST: u32 = 1 << 25;
/// Lockdown refused an unsigned module during this load (`LOCKDOWN_MODULE_SIGNATURE`): what
/// tells a lockdown refusal from another -EPERM where the policy step is inlined (before 5.19).
pub const SEEN_LOCKDOWN_REFUSED: u32 = 1 << 26;

/// Taint E (`TAINT_UNSIGNED_MODULE`): an unsigned (or unverifiable) module was loaded.
pub const TAINT_UNSIGNED_MODULE: u32 = 13;

/// Phases of a signature check timed inside a load (index into [`PhaseTimes::ns`]).
pub const PHASE_PARSE: usize = 0;
pub const PHASE_DIGEST: usize = 1;
pub const PHASE_KEY_LOOKUP: usize = 2;
pub const PHASE_PUBLIC_KEY_VERIFY: usize = 3;
pub const PHASES: usize = 4;

/// IMA's appraisal of a module's read: what it took and what it decided.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImaCheck {
    /// The whole hook on the read (`security_kernel_post_read_file`): policy, the
    /// `security.ima` attribute, hashing, appraisal.
    pub check_ns: u64,
    /// Hashing the module's bytes (`ima_calc_buffer_hash`).
    pub digest_ns: u64,
    /// Comparing with `security.ima` (`ima_appraise_measurement`: EVM, digest or signature).
    pub appraise_ns: u64,
    /// The hook's return (0, or -EACCES when IMA enforces a failed appraisal).
    pub ret: i32,
    /// `ima_appraise_measurement`'s `enum integrity_status` (0 INTEGRITY_PASS).
    pub status: i32,
    /// The digest IMA computed of the file ([`SEEN_IMA_FILE_DIGEST`]): its length and its
    /// `enum hash_algo` (uapi `<linux/hash_info.h>`, see [`hash_algo_name`]).
    pub digest_len: u32,
    pub algo: u32,
    pub digest: [u8; DIGEST_LEN],
}

impl Default for ImaCheck {
    fn default() -> Self {
        Self {
            check_ns: 0,
            digest_ns: 0,
            appraise_ns: 0,
            ret: 0,
            status: 0,
            digest_len: 0,
            algo: 0,
            digest: [0; DIGEST_LEN],
        }
    }
}

/// The kernel's name of an `enum hash_algo` value (uapi `<linux/hash_info.h>`, whose values
/// never change; the names are the kernel's `hash_algo_name`).
pub fn hash_algo_name(algo: u32) -> Option<&'static str> {
    const NAMES: [&str; 23] = [
        "md4",
        "md5",
        "sha1",
        "rmd160",
        "sha256",
        "sha384",
        "sha512",
        "sha224",
        "rmd128",
        "rmd256",
        "rmd320",
        "wp256",
        "wp384",
        "wp512",
        "tgr128",
        "tgr160",
        "tgr192",
        "sm3",
        "streebog256",
        "streebog512",
        "sha3-256",
        "sha3-384",
        "sha3-512",
    ];
    NAMES.get(algo as usize).copied()
}

/// Who asked for an autoload (`request_module`, in the asking thread: its process, uid,
/// cgroup and command), and what it asked for (an alias such as `net-pf-29` or `fs-xfs`,
/// which modprobe resolves to module names in user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleRequest {
    pub requester: EventHeader,
    /// The process that runs modprobe for it (set when that helper starts).
    pub helper_pid: u32,
    pub _pad: u32,
    pub alias: [u8; NAME_LEN],
}

/// What a thread did just before `load_module`: the file it read, IMA's appraisal of it and
/// its decompression.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingLoad {
    pub decompress_start_ns: u64,
    pub decompress_ns: u64,
    /// Entry times of IMA's hook and of its two phases (scratch; 0 outside them).
    pub ima_start_ns: u64,
    pub ima_digest_start_ns: u64,
    pub ima_appraise_start_ns: u64,
    pub ima: ImaCheck,
    pub seen: u32,
    /// How many of the syscall's exit programs ran for this attempt ([`EXIT_PROGRAMS`]): not
    /// 0 only between them, so an entry found with it set is left from an earlier attempt.
    pub exits_run: u32,
    pub file: [u8; NAME_LEN],
}

/// Programs on each load syscall's exit, each able to end the attempt alone. The kernel skips
/// a tracing program on a CPU where that same program is already running (a task preempted
/// inside it, counted in `bpf_prog_info.recursion_misses`): with racing loads on one CPU, one
/// program's run can be skipped, and the other, a separate program, still ends the attempt.
pub const EXIT_PROGRAMS: u32 = 2;

/// A load attempt, kept in a map by thread id while `load_module` runs, then sent whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModuleLoad {
    pub header: EventHeader,
    pub start_ns: u64,
    /// Whole `load_module`.
    pub total_ns: u64,
    /// `module_sig_check`: the signature policy, including the lockdown check for unsigned modules.
    pub sig_check: CheckStep,
    /// `mod_verify_sig`: verifying a signature the module carries.
    pub verify: VerifyStep,
    /// The hash-based check (`module_hash_check`/`module_integrity_check`) where a kernel has it.
    pub hash: CheckStep,
    /// `module_decompress` (before `load_module`, for MODULE_INIT_COMPRESSED_FILE).
    pub decompress_ns: u64,
    /// The signature-check phase programs' part.
    pub phases: PhaseTimes,
    /// Time from one program's last step to the next one's first on the same trampoline
    /// (measured once per load on `mod_verify_sig`, with `--modules.research`).
    pub gap_ns: u64,
    /// The programs' own bookkeeping while the load runs (entry times, marks).
    pub marks: LoadMarks,
    /// Taint bits `add_taint` set during the load.
    pub taints: u64,
    /// IMA's appraisal of the module's read, before `load_module`.
    pub ima: ImaCheck,
    pub load_ret: i32,
    pub seen: u32,
    /// The verdict, as the kernel counted it (`OUTCOME_*`).
    pub outcome: u32,
    /// Why it was refused, or what its check found (`REASON_*`), as the kernel counted it.
    pub reason: u32,
    /// From `module:module_load` when the load got that far.
    pub name: [u8; NAME_LEN],
    /// The file `finit_module` read (its last path component).
    pub file: [u8; NAME_LEN],
    /// The key lookup programs' part (`find_asymmetric_key`).
    pub signer: SignerKey,
    /// The digest program's part (`pkcs7_digest`).
    pub signed_digest: SignedDigest,
    /// The autoload that asked for this load ([`SEEN_REQUESTED`]).
    pub request: ModuleRequest,
}

/// A timed step of a load, as its exit program saw it: how long it took and what it returned.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckStep {
    pub ns: u64,
    pub ret: i32,
    /// Keeps the layout free of implicit padding.
    pub reserved: u32,
}

/// `mod_verify_sig`'s step: a [`CheckStep`] and the bytes it hashed (the module without its
/// signature).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyStep {
    pub ns: u64,
    pub hashed_len: u64,
    pub ret: i32,
    /// Keeps the layout free of implicit padding.
    pub reserved: u32,
}

/// What the phase programs measure of a signature check (`modules/phases.rs`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseTimes {
    /// Time in each phase and its calls.
    pub ns: [u64; PHASES],
    pub calls: [u32; PHASES],
    /// Time the phase programs themselves spent inside the check but outside the phases they
    /// time (measured by them; the trampolines' own entry and exit are not in it).
    pub probe_ns: u64,
}

/// The key a signature named and the trusted key its lookup found.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignerKey {
    /// The serial of the trusted key the lookup found ([`SEEN_KEY_FOUND`]).
    pub serial: i32,
    /// The length of the signature's key identifier (of which `id` keeps the first bytes).
    pub id_len: u32,
    /// The identifier the signature names its key by (`struct asymmetric_key_id`'s data: a
    /// serial number then its issuer's name, or a subject key id), [`SEEN_KEY_ID`].
    pub id: [u8; KEY_ID_LEN],
}

/// What `pkcs7_digest` hashed the signed content to, and the algorithm ([`SEEN_DIGEST`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignedDigest {
    /// Bytes of `value` that hold it.
    pub len: u32,
    pub value: [u8; DIGEST_LEN],
    /// The algorithm's name as the kernel spells it.
    pub algo: [u8; HASH_ALGO_LEN],
}

/// What the module programs note for each other while a load runs: when each timed function
/// was entered, and the probe-gap mark. Each field is written at one entry and read at the
/// matching exit; the agent reads none of them (the durations are [`ModuleLoad`]'s).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadMarks {
    /// `module_sig_check`'s entry (the policy step).
    pub policy_entry_ns: u64,
    /// `mod_verify_sig`'s entry (the signature check).
    pub verify_entry_ns: u64,
    /// The hash-based check's entry.
    pub hash_entry_ns: u64,
    /// The first of the two programs on the signature check's trampoline: its last step.
    pub gap_mark_ns: u64,
    /// Each signature-check phase's entry.
    pub phase_entry_ns: [u64; PHASES],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers and arrays; any bit pattern is valid.
    unsafe impl aya::Pod for super::ModuleLoad {}
    unsafe impl aya::Pod for super::LoadMarks {}
    unsafe impl aya::Pod for super::PhaseTimes {}
    unsafe impl aya::Pod for super::CheckStep {}
    unsafe impl aya::Pod for super::VerifyStep {}
    unsafe impl aya::Pod for super::SignerKey {}
    unsafe impl aya::Pod for super::SignedDigest {}
    unsafe impl aya::Pod for super::PendingLoad {}
    unsafe impl aya::Pod for super::ImaCheck {}
    unsafe impl aya::Pod for super::ModuleRequest {}
}
