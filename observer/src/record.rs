//! Reading records from the kernel: bytes are checked, never trusted.

/// Reads a `T` from the front of `bytes`, if they are long enough.
pub fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length is checked and `T` is plain data valid for any bit pattern;
    // read_unaligned makes no alignment assumption about the ring buffer's bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// A task's `comm` (or any NUL-padded kernel string) as text, up to the first NUL.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// A module's name as the kernel spells it, from the file it was read from: the stem before
/// `.ko`, with `-` as `_` (what `modprobe` and /sys/module do).
pub fn module_name_from_file(file: &[u8]) -> Option<String> {
    let file = comm_str(file);
    let stem = file.split(".ko").next().unwrap_or(&file);
    (!stem.is_empty()).then(|| stem.replace('-', "_"))
}

/// A record as the bytes the ring buffer would carry (for tests that feed the decoders).
#[cfg(test)]
pub fn record_bytes<T: aya::Pod>(record: &T) -> Vec<u8> {
    // SAFETY: `T` is plain `#[repr(C)]` data; its bytes are its value.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(record).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

#[cfg(test)]
mod tests {
    use observer_common::EventHeader;

    use super::*;

    #[test]
    fn short_records_are_refused_and_strings_end_at_nul() {
        assert_eq!(read_record::<EventHeader>(&[0u8; 8]), None);
        assert!(read_record::<EventHeader>(&[0u8; size_of::<EventHeader>()]).is_some());
        assert_eq!(comm_str(b"bash\0\0\0\0garbage!"), "bash");
        assert_eq!(comm_str(b"sixteen-bytes-xx"), "sixteen-bytes-xx");
    }

    #[test]
    fn module_names_from_files() {
        assert_eq!(
            module_name_from_file(b"crc-itu-t.ko.xz\0").as_deref(),
            Some("crc_itu_t")
        );
        assert_eq!(module_name_from_file(b".ko\0"), None);
    }
}
