//! The OLM path on kubelet nodes: the bundle's CSV applied the way OLM
//! applies one (OLM's own modules are not served here), and the controller,
//! with `--manage-agent`, bringing the agent DaemonSet up on every node.

mod kubelet_support;

use serde_json::json;

use kubelet_support::{apply, kubectl, product_ready, push_product_images};
use testbed::cluster::Cluster;

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
