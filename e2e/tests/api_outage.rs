//! kube-apiserver away for 30 s in the middle of the product's life: the
//! controller and the agent reach it through a link the test makes refuse
//! every connection, as a stopped server does. Every watch backs off, so the
//! attempts during the outage are few (counted at the link: each is a
//! connection), and both recover by themselves: a new ImagePrefetch made
//! after the outage rolls out with no restart.

use std::time::{Duration, Instant};

use kube::api::Api;

use crd::ImagePrefetch;
use testbed::poll::eventually;
use testbed::registry::Registry;
use testbed::simulated::{Binary, CONTROLLER};
use testbed::slow_link::SlowLink;

const OUTAGE: Duration = Duration::from_secs(30);

/// Applies an ImagePrefetch of `image` to this test's nodes.
async fn prefetch(api: &Api<ImagePrefetch>, name: &str, image: &str) {
    let ns = api.namespace().unwrap_or("default").to_string();
    let client = api.clone().into_client();
    testbed::crds::apply_prefetch(&client, &ns, name, &[image], &[("pool", "outage")])
        .await
        .unwrap();
}

async fn ready(api: &Api<ImagePrefetch>, name: &str) {
    eventually(
        &format!("{name} Ready 1/1"),
        Duration::from_secs(120),
        || async {
            let status = api.get(name).await.unwrap().status?;
            (status.ready == "1/1").then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_api_server_outage_costs_few_requests_and_everything_recovers() {
    let work = testbed::workdir::Workdir::new("e2e-api-outage");
    let (plane, client) = testbed::crds::control_plane(&work.join("cluster"))
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
            testbed::images::build_and_push(
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
    let _nodes = testbed::simulated::nodes_with_registry_mirror(
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
    let _controller = Binary::start(
        CONTROLLER,
        &[],
        &kubeconfig,
        None,
        &work.join("controller.log"),
    )
    .expect("controller (built by cargo test --workspace)");

    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    prefetch(&api, "before", &images[0].reference).await;
    ready(&api, "before").await;

    link.refuse();
    let before = link.accepted();
    let started = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    let attempts = link.accepted() - before;
    link.heal();
    eprintln!(
        "api outage: {attempts} connection attempts from the controller and one agent in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    // Two processes, four watches, each backing off on its own from 0.8 s to
    // 30 s: about five each. Without backoff it is thousands.
    assert!(attempts <= 60, "{attempts} attempts during a 30 s outage");

    prefetch(&api, "after", &images[1].reference).await;
    let healed = Instant::now();
    ready(&api, "after").await;
    // Bounded by a watch's longest backoff (30 s, up to 60 s jittered) plus
    // the rollout: the watches back off independently, so no watch waits for
    // another's rounds (when they did, CI once took over 120 s).
    eprintln!(
        "api outage: recovered {:.0}s after the API server came back",
        healed.elapsed().as_secs_f64()
    );
}

const MB: usize = 1 << 20;
