//! The Helm chart with real helm (built from its Go module) against the real
//! test-bed API server.

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::{Api, Patch, PatchParams, ValidationDirective};
use serde::Deserialize;
use serde_json::json;
use testbed::support::poll::eventually;

fn chart() -> PathBuf {
    testbed::support::helm::chart()
}

fn helm(args: &[&str]) -> (bool, String) {
    testbed::support::helm::run(&testbed::beds::shared::get().kubeconfig, args)
}

/// `helm template` against the Kubernetes version we test on, with one `--set`.
fn template(chart: &std::path::Path, set: &str) -> (bool, String) {
    helm(&[
        "template",
        "x",
        chart.to_str().unwrap(),
        "--kube-version",
        "1.35.4",
        "--set",
        set,
    ])
}

#[test]
fn lint_is_clean_in_strict_mode() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for extra in [
        vec![],
        vec![
            "--set",
            "allowedRegistries={registry.example.com,ghcr.io/team}",
            "--set",
            "otlp.endpoint=http://collector:4317",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "readinessGate.taint=imageprefetch.io/not-ready",
        ],
    ] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend(extra);
        let (ok, out) = helm(&args);
        assert!(ok, "helm lint --strict failed:\n{out}");
    }
}

#[test]
fn unknown_values_are_rejected() {
    let chart = chart();
    let (ok, out) = template(&chart, "controller.replica=3");
    assert!(!ok, "a misspelt value was accepted");
    assert!(
        out.contains("replica") && out.contains("additional properties"),
        "{out}"
    );
}

/// The agent DaemonSet exists twice: in the chart, and in the controller
/// for installs that cannot ship one (`--manage-agent`, OLM). Whatever
/// decides how the agent runs on a node must be the same in both.
#[test]
fn the_chart_and_the_managed_agent_daemonset_agree() {
    let (ok, out) = template(&chart(), "image.tag=1.0");
    assert!(ok, "{out}");
    let chart_ds = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|doc| serde_json::Value::deserialize(doc).expect("YAML"))
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the chart renders a DaemonSet");
    let managed = controller::agent_daemonset::AgentSpec::new("ns", "agent:1.0").daemonset();
    let pod = |ds: &serde_json::Value| ds["spec"]["template"]["spec"].clone();
    let (chart_pod, managed_pod) = (pod(&chart_ds), pod(&managed));
    for key in ["volumes", "tolerations", "priorityClassName"] {
        assert_eq!(chart_pod[key], managed_pod[key], "pod {key}");
    }
    assert_eq!(
        chart_ds["spec"]["updateStrategy"],
        managed["spec"]["updateStrategy"]
    );
    let (c, m) = (&chart_pod["containers"][0], &managed_pod["containers"][0]);
    for key in [
        "securityContext",
        "volumeMounts",
        "ports",
        "livenessProbe",
        "readinessProbe",
        "resources",
    ] {
        assert_eq!(c[key], m[key], "agent container {key}");
    }
    // The chart passes its tunables too; every argument the controller
    // gives is among the chart's.
    let args = |c: &serde_json::Value| -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let chart_args = args(c);
    for arg in args(m) {
        assert!(
            chart_args.contains(&arg),
            "{arg} not in the chart's {chart_args:?}"
        );
    }
}

#[test]
fn tracing_settings_reach_both_binaries() {
    let chart = chart();
    let (ok, out) = template(
        &chart,
        "otlp.endpoint=http://collector:4317,otlp.samplingRatio=0.25",
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.matches("value: \"http://collector:4317\"").count(),
        2,
        "controller and agent export: {out}"
    );
    assert_eq!(out.matches("value: \"0.25\"").count(), 2, "{out}");
    for bad in [
        "otlp.samplingRatio=2",
        "otlp.samplingRatio=1.5",
        "otlp.samplingRatio=half",
    ] {
        let (ok, out) = template(&chart, bad);
        assert!(!ok, "{bad} was accepted");
        assert!(out.contains("samplingRatio"), "{out}");
    }
}

#[tokio::test]
async fn installs_and_enforces_the_allow_list_at_admission() {
    let client = testbed::beds::shared::client().await;
    testbed::support::helm::install(
        &testbed::beds::shared::get().kubeconfig,
        &["--set", "allowedRegistries={registry.example.com}"],
    );
    let chart = chart();

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "image-prefetch-system");
    let controller = deployments
        .get("image-prefetch-controller")
        .await
        .expect("controller Deployment");
    assert_eq!(controller.spec.unwrap().replicas, Some(2));
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "image-prefetch-system");
    daemonsets
        .get("image-prefetch-agent")
        .await
        .expect("agent DaemonSet");

    // The policy binding takes a moment to be enforced: poll with a deadline.
    let prefetches: Api<crd::ImagePrefetch> = Api::namespaced(client.clone(), "default");
    let params = PatchParams::apply("test").validation(ValidationDirective::Strict);
    let object = |name: &str, image: &str| {
        json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
            "metadata": {"name": name}, "spec": {"images": [image]},
        })
    };
    let message = eventually(
        "the allow-list enforced",
        std::time::Duration::from_secs(30),
        || async {
            match prefetches
                .patch(
                    "refused",
                    &params,
                    &Patch::Apply(object("refused", "elsewhere.example/app:1")),
                )
                .await
            {
                Err(kube::Error::Api(e)) => Some(e.message),
                Ok(_) => {
                    let _ = prefetches.delete("refused", &Default::default()).await;
                    None
                }
                Err(e) => panic!("{e}"),
            }
        },
    )
    .await;
    assert!(
        message.contains("elsewhere.example/app:1") && message.contains("registry.example.com"),
        "{message}"
    );
    let mut kept = object("allowed", "registry.example.com/team/app:1");
    // As the controller's finalizer would hold it.
    kept["metadata"]["finalizers"] = json!([crd::keys::FINALIZER]);
    prefetches
        .patch("allowed", &params, &Patch::Apply(kept))
        .await
        .expect("an allowed image is accepted");
    // Docker Hub shorthand is judged by its canonical name, and the
    // message shows both.
    let err = prefetches
        .patch("hub", &params, &Patch::Apply(object("hub", "busybox:1.36")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("busybox:1.36 (docker.io/library/busybox)"),
        "{err}"
    );

    // The administrator narrows the list: the existing ImagePrefetch, now
    // naming a refused registry, can still be labelled, deleted and have its
    // finalizer removed; only a change of its images is judged again.
    let (ok, out) = helm(&[
        "upgrade",
        "image-prefetch",
        chart.to_str().unwrap(),
        "--namespace",
        "image-prefetch-system",
        "--set",
        "allowedRegistries={other.example.com}",
        "--wait=false",
    ]);
    assert!(ok, "helm upgrade failed:\n{out}");
    let probe = object("probe", "registry.example.com/team/app:1");
    eventually(
        "the narrowed list enforced",
        std::time::Duration::from_secs(30),
        || async {
            if prefetches
                .patch("probe", &params, &Patch::Apply(&probe))
                .await
                .is_ok()
            {
                let _ = prefetches.delete("probe", &Default::default()).await;
                return None;
            }
            Some(())
        },
    )
    .await;
    let merge = PatchParams::default();
    prefetches
        .patch(
            "allowed",
            &merge,
            &Patch::Merge(json!({"metadata": {"labels": {"team": "a"}}})),
        )
        .await
        .expect("an update that keeps the images is not judged");
    let changed = prefetches
        .patch(
            "allowed",
            &merge,
            &Patch::Merge(json!({"spec": {"images": ["registry.example.com/team/app:2"]}})),
        )
        .await
        .unwrap_err();
    assert!(
        changed.to_string().contains("not from an allowed registry"),
        "{changed}"
    );
    prefetches
        .delete("allowed", &Default::default())
        .await
        .expect("deleting is never blocked");
    prefetches
        .patch(
            "allowed",
            &merge,
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("the finalizer comes off whatever the allow-list says");
    testbed::support::poll::eventually(
        "the ImagePrefetch gone once its finalizer is off",
        std::time::Duration::from_secs(30),
        || async {
            prefetches
                .get_opt("allowed")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;

    // No kubelet here runs the pre-delete hook's Job (the kubelet bed does:
    // helm_install.rs).
    let (ok, out) = helm(&[
        "uninstall",
        "image-prefetch",
        "--namespace",
        "image-prefetch-system",
        "--no-hooks",
    ]);
    assert!(ok, "helm uninstall failed:\n{out}");
}

/// The binaries themselves accept the arguments the chart and the bundle give them.
#[test]
fn shipped_arguments_are_accepted_by_the_binaries() {
    let chart = chart();
    let (ok, rendered) = template(&chart, "allowedRegistries={registry.example.com}");
    assert!(ok, "{rendered}");
    let csv = std::fs::read_to_string(
        chart.join("../../bundle/manifests/image-prefetch.clusterserviceversion.yaml"),
    )
    .unwrap();
    let mut checked = 0;
    let docs = rendered
        .split("\n---")
        .chain(std::iter::once(csv.as_str()))
        .map(str::to_string)
        .collect::<Vec<_>>();
    for doc in &docs {
        let Ok(value) = serde_yaml_ng::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        let mut containers = Vec::new();
        collect_containers(&value, &mut containers);
        for c in containers {
            let binary = match c["name"].as_str() {
                Some("controller") => "image-prefetch-controller",
                Some("agent") => "image-prefetch-agent",
                _ => continue,
            };
            let args: Vec<String> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            let path = testbed::beds::simulated::binary(binary);
            let out = Command::new(&path)
                .args(&args)
                .arg("--help")
                .output()
                .expect("the binaries are built by cargo test --workspace");
            assert!(
                out.status.success(),
                "{binary} refuses {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(
        checked, 3,
        "the chart's controller and agent, the bundle's controller"
    );
}

fn collect_containers(v: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::Array(cs)) = map.get("containers") {
                out.extend(cs.iter().cloned());
            }
            for child in map.values() {
                collect_containers(child, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| collect_containers(i, out)),
        _ => {}
    }
}

/// The chart's admission policy judges every example of the allow-list table
/// as the controller does (`controller::registries::examples`, whose unit
/// test holds the controller to the same table). An API server of its own:
/// the policy applies to the whole cluster.
#[tokio::test]
async fn the_admission_policy_and_the_controller_agree_on_every_allow_list_example() {
    use controller::registries::examples::{CASES, LIST};
    let work = testbed::support::workdir::Workdir::new("e2e-allow-list-table");
    let (plane, client) = testbed::support::crds::control_plane(&work.join("cluster"))
        .await
        .expect("control plane");
    let values = work.join("values.yaml");
    std::fs::write(&values, json!({ "allowedRegistries": LIST }).to_string()).unwrap();
    testbed::support::helm::install(&plane.kubeconfig, &["-f", values.to_str().unwrap()]);

    let prefetches: Api<crd::ImagePrefetch> = Api::namespaced(client.clone(), "default");
    let params = PatchParams::apply("test").dry_run();
    // Ok(()) when admitted; Err(message) when the policy refused it.
    let judge = |image: &str| {
        let prefetches = prefetches.clone();
        let params = params.clone();
        let object = json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
            "metadata": {"name": "example"}, "spec": {"images": [image]},
        });
        async move {
            match prefetches
                .patch("example", &params, &Patch::Apply(object))
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.message.contains("not from an allowed registry") => {
                    Err(e.message)
                }
                Err(e) => panic!("neither admitted nor refused by the policy: {e}"),
            }
        }
    };
    // The binding takes a moment to be enforced.
    testbed::support::poll::eventually(
        "the allow-list enforced",
        std::time::Duration::from_secs(30),
        || async { judge("elsewhere.example/app:1").await.err() },
    )
    .await;
    let mut disagreements = Vec::new();
    for (image, allowed, why) in CASES {
        let admitted = judge(image).await;
        if admitted.is_ok() != *allowed {
            disagreements.push(format!(
                "{image} ({why}): table says {}, the policy {}",
                if *allowed { "allowed" } else { "refused" },
                match &admitted {
                    Ok(()) => "admitted it".to_string(),
                    Err(m) => format!("refused it: {m}"),
                }
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "the admission policy disagrees with the table:\n{}",
        disagreements.join("\n")
    );
}

/// A release pushes the images the chart and the CSV pull: the workflow's
/// own version step (run here for a tag `v<version>`) and its tag templates
/// give the names; `helm template` and the CSV are compared with them.
#[test]
fn a_release_pushes_the_image_tags_the_chart_and_the_csv_pull() {
    let root = chart().join("../..");
    let work = testbed::support::workdir::Workdir::new("e2e-release-tags");
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let step = |tag: &str| {
        let output = work.join(format!("output-{tag}"));
        let ok = Command::new("bash")
            .arg(".github/release-version.sh")
            .current_dir(&root)
            .env("GITHUB_REF_NAME", tag)
            .env("GITHUB_OUTPUT", &output)
            .status()
            .unwrap()
            .success();
        (ok, std::fs::read_to_string(&output).unwrap_or_default())
    };
    let (ok, output) = step(&format!("v{version}"));
    assert!(ok, "the version step fails on its own tag");
    let published = output.trim().strip_prefix("version=").unwrap().to_string();
    assert_eq!(published, version);
    assert!(
        !step("v9.9.9-not-this").0,
        "a tag that is not the workspace version is refused"
    );

    // The names the workflow pushes, from its tag templates.
    let workflow = std::fs::read_to_string(root.join(".github/workflows/release.yml")).unwrap();
    let mut pushed = Vec::new();
    for template in workflow
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tags: "))
    {
        let binaries: &[&str] = if template.contains("${{ matrix.binary }}") {
            &["controller", "agent"]
        } else {
            &[""]
        };
        for binary in binaries {
            pushed.push(
                template
                    .replace("${{ env.REGISTRY }}", "ghcr.io/image-prefetch")
                    .replace("${{ matrix.binary }}", binary)
                    .replace("${{ steps.version.outputs.version }}", &published),
            );
        }
    }
    assert!(!pushed.iter().any(|t| t.contains("${{")), "{pushed:?}");

    // Every image of ours that the chart or the CSV pulls is one of them.
    let (ok, rendered) = template(&chart(), "image.pullPolicy=IfNotPresent");
    assert!(ok, "{rendered}");
    let csv = std::fs::read_to_string(
        root.join("bundle/manifests/image-prefetch.clusterserviceversion.yaml"),
    )
    .unwrap();
    let pulled: Vec<String> = rendered
        .lines()
        .chain(csv.lines())
        .flat_map(|l| l.split([' ', '=', '"']))
        .filter(|w| w.starts_with("ghcr.io/image-prefetch/"))
        .map(str::to_string)
        .collect();
    assert!(pulled.len() >= 3, "chart and CSV images: {pulled:?}");
    for image in &pulled {
        assert!(
            pushed.contains(image),
            "{image} is pulled but a release pushes only {pushed:?}"
        );
    }
}

/// The OLM bundle grants each ServiceAccount exactly what the chart grants
/// it cluster-wide, so the RBAC end-to-end test (`rbac.rs`, with the chart)
/// speaks for the bundle too.
#[test]
fn the_bundle_grants_what_the_chart_grants() {
    let (ok, rendered) = template(&chart(), "image.pullPolicy=IfNotPresent");
    assert!(ok, "{rendered}");
    let mut chart_rules = std::collections::BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&rendered) {
        let v = serde_json::Value::deserialize(doc).unwrap();
        if v["kind"] == "ClusterRole" {
            let name = v["metadata"]["name"].as_str().unwrap();
            let account = format!("image-prefetch-{}", name.trim_start_matches("x-"));
            chart_rules.insert(account, v["rules"].clone());
        }
    }
    let csv: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(
            chart().join("../../bundle/manifests/image-prefetch.clusterserviceversion.yaml"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut bundle_rules = std::collections::BTreeMap::new();
    for p in csv["spec"]["install"]["spec"]["clusterPermissions"]
        .as_array()
        .unwrap()
    {
        bundle_rules.insert(
            p["serviceAccountName"].as_str().unwrap().to_string(),
            p["rules"].clone(),
        );
    }
    assert_eq!(chart_rules.len(), 2, "{chart_rules:?}");
    assert_eq!(bundle_rules, chart_rules);
}

/// Every query of the Grafana dashboard and every alert rule reads metrics
/// the binaries really export — the names, and the labels they match or
/// group by (the binaries' own, or the target labels Prometheus adds) — read
/// from the metrics code both binaries register, sampled once.
#[test]
fn dashboard_and_alerts_read_only_metrics_the_binaries_export() {
    use std::collections::{BTreeMap, BTreeSet};

    // What the binaries export: names and label keys, from their registries.
    let mut registry = prometheus_client::registry::Registry::default();
    let c = controller::metrics::Metrics::register(&mut registry);
    let a = agent::metrics::Metrics::register(&mut registry);
    c.reconciles.inc();
    c.errors
        .get_or_create(&controller::metrics::ErrorLabels {
            category: "write-status".into(),
        })
        .inc();
    c.reconcile_seconds.observe(0.1);
    c.writes.inc();
    c.seeds_chosen.inc();
    c.watch_failed("nodes");
    c.count_unreadable("nodeimagesets", 0, 0);
    c.count_sets(std::iter::empty());
    let mut p = crd::ImagePrefetch::new("p", Default::default());
    p.metadata.namespace = Some("ns".into());
    p.status = Some(crd::ImagePrefetchStatus {
        conditions: vec![crd::condition::condition(
            &[],
            crd::ConditionType::Degraded,
            true,
            crd::ConditionReason::PullFailed,
            "",
            None,
            &crd::condition::now(),
        )],
        ..Default::default()
    });
    c.count_prefetches(std::iter::once(&p));
    a.pulls
        .get_or_create(&agent::metrics::PullLabels {
            policy: "Default".into(),
            result: "success".into(),
        })
        .inc();
    a.pull_seconds.observe(1.0);
    a.bytes
        .get_or_create(&agent::metrics::SourceLabels {
            source: "mirror".into(),
        })
        .inc();
    a.retries.inc();
    a.images_present.set(1);
    a.watch_errors.inc();
    a.status_write_errors.inc();
    a.unreadable_sets.set(0);
    a.mirror_misses.inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let sample = regex::Regex::new(r"^([a-z_]+)(?:\{([^}]*)\})? ").unwrap();
    let label = regex::Regex::new(r#"([a-z_]+)="#).unwrap();
    let mut exported: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(m) = sample.captures(line) else {
            continue;
        };
        let labels = exported.entry(m[1].to_string()).or_default();
        if let Some(l) = m.get(2) {
            labels.extend(label.captures_iter(l.as_str()).map(|c| c[1].to_string()));
        }
    }
    // Labels Prometheus adds to every target it scrapes.
    let target = [
        "namespace",
        "pod",
        "instance",
        "job",
        "service",
        "endpoint",
        "container",
        "le",
    ];

    // What the chart asks: every expression of the dashboard and the rules.
    let chart = chart();
    let (ok, out) = template(
        &chart,
        "metrics.grafanaDashboard.enabled=true,metrics.prometheusRule.enabled=true",
    );
    assert!(ok, "{out}");
    let mut exprs: Vec<String> = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let (mut dashboards, mut rules) = (0, 0);
    for doc in serde_yaml_ng::Deserializer::from_str(&out) {
        let Ok(v) = serde_json::Value::deserialize(doc) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("ConfigMap") if v["data"]["image-prefetch.json"].is_string() => {
                let dashboard: serde_json::Value =
                    serde_json::from_str(v["data"]["image-prefetch.json"].as_str().unwrap())
                        .expect("the dashboard is JSON");
                assert_eq!(v["metadata"]["labels"]["grafana_dashboard"], "1");
                collect(&dashboard, &mut exprs);
                dashboards += 1;
            }
            Some("PrometheusRule") => {
                collect(&v["spec"], &mut exprs);
                rules += 1;
            }
            _ => {}
        }
    }
    assert_eq!((dashboards, rules), (1, 1), "{out}");
    assert!(exprs.len() >= 15, "{exprs:?}");

    let metric = regex::Regex::new(r"\b(image_prefetch_[a-z_]+)(\{[^}]*\})?").unwrap();
    let matcher = regex::Regex::new(r#"([a-z_]+)\s*(?:=~|!~|!=|=)"#).unwrap();
    let grouping = regex::Regex::new(r"\b(?:by|on|without)\s*\(([^)]*)\)").unwrap();
    for expr in &exprs {
        let mut used: Vec<&BTreeSet<String>> = Vec::new();
        for m in metric.captures_iter(expr) {
            let name = &m[1];
            let labels = exported.get(name).unwrap_or_else(|| {
                panic!(
                    "{name} (in `{expr}`) is not exported; exported: {:?}",
                    exported.keys()
                )
            });
            used.push(labels);
            if let Some(sel) = m.get(2) {
                for l in matcher.captures_iter(sel.as_str()) {
                    assert!(
                        labels.contains(&l[1]) || target.contains(&&l[1]),
                        "{name} has no label {} (in `{expr}`)",
                        &l[1]
                    );
                }
            }
        }
        for g in grouping.captures_iter(expr) {
            for l in g[1].split(',').map(str::trim).filter(|l| !l.is_empty()) {
                assert!(
                    target.contains(&l) || used.iter().any(|labels| labels.contains(l)),
                    "no metric of `{expr}` has the label {l}"
                );
            }
        }
    }
}

/// The chart's alert rules pass promtool's own check (built here from
/// Prometheus's module): valid PromQL, valid templates, valid durations.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = testbed::builds::fixtures::PROMTOOL.require().unwrap();
    let (ok, out) = template(&chart(), "metrics.prometheusRule.enabled=true");
    assert!(ok, "{out}");
    let rule = serde_yaml_ng::Deserializer::from_str(&out)
        .filter_map(|doc| serde_json::Value::deserialize(doc).ok())
        .find(|v| v["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    // promtool reads a rules file: the PrometheusRule's spec is one.
    let dir = testbed::support::workdir::Workdir::new("promtool-rules");
    let file = dir.join("rules.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&rule["spec"]).unwrap()).unwrap();
    let check = Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "promtool check rules:\n{said}");
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");
}
