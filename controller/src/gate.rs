//! The readiness gate for new nodes: an administrator has nodes join with a
//! startup taint (kubelet's `--register-with-taints`, a node pool's taints);
//! the controller removes it once the node holds every image of the
//! ImagePrefetches that select it, so that workloads land where their
//! images already are — or, after a time limit, anyway, with a Warning on
//! the node saying so. `verdict` decides; `keep` carries it out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use serde_json::json;
use tracing::{info, warn};

use crd::{EventReason, ImagePrefetch, PullState};

use crate::index::SetView;
use crate::reconcile::Context;
use crate::select::Target;

/// The administrator's gate: the taint's key (`NoSchedule`), and how long a
/// node may keep it waiting for its images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gate {
    pub taint: String,
    pub timeout: Duration,
}

/// What to do with a gated node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Images still missing: `missing` (ImagePrefetch, image) pairs.
    Wait { missing: Vec<(String, String)> },
    /// Every image of every ImagePrefetch that selects it is there.
    Open,
    /// The time limit passed with these still missing.
    TimedOut { missing: Vec<(String, String)> },
}

/// The verdict on `node`, tainted since it joined at `joined`: every
/// ImagePrefetch whose spec targets it (the gate's own taint tolerated) and
/// that selects every matching node must have a set there with each of its
/// allowed images Available; one with `replicas` counts only where it has a
/// set or, before the node is released, where `selects` says it chose the
/// node. `sets_on` are the node's NodeImageSets, by owner uid.
#[allow(clippy::too_many_arguments)]
pub fn verdict(
    node: &Node,
    gate: &Gate,
    prefetches: &[Arc<ImagePrefetch>],
    sets_on: &HashMap<Arc<str>, Arc<SetView>>,
    selects: &dyn Fn(&ImagePrefetch) -> bool,
    allowed: &dyn Fn(&str) -> bool,
    joined: Timestamp,
    now: Timestamp,
) -> Verdict {
    let mut missing = Vec::new();
    for p in prefetches {
        if p.metadata.deletion_timestamp.is_some() || p.spec.unreadable.is_some() {
            continue;
        }
        let target = Target {
            own_taint: Some(&gate.taint),
            ..Target::of(&p.spec)
        };
        if !target.admits(node) {
            continue;
        }
        let uid = crd::names::label_value(p.metadata.uid.as_deref().unwrap_or_default());
        let set = sets_on.get(uid.as_str());
        // A node not released yet has no set: whether `replicas` chose it
        // is the controller's selection, asked again.
        if set.is_none() && p.spec.replicas.is_some() && !selects(p) {
            continue;
        }
        let name = format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or_default(),
            p.name_any()
        );
        for image in p.spec.images.iter().filter(|i| allowed(i)) {
            let there = set.is_some_and(|s| {
                s.reports
                    .iter()
                    .any(|r| r.name == *image && r.state == PullState::Available)
            });
            if !there {
                missing.push((name.clone(), image.clone()));
            }
        }
    }
    let waited: Duration = now
        .duration_since(joined)
        .try_into()
        .unwrap_or(Duration::ZERO);
    match (missing.is_empty(), waited >= gate.timeout) {
        (true, _) => Verdict::Open,
        (false, true) => Verdict::TimedOut { missing },
        (false, false) => Verdict::Wait { missing },
    }
}

/// How often gated nodes are looked at: a node waits at most this long
/// after its last image arrives.
const EVERY: Duration = Duration::from_secs(2);

/// Removes the gate's taint from nodes whose verdict says so, until `stop`.
pub async fn keep(ctx: Arc<Context>, gate: Gate) {
    let mut every = tokio::time::interval(EVERY);
    loop {
        every.tick().await;
        if ctx.fence.check().is_err() {
            return;
        }
        let Some(store) = ctx.prefetches.get() else {
            continue;
        };
        let gated: Vec<Arc<Node>> = ctx
            .nodes
            .state()
            .into_iter()
            .filter(|n| has_taint(n, &gate.taint))
            .collect();
        if gated.is_empty() {
            continue;
        }
        let prefetches = store.state();
        let now = Timestamp::now();
        for node in gated {
            let name = node.name_any();
            // Each ImagePrefetch's set on the node, looked up by the name it
            // has: not a pass over every set of the cluster every 2 s.
            let sets_on: HashMap<Arc<str>, Arc<SetView>> = {
                let sets = ctx.sets.read();
                prefetches
                    .iter()
                    .filter_map(|p| {
                        let uid = p.metadata.uid.as_deref()?;
                        let set_name = crd::names::node_image_set_name(&p.name_any(), uid, &name);
                        let set = sets.get(&set_name)?;
                        Some((set.owner.clone(), set))
                    })
                    .collect()
            };
            let joined = node
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(now);
            let allowed = |image: &str| ctx.config.allowed.allows(image);
            let selects = |p: &ImagePrefetch| {
                let uid = p.metadata.uid.as_deref().unwrap_or_default();
                let owned = ctx.sets.read().owned_by(&crd::names::label_value(uid));
                let holds = |n: &str| owned.iter().any(|s| s.spec.node_name == n);
                let nodes = ctx.nodes.state();
                crate::decide::selection(p, uid, &nodes, &holds, &ctx.config, now)
                    .nodes
                    .contains(&name)
            };
            let (reason, note) = match verdict(
                &node,
                &gate,
                &prefetches,
                &sets_on,
                &selects,
                &allowed,
                joined,
                now,
            ) {
                Verdict::Wait { .. } => continue,
                Verdict::Open => (
                    EventReason::NodeImagesReady,
                    format!(
                        "every image of the ImagePrefetches that select it is on the node: taint {} removed",
                        gate.taint
                    ),
                ),
                Verdict::TimedOut { missing } => (
                    EventReason::NodeGateTimedOut,
                    format!(
                        "taint {} removed after {}s although {} image(s) are not on the node yet, e.g. {}",
                        gate.taint,
                        gate.timeout.as_secs(),
                        missing.len(),
                        missing
                            .iter()
                            .take(3)
                            .map(|(p, i)| format!("{i} ({p})"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            };
            if let Err(e) = untaint(&ctx, &name, &gate.taint).await {
                warn!(node = %name, error = %e, "could not remove the readiness gate's taint; trying again");
                continue;
            }
            ctx.metrics
                .gates_opened
                .get_or_create(&crate::metrics::GateLabels {
                    why: if reason == EventReason::NodeImagesReady {
                        "images-ready"
                    } else {
                        "timed-out"
                    }
                    .into(),
                })
                .inc();
            info!(node = %name, %reason, "{note}");
            let event = Event {
                type_: if reason == EventReason::NodeImagesReady {
                    EventType::Normal
                } else {
                    EventType::Warning
                },
                reason: reason.to_string(),
                note: Some(crd::names::shortened(&note, crate::decide::MAX_NOTE)),
                action: "Ungate".into(),
                secondary: None,
            };
            let regarding = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(name.clone()),
                uid: node.uid(),
                ..Default::default()
            };
            if let Err(e) = ctx.recorder.publish(&event, &regarding).await {
                warn!(node = %name, error = %e, "could not publish an Event");
            }
        }
    }
}

fn has_taint(node: &Node, key: &str) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == key))
}

/// Takes the taint `key` off the node: its taints as read, less that one,
/// written with the version read as precondition, so a taint another writer
/// added meanwhile is never lost (the write is refused, and made again at
/// the next look).
async fn untaint(ctx: &Context, node: &str, key: &str) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let current = api.get(node).await?;
    let taints: Vec<_> = current
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != key)
        .collect();
    let patch = json!({
        "metadata": {"resourceVersion": current.resource_version()},
        "spec": {"taints": taints},
    });
    api.patch(node, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    ctx.wrote();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::tests::node;
    use crd::{NodeImage, NodeImageSet, NodeImageSetSpec, NodeImageStatus, RegistryPolicy};

    const GATE_TAINT: &str = "imageprefetch.io/not-ready";

    fn gated(name: &str, labels: &[(&str, &str)]) -> Node {
        let mut n = node(name, labels);
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(vec![k8s_openapi::api::core::v1::Taint {
                key: GATE_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        n
    }

    fn prefetch(
        name: &str,
        uid: &str,
        images: &[&str],
        pool: &str,
        replicas: Option<i32>,
    ) -> Arc<ImagePrefetch> {
        let mut p = ImagePrefetch::new(
            name,
            crd::ImagePrefetchSpec {
                images: images.iter().map(|i| i.to_string()).collect(),
                node_selector: [("pool".to_string(), pool.to_string())].into(),
                replicas,
                ..Default::default()
            },
        );
        p.metadata.namespace = Some("ns".into());
        p.metadata.uid = Some(uid.into());
        Arc::new(p)
    }

    fn set(node: &str, owner: &str, available: &[&str]) -> (Arc<str>, Arc<SetView>) {
        let entries = available
            .iter()
            .map(|i| NodeImage::of(*i, RegistryPolicy::Mirror))
            .collect();
        let mut s = NodeImageSet::new("s", NodeImageSetSpec::for_node(node, entries));
        s.status = Some(crd::NodeImageSetStatus {
            images: available
                .iter()
                .map(|i| NodeImageStatus::new(*i, PullState::Available, 1))
                .collect(),
            ..Default::default()
        });
        let mut view = SetView::of(&s);
        view.owner = owner.into();
        (Arc::from(owner), Arc::new(view))
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn the_gate_opens_when_every_image_is_there_or_the_limit_passes() {
        let gate = Gate {
            taint: GATE_TAINT.into(),
            timeout: Duration::from_secs(600),
        };
        let n = gated("n1", &[("pool", "web")]);
        let web = prefetch(
            "web",
            "u-web",
            &["r.example/web:1", "r.example/side:1"],
            "web",
            None,
        );
        let other_pool = prefetch("db", "u-db", &["r.example/db:1"], "db", None);
        let few = prefetch("few", "u-few", &["r.example/few:1"], "web", Some(1));
        let all = [web, other_pool, few];
        let yes = |_: &str| true;
        let not_chosen = |_: &ImagePrefetch| false;

        // No set yet for an ImagePrefetch that selects every matching node: wait.
        let none = HashMap::new();
        let v = verdict(&n, &gate, &all, &none, &not_chosen, &yes, at(0), at(10));
        assert_eq!(
            v,
            Verdict::Wait {
                missing: vec![
                    ("ns/web".into(), "r.example/web:1".into()),
                    ("ns/web".into(), "r.example/side:1".into())
                ]
            }
        );
        // One image there, one not.
        let half = HashMap::from([set("n1", "u-web", &["r.example/web:1"])]);
        assert!(
            matches!(verdict(&n, &gate, &all, &half, &not_chosen, &yes, at(0), at(10)), Verdict::Wait { missing } if missing.len() == 1)
        );
        // Both there: open (the other pool's and the replicas one that did
        // not choose this node do not count).
        let both = HashMap::from([set("n1", "u-web", &["r.example/web:1", "r.example/side:1"])]);
        assert_eq!(
            verdict(&n, &gate, &all, &both, &not_chosen, &yes, at(0), at(10)),
            Verdict::Open
        );
        // The replicas one chose it: its image counts too, whether it has
        // released the node already (a set) or not yet (its selection).
        let chosen = HashMap::from([
            set("n1", "u-web", &["r.example/web:1", "r.example/side:1"]),
            set("n1", "u-few", &[]),
        ]);
        assert!(matches!(
            verdict(&n, &gate, &all, &chosen, &not_chosen, &yes, at(0), at(10)),
            Verdict::Wait { .. }
        ));
        let few_chose = |p: &ImagePrefetch| p.metadata.uid.as_deref() == Some("u-few");
        assert_eq!(
            verdict(&n, &gate, &all, &both, &few_chose, &yes, at(0), at(10)),
            Verdict::Wait {
                missing: vec![("ns/few".into(), "r.example/few:1".into())]
            }
        );
        // A refused image is never pulled: it does not hold the gate.
        let refused = |i: &str| i != "r.example/side:1";
        assert_eq!(
            verdict(&n, &gate, &all, &half, &not_chosen, &refused, at(0), at(10)),
            Verdict::Open
        );
        // Past the limit: open anyway, saying what is missing.
        assert!(matches!(
            verdict(&n, &gate, &all, &half, &not_chosen, &yes, at(0), at(600)),
            Verdict::TimedOut { missing } if missing == [("ns/web".to_string(), "r.example/side:1".to_string())]
        ));
    }
}
