//! Every label, annotation and finalizer key and every field manager the
//! operator writes, in one place.

use crate::names::label_value;

/// Finalizer on ImagePrefetch: NodeImageSets are cluster-scoped and cannot be
/// garbage-collected through an owner reference to a namespaced object.
pub const FINALIZER: &str = "imageprefetch.io/cleanup";

/// Server-side apply field manager of the controller.
pub const CONTROLLER_MANAGER: &str = "image-prefetch-controller";
/// Field manager of the agent DaemonSet the controller keeps (its own, so
/// an administrator's `kubectl apply` of other fields is not taken over).
pub const AGENT_DAEMONSET_MANAGER: &str = "image-prefetch-controller/agent";
/// Server-side apply field manager of the agent (the NodeImageSet status).
pub const AGENT_MANAGER: &str = "image-prefetch-agent";
/// Label on objects the controller creates for tenants (pull-secret grants).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// containerd label the agent puts on images it pinned, so it unpins only its own.
pub const PINNED_BY_AGENT: (&str, &str) = ("imageprefetch.io/pinned", "true");

/// Uid of the owning ImagePrefetch: the key the controller selects by (always <= 63 chars).
pub const PREFETCH_UID: &str = "imageprefetch.io/prefetch-uid";
/// Namespace of the owning ImagePrefetch (namespaces are <= 63 chars).
pub const PREFETCH_NAMESPACE: &str = "imageprefetch.io/prefetch-namespace";
/// Name of the owning ImagePrefetch, shortened with a hash when longer than a label value may be.
pub const PREFETCH_NAME: &str = "imageprefetch.io/prefetch-name";
/// Node the NodeImageSet is for, shortened with a hash when needed; agents select by it.
pub const NODE: &str = "imageprefetch.io/node";

/// Annotations carry the unshortened owner name, for people and tools.
pub const PREFETCH_REF_ANNOTATION: &str = "imageprefetch.io/prefetch";

/// On an ImagePrefetch: a new value asks for a refresh round at once (the
/// registry asked again for every tag), as `refreshIntervalSeconds` does on
/// its schedule.
pub const REFRESH_ANNOTATION: &str = "imageprefetch.io/refresh";

/// Annotation on a NodeImageSet: the W3C `traceparent` of the controller span
/// that last wrote it, so the agent's pulls join the same trace. Absent when
/// the controller exports no traces.
pub const TRACEPARENT_ANNOTATION: &str = "imageprefetch.io/traceparent";

/// Labels that link a NodeImageSet to its ImagePrefetch and node.
pub fn node_image_set_labels(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
) -> std::collections::BTreeMap<String, String> {
    [
        (PREFETCH_UID, label_value(uid)),
        (PREFETCH_NAMESPACE, label_value(namespace)),
        (PREFETCH_NAME, label_value(name)),
        (NODE, label_value(node)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Label selector for every NodeImageSet of one ImagePrefetch.
pub fn owned_by(uid: &str) -> String {
    format!("{PREFETCH_UID}={}", label_value(uid))
}

/// Label selector for every NodeImageSet of one node.
pub fn on_node(node: &str) -> String {
    format!("{NODE}={}", label_value(node))
}
