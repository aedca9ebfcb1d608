//! Which watch events are worth a reconcile.

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, NodeStatus};

use kube::runtime::watcher;
use std::hash::{Hash, Hasher};

use crd::ImagePrefetch;

/// Keeps of a Node only what selection reads (labels, deletion, spec,
/// the Ready condition) and its InternalIP (a named source's address). A
/// node's status carries up to 50 image entries and its managed fields;
/// thousands of nodes of that would dominate the cache.
pub fn slim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(status) = node.status.as_mut() {
        let ready = status
            .conditions
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.type_ == "Ready")
            .collect();
        let internal = status
            .addresses
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .take(1)
            .collect();
        *status = NodeStatus {
            conditions: Some(ready),
            addresses: Some(internal),
            ..Default::default()
        };
    }
}

/// What about a node can change the selection: labels, schedulability,
/// taints, deletion and readiness. Heartbeats and image lists change nothing here.
fn fingerprint(node: &Node) -> u64 {
    let mut parts: Vec<String> = Vec::new();
    if let Some(labels) = &node.metadata.labels {
        parts.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
    }
    parts.push(format!(
        "deleting={}",
        node.metadata.deletion_timestamp.is_some()
    ));
    let spec = node.spec.as_ref();
    parts.push(format!(
        "unschedulable={}",
        spec.and_then(|s| s.unschedulable).unwrap_or(false)
    ));
    // Taints decide whether an ImagePrefetch's tolerations admit the node.
    for t in spec.and_then(|s| s.taints.as_ref()).into_iter().flatten() {
        parts.push(format!(
            "taint={}={}:{}",
            t.key,
            t.value.as_deref().unwrap_or_default(),
            t.effect
        ));
    }
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
        .unwrap_or_default();
    parts.push(format!("ready={ready}"));
    parts.push(format!(
        "address={}",
        crate::select::internal_ip(node).unwrap_or_default()
    ));
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    crd::names::stable_hash(&refs)
}

/// What about an ImagePrefetch asks for its reconcile: its spec (the
/// generation), its deletion, its finalizers, labels and annotations — not
/// its status, which is the controller's own write (each status written
/// would otherwise reconcile the ImagePrefetch once more for nothing).
fn prefetch_fingerprint(p: &ImagePrefetch) -> u64 {
    let m = &p.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.generation.hash(&mut h);
    m.deletion_timestamp.as_ref().map(|t| t.0).hash(&mut h);
    m.finalizers.hash(&mut h);
    m.labels.hash(&mut h);
    m.annotations.hash(&mut h);
    h.finish()
}

/// ImagePrefetch events worth a reconcile: every object of a (re)list —
/// what changed while the watch was away, a status write lost with it
/// included, is unknown — and updates that change [`prefetch_fingerprint`].
pub(crate) fn prefetch_changes(
    events: impl Stream<Item = Result<watcher::Event<ImagePrefetch>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<ImagePrefetch, watcher::Error>> + Send + 'static {
    let mut seen: HashMap<String, u64> = HashMap::new();
    events.filter_map(move |event| {
        let key = |p: &ImagePrefetch| p.metadata.uid.clone().unwrap_or_default();
        let news = match event {
            Ok(watcher::Event::InitApply(p)) => {
                seen.insert(key(&p), prefetch_fingerprint(&p));
                Some(Ok(p))
            }
            Ok(watcher::Event::Apply(p)) => {
                let fp = prefetch_fingerprint(&p);
                (seen.insert(key(&p), fp) != Some(fp)).then_some(Ok(p))
            }
            Ok(watcher::Event::Delete(p)) => {
                seen.remove(&key(&p));
                None
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        futures::future::ready(news)
    })
}

/// Node events that matter: deletions, and changes of [`fingerprint`].
pub(crate) fn node_changes(
    events: impl Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<Node, watcher::Error>> + Send + 'static {
    let mut seen: HashMap<String, u64> = HashMap::new();
    events
        .map(move |event| {
            let changed: Vec<Node> = match event {
                Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                    let name = node.metadata.name.clone().unwrap_or_default();
                    let fp = fingerprint(&node);
                    (seen.insert(name, fp) != Some(fp))
                        .then_some(node)
                        .into_iter()
                        .collect()
                }
                Ok(watcher::Event::Delete(node)) => {
                    seen.remove(node.metadata.name.as_deref().unwrap_or_default());
                    vec![node]
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => vec![],
                Err(e) => return futures::stream::iter(vec![Err(e)]),
            };
            futures::stream::iter(changed.into_iter().map(Ok).collect::<Vec<_>>())
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd::ImagePrefetchSpec;

    fn prefetch(generation: i64, status: Option<&str>) -> ImagePrefetch {
        let mut p = ImagePrefetch::new(
            "p",
            serde_json::from_value::<ImagePrefetchSpec>(serde_json::json!({"images": ["busybox"]}))
                .unwrap(),
        );
        p.metadata.uid = Some("uid-1".into());
        p.metadata.generation = Some(generation);
        p.status = status.map(|r| crd::ImagePrefetchStatus {
            ready: r.into(),
            ..Default::default()
        });
        p
    }

    #[tokio::test]
    async fn a_status_write_is_no_reason_to_reconcile_but_a_relist_is() {
        use watcher::Event::*;
        let events = vec![
            Ok(Init),
            Ok(InitApply(prefetch(1, None))),
            Ok(InitDone),
            Ok(Apply(prefetch(1, Some("0/3")))),
            Ok(Apply(prefetch(1, Some("3/3")))),
            Ok(Apply(prefetch(2, Some("3/3")))),
            Ok(Init),
            Ok(InitApply(prefetch(2, Some("3/3")))),
            Ok(InitDone),
        ];
        let passed: Vec<(Option<i64>, Option<String>)> =
            prefetch_changes(futures::stream::iter(events))
                .map(|p| {
                    let p = p.unwrap();
                    (p.metadata.generation, p.status.map(|s| s.ready))
                })
                .collect()
                .await;
        assert_eq!(
            passed,
            [
                (Some(1), None),
                (Some(2), Some("3/3".into())),
                (Some(2), Some("3/3".into()))
            ]
        );
    }
}
