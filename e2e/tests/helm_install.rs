//! The administrator's path, for real: the project's images built with
//! buildah and pushed to the bed's registry, `helm install` onto a kubelet
//! node (`testbed::beds::cluster`), the chart's pods Ready — two controller
//! replicas, one leader, and the agent — an ImagePrefetch rolled out through
//! them and followed with kubectl, then a Deployment of that image with
//! `imagePullPolicy: Never` Running without a pull — named by its tag, its
//! digest, and both: the user story. Then `helm uninstall`, with the
//! ImagePrefetch still there, leaves nothing of ours behind: no object, no
//! finalizer, no pin on a node, no host file.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

mod kubelet_support;

use kubelet_support::{
    apply, install_product, kubectl, product_ready, push_product_images, rollout_ready, until,
};
use testbed::beds::cluster::Cluster;
use testbed::support::helm::NAMESPACE;

const WORKLOAD: &str = "team/web:1";

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_onto_kubelet_nodes_and_a_workload_starts_without_a_pull() {
    let work = testbed::support::workdir::Workdir::new("e2e-helm-install");
    // Three nodes: a seed, a node confirming its digest, and a Mirror pull.
    let cluster = Cluster::start(&work.join("cluster"), 3)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures --cluster)");
    let client = cluster.plane.client().await.unwrap();
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let registry = &cluster.registry;

    push_product_images(&registry.host);
    testbed::builds::images::push_pause(&work.join("workload"), &registry.host, WORKLOAD).unwrap();

    // helm install, as documented.
    install_product(&kubeconfig, &registry.host);

    // The chart's pods Ready: two controller replicas, the agent on every node.
    product_ready(&client, NAMESPACE, cluster.nodes.len()).await;
    // One leader among the two replicas.
    let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .get("image-prefetch-controller")
        .await
        .expect("the leader's lease");
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let controllers = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await
        .unwrap();
    assert!(
        controllers
            .items
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some(&holder)),
        "the lease is held by one of the replicas: {holder}"
    );

    // Pod networks reach across nodes: from the first node, the agent pod
    // of every node answers on its pod address.
    let agents = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
        .await
        .unwrap();
    for pod in &agents.items {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
        let out = cluster.nodes[0]
            .command(std::path::Path::new("bash"))
            .args([
                "-c",
                &format!(
                    "exec 3<>/dev/tcp/{ip}/8080 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3"
                ),
            ])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout);
        assert!(
            line.contains(" 200"),
            "agent pod {ip} from the first node: {line:?}"
        );
    }

    // An ImagePrefetch, rolled out by the pods, followed with kubectl.
    kubectl(&kubeconfig, &["create", "namespace", "team"]);
    let image = format!("{}/{WORKLOAD}", registry.host);
    apply(
        &kubeconfig,
        &json!({"apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
                "metadata": {"name": "web", "namespace": "team"},
                "spec": {"images": [image]}}),
    );
    let nodes = cluster.nodes.len();
    rollout_ready(&cluster, "team", "web").await;
    // The headline, through the pods: every blob crossed the uplink once,
    // the other node had it from its peer's mirror.
    let pulled = registry.blob_gets("team/web");
    assert!(!pulled.is_empty(), "the prefetch pulled the image");
    assert!(
        pulled.values().all(|n| *n == 1),
        "each blob fetched from the registry once: {pulled:?}"
    );

    // The user story: a workload of that image that may not pull, on every
    // node — named by its tag, by its digest, and by both (kubelet asks CRI
    // for the image under the name the pod gives).
    let sets: Api<crd::NodeImageSet> = Api::all(client.clone());
    let digest = sets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .find_map(|s| s.status.as_ref()?.images.first()?.digest.clone())
        .expect("a node reported the digest");
    let repository = image.rsplit_once(':').unwrap().0.to_string();
    let forms = [
        ("web", image.clone()),
        ("web-by-digest", format!("{repository}@{digest}")),
        ("web-by-tag-and-digest", format!("{image}@{digest}")),
    ];
    for (name, reference) in &forms {
        apply(
            &kubeconfig,
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": name, "namespace": "team"},
                    "spec": {"replicas": nodes, "selector": {"matchLabels": {"app": name}},
                             "template": {"metadata": {"labels": {"app": name}},
                                          "spec": {
                                              // One on every node.
                                              "topologySpreadConstraints": [{
                                                  "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                  "whenUnsatisfiable": "DoNotSchedule",
                                                  "labelSelector": {"matchLabels": {"app": name}}}],
                                              "containers": [{"name": "web", "image": reference,
                                                              "imagePullPolicy": "Never"}]}}}}),
        );
    }
    let workloads: Api<Deployment> = Api::namespaced(client.clone(), "team");
    for (name, reference) in &forms {
        until(
            &cluster,
            &format!("{reference} Ready without a pull"),
            || async {
                let d = workloads.get(name).await.ok()?;
                (d.status?.ready_replicas == Some(nodes as i32)).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        registry.blob_gets("team/web"),
        pulled,
        "the workload's start fetched nothing"
    );

    // Uninstall with the ImagePrefetch still there: the pre-delete hook
    // deletes it while the controller and the agents run, so nothing of ours
    // is left — no NodeImageSet, no finalizer holding the namespace, no pin
    // keeping the image from kubelet's garbage collection, no host files.
    for (name, _) in &forms {
        kubectl(&kubeconfig, &["delete", "deployment", name, "-n", "team"]);
    }
    let labels_of_images = |node: &testbed::beds::cluster::ClusterNode| {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(&node.containerd.socket)
            .args(["--namespace", "k8s.io", "images", "ls"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for node in &cluster.nodes {
        assert!(
            labels_of_images(node).contains("imageprefetch.io/pinned"),
            "{}: the prefetched image is pinned before the uninstall",
            node.name
        );
    }
    let (ok, out) = testbed::support::helm::run(
        &kubeconfig,
        &[
            "uninstall",
            testbed::support::helm::RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
        ],
    );
    assert!(ok, "helm uninstall: {out}");
    until(&cluster, "nothing of the release left", || async {
        let left = kubectl(
            &kubeconfig,
            &[
                "get",
                "all,roles,rolebindings,clusterroles,clusterrolebindings,serviceaccounts,\
                 validatingadmissionpolicies,validatingadmissionpolicybindings,leases,nodeimagesets",
                "-A",
                "-l",
                "app.kubernetes.io/instance=image-prefetch",
                "-o",
                "name",
            ],
        );
        let pods = kubectl(&kubeconfig, &["get", "pods", "-n", NAMESPACE, "-o", "name"]);
        let sets = kubectl(&kubeconfig, &["get", "nodeimagesets", "-o", "name"]);
        let prefetches = kubectl(&kubeconfig, &["get", "imageprefetches", "-A", "-o", "name"]);
        (left.trim().is_empty()
            && pods.trim().is_empty()
            && sets.trim().is_empty()
            && prefetches.trim().is_empty())
        .then_some(())
    })
    .await;
    // The tenant's namespace is not held by a finalizer.
    kubectl(
        &kubeconfig,
        &["delete", "namespace", "team", "--wait", "--timeout=60s"],
    );
    for node in &cluster.nodes {
        let images = labels_of_images(node);
        assert!(
            !images.contains("imageprefetch.io/pinned"),
            "{}: a pin of ours is left: {images}",
            node.name
        );
        let hosts = node.dir.join("image-prefetch/hosts");
        let left: Vec<_> = std::fs::read_dir(&hosts)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{}: host files left: {left:?}", node.name);
    }
}
