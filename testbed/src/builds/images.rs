//! Test images built here, not downloaded: an OCI layout with layers of
//! incompressible bytes, pushed to a test registry with skopeo.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::builds::fixtures::require_tool;
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
    let layout = Layout::new(work, repository, tag)?;
    let built = layout.manifest(repository, tag, "amd64", layer_sizes)?;
    layout.write_index(json!({"schemaVersion": 2, "manifests": [{
        "mediaType": MANIFEST, "digest": built.digest, "size": built.manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]}))?;
    let reference = format!("{registry}/{repository}:{tag}");
    layout.push(tag, &reference, login, false)?;
    Ok(Image {
        reference,
        repository: repository.to_string(),
        digest: built.digest,
        blobs: built.blobs,
        size: built.size,
    })
}

/// A multi-platform image: an index with one manifest per architecture.
#[derive(Clone, Debug)]
pub struct MultiPlatformImage {
    /// `<registry>/<repository>:<tag>`
    pub reference: String,
    pub repository: String,
    /// Digest of the index.
    pub digest: String,
    /// Per architecture (`amd64`, `arm64`, ...): its manifest, blobs and size.
    pub platforms: std::collections::BTreeMap<String, Image>,
}

/// Builds an image index whose platforms (`linux/<arch>` for each of
/// `architectures`) each have their own layers of `layer_sizes`, and pushes
/// it with every platform.
pub fn build_and_push_multi_platform(
    work: &Path,
    registry: &str,
    repository: &str,
    tag: &str,
    architectures: &[&str],
    layer_sizes: &[usize],
) -> Result<MultiPlatformImage> {
    let layout = Layout::new(work, repository, tag)?;
    let reference = format!("{registry}/{repository}:{tag}");
    let mut entries = Vec::new();
    let mut platforms = std::collections::BTreeMap::new();
    for arch in architectures {
        let built = layout.manifest(repository, tag, arch, layer_sizes)?;
        entries.push(json!({
            "mediaType": MANIFEST, "digest": built.digest, "size": built.manifest_size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
        platforms.insert(
            arch.to_string(),
            Image {
                reference: format!("{registry}/{repository}@{}", built.digest),
                repository: repository.to_string(),
                digest: built.digest,
                blobs: built.blobs,
                size: built.size,
            },
        );
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": INDEX, "manifests": entries,
    }))
    .expect("json");
    let (digest, index_size) = layout.put(&index)?;
    layout.write_index(json!({"schemaVersion": 2, "manifests": [{
        "mediaType": INDEX, "digest": digest, "size": index_size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }]}))?;
    layout.push(tag, &reference, None, true)?;
    Ok(MultiPlatformImage {
        reference,
        repository: repository.to_string(),
        digest,
        platforms,
    })
}

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// An OCI layout directory being filled.
struct Layout {
    dir: std::path::PathBuf,
    blobs: std::path::PathBuf,
}

/// One platform's manifest, as written into a layout.
struct Built {
    digest: String,
    manifest_size: u64,
    /// Config and layers.
    blobs: Vec<String>,
    /// Bytes of config and layers.
    size: u64,
}

impl Layout {
    fn new(work: &Path, repository: &str, tag: &str) -> Result<Self> {
        let dir = work.join(format!("{}-{tag}", repository.replace('/', "_")));
        let blobs = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        Ok(Layout { dir, blobs })
    }

    fn put(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let digest = sha256(bytes);
        let path = self.blobs.join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).map_err(io_err(&path))?;
        Ok((digest, bytes.len() as u64))
    }

    /// Layers of `layer_sizes` (their bytes depend on repository, tag,
    /// architecture and position), a config for `linux/<arch>`, a manifest.
    fn manifest(
        &self,
        repository: &str,
        tag: &str,
        arch: &str,
        layer_sizes: &[usize],
    ) -> Result<Built> {
        let tar = require_tool("tar")?;
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, size) in layer_sizes.iter().enumerate() {
            let root = self.dir.join(format!("layer-{arch}-{i}"));
            std::fs::create_dir_all(&root).map_err(io_err(&root))?;
            // amd64 keeps the seeds single-platform images always had.
            let seed = if arch == "amd64" {
                crd::names::stable_hash(&[repository, tag, &i.to_string()])
            } else {
                crd::names::stable_hash(&[repository, tag, arch, &i.to_string()])
            };
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
            let (digest, size) = self.put(&out.stdout)?;
            diff_ids.push(digest.clone());
            layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}));
        }
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/data-0.bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("json");
        let (config_digest, config_size) = self.put(&config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
            "layers": layers,
        }))
        .expect("json");
        let (digest, manifest_size) = self.put(&manifest)?;
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
        Ok(Built {
            digest,
            manifest_size,
            blobs,
            size,
        })
    }

    fn write_index(&self, index: serde_json::Value) -> Result<()> {
        let write = |name: &str, value: serde_json::Value| -> Result<()> {
            let p = self.dir.join(name);
            std::fs::write(&p, value.to_string()).map_err(io_err(&p))
        };
        write("oci-layout", json!({"imageLayoutVersion": "1.0.0"}))?;
        write("index.json", index)
    }

    /// `skopeo copy` of the layout's `tag` to `reference` (every platform when `all`).
    fn push(
        &self,
        tag: &str,
        reference: &str,
        login: Option<(&str, &str)>,
        all: bool,
    ) -> Result<()> {
        let skopeo = require_tool("skopeo")?;
        let mut copy = Command::new(&skopeo);
        copy.args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ]);
        if all {
            copy.arg("--all");
        }
        if let Some((user, password)) = login {
            copy.arg(format!("--dest-creds={user}:{password}"));
        }
        let out = copy
            .arg(format!("oci:{}:{tag}", self.dir.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .map_err(io_err(&skopeo))?;
        if !out.status.success() {
            return Err(Error::Build {
                what: "test image push",
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }
}

/// The pod sandbox's pause image of the cluster bed, built from
/// `testbed/go/pause` (static, no C library) and pushed as `name` (the bed
/// pushes it as [`crate::beds::cluster::PAUSE`]; tests use it as a workload that
/// runs and does nothing).
pub fn push_pause(work: &Path, registry: &str, name: &str) -> Result<()> {
    let source = include_str!("../../go/pause/main.go");
    let bin = crate::builds::fixtures::cache_dir()
        .join("bin")
        .join(format!(
            "pause-{:08x}",
            crd::names::stable_hash(&[source]) as u32
        ));
    if !bin.is_file() {
        std::fs::create_dir_all(work).map_err(io_err(work))?;
        std::fs::write(work.join("main.go"), source).map_err(io_err(work))?;
        std::fs::write(work.join("go.mod"), "module pause\n\ngo 1.22\n").map_err(io_err(work))?;
        std::fs::create_dir_all(bin.parent().expect("bin dir")).map_err(io_err(&bin))?;
        let built = work.join("pause");
        let ok = Command::new(require_tool("go")?)
            .args(["build", "-o"])
            .arg(&built)
            .arg(".")
            .current_dir(work)
            .env("CGO_ENABLED", "0")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(Error::Build {
                what: "the pause binary",
                detail: format!("go build in {}", work.display()),
            });
        }
        std::fs::rename(&built, &bin).map_err(io_err(&bin))?;
    }
    let (repository, tag) = name.rsplit_once(':').unwrap_or((name, "latest"));
    let local = crate::builds::oci::build(&bin, repository, tag, crate::builds::oci::NONROOT)?;
    crate::builds::oci::push(&local, &format!("{registry}/{repository}:{tag}"))
}
