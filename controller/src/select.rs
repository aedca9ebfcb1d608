//! Which nodes an ImagePrefetch's images go to. Pure: no I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;

/// Whether `node` carries every label of `selector` and is not being deleted.
pub fn matches(selector: &BTreeMap<String, String>, node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let labels = node.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// Rendezvous (highest-random-weight) score of `node` for the ImagePrefetch
/// `uid`: the order it defines depends only on the pair, so `replicas: k`
/// keeps its nodes when unrelated nodes come and go, and across restarts.
pub fn score(uid: &str, node: &str) -> u64 {
    crd::names::stable_hash(&[uid, node])
}

/// Names of the nodes that get the images: every match, or the `replicas`
/// best-scoring matches. Sorted by name.
pub fn select<'a>(
    uid: &str,
    selector: &BTreeMap<String, String>,
    replicas: Option<i32>,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Vec<String> {
    let mut matching: Vec<&str> = nodes
        .into_iter()
        .filter(|n| matches(selector, n))
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    if let Some(k) = replicas {
        let k = usize::try_from(k.max(0)).unwrap_or(0);
        matching.sort_by_key(|n| std::cmp::Reverse(score(uid, n)));
        matching.truncate(k);
    }
    let mut names: Vec<String> = matching.into_iter().map(str::to_string).collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_all() {
        let nodes = [node("a", &[]), node("b", &[("x", "1")])];
        assert_eq!(select("u", &sel(&[]), None, &nodes), ["a", "b"]);
    }

    #[test]
    fn selector_needs_every_label() {
        let nodes = [
            node("a", &[("x", "1")]),
            node("b", &[("x", "1"), ("y", "2")]),
            node("c", &[("x", "2"), ("y", "2")]),
        ];
        assert_eq!(
            select("u", &sel(&[("x", "1"), ("y", "2")]), None, &nodes),
            ["b"]
        );
    }

    #[test]
    fn deleting_nodes_are_skipped() {
        let mut gone = node("gone", &[]);
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(select("u", &sel(&[]), None, &[gone, node("a", &[])]), ["a"]);
    }

    #[test]
    fn replicas_are_stable_when_unrelated_nodes_come_and_go() {
        let names: Vec<String> = (0..50).map(|i| format!("n{i}")).collect();
        let nodes: Vec<Node> = names.iter().map(|n| node(n, &[])).collect();
        let chosen = select("uid-1", &sel(&[]), Some(3), &nodes);
        assert_eq!(chosen.len(), 3);
        // Drop every node that was not chosen but one, add new ones: same choice.
        let mut fewer: Vec<Node> = nodes
            .iter()
            .filter(|n| {
                chosen.contains(n.metadata.name.as_ref().unwrap())
                    || n.metadata.name.as_deref() == Some("n7")
            })
            .cloned()
            .collect();
        fewer.extend((100..120).map(|i| node(&format!("m{i}"), &[])).filter(|n| {
            score("uid-1", n.metadata.name.as_ref().unwrap())
                < chosen.iter().map(|c| score("uid-1", c)).min().unwrap()
        }));
        assert_eq!(select("uid-1", &sel(&[]), Some(3), &fewer), chosen);
    }

    #[test]
    fn a_removed_replica_is_replaced_and_others_stay() {
        let nodes: Vec<Node> = (0..10).map(|i| node(&format!("n{i}"), &[])).collect();
        let chosen = select("uid-2", &sel(&[]), Some(3), &nodes);
        let without: Vec<Node> = nodes
            .iter()
            .filter(|n| n.metadata.name.as_ref() != Some(&chosen[0]))
            .cloned()
            .collect();
        let again = select("uid-2", &sel(&[]), Some(3), &without);
        assert_eq!(again.len(), 3);
        assert!(chosen[1..].iter().all(|c| again.contains(c)));
        assert!(!again.contains(&chosen[0]));
    }

    #[test]
    fn more_replicas_than_nodes_gives_all() {
        let nodes = [node("a", &[]), node("b", &[])];
        assert_eq!(select("u", &sel(&[]), Some(5), &nodes), ["a", "b"]);
    }
}
