//! kube-apiserver restarted under the installed product (an upgrade of the
//! control plane): the chart's pods on kubelet nodes — two controller
//! replicas with leader election, the agent on every node — are what an
//! administrator has running when it happens. The API server is stopped for
//! 30 s and started again (etcd running on); the kubelets, the scheduler and
//! the controller manager come back by themselves, and so must the product:
//! an ImagePrefetch made afterwards rolls out through the pods, with no one
//! restarting anything.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

mod kubelet_support;

use kubelet_support::{
    apply, install_product, kubectl, product_ready, push_product_images, rollout_ready, try_apply,
    until,
};
use testbed::beds::cluster::Cluster;
use testbed::support::helm::NAMESPACE;

const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_product_recovers_from_an_api_server_restart() {
    let work = testbed::support::workdir::Workdir::new("e2e-apiserver-restart");
    let mut cluster = Cluster::start(&work.join("cluster"), 2)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures --cluster)");
    let client = cluster.plane.client().await.unwrap();
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let registry = cluster.registry.host.clone();
    push_product_images(&registry);
    for tag in ["before", "after"] {
        testbed::builds::images::push_pause(&work.join(tag), &registry, &format!("team/web:{tag}"))
            .unwrap();
    }
    install_product(&kubeconfig, &registry);
    product_ready(&client, NAMESPACE, cluster.nodes.len()).await;
    kubectl(&kubeconfig, &["create", "namespace", "team"]);
    let nodes = cluster.nodes.len();
    let rollout = |name: &'static str| {
        json!({"apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
               "metadata": {"name": name, "namespace": "team"},
               "spec": {"images": [format!("{registry}/team/web:{name}")]}})
    };
    apply(&kubeconfig, &rollout("before"));
    rollout_ready(&cluster, "team", "before").await;

    cluster.plane.stop_apiserver();
    tokio::time::sleep(OUTAGE).await;
    cluster
        .plane
        .start_apiserver()
        .await
        .expect("kube-apiserver starts again");
    let back = Instant::now();

    // A client of its own: the old one's connections died with the server.
    let client = cluster.plane.client().await.unwrap();
    // The server is ready; the CRDs' discovery may lag it by a moment.
    until(
        &cluster,
        "the ImagePrefetch taken after the restart",
        || async { try_apply(&kubeconfig, &rollout("after")).then_some(()) },
    )
    .await;
    rollout_ready(&cluster, "team", "after").await;
    eprintln!(
        "apiserver restart: the rollout made after it Ready {:.0}s after the server was back",
        back.elapsed().as_secs_f64()
    );
    // And the product is whole again: both controller replicas and every
    // agent Ready. The agents rode the outage out; a controller replica
    // that led when the API server went away could not renew its lease in
    // time, stepped down and exited, to come back as a standby (once).
    product_ready(&client, NAMESPACE, nodes).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    for pod in pods.list(&ListParams::default()).await.unwrap() {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let component =
            pod.metadata.labels.clone().unwrap_or_default()["app.kubernetes.io/component"].clone();
        let restarts: i32 = pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .iter()
            .map(|c| c.restart_count)
            .sum();
        eprintln!("apiserver restart: {name} restarted {restarts} times");
        let most = if component == "agent" { 0 } else { 1 };
        assert!(restarts <= most, "{name} restarted {restarts} times");
    }
}
