//! Test fixtures that cannot be downloaded as binaries here: built from their
//! official Go modules at pinned versions into a cache outside the clone
//! (CI runs in a fresh clone, so a cache inside it would always be cold).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, io_err};

/// Kubernetes release the API server is built from.
pub const KUBE_VERSION: &str = "1.35.4";

/// `${XDG_CACHE_HOME:-$HOME/.cache}/image-prefetch`, or `$IMAGE_PREFETCH_CACHE`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMAGE_PREFETCH_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("image-prefetch")
}

/// Where the built kube-apiserver lives; the version is in the name, so a
/// version bump builds anew and never reuses a stale binary.
pub fn kube_apiserver() -> PathBuf {
    cache_dir()
        .join("bin")
        .join(format!("kube-apiserver-v{KUBE_VERSION}"))
}

/// The kube-apiserver binary, or an error that says how to get it.
pub fn require_kube_apiserver() -> Result<PathBuf> {
    let path = kube_apiserver();
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingFixture {
            what: "kube-apiserver",
            path: path.display().to_string(),
        })
    }
}

/// A tool from the system's packages (etcd, openssl), or an error that says how to get it.
pub fn require_tool(name: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(Error::MissingTool(name))
}

/// Builds kube-apiserver unless the cache has it. Returns its path.
///
/// `k8s.io/kubernetes` is not meant to be a dependency: its go.mod points every
/// `k8s.io/*` staging module at a local directory. A small wrapper module
/// requires it and maps each of those staging modules to its published
/// `v0.x` release instead.
pub fn build_kube_apiserver(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let out = kube_apiserver();
    if out.is_file() {
        progress(&format!(
            "kube-apiserver v{KUBE_VERSION}: cached at {}",
            out.display()
        ));
        return Ok(out);
    }
    let go = require_tool("go")?;
    let work = cache_dir()
        .join("build")
        .join(format!("kube-apiserver-v{KUBE_VERSION}"));
    std::fs::create_dir_all(&work).map_err(io_err(&work))?;
    std::fs::create_dir_all(out.parent().expect("bin dir")).map_err(io_err(&out))?;

    progress(&format!(
        "kube-apiserver v{KUBE_VERSION}: fetching the module graph"
    ));
    let module = format!("k8s.io/kubernetes@v{KUBE_VERSION}");
    let info = run(
        Command::new(&go)
            .args(["mod", "download", "-json", &module])
            .current_dir(&work),
        "kube-apiserver",
    )?;
    let go_mod_path = json_field(&info, "GoMod").ok_or_else(|| Error::Build {
        what: "kube-apiserver",
        detail: format!("`go mod download` gave no GoMod path: {info}"),
    })?;
    let upstream =
        std::fs::read_to_string(&go_mod_path).map_err(io_err(Path::new(&go_mod_path)))?;
    let staging_version = format!("v0.{}", KUBE_VERSION.trim_start_matches("1."));
    let wrapper = wrapper_go_mod(&upstream, KUBE_VERSION, &staging_version);
    write(&work.join("go.mod"), &wrapper)?;
    write(
        &work.join("tools.go"),
        "//go:build tools\n\npackage tools\n\nimport _ \"k8s.io/kubernetes/cmd/kube-apiserver\"\n",
    )?;
    run(
        Command::new(&go).args(["mod", "tidy"]).current_dir(&work),
        "kube-apiserver",
    )?;
    progress(&format!(
        "kube-apiserver v{KUBE_VERSION}: compiling (several minutes on 2 cores)"
    ));
    let tmp = out.with_extension("partial");
    run(
        Command::new(&go)
            .args(["build", "-trimpath", "-ldflags=-s -w", "-o"])
            .arg(&tmp)
            .arg("k8s.io/kubernetes/cmd/kube-apiserver")
            .env("CGO_ENABLED", "0")
            .current_dir(&work),
        "kube-apiserver",
    )?;
    // Renamed only when complete, so an interrupted build is never taken for a cached one.
    std::fs::rename(&tmp, &out).map_err(io_err(&out))?;
    progress(&format!(
        "kube-apiserver v{KUBE_VERSION}: built {}",
        out.display()
    ));
    Ok(out)
}

/// The wrapper module's go.mod: every `k8s.io/X => ./staging/...` replace of
/// the upstream go.mod becomes `k8s.io/X => k8s.io/X <staging_version>`.
pub fn wrapper_go_mod(upstream_go_mod: &str, kube_version: &str, staging_version: &str) -> String {
    let staging: Vec<&str> = upstream_go_mod
        .lines()
        .filter_map(|l| {
            let (module, target) = l.trim().split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim())
        })
        .collect();
    let go_line = upstream_go_mod
        .lines()
        .find(|l| l.starts_with("go "))
        .unwrap_or("go 1.25.0");
    let mut s = format!(
        "module image-prefetch.test/fixture/kube-apiserver\n\n{go_line}\n\nrequire k8s.io/kubernetes v{kube_version}\n\nreplace (\n"
    );
    for m in staging {
        s.push_str(&format!("\t{m} => {m} {staging_version}\n"));
    }
    s.push_str(")\n");
    s
}

fn json_field(json: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(io_err(path))
}

fn run(cmd: &mut Command, what: &'static str) -> Result<String> {
    let output = cmd.output().map_err(|e| Error::Build {
        what,
        detail: format!("could not run {cmd:?}: {e}"),
    })?;
    if !output.status.success() {
        return Err(Error::Build {
            what,
            detail: format!(
                "{cmd:?} failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapper_maps_every_staging_module_to_its_release() {
        let upstream = "module k8s.io/kubernetes\n\ngo 1.25.0\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        let w = wrapper_go_mod(upstream, "1.35.4", "v0.35.4");
        assert!(w.contains("require k8s.io/kubernetes v1.35.4"));
        assert!(w.contains("\tk8s.io/api => k8s.io/api v0.35.4\n"));
        assert!(w.contains("\tk8s.io/client-go => k8s.io/client-go v0.35.4\n"));
        assert!(!w.contains("github.com/x/y"));
        assert!(w.contains("go 1.25.0"));
    }
}
