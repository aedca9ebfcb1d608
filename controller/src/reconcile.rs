//! The reconcile loop's I/O: read the caches (observe), let
//! [`crate::decide`] decide, write NodeImageSets, Events and status (act).

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{Instrument as _, Span, field, info, info_span, warn};

use crd::{ImagePrefetch, NodeImageSet, keys};

use crate::config::Config;
use crate::decide::{Decision, Desired, Memory, Observed, Owner, decide};
use crate::index::SetIndex;
use crate::metrics::{ErrorLabels, Metrics};
use crate::policy::SeedBook;
use crate::trace::Rollouts;
use crate::{Error, pull_secrets};

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
    /// When each entry without a report was first seen so.
    unreported: Mutex<crate::decide::Unreported>,
    /// Reconciles failed in a row, per ImagePrefetch uid: the retry backs off.
    failed_in_a_row: Mutex<HashMap<String, u32>>,
    pub metrics: Metrics,
    rollouts: Rollouts,
    /// Every ImagePrefetch, as the controller watches them (set once it runs).
    pub prefetches: std::sync::OnceLock<Store<ImagePrefetch>>,
    /// The pull secrets last granted to the agent, per namespace.
    granted: tokio::sync::Mutex<HashMap<String, Vec<String>>>,
    /// The pull secrets of the ServiceAccounts ImagePrefetches name, as
    /// their reconciles last read them: part of each namespace's grant.
    account_secrets: Mutex<crate::pull_secrets::AccountSecrets>,
    /// When each of those accounts was last read.
    account_reads: Mutex<crate::pull_secrets::AccountReads>,
    /// Closed once leadership is lost: no write passes it after.
    pub fence: crate::leader::Fence,
    /// True once the node store has its first full list.
    pub(crate) nodes_ready: tokio::sync::watch::Sender<bool>,
}

impl Context {
    pub fn new(
        client: kube::Client,
        nodes: Store<Node>,
        sets: SetIndex,
        config: Config,
        recorder: Recorder,
        metrics: Metrics,
        fence: crate::leader::Fence,
    ) -> Self {
        // kube's `Store::wait_until_ready` wakes only the last of several
        // waiters (one oneshot receiver, one waker): reconciles started
        // together at start-up waited on it, and one of them for ever
        // (seen in `controller/tests/unreadable_objects.rs`). One task
        // waits on it; reconciles wait on this channel, which wakes all.
        let nodes_ready = tokio::sync::watch::Sender::new(false);
        {
            let (nodes, ready) = (nodes.clone(), nodes_ready.clone());
            tokio::spawn(async move {
                if nodes.wait_until_ready().await.is_ok() {
                    ready.send_replace(true);
                }
            });
        }
        Context {
            nodes_ready,
            client,
            nodes,
            sets,
            config,
            seeds: Mutex::default(),
            recorder,
            announced: Mutex::default(),
            unreported: Mutex::default(),
            failed_in_a_row: Mutex::default(),
            metrics,
            rollouts: Rollouts::default(),
            prefetches: std::sync::OnceLock::new(),
            granted: tokio::sync::Mutex::default(),
            account_secrets: Mutex::default(),
            account_reads: Mutex::default(),
            fence,
        }
    }

    pub(crate) fn wrote(&self) {
        self.metrics.writes.inc();
    }
}

/// NodeImageSet writes in flight at once within one reconcile.
const APPLY_CONCURRENCY: usize = 16;

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
            plumbing::propagation::set_parent(&span, &parent);
        }
        None => {
            if let Some(root) = plumbing::propagation::span_context(&span) {
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
    crd::backoff::Doubling::new(Duration::from_secs(1), Duration::from_secs(300)).after(n)
}

/// Whether the `n`-th failure in a row is told as a Warning Event: the
/// first, then at 2, 4, 8, …, so a long outage is heard of without an Event
/// per retry (the API server's Event series counts them anyway).
pub fn announce_failure(n: u32) -> bool {
    n.is_power_of_two()
}

async fn reconcile_inner(prefetch: Arc<ImagePrefetch>, ctx: &Context) -> Result<Action, Error> {
    let namespace = prefetch
        .namespace()
        .ok_or(Error::MissingMetadata("namespace"))?;
    let api: Api<ImagePrefetch> = Api::namespaced(ctx.client.clone(), &namespace);
    // The finalizer helper writes (adds or removes the finalizer) itself.
    ctx.fence.check()?;
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
        operation = error.category(),
        %error,
        failed_in_a_row = n,
        retry_in = ?delay,
        "reconcile failed; retrying with backoff"
    );
    if error.is_announced() && announce_failure(n) {
        let announcement = crate::decide::Announcement {
            type_: EventType::Warning,
            reason: crd::EventReason::ReconcileFailed,
            note: format!(
                "{error} (failed {n} times in a row; trying again in {}s)",
                delay.as_secs().max(1)
            ),
            node: None,
            image: None,
        };
        let mut event = announcement.event();
        event.secondary = error.related().or(event.secondary);
        tokio::spawn(async move {
            if let Err(e) = ctx
                .recorder
                .publish(&event, &prefetch.object_ref(&()))
                .await
            {
                warn!(error = %e, reason = %event.reason, "could not publish an Event");
            }
        });
    }
    Action::requeue(delay)
}

/// Observe, decide, act: the caches are read, `decide` says what to write,
/// and the writes are made — nothing else.
async fn apply(
    p: &ImagePrefetch,
    api: &Api<ImagePrefetch>,
    ctx: &Context,
) -> Result<Action, Error> {
    // Before the first full list a partial cache would look like missing
    // nodes, and their NodeImageSets would be deleted.
    let _ = ctx.nodes_ready.subscribe().wait_for(|ready| *ready).await;
    ctx.sets.wait_until_ready().await;
    let nodes = ctx.nodes.state();
    // Only the sets this decision reads, through the index's lookups.
    let (owned, sharing, entries_on) = {
        let sets = ctx.sets.read();
        let owner = crd::names::label_value(&p.uid().unwrap_or_default());
        let entries_on: HashMap<String, usize> = nodes
            .iter()
            .map(|n| n.name_any())
            .map(|n| {
                let entries = sets.entries_on(&n);
                (n, entries)
            })
            .filter(|(_, entries)| *entries > 0)
            .collect();
        (
            sets.owned_by(&owner),
            sets.sharing(&owner, &p.spec.images),
            entries_on,
        )
    };
    let (namespace_entries, cluster_entries) = entries_held_by_others(ctx, p);
    let account_secrets = account_secrets(ctx, p).await?;
    let observed = Observed {
        prefetch: p,
        nodes: &nodes,
        owned: &owned,
        sharing: &sharing,
        entries_on: &entries_on,
        now: crd::condition::now(),
        at: Instant::now(),
        namespace_entries,
        cluster_entries,
        account_secrets,
    };
    let decision = {
        let mut seeds = ctx.seeds.lock().expect("seed book lock");
        let mut announced = ctx.announced.lock().expect("announced lock");
        let mut unreported = ctx.unreported.lock().expect("unreported lock");
        let memory = Memory {
            seeds: &mut seeds,
            announced: &mut announced,
            unreported: &mut unreported,
        };
        decide(&observed, &ctx.config, memory)?
    };
    act(p, api, ctx, &decision).await?;
    if !decision.progressing {
        ctx.rollouts.finish(
            &p.uid().unwrap_or_default(),
            p.metadata.generation.unwrap_or_default(),
        );
    }
    Ok(Action::requeue(decision.requeue))
}

/// Node×image entries the other ImagePrefetches hold — of `p`'s namespace,
/// and of the whole cluster — by their status (what the controller planned
/// for them: selected nodes × images). One created at the same moment counts
/// once it is reconciled.
fn entries_held_by_others(ctx: &Context, p: &ImagePrefetch) -> (usize, usize) {
    let Some(store) = ctx.prefetches.get() else {
        return (0, 0);
    };
    let (mut namespace, mut cluster) = (0, 0);
    for o in store.state().iter().filter(|o| o.uid() != p.uid()) {
        let Some(s) = o.status.as_ref() else { continue };
        let held = s.desired_nodes.max(0) as usize * s.image_count.max(0) as usize;
        cluster += held;
        if o.namespace() == p.namespace() {
            namespace += held;
        }
    }
    (namespace, cluster)
}

/// Carries a decision out: NodeImageSets, then Events, then the status.
async fn act(
    p: &ImagePrefetch,
    api: &Api<ImagePrefetch>,
    ctx: &Context,
    decision: &Decision,
) -> Result<(), Error> {
    // The agent can read the secrets before its sets ask it to.
    grant_pull_secrets(ctx, &p.namespace().unwrap_or_default()).await?;
    let sets_api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let params = PatchParams::apply(keys::CONTROLLER_MANAGER).force();
    // Independent objects: written side by side, so a fan-out to many nodes
    // takes a fraction of the round trips one after another would.
    // Lazily: each set is made into its object when its turn comes, not all
    // of them before the first goes out (5,000 objects for a fan-out).
    let writes = decision
        .apply
        .iter()
        .map(Desired::object)
        .map(|mut desired| {
            let (api, params) = (sets_api.clone(), params.clone());
            let span = info_span!(
                "apply NodeImageSet",
                node = %desired.spec.node_name,
                set = %desired.name_any(),
                images = desired.spec.image_set.len(),
            );
            let fence = ctx.fence.clone();
            async move {
                fence.check()?;
                // The agent continues the trace from this span.
                if let Some(traceparent) = plumbing::propagation::traceparent(&Span::current()) {
                    desired
                        .annotations_mut()
                        .insert(keys::TRACEPARENT_ANNOTATION.to_string(), traceparent);
                }
                api.patch(&desired.name_any(), &params, &Patch::Apply(&desired))
                    .await
                    .map_err(|source| Error::ApplyNodeImageSet {
                        set: desired.name_any(),
                        node: desired.spec.node_name.clone(),
                        source,
                    })
            }
            .instrument(span)
        });
    // Each answer is taken in as it comes and dropped: collected, a fan-out
    // to 5,000 nodes held 5,000 whole objects (managedFields and all) at
    // once, and their echoes came back before they were known as ours.
    futures::stream::iter(writes)
        .buffer_unordered(APPLY_CONCURRENCY)
        .try_for_each(|set| {
            ctx.sets.wrote(&set);
            ctx.wrote();
            info!(node = %set.spec.node_name, set = %set.name_any(), images = set.spec.image_set.len(), "applied NodeImageSet");
            futures::future::ready(Ok(()))
        })
        .await?;
    for stale in &decision.delete {
        ctx.fence.check()?;
        delete_decided(&sets_api, &stale.name, &stale.uid)
            .await
            .map_err(|source| Error::DeleteNodeImageSet {
                set: stale.name.clone(),
                node: stale.node.clone(),
                source,
            })?;
        ctx.wrote();
        info!(node = %stale.node, set = %stale.name, "deleted NodeImageSet of a node no longer selected");
    }
    ctx.metrics.seeds_chosen.inc_by(decision.new_seeds as u64);
    for event in &decision.events {
        ctx.fence.check()?;
        if event.type_ == EventType::Warning {
            warn!(namespace = %owner_namespace(p), name = %p.name_any(), reason = %event.reason, "{}", event.note);
        }
        publish(ctx, p, event).await;
    }
    if let Some(status) = &decision.status {
        ctx.fence.check()?;
        let body = json!({
            "apiVersion": ImagePrefetch::api_version(&()),
            "kind": ImagePrefetch::kind(&()),
            "status": status,
        });
        api.patch_status(&p.name_any(), &params, &Patch::Apply(&body))
            .await
            .map_err(|source| Error::WriteStatus {
                prefetch: format!("{}/{}", owner_namespace(p), p.name_any()),
                source,
            })?;
        ctx.wrote();
    }
    if decision.expire {
        ctx.fence.check()?;
        // The finalizer's cleanup then deletes its sets, releasing the pins.
        let precondition = DeleteParams {
            preconditions: p.uid().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&p.name_any(), &precondition).await {
            Ok(_) => {
                ctx.wrote();
                info!("deleted: ready for its ttlSecondsAfterReady");
            }
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(source) => {
                return Err(Error::DeleteExpired {
                    prefetch: format!("{}/{}", owner_namespace(p), p.name_any()),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn owner_namespace(p: &ImagePrefetch) -> String {
    p.namespace().unwrap_or_default()
}

async fn publish(ctx: &Context, p: &ImagePrefetch, announcement: &crate::decide::Announcement) {
    let event = announcement.event();
    if let Err(e) = ctx.recorder.publish(&event, &p.object_ref(&())).await {
        warn!(error = %e, reason = %event.reason, "could not publish an Event");
    }
}

async fn cleanup(p: &ImagePrefetch, ctx: &Context) -> Result<Action, Error> {
    let owner = Owner::of(p)?;
    let sets_api: Api<NodeImageSet> = Api::all(ctx.client.clone());
    let selector = ListParams::default().labels(&keys::owned_by(owner.uid));
    ctx.fence.check()?;
    sets_api
        .delete_collection(&DeleteParams::default(), &selector)
        .await
        .map_err(|source| Error::DeleteOwnedNodeImageSets {
            prefetch: format!("{}/{}", owner.namespace, p.name_any()),
            source,
        })?;
    ctx.wrote();
    ctx.announced
        .lock()
        .expect("announced lock")
        .retain(|(uid, _, _)| uid != owner.uid);
    ctx.unreported
        .lock()
        .expect("unreported lock")
        .forget(owner.uid);
    ctx.rollouts.forget(owner.uid);
    grant_pull_secrets(ctx, owner.namespace).await?;
    info!("deleted every NodeImageSet of the ImagePrefetch");
    Ok(Action::await_change())
}

/// The `imagePullSecrets` of the ServiceAccount `p` names (read again once
/// the last read is older than `ACCOUNT_FRESH_FOR`, so one changed is
/// followed; remembered for the namespace's grants); `Some(Err)` when it
/// does not exist (not remembered: it is read at each look).
async fn account_secrets(
    ctx: &Context,
    p: &ImagePrefetch,
) -> Result<Option<Result<Vec<String>, String>>, Error> {
    let Some(account) = &p.spec.service_account_name else {
        return Ok(None);
    };
    let namespace = owner_namespace(p);
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = (namespace.clone(), account.clone());
    let now = std::time::Instant::now();
    if ctx
        .account_reads
        .lock()
        .expect("account reads lock")
        .fresh(&key, now)
        && let Some(names) = ctx
            .account_secrets
            .lock()
            .expect("account secrets lock")
            .get(&key)
            .cloned()
    {
        return Ok(Some(Ok(names)));
    }
    match api.get_opt(account).await {
        Ok(Some(sa)) => {
            let names: Vec<String> = sa
                .image_pull_secrets
                .unwrap_or_default()
                .into_iter()
                .map(|s| s.name)
                .filter(|n| !n.is_empty())
                .collect();
            ctx.account_secrets
                .lock()
                .expect("account secrets lock")
                .insert(key.clone(), names.clone());
            ctx.account_reads
                .lock()
                .expect("account reads lock")
                .read(key, now);
            Ok(Some(Ok(names)))
        }
        Ok(None) => {
            ctx.account_reads
                .lock()
                .expect("account reads lock")
                .forget(&key);
            ctx.account_secrets
                .lock()
                .expect("account secrets lock")
                .remove(&key);
            Ok(Some(Err(format!(
                "serviceAccountName {account}: no such ServiceAccount in namespace {namespace}; nothing is changed until it exists"
            ))))
        }
        Err(source) => Err(Error::ReadServiceAccount {
            account: format!("{namespace}/{account}"),
            source,
        }),
    }
}

/// Keeps `namespace`'s pull-secret grant to the agent in step with the
/// secrets its ImagePrefetches name; written only when that changes.
async fn grant_pull_secrets(ctx: &Context, namespace: &str) -> Result<(), Error> {
    let (Some(agent), Some(store)) = (&ctx.config.pull_secret_grantee, ctx.prefetches.get()) else {
        return Ok(());
    };
    let secrets = {
        let accounts = ctx.account_secrets.lock().expect("account secrets lock");
        pull_secrets::named(
            namespace,
            store.state().iter().map(|p| p.as_ref()),
            &accounts,
        )
    };
    // One writer per namespace at a time, so two reconciles never undo each other.
    let mut granted = ctx.granted.lock().await;
    if granted.get(namespace) == Some(&secrets) {
        return Ok(());
    }
    ctx.fence.check()?;
    pull_secrets::write(&ctx.client, namespace, &secrets, agent)
        .await
        .map_err(|source| Error::GrantPullSecrets {
            namespace: namespace.to_string(),
            source,
        })?;
    ctx.wrote();
    info!(namespace, secrets = %secrets.join(","), "pull secrets the agent may read");
    granted.insert(namespace.to_string(), secrets);
    Ok(())
}

/// Deletes the set `name` if it is still the one of `uid` the decision was
/// made on: one deleted and created again meanwhile (another reconcile, an
/// administrator) is not ours to delete, and one already gone is fine.
async fn delete_decided(api: &Api<NodeImageSet>, name: &str, uid: &str) -> Result<(), kube::Error> {
    let params = DeleteParams {
        preconditions: (!uid.is_empty()).then(|| kube::api::Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
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
