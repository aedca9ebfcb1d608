//! The controller and two agents run as separate processes, each exporting
//! traces to real Jaeger; one ImagePrefetch is rolled out to both nodes (a
//! seed pulling from the registry, a node pulling from the mirror). Jaeger's
//! query API must then hold one trace that runs from the controller's
//! reconcile through the NodeImageSet writes to each node's pull and its
//! containerd calls. The /metrics endpoints of all three must show the work.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use image_prefetch_e2e::binary;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crd::ImagePrefetch;
use testbed::containerd::Containerd;
use testbed::jaeger::Jaeger;
use testbed::process::{self, Lifetime, free_ports};
use testbed::registry::Registry;

const NODES: [&str; 2] = ["trace-node-a", "trace-node-b"];
const CONTROLLER: &str = "image-prefetch-controller";
const AGENT: &str = "image-prefetch-agent";

/// Processes stopped when the test ends, however it ends.
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(process::stop);
    }
}

/// Starts one of the workspace's binaries exporting traces to `jaeger`.
fn start(name: &str, args: &[&str], kubeconfig: &Path, jaeger: &Jaeger, log: &Path) -> Child {
    let mut cmd = Command::new(binary(name));
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .envs(jaeger.exporter_env())
        .env("RUST_LOG", "info");
    process::spawn(cmd, log, Lifetime::Owned)
        .unwrap_or_else(|e| panic!("{name} (built by cargo test --workspace): {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_runs_from_the_reconcile_to_every_nodes_pull() {
    let work = testbed::workdir::Workdir::new("e2e-trace");
    let jaeger = Jaeger::start(&work.join("jaeger")).expect("jaeger (cargo xtask fixtures)");
    let plane = testbed::ControlPlane::start(&work.join("cluster"), Lifetime::Owned)
        .await
        .expect("control plane");
    let client = plane.client().await.unwrap();
    testbed::crds::install(&client).await.unwrap();

    let upstream = Registry::start(&work.join("upstream")).unwrap();
    let image = testbed::images::build_and_push(
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

    let mut running = Running(Vec::new());
    let mut runtimes = Vec::new();
    let mut agent_metrics = BTreeMap::new();
    for node in NODES {
        let labels = [("pool".to_string(), "traced".to_string())].into();
        testbed::nodes::register(&client, node, &labels)
            .await
            .unwrap();
        let containerd = Containerd::start_traced(&work.join(node), &jaeger).expect("containerd");
        containerd
            .configure_registry(&upstream.host, &[&mirror.host])
            .unwrap();
        let [port] = free_ports().unwrap();
        let metrics = format!("127.0.0.1:{port}");
        let socket = containerd.socket.display().to_string();
        let hosts = containerd.hosts_dir.display().to_string();
        let own_hosts = work.join(format!("{node}-agent-hosts"));
        let args = [
            "--node-name",
            node,
            "--containerd-socket",
            &socket,
            "--registry-config-dir",
            &hosts,
            "--mirror-config-dir",
            own_hosts.to_str().unwrap(),
            "--metrics-addr",
            &metrics,
        ];
        let log = work.join(format!("{node}-agent.log"));
        running
            .0
            .push(start(AGENT, &args, &plane.kubeconfig, &jaeger, &log));
        agent_metrics.insert(node, metrics);
        runtimes.push(containerd);
    }
    let [port] = free_ports().unwrap();
    let controller_metrics = format!("127.0.0.1:{port}");
    let log = work.join("controller.log");
    // One retry: the failing rollout below gives up quickly.
    let args = ["--metrics-addr", &controller_metrics, "--retry-limit", "1"];
    running
        .0
        .push(start(CONTROLLER, &args, &plane.kubeconfig, &jaeger, &log));

    let prefetches: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    prefetch(&prefetches, "traced", &image.reference).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let status = prefetches.get("traced").await.unwrap().status;
        if status.as_ref().is_some_and(|s| s.ready == "2/2") {
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
    assert_eq!(policies, ["Default", "Mirror"], "one seed, one mirror pull");

    // The metrics saw the same work.
    let counter = |host: &str, line_start: &str| -> f64 {
        let (code, body) = process::http_get(host, "/metrics").expect("scrape");
        assert_eq!(code, 200);
        body.lines()
            .filter(|l| l.starts_with(line_start))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let upstream_bytes: f64 = agent_metrics
        .values()
        .map(|m| {
            counter(
                m,
                "image_prefetch_agent_pulled_bytes_total{source=\"upstream\"}",
            )
        })
        .sum();
    let mirror_bytes: f64 = agent_metrics
        .values()
        .map(|m| {
            counter(
                m,
                "image_prefetch_agent_pulled_bytes_total{source=\"mirror\"}",
            )
        })
        .sum();
    let successes: f64 = agent_metrics
        .values()
        .map(|m| counter(m, "image_prefetch_agent_pulls_total"))
        .sum();
    assert!(upstream_bytes > 1e6, "upstream bytes {upstream_bytes}");
    assert!(mirror_bytes > 1e6, "mirror bytes {mirror_bytes}");
    assert_eq!(successes, 2.0, "one pull per node");
    assert!(
        counter(
            &controller_metrics,
            "image_prefetch_controller_reconciles_total"
        ) >= 2.0
    );
    assert!(
        counter(
            &controller_metrics,
            "image_prefetch_controller_seeds_chosen_total"
        ) >= 1.0
    );
    // NodeImageSets by state are recounted every few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = "image_prefetch_controller_node_image_sets{state=\"ready\"}";
    while counter(&controller_metrics, ready) != 2.0 {
        assert!(Instant::now() < deadline, "{ready} is not 2 within 30s");
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

    drop(running);
    drop(runtimes);
}

/// Applies an ImagePrefetch of `image` to this test's nodes.
async fn prefetch(api: &Api<ImagePrefetch>, name: &str, image: &str) {
    let object = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"images": [image], "nodeSelector": {"pool": "traced"}},
    });
    api.patch(
        name,
        &PatchParams::apply("e2e-trace").force(),
        &Patch::Apply(&object),
    )
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
