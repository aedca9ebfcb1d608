//! The Debian packages the build and the tests need, installed when missing.

use std::process::Command;

use anyhow::{Result, bail};

/// (package, why). The build needs protoc (containerd-client's generated
/// gRPC code); the test bed needs the rest (and Go, for the fixtures).
const PACKAGES: &[(&str, &str)] = &[
    (
        "protobuf-compiler",
        "protoc, for containerd-client's and k8s-cri's builds",
    ),
    (
        "etcd-server",
        "etcd, the API server's store in the test bed",
    ),
    ("openssl", "the test bed's service-account key"),
    (
        "docker-registry",
        "the OCI registries the agent tests pull from",
    ),
    ("skopeo", "pushes the test images built by the test bed"),
    (
        "apache2-utils",
        "htpasswd, for the test registry that wants a login",
    ),
    (
        "containerd",
        "containerd 1.6 for the CRI fallback tests, and ctr",
    ),
    ("runc", "runs the built images in the image test"),
    (
        "buildah",
        "builds the container images without a Docker daemon",
    ),
    (
        "iproute2",
        "ip netns, for the network namespaces of the cluster test bed",
    ),
    (
        "util-linux",
        "nsenter, to start processes in those namespaces",
    ),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn install() -> Result<()> {
    for (p, why) in PACKAGES.iter().filter(|(p, _)| !installed(p)) {
        eprintln!("deps: installing {p} ({why})");
    }
    let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    install_packages(&names)?;
    check_kubectl()
}

/// kubectl comes with the machine (Debian's own kubernetes-client, 1.20, is
/// too old for the test bed's API server to be a fallback); the kubectl
/// tests are written against what 1.32 prints.
fn check_kubectl() -> Result<()> {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    let Some(out) = out else {
        bail!(
            "kubectl is not on PATH: the end-to-end tests drive it; install kubectl 1.32 or newer"
        );
    };
    let version: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let minor: u32 = version["clientVersion"]["minor"]
        .as_str()
        .and_then(|m| m.trim_end_matches('+').parse().ok())
        .unwrap_or(0);
    if minor < 32 {
        bail!("kubectl 1.{minor} is too old for the test bed's API server: install 1.32 or newer");
    }
    Ok(())
}

/// Installs those of `packages` that are missing.
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| -> Result<()> {
        let mut cmd = Command::new(sudo.first().copied().unwrap_or("apt-get"));
        if !sudo.is_empty() {
            cmd.arg("apt-get");
        }
        let status = cmd
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if !status.success() {
            bail!(
                "apt-get {} failed ({status}); install {} by hand",
                args.join(" "),
                missing.join(" ")
            );
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
