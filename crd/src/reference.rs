//! Image references: one grammar (that of the OCI distribution reference) used
//! twice: by the API server, as a CEL rule in the CRD schema, and by the
//! controller and agent through [`parse`]. Keeping one pattern string means the
//! two can never disagree about what a valid reference is.

use std::sync::LazyLock;

const DOMAIN_COMPONENT: &str = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const IPV6: &str = r"\[[a-fA-F0-9:]+\]";
const PORT: &str = r"[0-9]+";
const ALNUM: &str = r"[a-z0-9]+";
const SEPARATOR: &str = r"(?:[._]|__|[-]+)";
const TAG: &str = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}";
const DIGEST: &str = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";

/// Longest reference accepted (the schema's maxLength).
pub const MAX_LEN: usize = 512;

/// The whole-reference pattern, anchored, in the RE2 syntax that both CEL and
/// the `regex` crate accept. Capture groups: 1 domain, 2 path, 3 tag, 4 digest.
pub fn pattern() -> String {
    // The first component is a registry only when it looks like a host (a dot,
    // a port, `localhost`, an IPv6 literal), as docker and containerd decide it;
    // otherwise it is part of the repository, where uppercase is not allowed.
    let dc = DOMAIN_COMPONENT;
    let domain = format!("(?:(?:localhost|{dc}(?:\\.{dc})+|{IPV6})(?::{PORT})?|{dc}:{PORT})");
    let component = format!("{ALNUM}(?:{SEPARATOR}{ALNUM})*");
    let path = format!("{component}(?:/{component})*");
    format!("^(?:({domain})/)?({path})(?::({TAG}))?(?:@({DIGEST}))?$")
}

/// The message the API server returns for a reference that does not match.
pub const INVALID_MESSAGE: &str = "must be a valid image reference: [registry[:port]/]repository[:tag][@digest], \
     repository in lowercase, e.g. registry.example.com/team/app:1.0";

static RE: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(&pattern()).expect("reference pattern compiles"));

/// A parsed image reference, normalised the way containerd and kubelet do it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Registry host (with port), `docker.io` when the reference names none.
    pub registry: String,
    /// Repository path within the registry (`library/` added for Docker Hub).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct InvalidReference(pub String);

impl std::fmt::Display for InvalidReference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {INVALID_MESSAGE}", self.0)
    }
}

impl std::error::Error for InvalidReference {}

pub const DOCKER_HUB: &str = "docker.io";

/// Parses and normalises a reference (Docker Hub's implicit names filled in).
pub fn parse(s: &str) -> Result<Reference, InvalidReference> {
    let invalid = || InvalidReference(s.to_string());
    if s.len() > MAX_LEN {
        return Err(invalid());
    }
    let caps = RE.captures(s).ok_or_else(invalid)?;
    let mut path = caps[2].to_string();
    let tag = caps.get(3).map(|m| m.as_str().to_string());
    let digest = caps.get(4).map(|m| m.as_str().to_string());
    let registry = match caps.get(1).map(|m| m.as_str()) {
        None | Some("index.docker.io") | Some("registry-1.docker.io") => DOCKER_HUB.to_string(),
        Some(d) => d.to_string(),
    };
    if registry == DOCKER_HUB && !path.contains('/') {
        path = format!("library/{path}");
    }
    Ok(Reference {
        registry,
        repository: path,
        tag,
        digest,
    })
}

impl Reference {
    /// The fully qualified form containerd stores images under.
    pub fn canonical(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        } else if self.digest.is_none() {
            s.push_str(":latest");
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }
}

/// Examples both enforcers (the API server's CEL rule and [`parse`]) are
/// tested against, so that they are held to one list.
pub mod examples {
    pub const VALID: &[&str] = &[
        "busybox",
        "busybox:1.36",
        "library/busybox:latest",
        "ghcr.io/cybozu/ubuntu:24.04",
        "localhost:5000/app",
        "127.0.0.1:5000/team/app:v1.2.3-rc.1",
        "registry.example.com/a/b/c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "registry.example.com/a:tag@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "my-registry.local/a__b/c-d.e:Tag_1",
        "[::1]:5000/app:1",
    ];
    pub const INVALID: &[&str] = &[
        "UPPER/Case:tag",
        "Team/app",
        "foo:",
        "a b",
        "",
        "registry.example.com/App:1",
        "app:-tag",
        "app@sha256:short",
        "/app",
        "app/",
        "registry.example.com//app",
    ];
}

#[cfg(test)]
mod tests {
    use super::examples::{INVALID, VALID};
    use super::*;

    #[test]
    fn accepts_valid() {
        for r in VALID {
            assert!(parse(r).is_ok(), "{r} should be valid");
        }
    }

    #[test]
    fn rejects_invalid() {
        for r in INVALID {
            assert!(parse(r).is_err(), "{r} should be invalid");
        }
        assert!(parse(&format!("a:{}", "t".repeat(129))).is_err());
    }

    #[test]
    fn normalises_like_containerd() {
        let r = parse("busybox").unwrap();
        assert_eq!(r.canonical(), "docker.io/library/busybox:latest");
        let r = parse("team/app:1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "team/app")
        );
        let r = parse("localhost:5000/app").unwrap();
        assert_eq!(r.canonical(), "localhost:5000/app:latest");
        let r = parse("index.docker.io/x/y@sha256:0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(
            r.canonical(),
            "docker.io/x/y@sha256:0123456789abcdef0123456789abcdef"
        );
    }
}
