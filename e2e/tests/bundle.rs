//! The OLM bundle against operator-framework's own validators (built from
//! their Go module), and one version across crates, chart and bundle.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn validate(bundle: &Path) -> (bool, String) {
    let tool = testbed::builds::fixtures::BUNDLE_VALIDATE
        .require()
        .expect("bundle-validate (cargo xtask fixtures)");
    testbed::support::process::run(Command::new(tool).arg(bundle).arg("1.33"))
}

#[test]
fn bundle_passes_the_operator_framework_validators() {
    let (ok, out) = validate(&root().join("bundle"));
    assert!(ok && out.contains("bundle is valid"), "{out}");
    assert!(!out.contains("ERROR"), "{out}");
}

#[test]
fn the_validators_catch_a_broken_bundle() {
    // Proof the check can fail: the same bundle without its install modes.
    let copy = testbed::support::workdir::Workdir::new("broken-bundle");
    for dir in ["manifests", "metadata"] {
        std::fs::create_dir_all(copy.join(dir)).unwrap();
        for entry in std::fs::read_dir(root().join("bundle").join(dir)).unwrap() {
            let entry = entry.unwrap();
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let text = text.replace("installModes:", "installModesRemoved:");
            std::fs::write(copy.join(dir).join(entry.file_name()), text).unwrap();
        }
    }
    let (ok, out) = validate(&copy);
    assert!(!ok, "a bundle without installModes passed:\n{out}");
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .map(|v| v.trim().trim_matches('"'))
        .unwrap_or_else(|| panic!("no {key}"))
}

#[test]
fn one_version_everywhere() {
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let version = field(&cargo, "version = ");
    let chart = std::fs::read_to_string(root().join("helm/image-prefetch/Chart.yaml")).unwrap();
    assert_eq!(field(&chart, "version:"), version, "Chart.yaml version");
    assert_eq!(
        field(&chart, "appVersion:"),
        version,
        "Chart.yaml appVersion"
    );
    let csv = std::fs::read_to_string(
        root().join("bundle/manifests/image-prefetch.clusterserviceversion.yaml"),
    )
    .unwrap();
    assert_eq!(field(&csv, "version:"), version, "CSV spec.version");
    assert_eq!(field(&csv, "name: image-prefetch.v"), version, "CSV name");
    assert!(
        csv.contains(&format!("image-prefetch-controller:{version}")),
        "CSV images carry {version}"
    );
}
