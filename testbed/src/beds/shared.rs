//! One control plane per test process, shared by its tests.
//!
//! Starting etcd and kube-apiserver takes seconds; every test of a binary
//! uses the same pair and keeps to its own namespace and node labels. The
//! processes are started from a thread that lives as long as the test
//! process, so the kernel kills them (PR_SET_PDEATHSIG) when it ends, passed
//! or crashed.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::mpsc;

use crate::{ControlPlane, Lifetime};

/// What tests need to reach the shared control plane.
pub struct Shared {
    pub kubeconfig: PathBuf,
    pub server: String,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The shared control plane, started (with the CRDs installed) on first use.
/// Panics with the reason and what to do when it cannot start.
pub fn get() -> &'static Shared {
    let result = SHARED.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("testbed-keeper".into())
            .spawn(move || keeper(tx))
            .expect("spawn the test bed thread");
        rx.recv()
            .unwrap_or_else(|_| Err("test bed thread ended".into()))
    });
    match result {
        Ok(s) => s,
        Err(e) => panic!("test bed unavailable: {e}"),
    }
}

/// A cluster-admin client for the shared control plane.
pub async fn client() -> kube::Client {
    crate::servers::control_plane::client_from_kubeconfig(&get().kubeconfig)
        .await
        .expect("client for the shared test bed")
}

fn keeper(tx: mpsc::Sender<Result<Shared, String>>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    remove_leftovers();
    let dir = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
    let started = rt.block_on(async {
        let plane = ControlPlane::start(&dir, Lifetime::Owned).await?;
        crate::support::crds::install(&plane.client().await?).await?;
        Ok::<_, crate::Error>(plane)
    });
    match started {
        Ok(plane) => {
            eprintln!(
                "test bed: kube-apiserver ready in {:.1}s at {}",
                plane.startup.as_secs_f64(),
                plane.server
            );
            let _ = tx.send(Ok(Shared {
                kubeconfig: plane.kubeconfig.clone(),
                server: plane.server.clone(),
            }));
            // Holding `plane` here keeps the processes tied to this thread's life.
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            let _ = tx.send(Err(e.to_string()));
        }
    }
}

const PREFIX: &str = "image-prefetch-testbed-";

/// Test processes cannot clean up after themselves (statics are never
/// dropped): the next one removes the directories of those that have ended.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
