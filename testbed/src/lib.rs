//! A real local control plane for tests and the demo: etcd and kube-apiserver
//! on 127.0.0.1, built from their official sources and cached outside the clone.

pub mod api_metrics;
pub mod cluster;
pub mod containerd;
pub mod control_plane;
pub mod crds;
pub mod fixtures;
pub mod helm;
pub mod images;
pub mod jaeger;
pub mod netns;
pub mod nodes;
pub mod oci;
pub mod peer_cluster;
pub mod peer_mirror;
pub mod poll;
pub mod process;
pub mod registry;
pub mod simulated;
pub mod slow_link;

pub use control_plane::ControlPlane;
pub use process::Lifetime;

/// Everything that can go wrong bringing the test bed up, each with what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} is not installed at {path}: run `cargo xtask fixtures` to build it")]
    MissingFixture { what: &'static str, path: String },
    #[error("{0} not found on PATH: run `cargo xtask deps` (installs Debian packages) first")]
    MissingTool(&'static str),
    #[error("building {what} failed: {detail}")]
    Build { what: &'static str, detail: String },
    #[error("{what} did not become ready within {secs}s; its log is {log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("{what} exited early ({status}); its log is {log}")]
    Exited {
        what: &'static str,
        status: String,
        log: String,
    },
    #[error("i/o on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

pub mod shared;
pub mod workdir;
