//! kubelet credential-provider plugins, run by the agent: a plugin of our
//! own (a shell script speaking the exec protocol: a
//! `CredentialProviderRequest` on stdin, a `CredentialProviderResponse` on
//! stdout) logs the seeds of a registry that wants a login in, with the
//! real agent, containerd and registry.
//!
//! What this does not prove: that the cloud providers' own plugins (ECR,
//! Artifact Registry, ACR) work here — they need their clouds' metadata
//! services and identities; nor anything about service-account-token
//! plugins (`tokenAttributes`), which the agent refuses at start-up.

mod support;

use std::sync::Arc;

use serde_json::json;

use agent::credential_providers::Providers;
use crd::{PullFailure, PullState};
use testbed::builds::images;
use testbed::servers::containerd::Containerd;
use testbed::servers::registry::Registry;
use testbed::support::workdir::Workdir;

use support::{MB, config, run, set, wait_status};

const PASSWORD: &str = "plugin-pw-5521";
const PLUGIN: &str = "test-credential-provider";

#[tokio::test]
async fn a_credential_plugin_logs_seeds_in_and_is_asked_once_per_cache_duration() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-credential-plugin");
    let registry =
        Registry::start_with_login(&dir.join("private"), "plugin-user", PASSWORD).unwrap();
    // A second registry the plugin does not answer for.
    let other = Registry::start_with_login(&dir.join("other"), "someone", "else-pw").unwrap();
    let login = Some(("plugin-user", PASSWORD));
    let work = dir.join("images");
    let first =
        images::build_and_push_as(&work, &registry.host, "team/first", "1", &[MB], login).unwrap();
    let second =
        images::build_and_push_as(&work, &registry.host, "team/second", "1", &[MB], login).unwrap();
    let elsewhere = images::build_and_push_as(
        &work,
        &other.host,
        "team/elsewhere",
        "1",
        &[MB],
        Some(("someone", "else-pw")),
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    node.configure_registry(&other.host, &[]).unwrap();

    // The plugin: answers with the login for the registry it is told of
    // (its configured environment), cached per registry for ten minutes,
    // and writes each request it gets to a log.
    let bin = dir.join("plugins");
    std::fs::create_dir_all(&bin).unwrap();
    let requests = dir.join("plugin-requests.log");
    std::fs::write(
        bin.join(PLUGIN),
        r#"#!/bin/sh
request=$(cat)
printf '%s\n' "$request" >> "$REQUEST_LOG"
printf '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"10m","auth":{"%s":{"username":"%s","password":"%s"}}}' \
  "$REGISTRY" "$LOGIN_USER" "$LOGIN_PASSWORD"
"#,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join(PLUGIN), std::fs::Permissions::from_mode(0o755)).unwrap();
    let provider_config = dir.join("credential-provider-config.yaml");
    std::fs::write(
        &provider_config,
        serde_yaml_ng::to_string(&json!({
            "apiVersion": "kubelet.config.k8s.io/v1",
            "kind": "CredentialProviderConfig",
            "providers": [{
                "name": PLUGIN,
                "matchImages": [registry.host],
                "defaultCacheDuration": "1m",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "env": [
                    {"name": "REQUEST_LOG", "value": requests.display().to_string()},
                    {"name": "REGISTRY", "value": registry.host},
                    {"name": "LOGIN_USER", "value": "plugin-user"},
                    {"name": "LOGIN_PASSWORD", "value": PASSWORD},
                ],
            }],
        }))
        .unwrap(),
    )
    .unwrap();

    let mut settings = config("plugin-node", &node, &dir);
    settings.credential_providers =
        Some(Arc::new(Providers::load(&provider_config, &bin).unwrap()));
    let (stop, running) = run(&client, settings);
    set(
        &client,
        "plugin-first",
        "plugin-node",
        json!([{"name": first.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    let st = wait_status(
        &client,
        "plugin-first",
        "Available with the plugin's login",
        |s| s.available == 1,
    )
    .await;
    assert_eq!(st.images[0].digest.as_deref(), Some(first.digest.as_str()));
    set(
        &client,
        "plugin-second",
        "plugin-node",
        json!([{"name": second.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    wait_status(
        &client,
        "plugin-second",
        "Available, the answer cached",
        |s| s.available == 1,
    )
    .await;
    // The registry the plugin does not match: no login, refused.
    set(
        &client,
        "plugin-elsewhere",
        "plugin-node",
        json!([{"name": elsewhere.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    let refused = wait_status(&client, "plugin-elsewhere", "Unauthorized", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    assert_eq!(refused.images[0].reason, Some(PullFailure::Unauthorized));

    // One request: the second image's registry answer came from the cache,
    // and the other registry's images are not the plugin's.
    let asked = std::fs::read_to_string(&requests).unwrap();
    let lines: Vec<&str> = asked.lines().collect();
    assert_eq!(lines.len(), 1, "{asked}");
    let request: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(request["kind"], "CredentialProviderRequest");
    assert_eq!(
        request["apiVersion"],
        "credentialprovider.kubelet.k8s.io/v1"
    );
    assert_eq!(request["image"], first.reference, "{request}");
    let _ = stop.send(());
    running.await.unwrap();
}
