//! What the agent reads from its node's sets and what it writes back: the
//! entries as the ledger takes them, each set's status as the ledger says
//! it is, and whether a write is due. Pure (the I/O is in `sets`), and
//! `cargo run --release -p xtask --features swarm -- bench swarm`'s
//! simulated agents use the same code.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crd::condition::condition;
use crd::{
    ConditionReason, ConditionType, NodeImageSet, NodeImageSetStatus, NodeImageStatus, PullState,
    keys,
};

use crate::ledger::{Ledger, Listed, Want};

/// Every entry of `sets`, as the ledger takes them.
pub fn listed(sets: &[Arc<NodeImageSet>]) -> Vec<Listed> {
    sets.iter()
        .flat_map(|set| {
            set.spec.image_set.iter().map(|entry| Listed {
                key: (set.name_any(), entry.name.to_string()),
                want: Want {
                    set_uid: set.uid().unwrap_or_default(),
                    entry: entry.clone(),
                    retry_limit: set.spec.image_download_retry_limit,
                    stall_timeout: set
                        .spec
                        .pull_stall_timeout_seconds
                        .and_then(|s| u64::try_from(s).ok())
                        .map(std::time::Duration::from_secs),
                    pin: set.spec.pin != Some(false),
                    secrets: set.spec.image_pull_secrets.clone(),
                    trace: set.annotations().get(keys::TRACEPARENT_ANNOTATION).cloned(),
                },
                reported: set.report_on(&entry.name).cloned(),
            })
        })
        .collect()
}

/// The status the ledger says `set` has, its Ready condition kept from the
/// old status while it does not change.
pub fn status(ledger: &Ledger, set: &NodeImageSet, now: &Time) -> NodeImageSetStatus {
    let name = set.name_any();
    let images: Vec<NodeImageStatus> = set
        .spec
        .image_set
        .iter()
        .filter_map(|e| ledger.status(&(name.clone(), e.name.to_string())))
        .collect();
    let available = images
        .iter()
        .filter(|i| i.state == PullState::Available)
        .count();
    let failed: Vec<&str> = images
        .iter()
        .filter(|i| i.state == PullState::Failed)
        .map(|i| i.name.as_str())
        .collect();
    let total = set.spec.image_set.len();
    let (ready, reason, message) = if !failed.is_empty() {
        (
            false,
            ConditionReason::PullFailed,
            format!("gave up on: {}", failed.join(", ")),
        )
    } else if available == total {
        (
            true,
            ConditionReason::AllImagesPresent,
            format!("all {total} images are on the node"),
        )
    } else {
        (
            false,
            ConditionReason::Pulling,
            format!("{available} of {total} images are on the node"),
        )
    };
    let old = set
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = set.metadata.generation;
    let ready = condition(
        old,
        ConditionType::Ready,
        ready,
        reason,
        &message,
        generation,
        now,
    );
    NodeImageSetStatus {
        available: available as i32,
        total: total as i32,
        images,
        conditions: vec![ready],
        unreadable: None,
    }
}

/// Whether `status` must be written to `set`: it differs from what is
/// stored, and it says something. A set with no entry and no status yet
/// (an earlier controller wrote one per selected node before releasing
/// anything to it; this one writes none until it does) gets no status until
/// it has one: nobody reads "0 of 0", and on a large rollout it was one
/// write per node.
pub fn worth_writing(set: &NodeImageSet, status: &NodeImageSetStatus) -> bool {
    let empty = set.spec.image_set.is_empty() && set.status.is_none();
    !empty && set.status.as_ref() != Some(status)
}

/// The status of a set whose spec this agent cannot read: the reports it
/// had, and a Ready condition saying why nothing changes.
pub fn unreadable_spec_status(
    set: &NodeImageSet,
    why: &crd::lenient::Unreadable,
    now: &Time,
) -> NodeImageSetStatus {
    let mut status = set.status.clone().unwrap_or_default();
    status.unreadable = None;
    let message = format!(
        "this node's agent cannot read the spec ({why}); the images it asked for before are kept as they were"
    );
    let ready = condition(
        &status.conditions,
        ConditionType::Ready,
        false,
        ConditionReason::SpecUnreadable,
        &message,
        set.metadata.generation,
        now,
    );
    status.conditions = vec![ready];
    status
}

/// A status write the watch has not brought back yet: the set's
/// resourceVersion it was written over, and the status's fingerprint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    over: Option<String>,
    status: u64,
}

fn fingerprint(status: &NodeImageSetStatus) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(status).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// The status to write to `set` now, if one is due, and the record of that
/// write. None when the stored status already says it (a set whose spec
/// this agent cannot read gets one saying why, even when it lists nothing),
/// or when `last` — the agent's previous write, not yet brought back by the
/// watch — wrote the same over the same version: in a burst of pulls
/// finishing, every event would otherwise rewrite every such set.
pub fn due(
    ledger: &Ledger,
    set: &NodeImageSet,
    now: &Time,
    last: Option<&Written>,
) -> Option<(NodeImageSetStatus, Written)> {
    let (status, worth) = match &set.spec.unreadable {
        Some(why) => {
            let status = unreadable_spec_status(set, why, now);
            let worth = set.status.as_ref() != Some(&status);
            (status, worth)
        }
        None => {
            let status = status(ledger, set, now);
            let worth = worth_writing(set, &status);
            (status, worth)
        }
    };
    if !worth {
        return None;
    }
    let written = Written {
        over: set.resource_version(),
        status: fingerprint(&status),
    };
    (last != Some(&written)).then_some((status, written))
}

/// Status entries by image for one set, for tests and tools.
pub fn by_image(status: &NodeImageSetStatus) -> BTreeMap<&str, &NodeImageStatus> {
    status.images.iter().map(|i| (i.name.as_str(), i)).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crd::{NodeImage, NodeImageSetSpec, RegistryPolicy, keys};

    use super::*;
    use crate::ledger::{FAILED_BACKOFF, Ledger};

    fn set(images: &[&str], version: &str) -> NodeImageSet {
        let entries = images
            .iter()
            .map(|i| NodeImage::of(*i, RegistryPolicy::Default))
            .collect();
        let mut s = NodeImageSet::new(
            "ns-app-node-1",
            NodeImageSetSpec::for_node("node-1", entries),
        );
        s.metadata.uid = Some("uid-1".into());
        s.metadata.resource_version = Some(version.into());
        s.metadata.labels = Some(keys::node_image_set_labels("ns", "app", "p-uid", "node-1"));
        s
    }

    fn observed(sets: &[&NodeImageSet]) -> Ledger {
        let mut ledger = Ledger::new(FAILED_BACKOFF);
        let sets: Vec<Arc<NodeImageSet>> = sets.iter().map(|s| Arc::new((*s).clone())).collect();
        ledger.observe(listed(&sets), Instant::now());
        ledger
    }

    #[test]
    fn a_set_that_lists_nothing_gets_no_status() {
        let empty = set(&[], "1");
        let now = crd::condition::now();
        assert_eq!(due(&observed(&[&empty]), &empty, &now, None), None);
    }

    #[test]
    fn a_status_is_due_once_and_not_again_until_the_set_moves_on() {
        let s = set(&["registry.example.com/app:1"], "7");
        let ledger = observed(&[&s]);
        let now = crd::condition::now();
        let (status, written) = due(&ledger, &s, &now, None).expect("a first report is due");
        assert_eq!(status.total, 1);
        assert_eq!(status.images.len(), 1);
        // The same status over the same version: the watch has not brought
        // the write back yet, so it is not made again.
        assert_eq!(due(&ledger, &s, &now, Some(&written)), None);
        // Another version of the set (the controller wrote it) without that
        // status: due again.
        let newer = set(&["registry.example.com/app:1"], "8");
        assert!(due(&ledger, &newer, &now, Some(&written)).is_some());
        // Stored as it is: nothing is due.
        let mut stored = newer.clone();
        stored.status = Some(status);
        assert_eq!(due(&ledger, &stored, &now, None), None);
    }

    #[test]
    fn a_set_whose_spec_cannot_be_read_says_so_and_keeps_its_reports() {
        let mut s = set(&[], "3");
        s.spec.unreadable = Some(Box::new(crd::lenient::Unreadable {
            field: "spec.imageSet[0].registryPolicy".into(),
            error: "unknown variant `Sideways`".into(),
        }));
        let now = crd::condition::now();
        let (status, _) = due(&observed(&[]), &s, &now, None).expect("says why");
        let ready = crd::condition::find(&status.conditions, ConditionType::Ready).unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, ConditionReason::SpecUnreadable.as_str());
        assert!(
            ready.message.contains("registryPolicy"),
            "{}",
            ready.message
        );
        s.status = Some(status);
        assert_eq!(due(&observed(&[]), &s, &now, None), None);
    }
}
