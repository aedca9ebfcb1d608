//! kube-apiserver stopped for 30 s in the middle of the product's life and
//! started again, etcd running on (an upgrade, a crash). The controller and
//! the agent reach it through a relay that only counts connections: each is
//! a request's attempt to get through, which a stopped server cannot count.
//! Every watch backs off, so the attempts during the outage are few, and both
//! recover by themselves: a new ImagePrefetch made after the outage rolls out
//! with no restart. What they ask of the restarted server is counted by the
//! server itself (its counters start from zero when it starts).

use std::time::{Duration, Instant};

use kube::api::Api;

use crd::ImagePrefetch;
use testbed::beds::simulated::{Binary, CONTROLLER};
use testbed::servers::registry::Registry;
use testbed::servers::slow_link::SlowLink;
use testbed::support::poll::eventually;

const OUTAGE: Duration = Duration::from_secs(30);

/// Applies an ImagePrefetch of `image` to this test's nodes; `None` when the
/// API server did not take it.
async fn prefetch(api: &Api<ImagePrefetch>, name: &str, image: &str) -> Option<()> {
    let ns = api.namespace().unwrap_or("default").to_string();
    let client = api.clone().into_client();
    testbed::support::crds::apply_prefetch(&client, &ns, name, &[image], &[("pool", "outage")])
        .await
        .ok()
        .map(drop)
}

async fn ready(api: &Api<ImagePrefetch>, name: &str) {
    eventually(
        &format!("{name} Ready 1/1"),
        Duration::from_secs(120),
        || async {
            // The test's own client meets the restart too: an error is a
            // "not yet", not a failure.
            let status = api.get(name).await.ok()?.status?;
            (status.ready == "1/1").then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_outage_costs_few_requests_and_everything_recovers() {
    let work = testbed::support::workdir::Workdir::new("e2e-api-outage");
    let (mut plane, client) = testbed::support::crds::control_plane(&work.join("cluster"))
        .await
        .expect("control plane");
    // The product's processes reach the API server only through the link.
    let link = SlowLink::start(plane.server.trim_start_matches("https://"), 1 << 40).unwrap();
    let kubeconfig = work.join("via-link.kubeconfig");
    let text = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    std::fs::write(
        &kubeconfig,
        text.replace(&plane.server, &format!("https://{}", link.host)),
    )
    .unwrap();

    let upstream = Registry::start(&work.join("upstream")).unwrap();
    let mirror =
        Registry::start_mirror_of(&work.join("mirror"), &format!("http://{}", upstream.host))
            .unwrap();
    let images: Vec<_> = ["before", "after"]
        .iter()
        .map(|t| {
            testbed::builds::images::build_and_push(
                &work.join("images"),
                &upstream.host,
                "team/app",
                t,
                &[MB],
            )
            .unwrap()
        })
        .collect();
    let labels = [("pool".to_string(), "outage".to_string())].into();
    let nodes = testbed::beds::simulated::nodes_with_registry_mirror(
        &work.join("nodes"),
        &client,
        &kubeconfig,
        &["outage-node"],
        &labels,
        &upstream.host,
        &mirror.host,
        None,
    )
    .await
    .expect("a simulated node (agent built by cargo test --workspace)");
    let controller = Binary::start(
        CONTROLLER,
        &[],
        &kubeconfig,
        None,
        &work.join("controller.log"),
    )
    .expect("controller (built by cargo test --workspace)");

    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    prefetch(&api, "before", &images[0].reference)
        .await
        .expect("the ImagePrefetch taken");
    ready(&api, "before").await;

    let before = link.accepted();
    plane.stop_apiserver();
    let stopped = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    plane
        .start_apiserver()
        .await
        .expect("kube-apiserver starts again");
    let attempts = link.accepted() - before;
    eprintln!(
        "api outage: {attempts} connection attempts from the controller and one agent while \
         kube-apiserver was down or starting ({:.0}s)",
        stopped.elapsed().as_secs_f64()
    );
    // Two processes, four watches, each backing off on its own from 0.8 s to
    // 10 s (`crd::backoff`): about six each. Without backoff it is
    // thousands.
    assert!(attempts <= 60, "{attempts} attempts during a 30 s outage");

    // A client of its own: the old one's connections died with the server.
    let client = plane.client().await.unwrap();
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    let healed = Instant::now();
    // The server is ready; the CRDs' discovery may lag it by a moment.
    eventually(
        "the ImagePrefetch taken after the restart",
        Duration::from_secs(30),
        || prefetch(&api, "after", &images[1].reference),
    )
    .await;
    ready(&api, "after").await;
    // Bounded by a watch's longest wait (10 s, up to 20 s jittered) and a
    // few more rounds while the restarted server still answers 429, plus the
    // rollout. The watches back off independently: when the controller's
    // backoff over all of them counted every watch's errors, CI once took
    // over 120 s.
    eprintln!(
        "api outage: recovered {:.0}s after the API server came back",
        healed.elapsed().as_secs_f64()
    );
    // What the watches cost the restarted server, by its own count: each
    // watch starts again (a LIST and a WATCH, a second time when the server
    // answered 429 while it was still starting): 12 measured for four
    // watches, not a storm of re-lists.
    let product = ["nodes", "nodeimagesets", "imageprefetches"];
    let relists = testbed::support::api_metrics::requests(&client)
        .await
        .unwrap();
    let relists: Vec<_> = relists
        .iter()
        .filter(|r| product.iter().any(|p| r.is("resource", p)))
        .filter(|r| r.is("verb", "LIST") || r.is("verb", "WATCH"))
        .collect();
    for r in &relists {
        eprintln!(
            "api outage: restarted server counted {} {} {} ({})",
            r.count, r.labels["verb"], r.labels["resource"], r.labels["code"]
        );
    }
    let total: u64 = relists.iter().map(|r| r.count).sum();
    assert!(
        (1..=32).contains(&total),
        "{total} LIST/WATCH requests after the restart: {relists:?}"
    );

    // What an administrator's Prometheus saw: every watch's failures,
    // counted by the processes themselves.
    let mut counted = 0.0;
    for resource in ["nodes", "nodeimagesets", "imageprefetches"] {
        let failed = controller
            .metric(&format!(
                "image_prefetch_controller_watch_errors_total{{resource=\"{resource}\"}}"
            ))
            .unwrap();
        eprintln!("api outage: the controller counted {failed} failed {resource} watch requests");
        assert!(failed >= 1.0, "the {resource} watch's failures are counted");
        counted += failed;
    }
    let agent_failed = nodes[0]
        .agent
        .metric("image_prefetch_agent_watch_errors_total")
        .unwrap();
    eprintln!("api outage: the agent counted {agent_failed} failed watch requests");
    assert!(
        agent_failed >= 1.0,
        "the agent's watch failures are counted"
    );
    counted += agent_failed;
    eprintln!("api outage: {counted} failed watch requests counted in all");
}

const MB: usize = 1 << 20;
