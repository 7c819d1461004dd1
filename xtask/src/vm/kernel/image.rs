//! The bootable ELF kernel inside a distribution's bzImage, and a helper to pipe bytes through
//! the (de)compressors it and the modules need.
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

/// The ELF kernel inside a bzImage. The x86 boot header says where the compressed payload is
/// (`setup_sects` at 0x1f1, `payload_offset`/`payload_length` at 0x248, boot protocol 2.08+); the
/// build appends the uncompressed size as 4 little-endian bytes, which decompressors must not see.
pub fn extract_vmlinux(bzimage: &[u8]) -> anyhow::Result<Vec<u8>> {
    ensure!(
        bzimage.get(0x202..0x206) == Some(b"HdrS"),
        "not a bzImage (no HdrS boot header)"
    );
    let u32_at = |at: usize| -> anyhow::Result<u32> {
        let bytes = bzimage
            .get(at..at + 4)
            .context("bzImage header cut short")?;
        Ok(u32::from_le_bytes(bytes.try_into()?))
    };
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + usize::try_from(u32_at(0x248)?)?;
    let length = usize::try_from(u32_at(0x24c)?)?;
    let payload = bzimage
        .get(start..start + length)
        .context("bzImage payload out of bounds")?;
    let (compressed, size) = payload.split_at(length - 4);
    let size = u32::from_le_bytes(size.try_into()?) as usize;
    let tool: &[&str] = if compressed.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        &["zstd", "-dcq"]
    } else if compressed.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        &["xz", "-dcq"]
    } else if compressed.starts_with(&[0x1f, 0x8b]) {
        &["gzip", "-dcq"]
    } else {
        bail!(
            "unknown kernel compression (payload starts {:02x?})",
            &compressed[..compressed.len().min(6)]
        );
    };
    let vmlinux = pipe_through(tool, compressed)?;
    ensure!(
        vmlinux.starts_with(b"\x7fELF") && vmlinux.len() == size,
        "the decompressed kernel is not the {size}-byte ELF the bzImage announces"
    );
    Ok(vmlinux)
}

/// Runs `tool` with `input` on its standard input and returns its standard output.
pub fn pipe_through(tool: &[&str], input: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tool[0]))?;
    let mut stdin = child.stdin.take().context("no stdin")?;
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer thread panicked"))?
        .with_context(|| format!("feeding {}", tool[0]))?;
    ensure!(out.status.success(), "{tool:?} failed: {}", out.status);
    Ok(out.stdout)
}
