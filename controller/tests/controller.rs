//! The controller against a real kube-apiserver; agents are simulated by
//! test code that writes NodeImageSet status, as a real agent would.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use controller::leader::LeaseConfig;
use controller::registries::AllowList;
use crd::{ImagePrefetch, NodeImageSet, PullState, RegistryPolicy, keys};
use support::*;

fn with_policy(
    entries: &BTreeMap<String, Vec<crd::NodeImage>>,
    image: &str,
    policy: RegistryPolicy,
) -> Vec<String> {
    entries
        .iter()
        .filter(|(_, es)| {
            es.iter()
                .any(|e| e.name == image && e.registry_policy == policy)
        })
        .map(|(n, _)| n.clone())
        .collect()
}

async fn status(client: &Client, ns: &str, name: &str) -> Option<crd::ImagePrefetchStatus> {
    Api::<ImagePrefetch>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?
        .status
}

#[tokio::test]
async fn follows_selector_and_cleans_up() {
    let client = client().await;
    let ns = namespace(&client, "fanout").await;
    let _controller = Running::in_namespace(&client, &ns);
    node(&client, "fan-a", "fanout", &[("tier", "gpu")]).await;
    node(&client, "fan-b", "fanout", &[("tier", "gpu")]).await;
    node(&client, "fan-c", "fanout", &[("tier", "cpu")]).await;

    let obj = prefetch(
        "web",
        json!({"images": ["registry.example.com/fanout/web:1", "registry.example.com/fanout/sidecar:2"],
               "nodeSelector": {"test-group": "fanout", "tier": "gpu"},
               "imagePullSecrets": [{"name": "regcred"}]}),
    );
    let uid = created(&client, &ns, &obj).await;
    // Both nodes selected; only the seed has a set until it reports.
    let st = poll("status", || async {
        status(&client, &ns, "web")
            .await
            .filter(|s| s.desired_nodes == 2)
    })
    .await;
    assert_eq!(st.ready, "0/2");
    let sets = released_to(&client, &uid, &["fan-a", "fan-b"]).await;
    for set in &sets {
        assert_eq!(set.spec.image_pull_secrets[0].namespace, ns);
        assert_eq!(set.labels().get(keys::NODE), Some(&set.spec.node_name));
        let managers: Vec<_> = set
            .managed_fields()
            .iter()
            .filter_map(|m| m.manager.clone())
            .collect();
        assert!(
            managers.contains(&keys::CONTROLLER_MANAGER.to_string()),
            "server-side apply: {managers:?}"
        );
    }
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), &ns);
    assert!(
        api.get("web")
            .await
            .unwrap()
            .finalizers()
            .contains(&keys::FINALIZER.to_string())
    );

    // Selector and image edits converge.
    let edit = prefetch(
        "web",
        json!({"images": ["registry.example.com/fanout/web:1"],
        "nodeSelector": {"test-group": "fanout", "tier": "cpu"}}),
    );
    apply(&client, &ns, &edit).await.unwrap();
    wait_for_nodes(&client, &uid, &["fan-c"]).await;
    poll("status follows the edit", || async {
        status(&client, &ns, "web")
            .await
            .filter(|s| s.image_count == 1 && s.desired_nodes == 1)
    })
    .await;

    // A node that starts matching gets a set; a deleted one loses it.
    node(&client, "fan-d", "fanout", &[("tier", "cpu")]).await;
    released_to(&client, &uid, &["fan-c", "fan-d"]).await;
    Api::<Node>::all(client.clone())
        .delete("fan-c", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_nodes(&client, &uid, &["fan-d"]).await;

    // Deletion: the finalizer removes every NodeImageSet, then the object goes.
    api.delete("web", &DeleteParams::default()).await.unwrap();
    wait_for_nodes(&client, &uid, &[]).await;
    poll("ImagePrefetch gone", || async {
        matches!(api.get_opt("web").await, Ok(None)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn one_seed_then_mirrors_pinned_to_its_digest() {
    let sc = Scenario::new("seq", 4).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    let nodes = sc.nodes.clone();
    let image = "registry.example.com/seq/app:1";
    let uid = sc.prefetch("app", &[image], json!({})).await;

    // Watch every version of every NodeImageSet: none may list a Mirror entry
    // before the seed has reported the image Available.
    let reported = Arc::new(AtomicBool::new(false));
    let violation = Arc::new(AtomicBool::new(false));
    let watch = {
        let (reported, violation) = (reported.clone(), violation.clone());
        let api: Api<NodeImageSet> = Api::all(client.clone());
        let wc = watcher::Config::default().labels(&keys::owned_by(&uid));
        tokio::spawn(async move {
            let mut events = watcher(api, wc).applied_objects().boxed();
            while let Some(Ok(set)) = events.next().await {
                let mirror = set
                    .spec
                    .image_set
                    .iter()
                    .any(|e| e.registry_policy == RegistryPolicy::Mirror);
                if mirror && !reported.load(Ordering::SeqCst) {
                    violation.store(true, Ordering::SeqCst);
                }
            }
        })
    };

    let seed = poll("one seed", || async {
        let e = entries(&client, &uid).await;
        Some(with_policy(&e, image, RegistryPolicy::Default)).filter(|s| s.len() == 1)
    })
    .await;
    let e = entries(&client, &uid).await;
    assert!(with_policy(&e, image, RegistryPolicy::Mirror).is_empty());
    assert_eq!(
        e.keys().collect::<Vec<_>>(),
        [&seed[0]],
        "the other nodes wait without a set"
    );
    let st = poll("status", || async {
        status(&client, &ns, "app")
            .await
            .filter(|s| s.images.first().is_some_and(|i| i.waiting == 4))
    })
    .await;
    assert_eq!(st.ready, "0/4");

    reported.store(true, Ordering::SeqCst);
    report(
        &client,
        &set_on(&client, &uid, &seed[0]).await,
        image,
        PullState::Available,
    )
    .await;
    // No Mirror pull on the seed's word alone: a second node resolves the
    // tag at the registry; the two agree.
    let confirmer = poll("a second resolution", || async {
        let e = entries(&client, &uid).await;
        let d = with_policy(&e, image, RegistryPolicy::Default);
        (d.len() == 2).then(|| d.into_iter().find(|n| *n != seed[0]).unwrap())
    })
    .await;
    assert!(with_policy(&entries(&client, &uid).await, image, RegistryPolicy::Mirror).is_empty());
    report_on(&client, &uid, &confirmer, image, PullState::Available).await;
    // The wave's two sets are written side by side: a list between the two
    // writes sees one.
    let mirrors = poll("first mirror wave", || async {
        let e = entries(&client, &uid).await;
        Some(with_policy(&e, image, RegistryPolicy::Mirror)).filter(|m| m.len() >= 2)
    })
    .await;
    assert_eq!(mirrors.len(), 2, "two sources, two mirror pulls in flight");
    let e = entries(&client, &uid).await;
    let pinned = e[&mirrors[0]]
        .iter()
        .find(|x| x.name == image)
        .unwrap()
        .digest
        .clone();
    assert_eq!(
        pinned.as_deref(),
        Some(DIGEST),
        "mirror pulls the digest the two resolved"
    );
    let mut defaults = with_policy(&e, image, RegistryPolicy::Default);
    defaults.sort();
    let mut expected = vec![seed[0].clone(), confirmer];
    expected.sort();
    assert_eq!(defaults, expected, "the seed and the confirming node only");

    // The rest follows; everything becomes Ready.
    for _ in 0..5 {
        finish_all(&client, &uid).await;
        if status(&client, &ns, "app")
            .await
            .is_some_and(|s| s.ready == "4/4")
        {
            break;
        }
        poll("progress", || async {
            let s = status(&client, &ns, "app").await?;
            let avail = s.images.first()?.available;
            let reported = sets(&client, &uid)
                .await
                .iter()
                .flat_map(|s| s.status.iter().flat_map(|st| st.images.iter()))
                .filter(|r| r.state == PullState::Available)
                .count() as i32;
            (avail == reported).then_some(())
        })
        .await;
    }
    poll("Ready 4/4", || async {
        status(&client, &ns, "app")
            .await
            .filter(|s| s.ready == "4/4")
    })
    .await;
    assert_eq!(nodes.len(), 4);
    watch.abort();
    assert!(
        !violation.load(Ordering::SeqCst),
        "a Mirror entry was handed out before the image was Available"
    );
    let events = events_for(&client, &ns, "app").await;
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "SeedChosen" && n.contains(&seed[0])),
        "{events:?}"
    );
    assert!(events.iter().any(|(r, _)| r == "ImageReady"), "{events:?}");
}

async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    poll("events", || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let ev: Vec<(String, String)> = list
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect();
        (!ev.is_empty()).then_some(ev)
    })
    .await
}

#[tokio::test]
async fn a_failed_or_deleted_seed_is_replaced() {
    let sc = Scenario::new("failover", 4).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    let image = "registry.example.com/failover/app:1";
    let uid = sc.prefetch("app", &[image], json!({})).await;
    let seed_other_than = |old: Option<String>| {
        let client = client.clone();
        let uid = uid.clone();
        async move {
            poll(&format!("a seed other than {old:?}"), || async {
                let s = with_policy(
                    &entries(&client, &uid).await,
                    image,
                    RegistryPolicy::Default,
                );
                (s.len() == 1 && Some(&s[0]) != old.as_ref()).then(|| s[0].clone())
            })
            .await
        }
    };
    let first = seed_other_than(None).await;

    // Past its retry limit: another node seeds, the failed one waits.
    report_on(&client, &uid, &first, image, PullState::Failed).await;
    let second = seed_other_than(Some(first.clone())).await;
    let e = entries(&client, &uid).await;
    assert!(e[&first].is_empty(), "the failed seed lost its entry");
    // The Event is written after the reconcile's sets: looked for until it is there.
    poll("a PullFailed Event naming the failed seed", || async {
        events_for(&client, &ns, "app")
            .await
            .iter()
            .any(|(r, n)| r == "PullFailed" && n.contains(&first))
            .then_some(())
    })
    .await;

    // Its node deleted: another node seeds.
    Api::<Node>::all(client.clone())
        .delete(&second, &DeleteParams::default())
        .await
        .unwrap();
    let third = seed_other_than(Some(second.clone())).await;
    assert_ne!(third, first);

    // Its node NotReady: another node seeds.
    testbed::support::nodes::set_ready(&client, &third, false)
        .await
        .unwrap();
    let fourth = seed_other_than(Some(third.clone())).await;
    assert!(![&first, &second, &third].contains(&&fourth));
}

#[tokio::test]
async fn a_new_prefetch_of_an_image_on_a_node_asks_the_registry_there_and_seeds_no_other() {
    let client = client().await;
    let ns = namespace(&client, "present").await;
    let _controller = Running::in_namespace(&client, &ns);
    nodes(&client, "present", 3, &[]).await;
    let image = "registry.example.com/present/app:1";
    let first = created(
        &client,
        &ns,
        &prefetch(
            "first",
            json!({"images": [image], "nodeSelector": {"test-group": "present"}, "replicas": 1}),
        ),
    )
    .await;
    let holder = poll("seed", || async {
        with_policy(
            &entries(&client, &first).await,
            image,
            RegistryPolicy::Default,
        )
        .pop()
    })
    .await;
    report(
        &client,
        &set_on(&client, &first, &holder).await,
        image,
        PullState::Available,
    )
    .await;
    poll("first Ready", || async {
        status(&client, &ns, "first")
            .await
            .filter(|s| s.ready == "1/1")
    })
    .await;

    let second = created(
        &client,
        &ns,
        &prefetch(
            "second",
            json!({"images": [image], "nodeSelector": {"test-group": "present"}}),
        ),
    )
    .await;
    // A new ImagePrefetch asks the registry again — first on the node that
    // holds the image (no bytes move) — and takes no other node as seed.
    let e = poll("second's entries", || async {
        let e = entries(&client, &second).await;
        (with_policy(&e, image, RegistryPolicy::Default).len() == 2).then_some(e)
    })
    .await;
    assert_eq!(e.len(), 2, "the third node waits without a set: {e:?}");
    let asking = with_policy(&e, image, RegistryPolicy::Default);
    assert!(asking.contains(&holder), "{e:?}");
    for node in &asking {
        report(
            &client,
            &set_on(&client, &second, node).await,
            image,
            PullState::Available,
        )
        .await;
    }
    poll("the last node through the mirror", || async {
        let e = entries(&client, &second).await;
        (with_policy(&e, image, RegistryPolicy::Mirror).len() == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_are_stable_across_restarts_and_follow_node_changes() {
    let client = client().await;
    let ns = namespace(&client, "replicas").await;
    let names = nodes(&client, "replicas", 6, &[]).await;
    let controller = Running::in_namespace(&client, &ns);
    let image = "registry.example.com/replicas/app:1";
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "app",
            json!({"images": [image], "nodeSelector": {"test-group": "replicas"}, "replicas": 3}),
        ),
    )
    .await;
    let chosen: BTreeSet<String> = poll("3 nodes", || async {
        finish_all(&client, &uid).await;
        let e = entries(&client, &uid).await;
        (e.len() == 3).then(|| e.keys().cloned().collect())
    })
    .await;
    let before: BTreeMap<String, String> = sets(&client, &uid)
        .await
        .into_iter()
        .map(|s| (s.name_any(), s.resource_version().unwrap()))
        .collect();
    controller.stop().await;

    // A new controller (fresh caches, fresh seed book) keeps the same nodes and rewrites nothing.
    let controller = Running::in_namespace(&client, &ns);
    poll("reconciled after restart", || async {
        let s = status(&client, &ns, "app").await?;
        (s.desired_nodes == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // give a wrong write the chance to land
    let after: BTreeMap<String, String> = sets(&client, &uid)
        .await
        .into_iter()
        .map(|s| (s.name_any(), s.resource_version().unwrap()))
        .collect();
    assert_eq!(before, after, "a restart moves and rewrites nothing");

    // A removed node is replaced, the others stay; a cordoned node is never chosen.
    let unchosen: Vec<&String> = names.iter().filter(|n| !chosen.contains(*n)).collect();
    testbed::support::nodes::cordon(&client, unchosen[0])
        .await
        .unwrap();
    let gone = chosen.iter().next().unwrap().clone();
    Api::<Node>::all(client.clone())
        .delete(&gone, &DeleteParams::default())
        .await
        .unwrap();
    let now: BTreeSet<String> = poll("replacement", || async {
        finish_all(&client, &uid).await;
        let e = entries(&client, &uid).await;
        let keys: BTreeSet<String> = e.keys().cloned().collect();
        (keys.len() == 3 && !keys.contains(&gone)).then_some(keys)
    })
    .await;
    assert!(
        chosen
            .iter()
            .filter(|n| **n != gone)
            .all(|n| now.contains(n)),
        "{chosen:?} → {now:?}"
    );
    assert!(!now.contains(unchosen[0]), "cordoned node chosen");
    controller.stop().await;
}

#[tokio::test]
async fn two_controllers_one_leader() {
    let client = client().await;
    let ns = namespace(&client, "leader").await;
    nodes(&client, "leader", 2, &[]).await;
    let lease = |id: &str| controller::Config {
        leader: Some(LeaseConfig {
            renew_every: Duration::from_millis(500),
            ..LeaseConfig::new(&ns, id)
        }),
        ..config(&ns)
    };
    let a = Running::start(&client, lease("replica-a"));
    let b = Running::start(&client, lease("replica-b"));
    let uid = created(&client, &ns, &prefetch("app", json!({"images": ["registry.example.com/leader/app:1"], "nodeSelector": {"test-group": "leader"}}))).await;
    released_to(&client, &uid, &["leader-0", "leader-1"]).await;
    poll("Ready", || async {
        finish_all(&client, &uid).await;
        status(&client, &ns, "app")
            .await
            .filter(|s| s.ready == "2/2")
    })
    .await;
    let holder = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("image-prefetch-controller")
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity
        .unwrap();
    let (wa, wb) = (
        a.stop().await.metrics.writes.get(),
        b.stop().await.metrics.writes.get(),
    );
    let (leader, standby) = if holder == "replica-a" {
        (wa, wb)
    } else {
        (wb, wa)
    };
    assert!(leader > 0, "the leader wrote");
    assert_eq!(standby, 0, "the standby never wrote");
}

#[tokio::test]
async fn waves_double_as_nodes_finish() {
    let sc = Scenario::new("waves", 16).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    let image = "registry.example.com/waves/app:1";
    let uid = sc.prefetch("app", &[image], json!({})).await;
    let listed = |client: Client, uid: String| async move {
        entries(&client, &uid)
            .await
            .values()
            .filter(|e| !e.is_empty())
            .count()
    };
    poll("seed", || async {
        (listed(client.clone(), uid.clone()).await == 1).then_some(())
    })
    .await;
    let mut waves = Vec::new();
    let mut total_reported = 0;
    loop {
        let before = listed(client.clone(), uid.clone()).await;
        total_reported += finish_all(&client, &uid).await;
        // Settled: the status counts every report, so the reconcile that
        // counted the last one has already released what it releases.
        poll("status caught up", || async {
            let s = status(&client, &ns, "app").await?;
            (s.images.first()?.available as usize == total_reported).then_some(())
        })
        .await;
        let after = listed(client.clone(), uid.clone()).await;
        if after == before {
            break;
        }
        waves.push(after - before);
    }
    assert_eq!(waves, [1, 2, 4, 8]);
    poll("Ready", || async {
        status(&client, &ns, "app")
            .await
            .filter(|s| s.ready == "16/16")
    })
    .await;
}

#[tokio::test]
async fn refused_registries_are_reported() {
    let client = client().await;
    let ns = namespace(&client, "allow").await;
    let _controller = Running::start(
        &client,
        controller::Config {
            allowed: AllowList::parse("registry.example.com/allowed"),
            ..config(&ns)
        },
    );
    nodes(&client, "allow", 1, &[]).await;
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "app",
            json!({
        "images": ["registry.example.com/allowed/app:1", "elsewhere.example/app:1"],
        "nodeSelector": {"test-group": "allow"}}),
        ),
    )
    .await;
    let st = poll("Degraded", || async {
        status(&client, &ns, "app").await.filter(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True")
        })
    })
    .await;
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(degraded.reason, "RegistryNotAllowed");
    assert!(degraded.message.contains("elsewhere.example/app:1"));
    let e = entries(&client, &uid).await;
    let names: Vec<&str> = e.values().flatten().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["registry.example.com/allowed/app:1"]);
}

#[tokio::test]
async fn no_matching_nodes_is_a_condition_and_table_shows_ready() {
    let client = client().await;
    let ns = namespace(&client, "table").await;
    let _controller = Running::in_namespace(&client, &ns);
    nodes(&client, "table", 2, &[]).await;
    apply(&client, &ns, &prefetch("none", json!({"images": ["registry.example.com/table/a:1"], "nodeSelector": {"test-group": "nobody"}}))).await.unwrap();
    let st = poll("NoMatchingNodes", || async {
        status(&client, &ns, "none")
            .await
            .filter(|s| !s.conditions.is_empty())
    })
    .await;
    let degraded = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "NoMatchingNodes")
    );

    let uid = created(&client, &ns, &prefetch("some", json!({"images": ["registry.example.com/table/a:1"], "nodeSelector": {"test-group": "table"}}))).await;
    released_to(&client, &uid, &["table-0", "table-1"]).await;
    loop {
        finish_all(&client, &uid).await;
        if status(&client, &ns, "some")
            .await
            .is_some_and(|s| s.ready == "2/2")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What `kubectl get imageprefetch` prints: the server-side Table.
    let req = http::Request::get(format!(
        "/apis/imageprefetch.io/v1alpha1/namespaces/{ns}/imageprefetches"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: serde_json::Value =
        serde_json::from_str(&client.request_text(req).await.unwrap()).unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let ready_col = columns
        .iter()
        .position(|c| *c == "Ready")
        .expect("Ready column");
    assert!(columns.contains(&"Age"));
    let rows: BTreeMap<String, String> = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["cells"][0].as_str().unwrap().to_string(),
                r["cells"][ready_col].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(rows["some"], "2/2");
    assert_eq!(rows["none"], "0/0");
}

#[tokio::test]
async fn idle_controller_makes_no_writes() {
    let client = client().await;
    let ns = namespace(&client, "idle").await;
    let controller = Running::in_namespace(&client, &ns);
    nodes(&client, "idle", 2, &[]).await;
    let mut uids = Vec::new();
    for i in 0..3 {
        let obj = prefetch(
            &format!("p{i}"),
            json!({"images": [format!("registry.example.com/idle/app{i}:1")], "nodeSelector": {"test-group": "idle"}}),
        );
        uids.push(created(&client, &ns, &obj).await);
    }
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), &ns);
    poll("all Ready", || async {
        for uid in &uids {
            finish_all(&client, uid).await;
        }
        let list = api.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .all(|p| p.status.as_ref().is_some_and(|s| s.ready == "2/2"))
            .then_some(())
    })
    .await;
    let versions = |client: Client, ns: String, uids: Vec<String>| async move {
        let mut v: BTreeMap<String, String> = BTreeMap::new();
        for p in Api::<ImagePrefetch>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
        {
            v.insert(p.name_any(), p.resource_version().unwrap());
        }
        for uid in &uids {
            for s in sets(&client, uid).await {
                v.insert(s.name_any(), s.resource_version().unwrap());
            }
        }
        v.insert(
            "events".into(),
            Api::<Event>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len()
                .to_string(),
        );
        v
    };
    // Let the last reconciles of the convergence finish before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = versions(client.clone(), ns.clone(), uids.clone()).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let end = versions(client.clone(), ns.clone(), uids.clone()).await;
    // Every write (apply, delete, status, Event) changes a resourceVersion or the Event count.
    assert_eq!(start, end, "objects or events changed while idle");
    assert!(
        controller.stop().await.metrics.writes.get() > 0,
        "it did write while converging"
    );
}

#[tokio::test]
async fn keeps_the_agent_daemonset() {
    use k8s_openapi::api::apps::v1::DaemonSet;
    use kube::api::{Patch, PatchParams};

    let client = client().await;
    let ns = namespace(&client, "manage-agent").await;
    let image = "registry.example.com/image-prefetch-agent:0.1.0";
    let _controller = Running::start(
        &client,
        controller::Config {
            agent: Some(controller::agent_daemonset::AgentSpec::new(&ns, image)),
            ..config(&ns)
        },
    );
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
    let image_of = |ds: &DaemonSet| {
        ds.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .clone()
            .unwrap()
    };
    let first = poll("DaemonSet created", || async {
        api.get_opt("image-prefetch-agent").await.ok().flatten()
    })
    .await;
    assert_eq!(image_of(&first), image);

    // Deleted: created again.
    api.delete("image-prefetch-agent", &DeleteParams::default())
        .await
        .unwrap();
    poll("DaemonSet re-created", || async {
        let ds = api.get_opt("image-prefetch-agent").await.ok().flatten()?;
        (ds.uid() != first.uid()).then_some(())
    })
    .await;

    // Changed by someone else: changed back.
    let change = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"name": "agent", "image": "elsewhere/agent:9"}]}}}});
    api.patch(
        "image-prefetch-agent",
        &PatchParams::default(),
        &Patch::Strategic(change),
    )
    .await
    .unwrap();
    poll("image restored", || async {
        let ds = api.get_opt("image-prefetch-agent").await.ok().flatten()?;
        (image_of(&ds) == image).then_some(())
    })
    .await;
}

// Multi-threaded: the test reads /metrics with a blocking client while the
// controller's server runs on the same runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_and_health() {
    let client = client().await;
    let ns = namespace(&client, "metrics").await;
    let [port] = testbed::support::process::free_ports().unwrap();
    let _controller = Running::start(
        &client,
        controller::Config {
            metrics_addr: Some(([127, 0, 0, 1], port).into()),
            ..config(&ns)
        },
    );
    nodes(&client, "metrics", 2, &[]).await;
    let uid = created(
        &client,
        &ns,
        &prefetch("app", json!({"images": ["registry.example.com/metrics/app:1"], "nodeSelector": {"test-group": "metrics"}})),
    )
    .await;
    released_to(&client, &uid, &["metrics-0", "metrics-1"]).await;
    let host = format!("127.0.0.1:{port}");
    let text = poll("metrics counted the work", || async {
        let (code, text) = testbed::support::process::http_get(&host, "/metrics").ok()?;
        let writes = text
            .lines()
            .find(|l| l.starts_with("image_prefetch_controller_api_writes_total"))?
            .rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()?;
        (code == 200 && writes >= 2.0).then_some(text)
    })
    .await;
    assert!(
        text.contains("image_prefetch_controller_reconciles_total"),
        "{text}"
    );
    assert!(
        text.contains("image_prefetch_controller_seeds_chosen_total 1"),
        "{text}"
    );
    assert_eq!(
        testbed::support::process::http_get(&host, "/healthz")
            .unwrap()
            .0,
        200
    );
    let (code, body) = testbed::support::process::http_get(&host, "/readyz").unwrap();
    assert_eq!((code, body.trim()), (200, "running; caches synced"));
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_before_a_standby_takes_over() {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use std::time::Instant;
    let client = client().await;
    let ns = namespace(&client, "renew").await;
    // The leader reaches the API server through a link the test cuts.
    let shared = testbed::beds::shared::get();
    let server = shared.server.trim_start_matches("https://");
    let link = testbed::servers::slow_link::SlowLink::start(server, 1 << 40).unwrap();
    let kubeconfig = Kubeconfig::read_from(&shared.kubeconfig).unwrap();
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
    config.cluster_url = format!("https://{}", link.host).parse().unwrap();
    let partitioned = Client::try_from(config).unwrap();
    let lease = |id: &str| LeaseConfig {
        duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(200),
        renew_deadline: Duration::from_secs(2),
        ..LeaseConfig::new(&ns, id)
    };
    let leader = controller::leader::acquire(partitioned, lease("cut-off")).await;
    let standby_lease = lease("standby");
    let standby = tokio::spawn(async move {
        let held = controller::leader::acquire(client, standby_lease).await;
        (Instant::now(), held)
    });

    link.cut();
    let cut_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), leader.lost())
        .await
        .expect("the cut-off leader steps down");
    let stepped_down = Instant::now();
    let (took_over, _held) = tokio::time::timeout(Duration::from_secs(20), standby)
        .await
        .expect("the standby takes over")
        .unwrap();
    assert!(
        stepped_down < took_over,
        "the leader stopped {:?} after the cut, the standby took over {:?} after it",
        stepped_down - cut_at,
        took_over - cut_at
    );
    assert!(
        stepped_down - cut_at <= Duration::from_millis(2500),
        "within the renew deadline (2 s) and one renewal period: {:?}",
        stepped_down - cut_at
    );
}

/// The administrator's scope bounds every ImagePrefetch: an ImagePrefetch
/// selecting every node of its group gets only the nodes of the scope, never
/// a control-plane node; a node that enters the scope is added.
#[tokio::test]
async fn no_prefetch_reaches_past_the_administrators_node_scope() {
    let client = client().await;
    let ns = namespace(&client, "scope").await;
    let config = controller::Config {
        node_scope: controller::select::NodeScope {
            selector: [("pool".to_string(), "tenants".to_string())].into(),
            control_plane: false,
        },
        ..support::config(&ns)
    };
    let _controller = Running::start(&client, config);
    node(&client, "scope-worker", "scope", &[("pool", "tenants")]).await;
    node(&client, "scope-system", "scope", &[("pool", "system")]).await;
    node(
        &client,
        "scope-control-plane",
        "scope",
        &[
            ("pool", "tenants"),
            ("node-role.kubernetes.io/control-plane", ""),
        ],
    )
    .await;
    let obj = prefetch(
        "everywhere",
        json!({"images": ["registry.example.com/scope/app:1"],
               "nodeSelector": {"test-group": "scope"}}),
    );
    let uid = created(&client, &ns, &obj).await;
    wait_for_nodes(&client, &uid, &["scope-worker"]).await;
    let st = poll("status", || async {
        status(&client, &ns, "everywhere")
            .await
            .filter(|s| s.desired_nodes == 1)
    })
    .await;
    assert_eq!(st.ready, "0/1");
    // A node that joins the tenants' pool is targeted.
    node(&client, "scope-worker-2", "scope", &[("pool", "tenants")]).await;
    released_to(&client, &uid, &["scope-worker", "scope-worker-2"]).await;
}

/// A tenant's share: past its namespace's node×image budget an
/// ImagePrefetch writes no NodeImageSet, says so (Degraded BudgetExceeded,
/// a Warning), and proceeds by itself once there is room.
#[tokio::test]
async fn a_namespace_past_its_budget_gets_no_more_sets() {
    let client = client().await;
    let ns = namespace(&client, "budget").await;
    let _controller = Running::start(
        &client,
        controller::Config {
            namespace_budget: Some(4),
            ..config(&ns)
        },
    );
    nodes(&client, "budget", 3, &[]).await;
    let spec = |image: &str| json!({"images": [image], "nodeSelector": {"test-group": "budget"}});
    let first = created(
        &client,
        &ns,
        &prefetch("first", spec("registry.example.com/b/one:1")),
    )
    .await;
    released_to(&client, &first, &["budget-0", "budget-1", "budget-2"]).await;
    poll("the first counted", || async {
        status(&client, &ns, "first")
            .await
            .filter(|s| s.desired_nodes == 3)
    })
    .await;
    let second = created(
        &client,
        &ns,
        &prefetch("second", spec("registry.example.com/b/two:1")),
    )
    .await;
    let held = poll("BudgetExceeded", || async {
        status(&client, &ns, "second")
            .await?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "BudgetExceeded")
    })
    .await;
    assert!(held.message.contains("3 of the 4"), "{}", held.message);
    assert!(sets(&client, &second).await.is_empty());
    let warned = events_for(&client, &ns, "second").await;
    assert!(
        warned.iter().any(|(r, _)| r == "BudgetExceeded"),
        "{warned:?}"
    );
    // Room made: the second proceeds with no edit.
    Api::<ImagePrefetch>::namespaced(client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    released_to(&client, &second, &["budget-0", "budget-1", "budget-2"]).await;
}

/// Two nodes failing on one image are two Warnings, each naming its node:
/// kube's Recorder merges Events of one action and related object for six
/// minutes, keeping the first note, so each Event names its node as related.
#[tokio::test]
async fn each_node_failure_is_its_own_event() {
    let sc = Scenario::new("failures", 2).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    let image = "registry.example.com/failures/app:1";
    let uid = sc.prefetch("app", &[image], json!({"replicas": 2})).await;
    // Both nodes get an entry once the seed holds the image; both fail.
    let seed = first_with_entry(&client, &uid).await;
    report_on(&client, &uid, &seed, image, PullState::Available).await;
    let other = sc.nodes.iter().find(|n| **n != seed).unwrap().clone();
    poll("the other node released", || async {
        entries(&client, &uid)
            .await
            .get(&other)
            .filter(|e| !e.is_empty())
            .map(|_| ())
    })
    .await;
    report_on(&client, &uid, &other, image, PullState::Failed).await;
    report_on(&client, &uid, &seed, image, PullState::Failed).await;
    let api: Api<Event> = Api::namespaced(client.clone(), &ns);
    let related = poll("two PullFailed Events", || async {
        let list = api.list(&ListParams::default()).await.ok()?;
        let mut nodes: Vec<String> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(crd::EventReason::PullFailed.as_str()))
            .filter_map(|e| e.related.and_then(|r| r.name))
            .collect();
        nodes.sort();
        (nodes.len() == 2).then_some(nodes)
    })
    .await;
    let mut expected = sc.nodes.clone();
    expected.sort();
    assert_eq!(related, expected);
}

/// Review M3, counted by the API server: a leader cut off from it steps
/// down, and once another replica leads it makes no write at all — the API
/// server's audit log has none from it after the takeover, the link healed
/// — while the replica that took over carries the rollout on. (Each replica acts as its own
/// user, impersonated, so the audit log tells them apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_makes_no_write_once_its_link_is_back() {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use std::time::SystemTime;
    let work = testbed::support::workdir::Workdir::new("controller-fence");
    let plane = testbed::servers::control_plane::ControlPlane::start_audited(
        &work.join("plane"),
        testbed::support::process::Lifetime::Owned,
    )
    .await
    .expect("kube-apiserver (cargo xtask fixtures)");
    let admin = plane.client().await.unwrap();
    testbed::support::crds::install(&admin).await.unwrap();
    let ns = namespace(&admin, "fence").await;
    let link = testbed::servers::slow_link::SlowLink::start(
        plane.server.trim_start_matches("https://"),
        1 << 40,
    )
    .unwrap();
    let as_user = |user: &'static str, through: Option<String>| {
        let kubeconfig = plane.kubeconfig.clone();
        async move {
            let mut config = kube::Config::from_custom_kubeconfig(
                Kubeconfig::read_from(&kubeconfig).unwrap(),
                &KubeConfigOptions::default(),
            )
            .await
            .unwrap();
            if let Some(host) = through {
                config.cluster_url = format!("https://{host}").parse().unwrap();
                config.connect_timeout = Some(Duration::from_secs(2));
            }
            config.auth_info.impersonate = Some(user.into());
            config.auth_info.impersonate_groups = Some(vec!["system:masters".into()]);
            Client::try_from(config).unwrap()
        }
    };
    let cut_off = as_user("replica-a", Some(link.host.clone())).await;
    // (A connection the cut left hanging is given up on after 2 s, not 30.)
    let direct = as_user("replica-b", None).await;
    let leading = |id: &str| controller::Config {
        leader: Some(LeaseConfig {
            duration: Duration::from_secs(3),
            renew_every: Duration::from_millis(200),
            renew_deadline: Duration::from_secs(2),
            ..LeaseConfig::new(&ns, id)
        }),
        ..config(&ns)
    };
    let holder = |admin: Client, ns: String| async move {
        Api::<Lease>::namespaced(admin, &ns)
            .get_opt("image-prefetch-controller")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    };
    let a = Running::start(&cut_off, leading("replica-a"));
    poll("replica-a leads", || async {
        (holder(admin.clone(), ns.clone()).await.as_deref() == Some("replica-a")).then_some(())
    })
    .await;
    let b = Running::start(&direct, leading("replica-b"));
    nodes(&admin, "fence", 3, &[]).await;
    let create = |name: &'static str| {
        let (admin, ns) = (admin.clone(), ns.clone());
        async move {
            let spec = json!({"images": [format!("registry.example.com/fence/{name}:1")],
                              "nodeSelector": {"test-group": "fence"}});
            created(&admin, &ns, &prefetch(name, spec)).await
        }
    };
    let uid = create("app").await;
    poll("replica-a wrote the seed's set", || async {
        let writes = plane.audited_writes();
        writes
            .iter()
            .any(|w| w.user == "replica-a" && w.resource == "nodeimagesets")
            .then_some(())
    })
    .await;

    link.cut();
    // (Its reconciles under way may wait on the cut link for minutes; every
    // write they would still make is fenced.)
    poll("replica-b takes over", || async {
        (holder(admin.clone(), ns.clone()).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    // From here on another replica leads. (A request the old leader sent
    // just before the cut may still reach the server after it — measured:
    // a patch received a millisecond after, answered 504 — inside the
    // lease's margin, before anyone else could lead.)
    let took_over = SystemTime::now();
    link.heal();
    let healed_at = SystemTime::now();
    // The deposed replica stops by itself once its reconciles under way
    // give up on the requests the cut left hanging; if it kept running it
    // would reconnect through the healed link and act on what follows.
    a.ended(Duration::from_secs(60)).await;
    // Work: a new ImagePrefetch, and the seed's report.
    let later = create("later").await;
    let seed = poll("the seed", || async {
        with_policy(
            &entries(&admin, &uid).await,
            "registry.example.com/fence/app:1",
            RegistryPolicy::Default,
        )
        .pop()
    })
    .await;
    report(
        &admin,
        &set_on(&admin, &uid, &seed).await,
        "registry.example.com/fence/app:1",
        PullState::Available,
    )
    .await;
    poll("replica-b writes after the link is back", || async {
        plane
            .audited_writes()
            .iter()
            .any(|w| w.user == "replica-b" && w.received > healed_at)
            .then_some(())
    })
    .await;
    // The new ImagePrefetch rolled out by replica-b: both replicas have seen
    // its events by now.
    poll("replica-b rolls the new one out", || async {
        (!sets(&admin, &later).await.is_empty()).then_some(())
    })
    .await;
    let late: Vec<_> = plane
        .audited_writes()
        .into_iter()
        .filter(|w| w.user == "replica-a" && w.received >= took_over)
        .collect();
    assert!(late.is_empty(), "the deposed leader wrote: {late:?}");
    let _ = b.stop().await;
}

/// A write the API server refuses is a Warning Event on the ImagePrefetch
/// that names the operation and the NodeImageSet (its related object), and
/// the rollout goes on by itself once the cause is gone. The refusal is a
/// real ValidatingAdmissionPolicy of the API server.
#[tokio::test]
async fn a_refused_write_is_an_event_naming_the_operation_and_object() {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use kube::api::{Patch, PatchParams, PostParams};
    let sc = Scenario::new("refused", 1).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    let node = sc.nodes[0].clone();
    let name = format!("refuse-{ns}");
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let params = PatchParams::apply("test");
    policies
        .patch(&name, &params, &Patch::Apply(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {"resourceRules": [{
                    "apiGroups": [crd::GROUP], "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["nodeimagesets"],
                }]},
                "validations": [{
                    "expression": format!("object.spec.nodeName != '{node}'"),
                    "message": "refused by the test's admission policy",
                }],
            },
        })))
        .await
        .unwrap();
    bindings
        .patch(&name, &params, &Patch::Apply(json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {"policyName": name, "validationActions": ["Deny"]},
        })))
        .await
        .unwrap();
    // The policy is in force once a dry run of such a set is refused.
    let sets_api: Api<NodeImageSet> = Api::all(client.clone());
    let probe: NodeImageSet = serde_json::from_value(json!({
        "apiVersion": "imageprefetch.io/v1alpha1", "kind": "NodeImageSet",
        "metadata": {"name": format!("probe-{ns}")},
        "spec": {"nodeName": node, "imageSet": []},
    }))
    .unwrap();
    poll("the admission policy in force", || async {
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        sets_api.create(&dry, &probe).await.is_err().then_some(())
    })
    .await;

    let uid = sc
        .prefetch("app", &["registry.example.com/refused/app:1"], json!({}))
        .await;
    let event = event(&client, Some(&ns), crd::EventReason::ReconcileFailed, None).await;
    let note = event.note.clone().unwrap_or_default();
    assert!(
        note.contains("applying NodeImageSet")
            && note.contains(&node)
            && note.contains("refused by the test's admission policy"),
        "{note}"
    );
    let related = event
        .related
        .clone()
        .expect("the set is the related object");
    assert_eq!(related.kind.as_deref(), Some("NodeImageSet"));
    assert!(sets(&client, &uid).await.is_empty());

    // The cause gone, the rollout goes on with no edit.
    bindings
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let written = wait_for_nodes(&client, &uid, &[node.as_str()]).await;
    assert_eq!(Some(written[0].name_any()), related.name);
    policies
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
}

/// A spec's label expressions, node names and tolerations narrow the
/// nodes, as the scheduler would place the workload: a node with a
/// NoSchedule taint the ImagePrefetch does not tolerate gets nothing, and
/// once the taint goes it gets its set with no edit. The API server refuses
/// a bad expression naming the field.
#[tokio::test]
async fn expressions_names_and_tolerations_narrow_the_nodes() {
    let sc = Scenario::new("targets", 0).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    for (name, pool) in [
        ("targets-a", "gpu"),
        ("targets-b", "gpu"),
        ("targets-c", "cpu"),
        ("targets-d", "gpu"),
    ] {
        node(&client, name, &ns, &[("pool", pool)]).await;
    }
    testbed::support::nodes::taint(&client, "targets-b", &[("gpu", "true", "NoSchedule")])
        .await
        .unwrap();
    testbed::support::nodes::taint(&client, "targets-d", &[("dedicated", "ml", "NoExecute")])
        .await
        .unwrap();

    let refused = apply(
        &client,
        &ns,
        &prefetch(
            "bad",
            json!({"images": ["registry.example.com/targets/app:1"],
                   "nodeSelectorExpressions": [{"key": "pool", "operator": "Sideways", "values": ["x"]}]}),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        refused.contains("spec.nodeSelectorExpressions[0].operator"),
        "{refused}"
    );
    let refused = apply(
        &client,
        &ns,
        &prefetch(
            "bad",
            json!({"images": ["registry.example.com/targets/app:1"],
                   "nodeSelectorExpressions": [{"key": "pool", "operator": "In"}]}),
        ),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("In and NotIn need values"), "{refused}");

    // gpu nodes, tolerating the gpu taint: a and b, not d (its taint is not
    // tolerated) nor c (not gpu).
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "gpu",
            json!({"images": ["registry.example.com/targets/app:1"],
                   "nodeSelector": {"test-group": ns},
                   "nodeSelectorExpressions": [{"key": "pool", "operator": "In", "values": ["gpu"]}],
                   "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}),
        ),
    )
    .await;
    released_to(&client, &uid, &["targets-a", "targets-b"]).await;
    // By name: only the named node that also matches.
    let named = created(
        &client,
        &ns,
        &prefetch(
            "named",
            json!({"images": ["registry.example.com/targets/app:2"],
                   "nodeSelector": {"test-group": ns},
                   "nodeNames": ["targets-a", "targets-c", "elsewhere"],
                   "nodeSelectorExpressions": [{"key": "pool", "operator": "NotIn", "values": ["cpu"]}]}),
        ),
    )
    .await;
    wait_for_nodes(&client, &named, &["targets-a"]).await;
    // The taint lifted, d is a gpu node the workload can run on.
    testbed::support::nodes::taint(&client, "targets-d", &[])
        .await
        .unwrap();
    released_to(&client, &uid, &["targets-a", "targets-b", "targets-d"]).await;
}

/// `ttlSecondsAfterReady`: once Ready that long, the ImagePrefetch is
/// deleted (an Event says so) and its sets with it — the nodes' pins
/// released; one not yet Ready stays.
#[tokio::test]
async fn a_prefetch_ready_for_its_ttl_is_deleted_with_its_sets() {
    let sc = Scenario::new("ttl", 2).await;
    let (client, ns) = (sc.client.clone(), sc.ns.clone());
    let uid = sc
        .prefetch(
            "release",
            &["registry.example.com/ttl/app:1"],
            json!({"ttlSecondsAfterReady": 3}),
        )
        .await;
    let waiting = sc
        .prefetch(
            "waiting",
            &["registry.example.com/ttl/app:2"],
            json!({"ttlSecondsAfterReady": 1}),
        )
        .await;
    roll_out(&client, &ns, "release", &uid, 2).await;
    let ready_at = std::time::Instant::now();
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), &ns);
    poll("the ImagePrefetch deleted", || async {
        matches!(api.get("release").await, Err(kube::Error::Api(e)) if e.code == 404).then_some(())
    })
    .await;
    assert!(
        ready_at.elapsed() >= Duration::from_secs(2),
        "deleted {:?} after Ready, before its TTL",
        ready_at.elapsed()
    );
    assert!(sets(&client, &uid).await.is_empty());
    event(&client, Some(&ns), crd::EventReason::Expired, None).await;
    // Never Ready (its agents never report): kept, whatever its TTL.
    assert!(api.get("waiting").await.is_ok());
    assert!(!sets(&client, &waiting).await.is_empty());
}

/// `serviceAccountName`: the ServiceAccount's `imagePullSecrets` go into
/// every set beside the spec's own, and into the agent's grant; one that
/// does not exist holds the ImagePrefetch back (Degraded
/// ServiceAccountNotFound, a Warning) until it is created.
#[tokio::test]
async fn a_service_accounts_pull_secrets_are_used_as_named_ones() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::Role;
    let client = client().await;
    let ns = namespace(&client, "accounts").await;
    let mut config = config(&ns);
    config.pull_secret_grantee = Some(controller::pull_secrets::Grantee {
        namespace: ns.clone(),
        name: "agent".into(),
    });
    let _controller = Running::start(&client, config);
    nodes(&client, &ns, 1, &[]).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let account = |name: &str| {
        serde_json::from_value::<ServiceAccount>(json!({
            "metadata": {"name": name},
            "imagePullSecrets": [{"name": "sa-cred"}],
        }))
        .unwrap()
    };
    accounts
        .create(&Default::default(), &account("builder"))
        .await
        .unwrap();
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "built",
            json!({"images": ["registry.example.com/accounts/app:1"], "nodeSelector": {"test-group": ns},
                   "serviceAccountName": "builder", "imagePullSecrets": [{"name": "own-cred"}]}),
        ),
    )
    .await;
    let set = wait_for_nodes(&client, &uid, &[&format!("{ns}-0")]).await;
    let secrets: Vec<(String, String)> = set[0]
        .spec
        .image_pull_secrets
        .iter()
        .map(|s| (s.namespace.clone(), s.name.clone()))
        .collect();
    assert_eq!(
        secrets,
        [
            (ns.clone(), "own-cred".to_string()),
            (ns.clone(), "sa-cred".to_string())
        ]
    );
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    poll("the grant names the account's secret", || async {
        let role = roles.get(controller::pull_secrets::NAME).await.ok()?;
        let names = role.rules?.first()?.resource_names.clone()?;
        (names == ["own-cred", "sa-cred"]).then_some(())
    })
    .await;

    // A ServiceAccount that does not exist: held back, then released.
    let ghost = created(
        &client,
        &ns,
        &prefetch(
            "ghost",
            json!({"images": ["registry.example.com/accounts/app:2"], "nodeSelector": {"test-group": ns},
                   "serviceAccountName": "ghost"}),
        ),
    )
    .await;
    let held = poll("Degraded ServiceAccountNotFound", || async {
        let st = status(&client, &ns, "ghost").await?;
        let c = crd::condition::find(&st.conditions, crd::ConditionType::Degraded)?.clone();
        (c.reason == crd::ConditionReason::ServiceAccountNotFound.as_str()).then_some(c)
    })
    .await;
    assert!(held.message.contains("ghost"), "{}", held.message);
    assert!(sets(&client, &ghost).await.is_empty());
    accounts
        .create(&Default::default(), &account("ghost"))
        .await
        .unwrap();
    wait_for_nodes(&client, &ghost, &[&format!("{ns}-0")]).await;
}

/// The readiness gate: a node that joins with the gate's taint gets its
/// images like any other (the taint is the product's own), and the taint
/// comes off once it holds every image of the ImagePrefetches that select
/// it — an Event on the node says so; a node whose images do not come is
/// let go after the time limit, with a Warning.
#[tokio::test]
async fn a_gated_node_is_let_in_once_its_images_are_there() {
    use k8s_openapi::api::core::v1::Node;
    let client = client().await;
    let ns = namespace(&client, "gate").await;
    let taint = "imageprefetch.io/not-ready";
    let (_controller, names) = gated_nodes(&client, &ns, taint, Duration::from_secs(8), 2).await;
    let image = "registry.example.com/gate/app:1";
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "app",
            json!({"images": [image], "nodeSelector": {"test-group": ns}}),
        ),
    )
    .await;
    // Both gated nodes are selected: the gate's taint keeps no node out.
    poll("both gated nodes selected", || async {
        status(&client, &ns, "app")
            .await
            .filter(|s| s.desired_nodes == 2)
    })
    .await;
    let nodes_api: Api<Node> = Api::all(client.clone());
    let gated = |node: Node| {
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .iter()
            .any(|t| t.key == taint)
    };
    // The first node's image arrives (the seed's, as its agent reports).
    let first = first_with_entry(&client, &uid).await;
    let other = names.iter().find(|n| **n != first).unwrap().clone();
    report_on(&client, &uid, &first, image, PullState::Available).await;
    poll("the first node let in", || async {
        (!gated(nodes_api.get(&first).await.ok()?)).then_some(())
    })
    .await;
    assert!(
        gated(nodes_api.get(&other).await.unwrap()),
        "the other node has no image yet"
    );
    // The other node's agent says nothing: let in after the limit, with a Warning.
    poll("the other node let in after the limit", || async {
        (!gated(nodes_api.get(&other).await.ok()?)).then_some(())
    })
    .await;
    event(
        &client,
        None,
        crd::EventReason::NodeImagesReady,
        Some(&first),
    )
    .await;
    let timed_out = event(
        &client,
        None,
        crd::EventReason::NodeGateTimedOut,
        Some(&other),
    )
    .await;
    assert_eq!(timed_out.type_.as_deref(), Some("Warning"));
    assert!(timed_out.note.unwrap_or_default().contains(image));
}

/// A `replicas` ImagePrefetch keeps a node it chose gated before it has
/// released anything to it (that node has no set yet), and lets in at once
/// the node it did not choose.
#[tokio::test]
async fn a_gated_node_chosen_by_replicas_waits_before_it_is_released() {
    use k8s_openapi::api::core::v1::Node;
    let client = client().await;
    let ns = namespace(&client, "gate-replicas").await;
    // Not the other gate test's taint: each test's controller lifts its
    // own taint from every node, the other test's included.
    let taint = "imageprefetch.io/not-ready-replicas";
    let (_controller, names) = gated_nodes(&client, &ns, taint, Duration::from_secs(600), 4).await;
    let image = "registry.example.com/gate-replicas/app:1";
    let uid = created(
        &client,
        &ns,
        &prefetch(
            "app",
            json!({"images": [image], "nodeSelector": {"test-group": ns}, "replicas": 3}),
        ),
    )
    .await;
    // No report: the seed is the only node released.
    let seed = first_with_entry(&client, &uid).await;
    let nodes_api: Api<Node> = Api::all(client.clone());
    let gated = |node: &Node| {
        node.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == taint))
    };
    let open = poll("the node replicas did not choose let in", || async {
        let mut open = Vec::new();
        for n in &names {
            if !gated(&nodes_api.get(n).await.ok()?) {
                open.push(n.clone());
            }
        }
        (!open.is_empty()).then_some(open)
    })
    .await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert_ne!(open[0], seed);
    // A few rounds of the gate (every 2 s) later, the chosen ones, released
    // or not, are still gated.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for n in names.iter().filter(|n| **n != open[0]) {
        assert!(
            gated(&nodes_api.get(n).await.unwrap()),
            "{n}, chosen by replicas, let in before its image arrived"
        );
    }
    assert_eq!(sets(&client, &uid).await.len(), 1, "only the seed released");
}

/// A controller whose readiness gate is `taint` (lifted after `timeout` at
/// the latest), and `n` nodes of group `ns` that joined with that taint.
async fn gated_nodes(
    client: &Client,
    ns: &str,
    taint: &str,
    timeout: Duration,
    n: usize,
) -> (Running, Vec<String>) {
    let mut config = config(ns);
    config.gate = Some(controller::gate::Gate {
        taint: taint.into(),
        timeout,
    });
    let controller = Running::start(client, config);
    let names = nodes(client, ns, n, &[]).await;
    for n in &names {
        testbed::support::nodes::taint(client, n, &[(taint, "", "NoSchedule")])
            .await
            .unwrap();
    }
    (controller, names)
}
