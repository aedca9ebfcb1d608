//! The agent's I/O on NodeImageSets: the watch of its node's sets and the
//! status write. What to write is decided in `report`, which is pure.

use futures::StreamExt;
use futures::stream::BoxStream;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crd::{NodeImageSet, NodeImageSetStatus, keys};

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
