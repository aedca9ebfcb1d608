//! The controller's settings: what the command line (`cli`) gives and every
//! other module reads. Kept apart from `run`, which wires the watches, so
//! the decisions depend on settings and not on the wiring.

use std::time::Duration;

use crd::node_image_set::DEFAULT_RETRY_LIMIT;

use crate::leader::LeaseConfig;
use crate::policy;
use crate::registries::AllowList;

/// The namespace budget of node×image entries the binary and the chart use
/// unless told otherwise (4 images on 5,000 nodes).
pub const DEFAULT_NAMESPACE_BUDGET: usize = 20_000;

/// The cluster's budget of node×image entries, all namespaces together:
/// what bounds the controller's cache whatever tenants write (at most as
/// many NodeImageSets; the chart's memory limit is sized for it).
pub const DEFAULT_CLUSTER_BUDGET: usize = 100_000;
/// The entries one node may hold by default: 64 ImagePrefetches of 64
/// images. An agent holding them all, with names near the 512-character
/// limit, stays well inside its 128 MiB limit (`cargo xtask bench
/// agent-memory`, docs/security.md).
pub const DEFAULT_NODE_BUDGET: usize = 4_096;

/// Controller settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Handle the ImagePrefetches of this namespace only; `None`: every namespace.
    pub namespace: Option<String>,
    /// `imageDownloadRetryLimit` written into every NodeImageSet.
    pub retry_limit: i32,
    /// Registries (or repository prefixes) images may come from; empty: any.
    pub allowed: AllowList,
    /// Seeds, waves and deadlines.
    pub policy: policy::Settings,
    /// How long a selected node may be NotReady before it is replaced.
    pub not_ready_grace: Duration,
    /// How long an entry may go without any report from its node's agent
    /// before the rollout stops waiting for it (Degraded AgentNotReporting).
    pub agent_silent_after: Duration,
    /// Lease to hold before reconciling; `None`: no leader election.
    pub leader: Option<LeaseConfig>,
    /// Name this controller reports Events as.
    pub instance: String,
    /// Create and keep the agent DaemonSet (for installs, like OLM's, that cannot ship one).
    pub agent: Option<crate::agent_daemonset::AgentSpec>,
    /// Where to serve /metrics, /healthz and /readyz; `None`: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The agent's ServiceAccount, granted `get` on the pull secrets
    /// ImagePrefetches name (per namespace); `None`: no grants are kept
    /// (the agent's access to secrets is then the installer's business).
    pub pull_secret_grantee: Option<crate::pull_secrets::Grantee>,
    /// The nodes ImagePrefetches may target at all.
    pub node_scope: crate::select::NodeScope,
    /// Most node×image entries the ImagePrefetches of one namespace may hold
    /// together (a tenant's share of etcd and of the controller's memory);
    /// `None`: no limit.
    pub namespace_budget: Option<usize>,
    /// Most node×image entries all ImagePrefetches may hold together.
    pub cluster_budget: Option<usize>,
    /// Most entries all ImagePrefetches may hold on one node together (the
    /// agent's memory grows with its node's entries).
    pub node_budget: Option<usize>,
    /// The readiness gate for new nodes; `None`: off.
    pub gate: Option<crate::gate::Gate>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: None,
            retry_limit: DEFAULT_RETRY_LIMIT,
            allowed: AllowList::default(),
            policy: policy::Settings::default(),
            not_ready_grace: Duration::from_secs(300),
            agent_silent_after: Duration::from_secs(300),
            leader: None,
            instance: "image-prefetch-controller".into(),
            agent: None,
            metrics_addr: None,
            pull_secret_grantee: None,
            node_scope: crate::select::NodeScope::default(),
            namespace_budget: None,
            cluster_budget: None,
            node_budget: None,
            gate: None,
        }
    }
}
