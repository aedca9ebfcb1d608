//! Faults an administrator meets during a rollout, on the peer-mirror bed,
//! each counted at the external registry: a node that joins mid-rollout, a
//! node removed mid-rollout, and a seed whose containerd dies mid-pull. The
//! uplink is slowed so that the pulls last long enough to act during them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};

use crd::{NodeImageSet, PullState, RegistryPolicy};
use testbed::beds::peer_cluster::PeerCluster;
use testbed::builds::images::Image;
use testbed::support::poll::eventually;

const MB: usize = 1 << 20;
/// 16 MB/s: the 8 MB image below takes about half a second upstream.
const UPLINK: u64 = 16 << 20;
const WITHIN: Duration = Duration::from_secs(180);

async fn bed(work: &std::path::Path, nodes: &[(&str, &str)], controller: &[&str]) -> PeerCluster {
    let mut bed = PeerCluster::start_with_uplink(work, nodes, Some(UPLINK))
        .await
        .expect("the peer-mirror bed (agent and peer-mirror built by cargo test --workspace)");
    bed.start_controller(controller, "controller.log").unwrap();
    bed
}

fn image(bed: &PeerCluster, work: &std::path::Path, repository: &str, layers: &[usize]) -> Image {
    testbed::builds::images::build_and_push(
        &work.join("images"),
        &bed.registry_host(),
        repository,
        "1.0",
        layers,
    )
    .unwrap()
}

/// The node whose set has a `Default` entry reported `state`, once one does.
async fn seed_in(bed: &PeerCluster, state: PullState) -> String {
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    let what = format!("a seed {state:?}");
    eventually(&what, Duration::from_secs(60), || async {
        let all = sets.list(&ListParams::default()).await.unwrap().items;
        all.into_iter()
            .find(|set| {
                set.spec.image_set.iter().any(|e| {
                    e.registry_policy == RegistryPolicy::Default
                        && set.report_on(&e.name).map(|r| r.state) == Some(state)
                })
            })
            .map(|set| set.spec.node_name)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_joins_mid_rollout_gets_the_images_from_peers() {
    let work = testbed::support::workdir::Workdir::new("e2e-fault-join");
    let mut bed = bed(&work, &[("join-0", "amd64"), ("join-1", "amd64")], &[]).await;
    let img = image(&bed, &work, "team/joined", &[6 * MB, 2 * MB]);
    let started = Instant::now();
    bed.prefetch("joined", &[&img.reference]).await.unwrap();
    seed_in(&bed, PullState::Pulling).await;
    bed.add_node("join-late", "amd64").await.unwrap();
    bed.ready("joined", "3/3", started, WITHIN).await.unwrap();
    let counts = bed.upstream.gets_of(&img.repository, &img.blobs);
    assert!(
        counts.values().all(|&n| n == 1),
        "the late node got every blob from peers: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_removed_mid_rollout_loses_its_set_and_disturbs_no_other() {
    let work = testbed::support::workdir::Workdir::new("e2e-fault-remove");
    let nodes = [("rm-0", "amd64"), ("rm-1", "amd64"), ("rm-2", "amd64")];
    let bed = bed(&work, &nodes, &[]).await;
    let img = image(&bed, &work, "team/removed", &[6 * MB, 2 * MB]);
    let started = Instant::now();
    bed.prefetch("removed", &[&img.reference]).await.unwrap();
    let seed = seed_in(&bed, PullState::Pulling).await;
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    // The node removed is one the rollout has released (the second to
    // resolve the tag, once the seed has the image): it has a set to lose.
    let gone = eventually(
        "a second node released",
        Duration::from_secs(60),
        || async {
            let all = sets.list(&ListParams::default()).await.unwrap().items;
            all.into_iter()
                .map(|s| s.spec.node_name)
                .find(|n| *n != seed)
        },
    )
    .await;
    let gone = gone.as_str();
    let uids = |list: Vec<NodeImageSet>| -> BTreeMap<String, String> {
        list.iter()
            .filter(|s| s.spec.node_name != gone)
            .map(|s| (s.name_any(), s.uid().unwrap_or_default()))
            .collect()
    };
    let before = uids(sets.list(&ListParams::default()).await.unwrap().items);
    let node_api: Api<k8s_openapi::api::core::v1::Node> = Api::all(bed.client.clone());
    node_api
        .delete(gone, &DeleteParams::default())
        .await
        .unwrap();

    bed.ready("removed", "2/2", started, WITHIN).await.unwrap();
    let all = eventually(
        "the removed node's set gone",
        Duration::from_secs(30),
        || async {
            let all = sets.list(&ListParams::default()).await.unwrap().items;
            all.iter().all(|s| s.spec.node_name != gone).then_some(all)
        },
    )
    .await;
    // Sets written before the removal are the same objects; a node still
    // waiting then had none, and has one now.
    let after = uids(all);
    assert!(
        before
            .iter()
            .all(|(name, uid)| after.get(name) == Some(uid)),
        "the other sets are the same objects: {before:?} then {after:?}"
    );
    assert_eq!(after.len(), nodes.len() - 1, "{after:?}");
    let counts = bed.upstream.gets_of(&img.repository, &img.blobs);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seed_whose_containerd_dies_mid_pull_is_replaced_and_the_rollout_completes() {
    let work = testbed::support::workdir::Workdir::new("e2e-fault-seed");
    let nodes = [
        ("seed-0", "amd64"),
        ("seed-1", "amd64"),
        ("seed-2", "amd64"),
    ];
    // A node that stopped reporting Ready leaves the selection after 5 s.
    let mut bed = bed(&work, &nodes, &["--not-ready-grace-seconds", "5"]).await;
    let img = image(&bed, &work, "team/orphaned", &[12 * MB, 4 * MB]);
    let started = Instant::now();
    bed.prefetch("orphaned", &[&img.reference]).await.unwrap();
    let seed = seed_in(&bed, PullState::Pulling).await;
    // Its runtime dies, and its kubelet's heartbeat with it.
    let node = bed.nodes.iter_mut().find(|n| n.name == seed).unwrap();
    node.containerd.crash();
    testbed::support::nodes::set_ready(&bed.client, &seed, false)
        .await
        .unwrap();

    bed.ready("orphaned", "2/2", started, WITHIN).await.unwrap();
    let new_seed = seed_in(&bed, PullState::Available).await;
    assert_ne!(new_seed, seed, "another node became the seed");
    let counts = bed.upstream.gets_of(&img.repository, &img.blobs);
    let extra: usize = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "rollout faults: the seed's death cost {extra} extra upstream blob downloads ({counts:?})"
    );
    assert!(
        counts.values().all(|&n| (1..=2).contains(&n)),
        "at most the dead seed's partial download more per blob: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_node_pool_whose_image_is_pushed_late_becomes_ready_by_itself() {
    let work = testbed::support::workdir::Workdir::new("e2e-fault-late");
    // One attempt per round, and a 5 s cool-down before the node seeds again.
    let controller = ["--retry-limit", "0", "--seed-cooldown-seconds", "5"];
    let bed = bed(&work, &[("late-0", "amd64")], &controller).await;
    let reference = format!("{}/team/late:1.0", bed.registry_host());
    let started = Instant::now();
    bed.prefetch("late", &[&reference]).await.unwrap();

    // The tag does not exist yet: the rollout says so, with when it tries again.
    let api: Api<crd::ImagePrefetch> = Api::namespaced(bed.client.clone(), "default");
    let degraded = eventually(
        "Degraded NoSeedAvailable",
        Duration::from_secs(60),
        || async {
            let p = api.get("late").await.unwrap();
            p.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.reason == "NoSeedAvailable")
        },
    )
    .await;
    assert_eq!(degraded.status, "True");
    assert!(
        degraded.message.contains("late-0") && degraded.message.contains("trying again in"),
        "{}",
        degraded.message
    );

    // Pushed at last: the next round finds it, with no restart of anything.
    image(&bed, &work, "team/late", &[MB]);
    bed.ready("late", "1/1", started, WITHIN).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_down_for_a_minute_mid_rollout_then_back_ends_ready_with_no_restart() {
    let work = testbed::support::workdir::Workdir::new("e2e-fault-registry-down");
    let nodes = [("down-0", "amd64"), ("down-1", "amd64")];
    // One retry per round and a short cool-down, so the outage is felt at once.
    let controller = ["--retry-limit", "1", "--seed-cooldown-seconds", "5"];
    let mut bed = bed(&work, &nodes, &controller).await;
    let small = image(&bed, &work, "team/first", &[MB]);
    // Four seconds through the uplink: the outage lands while it is on its way.
    let large = image(&bed, &work, "team/second", &[64 * MB]);
    let started = Instant::now();
    bed.prefetch("outage", &[&small.reference, &large.reference])
        .await
        .unwrap();
    // Mid-rollout: the registry goes away while the large image is on its way.
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    eventually(
        "the large image being pulled",
        Duration::from_secs(60),
        || async {
            let all = sets.list(&ListParams::default()).await.unwrap().items;
            all.iter()
                .any(|s| s.report_on(&large.reference).map(|r| r.state) == Some(PullState::Pulling))
                .then_some(())
        },
    )
    .await;
    bed.upstream.stop();
    let down = Instant::now();

    // While it is down the rollout says so: Degraded, with its reason.
    let api: Api<crd::ImagePrefetch> = Api::namespaced(bed.client.clone(), "default");
    let degraded = eventually(
        "Degraded while the registry is down",
        Duration::from_secs(55),
        || async {
            let status = api.get("outage").await.unwrap().status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
        },
    )
    .await;
    assert!(
        ["NoSeedAvailable", "PullFailed"].contains(&degraded.reason.as_str()),
        "{degraded:?}"
    );
    eprintln!(
        "registry down: Degraded {} ({})",
        degraded.reason, degraded.message
    );
    let outage = Duration::from_secs(60);
    tokio::time::sleep(outage.saturating_sub(down.elapsed())).await;
    bed.upstream.restart().unwrap();
    let back = Instant::now();

    // Back: Ready by itself; nothing was restarted.
    bed.ready("outage", "2/2", started, Duration::from_secs(300))
        .await
        .unwrap();
    eprintln!(
        "registry down: all Ready {:.0}s after the registry came back",
        back.elapsed().as_secs_f64()
    );
}

/// spegel on containerd 2.0 never advertises what is pulled after it
/// started (no content events), so Mirror pulls that look the seed up
/// never find it. A Mirror entry names a holder and its address: the
/// agent asks that node's mirror first, with spegel's peer header, and no
/// lookup is needed. The rollout completes, each blob crosses the uplink
/// once, and every byte the other nodes got was served by a holder.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_pulls_from_named_holders_need_no_advertisement() {
    let work = testbed::support::workdir::Workdir::new("e2e-named-sources");
    let nodes = [
        ("named-0", "amd64"),
        ("named-1", "amd64"),
        ("named-2", "amd64"),
        ("named-3", "amd64"),
    ];
    let settings = testbed::servers::peer_mirror::Settings {
        content_events: false,
        ..Default::default()
    };
    let mut bed = PeerCluster::start_with_settings(&work, &nodes, Some(UPLINK), settings)
        .await
        .expect("the peer-mirror bed");
    bed.start_controller(&[], "controller.log").unwrap();
    let img = image(&bed, &work, "team/named", &[6 * MB, 2 * MB]);
    // By digest: no second node resolves a tag at the registry (whose
    // blobs would come through spegel's lookup, which finds nothing here).
    let pinned = format!("{}/{}@{}", bed.registry_host(), img.repository, img.digest);
    bed.rollout("named", &[&pinned], WITHIN).await.unwrap();

    let counts = bed.upstream.gets_of(&img.repository, &img.blobs);
    assert!(
        counts.values().all(|&n| n == 1),
        "each blob crossed the uplink once: {counts:?}"
    );
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    let all = sets.list(&ListParams::default()).await.unwrap().items;
    let mirror: Vec<&crd::NodeImage> = all
        .iter()
        .flat_map(|s| s.spec.image_set.iter())
        .filter(|e| e.registry_policy == RegistryPolicy::Mirror)
        .collect();
    assert_eq!(mirror.len(), nodes.len() - 1);
    for (set, e) in all
        .iter()
        .flat_map(|s| s.spec.image_set.iter().map(move |e| (s, e)))
    {
        if e.registry_policy == RegistryPolicy::Mirror {
            let from = e.source.as_ref().expect("a named holder");
            assert_ne!(from.node, set.spec.node_name);
        }
    }
    let from_peers = bed.peer_bytes();
    let needed = img.size * (nodes.len() as u64 - 1);
    assert!(
        from_peers >= needed,
        "the Mirror nodes' bytes were served by holders: {from_peers} < {needed}"
    );
}
