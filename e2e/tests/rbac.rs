//! Least privilege, proven: the chart installed with helm into an API server
//! of its own (its RBAC and admission policies are cluster-wide), the
//! controller and an agent run as processes with tokens of the chart's own
//! ServiceAccounts (TokenRequest; the agent's bound to its Node, as a pod's
//! projected token is), through a whole rollout of a private image with a
//! pull secret. Then what they must not do, each refused by the API server
//! with 403.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crd::{ImagePrefetch, NodeImageSet};
use testbed::ControlPlane;
use testbed::beds::simulated::{Binary, CONTROLLER, Mirror, NodeSetup, Registries, SimulatedNode};
use testbed::servers::registry::{Registry, pull_secret};
use testbed::support::poll::eventually;

const RELEASE_NS: &str = testbed::support::helm::NAMESPACE;
const TEAM: &str = "team-rbac";
const MB: usize = 1 << 20;

/// A token of the chart's ServiceAccount `name`, bound to `node` when given
/// (name and uid), written into a kubeconfig; and a client using it.
async fn identity(
    plane: &ControlPlane,
    admin: &kube::Client,
    name: &str,
    node: Option<(&str, &str)>,
) -> (std::path::PathBuf, kube::Client) {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            bound_object_ref: node.map(|(name, uid)| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
            }),
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), RELEASE_NS)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("a token")
        .token;
    let file = match node {
        Some((n, _)) => format!("{name}-{n}.kubeconfig"),
        None => format!("{name}.kubeconfig"),
    };
    let path = plane.dir.join(file);
    plane.kubeconfig_with_token(&token, &path).unwrap();
    let client = testbed::servers::control_plane::client_from_kubeconfig(&path)
        .await
        .unwrap();
    (path, client)
}

fn code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Ok(v) => panic!("allowed, expected a refusal: {v:?}"),
        Err(kube::Error::Api(e)) => e.code,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_identities_carry_a_rollout_and_nothing_more() {
    let work = testbed::support::workdir::Workdir::new("e2e-rbac");
    let (plane, admin) = testbed::support::crds::control_plane(&work.join("cluster"))
        .await
        .expect("control plane");
    testbed::support::helm::install(&plane.kubeconfig, &[]);

    // A private image, its pull secret, and a secret no ImagePrefetch names.
    let registry = Registry::start_with_login(&work.join("registry"), "puller", "s3cret").unwrap();
    let image = testbed::builds::images::build_and_push_as(
        &work.join("images"),
        &registry.host,
        "team/private",
        "1",
        &[MB],
        Some(("puller", "s3cret")),
    )
    .unwrap();
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": TEAM}})).unwrap(),
        )
        .await
        .unwrap();
    let admin_secrets: Api<Secret> = Api::namespaced(admin.clone(), TEAM);
    for s in [
        pull_secret("regcred", &registry.host, "puller", "s3cret"),
        pull_secret("unrelated", "elsewhere.example", "someone", "other"),
    ] {
        admin_secrets
            .create(&PostParams::default(), &s)
            .await
            .unwrap();
    }

    // Identities: the controller's, and one agent token per node, bound to it.
    let labels = [("pool".to_string(), "rbac".to_string())].into();
    let node_a = testbed::support::nodes::register(&admin, "rbac-node-a", &labels)
        .await
        .unwrap();
    let node_b = testbed::support::nodes::register(&admin, "rbac-node-b", &Default::default())
        .await
        .unwrap();
    let uid = |n: &k8s_openapi::api::core::v1::Node| n.metadata.uid.clone().unwrap();
    let (controller_config, controller) =
        identity(&plane, &admin, "image-prefetch-controller", None).await;
    let (agent_a_config, agent_a) = identity(
        &plane,
        &admin,
        "image-prefetch-agent",
        Some(("rbac-node-a", &uid(&node_a))),
    )
    .await;

    // Node B's NodeImageSet, and a report on it that node A must not be able to write.
    let admin_sets: Api<NodeImageSet> = Api::all(admin.clone());
    let other = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "metadata": {"name": "rbac-other-node", "labels": {crd::keys::NODE: "rbac-node-b"}},
        "spec": {"nodeName": "rbac-node-b", "imageSet": [{"name": image.reference, "registryPolicy": "Default"}]},
    });
    admin_sets
        .patch(
            "rbac-other-node",
            &PatchParams::apply("test"),
            &Patch::Apply(&other),
        )
        .await
        .unwrap();
    let forged = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "status": {"available": 1, "total": 1, "images": [{"name": image.reference,
            "state": "Available", "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}]},
    });
    // Node B's report, as written with `client`.
    let write_report = |client: kube::Client| {
        let forged = forged.clone();
        async move {
            Api::<NodeImageSet>::all(client)
                .patch_status(
                    "rbac-other-node",
                    &PatchParams::apply("image-prefetch-agent").force(),
                    &Patch::Apply(&forged),
                )
                .await
        }
    };
    // The chart's admission policies take a moment to be enforced after
    // install: wait until each refuses what it is there to refuse.
    let (_, unbound) = identity(&plane, &admin, "image-prefetch-agent", None).await;
    let probe_ns = "rbac-probe";
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": probe_ns}})).unwrap(),
        )
        .await
        .unwrap();
    let widened = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": controller::pull_secrets::NAME},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}],
    });
    let probe_roles: Api<Role> = Api::namespaced(controller.clone(), probe_ns);
    eventually(
        "the chart's admission policies enforced",
        Duration::from_secs(30),
        || async {
            let node_bound = matches!(
                write_report(unbound.clone()).await,
                Err(kube::Error::Api(e)) if e.code == 403
            );
            let shaped = matches!(
                probe_roles
                    .patch(
                        controller::pull_secrets::NAME,
                        &PatchParams::apply("image-prefetch-controller").force(),
                        &Patch::Apply(&widened),
                    )
                    .await,
                Err(kube::Error::Api(e)) if e.code == 403
            );
            (node_bound && shaped).then_some(())
        },
    )
    .await;

    // The product, under those identities, with the arguments the chart gives.
    let _controller = Binary::start(
        CONTROLLER,
        &[
            "--agent-service-account",
            &format!("{RELEASE_NS}/image-prefetch-agent"),
        ],
        &controller_config,
        None,
        &work.join("controller.log"),
    )
    .expect("controller (built by cargo test --workspace)");
    let _node = SimulatedNode::start(
        &work.join("nodes"),
        &admin,
        &agent_a_config,
        NodeSetup {
            name: "rbac-node-a",
            labels,
            mirror: Mirror::Registries(Registries {
                upstream: &registry.host,
                mirrors: &[],
            }),
            platform: None,
            jaeger: None,
        },
    )
    .await
    .expect("a simulated node (agent built by cargo test --workspace)");

    // The whole rollout: a private image with its pull secret.
    let prefetches: Api<ImagePrefetch> = Api::namespaced(admin.clone(), TEAM);
    let prefetch = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": "private"},
        "spec": {"images": [image.reference], "imagePullSecrets": [{"name": "regcred"}],
                 "nodeSelector": {"pool": "rbac"}},
    });
    prefetches
        .patch(
            "private",
            &PatchParams::apply("test"),
            &Patch::Apply(&prefetch),
        )
        .await
        .unwrap();
    eventually(
        "the private image Ready",
        Duration::from_secs(90),
        || async {
            let p = prefetches.get("private").await.ok()?;
            let ready = p
                .status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        },
    )
    .await;

    // The agent: the named secret, nothing else of Secrets.
    let agent_secrets: Api<Secret> = Api::namespaced(agent_a.clone(), TEAM);
    agent_secrets
        .get("regcred")
        .await
        .expect("the agent reads the secret an ImagePrefetch names");
    assert_eq!(
        code(agent_secrets.get("unrelated").await),
        403,
        "a secret nobody names"
    );
    assert_eq!(
        code(agent_secrets.list(&Default::default()).await),
        403,
        "listing secrets"
    );
    let elsewhere: Api<Secret> = Api::namespaced(agent_a.clone(), RELEASE_NS);
    assert_eq!(
        code(elsewhere.list(&Default::default()).await),
        403,
        "secrets of another namespace"
    );

    // The agent writes its own node's reports only.
    assert_eq!(
        code(write_report(agent_a.clone()).await),
        403,
        "node A's agent writing node B's report"
    );
    // The same token of node B's agent may (the policy is no blanket ban).
    let (_, agent_b) = identity(
        &plane,
        &admin,
        "image-prefetch-agent",
        Some(("rbac-node-b", &uid(&node_b))),
    )
    .await;
    write_report(agent_b)
        .await
        .expect("node B's agent writes node B's report");
    // A token bound to no node is refused outright.
    assert_eq!(
        code(write_report(unbound).await),
        403,
        "an agent token bound to no node"
    );

    // The controller reads no Secret, and grants nothing but the one grant.
    let controller_secrets: Api<Secret> = Api::namespaced(controller.clone(), TEAM);
    assert_eq!(
        code(controller_secrets.get("regcred").await),
        403,
        "the controller reading a secret"
    );
    let roles: Api<Role> = Api::namespaced(controller.clone(), TEAM);
    let apply = PatchParams::apply("image-prefetch-controller").force();
    let role = |name: &str, names: Option<Vec<&str>>| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                       "resourceNames": names}],
        })
    };
    assert_eq!(
        code(
            roles
                .patch(
                    "other",
                    &apply,
                    &Patch::Apply(role("other", Some(vec!["regcred"])))
                )
                .await
        ),
        403,
        "a Role of another name"
    );
    assert_eq!(
        code(
            roles
                .patch(
                    controller::pull_secrets::NAME,
                    &apply,
                    &Patch::Apply(role(controller::pull_secrets::NAME, None))
                )
                .await
        ),
        403,
        "the grant widened to every secret"
    );
    let bindings: Api<RoleBinding> = Api::namespaced(controller.clone(), TEAM);
    let to_itself = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": controller::pull_secrets::NAME},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": controller::pull_secrets::NAME},
        "subjects": [{"kind": "ServiceAccount", "name": "image-prefetch-controller", "namespace": RELEASE_NS}],
    });
    assert_eq!(
        code(
            bindings
                .patch(
                    controller::pull_secrets::NAME,
                    &apply,
                    &Patch::Apply(to_itself)
                )
                .await
        ),
        403,
        "the grant bound to the controller itself"
    );

    // The ImagePrefetch goes: so does the agent's access to its secret.
    prefetches
        .delete("private", &Default::default())
        .await
        .unwrap();
    eventually("the grant withdrawn", Duration::from_secs(30), || async {
        match agent_secrets.get("regcred").await {
            Err(kube::Error::Api(e)) if e.code == 403 => Some(()),
            _ => None,
        }
    })
    .await;
}
