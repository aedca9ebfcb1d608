//! The headline, counted: each image crosses the cluster's uplink once.
//!
//! Three simulated nodes (two amd64, one arm64), each with its own
//! containerd 2.x, its own peer mirror (the stand-in with spegel's data-path
//! behaviour, on its own loopback address) and its agent; one controller;
//! one external registry whose access log is the count. One ImagePrefetch of
//! two images, one of them a two-platform index, is rolled out (each
//! platform's blobs served exactly once); a two-platform image for the amd64
//! nodes only (its arm64 blobs never served); then, with fresh images, the
//! same rollout with sequencing switched off, for comparison (spegel alone:
//! simultaneous first pulls all go upstream).

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{Api, ListParams};

use crd::{NodeImageSet, RegistryPolicy};
use testbed::beds::peer_cluster::PeerCluster;

/// (name, architecture)
const NODES: [(&str, &str); 3] = [("amd-0", "amd64"), ("amd-1", "amd64"), ("arm-0", "arm64")];
const MB: usize = 1 << 20;
const WITHIN: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread")]
async fn each_blob_crosses_the_uplink_once_and_each_platform_only_its_own() {
    let work = testbed::support::workdir::Workdir::new("e2e-headline");
    let mut bed = PeerCluster::start(&work, &NODES)
        .await
        .expect("the peer-mirror bed (agent and peer-mirror built by cargo test --workspace)");
    bed.start_controller(&[], "controller.log").unwrap();
    let images_dir = work.join("images");
    let host = bed.upstream.host.clone();
    let web = testbed::builds::images::build_and_push(
        &images_dir,
        &host,
        "team/web",
        "1.0",
        &[3 * MB, MB, MB / 2],
    )
    .unwrap();
    let multi = testbed::builds::images::build_and_push_multi_platform(
        &images_dir,
        &host,
        "team/multi",
        "2.0",
        &["amd64", "arm64"],
        &[2 * MB, MB],
    )
    .unwrap();

    let took = bed
        .rollout("headline", &[&web.reference, &multi.reference], WITHIN)
        .await
        .unwrap();

    // From the external registry's own access log.
    let web_gets = bed.upstream.gets_of(&web.repository, &web.blobs);
    assert!(
        web_gets.values().all(|&n| n == 1),
        "every blob of the single-platform image served exactly once: {web_gets:?}"
    );
    for (arch, image) in &multi.platforms {
        let per_blob = bed.upstream.gets_of(&multi.repository, &image.blobs);
        assert!(
            per_blob.values().all(|&n| n == 1),
            "every {arch} blob served exactly once (one seed per platform): {per_blob:?}"
        );
    }
    // Blobs of the registry that no platform's manifest lists: none was fetched.
    let listed: Vec<&String> = multi.platforms.values().flat_map(|i| &i.blobs).collect();
    let stray: Vec<_> = bed
        .upstream
        .blob_gets(&multi.repository)
        .into_iter()
        .filter(|(b, _)| !listed.contains(&b))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // Who pulled how: one seed per image and platform; the Mirror node got
    // its bytes from a peer, and each node's sizeBytes is its platform's.
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    let all = sets.list(&ListParams::default()).await.unwrap().items;
    let mut seeds = BTreeMap::new();
    for set in &all {
        let node = &set.spec.node_name;
        let arch = NODES.iter().find(|n| n.0 == node).unwrap().1;
        for e in &set.spec.image_set {
            let report = set.report_on(&e.name).expect("a report per image");
            if e.registry_policy == RegistryPolicy::Default {
                *seeds.entry((e.name.clone(), arch)).or_insert(0) += 1;
            }
            let expected = if e.name == multi.reference {
                multi.platforms[arch].size
            } else {
                web.size
            };
            assert_eq!(
                report.size_bytes,
                Some(expected as i64),
                "{node}: sizeBytes of {} is its platform's",
                e.name
            );
        }
    }
    // One seed per image and platform; platforms seed one after the other,
    // the second through the mirror first: the counts above show that it
    // fetched only its own platform's blobs upstream.
    for image in [&web.reference, &multi.reference] {
        for arch in ["amd64", "arm64"] {
            assert_eq!(
                seeds.get(&(crd::SharedStr::from(image.as_str()), arch)),
                Some(&1),
                "{image} {arch}: {seeds:?}"
            );
        }
    }
    let peer_bytes = bed.peer_bytes();
    let platform_bytes = web.size + multi.platforms["amd64"].size;
    assert!(
        peer_bytes >= platform_bytes,
        "the amd64 Mirror node's bytes came from a peer: {peer_bytes} < {platform_bytes}"
    );
    // Each platform's image once: nothing more crossed the uplink.
    let upstream_bytes = bed.upstream.blob_bytes_served();
    let once = web.size + multi.platforms.values().map(|i| i.size).sum::<u64>();
    assert_eq!(upstream_bytes, once, "upstream blob bytes");
    eprintln!(
        "headline: sequenced rollout of 2 images (one 2-platform) to 3 nodes in {:.1}s; \
         upstream blob GETs: 1 per blob; upstream blob bytes {upstream_bytes}; \
         bytes nodes got from peers {peer_bytes}",
        took.as_secs_f64()
    );

    // A two-platform image for the amd64 nodes only: not one arm64 blob
    // crosses the uplink.
    let amd_only = testbed::builds::images::build_and_push_multi_platform(
        &images_dir,
        &host,
        "team/amd-only",
        "1.0",
        &["amd64", "arm64"],
        &[MB, MB / 2],
    )
    .unwrap();
    let started = std::time::Instant::now();
    bed.prefetch_to(
        "amd-only",
        &[&amd_only.reference],
        &[(crd::platform::ARCH_LABEL, "amd64")],
    )
    .await
    .unwrap();
    bed.ready("amd-only", "2/2", started, WITHIN).await.unwrap();
    let amd = bed
        .upstream
        .gets_of(&amd_only.repository, &amd_only.platforms["amd64"].blobs);
    let arm = bed
        .upstream
        .gets_of(&amd_only.repository, &amd_only.platforms["arm64"].blobs);
    assert!(amd.values().all(|&n| n == 1), "{amd:?}");
    assert!(
        arm.values().all(|&n| n == 0),
        "no arm64 blob for amd64 nodes: {arm:?}"
    );

    // The same rollout with sequencing off, on fresh images: every node
    // starts at once, the peers have nothing yet, and the uplink pays.
    bed.start_controller(&["--no-sequencing"], "controller-unsequenced.log")
        .unwrap();
    let web2 = testbed::builds::images::build_and_push(
        &images_dir,
        &host,
        "team/web2",
        "1.0",
        &[3 * MB, MB, MB / 2],
    )
    .unwrap();
    let took = bed
        .rollout("unsequenced", &[&web2.reference], WITHIN)
        .await
        .unwrap();
    let counts = bed.upstream.gets_of(&web2.repository, &web2.blobs);
    let total: usize = counts.values().sum();
    assert!(counts.values().all(|&n| (1..=3).contains(&n)), "{counts:?}");
    eprintln!(
        "headline: unsequenced rollout of 1 image to 3 nodes in {:.1}s; upstream GETs per blob {:?} \
         ({total} for {} blobs; sequenced: {})",
        took.as_secs_f64(),
        counts.values().collect::<Vec<_>>(),
        counts.len(),
        counts.len()
    );
}

/// Two zones (two nodes each), one image: with the default zone seeding the
/// second zone's seed starts once the first zone holds the image, and its
/// Default pull finds every blob in the in-cluster mirror — the registry
/// serves each blob once for the whole cluster, not once per zone.
#[tokio::test(flavor = "multi_thread")]
async fn two_zones_cross_the_uplink_once() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Patch, PatchParams};

    const ZONED: [(&str, &str); 4] = [
        ("zone-a-0", "amd64"),
        ("zone-a-1", "amd64"),
        ("zone-b-0", "amd64"),
        ("zone-b-1", "amd64"),
    ];
    let work = testbed::support::workdir::Workdir::new("e2e-two-zones");
    // A slow uplink (1 MiB/s): seeds of two zones at once would both be
    // fetching from the registry, the peers holding nothing yet.
    let mut bed = PeerCluster::start_with_uplink(&work, &ZONED, Some(MB as u64))
        .await
        .expect("the peer-mirror bed (agent and peer-mirror built by cargo test --workspace)");
    let nodes: Api<Node> = Api::all(bed.client.clone());
    for (name, _) in ZONED {
        let zone = &name[..6];
        let patch =
            serde_json::json!({"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}});
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
    bed.start_controller(&[], "controller.log").unwrap();
    let app = testbed::builds::images::build_and_push(
        &work.join("images"),
        &bed.registry_host(),
        "team/zoned",
        "1.0",
        &[2 * MB, MB, MB / 2],
    )
    .unwrap();
    let took = bed
        .rollout("zoned", &[&app.reference], WITHIN)
        .await
        .unwrap();
    let per_blob = bed.upstream.gets_of(&app.repository, &app.blobs);
    assert!(
        per_blob.values().all(|&n| n == 1),
        "each blob served once for both zones: {per_blob:?}"
    );
    assert_eq!(bed.upstream.blob_bytes_served(), app.size);
    // One seed per zone, the second served by the mirror.
    let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
    let mut seeds: Vec<String> = sets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|s| {
            s.spec
                .image_set
                .iter()
                .any(|e| e.registry_policy == RegistryPolicy::Default)
        })
        .map(|s| s.spec.node_name[..6].to_string())
        .collect();
    seeds.sort();
    assert_eq!(seeds, ["zone-a", "zone-b"], "one seed in each zone");
    eprintln!(
        "headline: two zones, 4 nodes, one image in {:.1}s; upstream blob GETs {:?}",
        took.as_secs_f64(),
        per_blob.values().collect::<Vec<_>>()
    );
}
