//! The controller's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::index::SetView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `Error::category()`: the operation that failed (`apply-node-image-set`,
    /// `write-status`, ...).
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// The watched resource: `nodes`, `nodeimagesets`, `imageprefetches`.
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `pending` (no agent report yet), `pulling`, `ready`, `failed`.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnreadableLabels {
    /// `imageprefetches` or `nodeimagesets`.
    pub resource: String,
    /// `spec` or `status`.
    pub part: String,
}

/// Why a node's readiness gate opened.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabels {
    /// `images-ready` or `timed-out`.
    pub why: String,
}

/// One ImagePrefetch, for the per-rollout gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefetchLabels {
    pub namespace: String,
    pub name: String,
}

/// One ImagePrefetch and the reason of its Degraded condition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DegradedLabels {
    pub namespace: String,
    pub name: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Histogram,
    /// NodeImageSet applies and deletes, status patches.
    pub writes: Counter,
    pub seeds_chosen: Counter,
    pub sets: Family<StateLabels, Gauge>,
    /// Watch requests that failed (each retried after the watch's backoff).
    pub watch_errors: Family<WatchLabels, Counter>,
    /// Objects whose spec or status cannot be read (skipped, or no report).
    pub unreadable: Family<UnreadableLabels, Gauge>,
    /// Per ImagePrefetch, from its status: nodes selected, nodes with every
    /// image, and 1 while Degraded (with the reason).
    pub desired_nodes: Family<PrefetchLabels, Gauge>,
    pub ready_nodes: Family<PrefetchLabels, Gauge>,
    pub degraded: Family<DegradedLabels, Gauge>,
    /// Readiness-gate taints removed, by why.
    pub gates_opened: Family<GateLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            writes: Counter::default(),
            seeds_chosen: Counter::default(),
            sets: Family::default(),
            watch_errors: Family::default(),
            unreadable: Family::default(),
            desired_nodes: Family::default(),
            ready_nodes: Family::default(),
            degraded: Family::default(),
            gates_opened: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("image_prefetch_controller");
        r.register(
            "reconciles",
            "Reconciles of ImagePrefetches",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles, by category",
            m.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            m.reconcile_seconds.clone(),
        );
        r.register("api_writes", "Writes to the API server", m.writes.clone());
        r.register(
            "seeds_chosen",
            "Nodes chosen to pull an image from its registry",
            m.seeds_chosen.clone(),
        );
        r.register(
            "unreadable_objects",
            "Objects whose spec or status this controller cannot read, by resource and part: an ImagePrefetch with an unreadable spec is not acted on (its status says why), a NodeImageSet's unreadable status counts as no report",
            m.unreadable.clone(),
        );
        r.register(
            "watch_errors",
            "Failed watch requests to the API server, by resource; each watch tries again after its backoff",
            m.watch_errors.clone(),
        );
        r.register(
            "node_image_sets",
            "NodeImageSets by state, as their agents report them",
            m.sets.clone(),
        );
        r.register(
            "prefetch_desired_nodes",
            "Nodes an ImagePrefetch selected, from its status",
            m.desired_nodes.clone(),
        );
        r.register(
            "prefetch_ready_nodes",
            "Nodes holding every image of an ImagePrefetch, from its status",
            m.ready_nodes.clone(),
        );
        r.register(
            "gates_opened",
            "Readiness-gate taints removed from nodes: their images there (images-ready), or the time limit passed (timed-out)",
            m.gates_opened.clone(),
        );
        r.register(
            "prefetch_degraded",
            "1 while an ImagePrefetch's Degraded condition is True, by its reason",
            m.degraded.clone(),
        );
        m
    }

    /// Sets the per-ImagePrefetch gauges from their statuses; ImagePrefetches
    /// gone since the last count drop out.
    pub fn count_prefetches<'a>(&self, prefetches: impl Iterator<Item = &'a crd::ImagePrefetch>) {
        self.desired_nodes.clear();
        self.ready_nodes.clear();
        self.degraded.clear();
        for p in prefetches {
            let Some(status) = &p.status else { continue };
            let labels = PrefetchLabels {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
            };
            self.desired_nodes
                .get_or_create(&labels)
                .set(status.desired_nodes.into());
            self.ready_nodes
                .get_or_create(&labels)
                .set(status.ready_nodes.into());
            if let Some(c) = crd::condition::find(&status.conditions, crd::ConditionType::Degraded)
                .filter(|c| c.status == "True")
            {
                self.degraded
                    .get_or_create(&DegradedLabels {
                        namespace: labels.namespace.clone(),
                        name: labels.name.clone(),
                        reason: c.reason.clone(),
                    })
                    .set(1);
            }
        }
    }

    /// Counts a failed request of the watch of `resource`.
    pub fn watch_failed(&self, resource: &str) {
        self.watch_errors
            .get_or_create(&WatchLabels {
                resource: resource.to_string(),
            })
            .inc();
    }

    /// Recounts `sets` by state.
    pub fn count_sets<'a>(&self, sets: impl Iterator<Item = &'a SetView>) {
        let mut counts = [("pending", 0), ("pulling", 0), ("ready", 0), ("failed", 0)];
        for set in sets {
            let available = |r: &&crd::NodeImageStatus| r.state == crd::PullState::Available;
            let i = if !set.has_status {
                0
            } else if set
                .reports
                .iter()
                .any(|r| r.state == crd::PullState::Failed)
            {
                3
            } else if set.spec.image_set.iter().all(|e| {
                set.reports
                    .iter()
                    .filter(available)
                    .any(|r| r.name == e.name)
            }) {
                2
            } else {
                1
            };
            counts[i].1 += 1;
        }
        for (state, n) in counts {
            let labels = StateLabels {
                state: state.to_string(),
            };
            self.sets.get_or_create(&labels).set(n);
        }
    }
}

impl Metrics {
    /// Sets the unreadable-objects gauge from counts of (resource, part).
    pub fn count_unreadable(&self, resource: &str, spec: usize, status: usize) {
        for (part, n) in [("spec", spec), ("status", status)] {
            let labels = UnreadableLabels {
                resource: resource.to_string(),
                part: part.to_string(),
            };
            self.unreadable.get_or_create(&labels).set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd::{NodeImageSet, NodeImageSetSpec, NodeImageSetStatus, NodeImageStatus, PullState};

    fn set(status: Option<(i32, i32, PullState)>) -> NodeImageSet {
        let mut s = NodeImageSet::new(
            "s",
            NodeImageSetSpec {
                node_name: "n".into(),
                image_set: vec![crd::NodeImage {
                    refresh: None,
                    name: "i".into(),
                    registry_policy: crd::RegistryPolicy::Default,
                    digest: None,
                    source: None,
                }],
                image_pull_secrets: vec![],
                image_download_retry_limit: 3,
                pull_stall_timeout_seconds: None,
                pin: None,
                unreadable: None,
            },
        );
        s.status = status.map(|(available, total, state)| NodeImageSetStatus {
            available,
            total,
            images: vec![NodeImageStatus::new("i", state, 1)],
            conditions: vec![],
            unreadable: None,
        });
        s
    }

    #[test]
    fn sets_are_counted_by_state() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        let sets = [
            set(None),
            set(Some((0, 1, PullState::Pulling))),
            set(Some((1, 1, PullState::Available))),
            set(Some((1, 1, PullState::Available))),
            set(Some((0, 1, PullState::Failed))),
        ];
        let views: Vec<SetView> = sets.iter().map(SetView::of).collect();
        m.count_sets(views.iter());
        let get = |state: &str| {
            m.sets
                .get_or_create(&StateLabels {
                    state: state.into(),
                })
                .get()
        };
        assert_eq!(
            [get("pending"), get("pulling"), get("ready"), get("failed")],
            [1, 1, 2, 1]
        );
        // A recount replaces, not adds.
        m.count_sets(views[..1].iter());
        assert_eq!([get("pending"), get("ready")], [1, 0]);
    }
}
