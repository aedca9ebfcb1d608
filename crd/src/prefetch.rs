//! ImagePrefetch: what a tenant asks for.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::lenient::Unreadable;
use crate::reference;

/// Most images one ImagePrefetch may list; bounds the CEL cost and the NodeImageSet size.
pub const MAX_IMAGES: usize = 64;
/// Most pull secrets one ImagePrefetch may name.
pub const MAX_PULL_SECRETS: usize = 16;
/// Most labels a `nodeSelector` may name.
pub const MAX_SELECTOR_LABELS: usize = 32;
/// Most nodes `replicas` may ask for: beyond any cluster Kubernetes supports.
pub const MAX_REPLICAS: i32 = 100_000;
/// Most `nodeSelectorExpressions`, and most values one of them may list.
pub const MAX_EXPRESSIONS: usize = 16;
/// Most `nodeNames`.
pub const MAX_NODE_NAMES: usize = 1_000;
/// Most `tolerations` (a pod's limit is far higher; a node rarely has more
/// than a handful of taints).
pub const MAX_TOLERATIONS: usize = 32;
/// Longest `ttlSecondsAfterReady`: a year.
pub const MAX_TTL_SECONDS: i64 = 366 * 24 * 3600;
/// Longest `pullStallTimeoutSeconds`: a day.
pub const MAX_STALL_SECONDS: i64 = 24 * 3600;
/// The shortest `refreshIntervalSeconds`: each round is one manifest
/// request per image by its seeds, but a round that runs into the next
/// holds the rollout back.
pub const MIN_REFRESH_SECONDS: i64 = 10;

/// Pre-download `images` onto the nodes a workload could run on — those that
/// match `nodeSelector` and `nodeSelectorExpressions`, are among `nodeNames`
/// when given, and have no taint the `tolerations` leave out — (all of them,
/// or `replicas` of them), pulling each image from its registry once per cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "imageprefetch.io",
    version = "v1alpha1",
    kind = "ImagePrefetch",
    plural = "imageprefetches",
    singular = "imageprefetch",
    shortname = "ipf",
    category = "image-prefetch",
    namespaced,
    status = "ImagePrefetchStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready","description":"Nodes with every image / nodes selected"}"#,
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Images","type":"integer","jsonPath":".status.imageCount","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
// `remote = "Self"`: decoded through `crate::lenient` (an unreadable spec is
// the one ImagePrefetch's problem, not every tenant's).
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ImagePrefetchSpec {
    /// Images to pre-download, e.g. `registry.example.com/team/app:1.0`. Each at most once.
    #[schemars(schema_with = "images_schema")]
    pub images: Vec<String>,

    /// Only nodes with all of these labels get the images. Empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "node_selector_schema")]
    pub node_selector: BTreeMap<String, String>,

    /// More label requirements a node must meet, as a LabelSelector's
    /// `matchExpressions` (all of them, and `nodeSelector` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_EXPRESSIONS))]
    pub node_selector_expressions: Vec<NodeSelectorExpression>,

    /// Only these nodes, by name (and only those that also match). Empty: any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "node_names_schema")]
    pub node_names: Vec<String>,

    /// The taints the workload tolerates, as in a pod's spec: a node with a
    /// `NoSchedule` or `NoExecute` taint none of these tolerates is not
    /// selected, because the scheduler would not place the workload there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_TOLERATIONS))]
    pub tolerations: Vec<Toleration>,

    /// How many of the matching nodes get the images. Unset: every matching node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_REPLICAS))]
    pub replicas: Option<i32>,

    /// End a pull attempt that fetched nothing new for this long (it is
    /// tried again with backoff); a pull that keeps moving is never cut,
    /// however big the image or slow the link. Unset: the agent's default
    /// (`--stall-timeout-seconds`, 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_STALL_SECONDS))]
    pub pull_stall_timeout_seconds: Option<i64>,

    /// Delete this ImagePrefetch this long after it became Ready (every
    /// image on every selected node), as a Job's `ttlSecondsAfterFinished`:
    /// its nodes' pins are released, and the images stay until kubelet's
    /// garbage collection needs the room. Unset: kept until deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_TTL_SECONDS))]
    pub ttl_seconds_after_ready: Option<i64>,

    /// Ask the registry again this often what each image's tag points to
    /// (images named by digest never change). A tag that moved is rolled
    /// out as a new image — one node fetches it from the registry, the
    /// others from the in-cluster mirror — and each node keeps the old
    /// content until the new one is there. The annotation
    /// `imageprefetch.io/refresh` (any new value) asks for a round at once.
    /// Unset: a tag is resolved when its rollout starts, and again only on
    /// request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = MIN_REFRESH_SECONDS, max = MAX_TTL_SECONDS))]
    pub refresh_interval_seconds: Option<i64>,

    /// Whether the images are pinned against kubelet's image garbage
    /// collection while this ImagePrefetch wants them (default true).
    /// false: prefetched all the same, and kubelet may remove them when it
    /// needs the room; one it removed is not pulled again (it reads
    /// `Waiting`) until the ImagePrefetch changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<bool>,

    /// A ServiceAccount of this namespace whose `imagePullSecrets` are used
    /// to pull too, as if they were listed in `imagePullSecrets` (the same
    /// grants to the agent, the same isolation): the credentials a
    /// workload's pods already pull with, with no secret named twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::DNS_SUBDOMAIN))]
    pub service_account_name: Option<String>,

    /// Secrets of type kubernetes.io/dockerconfigjson in this namespace, used to pull.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PULL_SECRETS))]
    pub image_pull_secrets: Vec<LocalSecretReference>,

    /// Set when the stored spec could not be decoded (never serialised).
    #[serde(skip)]
    #[schemars(skip)]
    pub unreadable: Option<Unreadable>,
}

impl ImagePrefetchSpec {
    /// A spec of `images` onto every node, everything else as defaulted.
    pub fn of_images<S: AsRef<str>>(images: &[S]) -> Self {
        ImagePrefetchSpec {
            images: images.iter().map(|i| i.as_ref().to_string()).collect(),
            ..Default::default()
        }
    }
}

crate::decode_leniently!(ImagePrefetchSpec, "spec", |why| {
    ImagePrefetchSpec {
        images: Vec::new(),
        node_selector: BTreeMap::new(),
        node_selector_expressions: Vec::new(),
        node_names: Vec::new(),
        tolerations: Vec::new(),
        replicas: None,
        ttl_seconds_after_ready: None,
        refresh_interval_seconds: None,
        pull_stall_timeout_seconds: None,
        service_account_name: None,
        pin: None,
        image_pull_secrets: Vec::new(),
        unreadable: Some(why),
    }
});

/// One label requirement (a LabelSelector's `matchExpressions` item).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.operator in ['In', 'NotIn'] ? size(self.values) > 0 : size(self.values) == 0",
     "message": "In and NotIn need values; Exists and DoesNotExist take none"}
]))]
pub struct NodeSelectorExpression {
    /// The label key.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn`; none for `Exists` and `DoesNotExist`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_EXPRESSIONS), inner(length(max = 63)))]
    pub values: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// A toleration, as in a pod's spec.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
     "message": "a toleration with operator Exists takes no value"},
    {"rule": "has(self.key) && self.key != '' || has(self.operator) && self.operator == 'Exists'",
     "message": "a toleration without a key must have operator Exists (it tolerates every taint)"}
]))]
pub struct Toleration {
    /// The taint key; empty with `Exists`: every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub key: Option<String>,
    /// `Equal` (the default) or `Exists`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<TolerationOperator>,
    /// The taint value to tolerate, with `Equal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub value: Option<String>,
    /// The taint effect to tolerate; empty: every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<TaintEffect>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TolerationOperator {
    Equal,
    Exists,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

/// Node names: DNS subdomains.
fn node_names_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": MAX_NODE_NAMES,
        "x-kubernetes-list-type": "set",
        "items": {"type": "string", "minLength": 1, "maxLength": 253},
    })
}

/// A secret in the ImagePrefetch's own namespace.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct LocalSecretReference {
    /// A Secret's name: a DNS subdomain (lower case, digits, `-` and `.`).
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::DNS_SUBDOMAIN))]
    pub name: String,
}

/// Labels: a key is at most 253 (prefix) + 1 + 63 (name) characters, a value
/// at most 63.
fn node_selector_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_SELECTOR_LABELS,
        "additionalProperties": {"type": "string", "maxLength": 63},
        "x-kubernetes-validations": [{
            "rule": "self.all(k, size(k) <= 317)",
            "message": "a label key is at most 317 characters (a 253-character prefix, '/', a 63-character name)",
        }],
    })
}

fn images_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_IMAGES,
        // "set": the API server itself rejects a duplicate with "Duplicate value".
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": reference::MAX_LEN,
            "x-kubernetes-validations": [{
                "rule": format!("self.matches('{}')", reference::pattern().replace('\\', "\\\\")),
                "message": reference::INVALID_MESSAGE,
            }],
        },
    })
}

/// Progress of an ImagePrefetch, written by the controller.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(remote = "Self", rename_all = "camelCase")]
pub struct ImagePrefetchStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = crate::lenient::MAX_SCHEMA_INT64))]
    pub observed_generation: Option<i64>,
    /// Nodes selected to hold the images.
    #[serde(default)]
    #[schemars(range(min = 0, max = i32::MAX))]
    pub desired_nodes: i32,
    /// Selected nodes that hold every image.
    #[serde(default)]
    #[schemars(range(min = 0, max = i32::MAX))]
    pub ready_nodes: i32,
    /// `readyNodes/desiredNodes`, for `kubectl get`.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub ready: String,
    /// Number of images in the spec, for `kubectl get -o wide`.
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_IMAGES))]
    pub image_count: i32,
    /// Per-image node counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_IMAGES))]
    pub images: Vec<ImageProgress>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::condition::schema")]
    pub conditions: Vec<Condition>,
    /// When the last round of asking the registry for the tags began
    /// (`refreshIntervalSeconds`, or the refresh annotation); the seeds'
    /// entries carry it, so each knows to ask again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub last_refresh_time: Option<String>,
    /// The value of the `imageprefetch.io/refresh` annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub refresh_request: Option<String>,
    /// Set when the stored status could not be decoded (never serialised).
    #[serde(skip)]
    #[schemars(skip)]
    pub unreadable: Option<Unreadable>,
}

crate::decode_leniently!(ImagePrefetchStatus, "status", |why| {
    ImagePrefetchStatus {
        unreadable: Some(why),
        ..Default::default()
    }
});

/// How far one image has got across the selected nodes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageProgress {
    #[schemars(length(max = reference::MAX_LEN))]
    pub image: String,
    /// Nodes where the image is present.
    #[schemars(range(min = 0, max = i32::MAX))]
    pub available: i32,
    /// Nodes pulling it now.
    #[schemars(range(min = 0, max = i32::MAX))]
    pub pulling: i32,
    /// Nodes that gave up after the retry limit.
    #[schemars(range(min = 0, max = i32::MAX))]
    pub failed: i32,
    /// Nodes that have not started (waiting for the mirror to have it).
    #[schemars(range(min = 0, max = i32::MAX))]
    pub waiting: i32,
}
