//! The reconcile loop's I/O: read the caches, let `select`, `policy` and
//! `status` decide, write NodeImageSets, status and Events.

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument as _, Span, field, info, info_span, warn};

use crd::{
    ImagePrefetch, ImagePrefetchStatus, NodeImage, NodeImageSet, NodeImageSetSpec, SecretReference,
    keys, names,
};

use crate::index::{SetIndex, SetView};
use crate::metrics::{ErrorLabels, Metrics};
use crate::policy::{ClusterView, Current, SeedBook};
use crate::run::Config;
use crate::status::{self, Inputs};
use crate::trace::Rollouts;
use crate::{Error, policy, select};

/// What every reconcile shares: the client, the watched state, the settings,
/// and the seeds of the whole cluster.
pub struct Context {
    pub client: kube::Client,
    pub nodes: Store<Node>,
    pub sets: SetIndex,
    pub config: Config,
    pub seeds: Mutex<SeedBook>,
    pub recorder: Recorder,
    /// Failures already announced by an Event: (ImagePrefetch uid, node, image).
    announced: Mutex<HashSet<(String, String, String)>>,
    /// Reconciles failed in a row, per ImagePrefetch uid: the retry backs off.
    failed_in_a_row: Mutex<HashMap<String, u32>>,
    pub metrics: Metrics,
    rollouts: Rollouts,
}

impl Context {
    pub fn new(
        client: kube::Client,
        nodes: Store<Node>,
        sets: SetIndex,
        config: Config,
        recorder: Recorder,
        metrics: Metrics,
    ) -> Self {
        Context {
            client,
            nodes,
            sets,
            config,
            seeds: Mutex::default(),
            recorder,
            announced: Mutex::default(),
            failed_in_a_row: Mutex::default(),
            metrics,
            rollouts: Rollouts::default(),
        }
    }

    fn wrote(&self) {
        self.metrics.writes.inc();
    }
}

/// NodeImageSet writes in flight at once within one reconcile.
const APPLY_CONCURRENCY: usize = 16;

/// How often an ImagePrefetch is looked at again even if nothing changed.
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(prefetch: Arc<ImagePrefetch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let uid = prefetch.uid().unwrap_or_default();
    let generation = prefetch.metadata.generation.unwrap_or_default();
    let span = info_span!(
        "reconcile",
        namespace = prefetch.namespace(),
        name = %prefetch.name_any(),
        generation,
        selected = field::Empty,
        otel.status_code = field::Empty,
        otel.status_description = field::Empty,
    );
    match ctx.rollouts.parent(&uid, generation) {
        Some(parent) => {
            telemetry::propagation::set_parent(&span, &parent);
        }
        None => {
            if let Some(root) = telemetry::propagation::span_context(&span) {
                ctx.rollouts.begin(&uid, generation, root);
            }
        }
    }
    let result = reconcile_inner(prefetch, &ctx)
        .instrument(span.clone())
        .await;
    if let Err(e) = &result {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_description", field::display(e));
    }
    ctx.metrics.reconciles.inc();
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        let labels = ErrorLabels {
            category: e.category().to_string(),
        };
        ctx.metrics.errors.get_or_create(&labels).inc();
    } else {
        ctx.failed_in_a_row
            .lock()
            .expect("failure counts lock")
            .remove(&uid);
    }
    result
}

/// The wait before the `n`-th retry of a reconcile that keeps failing
/// (1-based): 1 s, doubling, at most 5 minutes.
pub fn retry_delay(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

async fn reconcile_inner(prefetch: Arc<ImagePrefetch>, ctx: &Context) -> Result<Action, Error> {
    let namespace = prefetch
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<ImagePrefetch> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, keys::FINALIZER, prefetch, |event| async {
        match event {
            Event::Apply(p) => apply(&p, &api, ctx).await,
            Event::Cleanup(p) => cleanup(&p, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(prefetch: Arc<ImagePrefetch>, error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut failed = ctx.failed_in_a_row.lock().expect("failure counts lock");
        let n = failed
            .entry(prefetch.uid().unwrap_or_default())
            .or_insert(0);
        *n += 1;
        *n
    };
    let delay = retry_delay(n);
    warn!(
        namespace = prefetch.namespace(),
        name = %prefetch.name_any(),
        category = error.category(),
        %error,
        failed_in_a_row = n,
        retry_in = ?delay,
        "reconcile failed; retrying with backoff"
    );
    Action::requeue(delay)
}

struct Owner<'a> {
    namespace: &'a str,
    name: &'a str,
    uid: &'a str,
}

impl<'a> Owner<'a> {
    fn of(p: &'a ImagePrefetch) -> Result<Self, Error> {
        let m = &p.metadata;
        Ok(Owner {
            namespace: m
                .namespace
                .as_deref()
                .ok_or(Error::MissingMetadata("namespace"))?,
            name: m.name.as_deref().ok_or(Error::MissingMetadata("name"))?,
            uid: m.uid.as_deref().ok_or(Error::MissingMetadata("uid"))?,
        })
    }

    fn owns(&self, set: &SetView) -> bool {
        set.owner == names::label_value(self.uid)
    }
}

async fn apply(
    p: &ImagePrefetch,
    api: &Api<ImagePrefetch>,
    ctx: &Context,
) -> Result<Action, Error> {
    let owner = Owner::of(p)?;
    // Before the first full list a partial cache would look like missing
    // nodes, and their NodeImageSets would be deleted.
    let _ = ctx.nodes.wait_until_ready().await;
    ctx.sets.wait_until_ready().await;
    let now = crd::condition::now();

    let nodes = ctx.nodes.state();
    let all_sets = ctx.sets.state();
    let owned: Vec<&SetView> = all_sets
        .iter()
        .map(|s| s.as_ref())
        .filter(|s| owner.owns(s))
        .collect();
    let holds = |node: &str| owned.iter().any(|s| s.spec.node_name == node);
    let selection = info_span!("select", nodes = nodes.len()).in_scope(|| {
        select::select(
            owner.uid,
            &p.spec.node_selector,
            p.spec.replicas,
            nodes.iter().map(|n| n.as_ref()),
            &holds,
            now.0,
            ctx.config.not_ready_grace,
        )
    });
    Span::current().record("selected", selection.nodes.len());
    let (allowed, not_allowed): (Vec<String>, Vec<String>) = p
        .spec
        .images
        .iter()
        .cloned()
        .partition(|i| ctx.config.allowed.allows(i));

    let mut view = ClusterView::default();
    for n in &nodes {
        let name = n.name_any();
        view.groups
            .insert(name.clone(), select::sequencing_group(n));
        let cordoned = n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if select::is_ready(n) && !cordoned && n.metadata.deletion_timestamp.is_none() {
            view.usable.insert(name);
        }
    }
    view.add_sets(all_sets.iter().map(|s| s.as_ref()));
    let selected: HashSet<&String> = selection.nodes.iter().collect();
    let selected_sets: Vec<&SetView> = owned
        .iter()
        .copied()
        .filter(|s| selected.contains(&s.spec.node_name))
        .collect();
    let plan = info_span!("plan", images = allowed.len()).in_scope(|| {
        let mut book = ctx.seeds.lock().expect("seed book lock");
        policy::plan(
            &allowed,
            &selection.nodes,
            &Current::from_sets(selected_sets.iter().copied()),
            &view,
            &mut book,
            &ctx.config.policy,
            Instant::now(),
        )
    });

    let sets_api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let params = PatchParams::apply(keys::CONTROLLER_MANAGER).force();
    let by_name: HashMap<&str, &SetView> = owned.iter().map(|s| (s.name.as_str(), *s)).collect();
    let mut current: Vec<SetView> = Vec::with_capacity(selection.nodes.len());
    let mut changed: Vec<NodeImageSet> = Vec::new();
    for (node, entries) in &plan.entries {
        let desired = desired_set(p, &owner, node, entries.clone(), &ctx.config);
        match by_name.get(desired.name_any().as_str()) {
            Some(existing) if up_to_date(existing, &desired) => current.push((*existing).clone()),
            _ => changed.push(desired),
        }
    }
    // Independent objects: written side by side, so a fan-out to many nodes
    // takes a fraction of the round trips one after another would.
    let writes: Vec<_> = changed
        .into_iter()
        .map(|mut desired| {
            let (api, params) = (sets_api.clone(), params.clone());
            let span = info_span!(
                "apply NodeImageSet",
                node = %desired.spec.node_name,
                set = %desired.name_any(),
                images = desired.spec.image_set.len(),
            );
            async move {
                // The agent continues the trace from this span.
                if let Some(traceparent) = telemetry::propagation::traceparent(&Span::current()) {
                    desired
                        .annotations_mut()
                        .insert(keys::TRACEPARENT_ANNOTATION.to_string(), traceparent);
                }
                api.patch(&desired.name_any(), &params, &Patch::Apply(&desired))
                    .await
            }
            .instrument(span)
        })
        .collect();
    let applied: Vec<NodeImageSet> = futures::stream::iter(writes)
        .buffer_unordered(APPLY_CONCURRENCY)
        .try_collect()
        .await?;
    for set in &applied {
        ctx.wrote();
        info!(node = %set.spec.node_name, set = %set.name_any(), images = set.spec.image_set.len(), "applied NodeImageSet");
    }
    current.extend(applied.iter().map(SetView::of));
    let selected: HashSet<&String> = selection.nodes.iter().collect();
    for stale in owned
        .iter()
        .filter(|s| !selected.contains(&s.spec.node_name))
    {
        delete_ignoring_missing(&sets_api, &stale.name).await?;
        ctx.wrote();
        info!(node = %stale.spec.node_name, set = %stale.name, "deleted NodeImageSet of a node no longer selected");
    }
    ctx.metrics.seeds_chosen.inc_by(plan.new_seeds.len() as u64);
    for (image, node) in &plan.new_seeds {
        let note = format!(
            "{node} pulls {image} from its registry; other nodes will get it from the in-cluster mirror"
        );
        publish(ctx, p, EventType::Normal, "SeedChosen", note).await;
    }

    let refs: Vec<&SetView> = current.iter().collect();
    let at = Instant::now();
    let no_seed: Vec<status::NoSeed> = plan
        .blocked
        .iter()
        .map(|b| status::NoSeed {
            image: b.image.clone(),
            nodes: b.nodes.clone(),
            retry_in: b.retry_at.saturating_duration_since(at),
        })
        .collect();
    let inputs = Inputs {
        desired: selection.nodes.len(),
        insufficient: selection.insufficient,
        not_allowed: &not_allowed,
        no_seed: &no_seed,
    };
    let status = status::compute(p, &inputs, &refs, now);
    let progressing = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Progressing" && c.status == "True");
    if !progressing {
        ctx.rollouts
            .finish(owner.uid, p.metadata.generation.unwrap_or_default());
    }
    announce(ctx, p, &owner, &refs, &status).await;
    if p.status.as_ref() != Some(&status) {
        let body = json!({
            "apiVersion": ImagePrefetch::api_version(&()),
            "kind": ImagePrefetch::kind(&()),
            "status": status,
        });
        api.patch_status(owner.name, &params, &Patch::Apply(&body))
            .await?;
        ctx.wrote();
    }
    // Back when the first cool-down ends: a blocked image gets its seed then.
    let next_seed = no_seed.iter().map(|n| n.retry_in).min();
    Ok(Action::requeue(
        RESYNC
            .min(ctx.config.policy.seed_deadline / 2)
            .min(next_seed.unwrap_or(RESYNC).max(Duration::from_secs(1))),
    ))
}

/// Events for what changed since the last status: images ready everywhere, new failures.
async fn announce(
    ctx: &Context,
    p: &ImagePrefetch,
    owner: &Owner<'_>,
    sets: &[&SetView],
    status: &ImagePrefetchStatus,
) {
    let before = p.status.as_ref();
    // A Degraded reason the controller itself decides (not a node's pull,
    // which has its own PullFailed Event): a Warning when it first appears,
    // so `kubectl describe` and event-based alerting show it too.
    let degraded = |s: Option<&ImagePrefetchStatus>| {
        s.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Degraded"))
            .filter(|c| c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = degraded(Some(status))
        && [
            "RegistryNotAllowed",
            "NoMatchingNodes",
            "InsufficientNodes",
            "NoSeedAvailable",
        ]
        .contains(&reason.as_str())
        && degraded(before).map(|(r, _)| r) != Some(reason.clone())
    {
        publish(ctx, p, EventType::Warning, &reason, message).await;
    }
    for img in &status.images {
        let was = before
            .and_then(|s| s.images.iter().find(|i| i.image == img.image))
            .map(|i| i.available)
            .unwrap_or(0);
        if status.desired_nodes > 0 && img.available == status.desired_nodes && was < img.available
        {
            let note = format!("{} is on all {} nodes", img.image, status.desired_nodes);
            publish(ctx, p, EventType::Normal, "ImageReady", note).await;
        }
    }
    let failures = status::failures(sets);
    let fresh: Vec<status::Failure> = {
        let mut announced = ctx.announced.lock().expect("announced lock");
        failures
            .into_iter()
            .filter(|f| announced.insert((owner.uid.to_string(), f.node.clone(), f.image.clone())))
            .collect()
    };
    for f in fresh {
        let note = format!(
            "{} failed on node {}: {} ({})",
            f.image, f.node, f.message, f.reason
        );
        publish(ctx, p, EventType::Warning, "PullFailed", note).await;
    }
}

async fn publish(ctx: &Context, p: &ImagePrefetch, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Prefetch".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish an Event");
    }
}

async fn cleanup(p: &ImagePrefetch, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(p)?;
    let sets_api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let selector = ListParams::default().labels(&keys::owned_by(owner.uid));
    sets_api
        .delete_collection(&DeleteParams::default(), &selector)
        .await?;
    ctx.wrote();
    ctx.announced
        .lock()
        .expect("announced lock")
        .retain(|(uid, _, _)| uid != owner.uid);
    ctx.rollouts.forget(owner.uid);
    info!("deleted every NodeImageSet of the ImagePrefetch");
    Ok(Action::await_change())
}

/// The NodeImageSet `node` should have for `p`.
fn desired_set(
    p: &ImagePrefetch,
    owner: &Owner<'_>,
    node: &str,
    entries: Vec<NodeImage>,
    config: &Config,
) -> NodeImageSet {
    let name = names::node_image_set_name(owner.name, owner.uid, node);
    let mut set = NodeImageSet::new(
        &name,
        NodeImageSetSpec {
            node_name: node.to_string(),
            image_set: entries,
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
    set.metadata.annotations = Some(BTreeMap::from([(
        keys::PREFETCH_REF_ANNOTATION.to_string(),
        format!("{}/{}", owner.namespace, owner.name),
    )]));
    set
}

fn up_to_date(existing: &SetView, desired: &NodeImageSet) -> bool {
    existing.spec == desired.spec
        && existing.meta
            == crate::index::managed_meta(&desired.metadata.labels, &desired.metadata.annotations)
}

async fn delete_ignoring_missing(api: &Api<NodeImageSet>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::retry_delay;

    #[test]
    fn failed_reconciles_back_off_to_five_minutes() {
        let secs: Vec<u64> = [1, 2, 3, 4, 8, 9, 10, 100]
            .iter()
            .map(|n| retry_delay(*n).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 128, 256, 300, 300]);
    }
}
