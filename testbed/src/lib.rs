//! The test bed: real parts for tests, benchmarks and the demo, started and
//! stopped by the tests on loopback or in network namespaces of their own.
//!
//! - [`servers`]: the real parts one at a time (kube-apiserver, containerd,
//!   the registry, the peer-mirror stand-in for spegel, Jaeger, a slow link);
//! - [`beds`]: servers put together for one kind of test (the shared control
//!   plane, simulated nodes, the peer-mirror bed, the kubelet bed);
//! - [`builds`]: what is built rather than downloaded (fixtures from Go
//!   modules, test images, images of our binaries);
//! - [`support`]: helpers they share (processes, scratch directories, polls).

pub mod beds;
pub mod builds;
pub mod servers;
pub mod support;

pub use servers::control_plane::ControlPlane;
pub use support::process::Lifetime;

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
