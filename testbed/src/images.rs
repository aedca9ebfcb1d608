//! Test images built here, not downloaded: an OCI layout with layers of
//! incompressible bytes, pushed to a test registry with skopeo.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::fixtures::require_tool;
use crate::{Error, Result, io_err};

/// What was pushed.
#[derive(Clone, Debug)]
pub struct Image {
    /// `<registry>/<repository>:<tag>`
    pub reference: String,
    pub repository: String,
    /// Digest of the manifest.
    pub digest: String,
    /// Digests of the config and layer blobs.
    pub blobs: Vec<String>,
    /// Bytes of all blobs.
    pub size: u64,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Deterministic, incompressible bytes: the same seed gives the same layer,
/// so two images share a layer exactly when asked to.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Builds an image with one layer per entry of `layer_sizes` (bytes) and
/// pushes it to `registry` (`127.0.0.1:port`, plain HTTP) as `repository:tag`.
pub fn build_and_push(
    work: &Path,
    registry: &str,
    repository: &str,
    tag: &str,
    layer_sizes: &[usize],
) -> Result<Image> {
    build_and_push_as(work, registry, repository, tag, layer_sizes, None)
}

/// [`build_and_push`] to a registry that wants a login.
pub fn build_and_push_as(
    work: &Path,
    registry: &str,
    repository: &str,
    tag: &str,
    layer_sizes: &[usize],
    login: Option<(&str, &str)>,
) -> Result<Image> {
    let skopeo = require_tool("skopeo")?;
    let tar = require_tool("tar")?;
    let layout = work.join(format!("{}-{tag}", repository.replace('/', "_")));
    let blobs_dir = layout.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs_dir).map_err(io_err(&blobs_dir))?;
    let put = |bytes: &[u8]| -> Result<(String, u64)> {
        let digest = sha256(bytes);
        let path = blobs_dir.join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).map_err(io_err(&path))?;
        Ok((digest, bytes.len() as u64))
    };

    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let root = layout.join(format!("layer-{i}"));
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let seed = crd::names::stable_hash(&[repository, tag, &i.to_string()]);
        let file = root.join(format!("data-{i}.bin"));
        std::fs::write(&file, noise(seed, *size)).map_err(io_err(&file))?;
        // Uncompressed tar layers: the bytes on the wire are the bytes asked for.
        let out = Command::new(&tar)
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-C",
            ])
            .arg(&root)
            .args(["-cf", "-", "."])
            .output()
            .map_err(io_err(&tar))?;
        if !out.status.success() {
            return Err(Error::Build {
                what: "test image layer",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let (digest, size) = put(&out.stdout)?;
        diff_ids.push(digest.clone());
        layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}));
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/data-0.bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("json");
    let (config_digest, config_size) = put(&config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layers,
    }))
    .expect("json");
    let (digest, manifest_size) = put(&manifest)?;
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]});
    let write = |name: &str, value: serde_json::Value| -> Result<()> {
        let p = layout.join(name);
        std::fs::write(&p, value.to_string()).map_err(io_err(&p))
    };
    write("oci-layout", json!({"imageLayoutVersion": "1.0.0"}))?;
    write("index.json", index)?;

    let reference = format!("{registry}/{repository}:{tag}");
    let mut copy = Command::new(&skopeo);
    copy.args([
        "--insecure-policy",
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ]);
    if let Some((user, password)) = login {
        copy.arg(format!("--dest-creds={user}:{password}"));
    }
    let out = copy
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .map_err(io_err(&skopeo))?;
    if !out.status.success() {
        return Err(Error::Build {
            what: "test image push",
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let mut blobs = vec![config_digest];
    blobs.extend(
        layers
            .iter()
            .map(|l| l["digest"].as_str().unwrap_or_default().to_string()),
    );
    let size = config_size
        + layers
            .iter()
            .map(|l| l["size"].as_u64().unwrap_or(0))
            .sum::<u64>();
    Ok(Image {
        reference,
        repository: repository.to_string(),
        digest,
        blobs,
        size,
    })
}
