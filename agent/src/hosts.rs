//! Registry host configuration for the two policies.
//!
//! `Default` pulls use the node's own configuration directory (where spegel
//! lists itself as a mirror of each registry, with the registry as `server`).
//! `Mirror` pulls use a directory the agent owns, written from the node's: the
//! same mirrors, and the upstream — identified by the `server` entry, never by
//! comparing host names (Docker Hub's `docker.io` is served by
//! `registry-1.docker.io`) — kept only with the `push` capability, so
//! containerd's resolver can neither resolve nor fetch from it.
//! `Default` pulls of a tag use another such directory: the mirrors keep only
//! `pull` (content by digest) and the upstream alone resolves the tag, since
//! a mirror (spegel) answers a tag with whatever digest some node stored
//! under it, however old (spegel's own `resolveTags: false`, per pull).

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error(
        "no mirror is configured for registry {registry} in {dir}: Mirror pulls need the in-cluster mirror (spegel) to be set up on this node"
    )]
    NoMirror { registry: String, dir: String },
    #[error("cannot read {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    host: std::collections::BTreeMap<String, toml::Table>,
}

/// The upstream and the mirrors that a node's configuration names for a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryHosts {
    pub server: String,
    pub mirrors: Vec<String>,
}

/// Directory name containerd looks up for `registry` (`host[:port]`).
fn dir_name(registry: &str) -> &str {
    registry
}

/// The server containerd uses for a registry with no `server` entry.
fn default_server(registry: &str) -> String {
    if registry == crd::reference::DOCKER_HUB {
        "https://registry-1.docker.io".into()
    } else {
        format!("https://{registry}")
    }
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// Reads the node's configuration for `registry` (its own directory, else `_default`).
pub fn read(node_dir: &Path, registry: &str) -> Result<RegistryHosts, HostsError> {
    let candidates = [
        node_dir.join(dir_name(registry)).join("hosts.toml"),
        node_dir.join("_default").join("hosts.toml"),
    ];
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Ok(RegistryHosts {
            server: default_server(registry),
            mirrors: vec![],
        });
    };
    let unreadable = |message: String| HostsError::Unreadable {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    let file: HostsFile = toml::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
    let server = file.server.unwrap_or_else(|| default_server(registry));
    let upstream = host_of(&server).to_string();
    let mirrors = file
        .host
        .keys()
        // A configuration may list the upstream as a host as well; it is not a mirror.
        .filter(|h| host_of(h) != upstream)
        .cloned()
        .collect();
    Ok(RegistryHosts { server, mirrors })
}

/// The hosts.toml for a Mirror pull: mirrors for pull and resolve, upstream push-only.
pub fn mirror_only_toml(hosts: &RegistryHosts) -> String {
    let mut s = format!(
        "# Written by image-prefetch-agent: pulls with policy Mirror must not reach the upstream.\nserver = \"{}\"\ncapabilities = [\"push\"]\n",
        hosts.server
    );
    for m in &hosts.mirrors {
        s.push_str(&format!(
            "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    s
}

/// The hosts.toml for a Default pull of a tag: the upstream resolves the
/// tag; mirrors may serve content by digest.
pub fn upstream_resolves_toml(hosts: &RegistryHosts) -> String {
    let mut s = format!(
        "# Written by image-prefetch-agent: a tag is resolved at its registry, never by a mirror.\nserver = \"{}\"\n",
        hosts.server
    );
    for m in &hosts.mirrors {
        s.push_str(&format!("\n[host.\"{m}\"]\n  capabilities = [\"pull\"]\n"));
    }
    s
}

/// Where, under the agent's directory, the configurations for Default pulls
/// of tags go. `_` cannot start a host name, so no registry's directory is
/// ever taken for it (containerd's own `_default` uses the same rule).
const UPSTREAM_RESOLVES: &str = "_upstream-resolves";

/// Writes the configuration for a Default pull of a tag of `registry` under
/// `own_dir` and returns the directory to pass as `host_dir`.
pub fn prepare_upstream_resolves(
    node_dir: &Path,
    own_dir: &Path,
    registry: &str,
) -> Result<PathBuf, HostsError> {
    let hosts = read(node_dir, registry)?;
    let dir = own_dir.join(UPSTREAM_RESOLVES);
    write_atomically(&dir, registry, &upstream_resolves_toml(&hosts))?;
    Ok(dir)
}

/// Writes the Mirror configuration for `registry` under `mirror_dir` and returns the directory to pass as `host_dir`.
pub fn prepare_mirror(
    node_dir: &Path,
    mirror_dir: &Path,
    registry: &str,
) -> Result<PathBuf, HostsError> {
    let hosts = read(node_dir, registry)?;
    if hosts.mirrors.is_empty() {
        return Err(HostsError::NoMirror {
            registry: registry.to_string(),
            dir: node_dir.display().to_string(),
        });
    }
    write_atomically(mirror_dir, registry, &mirror_only_toml(&hosts))?;
    Ok(mirror_dir.to_path_buf())
}

/// Writes `<base>/<registry>/hosts.toml`.
fn write_atomically(base: &Path, registry: &str, text: &str) -> Result<(), HostsError> {
    let dir = base.join(dir_name(registry));
    let write_err = |source| HostsError::Write {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(write_err)?;
    let path = dir.join("hosts.toml");
    // Written aside and renamed: a concurrent pull never reads half a file.
    // Each writer has a file of its own, so two concurrent Mirror pulls of
    // one registry never write, or rename away, each other's.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".hosts.toml.{}.{n}", std::process::id()));
    std::fs::write(&tmp, text).map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(registry: &str, toml: &str) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        let r = d.path().join(registry);
        std::fs::create_dir_all(&r).unwrap();
        std::fs::write(r.join("hosts.toml"), toml).unwrap();
        d
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p =
                    std::env::temp_dir().join(format!("agent-hosts-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn docker_hub_upstream_is_known_by_server_not_name() {
        // spegel's configuration for Docker Hub: the directory is docker.io,
        // the server registry-1.docker.io, which some setups also list as a host.
        let d = dir_with(
            "docker.io",
            "server = \"https://registry-1.docker.io\"\n\n[host.\"http://127.0.0.1:30020\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n[host.\"https://registry-1.docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        );
        let hosts = read(d.path(), "docker.io").unwrap();
        assert_eq!(hosts.server, "https://registry-1.docker.io");
        assert_eq!(hosts.mirrors, ["http://127.0.0.1:30020"]);
        let toml = mirror_only_toml(&hosts);
        assert!(toml.contains("capabilities = [\"push\"]"));
        assert!(!toml.contains("[host.\"https://registry-1.docker.io\"]"));
    }

    #[test]
    fn mirror_only_config_parses_back_with_an_unusable_upstream() {
        let hosts = RegistryHosts {
            server: "https://registry.example.com".into(),
            mirrors: vec![
                "http://127.0.0.1:30020".into(),
                "http://127.0.0.1:30021".into(),
            ],
        };
        let parsed: toml::Table = toml::from_str(&mirror_only_toml(&hosts)).unwrap();
        assert_eq!(parsed["capabilities"].as_array().unwrap().len(), 1);
        assert_eq!(parsed["host"].as_table().unwrap().len(), 2);
    }

    #[test]
    fn a_tag_is_resolved_upstream_and_mirrors_serve_only_content() {
        let hosts = RegistryHosts {
            server: "https://registry.example.com".into(),
            mirrors: vec!["http://127.0.0.1:30020".into()],
        };
        let parsed: toml::Table = toml::from_str(&upstream_resolves_toml(&hosts)).unwrap();
        // The upstream keeps containerd's default capabilities (resolve among them).
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry.example.com")
        );
        assert!(parsed.get("capabilities").is_none());
        let mirror = &parsed["host"]["http://127.0.0.1:30020"];
        assert_eq!(
            mirror["capabilities"].as_array().unwrap(),
            &vec![toml::Value::from("pull")]
        );
        // Written next to, never over, the Mirror configurations.
        let node = dir_with(
            "registry.example.com",
            "server = \"https://registry.example.com\"\n[host.\"http://127.0.0.1:30020\"]\n",
        );
        let own = tempdir::Dir::new();
        let dir =
            prepare_upstream_resolves(node.path(), own.path(), "registry.example.com").unwrap();
        assert_ne!(dir, own.path());
        let written = std::fs::read_to_string(dir.join("registry.example.com/hosts.toml")).unwrap();
        assert_eq!(written, upstream_resolves_toml(&hosts));
    }

    #[test]
    fn no_mirror_is_an_error_that_says_what_to_do() {
        let d = dir_with(
            "registry.example.com",
            "server = \"https://registry.example.com\"\n",
        );
        let out = tempdir::Dir::new();
        let err = prepare_mirror(d.path(), out.path(), "registry.example.com").unwrap_err();
        assert!(err.to_string().contains("spegel"), "{err}");
    }

    #[test]
    fn default_directory_applies_to_every_registry() {
        let d = dir_with("_default", "[host.\"http://127.0.0.1:30020\"]\n");
        let hosts = read(d.path(), "ghcr.io").unwrap();
        assert_eq!(hosts.server, "https://ghcr.io");
        assert_eq!(hosts.mirrors, ["http://127.0.0.1:30020"]);
    }

    #[test]
    fn concurrent_mirror_preparations_never_trip_over_each_other() {
        let d = dir_with(
            "registry.example.com",
            "server = 'https://registry.example.com'\n\n[host.'http://127.0.0.1:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'",
        );
        let out = tempdir::Dir::new();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        prepare_mirror(d.path(), out.path(), "registry.example.com")
                            .expect("no writer renames another's file away");
                    }
                });
            }
        });
        let left: Vec<_> = std::fs::read_dir(out.path().join("registry.example.com"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["hosts.toml"], "no temporary file is left behind");
    }
}
