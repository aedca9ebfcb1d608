//! Objects the controller's types cannot hold — stored before the CRD had
//! its bounds, or on an API server that does not enforce them — cost only
//! themselves: a controller (re)started with them in the cluster reconciles
//! every other tenant's ImagePrefetch, says on the bad one why it does
//! nothing, treats a node's unreadable report as no report, writes a set's
//! unreadable spec again, and still lets the bad ImagePrefetch be deleted.
//!
//! This binary has an API server of its own: the test swaps the CRDs'
//! schema, which the tests of other binaries must not see.

mod support;

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crd::{ImagePrefetch, NodeImageSet, RegistryPolicy, keys};
use support::*;

/// A controller of every namespace, as installed; its metrics on `port`.
fn controller(client: &Client, port: u16) -> Running {
    Running::start(
        client,
        controller::Config {
            namespace: None,
            metrics_addr: Some(([127, 0, 0, 1], port).into()),
            ..Default::default()
        },
    )
}

/// The value of one sample of the controller's /metrics.
fn sample(port: u16, line_start: &str) -> Option<String> {
    let (_, body) =
        testbed::support::process::http_get(&format!("127.0.0.1:{port}"), "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map(|v| v.trim().to_string())
}

fn condition(p: &ImagePrefetch, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

// Two threads: /metrics is read with a blocking client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_that_do_not_decode_cost_only_themselves() {
    let client = client().await;
    let group = "unreadable";
    let nodes = nodes(&client, group, 3, &[]).await;
    let (bad_ns, good_ns, late_ns) = (
        namespace(&client, "tenant-bad").await,
        namespace(&client, "tenant-good").await,
        namespace(&client, "tenant-late").await,
    );
    let selector = json!({"test-group": group});

    // A healthy rollout, with the controller the cluster had before.
    // A port each: the first controller's metrics server outlives its stop.
    let [first_port, port] = testbed::support::process::free_ports().unwrap();
    let first = controller(&client, first_port);
    let good = prefetch(
        "web",
        json!({"images": ["registry.example.com/good/web:1"], "nodeSelector": selector}),
    );
    let good_uid = created(&client, &good_ns, &good).await;
    roll_out(&client, &good_ns, "web", &good_uid, 3).await;
    first.stop().await;

    // What an older CRD (or a pre-1.36 API server) let into storage.
    testbed::support::crds::install_without_schema(&client)
        .await
        .unwrap();
    let prefetches: Api<ImagePrefetch> = Api::namespaced(client.clone(), &bad_ns);
    let bad = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": "huge", "finalizers": [keys::FINALIZER]},
        "spec": {"images": ["registry.example.com/bad/app:1"], "replicas": 2147483648u64,
                 "nodeSelector": selector},
    });
    poll("the out-of-range ImagePrefetch stored", || async {
        prefetches
            .patch("huge", &PatchParams::apply("tenant"), &Patch::Apply(&bad))
            .await
            .ok()
    })
    .await;
    let good_sets = sets(&client, &good_uid).await;
    let sets_api: Api<NodeImageSet> = Api::all(client.clone());
    // One node writes a number past i32 into its report; another set gets a
    // spec of a newer release (an unknown policy).
    let (reporter, rewritten) = (good_sets[0].name_any(), good_sets[1].name_any());
    let report = json!({"status": {"available": 1, "total": 1, "images": [
        {"name": "registry.example.com/good/web:1", "state": "Available", "attempts": 2147483648u64}]}});
    poll("the out-of-range report stored", || async {
        sets_api
            .patch_status(&reporter, &PatchParams::default(), &Patch::Merge(&report))
            .await
            .ok()
    })
    .await;
    let newer = json!({"spec": {"imageSet": [
        {"name": "registry.example.com/good/web:1", "registryPolicy": "Preferred"}]}});
    sets_api
        .patch(&rewritten, &PatchParams::default(), &Patch::Merge(&newer))
        .await
        .unwrap();
    testbed::support::crds::install(&client).await.unwrap();
    assert!(
        prefetches
            .get("huge")
            .await
            .unwrap()
            .spec
            .unreadable
            .is_some(),
        "the stored object keeps its value under the real schema"
    );

    // The API server serves a resource from a new cache after its CRD
    // changed; a watch that lists before that cache holds everything
    // starts without it (seen: the restarted controller never saw "huge").
    // Wait until the cache watches list from has every object.
    poll(
        "the API server's caches serve the stored objects",
        || async {
            let cached = ListParams::default().match_any();
            let huge_listed = prefetches
                .list(&cached)
                .await
                .ok()?
                .items
                .iter()
                .any(|p| p.name_any() == "huge");
            let report_listed = sets_api.list(&cached).await.ok()?.items.iter().any(|s| {
                s.name_any() == reporter
                    && s.status.as_ref().is_some_and(|st| st.unreadable.is_some())
            });
            (huge_listed && report_listed).then_some(())
        },
    )
    .await;

    // A controller restarted with all of that in the cluster.
    let second = controller(&client, port);
    let late = prefetch(
        "api",
        json!({"images": ["registry.example.com/late/api:1"], "nodeSelector": selector}),
    );
    let late_uid = created(&client, &late_ns, &late).await;
    roll_out(&client, &late_ns, "api", &late_uid, 3).await;

    // The bad one: Degraded, naming the field, with a Warning; no sets.
    let huge = poll("SpecUnreadable on the bad ImagePrefetch", || async {
        let p = prefetches.get("huge").await.ok()?;
        (condition(&p, "Degraded")?.1 == "SpecUnreadable").then_some(p)
    })
    .await;
    let (status, _, message) = condition(&huge, "Degraded").unwrap();
    assert_eq!(status, "True");
    assert!(message.contains("spec.replicas"), "{message}");
    assert_eq!(condition(&huge, "Ready").unwrap().1, "SpecUnreadable");
    let warned = poll("SpecUnreadable Warning", || async {
        let w = warnings(&client, &bad_ns, "huge").await;
        w.iter().any(|(r, _)| r == "SpecUnreadable").then_some(w)
    })
    .await;
    assert!(
        warned
            .iter()
            .any(|(_, note)| note.contains("spec.replicas")),
        "{warned:?}"
    );
    assert!(sets(&client, &huge.uid().unwrap()).await.is_empty());

    // The node's unreadable report: a Warning naming node and field.
    let reported = poll("ReportUnreadable Warning", || async {
        let w = warnings(&client, &good_ns, "web").await;
        w.into_iter().find(|(r, _)| r == "ReportUnreadable")
    })
    .await;
    let reporter_node = good_sets[0].spec.node_name.clone();
    assert!(
        reported.1.contains(&reporter_node) && reported.1.contains("status.images[0].attempts"),
        "{reported:?}"
    );
    // Counted for Prometheus (the housekeeping pass, every 10 s).
    let unreadable = |resource: &str, part: &str| {
        sample(
            port,
            &format!(
                "image_prefetch_controller_unreadable_objects{{resource=\"{resource}\",part=\"{part}\"}}"
            ),
        )
    };
    poll("unreadable objects counted", || async {
        (unreadable("imageprefetches", "spec").as_deref() == Some("1")
            && unreadable("nodeimagesets", "status").as_deref() == Some("1"))
        .then_some(())
    })
    .await;
    // The good tenant's rollout completes again once the node reports anew.
    roll_out(&client, &good_ns, "web", &good_uid, 3).await;

    // The set with a newer release's spec was written again, readable (its
    // node waited for the next wave like any other).
    poll("the unreadable set spec rewritten", || async {
        let s = sets_api.get(&rewritten).await.ok()?;
        let entry = s.spec.image_set.first()?;
        (s.spec.unreadable.is_none()
            && [RegistryPolicy::Default, RegistryPolicy::Mirror].contains(&entry.registry_policy))
        .then_some(())
    })
    .await;
    // The bad ImagePrefetch can still be deleted: its finalizer comes off.
    prefetches
        .delete("huge", &DeleteParams::default())
        .await
        .unwrap();
    poll("the unreadable ImagePrefetch deleted", || async {
        matches!(prefetches.get_opt("huge").await, Ok(None)).then_some(())
    })
    .await;
    second.stop().await;
    assert_eq!(nodes.len(), 3);
}
