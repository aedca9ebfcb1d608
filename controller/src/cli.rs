//! The controller's command line (clap): every flag with its default, its
//! environment fallback and its bounds, so a wrong value stops the process
//! at start-up with a message naming the flag, not deep in a rollout.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::Config;
use crate::config::{DEFAULT_CLUSTER_BUDGET, DEFAULT_NAMESPACE_BUDGET, DEFAULT_NODE_BUDGET};
use crate::leader::LeaseConfig;
use crate::policy::{PrivateImages, Settings, ZoneSeeding};
use crate::pull_secrets::Grantee;
use crate::registries::AllowList;

/// Reconciles ImagePrefetch objects into per-node NodeImageSets.
///
/// Uses the in-cluster service account, or $KUBECONFIG outside a cluster.
#[derive(Parser, Debug)]
#[command(
    name = "image-prefetch-controller",
    version,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Removes every ImagePrefetch and NodeImageSet, and so the nodes' pins.
    ///
    /// Deletes every ImagePrefetch (through the running controller, which
    /// removes their NodeImageSets and so the nodes' pins) and every
    /// NodeImageSet; if the controller has not finished in time, removes the
    /// sets and the finalizers itself. The chart's pre-delete hook runs it.
    Uninstall {
        /// How long the running controller has to finish.
        #[arg(long, value_name = "S", default_value_t = 120)]
        wait_seconds: u64,
    },
}

fn defaults() -> Settings {
    Settings::default()
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Only ImagePrefetches in NS (default: all namespaces).
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Comma-separated registry/repository prefixes images may come from
    /// (default: every registry is allowed).
    #[arg(long, value_name = "LIST", env = "ALLOWED_REGISTRIES")]
    pub allowed_registries: Option<String>,
    /// imageDownloadRetryLimit written into every NodeImageSet.
    #[arg(long, value_name = "N", default_value_t = crd::node_image_set::DEFAULT_RETRY_LIMIT,
          value_parser = clap::value_parser!(i32).range(0..=crd::node_image_set::MAX_RETRY_LIMIT as i64))]
    pub retry_limit: i32,
    /// Mirror pulls of one image in flight per node holding it (1: the
    /// holders double each round).
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub pulls_per_holder: u32,
    /// Most mirror pulls of one image at once, whatever the holders; 0: no cap.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub wave_cap: usize,
    /// Most node×image entries the ImagePrefetches of one namespace may hold
    /// together; one that would pass it is held back (Degraded
    /// BudgetExceeded); 0: no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NAMESPACE_BUDGET)]
    pub namespace_budget: usize,
    /// Most node×image entries all ImagePrefetches may hold together, so the
    /// controller's memory is bounded; 0: no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CLUSTER_BUDGET)]
    pub cluster_budget: usize,
    /// Most entries all ImagePrefetches may hold on one node together, so
    /// each agent's memory is bounded; 0: no limit.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NODE_BUDGET)]
    pub node_budget: usize,
    /// Replace a seed that fetched no more bytes for S.
    #[arg(long, value_name = "S", default_value_t = defaults().seed_deadline.as_secs())]
    pub seed_deadline_seconds: u64,
    /// A node that failed as seed is not chosen again for S, doubling at each
    /// failure up to 10x.
    #[arg(long, value_name = "S", default_value_t = defaults().seed_cooldown.as_secs())]
    pub seed_cooldown_seconds: u64,
    /// A node holding an image counts as a mirror source S after it reported
    /// it (spegel advertises asynchronously).
    #[arg(long, value_name = "S", default_value_t = defaults().findable_after.as_secs())]
    pub findable_after_seconds: u64,
    /// Do not name a holder in Mirror entries: every Mirror pull goes through
    /// spegel's lookup, and holders count once findable (default: named,
    /// from the holder's InternalIP).
    #[arg(long)]
    pub no_named_sources: bool,
    /// When no Mirror pull of an image in a zone has succeeded and some
    /// failed for S, one of those nodes pulls it from the registry again.
    #[arg(long, value_name = "S", default_value_t = defaults().reseed_after.as_secs())]
    pub reseed_after_seconds: u64,
    /// Keep a NotReady node selected for S.
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub not_ready_grace_seconds: u64,
    /// An entry its node's agent has not reported on for S no longer holds
    /// the rollout back (Degraded AgentNotReporting).
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub agent_silent_seconds: u64,
    /// Every node pulls from the registry at once (for comparison only:
    /// defeats the point).
    #[arg(long)]
    pub no_sequencing: bool,
    /// Hold a Lease in the pod's namespace before reconciling.
    #[arg(long)]
    pub leader_elect: bool,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Create and keep the agent DaemonSet in the pod's namespace with IMAGE
    /// (installs that cannot ship one, e.g. OLM); its ServiceAccount gets the
    /// pull-secret grants.
    #[arg(long, value_name = "IMAGE")]
    pub manage_agent: Option<String>,
    /// The nodes ImagePrefetches may target at all: each ImagePrefetch's
    /// selector is intersected with this.
    #[arg(long, value_name = "K=V[,K=V...]", value_parser = node_labels)]
    pub target_nodes: Option<std::collections::BTreeMap<String, String>>,
    /// Let ImagePrefetches target control-plane nodes too (excluded by default).
    #[arg(long)]
    pub control_plane_nodes: bool,
    /// An image pulled with credentials is served from the mirror only within
    /// its namespace (isolate), or to everyone (share).
    #[arg(long, value_name = "isolate|share", default_value = "isolate")]
    pub private_images: PrivateImages,
    /// sequential: one zone seeds an image from its registry, the others once
    /// it holds it (through the mirror): once per cluster; parallel: every
    /// zone at once.
    #[arg(long, value_name = "sequential|parallel", default_value = "sequential")]
    pub zone_seeding: ZoneSeeding,
    /// Grant the agent's ServiceAccount `get` on exactly the pull secrets
    /// ImagePrefetches name, per namespace (a Role and RoleBinding
    /// image-prefetch-pull-secrets).
    #[arg(long, value_name = "NS/NAME", value_parser = grantee)]
    pub agent_service_account: Option<Grantee>,
    /// The readiness gate: nodes that join with this taint (NoSchedule) keep
    /// it until they hold every image of the ImagePrefetches that select
    /// them; the controller then removes it (off when unset).
    #[arg(long, value_name = "KEY")]
    pub readiness_taint: Option<String>,
    /// How long a node may keep the readiness gate's taint waiting for its
    /// images; then it is removed anyway, with a Warning on the node.
    #[arg(long, value_name = "S", default_value_t = 600)]
    pub readiness_timeout_seconds: u64,
    /// The namespace the controller runs in: its Lease and the agent
    /// DaemonSet it keeps live there.
    #[arg(
        long,
        value_name = "NS",
        env = "POD_NAMESPACE",
        default_value = "default"
    )]
    pub pod_namespace: String,
    /// This instance's name, for the Lease and Events (default: the host name).
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub instance: Option<String>,
}

fn node_labels(s: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    crate::select::NodeScope::parse_selector(s)
        .ok_or_else(|| "expected key=value[,key=value]".into())
}

fn grantee(s: &str) -> Result<Grantee, String> {
    Grantee::parse(s).ok_or_else(|| "expected NAMESPACE/NAME".into())
}

/// 0 means no limit.
fn limit(n: usize) -> Option<usize> {
    Some(n).filter(|&n| n > 0)
}

impl RunArgs {
    /// The controller's settings. `host_name` names the instance when
    /// `--instance`/`POD_NAME` does not; `env` is what a managed agent
    /// DaemonSet inherits of the telemetry settings.
    pub fn config(
        self,
        host_name: impl FnOnce() -> String,
        env: impl Iterator<Item = (String, String)>,
    ) -> Config {
        let secs = Duration::from_secs;
        let mut config = Config {
            namespace: self.namespace,
            allowed: AllowList::parse(self.allowed_registries.as_deref().unwrap_or_default()),
            retry_limit: self.retry_limit,
            namespace_budget: limit(self.namespace_budget),
            cluster_budget: limit(self.cluster_budget),
            node_budget: limit(self.node_budget),
            not_ready_grace: secs(self.not_ready_grace_seconds),
            agent_silent_after: secs(self.agent_silent_seconds),
            metrics_addr: Some(self.metrics_addr),
            ..Config::default()
        };
        config.policy = Settings {
            sequencing: !self.no_sequencing,
            pulls_per_holder: self.pulls_per_holder as usize,
            wave_cap: limit(self.wave_cap),
            seed_deadline: secs(self.seed_deadline_seconds),
            seed_cooldown: secs(self.seed_cooldown_seconds),
            seed_cooldown_cap: secs(self.seed_cooldown_seconds) * 10,
            private_images: self.private_images,
            zone_seeding: self.zone_seeding,
            findable_after: secs(self.findable_after_seconds),
            named_sources: !self.no_named_sources,
            reseed_after: secs(self.reseed_after_seconds),
        };
        if let Some(selector) = self.target_nodes {
            config.node_scope.selector = selector;
        }
        config.node_scope.control_plane = self.control_plane_nodes;
        config.gate = self.readiness_taint.map(|taint| crate::gate::Gate {
            taint,
            timeout: secs(self.readiness_timeout_seconds),
        });
        config.pull_secret_grantee = self.agent_service_account;
        if self.leader_elect {
            let identity = self.instance.clone().unwrap_or_else(host_name);
            config.instance = identity.clone();
            config.leader = Some(LeaseConfig::new(&self.pod_namespace, &identity));
        }
        if let Some(image) = self.manage_agent {
            let spec = crate::agent_daemonset::AgentSpec::new(&self.pod_namespace, &image)
                .with_telemetry_env(env);
            config.pull_secret_grantee.get_or_insert(Grantee {
                namespace: spec.namespace.clone(),
                name: spec.service_account.clone(),
            });
            config.agent = Some(spec);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(
            std::iter::once("image-prefetch-controller").chain(args.iter().copied()),
        )
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_flag() {
        let e = parse(&["--retry-limit", "101"]).unwrap_err();
        assert!(e.to_string().contains("--retry-limit"), "{e}");
        assert!(parse(&["--retry-limit=100"]).is_ok());
        assert!(parse(&["--pulls-per-holder", "0"]).is_err());
        assert!(parse(&["--zone-seeding", "sideways"]).is_err());
        assert!(parse(&["--target-nodes", "novalue"]).is_err());
        assert!(parse(&["--agent-service-account", "nonamespace"]).is_err());
    }

    #[test]
    fn no_flags_give_the_documented_defaults() {
        let cli = parse(&[]).unwrap();
        let config = cli.run.config(|| "host".into(), std::iter::empty());
        let expected = Config::default();
        assert_eq!(config.retry_limit, expected.retry_limit);
        assert_eq!(config.policy, Settings::default());
        assert_eq!(config.namespace_budget, Some(DEFAULT_NAMESPACE_BUDGET));
        assert_eq!(config.node_budget, Some(DEFAULT_NODE_BUDGET));
        assert_eq!(config.metrics_addr, Some(([0, 0, 0, 0], 8080).into()));
        assert!(config.leader.is_none() && config.agent.is_none());
    }

    #[test]
    fn zero_means_no_limit_and_flags_reach_the_settings() {
        let cli = parse(&[
            "--namespace-budget=0",
            "--wave-cap",
            "8",
            "--seed-cooldown-seconds",
            "5",
            "--leader-elect",
            "--instance",
            "c-1",
            "--pod-namespace",
            "ops",
        ])
        .unwrap();
        let config = cli.run.config(|| "host".into(), std::iter::empty());
        assert_eq!(config.namespace_budget, None);
        assert_eq!(config.policy.wave_cap, Some(8));
        assert_eq!(config.policy.seed_cooldown_cap, Duration::from_secs(50));
        assert_eq!(config.instance, "c-1");
        assert!(config.leader.is_some());
    }

    #[test]
    fn uninstall_is_a_subcommand() {
        let cli = parse(&["uninstall", "--wait-seconds", "5"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Uninstall { wait_seconds: 5 })
        ));
    }
}
