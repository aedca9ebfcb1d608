//! The container images: assembled without a Docker daemon (buildah), pushed
//! to a real registry, pulled by containerd, and run.

use std::path::PathBuf;
use std::process::Command;

use testbed::servers::containerd::{Containerd, Flavor};
use testbed::servers::registry::Registry;
use testbed::support::workdir::Workdir;

fn ctr(node: &Containerd, args: &[&str]) -> (bool, String) {
    testbed::support::process::run(
        Command::new("ctr")
            .arg("--address")
            .arg(&node.socket)
            .args(["--namespace", "k8s.io"])
            .args(args),
    )
}

#[test]
fn images_build_push_pull_and_run() {
    let dir = Workdir::new("e2e-images");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    // containerd 1.6 from Debian, whose runc shim is installed with it.
    let node = Containerd::start_flavor(&dir.join("node"), Flavor::Debian16).unwrap();
    let binaries = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug");
    for name in ["image-prefetch-controller", "image-prefetch-agent"] {
        let local = testbed::builds::oci::build(
            &binaries.join(name),
            name,
            "test",
            testbed::builds::oci::NONROOT,
        )
        .unwrap();
        let remote = format!("{}/image-prefetch/{name}:test", registry.host);
        testbed::builds::oci::push(&local, &remote).unwrap();

        let (ok, out) = ctr(&node, &["images", "pull", "--plain-http", &remote]);
        assert!(ok, "pull {remote}: {out}");
        let id = format!("run-{name}");
        let (ok, out) = ctr(
            &node,
            &[
                "run",
                "--rm",
                &remote,
                &id,
                &format!("/usr/local/bin/{name}"),
                "--help",
            ],
        );
        assert!(ok, "{name} does not run in its image: {out}");
        assert!(out.contains("Usage:"), "{out}");
    }
}
