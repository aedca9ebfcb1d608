//! What the kubelet cluster bed's tests share: kubectl, the product's
//! images, waiting for the product's pods.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::Api;

use testbed::beds::simulated::{AGENT, CONTROLLER, binary};
use testbed::support::poll::eventually;

/// How long the bed's pods and rollouts may take: generous, for a CI
/// machine of 2 cores running a whole cluster per test.
pub const PATIENCE: Duration = Duration::from_secs(300);

/// kubectl against the bed, as it ran: for commands that may be refused.
pub fn kubectl_output(kubeconfig: &std::path::Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl runs")
}

/// kubectl against the bed: what it printed; panics when it fails.
pub fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let out = kubectl_output(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The project's images, as a release would publish them (`testbed::builds::oci`,
/// the Dockerfiles' layout), tagged `dev`.
pub fn push_product_images(registry: &str) {
    for name in [CONTROLLER, AGENT] {
        let local =
            testbed::builds::oci::build(&binary(name), name, "dev", testbed::builds::oci::NONROOT)
                .expect("buildah image of a workspace binary");
        testbed::builds::oci::push(&local, &format!("{registry}/{name}:dev")).unwrap();
    }
}

/// `helm install` of the chart as documented, its images from the bed's
/// `registry` (tag `dev`, `push_product_images`), with the chart's defaults
/// for the node paths. The disk guard is off: the bed's nodes share the
/// machine's disk, however full other work makes it, so no node's image
/// filesystem is under pressure (the disk guard has tests of its own).
pub fn install_product(kubeconfig: &std::path::Path, registry: &str) {
    install_product_with(kubeconfig, registry, &[]);
}

/// [`install_product`] with more `--set` values.
pub fn install_product_with(kubeconfig: &std::path::Path, registry: &str, sets: &[&str]) {
    let registry_value = format!("image.registry={registry}");
    let mut args = vec![
        "--set",
        &registry_value,
        "--set",
        "image.tag=dev",
        "--set",
        "agent.imageFsHighPercent=100",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    testbed::support::helm::install(kubeconfig, &args);
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
    let out = kubectl_output(kubeconfig, &["apply", "-f", path.to_str().unwrap()]);
    if !out.status.success() {
        eprintln!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    out.status.success()
}

/// What to look at when the bed does not get where a test waits for: the
/// ImagePrefetches, NodeImageSets and pods as the API server has them. (The
/// end of every pod's log, and of every process's, follows from
/// `testbed::support::workdir` as the failed test's directory goes.)
pub fn diagnostics(cluster: &testbed::beds::cluster::Cluster) -> String {
    let get = |args: &[&str]| {
        String::from_utf8_lossy(&kubectl_output(&cluster.plane.kubeconfig, args).stdout)
            .into_owned()
    };
    get(&["get", "imageprefetch,nodeimagesets", "-A", "-o", "yaml"])
        + &get(&["get", "pods", "-A", "-o", "wide"])
}

/// Waits until kubectl shows the ImagePrefetch `namespace/name` Ready on
/// every node of the bed (`N/N` in its READY column); what it printed then.
pub async fn rollout_ready(
    cluster: &testbed::beds::cluster::Cluster,
    namespace: &str,
    name: &str,
) -> String {
    let nodes = cluster.nodes.len();
    let args = ["get", "imageprefetch", "-n", namespace, name];
    until(cluster, &format!("kubectl shows {name} Ready"), || async {
        let table = kubectl(&cluster.plane.kubeconfig, &args);
        table.contains(&format!("{nodes}/{nodes}")).then_some(table)
    })
    .await
}

/// Polls `check` until it gives `Some` or [`PATIENCE`] has passed; then
/// panics saying `what` and what the bed looks like.
pub async fn until<T, F, Fut>(cluster: &testbed::beds::cluster::Cluster, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    testbed::support::poll::eventually_or(what, PATIENCE, check, || diagnostics(cluster)).await
}
