//! What the kubelet cluster bed's tests share: kubectl, the product's
//! images, waiting for the product's pods.
#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::Api;

use testbed::poll::eventually;
use testbed::simulated::{AGENT, CONTROLLER, binary};

/// How long the bed's pods and rollouts may take: generous, for a CI
/// machine of 2 cores running a whole cluster per test.
pub const PATIENCE: Duration = Duration::from_secs(300);

pub fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The project's images, as a release would publish them (`testbed::oci`,
/// the Dockerfiles' layout), tagged `dev`.
pub fn push_product_images(registry: &str) {
    for name in [CONTROLLER, AGENT] {
        let local = testbed::oci::build(&binary(name), name, "dev", testbed::oci::NONROOT)
            .expect("buildah image of a workspace binary");
        testbed::oci::push(&local, &format!("{registry}/{name}:dev")).unwrap();
    }
}

/// `helm install` of the chart as documented, its images from the bed's
/// `registry` (tag `dev`, `push_product_images`), with the chart's defaults
/// for the node paths. The disk guard is off: the bed's nodes share the
/// machine's disk, however full other work makes it, so no node's image
/// filesystem is under pressure (the disk guard has tests of its own).
pub fn install_product(kubeconfig: &std::path::Path, registry: &str) {
    let registry_value = format!("image.registry={registry}");
    testbed::helm::install(
        kubeconfig,
        &[
            "--set",
            &registry_value,
            "--set",
            "image.tag=dev",
            "--set",
            "agent.imageFsHighPercent=100",
        ],
    );
}

/// Waits until `namespace`'s controller Deployment has two Ready replicas
/// and the agent DaemonSet is Ready on all `nodes`.
pub async fn product_ready(client: &kube::Client, namespace: &str, nodes: usize) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    eventually(
        "the product's pods Ready",
        Duration::from_secs(120),
        || async {
            let controller = deployments.get("image-prefetch-controller").await.ok()?;
            let agent = daemonsets.get("image-prefetch-agent").await.ok()?;
            let ready = controller.status?.ready_replicas == Some(2)
                && agent.status?.number_ready == nodes as i32;
            ready.then_some(())
        },
    )
    .await;
}

pub fn apply(kubeconfig: &std::path::Path, manifest: &serde_json::Value) {
    assert!(try_apply(kubeconfig, manifest), "kubectl apply {manifest}");
}

/// `kubectl apply` of `manifest`: whether the API server took it (for a
/// server that may still be starting).
pub fn try_apply(kubeconfig: &std::path::Path, manifest: &serde_json::Value) -> bool {
    let path = kubeconfig.with_extension(format!("{}.json", std::process::id()));
    std::fs::write(&path, manifest.to_string()).unwrap();
    let out = Command::new("kubectl")
        .args(["apply", "-f", path.to_str().unwrap()])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl runs");
    if !out.status.success() {
        eprintln!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

/// What to look at when the bed does not get where a test waits for: the
/// ImagePrefetches, NodeImageSets and pods as the API server has them, and
/// the end of every pod's log on every node.
pub fn diagnostics(cluster: &testbed::cluster::Cluster) -> String {
    let kubeconfig = &cluster.plane.kubeconfig;
    let get = |args: &[&str]| {
        let out = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut text = String::new();
    text.push_str(&get(&[
        "get",
        "imageprefetch,nodeimagesets",
        "-A",
        "-o",
        "yaml",
    ]));
    text.push_str(&get(&["get", "pods", "-A", "-o", "wide"]));
    for node in &cluster.nodes {
        let logs = node.dir.join("pod-logs");
        for entry in walk(&logs) {
            let body = std::fs::read_to_string(&entry).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(15).collect();
            text.push_str(&format!("\n== {} {}\n", node.name, entry.display()));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Polls `check` until it gives `Some` or [`PATIENCE`] has passed; then
/// panics saying `what` and what the bed looks like.
pub async fn until<T, F, Fut>(cluster: &testbed::cluster::Cluster, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!("{what}: not within {PATIENCE:?}\n{}", diagnostics(cluster));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
