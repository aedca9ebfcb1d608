//! Installs the generated CRDs and waits until the API server serves them.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceValidation, JSONSchemaProps,
};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

use crate::{Error, Result};

/// Applies both CRDs (server-side) and waits for them to be Established.
pub async fn install(client: &kube::Client) -> Result<()> {
    install_these(client, generated()).await
}

fn generated() -> [CustomResourceDefinition; 2] {
    [
        <crd::ImagePrefetch as kube::CustomResourceExt>::crd(),
        <crd::NodeImageSet as kube::CustomResourceExt>::crd(),
    ]
}

/// Both CRDs with a schema that takes anything: what lets objects the real
/// schema refuses into storage, as an older release's CRD did (before its
/// bounds) and an API server before Kubernetes 1.36 does for `int32`
/// fields. For tests of what the binaries do with such objects; `install`
/// puts the real schema back (stored objects keep what they have).
pub async fn install_without_schema(client: &kube::Client) -> Result<()> {
    let mut crds = generated();
    for crd in &mut crds {
        for version in &mut crd.spec.versions {
            version.schema = Some(CustomResourceValidation {
                open_api_v3_schema: Some(JSONSchemaProps {
                    type_: Some("object".into()),
                    x_kubernetes_preserve_unknown_fields: Some(true),
                    ..Default::default()
                }),
            });
        }
    }
    install_these(client, crds).await
}

async fn install_these(client: &kube::Client, crds: [CustomResourceDefinition; 2]) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("image-prefetch-testbed").force();
    for crd in crds {
        let name = crd.metadata.name.clone().expect("generated CRDs are named");
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(Error::Kube(kube::Error::Service(Box::new(e))));
            }
            Err(_) => {
                return Err(Error::NotReady {
                    what: "CRD",
                    secs: 30,
                    log: name,
                });
            }
        }
    }
    Ok(())
}

/// A control plane of the test's own under `dir`, with the CRDs installed,
/// and a client for it.
pub async fn control_plane(dir: &std::path::Path) -> Result<(crate::ControlPlane, kube::Client)> {
    let plane = crate::ControlPlane::start(dir, crate::Lifetime::Owned).await?;
    let client = plane.client().await?;
    install(&client).await?;
    Ok((plane, client))
}

/// Applies (server-side) an ImagePrefetch `namespace/name` of `images` onto
/// the nodes with every label of `node_selector`.
pub async fn apply_prefetch(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    images: &[&str],
    node_selector: &[(&str, &str)],
) -> Result<crd::ImagePrefetch> {
    let api: Api<crd::ImagePrefetch> = Api::namespaced(client.clone(), namespace);
    let selector: serde_json::Map<String, serde_json::Value> = node_selector
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    let object = serde_json::json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"images": images, "nodeSelector": selector},
    });
    let params = PatchParams::apply("image-prefetch-testbed").force();
    Ok(api.patch(name, &params, &Patch::Apply(&object)).await?)
}
