//! The controller's cache of NodeImageSets, holding per set only what
//! reconciles read: name, owner, spec, the agent's per-image reports, and a
//! fingerprint of the labels and annotations the controller manages.
//!
//! Whole objects (metadata maps, timestamps, conditions) cost about 3 KiB a
//! set; at 50 ImagePrefetches over 1,000 nodes that was most of the
//! controller's memory. The policy and status code reads sets through
//! [`SetFacts`], so it works on these views and on whole objects alike.
//!
//! A reconcile reads only the sets its decision needs — its own, those that
//! list one of its images, and each node's entry count — through indexes
//! kept by owner, by image and by node, not a pass over every set of the
//! cluster: with 100,000 sets and a reconcile per agent report, that pass
//! was the controller's cost.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};

use kube::ResourceExt;
use kube::runtime::watcher;
use tokio::sync::watch;

use crd::{NodeImageSet, NodeImageSetSpec, NodeImageStatus, SharedStr, keys};

use crate::policy::image_key;

/// What the policy and status code reads of a NodeImageSet.
pub trait SetFacts {
    fn spec(&self) -> &NodeImageSetSpec;
    /// The agent's reports, one per image it has seen.
    fn reported(&self) -> &[NodeImageStatus];
    /// The agent's report on `image` (as listed in the spec), when it is
    /// about what the entry asks for now ([`crd::node_image_set::report_on`]).
    fn report_on(&self, image: &str) -> Option<&NodeImageStatus> {
        crd::node_image_set::report_on(&self.spec().image_set, self.reported(), image)
    }
    /// The [`image_key`] of each entry of the spec, in its order.
    fn keys(&self) -> Cow<'_, [Arc<str>]> {
        Cow::Owned(
            self.spec()
                .image_set
                .iter()
                .map(|e| Arc::from(image_key(&e.name)))
                .collect(),
        )
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
    /// Shared with the indexes' entries for the set (one allocation).
    pub name: Arc<str>,
    /// The set's uid: a delete is made with it as precondition, so a set
    /// deleted and created again meanwhile is not the one deleted.
    pub uid: String,
    /// The owning ImagePrefetch's uid, as labelled (one allocation shared
    /// by every set of the ImagePrefetch).
    pub owner: Arc<str>,
    pub spec: NodeImageSetSpec,
    /// Whether the agent has written a status yet.
    pub has_status: bool,
    pub reports: Vec<NodeImageStatus>,
    /// Why the agent's status could not be read (it then counts as no report).
    pub unreadable_report: Option<Box<crd::lenient::Unreadable>>,
    /// [`managed_meta`] of the set's labels and annotations.
    pub meta: u64,
    /// The resource version it was cached at, as a number (0: not one):
    /// what tells the controller's own write from a newer one.
    pub version: u64,
    /// The [`image_key`] of each entry, parsed once when the set is cached
    /// (shared with the index's, so one image's key is held once).
    pub keys: Vec<Arc<str>>,
}

impl SetFacts for SetView {
    fn spec(&self) -> &NodeImageSetSpec {
        &self.spec
    }
    fn reported(&self) -> &[NodeImageStatus] {
        &self.reports
    }
    fn keys(&self) -> Cow<'_, [Arc<str>]> {
        Cow::Borrowed(&self.keys)
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
            name: Arc::from(set.name_any()),
            uid: set.uid().unwrap_or_default(),
            owner: Arc::from(
                set.labels()
                    .get(keys::PREFETCH_UID)
                    .map(String::as_str)
                    .unwrap_or_default(),
            ),
            spec,
            has_status: set.status.is_some(),
            reports: set.reported().to_vec(),
            unreadable_report: set
                .status
                .as_ref()
                .and_then(|s| s.unreadable.clone())
                .map(Box::new),
            meta: managed_meta(&set.metadata.labels, &set.metadata.annotations),
            version: set
                .resource_version()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            keys: set.keys().into_owned(),
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
    fn get<'a>(map: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
        map.as_ref().and_then(|m| m.get(key)).map(String::as_str)
    }
    meta_fingerprint([
        get(labels, keys::PREFETCH_UID),
        get(labels, keys::PREFETCH_NAMESPACE),
        get(labels, keys::PREFETCH_NAME),
        get(labels, keys::NODE),
        get(annotations, keys::PREFETCH_REF_ANNOTATION),
    ])
}

/// [`managed_meta`] from the values themselves — the owner's uid,
/// namespace and name and the node as labelled, then the reference
/// annotation — so a reconcile can tell a set is unchanged without
/// building its metadata maps.
pub fn meta_fingerprint(values: [Option<&str>; 5]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in values {
        v.hash(&mut h);
    }
    h.finish()
}

/// The sets, and the indexes over them, always changed together.
#[derive(Default)]
pub struct Sets {
    by_name: HashMap<Arc<str>, Arc<SetView>>,
    /// Set names by owning ImagePrefetch uid (as labelled).
    by_owner: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Set names by the [`image_key`] of an entry they list.
    by_image: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Entries listed on each node, all ImagePrefetches together.
    entries_on: HashMap<String, usize>,
    /// Each distinct image name, digest and source of the cached sets, held
    /// once: one image on 5,000 nodes is otherwise 20,000 copies of its
    /// name and digest (spec and report), most of what a set costs.
    strings: HashSet<SharedStr>,
    /// The pool's size after it last shed what no set holds any more.
    strings_kept: usize,
}

impl Sets {
    fn insert(&mut self, mut view: SetView) -> Arc<SetView> {
        self.remove(&view.name);
        // One Arc per distinct image key, shared by every set listing it;
        // one per owner, shared by its sets.
        for key in view.keys.iter_mut() {
            if let Some((held, _)) = self.by_image.get_key_value(key) {
                *key = held.clone();
            }
        }
        if let Some((held, _)) = self.by_owner.get_key_value(&view.owner) {
            view.owner = held.clone();
        }
        self.intern(&mut view);
        let view = Arc::new(view);
        self.by_owner
            .entry(view.owner.clone())
            .or_default()
            .insert(view.name.clone());
        for key in &view.keys {
            self.by_image
                .entry(key.clone())
                .or_default()
                .insert(view.name.clone());
        }
        *self
            .entries_on
            .entry(view.spec.node_name.clone())
            .or_default() += view.spec.image_set.len();
        self.by_name.insert(view.name.clone(), view.clone());
        view
    }

    /// Points the view's strings at the pool's copies.
    fn intern(&mut self, view: &mut SetView) {
        let pool = &mut self.strings;
        for entry in &mut view.spec.image_set {
            entry.name.intern(pool);
            if let Some(d) = &mut entry.digest {
                d.intern(pool);
            }
            if let Some(source) = &mut entry.source {
                source.node.intern(pool);
                source.address.intern(pool);
            }
        }
        for report in &mut view.reports {
            report.name.intern(pool);
            if let Some(d) = &mut report.digest {
                d.intern(pool);
            }
        }
        // Shed what no set holds once the pool doubled since it last did:
        // a digest replaced at a refresh goes, at a cost spread over inserts.
        if pool.len() > 2 * self.strings_kept.max(1024) {
            pool.retain(|s| !s.is_unique());
            self.strings_kept = pool.len();
        }
    }

    fn remove(&mut self, name: &str) -> Option<Arc<SetView>> {
        let old = self.by_name.remove(name)?;
        unindex(&mut self.by_owner, &old.owner, name);
        for key in &old.keys {
            unindex(&mut self.by_image, key, name);
        }
        if let Some(n) = self.entries_on.get_mut(&old.spec.node_name) {
            *n = n.saturating_sub(old.spec.image_set.len());
            if *n == 0 {
                self.entries_on.remove(&old.spec.node_name);
            }
        }
        Some(old)
    }

    fn named<'a>(&'a self, names: impl IntoIterator<Item = &'a Arc<str>>) -> Vec<Arc<SetView>> {
        names
            .into_iter()
            .filter_map(|n| self.by_name.get(n).cloned())
            .collect()
    }

    /// The set named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<SetView>> {
        self.by_name.get(name).cloned()
    }

    /// The sets of the ImagePrefetch with uid `owner`.
    pub fn owned_by(&self, owner: &str) -> Vec<Arc<SetView>> {
        self.named(self.by_owner.get(owner).into_iter().flatten())
    }

    /// The sets of other ImagePrefetches that list one of `images` (by
    /// [`image_key`]): what the seed policy shares across ImagePrefetches.
    pub fn sharing(&self, owner: &str, images: &[String]) -> Vec<Arc<SetView>> {
        let mut names: HashSet<&Arc<str>> = HashSet::new();
        for image in images {
            if let Some(listing) = self.by_image.get(image_key(image).as_str()) {
                names.extend(listing);
            }
        }
        self.named(names)
            .into_iter()
            .filter(|s| &*s.owner != owner)
            .collect()
    }

    /// Entries every ImagePrefetch lists on `node`, all together.
    pub fn entries_on(&self, node: &str) -> usize {
        self.entries_on.get(node).copied().unwrap_or(0)
    }

    /// Every cached set.
    pub fn all(&self) -> impl Iterator<Item = &Arc<SetView>> {
        self.by_name.values()
    }
}

/// Takes `name` out of `map[key]`, and the key out once it lists nothing.
fn unindex<K, Q>(map: &mut HashMap<K, HashSet<Arc<str>>>, key: &Q, name: &str)
where
    K: std::borrow::Borrow<Q> + Eq + Hash,
    Q: Eq + Hash + ?Sized,
{
    if let Some(names) = map.get_mut(key) {
        names.remove(name);
        if names.is_empty() {
            map.remove(key);
        }
    }
}

/// The cache, fed by a watcher's events.
#[derive(Clone)]
pub struct SetIndex {
    inner: Arc<Inner>,
}

struct Inner {
    sets: RwLock<Sets>,
    /// Names a (re)list under way has brought so far: once it is complete,
    /// the cached sets it did not bring are gone. The list updates the cache
    /// in place — a second cache built beside the first, and swapped in,
    /// held every set twice at a re-list's peak (428 MiB at 100,000 sets).
    relist: Mutex<Option<HashSet<Arc<str>>>>,
    /// Resource versions of the controller's own writes, by set name: the
    /// watch event each brings back is no news to the controller.
    own_writes: Mutex<HashMap<String, String>>,
    ready: watch::Sender<bool>,
}

impl Default for SetIndex {
    fn default() -> Self {
        SetIndex {
            inner: Arc::new(Inner {
                sets: RwLock::default(),
                relist: Mutex::default(),
                own_writes: Mutex::default(),
                ready: watch::Sender::new(false),
            }),
        }
    }
}

impl SetIndex {
    /// Takes in a watch event; returns whether it is news to the owner's
    /// reconcile: not the echo of the controller's own write, and not an
    /// update that changed nothing the controller reads. Every event of a
    /// (re)list is news (what changed while the watch was away is unknown).
    pub fn apply(&self, event: &watcher::Event<NodeImageSet>) -> bool {
        match event {
            watcher::Event::Apply(set) => {
                let echo = self.is_echo(set);
                self.write().insert(SetView::of(set));
                !echo
            }
            watcher::Event::Delete(set) => {
                self.inner
                    .own_writes
                    .lock()
                    .expect("own writes lock")
                    .remove(&set.name_any());
                self.write().remove(&set.name_any());
                true
            }
            watcher::Event::Init => {
                *self.inner.relist.lock().expect("relist lock") = Some(HashSet::new());
                false
            }
            watcher::Event::InitApply(set) => {
                let view = self.write().insert(SetView::of(set));
                if let Some(seen) = self.inner.relist.lock().expect("relist lock").as_mut() {
                    seen.insert(view.name.clone());
                }
                true
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.inner.relist.lock().expect("relist lock").take() {
                    let mut sets = self.write();
                    let gone: Vec<Arc<str>> = sets
                        .by_name
                        .keys()
                        .filter(|n| !seen.contains(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        sets.remove(&name);
                    }
                }
                self.inner.ready.send_replace(true);
                false
            }
        }
    }

    /// Records the controller's own write of `set` (as the API server
    /// returned it): its watch event triggers no reconcile, and the cache
    /// holds it at once — a reconcile that starts before the watch brings
    /// it back must not decide again what this one decided (a node
    /// released twice, to another holder, would restart its pull). A newer
    /// version the watch brought meanwhile is kept.
    pub fn wrote(&self, set: &NodeImageSet) {
        let view = SetView::of(set);
        let mut sets = self.write();
        let newer_cached = sets
            .by_name
            .get(&view.name)
            .is_some_and(|c| view.version == 0 || c.version >= view.version);
        // Its echo (or a newer version) came first: there is nothing to
        // wait for, and a record would stay until the set next changed.
        if newer_cached {
            return;
        }
        if let Some(rv) = set.resource_version() {
            self.inner
                .own_writes
                .lock()
                .expect("own writes lock")
                .insert(set.name_any(), rv);
        }
        sets.insert(view);
    }

    /// Whether `set` as the watch brings it is the controller's own write.
    fn is_echo(&self, set: &NodeImageSet) -> bool {
        let mut own = self.inner.own_writes.lock().expect("own writes lock");
        match (own.remove(&set.name_any()), set.resource_version()) {
            (Some(written), Some(seen)) => written == seen,
            _ => false,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Sets> {
        self.inner.sets.write().expect("set index lock")
    }

    /// The cache, to read from under its lock (held briefly: the watch
    /// waits while it is held).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Sets> {
        self.inner.sets.read().expect("set index lock")
    }

    /// Every cached set.
    pub fn state(&self) -> Vec<Arc<SetView>> {
        self.read().all().cloned().collect()
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
        let mut s = NodeImageSet::new(name, NodeImageSetSpec::for_node(node, vec![]));
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
        assert_eq!(&*v.name, "a");
        assert_eq!(&*v.owner, "uid-1");
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
    async fn a_relist_updates_the_cache_and_drops_what_it_did_not_bring() {
        let index = SetIndex::default();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(set("a", "n1")));
        let ready = index.wait_until_ready();
        assert!(
            futures::FutureExt::now_or_never(ready).is_none(),
            "not ready before the first list is complete"
        );
        index.apply(&watcher::Event::InitDone);
        index.wait_until_ready().await;
        assert_eq!(index.state().len(), 1);
        index.apply(&watcher::Event::Apply(set("b", "n2")));
        index.apply(&watcher::Event::Delete(set("a", "n1")));
        let names: Vec<String> = index.state().iter().map(|v| v.name.to_string()).collect();
        assert_eq!(names, ["b"]);
        // A relist after a lost watch drops what was deleted meanwhile,
        // once it is complete: until then the cache holds both.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(set("c", "n3")));
        assert_eq!(index.state().len(), 2);
        index.apply(&watcher::Event::InitDone);
        let names: Vec<String> = index.state().iter().map(|v| v.name.to_string()).collect();
        assert_eq!(names, ["c"]);
    }

    fn listing(name: &str, node: &str, owner: &str, images: &[&str], rv: &str) -> NodeImageSet {
        let mut s = set(name, node);
        s.metadata.labels = Some(keys::node_image_set_labels("ns", "p", owner, node));
        s.metadata.resource_version = Some(rv.into());
        s.spec.image_set = images
            .iter()
            .map(|i| crd::NodeImage {
                refresh: None,
                name: (*i).into(),
                registry_policy: crd::RegistryPolicy::Default,
                digest: None,
                source: None,
            })
            .collect();
        s
    }

    #[test]
    fn sets_listing_one_image_hold_its_name_and_digest_once() {
        let mut sets = Sets::default();
        let reported = |name: &str, node: &str| {
            let mut s = listing(name, node, "uid-1", &["registry.example.com/app:1"], "1");
            s.spec.image_set[0].digest = Some("sha256:ab".into());
            s.status = Some(NodeImageSetStatus {
                images: vec![NodeImageStatus {
                    digest: Some("sha256:ab".into()),
                    ..NodeImageStatus::new("registry.example.com/app:1", PullState::Available, 1)
                }],
                ..Default::default()
            });
            SetView::of(&s)
        };
        let a = sets.insert(reported("a", "n1"));
        let b = sets.insert(reported("b", "n2"));
        let held = |v: &SetView| {
            let (e, r) = (&v.spec.image_set[0], &v.reports[0]);
            [
                e.name.as_ptr(),
                e.digest.as_ref().unwrap().as_ptr(),
                r.name.as_ptr(),
                r.digest.as_ref().unwrap().as_ptr(),
            ]
        };
        let (ha, hb) = (held(&a), held(&b));
        assert_eq!(ha, hb, "both sets point at the same copies");
        assert_eq!((ha[0], ha[1]), (ha[2], ha[3]), "spec and report too");
        assert_eq!(sets.strings.len(), 2);
        // Gone from every set, a string leaves the pool once it sheds.
        drop((a, b));
        sets.remove("a");
        sets.remove("b");
        for i in 0..1100 {
            sets.insert(reported(&format!("s{i}"), &format!("n{i}")));
            sets.remove(&format!("s{i}"));
        }
        let mut other = listing("c", "n3", "uid-1", &["registry.example.com/other:1"], "1");
        for i in 0..2100 {
            other.spec.image_set[0].digest = Some(format!("sha256:{i:x}").into());
            sets.insert(SetView::of(&other));
        }
        assert!(
            !sets.strings.contains("sha256:ab") && sets.strings.len() <= 2 * 1024 + 1,
            "the pool keeps only what sets hold ({} strings)",
            sets.strings.len()
        );
    }

    fn names(sets: Vec<Arc<SetView>>) -> Vec<String> {
        let mut n: Vec<String> = sets.iter().map(|s| s.name.to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn the_echo_of_the_controllers_own_write_is_no_news() {
        let index = SetIndex::default();
        let written = listing("a", "n1", "uid-1", &["busybox"], "5");
        index.wrote(&written);
        assert!(!index.apply(&watcher::Event::Apply(written.clone())));
        // The agent's report after it, and anyone's change, are news.
        let reported = listing("a", "n1", "uid-1", &["busybox"], "6");
        assert!(index.apply(&watcher::Event::Apply(reported)));
        // A write whose answer came after its own echo: the next event is
        // news all the same, and the stale record is gone after it.
        let late = listing("a", "n1", "uid-1", &["busybox"], "7");
        index.wrote(&late);
        assert!(index.apply(&watcher::Event::Apply(listing(
            "a",
            "n1",
            "uid-1",
            &["busybox"],
            "8"
        ))));
        assert!(index.apply(&watcher::Event::Apply(listing(
            "a",
            "n1",
            "uid-1",
            &["busybox"],
            "7"
        ))));
        assert!(index.apply(&watcher::Event::Delete(written)));
    }

    #[test]
    fn an_own_write_is_cached_at_once_unless_the_watch_brought_newer() {
        let index = SetIndex::default();
        index.wrote(&listing("a", "n1", "uid-1", &["busybox"], "5"));
        assert_eq!(
            index.read().owned_by("uid-1").len(),
            1,
            "cached before its echo"
        );
        // The agent's report came through the watch before our answer.
        let mut reported = listing("a", "n1", "uid-1", &["busybox", "nginx"], "9");
        reported.status = Some(NodeImageSetStatus::default());
        index.apply(&watcher::Event::Apply(reported));
        index.wrote(&listing("a", "n1", "uid-1", &["busybox", "nginx"], "8"));
        let cached = index.read().owned_by("uid-1");
        assert_eq!(cached[0].version, 9);
        assert!(cached[0].has_status);
        assert!(
            index.inner.own_writes.lock().unwrap().is_empty(),
            "no record waits for an echo that came before the answer"
        );
    }

    #[test]
    fn lookups_by_owner_image_and_node_follow_every_change() {
        let index = SetIndex::default();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitDone);
        let events = [
            listing("a1", "n1", "uid-a", &["busybox", "nginx:1"], "1"),
            listing("a2", "n2", "uid-a", &["busybox"], "2"),
            listing(
                "b1",
                "n1",
                "uid-b",
                &["docker.io/library/busybox:latest"],
                "3",
            ),
            listing("c1", "n1", "uid-c", &["redis"], "4"),
        ];
        for e in &events {
            index.apply(&watcher::Event::Apply(e.clone()));
        }
        {
            let sets = index.read();
            assert_eq!(names(sets.owned_by("uid-a")), ["a1", "a2"]);
            // One image however it is written; the owner's own sets left out.
            assert_eq!(names(sets.sharing("uid-a", &["busybox".into()])), ["b1"]);
            assert_eq!(
                names(sets.sharing("uid-b", &["busybox".into()])),
                ["a1", "a2"]
            );
            assert_eq!(
                names(sets.sharing("uid-b", &["nginx".into()])),
                Vec::<String>::new()
            );
            assert_eq!(sets.entries_on("n1"), 4);
            assert_eq!(sets.entries_on("n2"), 1);
        }
        // a1 drops nginx; c1 is deleted.
        index.apply(&watcher::Event::Apply(listing(
            "a1",
            "n1",
            "uid-a",
            &["busybox"],
            "5",
        )));
        index.apply(&watcher::Event::Delete(events[3].clone()));
        let sets = index.read();
        assert_eq!(
            names(sets.sharing("uid-x", &["nginx:1".into()])),
            Vec::<String>::new()
        );
        assert_eq!(
            names(sets.sharing("uid-x", &["redis".into()])),
            Vec::<String>::new()
        );
        assert_eq!(sets.entries_on("n1"), 2);
        assert!(sets.owned_by("uid-c").is_empty());
        // Nothing is left indexed under what no set lists any more.
        assert_eq!(sets.by_image.len(), 1);
        assert_eq!(sets.by_owner.len(), 2);
        // Every set listing busybox holds the one key.
        let keys: Vec<&Arc<str>> = sets.all().flat_map(|s| s.keys.iter()).collect();
        assert!(keys.windows(2).all(|w| Arc::ptr_eq(w[0], w[1])));
    }
}
