//! The administrator's allow-list of registries and repositories. Pure.

use crd::reference;

/// Registry or repository prefixes images must come from; empty allows all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    prefixes: Vec<String>,
}

impl AllowList {
    /// From a comma-separated list such as `registry.example.com,ghcr.io/team`.
    /// Entries are compared in the form [`path`] gives references: host in
    /// lowercase, Docker Hub's aliases as `docker.io`, no trailing `/`.
    pub fn parse(list: &str) -> Self {
        AllowList {
            prefixes: list
                .split(',')
                .map(entry)
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    /// The entries, as compared.
    pub fn entries(&self) -> &[String] {
        &self.prefixes
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Whether `image` may be pulled. A prefix matches whole path components:
    /// `registry.example.com/team` allows `registry.example.com/team/app`, not
    /// `registry.example.com/teammate/app`; a host allows that host and port
    /// only. Unparseable references are refused.
    pub fn allows(&self, image: &str) -> bool {
        if self.prefixes.is_empty() {
            return true;
        }
        let Some(path) = path(image) else {
            return false;
        };
        self.prefixes.iter().any(|p| {
            path == *p || (path.starts_with(p.as_str()) && path[p.len()..].starts_with('/'))
        })
    }
}

/// Docker Hub's other names, as containerd and docker normalise them.
const DOCKER_HUB_ALIASES: [&str; 2] = ["index.docker.io", "registry-1.docker.io"];

/// A host as compared: lowercase (host names are), Docker Hub by one name.
fn host(h: &str) -> String {
    let h = h.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&h.as_str()) {
        reference::DOCKER_HUB.to_string()
    } else {
        h
    }
}

/// An allow-list entry as compared: trimmed, without a trailing `/`, its host normalised.
fn entry(e: &str) -> String {
    let e = e.trim().trim_end_matches('/');
    match e.split_once('/') {
        Some((h, rest)) => format!("{}/{rest}", host(h)),
        None => host(e),
    }
}

/// `registry/repository` of an image, the way the allow-list sees it: tag
/// and digest dropped, host normalised, Docker Hub's official images under
/// `library/` however they are written.
pub fn path(image: &str) -> Option<String> {
    let r = reference::parse(image).ok()?;
    let registry = host(&r.registry);
    let repository = if registry == reference::DOCKER_HUB && !r.repository.contains('/') {
        format!("library/{}", r.repository)
    } else {
        r.repository
    };
    Some(format!("{registry}/{repository}"))
}

/// One table both enforcers of the allow-list are tested against: the
/// controller ([`AllowList::allows`]) and the chart's admission policy (CEL,
/// in `e2e/tests/chart.rs`), so that they cannot disagree.
pub mod examples {
    /// The allow-list the examples are judged by.
    pub const LIST: &[&str] = &[
        "registry.example.com",
        "ghcr.io/team/",
        "docker.io/library",
        "localhost:5000",
        "[::1]:5000",
        "Mixed.Example.com/apps",
    ];

    /// (image, allowed, why)
    pub const CASES: &[(&str, bool, &str)] = &[
        (
            "registry.example.com/team/app:1",
            true,
            "a host allows its paths",
        ),
        ("registry.example.com/app", true, "no tag"),
        (
            "registry.example.com/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            true,
            "a digest",
        ),
        (
            "registry.example.com/team/app:1@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            true,
            "a tag and a digest",
        ),
        (
            "registry.example.com:8443/team/app:1",
            false,
            "another port is another registry",
        ),
        (
            "registry.example.com.evil.example/app:1",
            false,
            "a longer host",
        ),
        (
            "REGISTRY.Example.COM/team/app:1",
            true,
            "hosts compare without case",
        ),
        ("ghcr.io/team/app:1", true, "an entry with a trailing slash"),
        (
            "ghcr.io/teammate/app:1",
            false,
            "a prefix matches whole components",
        ),
        ("ghcr.io/team:1", true, "an entry may name one repository"),
        ("busybox:1.36", true, "Docker Hub shorthand"),
        ("busybox", true, "Docker Hub shorthand, no tag"),
        (
            "docker.io/nginx:1",
            true,
            "explicit docker.io, official image",
        ),
        ("index.docker.io/nginx:1", true, "Docker Hub's legacy name"),
        (
            "INDEX.DOCKER.IO/library/nginx",
            true,
            "the legacy name in capitals",
        ),
        (
            "registry-1.docker.io/library/nginx:1",
            true,
            "Docker Hub's registry host",
        ),
        ("someone/busybox:1", false, "a Docker Hub user's image"),
        (
            "docker.io/someone/busybox:1",
            false,
            "the same, written out",
        ),
        ("localhost:5000/app:1", true, "localhost with a port"),
        ("localhost/app:1", false, "localhost without the port"),
        ("localhost:5001/app:1", false, "localhost, another port"),
        ("[::1]:5000/app:1", true, "IPv6 with a port"),
        ("[::1]:5001/app:1", false, "IPv6, another port"),
        (
            "mixed.example.com/apps/web:1",
            true,
            "an entry written with capitals",
        ),
        (
            "mixed.example.com/other:1",
            false,
            "outside the entry's path",
        ),
        ("elsewhere.example/app:1", false, "another registry"),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_allows_everything() {
        assert!(AllowList::parse("").allows("anything:1"));
        assert!(AllowList::parse(" , ").is_empty());
    }

    #[test]
    fn prefixes_match_whole_components() {
        let a = AllowList::parse("registry.example.com/team, ghcr.io/");
        assert!(a.allows("registry.example.com/team/app:1"));
        assert!(
            a.allows("registry.example.com/team/sub/app@sha256:0123456789abcdef0123456789abcdef")
        );
        assert!(!a.allows("registry.example.com/teammate/app:1"));
        assert!(!a.allows("registry.example.com/other:1"));
        assert!(a.allows("ghcr.io/x/y:1"));
        assert!(!a.allows("ghcr.io.evil.example/x:1"));
        assert!(!a.allows("busybox"));
    }

    #[test]
    fn every_shared_example_is_judged_as_the_table_says() {
        let list = AllowList::parse(&examples::LIST.join(","));
        for (image, allowed, why) in examples::CASES {
            assert_eq!(list.allows(image), *allowed, "{image}: {why}");
        }
    }

    #[test]
    fn docker_hub_shorthand_is_compared_canonically() {
        let a = AllowList::parse("docker.io/library");
        assert!(a.allows("busybox:1.36"));
        assert!(!a.allows("someone/busybox"));
    }
}
