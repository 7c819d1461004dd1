//! Which shape of module integrity checking the running kernel has, decided from its BTF by
//! function prototypes (names alone mislead: the hash-based patch set reuses `module_sig_check`
//! for a different step, and `module_hash_check` changed arguments between versions).
//!
//! | shape | policy step (outcome) | Merkle check (`method="hash"`) |
//! | --- | --- | --- |
//! | mainline | `module_sig_check(struct load_info *, int)` | none |
//! | hash v1 | `module_sig_check(info, flags)` | `module_hash_check(info, flags)`, run after it |
//! | hash v2/v3 | `module_integrity_check(info, flags)` | `module_hash_check(info, flags)` |
//! | hash v4 | `module_sig_check(info, flags)` | `module_hash_check(info, sig, sig_len)` |
//! | hash v5 | `module_auth_check(info, flags)` | `module_hash_check(mod, mod_len, sig, sig_len)` |
//!
//! In v5, `mod_verify_sig(mod, info)` dispatches to `module_sig_check(mod, mod_len, sig,
//! sig_len)` (PKCS#7 only, inside the check, never the policy) or to `module_hash_check`; so
//! `mod_verify_sig` runs for both methods there, and a load whose hash check ran is `hash`.

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
    /// The Merkle-proof check.
    pub hash: Option<&'static str>,
}

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

/// Decides from the running kernel's BTF.
pub fn decide(btf: Option<&KernelBtf>) -> IntegrityFunctions {
    let Some(btf) = btf else {
        return IntegrityFunctions {
            shape: Shape::Unknown,
            policy: Some("module_sig_check"),
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
        [a, b, c, d] if is_buffer(a) && is_size(b) && is_buffer(c) && is_size(d) => {
            Some(Shape::HashV5)
        }
        _ => None,
    });
    let found = |shape, policy, hash| IntegrityFunctions {
        shape,
        policy,
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

#[cfg(test)]
#[path = "btf_writer.rs"]
mod btf_writer;

#[cfg(test)]
mod tests {
    use super::{btf_writer::BtfWriter, *};

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
            ("mod_verify_sig", &["const void *", "struct load_info *"]),
        ]);
        let found = decide(Some(&btf));
        assert_eq!(
            found,
            IntegrityFunctions {
                shape: Shape::Mainline,
                policy: Some("module_sig_check"),
                hash: None
            }
        );
        // Before 5.19 module_sig_check is inlined: nothing to attach for the policy.
        let old = kernel(&[("mod_verify_sig", &["const void *", "struct load_info *"])]);
        assert_eq!(decide(Some(&old)).policy, None);
        assert_eq!(decide(Some(&old)).shape, Shape::Mainline);
    }

    #[test]
    fn v1_and_v2_share_the_hash_prototype_and_differ_by_the_dispatcher() {
        let v1 = kernel(&[
            ("module_sig_check", INFO_FLAGS),
            ("module_hash_check", INFO_FLAGS),
        ]);
        assert_eq!(
            decide(Some(&v1)),
            IntegrityFunctions {
                shape: Shape::HashV1,
                policy: Some("module_sig_check"),
                hash: Some("module_hash_check")
            }
        );
        let v2 = kernel(&[
            ("module_integrity_check", INFO_FLAGS),
            ("module_sig_check", INFO_FLAGS),
            ("module_hash_check", INFO_FLAGS),
        ]);
        assert_eq!(
            decide(Some(&v2)),
            IntegrityFunctions {
                shape: Shape::HashV2,
                policy: Some("module_integrity_check"),
                hash: Some("module_hash_check")
            }
        );
    }

    #[test]
    fn v4() {
        let btf = kernel(&[
            ("module_sig_check", INFO_FLAGS),
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
                hash: Some("module_hash_check")
            }
        );
    }

    #[test]
    fn v5_never_takes_the_pkcs7_check_for_the_policy() {
        let btf = kernel(&[
            ("module_auth_check", INFO_FLAGS),
            ("mod_verify_sig", &["const void *", "struct load_info *"]),
            ("module_sig_check", BUFFERS),
            ("module_hash_check", BUFFERS),
        ]);
        assert_eq!(
            decide(Some(&btf)),
            IntegrityFunctions {
                shape: Shape::HashV5,
                policy: Some("module_auth_check"),
                hash: Some("module_hash_check")
            }
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
