//! The container image as an OCI image layout archive, written here without a container daemon:
//! one layer holding the static binary and its licences, a config naming it the entrypoint, a
//! manifest and an index. `skopeo copy oci-archive:<file> docker://<registry>/...` publishes it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{IMAGE, VERSION, archive::write_tar, output, sha256};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const SOURCE: &str = "https://github.com/observer-ebpf/observer";

/// Writes `observer-<version>-oci.tar` into `dist`, from the files in `stage`.
pub fn image(stage: &Path, dist: &Path, epoch: u64) -> anyhow::Result<PathBuf> {
    let work = stage.join("oci");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    let rootfs = work.join("rootfs");
    let doc = rootfs.join("usr/share/doc/observer");
    fs::create_dir_all(rootfs.join("usr/bin"))?;
    fs::create_dir_all(&doc)?;
    fs::copy(stage.join("observer"), rootfs.join("usr/bin/observer"))?;
    let root = crate::workspace_root();
    for licence in ["LICENSE-MIT", "LICENSE-APACHE"] {
        fs::copy(root.join(licence), doc.join(licence))?;
    }
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;

    let layer_tar = work.join("layer.tar");
    write_tar(&rootfs, &["usr"], epoch, &layer_tar, false)?;
    let diff_id = sha256(&layer_tar)?;
    let layer_gz = work.join("layer.tar.gz");
    write_tar(&rootfs, &["usr"], epoch, &layer_gz, true)?;
    let layer = blob(&blobs, LAYER, &fs::read(&layer_gz)?)?;

    let created = output(Command::new("date").args([
        "--utc",
        &format!("--date=@{epoch}"),
        "+%Y-%m-%dT%H:%M:%SZ",
    ]))?;
    let created = created.trim();
    let labels = json!({
        "org.opencontainers.image.title": "observer",
        "org.opencontainers.image.description": "eBPF runtime observer: module integrity, lockdown decisions and POSIX timer churn as Prometheus metrics",
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "MIT OR Apache-2.0",
        "org.opencontainers.image.created": created,
    });
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/bin/observer"],
            // Inside a container loopback is unreachable from outside: serve on every address
            // of the container's own network namespace (the DaemonSet passes the same flag).
            "Cmd": ["--web.listen-address=0.0.0.0:9745"],
            "ExposedPorts": { "9745/tcp": {} },
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": created, "created_by": "cargo xtask dist" }],
    });
    let config = blob(&blobs, CONFIG, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config,
        "layers": [layer],
        "annotations": labels,
    });
    let mut manifest = blob(&blobs, MANIFEST, &serde_json::to_vec(&manifest)?)?;
    // The tag skopeo finds the image by: `oci-archive:<file>:<version>`.
    manifest["annotations"] = json!({
        "org.opencontainers.image.ref.name": VERSION,
        "io.containerd.image.name": format!("{IMAGE}:{VERSION}"),
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        serde_json::to_vec(&json!({ "imageLayoutVersion": "1.0.0" }))?,
    )?;
    let out = dist.join(format!("observer-{VERSION}-oci.tar"));
    write_tar(
        &layout,
        &["blobs", "index.json", "oci-layout"],
        epoch,
        &out,
        false,
    )?;
    Ok(out)
}

/// Stores `bytes` under its digest and returns its descriptor.
fn blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> anyhow::Result<Value> {
    let staged = blobs.join("incoming");
    fs::write(&staged, bytes)?;
    let digest = sha256(&staged)?;
    fs::rename(&staged, blobs.join(&digest)).context("naming a blob by its digest")?;
    Ok(json!({
        "mediaType": media_type,
        "digest": format!("sha256:{digest}"),
        "size": bytes.len(),
    }))
}
