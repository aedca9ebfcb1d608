//! Helpers for the agent's tests: NodeImageSets written as the controller
//! would, status polls, the agent as a real process.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crd::{NodeImageSet, keys};

pub const MB: usize = 1024 * 1024;

/// Writes a NodeImageSet as the controller would.
pub async fn set(
    client: &kube::Client,
    name: &str,
    node: &str,
    entries: serde_json::Value,
    retry_limit: i32,
) {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let obj = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "metadata": {"name": name, "labels": {keys::NODE: node}},
        "spec": {"nodeName": node, "imageSet": entries, "imageDownloadRetryLimit": retry_limit},
    });
    api.patch(
        name,
        &PatchParams::apply("test-controller").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
}

pub async fn wait_status<F: Fn(&crd::NodeImageSetStatus) -> bool>(
    client: &kube::Client,
    name: &str,
    what: &str,
    ok: F,
) -> crd::NodeImageSetStatus {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let last = std::sync::Mutex::new(None);
    testbed::support::poll::eventually_or(
        what,
        Duration::from_secs(60),
        || async {
            let st = api.get_status(name).await.unwrap().status;
            *last.lock().unwrap() = st.clone();
            st.filter(|st| ok(st))
        },
        || format!("the status is {:#?}", last.lock().unwrap()),
    )
    .await
}

/// The real agent binary for `node`, logging (at debug) into `log`.
pub fn agent_process(
    node: &str,
    containerd: &testbed::servers::containerd::Containerd,
    mirror_dir: &Path,
    log: &Path,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_image-prefetch-agent"))
        .args(["--node-name", node, "--containerd-socket"])
        .arg(&containerd.socket)
        .arg("--registry-config-dir")
        .arg(&containerd.hosts_dir)
        .arg("--mirror-config-dir")
        .arg(mirror_dir)
        .args(["--mirror-endpoints", &containerd.mirror_endpoints()])
        // The machine's disk is no node's image filesystem under pressure.
        .args(["--image-fs-high-percent", "100"])
        .env("KUBECONFIG", &testbed::beds::shared::get().kubeconfig)
        .args(["--metrics-addr", "127.0.0.1:0"])
        // A failed image is tried again soon: tests see convergence quickly.
        .args(["--failed-retry-seconds", "2"])
        .env("RUST_LOG", "debug")
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `ctr`, Debian's containerd client, against a test node.
pub fn ctr(containerd: &testbed::servers::containerd::Containerd, args: &[&str]) -> String {
    containerd.ctr(args)
}

/// One sample of `/metrics` text: the value of the line starting with `series`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The agent's settings for a node of the test's own, with quick retries.
pub fn config(
    node: &str,
    containerd: &testbed::servers::containerd::Containerd,
    dir: &testbed::support::workdir::Workdir,
) -> agent::work::Config {
    agent::work::Config {
        containerd_socket: containerd.socket.clone(),
        node_hosts_dir: containerd.hosts_dir.clone(),
        mirror_hosts_dir: dir.join("agent-hosts"),
        // The mirrors the test configured the node with (before this call).
        mirror_endpoints: agent::hosts::MirrorEndpoints::new(
            containerd.mirror_endpoints().split(',').map(String::from),
        ),
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
        // The machine's disk is no node's image filesystem under pressure.
        image_fs: containerd.dir.clone(),
        image_fs_high_percent: 100,
        ..agent::work::Config::new(node)
    }
}

/// The agent's log in the test's output (shown when a test fails).
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "agent=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The agent in this process until the sender is used.
pub fn run(
    client: &kube::Client,
    config: agent::work::Config,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    logs();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(agent::work::run(client.clone(), config, async move {
        let _ = stopped.await;
    }));
    (stop, running)
}

/// What most agent tests start from: a registry holding `repository:tag`
/// (layers of `layers` bytes) and a node whose containerd pulls from it.
pub struct NodeAndRegistry {
    pub upstream: testbed::servers::registry::Registry,
    pub image: testbed::builds::images::Image,
    pub node: testbed::servers::containerd::Containerd,
}

impl NodeAndRegistry {
    pub fn start(
        dir: &testbed::support::workdir::Workdir,
        repository: &str,
        tag: &str,
        layers: &[usize],
    ) -> Self {
        let upstream = testbed::servers::registry::Registry::start(&dir.join("upstream")).unwrap();
        let image = testbed::builds::images::build_and_push(
            &dir.join("images"),
            &upstream.host,
            repository,
            tag,
            layers,
        )
        .unwrap();
        let node = testbed::servers::containerd::Containerd::start(&dir.join("node"))
            .expect("containerd 2 (cargo xtask fixtures)");
        node.configure_registry(&upstream.host, &[]).unwrap();
        NodeAndRegistry {
            upstream,
            image,
            node,
        }
    }
}
