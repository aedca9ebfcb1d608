//! The API's validation against a real kube-apiserver (see the testbed crate).

mod support;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use serde_json::{Value, json};

use crd::reference;

use support::{apply as create, namespace, prefetch};

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
