//! The agent's access to pull secrets, narrowed to the secrets that
//! ImagePrefetches name: per namespace, a Role that lets the agent `get`
//! exactly those secrets (by `resourceNames`) and a RoleBinding of it to the
//! agent's ServiceAccount, kept by the controller as ImagePrefetches come and
//! go. The agent can list no Secret, and read none that no ImagePrefetch
//! names. The controller itself reads no Secret: it may write only this Role
//! and RoleBinding (RBAC `escalate` and `bind` on that one name), and the
//! chart's admission policy holds what it writes to exactly this shape (see
//! `docs/decisions.md`, "Pull-secret access").

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};

use crd::{ImagePrefetch, keys};

/// Name of the Role and RoleBinding in each namespace with pull secrets.
pub const NAME: &str = "image-prefetch-pull-secrets";

/// The agent's ServiceAccount: who gets the access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grantee {
    pub namespace: String,
    pub name: String,
}

impl Grantee {
    /// From `namespace/name`.
    pub fn parse(s: &str) -> Option<Self> {
        let (namespace, name) = s.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| Grantee {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

/// The pull secrets of ServiceAccounts, by (namespace, name), as last read.
pub type AccountSecrets = HashMap<(String, String), Vec<String>>;

/// How long one read of a ServiceAccount serves: a rollout to 5,000 nodes
/// reconciles its ImagePrefetch once per agent report, and a read at each
/// was a GET each. A changed account is followed within this much.
pub const ACCOUNT_FRESH_FOR: Duration = Duration::from_secs(10);

/// When each ServiceAccount, by (namespace, name), was last read and found.
#[derive(Debug, Default)]
pub struct AccountReads(HashMap<(String, String), Instant>);

impl AccountReads {
    /// Whether `key` was read less than [`ACCOUNT_FRESH_FOR`] before `now`.
    pub fn fresh(&self, key: &(String, String), now: Instant) -> bool {
        self.0
            .get(key)
            .is_some_and(|at| now.saturating_duration_since(*at) < ACCOUNT_FRESH_FOR)
    }

    /// Records a read of `key` at `now`; reads no longer fresh are dropped,
    /// so accounts no ImagePrefetch names any more are not kept.
    pub fn read(&mut self, key: (String, String), now: Instant) {
        self.0
            .retain(|_, at| now.saturating_duration_since(*at) < ACCOUNT_FRESH_FOR);
        self.0.insert(key, now);
    }

    /// Forgets `key`: it was not found, and is read again next time.
    pub fn forget(&mut self, key: &(String, String)) {
        self.0.remove(key);
    }
}

/// The secrets of `namespace` that its ImagePrefetches (those not being
/// deleted) name — themselves, or through their ServiceAccount — sorted.
pub fn named<'a>(
    namespace: &str,
    prefetches: impl IntoIterator<Item = &'a ImagePrefetch>,
    accounts: &AccountSecrets,
) -> Vec<String> {
    let names: BTreeSet<String> = prefetches
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .flat_map(|p| {
            let own = p.spec.image_pull_secrets.iter().map(|s| s.name.clone());
            let account = p
                .spec
                .service_account_name
                .as_ref()
                .and_then(|a| accounts.get(&(namespace.to_string(), a.clone())))
                .into_iter()
                .flatten()
                .cloned();
            own.chain(account).collect::<Vec<_>>()
        })
        .collect();
    names.into_iter().collect()
}

fn meta(namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(NAME.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(
            [(
                keys::MANAGED_BY.to_string(),
                keys::CONTROLLER_MANAGER.to_string(),
            )]
            .into(),
        ),
        ..Default::default()
    }
}

/// The Role: `get` on exactly `secrets`.
pub fn role(namespace: &str, secrets: &[String]) -> Role {
    Role {
        metadata: meta(namespace),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["get".into()],
            resource_names: Some(secrets.to_vec()),
            ..Default::default()
        }]),
    }
}

/// The RoleBinding of the Role to the agent.
pub fn binding(namespace: &str, agent: &Grantee) -> RoleBinding {
    RoleBinding {
        metadata: meta(namespace),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: NAME.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: agent.name.clone(),
            namespace: Some(agent.namespace.clone()),
            ..Default::default()
        }]),
    }
}

/// Makes `namespace`'s grant say `secrets`: written when there are any,
/// removed when there are none.
pub async fn write(
    client: &kube::Client,
    namespace: &str,
    secrets: &[String],
    agent: &Grantee,
) -> Result<(), kube::Error> {
    let roles: Api<Role> = Api::namespaced(client.clone(), namespace);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
    if secrets.is_empty() {
        for result in [
            bindings
                .delete(NAME, &DeleteParams::default())
                .await
                .map(|_| ()),
            roles
                .delete(NAME, &DeleteParams::default())
                .await
                .map(|_| ()),
        ] {
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(());
    }
    let params = PatchParams::apply(keys::CONTROLLER_MANAGER).force();
    let mut role = role(namespace, secrets);
    role.metadata.namespace = None;
    roles
        .patch(NAME, &params, &Patch::Apply(typed(role)))
        .await?;
    bindings
        .patch(
            NAME,
            &params,
            &Patch::Apply(typed(binding(namespace, agent))),
        )
        .await?;
    Ok(())
}

/// An object with its apiVersion and kind, as server-side apply needs.
fn typed<K: kube::Resource<DynamicType = ()> + serde::Serialize>(object: K) -> serde_json::Value {
    let mut v = serde_json::to_value(&object).expect("RBAC objects serialise");
    v["apiVersion"] = K::api_version(&()).into();
    v["kind"] = K::kind(&()).into();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd::{ImagePrefetchSpec, LocalSecretReference};

    fn prefetch(namespace: &str, secrets: &[&str], deleting: bool) -> ImagePrefetch {
        let mut p = ImagePrefetch::new(
            "p",
            ImagePrefetchSpec {
                image_pull_secrets: secrets
                    .iter()
                    .map(|s| LocalSecretReference {
                        name: s.to_string(),
                    })
                    .collect(),
                ..ImagePrefetchSpec::of_images(&["registry.example.com/app:1"])
            },
        );
        p.metadata.namespace = Some(namespace.into());
        if deleting {
            p.metadata.deletion_timestamp = Some(crd::condition::now());
        }
        p
    }

    #[test]
    fn only_secrets_live_prefetches_of_the_namespace_name_are_granted() {
        let all = [
            prefetch("team-a", &["regcred", "other"], false),
            prefetch("team-a", &["regcred"], false),
            prefetch("team-a", &["leaving"], true),
            prefetch("team-b", &["theirs"], false),
        ];
        let none = AccountSecrets::new();
        assert_eq!(named("team-a", &all, &none), ["other", "regcred"]);
        assert_eq!(named("team-b", &all, &none), ["theirs"]);
        assert!(named("team-c", &all, &none).is_empty());
        // A ServiceAccount's secrets are granted as if the spec named them.
        let mut with_account = prefetch("team-c", &[], false);
        with_account.spec.service_account_name = Some("builder".into());
        let accounts = AccountSecrets::from([
            (("team-c".into(), "builder".into()), vec!["sa-cred".into()]),
            (
                ("team-d".into(), "builder".into()),
                vec!["not-theirs".into()],
            ),
        ]);
        assert_eq!(named("team-c", &[with_account], &accounts), ["sa-cred"]);
    }

    #[test]
    fn the_role_grants_get_on_the_named_secrets_only_to_the_agent() {
        let role = role("team-a", &["regcred".into()]);
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].verbs, ["get"]);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["secrets".to_string()][..])
        );
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["regcred".to_string()][..])
        );
        let agent = Grantee::parse("image-prefetch-system/image-prefetch-agent").unwrap();
        let b = binding("team-a", &agent);
        assert_eq!(b.role_ref.name, NAME);
        let subjects = b.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].name, "image-prefetch-agent");
        assert_eq!(
            subjects[0].namespace.as_deref(),
            Some("image-prefetch-system")
        );
        assert!(Grantee::parse("no-slash").is_none());
    }

    #[test]
    fn a_service_account_read_serves_for_ten_seconds() {
        let t0 = Instant::now();
        let key = ("team".to_string(), "builder".to_string());
        let mut reads = AccountReads::default();
        assert!(!reads.fresh(&key, t0), "never read");
        reads.read(key.clone(), t0);
        assert!(reads.fresh(&key, t0 + Duration::from_secs(9)));
        assert!(!reads.fresh(&key, t0 + ACCOUNT_FRESH_FOR));
        // Another read drops the stale one.
        let other = ("team".to_string(), "other".to_string());
        reads.read(other.clone(), t0 + ACCOUNT_FRESH_FOR);
        assert_eq!(reads.0.len(), 1);
        reads.forget(&other);
        assert!(!reads.fresh(&other, t0 + ACCOUNT_FRESH_FOR));
    }
}
