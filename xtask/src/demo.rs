//! `cargo xtask demo`: the main job on one machine, from nothing — a control
//! plane, three simulated nodes each with its own containerd and agent, an
//! "external" registry, the controller, and an ImagePrefetch of two images.
//! It shows progress live and ends with where every byte came from, and a
//! link to the rollout's trace in a local Jaeger (every process exports to
//! it); `--screenshot FILE` renders that trace with headless Chromium.
//!
//! spegel, the in-cluster p2p mirror, cannot be built here (its Go module is
//! refused by the module proxy this machine reaches); each node runs the test
//! bed's stand-in with spegel's data-path behaviour instead (`peer-mirror`:
//! it serves the node's containerd content to its peers, never contacts the
//! registry, and writes the node's hosts.toml as spegel's chart does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crd::{ImagePrefetch, NodeImageSet, PullState, RegistryPolicy};
use testbed::beds::simulated::{Binary, CONTROLLER, Mirror, NodeSetup, SimulatedNode};
use testbed::servers::jaeger::Jaeger;
use testbed::servers::peer_mirror::Settings;
use testbed::servers::registry::Registry;

const NODES: &[&str] = &["demo-worker-1", "demo-worker-2", "demo-worker-3"];
/// Each node's peer mirror listens on a loopback address of its own.
const MIRROR_IPS: [&str; 3] = ["127.0.0.41", "127.0.0.42", "127.0.0.43"];
const MB: usize = 1024 * 1024;

/// What `cargo xtask demo` was asked for.
pub struct Options {
    /// Keep everything running until Ctrl-C.
    pub keep: bool,
    /// Render the rollout's trace into this PNG.
    pub screenshot: Option<PathBuf>,
}

pub async fn run(opts: Options) -> Result<()> {
    crate::deps::install()?;
    // Only what the demo starts: a fresh clone must not wait for the kubelet
    // bed's, helm's or the bundle validators' builds before its first look.
    crate::build_fixtures(testbed::builds::fixtures::DEMO)?;
    step("building the agent, the controller and the peer mirror stand-in");
    crate::test::cargo(&[
        "build",
        "--quiet",
        "-p",
        "image-prefetch-agent",
        "-p",
        "image-prefetch-controller",
        "-p",
        "image-prefetch-peer-mirror",
    ])?;
    let work = testbed::support::workdir::Workdir::new("demo");

    step("starting Jaeger (OTLP in, traces in memory) on 127.0.0.1");
    let trace_view = crate::root().join("xtask/assets/trace-view");
    let jaeger = Jaeger::start_with_ui(&work.join("jaeger"), Some(&trace_view))?;
    done(&format!("query API at http://{}", jaeger.query));

    step("starting etcd and kube-apiserver on 127.0.0.1");
    let plane =
        testbed::ControlPlane::start(&work.join("cluster"), testbed::Lifetime::Owned).await?;
    let client = plane.client().await?;
    testbed::support::crds::install(&client).await?;
    done(&format!(
        "API server ready at {} in {:.1}s; CRDs installed",
        plane.server,
        plane.startup.as_secs_f64()
    ));

    step("starting the \"external\" registry and building two images (3 layers each)");
    let upstream = Registry::start(&work.join("upstream"))?;
    let images_dir = work.join("images");
    let web = testbed::builds::images::build_and_push(
        &images_dir,
        &upstream.host,
        "team/web",
        "1.4.2",
        &[12 * MB, 6 * MB, 2 * MB],
    )?;
    let worker = testbed::builds::images::build_and_push(
        &images_dir,
        &upstream.host,
        "team/worker",
        "0.9.0",
        &[10 * MB, 4 * MB, MB],
    )?;
    done(&format!(
        "{} and {} at {}",
        web.reference, worker.reference, upstream.host
    ));

    step(
        "starting 3 nodes: a Node object, a containerd, a peer mirror (stand-in for spegel) and an agent each",
    );
    let directory = work.join("peer-directory");
    let settings = Settings::default();
    let labels: std::collections::BTreeMap<String, String> =
        [("pool".to_string(), "general".to_string())].into();
    let mut nodes = Vec::new();
    for (name, ip) in NODES.iter().zip(MIRROR_IPS) {
        let node = SimulatedNode::start(
            &work.join("nodes"),
            &client,
            &plane.kubeconfig,
            NodeSetup {
                name,
                labels: labels.clone(),
                mirror: Mirror::Peer {
                    upstream: &upstream.host,
                    ip,
                    directory: &directory,
                    settings: &settings,
                },
                platform: None,
                jaeger: Some(&jaeger),
            },
        )
        .await?;
        nodes.push(node);
    }
    done(&NODES.join(", "));

    step("starting the controller");
    let controller = Binary::start(
        CONTROLLER,
        &[],
        &plane.kubeconfig,
        Some(&jaeger),
        &work.join("controller.log"),
    )?;
    done("running as its own process");

    step("applying an ImagePrefetch of both images to every node with pool=general");
    let prefetches: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    let sample = json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
        "metadata": {"name": "web-release", "namespace": "default"},
        "spec": {"images": [web.reference, worker.reference], "nodeSelector": {"pool": "general"}},
    });
    let started = Instant::now();
    prefetches
        .patch(
            "web-release",
            &PatchParams::apply("xtask-demo").force(),
            &Patch::Apply(&sample),
        )
        .await?;

    let sets: Api<NodeImageSet> = Api::all(client.clone());
    let images = [web.reference.clone(), worker.reference.clone()];
    let mut last = String::new();
    loop {
        let all = sets.list(&ListParams::default()).await?.items;
        let view = progress(&all, &images);
        if !all.is_empty() && view != last {
            println!("{:>5.1}s\n{view}", started.elapsed().as_secs_f64());
            last = view;
        }
        let status = prefetches.get("web-release").await?.status;
        if status.as_ref().is_some_and(|s| s.ready == "3/3") {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "not Ready within 5 minutes; the controller's and agents' logs are in {}",
                work.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ready_in = started.elapsed();

    println!("\n== Summary ==");
    println!(
        "All 3 nodes have both images after {:.1}s.",
        ready_in.as_secs_f64()
    );
    let all = sets.list(&ListParams::default()).await?.items;
    for set in &all {
        for e in &set.spec.image_set {
            let report = set.report_on(&e.name);
            println!(
                "  {:<14} {:<36} {:<8} {:>7.1} MB in {:>5} ms",
                set.spec.node_name,
                short(&e.name),
                match e.registry_policy {
                    RegistryPolicy::Default => "seed",
                    RegistryPolicy::Mirror => "mirror",
                },
                report.and_then(|r| r.size_bytes).unwrap_or(0) as f64 / 1e6,
                report.and_then(|r| r.pull_duration_millis).unwrap_or(0),
            );
        }
    }
    let blobs = web.blobs.len() + worker.blobs.len();
    let upstream_gets: usize = [&web, &worker]
        .iter()
        .map(|i| upstream.blob_gets(&i.repository).values().sum::<usize>())
        .sum();
    let upstream_bytes = upstream.blob_bytes_served();
    let peer_bytes: u64 = nodes
        .iter()
        .filter_map(|n| n.peer_mirror.as_ref())
        .map(|m| m.counter("peer_mirror_peer_bytes_total"))
        .sum();
    let image_bytes = web.size + worker.size;
    println!(
        "  The external registry served {upstream_gets} blob downloads for {blobs} blobs, {:.1} MB \
         (its access log); the images are {:.1} MB.\n  Nodes got {:.1} MB from their peers' mirrors \
         (the mirrors' own counters).\n  Without sequencing, spegel alone serves only what some node \
         has committed: 3 nodes pulling at once would each fetch from the registry, up to {} blob \
         downloads (an estimate of the worst case; `cargo xtask bench rollout` measures it).",
        upstream_bytes as f64 / 1e6,
        image_bytes as f64 / 1e6,
        peer_bytes as f64 / 1e6,
        3 * blobs
    );
    println!();
    print_table(&plane.kubeconfig)?;

    let (trace_id, spans) = rollout_trace(&jaeger).await?;
    println!(
        "\nThe rollout is one trace of {spans} spans (reconcile → NodeImageSet writes → each node's pull → containerd calls):\n  http://{}/trace/{trace_id}\n  http://{}/api/traces/{trace_id}",
        jaeger.query, jaeger.query
    );
    if let Some(path) = &opts.screenshot {
        screenshot(&jaeger, &trace_id, path)?;
        println!("  rendered into {}", path.display());
    }

    if opts.keep {
        println!(
            "\nEverything keeps running until Ctrl-C. In another terminal:\n  export KUBECONFIG={}\n  kubectl get image-prefetch -A",
            plane.kubeconfig.display()
        );
        plumbing::shutdown_signal().await;
    }
    drop(controller);
    drop(nodes);
    plane.stop();
    println!("\nEverything is stopped; nothing is left running.");
    Ok(())
}

/// The trace holding the agents' pulls (the spans arrive in batches, so
/// it is waited for), and how many spans it has.
async fn rollout_trace(jaeger: &Jaeger) -> Result<(String, usize)> {
    let started = Instant::now();
    loop {
        let found = jaeger.traces("image-prefetch-agent", 20)?;
        let with_pulls: Vec<&serde_json::Value> = found["data"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|t| {
                let pulls = t["spans"]
                    .as_array()
                    .map(|s| s.iter().filter(|s| s["operationName"] == "pull").count())
                    .unwrap_or(0);
                pulls >= NODES.len() * 2
            })
            .collect();
        if let Some(t) = with_pulls.first() {
            let id = t["traceID"].as_str().unwrap_or_default().to_string();
            let full = jaeger.trace(&id)?;
            let spans = full["data"][0]["spans"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0);
            return Ok((id, spans));
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "Jaeger has no trace with every node's pulls after 30s (is OTLP export working?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Draws the trace with headless Chromium (Debian's, installed if missing):
/// once to learn how many rows the page has, once at that height.
fn screenshot(jaeger: &Jaeger, trace_id: &str, path: &Path) -> Result<()> {
    crate::deps::install_packages(&["chromium"])?;
    let url = format!("http://{}/trace/{trace_id}", jaeger.query);
    let dom = chromium(&["--dump-dom".to_string(), url.clone()])?;
    let rows = dom.matches("<tr").count();
    if !dom.contains("data-ready=\"true\"") {
        bail!("the trace view did not finish drawing the trace: {dom}");
    }
    let height = 110 + 24 * rows;
    chromium(&[
        format!("--window-size=1600,{height}"),
        format!("--screenshot={}", path.display()),
        url,
    ])?;
    if !path.is_file() {
        bail!("chromium wrote no screenshot to {}", path.display());
    }
    Ok(())
}

/// Runs headless Chromium with a fresh profile and no background traffic
/// (this machine's network is closed); returns what it printed.
fn chromium(args: &[String]) -> Result<String> {
    let profile = testbed::support::workdir::Workdir::new("chromium-profile");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .context("running chromium")?;
    drop(profile);
    if !out.status.success() {
        bail!("chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn short(reference: &str) -> &str {
    reference
        .split_once('/')
        .map(|(_, r)| r)
        .unwrap_or(reference)
}

/// One line per node: each image's state and, once known, where it came from.
/// A node not released yet has no set: every image waits for a seed.
fn progress(sets: &[NodeImageSet], images: &[String]) -> String {
    NODES
        .iter()
        .map(|node| {
            let set = sets.iter().find(|s| s.spec.node_name == *node);
            let cells: Vec<String> = images
                .iter()
                .map(|image| {
                    let entry =
                        set.and_then(|s| s.spec.image_set.iter().find(|e| &e.name == image));
                    let report = set.and_then(|s| s.report_on(image));
                    let cell = match (entry, report.map(|r| r.state)) {
                        (None, _) => "waiting for a seed".to_string(),
                        (Some(e), state) => {
                            let how = match e.registry_policy {
                                RegistryPolicy::Default => "seed, registry",
                                RegistryPolicy::Mirror => "from peers",
                            };
                            let what = match state {
                                Some(PullState::Available) => "present",
                                Some(PullState::Failed) => "FAILED",
                                _ => "pulling",
                            };
                            format!("{what} ({how})")
                        }
                    };
                    format!(
                        "{:<12} {cell:<28}",
                        short(image).split(':').next().unwrap_or(image)
                    )
                })
                .collect();
            format!("  {node:<14} {}", cells.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn done(what: &str) {
    eprintln!("    {what}");
}

/// `kubectl get image-prefetch -A` when kubectl is installed.
fn print_table(kubeconfig: &std::path::Path) -> Result<()> {
    let status = Command::new("kubectl")
        .args(["get", crd::CATEGORY, "-A"])
        .env("KUBECONFIG", kubeconfig)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("kubectl get failed ({s})"),
        Err(_) => {
            println!(
                "(kubectl is not installed; `KUBECONFIG={} kubectl get image-prefetch -A` shows the table)",
                kubeconfig.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd::{NodeImage, NodeImageSetSpec};

    /// A node the controller has not released yet has no set: its row still
    /// shows, each image waiting.
    #[test]
    fn a_node_without_a_set_waits_for_a_seed() {
        let images = ["r.example/team/web:1".to_string()];
        let seed = NodeImageSet::new(
            "s",
            NodeImageSetSpec::for_node(
                NODES[0],
                vec![NodeImage::of(images[0].clone(), RegistryPolicy::Default)],
            ),
        );
        let view = progress(&[seed], &images);
        let rows: Vec<&str> = view.lines().collect();
        assert_eq!(rows.len(), NODES.len(), "{view}");
        assert!(rows[0].contains("pulling (seed, registry)"), "{view}");
        for row in &rows[1..] {
            assert!(row.contains("team/web     waiting for a seed"), "{view}");
        }
    }
}
