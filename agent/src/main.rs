//! image-prefetch agent, one per node (DaemonSet).
//!
//! This first cut connects to the node's containerd and follows the
//! NodeImageSets of its own node; pulling them is the next step (issue 4).

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tracing::{error, info};

use crd::{NodeImageSet, keys};

struct Args {
    node_name: String,
    containerd_socket: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: image-prefetch-agent --node-name NAME [--containerd-socket PATH]\n\
         NAME defaults to $NODE_NAME (set it from the downward API);\n\
         PATH defaults to /run/containerd/containerd.sock."
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut node_name = std::env::var("NODE_NAME").ok();
    let mut containerd_socket = "/run/containerd/containerd.sock".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--node-name" => node_name = Some(value()),
            "--containerd-socket" => containerd_socket = value(),
            _ => usage(),
        }
    }
    Args {
        node_name: node_name.unwrap_or_else(|| usage()),
        containerd_socket,
    }
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let _telemetry = telemetry::init("image-prefetch-agent");
    match containerd_client::Client::from_path(&args.containerd_socket).await {
        Ok(c) => match c.version().version(()).await {
            Ok(v) => {
                info!(version = %v.get_ref().version, socket = %args.containerd_socket, "connected to containerd")
            }
            Err(e) => {
                error!(error = %e, socket = %args.containerd_socket, "containerd did not answer its version")
            }
        },
        Err(e) => {
            error!(error = %e, socket = %args.containerd_socket, "cannot connect to containerd: check the socket path and the hostPath mount")
        }
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot reach the Kubernetes API: set KUBECONFIG or run in a cluster");
            std::process::exit(1);
        }
    };
    let sets: Api<NodeImageSet> = Api::all(client);
    let config = watcher::Config::default().labels(&keys::on_node(&args.node_name));
    let mut events = watcher(sets, config).applied_objects().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(set) => {
                info!(set = %kube::ResourceExt::name_any(&set), images = set.spec.image_set.len(), "NodeImageSet for this node")
            }
            Err(e) => error!(error = %e, "watching NodeImageSets failed; retrying"),
        }
    }
}
