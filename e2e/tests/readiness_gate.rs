//! The readiness gate on kubelet nodes: the nodes join with the gate's
//! taint (kubelet's `registerWithTaints`), an ImagePrefetch and a Deployment
//! of its image (`imagePullPolicy: Never`) are there before the product is
//! installed; the Deployment's pods stay Pending — no node will take them —
//! until the controller lets each node in once its images are there, and
//! then they start with no pull.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;

mod kubelet_support;

use kubelet_support::{
    apply, install_product_with, kubectl, product_ready, push_product_images, until,
};
use testbed::beds::cluster::Cluster;
use testbed::support::helm::NAMESPACE;

const TAINT: &str = "imageprefetch.io/not-ready";
const WORKLOAD: &str = "team/gated:1";

#[tokio::test(flavor = "multi_thread")]
async fn a_workload_waits_for_its_images_behind_the_gate_then_starts_without_a_pull() {
    let work = testbed::support::workdir::Workdir::new("e2e-readiness-gate");
    let cluster = Cluster::start_gated(&work.join("cluster"), 2, TAINT)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures --cluster)");
    let client = cluster.plane.client().await.unwrap();
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let registry = &cluster.registry;
    push_product_images(&registry.host);
    testbed::builds::images::push_pause(&work.join("workload"), &registry.host, WORKLOAD).unwrap();
    let nodes = cluster.nodes.len();

    // What the cluster wants, before the product runs: an ImagePrefetch of
    // the image, and a workload that may not pull it.
    testbed::support::crds::install(&client).await.unwrap();
    kubectl(&kubeconfig, &["create", "namespace", "team"]);
    let image = format!("{}/{WORKLOAD}", registry.host);
    apply(
        &kubeconfig,
        &json!({"apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
                "metadata": {"name": "gated", "namespace": "team"},
                "spec": {"images": [image]}}),
    );
    apply(
        &kubeconfig,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "gated", "namespace": "team"},
                "spec": {"replicas": nodes, "selector": {"matchLabels": {"app": "gated"}},
                         "template": {"metadata": {"labels": {"app": "gated"}},
                                      "spec": {
                                          "topologySpreadConstraints": [{
                                              "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "DoNotSchedule",
                                              "labelSelector": {"matchLabels": {"app": "gated"}}}],
                                          "containers": [{"name": "web", "image": image,
                                                          "imagePullPolicy": "Never"}]}}}}),
    );
    // Every node is behind the gate: the pods are Pending, unschedulable.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "team");
    until(
        &cluster,
        "the workload's pods Pending behind the gate",
        || async {
            let list = pods
                .list(&ListParams::default().labels("app=gated"))
                .await
                .ok()?;
            let unschedulable = list.items.iter().filter(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.type_ == "PodScheduled"
                                && c.status == "False"
                                && c.reason.as_deref() == Some("Unschedulable")
                        })
                    })
            });
            (unschedulable.count() == nodes).then_some(())
        },
    )
    .await;

    // The product, with the gate on.
    let gate = format!("readinessGate.taint={TAINT}");
    install_product_with(&kubeconfig, &registry.host, &[&gate]);
    product_ready(&client, NAMESPACE, nodes).await;

    // Each node let in once its image is there; the workload then starts
    // there with `imagePullPolicy: Never`: the image was on the node first.
    let workloads: Api<Deployment> = Api::namespaced(client.clone(), "team");
    until(&cluster, "the workload Ready on every node", || async {
        let d = workloads.get("gated").await.ok()?;
        (d.status?.ready_replicas == Some(nodes as i32)).then_some(())
    })
    .await;
    let node_api: Api<Node> = Api::all(client.clone());
    for node in &cluster.nodes {
        let n = node_api.get(&node.name).await.unwrap();
        let taints = n.spec.and_then(|s| s.taints).unwrap_or_default();
        assert!(
            taints.iter().all(|t| t.key != TAINT),
            "{}: still gated: {taints:?}",
            node.name
        );
    }
    let events = kubectl(
        &kubeconfig,
        &[
            "get",
            "events",
            "-A",
            "--field-selector",
            "reason=NodeImagesReady",
            "-o",
            "name",
        ],
    );
    assert_eq!(
        events.lines().count(),
        nodes,
        "one NodeImagesReady per node: {events}"
    );
    // Once per cluster from the registry, as without the gate.
    let pulled = registry.blob_gets("team/gated");
    assert!(
        !pulled.is_empty() && pulled.values().all(|n| *n == 1),
        "each blob fetched from the registry once: {pulled:?}"
    );
}
