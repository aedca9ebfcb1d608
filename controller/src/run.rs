//! Wires the watches, caches and the kube-runtime Controller together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::Backoff;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crd::{ImagePrefetch, NodeImageSet, keys};

use crate::config::Config;
use crate::leader;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::triggers;

/// ImagePrefetches reconciled at once. Each reconcile writes up to 16
/// NodeImageSets at a time and holds its nodes' desired sets; unbounded, 50
/// ImagePrefetches over 1,000 nodes meant hundreds of writes and connections
/// in flight and a memory peak the allocator kept.
const RECONCILE_CONCURRENCY: u16 = 4;

/// How often NodeImageSets are counted by state for /metrics (a pass over
/// the cache, not the API) and freed memory is returned.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the controller until `shutdown` completes or leadership is lost.
/// Returns the shared context (its counters) once stopped.
pub async fn run(
    client: kube::Client,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Arc<Context> {
    let shutdown = shutdown.shared();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = crate::metrics::Metrics::register(&mut registry);
    // Ready means serving its role: standing by for the lease, or leading
    // (or alone) with every cache synced — before that, reconciles would
    // decide on a partial view of the cluster, and `/readyz` says which
    // cache it waits for.
    let health = plumbing::serve::Health::default();
    if let Some(addr) = config.metrics_addr {
        plumbing::serve::serve(addr, std::sync::Arc::new(registry), health.clone()).await;
    }
    let leadership = match config.leader.clone() {
        Some(lease) => {
            health.set(
                true,
                format!(
                    "standing by for the Lease {}/{}",
                    lease.namespace, lease.name
                ),
            );
            tokio::select! {
                held = leader::acquire(client.clone(), lease) => Some(held),
                _ = shutdown.clone() => None,
            }
        }
        None => None,
    };
    let role = if leadership.is_some() {
        "leading"
    } else {
        "running"
    };
    health.set(
        false,
        format!("{role}; waiting for the caches of Nodes, NodeImageSets and ImagePrefetches"),
    );
    let prefetches: Api<ImagePrefetch> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };

    let (nodes, node_writer) = reflector::store();
    let node_events = reflector::reflector(
        node_writer,
        // Every watch backs off while the API server is away (0.8 s doubling
        // to 10 s, jittered: `crd::backoff`), instead of retrying at once.
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .backoff(crd::backoff::watch())
            .inspect_err(watch_failed(&metrics, "nodes"))
            .modify(triggers::slim_node),
    );
    let sets = crate::index::SetIndex::default();
    let set_events = {
        let sets = sets.clone();
        watcher(
            Api::<NodeImageSet>::all(client.clone()),
            watcher::Config::default().labels(keys::PREFETCH_UID),
        )
        .backoff(crd::backoff::watch())
        .inspect_err(watch_failed(&metrics, "nodeimagesets"))
        // Only news reaches the owner's reconcile: not the echo of the
        // controller's own writes.
        .try_filter_map(move |event| {
            let news = sets.apply(&event);
            let set = match event {
                watcher::Event::Apply(s)
                | watcher::Event::InitApply(s)
                | watcher::Event::Delete(s) => news.then_some(s),
                watcher::Event::Init | watcher::Event::InitDone => None,
            };
            futures::future::ready(Ok(set))
        })
    };

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "image-prefetch-controller".into(),
            instance: Some(config.instance.clone()),
        },
    );
    let fence = leadership
        .as_ref()
        .map(leader::Leadership::fence)
        .unwrap_or_default();
    let ctx = Arc::new(Context::new(
        client, nodes, sets, config, recorder, metrics, fence,
    ));
    let Some(stop) = stop_signal(shutdown, leadership.as_ref()) else {
        return ctx;
    };

    let (keeper_stop, keeper_stopped) = tokio::sync::oneshot::channel::<()>();
    let keeper = ctx.config.agent.clone().map(|spec| {
        tokio::spawn(crate::agent_daemonset::keep(
            ctx.client.clone(),
            spec,
            async move {
                let _ = keeper_stopped.await;
            },
        ))
    });

    // Periodic housekeeping: the sets-by-state gauge, and handing memory
    // freed by the last burst of reconciles back to the system.
    let housekeeping = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HOUSEKEEPING_INTERVAL);
            loop {
                every.tick().await;
                let sets = ctx.sets.state();
                ctx.metrics.count_sets(sets.iter().map(|s| s.as_ref()));
                ctx.metrics.count_unreadable(
                    "nodeimagesets",
                    sets.iter().filter(|s| s.spec.unreadable.is_some()).count(),
                    sets.iter()
                        .filter(|s| s.unreadable_report.is_some())
                        .count(),
                );
                drop(sets);
                if let Some(store) = ctx.prefetches.get() {
                    let prefetches = store.state();
                    ctx.metrics
                        .count_prefetches(prefetches.iter().map(|p| p.as_ref()));
                    ctx.metrics.count_unreadable(
                        "imageprefetches",
                        prefetches
                            .iter()
                            .filter(|p| p.spec.unreadable.is_some())
                            .count(),
                        prefetches
                            .iter()
                            .filter(|p| p.status.as_ref().is_some_and(|s| s.unreadable.is_some()))
                            .count(),
                    );
                }
                crate::memory::release_freed();
            }
        })
    };

    let (all_prefetches, prefetch_writer) = reflector::store();
    let prefetches_listed = watch::Sender::new(false);
    let prefetch_events = {
        let listed = prefetches_listed.clone();
        watcher(prefetches, watcher::Config::default())
            .backoff(crd::backoff::watch())
            .inspect_err(watch_failed(&ctx.metrics, "imageprefetches"))
            .reflect(prefetch_writer)
            .inspect_ok(move |event| {
                if matches!(event, watcher::Event::InitDone) {
                    listed.send_replace(true);
                }
            })
    };
    let readiness = tokio::spawn(report_ready(ctx.clone(), prefetches_listed, health, role));
    let gate = ctx
        .config
        .gate
        .clone()
        .map(|gate| tokio::spawn(crate::gate::keep(ctx.clone(), gate)));
    let prefetch_events = triggers::prefetch_changes(prefetch_events);
    let controller = Controller::for_stream(prefetch_events, all_prefetches.clone())
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        )
        // Each watch backs off on its own (above). The controller's own
        // backoff over all of them would count every watch's errors — stale
        // ones from the outage included — and hold the live watches back
        // with them: measured, a 30 s outage took up to three of its 30-60 s
        // rounds to recover from.
        .trigger_backoff(EachWatchBacksOff);
    let _ = ctx.prefetches.set(all_prefetches.clone());
    info!(namespace = ?ctx.config.namespace, "image-prefetch controller starting");
    if ctx.config.allowed.is_empty() {
        warn!(
            "no allowed registries are set (--allowed-registries, ALLOWED_REGISTRIES, the chart's \
             allowedRegistries): EVERY registry is allowed, and anyone who can create an \
             ImagePrefetch can make the nodes pull any image"
        );
    } else {
        info!(allowed = %ctx.config.allowed.entries().join(","), "images only from the allowed registries");
    }
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
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(%obj, "reconciled"),
                Err(error) => debug!(%error, "reconcile did not complete"),
            }
        })
        .await;
    info!("image-prefetch controller stopped");
    housekeeping.abort();
    readiness.abort();
    if let Some(gate) = gate {
        gate.abort();
    }
    let _ = keeper_stop.send(());
    if let Some(k) = keeper {
        let _ = k.await;
    }
    drop(leadership);
    ctx
}

/// Marks the controller ready once the first list of every cache is in,
/// saying which it still waits for meanwhile.
async fn report_ready(
    ctx: Arc<Context>,
    prefetches_listed: watch::Sender<bool>,
    health: plumbing::serve::Health,
    role: &'static str,
) {
    let mut nodes = ctx.nodes_ready.subscribe();
    let _ = nodes.wait_for(|ready| *ready).await;
    health.set(
        false,
        format!("{role}; waiting for the caches of NodeImageSets and ImagePrefetches"),
    );
    ctx.sets.wait_until_ready().await;
    health.set(
        false,
        format!("{role}; waiting for the cache of ImagePrefetches"),
    );
    let _ = prefetches_listed
        .subscribe()
        .wait_for(|listed| *listed)
        .await;
    health.set(true, format!("{role}; caches synced"));
}

/// What a failed watch request does: a warning (an object the API server
/// cannot give, a refused list, an outage) and the metric; the watch itself
/// tries again after its backoff.
fn watch_failed(
    metrics: &crate::metrics::Metrics,
    resource: &'static str,
) -> impl FnMut(&watcher::Error) + use<> {
    let metrics = metrics.clone();
    move |error| {
        warn!(resource, %error, "watch request failed; retrying after its backoff");
        metrics.watch_failed(resource)
    }
}

/// The controller's backoff over its trigger streams: none, because every
/// stream brings its own (`crd::backoff`).
struct EachWatchBacksOff;

impl Iterator for EachWatchBacksOff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl Backoff for EachWatchBacksOff {
    fn reset(&mut self) {}
}

/// Stop on shutdown, or when leadership is lost. `None`: shutdown came first,
/// before leadership was ever held, so there is nothing to run.
fn stop_signal(
    shutdown: futures::future::Shared<impl Future<Output = ()> + Send + Sync + 'static>,
    leadership: Option<&leader::Leadership>,
) -> Option<impl Future<Output = ()> + Send + Sync + 'static> {
    if shutdown.peek().is_some() {
        return None;
    }
    let lost = leadership.map(|l| l.lost());
    Some(async move {
        match lost {
            Some(lost) => tokio::select! {
                _ = shutdown => {},
                _ = lost => info!("leadership lost; stopping"),
            },
            None => shutdown.await,
        }
    })
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
