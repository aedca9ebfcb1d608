//! The administrator's path, for real: the project's images built with
//! buildah and pushed to the bed's registry, `helm install` onto a kubelet
//! node (`testbed::cluster`), the chart's pods Ready — two controller
//! replicas, one leader, and the agent — an ImagePrefetch rolled out through
//! them and followed with kubectl, then a Deployment of that image with
//! `imagePullPolicy: Never` Running without a pull: the user story. Then
//! `helm uninstall` leaves nothing of ours behind.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use testbed::cluster::Cluster;
use testbed::helm::NAMESPACE;
use testbed::poll::eventually;
use testbed::simulated::{AGENT, CONTROLLER, binary};

const WORKLOAD: &str = "team/web:1";

fn kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> String {
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
fn push_product_images(registry: &str) {
    for name in [CONTROLLER, AGENT] {
        let local = testbed::oci::build(&binary(name), name, "dev", testbed::oci::NONROOT)
            .expect("buildah image of a workspace binary");
        testbed::oci::push(&local, &format!("{registry}/{name}:dev")).unwrap();
    }
}

/// Waits until `namespace`'s controller Deployment has two Ready replicas
/// and the agent DaemonSet is Ready on all `nodes`.
async fn product_ready(client: &kube::Client, namespace: &str, nodes: usize) {
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

fn apply(kubeconfig: &std::path::Path, manifest: &serde_json::Value) {
    let path = kubeconfig.with_extension(format!("{}.json", std::process::id()));
    std::fs::write(&path, manifest.to_string()).unwrap();
    kubectl(kubeconfig, &["apply", "-f", path.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_install_onto_kubelet_nodes_and_a_workload_starts_without_a_pull() {
    let work = testbed::workdir::Workdir::new("e2e-helm-install");
    let cluster = Cluster::start(&work.join("cluster"), 2)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures --cluster)");
    let client = cluster.plane.client().await.unwrap();
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let registry = &cluster.registry;

    push_product_images(&registry.host);
    testbed::images::push_pause(&work.join("workload"), &registry.host, WORKLOAD).unwrap();

    // helm install, as documented: the chart's defaults for the node paths.
    let registry_value = format!("image.registry={}", registry.host);
    testbed::helm::install(
        &kubeconfig,
        &["--set", &registry_value, "--set", "image.tag=dev"],
    );

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
    eventually(
        "kubectl shows the ImagePrefetch Ready",
        Duration::from_secs(120),
        || async {
            let table = kubectl(&kubeconfig, &["get", "imageprefetch", "-n", "team", "web"]);
            table.contains(&format!("{nodes}/{nodes}")).then_some(table)
        },
    )
    .await;
    // The headline, through the pods: every blob crossed the uplink once,
    // the other node had it from its peer's mirror.
    let pulled = registry.blob_gets("team/web");
    assert!(!pulled.is_empty(), "the prefetch pulled the image");
    assert!(
        pulled.values().all(|n| *n == 1),
        "each blob fetched from the registry once: {pulled:?}"
    );

    // The user story: a workload of that image that may not pull, on every node.
    apply(
        &kubeconfig,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "namespace": "team"},
                "spec": {"replicas": nodes, "selector": {"matchLabels": {"app": "web"}},
                         "template": {"metadata": {"labels": {"app": "web"}},
                                      "spec": {
                                          // One on every node.
                                          "topologySpreadConstraints": [{
                                              "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                              "whenUnsatisfiable": "DoNotSchedule",
                                              "labelSelector": {"matchLabels": {"app": "web"}}}],
                                          "containers": [{"name": "web", "image": image,
                                                          "imagePullPolicy": "Never"}]}}}}),
    );
    let workloads: Api<Deployment> = Api::namespaced(client.clone(), "team");
    eventually(
        "the workload Ready without a pull",
        Duration::from_secs(60),
        || async {
            let d = workloads.get("web").await.ok()?;
            (d.status?.ready_replicas == Some(nodes as i32)).then_some(())
        },
    )
    .await;
    assert_eq!(
        registry.blob_gets("team/web"),
        pulled,
        "the workload's start fetched nothing"
    );

    // Uninstall: the ImagePrefetch goes first (its finalizer is the
    // controller's), then the release; nothing of ours is left.
    kubectl(&kubeconfig, &["delete", "deployment", "web", "-n", "team"]);
    kubectl(
        &kubeconfig,
        &["delete", "imageprefetch", "web", "-n", "team", "--wait"],
    );
    let (ok, out) = testbed::helm::run(
        &kubeconfig,
        &[
            "uninstall",
            testbed::helm::RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
        ],
    );
    assert!(ok, "helm uninstall: {out}");
    eventually("nothing of the release left", Duration::from_secs(60), || async {
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
        (left.trim().is_empty() && pods.trim().is_empty() && sets.trim().is_empty()).then_some(())
    })
    .await;
}

/// The OLM bundle's install, applied the way OLM applies a CSV (OLM's own
/// modules are not served here): its ServiceAccounts, its permissions as a
/// Role and its cluster permissions as a ClusterRole (each bound), its
/// Deployment. The controller, run with `--manage-agent`, brings the agent
/// DaemonSet up on every node.
#[tokio::test(flavor = "multi_thread")]
async fn the_olm_bundles_deployment_brings_the_agent_up_on_every_node() {
    let work = testbed::workdir::Workdir::new("e2e-olm-install");
    let cluster = Cluster::start(&work.join("cluster"), 2)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures --cluster)");
    let client = cluster.plane.client().await.unwrap();
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let registry = &cluster.registry.host;
    push_product_images(registry);
    testbed::crds::install(&client).await.unwrap();

    let csv: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            testbed::helm::chart()
                .join("../../bundle/manifests/image-prefetch.clusterserviceversion.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let ns = "operators";
    kubectl(&kubeconfig, &["create", "namespace", ns]);
    let install = &csv["spec"]["install"]["spec"];
    let mut accounts = std::collections::BTreeSet::new();
    for (kind, grants) in [
        ("Role", &install["permissions"]),
        ("ClusterRole", &install["clusterPermissions"]),
    ] {
        for grant in grants.as_array().unwrap() {
            let account = grant["serviceAccountName"].as_str().unwrap();
            accounts.insert(account.to_string());
            let name = format!("{account}-{}", kind.to_lowercase());
            let mut role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind,
                                  "metadata": {"name": name}, "rules": grant["rules"]});
            let mut binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1",
                                     "kind": format!("{kind}Binding"), "metadata": {"name": name},
                                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
                                     "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}]});
            if kind == "Role" {
                role["metadata"]["namespace"] = json!(ns);
                binding["metadata"]["namespace"] = json!(ns);
            }
            apply(&kubeconfig, &role);
            apply(&kubeconfig, &binding);
        }
    }
    for account in &accounts {
        apply(
            &kubeconfig,
            &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": account, "namespace": ns}}),
        );
    }
    for d in install["deployments"].as_array().unwrap() {
        // The release's images, from this bed's registry.
        let spec = d["spec"]
            .to_string()
            .replace("ghcr.io/image-prefetch", registry)
            .replace(&format!(":{}", env!("CARGO_PKG_VERSION")), ":dev");
        apply(
            &kubeconfig,
            &json!({"apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": d["name"], "namespace": ns},
                    "spec": serde_json::from_str::<serde_json::Value>(&spec).unwrap()}),
        );
    }
    product_ready(&client, ns, cluster.nodes.len()).await;
}
