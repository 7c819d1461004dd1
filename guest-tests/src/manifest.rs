//! The fixtures' manifest, which the host writes into the guest's /vm/mods/manifest and the
//! scenarios print back: `file=NAME key=value...`, one module file a line.
use std::fmt::Write as _;

/// A manifest value with every byte that is not printable ASCII, and `%` itself, written as
/// `%XX`: a space would otherwise split the field in two.
pub fn field(value: &str) -> String {
    value.bytes().fold(String::new(), |mut s, b| {
        if b.is_ascii_graphic() && b != b'%' {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "%{b:02X}");
        }
        s
    })
}

/// A manifest value as written by [`field`], decoded (`%XX` back to its byte).
pub fn unfield(value: &str) -> String {
    let bytes = value.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(bytes.len()), 0);
    while i < bytes.len() {
        let code = (bytes[i] == b'%')
            .then(|| value.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match code {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_values_round_trip() {
        for value in ["observer test signing key", "100% key", "plain"] {
            assert_eq!(unfield(&field(value)), value);
        }
        assert_eq!(field("a b"), "a%20b");
        assert_eq!(field("a b%c"), "a%20b%25c");
    }
}
