//! The API's validation against a real kube-apiserver (see the testbed crate).

mod support;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use serde_json::{Value, json};

use crd::reference;

use support::{apply as create, namespace, prefetch};

#[tokio::test]
async fn crds_are_established() {
    let client = testbed::beds::shared::client().await;
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
    let client = testbed::beds::shared::client().await;
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
    let client = testbed::beds::shared::client().await;
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
            // Past i32: the API server before 1.36 does not enforce
            // `format: int32` by itself, the schema's maximum does.
            json!({"images": ["a:1"], "replicas": 2147483648u64}),
            vec!["spec.replicas".into(), "less than or equal to".into()],
        ),
        (
            json!({"images": ["a:1"], "replicas": 100001}),
            vec!["spec.replicas".into(), "less than or equal to".into()],
        ),
        (
            json!({"images": ["a:1"], "nodeSelector": (0..33).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            vec!["spec.nodeSelector".into(), "at most 32".into()],
        ),
        (
            json!({"images": ["a:1"], "nodeSelector": {"k": "v".repeat(64)}}),
            vec!["spec.nodeSelector.k".into(), "63".into()],
        ),
        (
            json!({"images": ["a:1"], "imagePullSecrets": (0..17).map(|i| json!({"name": format!("s{i}")})).collect::<Vec<_>>()}),
            vec!["spec.imagePullSecrets".into(), "at most 16".into()],
        ),
        (
            json!({"images": ["a:1"], "imagePullSecrets": [{"name": "../kube-system/x"}]}),
            vec![
                "spec.imagePullSecrets[0].name".into(),
                "should match".into(),
            ],
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

/// What a node's token may write into its own NodeImageSets' status is
/// bounded too: out-of-range numbers, unknown states and huge strings are
/// refused naming the field, so none reaches the controller's cache.
#[tokio::test]
async fn bad_node_reports_are_rejected_naming_the_field() {
    use crd::{NodeImageSet, NodeImageSetSpec};
    use kube::api::{Patch, PatchParams, PostParams};

    let client = testbed::beds::shared::client().await;
    let api: Api<NodeImageSet> = Api::all(client);
    let set = NodeImageSet::new(
        "report-bounds",
        NodeImageSetSpec {
            node_name: "n1".into(),
            image_set: vec![],
            image_pull_secrets: vec![],
            image_download_retry_limit: 3,
            pull_stall_timeout_seconds: None,
            pin: None,
            unreadable: None,
        },
    );
    api.create(&PostParams::default(), &set).await.unwrap();
    let image = |extra: Value| {
        let mut r = json!({"name": "r.example/a:1", "state": "Pulling"});
        r.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"status": {"images": [r]}})
    };
    let cases = [
        (
            image(json!({"attempts": 2147483648u64})),
            "status.images[0].attempts",
        ),
        (image(json!({"attempts": -1})), "status.images[0].attempts"),
        (image(json!({"state": "Evicted"})), "status.images[0].state"),
        (
            image(json!({"sizeBytes": 1u64 << 51})),
            "status.images[0].sizeBytes",
        ),
        (
            image(json!({"progressBytes": -5})),
            "status.images[0].progressBytes",
        ),
        (
            image(json!({"pullDurationMillis": 1u64 << 40})),
            "status.images[0].pullDurationMillis",
        ),
        (
            image(json!({"lastError": "x".repeat(4096)})),
            "status.images[0].lastError",
        ),
        (
            image(json!({"reason": "x".repeat(65)})),
            "status.images[0].reason",
        ),
        (
            image(json!({"digest": format!("sha256:{}", "0".repeat(300))})),
            "status.images[0].digest",
        ),
        (json!({"status": {"available": 65}}), "status.available"),
        (json!({"status": {"total": -1}}), "status.total"),
        (
            json!({"status": {"images": (0..65).map(|i| json!({"name": format!("r.example/a:{i}"), "state": "Waiting"})).collect::<Vec<_>>()}}),
            "status.images",
        ),
    ];
    for (patch, field) in cases {
        let result = api
            .patch_status(
                "report-bounds",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
        match result {
            Ok(_) => panic!("{patch} was accepted"),
            Err(kube::Error::Api(e)) => {
                assert!(e.message.contains(field), "{field}: {}", e.message)
            }
            Err(other) => panic!("{other}"),
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
