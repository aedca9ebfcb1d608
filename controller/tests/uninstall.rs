//! `image-prefetch-controller uninstall` (the chart's pre-delete hook) when
//! the controller is not there to finalize: after its wait it removes the
//! NodeImageSets and the finalizer itself, so nothing is left (a finalizer
//! left would keep the ImagePrefetch, and its namespace, for ever). (With the controller running, the kubelet
//! bed's `e2e/tests/helm_install.rs` shows the other path.) Its own API
//! server: the command deletes every ImagePrefetch of the cluster.

mod support;

use std::time::Duration;

use crd::{ImagePrefetch, NodeImageSet};
use kube::api::{Api, ListParams};
use serde_json::json;

use support::*;

#[tokio::test]
async fn uninstall_finishes_the_controllers_work_when_it_is_gone() {
    let work = testbed::support::workdir::Workdir::new("controller-uninstall");
    let plane = testbed::servers::control_plane::ControlPlane::start(
        &work.join("plane"),
        testbed::support::process::Lifetime::Owned,
    )
    .await
    .expect("kube-apiserver (cargo xtask fixtures)");
    let client = plane.client().await.unwrap();
    testbed::support::crds::install(&client).await.unwrap();
    let ns = namespace(&client, "tenant").await;
    nodes(&client, "gone", 2, &[]).await;
    let controller = Running::in_namespace(&client, &ns);
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "app",
            json!({"images": ["registry.example.com/gone/app:1"], "nodeSelector": {"test-group": "gone"}}),
        ),
    )
    .await;
    poll("the controller's sets", || async {
        (!sets(&client, &uid).await.is_empty()).then_some(())
    })
    .await;
    // The controller goes (a failed release, an uninstall without it): the
    // ImagePrefetch keeps a finalizer no one else removes.
    let _ = controller.stop().await;

    controller::uninstall::uninstall(client.clone(), Duration::from_secs(1))
        .await
        .unwrap();

    let prefetches: Api<ImagePrefetch> = Api::all(client.clone());
    let all_sets: Api<NodeImageSet> = Api::all(client.clone());
    poll("no ImagePrefetch and no NodeImageSet left", || async {
        let p = prefetches.list(&ListParams::default()).await.ok()?.items;
        let s = all_sets.list(&ListParams::default()).await.ok()?.items;
        (p.is_empty() && s.is_empty()).then_some(())
    })
    .await;
}
