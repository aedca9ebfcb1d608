//! What one tenant's attack costs another: a polite tenant's rollout, timed
//! alone, then again while each attack runs in another namespace on the same
//! nodes and the same cluster-wide controller. Each attack is contained (a
//! condition and an Event on the attacker's object, or nothing of it
//! written) and the polite rollout becomes Ready regardless. How much later
//! it became Ready is printed, not asserted: it is a measurement, and the
//! numbers in docs/security.md come from it.
//!
//! The controller here sees every namespace, so this binary has an API
//! server of its own.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use controller::registries::AllowList;
use crd::{ImagePrefetch, PullState, RegistryPolicy};
use support::*;

const GROUP: &str = "shared";
const NODES: usize = 3;
const BUDGET: usize = 64;
const FORGED: &str = "sha256:6666666666666666666666666666666666666666666666666666666666666666";

fn spec(images: &[String]) -> Value {
    json!({"images": images, "nodeSelector": {"test-group": GROUP}})
}

/// The polite tenant's rollout of a fresh ImagePrefetch of `image`, with
/// agents that finish at once: how long from creation to Ready on every node.
async fn polite(client: &Client, name: &str, image: &str) -> Duration {
    let started = Instant::now();
    let uid = created(client, "polite", &prefetch(name, spec(&[image.into()]))).await;
    roll_out(client, "polite", name, &uid, NODES).await;
    started.elapsed()
}

async fn uid_of(client: &Client, ns: &str, name: &str) -> String {
    Api::<ImagePrefetch>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap()
        .uid()
        .unwrap()
}

/// The Degraded condition's reason, once the ImagePrefetch has one.
async fn degraded(client: &Client, ns: &str, name: &str) -> String {
    poll(&format!("{ns}/{name} Degraded"), || async {
        let p = Api::<ImagePrefetch>::namespaced(client.clone(), ns)
            .get(name)
            .await
            .ok()?;
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True")
            .map(|c| c.reason)
    })
    .await
}

#[tokio::test]
async fn another_tenants_rollout_is_ready_whatever_one_tenant_does() {
    let client = client().await;
    nodes(&client, GROUP, NODES, &[]).await;
    for ns in ["polite", "flood", "registry", "churn", "liar"] {
        namespace(&client, ns).await;
    }
    let _controller = Running::start(
        &client,
        controller::Config {
            namespace: None,
            allowed: AllowList::parse("registry.example.com"),
            namespace_budget: Some(BUDGET),
            ..config("unused")
        },
    );
    let mut measured = vec![(
        "none (alone)",
        polite(&client, "alone", "registry.example.com/polite/web:1").await,
    )];

    // Flood: 64 images on every node, three times the namespace's budget.
    let many: Vec<String> = (0..64)
        .map(|i| format!("registry.example.com/flood/{i}:1"))
        .collect();
    created(&client, "flood", &prefetch("flood", spec(&many))).await;
    let during = polite(&client, "during-flood", "registry.example.com/polite/web:2").await;
    assert_eq!(degraded(&client, "flood", "flood").await, "BudgetExceeded");
    let flood_uid = uid_of(&client, "flood", "flood").await;
    assert!(
        sets(&client, &flood_uid).await.is_empty(),
        "nothing of the flood is written"
    );
    assert!(
        warnings(&client, "flood", "flood")
            .await
            .iter()
            .any(|(r, _)| r == "BudgetExceeded")
    );
    measured.push(("flood past the namespace budget", during));

    // Images from a registry the administrator did not approve.
    created(
        &client,
        "registry",
        &prefetch("outside", spec(&["elsewhere.example/app:1".into()])),
    )
    .await;
    let during = polite(
        &client,
        "during-registry",
        "registry.example.com/polite/web:3",
    )
    .await;
    assert_eq!(
        degraded(&client, "registry", "outside").await,
        "RegistryNotAllowed"
    );
    measured.push(("unapproved registry", during));

    // Churn: ImagePrefetches created and deleted as fast as the API allows,
    // for as long as the polite rollout runs.
    let made = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (client, made) = (client.clone(), made.clone());
        tokio::spawn(async move {
            let api = Api::<ImagePrefetch>::namespaced(client.clone(), "churn");
            loop {
                let made = made.fetch_add(1, Ordering::Relaxed);
                let name = format!("churn-{made}");
                let image = format!("registry.example.com/churn/{made}:1");
                created(&client, "churn", &prefetch(&name, spec(&[image]))).await;
                api.delete(&name, &DeleteParams::default()).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let during = polite(&client, "during-churn", "registry.example.com/polite/web:4").await;
    churn.abort();
    let made = made.load(Ordering::Relaxed);
    assert!(made > 1, "the churn ran alongside the rollout");
    println!("churn: {made} ImagePrefetches created and deleted during the polite rollout");
    measured.push(("create/delete churn", during));

    // A lying node: the attacker's ImagePrefetch of the tag the polite tenant
    // will ask for, and one node reporting a forged digest for it.
    let tag = "registry.example.com/polite/shared:1";
    let liar_uid = created(&client, "liar", &prefetch("same-tag", spec(&[tag.into()]))).await;
    poll("the attacker's seeds written", || async {
        let s = sets(&client, &liar_uid).await;
        (!s.is_empty()).then_some(())
    })
    .await;
    let liar = sets(&client, &liar_uid).await.remove(0).name_any();
    report_digest(&client, &liar, tag, PullState::Available, FORGED).await;
    let during = polite(&client, "during-liar", tag).await;
    let polite_uid = uid_of(&client, "polite", "during-liar").await;
    let pinned: Vec<crd::SharedStr> = entries(&client, &polite_uid)
        .await
        .into_values()
        .flatten()
        .filter(|e| e.registry_policy == RegistryPolicy::Mirror)
        .filter_map(|e| e.digest)
        .collect();
    assert!(
        pinned.iter().all(|d| d != FORGED),
        "the polite tenant's mirrors were pinned to the forged digest: {pinned:?}"
    );
    measured.push(("forged digest, same tag", during));

    let alone = measured[0].1;
    println!("attack -> polite rollout Ready in (later than alone)");
    for (attack, took) in &measured {
        println!(
            "{attack:<32} {:>6.2}s ({:+.2}s)",
            took.as_secs_f64(),
            took.as_secs_f64() - alone.as_secs_f64()
        );
    }
}
