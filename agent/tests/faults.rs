//! The agent when things go wrong: a registry that goes away and comes
//! back, one that hangs, the agent itself killed in the middle of a pull, a
//! set deleted in the middle of one, the node's containerd coming back
//! with its state wiped, and a containerd that is not there yet.

mod support;

use std::time::Duration;

use serde_json::json;

use agent::work::Config;
use crd::{PullFailure, PullState};
use testbed::builds::images;
use testbed::servers::containerd::Containerd;
use testbed::servers::registry::{HungRegistry, Registry};
use testbed::support::workdir::Workdir;

use support::{MB, agent_process, config, ctr, run, set, wait_status};

#[tokio::test]
async fn a_registry_that_comes_back_within_the_budget_is_used() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-down");
    let mut registry = Registry::start(&dir.join("registry")).unwrap();
    let work_dir = dir.join("images");
    let back = images::build_and_push(&work_dir, &registry.host, "team/back", "1", &[MB]).unwrap();
    let gone = images::build_and_push(&work_dir, &registry.host, "team/gone", "1", &[MB]).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    let (stop, running) = run(&client, config("fault-node-down", &node, &dir));

    registry.stop();
    set(
        &client,
        "faults-back",
        "fault-node-down",
        json!([{"name": back.reference, "registryPolicy": "Default"}]),
        8,
    )
    .await;
    // Failing and retrying while the registry is away...
    let st = wait_status(&client, "faults-back", "a failed attempt", |s| {
        s.images.iter().any(|i| i.attempts >= 2)
    })
    .await;
    assert_eq!(st.images[0].state, PullState::Pulling);
    assert_eq!(
        st.images[0].reason,
        Some(PullFailure::RegistryUnreachable),
        "{:?}",
        st.images[0]
    );
    // ...and done once it is back.
    registry.restart().unwrap();
    let st = wait_status(
        &client,
        "faults-back",
        "Available after the registry returned",
        |s| s.available == 1,
    )
    .await;
    assert!(st.images[0].attempts >= 2, "{:?}", st.images[0]);
    assert_eq!(st.images[0].digest.as_deref(), Some(back.digest.as_str()));

    // Away for longer than the budget: Failed, with the attempts and the cause.
    registry.stop();
    set(
        &client,
        "faults-gone",
        "fault-node-down",
        json!([{"name": gone.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    let st = wait_status(&client, "faults-gone", "Failed", |s| {
        s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    let img = &st.images[0];
    assert_eq!(img.attempts, 2);
    assert_eq!(img.reason, Some(PullFailure::RegistryUnreachable));
    let error = img.last_error.as_deref().unwrap();
    assert!(
        error.contains(&gone.reference) && error.contains(&registry.host),
        "{error}"
    );

    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn a_hung_registry_times_out_and_the_rest_completes() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-hung");
    let hung = HungRegistry::start().unwrap();
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let fine = images::build_and_push(&dir.join("images"), &registry.host, "team/fine", "1", &[MB])
        .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    node.configure_registry(&hung.host, &[]).unwrap();
    let config = Config {
        stall_timeout: Duration::from_secs(3),
        ..config("fault-node-hung", &node, &dir)
    };
    let (stop, running) = run(&client, config);

    let stuck = format!("{}/team/stuck:1", hung.host);
    set(
        &client,
        "faults-hung",
        "fault-node-hung",
        json!([{"name": stuck, "registryPolicy": "Default"}, {"name": fine.reference, "registryPolicy": "Default"}]),
        0,
    )
    .await;
    let st = wait_status(&client, "faults-hung", "timeout and completion", |s| {
        s.available == 1 && s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    let stuck_status = st.images.iter().find(|i| i.name == stuck).unwrap();
    assert_eq!(
        stuck_status.reason,
        Some(PullFailure::PullTimeout),
        "{stuck_status:?}"
    );
    assert!(
        stuck_status
            .last_error
            .as_deref()
            .unwrap()
            .contains("made no progress for 3s")
    );

    let _ = stop.send(());
    running.await.unwrap();
}

#[tokio::test]
async fn an_agent_killed_mid_pull_completes_after_restart() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-kill");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let big = images::build_and_push(
        &dir.join("images"),
        &registry.host,
        "team/big",
        "1",
        &[96 * MB, 96 * MB],
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    let log = dir.join("agent.log");
    let hosts = dir.join("agent-hosts");

    let mut first = agent_process("fault-node-kill", &node, &hosts, &log);
    set(
        &client,
        "faults-kill",
        "fault-node-kill",
        json!([{"name": big.reference, "registryPolicy": "Default"}]),
        2,
    )
    .await;
    wait_status(&client, "faults-kill", "Pulling", |s| {
        s.images.iter().any(|i| i.state == PullState::Pulling)
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();

    let mut second = agent_process("fault-node-kill", &node, &hosts, &log);
    let st = wait_status(&client, "faults-kill", "Available after the restart", |s| {
        s.available == 1
    })
    .await;
    assert_eq!(st.images[0].digest.as_deref(), Some(big.digest.as_str()));
    second.kill().unwrap();
    second.wait().unwrap();
    // One image record under the name, whatever was left half-done.
    let listed = ctr(&node, &["images", "ls", "-q"]);
    let records: Vec<&str> = listed.lines().filter(|l| *l == big.reference).collect();
    assert_eq!(records, [big.reference.as_str()], "{listed}");
    // Nothing the killed pull held is left behind: no lease keeps half a
    // download from containerd's garbage collection.
    let leases = ctr(&node, &["leases", "ls", "-q"]);
    assert!(leases.trim().is_empty(), "leases left: {leases}");
}

#[tokio::test]
async fn a_set_deleted_mid_pull_aborts_the_pull_releases_its_pins_and_gets_no_more_writes() {
    use agent::pull::Runtime;
    use testbed::servers::slow_link::SlowLink;

    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-deleted");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    // 2 MB/s: the big image takes about 16 s, long enough to delete its set
    // in the middle.
    let link = SlowLink::start(&registry.host, 2 * MB as u64).unwrap();
    let work = dir.join("images");
    let small = images::build_and_push(&work, &registry.host, "team/small", "1", &[MB]).unwrap();
    let big = images::build_and_push(&work, &registry.host, "team/big", "1", &[16 * MB, 16 * MB])
        .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    // Every request of the node's pulls goes through the link.
    node.configure_registry(&registry.host, &[&link.host])
        .unwrap();
    let config = Config {
        progress_every: Duration::from_secs(1),
        ..config("fault-node-deleted", &node, &dir)
    };
    let (stop, running) = run(&client, config);

    set(
        &client,
        "faults-deleted",
        "fault-node-deleted",
        json!([{"name": small.reference, "registryPolicy": "Default"},
               {"name": big.reference, "registryPolicy": "Default"}]),
        3,
    )
    .await;
    // The seed tells its progress while it pulls, and it grows.
    let progress = |s: &crd::NodeImageSetStatus| {
        s.images
            .iter()
            .find(|i| i.name == big.reference && i.state == PullState::Pulling)
            .and_then(|i| i.progress_bytes)
    };
    let st = wait_status(
        &client,
        "faults-deleted",
        "small there, big under way",
        |s| s.available == 1 && progress(s).is_some(),
    )
    .await;
    let first = progress(&st).unwrap();
    let st = wait_status(&client, "faults-deleted", "more progress told", |s| {
        progress(s).is_some_and(|p| p > first)
    })
    .await;
    let second = progress(&st).unwrap();
    assert!(
        second < big.size as i64,
        "progress {second} is below the image's {} bytes while it pulls",
        big.size
    );
    let runtime = Runtime::connect(&node.socket).await.unwrap();
    assert!(
        runtime
            .labels(&small.reference)
            .await
            .unwrap()
            .contains_key("imageprefetch.io/pinned"),
        "the small image is pinned while its set wants it"
    );

    let missing_writes = || {
        testbed::support::api_metrics::count(&client, |r| {
            r.is("resource", "nodeimagesets")
                && r.is("subresource", "status")
                && r.is("code", "404")
        })
    };
    let before = missing_writes().await.unwrap();
    let api: kube::Api<crd::NodeImageSet> = kube::Api::all(client.clone());
    api.delete("faults-deleted", &Default::default())
        .await
        .unwrap();
    // The pull stops (its containerd lease goes with it) and the pin comes
    // off, well before the big image could have finished.
    testbed::support::poll::eventually(
        "the pull aborted and the pin released",
        Duration::from_secs(10),
        || async {
            let leases = ctr(&node, &["leases", "ls", "-q"]);
            let labels = runtime.labels(&small.reference).await.ok()?;
            (leases.trim().is_empty() && !labels.contains_key("imageprefetch.io/pinned"))
                .then_some(())
        },
    )
    .await;
    let at_abort = missing_writes().await.unwrap();
    let delivered = link.delivered();

    // A set the agent handles after the deletion: once it is reported, every
    // event before it has been handled.
    set(
        &client,
        "faults-deleted-after",
        "fault-node-deleted",
        json!([{"name": small.reference, "registryPolicy": "Default"}]),
        3,
    )
    .await;
    wait_status(
        &client,
        "faults-deleted-after",
        "the next set served",
        |s| s.available == 1,
    )
    .await;
    let after = missing_writes().await.unwrap();
    eprintln!(
        "deleted mid-pull: progress told {first} then {second} bytes; {} of {} bytes delivered when aborted; \
         status writes answered 404: {} during the deletion, {} after it",
        delivered,
        big.size,
        at_abort - before,
        after - at_abort
    );
    // At most a write already in flight when the set went; none afterwards.
    assert!(
        at_abort - before <= 1,
        "{} writes to the deleted set",
        at_abort - before
    );
    assert_eq!(
        after, at_abort,
        "status writes to the deleted set after its deletion was seen"
    );
    assert!(
        link.delivered() < big.size as u64,
        "the link delivered {} bytes: the aborted pull went on",
        link.delivered()
    );
    let listed = ctr(&node, &["images", "ls", "-q"]);
    assert!(
        !listed.lines().any(|l| l == big.reference),
        "the aborted image was stored: {listed}"
    );
    stop.send(()).unwrap();
    running.await.unwrap();
}

/// A node's containerd comes back with its state wiped (a re-imaged disk, a
/// runtime reinstalled) under a running agent: the agent follows
/// containerd's events anew, creates the Kubernetes namespace again (a
/// Transfer's streams need it) and pulls the prefetched image again, with no
/// restart of its own.
#[tokio::test]
async fn a_containerd_that_comes_back_empty_gets_its_images_again() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-wiped");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let image = images::build_and_push(
        &dir.join("images"),
        &registry.host,
        "team/wiped",
        "1",
        &[MB],
    )
    .unwrap();
    let mut node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    let log = dir.join("agent.log");
    let mut agent = agent_process("fault-node-wiped", &node, &dir.join("agent-hosts"), &log);
    set(
        &client,
        "faults-wiped",
        "fault-node-wiped",
        json!([{"name": image.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    wait_status(&client, "faults-wiped", "Available", |s| s.available == 1).await;
    let fetched_once = registry.blob_gets("team/wiped");

    node.crash();
    std::fs::remove_dir_all(dir.join("node").join("root")).unwrap();
    std::fs::remove_dir_all(dir.join("node").join("state")).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    testbed::support::poll::eventually(
        "the image back on the wiped node",
        Duration::from_secs(60),
        || async {
            let namespaces = ctr(&node, &["namespaces", "ls", "-q"]);
            let images = ctr(&node, &["images", "ls", "-q"]);
            (namespaces.lines().any(|n| n == "k8s.io")
                && images.lines().any(|i| i == image.reference))
            .then_some(())
        },
    )
    .await;
    // Fetched from the registry a second time, each blob once more.
    let fetched = registry.blob_gets("team/wiped");
    for (blob, n) in &fetched_once {
        assert_eq!(fetched.get(blob), Some(&(n + 1)), "{blob}: {fetched:?}");
    }
    agent.kill().unwrap();
    agent.wait().unwrap();
}

/// An agent that starts while its node's containerd does not answer (a node
/// booting, containerd restarting) waits for it instead of stopping, and
/// does its work once containerd is there.
#[tokio::test]
async fn an_agent_started_before_containerd_waits_for_it() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-late-runtime");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let image =
        images::build_and_push(&dir.join("images"), &registry.host, "team/late", "1", &[MB])
            .unwrap();
    let mut node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    let config = config("fault-node-late", &node, &dir);
    node.crash();
    let (stop, mut running) = run(&client, config);
    set(
        &client,
        "faults-late",
        "fault-node-late",
        json!([{"name": image.reference, "registryPolicy": "Default"}]),
        1,
    )
    .await;
    // A negative check: still running after a few refused connections.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut running)
            .await
            .is_err(),
        "the agent stopped without containerd"
    );
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&registry.host, &[]).unwrap();
    wait_status(&client, "faults-late", "Available", |s| s.available == 1).await;
    let _ = stop.send(());
    running.await.unwrap();
}

/// A pull over a slow link that keeps moving outlasts both the stall limit
/// and what used to be the wall-clock limit, and completes; one whose link
/// stops delivering is ended once nothing has moved for the stall limit.
#[tokio::test]
async fn a_slow_pull_that_moves_completes_and_a_stalled_one_is_ended() {
    let client = testbed::beds::shared::client().await;
    let dir = Workdir::new("agent-faults-slow");
    let registry = Registry::start(&dir.join("registry")).unwrap();
    let work_dir = dir.join("images");
    images::build_and_push(&work_dir, &registry.host, "team/slow", "1", &[6 * MB]).unwrap();
    images::build_and_push(&work_dir, &registry.host, "team/stalls", "1", &[6 * MB]).unwrap();
    // Two links of 1 MiB/s: about 6 s for either image.
    let moving = testbed::servers::slow_link::SlowLink::start(&registry.host, MB as u64).unwrap();
    let stalling = testbed::servers::slow_link::SlowLink::start(&registry.host, MB as u64).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&moving.host, &[]).unwrap();
    node.configure_registry(&stalling.host, &[]).unwrap();
    let config = Config {
        stall_timeout: Duration::from_secs(2),
        // A wall clock would end both; containerd reports their progress.
        pull_timeout: Duration::from_secs(2),
        ..config("fault-node-slow", &node, &dir)
    };
    let (stop, running) = run(&client, config);

    let slow = format!("{}/team/slow:1", moving.host);
    let stalls = format!("{}/team/stalls:1", stalling.host);
    set(
        &client,
        "faults-slow",
        "fault-node-slow",
        json!([{"name": slow, "registryPolicy": "Default"}, {"name": stalls, "registryPolicy": "Default"}]),
        0,
    )
    .await;
    // The second link stops once it has delivered a part of its image.
    testbed::support::poll::eventually(
        "the stalling link carried 1 MiB",
        Duration::from_secs(60),
        || async { (stalling.delivered() > MB as u64).then_some(()) },
    )
    .await;
    stalling.cut();
    let started = std::time::Instant::now();
    let st = wait_status(&client, "faults-slow", "one pulled, one ended", |s| {
        s.available == 1 && s.images.iter().any(|i| i.state == PullState::Failed)
    })
    .await;
    let pulled = st.images.iter().find(|i| i.name == slow).unwrap();
    assert_eq!(pulled.state, PullState::Available, "{pulled:?}");
    let ended = st.images.iter().find(|i| i.name == stalls).unwrap();
    assert_eq!(ended.reason, Some(PullFailure::PullTimeout), "{ended:?}");
    let message = ended.last_error.as_deref().unwrap();
    assert!(message.contains("made no progress for 2s"), "{message}");
    assert!(
        moving.delivered() >= 6 * MB as u64,
        "the slow image came over its link"
    );
    eprintln!("ended {:?} after the cut", started.elapsed());

    let _ = stop.send(());
    running.await.unwrap();
}
