//! `cargo xtask demo`: the main job on one machine, from nothing.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, ListParams, Patch, PatchParams};

use crd::{ImagePrefetch, NodeImageSet};

const NODES: &[(&str, &str)] = &[
    ("demo-worker-1", "general"),
    ("demo-worker-2", "general"),
    ("demo-worker-3", "batch"),
];

/// The sample a cluster administrator would start from (also in docs/examples).
pub const SAMPLE: &str = include_str!("../../docs/examples/imageprefetch.yaml");

pub async fn run(keep: bool) -> Result<()> {
    crate::deps::install()?;
    crate::fixtures()?;
    // The same place as `testbed up`, so `cargo xtask testbed down` ends a kept demo.
    let dir = crate::testbed_dir();
    let lifetime = if keep {
        testbed::Lifetime::Detached
    } else {
        testbed::Lifetime::Owned
    };
    step("starting etcd and kube-apiserver on 127.0.0.1");
    let plane = testbed::ControlPlane::start(&dir, lifetime).await?;
    let client = plane.client().await?;
    done(&format!(
        "API server ready at {} in {:.1}s",
        plane.server,
        plane.startup.as_secs_f64()
    ));

    step("installing the CRDs");
    testbed::crds::install(&client).await?;
    done("ImagePrefetch and NodeImageSet established");

    step("registering 3 nodes");
    for (name, pool) in NODES {
        let labels = [("pool", *pool), ("kubernetes.io/hostname", *name)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        testbed::nodes::register(&client, name, &labels).await?;
    }
    done(
        &NODES
            .iter()
            .map(|(n, p)| format!("{n} (pool={p})"))
            .collect::<Vec<_>>()
            .join(", "),
    );

    step("starting the controller");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(controller::run(
        client.clone(),
        controller::Config::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    done("running in this process");

    step("applying docs/examples/imageprefetch.yaml");
    let sample: ImagePrefetch =
        serde_yaml::from_str(SAMPLE).context("docs/examples/imageprefetch.yaml")?;
    let ns = sample
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = sample
        .metadata
        .name
        .clone()
        .context("the sample has a name")?;
    let prefetches: Api<ImagePrefetch> = Api::namespaced(client.clone(), &ns);
    prefetches
        .patch(
            &name,
            &PatchParams::apply("xtask-demo").force(),
            &Patch::Apply(&sample),
        )
        .await?;
    let started = Instant::now();
    let want = NODES.iter().filter(|(_, pool)| *pool == "general").count();
    let sets: Api<NodeImageSet> = Api::all(client.clone());
    loop {
        let have = sets.list(&ListParams::default()).await?.items.len();
        let status = prefetches.get(&name).await?.status;
        if have == want && status.is_some_and(|s| s.desired_nodes as usize == want) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the controller did not create {want} NodeImageSets within 60s (have {have})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    done(&format!(
        "{want} NodeImageSets written in {:.2}s (one per node with pool=general)",
        started.elapsed().as_secs_f64()
    ));

    println!();
    print_table(&plane.kubeconfig)?;
    println!(
        "\nREADY stays 0/{want} here: no agent pulls on these simulated nodes yet, so no image is reported present."
    );

    if keep {
        println!(
            "\nThe control plane keeps running. In another terminal:\n  export KUBECONFIG={}\n  kubectl get imageprefetch,nodeimageset -A\n\
             Ctrl-C here stops the controller; `cargo xtask testbed down` then stops the control plane.",
            plane.kubeconfig.display(),
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    let _ = stop_tx.send(());
    let _ = controller.await;
    if !keep {
        plane.stop();
        println!("\nEverything is stopped; nothing is left running.");
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn done(what: &str) {
    eprintln!("    {what}");
}

/// `kubectl get imageprefetch,nodeimageset -A` when kubectl is installed.
fn print_table(kubeconfig: &std::path::Path) -> Result<()> {
    let status = std::process::Command::new("kubectl")
        .args(["get", "imageprefetch,nodeimageset", "-A"])
        .env("KUBECONFIG", kubeconfig)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => bail!("kubectl get failed ({s})"),
        Err(_) => {
            println!(
                "(kubectl is not installed; `KUBECONFIG={} kubectl get imageprefetch,nodeimageset -A` shows the table)",
                kubeconfig.display()
            );
            Ok(())
        }
    }
}
