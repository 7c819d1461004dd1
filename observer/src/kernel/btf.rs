//! The running kernel's BTF: which functions exist and their prototypes, enum values, struct
//! member offsets and sizes.

use std::collections::BTreeMap;

use anyhow::Context as _;
use btf_rs::{Backend, Btf, Type};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// The running kernel's type information, when it has any.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn load() -> anyhow::Result<Self> {
        // Mapped and read on demand where the kernel lets sysfs BTF be mapped (6.16+): far less
        // memory than parsing every type; parsed otherwise.
        let btf = Btf::from_file_with_backend(BTF_PATH, Backend::Mmap)
            .or_else(|_| Btf::from_file(BTF_PATH))
            .with_context(|| {
                format!("reading {BTF_PATH} (a kernel built with CONFIG_DEBUG_INFO_BTF has it)")
            })?;
        Ok(Self { btf })
    }

    /// Type information from raw BTF bytes (one a test wrote).
    #[cfg(test)]
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        Ok(Self {
            btf: Btf::from_bytes(bytes).context("parsing BTF")?,
        })
    }

    /// The parameter types of function `name`, written as C would (`struct load_info *`,
    /// `const void *`, `size_t`, `int`), when the kernel has that function.
    pub fn function_params(&self, name: &str) -> Option<Vec<String>> {
        let types = self.btf.resolve_types_by_name(name).ok()?;
        let func = types.iter().find_map(|t| match t {
            Type::Func(f) => Some(f.clone()),
            _ => None,
        })?;
        let Ok(Type::FuncProto(proto)) = self.btf.resolve_chained_type(&func) else {
            return None;
        };
        Some(
            proto
                .parameters
                .iter()
                .map(|p| match self.btf.resolve_chained_type(p) {
                    Ok(t) => self.type_text(&t, 0),
                    Err(_) => "?".into(),
                })
                .collect(),
        )
    }

    /// A type as C writes it; `depth` bounds the walk through pointers and qualifiers.
    fn type_text(&self, t: &Type, depth: u32) -> String {
        let named = |kind: &str, item: &dyn btf_rs::BtfType| {
            let name = self.btf.resolve_name(item).unwrap_or_default();
            if kind.is_empty() {
                name
            } else {
                format!("{kind} {name}")
            }
        };
        let inner = |item: &dyn btf_rs::BtfType| match self
            .btf
            .resolve_type_by_id(item.get_type_id().unwrap_or(0))
        {
            Ok(next) if depth < 8 => self.type_text(&next, depth + 1),
            _ => "?".into(),
        };
        match t {
            Type::Void => "void".into(),
            Type::Int(i) => named("", i),
            Type::Float(f) => named("", f),
            Type::Typedef(td) => named("", td),
            Type::Struct(st) => named("struct", st),
            Type::Union(u) => named("union", u),
            Type::Enum(e) => named("enum", e),
            Type::Enum64(e) => named("enum", e),
            Type::Fwd(f) => named("struct", f),
            Type::Ptr(p) => format!("{} *", inner(p)),
            Type::Const(c) => format!("const {}", inner(c)),
            Type::Volatile(v) => format!("volatile {}", inner(v)),
            Type::Restrict(r) => inner(r),
            Type::TypeTag(tt) => inner(tt),
            Type::FuncProto(_) => "function".into(),
            _ => "?".into(),
        }
    }

    /// Size in bytes of `member` in `struct <name>` (an array's whole length).
    pub fn member_size(&self, name: &str, member: &str) -> Option<u32> {
        let (_, id) = self.find_member_in(name, member)?;
        let mut t = self.btf.resolve_type_by_id(id).ok()?;
        // Through typedefs and qualifiers to the type that has a size.
        for _ in 0..8 {
            t = match t {
                Type::Typedef(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Const(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Volatile(ref x) => self.btf.resolve_chained_type(x).ok()?,
                _ => break,
            };
        }
        let size = match t {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Enum(e) => e.size(),
            Type::Array(a) => {
                let element = self.btf.resolve_chained_type(&a).ok()?;
                let element_size = match element {
                    Type::Int(i) => i.size(),
                    Type::Ptr(_) => 8,
                    Type::Struct(s) | Type::Union(s) => s.size(),
                    _ => return None,
                };
                a.len() * element_size
            }
            _ => return None,
        };
        u32::try_from(size).ok()
    }

    /// True when the kernel has a (non-inlined) function of that name.
    pub fn has_function(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .is_ok_and(|types| types.iter().any(|t| matches!(t, Type::Func(_))))
    }

    /// The enumerators of `enum <name>`, by value.
    pub fn enum_values(&self, name: &str) -> BTreeMap<u32, String> {
        let mut values = BTreeMap::new();
        for t in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            if let Type::Enum(e) = t {
                for member in &e.members {
                    if let Ok(member_name) = self.btf.resolve_name(member) {
                        values.insert(member.val(), member_name);
                    }
                }
            }
        }
        values
    }

    /// Byte offset of `member` in `struct <name>`, looking through anonymous members.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        self.find_member_in(name, member).map(|(offset, _)| offset)
    }

    /// Byte offset and type id of `member` in `struct <name>`.
    fn find_member_in(&self, name: &str, member: &str) -> Option<(u32, u32)> {
        self.btf
            .resolve_types_by_name(name)
            .ok()?
            .iter()
            .find_map(|t| match t {
                Type::Struct(s) => self.find_member(s, member, 0),
                _ => None,
            })
    }

    fn find_member(&self, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Option<(u32, u32)> {
        use btf_rs::BtfType as _;
        for m in &s.members {
            let bits = base_bits + m.bit_offset();
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == member {
                return Some((bits / 8, m.get_type_id().unwrap_or(0)));
            }
            if name.is_empty()
                && let Ok(Type::Struct(inner) | Type::Union(inner)) =
                    self.btf.resolve_chained_type(m)
                && let Some(found) = self.find_member(&inner, member, bits)
            {
                return Some(found);
            }
        }
        None
    }
}
