//! A minimal BTF writer for tests: enough types (integers, typedefs, `const`, pointers,
//! structs, function prototypes and functions) to describe the kernel functions the agent
//! decides from the way its `/sys/kernel/btf/vmlinux` would.

use std::collections::HashMap;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_TYPEDEF: u32 = 8;
const KIND_CONST: u32 = 10;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const INT_SIGNED: u32 = 1;

#[derive(Default)]
pub struct BtfWriter {
    types: Vec<u8>,
    strings: Vec<u8>,
    count: u32,
    /// Types already written, by their C spelling.
    known: HashMap<String, u32>,
}

impl BtfWriter {
    fn string(&mut self, text: &str) -> u32 {
        if self.strings.is_empty() {
            self.strings.push(0);
        }
        if text.is_empty() {
            return 0;
        }
        let offset = self.strings.len() as u32;
        self.strings.extend_from_slice(text.as_bytes());
        self.strings.push(0);
        offset
    }

    fn push(&mut self, name: &str, kind: u32, vlen: u32, size_or_type: u32, extra: &[u32]) -> u32 {
        let name = self.string(name);
        for word in [name, (kind << 24) | vlen, size_or_type]
            .iter()
            .chain(extra)
        {
            self.types.extend_from_slice(&word.to_le_bytes());
        }
        self.count += 1;
        self.count
    }

    /// The id of a type written as C does: `int`, `unsigned long`, `size_t`, `struct x *`,
    /// `const void *` (void is id 0).
    pub fn c_type(&mut self, text: &str) -> u32 {
        let text = text.trim();
        if text == "void" {
            return 0;
        }
        if let Some(&id) = self.known.get(text) {
            return id;
        }
        let id = if let Some(pointee) = text.strip_suffix('*') {
            let inner = self.c_type(pointee);
            self.push("", KIND_PTR, 0, inner, &[])
        } else if let Some(rest) = text.strip_prefix("const ") {
            let inner = self.c_type(rest);
            self.push("", KIND_CONST, 0, inner, &[])
        } else if let Some(name) = text.strip_prefix("struct ") {
            self.push(name, KIND_STRUCT, 0, 0, &[])
        } else if text == "size_t" {
            let inner = self.c_type("unsigned long");
            self.push("size_t", KIND_TYPEDEF, 0, inner, &[])
        } else {
            let (size, signed) = match text {
                "unsigned long" | "long unsigned int" => (8, 0),
                "long" => (8, INT_SIGNED),
                "unsigned int" => (4, 0),
                "unsigned char" | "u8" => (1, 0),
                _ => (4, INT_SIGNED),
            };
            self.push(text, KIND_INT, 0, size, &[(signed << 24) | (size * 8)])
        };
        self.known.insert(text.to_owned(), id);
        id
    }

    /// `int name(params...)`, global.
    pub fn function(&mut self, name: &str, params: &[u32]) -> u32 {
        let int = self.c_type("int");
        let mut words = Vec::new();
        for (i, param) in params.iter().enumerate() {
            words.push(self.string(&format!("arg{i}")));
            words.push(*param);
        }
        let proto = self.push("", KIND_FUNC_PROTO, params.len() as u32, int, &words);
        self.push(name, KIND_FUNC, 1, proto, &[])
    }

    /// The whole BTF blob: header, types, strings.
    pub fn finish(mut self) -> Vec<u8> {
        self.string("");
        let (types, strings) = (self.types.len() as u32, self.strings.len() as u32);
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [24, 0, types, types, strings] {
            out.extend_from_slice(&u32::to_le_bytes(word));
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}
