//! Media types as spegel reports them: read from the bytes, not from
//! containerd's metadata (spegel v0.7.4 `FingerprintMediaType`).

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const EMPTY_JSON: &str = "application/vnd.oci.empty.v1+json";
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Content above this size is not parsed: a layer.
pub const MAX_PARSED: u64 = 4 << 20;

/// The media type of content of `size` bytes starting with `bytes` (all of
/// it when `size <= MAX_PARSED`).
pub fn media_type(size: u64, bytes: &[u8]) -> String {
    if size > MAX_PARSED {
        return OCTET_STREAM.into();
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return OCTET_STREAM.into();
    };
    let Some(o) = v.as_object() else {
        return OCTET_STREAM.into();
    };
    if o.is_empty() {
        return EMPTY_JSON.into();
    }
    if o.get("schemaVersion").and_then(|s| s.as_i64()) == Some(2)
        && let Some(t) = o.get("mediaType").and_then(|t| t.as_str())
    {
        return t.to_string();
    }
    if o.contains_key("manifests") {
        OCI_INDEX.into()
    } else if o.contains_key("config") && o.contains_key("layers") {
        OCI_MANIFEST.into()
    } else if o.contains_key("architecture") && o.contains_key("os") && o.contains_key("rootfs") {
        OCI_CONFIG.into()
    } else {
        OCTET_STREAM.into()
    }
}

pub fn is_manifest(media_type: &str) -> bool {
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST].contains(&media_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let t = |s: &str| media_type(s.len() as u64, s.as_bytes());
        assert_eq!(t(r#"{"schemaVersion":2,"mediaType":"x/y"}"#), "x/y");
        assert_eq!(t(r#"{"schemaVersion":2,"manifests":[]}"#), OCI_INDEX);
        assert_eq!(
            t(r#"{"schemaVersion":2,"config":{},"layers":[]}"#),
            OCI_MANIFEST
        );
        assert_eq!(
            t(r#"{"architecture":"amd64","os":"linux","rootfs":{}}"#),
            OCI_CONFIG
        );
        assert_eq!(t("{}"), EMPTY_JSON);
        assert_eq!(media_type(4, &[0x1f, 0x8b, 8, 0]), OCTET_STREAM);
        assert_eq!(media_type(5 << 20, b"{}"), OCTET_STREAM);
        assert!(is_manifest(OCI_INDEX) && !is_manifest(OCI_CONFIG));
    }
}
