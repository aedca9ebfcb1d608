//! The administrator's allow-list of registries and repositories. Pure.

use crd::reference;

/// Registry or repository prefixes images must come from; empty allows all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    prefixes: Vec<String>,
}

impl AllowList {
    /// From a comma-separated list such as `registry.example.com,ghcr.io/team`.
    /// Docker Hub shorthand (`docker.io/library/busybox`) is compared in its
    /// canonical form, as containerd would pull it.
    pub fn parse(list: &str) -> Self {
        AllowList {
            prefixes: list
                .split(',')
                .map(|p| p.trim().trim_end_matches('/').to_string())
                .filter(|p| !p.is_empty())
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// Whether `image` may be pulled. A prefix matches whole path components:
    /// `registry.example.com/team` allows `registry.example.com/team/app`, not
    /// `registry.example.com/teammate/app`. Unparseable references are refused.
    pub fn allows(&self, image: &str) -> bool {
        if self.prefixes.is_empty() {
            return true;
        }
        let Ok(r) = reference::parse(image) else {
            return false;
        };
        let path = format!("{}/{}", r.registry, r.repository);
        self.prefixes.iter().any(|p| {
            path == *p || (path.starts_with(p.as_str()) && path[p.len()..].starts_with('/'))
        })
    }
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
    fn docker_hub_shorthand_is_compared_canonically() {
        let a = AllowList::parse("docker.io/library");
        assert!(a.allows("busybox:1.36"));
        assert!(!a.allows("someone/busybox"));
    }
}
