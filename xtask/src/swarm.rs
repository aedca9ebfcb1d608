//! `cargo run --release -p xtask --features swarm -- bench swarm`: the release controller against N Node objects
//! and N simulated agents in this one process. Each agent has its own watch
//! of its node's NodeImageSets (so the API server's fan-out is real), runs
//! the agent's own ledger and status-report code (`agent::ledger`,
//! `agent::report`), and pulls by sleeping as long as a model of spegel's
//! data plane says (`dataplane.rs`). Numbers go to stdout;
//! docs/benchmarks.md records them.

mod dataplane;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use agent::ledger::{self, Action, Failure, Key, Ledger, Present, Want};
use agent::report;
use crd::{ImagePrefetch, NodeImageSet, RegistryPolicy};
use dataplane::{DataPlane, Model};

pub struct Options {
    pub nodes: usize,
    pub images: usize,
    pub prefetches: usize,
    pub image_mib: u64,
    pub uplink_mib: u64,
    pub nic_mib: u64,
    /// The controller's `--wave-cap` (0: none, its default).
    pub wave_cap: u64,
    /// `false`: the controller's `--no-named-sources`.
    pub named_sources: bool,
}

/// What every simulated agent counts.
#[derive(Default)]
struct Counters {
    watch_events: AtomicU64,
    status_writes: AtomicU64,
    /// Status writes that failed, each made again.
    failed_writes: AtomicU64,
}

type Planes = Arc<Mutex<HashMap<String, DataPlane>>>;

/// A finished pull, as a pull task tells its agent.
type Finished = (Key, Want, Result<(Present, i32), (Failure, i32)>);

pub async fn run(opts: Options) -> Result<()> {
    crate::bench::prepare("image-prefetch-controller")?;
    let dir = testbed::support::workdir::Workdir::new("bench-swarm");
    let plane =
        testbed::ControlPlane::start(&dir.join("cluster"), testbed::Lifetime::Owned).await?;
    let client = plane.client().await?;
    testbed::support::crds::install(&client).await?;
    let model = Model {
        image_bytes: opts.image_mib << 20,
        uplink: opts.uplink_mib << 20,
        nic: opts.nic_mib << 20,
        advertise_delay: Duration::from_millis(500),
    };
    let names: Vec<String> = (0..opts.nodes).map(|i| format!("swarm-{i:05}")).collect();
    let labels: BTreeMap<String, String> = [("swarm".to_string(), "yes".to_string())].into();
    let t = Instant::now();
    testbed::support::nodes::register_all(&client, &names, &labels).await?;
    // Addresses for named sources: only written into Node objects; the
    // simulated agents send nothing to them.
    futures::stream::iter(names.iter().enumerate().map(|(i, n)| {
        let client = client.clone();
        async move {
            let ip = format!("127.1.{}.{}", i / 256, i % 256);
            testbed::support::nodes::set_address(&client, n, &ip).await
        }
    }))
    .buffer_unordered(32)
    .try_collect::<Vec<_>>()
    .await?;
    println!(
        "{} nodes registered in {:.1}s; model: image {} MiB, uplink {} MiB/s, NIC {} MiB/s, advertisement 500 ms, 3 providers per lookup",
        opts.nodes,
        t.elapsed().as_secs_f64(),
        opts.image_mib,
        opts.uplink_mib,
        opts.nic_mib
    );

    let planes: Planes = Arc::default();
    let counters = Arc::new(Counters::default());
    let agents: Vec<JoinHandle<()>> = names
        .iter()
        .map(|n| {
            tokio::spawn(simulated_agent(
                client.clone(),
                n.clone(),
                model,
                planes.clone(),
                counters.clone(),
            ))
        })
        .collect();
    let binary = crate::root().join("target/release/image-prefetch-controller");
    let mut controller = std::process::Command::new(&binary)
        .arg(format!("--wave-cap={}", opts.wave_cap))
        .args((!opts.named_sources).then_some("--no-named-sources"))
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| binary.display().to_string())?;
    let apiserver = crate::bench::apiserver_pid(&plane.dir).context("kube-apiserver's pid")?;
    let result = measure(
        &client,
        &opts,
        model,
        &planes,
        &counters,
        controller.id(),
        apiserver,
    )
    .await;
    let _ = controller.kill();
    let _ = controller.wait();
    for a in agents {
        a.abort();
    }
    plane.stop();
    result
}

async fn measure(
    client: &Client,
    opts: &Options,
    model: Model,
    planes: &Planes,
    counters: &Counters,
    controller: u32,
    apiserver: u32,
) -> Result<()> {
    // Every agent's watch listed and the controller's caches synced before
    // the clock starts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let requests_before = requests_by_verb(client).await?;
    let (cpu_c0, cpu_a0) = (
        crate::bench::cpu_seconds(controller)?,
        crate::bench::cpu_seconds(apiserver)?,
    );
    let events_before = counters.watch_events.load(Ordering::Relaxed);
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    let t0 = Instant::now();
    for p in 0..opts.prefetches {
        let images: Vec<String> = (0..opts.images)
            .map(|i| format!("registry.example.com/swarm/app{p}-{i}:1"))
            .collect();
        let obj = json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
            "metadata": {"name": format!("swarm-{p}")},
            "spec": {"images": images, "nodeSelector": {"swarm": "yes"}},
        });
        api.patch(
            &format!("swarm-{p}"),
            &PatchParams::apply("bench"),
            &Patch::Apply(&obj),
        )
        .await?;
    }
    let want = format!("{}/{}", opts.nodes, opts.nodes);
    let (mut peak_c, mut peak_a) = (0, 0);
    let deadline = Duration::from_secs(3600);
    loop {
        peak_c = peak_c.max(crate::bench::memory(controller)?.peak_kib);
        peak_a = peak_a.max(crate::bench::memory(apiserver)?.peak_kib);
        let list = api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|p| p.status.as_ref().is_some_and(|s| s.ready == want))
            .count();
        if ready == opts.prefetches {
            break;
        }
        if t0.elapsed() > deadline {
            bail!(
                "{ready} of {} ImagePrefetches Ready after {deadline:?}",
                opts.prefetches
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let took = t0.elapsed();
    let requests = requests_by_verb(client).await?;
    let (cpu_c, cpu_a) = (
        crate::bench::cpu_seconds(controller)? - cpu_c0,
        crate::bench::cpu_seconds(apiserver)? - cpu_a0,
    );
    let ideal = model.ideal(opts.nodes);
    println!(
        "{} ImagePrefetch(es) x {} image(s) x {} nodes: all Ready in {:.1}s; ideal {:.1}s (one upstream pull + {} peer rounds); {:.2}x",
        opts.prefetches,
        opts.images,
        opts.nodes,
        took.as_secs_f64(),
        ideal.as_secs_f64(),
        opts.nodes.next_power_of_two().trailing_zeros(),
        took.as_secs_f64() / ideal.as_secs_f64()
    );
    {
        let planes = planes.lock().expect("not poisoned");
        let sum = |f: fn(&DataPlane) -> usize| planes.values().map(f).sum::<usize>();
        println!(
            "data plane: {} upstream pulls for {} images, {} peer pulls, {} mirror misses, most streams one holder served at once: {}",
            sum(|d| d.upstream_pulls),
            planes.len(),
            sum(|d| d.peer_pulls),
            sum(|d| d.misses),
            planes.values().map(|d| d.most_streams).max().unwrap_or(0)
        );
    }
    let entries = (opts.nodes * opts.images * opts.prefetches) as f64;
    let writes = counters.status_writes.load(Ordering::Relaxed);
    println!(
        "agents: {writes} status writes ({:.2} per node x image; {} more failed and were made again), {} watch events delivered",
        writes as f64 / entries,
        counters.failed_writes.load(Ordering::Relaxed),
        counters.watch_events.load(Ordering::Relaxed) - events_before
    );
    println!("API requests during the rollout (verb, resource: count):");
    for ((verb, resource), n) in &requests {
        let before = requests_before
            .get(&(verb.clone(), resource.clone()))
            .copied()
            .unwrap_or(0);
        if n - before > 0 {
            println!("  {verb:<8} {resource:<16} {}", n - before);
        }
    }
    println!(
        "controller: {cpu_c:.1} CPU-s, peak RSS {:.1} MiB; kube-apiserver: {cpu_a:.1} CPU-s ({:.4} per node x image), peak RSS {:.1} MiB",
        peak_c as f64 / 1024.0,
        cpu_a / entries,
        peak_a as f64 / 1024.0
    );
    Ok(())
}

/// One node's agent: the agent's ledger and status code, pulls simulated.
async fn simulated_agent(
    client: Client,
    node: String,
    model: Model,
    planes: Planes,
    counters: Arc<Counters>,
) {
    let api: Api<NodeImageSet> = Api::all(client);
    let (store, mut events) = agent::sets::follow(&api, &node);
    let mut ledger = Ledger::new(agent::ledger::FAILED_BACKOFF);
    let (tx, mut rx) = mpsc::unbounded_channel::<Finished>();
    let mut tasks: HashMap<Key, JoinHandle<()>> = HashMap::new();
    // What each set was last written with, over which resourceVersion (as the agent).
    let mut written: HashMap<String, (Option<String>, String)> = HashMap::new();
    // A status write that failed (refused or timed out under load) is made
    // again after a second, as the agent's status-write backoff would: with
    // no next event, the node's last report was otherwise never written.
    let mut rewrite: Option<Instant> = None;
    loop {
        let actions = tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => continue,
                Some(Ok(_)) => {
                    counters.watch_events.fetch_add(1, Ordering::Relaxed);
                    ledger.observe(report::listed(&store.state()), Instant::now())
                }
                Some(Err(_)) => continue,
                None => return,
            },
            Some((key, want, result)) = rx.recv() => {
                tasks.remove(&key);
                let mut actions = ledger.finished(&key, &want, result, Instant::now());
                actions.extend(ledger.observe(report::listed(&store.state()), Instant::now()));
                actions
            }
            _ = sleep_until(ledger.next_retry()) => {
                ledger.observe(report::listed(&store.state()), Instant::now())
            }
            _ = sleep_until(rewrite) => {
                rewrite = None;
                Vec::new()
            }
        };
        for action in actions {
            match action {
                Action::Start(key, want) => {
                    let job = pull(
                        node.clone(),
                        key.clone(),
                        *want,
                        model,
                        planes.clone(),
                        tx.clone(),
                    );
                    if let Some(old) = tasks.insert(key, tokio::spawn(job)) {
                        old.abort();
                    }
                }
                Action::Abort(key) => {
                    if let Some(t) = tasks.remove(&key) {
                        t.abort();
                    }
                }
                Action::Pin(_) | Action::Release(_) | Action::Report(_) => {}
            }
        }
        for set in store.state() {
            let status = report::status(&ledger, &set, &crd::condition::now());
            if !report::worth_writing(&set, &status) {
                continue;
            }
            let mark = (
                set.resource_version(),
                serde_json::to_string(&status).unwrap_or_default(),
            );
            let uid = set.uid().unwrap_or_default();
            if written.get(&uid) == Some(&mark) {
                continue;
            }
            if agent::sets::write(&api, &set.name_any(), &status)
                .await
                .is_ok()
            {
                counters.status_writes.fetch_add(1, Ordering::Relaxed);
                written.insert(uid, mark);
            } else {
                counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                rewrite = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }
}

/// A pull as the data plane model times it; a Mirror miss is asked again
/// on the agent's own schedule before it fails.
async fn pull(
    node: String,
    key: Key,
    want: Want,
    model: Model,
    planes: Planes,
    tx: mpsc::UnboundedSender<Finished>,
) {
    let image = want.entry.name.clone();
    let mirror_only = want.entry.registry_policy == RegistryPolicy::Mirror;
    let mut waits = ledger::mirror_miss_waits();
    let begun = Instant::now();
    let result = loop {
        let started = planes
            .lock()
            .expect("not poisoned")
            .entry(image.to_string())
            .or_insert_with(|| DataPlane::new(model))
            .start(
                &node,
                mirror_only,
                want.entry.source.as_ref().map(|s| s.node.as_str()),
                Instant::now(),
            );
        match started {
            Some(s) => {
                tokio::time::sleep(s.takes).await;
                planes
                    .lock()
                    .expect("not poisoned")
                    .get_mut(image.as_str())
                    .expect("started there")
                    .finish(&node, &s, Instant::now());
                break Ok((
                    Present {
                        digest: crate::bench::digest_of(&image),
                        size: Some(model.image_bytes as i64),
                        duration: begun.elapsed(),
                    },
                    1,
                ));
            }
            None => match waits.next() {
                Some(wait) => tokio::time::sleep(wait).await,
                None => {
                    break Err((
                        Failure {
                            message: format!("no peer has {image}"),
                            reason: crd::PullFailure::NotFound,
                        },
                        1,
                    ));
                }
            },
        }
    };
    let _ = tx.send((key, want, result));
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// API requests by (verb, resource), from the API server's own counters;
/// those not answered 2xx apart, with their code (a watch the API server
/// refused or cut under load is one more request).
async fn requests_by_verb(client: &Client) -> Result<BTreeMap<(String, String), u64>> {
    let mut by = BTreeMap::new();
    for r in testbed::support::api_metrics::requests(client).await? {
        let label = |n: &str| r.labels.get(n).cloned().unwrap_or_default();
        let code = label("code");
        let resource = if code.starts_with('2') || code.is_empty() {
            label("resource")
        } else {
            format!("{} ({code})", label("resource"))
        };
        *by.entry((label("verb"), resource)).or_default() += r.count;
    }
    Ok(by)
}
