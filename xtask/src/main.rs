//! Developer tasks: `cargo xtask <command>`. Run `cargo xtask help`.

mod bench;
mod demo;
mod deps;
#[cfg(feature = "swarm")]
mod swarm;
// The swarm's data-plane model is pure: its tests run in every test build.
#[cfg(all(test, not(feature = "swarm")))]
#[allow(dead_code)]
#[path = "swarm/dataplane.rs"]
mod dataplane;
pub mod test;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const HELP: &str = "\
cargo xtask <command>

  deps                  install the Debian packages the build and tests need
  fixtures              build the Go test fixtures (kube-apiserver, containerd, helm, bundle validators, jaeger,
                        kubelet, kube-scheduler, kube-controller-manager, kube-proxy) into the cache
  fixtures --cluster    build the kubelet cluster test bed's (kubelet, kube-scheduler, kube-controller-manager, kube-proxy)
  crdgen [--check]      write the CRD YAML into helm/ and bundle/ and docs/reference.md (or fail if stale)
  cluster up [--nodes N] the kubelet cluster test bed (docs/testbed.md) with the CRDs installed,
                        printing its KUBECONFIG; runs until Ctrl-C, which takes it down
  testbed up|down|status
                        a local etcd + kube-apiserver; `up` prints the KUBECONFIG
  demo [--keep] [--screenshot FILE]
                        the main job, locally: control plane, CRDs, controller,
                        three nodes, a sample ImagePrefetch, the resulting table
                        and the rollout's trace in Jaeger (FILE: a PNG of it)
  bench controller [--nodes N] [--prefetches M] [--relist 1]
                        the release controller and N Node objects (default 1000)
                        whose agents answer at once: a rollout, a fan-out to
                        holders, then M ImagePrefetches (default 50) and the
                        memory with every report; --relist 1: then through a
                        forced re-list
  bench agent           the release agent's pull vs `ctr images pull`, and its memory
  bench agent-memory [--entries N]
                        the release agent's memory with N entries (default 100000,
                        the cluster budget) of longest names on its one node
  bench swarm [--nodes N] [--images I] [--prefetches P] [--image-mib S]
              [--uplink-mib U] [--nic-mib B] [--wave-cap C] [--named-sources 0|1]
                        the release controller, N nodes (default 1000) and N simulated
                        agents (their own watches, the agent's ledger and status code,
                        pulls timed by a model of spegel's data plane): P ImagePrefetches
                        (1) of I images (1) of S MiB (256), uplink U MiB/s (100), NIC B
                        MiB/s (125); time to all Ready against the ideal, API requests,
                        CPU and memory; C: the controller's --wave-cap (32: the rule before);
                        --named-sources 0: the controller's --no-named-sources.
                        Needs protoc: cargo run --release -p xtask --features swarm -- bench swarm
  bench rollout [--nodes N] [--uplink-mib M]
                        N nodes (default 5) with peer mirrors, registry behind an
                        M MiB/s uplink (default 32): sequenced vs all-Default rollout
  test                  everything above that tests need, then every test
  lint                  formatting, stale generated files, clippy (CI runs it before `test`)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["deps"] => deps::install(),
        ["fixtures"] => fixtures(),
        ["fixtures", "--cluster"] => build_fixtures(testbed::builds::fixtures::CLUSTER),
        ["crdgen"] => crdgen(false),
        ["crdgen", "--check"] => crdgen(true),
        ["testbed", "up"] => runtime()?.block_on(testbed_up()),
        ["testbed", "down"] => testbed_down(),
        ["testbed", "status"] => testbed_status(),
        ["cluster", "up", rest @ ..] => runtime()?.block_on(cluster_up(rest)),
        ["demo", rest @ ..] => runtime()?.block_on(demo::run(demo_options(rest)?)),
        ["bench", "agent"] => runtime()?.block_on(bench::agent(&[128, 64, 32, 8])),
        ["bench", "agent-memory", rest @ ..] => {
            runtime()?.block_on(bench::agent_memory(entries_option(rest)?))
        }
        #[cfg(feature = "swarm")]
        ["bench", "swarm", rest @ ..] => runtime()?.block_on(swarm::run(swarm_options(rest)?)),
        #[cfg(not(feature = "swarm"))]
        ["bench", "swarm", ..] => bail!(
            "bench swarm links the agent crate, which needs protoc: run `cargo xtask deps`, then `cargo run --release -p xtask --features swarm -- bench swarm ...`"
        ),
        ["bench", "rollout", rest @ ..] => {
            runtime()?.block_on(bench::rollout(rollout_options(rest)?))
        }
        ["bench", "controller", rest @ ..] => {
            runtime()?.block_on(bench::controller(bench_options(rest)?))
        }
        ["test"] => test::all(),
        ["lint"] => test::lint(),
        [] | ["help"] | ["--help"] | ["-h"] => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{HELP}"),
    }
}

fn demo_options(args: &[&str]) -> Result<demo::Options> {
    let mut opts = demo::Options {
        keep: false,
        screenshot: None,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match *arg {
            "--keep" => opts.keep = true,
            "--screenshot" => {
                let path = args.next().context("--screenshot needs a file name")?;
                opts.screenshot = Some(std::path::absolute(path)?);
            }
            other => bail!("unknown demo option {other}\n\n{HELP}"),
        }
    }
    Ok(opts)
}

/// `--flag N` pairs.
fn numeric_flags<'a>(args: &[&'a str]) -> Result<Vec<(&'a str, u64)>> {
    args.chunks(2)
        .map(|pair| match pair {
            [flag, value] => Ok((
                *flag,
                value
                    .parse()
                    .with_context(|| format!("{flag} needs a number"))?,
            )),
            [flag] => bail!("{flag} needs a number"),
            _ => unreachable!("chunks of two"),
        })
        .collect()
}

fn bench_options(args: &[&str]) -> Result<bench::Options> {
    let mut opts = bench::Options {
        nodes: 1000,
        prefetches: 50,
        relist: false,
    };
    for (flag, value) in numeric_flags(args)? {
        match flag {
            "--nodes" => opts.nodes = value as usize,
            "--prefetches" => opts.prefetches = value as usize,
            "--relist" => opts.relist = value != 0,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(opts)
}

#[cfg(feature = "swarm")]
fn swarm_options(args: &[&str]) -> Result<swarm::Options> {
    let mut opts = swarm::Options {
        nodes: 1000,
        images: 1,
        prefetches: 1,
        image_mib: 256,
        uplink_mib: 100,
        nic_mib: 125,
        wave_cap: 0,
        named_sources: true,
    };
    for (flag, value) in numeric_flags(args)? {
        match (flag, value) {
            ("--wave-cap", v) => opts.wave_cap = v,
            ("--named-sources", v) => opts.named_sources = v != 0,
            (_, 0) => bail!("{flag}: at least 1"),
            ("--nodes", v) => opts.nodes = v as usize,
            ("--images", v) if v <= 64 => opts.images = v as usize,
            ("--prefetches", v) => opts.prefetches = v as usize,
            ("--image-mib", v) => opts.image_mib = v,
            ("--uplink-mib", v) => opts.uplink_mib = v,
            ("--nic-mib", v) => opts.nic_mib = v,
            (other, _) => bail!("unknown option or value {other}\n\n{HELP}"),
        }
    }
    Ok(opts)
}

fn entries_option(args: &[&str]) -> Result<usize> {
    let mut entries = controller::config::DEFAULT_CLUSTER_BUDGET;
    for (flag, value) in numeric_flags(args)? {
        match flag {
            "--entries" if value >= 1 => entries = value as usize,
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    Ok(entries)
}

fn rollout_options(args: &[&str]) -> Result<bench::RolloutOptions> {
    let mut opts = bench::RolloutOptions {
        nodes: 5,
        uplink_mib: 32,
    };
    for (flag, value) in numeric_flags(args)? {
        match flag {
            "--nodes" if value >= 2 => opts.nodes = value as usize,
            "--nodes" => bail!("--nodes: at least 2 (a seed and a peer)"),
            "--uplink-mib" if value >= 1 => opts.uplink_mib = value,
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    Ok(opts)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where `testbed up` keeps its control plane (git-ignored).
pub fn testbed_dir() -> PathBuf {
    root().join(".testbed").join("cluster")
}

pub fn fixtures() -> Result<()> {
    build_fixtures(testbed::builds::fixtures::ALL)
}

pub fn build_fixtures(list: &[&testbed::builds::fixtures::GoFixture]) -> Result<()> {
    let started = std::time::Instant::now();
    for fixture in list {
        fixture.build(&mut |line| eprintln!("fixtures: {line}"))?;
    }
    eprintln!("fixtures: ready in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn crdgen(check: bool) -> Result<()> {
    let root = root();
    let mut stale = Vec::new();
    for (path, content) in crd::generate::files() {
        let path = root.join(path);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == content {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, &content).with_context(|| path.display().to_string())?;
            eprintln!("crdgen: wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "stale generated files (run `cargo xtask crdgen` and commit): {}",
            stale.join(", ")
        );
    }
    Ok(())
}

async fn testbed_up() -> Result<()> {
    deps::install()?;
    fixtures()?;
    let dir = testbed_dir();
    if testbed::servers::control_plane::detached_running(&dir) {
        eprintln!("testbed: already running; `cargo xtask testbed down` stops it");
    } else {
        let plane = testbed::ControlPlane::start(&dir, testbed::Lifetime::Detached).await?;
        testbed::support::crds::install(&plane.client().await?).await?;
        eprintln!(
            "testbed: kube-apiserver ready at {} in {:.1}s (logs in {})",
            plane.server,
            plane.startup.as_secs_f64(),
            plane.dir.display()
        );
    }
    println!("export KUBECONFIG={}", dir.join("kubeconfig").display());
    Ok(())
}

/// The kubelet cluster bed, in the foreground: its processes and network
/// namespaces belong to this process, so Ctrl-C is `down`.
async fn cluster_up(args: &[&str]) -> Result<()> {
    let nodes = match args {
        [] => 1,
        ["--nodes", n] => n.parse()?,
        other => anyhow::bail!("cluster up: unknown arguments {other:?}"),
    };
    deps::install()?;
    fixtures()?;
    let dir = root().join(".testbed").join("kubelet-cluster");
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = testbed::beds::cluster::Cluster::start(&dir, nodes).await?;
    testbed::support::crds::install(&cluster.plane.client().await?).await?;
    eprintln!(
        "cluster: {nodes} kubelet node(s) Ready; registry at {} (logs in {})",
        cluster.registry.host,
        dir.display()
    );
    println!("export KUBECONFIG={}", cluster.plane.kubeconfig.display());
    eprintln!("cluster: Ctrl-C takes it down");
    tokio::signal::ctrl_c().await?;
    drop(cluster);
    eprintln!("cluster: down");
    Ok(())
}

fn testbed_down() -> Result<()> {
    let dir = testbed_dir();
    if testbed::servers::control_plane::stop_detached(&dir)? {
        eprintln!("testbed: stopped");
    } else {
        eprintln!("testbed: was not running");
    }
    Ok(())
}

fn testbed_status() -> Result<()> {
    let dir = testbed_dir();
    if testbed::servers::control_plane::detached_running(&dir) {
        println!("running; KUBECONFIG={}", dir.join("kubeconfig").display());
    } else {
        println!("not running");
    }
    Ok(())
}
