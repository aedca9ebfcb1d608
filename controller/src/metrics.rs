//! The controller's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `Error::category()`: kube, finalizer, metadata.
    pub category: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Counter,
    pub errors: Family<ErrorLabels, Counter>,
    pub reconcile_seconds: Histogram,
    /// NodeImageSet applies and deletes, status patches.
    pub writes: Counter,
    pub seeds_chosen: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            reconciles: Counter::default(),
            errors: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            writes: Counter::default(),
            seeds_chosen: Counter::default(),
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
        m
    }
}
