//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PullLabels {
    /// `Default` or `Mirror`.
    pub policy: String,
    /// `success`, or the failure reason (`NotFound`, `Unauthorized`, …).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `upstream` or `mirror`.
    pub source: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub pulls: Family<PullLabels, Counter>,
    pub pull_seconds: Histogram,
    pub bytes: Family<SourceLabels, Counter>,
    pub retries: Counter,
    pub images_present: Gauge,
    /// Failed requests of the NodeImageSet watch (each retried after its backoff).
    pub watch_errors: Counter,
    /// Status writes that failed (each written again after a backoff).
    pub status_write_errors: Counter,
    /// This node's NodeImageSets whose spec the agent cannot read.
    pub unreadable_sets: Gauge,
    /// Mirror pulls that found no peer yet and were asked again.
    pub mirror_misses: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            pulls: Family::default(),
            pull_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            bytes: Family::default(),
            retries: Counter::default(),
            images_present: Gauge::default(),
            watch_errors: Counter::default(),
            status_write_errors: Counter::default(),
            unreadable_sets: Gauge::default(),
            mirror_misses: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("image_prefetch_agent");
        r.register(
            "pulls",
            "Finished pulls (after retries), by policy and result",
            m.pulls.clone(),
        );
        r.register(
            "pull_duration_seconds",
            "Duration of successful pulls",
            m.pull_seconds.clone(),
        );
        r.register(
            "pulled_bytes",
            "Bytes of pulled images, by the hosts the pull could use: mirror (the in-cluster mirror only) or upstream (the registry too, after the mirror)",
            m.bytes.clone(),
        );
        r.register(
            "retries",
            "Pull attempts that failed and were retried",
            m.retries.clone(),
        );
        r.register(
            "images_present",
            "Prefetched images present on this node",
            m.images_present.clone(),
        );
        r.register(
            "watch_errors",
            "Failed requests of this node's NodeImageSet watch; the watch tries again after its backoff",
            m.watch_errors.clone(),
        );
        r.register(
            "status_write_errors",
            "NodeImageSet status writes that failed; each is written again after a backoff",
            m.status_write_errors.clone(),
        );
        r.register(
            "mirror_misses",
            "Mirror pulls that found no peer with the image yet and asked the mirror again before counting a failed attempt",
            m.mirror_misses.clone(),
        );
        r.register(
            "unreadable_sets",
            "This node's NodeImageSets whose spec the agent cannot read (a newer release's, or written by hand); their images are kept as they were",
            m.unreadable_sets.clone(),
        );
        m
    }
}
