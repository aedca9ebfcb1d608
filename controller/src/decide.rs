//! One reconcile's decision, pure: from what the caches hold (the
//! ImagePrefetch, the nodes, every NodeImageSet) and what the controller
//! remembers (the seed book, the failures already announced), what to write —
//! NodeImageSets to apply and to delete, the status, the Events — and when to
//! look again. `reconcile.rs` reads the caches before and carries the
//! decision out after; it decides nothing itself.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{Span, info_span};

use crd::condition;
use crd::{
    ConditionReason, ConditionType, EventReason, ImagePrefetch, ImagePrefetchStatus, NodeImage,
    NodeImageSet, NodeImageSetSpec, SecretReference, Word, keys, names,
};

use crate::config::Config;
use crate::index::{SetFacts, SetView};
use crate::policy::{self, ClusterView, Current, SeedBook};
use crate::status::{self, Inputs};
use crate::{Error, select};

/// How often an ImagePrefetch is looked at again even if nothing changed.
pub const RESYNC: Duration = Duration::from_secs(300);

/// What a reconcile reads: the caches as they are, and the time.
pub struct Observed<'a> {
    pub prefetch: &'a ImagePrefetch,
    pub nodes: &'a [Arc<Node>],
    /// The ImagePrefetch's own NodeImageSets.
    pub owned: &'a [Arc<SetView>],
    /// Other ImagePrefetches' NodeImageSets that list one of its images
    /// (seeds and holders are shared across ImagePrefetches).
    pub sharing: &'a [Arc<SetView>],
    /// Entries all ImagePrefetches list on each node (none: absent), for
    /// the node budget.
    pub entries_on: &'a HashMap<String, usize>,
    /// Wall clock, for conditions and node readiness.
    pub now: Time,
    /// Monotonic clock, for the seed book's deadlines and cool-downs.
    pub at: Instant,
    /// Node×image entries the other ImagePrefetches of this one's namespace
    /// hold (by their status), against `Config::namespace_budget`.
    pub namespace_entries: usize,
    /// Node×image entries every other ImagePrefetch holds, against
    /// `Config::cluster_budget`.
    pub cluster_entries: usize,
    /// The `imagePullSecrets` of the ServiceAccount the spec names; `None`:
    /// it names none; `Err`: it does not exist (why, in words).
    pub account_secrets: Option<Result<Vec<String>, String>>,
}

/// What the controller remembers between reconciles, changed by a decision.
pub struct Memory<'a> {
    pub seeds: &'a mut SeedBook,
    /// Failures already announced by an Event: (ImagePrefetch uid, node, image).
    pub announced: &'a mut HashSet<(String, String, String)>,
    /// When each entry with no report yet was first seen so.
    pub unreported: &'a mut Unreported,
}

/// When each entry with no report from its agent yet was first seen so, by
/// ImagePrefetch uid, then by a hash of (node, image). Only entries still
/// unreported are kept: with 100,000 sets and no agent answering, three
/// strings a key were 20 MB, and the map kept its size after the reports came.
#[derive(Debug, Default)]
pub struct Unreported(HashMap<String, HashMap<u64, Instant>>);

impl Unreported {
    /// Forgets every entry of the ImagePrefetch with `uid`.
    pub fn forget(&mut self, uid: &str) {
        self.0.remove(uid);
    }

    fn key(node: &str, image: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (node, image).hash(&mut h);
        h.finish()
    }
}

/// An Event to publish on the ImagePrefetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub type_: EventType,
    pub reason: EventReason,
    pub note: String,
    /// The node it is about: the Event's related object, so Events of one
    /// reason about different nodes are not merged into one.
    pub node: Option<String>,
    /// The image it is about: part of the Event's action, for the same reason.
    pub image: Option<String>,
}

/// Longest Event note events.k8s.io/v1 accepts: a longer one is refused,
/// and the Event lost.
pub const MAX_NOTE: usize = 1024;
/// Longest Event action.
pub const MAX_ACTION: usize = 128;

impl Announcement {
    /// The Event to publish: what it is about in the action (the image)
    /// and as the related object (the node), because kube's Recorder merges
    /// Events of one type, action, reason and objects for 6 minutes, keeping
    /// the first note — a second node's failure would otherwise be lost; the
    /// note cut to what the API takes.
    pub fn event(&self) -> kube::runtime::events::Event {
        let action = match &self.image {
            Some(image) => names::shortened(&format!("Prefetch {image}"), MAX_ACTION),
            None => "Prefetch".to_string(),
        };
        kube::runtime::events::Event {
            type_: self.type_,
            reason: self.reason.to_string(),
            note: Some(names::shortened(&self.note, MAX_NOTE)),
            action,
            secondary: self.node.as_ref().map(|node| ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                ..Default::default()
            }),
        }
    }
}

/// A NodeImageSet to delete: its node is no longer selected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stale {
    pub name: String,
    /// The uid it was decided on (the delete's precondition).
    pub uid: String,
    pub node: String,
}

/// What to write, in the order to write it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// NodeImageSets that are new or differ from what the cache holds.
    pub apply: Vec<Desired>,
    pub delete: Vec<Stale>,
    /// The new status; `None` when it is unchanged.
    pub status: Option<ImagePrefetchStatus>,
    pub events: Vec<Announcement>,
    /// Seeds chosen by this decision.
    pub new_seeds: usize,
    /// Nodes selected.
    pub selected: usize,
    /// Whether the rollout is still under way (Progressing=True).
    pub progressing: bool,
    /// When to reconcile again if nothing changes before.
    pub requeue: Duration,
    /// Ready for its `ttlSecondsAfterReady`: delete the ImagePrefetch
    /// (after the status and Events).
    pub expire: bool,
}

/// The ImagePrefetch's identity, needed for every name and label it owns.
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

impl<'a> Owner<'a> {
    pub fn of(p: &'a ImagePrefetch) -> Result<Self, Error> {
        let m = &p.metadata;
        Ok(Owner {
            namespace: m
                .namespace
                .as_deref()
                .ok_or(Error::MissingMetadata("namespace"))?,
            name: m.name.as_deref().ok_or(Error::MissingMetadata("name"))?,
            uid: m.uid.as_deref().ok_or(Error::MissingMetadata("uid"))?,
        })
    }

    fn owns(&self, set: &SetView) -> bool {
        *set.owner == *names::label_value(self.uid)
    }
}

/// The nodes `p` (with uid `uid`) selects among `nodes`: those the
/// administrator's scope admits, a node waiting behind the readiness gate
/// counted as one to fill; `holds` says which have a set of `p` already
/// (kept through a short NotReady spell, and first for `replicas`). The
/// readiness gate asks the same question of a node no set names yet.
pub fn selection(
    p: &ImagePrefetch,
    uid: &str,
    nodes: &[Arc<Node>],
    holds: &dyn Fn(&str) -> bool,
    config: &Config,
    now: k8s_openapi::jiff::Timestamp,
) -> select::Selection {
    select::select(
        uid,
        &select::Target {
            own_taint: config.gate.as_ref().map(|g| g.taint.as_str()),
            ..select::Target::of(&p.spec)
        },
        p.spec.replicas,
        nodes
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| config.node_scope.admits(n)),
        holds,
        now,
        config.not_ready_grace,
    )
}

/// The decision for `observed.prefetch`.
pub fn decide(
    observed: &Observed<'_>,
    config: &Config,
    memory: Memory<'_>,
) -> Result<Decision, Error> {
    let p = observed.prefetch;
    let owner = Owner::of(p)?;
    if let Some(why) = &p.spec.unreadable {
        return Ok(unreadable_spec(p, why, observed.now.clone()));
    }
    // Its pull secrets are not known: nothing is changed until they are.
    if let Some(Err(why)) = &observed.account_secrets {
        let status = status::held_back(
            p,
            ConditionReason::ServiceAccountNotFound,
            why,
            observed.now.clone(),
        );
        return Ok(announce_hold(
            p,
            status,
            ConditionReason::ServiceAccountNotFound,
            why.clone(),
            OVER_BUDGET_RECHECK,
        ));
    }
    let account_secrets: &[String] = match &observed.account_secrets {
        Some(Ok(names)) => names,
        _ => &[],
    };
    let owned: Vec<&SetView> = observed
        .owned
        .iter()
        .map(|s| s.as_ref())
        .filter(|s| owner.owns(s))
        .collect();
    let holds = |node: &str| owned.iter().any(|s| s.spec.node_name == node);
    let selection = info_span!("select", nodes = observed.nodes.len())
        .in_scope(|| selection(p, owner.uid, observed.nodes, &holds, config, observed.now.0));
    Span::current().record("selected", selection.nodes.len());
    let (allowed, not_allowed): (Vec<String>, Vec<String>) = p
        .spec
        .images
        .iter()
        .cloned()
        .partition(|i| config.allowed.allows(i));

    let entries = selection.nodes.len() * allowed.len();
    let budgets = [
        (
            Budget::Namespace,
            config.namespace_budget,
            observed.namespace_entries,
        ),
        (
            Budget::Cluster,
            config.cluster_budget,
            observed.cluster_entries,
        ),
    ];
    for (scope, budget, others) in budgets {
        if let Some(budget) = budget
            && others + entries > budget
        {
            return Ok(over_budget(
                p,
                entries,
                others,
                budget,
                scope,
                observed.now.clone(),
            ));
        }
    }
    if let Some(budget) = config.node_budget
        && let Some((node, others)) = fullest_node(
            observed.entries_on,
            &owned,
            &selection.nodes,
            allowed.len(),
            budget,
        )
    {
        return Ok(over_budget(
            p,
            allowed.len(),
            others,
            budget,
            Budget::Node(node),
            observed.now.clone(),
        ));
    }
    let view = cluster_view(observed, config);
    let selected: HashSet<&String> = selection.nodes.iter().collect();
    let selected_sets: Vec<&SetView> = owned
        .iter()
        .copied()
        .filter(|s| selected.contains(&s.spec.node_name))
        .collect();
    let silence = agent_silence(
        owner.uid,
        &selected_sets,
        memory.unreported,
        observed.at,
        config.agent_silent_after,
    );
    let round = crate::refresh::round(p, &observed.now);
    let mut current = Current::from_sets(selected_sets.iter().copied())
        .silent(&silence.silent)
        .refresh_round(round.current.clone());
    if !p.spec.image_pull_secrets.is_empty() {
        current = current.private_to(owner.namespace);
    }
    let plan = info_span!("plan", images = allowed.len()).in_scope(|| {
        policy::plan(
            &allowed,
            &selection.nodes,
            &current,
            &view,
            memory.seeds,
            &config.policy,
            observed.at,
        )
    });

    // The sets as they will be once the decision is carried out: unchanged
    // ones as cached, changed ones with the agent's reports they already have.
    let by_name: HashMap<&str, &SetView> = owned.iter().map(|s| (&*s.name, *s)).collect();
    let mut apply = Vec::new();
    // Unchanged sets borrowed, not copied: a reconcile over 5,000 nodes
    // would otherwise clone every set it left alone.
    let mut after: Vec<Cow<'_, SetView>> = Vec::with_capacity(plan.entries.len());
    // A set written with an image its node already reports Available (it
    // held it before, for this or another ImagePrefetch) makes that node a
    // holder by the controller's own write, whose echo triggers nothing:
    // the next wave is decided by looking again at once.
    let mut made_holders = false;
    let owner_labels = [owner.uid, owner.namespace, owner.name].map(names::label_value);
    let reference = format!("{}/{}", owner.namespace, owner.name);
    let labelled = Arc::new(Labelled {
        namespace: owner.namespace.to_string(),
        name: owner.name.to_string(),
        uid: owner.uid.to_string(),
        reference: reference.clone(),
    });
    for (node, entries) in &plan.entries {
        let name = names::node_image_set_name(owner.name, owner.uid, node);
        let spec = desired_spec(p, &owner, node, entries.clone(), account_secrets, config);
        let meta = crate::index::meta_fingerprint([
            Some(&owner_labels[0]),
            Some(&owner_labels[1]),
            Some(&owner_labels[2]),
            Some(&names::label_value(node)),
            Some(&reference),
        ]);
        let existing = by_name.get(name.as_str()).copied();
        // A node not released yet gets no set: an empty one would be a
        // write (and its agent's answer another) that tells it nothing, for
        // every node of a rollout. One it has keeps being written even when
        // emptied: the agent unpins what it no longer lists.
        if existing.is_none() && entries.is_empty() {
            continue;
        }
        match existing {
            // Unchanged: no object is built (at 5,000 nodes, a reconcile
            // per report built 5,000 sets with their metadata maps to
            // compare and drop).
            Some(e) if e.spec == spec && e.meta == meta => after.push(Cow::Borrowed(e)),
            _ => {
                let desired = Desired {
                    name,
                    spec,
                    labelled: labelled.clone(),
                };
                let mut view = SetView::of(&desired.object());
                if let Some(e) = existing {
                    view.has_status = e.has_status;
                    view.reports = e.reports.clone();
                    view.unreadable_report = e.unreadable_report.clone();
                    made_holders |= view.spec.image_set.iter().any(|entry| {
                        !e.spec.image_set.iter().any(|old| old.name == entry.name)
                            && view.report_on(&entry.name).map(|r| r.state)
                                == Some(crd::PullState::Available)
                    });
                }
                after.push(Cow::Owned(view));
                apply.push(desired);
            }
        }
    }
    // A set being written is never also deleted (one whose spec cannot be
    // read names no node, but keeps its name).
    let applied: HashSet<String> = apply.iter().map(|s| s.name_any()).collect();
    let delete: Vec<Stale> = owned
        .iter()
        .filter(|s| !selected.contains(&s.spec.node_name) && !applied.contains(&*s.name))
        .map(|s| Stale {
            name: s.name.to_string(),
            uid: s.uid.clone(),
            node: s.spec.node_name.clone(),
        })
        .collect();

    let mut events: Vec<Announcement> = plan
        .new_seeds
        .iter()
        .map(|(image, node)| Announcement {
            type_: EventType::Normal,
            reason: EventReason::SeedChosen,
            node: Some(node.clone()),
            image: Some(image.clone()),
            note: format!(
                "{node} pulls {image} from its registry; other nodes will get it from the in-cluster mirror"
            ),
        })
        .collect();
    // Once per new digest of a tag.
    for (image, digest) in &plan.moved {
        if memory.announced.insert((
            owner.uid.to_string(),
            format!("tag moved to {digest}"),
            image.clone(),
        )) {
            events.push(Announcement {
                type_: EventType::Normal,
                reason: EventReason::TagMoved,
                node: None,
                // The digest in the action: each move is its own Event, not
                // a repeat of the last one (Events aggregate by action).
                image: Some(format!("{image}@{digest}")),
                note: format!(
                    "{image} now points to {digest} at its registry: rolled out from the in-cluster mirror, each node keeping the old image until it has this one"
                ),
            });
        }
    }
    events.extend(plan.reseeds.iter().map(|(image, node)| Announcement {
        type_: EventType::Warning,
        reason: EventReason::Reseeded,
        node: Some(node.clone()),
        image: Some(image.clone()),
        note: format!(
            "no node got {image} from the in-cluster mirror for {}s and some tried: {node} pulls it \
             from its registry again (is the mirror running, can it find what nodes hold?)",
            config.policy.reseed_after.as_secs()
        ),
    }));
    let no_seed: Vec<status::NoSeed> = plan
        .blocked
        .iter()
        .map(|b| status::NoSeed {
            image: b.image.clone(),
            nodes: b.nodes.clone(),
            retry_in: b.retry_at.saturating_duration_since(observed.at),
        })
        .collect();
    let inputs = Inputs {
        desired: selection.nodes.len(),
        insufficient: selection.insufficient,
        not_allowed: &not_allowed,
        no_seed: &no_seed,
        silent: &silence.silent,
    };
    let refs: Vec<&SetView> = after.iter().map(|s| s.as_ref()).collect();
    let mut status = status::compute(p, &inputs, &refs, observed.now.clone());
    status.last_refresh_time = round.current.clone();
    status.refresh_request = round.request.clone();
    let progressing = status
        .conditions
        .iter()
        .any(|c| c.type_ == ConditionType::Progressing.as_str() && c.status == "True");
    events.extend(announcements(p, &owner, &refs, &status, memory.announced));

    // Back when the first cool-down ends: a blocked image gets its seed then.
    let next_seed = no_seed.iter().map(|n| n.retry_in).min();
    let requeue = RESYNC
        .min(config.policy.seed_deadline / 2)
        .min(next_seed.unwrap_or(RESYNC).max(Duration::from_secs(1)))
        .min(silence.next.unwrap_or(RESYNC).max(Duration::from_secs(1)))
        .min(
            plan.recheck_at
                .map(|at| at.saturating_duration_since(observed.at))
                .unwrap_or(RESYNC)
                .max(Duration::from_secs(1)),
        )
        .min(if made_holders { LOOK_AGAIN } else { RESYNC })
        .min(round.next_in.unwrap_or(RESYNC).max(Duration::from_secs(1)));
    let left = ttl_left(&status, p.spec.ttl_seconds_after_ready, &observed.now);
    let expire = left == Some(Duration::ZERO);
    if expire {
        events.push(Announcement {
            type_: EventType::Normal,
            reason: EventReason::Expired,
            note: format!(
                "Ready for {}s (ttlSecondsAfterReady): deleted; its nodes' pins are released, and the images stay until kubelet's garbage collection needs the room",
                p.spec.ttl_seconds_after_ready.unwrap_or_default()
            ),
            node: None,
            image: None,
        });
    }
    let requeue = match left {
        Some(left) if !expire => requeue.min(left.max(Duration::from_secs(1))),
        _ => requeue,
    };
    Ok(Decision {
        apply,
        delete,
        status: (p.status.as_ref() != Some(&status)).then_some(status),
        events,
        new_seeds: plan.new_seeds.len(),
        selected: selection.nodes.len(),
        progressing,
        requeue,
        expire,
    })
}

/// How long until `ttl` seconds have passed since `status` became Ready
/// (zero: they have); `None` without a TTL or while not Ready.
pub fn ttl_left(status: &ImagePrefetchStatus, ttl: Option<i64>, now: &Time) -> Option<Duration> {
    let ttl = Duration::from_secs(u64::try_from(ttl?).unwrap_or(0));
    let ready =
        condition::find(&status.conditions, ConditionType::Ready).filter(|c| c.status == "True")?;
    let since = now
        .0
        .duration_since(ready.last_transition_time.0)
        .try_into()
        .unwrap_or(Duration::ZERO);
    Some(ttl.saturating_sub(since))
}

/// An ImagePrefetch whose spec cannot be read: nothing is written but its
/// status, and a Warning when that first says so. Its NodeImageSets stay as
/// they are (deleting them would unpin images a misread spec may still
/// want); deleting the ImagePrefetch still removes them (the finalizer
/// needs only its uid).
fn unreadable_spec(p: &ImagePrefetch, why: &crd::lenient::Unreadable, now: Time) -> Decision {
    let message = format!(
        "the spec cannot be read ({why}); its NodeImageSets are left as they are: apply the ImagePrefetch again (the API server now checks it) or delete it"
    );
    let status = status::held_back(p, ConditionReason::SpecUnreadable, &message, now);
    announce_hold(
        p,
        status,
        ConditionReason::SpecUnreadable,
        format!(
            "the spec cannot be read: {why}; nothing is done for this ImagePrefetch until it is applied again"
        ),
        RESYNC,
    )
}

/// How soon a decision that made holders by its own writes is followed by
/// the next: time for those writes to come back through the watch.
pub const LOOK_AGAIN: Duration = Duration::from_millis(200);

/// How soon an ImagePrefetch over its namespace's budget is looked at
/// again: room may have been made (another deleted or shrunk).
pub const OVER_BUDGET_RECHECK: Duration = Duration::from_secs(10);

/// The reason and message of `status`'s Degraded condition, when it is True.
/// A reason this version does not know reads as none.
fn degraded(status: Option<&ImagePrefetchStatus>) -> Option<(ConditionReason, String)> {
    status
        .and_then(|s| condition::find(&s.conditions, ConditionType::Degraded))
        .filter(|c| c.status == "True")
        .and_then(|c| Some((ConditionReason::parse(&c.reason)?, c.message.clone())))
}

/// An ImagePrefetch that would take its namespace past the node×image
/// budget: nothing is written but its status (Degraded `BudgetExceeded`),
/// and a Warning when that first says so. Sets it already has stay; it is
/// looked at again soon, and proceeds once there is room.
/// Whose share of node×image entries an ImagePrefetch would pass.
#[derive(Clone, Debug, PartialEq)]
enum Budget {
    Namespace,
    Cluster,
    /// One node's entries, all ImagePrefetches together.
    Node(String),
}

/// The selected node the other ImagePrefetches' sets fill most, with their
/// entries there, when `adding` more would take it past `budget`.
/// `entries_on` counts every ImagePrefetch's entries, `owned` this one's.
fn fullest_node(
    entries_on: &HashMap<String, usize>,
    owned: &[&SetView],
    selected: &[String],
    adding: usize,
    budget: usize,
) -> Option<(String, usize)> {
    let own: HashMap<&str, usize> = owned
        .iter()
        .map(|s| (s.spec.node_name.as_str(), s.spec.image_set.len()))
        .collect();
    selected
        .iter()
        .map(|node| {
            let all = entries_on.get(node).copied().unwrap_or(0);
            (
                node,
                all.saturating_sub(own.get(node.as_str()).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, others)| others + adding > budget)
        .max_by_key(|(node, others)| (*others, std::cmp::Reverse(*node)))
        .map(|(node, others)| (node.clone(), others))
}

fn over_budget(
    p: &ImagePrefetch,
    entries: usize,
    others: usize,
    budget: usize,
    scope: Budget,
    now: Time,
) -> Decision {
    let why = match scope {
        Budget::Namespace => format!(
            "would hold {entries} node×image entries; its namespace's other ImagePrefetches hold {others} of the {budget} allowed per namespace (the controller's --namespace-budget)"
        ),
        Budget::Cluster => format!(
            "would hold {entries} node×image entries; the cluster's other ImagePrefetches hold {others} of the {budget} allowed in all (the controller's --cluster-budget)"
        ),
        Budget::Node(node) => format!(
            "would add {entries} entries on node {node}, where other ImagePrefetches hold {others} of the {budget} allowed per node (the controller's --node-budget)"
        ),
    };
    let status = status::held_back(p, ConditionReason::BudgetExceeded, &why, now);
    announce_hold(
        p,
        status,
        ConditionReason::BudgetExceeded,
        why,
        OVER_BUDGET_RECHECK,
    )
}

/// The decision for an ImagePrefetch held back for `reason`: its new
/// status, a Warning the first time, nothing else.
fn announce_hold(
    p: &ImagePrefetch,
    status: ImagePrefetchStatus,
    reason: ConditionReason,
    why: String,
    requeue: Duration,
) -> Decision {
    let before = degraded(p.status.as_ref()).map(|(r, _)| r);
    let events = match reason.announced_as() {
        Some(event) if before != Some(reason) => vec![Announcement {
            type_: EventType::Warning,
            reason: event,
            note: why,
            node: None,
            image: None,
        }],
        _ => Vec::new(),
    };
    Decision {
        apply: Vec::new(),
        delete: Vec::new(),
        status: (p.status.as_ref() != Some(&status)).then_some(status),
        events,
        new_seeds: 0,
        selected: 0,
        progressing: false,
        requeue,
        expire: false,
    }
}

/// The whole cluster as the seed policy sees it: nodes' groups and
/// usability, and what every NodeImageSet says.
fn cluster_view(observed: &Observed<'_>, config: &Config) -> ClusterView {
    let mut view = ClusterView {
        isolate_private: config.policy.private_images == policy::PrivateImages::Isolate,
        ..Default::default()
    };
    for n in observed.nodes {
        let name = n.name_any();
        view.groups
            .insert(name.clone(), select::sequencing_group(n));
        let cordoned = n
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        if let Some(address) = select::internal_ip(n) {
            view.addresses.insert(name.clone(), address.to_string());
        }
        if select::is_ready(n) && !cordoned && n.metadata.deletion_timestamp.is_none() {
            view.usable.insert(name);
        }
    }
    view.add_sets(
        observed
            .owned
            .iter()
            .chain(observed.sharing)
            .map(|s| s.as_ref()),
    );
    view
}

/// Entries whose agent has said nothing for long, and when the next one
/// will have.
struct Silence {
    /// (node, image as listed).
    silent: Vec<(String, String)>,
    next: Option<Duration>,
}

/// Which entries of `sets` have had no report from their agent for longer
/// than `after` since the controller first saw them so (a Ready node whose
/// agent does not run: crash-looping, not scheduled, its DaemonSet's
/// selector missing the node). Updates the memory of when each was first
/// seen without a report; an entry reported on is forgotten.
fn agent_silence(
    uid: &str,
    sets: &[&SetView],
    unreported: &mut Unreported,
    at: Instant,
    after: Duration,
) -> Silence {
    let mut silent = Vec::new();
    let mut next: Option<Duration> = None;
    // Built anew each time: what was reported, or is no longer listed, goes.
    let before = unreported.0.remove(uid).unwrap_or_default();
    let mut still = HashMap::new();
    for set in sets {
        let node = &set.spec.node_name;
        for entry in &set.spec.image_set {
            // A report of an earlier refresh round is no answer to this one.
            if set
                .report_on(&entry.name)
                .is_some_and(|r| r.refresh == entry.refresh)
            {
                continue;
            }
            let key = Unreported::key(node, &entry.name);
            let since = *still
                .entry(key)
                .or_insert(before.get(&key).copied().unwrap_or(at));
            let quiet = at.saturating_duration_since(since);
            if quiet >= after {
                silent.push((node.clone(), entry.name.to_string()));
            } else {
                let left = after - quiet;
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
    }
    if !still.is_empty() {
        unreported.0.insert(uid.to_string(), still);
    }
    silent.sort();
    Silence { silent, next }
}

/// Events for what changed since the last status: a Degraded reason the
/// controller decides (a Warning when it first appears, so `kubectl
/// describe` and event-based alerting show it too), images ready
/// everywhere, failures not announced before.
fn announcements(
    p: &ImagePrefetch,
    owner: &Owner<'_>,
    sets: &[&SetView],
    status: &ImagePrefetchStatus,
    announced: &mut HashSet<(String, String, String)>,
) -> Vec<Announcement> {
    let mut out = Vec::new();
    let before = p.status.as_ref();
    // A Degraded reason the controller itself decided (a node's failed pull
    // has its own Event, per node and image).
    if let Some((reason, message)) = degraded(Some(status))
        && let Some(event) = reason.announced_as()
        && degraded(before).map(|(r, _)| r) != Some(reason)
    {
        out.push(Announcement {
            type_: EventType::Warning,
            reason: event,
            note: message,
            node: None,
            image: None,
        });
    }
    for img in &status.images {
        let was = before
            .and_then(|s| s.images.iter().find(|i| i.image == img.image))
            .map(|i| i.available)
            .unwrap_or(0);
        if status.desired_nodes > 0 && img.available == status.desired_nodes && was < img.available
        {
            out.push(Announcement {
                type_: EventType::Normal,
                reason: EventReason::ImageReady,
                node: None,
                image: Some(img.image.clone()),
                note: format!("{} is on all {} nodes", img.image, status.desired_nodes),
            });
        }
    }
    for set in sets {
        let Some(why) = &set.unreadable_report else {
            continue;
        };
        let node = &set.spec.node_name;
        if announced.insert((
            owner.uid.to_string(),
            node.clone(),
            format!("unreadable {why}"),
        )) {
            out.push(Announcement {
                type_: EventType::Warning,
                reason: EventReason::ReportUnreadable,
                node: Some(node.clone()),
                image: None,
                note: format!(
                    "node {node}'s report on NodeImageSet {} cannot be read ({why}); it counts as no report",
                    set.name
                ),
            });
        }
    }
    for f in status::failures(sets) {
        if announced.insert((owner.uid.to_string(), f.node.clone(), f.image.clone())) {
            out.push(Announcement {
                type_: EventType::Warning,
                reason: EventReason::PullFailed,
                node: Some(f.node.clone()),
                image: Some(f.image.clone()),
                note: format!(
                    "{} failed on node {}: {} ({})",
                    f.image, f.node, f.message, f.reason
                ),
            });
        }
    }
    out
}

/// The NodeImageSet `node` should have for `p`.
fn desired_spec(
    p: &ImagePrefetch,
    owner: &Owner<'_>,
    node: &str,
    entries: Vec<NodeImage>,
    account_secrets: &[String],
    config: &Config,
) -> NodeImageSetSpec {
    // The spec's secrets, then its ServiceAccount's, each once.
    let mut secrets: Vec<&str> = p
        .spec
        .image_pull_secrets
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    for s in account_secrets {
        if !secrets.contains(&s.as_str()) {
            secrets.push(s);
        }
    }
    NodeImageSetSpec {
        node_name: node.to_string(),
        image_set: entries,
        image_pull_secrets: secrets
            .iter()
            .map(|s| SecretReference {
                namespace: owner.namespace.to_string(),
                name: s.to_string(),
            })
            .collect(),
        image_download_retry_limit: config.retry_limit,
        pull_stall_timeout_seconds: p.spec.pull_stall_timeout_seconds,
        pin: p.spec.pin,
        unreadable: None,
    }
}

/// A NodeImageSet to write: its name and spec, made into the object — with
/// the labels and annotation [`crate::index::managed_meta`] expects — only
/// when its write goes out. Held as objects, a fan-out to 5,000 nodes kept
/// 5,000 sets with their metadata maps for the whole reconcile, the memory
/// a cache entry took after them.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub name: String,
    pub spec: NodeImageSetSpec,
    labelled: Arc<Labelled>,
}

/// The owner as its sets are labelled, shared by one decision's sets.
#[derive(Debug, PartialEq)]
struct Labelled {
    namespace: String,
    name: String,
    uid: String,
    reference: String,
}

impl Desired {
    pub fn name_any(&self) -> String {
        self.name.clone()
    }

    pub fn object(&self) -> NodeImageSet {
        let mut set = NodeImageSet::new(&self.name, self.spec.clone());
        let owner = &self.labelled;
        set.metadata.labels = Some(keys::node_image_set_labels(
            &owner.namespace,
            &owner.name,
            &owner.uid,
            &self.spec.node_name,
        ));
        set.metadata.annotations = Some(BTreeMap::from([(
            keys::PREFETCH_REF_ANNOTATION.to_string(),
            owner.reference.clone(),
        )]));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registries::AllowList;
    use crate::select::tests::node;
    use crd::{ImagePrefetchSpec, NodeImageSetStatus, NodeImageStatus, PullState, RegistryPolicy};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    const A: &str = "registry.example.com/team/a:1";
    const B: &str = "other.example.com/team/b:1";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn prefetch(images: &[&str]) -> ImagePrefetch {
        let mut p = ImagePrefetch::new("web", ImagePrefetchSpec::of_images(images));
        p.metadata.namespace = Some("team".into());
        p.metadata.uid = Some("uid-1".into());
        p.metadata.generation = Some(1);
        p
    }

    /// The controller between reconciles, and the cluster it sees.
    struct World {
        nodes: Vec<Arc<Node>>,
        sets: BTreeMap<String, NodeImageSet>,
        seeds: SeedBook,
        announced: HashSet<(String, String, String)>,
        unreported: Unreported,
        config: Config,
        start: Instant,
        /// What the namespace's other ImagePrefetches hold.
        namespace_entries: usize,
        cluster_entries: usize,
        /// Other ImagePrefetches' sets.
        others: Vec<Arc<SetView>>,
    }

    impl World {
        fn new(n: usize) -> Self {
            World {
                nodes: (0..n)
                    .map(|i| Arc::new(node(&format!("node-{i}"), &[])))
                    .collect(),
                sets: BTreeMap::new(),
                seeds: SeedBook::default(),
                announced: HashSet::new(),
                unreported: Unreported::default(),
                // Holders findable at once: the policy's tests cover the grace.
                config: {
                    let mut c = Config::default();
                    c.policy.findable_after = Duration::ZERO;
                    c
                },
                start: Instant::now(),
                namespace_entries: 0,
                cluster_entries: 0,
                others: Vec::new(),
            }
        }

        fn decide(&mut self, p: &ImagePrefetch, after: Duration) -> Decision {
            let owned: Vec<Arc<SetView>> = self
                .sets
                .values()
                .map(|s| {
                    let mut v = SetView::of(s);
                    // As the API server returns them: labelled with the owner.
                    v.owner = names::label_value(p.metadata.uid.as_deref().unwrap()).into();
                    Arc::new(v)
                })
                .collect();
            let keys: HashSet<String> =
                p.spec.images.iter().map(|i| policy::image_key(i)).collect();
            let sharing: Vec<Arc<SetView>> = self
                .others
                .iter()
                .filter(|s| s.keys.iter().any(|k| keys.contains(k.as_ref())))
                .cloned()
                .collect();
            let mut entries_on: HashMap<String, usize> = HashMap::new();
            for s in owned.iter().chain(&self.others) {
                *entries_on.entry(s.spec.node_name.clone()).or_default() += s.spec.image_set.len();
            }
            let observed = Observed {
                prefetch: p,
                nodes: &self.nodes,
                owned: &owned,
                sharing: &sharing,
                entries_on: &entries_on,
                now: crd::condition::now(),
                at: self.start + after,
                namespace_entries: self.namespace_entries,
                cluster_entries: self.cluster_entries,
                account_secrets: None,
            };
            let memory = Memory {
                seeds: &mut self.seeds,
                announced: &mut self.announced,
                unreported: &mut self.unreported,
            };
            decide(&observed, &self.config, memory).unwrap()
        }

        /// The writes made: sets applied keep the agent's reports, stale ones go.
        fn act(&mut self, p: &mut ImagePrefetch, d: &Decision) {
            for set in &d.apply {
                let mut status = self
                    .sets
                    .get(&set.name_any())
                    .and_then(|s| s.status.clone());
                // The agent reports only on the entries the set lists.
                if let Some(st) = status.as_mut() {
                    st.images
                        .retain(|r| set.spec.image_set.iter().any(|e| e.name == r.name));
                }
                let mut set = set.object();
                set.status = status;
                self.sets.insert(set.name_any(), set);
            }
            for stale in &d.delete {
                self.sets.remove(&stale.name);
            }
            if let Some(status) = &d.status {
                p.status = Some(status.clone());
            }
        }

        fn report(&mut self, node: &str, image: &str, state: PullState) {
            let set = self
                .sets
                .values_mut()
                .find(|s| s.spec.node_name == node)
                .expect("the node has a set");
            let st = set.status.get_or_insert_with(NodeImageSetStatus::default);
            st.images.retain(|r| r.name != image);
            st.images.push(NodeImageStatus {
                digest: (state == PullState::Available).then(|| DIGEST.into()),
                reason: (state == PullState::Failed).then_some(crd::PullFailure::NotFound),
                ..NodeImageStatus::new(image, state, 1)
            });
        }

        fn seeds_of(&self, image: &str) -> Vec<String> {
            self.sets
                .values()
                .filter(|s| {
                    s.spec
                        .image_set
                        .iter()
                        .any(|e| e.name == image && e.registry_policy == RegistryPolicy::Default)
                })
                .map(|s| s.spec.node_name.clone())
                .collect()
        }
    }

    fn reasons(d: &Decision) -> Vec<&str> {
        d.events.iter().map(|e| e.reason.as_str()).collect()
    }

    /// The condition `type_` of the decision's new status.
    fn condition_of<'a>(d: &'a Decision, type_: &str) -> &'a Condition {
        d.status
            .as_ref()
            .expect("a new status")
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("the condition")
    }

    fn condition<'a>(d: &'a Decision, type_: &str) -> (&'a str, &'a str) {
        let c = condition_of(d, type_);
        (c.status.as_str(), c.reason.as_str())
    }

    /// A namespace's budget of node×image entries: an ImagePrefetch that
    /// would pass it writes nothing but a Degraded status and one Warning,
    /// is looked at again soon, and proceeds once there is room.
    #[test]
    fn the_ttl_runs_from_ready() {
        let now = crd::condition::now();
        let at = |secs_ago: i64| {
            Time(k8s_openapi::jiff::Timestamp::from_second(now.0.as_second() - secs_ago).unwrap())
        };
        let status = |ready: bool, secs_ago: i64| ImagePrefetchStatus {
            conditions: vec![crd::condition::condition(
                &[],
                ConditionType::Ready,
                ready,
                ConditionReason::AllImagesPresent,
                "",
                None,
                &at(secs_ago),
            )],
            ..Default::default()
        };
        assert_eq!(
            ttl_left(&status(true, 10), Some(30), &now),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            ttl_left(&status(true, 10), Some(5), &now),
            Some(Duration::ZERO)
        );
        assert_eq!(ttl_left(&status(false, 100), Some(5), &now), None);
        assert_eq!(ttl_left(&status(true, 100), None, &now), None);
    }

    #[test]
    fn an_imageprefetch_past_its_namespaces_budget_is_held_back() {
        let mut w = World::new(3);
        w.config.namespace_budget = Some(8);
        w.namespace_entries = 6;
        let mut p = prefetch(&["registry.example.com/a:1"]);
        let d = w.decide(&p, Duration::ZERO);
        assert!(d.apply.is_empty() && d.delete.is_empty(), "{d:?}");
        assert_eq!(d.requeue, OVER_BUDGET_RECHECK);
        let degraded = condition_of(&d, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "BudgetExceeded")
        );
        assert!(
            degraded.message.contains("3 node×image entries")
                && degraded.message.contains("6 of the 8"),
            "{}",
            degraded.message
        );
        assert_eq!(d.events.len(), 1);
        w.act(&mut p, &d);
        let again = w.decide(&p, Duration::ZERO);
        assert!(
            again.events.is_empty() && again.status.is_none(),
            "said once: {again:?}"
        );
        // Room made: it proceeds, its seed first.
        w.namespace_entries = 5;
        let d = w.decide(&p, Duration::ZERO);
        assert_eq!((d.selected, d.new_seeds, d.apply.len()), (3, 1, 1));
    }

    /// All namespaces together: the cluster's budget bounds the controller's
    /// cache (and memory) whatever the tenants write.
    #[test]
    fn an_imageprefetch_past_the_clusters_budget_is_held_back() {
        let mut w = World::new(3);
        w.config.cluster_budget = Some(100);
        w.cluster_entries = 98;
        let p = prefetch(&["registry.example.com/a:1"]);
        let d = w.decide(&p, Duration::ZERO);
        assert!(d.apply.is_empty(), "{d:?}");
        let degraded = condition_of(&d, "Degraded");
        assert_eq!(degraded.reason, "BudgetExceeded");
        assert!(
            degraded.message.contains("98 of the 100")
                && degraded.message.contains("--cluster-budget"),
            "{}",
            degraded.message
        );
        w.cluster_entries = 97;
        let d = w.decide(&p, Duration::ZERO);
        assert_eq!((d.selected, d.new_seeds), (3, 1), "room for 3");
    }

    /// One node selected by many ImagePrefetches: the node's budget bounds
    /// what its agent holds, whatever the namespaces' and cluster's budgets.
    #[test]
    fn an_imageprefetch_past_a_nodes_budget_is_held_back() {
        let mut w = World::new(3);
        w.config.node_budget = Some(10);
        let entries = (0..9)
            .map(|i| {
                NodeImage::of(
                    format!("registry.example.com/t/{i}:1"),
                    RegistryPolicy::Mirror,
                )
            })
            .collect();
        let mut theirs = NodeImageSet::new(
            "theirs-node-1",
            NodeImageSetSpec::for_node("node-1", entries),
        );
        theirs.metadata.uid = Some("their-set".into());
        let mut view = SetView::of(&theirs);
        view.owner = "someone-else".into();
        w.others.push(Arc::new(view));
        let p = prefetch(&["registry.example.com/a:1", "registry.example.com/b:1"]);
        let d = w.decide(&p, Duration::ZERO);
        assert!(d.apply.is_empty(), "{d:?}");
        let degraded = condition_of(&d, "Degraded");
        assert_eq!(degraded.reason, "BudgetExceeded");
        assert!(
            degraded.message.contains("node node-1")
                && degraded.message.contains("9 of the 10")
                && degraded.message.contains("--node-budget"),
            "{}",
            degraded.message
        );
        let one = prefetch(&["registry.example.com/a:1"]);
        let d = w.decide(&one, Duration::ZERO);
        assert_eq!((d.selected, d.new_seeds), (3, 1), "room for 1 more");
    }

    #[test]
    fn a_new_prefetch_gets_one_seed_no_empty_sets_and_says_so() {
        let mut w = World::new(3);
        let mut p = prefetch(&[A]);
        let d = w.decide(&p, Duration::ZERO);
        // Only the seed's set: the nodes waiting for it get theirs when
        // they are released.
        assert_eq!(d.apply.len(), 1);
        assert_eq!(d.apply[0].spec.image_set.len(), 1);
        assert!(d.delete.is_empty());
        assert_eq!((d.selected, d.new_seeds), (3, 1));
        let status = d.status.as_ref().unwrap();
        assert_eq!(
            (status.images[0].waiting, status.ready.as_str()),
            (3, "0/3"),
            "nodes without a set count as waiting"
        );
        assert_eq!(reasons(&d), ["SeedChosen"]);
        assert!(d.progressing);
        assert_eq!(condition(&d, "Ready").0, "False");
        w.act(&mut p, &d);
        assert_eq!(w.seeds_of(A).len(), 1);
    }

    #[test]
    fn nothing_changed_means_nothing_written() {
        let mut w = World::new(3);
        let mut p = prefetch(&[A]);
        let d = w.decide(&p, Duration::ZERO);
        w.act(&mut p, &d);
        let again = w.decide(&p, Duration::from_secs(1));
        assert!(again.apply.is_empty() && again.delete.is_empty());
        assert_eq!(again.status, None);
        assert!(again.events.is_empty(), "{:?}", again.events);
    }

    /// `n` nodes and an ImagePrefetch of `A` whose seed holds it, and a
    /// second node that resolved the tag at the registry too (by t = 1 s).
    #[test]
    fn an_unchanged_set_is_told_without_building_it() {
        // A name past the 63 characters of a label value: the label is
        // shortened, and the fingerprint from the values must be too.
        let long = "a".repeat(80);
        let owner = Owner {
            namespace: "team",
            name: &long,
            uid: "uid-1",
        };
        let reference = format!("team/{long}");
        let built = Desired {
            name: "set".into(),
            spec: NodeImageSetSpec::for_node("node-1", vec![]),
            labelled: Arc::new(Labelled {
                namespace: owner.namespace.into(),
                name: owner.name.into(),
                uid: owner.uid.into(),
                reference: reference.clone(),
            }),
        }
        .object();
        let labels = [owner.uid, owner.namespace, owner.name, "node-1"].map(names::label_value);
        assert_eq!(
            crate::index::managed_meta(&built.metadata.labels, &built.metadata.annotations),
            crate::index::meta_fingerprint([
                Some(&labels[0]),
                Some(&labels[1]),
                Some(&labels[2]),
                Some(&labels[3]),
                Some(&reference),
            ])
        );
    }

    fn seeded(n: usize) -> (World, ImagePrefetch) {
        let mut w = World::new(n);
        let mut p = prefetch(&[A]);
        let d = w.decide(&p, Duration::ZERO);
        w.act(&mut p, &d);
        let seed = w.seeds_of(A)[0].clone();
        w.report(&seed, A, PullState::Available);
        let d = w.decide(&p, Duration::from_secs(1));
        w.act(&mut p, &d);
        let seeds = w.seeds_of(A);
        assert_eq!(
            seeds.len(),
            crate::policy::CONFIRMATIONS,
            "a second resolves the tag"
        );
        for s in seeds.iter().filter(|s| **s != seed) {
            w.report(s, A, PullState::Available);
        }
        (w, p)
    }

    /// A node whose report still says Available for an image it is not
    /// listed for yet (it held it before the controller restarted) becomes
    /// a holder by the controller's own write, whose echo triggers
    /// nothing: the decision that lists it looks again at once.
    #[test]
    fn listing_an_image_a_node_already_reports_looks_again_at_once() {
        let (mut w, mut p) = seeded(4);
        let waiting: Vec<String> = w
            .nodes
            .iter()
            .map(|n| n.name_any())
            .filter(|n| !w.sets.values().any(|s| s.spec.node_name == *n))
            .collect();
        assert_eq!(waiting.len(), 2, "the waiting nodes have no set");
        // Empty sets an earlier version wrote, which still carry reports.
        let uid = p.metadata.uid.clone().unwrap();
        for n in &waiting {
            let name = names::node_image_set_name(&p.name_any(), &uid, n);
            let set = NodeImageSet::new(&name, NodeImageSetSpec::for_node(n, vec![]));
            w.sets.insert(name, set);
            w.report(n, A, PullState::Available);
        }
        let d = w.decide(&p, Duration::from_secs(2));
        assert!(!d.apply.is_empty());
        assert_eq!(d.requeue, LOOK_AGAIN);
        w.act(&mut p, &d);
        // Nothing new: the usual requeue.
        let d = w.decide(&p, Duration::from_secs(3));
        assert!(d.apply.is_empty());
        assert!(d.requeue > LOOK_AGAIN);
    }

    #[test]
    fn the_image_on_every_node_is_ready_once_and_announced_once() {
        let (mut w, mut p) = seeded(3);
        // The other node is released with the agreed digest pinned.
        let d = w.decide(&p, Duration::from_secs(2));
        assert_eq!(d.apply.len(), 1);
        let mirror = &d.apply[0].spec.image_set[0];
        assert_eq!(mirror.registry_policy, RegistryPolicy::Mirror);
        assert_eq!(mirror.digest.as_deref(), Some(DIGEST));
        w.act(&mut p, &d);
        let other = d.apply[0].spec.node_name.clone();
        w.report(&other, A, PullState::Available);
        let d = w.decide(&p, Duration::from_secs(3));
        assert_eq!(condition(&d, "Ready"), ("True", "AllImagesPresent"));
        assert!(!d.progressing);
        assert_eq!(reasons(&d), ["ImageReady"]);
        w.act(&mut p, &d);
        assert!(w.decide(&p, Duration::from_secs(4)).events.is_empty());
    }

    /// A Ready node whose agent never reports (crash-looping, not
    /// scheduled there) holds no wave back once it has been silent for the
    /// set time, and the rollout says so instead of Progressing for ever.
    #[test]
    fn a_node_whose_agent_says_nothing_holds_nothing_back_and_is_named() {
        let (mut w, mut p) = seeded(5);
        // Two holders: two Mirror releases, to nodes whose agents are silent.
        let d = w.decide(&p, Duration::from_secs(1));
        assert_eq!(d.apply.len(), 2);
        let mutes: Vec<String> = d.apply.iter().map(|s| s.spec.node_name.clone()).collect();
        let mute = mutes[0].clone();
        w.act(&mut p, &d);
        // The next reconcile (the watch brings the write back) sees them unreported.
        let d = w.decide(&p, Duration::from_secs(2));
        assert!(d.apply.is_empty(), "in flight: the last node waits");
        let d = w.decide(&p, Duration::from_secs(62));
        assert!(d.apply.is_empty(), "in flight: the last node waits");
        assert_eq!(
            d.requeue,
            Duration::from_secs(240),
            "looks again when it turns silent"
        );
        // Five minutes of silence: the last node is released, Degraded names the mute ones.
        let d = w.decide(&p, Duration::from_secs(302));
        assert_eq!(d.apply.len(), 1, "{d:?}");
        assert!(!mutes.contains(&d.apply[0].spec.node_name));
        let (status, reason) = condition(&d, "Degraded");
        assert_eq!((status, reason), ("True", "AgentNotReporting"));
        let message = &condition_of(&d, "Degraded").message;
        assert!(message.contains(&mute), "{message}");
        assert!(reasons(&d).contains(&"AgentNotReporting"), "{:?}", d.events);
        // They report at last: named no more.
        w.act(&mut p, &d);
        for m in &mutes {
            w.report(m, A, PullState::Available);
        }
        let d = w.decide(&p, Duration::from_secs(303));
        assert_ne!(condition(&d, "Degraded").1, "AgentNotReporting");
    }

    /// Events about different nodes or images are told apart (kube merges
    /// those of one action and related object), and none is refused for a
    /// note past events.k8s.io's 1 KiB.
    #[test]
    fn events_name_their_node_and_image_and_fit_the_api() {
        let failed = |node: &str, image: &str| Announcement {
            type_: EventType::Warning,
            reason: EventReason::PullFailed,
            note: "x".repeat(5000),
            node: Some(node.into()),
            image: Some(image.into()),
        };
        let (a, b) = (
            failed("n1", "r.example/a:1").event(),
            failed("n2", "r.example/b:1").event(),
        );
        assert_ne!(a.action, b.action);
        assert_ne!(a.secondary, b.secondary);
        assert_eq!(
            a.secondary.as_ref().and_then(|r| r.kind.as_deref()),
            Some("Node")
        );
        assert!(a.note.as_ref().unwrap().len() <= MAX_NOTE);
        let long = failed("n1", &format!("r.example/{}:1", "a".repeat(300))).event();
        assert!(long.action.len() <= MAX_ACTION, "{}", long.action.len());
    }

    #[test]
    fn a_node_no_longer_selected_loses_its_set() {
        let mut w = World::new(3);
        let mut p = prefetch(&[A]);
        let d = w.decide(&p, Duration::ZERO);
        w.act(&mut p, &d);
        let gone = w.nodes.pop().unwrap();
        let d = w.decide(&p, Duration::from_secs(1));
        assert_eq!(
            d.delete.iter().map(|s| s.node.as_str()).collect::<Vec<_>>(),
            [gone.name_any().as_str()]
        );
        assert_eq!(d.selected, 2);
    }

    #[test]
    fn no_prefetch_reaches_past_the_administrators_scope() {
        let mut w = World::new(2);
        w.nodes.push(Arc::new(node(
            "control-plane",
            &[("node-role.kubernetes.io/control-plane", "")],
        )));
        let p = prefetch(&[A]);
        let d = w.decide(&p, Duration::ZERO);
        assert_eq!(d.selected, 2);
        assert!(d.apply.iter().all(|s| s.spec.node_name != "control-plane"));
        // Allowed by the administrator: targeted like any node.
        w.config.node_scope.control_plane = true;
        assert_eq!(w.decide(&p, Duration::from_secs(1)).selected, 3);
    }

    #[test]
    fn a_refused_registry_is_degraded_with_a_warning_and_nothing_for_it() {
        let mut w = World::new(2);
        w.config.allowed = AllowList::parse("registry.example.com");
        let mut p = prefetch(&[A, B]);
        let d = w.decide(&p, Duration::ZERO);
        assert_eq!(condition(&d, "Degraded"), ("True", "RegistryNotAllowed"));
        assert!(reasons(&d).contains(&"RegistryNotAllowed"));
        assert!(
            d.apply
                .iter()
                .all(|s| s.spec.image_set.iter().all(|e| e.name != B))
        );
        // Said once, not at every reconcile.
        w.act(&mut p, &d);
        let again = w.decide(&p, Duration::from_secs(1));
        assert!(!reasons(&again).contains(&"RegistryNotAllowed"));
    }

    #[test]
    fn every_candidate_failed_is_degraded_with_when_it_tries_again() {
        let mut w = World::new(1);
        let mut p = prefetch(&[A]);
        let d = w.decide(&p, Duration::ZERO);
        w.act(&mut p, &d);
        w.report("node-0", A, PullState::Failed);
        let d = w.decide(&p, Duration::from_secs(1));
        // The failure is announced; the only candidate cools down, its
        // entry is withdrawn, and the controller is back when that ends.
        assert_eq!(reasons(&d), ["PullFailed"]);
        assert_eq!(w.seeds_of(A), ["node-0"]);
        let cooldown = w.config.policy.seed_cooldown;
        assert_eq!(d.requeue, cooldown, "back when the cool-down ends");
        w.act(&mut p, &d);
        assert!(w.seeds_of(A).is_empty());
        // With the failed entry gone: Degraded says why and when, once.
        let d = w.decide(&p, Duration::from_secs(2));
        assert_eq!(reasons(&d), ["NoSeedAvailable"]);
        let (status, reason) = condition(&d, "Degraded");
        assert_eq!((status, reason), ("True", "NoSeedAvailable"));
        w.act(&mut p, &d);
        let again = w.decide(&p, Duration::from_secs(3));
        assert!(again.events.is_empty(), "{:?}", again.events);
        // After the cool-down the node is seed again: no dead end.
        let later = w.decide(&p, Duration::from_secs(1) + cooldown);
        assert_eq!(later.new_seeds, 1, "{:?}", later.events);
    }
}
