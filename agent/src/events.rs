//! containerd's image-delete events, so a prefetched image that is removed
//! (by hand, or by a GC that ignored the pin) is pulled again at once.
//!
//! The subscription is re-made whenever the stream ends or fails (containerd
//! restarted, socket replaced), with backoff; after every (re)subscription a
//! full presence check covers what happened while nobody listened.

use std::path::PathBuf;
use std::time::Duration;

use containerd_client::services::v1::ImageDelete;
use containerd_client::services::v1::SubscribeRequest;
use containerd_client::services::v1::events_client::EventsClient;
use prost::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::pull::K8S_NAMESPACE;

/// What the watcher tells the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// This image was deleted.
    Deleted(String),
    /// (Re)subscribed: deletions may have been missed, check everything.
    CheckAll,
}

const RETRY: crd::backoff::Doubling =
    crd::backoff::Doubling::new(Duration::from_millis(200), Duration::from_secs(10));
const SUBSCRIBE_SETTLE: Duration = Duration::from_millis(100);

/// Starts the watcher; it stops when the receiver is dropped.
pub fn watch(socket: PathBuf) -> mpsc::Receiver<Notice> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut delay = RETRY.first;
        while !tx.is_closed() {
            match subscribe(&socket, &tx, &mut delay).await {
                Ok(()) => debug!("containerd event stream ended; subscribing again"),
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "containerd event stream failed; subscribing again")
                }
            }
            tokio::time::sleep(delay).await;
            delay = RETRY.next(Some(delay));
        }
    });
    rx
}

async fn subscribe(
    socket: &std::path::Path,
    tx: &mpsc::Sender<Notice>,
    delay: &mut Duration,
) -> Result<(), String> {
    let channel = containerd_client::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let request = SubscribeRequest {
        filters: vec![format!(
            "topic==\"/images/delete\",namespace==\"{K8S_NAMESPACE}\""
        )],
    };
    // containerd answers a subscription only with its first event, so the
    // response cannot tell when the subscription is in place. Give the request
    // a moment to reach the server, then check everything: a deletion from
    // then on is seen by the stream, one before it by the check.
    let mut events = EventsClient::new(channel);
    let subscription = events.subscribe(request);
    tokio::pin!(subscription);
    let early = tokio::select! {
        response = &mut subscription => Some(response),
        _ = tokio::time::sleep(SUBSCRIBE_SETTLE) => None,
    };
    info!("following containerd image deletions");
    *delay = RETRY.first;
    if tx.send(Notice::CheckAll).await.is_err() {
        return Ok(());
    }
    let response = match early {
        Some(r) => r,
        None => subscription.await,
    };
    let mut stream = response.map_err(|s| s.message().to_string())?.into_inner();
    while let Some(envelope) = stream
        .message()
        .await
        .map_err(|s| s.message().to_string())?
    {
        let Some(event) = envelope.event else {
            continue;
        };
        match ImageDelete::decode(event.value.as_slice()) {
            Ok(deleted) => {
                if tx.send(Notice::Deleted(deleted.name)).await.is_err() {
                    return Ok(());
                }
            }
            Err(e) => warn!(error = %e, "undecodable image event"),
        }
    }
    Ok(())
}
