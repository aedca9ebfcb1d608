use controller::Config;

fn usage() -> ! {
    eprintln!(
        "usage: image-prefetch-controller [--namespace NS] [--retry-limit N]\n\
         Reconciles ImagePrefetch objects into per-node NodeImageSets.\n\
         Uses the in-cluster service account, or $KUBECONFIG outside a cluster."
    );
    std::process::exit(2)
}

fn parse_args() -> Config {
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--namespace" => config.namespace = Some(value()),
            "--retry-limit" => {
                config.retry_limit = value().parse().unwrap_or_else(|_| usage());
            }
            _ => usage(),
        }
    }
    config
}

#[tokio::main]
async fn main() {
    let config = parse_args();
    let _telemetry = telemetry::init("image-prefetch-controller");
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API: set KUBECONFIG or run in a cluster");
            std::process::exit(1);
        }
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    controller::run(client, config, shutdown).await;
}
