//! Helpers for tests against the shared real API server: namespaces, nodes,
//! ImagePrefetches, a controller per test, and simulated agents.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, ValidationDirective};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use controller::reconcile::Context;
use crd::{ImagePrefetch, NodeImage, NodeImageSet, NodeImageStatus, PullState, keys};

pub const DEADLINE: Duration = Duration::from_secs(30);
pub const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

pub async fn client() -> Client {
    // Controller logs when RUST_LOG asks for them (cargo test shows them for failing tests).
    static LOGS: std::sync::Once = std::sync::Once::new();
    if std::env::var_os("RUST_LOG").is_some() {
        LOGS.call_once(|| std::mem::forget(plumbing::init("controller-tests")));
    }
    testbed::beds::shared::client().await
}

/// A namespace of the test's own, so tests sharing the API server stay apart.
pub async fn namespace(client: &Client, name: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
    name.to_string()
}

/// Ready nodes `<group>-0..n`, labelled `test-group=<group>` plus `extra`.
pub async fn nodes(client: &Client, group: &str, n: usize, extra: &[(&str, &str)]) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{group}-{i}");
        node(client, &name, group, extra).await;
        names.push(name);
    }
    names
}

pub async fn node(client: &Client, name: &str, group: &str, extra: &[(&str, &str)]) {
    let mut labels: BTreeMap<String, String> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.insert("test-group".into(), group.into());
    testbed::support::nodes::register(client, name, &labels)
        .await
        .unwrap();
}

pub fn prefetch(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "imageprefetch.io/v1alpha1",
        "kind": "ImagePrefetch",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Applies with strict field validation, as `kubectl apply` does; the API error message on failure.
pub async fn apply(client: &Client, ns: &str, obj: &Value) -> Result<ImagePrefetch, String> {
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), ns);
    let name = obj["metadata"]["name"].as_str().unwrap();
    let params = PatchParams::apply("test").validation(ValidationDirective::Strict);
    api.patch(name, &params, &Patch::Apply(obj))
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) => s.message,
            other => panic!("unexpected error kind: {other}"),
        })
}

/// Applies `obj` (which must be valid) and returns its uid.
pub async fn created(client: &Client, ns: &str, obj: &Value) -> String {
    apply(client, ns, obj)
        .await
        .unwrap_or_else(|e| panic!("rejected: {e}"))
        .uid()
        .expect("created objects have a uid")
}

/// The usual set-up of a controller test: a namespace, a controller limited
/// to it, and `n` Ready nodes labelled `test-group=<name>`.
pub struct Scenario {
    pub client: Client,
    pub ns: String,
    pub nodes: Vec<String>,
    pub controller: Running,
}

impl Scenario {
    pub async fn new(name: &str, n: usize) -> Self {
        let client = client().await;
        let ns = namespace(&client, name).await;
        let controller = Running::in_namespace(&client, &ns);
        let nodes = nodes(&client, name, n, &[]).await;
        Scenario {
            client,
            ns,
            nodes,
            controller,
        }
    }

    /// An ImagePrefetch of `images` onto this scenario's nodes; its uid.
    pub async fn prefetch(&self, name: &str, images: &[&str], extra: Value) -> String {
        let mut spec = json!({"images": images, "nodeSelector": {"test-group": self.ns}});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        created(&self.client, &self.ns, &prefetch(name, spec)).await
    }
}

/// A controller limited to `ns`, stopped when dropped or by `stop()`.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Arc<Context>>>,
}

impl Running {
    pub fn start(client: &Client, config: controller::Config) -> Self {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(client.clone(), config, async move {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn in_namespace(client: &Client, ns: &str) -> Self {
        Self::start(client, config(ns))
    }

    /// Waits for it to end by itself (a leader that lost its lease).
    pub async fn ended(mut self, within: Duration) -> Arc<Context> {
        tokio::time::timeout(within, self.task.take().unwrap())
            .await
            .expect("the controller ends by itself")
            .unwrap()
    }

    /// Stops it and returns its context (its write counter).
    pub async fn stop(mut self) -> Arc<Context> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(DEADLINE, self.task.take().unwrap())
            .await
            .expect("controller stops")
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub fn config(ns: &str) -> controller::Config {
    let mut config = controller::Config {
        namespace: Some(ns.to_string()),
        ..Default::default()
    };
    // Reports here come from the test, with no spegel to advertise them: a
    // holder is a source at once (the grace is the policy's unit tests', and
    // the e2e tests run the default).
    config.policy.findable_after = std::time::Duration::ZERO;
    config
}

pub async fn sets(client: &Client, uid: &str) -> Vec<NodeImageSet> {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    api.list(&ListParams::default().labels(&keys::owned_by(uid)))
        .await
        .unwrap()
        .items
}

/// The entries of one ImagePrefetch by node.
pub async fn entries(client: &Client, uid: &str) -> BTreeMap<String, Vec<NodeImage>> {
    sets(client, uid)
        .await
        .into_iter()
        .map(|s| (s.spec.node_name.clone(), s.spec.image_set))
        .collect()
}

/// Polls `f` until it gives `Some`, failing after `DEADLINE`.
pub async fn poll<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    testbed::support::poll::eventually(what, DEADLINE, f).await
}

/// Node names holding NodeImageSets of `uid`, once they equal `want`.
pub async fn wait_for_nodes(client: &Client, uid: &str, want: &[&str]) -> Vec<NodeImageSet> {
    poll(&format!("NodeImageSets on {want:?}"), || async {
        let sets = sets(client, uid).await;
        let mut nodes: Vec<&str> = sets.iter().map(|s| s.spec.node_name.as_str()).collect();
        nodes.sort();
        (nodes == want).then_some(sets.clone())
    })
    .await
}

/// Waits until the nodes with a NodeImageSet of `uid` are `want`, agents
/// answering at once meanwhile (`finish_all`): a selected node gets its set
/// only once it is released, after the seed and its waves.
pub async fn released_to(client: &Client, uid: &str, want: &[&str]) -> Vec<NodeImageSet> {
    poll(&format!("{want:?} released"), || async {
        finish_all(client, uid).await;
        let sets = sets(client, uid).await;
        let mut nodes: Vec<&str> = sets.iter().map(|s| s.spec.node_name.as_str()).collect();
        nodes.sort();
        (nodes == want).then_some(sets.clone())
    })
    .await
}

/// What a node's agent would write: the state of one image on that node.
pub async fn report(client: &Client, set: &str, image: &str, state: PullState) {
    report_digest(client, set, image, state, DIGEST).await
}

/// As `report`, with the digest the node says the image resolved to.
pub async fn report_digest(
    client: &Client,
    set: &str,
    image: &str,
    state: PullState,
    digest: &str,
) {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let current = api.get_status(set).await.unwrap();
    let mut images = current.status.map(|s| s.images).unwrap_or_default();
    images.retain(|r| r.name != image);
    let failed = state == PullState::Failed;
    images.push(NodeImageStatus {
        last_error: failed.then(|| "simulated: registry answered 500".to_string()),
        reason: failed.then_some(crd::PullFailure::PullFailed),
        digest: (state == PullState::Available).then(|| digest.into()),
        ..NodeImageStatus::new(image, state, if failed { 4 } else { 1 })
    });
    let available = images
        .iter()
        .filter(|r| r.state == PullState::Available)
        .count();
    let patch = json!({"status": {"images": images, "available": available, "total": current.spec.image_set.len()}});
    api.patch_status(set, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

/// The NodeImageSet name of `node` for `uid`.
/// The first node (by name) whose set has an entry: the seed, while
/// nothing else is released.
pub async fn first_with_entry(client: &Client, uid: &str) -> String {
    poll("a seed", || async {
        entries(client, uid)
            .await
            .into_iter()
            .find(|(_, e)| !e.is_empty())
            .map(|(n, _)| n)
    })
    .await
}

/// `report` on the set of ImagePrefetch `uid` for `node`.
pub async fn report_on(client: &Client, uid: &str, node: &str, image: &str, state: PullState) {
    report(client, &set_on(client, uid, node).await, image, state).await
}

pub async fn set_on(client: &Client, uid: &str, node: &str) -> String {
    sets(client, uid)
        .await
        .into_iter()
        .find(|s| s.spec.node_name == node)
        .map(|s| s.name_any())
        .unwrap_or_else(|| panic!("no NodeImageSet on {node}"))
}

/// Reports every listed-but-unreported entry of `uid` as Available, like
/// agents that finish at once. Returns how many it reported.
pub async fn finish_all(client: &Client, uid: &str) -> usize {
    let mut n = 0;
    for set in sets(client, uid).await {
        let reported: Vec<crd::SharedStr> = set
            .status
            .iter()
            .flat_map(|s| s.images.iter())
            .filter(|r| r.state == PullState::Available)
            .map(|r| r.name.clone())
            .collect();
        for e in &set.spec.image_set {
            if !reported.contains(&e.name) {
                report(client, &set.name_any(), &e.name, PullState::Available).await;
                n += 1;
            }
        }
    }
    n
}

/// Reports every entry of `uid` Available until the ImagePrefetch is Ready
/// on all `n` nodes (the seed first, then the mirrors, as agents would).
pub async fn roll_out(client: &Client, ns: &str, name: &str, uid: &str, n: usize) {
    poll(&format!("{ns}/{name} Ready {n}/{n}"), || async {
        finish_all(client, uid).await;
        let p = Api::<ImagePrefetch>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .ok()?;
        (p.status?.ready == format!("{n}/{n}")).then_some(())
    })
    .await;
}

/// The Warning Events about `name` in `ns`: (reason, note).
pub async fn warnings(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// The first Event of `reason` (about the object named `regarding`, when
/// given), in `ns` or, without one, in every namespace; polled until there
/// is one.
pub async fn event(
    client: &Client,
    ns: Option<&str>,
    reason: crd::EventReason,
    regarding: Option<&str>,
) -> Event {
    let api: Api<Event> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    poll(&format!("a {reason} Event"), || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some(reason.as_str())
                    && regarding.is_none_or(|name| {
                        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    })
            })
    })
    .await
}
