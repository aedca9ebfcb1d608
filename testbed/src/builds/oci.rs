//! Container images of our binaries, assembled with buildah without a Docker
//! daemon: a scratch image holding the binary, the shared libraries it links
//! (read from `ldd`), and a non-root user. The release workflow builds the
//! same images from the Dockerfiles; this path needs no base image download.

use std::path::Path;
use std::process::Command;

use crate::builds::fixtures::require_tool;
use crate::{Error, Result};

/// The user the images run as (distroless "nonroot").
pub const NONROOT: &str = "65532:65532";

fn buildah(args: &[&str]) -> Result<String> {
    let bin = require_tool("buildah")?;
    let out = Command::new(bin)
        .args(["--storage-driver", "vfs"])
        .args(args)
        .output()
        .map_err(|e| Error::Build {
            what: "image",
            detail: format!("buildah: {e}"),
        })?;
    if !out.status.success() {
        return Err(Error::Build {
            what: "image",
            detail: format!(
                "buildah {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Shared libraries `binary` needs, as absolute paths.
fn libraries(binary: &Path) -> Result<Vec<String>> {
    let out = Command::new(require_tool("ldd")?)
        .arg(binary)
        .output()
        .map_err(|e| Error::Build {
            what: "image",
            detail: format!("ldd: {e}"),
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_string)
        })
        .collect())
}

/// Builds `name:tag` from `binary` (run as `user`) into buildah's local store.
pub fn build(binary: &Path, name: &str, tag: &str, user: &str) -> Result<String> {
    let reference = format!("localhost/{name}:{tag}");
    let container = buildah(&["from", "scratch"])?;
    let result = (|| {
        let target = format!("/usr/local/bin/{name}");
        buildah(&["copy", &container, &binary.display().to_string(), &target])?;
        for lib in libraries(binary)? {
            buildah(&["copy", &container, &lib, &lib])?;
        }
        // One folder per build: builds of one process run side by side.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("image-prefetch-etc-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(crate::io_err(&dir))?;
        let passwd = dir.join("passwd");
        std::fs::write(&passwd, "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
            .map_err(crate::io_err(&passwd))?;
        let group = dir.join("group");
        std::fs::write(&group, "root:x:0:\nnonroot:x:65532:\n").map_err(crate::io_err(&group))?;
        buildah(&[
            "copy",
            &container,
            &passwd.display().to_string(),
            "/etc/passwd",
        ])?;
        buildah(&[
            "copy",
            &container,
            &group.display().to_string(),
            "/etc/group",
        ])?;
        let _ = std::fs::remove_dir_all(&dir);
        buildah(&[
            "config",
            "--entrypoint",
            &format!("[\"{target}\"]"),
            "--user",
            user,
            "--label",
            "org.opencontainers.image.source=https://github.com/image-prefetch/image-prefetch",
            "--arch",
            "amd64",
            "--os",
            "linux",
            &container,
        ])?;
        buildah(&["commit", "--quiet", &container, &reference])
    })();
    let _ = buildah(&["rm", &container]);
    result.map(|_| reference)
}

/// Pushes a locally built image to a plain-HTTP registry as `destination`.
pub fn push(reference: &str, destination: &str) -> Result<()> {
    buildah(&[
        "push",
        "--quiet",
        "--tls-verify=false",
        reference,
        &format!("docker://{destination}"),
    ])?;
    Ok(())
}
