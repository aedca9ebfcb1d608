//! The read side of the OCI distribution API as spegel parses it
//! (spegel v0.7.4 `pkg/oci/distribution.go`): what a request asks for, and its Range.

/// What a `/v2/...` request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The registry, from the `ns` query parameter.
    pub registry: String,
    pub repository: String,
    pub kind: Kind,
    /// A digest (`sha256:…`) or, for manifests, a tag.
    pub target: Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Digest(String),
    Tag(String),
}

impl Reference {
    /// The key peers advertise this content under: the digest, or
    /// `registry/repository:tag`.
    /// `registry/repo[:tag]`, what spegel's `registryFilters` are matched against.
    pub fn name(&self) -> String {
        match &self.target {
            Target::Digest(_) => format!("{}/{}", self.registry, self.repository),
            Target::Tag(t) => format!("{}/{}:{t}", self.registry, self.repository),
        }
    }

    pub fn key(&self) -> String {
        match &self.target {
            Target::Digest(d) => d.clone(),
            Target::Tag(t) => format!("{}/{}:{t}", self.registry, self.repository),
        }
    }
}

/// Parses `path` and `query`; `None` for anything spegel answers with an empty 404.
pub fn parse(path: &str, query: Option<&str>) -> Option<Reference> {
    let rest = path.strip_prefix("/v2/")?;
    let registry = query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("ns="))
        .filter(|ns| !ns.is_empty())?
        .to_string();
    let (repository, kind, target) = if let Some(i) = rest.rfind("/manifests/") {
        (&rest[..i], Kind::Manifest, &rest[i + "/manifests/".len()..])
    } else if let Some(i) = rest.rfind("/blobs/") {
        (&rest[..i], Kind::Blob, &rest[i + "/blobs/".len()..])
    } else {
        return None;
    };
    if !valid_repository(repository) {
        return None;
    }
    let target = if is_digest(target) {
        Target::Digest(target.to_string())
    } else if kind == Kind::Manifest && valid_tag(target) {
        Target::Tag(target.to_string())
    } else {
        return None;
    };
    Some(Reference {
        registry,
        repository: repository.to_string(),
        kind,
        target,
    })
}

pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// The OCI name grammar: lowercase components separated by `/`, each
/// alphanumerics joined by `.`, `_`, `__` or runs of `-`.
fn valid_repository(r: &str) -> bool {
    !r.is_empty()
        && r.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && c.bytes()
                    .last()
                    .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

/// A single `bytes=` range as written: `a-b`, `a-` or `-n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    From { start: u64, end: Option<u64> },
    Suffix(u64),
}

/// `None`: a malformed or multi-part range (spegel answers 404).
pub fn parse_range(header: &str) -> Option<Range> {
    let spec = header.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    if a.is_empty() {
        return Some(Range::Suffix(b.parse().ok()?));
    }
    let start = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some(Range::From { start, end })
}

impl Range {
    /// `(first, last)` byte within `size`, or `None` when the range does not
    /// start inside the content.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            Range::From { start, .. } if start >= size => None,
            Range::From { start, end } => Some((start, end.unwrap_or(size - 1).min(size - 1))),
            Range::Suffix(0) => None,
            Range::Suffix(n) => Some((size.saturating_sub(n), size - 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_the_three_shapes_and_requires_ns() {
        let r = parse("/v2/team/web/manifests/1.4.2", Some("ns=reg.example:5000")).unwrap();
        assert_eq!(r.kind, Kind::Manifest);
        assert_eq!(r.target, Target::Tag("1.4.2".into()));
        assert_eq!(r.key(), "reg.example:5000/team/web:1.4.2");
        let r = parse(
            &format!("/v2/library/nginx/blobs/{D}"),
            Some("ns=docker.io"),
        )
        .unwrap();
        assert_eq!((r.kind, r.key()), (Kind::Blob, D.to_string()));
        let r = parse(&format!("/v2/a/manifests/{D}"), Some("x=1&ns=r")).unwrap();
        assert_eq!(r.target, Target::Digest(D.into()));
        assert_eq!(parse("/v2/team/web/manifests/1", None), None);
        assert_eq!(parse("/v2/team/web/manifests/1", Some("ns=")), None);
    }

    #[test]
    fn rejects_bad_paths() {
        for p in [
            "/v2/team/web/tags/list",
            "/v2/Team/web/manifests/1",
            "/v2/team/web/blobs/latest",
            "/v2/team/web/blobs/sha256:abc",
            "/v2//manifests/1",
            "/v3/a/manifests/1",
        ] {
            assert_eq!(parse(p, Some("ns=r")), None, "{p}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("bytes=5-9"),
            Some(Range::From {
                start: 5,
                end: Some(9)
            })
        );
        assert_eq!(parse_range("bytes=5-").unwrap().resolve(10), Some((5, 9)));
        assert_eq!(
            parse_range("bytes=5-100").unwrap().resolve(10),
            Some((5, 9))
        );
        assert_eq!(parse_range("bytes=-3").unwrap().resolve(10), Some((7, 9)));
        assert_eq!(parse_range("bytes=10-").unwrap().resolve(10), None);
        assert_eq!(parse_range("bytes=0-1,3-4"), None);
        assert_eq!(parse_range("items=0-1"), None);
        assert_eq!(parse_range("bytes=9-3"), None);
    }
}
