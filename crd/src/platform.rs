//! The platform an image is pulled for: what a node's labels say
//! (`kubernetes.io/os`, `kubernetes.io/arch`), what the agent asks containerd
//! to fetch, and what picks a manifest out of an image index. One type for
//! the controller and the agent, so both mean the same thing by it.

use std::collections::BTreeMap;
use std::fmt;

/// Well-known node labels the kubelet sets.
pub const OS_LABEL: &str = "kubernetes.io/os";
pub const ARCH_LABEL: &str = "kubernetes.io/arch";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// `v8` for `arm64/v8`, ...; empty when unspecified.
    pub variant: String,
}

impl Platform {
    /// The platform this process runs on, in OCI's words.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: String::new(),
        }
    }

    /// `os/arch[/variant]`, as `--platform` and `docker` write it.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty())?;
        let architecture = parts.next().filter(|p| !p.is_empty())?;
        let variant = parts.next().unwrap_or_default();
        if parts.next().is_some() {
            return None;
        }
        Some(Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.into(),
        })
    }

    /// A node's platform from its labels; linux/amd64 where they are missing
    /// (what the kubelet reports for the vast majority of nodes).
    pub fn of_node(labels: &BTreeMap<String, String>) -> Self {
        Platform {
            os: labels
                .get(OS_LABEL)
                .cloned()
                .unwrap_or_else(|| "linux".into()),
            architecture: labels
                .get(ARCH_LABEL)
                .cloned()
                .unwrap_or_else(|| "amd64".into()),
            variant: String::new(),
        }
    }

    /// Whether an index entry's `platform` object is this platform (a
    /// variant is compared only when both name one).
    pub fn matches(&self, platform: &serde_json::Value) -> bool {
        let field = |k: &str| platform[k].as_str().unwrap_or_default();
        field("os") == self.os
            && field("architecture") == self.architecture
            && (self.variant.is_empty()
                || field("variant").is_empty()
                || field("variant") == self.variant)
    }

    /// The digest of this platform's manifest in an image index.
    pub fn select<'a>(&self, index: &'a serde_json::Value) -> Option<&'a str> {
        index["manifests"]
            .as_array()?
            .iter()
            .find(|m| self.matches(&m["platform"]))
            .and_then(|m| m["digest"].as_str())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if !self.variant.is_empty() {
            write!(f, "/{}", self.variant)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_prints() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(
            (p.architecture.as_str(), p.variant.as_str()),
            ("arm64", "v8")
        );
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        for bad in ["linux", "", "/amd64", "linux//", "a/b/c/d"] {
            assert_eq!(Platform::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn node_labels_name_the_platform() {
        let labels = [(ARCH_LABEL.to_string(), "arm64".to_string())].into();
        assert_eq!(Platform::of_node(&labels).to_string(), "linux/arm64");
        assert_eq!(
            Platform::of_node(&BTreeMap::new()).to_string(),
            "linux/amd64"
        );
    }

    #[test]
    fn selects_the_platforms_manifest() {
        let index = json!({"manifests": [
            {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": "sha256:b", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"digest": "sha256:c"},
        ]});
        let arm = Platform::parse("linux/arm64").unwrap();
        assert_eq!(arm.select(&index), Some("sha256:b"));
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().select(&index),
            Some("sha256:b")
        );
        assert_eq!(
            Platform::parse("linux/arm64/v7").unwrap().select(&index),
            None
        );
        assert_eq!(Platform::parse("linux/s390x").unwrap().select(&index), None);
    }
}
