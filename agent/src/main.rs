use agent::work::{self, Config};

const USAGE: &str = "\
usage: image-prefetch-agent [options]
Pulls the images of this node's NodeImageSets through the node's containerd.
Uses the in-cluster service account, or $KUBECONFIG outside a cluster.

  --node-name NAME               this node (default $NODE_NAME, from the downward API)
  --containerd-socket PATH       default /run/containerd/containerd.sock
  --registry-config-dir DIR      the node's registry hosts (default /etc/containerd/certs.d)
  --mirror-config-dir DIR        where Mirror-only host files go (default /var/lib/image-prefetch/hosts)
  --mirror-endpoints LIST        the hosts of the node's registry configuration that are the
                                 in-cluster mirror, comma-separated: URLs as hosts.toml names
                                 them, or :PORT for any host at that port (default
                                 $MIRROR_ENDPOINTS, else spegel's targets :30020,:30021);
                                 Mirror pulls use these and no other host
  --concurrency N                pulls at once (default 2)
  --pull-timeout-seconds S       one attempt's limit (default 600)
  --resync-seconds S             how often present images are re-checked (default 300)
  --metrics-addr ADDR            /metrics, /healthz, /readyz (default 0.0.0.0:8080)
  --failed-retry-seconds S       an image that failed is tried again after S, doubling
                                 at each failure up to 10x (default 30)
  --image-fs PATH                the node's image filesystem, containerd's root
                                 (default /var/lib/containerd)
  --image-fs-high-percent N      start no pull while it is fuller than N% (default 80,
                                 under kubelet's image GC high threshold of 85; 100: off)
  --progress-seconds S           a seed's bytes so far are reported at most every S
                                 (default 30)
  --sandbox-images LIST          repositories of sandbox (pause) images, comma-separated:
                                 released, they keep CRI's pin (default $SANDBOX_IMAGES,
                                 else registry.k8s.io/pause)
  --platform OS/ARCH[/VARIANT]   the platform to pull for (default this machine's); of an
                                 image index only this platform's content is fetched
";

fn parse_args() -> Config {
    let mut config = Config {
        metrics_addr: Some(([0, 0, 0, 0], 8080).into()),
        ..Config::new(&std::env::var("NODE_NAME").unwrap_or_default())
    };
    if let Ok(list) = std::env::var("MIRROR_ENDPOINTS") {
        config.mirror_endpoints = endpoints(&list);
    }
    if let Ok(list) = std::env::var("SANDBOX_IMAGES") {
        config.sandbox_images = sandbox_images(&list);
    }
    let mut args = telemetry::cli::Args::from_env(USAGE);
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--node-name" => config.node_name = args.value(&flag),
            "--containerd-socket" => config.containerd_socket = args.value(&flag).into(),
            "--registry-config-dir" => config.node_hosts_dir = args.value(&flag).into(),
            "--mirror-config-dir" => config.mirror_hosts_dir = args.value(&flag).into(),
            "--mirror-endpoints" => config.mirror_endpoints = endpoints(&args.value(&flag)),
            "--sandbox-images" => config.sandbox_images = sandbox_images(&args.value(&flag)),
            "--concurrency" => config.concurrency = args.number(&flag).max(1) as usize,
            "--pull-timeout-seconds" => config.pull_timeout = args.seconds(&flag),
            "--resync-seconds" => config.resync = args.seconds(&flag),
            "--failed-retry-seconds" => {
                let first = args.seconds(&flag);
                config.failed_backoff = agent::ledger::Backoff {
                    first,
                    cap: first * 10,
                };
            }
            "--image-fs" => config.image_fs = args.value(&flag).into(),
            "--image-fs-high-percent" => {
                config.image_fs_high_percent = args.number(&flag).min(100) as u8
            }
            "--progress-seconds" => config.progress_every = args.seconds(&flag),
            "--metrics-addr" => config.metrics_addr = Some(args.addr(&flag)),
            "--platform" => {
                let value = args.value(&flag);
                config.platform = crd::platform::Platform::parse(&value).unwrap_or_else(|| {
                    args.fail(&format!("--platform {value}: expected os/arch[/variant]"))
                });
            }
            "-h" | "--help" => args.help(),
            other => args.fail(&format!("unknown option {other}")),
        }
    }
    if config.node_name.is_empty() {
        args.fail("no node name: pass --node-name or set NODE_NAME");
    }
    config
}

fn endpoints(list: &str) -> agent::hosts::MirrorEndpoints {
    agent::hosts::MirrorEndpoints::new(list.split(',').map(|e| e.trim().to_string()))
}

#[tokio::main]
async fn main() {
    let config = parse_args();
    let _telemetry = telemetry::init("image-prefetch-agent");
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API: set KUBECONFIG or run in a cluster");
            std::process::exit(1);
        }
    };
    if let Err(e) = work::run(client, config, telemetry::shutdown_signal()).await {
        tracing::error!(error = %e, "agent stopped");
        std::process::exit(1);
    }
}

fn sandbox_images(list: &str) -> agent::pins::SandboxImages {
    agent::pins::SandboxImages::new(list.split(',').map(String::from))
}
