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
    pub fn start(runtime: Runtime) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                match change {
                    Change::Pin(name) => {
                        if let Err(e) = runtime.pin(&name).await {
                            warn!(image = %name, error = %e, "could not pin the image against garbage collection");
                        }
                    }
                    Change::Release(name) => match runtime.unpin(&name).await {
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
