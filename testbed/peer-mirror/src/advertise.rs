//! Keeps this node's advertisements in step with its containerd
//! (spegel v0.7.4 `pkg/state/state.go`): at start every blob fetched from a registry and
//! every tagged image; then each blob as containerd commits it (containerd ≥
//! 2.1's content events, so layers become findable one by one during a pull),
//! each tag as it is created, and withdrawals once an image is deleted and
//! containerd's garbage collection has removed its content.
//!
//! Without content events (containerd 2.0, which has no `/content/create`;
//! spegel v0.6–v0.7 on it) only the start-up listing and new tags are
//! advertised: a blob pulled later is not findable until a restart.
//! Tags that `registryFilters` match are never advertised.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;

use crate::routing::Directory;
use crate::store::{Change, Store, is_tag_name};

/// Runs until the process ends; re-subscribes (and re-lists) when the event
/// stream breaks, as after a containerd restart.
pub async fn run(store: Store, directory: Directory, settings: Advertising) {
    let mut advertised: HashSet<String> = HashSet::new();
    loop {
        if let Err(e) = follow(&store, &directory, &settings, &mut advertised).await {
            eprintln!("peer-mirror: containerd events: {e}; subscribing again");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What this node's spegel advertises.
pub struct Advertising {
    /// containerd ≥ 2.1 emits `/content/create`: blobs advertised as committed.
    pub content_events: bool,
    pub settings: crate::serve::Settings,
}

async fn follow(
    store: &Store,
    directory: &Directory,
    advertising: &Advertising,
    advertised: &mut HashSet<String>,
) -> Result<(), crate::store::Error> {
    let filtered =
        |key: &str| !key.starts_with("sha256:") && advertising.settings.filters_name(key);
    // Subscribe first, then list: nothing committed in between is missed.
    // containerd answers a subscription only with its first event, so the
    // subscription runs on its own task and hands the events over.
    let (tx, mut changes) = tokio::sync::mpsc::channel(1024);
    let subscriber = store.clone();
    let subscription = tokio::spawn(async move {
        let mut stream = Box::pin(subscriber.changes().await?);
        while let Some(change) = stream.next().await {
            if tx.send(change).await.is_err() {
                break;
            }
        }
        Ok::<(), crate::store::Error>(())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for key in store
        .sourced_content()
        .await?
        .into_iter()
        .chain(store.tagged_images().await?)
    {
        if !filtered(&key) && advertised.insert(key.clone()) {
            directory.advertise(key);
        }
    }
    while let Some(change) = changes.recv().await {
        match change {
            Change::Committed(_) if !advertising.content_events => {}
            Change::Committed(digest) => {
                // The source label is set just after the commit: look again briefly.
                for attempt in 0..10u64 {
                    match store.info(&digest).await? {
                        Some(blob) if !blob.sources.is_empty() => {
                            if advertised.insert(digest.clone()) {
                                directory.advertise(digest.clone());
                            }
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(10 + 10 * attempt)).await,
                    }
                }
            }
            Change::ImageCreated(name) if is_tag_name(&name) && !filtered(&name) => {
                if advertised.insert(name.clone()) {
                    directory.advertise(name);
                }
            }
            Change::ImageCreated(_) => {}
            Change::ImageDeleted(name) => {
                if advertised.remove(&name) {
                    directory.withdraw(&name);
                }
                // Wait for garbage collection, then withdraw what it removed.
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let digests: Vec<String> = advertised
                        .iter()
                        .filter(|k| k.starts_with("sha256:"))
                        .cloned()
                        .collect();
                    let mut gone = 0;
                    for d in digests {
                        if store.info(&d).await?.is_none() {
                            advertised.remove(&d);
                            directory.withdraw(&d);
                            gone += 1;
                        }
                    }
                    if gone > 0 {
                        break;
                    }
                }
            }
        }
    }
    match subscription.await {
        Ok(result) => result,
        Err(e) => Err(crate::store::Error::internal(e.to_string())),
    }
}
