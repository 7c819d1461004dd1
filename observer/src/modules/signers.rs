//! Who signed a module: the trusted key that verified it, named as /proc/keys names it
//! ("<subject CN>: <subject key id>"), and the identifier a signature names its key by, which
//! is all there is when no trusted key matches (a DKMS or MOK key the kernel was not given).

use std::{cell::RefCell, collections::BTreeMap};

use observer_common::modules::{
    DIGEST_LEN, KEY_ID_LEN, ModuleLoad, SEEN_DIGEST, SEEN_KEY_FOUND, SEEN_KEY_ID,
};
use serde::Serialize;

/// The keys' descriptions by serial, from /proc/keys: read again when a serial is not there
/// yet (keys are added at boot and by `keyctl`, rarely).
#[derive(Debug, Default)]
pub struct KeyNames {
    by_serial: RefCell<BTreeMap<i32, String>>,
}

impl KeyNames {
    /// The description of the key with this serial, or `key <serial in hex>` when /proc/keys
    /// does not show it to the agent (a key it may not view). /proc/keys is read once per
    /// serial not yet named: a key's serial is never reused for another key, so a name, once
    /// given, stays (and a scrape does not read the file again for a key it cannot see).
    pub fn name(&self, serial: i32) -> String {
        if let Some(name) = self.by_serial.borrow().get(&serial) {
            return name.clone();
        }
        let mut by_serial = self.by_serial.borrow_mut();
        match std::fs::read_to_string("/proc/keys") {
            Ok(text) => by_serial.extend(parse_proc_keys(&text)),
            Err(e) => log::debug!("reading /proc/keys: {e}"),
        }
        by_serial
            .entry(serial)
            .or_insert_with(|| format!("key {serial:08x}"))
            .clone()
    }
}

/// Serial → description of each asymmetric key in /proc/keys. A line: `serial flags usage
/// expiry perm uid gid type description: summary`, the serial in hex, the type cut to 9
/// characters (`asymmetri`); an asymmetric key's summary follows its description after the
/// last ": " (`X509.rsa 4c6c0d1f []`).
pub fn parse_proc_keys(text: &str) -> BTreeMap<i32, String> {
    let mut keys = BTreeMap::new();
    for line in text.lines() {
        let mut rest = line.trim_start();
        let mut fields = Vec::with_capacity(8);
        for _ in 0..8 {
            let Some((field, tail)) = rest.split_once(char::is_whitespace) else {
                break;
            };
            fields.push(field);
            rest = tail.trim_start();
        }
        if fields.len() < 8 || !fields[7].starts_with("asymmetri") {
            continue;
        }
        let Ok(serial) = u32::from_str_radix(fields[0], 16) else {
            continue;
        };
        let description = rest.rsplit_once(": ").map_or(rest, |(d, _)| d);
        keys.insert(serial as i32, description.to_owned());
    }
    keys
}

/// The identifier a signature names its key by, as the kernel matched it against its keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyId {
    /// A subject key identifier (hex), or the certificate's serial number (hex) when the
    /// signature names its key by issuer and serial (sign-file's default).
    pub key_id: String,
    /// The issuer's common name, when the signature names issuer and serial.
    #[serde(rename = "key_issuer", skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
}

/// What the record says of the signer: the trusted key's description (`signer`) and the key's
/// id. The id of a trusted key is the one in its description (its subject key identifier,
/// what /proc/keys shows); otherwise it comes from the signature itself.
pub fn key_of(load: &ModuleLoad, names: &KeyNames) -> (Option<String>, Option<KeyId>) {
    let signer = (load.seen & SEEN_KEY_FOUND != 0).then(|| names.name(load.signer.serial));
    let from_description = signer
        .as_deref()
        .and_then(|s| s.rsplit_once(": "))
        .map(|(_, id)| id)
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()));
    let from_signature = (load.seen & SEEN_KEY_ID != 0).then(|| {
        let len = (load.signer.id_len as usize).min(KEY_ID_LEN);
        parse_key_id(&load.signer.id[..len])
    });
    let key = match (from_description, from_signature) {
        (Some(id), signature) => Some(KeyId {
            key_id: id.to_owned(),
            issuer: signature.and_then(|s| s.issuer),
        }),
        (None, signature) => signature,
    };
    (signer, key)
}

/// An `asymmetric_key_id`'s bytes: a serial number followed by its issuer's name (the DER
/// Name's content, its relative names: SETs that end exactly at the end; or the whole Name), or
/// else a subject key identifier.
pub fn parse_key_id(data: &[u8]) -> KeyId {
    for split in 1..data.len() {
        let rest = &data[split..];
        let names = match rest[0] {
            0x31 if sets_cover(rest) => Some(rest),
            0x30 if der_length(rest) == Some(rest.len()) => der_header(rest)
                .and_then(|(_, header, _)| rest.get(header..))
                .filter(|content| sets_cover(content)),
            _ => None,
        };
        if let Some(names) = names {
            return KeyId {
                key_id: hex(&data[..split]),
                issuer: common_name(names),
            };
        }
    }
    KeyId {
        key_id: hex(data),
        issuer: None,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A DER element's tag, header length and content length.
fn der_header(der: &[u8]) -> Option<(u8, usize, usize)> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if first < 0x80 {
        return Some((tag, 2, usize::from(first)));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 || rest.len() < count {
        return None;
    }
    let len = rest[..count]
        .iter()
        .fold(0usize, |n, &b| (n << 8) | usize::from(b));
    Some((tag, 2 + count, len))
}

/// The whole length of the DER element at the start of `der`.
fn der_length(der: &[u8]) -> Option<usize> {
    der_header(der).map(|(_, header, len)| header + len)
}

/// The elements inside a constructed DER element's content.
fn der_children(content: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = content;
    std::iter::from_fn(move || {
        let (tag, header, len) = der_header(rest)?;
        let body = rest.get(header..header + len)?;
        rest = &rest[header + len..];
        Some((tag, body))
    })
}

/// `content` is a run of whole DER SETs (a Name's relative distinguished names), nothing after.
fn sets_cover(content: &[u8]) -> bool {
    let mut covered = 0;
    for (tag, _) in der_children(content) {
        if tag != 0x31 {
            return false;
        }
        covered += der_length(&content[covered..]).unwrap_or(0);
    }
    covered == content.len() && covered > 0
}

/// The commonName (2.5.4.3) among a Name's relative names: SET of SEQUENCE { OID, string }.
fn common_name(rdns: &[u8]) -> Option<String> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    for (_, set) in der_children(rdns) {
        for (_, attribute) in der_children(set) {
            let mut parts = der_children(attribute);
            if let (Some((0x06, oid)), Some((_, value))) = (parts.next(), parts.next())
                && oid == COMMON_NAME
            {
                return Some(String::from_utf8_lossy(value).into_owned());
            }
        }
    }
    None
}

/// A digest's bytes as hex, when the check computed one.
pub fn digest_hex(load: &ModuleLoad) -> Option<String> {
    let len = (load.signed_digest.len as usize).min(DIGEST_LEN);
    (load.seen & SEEN_DIGEST != 0 && len > 0).then(|| hex(&load.signed_digest.value[..len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_keys_lines() {
        let text = "1e0ba8fb I------     1 perm 1f030000     0     0 keyring   .builtin_trusted_keys: 1\n\
                    3a8b2c4f I------     1 perm 1f030000     0     0 asymmetri Debian Secure Boot CA: 6ccece7e4c6c0d1f6149f3dd27dfcc5cbb419ea1: X509.rsa bb419ea1 []\n";
        let keys = parse_proc_keys(text);
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys[&0x3a8b2c4f],
            "Debian Secure Boot CA: 6ccece7e4c6c0d1f6149f3dd27dfcc5cbb419ea1"
        );
    }

    #[test]
    fn issuer_and_serial_or_subject_key_id() {
        // Serial 0x1a2b, issuer "CN=test key": SEQUENCE { SET { SEQUENCE { OID 2.5.4.3,
        // UTF8String "test key" } } }.
        let cn = b"test key";
        let attribute = [
            &[
                0x30,
                (5 + 2 + cn.len()) as u8,
                0x06,
                0x03,
                0x55,
                0x04,
                0x03,
                0x0c,
                cn.len() as u8,
            ][..],
            cn,
        ]
        .concat();
        let set = [&[0x31, attribute.len() as u8][..], &attribute].concat();
        let name = [&[0x30, set.len() as u8][..], &set].concat();
        let id = [&[0x1a, 0x2b][..], &name].concat();
        assert_eq!(
            parse_key_id(&id),
            KeyId {
                key_id: "1a2b".into(),
                issuer: Some("test key".into())
            }
        );
        // As the kernel keeps it: the Name's content after the serial (its SETs).
        let id = [&[0x00, 0xea, 0x1a][..], &set].concat();
        assert_eq!(
            parse_key_id(&id),
            KeyId {
                key_id: "00ea1a".into(),
                issuer: Some("test key".into())
            }
        );
        let skid = [0xab; 20];
        assert_eq!(parse_key_id(&skid).key_id, "ab".repeat(20));
        assert_eq!(parse_key_id(&skid).issuer, None);
    }
}
