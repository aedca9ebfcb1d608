//! A whole simulated cluster on the peer-mirror bed: a control plane, one
//! external registry (whose access log is the count of what crossed the
//! uplink), N simulated nodes each with its own containerd 2.x, peer mirror
//! (the stand-in for spegel, on a loopback address of its own) and agent,
//! and the controller. What the headline test and `cargo xtask bench
//! rollout` run on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::Api;

use crate::beds::simulated::{Binary, CONTROLLER, Mirror, NodeSetup, SimulatedNode};
use crate::servers::peer_mirror::Settings;
use crate::servers::registry::Registry;
use crate::servers::slow_link::SlowLink;
use crate::{ControlPlane, Result};

/// Label every node of the cluster carries; rollouts select by it.
pub const POOL: (&str, &str) = ("pool", "peer-cluster");

pub struct PeerCluster {
    // Field order is drop order: controller and nodes before the API server.
    pub controller: Option<Binary>,
    pub nodes: Vec<SimulatedNode>,
    /// Between the nodes and the registry when the uplink is slowed.
    pub link: Option<SlowLink>,
    pub upstream: Registry,
    pub client: kube::Client,
    pub plane: ControlPlane,
    dir: PathBuf,
    directory: PathBuf,
    settings: Settings,
}

impl PeerCluster {
    /// Starts everything but the controller, with one node per
    /// `(name, architecture)`; the n-th node's mirror is on 127.0.0.(100+n).
    pub async fn start(dir: &Path, nodes: &[(&str, &str)]) -> Result<Self> {
        Self::start_with_uplink(dir, nodes, None).await
    }

    /// [`PeerCluster::start`] with the registry behind an uplink of
    /// `bytes_per_second` (when given): images pushed to
    /// [`PeerCluster::registry_host`] are named after the link.
    pub async fn start_with_uplink(
        dir: &Path,
        nodes: &[(&str, &str)],
        bytes_per_second: Option<u64>,
    ) -> Result<Self> {
        Self::start_with_settings(dir, nodes, bytes_per_second, Settings::default()).await
    }

    /// [`PeerCluster::start_with_uplink`] with the stand-ins' `settings`
    /// (every stand-in on one port, whatever `settings` says, as spegel's
    /// hostPort is one for all nodes).
    pub async fn start_with_settings(
        dir: &Path,
        nodes: &[(&str, &str)],
        bytes_per_second: Option<u64>,
        mut settings: Settings,
    ) -> Result<Self> {
        settings.port = Some(crate::support::process::free_ports::<1>()?[0]);
        let (plane, client) = crate::support::crds::control_plane(&dir.join("cluster")).await?;
        let upstream = Registry::start(&dir.join("upstream"))?;
        let link = match bytes_per_second {
            Some(rate) => Some(SlowLink::start(&upstream.host, rate)?),
            None => None,
        };
        let mut cluster = PeerCluster {
            controller: None,
            nodes: Vec::new(),
            link,
            upstream,
            client,
            plane,
            dir: dir.to_path_buf(),
            directory: dir.join("peer-directory"),
            settings,
        };
        for (name, arch) in nodes {
            cluster.add_node(name, arch).await?;
        }
        Ok(cluster)
    }

    /// The registry's address as image references name it.
    pub fn registry_host(&self) -> String {
        match &self.link {
            Some(l) => l.host.clone(),
            None => self.upstream.host.clone(),
        }
    }

    /// One more node (e.g. joining mid-rollout).
    pub async fn add_node(&mut self, name: &str, arch: &str) -> Result<()> {
        let ip = format!("127.0.0.{}", 100 + self.nodes.len());
        let labels = [
            (POOL.0.to_string(), POOL.1.to_string()),
            (crd::platform::ARCH_LABEL.to_string(), arch.to_string()),
        ]
        .into();
        let platform = format!("linux/{arch}");
        let registry = self.registry_host();
        let node = SimulatedNode::start(
            &self.dir.join("nodes"),
            &self.client,
            &self.plane.kubeconfig,
            NodeSetup {
                name,
                labels,
                mirror: Mirror::Peer {
                    upstream: &registry,
                    ip: &ip,
                    directory: &self.directory,
                    settings: &self.settings,
                },
                platform: Some(&platform),
                jaeger: None,
            },
        )
        .await?;
        self.nodes.push(node);
        Ok(())
    }

    /// (Re)starts the controller with `args` (`--no-sequencing`, ...).
    pub fn start_controller(&mut self, args: &[&str], log_name: &str) -> Result<()> {
        self.controller = None;
        self.controller = Some(Binary::start(
            CONTROLLER,
            args,
            &self.plane.kubeconfig,
            None,
            &self.dir.join(log_name),
        )?);
        Ok(())
    }

    /// Applies an ImagePrefetch of `images` to every node of the cluster.
    pub async fn prefetch(&self, name: &str, images: &[&str]) -> Result<()> {
        self.prefetch_to(name, images, &[]).await
    }

    /// Applies an ImagePrefetch of `images` to the nodes of the cluster that
    /// also carry the labels `selector`.
    pub async fn prefetch_to(
        &self,
        name: &str,
        images: &[&str],
        selector: &[(&str, &str)],
    ) -> Result<()> {
        let selector: Vec<(&str, &str)> = std::iter::once(POOL)
            .chain(selector.iter().copied())
            .collect();
        crate::support::crds::apply_prefetch(&self.client, "default", name, images, &selector)
            .await?;
        Ok(())
    }

    /// Polls until `name` reads READY `ready` (e.g. `3/3`); how long it took
    /// from `since`, or the last status seen when `within` runs out.
    pub async fn ready(
        &self,
        name: &str,
        ready: &str,
        since: Instant,
        within: Duration,
    ) -> std::result::Result<Duration, String> {
        let api: Api<crd::ImagePrefetch> = Api::namespaced(self.client.clone(), "default");
        loop {
            let status = api.get(name).await.map_err(|e| e.to_string())?.status;
            if status.as_ref().is_some_and(|s| s.ready == ready) {
                return Ok(since.elapsed());
            }
            if since.elapsed() > within {
                return Err(format!("{name} not {ready} within {within:?}: {status:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Applies the ImagePrefetch and waits until every node has every image.
    pub async fn rollout(
        &self,
        name: &str,
        images: &[&str],
        within: Duration,
    ) -> std::result::Result<Duration, String> {
        let started = Instant::now();
        self.prefetch(name, images)
            .await
            .map_err(|e| e.to_string())?;
        let all = format!("{n}/{n}", n = self.nodes.len());
        self.ready(name, &all, started, within).await
    }

    /// Bytes nodes got from peers, counted where they were served (a
    /// mirror's local content sent to a request with spegel's peer header):
    /// through a node's own mirror's lookup, or from a named source, each
    /// byte once.
    pub fn peer_bytes(&self) -> u64 {
        self.mirrors_counted("peer_mirror_bytes_served_to_peers_total")
    }

    /// Requests the mirrors answered with a miss (no peer found yet).
    pub fn mirror_misses(&self) -> u64 {
        self.mirrors_counted("peer_mirror_misses_total")
    }

    /// One counter of every node's mirror, summed.
    fn mirrors_counted(&self, counter: &str) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.peer_mirror.as_ref())
            .map(|m| m.counter(counter))
            .sum()
    }
}
