//! Every kubectl command the README and docs show, typed as an administrator
//! types it, with real kubectl against a rollout on two simulated nodes of
//! the peer-mirror bed (the controller and the agents as processes, each
//! node its own containerd and peer mirror).
//! The assertions read what kubectl prints: the columns, the conditions, the
//! Events, the field a rejected spec names, and what `delete --all` deletes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crd::{ImagePrefetch, NodeImageSet};
use testbed::beds::peer_cluster::{POOL, PeerCluster};
use testbed::support::poll::eventually;

const NODES: [&str; 2] = ["kubectl-node-a", "kubectl-node-b"];

/// kubectl against one kubeconfig.
struct Kubectl {
    kubeconfig: PathBuf,
}

/// What one kubectl command did.
struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .output()
            .expect("kubectl is on PATH (cargo xtask deps checks it)");
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.ok,
            "kubectl {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    fn apply(&self, dir: &Path, name: &str, yaml: &str) -> Output {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        self.run(&["apply", "-f", path.to_str().unwrap()])
    }
}

/// kubectl's table output, read by the columns of its header (values such as
/// a condition message contain spaces, so a split on whitespace would not do).
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn parse(text: &str) -> Table {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let head = lines
            .next()
            .unwrap_or_else(|| panic!("no table in {text:?}"));
        let mut starts = Vec::new();
        let mut header = Vec::new();
        let mut prev_space = true;
        for (i, c) in head.char_indices() {
            if c != ' ' && prev_space {
                starts.push(i);
            }
            prev_space = c == ' ';
        }
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(head.len());
            header.push(head[s..end].trim().to_string());
        }
        let rows = lines
            .map(|l| {
                starts
                    .iter()
                    .enumerate()
                    .map(|(k, &s)| {
                        let end = starts.get(k + 1).copied().unwrap_or(l.len()).min(l.len());
                        l.get(s.min(l.len())..end).unwrap_or("").trim().to_string()
                    })
                    .collect()
            })
            .collect();
        Table { header, rows }
    }

    fn column(&self, name: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.header))
    }

    /// The row whose first column is `name`.
    fn row(&self, name: &str) -> &[String] {
        self.rows
            .iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("no row {name} in {:?}", self.rows))
    }

    fn cell(&self, row: &str, column: &str) -> &str {
        &self.row(row)[self.column(column)]
    }
}

/// Every run of spaces as one.
fn squeeze(text: &str) -> String {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn prefetch_yaml(ns: &str, name: &str, image: &str) -> String {
    format!(
        "apiVersion: imageprefetch.io/v1alpha1\nkind: ImagePrefetch\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  images: [\"{image}\"]\n  nodeSelector: {{{}: {}}}\n",
        POOL.0, POOL.1
    )
}

/// Waits until the ImagePrefetch `name` satisfies `condition`.
async fn wait_for(
    api: &Api<ImagePrefetch>,
    name: &str,
    secs: u64,
    what: &str,
    condition: impl Fn(&ImagePrefetch) -> bool,
) {
    let what = format!("{name} {what}");
    eventually(&what, Duration::from_secs(secs), || async {
        condition(&api.get(name).await.unwrap()).then_some(())
    })
    .await;
}

fn ready_reason(p: &ImagePrefetch) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_kubectl_command_prints_what_an_administrator_needs() {
    let work = testbed::support::workdir::Workdir::new("e2e-kubectl");
    // Two nodes of the peer-mirror bed; only its registry is allowed, so the
    // "refused" rollout below names another.
    let nodes: Vec<(&str, &str)> = NODES.iter().map(|n| (*n, "amd64")).collect();
    let mut bed = PeerCluster::start(&work, &nodes)
        .await
        .expect("the peer-mirror bed (agent and peer-mirror built by cargo test --workspace)");
    let registry = bed.registry_host();
    bed.start_controller(&["--allowed-registries", &registry], "controller.log")
        .unwrap();
    let client = bed.client.clone();
    let kubectl = Kubectl {
        kubeconfig: bed.plane.kubeconfig.clone(),
    };
    let image = testbed::builds::images::build_and_push(
        &work.join("images"),
        &registry,
        "team/web",
        "1.4.2",
        &[256 << 10],
    )
    .unwrap();

    for ns in ["team-a", "team-b"] {
        kubectl.ok(&["create", "namespace", ns]);
    }
    let dir = work.join("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let refused = "registry.example.com/team/web:1";
    for (ns, name, img) in [
        ("team-a", "web", image.reference.as_str()),
        ("team-b", "web", image.reference.as_str()),
        ("team-b", "refused", refused),
    ] {
        let out = kubectl.apply(&dir, &format!("{ns}-{name}"), &prefetch_yaml(ns, name, img));
        assert!(out.ok, "apply {ns}/{name}: {}", out.stderr);
        assert_eq!(
            out.stdout.trim(),
            format!("imageprefetch.imageprefetch.io/{name} created")
        );
    }
    let team_a: Api<ImagePrefetch> = Api::namespaced(client.clone(), "team-a");
    let team_b: Api<ImagePrefetch> = Api::namespaced(client.clone(), "team-b");
    let all_ready = |p: &ImagePrefetch| p.status.as_ref().is_some_and(|s| s.ready == "2/2");
    wait_for(&team_a, "web", 180, "Ready 2/2", all_ready).await;
    wait_for(&team_b, "web", 180, "Ready 2/2", all_ready).await;
    wait_for(&team_b, "refused", 60, "refused", |p| {
        ready_reason(p) == "RegistryNotAllowed"
    })
    .await;

    // `kubectl get imageprefetch`: READY n/m, STATUS, AGE, and nothing else
    // (the category once pulled every NodeImageSet of the cluster in).
    let out = kubectl.ok(&["get", "imageprefetch", "-n", "team-a"]);
    let table = Table::parse(&out);
    assert_eq!(table.header, ["NAME", "READY", "STATUS", "AGE"], "{out}");
    assert_eq!(table.rows.len(), 1, "only team-a's ImagePrefetch:\n{out}");
    assert_eq!(table.cell("web", "READY"), "2/2");
    assert_eq!(table.cell("web", "STATUS"), "AllImagesPresent");

    // By name, by short name, and the refused one with its reason.
    let out = kubectl.ok(&["get", "imageprefetch", "web", "-n", "team-a"]);
    assert_eq!(Table::parse(&out).rows.len(), 1, "{out}");
    let out = kubectl.ok(&["get", "ipf", "refused", "-n", "team-b"]);
    let table = Table::parse(&out);
    assert_eq!(table.cell("refused", "READY"), "0/2");
    assert_eq!(
        table.cell("refused", "STATUS"),
        "RegistryNotAllowed",
        "{out}"
    );

    // -o wide adds the image count and the Ready condition's message.
    let out = kubectl.ok(&["get", "imageprefetch", "-n", "team-b", "-o", "wide"]);
    let table = Table::parse(&out);
    assert_eq!(
        table.header,
        ["NAME", "READY", "STATUS", "IMAGES", "MESSAGE", "AGE"],
        "{out}"
    );
    assert_eq!(table.cell("web", "IMAGES"), "1");
    assert_eq!(
        table.cell("web", "MESSAGE"),
        "the image is on all 2 nodes",
        "{out}"
    );
    let why = table.cell("refused", "MESSAGE");
    assert!(
        why.contains(refused) && why.contains("not in the allowed registries"),
        "the message names the image and why: {why}"
    );

    // describe: conditions, per-image counts and the recent Events (read
    // with runs of spaces as one: describe aligns each block differently).
    let out = squeeze(&kubectl.ok(&["describe", "imageprefetch", "web", "-n", "team-a"]));
    for expected in [
        "Conditions:",
        "Reason: AllImagesPresent",
        "Type: Ready",
        "Type: Progressing",
        "Type: Degraded",
        "Available: 2",
        "Failed: 0",
        "Desired Nodes: 2",
        "Ready: 2/2",
        "Events:",
        "Normal SeedChosen",
        "Normal ImageReady",
    ] {
        assert!(
            out.contains(expected),
            "describe lacks {expected:?}:\n{out}"
        );
    }
    let out = squeeze(&kubectl.ok(&["describe", "ipf", "refused", "-n", "team-b"]));
    for expected in [
        "Warning RegistryNotAllowed",
        refused,
        "Reason: RegistryNotAllowed",
    ] {
        assert!(
            out.contains(expected),
            "describe lacks {expected:?}:\n{out}"
        );
    }

    // NodeImageSets: which node, for which ImagePrefetch, how far.
    let out = kubectl.ok(&["get", "nodeimageset"]);
    let table = Table::parse(&out);
    assert_eq!(
        table.header,
        ["NAME", "NODE", "PREFETCH", "AVAILABLE", "IMAGES", "AGE"],
        "{out}"
    );
    // The refused ImagePrefetch lists nothing on any node: it has no set.
    assert_eq!(
        table.rows.len(),
        4,
        "2 ImagePrefetches x 2 nodes, none for the refused one:\n{out}"
    );
    let (node, prefetch, available) = (
        table.column("NODE"),
        table.column("PREFETCH"),
        table.column("AVAILABLE"),
    );
    assert!(
        !table.rows.iter().any(|r| r[prefetch] == "team-b/refused"),
        "{out}"
    );
    for n in NODES {
        let of = |p: &str| {
            table
                .rows
                .iter()
                .find(|r| r[node] == n && r[prefetch] == p)
                .unwrap_or_else(|| panic!("no set of {p} on {n}:\n{out}"))
        };
        assert_eq!(of("team-a/web")[available], "1");
        assert_eq!(of("team-b/web")[available], "1");
    }

    // What one node was asked for and what its agent reports (the runbook's step 3).
    let label = format!("imageprefetch.io/node={}", NODES[0]);
    let out = kubectl.ok(&["get", "nodeimageset", "-l", &label, "-o", "yaml"]);
    for expected in [
        "registryPolicy:",
        "state: Available",
        "digest: sha256:",
        "sizeBytes:",
    ] {
        assert!(
            out.contains(expected),
            "the node's sets lack {expected:?}:\n{out}"
        );
    }

    // The category lists both kinds, and no resource is shadowed by it.
    let out = kubectl.ok(&["get", crd::CATEGORY, "-A"]);
    assert!(
        out.contains("imageprefetch.imageprefetch.io/web")
            && out.contains("nodeimageset.imageprefetch.io/"),
        "{out}"
    );

    // explain: every field of the spec, with its documentation.
    let out = kubectl.ok(&["explain", "imageprefetch.spec"]);
    for expected in [
        "images\t<[]string> -required-",
        "nodeSelector\t<map[string]string>",
        "replicas\t<integer>",
        "imagePullSecrets\t<[]Object>",
        "nodeSelectorExpressions\t<[]Object>",
        "nodeNames\t<[]string>",
        "tolerations\t<[]Object>",
        "Images to pre-download",
        "The taints the workload tolerates",
    ] {
        assert!(out.contains(expected), "explain lacks {expected:?}:\n{out}");
    }

    // A bad spec is refused by the API server, naming the field.
    let bad = prefetch_yaml("team-a", "bad", "UPPER/Case");
    let out = kubectl.apply(&dir, "bad-reference", &bad);
    assert!(!out.ok, "accepted: {}", out.stdout);
    assert!(
        out.stderr.contains("spec.images[0]")
            && out.stderr.contains("must be a valid image reference"),
        "{}",
        out.stderr
    );
    let typo = prefetch_yaml("team-a", "typo", &image.reference) + "  replica: 2\n";
    let out = kubectl.apply(&dir, "typo", &typo);
    assert!(!out.ok, "accepted: {}", out.stdout);
    assert!(
        out.stderr.contains("unknown field \"spec.replica\""),
        "{}",
        out.stderr
    );

    // `delete --all -n team-a` deletes team-a's ImagePrefetch, its
    // NodeImageSets once the controller cleaned up, and nothing else.
    let sets: Api<NodeImageSet> = Api::all(client.clone());
    let uids = |list: Vec<NodeImageSet>| -> Vec<(String, String)> {
        let mut v: Vec<_> = list
            .iter()
            .map(|s| (s.name_any(), s.uid().unwrap_or_default()))
            .collect();
        v.sort();
        v
    };
    let team_b_sets = "imageprefetch.io/prefetch-namespace=team-b";
    let before = uids(
        sets.list(&ListParams::default().labels(team_b_sets))
            .await
            .unwrap()
            .items,
    );
    assert_eq!(before.len(), 2, "team-b's web on 2 nodes");
    let out = kubectl.ok(&["delete", "imageprefetch", "--all", "-n", "team-a"]);
    assert_eq!(
        out.trim(),
        "imageprefetch.imageprefetch.io \"web\" deleted",
        "only team-a's ImagePrefetch is deleted"
    );
    let team_a_sets = "imageprefetch.io/prefetch-namespace=team-a";
    eventually(
        "team-a's NodeImageSets gone",
        Duration::from_secs(30),
        || async {
            let left = sets.list(&ListParams::default().labels(team_a_sets)).await;
            left.unwrap().items.is_empty().then_some(())
        },
    )
    .await;
    let after = uids(
        sets.list(&ListParams::default().labels(team_b_sets))
            .await
            .unwrap()
            .items,
    );
    assert_eq!(before, after, "team-b's NodeImageSets are untouched");
    let out = kubectl.ok(&["get", "imageprefetch", "-n", "team-b"]);
    assert_eq!(Table::parse(&out).rows.len(), 2, "{out}");
    assert_eq!(
        Table::parse(&kubectl.ok(&["get", "imageprefetch", "-n", "team-b"])).cell("web", "READY"),
        "2/2"
    );
    drop(bed);
}
