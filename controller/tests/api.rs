//! The API and the controller against a real kube-apiserver (see the testbed crate).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, ValidationDirective,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crd::{ImagePrefetch, NodeImageSet, RegistryPolicy, keys, reference};

const DEADLINE: Duration = Duration::from_secs(30);

/// A namespace of the test's own, so tests sharing the API server stay apart.
async fn namespace(client: &Client, name: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create namespace {name}: {e}"),
    }
    name.to_string()
}

fn prefetch(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "imageprefetch.io/v1alpha1",
        "kind": "ImagePrefetch",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Creates with strict field validation, as `kubectl apply` does; returns the API error message.
async fn create(client: &Client, ns: &str, obj: &Value) -> Result<ImagePrefetch, String> {
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

#[tokio::test]
async fn crds_are_established() {
    let client = testbed::shared::client().await;
    let api: Api<CustomResourceDefinition> = Api::all(client);
    for name in [
        "imageprefetches.imageprefetch.io",
        "nodeimagesets.imageprefetch.io",
    ] {
        let crd = api.get(name).await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is not Established");
    }
}

#[tokio::test]
async fn valid_prefetches_are_accepted() {
    let client = testbed::shared::client().await;
    let ns = namespace(&client, "valid").await;
    for (i, image) in reference::examples::VALID.iter().enumerate() {
        let obj = prefetch(
            &format!("ok-{i}"),
            json!({"images": [image], "replicas": 1, "nodeSelector": {"a": "b"},
                   "imagePullSecrets": [{"name": "regcred"}]}),
        );
        let created = create(&client, &ns, &obj).await;
        assert!(
            created.is_ok(),
            "{image} rejected: {}",
            created.unwrap_err()
        );
    }
}

/// Strict validation words it "unknown field" on create and "field not
/// declared in schema" on server-side apply; either names the field.
const UNKNOWN_FIELD: &str = "unknown field|not declared in schema";

#[tokio::test]
async fn bad_input_is_rejected_naming_the_field() {
    let client = testbed::shared::client().await;
    let ns = namespace(&client, "invalid").await;
    let mut cases: Vec<(Value, Vec<String>)> = vec![
        (
            json!({"images": []}),
            vec!["spec.images".into(), "at least 1 items".into()],
        ),
        (
            json!({}),
            vec!["spec.images".into(), "Required value".into()],
        ),
        (
            json!({"images": ["a:1", "b:1", "a:1"]}),
            // Server-side apply words it ".spec.images: duplicate entries for key";
            // a plain create "spec.images[2]: Duplicate value".
            vec!["spec.images".into(), "duplicate".into()],
        ),
        (
            json!({"images": ["a:1"], "replicas": 0}),
            vec!["spec.replicas".into(), "greater than or equal to 1".into()],
        ),
        (
            json!({"images": ["a:1"], "replicas": -3}),
            vec!["spec.replicas".into()],
        ),
        (
            json!({"images": ["a:1"], "bogus": true}),
            vec!["spec.bogus".into(), UNKNOWN_FIELD.into()],
        ),
        (
            json!({"images": ["a:1"], "imagePullSecrets": [{"name": "x", "namespace": "other"}]}),
            vec![
                "spec.imagePullSecrets".into(),
                "namespace".into(),
                UNKNOWN_FIELD.into(),
            ],
        ),
    ];
    for bad in reference::examples::INVALID
        .iter()
        .filter(|r| !r.is_empty())
    {
        cases.push((
            json!({"images": ["ok:1", bad]}),
            vec![
                format!("spec.images[1]: Invalid value: \"{bad}\""),
                reference::INVALID_MESSAGE.into(),
            ],
        ));
    }
    for (i, (spec, expected)) in cases.into_iter().enumerate() {
        let result = create(&client, &ns, &prefetch(&format!("bad-{i}"), spec.clone())).await;
        let message = match result {
            Ok(_) => panic!("{spec} was accepted"),
            Err(m) => m,
        };
        for part in expected {
            let message = message.to_lowercase();
            assert!(
                part.to_lowercase()
                    .split('|')
                    .any(|alt| message.contains(alt)),
                "{spec}: message {message:?} lacks {part:?}"
            );
        }
    }
}

/// The Rust parser agrees with the API server's rule on every example.
#[test]
fn rust_parser_agrees_with_schema_examples() {
    for r in reference::examples::VALID {
        assert!(reference::parse(r).is_ok(), "{r}");
    }
    for r in reference::examples::INVALID {
        assert!(reference::parse(r).is_err(), "{r}");
    }
}

async fn node(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let api: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let node: Node =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    api.patch(
        name,
        &PatchParams::apply("test").force(),
        &Patch::Apply(&node),
    )
    .await
    .unwrap();
}

/// Node names of the NodeImageSets of `uid`, once they equal `want` (polled until the deadline).
async fn wait_for_sets(client: &Client, uid: &str, want: &[&str]) -> Vec<NodeImageSet> {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let lp = ListParams::default().labels(&keys::owned_by(uid));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let sets = api.list(&lp).await.unwrap().items;
        let mut nodes: Vec<&str> = sets.iter().map(|s| s.spec.node_name.as_str()).collect();
        nodes.sort();
        if nodes == want {
            return sets;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "NodeImageSets are on {nodes:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn controller_follows_selector_and_cleans_up() {
    let client = testbed::shared::client().await;
    let ns = namespace(&client, "fanout").await;
    let config = controller::Config {
        namespace: Some(ns.clone()),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller::run(client.clone(), config, async move {
        let _ = stop_rx.await;
    }));

    // Labels unique to this test keep other tests' nodes out of its selection.
    let group = ("test-group", "fanout");
    node(&client, "fan-a", &[group, ("tier", "gpu")]).await;
    node(&client, "fan-b", &[group, ("tier", "gpu")]).await;
    node(&client, "fan-c", &[group, ("tier", "cpu")]).await;

    let obj = prefetch(
        "web",
        json!({"images": ["registry.example.com/web:1", "registry.example.com/sidecar:2"],
               "nodeSelector": {"test-group": "fanout", "tier": "gpu"},
               "imagePullSecrets": [{"name": "regcred"}]}),
    );
    let created = create(&client, &ns, &obj).await.unwrap();
    let uid = created.uid().unwrap();
    let sets = wait_for_sets(&client, &uid, &["fan-a", "fan-b"]).await;
    for set in &sets {
        assert_eq!(set.spec.image_set.len(), 2);
        assert!(
            set.spec
                .image_set
                .iter()
                .all(|i| i.registry_policy == RegistryPolicy::Default)
        );
        assert_eq!(set.spec.image_pull_secrets[0].namespace, ns);
        assert_eq!(set.labels().get(keys::NODE), Some(&set.spec.node_name));
        let managers: Vec<_> = set
            .managed_fields()
            .iter()
            .filter_map(|m| m.manager.clone())
            .collect();
        assert_eq!(
            managers,
            [keys::CONTROLLER_MANAGER],
            "written by server-side apply"
        );
    }

    // The ImagePrefetch reports the selection; no agent runs here, so 0 ready.
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), &ns);
    let status = poll(|| async {
        let p = api.get("web").await.ok()?;
        p.status.filter(|s| s.desired_nodes == 2)
    })
    .await;
    assert_eq!(status.ready, "0/2");
    assert!(
        api.get("web")
            .await
            .unwrap()
            .finalizers()
            .contains(&keys::FINALIZER.to_string())
    );

    // Selector edit: the set follows.
    let edit = prefetch(
        "web",
        json!({"images": ["registry.example.com/web:1"],
        "nodeSelector": {"test-group": "fanout", "tier": "cpu"}}),
    );
    create(&client, &ns, &edit).await.unwrap();
    let sets = wait_for_sets(&client, &uid, &["fan-c"]).await;
    assert_eq!(sets[0].spec.image_set.len(), 1, "image list edit followed");

    // A node that starts matching gets a set; one that is deleted loses it.
    node(&client, "fan-d", &[group, ("tier", "cpu")]).await;
    wait_for_sets(&client, &uid, &["fan-c", "fan-d"]).await;
    Api::<Node>::all(client.clone())
        .delete("fan-c", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_sets(&client, &uid, &["fan-d"]).await;

    // Deletion: the finalizer removes every NodeImageSet, then the object goes.
    api.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for_sets(&client, &uid, &[]).await;
    poll(|| async { matches!(api.get_opt("web").await, Ok(None)).then_some(()) }).await;

    let _ = stop_tx.send(());
    tokio::time::timeout(DEADLINE, running)
        .await
        .expect("controller stops")
        .unwrap();
}

async fn poll<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
