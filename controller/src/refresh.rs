//! Refresh rounds: when an ImagePrefetch's seeds ask the registry again
//! what its tags point to (`spec.refreshIntervalSeconds`, or a new value of
//! the `imageprefetch.io/refresh` annotation).
//!
//! A round is named by the time it began, kept in the status
//! (`lastRefreshTime`) and carried by every entry that resolves a tag
//! (`NodeImage::refresh`): an agent whose entry names a new round asks the
//! registry again, and its report names the round it answers. What the
//! seeds then agree on is rolled out by the sequencing policy like any
//! image (`policy.rs`, the `repin` nodes).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crd::{ImagePrefetch, keys};

/// The round an ImagePrefetch's seeds answer now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    /// When the current round began (`None`: none yet; the tags were
    /// resolved when the rollout started).
    pub current: Option<String>,
    /// The annotation value acted on, for the status.
    pub request: Option<String>,
    /// Whether `current` began with this decision.
    pub started: bool,
    /// How long until the next round falls due (`None`: no interval).
    pub next_in: Option<Duration>,
}

/// The round for `prefetch` at `now`: a new one when the interval has run
/// since the last round (or since creation), or when the annotation carries
/// a value not acted on yet; otherwise the last one.
pub fn round(prefetch: &ImagePrefetch, now: &Time) -> Round {
    let status = prefetch.status.as_ref();
    let last = status.and_then(|s| s.last_refresh_time.clone());
    let acted_on = status.and_then(|s| s.refresh_request.clone());
    let requested = prefetch
        .annotations()
        .get(keys::REFRESH_ANNOTATION)
        .cloned();
    let interval = prefetch
        .spec
        .refresh_interval_seconds
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    let since = last
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .or_else(|| prefetch.creation_timestamp().map(|t| t.0));
    let elapsed = since
        .map(|since| {
            now.0
                .duration_since(since)
                .try_into()
                .unwrap_or(Duration::ZERO)
        })
        .unwrap_or(Duration::ZERO);
    // A new annotation value asks at once, but not more often than the
    // shortest interval: a tenant rewriting it in a loop gets a round
    // every MIN_SPACING, not one per write.
    let spacing = MIN_SPACING.saturating_sub(if last.is_some() { elapsed } else { MIN_SPACING });
    let asked = requested.is_some() && requested != acted_on;
    let due = interval.is_some_and(|i| elapsed >= i);
    if (asked && spacing.is_zero()) || due {
        Round {
            current: Some(now.0.to_string()),
            request: requested.or(acted_on),
            started: true,
            next_in: interval,
        }
    } else {
        Round {
            current: last,
            request: acted_on,
            started: false,
            next_in: match (interval.map(|i| i.saturating_sub(elapsed)), asked) {
                (Some(left), true) => Some(left.min(spacing)),
                (None, true) => Some(spacing),
                (left, false) => left,
            },
        }
    }
}

/// The least time between two rounds started by the annotation.
const MIN_SPACING: Duration = Duration::from_secs(crd::prefetch::MIN_REFRESH_SECONDS as u64);

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crd::{ImagePrefetchSpec, ImagePrefetchStatus};

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + second).unwrap())
    }

    fn prefetch(
        interval: Option<i64>,
        annotation: Option<&str>,
        status: Option<ImagePrefetchStatus>,
    ) -> ImagePrefetch {
        let mut p = ImagePrefetch::new(
            "app",
            ImagePrefetchSpec {
                refresh_interval_seconds: interval,
                ..ImagePrefetchSpec::of_images(&["r.example/app:latest"])
            },
        );
        p.metadata.creation_timestamp = Some(at(0));
        p.metadata.annotations = annotation
            .map(|a| BTreeMap::from([(keys::REFRESH_ANNOTATION.to_string(), a.to_string())]));
        p.status = status;
        p
    }

    fn after(round: &Round) -> ImagePrefetchStatus {
        ImagePrefetchStatus {
            last_refresh_time: round.current.clone(),
            refresh_request: round.request.clone(),
            ..Default::default()
        }
    }

    #[test]
    fn no_interval_and_no_annotation_means_no_round() {
        let r = round(&prefetch(None, None, None), &at(100_000));
        assert_eq!(
            r,
            Round {
                current: None,
                request: None,
                started: false,
                next_in: None
            }
        );
    }

    #[test]
    fn the_interval_runs_from_creation_then_from_each_round() {
        let p = prefetch(Some(60), None, None);
        let r = round(&p, &at(30));
        assert!(!r.started);
        assert_eq!(r.next_in, Some(Duration::from_secs(30)));
        let first = round(&p, &at(60));
        assert!(first.started);
        assert_eq!(first.current, Some(at(60).0.to_string()));
        // Once written to the status, the round holds until the next is due.
        let p = prefetch(Some(60), None, Some(after(&first)));
        let r = round(&p, &at(100));
        assert_eq!(
            (r.started, r.current.clone()),
            (false, first.current.clone())
        );
        assert_eq!(r.next_in, Some(Duration::from_secs(20)));
        let second = round(&p, &at(121));
        assert!(second.started);
        assert_ne!(second.current, first.current);
    }

    #[test]
    fn a_new_annotation_value_starts_one_round() {
        let p = prefetch(None, Some("2026-12-07 deploy"), None);
        let r = round(&p, &at(5));
        assert!(r.started);
        assert_eq!(r.request.as_deref(), Some("2026-12-07 deploy"));
        // Acted on: no second round for the same value.
        let p = prefetch(None, Some("2026-12-07 deploy"), Some(after(&r)));
        let again = round(&p, &at(500));
        assert!(!again.started);
        assert_eq!(again.current, r.current);
        // A new value: a new round.
        let p = prefetch(None, Some("again"), Some(after(&r)));
        assert!(round(&p, &at(501)).started);
        // Rewritten 3 s after a round: the next round waits out the spacing.
        let p = prefetch(None, Some("once more"), Some(after(&r)));
        let soon = round(&p, &at(8));
        assert!(!soon.started);
        assert_eq!(soon.next_in, Some(Duration::from_secs(7)));
        assert!(round(&p, &at(15)).started);
        // The annotation removed: nothing happens, the last value is kept.
        let p = prefetch(None, None, Some(after(&r)));
        let gone = round(&p, &at(502));
        assert!(!gone.started);
        assert_eq!(gone.request.as_deref(), Some("2026-12-07 deploy"));
    }
}
