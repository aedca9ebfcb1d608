//! The image-prefetch API: `ImagePrefetch` (namespaced, written by tenants) and
//! `NodeImageSet` (cluster-scoped, written by the controller, read by the agent),
//! plus the label keys and naming rules that tie them together.

pub mod backoff;
pub mod condition;
pub mod generate;
pub mod keys;
pub mod lenient;
pub mod names;
pub mod node_image_set;
pub mod platform;
pub mod prefetch;
pub mod reference;
pub mod shared_str;
pub mod vocabulary;

pub use node_image_set::{
    NodeImage, NodeImageSet, NodeImageSetSpec, NodeImageSetStatus, NodeImageStatus, PeerSource,
    PullSource, PullState, RegistryPolicy, SecretReference,
};
pub use prefetch::{
    ImagePrefetch, ImagePrefetchSpec, ImagePrefetchStatus, ImageProgress, LocalSecretReference,
    NodeSelectorExpression, SelectorOperator, TaintEffect, Toleration, TolerationOperator,
};
pub use shared_str::SharedStr;
pub use vocabulary::{ConditionReason, ConditionType, EventReason, PullFailure, Word};

/// API group of both custom resources.
pub const GROUP: &str = "imageprefetch.io";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";

/// The kubectl category of both resources: `kubectl get image-prefetch -A`
/// lists everything the operator keeps. The product's name, because kubectl
/// expands a category before it looks for a resource of that name: a category
/// spelt like a resource (`imageprefetch`) makes `kubectl get imageprefetch X`
/// ambiguous and `kubectl delete imageprefetch --all` delete NodeImageSets too.
pub const CATEGORY: &str = "image-prefetch";
