//! `cargo xtask bench controller`: the controller binary (release build)
//! against the real local API server, fanning out to many Node objects.
//! Numbers go to stdout; docs/benchmarks.md records them.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crd::{ImagePrefetch, NodeImageSet};

pub struct Options {
    pub nodes: usize,
    pub prefetches: usize,
    /// At the end, force a re-list (stop and start the API server).
    pub relist: bool,
}

/// Packages, fixtures, and a release build of the binary under test.
pub(crate) fn prepare(package: &str) -> Result<()> {
    crate::deps::install()?;
    crate::fixtures()?;
    crate::test::cargo(&["build", "--release", "--quiet", "-p", package])
}

pub async fn controller(opts: Options) -> Result<()> {
    prepare("image-prefetch-controller")?;
    let dir = crate::root().join(".testbed").join("bench");
    let plane = testbed::ControlPlane::start(&dir, testbed::Lifetime::Owned).await?;
    let client = plane.client().await?;
    testbed::support::crds::install(&client).await?;

    let started = Instant::now();
    let labels: BTreeMap<String, String> = [("bench".to_string(), "fanout".to_string())].into();
    let names: Vec<String> = (0..opts.nodes)
        .map(|i| format!("bench-node-{i:04}"))
        .collect();
    testbed::support::nodes::register_all(&client, &names, &labels).await?;
    println!(
        "registered {} Ready nodes in {:.1}s",
        opts.nodes,
        started.elapsed().as_secs_f64()
    );

    let binary = crate::root().join("target/release/image-prefetch-controller");
    let mut child = Command::new(&binary)
        // All ImagePrefetches are in one namespace: its budget (20,000
        // entries by default) would hold all but four back.
        .arg("--namespace-budget=0")
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| binary.display().to_string())?;
    let pid = child.id();
    let mut plane = plane;
    let result = measure(&client, &mut plane, pid, &opts).await;
    let _ = child.kill();
    let _ = child.wait();
    plane.stop();
    result
}

async fn measure(
    client: &kube::Client,
    plane: &mut testbed::ControlPlane,
    pid: u32,
    opts: &Options,
) -> Result<()> {
    // Let the controller list Nodes before the clock starts: fan-out, not start-up, is measured.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let agents = tokio::spawn(simulated_agents(client.clone()));
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), "default");
    let sets: Api<NodeImageSet> = Api::all(client.clone());
    let apply = |i: usize, image: usize| {
        let api = api.clone();
        async move {
            let obj = json!({
                "apiVersion": "imageprefetch.io/v1alpha1", "kind": "ImagePrefetch",
                "metadata": {"name": format!("bench-{i:02}")},
                "spec": {"images": [image_of(image)], "nodeSelector": {"bench": "fanout"}},
            });
            api.patch(
                &format!("bench-{i:02}"),
                &PatchParams::apply("bench"),
                &Patch::Apply(&obj),
            )
            .await
        }
    };
    let apiserver = apiserver_pid(&plane.dir).context("kube-apiserver's pid")?;
    let n = opts.nodes;

    // One ImagePrefetch `i` of image `image`, timed until its sets (`sets`
    // in all) exist and it is Ready on every node.
    let phase = |i: usize, image: usize, all_sets: usize, what: String| {
        let (api, sets) = (api.clone(), sets.clone());
        async move {
            let mark = Mark::take(client, pid, apiserver).await?;
            apply(i, image).await?;
            wait_for_sets(&sets, all_sets, Duration::from_secs(600)).await?;
            let released = mark.t.elapsed();
            wait_ready(&api, &format!("bench-{i:02}"), n, Duration::from_secs(600)).await?;
            let what = format!("{what} in {:.2}s, Ready {n}/{n}", released.as_secs_f64());
            mark.print(client, pid, apiserver, &what, n).await
        }
    };
    // A rollout: the seed, a second resolution, then the mirror's waves, each
    // agent answering Available at once (what is left is the controller's
    // and the API server's own time, and spegel's findable delay per wave).
    phase(
        0,
        0,
        n,
        format!(
            "rollout of 1 ImagePrefetch to {n} nodes, agents answering at once: every node released"
        ),
    )
    .await?;
    // A fan-out: a second ImagePrefetch of the image every node now holds
    // is released to all of them at once (after its two resolutions).
    phase(
        1,
        0,
        2 * n,
        format!("fan-out of 1 ImagePrefetch to {n} nodes holding its image: all NodeImageSets"),
    )
    .await?;

    if opts.prefetches > 2 {
        let t1 = Instant::now();
        for i in 2..opts.prefetches {
            apply(i, i).await?;
        }
        let total = opts.prefetches * n;
        wait_for_sets(&sets, total, Duration::from_secs(1800)).await?;
        for i in 2..opts.prefetches {
            wait_ready(&api, &format!("bench-{i:02}"), n, Duration::from_secs(1800)).await?;
        }
        let all = t1.elapsed();
        let settled = settle(client).await?;
        let idle_from = api_writes(client).await?;
        tokio::time::sleep(Duration::from_secs(30)).await;
        let idle_writes = api_writes(client).await? - idle_from;
        let rss = memory(pid)?;
        println!(
            "{} ImagePrefetches x {n} nodes ({total} NodeImageSets, each with an agent's report): Ready in {:.1}s, no more writes {:.0}s later; steady state: RSS {:.1} MiB (peak {:.1} MiB), {} API writes in 30s idle",
            opts.prefetches,
            all.as_secs_f64(),
            settled.as_secs_f64(),
            rss.now_kib as f64 / 1024.0,
            rss.peak_kib as f64 / 1024.0,
            idle_writes
        );
    }
    agents.abort();
    if opts.relist {
        plane.stop_apiserver();
        plane.start_apiserver().await?;
        let t = Instant::now();
        // The watches come back after their backoff and list everything again.
        tokio::time::sleep(Duration::from_secs(90)).await;
        let rss = memory(pid)?;
        println!(
            "after a forced re-list (API server stopped and started, {:.0}s): controller RSS {:.1} MiB, peak {:.1} MiB",
            t.elapsed().as_secs_f64(),
            rss.now_kib as f64 / 1024.0,
            rss.peak_kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// The bench's image `i`.
fn image_of(i: usize) -> String {
    format!("registry.example.com/bench/app{i}:1")
}

/// Where a phase starts: the clock, the API writes and the CPU-seconds so far.
struct Mark {
    t: Instant,
    writes: u64,
    cpu: (f64, f64),
}

impl Mark {
    async fn take(client: &kube::Client, pid: u32, apiserver: u32) -> Result<Self> {
        Ok(Mark {
            writes: api_writes(client).await?,
            cpu: (cpu_seconds(pid)?, cpu_seconds(apiserver)?),
            t: Instant::now(),
        })
    }

    /// Prints `what` with the phase's time, writes per node and CPU-seconds.
    async fn print(
        &self,
        client: &kube::Client,
        pid: u32,
        apiserver: u32,
        what: &str,
        nodes: usize,
    ) -> Result<()> {
        let took = self.t.elapsed();
        let cpu = (
            cpu_seconds(pid)? - self.cpu.0,
            cpu_seconds(apiserver)? - self.cpu.1,
        );
        let writes = api_writes(client).await? - self.writes;
        let rss = memory(pid)?;
        println!(
            "{what} in {:.2}s; {writes} API writes ({:.2} per node), controller peak RSS {:.1} MiB, CPU-s controller {:.1}, kube-apiserver {:.1}",
            took.as_secs_f64(),
            writes as f64 / nodes as f64,
            rss.peak_kib as f64 / 1024.0,
            cpu.0,
            cpu.1
        );
        Ok(())
    }
}

/// Agents that answer at once: every set listing an entry it has no report
/// on gets a report of every entry Available, as an agent writes once its
/// images are there (one status write per set and change, server-side
/// apply as the agent's field manager).
async fn simulated_agents(client: kube::Client) -> Result<()> {
    use kube::runtime::{WatchStreamExt, watcher};
    let sets: Api<NodeImageSet> = Api::all(client);
    let writer = sets.clone();
    watcher::watcher(sets, watcher::Config::default())
        .applied_objects()
        .filter_map(|set| async move {
            let set = set.ok()?;
            let reported = |name: &str| {
                set.status.as_ref().is_some_and(|s| {
                    s.images
                        .iter()
                        .any(|r| *r.name == *name && r.state == crd::PullState::Available)
                })
            };
            if set.spec.image_set.iter().all(|e| reported(&e.name)) {
                return None;
            }
            Some((kube::ResourceExt::name_any(&set), report_of(&set)))
        })
        .map(|(name, status)| {
            let writer = writer.clone();
            async move {
                // A set deleted meanwhile, or a conflict: the next event retries.
                let _ = writer
                    .patch_status(
                        &name,
                        &PatchParams::apply("image-prefetch-agent").force(),
                        &Patch::Apply(&status),
                    )
                    .await;
            }
        })
        .buffer_unordered(32)
        .for_each(|()| async {})
        .await;
    Ok(())
}

/// An agent's status of `set` with every entry Available, as a real one
/// writes it (a 256 MiB image pulled in 2.1 s).
fn report_of(set: &NodeImageSet) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let images: Vec<_> = set
        .spec
        .image_set
        .iter()
        .map(|e| {
            let digest = e
                .digest
                .as_deref()
                .map(str::to_string)
                .unwrap_or_else(|| digest_of(&e.name));
            json!({
                "name": e.name, "state": "Available", "attempts": 1,
                "digest": digest, "sizeBytes": 268_435_456i64,
                "pullDurationMillis": 2_100,
                "source": match e.registry_policy {
                    crd::RegistryPolicy::Default => crd::PullSource::Upstream,
                    crd::RegistryPolicy::Mirror => crd::PullSource::Mirror,
                },
            })
        })
        .collect();
    let total = images.len();
    json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "status": {
            "available": total, "total": total, "images": images,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "AllImagesPresent",
                "message": format!("{total} of {total} images present"), "lastTransitionTime": now,
            }],
        },
    })
}

/// The one digest the registry would resolve `image` to.
pub(crate) fn digest_of(image: &str) -> String {
    let h = image.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    format!("sha256:{h:016x}{h:016x}{h:016x}{h:016x}")
}

/// Waits until ImagePrefetch `name` says Ready on all `n` nodes.
async fn wait_ready(api: &Api<ImagePrefetch>, name: &str, n: usize, limit: Duration) -> Result<()> {
    let want = format!("{n}/{n}");
    let t = Instant::now();
    loop {
        let ready = api.get_status(name).await?.status.map(|s| s.ready);
        if ready.as_deref() == Some(want.as_str()) {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("{name} not Ready {want} after {limit:?} ({ready:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the controller has written nothing for 10 s (what it had to
/// do is done), at most 10 minutes; returns how long that took.
async fn settle(client: &kube::Client) -> Result<Duration> {
    let t = Instant::now();
    let mut last = api_writes(client).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let now = api_writes(client).await?;
        if now == last {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "the controller still writes after 10 minutes ({} writes in the last 10 s)",
                now - last
            );
        }
        last = now;
    }
}

async fn wait_for_sets(sets: &Api<NodeImageSet>, want: usize, limit: Duration) -> Result<()> {
    use kube::runtime::watcher::{self, Event};
    // A watch, not a list per poll: listing every set's metadata every 50 ms
    // cost the API server more than the controller's writes it measured
    // (5 MB of metadata a list at 5,000 sets).
    let mut names = std::collections::HashSet::new();
    let metadata: Api<kube::core::PartialObjectMeta<NodeImageSet>> =
        Api::all(sets.clone().into_client());
    let mut events = std::pin::pin!(watcher::watcher(metadata, watcher::Config::default()));
    let counted = tokio::time::timeout(limit, async {
        while let Some(event) = events.next().await {
            match event? {
                Event::Init => names.clear(),
                Event::Apply(m) | Event::InitApply(m) => {
                    names.insert(kube::ResourceExt::name_any(&m));
                }
                Event::Delete(m) => {
                    names.remove(&kube::ResourceExt::name_any(&m));
                }
                Event::InitDone => {}
            }
            if names.len() >= want {
                return Ok(());
            }
        }
        bail!("the watch of NodeImageSets ended")
    })
    .await;
    match counted {
        Ok(result) => result,
        Err(_) => bail!(
            "only {} of {want} NodeImageSets after {limit:?}",
            names.len()
        ),
    }
}

/// Mutating requests on our two resources, from the API server's own counters.
async fn api_writes(client: &kube::Client) -> Result<u64> {
    const WRITES: [&str; 6] = [
        "APPLY",
        "PATCH",
        "POST",
        "PUT",
        "DELETE",
        "DELETECOLLECTION",
    ];
    Ok(testbed::support::api_metrics::count(client, |r| {
        (r.is("resource", "nodeimagesets") || r.is("resource", "imageprefetches"))
            && WRITES.iter().any(|v| r.is("verb", v))
    })
    .await?)
}

pub(crate) struct Memory {
    pub now_kib: u64,
    pub peak_kib: u64,
}

pub(crate) fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("the controller exited; run it by hand to see why")?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        now_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
    })
}

/// User + system CPU time of a process, from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / per_second)
}

/// The kube-apiserver serving the control plane in `dir`.
pub(crate) fn apiserver_pid(dir: &std::path::Path) -> Option<u32> {
    let dir = dir.to_string_lossy();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("kube-apiserver") && cmdline.contains(dir.as_ref())).then_some(pid)
    })
}

/// `cargo xtask bench agent`: the release agent's pull against `ctr images
/// pull` of the same image from the same registry, each into a fresh
/// containerd, and the agent's memory idle and while pulling.
pub async fn agent(layers_mib: &[usize]) -> Result<()> {
    prepare("image-prefetch-agent")?;
    let dir = testbed::support::workdir::Workdir::new("bench-agent");
    let plane =
        testbed::ControlPlane::start(&dir.join("cluster"), testbed::Lifetime::Owned).await?;
    let client = plane.client().await?;
    testbed::support::crds::install(&client).await?;
    let registry = testbed::servers::registry::Registry::start(&dir.join("registry"))?;
    let sizes: Vec<usize> = layers_mib.iter().map(|m| m * 1024 * 1024).collect();
    let image = testbed::builds::images::build_and_push(
        &dir.join("images"),
        &registry.host,
        "bench/app",
        "1",
        &sizes,
    )?;
    let mib = image.size as f64 / (1024.0 * 1024.0);
    println!("image: {} layers, {:.0} MiB", sizes.len(), mib);

    // ctr, into its own containerd.
    let ctr_node = testbed::servers::containerd::Containerd::start(&dir.join("node-ctr"))?;
    let t = Instant::now();
    let out = Command::new("ctr")
        .arg("--address")
        .arg(&ctr_node.socket)
        .args([
            "--namespace",
            "k8s.io",
            "images",
            "pull",
            "--plain-http",
            &image.reference,
        ])
        .output()?;
    if !out.status.success() {
        bail!("ctr pull failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let ctr_time = t.elapsed();

    // The agent, into another.
    let node = testbed::servers::containerd::Containerd::start(&dir.join("node-agent"))?;
    node.configure_registry(&registry.host, &[])?;
    let mut child = start_agent(&plane, &node, &dir.join("agent-hosts"), "warn")?;
    let pid = child.id();
    let result = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = memory(pid)?;
        let sets: Api<NodeImageSet> = Api::all(client.clone());
        let obj = json!({
            "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
            "metadata": {"name": "bench", "labels": {crd::keys::NODE: "bench-node"}},
            "spec": {"nodeName": "bench-node", "imageSet": [{"name": image.reference, "registryPolicy": "Default"}]},
        });
        let t = Instant::now();
        sets.patch("bench", &PatchParams::apply("bench"), &Patch::Apply(&obj)).await?;
        let reported = loop {
            let status = sets.get_status("bench").await?.status;
            if let Some(s) = status.and_then(|s| s.images.into_iter().next()).filter(|s| s.state == crd::PullState::Available) {
                break s;
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("the agent did not report the image within 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let end_to_end = t.elapsed();
        let pulling = memory(pid)?;
        let pull = Duration::from_millis(reported.pull_duration_millis.unwrap_or(0) as u64);
        println!("ctr images pull:        {:.2}s ({:.0} MiB/s)", ctr_time.as_secs_f64(), mib / ctr_time.as_secs_f64());
        println!(
            "agent pull (Transfer):  {:.2}s ({:.0} MiB/s), ratio to ctr {:.2}",
            pull.as_secs_f64(),
            mib / pull.as_secs_f64(),
            pull.as_secs_f64() / ctr_time.as_secs_f64()
        );
        println!("agent, NodeImageSet written to status Available: {:.2}s", end_to_end.as_secs_f64());
        println!(
            "agent RSS: idle {:.1} MiB; after the pull {:.1} MiB (peak {:.1} MiB)",
            idle.now_kib as f64 / 1024.0,
            pulling.now_kib as f64 / 1024.0,
            pulling.peak_kib as f64 / 1024.0
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The release agent of node `bench-node`, on `node`'s containerd.
fn start_agent(
    plane: &testbed::ControlPlane,
    node: &testbed::servers::containerd::Containerd,
    mirror_dir: &std::path::Path,
    log: &str,
) -> Result<std::process::Child> {
    let binary = crate::root().join("target/release/image-prefetch-agent");
    Command::new(&binary)
        .args(["--node-name", "bench-node", "--containerd-socket"])
        .arg(&node.socket)
        .arg("--registry-config-dir")
        .arg(&node.hosts_dir)
        .arg("--mirror-config-dir")
        .arg(mirror_dir)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("RUST_LOG", log)
        .spawn()
        .with_context(|| binary.display().to_string())
}

/// `cargo xtask bench agent-memory`: the worst case the cluster budget
/// allows one agent — every entry of the cluster on its node, in sets of 64
/// images whose names are near the 512-character limit. Each entry is a
/// Mirror pull on a node with no mirror configured, so it fails at once
/// (`NoMirror`) with no traffic and no retry, and every status carries an error: the
/// largest report an entry makes. The agent's RSS is sampled from /proc
/// until every entry is reported, and for a minute after.
pub async fn agent_memory(entries: usize) -> Result<()> {
    prepare("image-prefetch-agent")?;
    let dir = testbed::support::workdir::Workdir::new("bench-agent-memory");
    let plane =
        testbed::ControlPlane::start(&dir.join("cluster"), testbed::Lifetime::Owned).await?;
    let client = plane.client().await?;
    testbed::support::crds::install(&client).await?;
    let node = testbed::servers::containerd::Containerd::start(&dir.join("node"))?;
    let mut child = start_agent(&plane, &node, &dir.join("agent-hosts"), "error")?;
    let pid = child.id();
    let result = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = memory(pid)?;
        let per_set = crd::prefetch::MAX_IMAGES;
        let set_count = entries.div_ceil(per_set);
        // Five 60-character path components and a 120-character tag: about
        // 480 characters, each name valid and distinct.
        let long = |s: usize, i: usize| {
            let path: Vec<String> = (0..5).map(|c| format!("{c}{}", "t".repeat(59))).collect();
            format!(
                "registry.example.com/{}/app-{s:05}-{i:02}:{}",
                path.join("/"),
                "v".repeat(120)
            )
        };
        let name_len = long(0, 0).len();
        crd::reference::parse(&long(0, 0)).context("the bench's image names must be valid")?;
        let sets: Api<NodeImageSet> = Api::all(client.clone());
        let t = Instant::now();
        futures::stream::iter((0..set_count).map(|s| {
            let sets = sets.clone();
            let images: Vec<_> = (0..per_set.min(entries - s * per_set))
                .map(|i| json!({"name": long(s, i), "registryPolicy": "Mirror"}))
                .collect();
            async move {
                let name = format!("bench-{s:05}");
                let obj = json!({
                    "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
                    "metadata": {"name": name, "labels": {crd::keys::NODE: "bench-node"}},
                    "spec": {"nodeName": "bench-node", "imageDownloadRetryLimit": 0, "imageSet": images},
                });
                sets.patch(&name, &PatchParams::apply("bench"), &Patch::Apply(&obj))
                    .await
            }
        }))
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
        println!(
            "{entries} entries ({set_count} NodeImageSets, names of {name_len} characters) written in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        // Every entry in the agent's ledger and reported (Pulling at first):
        // what it holds from then on is what these entries cost it.
        let (mut peak, mut failed) = (memory(pid)?, 0);
        loop {
            let statuses: Vec<_> = sets
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|s| s.status)
                .flat_map(|s| s.images)
                .collect();
            failed = statuses.iter().filter(|i| i.attempts > 0).count().max(failed);
            peak.peak_kib = peak.peak_kib.max(memory(pid)?.peak_kib);
            if statuses.len() >= entries {
                break;
            }
            if t.elapsed() > Duration::from_secs(1800) {
                bail!("only {} of {entries} entries reported within 30 minutes", statuses.len());
            }
            // Listing every set is itself heavy: not too often.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let all_reported = t.elapsed();
        // Then a minute of the agent working through them.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            peak.peak_kib = peak.peak_kib.max(memory(pid)?.peak_kib);
        }
        let steady = memory(pid)?;
        println!(
            "agent RSS: idle {:.1} MiB; every entry reported in {:.1}s; a minute later {:.1} MiB, peak {:.1} MiB ({:.2} KiB per entry above idle); {failed} entries had failed by then",
            idle.now_kib as f64 / 1024.0,
            all_reported.as_secs_f64(),
            steady.now_kib as f64 / 1024.0,
            steady.peak_kib.max(peak.peak_kib) as f64 / 1024.0,
            steady.now_kib.saturating_sub(idle.now_kib) as f64 / entries as f64
        );
        Ok(())
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    plane.stop();
    result
}

/// What `cargo xtask bench rollout` was asked for.
pub struct RolloutOptions {
    pub nodes: usize,
    /// The external registry's uplink, in MiB/s.
    pub uplink_mib: u64,
}

/// One rollout of one image to every node, as the registry and the nodes saw it.
struct RolloutRun {
    ready_in: Duration,
    /// Upstream GETs of each layer (and the config), in the image's order.
    gets_per_blob: Vec<usize>,
    upstream_bytes: u64,
    /// The seed's pull (upstream) and the median Mirror pull (from peers).
    seed_pull: Option<Duration>,
    peer_pull: Option<Duration>,
}

/// `cargo xtask bench rollout`: N simulated nodes on the peer-mirror bed,
/// release builds, the registry behind a slowed uplink; one image rolled out
/// sequenced, then a fresh image of the same sizes with every node `Default`
/// at once (the controller's `--no-sequencing`, spegel on its own).
pub async fn rollout(opts: RolloutOptions) -> Result<()> {
    crate::deps::install()?;
    crate::fixtures()?;
    crate::test::cargo(&[
        "build",
        "--release",
        "--quiet",
        "-p",
        "image-prefetch-agent",
        "-p",
        "image-prefetch-controller",
        "-p",
        "image-prefetch-peer-mirror",
    ])?;
    testbed::beds::simulated::use_binaries_from(crate::root().join("target/release"));
    let work = testbed::support::workdir::Workdir::new("bench-rollout");
    let names: Vec<String> = (0..opts.nodes).map(|i| format!("bench-{i}")).collect();
    let nodes: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "amd64")).collect();
    let mut bed = testbed::beds::peer_cluster::PeerCluster::start_with_uplink(
        &work,
        &nodes,
        Some(opts.uplink_mib << 20),
    )
    .await?;
    const MIB: usize = 1 << 20;
    let layers = [48 * MIB, 12 * MIB, 4 * MIB];
    println!(
        "{} nodes, one image of {} layers ({} MiB), uplink {} MiB/s, peers over loopback",
        opts.nodes,
        layers.len(),
        layers.iter().sum::<usize>() / MIB,
        opts.uplink_mib
    );
    let mut runs = Vec::new();
    for (name, args) in [
        ("sequenced", &[][..]),
        // As before holders waited to be findable: Mirror pulls released the
        // moment a holder reports, into spegel's advertisement delay.
        ("no-grace", &["--findable-after-seconds", "0"][..]),
        ("all-default", &["--no-sequencing"][..]),
    ] {
        bed.start_controller(args, &format!("controller-{name}.log"))?;
        let image = testbed::builds::images::build_and_push(
            &work.join("images"),
            &bed.registry_host(),
            &format!("bench/{name}"),
            "1.0",
            &layers,
        )?;
        let bytes_before = bed.upstream.blob_bytes_served();
        let misses_before = bed.mirror_misses();
        let ready_in = bed
            .rollout(name, &[&image.reference], Duration::from_secs(600))
            .await
            .map_err(anyhow::Error::msg)?;
        let served = bed.upstream.blob_gets(&image.repository);
        let gets_per_blob = image
            .blobs
            .iter()
            .map(|b| served.get(b).copied().unwrap_or(0))
            .collect();
        let sets: Api<NodeImageSet> = Api::all(bed.client.clone());
        let mut seed_pull = None;
        let mut peer_pulls = Vec::new();
        for set in sets.list(&ListParams::default()).await?.items {
            for e in &set.spec.image_set {
                if e.name != image.reference {
                    continue;
                }
                let took = set
                    .report_on(&e.name)
                    .and_then(|r| r.pull_duration_millis)
                    .map(|ms| Duration::from_millis(ms as u64));
                match e.registry_policy {
                    crd::RegistryPolicy::Default if name == "sequenced" => seed_pull = took,
                    crd::RegistryPolicy::Mirror => peer_pulls.extend(took),
                    _ => {}
                }
            }
        }
        peer_pulls.sort();
        let run = RolloutRun {
            ready_in,
            gets_per_blob,
            upstream_bytes: bed.upstream.blob_bytes_served() - bytes_before,
            seed_pull,
            peer_pull: peer_pulls.get(peer_pulls.len() / 2).copied(),
        };
        println!(
            "{name:<12} all Ready in {:>6.2}s; upstream GETs per blob {:?}; upstream {:.1} MiB ({:.2}x the image); mirror misses {}",
            run.ready_in.as_secs_f64(),
            run.gets_per_blob,
            run.upstream_bytes as f64 / MIB as f64,
            run.upstream_bytes as f64 / image.size as f64,
            bed.mirror_misses() - misses_before,
        );
        runs.push(run);
    }
    if let (Some(seed), Some(peer)) = (runs[0].seed_pull, runs[0].peer_pull) {
        let floor = seed + peer;
        println!(
            "sequenced: one upstream pull {:.2}s + one peer pull (median) {:.2}s = {:.2}s; all Ready in {:.2}s = {:.2}x that",
            seed.as_secs_f64(),
            peer.as_secs_f64(),
            floor.as_secs_f64(),
            runs[0].ready_in.as_secs_f64(),
            runs[0].ready_in.as_secs_f64() / floor.as_secs_f64()
        );
    }
    Ok(())
}
