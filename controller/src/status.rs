//! ImagePrefetch status from the NodeImageSets' reports. Pure: no I/O.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crd::condition::condition;
use crd::{
    ConditionReason as Reason, ConditionType as Type, ImagePrefetch, ImagePrefetchStatus,
    ImageProgress, PullFailure, PullState,
};

use crate::index::SetFacts;

/// What the reconcile knows beyond the NodeImageSets.
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    /// Nodes selected.
    pub desired: usize,
    /// `replicas` asked for more nodes than there are: (asked, available).
    pub insufficient: Option<(usize, usize)>,
    /// Images the allow-list refuses.
    pub not_allowed: &'a [String],
    /// Images no node can seed for now (every candidate failed recently).
    pub no_seed: &'a [NoSeed],
    /// (node, image) entries whose agent has not reported for long.
    pub silent: &'a [(String, String)],
}

/// An image without a seed until a cool-down ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoSeed {
    pub image: String,
    /// The candidates, all cooling down after failing as seed.
    pub nodes: Vec<String>,
    pub retry_in: std::time::Duration,
}

/// A node that gave up on an image.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Failure {
    pub node: String,
    pub image: String,
    pub reason: PullFailure,
    pub message: String,
}

/// Failed entries of `sets`, for conditions and events.
pub fn failures<S: SetFacts>(sets: &[&S]) -> Vec<Failure> {
    let mut out = Vec::new();
    for set in sets {
        for r in set.reported() {
            if r.state == PullState::Failed {
                out.push(Failure {
                    node: set.spec().node_name.clone(),
                    image: r.name.to_string(),
                    reason: r.reason.unwrap_or(PullFailure::PullFailed),
                    message: r.last_error.clone().unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// The status an ImagePrefetch should have. `sets` are the NodeImageSets of
/// selected nodes that exist so far; an image a node has no entry for yet
/// counts as waiting. `now` stamps conditions whose status changes.
pub fn compute<S: SetFacts>(
    prefetch: &ImagePrefetch,
    inputs: &Inputs<'_>,
    sets: &[&S],
    now: Time,
) -> ImagePrefetchStatus {
    let images = &prefetch.spec.images;
    let desired = inputs.desired as i32;
    // A refused image is not waiting for anything: it is never pulled, so
    // it counts on no node and cannot make the rollout look in progress.
    let refused = |image: &str| inputs.not_allowed.iter().any(|i| i == image);
    let mut progress: Vec<ImageProgress> = images
        .iter()
        .map(|i| ImageProgress {
            image: i.clone(),
            waiting: if refused(i) {
                0
            } else {
                desired.saturating_sub(sets.len() as i32)
            },
            ..Default::default()
        })
        .collect();
    let mut ready_nodes = 0;
    for set in sets {
        let mut all = true;
        for p in progress.iter_mut() {
            if refused(&p.image) {
                all = false;
                continue;
            }
            let listed = set.spec().image_set.iter().any(|e| e.name == p.image);
            let state = set.report_on(&p.image).map(|r| r.state).filter(|_| listed);
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

    let failures = failures(sets);
    let old = prefetch
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = prefetch.metadata.generation;
    let cond = |type_: Type, status: bool, reason: Reason, message: String| {
        condition(old, type_, status, reason, &message, generation, &now)
    };

    let degraded = degraded_reason(inputs, &failures);
    let all_ready = desired > 0 && ready_nodes == desired && inputs.not_allowed.is_empty();
    // Waiting for a seed that cannot be chosen before a cool-down ends is
    // not progress.
    let blocked = |image: &str| inputs.no_seed.iter().any(|n| n.image == image);
    // A node whose agent says nothing is not progress either.
    let silent_on = |image: &str| inputs.silent.iter().filter(|(_, i)| i == image).count() as i32;
    let moving = progress
        .iter()
        .any(|p| p.pulling > 0 || (p.waiting - silent_on(&p.image) > 0 && !blocked(&p.image)));
    let ready = if all_ready {
        cond(
            Type::Ready,
            true,
            Reason::AllImagesPresent,
            match images.len() {
                1 => format!("the image is on all {desired} nodes"),
                n => format!("all {n} images are on all {desired} nodes"),
            },
        )
    } else {
        let (reason, message) = match &degraded {
            Some((reason, message)) if !moving || desired == 0 => (*reason, message.clone()),
            _ => (
                Reason::Pulling,
                format!("{ready_nodes} of {desired} nodes have every image"),
            ),
        };
        cond(Type::Ready, false, reason, message)
    };
    let progressing = if !all_ready && moving && desired > 0 {
        cond(
            Type::Progressing,
            true,
            Reason::Pulling,
            format!("{ready_nodes} of {desired} nodes have every image"),
        )
    } else if all_ready {
        cond(
            Type::Progressing,
            false,
            Reason::Complete,
            "nothing left to pull".into(),
        )
    } else {
        cond(
            Type::Progressing,
            false,
            Reason::Stalled,
            "no pull is under way".into(),
        )
    };
    let degraded = match degraded {
        Some((reason, message)) => cond(Type::Degraded, true, reason, message),
        None => cond(
            Type::Degraded,
            false,
            Reason::AsExpected,
            "no problems".into(),
        ),
    };

    let previous = prefetch.status.as_ref();
    ImagePrefetchStatus {
        // Kept here; a decision that starts a refresh round sets them.
        last_refresh_time: previous.and_then(|s| s.last_refresh_time.clone()),
        refresh_request: previous.and_then(|s| s.refresh_request.clone()),
        observed_generation: generation,
        desired_nodes: desired,
        ready_nodes,
        ready: format!("{ready_nodes}/{desired}"),
        image_count: images.len() as i32,
        images: progress,
        conditions: vec![ready, progressing, degraded],
        unreadable: None,
    }
}

/// The status of an ImagePrefetch the controller holds back (its spec
/// cannot be read, its namespace's budget is spent): the counts it last had,
/// and conditions saying why nothing moves.
pub fn held_back(
    prefetch: &ImagePrefetch,
    reason: Reason,
    message: &str,
    now: Time,
) -> ImagePrefetchStatus {
    let mut status = prefetch.status.clone().unwrap_or_default();
    status.unreadable = None;
    let generation = prefetch.metadata.generation;
    let old = std::mem::take(&mut status.conditions);
    let cond = |type_: Type, status: bool, message: &str| {
        condition(&old, type_, status, reason, message, generation, &now)
    };
    status.conditions = vec![
        cond(Type::Ready, false, message),
        cond(
            Type::Progressing,
            false,
            "nothing is done until this is resolved",
        ),
        cond(Type::Degraded, true, message),
    ];
    status.observed_generation = generation;
    status
}

/// The first problem, in order of how much it explains, with a message
/// naming every problem of that kind.
fn degraded_reason(inputs: &Inputs<'_>, failures: &[Failure]) -> Option<(Reason, String)> {
    if inputs.desired == 0 {
        return Some((
            Reason::NoMatchingNodes,
            "no Ready, schedulable node matches the nodeSelector".into(),
        ));
    }
    if !inputs.not_allowed.is_empty() {
        return Some((
            Reason::RegistryNotAllowed,
            format!(
                "not in the allowed registries, so not pulled: {}",
                inputs.not_allowed.join(", ")
            ),
        ));
    }
    // A node whose runtime cannot keep the promise is named before any
    // other failure, then missing secrets: both need an administrator.
    for reason in [Reason::RuntimeUnsupported, Reason::SecretNotFound] {
        let of_kind: Vec<&Failure> = failures
            .iter()
            .filter(|f| f.reason.degraded_reason() == reason)
            .collect();
        if !of_kind.is_empty() {
            return Some((reason, describe(&of_kind)));
        }
    }
    if !failures.is_empty() {
        let all: Vec<&Failure> = failures.iter().collect();
        return Some((Reason::PullFailed, describe(&all)));
    }
    if !inputs.silent.is_empty() {
        let mut nodes: Vec<&str> = inputs.silent.iter().map(|(n, _)| n.as_str()).collect();
        nodes.dedup();
        let more = nodes.len().saturating_sub(5);
        nodes.truncate(5);
        return Some((
            Reason::AgentNotReporting,
            format!(
                "no report from the agent on {}{} since its images were released to it: is image-prefetch-agent running there? (the rollout goes on without it)",
                nodes.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ),
        ));
    }
    if let Some(first) = inputs.no_seed.first() {
        let nodes = |n: &NoSeed| n.nodes.join(", ");
        let mut message = format!(
            "no node can fetch {} from its registry now: every candidate ({}) failed recently; trying again in {}s",
            first.image,
            nodes(first),
            first.retry_in.as_secs().max(1)
        );
        if inputs.no_seed.len() > 1 {
            message.push_str(&format!(" (and {} more images)", inputs.no_seed.len() - 1));
        }
        return Some((Reason::NoSeedAvailable, message));
    }
    if let Some((asked, have)) = inputs.insufficient {
        return Some((
            Reason::InsufficientNodes,
            format!("replicas is {asked} but only {have} nodes qualify; using all {have}"),
        ));
    }
    None
}

/// Up to three failures in words, and how many more.
fn describe(failures: &[&Failure]) -> String {
    let mut parts: Vec<String> = failures
        .iter()
        .take(3)
        .map(|f| format!("{} on {}: {}", f.image, f.node, f.message))
        .collect();
    if failures.len() > 3 {
        parts.push(format!("and {} more", failures.len() - 3));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use crd::{
        ImagePrefetchSpec, NodeImage, NodeImageSet, NodeImageSetSpec, NodeImageSetStatus,
        NodeImageStatus, RegistryPolicy,
    };

    use super::*;

    fn prefetch(images: &[&str]) -> ImagePrefetch {
        let mut p = ImagePrefetch::new("p", ImagePrefetchSpec::of_images(images));
        p.metadata.generation = Some(4);
        p
    }

    fn set(node: &str, states: &[(&str, PullState, Option<&str>)]) -> NodeImageSet {
        let entries = states
            .iter()
            .map(|(n, _, _)| NodeImage::of(*n, RegistryPolicy::Default))
            .collect();
        let mut s = NodeImageSet::new(node, NodeImageSetSpec::for_node(node, entries));
        s.status = Some(NodeImageSetStatus {
            images: states
                .iter()
                .map(|(n, st, reason)| NodeImageStatus {
                    last_error: reason.map(|r| format!("{r} happened")),
                    reason: reason.map(|r| crd::Word::parse(r).expect("a pull failure")),
                    ..NodeImageStatus::new(*n, *st, 1)
                })
                .collect(),
            ..Default::default()
        });
        s
    }

    fn time(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn inputs(desired: usize) -> Inputs<'static> {
        Inputs {
            desired,
            ..Default::default()
        }
    }

    fn cond<'a>(
        s: &'a ImagePrefetchStatus,
        t: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn counts_nodes_and_images() {
        let p = prefetch(&["a", "b"]);
        use PullState::*;
        let s1 = set("n1", &[("a", Available, None), ("b", Available, None)]);
        let s2 = set("n2", &[("a", Available, None), ("b", Pulling, None)]);
        let s3 = set("n3", &[("a", Failed, Some("PullFailed"))]);
        let st = compute(&p, &inputs(4), &[&s1, &s2, &s3], time(10));
        assert_eq!(
            (st.desired_nodes, st.ready_nodes, st.ready.as_str()),
            (4, 1, "1/4")
        );
        let a = ImageProgress {
            image: "a".into(),
            available: 2,
            pulling: 0,
            failed: 1,
            waiting: 1,
        };
        let b = ImageProgress {
            image: "b".into(),
            available: 1,
            pulling: 1,
            failed: 0,
            waiting: 2,
        };
        assert_eq!(st.images, [a, b]);
        assert_eq!(st.observed_generation, Some(4));
        assert_eq!(cond(&st, "Ready").status, "False");
        assert_eq!(cond(&st, "Progressing").status, "True");
        assert_eq!(cond(&st, "Degraded").reason, "PullFailed");
        assert!(cond(&st, "Degraded").message.contains("a on n3"));
    }

    #[test]
    fn no_nodes_is_degraded() {
        let st = compute(
            &prefetch(&["a"]),
            &inputs(0),
            &[] as &[&NodeImageSet],
            time(10),
        );
        assert_eq!(cond(&st, "Degraded").reason, "NoMatchingNodes");
        assert_eq!(cond(&st, "Ready").reason, "NoMatchingNodes");
        assert_eq!(st.ready, "0/0");
    }

    #[test]
    fn missing_secret_outranks_other_failures() {
        use PullState::*;
        let s1 = set("n1", &[("a", Failed, Some("SecretNotFound"))]);
        let s2 = set("n2", &[("a", Failed, Some("RegistryUnreachable"))]);
        let st = compute(&prefetch(&["a"]), &inputs(2), &[&s1, &s2], time(10));
        assert_eq!(cond(&st, "Degraded").reason, "SecretNotFound");
        assert_eq!(
            cond(&st, "Ready").reason,
            "SecretNotFound",
            "nothing moves, so Ready says why"
        );
        assert_eq!(cond(&st, "Progressing").reason, "Stalled");
    }

    /// A node whose containerd cannot keep a Mirror pull off the registry
    /// is the first thing Degraded names: the administrator's to fix.
    #[test]
    fn an_unsupported_runtime_outranks_other_failures() {
        use PullState::*;
        let s1 = set("n1", &[("a", Failed, Some("SecretNotFound"))]);
        let s2 = set("n2", &[("a", Failed, Some("RuntimeUnsupported"))]);
        let st = compute(&prefetch(&["a"]), &inputs(2), &[&s1, &s2], time(10));
        let degraded = cond(&st, "Degraded");
        assert_eq!(degraded.reason, "RuntimeUnsupported");
        assert!(degraded.message.contains("n2"), "{}", degraded.message);
    }

    #[test]
    fn no_seed_is_degraded_with_the_nodes_and_the_retry_time() {
        let waiting = set("n1", &[]);
        let no_seed = [NoSeed {
            image: "a".into(),
            nodes: vec!["n1".into()],
            retry_in: std::time::Duration::from_secs(45),
        }];
        let inp = Inputs {
            desired: 1,
            no_seed: &no_seed,
            ..Default::default()
        };
        let st = compute(&prefetch(&["a"]), &inp, &[&waiting], time(10));
        let degraded = cond(&st, "Degraded");
        assert_eq!(degraded.reason, "NoSeedAvailable");
        assert!(
            degraded.message.contains("(n1)") && degraded.message.contains("45s"),
            "{}",
            degraded.message
        );
        assert_eq!(
            cond(&st, "Ready").reason,
            "NoSeedAvailable",
            "nothing moves"
        );
    }

    #[test]
    fn refused_registries_and_too_few_nodes_are_reported() {
        let refused = vec!["evil.example/x:1".to_string()];
        let done = set("n1", &[("a", PullState::Available, None)]);
        let inp = Inputs {
            desired: 1,
            insufficient: Some((3, 1)),
            not_allowed: &refused,
            no_seed: &[],
            silent: &[],
        };
        let st = compute(
            &prefetch(&["a", "evil.example/x:1"]),
            &inp,
            &[&done],
            time(10),
        );
        assert_eq!(cond(&st, "Degraded").reason, "RegistryNotAllowed");
        assert!(cond(&st, "Degraded").message.contains("evil.example/x:1"));
        // The refused image waits for nothing: the rollout is not "Pulling".
        let evil = st
            .images
            .iter()
            .find(|i| i.image == "evil.example/x:1")
            .unwrap();
        assert_eq!((evil.waiting, evil.available), (0, 0));
        assert_eq!(st.ready, "0/1");
        assert_eq!(cond(&st, "Ready").reason, "RegistryNotAllowed");
        assert_eq!(cond(&st, "Progressing").reason, "Stalled");
        let nothing_yet =
            compute::<NodeImageSet>(&prefetch(&["evil.example/x:1"]), &inp, &[], time(10));
        assert_eq!(nothing_yet.images[0].waiting, 0);
        assert_eq!(cond(&nothing_yet, "Ready").reason, "RegistryNotAllowed");
        let inp = Inputs {
            desired: 1,
            insufficient: Some((3, 1)),
            not_allowed: &[],
            no_seed: &[],
            silent: &[],
        };
        let st = compute(&prefetch(&["a"]), &inp, &[&done], time(10));
        assert_eq!(cond(&st, "Degraded").reason, "InsufficientNodes");
        assert_eq!(
            cond(&st, "Ready").status,
            "True",
            "all qualifying nodes have it"
        );
    }

    #[test]
    fn transition_time_moves_only_with_status() {
        let mut p = prefetch(&["a"]);
        let done = set("n1", &[("a", PullState::Available, None)]);
        let first = compute(&p, &inputs(1), &[&done], time(10));
        assert_eq!(cond(&first, "Ready").status, "True");
        p.status = Some(first.clone());
        let again = compute(&p, &inputs(1), &[&done], time(20));
        assert_eq!(again, first, "an unchanged status must compare equal");
        let pulling = set("n1", &[("a", PullState::Pulling, None)]);
        let changed = compute(&p, &inputs(1), &[&pulling], time(30));
        assert_eq!(cond(&changed, "Ready").last_transition_time, time(30));
        assert_eq!(cond(&changed, "Degraded").last_transition_time, time(10));
    }
}
