//! Which nodes an ImagePrefetch's images go to. Pure: no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
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

/// Whether `node` may hold the images: it matches, is not being deleted or
/// cordoned, and is Ready — or, when it already holds them
/// (`currently_selected`), has been NotReady for less than `grace`, so that a
/// short blip does not move the images to another node.
pub fn is_candidate(
    selector: &BTreeMap<String, String>,
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
    if node.metadata.deletion_timestamp.is_some() || cordoned || !matches(selector, node) {
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
/// those that already hold the images first, then the best-scoring for the
/// ImagePrefetch `uid`.
pub fn select<'a>(
    uid: &str,
    selector: &BTreeMap<String, String>,
    replicas: Option<i32>,
    nodes: impl IntoIterator<Item = &'a Node>,
    currently_selected: &dyn Fn(&str) -> bool,
    now: Timestamp,
    grace: Duration,
) -> Selection {
    let mut candidates: Vec<&str> = nodes
        .into_iter()
        .filter_map(|n| {
            let name = n.metadata.name.as_deref()?;
            is_candidate(selector, n, currently_selected(name), now, grace).then_some(name)
        })
        .collect();
    let mut insufficient = None;
    if let Some(k) = replicas {
        let k = usize::try_from(k.max(0)).unwrap_or(0);
        if k > candidates.len() {
            insufficient = Some((k, candidates.len()));
        }
        // Nodes that already hold the images keep them: a new node, however
        // well it scores, never displaces one. Free places go by score.
        candidates.sort_by_key(|n| (!currently_selected(n), std::cmp::Reverse(score(uid, n))));
        candidates.truncate(k);
    }
    let mut nodes: Vec<String> = candidates.into_iter().map(str::to_string).collect();
    nodes.sort();
    Selection {
        nodes,
        insufficient,
    }
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
        select(uid, s, replicas, nodes, &|_| false, at(1000), GRACE).nodes
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
        let within = select("u", &sel(&[]), None, &nodes, &keep, at(1000), GRACE);
        assert_eq!(within.nodes, ["a", "down"]);
        let past = select("u", &sel(&[]), None, &nodes, &keep, at(900 + 301), GRACE);
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
        let again = select("uid-3", &sel(&[]), Some(2), &more, &holds, at(1000), GRACE).nodes;
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
        let s = select("u", &sel(&[]), Some(5), &nodes, &|_| false, at(0), GRACE);
        assert_eq!(s.nodes, ["a", "b"]);
        assert_eq!(s.insufficient, Some((5, 2)));
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
