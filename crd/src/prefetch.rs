//! ImagePrefetch: what a tenant asks for.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::reference;

/// Most images one ImagePrefetch may list; bounds the CEL cost and the NodeImageSet size.
pub const MAX_IMAGES: usize = 64;

/// Pre-download `images` onto the nodes that match `nodeSelector` (all of them,
/// or `replicas` of them), pulling each image from its registry once per cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
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
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImagePrefetchSpec {
    /// Images to pre-download, e.g. `registry.example.com/team/app:1.0`. Each at most once.
    #[schemars(schema_with = "images_schema")]
    pub images: Vec<String>,

    /// Only nodes with all of these labels get the images. Empty: every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// How many of the matching nodes get the images. Unset: every matching node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub replicas: Option<i32>,

    /// Secrets of type kubernetes.io/dockerconfigjson in this namespace, used to pull.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalSecretReference>,
}

/// A secret in the ImagePrefetch's own namespace.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct LocalSecretReference {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
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
#[serde(rename_all = "camelCase")]
pub struct ImagePrefetchStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes selected to hold the images.
    #[serde(default)]
    pub desired_nodes: i32,
    /// Selected nodes that hold every image.
    #[serde(default)]
    pub ready_nodes: i32,
    /// `readyNodes/desiredNodes`, for `kubectl get`.
    #[serde(default)]
    pub ready: String,
    /// Number of images in the spec, for `kubectl get -o wide`.
    #[serde(default)]
    pub image_count: i32,
    /// Per-image node counts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageProgress>,
    /// Ready, Progressing and Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// How far one image has got across the selected nodes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageProgress {
    pub image: String,
    /// Nodes where the image is present.
    pub available: i32,
    /// Nodes pulling it now.
    pub pulling: i32,
    /// Nodes that gave up after the retry limit.
    pub failed: i32,
    /// Nodes that have not started (waiting for the mirror to have it).
    pub waiting: i32,
}
