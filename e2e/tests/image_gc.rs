//! Kubelet's image garbage collection, for real, on a kubelet node whose
//! image filesystem is past kubelet's thresholds: an image the agent
//! prefetched (pinned) survives, an unused image nobody pinned goes.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crd::{NodeImageSet, PullState, keys};
use testbed::beds::cluster::{Cluster, ImageFs};
use testbed::beds::simulated::{AGENT, Binary};
use testbed::support::poll::eventually;

const MB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn kubelets_garbage_collection_keeps_prefetched_images_and_takes_the_rest() {
    let work = testbed::support::workdir::Workdir::new("e2e-image-gc");
    let cluster = Cluster::start_with(&work.join("cluster"), 1, ImageFs::UnderPressure)
        .await
        .expect("the kubelet cluster bed (cargo xtask fixtures)");
    let client = cluster.plane.client().await.unwrap();
    testbed::support::crds::install(&client).await.unwrap();
    let node = &cluster.nodes[0];
    let registry = &cluster.registry.host;
    let kept = format!("{registry}/team/kept:1");
    testbed::builds::images::push_pause(&work.join("kept"), registry, "team/kept:1").unwrap();
    let other = testbed::builds::images::build_and_push(
        &work.join("other"),
        registry,
        "team/other",
        "1",
        &[MB],
    )
    .unwrap();

    // The agent of the node (as a process, against the node's containerd).
    let socket = node.containerd.socket.display().to_string();
    let hosts = node.containerd.hosts_dir.display().to_string();
    let own = work.join("agent-hosts").display().to_string();
    let _agent = Binary::start(
        AGENT,
        &[
            "--node-name",
            &node.name,
            "--containerd-socket",
            &socket,
            "--registry-config-dir",
            &hosts,
            "--mirror-config-dir",
            &own,
            "--image-fs-high-percent",
            "100",
        ],
        &cluster.plane.kubeconfig,
        None,
        &work.join("agent.log"),
    )
    .expect("the agent (built by cargo test --workspace)");
    let sets: Api<NodeImageSet> = Api::all(client.clone());
    let set = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "metadata": {"name": "gc-kept", "labels": {keys::NODE: node.name}},
        "spec": {"nodeName": node.name, "imageSet": [{"name": kept, "registryPolicy": "Default"}]},
    });
    sets.patch("gc-kept", &PatchParams::apply("test"), &Patch::Apply(&set))
        .await
        .unwrap();
    eventually(
        "the prefetched image Available",
        Duration::from_secs(60),
        || async {
            let st = sets.get_status("gc-kept").await.ok()?.status?;
            st.images
                .iter()
                .any(|i| i.state == PullState::Available)
                .then_some(())
        },
    )
    .await;

    // Another image, pulled as kubelet would have (CRI-managed), unused and unpinned.
    let ctr = |args: &[&str]| node.containerd.ctr(args);
    ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--hosts-dir",
        &hosts,
        &other.reference,
    ]);
    ctr(&[
        "images",
        "label",
        &other.reference,
        "io.cri-containerd.image=managed",
    ]);

    // Kubelet reclaims: the unpinned image goes; the prefetched one, just as
    // unused, stays.
    eventually(
        "kubelet collected the unpinned image",
        Duration::from_secs(60),
        || async {
            let listed = ctr(&["images", "ls", "-q"]);
            (!listed.lines().any(|l| l == other.reference)).then_some(listed)
        },
    )
    .await;
    let listed = ctr(&["images", "ls", "-q"]);
    assert!(
        listed.lines().any(|l| l == kept),
        "the prefetched image survived kubelet's garbage collection: {listed}"
    );
    let log = std::fs::read_to_string(node.dir.join("kubelet.log")).unwrap_or_default();
    assert!(
        log.contains("Removing image to free bytes"),
        "kubelet's image garbage collection ran"
    );
}
