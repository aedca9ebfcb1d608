//! Node objects for simulated nodes: registered directly in the API server,
//! with the status a kubelet would report.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::Result;

const MANAGER: &str = "image-prefetch-testbed";

/// Registers every one of `names` with `labels`, Ready, 32 at a time (for
/// benchmarks of many nodes).
pub async fn register_all(
    client: &kube::Client,
    names: &[String],
    labels: &BTreeMap<String, String>,
) -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(names.iter().map(|n| register(client, n, labels)))
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Creates (or updates) `name` with `labels`, Ready.
pub async fn register(
    client: &kube::Client,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    });
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&node),
    )
    .await?;
    set_ready(client, name, true).await
}

/// Sets the node's InternalIP, as a kubelet would (a field manager of its
/// own, so that [`set_ready`]'s applies leave it alone).
pub async fn set_address(client: &kube::Client, name: &str, ip: &str) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let status = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    });
    Ok(api
        .patch_status(
            name,
            &PatchParams::apply(&format!("{MANAGER}-address")).force(),
            &Patch::Apply(&status),
        )
        .await?)
}

/// Sets the node's Ready condition, as a kubelet (or its absence) would.
pub async fn set_ready(client: &kube::Client, name: &str, ready: bool) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "status": {"conditions": [{
            "type": "Ready",
            "status": if ready { "True" } else { "False" },
            "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
            "message": "simulated by the image-prefetch test bed",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }]},
    });
    Ok(api
        .patch_status(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&status),
        )
        .await?)
}

/// Marks the node unschedulable, as `kubectl cordon` does.
pub async fn cordon(client: &kube::Client, name: &str) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    Ok(api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await?)
}

/// Sets the node's taints (`key`, `value`, `effect`), replacing any, as
/// `kubectl taint` would leave them.
pub async fn taint(
    client: &kube::Client,
    name: &str,
    taints: &[(&str, &str, &str)],
) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let taints: Vec<serde_json::Value> = taints
        .iter()
        .map(|(key, value, effect)| json!({"key": key, "value": value, "effect": effect}))
        .collect();
    Ok(api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await?)
}
