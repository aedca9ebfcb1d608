//! Simulated nodes and the product's own binaries as processes: what the
//! demo and the end-to-end tests run a rollout with.
//!
//! A simulated node is a Node object (Ready, with the given labels), its own
//! containerd whose registry configuration puts the in-cluster mirror first,
//! and the release agent for that node. The controller runs as a process too.
//! Everything is stopped when dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use crate::servers::containerd::Containerd;
use crate::servers::jaeger::Jaeger;
use crate::servers::peer_mirror::{PeerMirror, Settings};
use crate::support::process::{self, Lifetime, free_ports};
use crate::{Result, io_err};

/// The agent's binary name.
pub const AGENT: &str = "image-prefetch-agent";
/// The controller's binary name.
pub const CONTROLLER: &str = "image-prefetch-controller";

static BINARIES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Run the workspace's binaries from `dir` (e.g. `target/release`, for
/// benchmarks) instead of `target/debug`; once per process, before any starts.
pub fn use_binaries_from(dir: PathBuf) {
    let _ = BINARIES.set(dir);
}

/// A binary of this workspace, as `cargo build` / `cargo test --workspace` leaves it.
pub fn binary(name: &str) -> PathBuf {
    BINARIES
        .get()
        .cloned()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
        .join(name)
}

/// One of the workspace's binaries running as a process, with its metrics
/// on a free loopback port; killed when dropped.
pub struct Binary {
    pub child: Child,
    /// `127.0.0.1:port` of its `/metrics` and health endpoints.
    pub metrics: String,
    pub log: PathBuf,
}

impl Binary {
    /// Starts `name` with `args` against the API server of `kubeconfig`,
    /// exporting traces to `jaeger` when given.
    pub fn start(
        name: &str,
        args: &[&str],
        kubeconfig: &Path,
        jaeger: Option<&Jaeger>,
        log: &Path,
    ) -> Result<Self> {
        let path = binary(name);
        if !path.exists() {
            return Err(crate::Error::MissingFixture {
                what: "a workspace binary (cargo build --workspace)",
                path: path.display().to_string(),
            });
        }
        let [port] = free_ports()?;
        let metrics = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(path);
        cmd.args(["--metrics-addr", &metrics])
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        if let Some(j) = jaeger {
            cmd.envs(j.exporter_env());
        }
        let child = process::spawn(cmd, log, Lifetime::Owned)?;
        Ok(Binary {
            child,
            metrics,
            log: log.to_path_buf(),
        })
    }

    /// Sum of the samples of every metric line starting with `line_start`.
    pub fn metric(&self, line_start: &str) -> std::io::Result<f64> {
        process::metric_sum(&self.metrics, line_start)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        process::stop(&mut self.child);
    }
}

/// Where a simulated node's containerd fetches `registry`'s images.
pub struct Registries<'a> {
    /// The "external" registry, `127.0.0.1:port`.
    pub upstream: &'a str,
    /// In-cluster mirrors tried first, same form.
    pub mirrors: &'a [&'a str],
}

/// The node's in-cluster mirror.
pub enum Mirror<'a> {
    /// Shared mirror registries (e.g. a pull-through cache), written into the
    /// node's configuration as spegel would list its own endpoints.
    Registries(Registries<'a>),
    /// The node's own peer mirror (the stand-in for spegel) on `ip`, finding
    /// its peers in `directory`; it writes the node's configuration for
    /// `upstream` itself, as spegel's chart does.
    Peer {
        upstream: &'a str,
        ip: &'a str,
        directory: &'a Path,
        settings: &'a Settings,
    },
}

/// What one simulated node is made of.
pub struct NodeSetup<'a> {
    pub name: &'a str,
    pub labels: BTreeMap<String, String>,
    pub mirror: Mirror<'a>,
    /// `os/arch` the agent pulls for; this machine's when `None`.
    pub platform: Option<&'a str>,
    /// Where the agent and containerd export traces, if anywhere.
    pub jaeger: Option<&'a Jaeger>,
}

/// A Node object, its containerd, its mirror and its agent.
pub struct SimulatedNode {
    pub name: String,
    // Field order is drop order: the agent stops first, containerd last.
    pub agent: Binary,
    pub peer_mirror: Option<PeerMirror>,
    pub containerd: Containerd,
}

impl SimulatedNode {
    /// Registers the node (Ready, with its labels), starts its containerd
    /// under `dir/<name>` (traced when a Jaeger is given), its mirror set-up
    /// and its agent.
    pub async fn start(
        dir: &Path,
        client: &kube::Client,
        kubeconfig: &Path,
        setup: NodeSetup<'_>,
    ) -> Result<Self> {
        let name = setup.name;
        crate::support::nodes::register(client, name, &setup.labels).await?;
        let containerd = match setup.jaeger {
            Some(j) => Containerd::start_traced(&dir.join(name), j)?,
            None => Containerd::start(&dir.join(name))?,
        };
        let peer_mirror = match setup.mirror {
            Mirror::Registries(r) => {
                containerd.configure_registry(r.upstream, r.mirrors)?;
                None
            }
            Mirror::Peer {
                upstream,
                ip,
                directory,
                settings,
            } => {
                let mirror = PeerMirror::start(
                    &dir.join(name),
                    name,
                    ip,
                    &containerd.socket,
                    directory,
                    settings,
                )?;
                mirror.configure_node(&containerd.hosts_dir, &[&format!("http://{upstream}")])?;
                // Where peers reach its mirror: a source the controller can name.
                crate::support::nodes::set_address(client, name, ip).await?;
                Some(mirror)
            }
        };
        let own_hosts = dir.join(format!("{name}-agent-hosts"));
        std::fs::create_dir_all(&own_hosts).map_err(io_err(&own_hosts))?;
        let socket = containerd.socket.display().to_string();
        let hosts = containerd.hosts_dir.display().to_string();
        let own_hosts = own_hosts.display().to_string();
        let image_fs = containerd.dir.display().to_string();
        // The in-cluster mirror is the node's stand-in (or the registries
        // named as mirrors), not spegel's ports.
        let endpoints = match &peer_mirror {
            Some(m) => format!("http://{}", m.host),
            None => containerd.mirror_endpoints(),
        };
        let mut args = vec![
            "--mirror-endpoints",
            &endpoints,
            "--node-name",
            name,
            "--containerd-socket",
            &socket,
            "--registry-config-dir",
            &hosts,
            "--mirror-config-dir",
            &own_hosts,
            // The bed's disk is the machine's, shared by everything: however
            // full it is, it is no node's image filesystem under pressure.
            // (The disk guard has a test of its own.)
            "--image-fs",
            &image_fs,
            "--image-fs-high-percent",
            "100",
        ];
        if let Some(p) = setup.platform {
            args.extend(["--platform", p]);
        }
        let log = dir.join(format!("{name}-agent.log"));
        let agent = Binary::start(AGENT, &args, kubeconfig, setup.jaeger, &log)?;
        Ok(SimulatedNode {
            name: name.to_string(),
            agent,
            peer_mirror,
            containerd,
        })
    }
}

/// Simulated nodes `names`, each labelled `labels`, whose containerd tries
/// the `mirror` registry (`127.0.0.1:port`, e.g. a pull-through cache) before
/// `upstream`.
#[allow(clippy::too_many_arguments)]
pub async fn nodes_with_registry_mirror(
    dir: &Path,
    client: &kube::Client,
    kubeconfig: &Path,
    names: &[&str],
    labels: &BTreeMap<String, String>,
    upstream: &str,
    mirror: &str,
    jaeger: Option<&Jaeger>,
) -> Result<Vec<SimulatedNode>> {
    let mut nodes = Vec::new();
    for name in names {
        let setup = NodeSetup {
            name,
            labels: labels.clone(),
            mirror: Mirror::Registries(Registries {
                upstream,
                mirrors: &[mirror],
            }),
            platform: None,
            jaeger,
        };
        nodes.push(SimulatedNode::start(dir, client, kubeconfig, setup).await?);
    }
    Ok(nodes)
}
