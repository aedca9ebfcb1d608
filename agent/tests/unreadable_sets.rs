//! A NodeImageSet this agent cannot read — a newer release's spec, a status
//! with a number past its type — costs only that set: restarted with both in
//! its node's list, the agent pulls and reports every other set, keeps what
//! the unreadable one asked for (pinned, not pulled again), says why on its
//! status, and picks it up again once it reads.
//!
//! This binary has an API server of its own: the test swaps the CRDs'
//! schema, which the tests of other binaries must not see.

mod support;

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use agent::work::Config;
use crd::{NodeImageSet, PullState};
use testbed::builds::images;
use testbed::servers::containerd::Containerd;
use testbed::servers::registry::Registry;
use testbed::support::poll::eventually;
use testbed::support::workdir::Workdir;

use support::{MB, config, run, sample, set, wait_status};

const NODE: &str = "unreadable-node";

// Two threads: /metrics is read with a blocking client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sets_that_do_not_decode_cost_only_themselves() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-unreadable");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let kept = images::build_and_push(&dir.join("images"), &upstream.host, "team/kept", "1", &[MB])
        .unwrap();
    let other = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/other",
        "1",
        &[MB],
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();
    // A port each: the first agent's metrics server outlives its stop.
    let [first_port, port] = testbed::support::process::free_ports().unwrap();
    let config = Config {
        metrics_addr: Some(([127, 0, 0, 1], port).into()),
        resync: Duration::from_secs(3600),
        ..config(NODE, &node, &dir)
    };
    let first = Config {
        metrics_addr: Some(([127, 0, 0, 1], first_port).into()),
        ..config.clone()
    };
    let metric = |series: &str| {
        let (_, body) =
            testbed::support::process::http_get(&format!("127.0.0.1:{port}"), "/metrics").ok()?;
        sample(&body, series)
    };

    // Before: the image of the set that will become unreadable is prefetched.
    let entry = |image: &str| json!([{"name": image, "registryPolicy": "Default"}]);
    let (stop, running) = run(&client, first);
    set(&client, "held", NODE, entry(&kept.reference), 2).await;
    wait_status(&client, "held", "Available", |s| s.available == 1).await;
    let _ = stop.send(());
    running.await.unwrap();
    let gets_before = upstream.blob_gets("team/kept");

    // What an older CRD let into storage: a spec of a newer release, and a
    // report past i32 on a set of another tenant.
    testbed::support::crds::install_without_schema(&client)
        .await
        .unwrap();
    let sets: Api<NodeImageSet> = Api::all(client.clone());
    let newer =
        json!({"spec": {"imageSet": [{"name": kept.reference, "registryPolicy": "Preferred"}]}});
    eventually("the newer spec stored", Duration::from_secs(30), || async {
        sets.patch("held", &PatchParams::default(), &Patch::Merge(&newer))
            .await
            .ok()
    })
    .await;
    set(&client, "other", NODE, entry(&other.reference), 2).await;
    let report = json!({"status": {"images": [
        {"name": other.reference, "state": "Pulling", "attempts": 2147483648u64}]}});
    sets.patch_status("other", &PatchParams::default(), &Patch::Merge(&report))
        .await
        .unwrap();
    testbed::support::crds::install(&client).await.unwrap();
    assert!(sets.get("held").await.unwrap().spec.unreadable.is_some());

    // The agent restarted with both in its node's list.
    let (stop, running) = run(&client, config.clone());
    let st = wait_status(&client, "other", "the other set Available", |s| {
        s.available == 1 && s.unreadable.is_none()
    })
    .await;
    assert_eq!(st.images[0].state, PullState::Available);
    assert_eq!(st.images[0].attempts, 1, "{:?}", st.images[0]);
    let held = wait_status(&client, "held", "SpecUnreadable on the held set", |s| {
        s.conditions.iter().any(|c| c.reason == "SpecUnreadable")
    })
    .await;
    let ready = &held.conditions[0];
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("spec.imageSet[0].registryPolicy"),
        "{}",
        ready.message
    );
    assert_eq!(held.available, 1, "the report it had is kept");
    eventually(
        "unreadable set counted",
        Duration::from_secs(30),
        || async { (metric("image_prefetch_agent_unreadable_sets") == Some(1.0)).then_some(()) },
    )
    .await;
    // Still pinned (no orphan release at start-up), not pulled again.
    let runtime = agent::pull::Runtime::connect(&node.socket).await.unwrap();
    let labels = runtime.labels(&kept.reference).await.unwrap();
    assert_eq!(
        labels.get("io.cri-containerd.pinned").map(String::as_str),
        Some("pinned")
    );

    // Readable again (the controller writes it anew): Ready, nothing pulled.
    set(&client, "held", NODE, entry(&kept.reference), 2).await;
    wait_status(&client, "held", "Ready again", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
    .await;
    eventually(
        "no unreadable set counted",
        Duration::from_secs(30),
        || async { (metric("image_prefetch_agent_unreadable_sets") == Some(0.0)).then_some(()) },
    )
    .await;
    assert_eq!(upstream.blob_gets("team/kept"), gets_before, "pulled again");
    let _ = stop.send(());
    running.await.unwrap();
}
