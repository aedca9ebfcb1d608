//! kubelet's credential-provider plugins (ECR, Artifact Registry, ACR and
//! others), run by the agent the way kubelet runs them: the node's
//! `CredentialProviderConfig` says which plugin answers for which images
//! (`matchImages`), the plugin is executed from the plugin directory with a
//! `CredentialProviderRequest` on its stdin and answers a
//! `CredentialProviderResponse` on its stdout, and each answer is kept for
//! its cache duration, per image, registry or globally as the plugin says.
//!
//! Off unless the administrator gives both files (`--image-credential-provider-config`,
//! `--image-credential-provider-bin-dir`, kubelet's own flag names). The
//! credentials go only to the registry hosts the plugin's answer names, as
//! with pull secrets ([`Keyring`]); nothing here prints them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use crate::credentials::{Credential, Keyring, host_glob_matches};

/// The longest a plugin may take to answer: kubelet sets none, but a hung
/// plugin must not hold a pull permit for ever.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of a plugin's answer read: logins for a few registries.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

const CONFIG_API_VERSIONS: &[&str] = &[
    "kubelet.config.k8s.io/v1",
    "kubelet.config.k8s.io/v1beta1",
    "kubelet.config.k8s.io/v1alpha1",
];
const PLUGIN_API_VERSIONS: &[&str] = &[
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("credential provider config {path}: {why}")]
    Config { path: String, why: String },
    #[error("credential provider {provider}: {why}")]
    Exec { provider: String, why: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderSpec {
    name: String,
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    /// Service-account-token plugins (kubelet 1.33+): not supported.
    token_attributes: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

/// One plugin, as configured.
#[derive(Debug)]
struct Provider {
    name: String,
    match_images: Vec<String>,
    default_cache: Duration,
    api_version: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    api_version: String,
    kind: String,
    cache_key_type: Option<String>,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, AuthConfig>,
}

#[derive(Deserialize)]
struct AuthConfig {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// An answer kept until it expires.
struct Cached {
    until: Instant,
    auth: Vec<(String, Credential)>,
}

/// The node's plugins and their answers.
pub struct Providers {
    providers: Vec<Provider>,
    bin_dir: PathBuf,
    /// By (plugin, cache key): the image, its registry, or "" (global).
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("providers", &self.providers)
            .field("bin_dir", &self.bin_dir)
            .finish_non_exhaustive()
    }
}

impl Providers {
    /// Reads and checks the node's `CredentialProviderConfig` (YAML or
    /// JSON): each plugin's executable must be in `bin_dir`.
    pub fn load(config: &Path, bin_dir: &Path) -> Result<Self, ProviderError> {
        let fail = |why: String| ProviderError::Config {
            path: config.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(config).map_err(|e| fail(e.to_string()))?;
        let file: ConfigFile = serde_yaml_ng::from_str(&text).map_err(|e| fail(e.to_string()))?;
        if file.kind != "CredentialProviderConfig"
            || !CONFIG_API_VERSIONS.contains(&file.api_version.as_str())
        {
            return Err(fail(format!(
                "is {} {}, not a kubelet CredentialProviderConfig",
                file.api_version, file.kind
            )));
        }
        let mut providers = Vec::new();
        for p in file.providers {
            let named = |why: &str| fail(format!("provider {}: {why}", p.name));
            if p.name.is_empty() || p.name.contains('/') || p.name == "." || p.name == ".." {
                return Err(named(
                    "the name must be a file name in the plugin directory",
                ));
            }
            if p.match_images.is_empty() {
                return Err(named("matchImages is empty"));
            }
            if !PLUGIN_API_VERSIONS.contains(&p.api_version.as_str()) {
                return Err(named(&format!(
                    "apiVersion {} is not one of {PLUGIN_API_VERSIONS:?}",
                    p.api_version
                )));
            }
            if p.token_attributes.is_some() {
                return Err(named(
                    "tokenAttributes (service-account-token plugins) is not supported by the agent",
                ));
            }
            let exe = bin_dir.join(&p.name);
            if !exe.is_file() {
                return Err(named(&format!("no executable {}", exe.display())));
            }
            let default_cache = match p.default_cache_duration.as_deref() {
                Some(d) => go_duration(d).ok_or_else(|| {
                    named(&format!("defaultCacheDuration {d:?} is not a duration"))
                })?,
                None => Duration::ZERO,
            };
            providers.push(Provider {
                name: p.name.clone(),
                match_images: p.match_images,
                default_cache,
                api_version: p.api_version,
                args: p.args,
                env: p.env.into_iter().map(|e| (e.name, e.value)).collect(),
            });
        }
        Ok(Providers {
            providers,
            bin_dir: bin_dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The credentials the plugins matching `image` (the reference as
    /// listed, of `registry` and `repository`) give, from the cache or by
    /// running them; and what failed. A plugin that fails adds nothing, as
    /// with kubelet: the pull goes on with whatever else it has.
    pub async fn keyring(
        &self,
        image: &str,
        registry: &str,
        repository: &str,
    ) -> (Keyring, Vec<ProviderError>) {
        let mut ring = Keyring::default();
        let mut failed = Vec::new();
        let target = format!("{registry}/{repository}");
        for p in &self.providers {
            if !p.match_images.iter().any(|m| image_matches(m, &target)) {
                continue;
            }
            match self.answer(p, image, registry).await {
                Ok(auth) => {
                    for (pattern, credential) in auth {
                        ring.add_scoped(&pattern, credential);
                    }
                }
                Err(e) => failed.push(e),
            }
        }
        (ring, failed)
    }

    async fn answer(
        &self,
        p: &Provider,
        image: &str,
        registry: &str,
    ) -> Result<Vec<(String, Credential)>, ProviderError> {
        let now = Instant::now();
        {
            let cache = self.cache.lock().expect("cache lock");
            for key in [image, registry, ""] {
                if let Some(c) = cache.get(&(p.name.clone(), key.to_string()))
                    && c.until > now
                {
                    return Ok(c.auth.clone());
                }
            }
        }
        let response = self.run(p, image).await?;
        let auth: Vec<(String, Credential)> = response
            .auth
            .into_iter()
            .map(|(pattern, a)| {
                (
                    pattern,
                    Credential::Basic {
                        username: a.username,
                        password: a.password,
                    },
                )
            })
            .collect();
        let keep = match response.cache_duration.as_deref() {
            Some(d) => go_duration(d).unwrap_or(Duration::ZERO),
            None => p.default_cache,
        };
        let key = match response.cache_key_type.as_deref() {
            Some("Registry") => registry,
            Some("Global") => "",
            _ => image,
        };
        let mut cache = self.cache.lock().expect("cache lock");
        cache.retain(|_, c| c.until > now);
        if !keep.is_zero() {
            cache.insert(
                (p.name.clone(), key.to_string()),
                Cached {
                    until: now + keep,
                    auth: auth.clone(),
                },
            );
        }
        Ok(auth)
    }

    async fn run(&self, p: &Provider, image: &str) -> Result<Response, ProviderError> {
        let fail = |why: String| ProviderError::Exec {
            provider: p.name.clone(),
            why,
        };
        let request = serde_json::json!({
            "apiVersion": p.api_version,
            "kind": "CredentialProviderRequest",
            "image": image,
        });
        let mut child = tokio::process::Command::new(self.bin_dir.join(&p.name))
            .args(&p.args)
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| fail(format!("cannot run it: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(request.to_string().as_bytes())
            .await
            .map_err(|e| fail(format!("writing the request: {e}")))?;
        drop(stdin);
        let output = tokio::time::timeout(EXEC_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| fail(format!("no answer within {EXEC_TIMEOUT:?}")))?
            .map_err(|e| fail(e.to_string()))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(fail(format!(
                "exited with {}: {}",
                output.status,
                crd::names::shortened(stderr.trim(), 256)
            )));
        }
        if output.stdout.len() > MAX_RESPONSE_BYTES {
            return Err(fail(format!(
                "answered {} bytes; at most {MAX_RESPONSE_BYTES} are read",
                output.stdout.len()
            )));
        }
        // serde_json's messages can quote the input: positions only.
        let response: Response = serde_json::from_slice(&output.stdout).map_err(|e| {
            fail(format!(
                "its answer is not a CredentialProviderResponse (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        if response.kind != "CredentialProviderResponse" || response.api_version != p.api_version {
            return Err(fail(format!(
                "answered {} {}, not a {} CredentialProviderResponse",
                response.api_version, response.kind, p.api_version
            )));
        }
        Ok(response)
    }
}

/// Whether `image` (`host[:port]/path…`, no scheme) matches a `matchImages`
/// entry as kubelet matches them: the host's labels one by one, each a glob
/// (`*.registry.io`, `registry.*.io`, `app*.registry.io`; one label per
/// glob), the port exactly, and the pattern's path a prefix of the image's.
pub fn image_matches(pattern: &str, image: &str) -> bool {
    let pattern = pattern
        .strip_prefix("https://")
        .or_else(|| pattern.strip_prefix("http://"))
        .unwrap_or(pattern);
    let (p_host, p_path) = pattern.split_once('/').unwrap_or((pattern, ""));
    let (i_host, i_path) = image.split_once('/').unwrap_or((image, ""));
    let p_path = p_path.trim_end_matches('/');
    host_glob_matches(p_host, i_host)
        && (p_path.is_empty() || i_path == p_path || i_path.starts_with(&format!("{p_path}/")))
}

/// A Go duration (`12h`, `1h30m`, `90s`, `1.5h`, `0`) as kubelet's
/// configuration writes it.
pub fn go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn match_images_as_kubelet_matches_them() {
        for (pattern, image, matches) in [
            (
                "*.dkr.ecr.*.amazonaws.com",
                "123.dkr.ecr.us-east-1.amazonaws.com/app",
                true,
            ),
            (
                "*.dkr.ecr.*.amazonaws.com",
                "dkr.ecr.us-east-1.amazonaws.com/app",
                false,
            ),
            ("*.azurecr.io", "team.azurecr.io/web/api", true),
            // One label per glob: *.io is not *.azurecr.io.
            ("*.io", "team.azurecr.io/web", false),
            ("app*.registry.io", "app1.registry.io/x", true),
            ("app*.registry.io", "web.registry.io/x", false),
            ("registry.io:5000", "registry.io:5000/x", true),
            ("registry.io:5000", "registry.io/x", false),
            ("registry.io", "registry.io:5000/x", false),
            ("registry.io/team", "registry.io/team/web", true),
            ("registry.io/team", "registry.io/teams/web", false),
            ("registry.io/team", "registry.io/team", true),
            ("https://registry.io", "registry.io/x", true),
        ] {
            assert_eq!(
                image_matches(pattern, image),
                matches,
                "{pattern} ~ {image}"
            );
        }
    }

    #[test]
    fn go_durations() {
        let secs = Duration::from_secs;
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("12h"), Some(secs(12 * 3600)));
        assert_eq!(go_duration("1h30m"), Some(secs(5400)));
        assert_eq!(go_duration("1.5h"), Some(secs(5400)));
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(go_duration(""), None);
        assert_eq!(go_duration("12"), None);
        assert_eq!(go_duration("12d"), None);
    }

    fn load(yaml: &str, executables: &[&str]) -> Result<Providers, ProviderError> {
        let dir = std::env::temp_dir().join(format!(
            "image-prefetch-providers-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for e in executables {
            std::fs::write(dir.join(e), "").unwrap();
        }
        let config = dir.join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let loaded = Providers::load(&config, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded
    }

    #[test]
    fn a_config_is_checked_when_loaded_naming_what_is_wrong() {
        let ok = "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: ecr-credential-provider\n  matchImages: ['*.dkr.ecr.*.amazonaws.com']\n  defaultCacheDuration: 12h\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n";
        let p = load(ok, &["ecr-credential-provider"]).unwrap();
        assert_eq!(p.providers[0].default_cache, Duration::from_secs(12 * 3600));
        let missing = load(ok, &[]).unwrap_err().to_string();
        assert!(missing.contains("no executable"), "{missing}");
        let token = load(
            &format!("{ok}  tokenAttributes: {{serviceAccountTokenAudience: x}}\n"),
            &["ecr-credential-provider"],
        )
        .unwrap_err()
        .to_string();
        assert!(token.contains("tokenAttributes"), "{token}");
        let escape = load(
            &ok.replace("name: ecr-credential-provider", "name: ../sh"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(escape.contains("file name"), "{escape}");
        let wrong = load(
            &ok.replace("kind: CredentialProviderConfig", "kind: Pod"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            wrong.contains("not a kubelet CredentialProviderConfig"),
            "{wrong}"
        );
    }
}
