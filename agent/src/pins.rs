//! The kubelet-GC pins the agent keeps on images, changed by one task in
//! the order the ledger decided them.
//!
//! Each pin and release is a read then a write of the image's labels. Run
//! side by side, a release decided before a pin could land after it (an
//! ImagePrefetch deleted and created again: the image reported Available
//! but left to garbage collection), or a pin after a release (a pin that
//! outlives every entry). One queue keeps them in decision order; the
//! periodic repair in `work.rs` puts right whatever changed behind the
//! agent's back.
//!
//! A sandbox (pause) image keeps CRI's pin when released: CRI pins its
//! sandbox image only when it pulls it, so one the agent prefetched ahead of
//! a containerd upgrade would otherwise be left to garbage collection, and
//! new pods could not start without the registry.

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::pull::Runtime;

#[derive(Debug)]
enum Change {
    Pin(String),
    Release(String),
    /// Answered once every change sent before it is made.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Sends pin changes to the one task that makes them.
#[derive(Clone)]
pub struct Pins {
    tx: mpsc::UnboundedSender<Change>,
}

impl Pins {
    /// Starts the task; it ends when every `Pins` is dropped.
    pub fn start(runtime: Runtime, sandbox: SandboxImages) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                match change {
                    Change::Pin(name) => {
                        if let Err(e) = runtime.pin(&name).await {
                            warn!(image = %name, error = %e, "could not pin the image against garbage collection");
                        }
                    }
                    Change::Release(name) => match runtime.unpin(&name, sandbox.holds(&name)).await
                    {
                        Ok(true) => {
                            info!(image = %name, "no longer prefetched here; released to kubelet's garbage collection")
                        }
                        Ok(false) => {}
                        Err(e) => warn!(image = %name, error = %e, "could not release the GC pin"),
                    },
                    Change::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Pins { tx }
    }

    /// Keeps `name` from kubelet's garbage collection (a no-op when pinned).
    pub fn pin(&self, name: String) {
        let _ = self.tx.send(Change::Pin(name));
    }

    /// Takes the agent's own pin off `name` (the image stays).
    pub fn release(&self, name: String) {
        let _ = self.tx.send(Change::Release(name));
    }

    /// Returns once every change sent before this call has been made.
    pub async fn flushed(&self) {
        let (done, made) = tokio::sync::oneshot::channel();
        if self.tx.send(Change::Flush(done)).is_ok() {
            let _ = made.await;
        }
    }
}

/// The repositories of sandbox images (`registry.k8s.io/pause`): any tag
/// or digest of them keeps CRI's pin.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxImages(Vec<String>);

impl SandboxImages {
    pub fn new(repositories: impl IntoIterator<Item = String>) -> Self {
        SandboxImages(
            repositories
                .into_iter()
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty())
                .map(|r| repository(&r).unwrap_or(r))
                .collect(),
        )
    }

    /// Whether `image` is one of them.
    pub fn holds(&self, image: &str) -> bool {
        repository(image).is_some_and(|r| self.0.contains(&r))
    }
}

impl Default for SandboxImages {
    /// Kubernetes' own pause image, CRI's default sandbox image.
    fn default() -> Self {
        SandboxImages::new(["registry.k8s.io/pause".to_string()])
    }
}

/// `registry/repository` of an image reference, canonical.
fn repository(image: &str) -> Option<String> {
    crd::reference::parse(image)
        .ok()
        .map(|r| format!("{}/{}", r.registry, r.repository))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_tag_or_digest_of_a_sandbox_repository_is_held() {
        let s = SandboxImages::default();
        assert!(s.holds("registry.k8s.io/pause:3.10"));
        assert!(s.holds(&format!("registry.k8s.io/pause@sha256:{}", "a".repeat(64))));
        assert!(!s.holds("registry.k8s.io/pause-not:3.10"));
        assert!(!s.holds("docker.io/library/busybox:1"));
        let own = SandboxImages::new(["mirror.lan:5000/k8s/pause".into(), " ".into()]);
        assert!(
            own.holds("mirror.lan:5000/k8s/pause:3.9") && !own.holds("registry.k8s.io/pause:3.10")
        );
        let hub = SandboxImages::new(["rancher/mirrored-pause".into()]);
        assert!(hub.holds("docker.io/rancher/mirrored-pause:3.6"));
    }
}
