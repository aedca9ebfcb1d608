//! Which nodes an ImagePrefetch's images go to. Pure: no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};

use crd::{NodeSelectorExpression, SelectorOperator, TaintEffect, Toleration, TolerationOperator};
use k8s_openapi::jiff::Timestamp;

/// Label that places a node in a topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Whether a node is Ready, and if not, since when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReadySince(Timestamp),
    /// No Ready condition yet (a node that is still registering).
    Unknown,
}

pub fn readiness(node: &Node) -> Readiness {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => Readiness::Ready,
        Some(c) => c
            .last_transition_time
            .as_ref()
            .map(|t| Readiness::NotReadySince(t.0))
            .unwrap_or(Readiness::Unknown),
        None => Readiness::Unknown,
    }
}

pub fn is_ready(node: &Node) -> bool {
    readiness(node) == Readiness::Ready
}

pub fn zone(node: &Node) -> &str {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ZONE_LABEL))
        .map(String::as_str)
        .unwrap_or("")
}

/// The nodes that share one seed per image: same topology zone (the mirror
/// is cheapest within a zone) and same platform (a node holds only its own
/// platform's layers of a multi-platform image, so it can serve only nodes
/// of that platform).
pub fn sequencing_group(node: &Node) -> String {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    format!(
        "{} {}",
        zone(node),
        crd::platform::Platform::of_node(&labels)
    )
}

/// The zone part of a [`sequencing_group`].
pub fn group_zone(group: &str) -> &str {
    group
        .rsplit_once(' ')
        .map(|(zone, _)| zone)
        .unwrap_or(group)
}

/// Whether `node` carries every label of `selector`.
pub fn matches(selector: &BTreeMap<String, String>, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Taints the node's lifecycle sets (not ready, unreachable, cordoned,
/// out of disk ...): selection answers those itself (readiness with a grace
/// period, cordons), so no toleration is asked for them.
const LIFECYCLE_TAINTS: &str = "node.kubernetes.io/";

/// The nodes an ImagePrefetch's spec targets, before readiness and the
/// administrator's scope: its labels, label expressions, node names and
/// tolerations.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub labels: &'a BTreeMap<String, String>,
    pub expressions: &'a [NodeSelectorExpression],
    pub names: &'a [String],
    pub tolerations: &'a [Toleration],
    /// A taint key the product itself puts on joining nodes (the readiness
    /// gate): never a reason to leave a node out.
    pub own_taint: Option<&'a str>,
}

impl<'a> Target<'a> {
    pub fn of(spec: &'a crd::ImagePrefetchSpec) -> Self {
        Target {
            labels: &spec.node_selector,
            expressions: &spec.node_selector_expressions,
            names: &spec.node_names,
            tolerations: &spec.tolerations,
            own_taint: None,
        }
    }

    /// Every label node (of `labels` only).
    pub fn labels(labels: &'a BTreeMap<String, String>) -> Self {
        Target {
            labels,
            expressions: &[],
            names: &[],
            tolerations: &[],
            own_taint: None,
        }
    }

    pub fn admits(&self, node: &Node) -> bool {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let labels = node.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k));
        matches(self.labels, node)
            && (self.names.is_empty() || self.names.iter().any(|n| n == name))
            && self.expressions.iter().all(|e| match e.operator {
                SelectorOperator::In => label(&e.key).is_some_and(|v| e.values.contains(v)),
                SelectorOperator::NotIn => label(&e.key).is_none_or(|v| !e.values.contains(v)),
                SelectorOperator::Exists => label(&e.key).is_some(),
                SelectorOperator::DoesNotExist => label(&e.key).is_none(),
            })
            && node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .into_iter()
                .flatten()
                .all(|t| self.tolerates(t))
    }

    /// Whether a workload with these tolerations may be placed on a node
    /// with `taint` (as the scheduler decides; `PreferNoSchedule` never
    /// keeps it away).
    fn tolerates(&self, taint: &Taint) -> bool {
        if taint.effect == "PreferNoSchedule"
            || taint.key.starts_with(LIFECYCLE_TAINTS)
            || self.own_taint == Some(taint.key.as_str())
        {
            return true;
        }
        self.tolerations.iter().any(|t| {
            let effect = t.effect.is_none_or(|e| {
                let e = match e {
                    TaintEffect::NoSchedule => "NoSchedule",
                    TaintEffect::PreferNoSchedule => "PreferNoSchedule",
                    TaintEffect::NoExecute => "NoExecute",
                };
                e == taint.effect
            });
            let key = t.key.as_deref().unwrap_or_default();
            let value = match t.operator.unwrap_or(TolerationOperator::Equal) {
                TolerationOperator::Exists => key.is_empty() || key == taint.key,
                TolerationOperator::Equal => {
                    key == taint.key
                        && t.value.as_deref().unwrap_or_default()
                            == taint.value.as_deref().unwrap_or_default()
                }
            };
            effect && value
        })
    }
}

/// Whether `node` may hold the images: it matches, is not being deleted or
/// cordoned, and is Ready — or, when it already holds them
/// (`currently_selected`), has been NotReady for less than `grace`, so that a
/// short blip does not move the images to another node.
pub fn is_candidate(
    target: &Target<'_>,
    node: &Node,
    currently_selected: bool,
    now: Timestamp,
    grace: Duration,
) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    if node.metadata.deletion_timestamp.is_some() || cordoned || !target.admits(node) {
        return false;
    }
    match readiness(node) {
        Readiness::Ready => true,
        Readiness::NotReadySince(since) => {
            currently_selected
                && now
                    .duration_since(since)
                    .try_into()
                    .map(|d: Duration| d < grace)
                    .unwrap_or(true)
        }
        Readiness::Unknown => false,
    }
}

/// Labels that mark a control-plane node (the second is the pre-1.24 name).
pub const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];

/// The nodes an administrator lets ImagePrefetches target at all: every
/// ImagePrefetch's own selector is intersected with this. Control-plane
/// nodes are out unless allowed: a tenant must not fill their disks with
/// images kubelet's garbage collection cannot reclaim.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeScope {
    /// Labels a node must carry to be targeted (empty: any node).
    pub selector: BTreeMap<String, String>,
    pub control_plane: bool,
}

impl NodeScope {
    /// From `key=value,key=value`; `None` when an item has no `=`.
    pub fn parse_selector(s: &str) -> Option<BTreeMap<String, String>> {
        s.split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(|i| {
                i.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect()
    }

    pub fn admits(&self, node: &Node) -> bool {
        let labels = node.metadata.labels.as_ref();
        let control_plane = CONTROL_PLANE_LABELS
            .iter()
            .any(|l| labels.is_some_and(|m| m.contains_key(*l)));
        (self.control_plane || !control_plane) && matches(&self.selector, node)
    }
}

/// Rendezvous (highest-random-weight) score of `node` for `key`: the order
/// it defines depends only on the pair, so a choice of k nodes keeps its
/// nodes when unrelated nodes come and go, and across controller restarts.
/// The node's first InternalIP, where its mirror listens.
pub fn internal_ip(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

pub fn score(key: &str, node: &str) -> u64 {
    crd::names::stable_hash(&[key, node])
}

/// The outcome of a selection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Selected node names, sorted.
    pub nodes: Vec<String>,
    /// `replicas` asked for more nodes than there are candidates: (asked, candidates).
    pub insufficient: Option<(usize, usize)>,
}

/// The nodes that get the images: every candidate, or `replicas` of them —
/// those that already hold the images first, then one at a time from the
/// zone with the fewest chosen so far (so `replicas` spread across zones as
/// a workload's pods would), the best-scoring there for the ImagePrefetch
/// `uid`.
pub fn select<'a>(
    uid: &str,
    target: &Target<'_>,
    replicas: Option<i32>,
    nodes: impl IntoIterator<Item = &'a Node>,
    currently_selected: &dyn Fn(&str) -> bool,
    now: Timestamp,
    grace: Duration,
) -> Selection {
    let mut candidates: Vec<(&str, &str)> = nodes
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.as_deref()?;
            is_candidate(target, n, currently_selected(name), now, grace).then_some((name, zone(n)))
        })
        .collect();
    let mut insufficient = None;
    if let Some(k) = replicas {
        let k = usize::try_from(k.max(0)).unwrap_or(0);
        if k > candidates.len() {
            insufficient = Some((k, candidates.len()));
        }
        candidates = spread(uid, candidates, k, currently_selected);
    }
    let candidates: Vec<&str> = candidates.into_iter().map(|(n, _)| n).collect();
    let mut nodes: Vec<String> = candidates.into_iter().map(str::to_string).collect();
    nodes.sort();
    Selection {
        nodes,
        insufficient,
    }
}

/// `k` of `candidates` (name, zone): those already selected keep their
/// place (a new node, however well it scores, never displaces one); each
/// free place goes to the zone with the fewest chosen, to its best-scoring
/// node.
fn spread<'a>(
    uid: &str,
    mut candidates: Vec<(&'a str, &'a str)>,
    k: usize,
    currently_selected: &dyn Fn(&str) -> bool,
) -> Vec<(&'a str, &'a str)> {
    candidates.sort_by_key(|(n, _)| (!currently_selected(n), std::cmp::Reverse(score(uid, n))));
    let (mut chosen, mut free): (Vec<_>, Vec<_>) = candidates
        .into_iter()
        .partition(|(n, _)| currently_selected(n));
    chosen.truncate(k);
    let mut in_zone: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, z) in &free {
        in_zone.entry(z).or_default();
    }
    for (_, z) in &chosen {
        *in_zone.entry(z).or_default() += 1;
    }
    while chosen.len() < k && !free.is_empty() {
        // The zone with the fewest chosen that has a free node (ties: by name).
        let zone = in_zone
            .iter()
            .filter(|(z, _)| free.iter().any(|(_, f)| f == *z))
            .min_by_key(|(z, n)| (**n, **z))
            .map(|(z, _)| *z)
            .expect("a free node has a zone");
        // `free` is sorted by score: the first of that zone is its best.
        let at = free
            .iter()
            .position(|(_, z)| *z == zone)
            .expect("found above");
        chosen.push(free.remove(at));
        *in_zone.get_mut(zone).expect("counted") += 1;
    }
    chosen
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    pub fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        set_ready(&mut n, true, 0);
        n
    }

    pub fn set_ready(n: &mut Node, ready: bool, since: i64) {
        n.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                last_transition_time: Some(Time(Timestamp::from_second(since).unwrap())),
                ..Default::default()
            }]),
            ..Default::default()
        });
    }

    #[test]
    fn the_administrators_scope_bounds_every_prefetch() {
        let worker = node("w", &[("pool", "tenants")]);
        let other_pool = node("o", &[("pool", "system")]);
        let control = node(
            "cp",
            &[
                ("pool", "tenants"),
                ("node-role.kubernetes.io/control-plane", ""),
            ],
        );
        let legacy = node("m", &[("node-role.kubernetes.io/master", "")]);
        // By default: every node but the control plane.
        let default = NodeScope::default();
        assert!(default.admits(&worker) && default.admits(&other_pool));
        assert!(!default.admits(&control) && !default.admits(&legacy));
        // An administrator's selector, and the control plane allowed.
        let scope = NodeScope {
            selector: NodeScope::parse_selector("pool=tenants").unwrap(),
            control_plane: true,
        };
        assert!(scope.admits(&worker) && scope.admits(&control));
        assert!(!scope.admits(&other_pool) && !scope.admits(&legacy));
        assert_eq!(NodeScope::parse_selector(" a=1, b = 2 ,").unwrap().len(), 2);
        assert!(NodeScope::parse_selector("a").is_none());
    }

    fn tainted(name: &str, taints: &[(&str, &str, &str)]) -> Node {
        let mut n = node(name, &[("pool", "gpu"), ("zone", "a")]);
        n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|(key, value, effect)| Taint {
                        key: key.to_string(),
                        value: (!value.is_empty()).then(|| value.to_string()),
                        effect: effect.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        });
        n
    }

    fn toleration(
        key: Option<&str>,
        operator: Option<TolerationOperator>,
        value: Option<&str>,
        effect: Option<TaintEffect>,
    ) -> Toleration {
        Toleration {
            key: key.map(str::to_string),
            operator,
            value: value.map(str::to_string),
            effect,
        }
    }

    #[test]
    fn expressions_names_and_tolerations_narrow_the_target() {
        let labels = BTreeMap::new();
        let plain = node("plain", &[("pool", "gpu"), ("zone", "a")]);
        let other = node("other", &[("pool", "cpu")]);
        let exprs = [
            NodeSelectorExpression {
                key: "pool".into(),
                operator: SelectorOperator::In,
                values: vec!["gpu".into(), "tpu".into()],
            },
            NodeSelectorExpression {
                key: "spot".into(),
                operator: SelectorOperator::DoesNotExist,
                values: vec![],
            },
        ];
        let target = Target {
            expressions: &exprs,
            ..Target::labels(&labels)
        };
        assert!(target.admits(&plain) && !target.admits(&other));
        let spot = node("spot", &[("pool", "gpu"), ("spot", "true")]);
        assert!(!target.admits(&spot));
        let not_in = [NodeSelectorExpression {
            key: "zone".into(),
            operator: SelectorOperator::NotIn,
            values: vec!["a".into()],
        }];
        let t = Target {
            expressions: &not_in,
            ..Target::labels(&labels)
        };
        assert!(
            !t.admits(&plain) && t.admits(&other),
            "NotIn admits a node without the label"
        );

        let names = ["plain".to_string()];
        let named = Target {
            names: &names,
            ..Target::labels(&labels)
        };
        assert!(named.admits(&plain) && !named.admits(&other));

        // Taints: NoSchedule and NoExecute keep a node out unless tolerated;
        // PreferNoSchedule and the node lifecycle's own taints do not.
        let gpu = tainted("gpu", &[("gpu", "true", "NoSchedule")]);
        let soft = tainted("soft", &[("busy", "", "PreferNoSchedule")]);
        let blip = tainted(
            "blip",
            &[("node.kubernetes.io/unreachable", "", "NoExecute")],
        );
        let none = Target::labels(&labels);
        assert!(!none.admits(&gpu) && none.admits(&soft) && none.admits(&blip));
        for (tolerations, admitted) in [
            (
                vec![toleration(Some("gpu"), None, Some("true"), None)],
                true,
            ),
            (
                vec![toleration(Some("gpu"), None, Some("false"), None)],
                false,
            ),
            (
                vec![toleration(
                    Some("gpu"),
                    Some(TolerationOperator::Exists),
                    None,
                    Some(TaintEffect::NoSchedule),
                )],
                true,
            ),
            (
                vec![toleration(
                    Some("gpu"),
                    Some(TolerationOperator::Exists),
                    None,
                    Some(TaintEffect::NoExecute),
                )],
                false,
            ),
            (
                vec![toleration(
                    None,
                    Some(TolerationOperator::Exists),
                    None,
                    None,
                )],
                true,
            ),
        ] {
            let t = Target {
                tolerations: &tolerations,
                ..Target::labels(&labels)
            };
            assert_eq!(t.admits(&gpu), admitted, "{tolerations:?}");
        }
        // The readiness gate's own taint is no reason to leave a node out.
        let joining = tainted(
            "joining",
            &[("imageprefetch.io/not-ready", "", "NoSchedule")],
        );
        let gate = Target {
            own_taint: Some("imageprefetch.io/not-ready"),
            ..Target::labels(&labels)
        };
        assert!(gate.admits(&joining) && !none.admits(&joining));
    }

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const GRACE: Duration = Duration::from_secs(300);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn pick(
        uid: &str,
        s: &BTreeMap<String, String>,
        replicas: Option<i32>,
        nodes: &[Node],
    ) -> Vec<String> {
        select(
            uid,
            &Target::labels(s),
            replicas,
            nodes,
            &|_| false,
            at(1000),
            GRACE,
        )
        .nodes
    }

    #[test]
    fn nodes_are_grouped_by_zone_and_platform() {
        let z = "topology.kubernetes.io/zone";
        let arm = node("a", &[(z, "z1"), ("kubernetes.io/arch", "arm64")]);
        let amd = node("b", &[(z, "z1"), ("kubernetes.io/arch", "amd64")]);
        let bare = node("c", &[]);
        assert_eq!(sequencing_group(&arm), "z1 linux/arm64");
        assert_eq!(sequencing_group(&amd), "z1 linux/amd64");
        assert_eq!(sequencing_group(&bare), " linux/amd64");
        assert_eq!(group_zone(&sequencing_group(&arm)), "z1");
        assert_eq!(group_zone(&sequencing_group(&bare)), "");
    }

    #[test]
    fn empty_selector_matches_all() {
        let nodes = [node("a", &[]), node("b", &[("x", "1")])];
        assert_eq!(pick("u", &sel(&[]), None, &nodes), ["a", "b"]);
    }

    #[test]
    fn selector_needs_every_label() {
        let nodes = [
            node("a", &[("x", "1")]),
            node("b", &[("x", "1"), ("y", "2")]),
            node("c", &[("x", "2"), ("y", "2")]),
        ];
        assert_eq!(
            pick("u", &sel(&[("x", "1"), ("y", "2")]), None, &nodes),
            ["b"]
        );
    }

    #[test]
    fn deleting_cordoned_and_unready_nodes_are_not_chosen() {
        let mut gone = node("gone", &[]);
        gone.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let mut cordoned = node("cordoned", &[]);
        cordoned.spec = Some(NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let mut down = node("down", &[]);
        set_ready(&mut down, false, 999);
        let mut registering = node("registering", &[]);
        registering.status = None;
        let nodes = [gone, cordoned, down, registering, node("a", &[])];
        assert_eq!(pick("u", &sel(&[]), None, &nodes), ["a"]);
    }

    #[test]
    fn a_selected_node_keeps_its_place_through_a_short_not_ready_spell() {
        let mut down = node("down", &[]);
        set_ready(&mut down, false, 900);
        let nodes = [down, node("a", &[])];
        let keep = |n: &str| n == "down";
        let within = select(
            "u",
            &Target::labels(&sel(&[])),
            None,
            &nodes,
            &keep,
            at(1000),
            GRACE,
        );
        assert_eq!(within.nodes, ["a", "down"]);
        let past = select(
            "u",
            &Target::labels(&sel(&[])),
            None,
            &nodes,
            &keep,
            at(900 + 301),
            GRACE,
        );
        assert_eq!(past.nodes, ["a"]);
    }

    #[test]
    fn new_nodes_never_displace_chosen_replicas() {
        let nodes: Vec<Node> = (0..3).map(|i| node(&format!("n{i}"), &[])).collect();
        let chosen = pick("uid-3", &sel(&[]), Some(2), &nodes);
        let holds = |n: &str| chosen.iter().any(|c| c == n);
        let mut more = nodes.clone();
        more.extend((0..40).map(|i| node(&format!("new{i}"), &[])));
        // Some of the new nodes score higher; the chosen ones stay all the same.
        assert!(
            more.iter()
                .any(|n| score("uid-3", n.metadata.name.as_ref().unwrap())
                    > chosen.iter().map(|c| score("uid-3", c)).min().unwrap())
        );
        let again = select(
            "uid-3",
            &Target::labels(&sel(&[])),
            Some(2),
            &more,
            &holds,
            at(1000),
            GRACE,
        )
        .nodes;
        assert_eq!(again, chosen);
    }

    #[test]
    fn replicas_are_stable_when_unrelated_nodes_come_and_go() {
        let names: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
        let nodes: Vec<Node> = names.iter().map(|n| node(n, &[])).collect();
        let chosen = pick("uid-1", &sel(&[]), Some(3), &nodes);
        assert_eq!(chosen.len(), 3);
        let lowest = chosen.iter().map(|c| score("uid-1", c)).min().unwrap();
        // Remove unchosen nodes, add nodes that score lower: the choice stays.
        let mut changed: Vec<Node> = nodes
            .iter()
            .filter(|n| {
                let name = n.metadata.name.as_ref().unwrap();
                chosen.contains(name) || name == "n7"
            })
            .cloned()
            .collect();
        changed.extend(
            (100..140)
                .map(|i| node(&format!("m{i}"), &[]))
                .filter(|n| score("uid-1", n.metadata.name.as_ref().unwrap()) < lowest),
        );
        assert_eq!(pick("uid-1", &sel(&[]), Some(3), &changed), chosen);
    }

    #[test]
    fn a_removed_replica_is_replaced_and_others_stay() {
        let nodes: Vec<Node> = (0..10).map(|i| node(&format!("n{i}"), &[])).collect();
        let chosen = pick("uid-2", &sel(&[]), Some(3), &nodes);
        let without: Vec<Node> = nodes
            .iter()
            .filter(|n| n.metadata.name.as_ref() != Some(&chosen[0]))
            .cloned()
            .collect();
        let again = pick("uid-2", &sel(&[]), Some(3), &without);
        assert_eq!(again.len(), 3);
        assert!(chosen[1..].iter().all(|c| again.contains(c)));
        assert!(!again.contains(&chosen[0]));
    }

    #[test]
    fn more_replicas_than_candidates_gives_all_and_says_so() {
        let nodes = [node("a", &[]), node("b", &[])];
        let s = select(
            "u",
            &Target::labels(&sel(&[])),
            Some(5),
            &nodes,
            &|_| false,
            at(0),
            GRACE,
        );
        assert_eq!(s.nodes, ["a", "b"]);
        assert_eq!(s.insufficient, Some((5, 2)));
    }

    #[test]
    fn replicas_spread_across_zones_and_keep_their_nodes() {
        let nodes: Vec<Node> = (0..12)
            .map(|i| {
                let zone = ["a", "b", "c"][i % 3];
                node(&format!("n{i}"), &[(ZONE_LABEL, zone)])
            })
            .collect();
        let zone_of = |n: &str| ["a", "b", "c"][n[1..].parse::<usize>().unwrap() % 3];
        let zones = |chosen: &[String]| {
            let mut z: Vec<&str> = chosen.iter().map(|n| zone_of(n)).collect();
            z.sort();
            z
        };
        for uid in ["u1", "u2", "u3", "u4"] {
            assert_eq!(
                zones(&pick(uid, &sel(&[]), Some(3), &nodes)),
                ["a", "b", "c"]
            );
            assert_eq!(zones(&pick(uid, &sel(&[]), Some(5), &nodes)).len(), 5);
            let five = zones(&pick(uid, &sel(&[]), Some(5), &nodes));
            for z in ["a", "b", "c"] {
                let n = five.iter().filter(|x| **x == z).count();
                assert!((1..=2).contains(&n), "{uid}: {five:?}");
            }
        }
        // Nodes already chosen stay, even if their zone then has more.
        let holds = |n: &str| n == "n0" || n == "n3";
        let kept = select(
            "u1",
            &Target::labels(&sel(&[])),
            Some(3),
            &nodes,
            &holds,
            at(0),
            GRACE,
        )
        .nodes;
        assert!(kept.contains(&"n0".to_string()) && kept.contains(&"n3".to_string()));
        let third = kept.iter().find(|n| *n != "n0" && *n != "n3").unwrap();
        assert_ne!(
            zone_of(third),
            "a",
            "the free place goes to another zone: {kept:?}"
        );
    }

    #[test]
    fn replica_choice_spreads_across_uids() {
        // Different ImagePrefetches do not all pile onto the same nodes.
        let nodes: Vec<Node> = (0..20).map(|i| node(&format!("n{i}"), &[])).collect();
        let firsts: std::collections::BTreeSet<Vec<String>> = (0..10)
            .map(|u| pick(&format!("uid-{u}"), &sel(&[]), Some(1), &nodes))
            .collect();
        assert!(firsts.len() > 3, "{firsts:?}");
    }
}
