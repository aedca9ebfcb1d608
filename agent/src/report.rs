//! What the agent reads from its node's sets and what it writes back: the
//! entries as the ledger takes them, and each set's status as the ledger
//! says it is. Pure but for the write; `cargo run --release -p xtask --features swarm -- bench swarm`'s simulated
//! agents use the same code.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crd::condition::condition;
use crd::{
    ConditionReason, ConditionType, NodeImageSet, NodeImageSetStatus, NodeImageStatus, PullState,
    keys,
};

use crate::ledger::{Ledger, Listed, Want};

/// The field manager of the agent's status writes.
pub use crd::keys::AGENT_MANAGER;

/// The node's sets as the agent follows them: a cache, and the watch
/// events that fill it (deletions too: a deleted set's pulls stop at once).
/// The watch backs off while the API server is away. managedFields repeat
/// every image name twice (the controller's spec, the agent's status) and
/// nothing here reads them, so the cache drops them.
pub fn follow(
    api: &Api<NodeImageSet>,
    node: &str,
) -> (
    Store<NodeImageSet>,
    BoxStream<'static, Result<watcher::Event<NodeImageSet>, watcher::Error>>,
) {
    let (store, writer) = reflector::store();
    let wc = watcher::Config::default().labels(&keys::on_node(node));
    let events = reflector::reflector(
        writer,
        watcher(api.clone(), wc)
            .backoff(crd::backoff::watch())
            .modify(|set| set.managed_fields_mut().clear()),
    )
    .boxed();
    (store, events)
}

/// Every entry of `sets`, as the ledger takes them.
pub fn listed(sets: &[Arc<NodeImageSet>]) -> Vec<Listed> {
    sets.iter()
        .flat_map(|set| {
            set.spec.image_set.iter().map(|entry| Listed {
                key: (set.name_any(), entry.name.clone()),
                want: Want {
                    set_uid: set.uid().unwrap_or_default(),
                    entry: entry.clone(),
                    retry_limit: set.spec.image_download_retry_limit,
                    secrets: set.spec.image_pull_secrets.clone(),
                    trace: set.annotations().get(keys::TRACEPARENT_ANNOTATION).cloned(),
                },
                reported: set.report_on(&entry.name).cloned(),
            })
        })
        .collect()
}

/// The status the ledger says `set` has, its Ready condition kept from the
/// old status while it does not change.
pub fn status(ledger: &Ledger, set: &NodeImageSet, now: &Time) -> NodeImageSetStatus {
    let name = set.name_any();
    let images: Vec<NodeImageStatus> = set
        .spec
        .image_set
        .iter()
        .filter_map(|e| ledger.status(&(name.clone(), e.name.clone())))
        .collect();
    let available = images
        .iter()
        .filter(|i| i.state == PullState::Available)
        .count();
    let failed: Vec<&str> = images
        .iter()
        .filter(|i| i.state == PullState::Failed)
        .map(|i| i.name.as_str())
        .collect();
    let total = set.spec.image_set.len();
    let (ready, reason, message) = if !failed.is_empty() {
        (
            false,
            ConditionReason::PullFailed,
            format!("gave up on: {}", failed.join(", ")),
        )
    } else if available == total {
        (
            true,
            ConditionReason::AllImagesPresent,
            format!("all {total} images are on the node"),
        )
    } else {
        (
            false,
            ConditionReason::Pulling,
            format!("{available} of {total} images are on the node"),
        )
    };
    let old = set
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = set.metadata.generation;
    let ready = condition(
        old,
        ConditionType::Ready,
        ready,
        reason,
        &message,
        generation,
        now,
    );
    NodeImageSetStatus {
        available: available as i32,
        total: total as i32,
        images,
        conditions: vec![ready],
        unreadable: None,
    }
}

/// Whether `status` must be written to `set`: it differs from what is
/// stored, and it says something. A set with no entry yet (the controller
/// writes one per selected node before it releases anything to it — waiting
/// is absence) gets no status until it has one: nobody reads "0 of 0", and
/// on a large rollout it was one write per node.
pub fn worth_writing(set: &NodeImageSet, status: &NodeImageSetStatus) -> bool {
    let empty = set.spec.image_set.is_empty() && set.status.is_none();
    !empty && set.status.as_ref() != Some(status)
}

/// Writes `status` as the set's (server-side apply, the agent's field manager).
pub async fn write(
    api: &Api<NodeImageSet>,
    name: &str,
    status: &NodeImageSetStatus,
) -> Result<NodeImageSet, kube::Error> {
    let body = json!({
        "apiVersion": NodeImageSet::api_version(&()),
        "kind": NodeImageSet::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(AGENT_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&body)).await
}
