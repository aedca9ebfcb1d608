//! Names and label values that stay within Kubernetes limits for any input length.

/// A DNS-1123 subdomain (what most object names are, Secrets' among them).
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS-1123 label (what a namespace's name is).
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;
/// Longest object name (DNS subdomain) Kubernetes accepts.
pub const MAX_NAME: usize = 253;

/// 64-bit FNV-1a: stable across processes and releases, which `std`'s hasher is not.
pub fn stable_hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0u8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Cuts `s` to at most `max` bytes and drops trailing separators, so that a
/// suffix can follow and the result stays a valid DNS subdomain / label value.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].trim_end_matches(['-', '.', '_'])
}

/// `text` in at most `max` bytes: itself when it fits, else cut on a
/// character boundary and ended with " …", so a reader sees it was cut.
pub fn shortened(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MORE: &str = " …";
    let mut end = max.saturating_sub(MORE.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MORE}", &text[..end])
}

/// A label value for `s`: `s` itself when it fits, else a readable prefix and a hash.
pub fn label_value(s: &str) -> String {
    if s.len() <= MAX_LABEL_VALUE {
        return s.to_string();
    }
    let h = hex(stable_hash(&[s]));
    format!("{}-{h}", cut(s, MAX_LABEL_VALUE - h.len() - 1))
}

/// Name of the NodeImageSet of one (ImagePrefetch, node) pair.
///
/// Readable (`<prefetch>-<node>-<hash>`) and always a valid DNS subdomain of at
/// most 253 characters; the hash covers the owner's uid so that a re-created
/// ImagePrefetch never adopts the NodeImageSets of a predecessor still being deleted.
pub fn node_image_set_name(prefetch_name: &str, prefetch_uid: &str, node: &str) -> String {
    let h = hex(stable_hash(&[prefetch_uid, node]));
    let readable = format!("{prefetch_name}-{node}");
    format!("{}-{h}", cut(&readable, MAX_NAME - h.len() - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Kubernetes' own rule (IsDNS1123Subdomain): length and characters, no per-label limit.
    fn is_dns_subdomain(s: &str) -> bool {
        s.len() <= MAX_NAME
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }

    #[test]
    fn short_values_are_kept() {
        assert_eq!(label_value("worker-1"), "worker-1");
    }

    #[test]
    fn long_values_are_hashed_within_limits() {
        let long = "a".repeat(200);
        let v = label_value(&long);
        assert!(v.len() <= MAX_LABEL_VALUE, "{v}");
        assert_ne!(label_value(&long), label_value(&"a".repeat(201)));
    }

    #[test]
    fn names_are_dns_subdomains_for_any_length() {
        let dotted_node = format!("{}.example.com", "n".repeat(62));
        for (name, node) in [
            ("p", "w1"),
            (&*"x".repeat(253), &*"y".repeat(253)),
            (
                &*"a.".repeat(120).trim_end_matches('.').to_string(),
                &*dotted_node,
            ),
            ("p", &*format!("{}.{}", "z".repeat(63), "q".repeat(63))),
        ] {
            let n = node_image_set_name(name, "0f5d6a4e-1111-2222-3333-444455556666", node);
            assert!(is_dns_subdomain(&n), "{n}");
        }
    }

    #[test]
    fn names_differ_by_uid_and_node() {
        let a = node_image_set_name("p", "uid-1", "w1");
        assert_eq!(a, node_image_set_name("p", "uid-1", "w1"));
        assert_ne!(a, node_image_set_name("p", "uid-2", "w1"));
        assert_ne!(a, node_image_set_name("p", "uid-1", "w2"));
        assert!(a.starts_with("p-w1-"));
    }
}
