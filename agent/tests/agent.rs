//! The agent against a real API server, a real containerd 2.x and real registries.

use std::path::PathBuf;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::oneshot;

use agent::work::{self, Config};
use crd::{NodeImageSet, PullSource, PullState, keys};
use testbed::containerd::Containerd;
use testbed::images;
use testbed::registry::Registry;

const MB: usize = 1024 * 1024;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("agent-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a NodeImageSet as the controller would.
async fn set(
    client: &kube::Client,
    name: &str,
    node: &str,
    entries: serde_json::Value,
    retry_limit: i32,
) {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let obj = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "metadata": {"name": name, "labels": {keys::NODE: node}},
        "spec": {"nodeName": node, "imageSet": entries, "imageDownloadRetryLimit": retry_limit},
    });
    api.patch(
        name,
        &PatchParams::apply("test-controller").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
}

async fn wait_status<F: Fn(&crd::NodeImageSetStatus) -> bool>(
    client: &kube::Client,
    name: &str,
    what: &str,
    ok: F,
) -> crd::NodeImageSetStatus {
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = api.get_status(name).await.unwrap().status
            && ok(&st)
        {
            return st;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 60s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pulls_reports_retries_and_repulls() {
    if std::env::var_os("RUST_LOG").is_some() {
        std::mem::forget(telemetry::init("agent-tests"));
    }
    let client = testbed::shared::client().await;
    let dir = workdir("agent");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let image = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/web",
        "1.0",
        &[4 * MB, MB],
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &format!("http://{}", upstream.host), &[])
        .unwrap();

    let config = Config {
        containerd_socket: node.socket.clone(),
        node_hosts_dir: node.hosts_dir.clone(),
        mirror_hosts_dir: dir.join("agent-hosts"),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        // Long: re-pulls below must come from containerd's delete events.
        resync: Duration::from_secs(3600),
        ..Config::new("agent-node-a")
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(work::run(client.clone(), config, async move {
        let _ = stopped.await;
    }));

    // A Default entry is pulled from the registry and reported with its digest.
    set(
        &client,
        "agent-a",
        "agent-node-a",
        json!([{"name": image.reference, "registryPolicy": "Default"}]),
        2,
    )
    .await;
    let st = wait_status(&client, "agent-a", "Available", |s| s.available == 1).await;
    let web = &st.images[0];
    assert_eq!(web.state, PullState::Available);
    assert_eq!(web.digest.as_deref(), Some(image.digest.as_str()));
    assert_eq!(web.size_bytes, Some(image.size as i64));
    assert_eq!(web.source, Some(PullSource::Upstream));
    assert_eq!((st.total, web.attempts), (1, 1));

    // A Mirror entry with no mirror configured fails after its retries, with
    // a reason and a message that says what to do; the other image stays.
    let missing = format!("{}/team/missing:1", upstream.host);
    set(
        &client,
        "agent-a",
        "agent-node-a",
        json!([{"name": image.reference, "registryPolicy": "Default"}, {"name": missing, "registryPolicy": "Mirror"}]),
        2,
    )
    .await;
    let st = wait_status(&client, "agent-a", "Failed", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    let failed = st.images.iter().find(|i| i.name == missing).unwrap();
    assert_eq!(failed.attempts, 3, "first attempt and 2 retries");
    assert_eq!(failed.reason.as_deref(), Some("NoMirror"));
    assert!(
        failed.last_error.as_deref().unwrap().contains("spegel"),
        "{failed:?}"
    );
    assert_eq!(st.available, 1);

    // Kept from kubelet's image garbage collection while prefetched.
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let labels = runtime.labels(&image.reference).await.unwrap();
    assert_eq!(
        labels.get("io.cri-containerd.pinned").map(String::as_str),
        Some("pinned")
    );

    // Removed from the node behind the agent's back: pulled again.
    removed_and_pulled_again(&node, &upstream, &image.reference).await;
    wait_status(&client, "agent-a", "Available again", |s| s.available == 1).await;

    // containerd restarts: the agent subscribes again and still notices.
    // Whether the deletion lands before or after the agent re-subscribes, only
    // the re-subscription (event, or its catch-up check) can bring it back:
    // the periodic resync is an hour away.
    let node_dir = node.dir.clone();
    node.kill();
    let node = Containerd::start(&node_dir).unwrap();
    removed_and_pulled_again(&node, &upstream, &image.reference).await;

    // No longer listed: the pin comes off, the image stays.
    set(
        &client,
        "agent-a",
        "agent-node-a",
        json!([{"name": missing, "registryPolicy": "Mirror"}]),
        2,
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let labels = runtime.labels(&image.reference).await.unwrap();
        if !labels.contains_key("io.cri-containerd.pinned") {
            assert_eq!(
                labels.get("io.cri-containerd.image").map(String::as_str),
                Some("managed")
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "pin not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

async fn removed_and_pulled_again(node: &Containerd, upstream: &Registry, name: &str) {
    let gets = || upstream.blob_gets("team/web").values().sum::<usize>();
    let before = gets();
    remove_image(node, name).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while gets() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed image was not pulled again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while runtime.image(name).await.unwrap().is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the image did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn remove_image(node: &Containerd, name: &str) {
    use containerd_client::services::v1::DeleteImageRequest;
    use containerd_client::services::v1::images_client::ImagesClient;
    use containerd_client::tonic::Request;
    let channel = containerd_client::connect(&node.socket).await.unwrap();
    let req = DeleteImageRequest {
        name: name.to_string(),
        sync: true,
        ..Default::default()
    };
    ImagesClient::new(channel)
        .delete(containerd_client::with_namespace!(req, "k8s.io"))
        .await
        .unwrap();
}
