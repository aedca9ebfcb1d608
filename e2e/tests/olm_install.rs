//! The OLM path on kubelet nodes: the bundle's CSV applied the way OLM
//! applies one (OLM's own modules are not served here), the controller, with
//! `--manage-agent`, bringing the agent DaemonSet up on every node, and the
//! chart's admission policies added as the README shows (a bundle cannot
//! carry them) binding the bundle's identities.

mod kubelet_support;

use std::path::Path;

use serde_json::json;

use kubelet_support::{
    apply, kubectl, kubectl_output, product_ready, push_product_images, rollout_ready, until,
};
use testbed::beds::cluster::Cluster;

/// The OLM bundle's install, applied the way OLM applies a CSV (OLM's own
/// modules are not served here): its ServiceAccounts, its permissions as a
/// Role and its cluster permissions as a ClusterRole (each bound), its
/// Deployment. The controller, run with `--manage-agent`, brings the agent
/// DaemonSet up on every node. Then the admission policies, rendered from
/// the chart with the README's command: the allow-list is enforced, and the
/// agents, pods with node-bound tokens, still write their own node's status
/// through a rollout.
#[tokio::test(flavor = "multi_thread")]
async fn the_olm_bundles_deployment_brings_the_agent_up_on_every_node() {
    let work = testbed::support::workdir::Workdir::new("e2e-olm-install");
    let cluster = Cluster::start(&work.join("cluster"), 2)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures --cluster)");
    let client = cluster.plane.client().await.unwrap();
    let kubeconfig = cluster.plane.kubeconfig.clone();
    let registry = &cluster.registry.host;
    push_product_images(registry);
    testbed::support::crds::install(&client).await.unwrap();

    let csv: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            testbed::support::helm::chart()
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

    // The README's command, from this checkout, the bed's registry allowed.
    let rendered = work.join("policies.yaml");
    let args = documented_policy_render(registry, ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, policies) = testbed::support::helm::run(&kubeconfig, &args);
    assert!(ok, "helm template: {policies}");
    std::fs::write(&rendered, &policies).unwrap();
    kubectl(&kubeconfig, &["apply", "-f", rendered.to_str().unwrap()]);

    kubectl(&kubeconfig, &["create", "namespace", "team"]);
    let prefetch = |image: &str| {
        json!({"apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
               "metadata": {"name": "web", "namespace": "team"},
               "spec": {"images": [image]}})
    };
    // Policies load asynchronously: wait until the allow-list refuses.
    let refused_image = "registry.example.com/team/app:1";
    let probe = work.join("probe.json");
    std::fs::write(&probe, prefetch(refused_image).to_string()).unwrap();
    let refusal = until(&cluster, "the allow-list enforced", || async {
        let out = kubectl_output(
            &kubeconfig,
            &["apply", "--dry-run=server", "-f", probe.to_str().unwrap()],
        );
        (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await;
    assert!(refusal.contains(refused_image), "{refusal}");

    // The agents' status writes pass the node-bound policy: a rollout.
    let image = format!("{registry}/team/web:1");
    testbed::builds::images::push_pause(&work.join("workload"), registry, "team/web:1").unwrap();
    apply(&kubeconfig, &prefetch(&image));
    rollout_ready(&cluster, "team", "web").await;

    // And the node-bound policy holds the bundle's agent: a token of its
    // ServiceAccount bound to the first node may write the first node's
    // report and not the second's (server-side dry runs: admission runs, the
    // reports stay as they are).
    let [first, second] = [&cluster.nodes[0].name, &cluster.nodes[1].name];
    let token = kubectl(
        &kubeconfig,
        &[
            "create",
            "token",
            "image-prefetch-agent",
            "-n",
            ns,
            "--bound-object-kind",
            "Node",
            "--bound-object-name",
            first,
        ],
    );
    let sets = kubectl(
        &kubeconfig,
        &[
            "get",
            "nodeimagesets",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName} {.metadata.name}{\"\\n\"}{end}",
        ],
    );
    let set_of = |node: &str| {
        sets.lines()
            .find_map(|l| l.strip_prefix(&format!("{node} ")))
            .unwrap_or_else(|| panic!("no NodeImageSet of {node}: {sets}"))
            .to_string()
    };
    let write_status = |set: &str| {
        kubectl_output(
            &kubeconfig,
            &[
                "--token",
                token.trim(),
                "patch",
                "nodeimageset",
                set,
                "--subresource=status",
                "--type=merge",
                "--dry-run=server",
                "-p",
                r#"{"status":{"available":1}}"#,
            ],
        )
    };
    let own = write_status(&set_of(first));
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    let forged = write_status(&set_of(second));
    let refusal = String::from_utf8_lossy(&forged.stderr);
    assert!(
        !forged.status.success()
            && refusal.contains(&format!(
                "the agent of node {first} may not write the NodeImageSet of node {second}"
            )),
        "{refusal}"
    );
}

/// The README's command that renders the admission policies for an OLM
/// install, as helm arguments: the chart of this checkout, `namespace`,
/// `registry` allowed in place of the example.
fn documented_policy_render(registry: &str, namespace: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let start = readme
        .find("helm template image-prefetch")
        .expect("the README shows how an OLM install gets the admission policies");
    let command = &readme[start..];
    let end = command
        .find("| kubectl apply -f -")
        .expect("the rendered policies piped to kubectl apply");
    let chart = testbed::support::helm::chart();
    let args: Vec<String> = command[..end]
        .replace("\\\n", " ")
        .split_whitespace()
        .skip(1)
        .map(|word| {
            word.replace('\'', "")
                .replace("./helm/image-prefetch", chart.to_str().unwrap())
                .replace("registry.example.com", registry)
        })
        .collect();
    let given = args
        .iter()
        .position(|a| a == "--namespace")
        .map(|i| &args[i + 1]);
    assert_eq!(given.map(String::as_str), Some(namespace), "{args:?}");
    args
}
