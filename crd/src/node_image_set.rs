//! NodeImageSet: what one node must pull, and from where. Written by the
//! controller, executed and reported on by that node's agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::lenient::Unreadable;
use crate::prefetch::{MAX_IMAGES, MAX_PULL_SECRETS};
use crate::reference;
use crate::shared_str::SharedStr;
use crate::vocabulary::PullFailure;

/// Default for `imageDownloadRetryLimit`.
pub const DEFAULT_RETRY_LIMIT: i32 = 3;
/// Most `imageDownloadRetryLimit` may be.
pub const MAX_RETRY_LIMIT: i32 = 100;
/// Longest digest: `sha512:` and 128 hex digits, with room for algorithms to come.
pub const MAX_DIGEST_LEN: usize = 255;
/// Longest `lastError` an agent writes (longer messages are cut).
pub const MAX_ERROR_LEN: usize = 2048;
/// Longest `reason`.
pub const MAX_REASON_LEN: usize = 64;
/// Most bytes an image may be said to have: 1 PiB, more than any image.
pub const MAX_BYTES: i64 = 1 << 50;
/// Longest pull a report may state: 30 days, in milliseconds.
pub const MAX_PULL_MILLIS: i64 = 30 * 24 * 3600 * 1000;

/// The images one node must hold for one ImagePrefetch.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "imageprefetch.io",
    version = "v1alpha1",
    kind = "NodeImageSet",
    plural = "nodeimagesets",
    singular = "nodeimageset",
    shortname = "nis",
    category = "image-prefetch",
    status = "NodeImageSetStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Prefetch","type":"string","jsonPath":".metadata.annotations.imageprefetch\\.io/prefetch","description":"The ImagePrefetch (namespace/name) this set belongs to"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Images","type":"integer","jsonPath":".status.total"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
// `remote = "Self"`: decoded through `crate::lenient`.
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeImageSetSpec {
    /// The node whose containerd gets the images.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Images for this node, each with the registry policy to pull it with.
    /// Empty while every image waits for its seed (server-side apply stores an
    /// empty list as absent, so the field is optional).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(length(max = MAX_IMAGES))]
    pub image_set: Vec<NodeImage>,
    /// Secrets to pull with (in the ImagePrefetch's namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PULL_SECRETS))]
    pub image_pull_secrets: Vec<SecretReference>,
    /// Attempts after the first before the agent reports an image Failed.
    #[serde(default = "default_retry_limit")]
    #[schemars(range(min = 0, max = MAX_RETRY_LIMIT))]
    pub image_download_retry_limit: i32,
    /// An attempt that fetched nothing new for this long is ended (the
    /// ImagePrefetch's `pullStallTimeoutSeconds`); unset: the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = crate::prefetch::MAX_STALL_SECONDS))]
    pub pull_stall_timeout_seconds: Option<i64>,
    /// false: the images are not pinned against kubelet's garbage
    /// collection, and one it removed is not pulled again (the
    /// ImagePrefetch's `pin`); unset: pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<bool>,
    /// Set when the stored spec could not be decoded (never serialised).
    /// Boxed: rare, and every cached spec would carry its size.
    #[serde(skip)]
    #[schemars(skip)]
    pub unreadable: Option<Box<Unreadable>>,
}

crate::decode_leniently!(NodeImageSetSpec, "spec", |why| {
    NodeImageSetSpec {
        node_name: String::new(),
        image_set: Vec::new(),
        image_pull_secrets: Vec::new(),
        image_download_retry_limit: DEFAULT_RETRY_LIMIT,
        pull_stall_timeout_seconds: None,
        pin: None,
        unreadable: Some(Box::new(why)),
    }
});

fn default_retry_limit() -> i32 {
    DEFAULT_RETRY_LIMIT
}

impl NodeImageSetSpec {
    /// The spec of `node`'s set listing `entries`, with no pull secrets and
    /// the default retry limit.
    pub fn for_node(node: &str, entries: Vec<NodeImage>) -> Self {
        NodeImageSetSpec {
            node_name: node.to_string(),
            image_set: entries,
            image_pull_secrets: Vec::new(),
            image_download_retry_limit: DEFAULT_RETRY_LIMIT,
            pull_stall_timeout_seconds: None,
            pin: None,
            unreadable: None,
        }
    }
}

impl NodeImage {
    /// An entry for `image` with `policy`: no digest pinned, no source named.
    pub fn of(image: impl Into<SharedStr>, policy: RegistryPolicy) -> Self {
        NodeImage {
            refresh: None,
            name: image.into(),
            registry_policy: policy,
            digest: None,
            source: None,
        }
    }
}

/// One image on one node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeImage {
    /// The image reference as the ImagePrefetch lists it.
    #[schemars(length(min = 1, max = reference::MAX_LEN))]
    pub name: SharedStr,
    pub registry_policy: RegistryPolicy,
    /// Digest to pull instead of the tag, pinned by the controller once one
    /// node resolved it, so that a tag that moves cannot split the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_DIGEST_LEN))]
    pub digest: Option<SharedStr>,
    /// For a Mirror pull, a node that holds the image, named by the
    /// controller: the agent asks that node's mirror first, so the pull
    /// needs no lookup (nor waits for the holder to be advertised) and each
    /// holder serves only the pulls the controller gave it. Should that node
    /// not answer, the pull goes on through the node's own mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PeerSource>,
    /// The refresh round a seed's entry belongs to (when it began): when it
    /// changes, the agent asks the registry for the tag again, and its
    /// report says which round it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub refresh: Option<String>,
}

impl NodeImage {
    /// Whether `report` is about what this entry asks for now: an image at
    /// the entry's pinned digest, when it pins one. A report of another
    /// digest (the entry was pinned anew, a tag that moved) says nothing yet
    /// about this one.
    pub fn answered_by(&self, report: &NodeImageStatus) -> bool {
        report.name == self.name
            && (self.digest.is_none()
                || report.state != PullState::Available
                || report.digest == self.digest)
    }
}

/// A node to fetch an image from, and its address.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerSource {
    #[schemars(length(min = 1, max = 253))]
    pub node: SharedStr,
    /// The node's InternalIP: its mirror listens there, at the port of the
    /// mirror the node's own registry configuration names.
    #[schemars(length(min = 2, max = 45), regex(pattern = r"^[0-9A-Fa-f:.]+$"))]
    pub address: SharedStr,
}

/// Where a node may fetch an image from.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RegistryPolicy {
    /// The node's normal registry configuration: the in-cluster mirror first,
    /// the external registry as fallback.
    Default,
    /// The in-cluster mirror only; the external registry is never contacted.
    Mirror,
}

/// A secret by namespace and name.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct SecretReference {
    #[schemars(length(min = 1, max = 63), regex(pattern = crate::names::DNS_LABEL))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::DNS_SUBDOMAIN))]
    pub name: String,
}

/// What the agent reports for its node.
// `remote = "Self"`: decoded through `crate::lenient` — a node writes this,
// and what one node writes must not stop the controller reading the others.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(remote = "Self", rename_all = "camelCase")]
pub struct NodeImageSetStatus {
    /// Images present on the node.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_IMAGES))]
    pub available: i32,
    /// Images in the spec.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_IMAGES))]
    pub total: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(length(max = MAX_IMAGES))]
    pub images: Vec<NodeImageStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::condition::schema")]
    pub conditions: Vec<Condition>,
    /// Set when the stored status could not be decoded (never serialised).
    #[serde(skip)]
    #[schemars(skip)]
    pub unreadable: Option<Unreadable>,
}

crate::decode_leniently!(NodeImageSetStatus, "status", |why| {
    NodeImageSetStatus {
        unreadable: Some(why),
        ..Default::default()
    }
});

/// The state of one image on the node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageStatus {
    #[schemars(length(min = 1, max = reference::MAX_LEN))]
    pub name: SharedStr,
    pub state: PullState,
    /// Pull attempts made so far.
    #[serde(default)]
    #[schemars(range(min = 0, max = i32::MAX))]
    pub attempts: i32,
    /// Why the last attempt failed; never contains credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_ERROR_LEN))]
    pub last_error: Option<String>,
    // Machine-readable cause of the last failure: the schema's description
    // (what `kubectl explain` shows) lists the values, from the enum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::vocabulary::pull_failure_schema")]
    pub reason: Option<PullFailure>,
    /// Digest the image resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_DIGEST_LEN))]
    pub digest: Option<SharedStr>,
    /// Bytes the image occupies (compressed content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_BYTES))]
    pub size_bytes: Option<i64>,
    /// Bytes fetched so far by a seed's pull under way (from containerd's
    /// Transfer progress), written at most every progress interval: the
    /// controller replaces a seed only when this stops growing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_BYTES))]
    pub progress_bytes: Option<i64>,
    /// How long the successful pull took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_PULL_MILLIS))]
    pub pull_duration_millis: Option<i64>,
    /// Which hosts the pull could use: `Mirror`, the in-cluster mirror only;
    /// `Upstream`, the node's registry configuration — the mirror first,
    /// then the registry — so some or all of its bytes may have come from
    /// peers (the agent cannot tell; the registry's own logs can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PullSource>,
    /// The refresh round (the entry's `refresh`) this report answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub refresh: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PullState {
    Waiting,
    Pulling,
    Available,
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PullSource {
    Upstream,
    Mirror,
}

/// `message` cut to at most `MAX_ERROR_LEN` bytes (on a character boundary),
/// so a runtime's long message never makes a status write fail.
pub fn error_message(message: &str) -> String {
    crate::names::shortened(message, MAX_ERROR_LEN)
}

impl NodeImageStatus {
    /// A report of `state` after `attempts`, with nothing else known yet.
    pub fn new(name: impl Into<SharedStr>, state: PullState, attempts: i32) -> Self {
        NodeImageStatus {
            refresh: None,
            name: name.into(),
            state,
            attempts,
            last_error: None,
            reason: None,
            digest: None,
            size_bytes: None,
            progress_bytes: None,
            pull_duration_millis: None,
            source: None,
        }
    }
}

impl NodeImageSet {
    /// What the agent has reported, per image.
    pub fn reported(&self) -> &[NodeImageStatus] {
        self.status
            .as_ref()
            .map(|s| s.images.as_slice())
            .unwrap_or(&[])
    }

    /// The agent's report on `image` (as listed in the spec), when it is
    /// about what the entry asks for now: see [`report_on`].
    pub fn report_on(&self, image: &str) -> Option<&NodeImageStatus> {
        report_on(&self.spec.image_set, self.reported(), image)
    }
}

/// The report on `image` among `reports`, when it answers the entry of
/// `entries` listing it ([`NodeImage::answered_by`]): a node that reports
/// another digest than its entry was pinned to anew has not got this one yet.
pub fn report_on<'a>(
    entries: &[NodeImage],
    reports: &'a [NodeImageStatus],
    image: &str,
) -> Option<&'a NodeImageStatus> {
    let report = reports.iter().find(|r| r.name == image)?;
    match entries.iter().find(|e| e.name == image) {
        Some(entry) if !entry.answered_by(report) => None,
        _ => Some(report),
    }
}
