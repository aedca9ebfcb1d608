//! The runtime matrix: the same pulls on every containerd the project can
//! build (the bed's 2.2.9 and the newest approved release, 2.4.2), counted
//! from the registries' access logs — a seed's blobs served upstream once,
//! a Mirror entry's never. containerd before 2.0 fails closed
//! (`agent.rs`, `mirror_entries_fail_closed_on_containerd_before_2`); 1.7.x
//! and 2.0.x are not among the approved module versions and are not built.

mod support;

use std::collections::BTreeMap;

use serde_json::json;

use crd::{PullSource, PullState};
use testbed::builds::images;
use testbed::servers::containerd::{Containerd, Flavor};
use testbed::servers::registry::Registry;
use testbed::support::workdir::Workdir;

use support::{MB, config, run, set, wait_status};

#[tokio::test]
async fn seeds_and_mirror_pulls_count_the_same_on_every_containerd() {
    let client = testbed::beds::shared::client().await;
    for (flavor, tag) in [(Flavor::V2, "v2-2"), (Flavor::V2Latest, "v2-4")] {
        let dir = Workdir::new(&format!("agent-runtime-{tag}"));
        let upstream = Registry::start(&dir.join("upstream")).unwrap();
        let mirror = Registry::start(&dir.join("mirror")).unwrap();
        let work = dir.join("images");
        let seeded =
            images::build_and_push(&work, &upstream.host, "team/seeded", "1", &[2 * MB, MB])
                .unwrap();
        let mirrored =
            images::build_and_push(&work, &upstream.host, "team/mirrored", "1", &[2 * MB]).unwrap();
        images::build_and_push(&work, &mirror.host, "team/mirrored", "1", &[2 * MB]).unwrap();
        let node = Containerd::start_flavor(&dir.join("node"), flavor).unwrap();
        node.configure_registry(&upstream.host, &[&mirror.host])
            .unwrap();
        let name = format!("runtime-{tag}");
        let (stop, running) = run(&client, config(&name, &node, &dir));
        set(
            &client,
            &name,
            &name,
            json!([
                {"name": seeded.reference, "registryPolicy": "Default"},
                {"name": mirrored.reference, "registryPolicy": "Mirror", "digest": mirrored.digest},
            ]),
            1,
        )
        .await;
        let st = wait_status(&client, &name, &format!("{tag}: both Available"), |s| {
            s.available == 2
        })
        .await;
        let source = |image: &str| {
            st.images
                .iter()
                .find(|i| i.name == image)
                .map(|i| (i.state, i.source))
        };
        assert_eq!(
            source(&seeded.reference),
            Some((PullState::Available, Some(PullSource::Upstream))),
            "{tag}"
        );
        assert_eq!(
            source(&mirrored.reference),
            Some((PullState::Available, Some(PullSource::Mirror))),
            "{tag}"
        );
        let once: BTreeMap<String, usize> = seeded.blobs.iter().map(|b| (b.clone(), 1)).collect();
        let served: BTreeMap<String, usize> = upstream
            .blob_gets("team/seeded")
            .into_iter()
            .filter(|(b, _)| seeded.blobs.contains(b))
            .collect();
        assert_eq!(
            served, once,
            "{tag}: each blob of the seed's image served once"
        );
        assert!(
            upstream.blob_gets("team/mirrored").is_empty(),
            "{tag}: a Mirror pull reached the registry"
        );
        assert!(!mirror.blob_gets("team/mirrored").is_empty(), "{tag}");
        let _ = stop.send(());
        running.await.unwrap();
    }
}
