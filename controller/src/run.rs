//! Wires the watches, stores and the kube-runtime Controller together.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tracing::{debug, info};

use crd::{ImagePrefetch, NodeImageSet, keys, node_image_set::DEFAULT_RETRY_LIMIT};

use crate::reconcile::{Context, error_policy, reconcile};
use crate::triggers;

/// Controller settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Handle the ImagePrefetches of this namespace only; `None`: every namespace.
    pub namespace: Option<String>,
    /// `imageDownloadRetryLimit` written into every NodeImageSet.
    pub retry_limit: i32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: None,
            retry_limit: DEFAULT_RETRY_LIMIT,
        }
    }
}

/// Runs the controller until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let prefetches: Api<ImagePrefetch> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };

    let (nodes, node_writer) = reflector::store();
    let node_events = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    );
    let (sets, set_writer) = reflector::store();
    let set_events = reflector::reflector(
        set_writer,
        watcher(
            Api::<NodeImageSet>::all(client.clone()),
            watcher::Config::default().labels(keys::PREFETCH_UID),
        ),
    )
    .touched_objects();

    let controller = Controller::new(prefetches, watcher::Config::default());
    let all_prefetches = controller.store();
    let ctx = Arc::new(Context {
        client,
        nodes,
        sets,
        config,
    });
    info!(namespace = ?ctx.config.namespace, "image-prefetch controller starting");
    controller
        // A node change can move any ImagePrefetch's selection.
        .watches_stream(triggers::node_changes(node_events), move |_node| {
            all_prefetches
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(set_events, |set| owner_of(&set))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(%obj, "reconciled"),
                Err(error) => debug!(%error, "reconcile did not complete"),
            }
        })
        .await;
    info!("image-prefetch controller stopped");
}

/// The ImagePrefetch a NodeImageSet belongs to, from its annotation (labels
/// may hold a shortened name).
fn owner_of(set: &NodeImageSet) -> Option<ObjectRef<ImagePrefetch>> {
    let value = set
        .metadata
        .annotations
        .as_ref()?
        .get(keys::PREFETCH_REF_ANNOTATION)?;
    let (namespace, name) = value.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}
