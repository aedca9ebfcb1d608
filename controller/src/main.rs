//! `image-prefetch-controller`: the command line (`controller::cli`), then
//! the controller (`controller::run`) or its `uninstall` subcommand.

use clap::Parser;
use controller::cli::{Cli, Command};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| format!("controller-{}", std::process::id()))
}

fn main() {
    controller::memory::use_one_arena();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime")
        .block_on(run());
}

async fn run() {
    let cli = Cli::parse();
    if let Some(Command::Uninstall { wait_seconds }) = cli.command {
        uninstall(std::time::Duration::from_secs(wait_seconds)).await;
        return;
    }
    let config = cli.run.config(hostname, std::env::vars());
    let _traces = plumbing::init("image-prefetch-controller");
    let client = client_or_exit().await;
    let leader_elected = config.leader.is_some();
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopping.clone();
    let shutdown = async move {
        plumbing::shutdown_signal().await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    controller::run(client, config, shutdown).await;
    if leader_elected && !stopping.load(std::sync::atomic::Ordering::SeqCst) {
        // Leadership was lost: exit so the pod restarts as a clean standby.
        std::process::exit(1);
    }
}

async fn uninstall(wait: std::time::Duration) {
    let _traces = plumbing::init("image-prefetch-controller");
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
