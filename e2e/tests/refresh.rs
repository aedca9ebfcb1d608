//! Mutable tags kept fresh, counted at the registry: a tag that moves is
//! rolled out again once per cluster — one seed asks the registry, the
//! other nodes get the new content from the in-cluster mirror — when the
//! refresh annotation asks for it, and by itself with
//! `refreshIntervalSeconds`; every node then holds the new image under the
//! tag's name, pinned, and nothing of the old digest is pinned any more.
//!
//! Three simulated nodes (containerd 2.x, the peer-mirror stand-in, the
//! agent), one controller, one external registry whose access log is the
//! count.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crd::{ImagePrefetch, NodeImageSet, PullState, keys};
use testbed::beds::peer_cluster::PeerCluster;
use testbed::builds::images::{self, Image};
use testbed::support::poll::eventually_or;

const NODES: [(&str, &str); 3] = [
    ("node-0", "amd64"),
    ("node-1", "amd64"),
    ("node-2", "amd64"),
];
const MB: usize = 1 << 20;
const WITHIN: Duration = Duration::from_secs(240);

/// Waits until every node reports `image` Available at its digest and the
/// ImagePrefetch is Ready on all of them.
async fn everywhere(bed: &PeerCluster, prefetch: &str, image: &Image, what: &str) {
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    let prefetches: Api<ImagePrefetch> = Api::namespaced(bed.client.clone(), "default");
    let all = format!("{n}/{n}", n = NODES.len());
    let last = std::sync::Mutex::new(String::new());
    eventually_or(
        what,
        WITHIN,
        || async {
            let listed = sets.list(&ListParams::default()).await.ok()?.items;
            let reports: Vec<(String, Option<PullState>, Option<String>)> = listed
                .iter()
                .map(|s| {
                    let r = s.report_on(&image.reference);
                    (
                        s.spec.node_name.clone(),
                        r.map(|r| r.state),
                        r.and_then(|r| r.digest.as_deref().map(str::to_string)),
                    )
                })
                .collect();
            let ready = prefetches.get(prefetch).await.ok()?.status.map(|s| s.ready);
            *last.lock().unwrap() = format!("{reports:?}, ready {ready:?}");
            let there = reports.len() == NODES.len()
                && reports.iter().all(|(_, state, digest)| {
                    *state == Some(PullState::Available)
                        && digest.as_deref() == Some(image.digest.as_str())
                });
            (there && ready.as_deref() == Some(all.as_str())).then_some(())
        },
        || format!("the reports: {}", last.lock().unwrap()),
    )
    .await;
}

/// On every node: the tag's name holds `now`, pinned, and no record of
/// `old` is pinned.
fn held(bed: &PeerCluster, now: &Image, old: &Image) {
    for node in &bed.nodes {
        let listed = node.containerd.ctr(&["images", "ls"]);
        let (label, value) = keys::PINNED_BY_AGENT;
        let line = listed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(now.reference.as_str()))
            .unwrap_or_else(|| panic!("{}: no {}: {listed}", node.name, now.reference));
        assert!(line.contains(&now.digest), "{}: {line}", node.name);
        assert!(
            line.contains(&format!("{label}={value}")),
            "{}: not pinned: {line}",
            node.name
        );
        // CRI keeps a record of the old digest (`repo@sha256:…`); unpinned,
        // it is kubelet's garbage collection's to remove.
        for line in listed.lines().filter(|l| l.contains(&old.digest)) {
            assert!(
                !line.contains(label) && !line.contains("io.cri-containerd.pinned"),
                "{}: the old digest is still pinned: {line}",
                node.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_that_moves_is_rolled_out_again_once_per_cluster() {
    let work = testbed::support::workdir::Workdir::new("e2e-refresh");
    let mut bed = PeerCluster::start(&work, &NODES)
        .await
        .expect("the peer-mirror bed (agent and peer-mirror built by cargo test --workspace)");
    bed.start_controller(&[], "controller.log").unwrap();
    let host = bed.upstream.host.clone();
    let push = |dir: &str, sizes: &[usize]| {
        images::build_and_push(&work.join(dir), &host, "team/app", "stable", sizes).unwrap()
    };
    let v1 = push("v1", &[2 * MB, MB]);
    bed.rollout("app", &[&v1.reference], WITHIN).await.unwrap();
    everywhere(&bed, "app", &v1, "v1 on every node").await;

    // The tag moves at the registry; the refresh annotation asks again.
    let v2 = push("v2", &[2 * MB + 4096, MB + 4096]);
    assert_ne!(v1.digest, v2.digest);
    let prefetches: Api<ImagePrefetch> = Api::namespaced(bed.client.clone(), "default");
    prefetches
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {keys::REFRESH_ANNOTATION: "1"}}})),
        )
        .await
        .unwrap();
    everywhere(&bed, "app", &v2, "v2 on every node after the annotation").await;
    let v2_gets = bed.upstream.gets_of(&v2.repository, &v2.blobs);
    assert!(
        v2_gets.values().all(|&n| n == 1),
        "each blob of the new digest crossed the uplink once: {v2_gets:?}"
    );
    held(&bed, &v2, &v1);
    let status = prefetches.get("app").await.unwrap().status.unwrap();
    assert_eq!(status.refresh_request.as_deref(), Some("1"));
    assert!(status.last_refresh_time.is_some());

    // With an interval, the next move is found by itself.
    prefetches
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"refreshIntervalSeconds": 10}})),
        )
        .await
        .unwrap();
    let v3 = push("v3", &[2 * MB + 8192, MB + 8192]);
    everywhere(&bed, "app", &v3, "v3 on every node within the interval").await;
    let v3_gets = bed.upstream.gets_of(&v3.repository, &v3.blobs);
    assert!(v3_gets.values().all(|&n| n == 1), "{v3_gets:?}");
    held(&bed, &v3, &v2);
    // The first digest's blobs were never fetched again.
    let v1_gets = bed.upstream.gets_of(&v1.repository, &v1.blobs);
    assert!(v1_gets.values().all(|&n| n == 1), "{v1_gets:?}");
    // One TagMoved Event per new digest, naming it.
    let events: Api<Event> = Api::namespaced(bed.client.clone(), "default");
    let moved: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(crd::EventReason::TagMoved.as_str()))
        .filter_map(|e| e.note)
        .collect();
    assert_eq!(
        moved.len(),
        2,
        "{moved:?} (v1 {}, v2 {}, v3 {})",
        v1.digest,
        v2.digest,
        v3.digest
    );
    assert!(moved.iter().any(|n| n.contains(&v2.digest)), "{moved:?}");
    assert!(moved.iter().any(|n| n.contains(&v3.digest)), "{moved:?}");
    eprintln!(
        "refresh: upstream GETs per blob v1 {:?}, v2 {:?}, v3 {:?}",
        v1_gets.values().collect::<Vec<_>>(),
        v2_gets.values().collect::<Vec<_>>(),
        v3_gets.values().collect::<Vec<_>>()
    );
}
