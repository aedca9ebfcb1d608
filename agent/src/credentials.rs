//! Registry credentials from image pull secrets (`kubernetes.io/dockerconfigjson`
//! and the legacy `kubernetes.io/dockercfg`), matched to a registry host the
//! way kubelet matches them. Nothing here ever prints a secret: [`Credential`]
//! has no Debug or Display that shows it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde::Deserialize;

use crd::{PullFailure, SecretReference};

/// Most bytes one pull secret's data may hold: logins for many registries
/// fit many times over, and an agent holds at most one per pull at a time.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// One registry login.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Basic {
        username: String,
        password: String,
    },
    /// An identity (refresh) token for an OAuth2 token server.
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(<redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(
        "image pull secret {namespace}/{name} not found: create it, or remove it from the ImagePrefetch's imagePullSecrets"
    )]
    NotFound { namespace: String, name: String },
    #[error("image pull secret {namespace}/{name} cannot be used: {why}")]
    Invalid {
        namespace: String,
        name: String,
        why: String,
    },
    #[error("reading image pull secret {namespace}/{name}: {message}")]
    Api {
        namespace: String,
        name: String,
        message: String,
    },
}

impl CredentialError {
    pub fn reason(&self) -> PullFailure {
        match self {
            CredentialError::NotFound { .. } => PullFailure::SecretNotFound,
            CredentialError::Invalid { .. } => PullFailure::SecretInvalid,
            CredentialError::Api { .. } => PullFailure::SecretUnreadable,
        }
    }
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

#[derive(Deserialize, Default)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// Where a credential applies: a host (possibly `*.`-wildcarded, possibly
/// with a port) and an optional repository path prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scope {
    host: String,
    path: String,
}

/// Every credential of a node's referenced secrets, most specific first.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    entries: Vec<(Scope, Credential)>,
}

const DOCKER_HUB_HOSTS: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

fn normalise_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    if DOCKER_HUB_HOSTS.contains(&host.as_str()) {
        "docker.io".to_string()
    } else {
        host
    }
}

fn scope(key: &str) -> Scope {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = normalise_host(host);
    // Docker Hub's legacy key "https://index.docker.io/v1/" names the whole registry.
    let path = if host == "docker.io"
        && (path == "v1" || path == "v1/" || path == "v2" || path == "v2/")
    {
        ""
    } else {
        path.trim_end_matches('/')
    };
    Scope {
        host,
        path: path.to_string(),
    }
}

/// Whether `host` (`name[:port]`) falls under `pattern` as kubelet matches
/// registry hosts, for pull secrets' keys and credential plugins alike: the
/// port exactly, the name label by label, each pattern label a glob (`*`,
/// `app*`) that matches within one label.
pub fn host_glob_matches(pattern: &str, host: &str) -> bool {
    let split = |h: &str| -> (String, Option<String>) {
        match h.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
                (name.to_ascii_lowercase(), Some(port.to_string()))
            }
            _ => (h.to_ascii_lowercase(), None),
        }
    };
    let (p_name, p_port) = split(pattern);
    let (h_name, h_port) = split(host);
    if p_port != h_port {
        return false;
    }
    let p: Vec<&str> = p_name.split('.').collect();
    let h: Vec<&str> = h_name.split('.').collect();
    p.len() == h.len() && p.iter().zip(&h).all(|(a, b)| label_glob(a, b))
}

/// `*` in `pattern` matches any run of characters of `label`.
fn label_glob(pattern: &str, label: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == label,
        Some((head, tail)) => {
            let Some(rest) = label.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| label_glob(tail, &rest[i..]))
        }
    }
}

fn decode(entry: Entry) -> Result<Credential, String> {
    if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
        return Ok(Credential::IdentityToken(token));
    }
    if let (Some(username), Some(password)) = (entry.username.clone(), entry.password.clone())
        && !username.is_empty()
    {
        return Ok(Credential::Basic { username, password });
    }
    let auth = entry
        .auth
        .ok_or("an entry has neither auth, username/password nor identitytoken")?;
    let bytes = base64_decode(&auth).ok_or("an auth field is not base64")?;
    let text = String::from_utf8(bytes).map_err(|_| "an auth field is not UTF-8")?;
    let (username, password) = text
        .split_once(':')
        .ok_or("an auth field is not user:password")?;
    Ok(Credential::Basic {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// The `auth` field as Docker writes it (standard alphabet, padded), and as
/// hand-made secrets have it too: unpadded, URL-safe, wrapped in lines.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let clean: String = s
        .chars()
        .filter(|c| !c.is_ascii_whitespace() && *c != '=')
        .collect();
    STANDARD_NO_PAD
        .decode(&clean)
        .or_else(|_| URL_SAFE_NO_PAD.decode(&clean))
        .ok()
}

impl Keyring {
    /// Adds the credentials of one secret's data.
    fn add(&mut self, data: &BTreeMap<String, Vec<u8>>) -> Result<(), String> {
        // A registry login is a few hundred bytes; a Secret may be 1 MiB.
        let size: usize = data.values().map(Vec::len).sum();
        if size > MAX_SECRET_BYTES {
            return Err(format!(
                "it holds {size} bytes; a pull secret may hold at most {MAX_SECRET_BYTES}"
            ));
        }
        // serde_json's messages can quote the input, so only positions are reported.
        let auths: BTreeMap<String, Entry> = if let Some(json) = data.get(".dockerconfigjson") {
            serde_json::from_slice::<DockerConfigJson>(json)
                .map_err(|e| {
                    format!(
                        ".dockerconfigjson is not valid JSON (line {}, column {})",
                        e.line(),
                        e.column()
                    )
                })?
                .auths
        } else if let Some(json) = data.get(".dockercfg") {
            serde_json::from_slice(json).map_err(|e| {
                format!(
                    ".dockercfg is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                )
            })?
        } else {
            return Err("it has neither .dockerconfigjson nor .dockercfg".into());
        };
        for (key, entry) in auths {
            self.entries.push((scope(&key), decode(entry)?));
        }
        // Longest path first: a repository-specific login wins over a registry-wide one.
        self.sort();
        Ok(())
    }

    /// Reads the referenced secrets. Each is read by name: the agent lists
    /// and watches no secrets.
    /// Reads the secrets one after another (one Secret in memory at a time
    /// besides the keyring).
    pub async fn load(
        client: &kube::Client,
        refs: &[SecretReference],
    ) -> Result<Keyring, CredentialError> {
        let mut ring = Keyring::default();
        for r in refs {
            let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
            let secret = match api.get_opt(&r.name).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    return Err(CredentialError::NotFound {
                        namespace: r.namespace.clone(),
                        name: r.name.clone(),
                    });
                }
                Err(e) => {
                    return Err(CredentialError::Api {
                        namespace: r.namespace.clone(),
                        name: r.name.clone(),
                        message: e.to_string(),
                    });
                }
            };
            let data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            ring.add(&data).map_err(|why| CredentialError::Invalid {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                why,
            })?;
        }
        Ok(ring)
    }

    /// The credential for `host` (as containerd contacts it) and `repository`.
    pub fn lookup(&self, host: &str, repository: &str) -> Option<&Credential> {
        let host = normalise_host(host);
        self.entries
            .iter()
            .find(|(s, _)| {
                host_glob_matches(&s.host, &host)
                    && (s.path.is_empty()
                        || repository == s.path
                        || repository.starts_with(&format!("{}/", s.path)))
            })
            .map(|(_, c)| c)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds one credential for `key` (a registry host, wildcards allowed,
    /// with an optional repository path), as a credential plugin answers.
    pub fn add_scoped(&mut self, key: &str, credential: Credential) {
        self.entries.push((scope(key), credential));
        self.sort();
    }

    /// Adds every credential of `other` after this keyring's own: for
    /// equally specific scopes, this keyring's win.
    pub fn merge(&mut self, other: Keyring) {
        self.entries.extend(other.entries);
        self.sort();
    }

    /// Longest path first (a stable sort: among equals, the first added).
    fn sort(&mut self) {
        self.entries
            .sort_by_key(|(scope, _)| std::cmp::Reverse(scope.path.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(json: &str) -> Keyring {
        let mut r = Keyring::default();
        r.add(&[(".dockerconfigjson".to_string(), json.as_bytes().to_vec())].into())
            .unwrap();
        r
    }

    fn basic(u: &str, p: &str) -> Credential {
        Credential::Basic {
            username: u.into(),
            password: p.into(),
        }
    }

    /// A tenant cannot make every agent it targets hold megabytes per
    /// secret: past 64 KiB a secret is refused, saying why.
    #[test]
    fn an_oversized_secret_is_refused() {
        let mut r = Keyring::default();
        let json = format!(
            r#"{{"auths":{{"r.example":{{"auth":"dTpw"}}}},"pad":"{}"}}"#,
            "x".repeat(MAX_SECRET_BYTES)
        );
        let why = r
            .add(&[(".dockerconfigjson".to_string(), json.into_bytes())].into())
            .unwrap_err();
        assert!(why.contains("at most 65536"), "{why}");
        assert!(r.is_empty());
    }

    #[test]
    fn auth_field_and_username_password_both_work() {
        // "dXNlcjpzM2NyM3Q=" is "user:s3cr3t"
        let r = ring(
            r#"{"auths":{"registry.example.com":{"auth":"dXNlcjpzM2NyM3Q="},"other.example.com":{"username":"u","password":"p"}}}"#,
        );
        assert_eq!(
            r.lookup("registry.example.com", "team/app"),
            Some(&basic("user", "s3cr3t"))
        );
        assert_eq!(r.lookup("other.example.com", "x"), Some(&basic("u", "p")));
        assert_eq!(r.lookup("third.example.com", "x"), None);
    }

    #[test]
    fn docker_hub_aliases_match_each_other() {
        let r =
            ring(r#"{"auths":{"https://index.docker.io/v1/":{"username":"hub","password":"p"}}}"#);
        assert!(
            r.lookup("registry-1.docker.io", "library/busybox")
                .is_some()
        );
        assert!(r.lookup("docker.io", "library/busybox").is_some());
    }

    #[test]
    fn ports_paths_and_wildcards_match_like_kubelet() {
        let r = ring(
            r#"{"auths":{
            "registry.example.com:5000":{"username":"port","password":"p"},
            "registry.example.com/team":{"username":"team","password":"p"},
            "registry.example.com":{"username":"all","password":"p"},
            "*.example.org":{"username":"wild","password":"p"}}}"#,
        );
        assert_eq!(
            r.lookup("registry.example.com:5000", "x"),
            Some(&basic("port", "p"))
        );
        assert_eq!(
            r.lookup("registry.example.com", "team/app"),
            Some(&basic("team", "p"))
        );
        assert_eq!(
            r.lookup("registry.example.com", "teammate/app"),
            Some(&basic("all", "p"))
        );
        assert_eq!(r.lookup("a.example.org", "x"), Some(&basic("wild", "p")));
        assert_eq!(r.lookup("a.b.example.org", "x"), None);
    }

    #[test]
    fn identity_tokens_and_legacy_dockercfg() {
        let mut r = Keyring::default();
        r.add(
            &[(
                ".dockercfg".to_string(),
                br#"{"quay.example.com":{"identitytoken":"tok"}}"#.to_vec(),
            )]
            .into(),
        )
        .unwrap();
        assert_eq!(
            r.lookup("quay.example.com", "x"),
            Some(&Credential::IdentityToken("tok".into()))
        );
    }

    #[test]
    fn malformed_secrets_say_why_without_their_content() {
        let mut r = Keyring::default();
        let err = r
            .add(
                &[(
                    ".dockerconfigjson".to_string(),
                    br#"{"auths":{"h":{"auth":"!!!s3cr3t"}}}"#.to_vec(),
                )]
                .into(),
            )
            .unwrap_err();
        assert!(err.contains("base64") && !err.contains("s3cr3t"), "{err}");
        let err = r
            .add(&[("other".to_string(), b"x".to_vec())].into())
            .unwrap_err();
        assert!(err.contains(".dockerconfigjson"), "{err}");
        let shown = format!("{:?}", basic("user", "s3cr3t"));
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
