//! The agent against a real API server, a real containerd 2.x and real registries.

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::oneshot;

use agent::work::{self, Config};
use crd::{NodeImageSet, PullFailure, PullSource, PullState, keys};
use testbed::builds::images;
use testbed::servers::containerd::Containerd;
use testbed::servers::registry::Registry;
use testbed::support::poll::eventually;
use testbed::support::workdir::Workdir;

use support::{MB, NodeAndRegistry, agent_process, config, ctr, run, set, wait_status};

#[tokio::test]
async fn pulls_reports_retries_and_repulls() {
    if std::env::var_os("RUST_LOG").is_some() {
        std::mem::forget(plumbing::init("agent-tests"));
    }
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-agent");
    let NodeAndRegistry {
        upstream,
        image,
        node,
    } = NodeAndRegistry::start(&dir, "team/web", "1.0", &[4 * MB, MB]);

    let config = Config {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        // Long: re-pulls below must come from containerd's delete events.
        resync: Duration::from_secs(3600),
        ..config("agent-node-a", &node, &dir)
    };
    support::logs();
    let start = |config: Config| {
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(work::run(client.clone(), config, async move {
            let _ = stopped.await;
        }));
        (stop, running)
    };
    let (stop, running) = start(config.clone());

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
    // One attempt: the progress stream outlives a garbage collection on a
    // fresh containerd (`Runtime::connect` creates the namespace first).
    assert_eq!(st.total, 1);
    assert_eq!(web.attempts, 1, "{web:?}");
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "AllImagesPresent")
    );

    // The agent restarts: it keeps no state of its own and pulls nothing again.
    let _ = stop.send(());
    running.await.unwrap();
    let gets_before_restart = upstream.blob_gets("team/web");
    let (stop, running) = start(config.clone());

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
    assert_eq!(failed.reason, Some(PullFailure::NoMirror));
    assert!(
        failed.last_error.as_deref().unwrap().contains("spegel"),
        "{failed:?}"
    );
    assert_eq!(st.available, 1);
    assert_eq!(
        st.images.iter().find(|i| i.name == image.reference),
        Some(web),
        "restart rewrote the entry"
    );
    assert_eq!(
        upstream.blob_gets("team/web"),
        gets_before_restart,
        "restart pulled again"
    );

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
    let labels = eventually("the pin released", Duration::from_secs(30), || async {
        let labels = runtime.labels(&image.reference).await.unwrap();
        (!labels.contains_key("io.cri-containerd.pinned")).then_some(labels)
    })
    .await;
    assert_eq!(
        labels.get("io.cri-containerd.image").map(String::as_str),
        Some("managed")
    );

    let _ = stop.send(());
    running.await.unwrap();
}

async fn removed_and_pulled_again(node: &Containerd, upstream: &Registry, name: &str) {
    let gets = || upstream.blob_gets("team/web").values().sum::<usize>();
    let before = gets();
    remove_image(node, name).await;
    // Within 10 s, as an administrator would expect.
    eventually(
        "the removed image pulled again",
        Duration::from_secs(10),
        || async { (gets() != before).then_some(()) },
    )
    .await;
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    eventually("the image back", Duration::from_secs(30), || async {
        runtime.image(name).await.unwrap().map(|_| ())
    })
    .await;
}

/// As an administrator would (`crictl rmi`): every name of the image —
/// the tag and the digest name the agent gives it as CRI does — so that its
/// content goes too.
async fn remove_image(node: &Containerd, name: &str) {
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let (digest, _) = runtime.image(name).await.unwrap().expect("present");
    let r = crd::reference::parse(name).unwrap();
    let by_digest = format!("{}/{}@{digest}", r.registry, r.repository);
    ctr(node, &["images", "rm", "--sync", name, &by_digest]);
}

#[tokio::test]
async fn pulls_with_credentials_from_pull_secrets() {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    use kube::api::PostParams;

    const PASSWORD: &str = "s3cr3t-pw-7731";
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-creds");
    let registry = Registry::start_with_login(&dir.join("private"), "puller", PASSWORD).unwrap();
    let work = dir.join("images");
    let login = Some(("puller", PASSWORD));
    let web =
        images::build_and_push_as(&work, &registry.host, "team/private", "1", &[2 * MB], login)
            .unwrap();
    let other =
        images::build_and_push_as(&work, &registry.host, "team/other", "1", &[MB], login).unwrap();
    let third =
        images::build_and_push_as(&work, &registry.host, "team/third", "1", &[MB], login).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();

    let ns = "agent-creds";
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, password) in [("regcred", PASSWORD), ("wrongcred", "not-the-password")] {
        let secret =
            testbed::servers::registry::pull_secret(name, &registry.host, "puller", password);
        let _ = secrets.create(&PostParams::default(), &secret).await;
    }

    // The real binary, so that its whole log output can be searched for the password.
    let log_path = dir.join("agent.log");
    let mut agent_process =
        agent_process("agent-node-b", &node, &dir.join("agent-hosts"), &log_path);

    let with_secrets = |set: &str, image: &str, secret: &str| {
        let (client, set, image, secret) = (
            client.clone(),
            set.to_string(),
            image.to_string(),
            secret.to_string(),
        );
        async move {
            let api: Api<NodeImageSet> = Api::all(client.clone());
            let obj = json!({
                "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
                "metadata": {"name": set, "labels": {keys::NODE: "agent-node-b"}},
                "spec": {"nodeName": "agent-node-b", "imageDownloadRetryLimit": 1,
                         "imageSet": [{"name": image, "registryPolicy": "Default"}],
                         "imagePullSecrets": if secret.is_empty() { json!([]) } else { json!([{"namespace": ns, "name": secret}]) }},
            });
            api.patch(
                &set,
                &PatchParams::apply("test-controller").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap();
        }
    };
    with_secrets("creds-ok", &web.reference, "regcred").await;
    with_secrets("creds-missing", &other.reference, "no-such-secret").await;
    with_secrets("creds-none", &third.reference, "").await;
    with_secrets("creds-wrong", &third.reference, "wrongcred").await;

    let ok = wait_status(&client, "creds-ok", "Available with the secret", |s| {
        s.available == 1
    })
    .await;
    assert_eq!(ok.images[0].digest.as_deref(), Some(web.digest.as_str()));

    let missing = wait_status(&client, "creds-missing", "SecretNotFound", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    assert_eq!(missing.images[0].reason, Some(PullFailure::SecretNotFound));
    assert!(
        missing.images[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("agent-creds/no-such-secret")
    );

    // The secret is created after the fact: the next round uses it, with no
    // restart and no change to the set.
    let mut late = secrets.get("regcred").await.unwrap();
    late.metadata = kube::api::ObjectMeta {
        name: Some("no-such-secret".into()),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &late).await.unwrap();
    wait_status(
        &client,
        "creds-missing",
        "Available once the secret exists",
        |s| s.available == 1,
    )
    .await;

    let none = wait_status(&client, "creds-none", "Unauthorized", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    assert_eq!(
        none.images[0].reason,
        Some(PullFailure::Unauthorized),
        "{:?}",
        none.images[0]
    );

    let wrong = wait_status(&client, "creds-wrong", "Unauthorized", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    assert_eq!(wrong.images[0].reason, Some(PullFailure::Unauthorized));
    assert!(
        wrong.images[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("team/third")
    );

    // The private image is on the node now (creds-ok pulled it). Another
    // tenant's seed naming it by its digest, with no credentials, is not
    // confirmed from the local copy: the registry is asked, and refuses
    // (review L7).
    let r = crd::reference::parse(&web.reference).unwrap();
    let by_digest = format!("{}/{}@{}", r.registry, r.repository, web.digest);
    with_secrets("creds-by-digest", &by_digest, "").await;
    let bypass = wait_status(&client, "creds-by-digest", "Unauthorized", |s| {
        s.images.iter().any(|i| i.state != PullState::Pulling)
    })
    .await;
    assert_eq!(
        (bypass.images[0].state, bypass.images[0].reason),
        (PullState::Failed, Some(PullFailure::Unauthorized)),
        "{:?}",
        bypass.images[0]
    );

    // The password is nowhere in what the agent wrote.
    let api: Api<NodeImageSet> = Api::all(client.clone());
    for set in [
        "creds-ok",
        "creds-missing",
        "creds-none",
        "creds-wrong",
        "creds-by-digest",
    ] {
        let text = serde_json::to_string(&api.get(set).await.unwrap()).unwrap();
        assert!(!text.contains(PASSWORD), "{set} leaks the password");
    }
    let _ = agent_process.kill();
    let _ = agent_process.wait();
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("image present"),
        "the log is the agent's: {}",
        &logged[..logged.len().min(2000)]
    );
    assert!(!logged.contains(PASSWORD), "the agent logged the password");
}

// Multi-threaded: the test reads /metrics with a blocking client while the
// agent's server runs on the same runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_pulls_and_bytes_by_source() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-metrics");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let mirror = Registry::start(&dir.join("mirror")).unwrap();
    let work_dir = dir.join("images");
    let seeded =
        images::build_and_push(&work_dir, &upstream.host, "team/seeded", "1", &[2 * MB]).unwrap();
    let mirrored =
        images::build_and_push(&work_dir, &upstream.host, "team/mirrored", "1", &[3 * MB]).unwrap();
    images::build_and_push(&work_dir, &mirror.host, "team/mirrored", "1", &[3 * MB]).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[&mirror.host])
        .unwrap();
    let [port] = testbed::support::process::free_ports().unwrap();
    let config = Config {
        metrics_addr: Some(([127, 0, 0, 1], port).into()),
        ..config("agent-node-metrics", &node, &dir)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(work::run(client.clone(), config, async move {
        let _ = stopped.await;
    }));
    set(
        &client,
        "metrics-a",
        "agent-node-metrics",
        json!([
            {"name": seeded.reference, "registryPolicy": "Default"},
            {"name": mirrored.reference, "registryPolicy": "Mirror", "digest": mirrored.digest},
        ]),
        1,
    )
    .await;
    wait_status(&client, "metrics-a", "both present", |s| s.available == 2).await;

    let host = format!("127.0.0.1:{port}");
    let (code, text) = testbed::support::process::http_get(&host, "/metrics").unwrap();
    assert_eq!(code, 200);
    let value = |series: &str| {
        support::sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        value("image_prefetch_agent_pulls_total{policy=\"Default\",result=\"success\"}"),
        1.0
    );
    assert_eq!(
        value("image_prefetch_agent_pulls_total{policy=\"Mirror\",result=\"success\"}"),
        1.0
    );
    assert_eq!(
        value("image_prefetch_agent_pulled_bytes_total{source=\"upstream\"}"),
        seeded.size as f64
    );
    assert_eq!(
        value("image_prefetch_agent_pulled_bytes_total{source=\"mirror\"}"),
        mirrored.size as f64
    );
    assert_eq!(value("image_prefetch_agent_images_present"), 2.0);
    assert_eq!(
        value("image_prefetch_agent_pull_duration_seconds_count"),
        2.0
    );
    // With the API server there all along: exported, and nothing failed.
    assert_eq!(value("image_prefetch_agent_watch_errors_total"), 0.0);
    assert_eq!(value("image_prefetch_agent_status_write_errors_total"), 0.0);
    assert_eq!(
        testbed::support::process::http_get(&host, "/healthz")
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        testbed::support::process::http_get(&host, "/readyz")
            .unwrap()
            .0,
        200
    );

    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn pins_only_what_it_pinned_and_puts_lost_pins_back() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-pins");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let ours = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/ours",
        "1.0",
        &[MB],
    )
    .unwrap();
    let theirs = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/theirs",
        "1.0",
        &[MB],
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();
    // Both already on the node before any prefetch; "theirs" pinned by
    // someone else (as CRI pins its sandbox image).
    for image in [&ours, &theirs] {
        let hosts = node.hosts_dir.display().to_string();
        ctr(
            &node,
            &[
                "images",
                "pull",
                "--plain-http",
                "--hosts-dir",
                &hosts,
                &image.reference,
            ],
        );
    }
    ctr(
        &node,
        &[
            "images",
            "label",
            &theirs.reference,
            "io.cri-containerd.pinned=pinned",
        ],
    );

    // Pins are repaired at each resync.
    let config = agent::work::Config {
        resync: Duration::from_secs(2),
        ..config("agent-node-pins", &node, &dir)
    };
    let (stop, running) = run(&client, config);
    let both = json!([
        {"name": ours.reference, "registryPolicy": "Default"},
        {"name": theirs.reference, "registryPolicy": "Default"},
    ]);
    set(&client, "agent-pins", "agent-node-pins", both, 0).await;
    wait_status(&client, "agent-pins", "both confirmed", |s| {
        s.available == 2
    })
    .await;
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let pinned = |labels: &std::collections::HashMap<String, String>| {
        (
            labels.contains_key("io.cri-containerd.pinned"),
            labels.contains_key("imageprefetch.io/pinned"),
        )
    };
    let pins_become = |want: (bool, bool), what: &'static str| {
        let runtime = &runtime;
        let name = ours.reference.clone();
        eventually(what, Duration::from_secs(30), move || {
            let name = name.clone();
            async move { (pinned(&runtime.labels(&name).await.unwrap()) == want).then_some(()) }
        })
    };
    // Confirmed images are pinned too, and the agent marks its own pins.
    pins_become((true, true), "the confirmed image pinned by the agent").await;
    assert_eq!(
        pinned(&runtime.labels(&theirs.reference).await.unwrap()),
        (true, false)
    );

    // Pins taken off behind the agent's back (or lost to a race) come back.
    ctr(
        &node,
        &[
            "images",
            "label",
            &ours.reference,
            "io.cri-containerd.pinned=",
            "imageprefetch.io/pinned=",
        ],
    );
    assert_eq!(
        pinned(&runtime.labels(&ours.reference).await.unwrap()),
        (false, false),
        "ctr removed the pins"
    );
    pins_become((true, true), "the pin put back at the next resync").await;

    // Unlisted: the agent's pin comes off; the other pin stays.
    set(&client, "agent-pins", "agent-node-pins", json!([]), 0).await;
    pins_become((false, false), "the agent's own pin released").await;
    assert_eq!(
        pinned(&runtime.labels(&theirs.reference).await.unwrap()),
        (true, false),
        "a pin the agent did not set stays"
    );
    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn pins_of_sets_deleted_while_the_agent_was_down_are_released_when_it_returns() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-orphan-pins");
    let NodeAndRegistry {
        upstream: _upstream,
        image,
        node,
    } = NodeAndRegistry::start(&dir, "team/orphan", "1.0", &[MB]);
    let config = config("agent-node-orphan", &node, &dir);
    let (stop, running) = run(&client, config.clone());
    let entry = json!([{"name": image.reference, "registryPolicy": "Default"}]);
    set(&client, "agent-orphan", "agent-node-orphan", entry, 0).await;
    wait_status(&client, "agent-orphan", "Available", |s| s.available == 1).await;
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let own_pin = || async {
        runtime
            .labels(&image.reference)
            .await
            .unwrap()
            .contains_key("imageprefetch.io/pinned")
    };
    assert!(own_pin().await, "pinned while prefetched");

    // The agent is away while its set is deleted.
    let _ = stop.send(());
    running.await.unwrap();
    let api: Api<NodeImageSet> = Api::all(client.clone());
    api.delete("agent-orphan", &Default::default())
        .await
        .unwrap();

    let (stop, running) = run(&client, config);
    eventually(
        "the orphaned pin released",
        Duration::from_secs(30),
        || async { (!own_pin().await).then_some(()) },
    )
    .await;
    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn a_failed_seed_turned_into_a_mirror_entry_is_pulled_at_once() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-failed-to-mirror");
    let mut upstream = Registry::start(&dir.join("upstream")).unwrap();
    let image = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/turned",
        "1.0",
        &[MB],
    )
    .unwrap();
    // The in-cluster mirror has nothing yet, and the registry is down: the
    // seed's pull fails.
    let mirror = Registry::start(&dir.join("mirror")).unwrap();
    upstream.stop();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[&mirror.host])
        .unwrap();
    let (stop, running) = run(&client, config("agent-node-turned", &node, &dir));
    let seed = json!([{"name": image.reference, "registryPolicy": "Default"}]);
    set(&client, "agent-turned", "agent-node-turned", seed, 0).await;
    wait_status(&client, "agent-turned", "Failed", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;

    // Another node got the image into the mirror; the controller turns the
    // failed seed into a Mirror entry pinned to its digest. The agent starts
    // it at once, well before the Failed entry's own retry (30 s).
    images::build_and_push(
        &dir.join("images"),
        &mirror.host,
        "team/turned",
        "1.0",
        &[MB],
    )
    .unwrap();
    let turned_at = std::time::Instant::now();
    let mirror_entry =
        json!([{"name": image.reference, "registryPolicy": "Mirror", "digest": image.digest}]);
    set(
        &client,
        "agent-turned",
        "agent-node-turned",
        mirror_entry,
        0,
    )
    .await;
    let st = wait_status(&client, "agent-turned", "Available from the mirror", |s| {
        s.available == 1
    })
    .await;
    assert!(
        turned_at.elapsed() < Duration::from_secs(20),
        "{:?}",
        turned_at.elapsed()
    );
    assert_eq!(st.images[0].source, Some(PullSource::Mirror));
    assert_eq!(st.images[0].digest.as_deref(), Some(image.digest.as_str()));
    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn a_seed_resolves_its_tag_at_the_registry_not_on_the_node_or_a_mirror() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-tags");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    // A peer's mirror that stored the tag a week ago: spegel answers a tag
    // with whatever digest a node keeps under it.
    let peer = Registry::start(&dir.join("peer")).unwrap();
    let old = images::build_and_push(&dir.join("v1"), &upstream.host, "team/app", "latest", &[MB])
        .unwrap();
    images::build_and_push(&dir.join("v1"), &peer.host, "team/app", "latest", &[MB]).unwrap();
    let same =
        images::build_and_push(&dir.join("same"), &upstream.host, "team/same", "1", &[MB]).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[&peer.host])
        .unwrap();
    // The node has both from before: the old `latest`, and `same:1`.
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    for image in [&old, &same] {
        runtime
            .pull(
                &image.reference,
                &image.reference,
                &node.hosts_dir,
                None,
                None,
                true,
            )
            .await
            .unwrap();
    }
    // `latest` moves on at the registry.
    let new = images::build_and_push(
        &dir.join("v2"),
        &upstream.host,
        "team/app",
        "latest",
        &[2 * MB],
    )
    .unwrap();
    assert_ne!(new.digest, old.digest);
    let peer_before = peer.requests().len();
    let same_gets = upstream.blob_gets(&same.repository);

    let (stop, running) = run(&client, config("tags-node", &node, &dir));
    set(
        &client,
        "tags",
        "tags-node",
        json!([{"name": new.reference, "registryPolicy": "Default"},
               {"name": same.reference, "registryPolicy": "Default"}]),
        3,
    )
    .await;
    let st = wait_status(&client, "tags", "both Available", |s| s.available == 2).await;
    let by = agent::report::by_image(&st);
    // The registry's `latest`, not the node's copy nor the peer's answer.
    assert_eq!(
        by[new.reference.as_str()].digest.as_deref(),
        Some(new.digest.as_str())
    );
    // A tag that did not move: confirmed at the registry, no blob moved.
    let confirmed = by[same.reference.as_str()];
    assert_eq!(confirmed.digest.as_deref(), Some(same.digest.as_str()));
    assert_eq!(confirmed.pull_duration_millis, Some(0), "{confirmed:?}");
    assert_eq!(upstream.blob_gets(&same.repository), same_gets);
    // Both tags were resolved at the registry; the peer was asked for no tag.
    let upstream_requests = upstream.requests();
    for tag in ["team/app/manifests/latest", "team/same/manifests/1"] {
        assert!(
            upstream_requests
                .iter()
                .any(|r| r.starts_with("HEAD") && r.ends_with(tag)),
            "{tag} resolved upstream: {upstream_requests:?}"
        );
    }
    let asked: Vec<String> = peer.requests()[peer_before..]
        .iter()
        .filter(|r| r.contains("/manifests/latest") || r.contains("/manifests/1"))
        .cloned()
        .collect();
    assert!(asked.is_empty(), "the peer was asked for tags: {asked:?}");
    stop.send(()).unwrap();
    running.await.unwrap();
}

#[tokio::test]
async fn no_pull_starts_while_the_image_filesystem_is_over_its_threshold() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-disk-guard");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let image = images::build_and_push(&dir.join("images"), &upstream.host, "team/big", "1", &[MB])
        .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();
    // A threshold just under how full the node's filesystem is now.
    let usage = agent::disk::usage(&node.dir).unwrap();
    let percent = usage.percent().floor() as u8;
    assert!(
        percent >= 2,
        "the test needs a filesystem at least 2% full: {usage:?}"
    );
    let guarded = Config {
        image_fs_high_percent: percent - 1,
        ..config("agent-node-disk", &node, &dir)
    };
    let (stop, running) = run(&client, guarded);
    set(
        &client,
        "disk-guard",
        "agent-node-disk",
        json!([{"name": image.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    let st = wait_status(&client, "disk-guard", "refused for disk pressure", |s| {
        s.images
            .iter()
            .any(|i| i.reason == Some(PullFailure::DiskPressure))
    })
    .await;
    let message = st.images[0].last_error.clone().unwrap_or_default();
    assert!(
        message.contains(&format!("over the {}%", percent - 1)),
        "{message}"
    );
    assert!(
        upstream.blob_gets(&image.repository).is_empty(),
        "nothing was fetched"
    );
    stop.send(()).unwrap();
    running.await.unwrap();

    // Room again (here: a higher threshold): the same entry completes.
    let (stop, running) = run(&client, config("agent-node-disk", &node, &dir));
    wait_status(&client, "disk-guard", "Available with room", |s| {
        s.available == 1
    })
    .await;
    stop.send(()).unwrap();
    running.await.unwrap();
}

/// containerd before 2.0 cannot keep a pull off the registry (1.7's Transfer
/// service ignores the host configuration, 1.6 has none and CRI falls back
/// to the registry): on Debian's 1.6 a Mirror entry fails closed — no byte
/// fetched, the status naming the version and what to upgrade to — while a
/// Default entry of the same set is pulled (through CRI).
#[tokio::test]
async fn mirror_entries_fail_closed_on_containerd_before_2() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-runtime-floor");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let mirror = Registry::start(&dir.join("mirror")).unwrap();
    let work_dir = dir.join("images");
    let seeded =
        images::build_and_push(&work_dir, &upstream.host, "team/seeded", "1", &[MB]).unwrap();
    let mirrored =
        images::build_and_push(&work_dir, &upstream.host, "team/mirrored", "1", &[MB]).unwrap();
    images::build_and_push(&work_dir, &mirror.host, "team/mirrored", "1", &[MB]).unwrap();
    let node = Containerd::start_flavor(
        &dir.join("node"),
        testbed::servers::containerd::Flavor::Debian16,
    )
    .unwrap();
    node.configure_registry(&upstream.host, &[&mirror.host])
        .unwrap();
    let (stop, running) = run(&client, config("agent-node-floor", &node, &dir));
    set(
        &client,
        "agent-floor",
        "agent-node-floor",
        json!([
            {"name": seeded.reference, "registryPolicy": "Default"},
            {"name": mirrored.reference, "registryPolicy": "Mirror", "digest": mirrored.digest},
        ]),
        1,
    )
    .await;
    let st = wait_status(
        &client,
        "agent-floor",
        "Default Available, Mirror Failed",
        |s| s.available == 1 && s.images.iter().any(|i| i.state == PullState::Failed),
    )
    .await;
    let failed = st
        .images
        .iter()
        .find(|i| i.name == mirrored.reference)
        .unwrap();
    assert_eq!(failed.reason, Some(PullFailure::RuntimeUnsupported));
    let message = failed.last_error.as_deref().unwrap();
    assert!(
        message.contains("1.6.") && message.contains("upgrade containerd to 2.0"),
        "{message}"
    );
    assert!(
        upstream.blob_gets("team/mirrored").is_empty()
            && mirror.blob_gets("team/mirrored").is_empty(),
        "nothing fetched for the Mirror entry"
    );
    let _ = stop.send(());
    running.await.unwrap();
}

/// A Mirror pull that finds no peer yet is "not yet", not a failure: the
/// mirror is asked again past spegel's negative cache before the miss
/// counts as an attempt. With no retry budget at all, an entry whose holder
/// appears only after the first miss still becomes Available at its first
/// attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_miss_is_not_yet_a_failed_attempt() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-mirror-miss");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let mirror = Registry::start(&dir.join("mirror")).unwrap();
    let work_dir = dir.join("images");
    let image = images::build_and_push(&work_dir, &upstream.host, "team/late", "1", &[MB]).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[&mirror.host])
        .unwrap();
    let [port] = testbed::support::process::free_ports().unwrap();
    let config = Config {
        metrics_addr: Some(([127, 0, 0, 1], port).into()),
        ..config("agent-node-miss", &node, &dir)
    };
    let (stop, running) = run(&client, config);
    set(
        &client,
        "agent-miss",
        "agent-node-miss",
        json!([{"name": image.reference, "registryPolicy": "Mirror", "digest": image.digest}]),
        0,
    )
    .await;
    // The mirror is asked and has nothing: then a holder appears.
    eventually("the mirror asked", Duration::from_secs(30), || async {
        mirror
            .requests()
            .iter()
            .any(|r| r.contains("/v2/team/late/"))
            .then_some(())
    })
    .await;
    let pushed = images::build_and_push(&work_dir, &mirror.host, "team/late", "1", &[MB]).unwrap();
    assert_eq!(pushed.digest, image.digest);
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let st = wait_status(&client, "agent-miss", "Available", |s| {
        if s.images.iter().any(|i| i.state == PullState::Failed) {
            failed_once.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        s.available == 1
    })
    .await;
    assert!(
        !failed_once.load(std::sync::atomic::Ordering::SeqCst),
        "a miss was reported as a failure"
    );
    assert_eq!(st.images[0].attempts, 1, "{:?}", st.images[0]);
    assert_eq!(st.images[0].source, Some(PullSource::Mirror));
    let (_, metrics) =
        testbed::support::process::http_get(&format!("127.0.0.1:{port}"), "/metrics").unwrap();
    let misses = support::sample(&metrics, "image_prefetch_agent_mirror_misses_total").unwrap();
    assert!(misses >= 1.0, "{misses}");
    assert!(
        upstream.blob_gets("team/late").is_empty(),
        "nothing from upstream"
    );
    let _ = stop.send(());
    running.await.unwrap();
}

/// What kubelet sees: a prefetched image is found by every reference form a
/// pod may name it with — the tag, the digest, and `repo:tag@digest` (which
/// kubelet and CRI read as the digest) — and is pinned under all of them,
/// since the agent names it by its digest too, as CRI does.
#[tokio::test]
async fn kubelet_finds_the_image_by_tag_digest_and_both() {
    use k8s_cri::v1::image_service_client::ImageServiceClient;
    use k8s_cri::v1::{ImageSpec, ImageStatusRequest};

    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-e2e-references");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let image =
        images::build_and_push(&dir.join("images"), &upstream.host, "team/refs", "1", &[MB])
            .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();
    let (stop, running) = run(&client, config("agent-node-refs", &node, &dir));
    set(
        &client,
        "agent-refs",
        "agent-node-refs",
        json!([{"name": image.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    wait_status(&client, "agent-refs", "Available", |s| s.available == 1).await;
    let _ = stop.send(());
    running.await.unwrap();

    let repo = format!("{}/team/refs", upstream.host);
    let channel = containerd_client::connect(&node.socket).await.unwrap();
    for reference in [
        image.reference.clone(),
        format!("{repo}@{}", image.digest),
        format!("{repo}:1@{}", image.digest),
    ] {
        // CRI learns of images from containerd's events: poll until it has.
        let status = eventually(&reference, Duration::from_secs(10), || {
            let channel = channel.clone();
            let reference = reference.clone();
            async move {
                ImageServiceClient::new(channel)
                    .image_status(ImageStatusRequest {
                        image: Some(ImageSpec {
                            image: reference,
                            ..Default::default()
                        }),
                        verbose: false,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .image
            }
        })
        .await;
        assert!(status.pinned, "{reference}: pinned");
        assert!(
            status
                .repo_digests
                .iter()
                .any(|d| d.ends_with(&image.digest)),
            "{reference}: {:?}",
            status.repo_digests
        );
    }
}

/// `pin: false`: the image is prefetched without kubelet's garbage
/// collection pin, and when something removes it (as the garbage
/// collection would) it is reported Waiting and not pulled again — counted
/// at the registry.
#[tokio::test]
async fn an_unpinned_image_is_left_to_garbage_collection() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-unpinned");
    let upstream = Registry::start(&dir.join("registry")).unwrap();
    let image = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/loose",
        "1",
        &[MB],
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();
    let (stop, running) = run(&client, config("agent-node-unpinned", &node, &dir));
    let api: Api<NodeImageSet> = Api::all(client.clone());
    let obj = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "metadata": {"name": "agent-unpinned", "labels": {keys::NODE: "agent-node-unpinned"}},
        "spec": {"nodeName": "agent-node-unpinned", "pin": false,
                 "imageSet": [{"name": image.reference, "registryPolicy": "Default"}]},
    });
    api.patch(
        "agent-unpinned",
        &PatchParams::apply("test-controller").force(),
        &Patch::Apply(&obj),
    )
    .await
    .unwrap();
    wait_status(&client, "agent-unpinned", "Available", |s| s.available == 1).await;
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let labels = runtime.labels(&image.reference).await.unwrap();
    assert!(
        !labels.contains_key("io.cri-containerd.pinned"),
        "{labels:?}"
    );
    assert!(
        !labels.contains_key("imageprefetch.io/pinned"),
        "{labels:?}"
    );
    assert_eq!(
        labels.get("io.cri-containerd.image").map(String::as_str),
        Some("managed")
    );

    let gets = || upstream.blob_gets("team/loose").values().sum::<usize>();
    let before = gets();
    remove_image(&node, &image.reference).await;
    let st = wait_status(&client, "agent-unpinned", "Waiting after removal", |s| {
        s.available == 0 && s.images.iter().any(|i| i.state == PullState::Waiting)
    })
    .await;
    assert!(
        st.images[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("garbage collection"),
        "{:?}",
        st.images[0]
    );
    // Waiting, not Pulling: no pull was started (a pull would have been
    // reported before this status), and none reached the registry.
    assert_eq!(gets(), before, "the unpinned image was pulled again");
    assert!(runtime.image(&image.reference).await.unwrap().is_none());

    let _ = stop.send(());
    running.await.unwrap();
}
