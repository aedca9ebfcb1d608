use std::time::Duration;

use agent::work::{self, Config};

const USAGE: &str = "\
usage: image-prefetch-agent [options]
Pulls the images of this node's NodeImageSets through the node's containerd.
Uses the in-cluster service account, or $KUBECONFIG outside a cluster.

  --node-name NAME               this node (default $NODE_NAME, from the downward API)
  --containerd-socket PATH       default /run/containerd/containerd.sock
  --registry-config-dir DIR      the node's registry hosts (default /etc/containerd/certs.d)
  --mirror-config-dir DIR        where Mirror-only host files go (default /var/lib/image-prefetch/hosts)
  --concurrency N                pulls at once (default 2)
  --pull-timeout-seconds S       one attempt's limit (default 600)
  --resync-seconds S             how often present images are re-checked (default 300)
  --metrics-addr ADDR            /metrics, /healthz, /readyz (default 0.0.0.0:8080)
";

fn usage(problem: &str) -> ! {
    eprintln!("{problem}\n\n{USAGE}");
    std::process::exit(2)
}

fn parse_args() -> Config {
    let mut config = Config {
        metrics_addr: Some(([0, 0, 0, 0], 8080).into()),
        ..Config::new(&std::env::var("NODE_NAME").unwrap_or_default())
    };
    let mut args = telemetry::cli_args().into_iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        let mut number = |what: &str| -> u64 {
            let v = value();
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{what}: {v:?} is not a whole number")))
        };
        match arg.as_str() {
            "--node-name" => config.node_name = value(),
            "--containerd-socket" => config.containerd_socket = value().into(),
            "--registry-config-dir" => config.node_hosts_dir = value().into(),
            "--mirror-config-dir" => config.mirror_hosts_dir = value().into(),
            "--concurrency" => config.concurrency = number("--concurrency").max(1) as usize,
            "--pull-timeout-seconds" => {
                config.pull_timeout = Duration::from_secs(number("--pull-timeout-seconds"))
            }
            "--resync-seconds" => config.resync = Duration::from_secs(number("--resync-seconds")),
            "--metrics-addr" => {
                let v = value();
                config.metrics_addr = Some(v.parse().unwrap_or_else(|_| {
                    usage(&format!("--metrics-addr: {v:?} is not an address:port"))
                }));
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0)
            }
            other => usage(&format!("unknown option {other}")),
        }
    }
    if config.node_name.is_empty() {
        usage("no node name: pass --node-name or set NODE_NAME");
    }
    config
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
