//! The reconcile loop's I/O: NodeImageSets in, NodeImageSets and status out.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};

use crd::{
    ImagePrefetch, NodeImage, NodeImageSet, NodeImageSetSpec, RegistryPolicy, SecretReference,
    keys, names,
};

use crate::run::Config;
use crate::{Error, select, status};

/// What every reconcile shares: the client, the watched state, the settings.
pub struct Context {
    pub client: kube::Client,
    pub nodes: Store<Node>,
    pub sets: Store<NodeImageSet>,
    pub config: Config,
}

/// How often an ImagePrefetch is looked at again even if nothing changed.
const RESYNC: Duration = Duration::from_secs(300);

#[instrument(skip_all, fields(namespace = prefetch.namespace(), name = %prefetch.name_any()))]
pub async fn reconcile(prefetch: Arc<ImagePrefetch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = prefetch
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<ImagePrefetch> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, keys::FINALIZER, prefetch, |event| async {
        match event {
            Event::Apply(p) => apply(&p, &api, &ctx).await,
            Event::Cleanup(p) => cleanup(&p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(prefetch: Arc<ImagePrefetch>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(
        namespace = prefetch.namespace(),
        name = %prefetch.name_any(),
        category = error.category(),
        %error,
        "reconcile failed; retrying in 10s"
    );
    Action::requeue(Duration::from_secs(10))
}

struct Owner<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

impl<'a> Owner<'a> {
    fn of(p: &'a ImagePrefetch) -> Result<Self, Error> {
        Ok(Owner {
            namespace: p
                .metadata
                .namespace
                .as_deref()
                .ok_or(Error::MissingMetadata("namespace"))?,
            name: p
                .metadata
                .name
                .as_deref()
                .ok_or(Error::MissingMetadata("name"))?,
            uid: p
                .metadata
                .uid
                .as_deref()
                .ok_or(Error::MissingMetadata("uid"))?,
        })
    }

    fn owns(&self, set: &NodeImageSet) -> bool {
        set.labels().get(keys::PREFETCH_UID) == Some(&names::label_value(self.uid))
    }
}

async fn apply(
    p: &ImagePrefetch,
    api: &Api<ImagePrefetch>,
    ctx: &Context,
) -> Result<Action, Error> {
    let owner = Owner::of(p)?;
    // Before the first full list a partial store would look like missing
    // nodes, and their NodeImageSets would be deleted.
    let _ = ctx.nodes.wait_until_ready().await;
    let _ = ctx.sets.wait_until_ready().await;

    let nodes = ctx.nodes.state();
    let selected = select::select(
        owner.uid,
        &p.spec.node_selector,
        p.spec.replicas,
        nodes.iter().map(|n| n.as_ref()),
    );
    let owned: Vec<Arc<NodeImageSet>> = ctx
        .sets
        .state()
        .into_iter()
        .filter(|s| owner.owns(s))
        .collect();

    let sets_api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let params = PatchParams::apply(keys::CONTROLLER_MANAGER).force();
    let mut current: Vec<NodeImageSet> = Vec::with_capacity(selected.len());
    for node in &selected {
        let desired = desired_set(p, &owner, node, &ctx.config);
        let name = desired.name_any();
        match owned.iter().find(|s| s.name_any() == name) {
            Some(existing) if up_to_date(existing, &desired) => current.push((**existing).clone()),
            _ => {
                let applied = sets_api
                    .patch(&name, &params, &Patch::Apply(&desired))
                    .await?;
                info!(node = %node, set = %name, "applied NodeImageSet");
                current.push(applied);
            }
        }
    }
    for stale in owned
        .iter()
        .filter(|s| !selected.contains(&s.spec.node_name))
    {
        delete_ignoring_missing(&sets_api, &stale.name_any()).await?;
        info!(node = %stale.spec.node_name, set = %stale.name_any(), "deleted NodeImageSet of a node no longer selected");
    }

    let now = Time(
        k8s_openapi::jiff::Timestamp::from_second(k8s_openapi::jiff::Timestamp::now().as_second())
            .expect("now is a valid timestamp"),
    );
    let refs: Vec<&NodeImageSet> = current.iter().collect();
    let status = status::compute(p, selected.len(), &refs, now);
    if p.status.as_ref() != Some(&status) {
        let body = json!({
            "apiVersion": ImagePrefetch::api_version(&()),
            "kind": ImagePrefetch::kind(&()),
            "status": status,
        });
        api.patch_status(owner.name, &params, &Patch::Apply(&body))
            .await?;
    }
    Ok(Action::requeue(RESYNC))
}

async fn cleanup(p: &ImagePrefetch, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(p)?;
    let sets_api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let selector = ListParams::default().labels(&keys::owned_by(owner.uid));
    sets_api
        .delete_collection(&DeleteParams::default(), &selector)
        .await?;
    info!("deleted every NodeImageSet of the ImagePrefetch");
    Ok(Action::await_change())
}

/// The NodeImageSet that `node` should have for `p`.
fn desired_set(p: &ImagePrefetch, owner: &Owner<'_>, node: &str, config: &Config) -> NodeImageSet {
    let name = names::node_image_set_name(owner.name, owner.uid, node);
    let mut set = NodeImageSet::new(
        &name,
        NodeImageSetSpec {
            node_name: node.to_string(),
            image_set: p
                .spec
                .images
                .iter()
                .map(|image| NodeImage {
                    name: image.clone(),
                    registry_policy: RegistryPolicy::Default,
                    digest: None,
                })
                .collect(),
            image_pull_secrets: p
                .spec
                .image_pull_secrets
                .iter()
                .map(|s| SecretReference {
                    namespace: owner.namespace.to_string(),
                    name: s.name.clone(),
                })
                .collect(),
            image_download_retry_limit: config.retry_limit,
        },
    );
    set.metadata.labels = Some(keys::node_image_set_labels(
        owner.namespace,
        owner.name,
        owner.uid,
        node,
    ));
    set.metadata.annotations = Some(
        [(
            keys::PREFETCH_REF_ANNOTATION.to_string(),
            format!("{}/{}", owner.namespace, owner.name),
        )]
        .into(),
    );
    set
}

fn up_to_date(existing: &NodeImageSet, desired: &NodeImageSet) -> bool {
    let contains = |have: &std::collections::BTreeMap<String, String>,
                    want: &Option<std::collections::BTreeMap<String, String>>| {
        want.iter().flatten().all(|(k, v)| have.get(k) == Some(v))
    };
    existing.spec == desired.spec
        && contains(existing.labels(), &desired.metadata.labels)
        && contains(existing.annotations(), &desired.metadata.annotations)
}

async fn delete_ignoring_missing(api: &Api<NodeImageSet>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
