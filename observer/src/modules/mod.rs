//! Module loading and integrity verification: load outcomes and methods, integrity-check and
//! load latency, signature-check phases, autoload requests.

mod counters;
mod ima;
mod inventory;
pub(crate) mod load;
mod requests;
mod shape;
mod signers;

use std::collections::BTreeMap;

use observer_common::{
    EventKind,
    modules::{ModuleLoad, NAME_LEN, NAMES, globals},
};

#[cfg(test)]
pub use self::ima::ImaVerdict;
pub use self::load::LoadRecord;

/// A module as the inventory lists one (for the schema test of its event).
#[cfg(test)]
pub fn present_for_tests() -> inventory::Present {
    inventory::parse_proc_modules("crc7 12288 0 - Live 0x0000000000000000 (OE)\n").remove(0)
}
use self::{
    counters::ModuleMaps,
    inventory::Inventory,
    load::ModuleState,
    shape::{IntegrityFunctions, Shape, Verify, VerifyArgs, decide, key_lookup_exits, verify_exit},
    signers::KeyNames,
};
use crate::{
    family::{Context, Event, HookFamily, LoadSettings, RecordKind, Registration},
    kernel,
    maps::Maps,
    metrics::Family,
    plan::{Attachment, Hook, KernelView, fentry, fexit, tracepoint},
    record::read_record,
};

pub const FAMILY: Registration = Registration {
    name: "modules",
    about: "module loads, their integrity checks (signature, hash) and phases, autoloads",
    names: &NAMES,
    flags: <Flags as clap::Args>::augment_args,
    kept_pinned: true,
    build: ModuleFamily::build,
};

// The module family's own flags (a plain comment: clap would take a doc comment here for the
// command's description).
#[derive(clap::Args, Debug)]
pub struct Flags {
    /// Also run the research instruments kernel developers profile with (`observer profile`
    /// always does): a second program on the signature check that measures the trampoline
    /// time its phases cannot see, subtracted from `other`; and what a hash-based check would
    /// have cost per load, as a histogram.
    #[arg(long = "modules.research")]
    pub research: bool,
}

const RECORDS: &[RecordKind] = &[RecordKind::of::<ModuleLoad>(EventKind::ModuleLoad)];

pub struct ModuleFamily {
    state: ModuleState,
    maps: Option<ModuleMaps>,
    /// Key descriptions by serial, for the signer (of a load, and of the signers' counts).
    keys: KeyNames,
    /// Which integrity functions this kernel has (from BTF prototypes).
    integrity: IntegrityFunctions,
    /// `find_asymmetric_key`'s exit programs for this kernel's prototype (see `shape`).
    key_lookup_exits: &'static [&'static str],
    /// IMA's appraisal of module reads, where the kernel's prototypes allow.
    ima_hooks: Vec<Hook>,
    /// The modules loaded before the agent started.
    inventory: Inventory,
    /// `--modules.research` (or `observer profile`): the probe-gap program and the estimate.
    research: bool,
}

impl ModuleFamily {
    fn build(context: &Context<'_>) -> anyhow::Result<Box<dyn HookFamily>> {
        let integrity = decide(context.kernel.btf.as_ref().ok());
        if integrity.shape == Shape::Unrecognised {
            log::warn!(
                "module_sig_check/module_hash_check have prototypes of no known version: \
                 functions whose arguments cannot be read right are not attached"
            );
        }
        log::info!("{}", integrity.describe());
        let key_lookup_exits = key_lookup_exits(context.kernel.btf.as_ref().ok());
        if key_lookup_exits.is_empty() {
            log::warn!(
                "find_asymmetric_key has a prototype of no known version: the key lookup is not \
                 timed and signers are not named"
            );
        }
        let flags = <Flags as clap::FromArgMatches>::from_arg_matches(context.matches)?;
        let research = flags.research || context.samples.is_some();
        // The estimate needs the tree's size: this kernel's module count.
        let merkle_leaves = if research {
            kernel::module_count()
        } else {
            None
        };
        Ok(Box::new(Self {
            state: ModuleState::new(context.samples.clone(), merkle_leaves, research),
            maps: None,
            keys: KeyNames::default(),
            integrity,
            key_lookup_exits,
            ima_hooks: ima::hooks(context.kernel.btf.as_ref().ok()),
            inventory: Inventory::default(),
            research,
        }))
    }
}

impl HookFamily for ModuleFamily {
    fn hooks(&self) -> Vec<Hook> {
        let mut hooks = hooks(self.integrity, self.key_lookup_exits, self.research);
        hooks.extend(self.ima_hooks.iter().cloned());
        hooks
    }

    fn configure(&self, kernel: &KernelView, load: &mut LoadSettings) {
        let btf = kernel.btf.as_ref().ok();
        let offset = |s: &str, m: &str| btf.and_then(|b| b.member_offset(s, m));
        let size = |s: &str, m: &str| btf.and_then(|b| b.member_size(s, m));
        // The last path component of the file finit_module reads: file.f_path.dentry, its
        // d_name.len and the name kept inline in the dentry (d_iname; d_shortname from 6.14).
        let file_dentry = offset("file", "f_path")
            .zip(offset("path", "dentry"))
            .map_or(0, |(a, b)| a + b);
        let name_len = offset("dentry", "d_name")
            .zip(offset("qstr", "len"))
            .map_or(0, |(a, b)| a + b);
        let (inline_offset, inline_size) = ["d_shortname", "d_iname"]
            .iter()
            .find_map(|m| offset("dentry", m).zip(size("dentry", m)))
            .unwrap_or((0, 0));
        if inline_size == 0 {
            log::warn!(
                "the dentry's inline name is not in this kernel's BTF: module file names unknown"
            );
        }
        load.global(globals::FILE_DENTRY_OFFSET, &file_dentry);
        load.global(globals::DENTRY_NAME_LEN_OFFSET, &name_len);
        load.global(globals::DENTRY_INLINE_NAME_OFFSET, &inline_offset);
        // At most what the record holds.
        load.global(
            globals::DENTRY_INLINE_NAME_SIZE,
            &inline_size.min(NAME_LEN as u32),
        );
        let (module_name_offset, module_name_size) = offset("module", "name")
            .zip(size("module", "name"))
            .unwrap_or((0, 0));
        load.global(globals::MODULE_NAME_OFFSET, &module_name_offset);
        load.global(
            globals::MODULE_NAME_SIZE,
            &module_name_size.min(NAME_LEN as u32),
        );
        // An enumerator's value from BTF (u32::MAX, which no id has, where it is missing).
        let enumerators = |name: &str| btf.map(|b| b.enum_values(name)).unwrap_or_default();
        let value_of = |values: &BTreeMap<u32, String>, name: &str| {
            values
                .iter()
                .find(|(_, n)| *n == name)
                .map_or(u32::MAX, |(v, _)| *v)
        };
        let read_ids = enumerators("kernel_read_file_id");
        let read_id = |name: &str| value_of(&read_ids, name);
        load.global(globals::READING_MODULE, &read_id("READING_MODULE"));
        load.global(
            globals::READING_MODULE_COMPRESSED,
            &read_id("READING_MODULE_COMPRESSED"),
        );
        load.global(
            globals::LOAD_INFO_LEN_OFFSET,
            &offset("load_info", "len").unwrap_or(0),
        );
        let loading_module = value_of(&enumerators("kernel_load_data_id"), "LOADING_MODULE");
        load.global(globals::LOADING_MODULE, &loading_module);
        // The signer and the digest (see observer-ebpf's modules/signature.rs).
        let offset_or_0 = |s: &str, m: &str| offset(s, m).unwrap_or(0);
        load.global(globals::KEY_SERIAL_OFFSET, &offset_or_0("key", "serial"));
        load.global(
            globals::SINFO_SIG_OFFSET,
            &offset_or_0("pkcs7_signed_info", "sig"),
        );
        // 7.x names the digest `m` and its size `m_size` (the message a signature algorithm
        // takes: a digest, or for algorithms that hash themselves the data, which is longer
        // than any digest and left out).
        for (global, members) in [
            (globals::SIG_DIGEST_OFFSET, &["digest", "m"][..]),
            (globals::SIG_DIGEST_SIZE_OFFSET, &["digest_size", "m_size"]),
            (globals::SIG_HASH_ALGO_OFFSET, &["hash_algo"]),
        ] {
            let found = members
                .iter()
                .find_map(|m| offset("public_key_signature", m))
                .unwrap_or(0);
            load.global(global, &found);
        }
        load.global(
            globals::KEY_ID_DATA_OFFSET,
            &offset_or_0("asymmetric_key_id", "data"),
        );
        for (global, member) in [
            (globals::IMA_DIGEST_ALGO_OFFSET, "algo"),
            (globals::IMA_DIGEST_LENGTH_OFFSET, "length"),
            (globals::IMA_DIGEST_DATA_OFFSET, "digest"),
        ] {
            load.global(global, &offset_or_0("ima_digest_data", member));
        }
    }

    fn take_maps(&mut self, maps: &mut Maps<'_>) -> anyhow::Result<()> {
        self.maps = Some(ModuleMaps::take(maps)?);
        // The programs are attached: what is loaded now was loaded before them.
        self.inventory.take();
        Ok(())
    }

    fn take_events(&mut self) -> Vec<Event> {
        let watched = self
            .maps
            .as_ref()
            .map(ModuleMaps::watched_names)
            .unwrap_or_default();
        self.inventory
            .publish(&watched)
            .into_iter()
            .filter_map(|present| Event::of("module_present", &present))
            .collect()
    }

    fn kernel_notes(&self) -> Option<String> {
        Some(self.integrity.describe())
    }

    fn records(&self) -> &'static [RecordKind] {
        RECORDS
    }

    fn decode(&mut self, _kind: EventKind, bytes: &[u8], want_event: bool) -> Option<Event> {
        // One value per record, counted and then written: the stream says what the metrics
        // count.
        let load = LoadRecord::from_record(&read_record::<ModuleLoad>(bytes)?, &self.keys);
        self.state.count(&load);
        if load.outcome == "loaded" {
            self.inventory.saw_load(&load.module);
        }
        want_event
            .then(|| Event::of("module_load", &load))
            .flatten()
    }

    fn collect(&self, out: &mut Vec<Family>) -> anyhow::Result<()> {
        if let Some(maps) = &self.maps {
            maps.gather(out, &self.keys)?;
        }
        self.state.gather(out);
        self.inventory.gather(out);
        Ok(())
    }
}

/// A module hook timed by an entry and an exit program on one function.
fn bracket(
    name: &'static str,
    enter: &'static str,
    exit: &'static str,
    function: &'static str,
) -> Hook {
    Hook {
        name,
        options: vec![vec![fentry(enter, function), fexit(exit, function)]],
        requires: Some(kernel::has_modules),
    }
}

/// A module hook of one program.
fn single(name: &'static str, attachment: Attachment) -> Hook {
    Hook {
        name,
        options: vec![vec![attachment]],
        requires: Some(kernel::has_modules),
    }
}

fn hooks(
    integrity: IntegrityFunctions,
    key_lookup_exits: &[&'static str],
    research: bool,
) -> Vec<Hook> {
    // Where none is traceable, mod_verify_sig's absence is what `observer probes` shows.
    let verify = integrity.verify.unwrap_or(Verify {
        function: "mod_verify_sig",
        args: VerifyArgs::LoadInfo,
    });
    let mut hooks = vec![
        bracket(
            "module_load",
            "modules_load_enter",
            "modules_load_exit",
            "load_module",
        ),
        // The policy step (signature policy, enforcement, lockdown): `module_sig_check` on
        // released kernels, renamed by the hash-based patch set (see `shape`).
        bracket(
            "module_sig_check",
            "modules_sig_check_enter",
            "modules_sig_check_exit",
            integrity.policy.unwrap_or("module_sig_check"),
        ),
        // The signature check: mod_verify_sig, or v5's PKCS#7 check (see `shape`).
        bracket(
            "module_verify_sig",
            "modules_verify_enter",
            verify_exit(verify.args),
            verify.function,
        ),
        // The Merkle-tree check of the hash-based integrity patch set (unmerged as of 2026),
        // where this kernel has a version of it that `shape` knows.
        bracket(
            "module_hash_check",
            "modules_hash_enter",
            "modules_hash_exit",
            integrity.hash.unwrap_or("module_hash_check"),
        ),
        // The file's name at the read's start; at its end, whether a security module refused it.
        bracket(
            "module_file",
            "modules_read_file",
            "modules_read_file_exit",
            "security_kernel_read_file",
        ),
        // Tells a finit_module call that waited on an identical one in progress (6.6+) from
        // one refused in may_init_module: both return without reading the file.
        Hook {
            name: "module_duplicate_wait",
            options: vec![vec![
                fentry("modules_idempotent", "idempotent_init_module"),
                fentry("modules_from_file", "init_module_from_file"),
            ]],
            requires: Some(kernel::has_modules),
        },
        // init_module(2)'s data, which IMA or LoadPin may refuse before load_module.
        single(
            "module_load_data",
            fexit("modules_load_data_exit", "security_kernel_load_data"),
        ),
        // do_init_module's argument is read with plain loads (works under
        // lockdown=confidentiality, where tracefs is refused too); the tracepoint elsewhere.
        Hook {
            name: "module_name",
            options: vec![
                vec![fentry("modules_init_name", "do_init_module")],
                vec![tracepoint("modules_loaded_name", "module", "module_load")],
            ],
            requires: Some(kernel::has_modules),
        },
        bracket(
            "module_decompress",
            "modules_decompress_enter",
            "modules_decompress_exit",
            "module_decompress",
        ),
        // Where a signature check spends its time (counted inside a load only).
        bracket(
            "module_sig_parse",
            "modules_parse_enter",
            "modules_parse_exit",
            "pkcs7_parse_message",
        ),
        bracket(
            "module_sig_digest",
            "modules_digest_enter",
            "modules_digest_exit",
            "pkcs7_digest",
        ),
        Hook {
            name: "module_sig_key_lookup",
            options: key_lookup_exits
                .iter()
                .map(|exit| {
                    vec![
                        fentry("modules_key_lookup_enter", "find_asymmetric_key"),
                        fexit(exit, "find_asymmetric_key"),
                    ]
                })
                .collect(),
            requires: Some(kernel::has_modules),
        },
        // The key id a signature names, and the digest its check computed: byte arrays only
        // bpf_probe_read_kernel reads, refused under lockdown=confidentiality. Attached after
        // the timing programs, so that they run outside the phases they time.
        single(
            "module_sig_key_id",
            fexit("modules_key_lookup_id", "find_asymmetric_key"),
        ),
        single(
            "module_sig_digest_value",
            fexit("modules_digest_value", "pkcs7_digest"),
        ),
        // Who asked for an autoload: followed from the request to the modprobe helper it
        // starts (see observer-ebpf's modules/requests.rs).
        Hook {
            name: "module_requester",
            options: vec![vec![
                tracepoint("modules_request_asked", "module", "module_request"),
                fentry("modules_request_handoff", "call_usermodehelper_exec"),
                fexit("modules_request_done", "call_usermodehelper_exec"),
                fentry("modules_request_adopt", "call_usermodehelper_exec_async"),
            ]],
            requires: Some(kernel::has_modules),
        },
        bracket(
            "module_sig_public_key",
            "modules_public_key_enter",
            "modules_public_key_exit",
            "public_key_verify_signature",
        ),
        // Every attempt ends at its syscall's exit: counted by result there, and one that never
        // reached load_module gets its verdict there. x86_64's syscall functions. Two programs
        // on each, either of which ends the attempt: the kernel may skip one's run (see
        // observer_common::modules::EXIT_PROGRAMS).
        Hook {
            name: "module_attempt_end",
            options: vec![vec![
                fexit("modules_finit_exit", "__x64_sys_finit_module"),
                fexit("modules_finit_exit_backup", "__x64_sys_finit_module"),
                fexit("modules_init_exit", "__x64_sys_init_module"),
                fexit("modules_init_exit_backup", "__x64_sys_init_module"),
            ]],
            requires: Some(kernel::has_modules),
        },
        Hook {
            name: "module_autoload",
            options: vec![
                vec![fentry(
                    "modules_request_fentry",
                    "security_kernel_module_request",
                )],
                vec![tracepoint(
                    "modules_request_tracepoint",
                    "module",
                    "module_request",
                )],
            ],
            requires: Some(kernel::has_modules),
        },
    ];
    if research {
        // A research instrument: the trampoline time between two programs on the signature
        // check, which `other` subtracts. Attached after module_verify_sig, so that two
        // programs share its trampoline.
        hooks.push(single(
            "module_probe_gap",
            fentry("modules_verify_gap", verify.function),
        ));
    }
    // The syscalls' exits attach first: every attempt that any other program starts to follow
    // then meets its end (a load in flight at attach time leaves no entry behind).
    if let Some(end) = hooks.iter().position(|h| h.name == "module_attempt_end") {
        let end = hooks.remove(end);
        hooks.insert(0, end);
    }
    // Functions whose prototypes fit no known shape are not attached: their arguments and
    // return values would be misread.
    if key_lookup_exits.is_empty() {
        hooks.retain(|h| h.name != "module_sig_key_lookup");
    }
    // Without BTF to decide the shape from, either reading of the signature check's arguments
    // may be the kernel's: the verifier refuses the buffers one on mod_verify_sig (no fourth
    // argument), so it is tried second.
    if integrity.shape == Shape::Unknown
        && let Some(verify) = hooks.iter_mut().find(|h| h.name == "module_verify_sig")
    {
        verify.options.push(vec![
            fentry("modules_verify_enter", "module_sig_check"),
            fexit(verify_exit(VerifyArgs::Buffers), "module_sig_check"),
        ]);
    }
    if integrity.shape == Shape::Unrecognised {
        hooks.retain(|h| {
            (h.name != "module_sig_check" || integrity.policy.is_some())
                && (h.name != "module_hash_check" || integrity.hash.is_some())
        });
    }
    hooks
}
