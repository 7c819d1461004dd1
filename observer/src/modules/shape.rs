//! Which shape of module integrity checking the running kernel has, decided from its BTF by
//! function prototypes (names alone mislead: the hash-based patch set reuses `module_sig_check`
//! for a different step, and `module_hash_check` changed arguments between versions).
//!
//! | shape | policy step (outcome) | signature check (`method="signature"`) | Merkle check (`method="hash"`) |
//! | --- | --- | --- | --- |
//! | mainline | `module_sig_check(struct load_info *, int)` | `mod_verify_sig(mod, info)` | none |
//! | hash v1 | `module_sig_check(info, flags)` | `mod_verify_sig` | `module_hash_check(info, flags)`, run after it |
//! | hash v2/v3 | `module_integrity_check(info, flags)` | `mod_verify_sig` | `module_hash_check(info, flags)` |
//! | hash v4 | `module_sig_check(info, flags)` | `mod_verify_sig` | `module_hash_check(info, sig, sig_len)` |
//! | hash v5 | `module_auth_check(info, flags)` | `module_sig_check(mod, mod_len, sig, sig_len)` | `module_hash_check(mod, mod_len, sig, sig_len)` |
//!
//! In v5 (as a kernel carrying it shows: Debian's 7.1.3 with the 2026-05-05 posting),
//! `module_auth_check` checks the trailer (`mod_check_sig`) and hands the module, by the
//! trailer's `id_type`, to `module_sig_check` (PKCS#7) or `module_hash_check` (a Merkle proof):
//! the two have one prototype and are told apart by name. `mod_verify_sig` is inlined there (in
//! no BTF, no kallsyms), so the signature check is timed on `module_sig_check`, whose arguments
//! give the bytes hashed directly. A reviewer has asked to rename `mod_verify_sig`,
//! `mod_check_sig` and `MODULE_SIG_FORCE` in a v6: the signature check is whichever of the known
//! names has one of the two prototypes, and `observer probes` says which shape and functions
//! were found.

use crate::kernel::KernelBtf;

const LOAD_INFO: &str = "struct load_info *";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Mainline,
    HashV1,
    HashV2,
    HashV4,
    HashV5,
    /// Functions of these names with prototypes of no known version: the policy step is not
    /// attached rather than guessed (outcomes then follow `load_module`'s return).
    Unrecognised,
    /// No BTF to decide from: the mainline names are tried.
    Unknown,
}

impl Shape {
    pub const fn label(self) -> &'static str {
        match self {
            Self::Mainline => "mainline",
            Self::HashV1 => "hash-v1",
            Self::HashV2 => "hash-v2/v3",
            Self::HashV4 => "hash-v4",
            Self::HashV5 => "hash-v5",
            Self::Unrecognised => "unrecognised",
            Self::Unknown => "unknown (no BTF)",
        }
    }
}

/// The functions the module family times, for the shape found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntegrityFunctions {
    pub shape: Shape,
    /// Decides whether the load may go on (signature policy, enforcement, lockdown).
    pub policy: Option<&'static str>,
    /// Verifies a module's PKCS#7 signature.
    pub verify: Option<Verify>,
    /// The Merkle-proof check.
    pub hash: Option<&'static str>,
}

impl IntegrityFunctions {
    /// One line for the log and `observer probes`: the shape, and which function carries which
    /// check.
    pub fn describe(&self) -> String {
        format!(
            "module integrity checking: {} (policy step {}, signature check {}, Merkle check {})",
            self.shape.label(),
            self.policy.unwrap_or("not traceable"),
            self.verify.map_or("not traceable", |v| v.function),
            self.hash.unwrap_or("absent"),
        )
    }
}

/// The signature check's function and how its arguments read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verify {
    pub function: &'static str,
    pub args: VerifyArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyArgs {
    /// `mod_verify_sig(const void *mod, struct load_info *info)`: the bytes hashed are
    /// `info->len` once it returns (the signature cut off).
    LoadInfo,
    /// `(const void *mod, size_t mod_len, const void *sig, size_t sig_len)` (hash v5): the
    /// bytes hashed are `mod_len`.
    Buffers,
}

const MOD_VERIFY_SIG: Verify = Verify {
    function: "mod_verify_sig",
    args: VerifyArgs::LoadInfo,
};

fn is_size(text: &str) -> bool {
    matches!(
        text,
        "size_t" | "unsigned long" | "long unsigned int" | "u64"
    )
}

fn is_buffer(text: &str) -> bool {
    text.ends_with(" *") && !text.starts_with("struct ")
}

fn is_int(text: &str) -> bool {
    matches!(text, "int" | "unsigned int" | "u32" | "s32")
}

/// `(struct load_info *info, int flags)`.
fn info_flags(params: &[String]) -> bool {
    matches!(params, [info, flags] if info == LOAD_INFO && is_int(flags))
}

/// `(const void *mod, size_t mod_len, const void *sig, size_t sig_len)`.
fn buffers(params: &[String]) -> bool {
    matches!(params, [a, b, c, d] if is_buffer(a) && is_size(b) && is_buffer(c) && is_size(d))
}

/// `mod_verify_sig(const void *mod, struct load_info *info)`.
fn mod_info(params: &[String]) -> bool {
    matches!(params, [module, info] if is_buffer(module) && info == LOAD_INFO)
}

/// Decides from the running kernel's BTF.
pub fn decide(btf: Option<&KernelBtf>) -> IntegrityFunctions {
    let Some(btf) = btf else {
        return IntegrityFunctions {
            shape: Shape::Unknown,
            policy: Some("module_sig_check"),
            verify: Some(MOD_VERIFY_SIG),
            hash: None,
        };
    };
    let params = |name| btf.function_params(name);
    let (sig, hash) = (params("module_sig_check"), params("module_hash_check"));
    let sig_is_policy = sig.as_deref().is_some_and(info_flags);
    let hash_shape = hash.as_deref().map(|p| match p {
        [a, b] if a == LOAD_INFO && is_int(b) => Some(Shape::HashV1),
        [a, b, c] if a == LOAD_INFO && is_buffer(b) && (is_size(c) || is_int(c)) => {
            Some(Shape::HashV4)
        }
        p if buffers(p) => Some(Shape::HashV5),
        _ => None,
    });
    // mod_verify_sig where it is traceable (every shape but v5), else v5's PKCS#7 check.
    let verify = if params("mod_verify_sig").as_deref().is_some_and(mod_info) {
        Some(MOD_VERIFY_SIG)
    } else if sig.as_deref().is_some_and(buffers) {
        Some(Verify {
            function: "module_sig_check",
            args: VerifyArgs::Buffers,
        })
    } else {
        None
    };
    let found = |shape, policy, hash| IntegrityFunctions {
        shape,
        policy,
        verify,
        hash,
    };
    if params("module_auth_check")
        .as_deref()
        .is_some_and(info_flags)
    {
        return found(
            Shape::HashV5,
            Some("module_auth_check"),
            (hash_shape == Some(Some(Shape::HashV5))).then_some("module_hash_check"),
        );
    }
    if params("module_integrity_check")
        .as_deref()
        .is_some_and(info_flags)
    {
        return found(
            Shape::HashV2,
            Some("module_integrity_check"),
            (hash_shape == Some(Some(Shape::HashV1))).then_some("module_hash_check"),
        );
    }
    let policy = sig_is_policy.then_some("module_sig_check");
    match hash_shape {
        None if sig.is_none() || sig_is_policy => found(Shape::Mainline, policy, None),
        Some(Some(shape @ (Shape::HashV1 | Shape::HashV4))) if sig_is_policy => {
            found(shape, policy, Some("module_hash_check"))
        }
        _ => found(Shape::Unrecognised, policy, None),
    }
}

/// The exit programs of `find_asymmetric_key` whose return slot fits this kernel's prototype:
/// `(keyring, id_0, id_1, id_2, partial)` from 5.18, without `id_2` before; none for another
/// (the key lookup is then not attached: its key would be misread). Where BTF does not say,
/// both, in turn: the verifier refuses a slot past the function's arguments.
pub fn key_lookup_exits(btf: Option<&KernelBtf>) -> &'static [&'static str] {
    const FIVE: &str = "modules_key_lookup_exit";
    const FOUR: &str = "modules_key_lookup_exit_4";
    match btf
        .and_then(|b| b.function_params("find_asymmetric_key"))
        .map(|p| p.len())
    {
        Some(5) => &[FIVE],
        Some(4) => &[FOUR],
        Some(_) => &[],
        None => &[FIVE, FOUR],
    }
}

/// The signature check's exit program for the way its arguments read (see `VerifyArgs`).
pub const fn verify_exit(args: VerifyArgs) -> &'static str {
    match args {
        VerifyArgs::LoadInfo => "modules_verify_exit",
        VerifyArgs::Buffers => "modules_verify_exit_buffers",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf_writer::BtfWriter;

    /// A kernel's BTF with these functions, each `(name, [parameter types])`.
    fn kernel(functions: &[(&str, &[&str])]) -> KernelBtf {
        let mut w = BtfWriter::default();
        for (name, params) in functions {
            let ids: Vec<u32> = params.iter().map(|p| w.c_type(p)).collect();
            w.function(name, &ids);
        }
        KernelBtf::from_bytes(&w.finish()).expect("test BTF parses")
    }

    const INFO_FLAGS: &[&str] = &["struct load_info *", "int"];
    const BUFFERS: &[&str] = &["const void *", "size_t", "const void *", "size_t"];
    const MOD_INFO: &[&str] = &["const void *", "struct load_info *"];

    #[test]
    fn prototypes_are_read_back_as_written() {
        let btf = kernel(&[("module_hash_check", BUFFERS)]);
        assert_eq!(
            btf.function_params("module_hash_check").unwrap(),
            ["const void *", "size_t", "const void *", "size_t"]
        );
        assert_eq!(btf.function_params("absent"), None);
    }

    #[test]
    fn mainline() {
        let btf = kernel(&[
            ("module_sig_check", INFO_FLAGS),
            ("mod_verify_sig", MOD_INFO),
        ]);
        let found = decide(Some(&btf));
        assert_eq!(
            found,
            IntegrityFunctions {
                shape: Shape::Mainline,
                policy: Some("module_sig_check"),
                verify: Some(MOD_VERIFY_SIG),
                hash: None
            }
        );
        // Before 5.19 module_sig_check is inlined: nothing to attach for the policy.
        let old = kernel(&[("mod_verify_sig", MOD_INFO)]);
        assert_eq!(decide(Some(&old)).policy, None);
        assert_eq!(decide(Some(&old)).shape, Shape::Mainline);
    }

    #[test]
    fn v1_and_v2_share_the_hash_prototype_and_differ_by_the_dispatcher() {
        let v1 = kernel(&[
            ("module_sig_check", INFO_FLAGS),
            ("mod_verify_sig", MOD_INFO),
            ("module_hash_check", INFO_FLAGS),
        ]);
        assert_eq!(
            decide(Some(&v1)),
            IntegrityFunctions {
                shape: Shape::HashV1,
                policy: Some("module_sig_check"),
                verify: Some(MOD_VERIFY_SIG),
                hash: Some("module_hash_check")
            }
        );
        let v2 = kernel(&[
            ("module_integrity_check", INFO_FLAGS),
            ("module_sig_check", INFO_FLAGS),
            ("mod_verify_sig", MOD_INFO),
            ("module_hash_check", INFO_FLAGS),
        ]);
        assert_eq!(
            decide(Some(&v2)),
            IntegrityFunctions {
                shape: Shape::HashV2,
                policy: Some("module_integrity_check"),
                verify: Some(MOD_VERIFY_SIG),
                hash: Some("module_hash_check")
            }
        );
    }

    #[test]
    fn v4() {
        let btf = kernel(&[
            ("module_sig_check", INFO_FLAGS),
            ("mod_verify_sig", MOD_INFO),
            (
                "module_hash_check",
                &["struct load_info *", "const void *", "size_t"],
            ),
        ]);
        assert_eq!(
            decide(Some(&btf)),
            IntegrityFunctions {
                shape: Shape::HashV4,
                policy: Some("module_sig_check"),
                verify: Some(MOD_VERIFY_SIG),
                hash: Some("module_hash_check")
            }
        );
    }

    /// v5 as a kernel carrying it has it (Debian's 7.1.3 with the 2026-05-05 posting):
    /// `mod_verify_sig` inlined (absent from BTF), the trailer checked by `mod_check_sig`, and
    /// the PKCS#7 and Merkle checks with one prototype.
    const V5: &[(&str, &[&str])] = &[
        (
            "load_module",
            &["struct load_info *", "const char *", "int"],
        ),
        ("module_auth_check", INFO_FLAGS),
        (
            "mod_check_sig",
            &["const struct module_signature *", "size_t", "const char *"],
        ),
        ("module_sig_check", BUFFERS),
        ("module_hash_check", BUFFERS),
        ("verify_pkcs7_signature", BUFFERS),
    ];

    #[test]
    fn v5_times_both_checks_and_never_takes_the_pkcs7_check_for_the_policy() {
        assert_eq!(
            decide(Some(&kernel(V5))),
            IntegrityFunctions {
                shape: Shape::HashV5,
                policy: Some("module_auth_check"),
                verify: Some(Verify {
                    function: "module_sig_check",
                    args: VerifyArgs::Buffers
                }),
                hash: Some("module_hash_check")
            }
        );
        // Had mod_verify_sig stayed a function (an earlier reading of v5), it would be timed.
        let mut with_verify = V5.to_vec();
        with_verify.push(("mod_verify_sig", MOD_INFO));
        assert_eq!(
            decide(Some(&kernel(&with_verify))).verify,
            Some(MOD_VERIFY_SIG)
        );
        // The same names without module_auth_check: the 4-argument module_sig_check is no
        // policy step, so none is attached.
        let odd = kernel(&[
            ("module_sig_check", BUFFERS),
            ("module_hash_check", BUFFERS),
        ]);
        let found = decide(Some(&odd));
        assert_eq!((found.shape, found.policy), (Shape::Unrecognised, None));
        assert_eq!(found.hash, None);
    }

    /// On v5 the module family's own hooks put each program where the facts say.
    #[test]
    fn v5_is_described_as_found() {
        assert_eq!(
            decide(Some(&kernel(V5))).describe(),
            "module integrity checking: hash-v5 (policy step module_auth_check, signature check \
             module_sig_check, Merkle check module_hash_check)"
        );
    }

    #[test]
    fn v5_programs_attach_to_the_v5_functions() {
        use crate::plan::Mechanism;
        let hooks = super::super::hooks(
            decide(Some(&kernel(V5))),
            &["modules_key_lookup_exit"],
            true,
        );
        let attached = |probe: &str| -> Vec<(&str, &str)> {
            let hook = hooks.iter().find(|h| h.name == probe).expect(probe);
            hook.options[0]
                .iter()
                .map(|a| match a.mechanism {
                    Mechanism::FEntry { function } | Mechanism::FExit { function } => {
                        (a.program, function)
                    }
                    _ => (a.program, "not a function"),
                })
                .collect()
        };
        assert_eq!(
            attached("module_sig_check"),
            [
                ("modules_sig_check_enter", "module_auth_check"),
                ("modules_sig_check_exit", "module_auth_check")
            ]
        );
        assert_eq!(
            attached("module_verify_sig"),
            [
                ("modules_verify_enter", "module_sig_check"),
                ("modules_verify_exit_buffers", "module_sig_check")
            ]
        );
        assert_eq!(
            attached("module_probe_gap"),
            [("modules_verify_gap", "module_sig_check")]
        );
        assert_eq!(
            attached("module_hash_check"),
            [
                ("modules_hash_enter", "module_hash_check"),
                ("modules_hash_exit", "module_hash_check")
            ]
        );
        // The signature check's phases as on mainline.
        assert_eq!(
            attached("module_sig_digest"),
            [
                ("modules_digest_enter", "pkcs7_digest"),
                ("modules_digest_exit", "pkcs7_digest")
            ]
        );
        // On mainline the signature check stays on mod_verify_sig, read through load_info.
        let mainline = kernel(&[
            ("module_sig_check", INFO_FLAGS),
            ("mod_verify_sig", MOD_INFO),
        ]);
        let hooks =
            super::super::hooks(decide(Some(&mainline)), &["modules_key_lookup_exit"], true);
        let verify = hooks
            .iter()
            .find(|h| h.name == "module_verify_sig")
            .unwrap();
        assert_eq!(verify.options[0][1].program, "modules_verify_exit");
    }

    #[test]
    fn the_key_lookup_exit_fits_its_prototype() {
        let keyring = "struct key *";
        let id = "const struct asymmetric_key_id *";
        let with =
            |params: &[&str]| key_lookup_exits(Some(&kernel(&[("find_asymmetric_key", params)])));
        assert_eq!(
            with(&[keyring, id, id, id, "bool"]),
            ["modules_key_lookup_exit"]
        );
        // 5.10: no id_2.
        assert_eq!(
            with(&[keyring, id, id, "bool"]),
            ["modules_key_lookup_exit_4"]
        );
        assert!(with(&[keyring, id, "bool"]).is_empty());
        assert_eq!(
            key_lookup_exits(None),
            ["modules_key_lookup_exit", "modules_key_lookup_exit_4"]
        );
    }

    #[test]
    fn unknown_prototypes_are_not_guessed() {
        let btf = kernel(&[
            ("module_sig_check", INFO_FLAGS),
            ("module_hash_check", &["struct module *"]),
        ]);
        let found = decide(Some(&btf));
        assert_eq!(found.shape, Shape::Unrecognised);
        assert_eq!(found.hash, None);
        assert_eq!(found.policy, Some("module_sig_check"));
        assert_eq!(decide(None).shape, Shape::Unknown);
    }
}
