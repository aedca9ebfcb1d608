//! `image-prefetch-controller uninstall`: what the chart's pre-delete hook
//! runs before `helm uninstall` removes the controller and the agents.
//!
//! The CRDs outlive a release (helm never deletes them), so an ImagePrefetch
//! left behind would keep its finalizer with no controller to remove it —
//! its namespace stuck in Terminating — and its NodeImageSets would keep the
//! images pinned on every node, out of kubelet's garbage collection. So,
//! while the controller and the agents still run: every ImagePrefetch is
//! deleted, and the controller's finalizer removes its NodeImageSets, upon
//! which the agents release their pins. If the controller does not finish
//! within the wait (it is down), the hook deletes the sets and removes the
//! finalizer itself. NodeImageSets left without an ImagePrefetch go too.

use std::time::{Duration, Instant};

use crd::{ImagePrefetch, NodeImageSet, keys};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

/// How often the hook looks again while it waits.
const POLL: Duration = Duration::from_millis(500);

/// Deletes every ImagePrefetch and NodeImageSet of the cluster, through the
/// controller when it answers within `wait`, else directly.
pub async fn uninstall(client: Client, wait: Duration) -> Result<(), kube::Error> {
    let prefetches: Api<ImagePrefetch> = Api::all(client.clone());
    let sets: Api<NodeImageSet> = Api::all(client.clone());
    let listed = prefetches.list(&ListParams::default()).await?;
    info!(count = listed.items.len(), "deleting every ImagePrefetch");
    for p in &listed.items {
        let ns = p.namespace().unwrap_or_default();
        let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), &ns);
        match api.delete(&p.name_any(), &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        let left = prefetches.list(&ListParams::default()).await?.items;
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            warn!(
                count = left.len(),
                "the controller did not finalize every ImagePrefetch in time: removing their NodeImageSets and finalizers here"
            );
            for p in &left {
                release(&client, &sets, p).await?;
            }
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    // Sets of ImagePrefetches that went away without the controller.
    sets.delete_collection(&DeleteParams::background(), &ListParams::default())
        .await?;
    loop {
        let left = sets.list(&ListParams::default()).await?.items.len();
        if left == 0 {
            info!("no ImagePrefetch and no NodeImageSet left");
            return Ok(());
        }
        if Instant::now() >= deadline + wait {
            warn!(count = left, "NodeImageSets are still being deleted");
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Does the controller's finalizer work for `p`: its sets go, then the
/// finalizer (and only it) is removed.
async fn release(
    client: &Client,
    sets: &Api<NodeImageSet>,
    p: &ImagePrefetch,
) -> Result<(), kube::Error> {
    let uid = p.uid().unwrap_or_default();
    sets.delete_collection(
        &DeleteParams::background(),
        &ListParams::default().labels(&keys::owned_by(&uid)),
    )
    .await?;
    let kept: Vec<String> = p
        .finalizers()
        .iter()
        .filter(|f| f.as_str() != keys::FINALIZER)
        .cloned()
        .collect();
    let api: Api<ImagePrefetch> =
        Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
    // The resourceVersion makes it a precondition: a finalizer added since is kept.
    let patch = serde_json::json!({"metadata": {
        "finalizers": kept, "resourceVersion": p.resource_version(),
    }});
    match api
        .patch(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
