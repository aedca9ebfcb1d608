//! helm (built from its Go module) against a test bed's API server, and the
//! project's chart.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The project's chart.
pub fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/image-prefetch")
}

/// The release name and namespace the tests install the chart as.
pub const RELEASE: &str = "image-prefetch";
pub const NAMESPACE: &str = "image-prefetch-system";

/// Runs helm with `args` against the API server of `kubeconfig`: whether it
/// succeeded, and what it printed.
pub fn run(kubeconfig: &Path, args: &[&str]) -> (bool, String) {
    let helm = crate::builds::fixtures::HELM
        .require()
        .expect("helm (cargo xtask fixtures)");
    let home = std::env::temp_dir().join(format!("image-prefetch-helm-{}", std::process::id()));
    crate::support::process::run(
        Command::new(helm)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            // helm's own state stays out of $HOME.
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data")),
    )
}

/// `helm install` of the chart as [`RELEASE`] into [`NAMESPACE`] (created),
/// without waiting for pods, with `extra` arguments (`--set`, `-f`, ...);
/// panics with helm's output when it fails.
pub fn install(kubeconfig: &Path, extra: &[&str]) {
    let chart = chart();
    let mut args = vec![
        "install",
        RELEASE,
        chart.to_str().expect("a UTF-8 path"),
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--wait=false",
    ];
    args.extend_from_slice(extra);
    let (ok, out) = run(kubeconfig, &args);
    assert!(ok, "helm install failed:\n{out}");
}
