//! The words the controller, the agent and administrators share: why a pull
//! failed, the conditions and their reasons, and the reasons of Events.
//!
//! Each is an enum, so a reason is spelt once, a reader finds every place
//! that writes or reads it, and the reference in `docs/reference.md` (what
//! each one means, generated from the doc comments here by `cargo xtask
//! crdgen`) cannot drift from the code. The CRD schema lists the pull-failure
//! reasons in the field's description (`kubectl explain`).

use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use strum::{EnumIter, EnumMessage, IntoEnumIterator, IntoStaticStr};

/// Why an agent's last attempt at an image failed: `NodeImageStatus.reason`,
/// written by the agent and read by the controller.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    EnumIter,
    EnumMessage,
    IntoStaticStr,
)]
pub enum PullFailure {
    /// The registry has no such repository, tag or digest.
    NotFound,
    /// The registry refused the pull: credentials missing, wrong or without access.
    Unauthorized,
    /// The registry (or, for a Mirror pull, the in-cluster mirror) could not be reached.
    RegistryUnreachable,
    /// The pull failed for a reason the runtime's message gives (`lastError`).
    PullFailed,
    /// The attempt made no progress for its stall limit (`pullStallTimeoutSeconds`,
    /// the agent's `--stall-timeout-seconds`), or, where containerd reports no
    /// progress (containerd 1.6), ran past `--pull-timeout-seconds`.
    PullTimeout,
    /// The agent cannot reach the node's container runtime.
    RuntimeUnavailable,
    /// The node's container runtime cannot keep the promise (a Mirror pull that could reach the registry).
    RuntimeUnsupported,
    /// A pull secret the ImagePrefetch names does not exist in its namespace.
    SecretNotFound,
    /// A pull secret exists but is not a usable registry credential.
    SecretInvalid,
    /// A pull secret could not be read (the API server refused or failed).
    SecretUnreadable,
    /// The node's image filesystem is above the agent's disk threshold; nothing new is pulled.
    DiskPressure,
    /// The node's registry host configuration cannot be read or written.
    HostsUnreadable,
    /// A Mirror pull was asked for, and the node has no in-cluster mirror configured.
    NoMirror,
    /// The agent was stopping; the attempt is made again when it starts.
    Stopping,
    /// A reason this version does not know, written by a newer agent; treated as `PullFailed`.
    #[serde(other)]
    Unrecognized,
}

/// The type of a condition on an ImagePrefetch or a NodeImageSet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, EnumMessage, IntoStaticStr)]
pub enum ConditionType {
    /// Every selected node holds every image (on a NodeImageSet: this node holds every image of the set).
    Ready,
    /// Some pull is under way or about to be.
    Progressing,
    /// Something stops the rollout or a part of it; the reason says what.
    Degraded,
}

/// The reason of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, EnumMessage, IntoStaticStr)]
pub enum ConditionReason {
    /// Every image is on every selected node.
    AllImagesPresent,
    /// Images are being pulled.
    Pulling,
    /// Nothing is left to pull.
    Complete,
    /// No pull is under way, and not every image is there.
    Stalled,
    /// Nothing is wrong.
    AsExpected,
    /// No Ready, schedulable node matches the node selector.
    NoMatchingNodes,
    /// An image's registry is not among the administrator's allowed registries; it is not pulled.
    RegistryNotAllowed,
    /// A node's container runtime cannot keep the promise of a Mirror pull.
    RuntimeUnsupported,
    /// A named pull secret is missing or not a registry credential.
    SecretNotFound,
    /// A node gave up on an image; the message names the nodes and why.
    PullFailed,
    /// The agent on some node has not reported since its images were released to it.
    AgentNotReporting,
    /// No node can fetch an image from its registry now: every candidate seed failed recently.
    NoSeedAvailable,
    /// `replicas` asks for more nodes than qualify; all that qualify are used.
    InsufficientNodes,
    /// The stored spec cannot be read (written by a newer version, or by hand); nothing is changed.
    SpecUnreadable,
    /// The namespace's budget of NodeImageSet entries has no room for this ImagePrefetch.
    BudgetExceeded,
    /// `serviceAccountName` names a ServiceAccount this namespace does not
    /// have; nothing is changed until it exists (its pull secrets are not known).
    ServiceAccountNotFound,
}

/// The reason of an Event the controller publishes on an ImagePrefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, EnumIter, EnumMessage, IntoStaticStr)]
pub enum EventReason {
    /// A node was chosen to fetch an image from its registry for the cluster.
    SeedChosen,
    /// The seed of an image was replaced (it failed, stopped reporting or made no progress).
    Reseeded,
    /// An image is on every selected node.
    ImageReady,
    /// A node gave up on an image (Warning).
    PullFailed,
    /// An agent's report on a NodeImageSet cannot be read; it counts as no report (Warning).
    ReportUnreadable,
    /// An image's registry is not allowed (Warning).
    RegistryNotAllowed,
    /// No Ready, schedulable node matches the node selector (Warning).
    NoMatchingNodes,
    /// `replicas` asks for more nodes than qualify (Warning).
    InsufficientNodes,
    /// No node can fetch an image from its registry now (Warning).
    NoSeedAvailable,
    /// Some node's agent says nothing about images released to it (Warning).
    AgentNotReporting,
    /// The stored spec cannot be read (Warning).
    SpecUnreadable,
    /// The namespace's budget has no room for this ImagePrefetch (Warning).
    BudgetExceeded,
    /// The ServiceAccount `serviceAccountName` names does not exist (Warning).
    ServiceAccountNotFound,
    /// On a Node: every image of the ImagePrefetches that select it is
    /// there; the readiness gate's taint is removed.
    NodeImagesReady,
    /// On a Node: the readiness gate's time limit passed with images still
    /// missing; its taint is removed anyway (Warning).
    NodeGateTimedOut,
    /// A reconcile failed: the note names the operation and the object (a
    /// NodeImageSet is the related object); it is retried with backoff (Warning).
    ReconcileFailed,
    /// Ready for `ttlSecondsAfterReady`: the ImagePrefetch is deleted, its
    /// nodes' pins released; the images stay until kubelet's garbage
    /// collection needs the room.
    Expired,
    /// A refresh found a tag pointing to a new digest at the registry: it is
    /// rolled out from the in-cluster mirror, each node keeping the old
    /// image until it has the new one.
    TagMoved,
}

/// What a reason is written as.
pub trait Word: Copy + Into<&'static str> + EnumMessage + IntoEnumIterator {
    fn as_str(self) -> &'static str {
        self.into()
    }
    /// What it means, from its doc comment.
    fn meaning(self) -> &'static str {
        self.get_documentation().unwrap_or_default()
    }
    /// The value written as `s`, if any.
    fn parse(s: &str) -> Option<Self> {
        Self::iter().find(|w| w.as_str() == s)
    }
}

impl Word for PullFailure {}
impl Word for ConditionType {}
impl Word for ConditionReason {}
impl Word for EventReason {}

macro_rules! display_as_written {
    ($($t:ty),*) => {$(
        impl $t {
            /// How it is written (the variant's name).
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_written!(PullFailure, ConditionType, ConditionReason, EventReason);

impl PullFailure {
    /// The condition reason an ImagePrefetch's Degraded condition gives for
    /// nodes failing with this: the runtime and secret problems by name
    /// (they need an administrator), everything else as `PullFailed`.
    pub fn degraded_reason(self) -> ConditionReason {
        match self {
            PullFailure::RuntimeUnsupported => ConditionReason::RuntimeUnsupported,
            PullFailure::SecretNotFound | PullFailure::SecretInvalid => {
                ConditionReason::SecretNotFound
            }
            _ => ConditionReason::PullFailed,
        }
    }
}

impl ConditionReason {
    /// The Warning Event announcing this Degraded reason when the
    /// controller itself decided it (a node's failed pull has its own
    /// `PullFailed` Event, per node and image).
    pub fn announced_as(self) -> Option<EventReason> {
        Some(match self {
            ConditionReason::RegistryNotAllowed => EventReason::RegistryNotAllowed,
            ConditionReason::NoMatchingNodes => EventReason::NoMatchingNodes,
            ConditionReason::InsufficientNodes => EventReason::InsufficientNodes,
            ConditionReason::NoSeedAvailable => EventReason::NoSeedAvailable,
            ConditionReason::AgentNotReporting => EventReason::AgentNotReporting,
            ConditionReason::SpecUnreadable => EventReason::SpecUnreadable,
            ConditionReason::BudgetExceeded => EventReason::BudgetExceeded,
            ConditionReason::ServiceAccountNotFound => EventReason::ServiceAccountNotFound,
            _ => return None,
        })
    }
}

/// The schema of `NodeImageStatus.reason`: a string whose description lists
/// the values. Not an `enum` in the schema: a newer agent's new reason must
/// not make its whole status write fail on an older CRD (it reads back as
/// `Unrecognized`).
pub fn pull_failure_schema(_: &mut SchemaGenerator) -> Schema {
    let values: Vec<&str> = PullFailure::iter()
        .filter(|f| *f != PullFailure::Unrecognized)
        .map(Word::as_str)
        .collect();
    json_schema!({
        "type": "string",
        "maxLength": crate::node_image_set::MAX_REASON_LEN,
        "description": format!(
            "Machine-readable cause of the last failure, one of: {}.",
            values.join(", ")
        ),
    })
}

/// The reference table of every word, in Markdown (`docs/reference.md`).
pub fn reference() -> String {
    fn table<W: Word>(out: &mut String, title: &str, intro: &str) {
        out.push_str(&format!(
            "\n## {title}\n\n{intro}\n\n| value | meaning |\n| --- | --- |\n"
        ));
        for w in W::iter() {
            out.push_str(&format!("| `{}` | {} |\n", w.as_str(), w.meaning()));
        }
    }
    let mut out = String::from(
        "# Reference: reasons, conditions and Events\n\n\
         Generated from `crd/src/vocabulary.rs` by `cargo xtask crdgen`; a test fails when it is stale.\n",
    );
    table::<PullFailure>(
        &mut out,
        "Why a pull failed",
        "`NodeImageSet.status.images[].reason`, written by the agent.",
    );
    table::<ConditionType>(
        &mut out,
        "Condition types",
        "`status.conditions[].type` of ImagePrefetch (`Ready`, `Progressing`, `Degraded`) and NodeImageSet (`Ready`).",
    );
    table::<ConditionReason>(
        &mut out,
        "Condition reasons",
        "`status.conditions[].reason`.",
    );
    table::<EventReason>(
        &mut out,
        "Event reasons",
        "Events on an ImagePrefetch (`kubectl describe imageprefetch`, `kubectl get events`).",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_reads_back_and_has_a_meaning() {
        fn check<W: Word + PartialEq + std::fmt::Debug>() {
            for w in W::iter() {
                assert_eq!(W::parse(w.as_str()), Some(w));
                assert!(!w.meaning().is_empty(), "{w:?} has no doc comment");
            }
        }
        check::<PullFailure>();
        check::<ConditionType>();
        check::<ConditionReason>();
        check::<EventReason>();
    }

    #[test]
    fn a_newer_agents_reason_reads_as_unrecognized() {
        let r: PullFailure = serde_json::from_str("\"SomethingNew\"").unwrap();
        assert_eq!(r, PullFailure::Unrecognized);
        assert_eq!(
            serde_json::to_string(&PullFailure::SecretNotFound).unwrap(),
            "\"SecretNotFound\""
        );
    }

    #[test]
    fn decided_degraded_reasons_are_announced() {
        assert_eq!(
            ConditionReason::NoSeedAvailable.announced_as(),
            Some(EventReason::NoSeedAvailable)
        );
        assert_eq!(ConditionReason::PullFailed.announced_as(), None);
        assert_eq!(
            PullFailure::SecretInvalid.degraded_reason(),
            ConditionReason::SecretNotFound
        );
    }
}
