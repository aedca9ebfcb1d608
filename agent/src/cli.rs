//! The agent's command line (clap): every flag with its default, its
//! environment fallback (the DaemonSet sets `NODE_NAME` from the downward
//! API) and its bounds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::work::Config;

/// Pulls the images of this node's NodeImageSets through the node's containerd.
///
/// Uses the in-cluster service account, or $KUBECONFIG outside a cluster.
#[derive(Parser, Debug)]
#[command(
    name = "image-prefetch-agent",
    version,
    // The last of a repeated flag wins, as a manifest overriding a default expects.
    args_override_self = true
)]
pub struct Cli {
    /// This node.
    #[arg(long, value_name = "NAME", env = "NODE_NAME", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub node_name: String,
    /// containerd's socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_socket: PathBuf,
    /// The node's registry hosts (containerd's config_path).
    #[arg(long, value_name = "DIR", default_value = "/etc/containerd/certs.d")]
    pub registry_config_dir: PathBuf,
    /// Where Mirror-only host files go.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/image-prefetch/hosts"
    )]
    pub mirror_config_dir: PathBuf,
    /// The hosts of the node's registry configuration that are the in-cluster
    /// mirror, comma-separated: URLs as hosts.toml names them, or :PORT for
    /// any host at that port (spegel's targets by default). Mirror pulls use
    /// these and no other host.
    #[arg(
        long,
        value_name = "LIST",
        env = "MIRROR_ENDPOINTS",
        default_value = ":30020,:30021"
    )]
    pub mirror_endpoints: String,
    /// Pulls at once.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub concurrency: u32,
    /// A pull attempt that fetched nothing new for S is ended and tried again
    /// (an ImagePrefetch's pullStallTimeoutSeconds overrides it); a pull that
    /// keeps moving is never cut.
    #[arg(long, value_name = "S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub stall_timeout_seconds: u64,
    /// The wall-clock limit of an attempt whose progress containerd does not
    /// report (CRI pulls on containerd 1.6).
    #[arg(long, value_name = "S", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub pull_timeout_seconds: u64,
    /// How often present images are re-checked.
    #[arg(long, value_name = "S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub resync_seconds: u64,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// An image that failed is tried again after S, doubling at each failure up to 10x.
    #[arg(long, value_name = "S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub failed_retry_seconds: u64,
    /// The node's image filesystem, containerd's root.
    #[arg(long, value_name = "PATH", default_value = "/var/lib/containerd")]
    pub image_fs: PathBuf,
    /// Start no pull while the image filesystem is fuller than N% (under
    /// kubelet's image GC high threshold of 85; 100: off).
    #[arg(long, value_name = "N", default_value_t = crate::disk::DEFAULT_HIGH_PERCENT,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub image_fs_high_percent: u8,
    /// A seed's bytes so far are reported at most every S.
    #[arg(long, value_name = "S", default_value_t = crate::ledger::PROGRESS_EVERY.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_seconds: u64,
    /// Repositories of sandbox (pause) images, comma-separated: released,
    /// they keep CRI's pin.
    #[arg(
        long,
        value_name = "LIST",
        env = "SANDBOX_IMAGES",
        default_value = "registry.k8s.io/pause"
    )]
    pub sandbox_images: String,
    /// The platform to pull for (default: this machine's); of an image index
    /// only this platform's content is fetched.
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform)]
    pub platform: Option<crd::platform::Platform>,
    /// The node's kubelet CredentialProviderConfig: its plugins give
    /// registry credentials to seeds' pulls, as they do to kubelet's
    /// (off when not given; needs --image-credential-provider-bin-dir).
    #[arg(
        long,
        value_name = "PATH",
        requires = "image_credential_provider_bin_dir"
    )]
    pub image_credential_provider_config: Option<PathBuf>,
    /// Where the credential-provider plugins' executables are.
    #[arg(
        long,
        value_name = "DIR",
        requires = "image_credential_provider_config"
    )]
    pub image_credential_provider_bin_dir: Option<PathBuf>,
}

fn platform(s: &str) -> Result<crd::platform::Platform, String> {
    crd::platform::Platform::parse(s).ok_or_else(|| "expected os/arch[/variant]".into())
}

fn list(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
}

impl Cli {
    /// The agent's settings; fails when a file a flag names cannot be used.
    pub fn config(self) -> Result<Config, String> {
        let secs = Duration::from_secs;
        let failed_first = secs(self.failed_retry_seconds);
        let credential_providers = match (
            &self.image_credential_provider_config,
            &self.image_credential_provider_bin_dir,
        ) {
            (Some(config), Some(bin_dir)) => Some(std::sync::Arc::new(
                crate::credential_providers::Providers::load(config, bin_dir)
                    .map_err(|e| format!("--image-credential-provider-config: {e}"))?,
            )),
            _ => None,
        };
        Ok(Config {
            credential_providers,
            containerd_socket: self.containerd_socket,
            node_hosts_dir: self.registry_config_dir,
            mirror_hosts_dir: self.mirror_config_dir,
            mirror_endpoints: crate::hosts::MirrorEndpoints::new(list(&self.mirror_endpoints)),
            concurrency: self.concurrency as usize,
            stall_timeout: secs(self.stall_timeout_seconds),
            pull_timeout: secs(self.pull_timeout_seconds),
            resync: secs(self.resync_seconds),
            metrics_addr: Some(self.metrics_addr),
            failed_backoff: crate::ledger::Backoff {
                first: failed_first,
                cap: failed_first * 10,
            },
            image_fs: self.image_fs,
            image_fs_high_percent: self.image_fs_high_percent,
            progress_every: secs(self.progress_seconds),
            sandbox_images: crate::pins::SandboxImages::new(list(&self.sandbox_images)),
            platform: self.platform.unwrap_or_else(crd::platform::Platform::host),
            ..Config::new(&self.node_name)
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("image-prefetch-agent").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        let e = parse(&["--node-name", "n", "--image-fs-high-percent", "101"]).unwrap_err();
        assert!(e.to_string().contains("--image-fs-high-percent"), "{e}");
        assert!(parse(&["--node-name", "n", "--concurrency", "0"]).is_err());
        assert!(parse(&["--node-name", "n", "--platform", "linux"]).is_err());
        assert!(parse(&["--node-name", ""]).is_err());
    }

    #[test]
    fn credential_plugins_need_both_files_and_a_bad_one_is_named() {
        let e = parse(&[
            "--node-name",
            "n",
            "--image-credential-provider-config",
            "/c.yaml",
        ])
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--image-credential-provider-bin-dir"),
            "{e}"
        );
        let e = parse(&[
            "--node-name",
            "n",
            "--image-credential-provider-config",
            "/nonexistent/config.yaml",
            "--image-credential-provider-bin-dir",
            "/nonexistent",
        ])
        .unwrap()
        .config()
        .unwrap_err();
        assert!(e.contains("--image-credential-provider-config"), "{e}");
        assert!(e.contains("/nonexistent/config.yaml"), "{e}");
        assert!(
            parse(&["--node-name", "n"])
                .unwrap()
                .config()
                .unwrap()
                .credential_providers
                .is_none()
        );
    }

    #[test]
    fn no_flags_give_the_defaults_the_agent_had() {
        let config = parse(&["--node-name", "n"]).unwrap().config().unwrap();
        let expected = Config::new("n");
        assert_eq!(config.node_name, "n");
        assert_eq!(config.concurrency, expected.concurrency);
        assert_eq!(config.pull_timeout, expected.pull_timeout);
        assert_eq!(config.stall_timeout, expected.stall_timeout);
        assert_eq!(config.resync, expected.resync);
        assert_eq!(config.failed_backoff, expected.failed_backoff);
        assert_eq!(config.progress_every, expected.progress_every);
        assert_eq!(config.image_fs_high_percent, expected.image_fs_high_percent);
        assert_eq!(config.mirror_endpoints, expected.mirror_endpoints);
        assert_eq!(config.sandbox_images, expected.sandbox_images);
        assert_eq!(config.containerd_socket, expected.containerd_socket);
    }
}
