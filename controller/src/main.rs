use controller::Config;
use controller::leader::LeaseConfig;
use controller::pull_secrets::Grantee;
use controller::registries::AllowList;

const USAGE: &str = "\
usage: image-prefetch-controller [options]
Reconciles ImagePrefetch objects into per-node NodeImageSets.
Uses the in-cluster service account, or $KUBECONFIG outside a cluster.

  --namespace NS                 only ImagePrefetches in NS (default: all)
  --allowed-registries LIST      comma-separated registry/repository prefixes
                                 (env ALLOWED_REGISTRIES; default: allow all)
  --retry-limit N                imageDownloadRetryLimit for nodes (default 3)
  --pulls-per-holder K           mirror pulls of one image in flight per node holding it
                                 (default 1: the holders double each round)
  --wave-cap N                   most mirror pulls of one image at once, whatever the
                                 holders; 0: no cap (default 0)
  --namespace-budget N           most node×image entries the ImagePrefetches of one
                                 namespace may hold together; one that would pass it is
                                 held back (Degraded BudgetExceeded); 0: no limit
                                 (default 20000)
  --cluster-budget N             most node×image entries all ImagePrefetches may hold
                                 together, so the controller's memory is bounded; one that
                                 would pass it is held back (Degraded BudgetExceeded);
                                 0: no limit (default 100000)
  --node-budget N                most entries all ImagePrefetches may hold on one node
                                 together, so each agent's memory is bounded; one that
                                 would pass it is held back (Degraded BudgetExceeded);
                                 0: no limit (default 4096)
  --seed-deadline-seconds S      replace a seed that fetched no more bytes for S (default 900)
  --seed-cooldown-seconds S      a node that failed as seed is not chosen again for S,
                                 doubling at each failure up to 10x (default 30)
  --findable-after-seconds S     a node holding an image counts as a mirror source S after
                                 it reported it (spegel advertises asynchronously; default 2)
  --no-named-sources             do not name a holder in Mirror entries: every Mirror pull
                                 goes through spegel's lookup, holders count once findable
                                 (default: named, from the holder's InternalIP)
  --reseed-after-seconds S       when no Mirror pull of an image in a zone has succeeded and
                                 some failed for S, one of those nodes pulls it from the
                                 registry again (default 300)
  --not-ready-grace-seconds S    keep a NotReady node selected for S (default 300)
  --agent-silent-seconds S       an entry its node's agent has not reported on for S no
                                 longer holds the rollout back (Degraded AgentNotReporting;
                                 default 300)
  --no-sequencing                every node pulls from the registry at once
                                 (for comparison only: defeats the point)
  --leader-elect                 hold a Lease in $POD_NAMESPACE before reconciling
  --metrics-addr ADDR            /metrics, /healthz, /readyz (default 0.0.0.0:8080)
  --manage-agent IMAGE           create and keep the agent DaemonSet in $POD_NAMESPACE
                                 with IMAGE (installs that cannot ship one, e.g. OLM);
                                 its ServiceAccount gets the pull-secret grants
  --target-nodes K=V[,K=V...]    the nodes ImagePrefetches may target at all: each
                                 ImagePrefetch's selector is intersected with this
  --control-plane-nodes          let ImagePrefetches target control-plane nodes too
                                 (excluded by default)
  --private-images isolate|share an image pulled with credentials is served from the
                                 mirror only within its namespace (isolate, default),
                                 or to everyone (share)
  --zone-seeding sequential|parallel
                                 sequential (default): one zone seeds an image from its
                                 registry, the others once it holds it (through the
                                 mirror): once per cluster; parallel: every zone at once
  --agent-service-account NS/NAME
                                 grant the agent's ServiceAccount `get` on exactly the
                                 pull secrets ImagePrefetches name, per namespace
                                 (a Role and RoleBinding image-prefetch-pull-secrets)
";

fn parse_args() -> Config {
    let mut config = Config {
        metrics_addr: Some(([0, 0, 0, 0], 8080).into()),
        allowed: AllowList::parse(&std::env::var("ALLOWED_REGISTRIES").unwrap_or_default()),
        // Installs that pass no flag (OLM's bundle) get the chart's bound.
        namespace_budget: Some(controller::run::DEFAULT_NAMESPACE_BUDGET),
        cluster_budget: Some(controller::run::DEFAULT_CLUSTER_BUDGET),
        node_budget: Some(controller::run::DEFAULT_NODE_BUDGET),
        ..Config::default()
    };
    let mut args = telemetry::cli::Args::from_env(USAGE);
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--namespace" => config.namespace = Some(args.value(&flag)),
            "--allowed-registries" => config.allowed = AllowList::parse(&args.value(&flag)),
            "--retry-limit" => config.retry_limit = args.number(&flag) as i32,
            "--pulls-per-holder" => {
                config.policy.pulls_per_holder = args.number(&flag).max(1) as usize
            }
            "--wave-cap" => {
                config.policy.wave_cap = Some(args.number(&flag) as usize).filter(|&n| n > 0)
            }
            "--namespace-budget" => {
                config.namespace_budget = Some(args.number(&flag) as usize).filter(|&n| n > 0)
            }
            "--node-budget" => {
                config.node_budget = Some(args.number(&flag) as usize).filter(|&n| n > 0)
            }
            "--cluster-budget" => {
                config.cluster_budget = Some(args.number(&flag) as usize).filter(|&n| n > 0)
            }
            "--seed-deadline-seconds" => config.policy.seed_deadline = args.seconds(&flag),
            "--findable-after-seconds" => config.policy.findable_after = args.seconds(&flag),
            "--reseed-after-seconds" => config.policy.reseed_after = args.seconds(&flag),
            "--seed-cooldown-seconds" => {
                config.policy.seed_cooldown = args.seconds(&flag);
                config.policy.seed_cooldown_cap = config.policy.seed_cooldown * 10;
            }
            "--not-ready-grace-seconds" => config.not_ready_grace = args.seconds(&flag),
            "--agent-silent-seconds" => config.agent_silent_after = args.seconds(&flag),
            "--no-sequencing" => config.policy.sequencing = false,
            "--no-named-sources" => config.policy.named_sources = false,
            "--leader-elect" => {
                let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
                let identity = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
                config.instance = identity.clone();
                config.leader = Some(LeaseConfig::new(&namespace, &identity));
            }
            "--metrics-addr" => config.metrics_addr = Some(args.addr(&flag)),
            "--manage-agent" => {
                let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
                let image = args.value(&flag);
                let spec = controller::agent_daemonset::AgentSpec::new(&namespace, &image)
                    .with_telemetry_env(std::env::vars());
                config.pull_secret_grantee.get_or_insert(Grantee {
                    namespace: spec.namespace.clone(),
                    name: spec.service_account.clone(),
                });
                config.agent = Some(spec);
            }
            "--target-nodes" => {
                let value = args.value(&flag);
                config.node_scope.selector = controller::select::NodeScope::parse_selector(&value)
                    .unwrap_or_else(|| {
                        args.fail(&format!(
                            "--target-nodes {value}: expected key=value[,key=value]"
                        ))
                    });
            }
            "--zone-seeding" => {
                let value = args.value(&flag);
                config.policy.zone_seeding = value
                    .parse()
                    .unwrap_or_else(|e: String| args.fail(&format!("--zone-seeding {e}")));
            }
            "--private-images" => {
                let value = args.value(&flag);
                config.policy.private_images = value
                    .parse()
                    .unwrap_or_else(|e: String| args.fail(&format!("--private-images {e}")));
            }
            "--control-plane-nodes" => config.node_scope.control_plane = true,
            "--agent-service-account" => {
                let value = args.value(&flag);
                config.pull_secret_grantee = Some(Grantee::parse(&value).unwrap_or_else(|| {
                    args.fail(&format!(
                        "--agent-service-account {value}: expected NAMESPACE/NAME"
                    ))
                }));
            }
            "-h" | "--help" => args.help(),
            other => args.fail(&format!("unknown option {other}")),
        }
    }
    config
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| format!("controller-{}", std::process::id()))
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("uninstall") {
        uninstall().await;
        return;
    }
    let config = parse_args();
    let _telemetry = telemetry::init("image-prefetch-controller");
    let client = client_or_exit().await;
    let leader_elected = config.leader.is_some();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopping.clone();
    let shutdown = async move {
        telemetry::shutdown_signal().await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    controller::run(client, config, shutdown).await;
    if leader_elected && !stopping.load(std::sync::atomic::Ordering::SeqCst) {
        // Leadership was lost: exit so the pod restarts as a clean standby.
        std::process::exit(1);
    }
}

const UNINSTALL_USAGE: &str = "\
usage: image-prefetch-controller uninstall [--wait-seconds S]
Deletes every ImagePrefetch (through the running controller, which removes
their NodeImageSets and so the nodes' pins) and every NodeImageSet; if the
controller has not finished within S seconds (default 120), removes the
sets and the finalizers itself. The chart's pre-delete hook runs it.
";

async fn uninstall() {
    let mut wait = std::time::Duration::from_secs(120);
    let mut args = telemetry::cli::Args::from_env(UNINSTALL_USAGE);
    args.next_flag(); // "uninstall"
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--wait-seconds" => wait = args.seconds(&flag),
            other => args.fail(&format!("unknown flag {other}")),
        }
    }
    let _telemetry = telemetry::init("image-prefetch-controller");
    let client = client_or_exit().await;
    if let Err(e) = controller::uninstall::uninstall(client, wait).await {
        tracing::error!(error = %e, "uninstall failed");
        std::process::exit(1);
    }
}

/// The in-cluster client, or $KUBECONFIG's; the process ends when there is none.
async fn client_or_exit() -> kube::Client {
    match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API: set KUBECONFIG or run in a cluster");
            std::process::exit(1);
        }
    }
}
