//! End-to-end tests live in `tests/`: the Helm chart and the OLM bundle with
//! their real tools, the images run in containerd, and the binaries together
//! as processes (one trace through them, read back from Jaeger).

use std::path::PathBuf;

/// A binary of this workspace, built by `cargo test --workspace`.
pub fn binary(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name)
}
