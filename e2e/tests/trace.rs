//! The controller and three agents run as separate processes, each exporting
//! traces to real Jaeger; one ImagePrefetch is rolled out to the nodes (a
//! seed and a node confirming its digest, both resolving the tag at the
//! registry, and a node pulling from the mirror). Jaeger's
//! query API must then hold one trace that runs from the controller's
//! reconcile through the NodeImageSet writes to each node's pull and its
//! containerd calls. The /metrics endpoints of all three must show the work.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kube::api::Api;
use serde_json::Value;

use crd::ImagePrefetch;
use testbed::beds::simulated::{AGENT, Binary, CONTROLLER};
use testbed::servers::jaeger::Jaeger;
use testbed::servers::registry::Registry;

const NODES: [&str; 3] = ["trace-node-a", "trace-node-b", "trace-node-c"];

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_runs_from_the_reconcile_to_every_nodes_pull() {
    let work = testbed::support::workdir::Workdir::new("e2e-trace");
    let jaeger = Jaeger::start(&work.join("jaeger")).expect("jaeger (cargo xtask fixtures)");
    let (plane, client) = testbed::support::crds::control_plane(&work.join("cluster"))
        .await
        .expect("control plane");

    let upstream = Registry::start(&work.join("upstream")).unwrap();
    let image = testbed::builds::images::build_and_push(
        &work.join("images"),
        &upstream.host,
        "team/traced",
        "1.0",
        &[1 << 20, 256 << 10],
    )
    .unwrap();
    let mirror =
        Registry::start_mirror_of(&work.join("mirror"), &format!("http://{}", upstream.host))
            .unwrap();

    let labels = [("pool".to_string(), "traced".to_string())].into();
    let nodes = testbed::beds::simulated::nodes_with_registry_mirror(
        &work.join("nodes"),
        &client,
        &plane.kubeconfig,
        &NODES,
        &labels,
        &upstream.host,
        &mirror.host,
        Some(&jaeger),
    )
    .await
    .expect("simulated nodes (agent built by cargo test --workspace)");
    // One retry: the failing rollout below gives up quickly.
    let controller = Binary::start(
        CONTROLLER,
        &["--retry-limit", "1"],
        &plane.kubeconfig,
        Some(&jaeger),
        &work.join("controller.log"),
    )
    .expect("controller (built by cargo test --workspace)");

    let prefetches: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    prefetch(&prefetches, "traced", &image.reference).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = prefetches.get("traced").await.unwrap().status;
        if status
            .as_ref()
            .is_some_and(|s| s.ready == format!("{0}/{0}", NODES.len()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not Ready within 3 minutes: {status:?}; logs in {}",
            work.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The spans arrive in batches; wait until both nodes' pulls and
    // containerd's side of them are in.
    let deadline = Instant::now() + Duration::from_secs(60);
    let trace = loop {
        let found = jaeger
            .traces(AGENT, 100)
            .expect("Jaeger's query API")
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let with_pulls: Vec<Trace> = found
            .iter()
            .map(Trace::new)
            .filter(|t| !t.named("pull").is_empty())
            .collect();
        let complete = with_pulls.iter().find(|t| {
            let trace = jaeger.trace(&t.id).expect("the trace by id");
            let full = Trace::new(&trace["data"][0]);
            // Each process exports on its own schedule: wait until every
            // pull's ancestors, up to the root, have arrived too.
            NODES.iter().all(|n| {
                full.pulls_on(n)
                    .iter()
                    .any(|p| p.tag("result") == "success" && full.rooted(p))
            }) && !full.named("reconcile").is_empty()
                && full
                    .spans
                    .iter()
                    .filter(|s| s.service == "containerd")
                    .filter(|s| s.operation.ends_with("Transfer/Transfer"))
                    .count()
                    >= NODES.len()
        });
        if let Some(t) = complete {
            assert_eq!(
                with_pulls.len(),
                1,
                "every pull of the rollout belongs to one trace, found {} traces",
                with_pulls.len()
            );
            break Trace::new(&jaeger.trace(&t.id).unwrap()["data"][0]);
        }
        assert!(
            Instant::now() < deadline,
            "no trace with a successful pull on each node within 60s; traces: {found:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // One root, the rollout's first reconcile, in the controller.
    let roots: Vec<&Span> = trace.spans.iter().filter(|s| s.parent.is_none()).collect();
    assert_eq!(roots.len(), 1, "one root: {roots:#?}");
    assert_eq!(roots[0].operation, "reconcile");
    assert_eq!(roots[0].service, CONTROLLER);

    let mut policies = Vec::new();
    for node in NODES {
        let pull = trace
            .pulls_on(node)
            .into_iter()
            .find(|p| p.tag("result") == "success")
            .unwrap();
        assert_eq!(pull.service, AGENT);
        assert_eq!(pull.tag("image"), image.reference);
        assert!(pull.tag("digest").starts_with("sha256:"), "{pull:#?}");
        let bytes: i64 = pull.tag("bytes").parse().expect("bytes on the pull span");
        assert!(bytes > 1 << 20, "{bytes} bytes");
        policies.push(pull.tag("policy"));

        // The pull's parent is the controller's write of this node's set,
        // made within a reconcile of the same rollout.
        let apply = trace.parent_of(pull).expect("the pull has a parent");
        assert_eq!(apply.operation, "apply NodeImageSet", "{apply:#?}");
        assert_eq!(apply.service, CONTROLLER);
        assert_eq!(apply.tag("node"), node);
        let reconcile = trace.parent_of(apply).expect("the write has a parent");
        assert_eq!(reconcile.operation, "reconcile");
        assert!(
            reconcile.parent.is_none()
                || trace.parent_of(reconcile).map(|r| r.span_id.as_str())
                    == Some(roots[0].span_id.as_str()),
            "a reconcile of the rollout joins its first one"
        );

        // Below the pull: the attempt, and containerd's Transfer call in it.
        let transfer = trace
            .named("Transfer.Transfer")
            .into_iter()
            .find(|t| {
                trace
                    .parent_of(t)
                    .and_then(|a| trace.parent_of(a))
                    .is_some_and(|p| p.span_id == pull.span_id)
            })
            .unwrap_or_else(|| panic!("no Transfer call under the pull on {node}"));
        assert_eq!(trace.parent_of(transfer).unwrap().operation, "attempt");

        // containerd read the context from the call's gRPC metadata: its own
        // span of the call is a child of the agent's.
        let served: Vec<&Span> = trace
            .spans
            .iter()
            .filter(|s| s.service == "containerd")
            .filter(|s| s.parent.as_deref() == Some(transfer.span_id.as_str()))
            .collect();
        assert!(
            served
                .iter()
                .any(|s| s.operation.ends_with("Transfer/Transfer")),
            "containerd's span of the Transfer call on {node} is not under the agent's; containerd spans: {:?}",
            trace
                .spans
                .iter()
                .filter(|s| s.service == "containerd")
                .map(|s| (&s.operation, &s.parent))
                .collect::<Vec<_>>()
        );
    }
    policies.sort();
    assert_eq!(
        policies,
        ["Default", "Default", "Mirror"],
        "a seed, a node confirming its digest, one mirror pull"
    );

    // The metrics saw the same work.
    let on_agents = |line_start: &str| -> f64 {
        nodes
            .iter()
            .map(|n| n.agent.metric(line_start).expect("scrape"))
            .sum()
    };
    let on_controller = |line_start: &str| controller.metric(line_start).expect("scrape");
    let upstream_bytes = on_agents("image_prefetch_agent_pulled_bytes_total{source=\"upstream\"}");
    let mirror_bytes = on_agents("image_prefetch_agent_pulled_bytes_total{source=\"mirror\"}");
    let successes = on_agents("image_prefetch_agent_pulls_total");
    assert!(upstream_bytes > 1e6, "upstream bytes {upstream_bytes}");
    assert!(mirror_bytes > 1e6, "mirror bytes {mirror_bytes}");
    assert_eq!(successes, NODES.len() as f64, "one pull per node");
    assert!(on_controller("image_prefetch_controller_reconciles_total") >= 2.0);
    assert!(on_controller("image_prefetch_controller_seeds_chosen_total") >= 1.0);
    // NodeImageSets by state are recounted every few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = "image_prefetch_controller_node_image_sets{state=\"ready\"}";
    while on_controller(ready) != NODES.len() as f64 {
        assert!(Instant::now() < deadline, "{ready} is not 3 within 30s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A rollout that cannot succeed: the trace says why, on which node,
    // after how many attempts.
    let missing = format!("{}/team/missing:1", upstream.host);
    prefetch(&prefetches, "broken", &missing).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let failed_pull = loop {
        let found = jaeger.traces(AGENT, 100).expect("Jaeger's query API");
        let failed = found["data"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(Trace::new)
            .find_map(|t| {
                let pull = t.named("pull").into_iter().find(|p| {
                    p.tag("image") == missing && !p.tag("result").is_empty() && t.rooted(p)
                })?;
                let attempts = t
                    .spans
                    .iter()
                    .filter(|a| {
                        a.operation == "attempt" && a.parent.as_ref() == Some(&pull.span_id)
                    })
                    .count();
                let parent = t.parent_of(pull).map(|p| p.operation.clone());
                Some((pull.clone(), attempts, parent))
            });
        if let Some(f) = failed {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no finished pull of {missing} in Jaeger within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (pull, attempt_spans, parent) = failed_pull;
    assert_eq!(pull.tag("result"), "NotFound", "{pull:#?}");
    assert_eq!(pull.tag("error.type"), "NotFound", "{pull:#?}");
    assert_eq!(pull.tag("otel.status_code"), "ERROR", "{pull:#?}");
    let why = pull.tag("otel.status_description");
    assert!(
        why.contains("not found"),
        "the error names the cause: {why}"
    );
    assert_eq!(pull.tag("attempts"), "2", "one try and one retry");
    assert_eq!(attempt_spans, 2, "a span per attempt");
    assert_eq!(parent.as_deref(), Some("apply NodeImageSet"));

    drop(controller);
    drop(nodes);
}

/// Applies an ImagePrefetch of `image` to this test's nodes.
async fn prefetch(api: &Api<ImagePrefetch>, name: &str, image: &str) {
    let ns = api.namespace().unwrap_or("default").to_string();
    let client = api.clone().into_client();
    testbed::support::crds::apply_prefetch(&client, &ns, name, &[image], &[("pool", "traced")])
        .await
        .unwrap();
}

/// A trace in Jaeger's JSON, reduced to what the test asks.
struct Trace {
    id: String,
    spans: Vec<Span>,
}

#[derive(Clone, Debug)]
struct Span {
    span_id: String,
    parent: Option<String>,
    operation: String,
    service: String,
    tags: HashMap<String, String>,
}

impl Span {
    fn tag(&self, key: &str) -> &str {
        self.tags.get(key).map(String::as_str).unwrap_or_default()
    }
}

impl Trace {
    fn new(v: &Value) -> Self {
        let processes = &v["processes"];
        let spans = v["spans"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|s| Span {
                span_id: s["spanID"].as_str().unwrap_or_default().to_string(),
                parent: s["references"]
                    .as_array()
                    .and_then(|refs| refs.iter().find(|r| r["refType"] == "CHILD_OF"))
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_string),
                operation: s["operationName"].as_str().unwrap_or_default().to_string(),
                service: processes[s["processID"].as_str().unwrap_or_default()]["serviceName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                tags: s["tags"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|t| {
                        let value = match &t["value"] {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (t["key"].as_str().unwrap_or_default().to_string(), value)
                    })
                    .collect(),
            })
            .collect();
        Trace {
            id: v["traceID"].as_str().unwrap_or_default().to_string(),
            spans,
        }
    }

    fn named(&self, operation: &str) -> Vec<&Span> {
        self.spans
            .iter()
            .filter(|s| s.operation == operation)
            .collect()
    }

    fn pulls_on(&self, node: &str) -> Vec<&Span> {
        self.named("pull")
            .into_iter()
            .filter(|s| s.tag("node") == node)
            .collect()
    }

    /// Whether every ancestor of `span`, up to a root, is in the trace.
    fn rooted(&self, span: &Span) -> bool {
        let mut at = span;
        for _ in 0..self.spans.len() {
            match (&at.parent, self.parent_of(at)) {
                (None, _) => return true,
                (Some(_), Some(parent)) => at = parent,
                (Some(_), None) => return false,
            }
        }
        false
    }

    fn parent_of(&self, span: &Span) -> Option<&Span> {
        let parent = span.parent.as_ref()?;
        self.spans.iter().find(|s| &s.span_id == parent)
    }
}
