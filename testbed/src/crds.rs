//! Installs the generated CRDs and waits until the API server serves them.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

use crate::{Error, Result};

/// Applies both CRDs (server-side) and waits for them to be Established.
pub async fn install(client: &kube::Client) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("image-prefetch-testbed").force();
    for crd in [
        <crd::ImagePrefetch as kube::CustomResourceExt>::crd(),
        <crd::NodeImageSet as kube::CustomResourceExt>::crd(),
    ] {
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
