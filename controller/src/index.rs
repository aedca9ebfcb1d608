//! The controller's cache of NodeImageSets, holding per set only what
//! reconciles read: name, owner, spec, the agent's per-image reports, and a
//! fingerprint of the labels and annotations the controller manages.
//!
//! Whole objects (metadata maps, timestamps, conditions) cost about 3 KiB a
//! set; at 50 ImagePrefetches over 1,000 nodes that was most of the
//! controller's memory. The policy and status code reads sets through
//! [`SetFacts`], so it works on these views and on whole objects alike.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use kube::ResourceExt;
use kube::runtime::watcher;
use tokio::sync::watch;

use crd::{NodeImageSet, NodeImageSetSpec, NodeImageStatus, keys};

/// What the policy and status code reads of a NodeImageSet.
pub trait SetFacts {
    fn spec(&self) -> &NodeImageSetSpec;
    /// The agent's reports, one per image it has seen.
    fn reported(&self) -> &[NodeImageStatus];
    /// The agent's report on `image` (as listed in the spec).
    fn report_on(&self, image: &str) -> Option<&NodeImageStatus> {
        self.reported().iter().find(|r| r.name == image)
    }
}

impl SetFacts for NodeImageSet {
    fn spec(&self) -> &NodeImageSetSpec {
        &self.spec
    }
    fn reported(&self) -> &[NodeImageStatus] {
        NodeImageSet::reported(self)
    }
}

/// One cached NodeImageSet.
#[derive(Clone, Debug, PartialEq)]
pub struct SetView {
    pub name: String,
    /// The set's uid: a delete is made with it as precondition, so a set
    /// deleted and created again meanwhile is not the one deleted.
    pub uid: String,
    /// The owning ImagePrefetch's uid, as labelled.
    pub owner: String,
    pub spec: NodeImageSetSpec,
    /// Whether the agent has written a status yet.
    pub has_status: bool,
    pub reports: Vec<NodeImageStatus>,
    /// Why the agent's status could not be read (it then counts as no report).
    pub unreadable_report: Option<crd::lenient::Unreadable>,
    /// [`managed_meta`] of the set's labels and annotations.
    pub meta: u64,
}

impl SetFacts for SetView {
    fn spec(&self) -> &NodeImageSetSpec {
        &self.spec
    }
    fn reported(&self) -> &[NodeImageStatus] {
        &self.reports
    }
}

impl SetView {
    pub fn of(set: &NodeImageSet) -> Self {
        let mut spec = set.spec.clone();
        if spec.unreadable.is_some() {
            // The node it is for, as labelled: the controller then sees the
            // set it wrote for that node and writes its spec again.
            spec.node_name = set.labels().get(keys::NODE).cloned().unwrap_or_default();
        }
        SetView {
            name: set.name_any(),
            uid: set.uid().unwrap_or_default(),
            owner: set
                .labels()
                .get(keys::PREFETCH_UID)
                .cloned()
                .unwrap_or_default(),
            spec,
            has_status: set.status.is_some(),
            reports: set.reported().to_vec(),
            unreadable_report: set.status.as_ref().and_then(|s| s.unreadable.clone()),
            meta: managed_meta(&set.metadata.labels, &set.metadata.annotations),
        }
    }
}

/// A fingerprint of the labels and annotation the controller writes on a
/// NodeImageSet (and nothing else): equal fingerprints mean nothing of ours
/// was changed, so the set needs no write.
pub fn managed_meta(
    labels: &Option<BTreeMap<String, String>>,
    annotations: &Option<BTreeMap<String, String>>,
) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let get = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref().and_then(|m| m.get(key)).cloned()
    };
    for key in [
        keys::PREFETCH_UID,
        keys::PREFETCH_NAMESPACE,
        keys::PREFETCH_NAME,
        keys::NODE,
    ] {
        get(labels, key).hash(&mut h);
    }
    get(annotations, keys::PREFETCH_REF_ANNOTATION).hash(&mut h);
    h.finish()
}

/// The cache, fed by a watcher's events.
#[derive(Clone)]
pub struct SetIndex {
    inner: Arc<Inner>,
}

struct Inner {
    sets: RwLock<HashMap<String, Arc<SetView>>>,
    /// Sets of a (re)list under way, swapped in when it is complete.
    relist: Mutex<Option<HashMap<String, Arc<SetView>>>>,
    ready: watch::Sender<bool>,
}

impl Default for SetIndex {
    fn default() -> Self {
        SetIndex {
            inner: Arc::new(Inner {
                sets: RwLock::default(),
                relist: Mutex::default(),
                ready: watch::Sender::new(false),
            }),
        }
    }
}

impl SetIndex {
    pub fn apply(&self, event: &watcher::Event<NodeImageSet>) {
        let view = |set: &NodeImageSet| Arc::new(SetView::of(set));
        match event {
            watcher::Event::Apply(set) => {
                let v = view(set);
                self.write().insert(v.name.clone(), v);
            }
            watcher::Event::Delete(set) => {
                self.write().remove(&set.name_any());
            }
            watcher::Event::Init => {
                *self.inner.relist.lock().expect("relist lock") = Some(HashMap::new());
            }
            watcher::Event::InitApply(set) => {
                if let Some(relist) = self.inner.relist.lock().expect("relist lock").as_mut() {
                    let v = view(set);
                    relist.insert(v.name.clone(), v);
                }
            }
            watcher::Event::InitDone => {
                if let Some(complete) = self.inner.relist.lock().expect("relist lock").take() {
                    *self.write() = complete;
                }
                self.inner.ready.send_replace(true);
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<SetView>>> {
        self.inner.sets.write().expect("set index lock")
    }

    /// Every cached set.
    pub fn state(&self) -> Vec<Arc<SetView>> {
        self.inner
            .sets
            .read()
            .expect("set index lock")
            .values()
            .cloned()
            .collect()
    }

    /// Completes once the first full list is in.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.inner.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd::{NodeImageSetStatus, PullState};

    fn set(name: &str, node: &str) -> NodeImageSet {
        let mut s = NodeImageSet::new(
            name,
            NodeImageSetSpec {
                node_name: node.into(),
                image_set: vec![],
                image_pull_secrets: vec![],
                image_download_retry_limit: 3,
                unreadable: None,
            },
        );
        s.metadata.labels = Some(keys::node_image_set_labels("ns", "p", "uid-1", node));
        s.metadata.annotations = Some(
            [
                (
                    keys::PREFETCH_REF_ANNOTATION.to_string(),
                    "ns/p".to_string(),
                ),
                (keys::TRACEPARENT_ANNOTATION.to_string(), "00-x".to_string()),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn views_keep_what_reconciles_read() {
        let mut s = set("a", "node-a");
        s.status = Some(NodeImageSetStatus {
            available: 0,
            total: 0,
            images: vec![NodeImageStatus::new("img", PullState::Pulling, 1)],
            conditions: vec![],
            unreadable: None,
        });
        let v = SetView::of(&s);
        assert_eq!(v.name, "a");
        assert_eq!(v.owner, "uid-1");
        assert_eq!(v.spec, s.spec);
        assert!(v.has_status);
        assert_eq!(
            v.report_on("img").map(|r| r.state),
            Some(PullState::Pulling)
        );
    }

    #[test]
    fn only_managed_metadata_counts() {
        let s = set("a", "node-a");
        let base = SetView::of(&s).meta;
        let mut other_trace = s.clone();
        other_trace
            .annotations_mut()
            .insert(keys::TRACEPARENT_ANNOTATION.into(), "00-y".into());
        other_trace
            .labels_mut()
            .insert("team".into(), "someone's".into());
        assert_eq!(SetView::of(&other_trace).meta, base);
        let mut tampered = s.clone();
        tampered
            .labels_mut()
            .insert(keys::NODE.into(), "elsewhere".into());
        assert_ne!(SetView::of(&tampered).meta, base);
        let mut stripped = s;
        stripped.annotations_mut().clear();
        assert_ne!(SetView::of(&stripped).meta, base);
    }

    #[tokio::test]
    async fn a_relist_replaces_the_cache_when_complete() {
        let index = SetIndex::default();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(set("a", "n1")));
        assert!(index.state().is_empty(), "not swapped in before InitDone");
        index.apply(&watcher::Event::InitDone);
        index.wait_until_ready().await;
        assert_eq!(index.state().len(), 1);
        index.apply(&watcher::Event::Apply(set("b", "n2")));
        index.apply(&watcher::Event::Delete(set("a", "n1")));
        let names: Vec<String> = index.state().iter().map(|v| v.name.clone()).collect();
        assert_eq!(names, ["b"]);
        // A relist after a lost watch drops what was deleted meanwhile.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(set("c", "n3")));
        index.apply(&watcher::Event::InitDone);
        let names: Vec<String> = index.state().iter().map(|v| v.name.clone()).collect();
        assert_eq!(names, ["c"]);
    }
}
