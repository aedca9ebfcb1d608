//! The headline, counted: each image crosses the cluster's uplink once.
//!
//! Three simulated nodes (two amd64, one arm64), each with its own
//! containerd 2.x, its own peer mirror (the stand-in with spegel's data-path
//! behaviour, on its own loopback address) and its agent; one controller;
//! one external registry whose access log is the count. One ImagePrefetch of
//! two images, one of them a two-platform index, is rolled out; then, with
//! fresh images, the same rollout with sequencing switched off, for
//! comparison (spegel alone: simultaneous first pulls all go upstream).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crd::{ImagePrefetch, NodeImageSet, RegistryPolicy};
use testbed::peer_mirror::Timing;
use testbed::process::Lifetime;
use testbed::registry::Registry;
use testbed::simulated::{Binary, CONTROLLER, Mirror, NodeSetup, SimulatedNode};

/// (name, architecture, loopback address of its mirror)
const NODES: [(&str, &str, &str); 3] = [
    ("amd-0", "amd64", "127.0.0.31"),
    ("amd-1", "amd64", "127.0.0.32"),
    ("arm-0", "arm64", "127.0.0.33"),
];
const MB: usize = 1 << 20;

struct Bed {
    client: kube::Client,
    kubeconfig: std::path::PathBuf,
    upstream: Registry,
    nodes: Vec<SimulatedNode>,
}

async fn rollout(bed: &Bed, name: &str, images: &[&str]) -> Duration {
    let api: Api<ImagePrefetch> = Api::namespaced(bed.client.clone(), "default");
    let object = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"images": images, "nodeSelector": {"pool": "headline"}},
    });
    let started = Instant::now();
    api.patch(
        name,
        &PatchParams::apply("e2e-headline").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap();
    let deadline = started + Duration::from_secs(240);
    loop {
        let status = api.get(name).await.unwrap().status;
        if status.as_ref().is_some_and(|s| s.ready == "3/3") {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{name} not Ready within 4 minutes: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Upstream GETs of each of `blobs` (of `repository`).
fn gets(upstream: &Registry, repository: &str, blobs: &[String]) -> BTreeMap<String, usize> {
    let served = upstream.blob_gets(repository);
    blobs
        .iter()
        .map(|b| (b.clone(), served.get(b).copied().unwrap_or(0)))
        .collect()
}

async fn start_bed(work: &Path, controller_args: &[&str]) -> (Bed, Binary, testbed::ControlPlane) {
    let plane = testbed::ControlPlane::start(&work.join("cluster"), Lifetime::Owned)
        .await
        .expect("control plane");
    let client = plane.client().await.unwrap();
    testbed::crds::install(&client).await.unwrap();
    let upstream = Registry::start(&work.join("upstream")).unwrap();
    let directory = work.join("directory");
    let timing = Timing::default();
    let mut nodes = Vec::new();
    for (name, arch, ip) in NODES {
        let labels = [
            ("pool".to_string(), "headline".to_string()),
            (crd::platform::ARCH_LABEL.to_string(), arch.to_string()),
        ]
        .into();
        let platform = format!("linux/{arch}");
        nodes.push(
            SimulatedNode::start(
                &work.join("nodes"),
                &client,
                &plane.kubeconfig,
                NodeSetup {
                    name,
                    labels,
                    mirror: Mirror::Peer {
                        upstream: &upstream.host,
                        ip,
                        directory: &directory,
                        timing: &timing,
                    },
                    platform: Some(&platform),
                    jaeger: None,
                },
            )
            .await
            .expect("a simulated node (agent and peer-mirror built by cargo test --workspace)"),
        );
    }
    let controller = Binary::start(
        CONTROLLER,
        controller_args,
        &plane.kubeconfig,
        None,
        &work.join("controller.log"),
    )
    .expect("controller (built by cargo test --workspace)");
    let bed = Bed {
        client,
        kubeconfig: plane.kubeconfig.clone(),
        upstream,
        nodes,
    };
    (bed, controller, plane)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_blob_crosses_the_uplink_once_and_each_platform_only_its_own() {
    let work = testbed::workdir::Workdir::new("e2e-headline");
    let (bed, controller, _plane) = start_bed(&work, &[]).await;
    let images_dir = work.join("images");
    let host = bed.upstream.host.clone();
    let web = testbed::images::build_and_push(
        &images_dir,
        &host,
        "team/web",
        "1.0",
        &[3 * MB, MB, MB / 2],
    )
    .unwrap();
    let multi = testbed::images::build_and_push_multi_platform(
        &images_dir,
        &host,
        "team/multi",
        "2.0",
        &["amd64", "arm64"],
        &[2 * MB, MB],
    )
    .unwrap();

    let took = rollout(&bed, "headline", &[&web.reference, &multi.reference]).await;

    // From the external registry's own access log.
    let web_gets = gets(&bed.upstream, &web.repository, &web.blobs);
    assert!(
        web_gets.values().all(|&n| n == 1),
        "every blob of the single-platform image served exactly once: {web_gets:?}"
    );
    for (arch, image) in &multi.platforms {
        let per_blob = gets(&bed.upstream, &multi.repository, &image.blobs);
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
                seeds.get(&(image.clone(), arch)),
                Some(&1),
                "{image} {arch}: {seeds:?}"
            );
        }
    }
    let peer_bytes: u64 = bed
        .nodes
        .iter()
        .filter_map(|n| n.peer_mirror.as_ref())
        .map(|m| m.counter("peer_mirror_peer_bytes_total"))
        .sum();
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

    // The same rollout with sequencing off, on fresh images: every node
    // starts at once, the peers have nothing yet, and the uplink pays.
    drop(controller);
    let _unsequenced = Binary::start(
        CONTROLLER,
        &["--no-sequencing"],
        &bed.kubeconfig,
        None,
        &work.join("controller-unsequenced.log"),
    )
    .unwrap();
    let web2 = testbed::images::build_and_push(
        &images_dir,
        &host,
        "team/web2",
        "1.0",
        &[3 * MB, MB, MB / 2],
    )
    .unwrap();
    let took = rollout(&bed, "unsequenced", &[&web2.reference]).await;
    let counts = gets(&bed.upstream, &web2.repository, &web2.blobs);
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
