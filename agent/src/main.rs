//! `image-prefetch-agent`: the command line (`agent::cli`), then the agent
//! on its node (`agent::work`).

use agent::cli::Cli;
use agent::work;
use clap::Parser;

#[tokio::main]
async fn main() {
    let config = match Cli::parse().config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("image-prefetch-agent: {e}");
            std::process::exit(2);
        }
    };
    let _traces = plumbing::init("image-prefetch-agent");
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API: set KUBECONFIG or run in a cluster");
            std::process::exit(1);
        }
    };
    work::run(client, config, plumbing::shutdown_signal()).await;
}
