//! ImagePrefetch status from the NodeImageSets' reports. Pure: no I/O.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crd::{ImagePrefetch, ImagePrefetchStatus, ImageProgress, NodeImageSet, PullState};

/// The status an ImagePrefetch should have, given how many nodes were
/// selected and the NodeImageSets of those nodes that exist so far.
/// `now` stamps conditions whose status changes; unchanged ones keep their time.
pub fn compute(
    prefetch: &ImagePrefetch,
    desired: usize,
    sets: &[&NodeImageSet],
    now: Time,
) -> ImagePrefetchStatus {
    let images = &prefetch.spec.images;
    let not_yet_created = desired.saturating_sub(sets.len()) as i32;
    let desired = desired as i32;
    let mut progress: Vec<ImageProgress> = images
        .iter()
        .map(|i| ImageProgress {
            image: i.clone(),
            waiting: not_yet_created,
            ..Default::default()
        })
        .collect();
    let mut ready_nodes = 0;
    for set in sets {
        let reported = set
            .status
            .as_ref()
            .map(|s| s.images.as_slice())
            .unwrap_or(&[]);
        let mut all = true;
        for p in progress.iter_mut() {
            let state = reported.iter().find(|r| r.name == p.image).map(|r| r.state);
            match state {
                Some(PullState::Available) => p.available += 1,
                Some(PullState::Pulling) => p.pulling += 1,
                Some(PullState::Failed) => p.failed += 1,
                Some(PullState::Waiting) | None => p.waiting += 1,
            }
            all &= state == Some(PullState::Available);
        }
        if all {
            ready_nodes += 1;
        }
    }
    let previous = prefetch.status.as_ref();
    let old_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let generation = prefetch.metadata.generation;
    let (ready, reason, message) = if desired == 0 {
        (
            "False",
            "NoMatchingNodes",
            "no node matches the nodeSelector".to_string(),
        )
    } else if ready_nodes == desired {
        (
            "True",
            "AllImagesPresent",
            format!("all {} images are on all {desired} nodes", images.len()),
        )
    } else {
        (
            "False",
            "Pulling",
            format!("{ready_nodes} of {desired} nodes have every image"),
        )
    };
    let conditions = vec![condition(
        old_conditions,
        "Ready",
        ready,
        reason,
        &message,
        generation,
        &now,
    )];
    ImagePrefetchStatus {
        observed_generation: generation,
        desired_nodes: desired,
        ready_nodes,
        ready: format!("{ready_nodes}/{desired}"),
        image_count: images.len() as i32,
        images: progress,
        conditions,
    }
}

/// A condition whose `lastTransitionTime` moves only when its status does,
/// so that rewriting an unchanged status is a no-op and cannot retrigger us.
pub fn condition(
    old: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last_transition_time = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use crd::{ImagePrefetchSpec, NodeImageSetSpec, NodeImageSetStatus, NodeImageStatus};

    use super::*;

    fn prefetch(images: &[&str]) -> ImagePrefetch {
        let mut p = ImagePrefetch::new(
            "p",
            ImagePrefetchSpec {
                images: images.iter().map(|s| s.to_string()).collect(),
                node_selector: Default::default(),
                replicas: None,
                image_pull_secrets: vec![],
            },
        );
        p.metadata.generation = Some(4);
        p
    }

    fn set(states: &[(&str, PullState)]) -> NodeImageSet {
        let mut s = NodeImageSet::new(
            "s",
            NodeImageSetSpec {
                node_name: "n".into(),
                image_set: vec![],
                image_pull_secrets: vec![],
                image_download_retry_limit: 3,
            },
        );
        s.status = Some(NodeImageSetStatus {
            images: states
                .iter()
                .map(|(n, st)| NodeImageStatus {
                    name: n.to_string(),
                    state: *st,
                    attempts: 1,
                    last_error: None,
                    digest: None,
                    size_bytes: None,
                    pull_duration_millis: None,
                    source: None,
                })
                .collect(),
            ..Default::default()
        });
        s
    }

    fn time(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn counts_nodes_and_images() {
        let p = prefetch(&["a", "b"]);
        let s1 = set(&[("a", PullState::Available), ("b", PullState::Available)]);
        let s2 = set(&[("a", PullState::Available), ("b", PullState::Pulling)]);
        let s3 = set(&[("a", PullState::Failed)]);
        let st = compute(&p, 4, &[&s1, &s2, &s3], time(10));
        assert_eq!(
            (st.desired_nodes, st.ready_nodes, st.ready.as_str()),
            (4, 1, "1/4")
        );
        assert_eq!(
            st.images[0],
            ImageProgress {
                image: "a".into(),
                available: 2,
                pulling: 0,
                failed: 1,
                waiting: 1
            }
        );
        assert_eq!(
            st.images[1],
            ImageProgress {
                image: "b".into(),
                available: 1,
                pulling: 1,
                failed: 0,
                waiting: 2
            }
        );
        assert_eq!(st.observed_generation, Some(4));
        assert_eq!(st.conditions[0].status, "False");
    }

    #[test]
    fn no_nodes_is_reported() {
        let st = compute(&prefetch(&["a"]), 0, &[], time(10));
        assert_eq!(st.conditions[0].reason, "NoMatchingNodes");
        assert_eq!(st.ready, "0/0");
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let mut p = prefetch(&["a"]);
        let done = set(&[("a", PullState::Available)]);
        let first = compute(&p, 1, &[&done], time(10));
        assert_eq!(first.conditions[0].status, "True");
        p.status = Some(first.clone());
        let again = compute(&p, 1, &[&done], time(20));
        assert_eq!(again, first, "an unchanged status must compare equal");
        let pulling = set(&[("a", PullState::Pulling)]);
        let changed = compute(&p, 1, &[&pulling], time(30));
        assert_eq!(changed.conditions[0].last_transition_time, time(30));
    }
}
