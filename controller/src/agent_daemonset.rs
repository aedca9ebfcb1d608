//! The agent DaemonSet, created and kept by the controller (`--manage-agent`).
//! An OLM bundle cannot ship a DaemonSet, so with OLM this is the only way
//! the agents get installed; the Helm chart ships the DaemonSet itself.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tracing::{info, warn};

/// Field manager for the DaemonSet.
const MANAGER: &str = crd::keys::AGENT_DAEMONSET_MANAGER;

/// What the agent DaemonSet looks like.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub namespace: String,
    pub name: String,
    pub image: String,
    pub service_account: String,
    pub containerd_socket: String,
    pub registry_config_dir: String,
    pub mirror_config_dir: String,
    /// An empty directory on containerd's filesystem, for the disk guard.
    pub image_fs_probe: String,
    pub priority_class: String,
    /// Extra environment of the agents: the controller's own `OTEL_*`
    /// settings, so agents export traces where the controller does.
    pub env: Vec<(String, String)>,
}

impl AgentSpec {
    pub fn new(namespace: &str, image: &str) -> Self {
        AgentSpec {
            namespace: namespace.to_string(),
            name: "image-prefetch-agent".into(),
            image: image.to_string(),
            service_account: "image-prefetch-agent".into(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            registry_config_dir: "/etc/containerd/certs.d".into(),
            mirror_config_dir: "/var/lib/image-prefetch/hosts".into(),
            image_fs_probe: "/var/lib/containerd/.image-prefetch-df".into(),
            priority_class: "system-node-critical".into(),
            env: Vec::new(),
        }
    }

    /// Passes on the `OTEL_*` variables of `vars` (the controller's
    /// environment), except the service name, which is the agent's own.
    pub fn with_telemetry_env(mut self, vars: impl Iterator<Item = (String, String)>) -> Self {
        self.env
            .extend(vars.filter(|(k, _)| k.starts_with("OTEL_") && k != "OTEL_SERVICE_NAME"));
        self.env.sort();
        self
    }

    fn container_env(&self) -> Vec<serde_json::Value> {
        let mut env = vec![
            json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}),
            json!({"name": "LOG_FORMAT", "value": "json"}),
        ];
        env.extend(
            self.env
                .iter()
                .map(|(name, value)| json!({"name": name, "value": value})),
        );
        env
    }

    /// The DaemonSet, in the same shape as the Helm chart's.
    pub fn daemonset(&self) -> serde_json::Value {
        let labels = json!({"app.kubernetes.io/name": "image-prefetch", "app.kubernetes.io/component": "agent"});
        json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": labels},
            "spec": {
                "selector": {"matchLabels": labels},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": self.service_account,
                        "priorityClassName": self.priority_class,
                        "tolerations": [{"operator": "Exists"}],
                        "containers": [{
                            "name": "agent",
                            "image": self.image,
                            "args": [
                                format!("--containerd-socket={}", self.containerd_socket),
                                format!("--registry-config-dir={}", self.registry_config_dir),
                                format!("--mirror-config-dir={}", self.mirror_config_dir),
                                format!("--image-fs={}", self.image_fs_probe),
                            ],
                            "env": self.container_env(),
                            "securityContext": {
                                "runAsUser": 0,
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"},
                            },
                            "resources": {"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                            "ports": [{"name": "metrics", "containerPort": 8080}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 20},
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 10},
                            // Same paths inside as on the host: containerd reads them as host_dir.
                            "volumeMounts": [
                                {"name": "containerd-socket", "mountPath": self.containerd_socket},
                                {"name": "registry-config", "mountPath": self.registry_config_dir, "readOnly": true},
                                {"name": "mirror-config", "mountPath": self.mirror_config_dir},
                                {"name": "image-fs", "mountPath": self.image_fs_probe, "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "containerd-socket", "hostPath": {"path": self.containerd_socket, "type": "Socket"}},
                            {"name": "registry-config", "hostPath": {"path": self.registry_config_dir, "type": "DirectoryOrCreate"}},
                            {"name": "mirror-config", "hostPath": {"path": self.mirror_config_dir, "type": "DirectoryOrCreate"}},
                            {"name": "image-fs", "hostPath": {"path": self.image_fs_probe, "type": "DirectoryOrCreate"}},
                        ],
                    },
                },
            },
        })
    }
}

/// Applies the DaemonSet, then applies it again whenever it changes or is
/// deleted, until `shutdown`. An unchanged apply writes nothing, so this does
/// not feed itself.
pub async fn keep(
    client: kube::Client,
    spec: AgentSpec,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let api: Api<DaemonSet> = Api::namespaced(client, &spec.namespace);
    let params = PatchParams::apply(MANAGER).force();
    let desired = spec.daemonset();
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", spec.name));
    let mut events = watcher(api.clone(), wc)
        .backoff(crd::backoff::watch())
        .boxed();
    tokio::pin!(shutdown);
    loop {
        match api
            .patch(&spec.name, &params, &Patch::Apply(&desired))
            .await
        {
            Ok(_) => info!(daemonset = %spec.name, image = %spec.image, "agent DaemonSet in place"),
            Err(e) => {
                warn!(error = %e, "applying the agent DaemonSet failed; retrying on the next change")
            }
        }
        // Wait for a change worth re-applying: anything but our own initial sync.
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => break,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => warn!(error = %e, "watching the agent DaemonSet failed; retrying"),
                    None => return,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_export_traces_where_the_controller_does() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_SERVICE_NAME", "image-prefetch-controller"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.2"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let spec = AgentSpec::new("ns", "agent:1").with_telemetry_env(vars.into_iter());
        let ds = spec.daemonset();
        let env = &ds["spec"]["template"]["spec"]["containers"][0]["env"];
        let names: Vec<&str> = env
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "NODE_NAME",
                "LOG_FORMAT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_TRACES_SAMPLER_ARG"
            ]
        );
        assert_eq!(env[2]["value"], "http://collector:4317");
    }
}
