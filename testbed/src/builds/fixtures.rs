//! Test fixtures that cannot be downloaded as binaries here: built from their
//! official Go modules at pinned versions into a cache outside the clone
//! (CI runs in a fresh clone, so a cache inside it would always be cold).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, io_err};

/// A program built from its official Go module at a pinned version.
pub struct GoFixture {
    pub name: &'static str,
    pub module: &'static str,
    pub version: &'static str,
    /// The main package to build.
    pub package: &'static str,
    pub tags: &'static str,
    /// Extra linker flags (version stamps).
    pub ldflags: &'static str,
    /// Lines the wrapper module's go.mod needs beyond `require`, derived from
    /// the fixture module's own go.mod.
    pub extra_go_mod: fn(upstream_go_mod: &str) -> String,
    /// A main package of our own (a small tool driving the module as a
    /// library); `None` builds `package` from the module itself.
    pub main_go: Option<&'static str>,
}

/// The API server; its staging modules are released as v0.<minor>.<patch>.
pub const KUBE_APISERVER: GoFixture = GoFixture {
    name: "kube-apiserver",
    module: "k8s.io/kubernetes",
    version: "v1.35.4",
    package: "k8s.io/kubernetes/cmd/kube-apiserver",
    tags: "",
    // Without the stamp the server reports v0.0.0-master, and clients that
    // check versions (helm's kubeVersion) refuse it.
    ldflags: "-X k8s.io/component-base/version.gitVersion=v1.35.4 \
              -X k8s.io/component-base/version.gitMajor=1 \
              -X k8s.io/component-base/version.gitMinor=35 \
              -X k8s.io/client-go/pkg/version.gitVersion=v1.35.4",
    extra_go_mod: |upstream| staging_replaces(upstream, "v0.35.4"),
    main_go: None,
};

/// A component of a node or of the control plane beside the API server,
/// from the same module and version as [`KUBE_APISERVER`] (for the kubelet
/// cluster test bed).
const fn kubernetes_component(name: &'static str, package: &'static str) -> GoFixture {
    GoFixture {
        name,
        package,
        ..KUBE_APISERVER
    }
}

pub const KUBELET: GoFixture = kubernetes_component("kubelet", "k8s.io/kubernetes/cmd/kubelet");
pub const KUBE_SCHEDULER: GoFixture =
    kubernetes_component("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler");
pub const KUBE_CONTROLLER_MANAGER: GoFixture = kubernetes_component(
    "kube-controller-manager",
    "k8s.io/kubernetes/cmd/kube-controller-manager",
);

pub const KUBE_PROXY: GoFixture =
    kubernetes_component("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy");

/// The kubelet cluster test bed's own fixtures (`cargo xtask fixtures
/// --cluster` builds only these; `cargo xtask fixtures` builds them too).
pub const CLUSTER: &[&GoFixture] = &[
    &KUBELET,
    &KUBE_SCHEDULER,
    &KUBE_CONTROLLER_MANAGER,
    &KUBE_PROXY,
];

/// containerd 2.x, for the Transfer service; Debian ships only 1.6.
pub const CONTAINERD: GoFixture = GoFixture {
    name: "containerd",
    module: "github.com/containerd/containerd/v2",
    version: "v2.2.9",
    package: "github.com/containerd/containerd/v2/cmd/containerd",
    // No cgo: the snapshotters that need C libraries are left out; overlayfs stays.
    tags: "no_btrfs no_devmapper no_zfs",
    ldflags: "-X github.com/containerd/containerd/v2/version.Version=v2.2.9",
    extra_go_mod: |_| String::new(),
    main_go: None,
};

/// The newest approved containerd release, for the runtime matrix: the
/// product's Mirror and Default pulls run on it as on [`CONTAINERD`].
/// (1.7.x and 2.0.x are not among the approved module versions, so they are
/// not built here; see docs/compatibility.md.)
pub const CONTAINERD_LATEST: GoFixture = GoFixture {
    name: "containerd",
    version: "v2.4.2",
    ldflags: "-X github.com/containerd/containerd/v2/version.Version=v2.4.2",
    ..CONTAINERD
};

/// helm, for the chart's lint and install tests.
pub const HELM: GoFixture = GoFixture {
    name: "helm",
    module: "helm.sh/helm/v3",
    version: "v3.21.4",
    package: "helm.sh/helm/v3/cmd/helm",
    tags: "",
    ldflags: "-X helm.sh/helm/v3/internal/version.version=v3.21.4",
    extra_go_mod: |_| String::new(),
    main_go: None,
};

/// operator-framework's bundle validators, driven by a small program of ours.
pub const BUNDLE_VALIDATE: GoFixture = GoFixture {
    name: "bundle-validate",
    module: "github.com/operator-framework/api",
    version: "v0.30.0",
    package: ".",
    tags: "",
    ldflags: "",
    extra_go_mod: |_| String::new(),
    main_go: Some(include_str!("../../go/bundle-validate/main.go")),
};

/// Jaeger v2 (an OpenTelemetry Collector distribution): OTLP in, memory
/// storage, the query API out. Jaeger's v2 releases are tagged v2.x in git but
/// published to the module proxy as v1.x of the same module; v1.75.0 is
/// Jaeger v2.12.0.
pub const JAEGER: GoFixture = GoFixture {
    name: "jaeger",
    module: "github.com/jaegertracing/jaeger",
    version: "v1.75.0",
    package: "github.com/jaegertracing/jaeger/cmd/jaeger",
    tags: "",
    ldflags: "-X github.com/jaegertracing/jaeger/internal/version.latestVersion=v2.12.0",
    extra_go_mod: |_| String::new(),
    main_go: None,
};

/// promtool, Prometheus's own checker, for the chart's alert rules; without
/// the service-discovery plugins (`remove_all_sd`), which promtool's rule
/// checks do not use and which would triple the build.
pub const PROMTOOL: GoFixture = GoFixture {
    name: "promtool",
    module: "github.com/prometheus/prometheus",
    version: "v0.316.0",
    package: "github.com/prometheus/prometheus/cmd/promtool",
    tags: "remove_all_sd",
    ldflags: "",
    extra_go_mod: |_| String::new(),
    main_go: None,
};

/// What `cargo xtask demo` starts: the control plane, the nodes' containerd
/// and Jaeger.
pub const DEMO: &[&GoFixture] = &[&KUBE_APISERVER, &CONTAINERD, &JAEGER];

/// Every fixture, for `cargo xtask fixtures`.
pub const ALL: &[&GoFixture] = &[
    &KUBE_APISERVER,
    &CONTAINERD,
    &CONTAINERD_LATEST,
    &HELM,
    &BUNDLE_VALIDATE,
    &JAEGER,
    &KUBELET,
    &KUBE_SCHEDULER,
    &KUBE_CONTROLLER_MANAGER,
    &KUBE_PROXY,
    &PROMTOOL,
];

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

/// A tool from the system's packages (etcd, openssl), or an error that says how to get it.
pub fn require_tool(name: &'static str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(Error::MissingTool(name))
}

impl GoFixture {
    /// Where the built binary lives. The version and a hash of the build
    /// recipe are in the name, so any change builds anew and a stale binary
    /// is never reused.
    pub fn path(&self) -> PathBuf {
        let recipe = crd::names::stable_hash(&[
            self.module,
            self.package,
            self.tags,
            self.ldflags,
            self.main_go.unwrap_or_default(),
        ]);
        cache_dir().join("bin").join(format!(
            "{}-{}-{:08x}",
            self.name, self.version, recipe as u32
        ))
    }

    /// The binary, or an error that says how to get it.
    pub fn require(&self) -> Result<PathBuf> {
        let path = self.path();
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MissingFixture {
                what: self.name,
                path: path.display().to_string(),
            })
        }
    }

    /// Builds the binary unless the cache has it. Returns its path.
    pub fn build(&self, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
        let (name, version) = (self.name, self.version);
        let out = self.path();
        if out.is_file() {
            progress(&format!("{name} {version}: cached at {}", out.display()));
            return Ok(out);
        }
        let go = require_tool("go")?;
        let work = cache_dir().join("build").join(format!("{name}-{version}"));
        std::fs::create_dir_all(&work).map_err(io_err(&work))?;
        std::fs::create_dir_all(out.parent().expect("bin dir")).map_err(io_err(&out))?;

        progress(&format!("{name} {version}: fetching the module graph"));
        let module = format!("{}@{version}", self.module);
        let info = run(
            Command::new(&go)
                .args(["mod", "download", "-json", &module])
                .current_dir(&work),
            name,
        )?;
        let go_mod_path = json_field(&info, "GoMod").ok_or_else(|| Error::Build {
            what: name,
            detail: format!("`go mod download` gave no GoMod path: {info}"),
        })?;
        let upstream =
            std::fs::read_to_string(&go_mod_path).map_err(io_err(Path::new(&go_mod_path)))?;
        let go_line = upstream
            .lines()
            .find(|l| l.starts_with("go "))
            .unwrap_or("go 1.25.0");
        let wrapper = format!(
            "module image-prefetch.test/fixture/{name}\n\n{go_line}\n\nrequire {} {version}\n{}",
            self.module,
            (self.extra_go_mod)(&upstream)
        );
        write(&work.join("go.mod"), &wrapper)?;
        match self.main_go {
            Some(source) => write(&work.join("main.go"), source)?,
            None => write(
                &work.join("tools.go"),
                &format!(
                    "//go:build tools\n\npackage tools\n\nimport _ \"{}\"\n",
                    self.package
                ),
            )?,
        }
        // The module's own go.sum holds the checksums its authors verified;
        // starting from it spares lookups in the checksum database, which
        // does not answer for every dependency here.
        if let Some(dir) = json_field(&info, "Dir") {
            let sum = Path::new(&dir).join("go.sum");
            if sum.is_file() {
                let sums = std::fs::read_to_string(&sum).map_err(io_err(&sum))?;
                write(&work.join("go.sum"), &sums)?;
            }
        }
        run(
            Command::new(&go).args(["mod", "tidy"]).current_dir(&work),
            name,
        )?;
        progress(&format!("{name} {version}: compiling (minutes on 2 cores)"));
        let mut tmp = out.clone().into_os_string();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        run(
            Command::new(&go)
                .args(["build", "-trimpath"])
                .arg(format!(
                    "-ldflags=-s -w {}",
                    self.ldflags
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                ))
                .arg(format!("-tags={}", self.tags))
                .arg("-o")
                .arg(&tmp)
                .arg(self.package)
                .env("CGO_ENABLED", "0")
                .current_dir(&work),
            name,
        )?;
        // Renamed only when complete, so an interrupted build is never taken for a cached one.
        std::fs::rename(&tmp, &out).map_err(io_err(&out))?;
        progress(&format!("{name} {version}: built {}", out.display()));
        Ok(out)
    }
}

/// `k8s.io/kubernetes` is not meant to be a dependency: its go.mod points
/// every `k8s.io/*` staging module at a local directory. The wrapper maps
/// each of them to its published release instead.
pub fn staging_replaces(upstream_go_mod: &str, staging_version: &str) -> String {
    let mut s = String::from("\nreplace (\n");
    for l in upstream_go_mod.lines() {
        let Some((module, target)) = l.trim().split_once("=>") else {
            continue;
        };
        if target.trim().starts_with("./staging/") {
            let m = module.trim();
            s.push_str(&format!("\t{m} => {m} {staging_version}\n"));
        }
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
    fn staging_modules_map_to_their_releases() {
        let upstream = "module k8s.io/kubernetes\n\ngo 1.25.0\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        let r = staging_replaces(upstream, "v0.35.4");
        assert!(r.contains("\tk8s.io/api => k8s.io/api v0.35.4\n"));
        assert!(r.contains("\tk8s.io/client-go => k8s.io/client-go v0.35.4\n"));
        assert!(!r.contains("github.com/x/y"));
    }

    #[test]
    fn binaries_are_keyed_by_version_and_recipe() {
        let name = |f: &GoFixture| f.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name(&KUBE_APISERVER).starts_with("kube-apiserver-v1.35.4-"));
        assert!(name(&CONTAINERD).starts_with("containerd-v2.2.9-"));
        let restamped = GoFixture {
            ldflags: "-X other=1",
            ..KUBE_APISERVER
        };
        assert_ne!(
            name(&restamped),
            name(&KUBE_APISERVER),
            "a new recipe is a new binary"
        );
    }
}
