//! Registry-policy sequencing: which selected node gets which image, with
//! which policy, and when. Pure: no I/O; time comes in as an argument.
//!
//! Per image and sequencing group — a topology zone and a platform, since a
//! node of one architecture holds none of another's layers (see
//! [`crate::select::sequencing_group`]):
//! - while no node of the zone has the image, exactly one **seed** node has a
//!   `Default` entry (it may reach the external registry); every other node
//!   has no entry at all for that image: *waiting is absence*, so an agent can
//!   never start a pull the controller has not released;
//! - one group seeds at a time: another platform of the zone, or (by
//!   default, [`ZoneSeeding::Sequential`]) another zone, seeds once the first
//!   group holds the image, so its Default pull is served by the mirror;
//! - once some node of the zone reports the image Available, the others get
//!   `Mirror` entries pinned to the digest that was resolved, in growing waves:
//!   at most `pulls_per_holder` in flight per node holding the image (each
//!   finished node is one more source for the mirror), so the holders double
//!   each round and N nodes take about log₂ N peer rounds; an absolute cap
//!   is an option;
//! - a seed that fails past its retry limit, makes no progress for a deadline, or whose
//!   node goes away is replaced; seeds are shared by every ImagePrefetch that
//!   asks for the same image (the [`SeedBook`] lives as long as the controller).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use crd::{NodeImage, PullState, RegistryPolicy, SharedStr, reference};

use crate::index::SetFacts;

use crate::select::score;

/// Sequencing settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `false`: every node pulls with `Default` at once (for comparison only).
    pub sequencing: bool,
    /// Mirror pulls of one image in flight per node that holds it, per
    /// group: 1 keeps each holder's NIC to one stream at a time (spegel
    /// spreads lookups over the least-used providers), and doubles the
    /// holders each round.
    pub pulls_per_holder: usize,
    /// Most Mirror pulls of one image in flight at once, per group, whatever
    /// the holders (`None`: no cap; the waves grow with the holders).
    pub wave_cap: Option<usize>,
    /// A seed that has shown no progress (more bytes fetched) for this long
    /// is replaced.
    pub seed_deadline: Duration,
    /// A node that failed or stalled as seed is not chosen again for this
    /// long; doubled at each failure, up to `seed_cooldown_cap`.
    pub seed_cooldown: Duration,
    pub seed_cooldown_cap: Duration,
    pub private_images: PrivateImages,
    pub zone_seeding: ZoneSeeding,
    /// A node that holds an image counts as a source (Mirror pulls released
    /// on its account, other groups' seeds started) only this long after it
    /// was first seen Available: spegel advertises asynchronously, and a
    /// Default pull that misses the mirror goes to the registry.
    pub findable_after: Duration,
    /// Name a holder in each Mirror entry (its address from its Node): the
    /// agent asks that peer first, so a holder is a source as soon as it
    /// reports the image, not `findable_after` later, and serves only the
    /// pulls named to it. Holders without an address are counted on the
    /// old way (findable, chosen by spegel).
    pub named_sources: bool,
    /// When every Mirror pull of an image in a group has failed and none has
    /// succeeded for this long, no peer can serve it (spegel cannot find
    /// it, e.g. on containerd 2.0): one of those nodes seeds it again from
    /// the registry, and again after as long, until the mirror serves.
    pub reseed_after: Duration,
}

/// How the zones of a cluster seed an image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ZoneSeeding {
    /// One zone seeds first; the others' seeds start once it holds the image,
    /// so their Default pulls find its blobs in the in-cluster mirror: each
    /// blob crosses the uplink once per cluster (the product's promise; on
    /// premises the uplink, not traffic between zones, is the scarce link).
    #[default]
    Sequential,
    /// Every zone seeds at once from the registry: a rollout sooner by one
    /// seed's pull, the uplink used once per zone.
    Parallel,
}

impl std::str::FromStr for ZoneSeeding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sequential" => Ok(ZoneSeeding::Sequential),
            "parallel" => Ok(ZoneSeeding::Parallel),
            other => Err(format!("{other}: expected sequential or parallel")),
        }
    }
}

/// Whether an image a seed pulled with credentials is served (from the
/// in-cluster mirror) to ImagePrefetches that name no credentials for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrivateImages {
    /// Only to ImagePrefetches of the same namespace that name pull secrets;
    /// everyone else seeds from the registry, which asks for credentials.
    #[default]
    Isolate,
    /// To every ImagePrefetch (spegel's own behaviour): one download, but a
    /// tenant without credentials gets another tenant's private image.
    Share,
}

impl std::str::FromStr for PrivateImages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "isolate" => Ok(PrivateImages::Isolate),
            "share" => Ok(PrivateImages::Share),
            other => Err(format!("{other}: expected isolate or share")),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sequencing: true,
            pulls_per_holder: 1,
            wave_cap: None,
            seed_deadline: Duration::from_secs(15 * 60),
            seed_cooldown: Duration::from_secs(30),
            seed_cooldown_cap: Duration::from_secs(5 * 60),
            private_images: PrivateImages::default(),
            zone_seeding: ZoneSeeding::default(),
            findable_after: Duration::from_secs(2),
            named_sources: true,
            reseed_after: Duration::from_secs(5 * 60),
        }
    }
}

/// How long a fresh seed claim counts before any NodeImageSet shows it: the
/// time for our own write to come back through the watch.
const CLAIM_SETTLE: Duration = Duration::from_secs(30);

/// The key an image is known by across ImagePrefetches: its canonical form,
/// so `busybox` and `docker.io/library/busybox:latest` are one image.
pub fn image_key(image: &str) -> String {
    reference::parse(image)
        .map(|r| r.canonical())
        .unwrap_or_else(|_| image.to_string())
}

/// The key under which what seeds fetched is shared: an image pulled with
/// credentials (a set naming pull secrets, of `namespace`) is shared only
/// with ImagePrefetches of that namespace that name pull secrets too, when
/// private images are isolated; otherwise, with everyone.
pub fn shared_key(key: &str, private_to: Option<&str>) -> String {
    match private_to {
        Some(namespace) => format!("{key} private-to={namespace}"),
        None => key.to_string(),
    }
}

/// What every NodeImageSet says about one image.
#[derive(Clone, Debug, Default)]
pub struct ImageFacts {
    /// Nodes where the image is Available, with the digest each resolved.
    pub available: BTreeMap<String, Option<SharedStr>>,
    /// Nodes with a `Default` entry for the image, and the state each reports.
    pub seeding: BTreeMap<String, Option<PullState>>,
    /// Bytes each seed's pull under way has fetched so far, as it last told.
    pub progress: BTreeMap<String, i64>,
    /// Mirror pulls under way named to each holder, every ImagePrefetch's.
    pub serving: HashMap<String, usize>,
}

/// The cluster as the policy sees it.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// By [`image_key`].
    pub images: HashMap<String, ImageFacts>,
    /// Sequencing group of each node: its zone and platform
    /// ([`crate::select::sequencing_group`]); "" when unknown.
    pub groups: HashMap<String, String>,
    /// Nodes that are Ready and not being deleted or cordoned.
    pub usable: HashSet<String>,
    /// Each node's InternalIP, where its mirror listens (named sources).
    pub addresses: HashMap<String, String>,
    /// Images pulled with credentials are shared within their namespace only
    /// (see [`shared_key`]).
    pub isolate_private: bool,
}

impl ClusterView {
    /// Facts from every NodeImageSet (of every ImagePrefetch).
    pub fn add_sets<'a, S: SetFacts + 'a>(&mut self, sets: impl IntoIterator<Item = &'a S>) {
        for set in sets {
            let node = &set.spec().node_name;
            let private_to = self
                .isolate_private
                .then(|| set.spec().image_pull_secrets.first())
                .flatten()
                .map(|s| s.namespace.as_str());
            for (entry, key) in set.spec().image_set.iter().zip(set.keys().iter()) {
                let report = set.report_on(&entry.name);
                let key = shared_key(key, private_to);
                let facts = self.images.entry(key).or_default();
                let state = report.map(|r| r.state);
                if state == Some(PullState::Available) {
                    facts
                        .available
                        .insert(node.clone(), report.and_then(|r| r.digest.clone()));
                }
                if let Some(from) = &entry.source
                    && !matches!(state, Some(PullState::Available | PullState::Failed))
                {
                    *facts.serving.entry(from.node.to_string()).or_default() += 1;
                }
                if entry.registry_policy == RegistryPolicy::Default {
                    facts.seeding.insert(node.clone(), state);
                    if let Some(bytes) = report.and_then(|r| r.progress_bytes) {
                        facts.progress.insert(node.clone(), bytes);
                    }
                }
            }
        }
    }

    fn group(&self, node: &str) -> &str {
        self.groups.get(node).map(String::as_str).unwrap_or("")
    }
}

/// One ImagePrefetch's current entries, by (node, image key), and with
/// whom it shares seeds.
#[derive(Clone, Debug, Default)]
pub struct Current {
    entries: HashMap<(String, String), (NodeImage, Option<PullState>)>,
    /// The digest each Available entry reported.
    digests: HashMap<(String, String), SharedStr>,
    /// The namespace, when the ImagePrefetch pulls with credentials.
    private_to: Option<String>,
    /// (node, image key) entries whose agent has said nothing for long:
    /// not in flight (its node holds no wave back).
    silent: HashSet<(String, String)>,
    /// The refresh round each (node, image key) report answers.
    report_rounds: HashMap<(String, String), Option<String>>,
    refresh_round: Option<String>,
}

impl Current {
    pub fn from_sets<'a, S: SetFacts + 'a>(sets: impl IntoIterator<Item = &'a S>) -> Self {
        let mut entries = HashMap::new();
        let mut digests = HashMap::new();
        let mut report_rounds = HashMap::new();
        for set in sets {
            for (entry, key) in set.spec().image_set.iter().zip(set.keys().iter()) {
                let report = set.report_on(&entry.name);
                let slot = (set.spec().node_name.clone(), key.to_string());
                if let Some(r) = report {
                    report_rounds.insert(slot.clone(), r.refresh.clone());
                }
                if let Some(d) = report
                    .filter(|r| r.state == PullState::Available)
                    .and_then(|r| r.digest.clone())
                {
                    digests.insert(slot.clone(), d);
                }
                entries.insert(slot, (entry.clone(), report.map(|r| r.state)));
            }
        }
        Current {
            entries,
            digests,
            private_to: None,
            silent: HashSet::new(),
            report_rounds,
            refresh_round: None,
        }
    }

    /// Entries (node, image as listed) whose agent has not reported for long.
    pub fn silent<'a>(mut self, silent: impl IntoIterator<Item = &'a (String, String)>) -> Self {
        self.silent = silent
            .into_iter()
            .map(|(node, image)| (node.clone(), image_key(image)))
            .collect();
        self
    }

    /// The refresh round the ImagePrefetch's seeds answer (`None`: no
    /// round yet): each entry that resolves a tag carries it.
    pub fn refresh_round(mut self, round: Option<String>) -> Self {
        self.refresh_round = round;
        self
    }

    /// The ImagePrefetch pulls with credentials, in `namespace`.
    pub fn private_to(mut self, namespace: &str) -> Self {
        self.private_to = Some(namespace.to_string());
        self
    }

    fn get(&self, node: &str, key: &str) -> Option<&(NodeImage, Option<PullState>)> {
        self.entries.get(&(node.to_string(), key.to_string()))
    }

    /// Whether `node`'s entry of `key` is a Mirror pull reported `state`.
    fn mirror_in(&self, node: &str, key: &str, state: PullState) -> bool {
        matches!(self.get(node, key),
            Some((e, Some(s))) if e.registry_policy == RegistryPolicy::Mirror && *s == state)
    }

    /// Whether `node`'s report on `key` (if any) answers the current
    /// refresh round.
    fn answers_round(&self, node: &str, key: &str) -> bool {
        self.report_rounds
            .get(&(node.to_string(), key.to_string()))
            .is_none_or(|r| *r == self.refresh_round)
    }

    /// Whether `node` has the image of `key` Available for the current
    /// refresh round, its entry carrying that round.
    fn answered_round(&self, node: &str, key: &str) -> bool {
        matches!(self.get(node, key), Some((e, Some(PullState::Available)))
            if e.refresh == self.refresh_round)
            && self.answers_round(node, key)
    }

    /// The digest `node` reported for `key`, once Available.
    fn digest(&self, node: &str, key: &str) -> Option<&str> {
        self.digests
            .get(&(node.to_string(), key.to_string()))
            .map(SharedStr::as_str)
    }
}

/// How many of an ImagePrefetch's own Default pulls of a tag — each resolving
/// it at the registry — must agree before every other node is pinned to
/// their digest: no single node's word, so a compromised node can poison
/// only itself.
pub const CONFIRMATIONS: usize = 2;

/// What an ImagePrefetch's own registry resolutions say an image is.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// The reference names its digest: nothing to agree on.
    Named,
    /// [`CONFIRMATIONS`] nodes resolved the tag to this digest.
    Agreed(String),
    /// Not yet: how many more Default pulls (by tag) to start.
    Pending { more: usize },
}

/// The agreement among `nodes`' Default entries of `image` that resolved
/// the tag themselves (no digest given): the digest most of them reported,
/// once [`CONFIRMATIONS`] agree; otherwise how many more to ask, counting
/// those under way.
pub fn resolution(image: &str, nodes: &[String], current: &Current) -> Resolution {
    if image.contains('@') {
        return Resolution::Named;
    }
    let key = image_key(image);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut under_way = 0;
    for n in nodes {
        let Some((e, state)) = current.get(n, &key) else {
            continue;
        };
        if e.registry_policy != RegistryPolicy::Default || e.digest.is_some() {
            continue;
        }
        // An answer to an earlier refresh round does not count: the node
        // is asked again (or soon will be), so it is under way.
        // (One whose agent has said nothing for long is not: another is
        // asked in its place.)
        if !current.answers_round(n, &key) {
            if !current.silent.contains(&(n.clone(), key.clone())) {
                under_way += 1;
            }
            continue;
        }
        match state {
            Some(PullState::Available) => {
                if let Some(d) = current.digest(n, &key) {
                    *counts.entry(d).or_default() += 1;
                }
            }
            Some(PullState::Failed) => {}
            _ => under_way += 1,
        }
    }
    let best = counts.values().copied().max().unwrap_or(0);
    if best >= CONFIRMATIONS {
        let digest = counts
            .iter()
            .find(|(_, c)| **c == best)
            .map(|(d, _)| d.to_string())
            .expect("best is a count");
        return Resolution::Agreed(digest);
    }
    Resolution::Pending {
        more: CONFIRMATIONS.saturating_sub(best + under_way),
    }
}

#[derive(Clone, Debug)]
struct Claim {
    node: String,
    /// When the seed last showed progress: claimed, or told more bytes.
    progressed: Instant,
    /// The most bytes the seed has told.
    bytes: i64,
}

/// The seeds of the whole cluster: one per (image, sequencing group), shared
/// by every ImagePrefetch, and the nodes that failed or stalled as a seed.
/// Within a zone, one platform seeds at a time: the next starts once the
/// first has the image, pulling through the mirror first, so that only its
/// own platform's blobs come from the registry.
#[derive(Debug, Default)]
pub struct SeedBook {
    claims: HashMap<(String, String), Claim>,
    /// (image key, node) that failed or stalled as seed: not chosen again
    /// until the cool-down ends. Never for ever.
    excluded: HashMap<(String, String), Exclusion>,
    /// By image key: when each node holding it was first seen Available.
    holders: HashMap<String, HashMap<String, Instant>>,
    /// (image key, group) whose Mirror pulls have all failed, none served:
    /// since when (or since the last re-seed).
    starved: HashMap<(String, String), Instant>,
    /// (image key, node) told to seed again, and when.
    reseeded: HashMap<(String, String), Instant>,
    /// (image key, node) whose failed seed pull was turned into a Mirror
    /// pull, and when: until its agent reports on that pull, its report is
    /// still the failed seed's, and the Mirror pull is in flight all the same.
    mirrored: HashMap<(String, String), Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Exclusion {
    until: Instant,
    /// How often the node failed as seed of the image.
    times: u32,
}

/// No seed can be chosen for an image in a sequencing group: every
/// candidate failed recently. Tried again at `retry_at`.
#[derive(Clone, Debug, PartialEq)]
pub struct Blocked {
    pub image: String,
    pub group: String,
    pub nodes: Vec<String>,
    pub retry_at: Instant,
}

impl SeedBook {
    /// The standing claim of `key` in `zone` while it is sound; a claim on a
    /// seed that failed, stalled, went away or was orphaned is dropped (a
    /// failed or stalled seed cools down before it may seed again).
    #[allow(clippy::too_many_arguments)]
    fn sound_claim(
        &mut self,
        key: &str,
        zone: &str,
        ours: &[&String],
        facts: &ImageFacts,
        view: &ClusterView,
        settings: &Settings,
        now: Instant,
    ) -> Option<String> {
        let deadline = settings.seed_deadline;
        let slot = (key.to_string(), zone.to_string());
        if let Some(claim) = self.claims.get_mut(&slot) {
            // The deadline runs from the seed's last progress: a large image
            // on a slow link that keeps moving is never cut off (and fetched
            // again from the start by another seed).
            if let Some(&bytes) = facts.progress.get(&claim.node)
                && bytes > claim.bytes
            {
                claim.bytes = bytes;
                claim.progressed = now;
            }
        }
        if let Some(claim) = self.claims.get(&slot).cloned() {
            let failed = facts.seeding.get(&claim.node) == Some(&Some(PullState::Failed));
            let stalled = now.saturating_duration_since(claim.progressed) > deadline;
            let gone = !view.usable.contains(&claim.node);
            // A claim nobody acts on (its ImagePrefetch went away) lapses.
            let orphaned = !ours.contains(&&claim.node)
                && !facts.seeding.contains_key(&claim.node)
                && now.saturating_duration_since(claim.progressed) > CLAIM_SETTLE;
            if failed || stalled {
                let e = self
                    .excluded
                    .entry((key.to_string(), claim.node.clone()))
                    .or_insert(Exclusion {
                        until: now,
                        times: 0,
                    });
                e.times += 1;
                e.until = now
                    + crd::backoff::Doubling::new(
                        settings.seed_cooldown,
                        settings.seed_cooldown_cap,
                    )
                    .after(e.times);
            }
            if failed || stalled || gone || orphaned {
                self.claims.remove(&slot);
            } else {
                return Some(claim.node);
            }
        }
        None
    }

    /// A new seed of `key` in `zone`: a node some NodeImageSet already has
    /// as seed, else the best-scoring usable node of `ours`, none cooling.
    fn choose(
        &mut self,
        key: &str,
        zone: &str,
        ours: &[&String],
        facts: &ImageFacts,
        view: &ClusterView,
        now: Instant,
    ) -> Result<(String, bool), Option<Blocked>> {
        let slot = (key.to_string(), zone.to_string());
        let cooling = |node: &String| {
            self.excluded
                .get(&(key.to_string(), node.clone()))
                .filter(|e| now < e.until)
                .map(|e| e.until)
        };
        let eligible = |node: &String| {
            view.usable.contains(node)
                && view.group(node) == zone
                && cooling(node).is_none()
                && facts.seeding.get(node) != Some(&Some(PullState::Failed))
        };
        let adopted = facts.seeding.keys().find(|n| eligible(n)).cloned();
        let chosen = match adopted {
            Some(n) => Some((n, false)),
            None => ours
                .iter()
                .copied()
                .filter(|n| eligible(n))
                .max_by_key(|n| score(key, n))
                .map(|n| (n.clone(), true)),
        };
        let Some((node, new)) = chosen else {
            // Every usable candidate is cooling down: say so, and when.
            let candidates: Vec<&String> = ours
                .iter()
                .copied()
                .filter(|n| view.usable.contains(*n) && view.group(n) == zone)
                .collect();
            let retry_at = candidates.iter().filter_map(|n| cooling(n)).min();
            return Err(retry_at.map(|retry_at| Blocked {
                image: key.to_string(),
                group: zone.to_string(),
                nodes: candidates.iter().map(|n| n.to_string()).collect(),
                retry_at,
            }));
        };
        self.claims.insert(
            slot,
            Claim {
                node: node.clone(),
                progressed: now,
                bytes: facts.progress.get(&node).copied().unwrap_or(0),
            },
        );
        Ok((node, new))
    }

    /// Whether a seed of `key` is claimed in another group that `group`
    /// waits for: another platform of its zone always (its index and shared
    /// layers then cross the uplink once), and with sequential zone seeding
    /// any other zone's too. A claim lasts until its group holds the image.
    fn seeding_elsewhere(&self, key: &str, group: &str, zones: ZoneSeeding) -> bool {
        let zone = crate::select::group_zone(group);
        self.claims.keys().any(|(k, g)| {
            k == key
                && g != group
                && (zones == ZoneSeeding::Sequential || crate::select::group_zone(g) == zone)
        })
    }

    /// The holders of `key` that spegel can be expected to find: first seen
    /// Available at least `after` ago. The others, and when the first of
    /// them becomes findable.
    fn findable<'a>(
        &mut self,
        key: &str,
        facts: &'a ImageFacts,
        after: Duration,
        now: Instant,
    ) -> (BTreeSet<&'a String>, Option<Instant>) {
        let seen = self.holders.entry(key.to_string()).or_default();
        seen.retain(|n, _| facts.available.contains_key(n));
        let mut findable = BTreeSet::new();
        let mut next = None::<Instant>;
        for node in facts.available.keys() {
            let since = *seen.entry(node.clone()).or_insert(now);
            if now.saturating_duration_since(since) >= after {
                findable.insert(node);
            } else {
                let at = since + after;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        (findable, next)
    }

    /// Whether the Mirror pulls of `key` in `group` have been starved
    /// (`starved`: all failed, none served) for `after`: then a re-seed is
    /// due, and the clock starts again. Otherwise when one would be due.
    fn reseed_due(
        &mut self,
        key: &str,
        group: &str,
        starved: bool,
        after: Duration,
        now: Instant,
    ) -> Result<(), Option<Instant>> {
        let slot = (key.to_string(), group.to_string());
        if !starved {
            self.starved.remove(&slot);
            return Err(None);
        }
        let since = *self.starved.entry(slot.clone()).or_insert(now);
        if now.saturating_duration_since(since) >= after {
            self.starved.insert(slot, now);
            Ok(())
        } else {
            Err(Some(since + after))
        }
    }

    /// Whether `node`'s failed seed pull of `key` was turned into a Mirror
    /// pull so recently that its report may still be the seed pull's.
    fn mirrored_recently(&mut self, key: &str, node: &str, now: Instant) -> bool {
        self.mirrored
            .retain(|_, at| now.saturating_duration_since(*at) < CLAIM_SETTLE);
        self.mirrored
            .contains_key(&(key.to_string(), node.to_string()))
    }

    /// Whether `node` was told to seed `key` again so recently that its
    /// report may still be the failed Mirror pull's.
    fn reseeded_recently(&mut self, key: &str, node: &str, now: Instant) -> bool {
        self.reseeded
            .retain(|_, at| now.saturating_duration_since(*at) < CLAIM_SETTLE);
        self.reseeded
            .contains_key(&(key.to_string(), node.to_string()))
    }

    /// The image is on some node of the zone: no seed is needed any more.
    /// When its seed settles, the nodes that failed to fetch it from the
    /// registry are candidates again (through the mirror now) — once: a
    /// node that fails after that cools down as any other. (Clearing at
    /// every reconcile while a zone held the image made a failing node a
    /// seed again at once, its entry dropped and written back at every
    /// other reconcile: found by the sequencing property test.)
    fn settle(&mut self, key: &str, zone: &str) {
        if self
            .claims
            .remove(&(key.to_string(), zone.to_string()))
            .is_some()
        {
            self.excluded.retain(|(k, _), _| k != key);
        }
    }

    /// The node currently claimed as seed of `image` in `zone`, if any.
    pub fn seed_of(&self, image: &str, zone: &str) -> Option<&str> {
        self.claims
            .get(&(image_key(image), zone.to_string()))
            .map(|c| c.node.as_str())
    }
}

/// What one ImagePrefetch's NodeImageSets should say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Entries per selected node, in the order of the ImagePrefetch's images.
    pub entries: BTreeMap<String, Vec<NodeImage>>,
    /// (image, node) pairs that became a seed in this plan.
    pub new_seeds: Vec<(String, String)>,
    /// Images that have no seed in some group until a cool-down ends.
    pub blocked: Vec<Blocked>,
    /// (image, node) pairs seeding again because no peer could serve the
    /// image's Mirror pulls for long.
    pub reseeds: Vec<(String, String)>,
    /// When a holder becomes findable or a re-seed falls due: plan again then.
    pub recheck_at: Option<Instant>,
    /// (image, digest) whose tag moved: nodes pinned to another digest are
    /// being released again to this one.
    pub moved: Vec<(String, String)>,
}

/// Gives the current refresh round to the entries of `image` that resolve
/// its tag at the registry (a node whose entry carries a new round asks
/// again): to one of them, the lead, at once; to the others once the lead
/// has answered the round and spegel can find what it holds. A tag that
/// moved then crosses the uplink once: the others' blobs come through the
/// mirror, from the lead. Until then each keeps the round it had.
fn stamp_round(
    image: &str,
    key: &str,
    entries: &mut BTreeMap<String, Vec<NodeImage>>,
    current: &Current,
    findable: &BTreeSet<&String>,
) {
    let Some(round) = current.refresh_round.as_ref() else {
        return;
    };
    if image.contains('@') {
        return;
    }
    let resolves = |e: &NodeImage| {
        e.name == image && e.registry_policy == RegistryPolicy::Default && e.digest.is_none()
    };
    // The first by name whose agent answers: the same node from one
    // reconcile to the next, and another once that one's agent is silent.
    let Some(lead) = entries
        .iter()
        .find(|(n, listed)| {
            listed.iter().any(resolves)
                && !current.silent.contains(&(n.to_string(), key.to_string()))
        })
        .map(|(n, _)| n.clone())
    else {
        return;
    };
    let lead_answered = current.answered_round(&lead, key) && findable.contains(&lead);
    for (node, listed) in entries.iter_mut() {
        for e in listed.iter_mut().filter(|e| resolves(e)) {
            e.refresh = if *node == lead || lead_answered {
                Some(round.clone())
            } else {
                current
                    .get(node, key)
                    .and_then(|(old, _)| old.refresh.clone())
            };
        }
    }
}

/// Decides the entries of one ImagePrefetch (`images` onto `nodes`).
pub fn plan(
    images: &[String],
    nodes: &[String],
    current: &Current,
    view: &ClusterView,
    book: &mut SeedBook,
    settings: &Settings,
    now: Instant,
) -> Plan {
    let mut entries: BTreeMap<String, Vec<NodeImage>> =
        nodes.iter().map(|n| (n.clone(), Vec::new())).collect();
    let mut new_seeds = Vec::new();
    let mut blocked = Vec::new();
    let mut reseeds = Vec::new();
    let mut moved: Vec<(String, String)> = Vec::new();
    let mut recheck_at: Option<Instant> = None;
    let mut recheck = |at: Option<Instant>| {
        if let Some(at) = at {
            recheck_at = Some(recheck_at.map_or(at, |r: Instant| r.min(at)));
        }
    };
    let mut groups: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for n in nodes {
        groups.entry(view.group(n)).or_default().push(n);
    }
    let no_facts = ImageFacts::default();
    let private_to = current
        .private_to
        .as_deref()
        .filter(|_| view.isolate_private);
    for image in images {
        let key = image_key(image);
        // What seeds fetched, and the seeds themselves, are shared under this key.
        let shared = shared_key(&key, private_to);
        let facts = view.images.get(&shared).unwrap_or(&no_facts);
        // One allocation of the name for every node's entry.
        let name = SharedStr::from(image);
        let entry = |policy, digest: Option<SharedStr>| NodeImage {
            refresh: None,
            name: name.clone(),
            registry_policy: policy,
            digest,
            source: None,
        };
        if !settings.sequencing {
            for n in nodes {
                let e = entry(RegistryPolicy::Default, None);
                entries.get_mut(n).expect("selected").push(e);
            }
            continue;
        }
        // The digest every other node is pinned to: the one this
        // ImagePrefetch's own seeds resolved at the registry and agree on.
        let resolved = resolution(image, nodes, current);
        let (pinned, mut confirmers) = match &resolved {
            Resolution::Named => (None, 0),
            Resolution::Agreed(d) => (Some(SharedStr::from(d.as_str())), 0),
            Resolution::Pending { more } => (None, *more),
        };
        let release = !matches!(resolved, Resolution::Pending { .. });
        let (findable, next) = book.findable(&shared, facts, settings.findable_after, now);
        recheck(next);
        // Once agreed, only holders of that digest are sources.
        let agrees = |n: &String| {
            pinned.is_none()
                || facts.available.get(n).and_then(|d| d.as_deref()) == pinned.as_deref()
        };
        let sources_in = |zone: &str| {
            findable
                .iter()
                .filter(|n| view.group(n) == zone && agrees(n))
                .count()
        };
        // Holders a Mirror entry can name (reported, with an address),
        // sources at once, findable or not.
        let nameable_in = |zone: &str| -> Vec<&String> {
            facts
                .available
                .keys()
                .filter(|n| {
                    settings.named_sources
                        && view.group(n) == zone
                        && agrees(n)
                        && view.addresses.contains_key(*n)
                })
                .collect()
        };
        // Groups that hold the image need no seed; groups that do not come
        // first, so that a new seed (which resolves the tag at the registry
        // too, while no digest is agreed) counts before confirmers are chosen.
        let mut order: Vec<(&str, &Vec<&String>, usize)> = groups
            .iter()
            .map(|(zone, ours)| (*zone, ours, sources_in(zone)))
            .collect();
        for (zone, ours, sources) in &order {
            if *sources > 0 {
                book.settle(&shared, zone);
            } else {
                // Claims that no longer hold are dropped before any group
                // asks whether another is seeding: a group must not wait
                // on a seed this very plan replaces (found by the
                // sequencing property test: a zone then waited for the
                // next reconcile, which an agent's silence could put off).
                book.sound_claim(&shared, zone, ours, facts, view, settings, now);
            }
        }
        order.sort_by_key(|(_, _, sources)| *sources > 0);
        for (zone, ours, findable_sources) in order {
            let zone = &zone;
            let nameable = nameable_in(zone);
            // Findable holders and nameable ones, each counted once.
            let sources =
                findable_sources + nameable.iter().filter(|n| !findable.contains(**n)).count();
            if sources > 0 {
                let mut in_flight = 0;
                let mut waiting: Vec<&String> = Vec::new();
                // Nodes pinned to a digest no longer agreed on (the tag moved
                // at a refresh round): released again in the waves, after
                // the nodes that hold nothing, each keeping its old entry —
                // and the old image pinned — until its turn.
                let mut repin: Vec<&String> = Vec::new();
                for n in ours {
                    let out = entries.get_mut(*n).expect("selected");
                    match current.get(n, &key) {
                        Some((e, _))
                            if release
                                && pinned.is_some()
                                && e.registry_policy == RegistryPolicy::Mirror
                                && e.digest != pinned =>
                        {
                            out.push(e.clone());
                            repin.push(n);
                        }
                        // A seed that failed gets the image from the mirror now.
                        // (Not a node just told to seed again: its report
                        // still shows the Mirror pull that failed.)
                        // (Nor one whose tag is not agreed on yet: it asks
                        // the registry again, on the agent's own schedule.)
                        Some((e, Some(PullState::Failed)))
                            if e.registry_policy == RegistryPolicy::Default =>
                        {
                            if book.reseeded_recently(&shared, n, now) || !release {
                                out.push(e.clone());
                            } else {
                                in_flight += 1;
                                book.mirrored.insert((shared.clone(), n.to_string()), now);
                                out.push(entry(RegistryPolicy::Mirror, pinned.clone()));
                            }
                        }
                        Some((e, state)) => {
                            // (A failed seed just turned into a Mirror pull
                            // still shows the seed's failure.)
                            let relabelled = e.registry_policy == RegistryPolicy::Mirror
                                && *state == Some(PullState::Failed)
                                && book.mirrored_recently(&shared, n, now);
                            let done = !relabelled
                                && matches!(state, Some(PullState::Available | PullState::Failed));
                            let silent = current.silent.contains(&(n.to_string(), key.clone()));
                            // A node that holds the image (by another set's
                            // report) only confirms it: no pull in flight.
                            let holds = facts.available.contains_key(*n);
                            if e.registry_policy == RegistryPolicy::Mirror
                                && !done
                                && !silent
                                && !holds
                            {
                                in_flight += 1;
                            }
                            out.push(e.clone());
                        }
                        // Already there (for another ImagePrefetch): the agent only confirms.
                        None if release && facts.available.contains_key(*n) => {
                            out.push(entry(RegistryPolicy::Mirror, pinned.clone()));
                        }
                        None => waiting.push(n),
                    }
                }
                // Only once spegel can find a holder: a confirmer's blobs
                // come through its lookup (a named holder is not yet a
                // source for a Default pull).
                if !release && findable_sources > 0 {
                    // Nodes that resolve the tag at the registry themselves
                    // until enough agree: those that hold the image first
                    // (no bytes move), then by score; their blobs come
                    // through the mirror.
                    waiting.sort_by_key(|n| {
                        (
                            std::cmp::Reverse(facts.available.contains_key(*n)),
                            std::cmp::Reverse(score(&key, n)),
                        )
                    });
                    for n in waiting.drain(..).take(confirmers) {
                        let out = entries.get_mut(n).expect("selected");
                        out.push(entry(RegistryPolicy::Default, None));
                        confirmers -= 1;
                    }
                    // After a refresh every node may hold the image already
                    // (no node waits): a holder whose agent answers confirms
                    // instead, so a seed lost in the middle of a round does
                    // not leave the new digest unagreed for ever.
                    if current.refresh_round.is_some() {
                        let mut holders: Vec<&String> = ours
                            .iter()
                            .copied()
                            .filter(|n| {
                                current.mirror_in(n, &key, PullState::Available)
                                    && !current.silent.contains(&(n.to_string(), key.clone()))
                            })
                            .collect();
                        holders.sort_by_key(|n| std::cmp::Reverse(score(&key, n)));
                        for n in holders.into_iter().take(confirmers) {
                            let out = entries.get_mut(n).expect("selected");
                            *out.last_mut().expect("its entry was pushed") =
                                entry(RegistryPolicy::Default, None);
                            confirmers -= 1;
                        }
                    }
                }
                let budget = if release {
                    sources
                        .saturating_mul(settings.pulls_per_holder)
                        .min(settings.wave_cap.unwrap_or(usize::MAX))
                        .saturating_sub(in_flight)
                } else {
                    0
                };
                if let Some(digest) = pinned.as_ref().filter(|_| !repin.is_empty())
                    && !moved.iter().any(|(i, _)| i == image)
                {
                    moved.push((image.clone(), digest.to_string()));
                }
                waiting.sort_by_key(|n| std::cmp::Reverse(score(&key, n)));
                repin.sort_by_key(|n| std::cmp::Reverse(score(&key, n)));
                let mut serving = facts.serving.clone();
                let turns = waiting
                    .into_iter()
                    .map(|n| (n, false))
                    .chain(repin.into_iter().map(|n| (n, true)));
                for (n, repinned) in turns.take(budget) {
                    let mut e = entry(RegistryPolicy::Mirror, pinned.clone());
                    if !nameable.is_empty() {
                        // The least loaded holder with room; none: wait.
                        let Some(from) = nameable
                            .iter()
                            .filter(|h| {
                                serving.get(**h).copied().unwrap_or(0) < settings.pulls_per_holder
                            })
                            .min_by_key(|h| {
                                (serving.get(**h).copied().unwrap_or(0), score(&key, h))
                            })
                        else {
                            break;
                        };
                        *serving.entry((*from).clone()).or_default() += 1;
                        e.source = Some(crd::PeerSource {
                            node: from.as_str().into(),
                            address: view.addresses[*from].as_str().into(),
                        });
                    }
                    let out = entries.get_mut(n).expect("selected");
                    if repinned {
                        *out.last_mut().expect("its old entry was pushed") = e;
                    } else {
                        out.push(e);
                    }
                }
                // No peer has served a Mirror pull and some have failed: if
                // it lasts, one of the failed nodes seeds from the registry.
                let failed: Vec<&String> = ours
                    .iter()
                    .copied()
                    .filter(|n| {
                        current.mirror_in(n, &key, PullState::Failed)
                            && !book.mirrored.contains_key(&(shared.clone(), n.to_string()))
                    })
                    .collect();
                let served = facts
                    .available
                    .keys()
                    .any(|n| view.group(n) == *zone && !facts.seeding.contains_key(n));
                let starved = !served && !failed.is_empty();
                match book.reseed_due(&shared, zone, starved, settings.reseed_after, now) {
                    Ok(()) => {
                        let node = failed
                            .iter()
                            .max_by_key(|n| score(&key, n))
                            .expect("starved means failed");
                        let out = entries.get_mut(*node).expect("selected");
                        *out.last_mut().expect("its entry was pushed") =
                            entry(RegistryPolicy::Default, pinned.clone());
                        book.reseeded
                            .insert((shared.clone(), node.to_string()), now);
                        reseeds.push((image.clone(), node.to_string()));
                    }
                    Err(due) => recheck(due),
                }
            } else if book.seeding_elsewhere(&shared, zone, settings.zone_seeding) {
                // Another group (another platform of this zone, or another
                // zone) is seeding the image: wait for it, then seed this
                // group through the mirror first, so the index and every
                // shared layer cross the uplink once.
                for n in ours {
                    if let Some((e, _)) = current.get(n, &key)
                        && e.registry_policy == RegistryPolicy::Mirror
                    {
                        entries.get_mut(*n).expect("selected").push(e.clone());
                    }
                }
            } else {
                // The standing claim while it is sound, else a new seed.
                let seed = match book
                    .sound_claim(&shared, zone, ours, facts, view, settings, now)
                    .map(|node| Ok((node, false)))
                    .unwrap_or_else(|| book.choose(&shared, zone, ours, facts, view, now))
                {
                    Ok((node, new)) => {
                        if new {
                            new_seeds.push((image.clone(), node.clone()));
                        }
                        // It resolves the tag at the registry: one confirmer fewer.
                        if !release && current.get(&node, &key).is_none() {
                            confirmers = confirmers.saturating_sub(1);
                        }
                        Some(node)
                    }
                    Err(why) => {
                        blocked.extend(why.map(|b| Blocked {
                            image: image.clone(),
                            ..b
                        }));
                        None
                    }
                };
                for n in ours {
                    let out = entries.get_mut(*n).expect("selected");
                    match current.get(n, &key) {
                        Some((e, _)) if e.registry_policy == RegistryPolicy::Mirror => {
                            out.push(e.clone())
                        }
                        // A replaced seed loses its entry (its agent stops) and waits.
                        Some((e, _)) if seed.as_deref() == Some(n.as_str()) => out.push(e.clone()),
                        // Holding it already (not yet a source others may
                        // count on): the agent only confirms, with no seed.
                        None if release && facts.available.contains_key(*n) => {
                            out.push(entry(RegistryPolicy::Mirror, pinned.clone()))
                        }
                        // Pinned when another platform resolved the tag already.
                        _ if seed.as_deref() == Some(n.as_str()) => {
                            out.push(entry(RegistryPolicy::Default, pinned.clone()))
                        }
                        _ => {}
                    }
                }
            }
        }
        stamp_round(image, &key, &mut entries, current, &findable);
    }
    Plan {
        entries,
        new_seeds,
        blocked,
        reseeds,
        recheck_at,
        moved,
    }
}

#[cfg(test)]
mod tests {
    use crd::{NodeImageSet, NodeImageSetSpec, NodeImageSetStatus, NodeImageStatus};

    use super::*;

    const IMG: &str = "registry.example.com/app:1";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A simulated cluster: one ImagePrefetch's sets plus other prefetches' sets.
    struct Sim {
        nodes: Vec<String>,
        groups: HashMap<String, String>,
        usable: HashSet<String>,
        ours: BTreeMap<String, NodeImageSet>,
        others: Vec<NodeImageSet>,
        book: SeedBook,
        settings: Settings,
        start: Instant,
        clock: Duration,
        isolate: bool,
        /// Our ImagePrefetch's namespace, when it names pull secrets.
        private_to: Option<String>,
        /// Nodes' InternalIPs (none: no source can be named).
        addresses: HashMap<String, String>,
        /// The ImagePrefetch's refresh round.
        round: Option<String>,
        /// (node, image) entries whose agent has said nothing for long.
        silent: Vec<(String, String)>,
    }

    impl Sim {
        fn new(n: usize) -> Self {
            let nodes: Vec<String> = (0..n).map(|i| format!("node-{i:02}")).collect();
            Sim {
                usable: nodes.iter().cloned().collect(),
                groups: HashMap::new(),
                nodes,
                ours: BTreeMap::new(),
                others: Vec::new(),
                book: SeedBook::default(),
                // Holders findable at once, unless a test says otherwise.
                settings: Settings {
                    findable_after: Duration::ZERO,
                    ..Settings::default()
                },
                start: Instant::now(),
                clock: Duration::ZERO,
                isolate: true,
                private_to: None,
                addresses: HashMap::new(),
                round: None,
                silent: Vec::new(),
            }
        }

        fn view(&self) -> ClusterView {
            let mut v = ClusterView {
                groups: self.groups.clone(),
                usable: self.usable.clone(),
                isolate_private: self.isolate,
                addresses: self.addresses.clone(),
                ..Default::default()
            };
            v.add_sets(self.ours.values().chain(self.others.iter()));
            v
        }

        /// One reconcile: plan, then write the entries into our sets (keeping statuses).
        fn step(&mut self, images: &[&str]) -> Plan {
            let images: Vec<String> = images.iter().map(|s| s.to_string()).collect();
            let view = self.view();
            let mut current = Current::from_sets(self.ours.values())
                .refresh_round(self.round.clone())
                .silent(&self.silent);
            if let Some(ns) = &self.private_to {
                current = current.private_to(ns);
            }
            let selected: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| self.usable.contains(*n))
                .cloned()
                .collect();
            let plan = super::plan(
                &images,
                &selected,
                &current,
                &view,
                &mut self.book,
                &self.settings,
                self.start + self.clock,
            );
            self.ours.retain(|n, _| plan.entries.contains_key(n));
            for (node, entries) in &plan.entries {
                let set = self
                    .ours
                    .entry(node.clone())
                    .or_insert_with(|| set_for(node));
                set.spec.image_set = entries.clone();
                if let Some(st) = set.status.as_mut() {
                    st.images
                        .retain(|r| entries.iter().any(|e| e.name == r.name));
                }
            }
            plan
        }

        fn report(&mut self, node: &str, image: &str, state: PullState) {
            let set = self.ours.get_mut(node).expect("node has a set");
            report(set, image, state);
        }

        /// The node's seed pull tells `bytes` fetched so far.
        fn progress(&mut self, node: &str, image: &str, bytes: i64) {
            let set = self.ours.get_mut(node).expect("node has a set");
            report(set, image, PullState::Pulling);
            let st = set.status.as_mut().expect("reported");
            st.images[0].progress_bytes = Some(bytes);
        }

        /// The seed and the nodes confirming its resolution pull: every
        /// Default entry reports Available (the tag resolved to DIGEST)
        /// until this ImagePrefetch's resolutions agree. Returns them.
        fn resolve(&mut self, image: &str) -> Vec<String> {
            for _ in 0..6 {
                for n in self.with_policy(image, RegistryPolicy::Default) {
                    if self.state_of(&n, image) != Some(PullState::Available) {
                        self.report(&n, image, PullState::Available);
                    }
                }
                self.step(&[image]);
                let current = Current::from_sets(self.ours.values());
                if matches!(
                    super::resolution(image, &self.nodes, &current),
                    Resolution::Agreed(_)
                ) {
                    return self.with_policy(image, RegistryPolicy::Default);
                }
            }
            panic!("the resolutions of {image} never agreed");
        }

        /// The node's agent reports `image` in `state`, at `digest`, for
        /// the refresh round its entry carries.
        fn report_at(&mut self, node: &str, image: &str, state: PullState, digest: &str) {
            let set = self.ours.get_mut(node).expect("node has a set");
            let round = set
                .spec
                .image_set
                .iter()
                .find(|e| e.name == image)
                .and_then(|e| e.refresh.clone());
            report(set, image, state);
            let st = set.status.as_mut().expect("reported");
            let r = st.images.iter_mut().find(|r| r.name == image).unwrap();
            r.digest = (state == PullState::Available).then(|| digest.into());
            r.refresh = round;
        }

        fn entry_of(&self, node: &str, image: &str) -> Option<&NodeImage> {
            self.ours
                .get(node)?
                .spec
                .image_set
                .iter()
                .find(|e| e.name == image)
        }

        fn state_of(&self, node: &str, image: &str) -> Option<PullState> {
            self.ours
                .get(node)?
                .status
                .as_ref()?
                .images
                .iter()
                .find(|r| r.name == image)
                .map(|r| r.state)
        }

        fn policy_of(&self, node: &str, image: &str) -> Option<RegistryPolicy> {
            self.entry_of(node, image).map(|e| e.registry_policy)
        }

        fn with_policy(&self, image: &str, policy: RegistryPolicy) -> Vec<String> {
            self.nodes
                .iter()
                .filter(|n| self.policy_of(n, image) == Some(policy))
                .cloned()
                .collect()
        }
    }

    fn set_for(node: &str) -> NodeImageSet {
        NodeImageSet::new(node, NodeImageSetSpec::for_node(node, vec![]))
    }

    fn report(set: &mut NodeImageSet, image: &str, state: PullState) {
        let st = set.status.get_or_insert_with(NodeImageSetStatus::default);
        st.images.retain(|r| r.name != image);
        st.images.push(NodeImageStatus {
            digest: (state == PullState::Available).then(|| DIGEST.into()),
            ..NodeImageStatus::new(image, state, 1)
        });
    }

    #[test]
    fn one_seed_and_no_mirror_before_the_image_is_available() {
        let mut sim = Sim::new(5);
        let plan = sim.step(&[IMG]);
        assert_eq!(sim.with_policy(IMG, RegistryPolicy::Default).len(), 1);
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        assert_eq!(plan.new_seeds.len(), 1);
        // Reconciling again changes nothing and chooses no new seed.
        let seed = sim.with_policy(IMG, RegistryPolicy::Default);
        let seed = &seed[0];
        sim.report(seed, IMG, PullState::Pulling);
        let again = sim.step(&[IMG]);
        assert!(again.new_seeds.is_empty());
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default),
            std::slice::from_ref(seed)
        );
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
    }

    /// Rolls IMG out on `sim` with every released pull finishing before
    /// the next reconcile: the seed, the nodes confirming its resolution,
    /// then the size of each wave of Mirror pulls (each pinned to DIGEST).
    fn waves(sim: &mut Sim) -> Vec<usize> {
        sim.step(&[IMG]);
        let seed = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&seed, IMG, PullState::Available);
        sim.step(&[IMG]);
        // No Mirror pull on the seed's word alone: one more node resolves
        // the tag at the registry (its blobs through the mirror, once spegel
        // can find the seed).
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        sim.clock += sim.settings.findable_after;
        let resolved = sim.resolve(IMG);
        assert_eq!(resolved.len(), CONFIRMATIONS);
        let mut waves = Vec::new();
        let mut done: HashSet<String> = resolved.into_iter().collect();
        loop {
            sim.step(&[IMG]);
            let released: Vec<String> = sim
                .with_policy(IMG, RegistryPolicy::Mirror)
                .into_iter()
                .filter(|n| !done.contains(n))
                .collect();
            if released.is_empty() {
                break;
            }
            waves.push(released.len());
            // A named source holds the image, at its address, and serves at
            // most its share of the wave.
            let mut named: HashMap<String, usize> = HashMap::new();
            for n in &released {
                let e = sim.ours[n]
                    .spec
                    .image_set
                    .iter()
                    .find(|e| e.name == IMG)
                    .unwrap();
                if let Some(from) = &e.source {
                    assert!(
                        !released.contains(&from.node.to_string())
                            && done.contains(from.node.as_str()),
                        "{} named before it holds the image",
                        from.node
                    );
                    assert_eq!(
                        Some(from.address.as_str()),
                        sim.addresses.get(from.node.as_str()).map(String::as_str)
                    );
                    *named.entry(from.node.to_string()).or_default() += 1;
                }
                assert_eq!(
                    e.digest.as_deref(),
                    Some(DIGEST),
                    "Mirror pulls pin the seed's digest"
                );
                sim.report(n, IMG, PullState::Available);
                done.insert(n.clone());
            }
            assert!(
                named.values().all(|&k| k <= sim.settings.pulls_per_holder),
                "{named:?}"
            );
        }
        assert_eq!(done.len(), sim.nodes.len());
        waves
    }

    #[test]
    fn mirrors_are_released_in_growing_waves_with_the_digest_pinned() {
        assert_eq!(waves(&mut Sim::new(16)), [2, 4, 8]);
    }

    /// The rule at scale: the peer rounds after the seed's upstream pull
    /// (the confirming pull, then the waves) are ⌈log₂ N⌉, a binomial tree's;
    /// with an absolute cap of 32 (the rule before) they grow linearly with N.
    #[test]
    fn a_rollout_takes_log2_n_peer_rounds() {
        for n in [1000usize, 5000] {
            let ideal = n.next_power_of_two().trailing_zeros() as usize;
            let rounds = 1 + waves(&mut Sim::new(n)).len();
            assert_eq!(rounds, ideal, "{n} nodes");
        }
        let mut capped = Sim::new(1000);
        capped.settings.wave_cap = Some(32);
        assert_eq!(1 + waves(&mut capped).len(), 36, "1000 nodes capped at 32");
    }

    /// A refresh round: the seeds ask the registry again. A tag that has
    /// not moved changes nothing else; one that moved is rolled out like a
    /// new image — no node re-pinned before two seeds agree on the new
    /// digest, then the others in growing waves from the holders of the new
    /// digest, each keeping its old entry (and its old image) until its turn.
    #[test]
    fn a_tag_that_moved_at_a_refresh_is_rolled_out_again_in_waves() {
        const MOVED: &str =
            "sha256:1111111111111111111111111111111111111111111111111111111111111111";
        let mut sim = Sim::new(16);
        waves(&mut sim);
        let seeds = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(seeds.len(), CONFIRMATIONS);
        let mirrors = sim.with_policy(IMG, RegistryPolicy::Mirror);
        let before: BTreeMap<String, NodeImage> = mirrors
            .iter()
            .map(|n| (n.clone(), sim.entry_of(n, IMG).unwrap().clone()))
            .collect();

        let round_of = |sim: &Sim, n: &str| {
            sim.entry_of(n, IMG)
                .unwrap_or_else(|| panic!("{n} has no entry: {:?}", sim.ours.get(n)))
                .refresh
                .clone()
        };
        // Asks the seeds of `round`, the lead first: the other only once
        // spegel can find what the lead fetched (its blobs come from the
        // lead), then returns.
        let ask = |sim: &mut Sim, round: &str, digest: &str| {
            sim.round = Some(round.into());
            sim.step(&[IMG]);
            assert_eq!(round_of(sim, &seeds[0]).as_deref(), Some(round), "the lead");
            assert_ne!(round_of(sim, &seeds[1]).as_deref(), Some(round), "not yet");
            sim.report_at(&seeds[0], IMG, PullState::Pulling, digest);
            sim.step(&[IMG]);
            sim.report_at(&seeds[0], IMG, PullState::Available, digest);
            sim.step(&[IMG]);
            assert_ne!(
                round_of(sim, &seeds[1]).as_deref(),
                Some(round),
                "not findable yet"
            );
            sim.clock += sim.settings.findable_after + Duration::from_secs(1);
            sim.step(&[IMG]);
            assert_eq!(
                round_of(sim, &seeds[1]).as_deref(),
                Some(round),
                "then the other"
            );
        };
        // Holders become findable 2 s after they report (those of the
        // rollout long since).
        sim.settings.findable_after = Duration::from_secs(2);
        sim.clock += Duration::from_secs(60);

        // Round 1: the tag has not moved: nothing else changes.
        ask(&mut sim, "round-1", DIGEST);
        sim.report_at(&seeds[1], IMG, PullState::Available, DIGEST);
        sim.step(&[IMG]);
        for n in &mirrors {
            assert_eq!(sim.entry_of(n, IMG), before.get(n), "{n}: nothing moved");
        }

        // Round 2: the tag moved. On one seed's word, nothing else changes.
        ask(&mut sim, "round-2", MOVED);
        for n in &mirrors {
            assert_eq!(sim.entry_of(n, IMG), before.get(n), "{n}: one seed's word");
        }
        sim.report_at(&seeds[1], IMG, PullState::Available, MOVED);
        sim.clock += sim.settings.findable_after + Duration::from_secs(1);
        let mut waves = Vec::new();
        let mut moved: HashSet<String> = seeds.iter().cloned().collect();
        loop {
            let plan = sim.step(&[IMG]);
            if waves.is_empty() {
                assert_eq!(plan.moved, [(IMG.to_string(), MOVED.to_string())]);
            }
            let released: Vec<String> = mirrors
                .iter()
                .filter(|n| !moved.contains(*n))
                .filter(|n| sim.entry_of(n, IMG).unwrap().digest.as_deref() == Some(MOVED))
                .cloned()
                .collect();
            for n in &mirrors {
                let e = sim.entry_of(n, IMG).expect("every node keeps an entry");
                if !moved.contains(n) && !released.contains(n) {
                    assert_eq!(e.digest.as_deref(), Some(DIGEST), "{n}: its turn not yet");
                }
            }
            if released.is_empty() {
                break;
            }
            waves.push(released.len());
            for n in &released {
                let from = &sim.entry_of(n, IMG).unwrap().source;
                if let Some(from) = from {
                    assert!(
                        moved.contains(from.node.as_str()),
                        "{n} named a holder of the old digest"
                    );
                }
                sim.report_at(n, IMG, PullState::Pulling, MOVED);
                sim.report_at(n, IMG, PullState::Available, MOVED);
                moved.insert(n.clone());
            }
            sim.clock += sim.settings.findable_after;
        }
        assert_eq!(waves, [2, 4, 8]);
        assert_eq!(moved.len(), 16);
        // Said while nodes were pinned to the old digest, and no more.
        assert!(sim.step(&[IMG]).moved.is_empty());
    }

    /// A refresh round whose lead's agent never answers (its node Ready,
    /// the agent gone): once it counts as silent, a holder confirms in its
    /// place (no node waits for the image, so none could), and the moved
    /// tag is rolled out to every other node — no round stays open for ever.
    #[test]
    fn a_refresh_round_whose_lead_is_silent_is_led_by_another() {
        const MOVED: &str =
            "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        let mut sim = Sim::new(8);
        waves(&mut sim);
        let seeds = sim.with_policy(IMG, RegistryPolicy::Default);
        sim.round = Some("round-1".into());
        sim.step(&[IMG]);
        let round_of = |sim: &Sim, n: &str| sim.entry_of(n, IMG).unwrap().refresh.clone();
        assert_eq!(round_of(&sim, &seeds[0]).as_deref(), Some("round-1"));
        assert_eq!(round_of(&sim, &seeds[1]), None);
        // The lead's agent says nothing; the controller calls it silent.
        sim.silent = vec![(seeds[0].clone(), IMG.to_string())];
        // Every agent but the silent one answers what it is asked.
        for _ in 0..12 {
            sim.step(&[IMG]);
            for n in sim.nodes.clone() {
                if n == seeds[0] {
                    continue;
                }
                let e = sim.entry_of(&n, IMG).unwrap().clone();
                let asked = match e.registry_policy {
                    RegistryPolicy::Default => e.refresh.as_deref() == Some("round-1"),
                    RegistryPolicy::Mirror => e.digest.as_deref() == Some(MOVED),
                };
                let answered = sim.ours[&n].status.as_ref().unwrap().images[0].refresh == e.refresh
                    && sim.ours[&n].status.as_ref().unwrap().images[0]
                        .digest
                        .as_deref()
                        == Some(MOVED);
                if asked && !answered {
                    sim.report_at(&n, IMG, PullState::Available, MOVED);
                }
            }
        }
        let drafted: Vec<String> = sim
            .with_policy(IMG, RegistryPolicy::Default)
            .into_iter()
            .filter(|n| !seeds.contains(n))
            .collect();
        assert_eq!(
            drafted.len(),
            1,
            "one holder confirms in the silent seed's place"
        );
        for n in &sim.nodes.clone() {
            if *n == seeds[0] {
                assert_eq!(round_of(&sim, n).as_deref(), Some("round-1"));
                continue;
            }
            let holds = sim.ours[n].status.as_ref().unwrap().images[0]
                .digest
                .clone();
            assert_eq!(
                holds.as_deref(),
                Some(MOVED),
                "{n}: {:?}",
                sim.entry_of(n, IMG)
            );
        }
    }

    #[test]
    fn each_holder_serves_at_most_its_share() {
        let mut sim = Sim::new(40);
        sim.settings.pulls_per_holder = 2;
        // Holders triple each round: 2 → 6 → 18 → 40.
        assert_eq!(waves(&mut sim), [4, 12, 22]);
    }

    /// With the holders' addresses, a holder is a source the moment it
    /// reports the image — here spegel would never find one — and each
    /// serves only the pulls named to it (`waves` checks the names).
    #[test]
    fn named_holders_are_sources_at_once() {
        let mut sim = Sim::new(40);
        sim.settings.findable_after = Duration::from_secs(3600);
        sim.addresses = (0..40)
            .map(|i| (format!("node-{i:02}"), format!("10.0.0.{i}")))
            .collect();
        assert_eq!(waves(&mut sim), [2, 4, 8, 16, 8]);
        let mut two = Sim::new(40);
        two.settings.findable_after = Duration::from_secs(3600);
        two.settings.pulls_per_holder = 2;
        two.addresses = sim.addresses.clone();
        assert_eq!(waves(&mut two), [4, 12, 22]);
        // Named or not, nothing moves until spegel can find the seed while
        // the tag's resolution is not agreed: a confirmer's Default pull
        // takes its blobs through spegel's lookup, or from the registry.
        for addresses in [HashMap::new(), sim.addresses.clone()] {
            let mut early = Sim::new(40);
            early.settings.findable_after = Duration::from_secs(3600);
            early.addresses = addresses;
            early.step(&[IMG]);
            let seed = early.with_policy(IMG, RegistryPolicy::Default)[0].clone();
            early.report(&seed, IMG, PullState::Available);
            early.step(&[IMG]);
            assert_eq!(early.with_policy(IMG, RegistryPolicy::Default), [seed]);
            assert!(early.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        }
    }

    #[test]
    fn waves_respect_the_cap() {
        let mut sim = Sim::new(12);
        sim.settings.wave_cap = Some(2);
        sim.step(&[IMG]);
        sim.resolve(IMG);
        sim.step(&[IMG]); // in flight counts only unfinished Mirror pulls
        let mirrors = sim.with_policy(IMG, RegistryPolicy::Mirror);
        assert_eq!(mirrors.len(), 2, "2 sources, cap 2 → 2 in flight");
        sim.report(&mirrors[0], IMG, PullState::Available);
        sim.step(&[IMG]);
        let in_flight = sim.with_policy(IMG, RegistryPolicy::Mirror).len() - 1;
        assert_eq!(in_flight, 2, "3 sources, cap 2 → 2 in flight");
    }

    #[test]
    fn an_image_already_present_needs_no_seed() {
        let mut sim = Sim::new(4);
        let mut elsewhere = set_for("node-03");
        elsewhere.spec.image_set = vec![NodeImage {
            refresh: None,
            name: "registry.example.com/app:1".into(),
            registry_policy: RegistryPolicy::Mirror,
            digest: None,
            source: None,
        }];
        report(&mut elsewhere, IMG, PullState::Available);
        sim.others.push(elsewhere);
        let plan = sim.step(&[IMG]);
        assert!(plan.new_seeds.is_empty());
        // This ImagePrefetch asks the registry again, first on the node that
        // holds the image (no bytes move), then on one more; nothing is
        // pinned on the other ImagePrefetch's word.
        let asking = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(asking.len(), CONFIRMATIONS);
        assert!(asking.contains(&"node-03".to_string()));
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        sim.resolve(IMG);
        sim.step(&[IMG]);
        assert_eq!(sim.with_policy(IMG, RegistryPolicy::Mirror).len(), 2);
    }

    #[test]
    fn the_same_image_written_differently_is_one_image() {
        assert_eq!(
            image_key("busybox"),
            image_key("docker.io/library/busybox:latest")
        );
    }

    #[test]
    fn a_failed_seed_is_replaced_and_later_served_by_the_mirror() {
        let mut sim = Sim::new(4);
        sim.step(&[IMG]);
        let first = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&first, IMG, PullState::Failed);
        let plan = sim.step(&[IMG]);
        let second = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(second.len(), 1);
        assert_ne!(second[0], first);
        assert_eq!(plan.new_seeds, [(IMG.to_string(), second[0].clone())]);
        assert_eq!(sim.policy_of(&first, IMG), None, "the failed seed waits");
        sim.report(&second[0], IMG, PullState::Available);
        sim.resolve(IMG);
        sim.step(&[IMG]);
        assert!(!sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        assert!(
            sim.policy_of(&first, IMG).is_some(),
            "the failed seed gets it too"
        );
    }

    #[test]
    fn a_one_node_pool_whose_seed_failed_says_when_and_tries_again() {
        let mut sim = Sim::new(1);
        sim.step(&[IMG]);
        let node = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&node, IMG, PullState::Failed);
        let plan = sim.step(&[IMG]);
        assert_eq!(
            sim.policy_of(&node, IMG),
            None,
            "no seed while it cools down"
        );
        let cooldown = sim.settings.seed_cooldown;
        assert_eq!(
            plan.blocked,
            [Blocked {
                image: IMG.into(),
                group: "".into(),
                nodes: vec![node.clone()],
                retry_at: sim.start + sim.clock + cooldown,
            }]
        );
        // After the cool-down the node is the seed again: nothing is terminal.
        sim.clock += cooldown;
        let plan = sim.step(&[IMG]);
        assert!(plan.blocked.is_empty());
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default),
            std::slice::from_ref(&node)
        );
        // Failing again doubles the cool-down, up to its cap.
        sim.report(&node, IMG, PullState::Failed);
        let plan = sim.step(&[IMG]);
        assert_eq!(
            plan.blocked[0].retry_at,
            sim.start + sim.clock + cooldown * 2
        );
        for _ in 0..10 {
            sim.clock = plan_retry(&sim.step(&[IMG])).unwrap_or(sim.start + sim.clock) - sim.start;
            sim.step(&[IMG]);
            sim.report(&node, IMG, PullState::Failed);
        }
        let plan = sim.step(&[IMG]);
        assert_eq!(
            plan.blocked[0].retry_at,
            sim.start + sim.clock + sim.settings.seed_cooldown_cap
        );
    }

    fn plan_retry(plan: &Plan) -> Option<Instant> {
        plan.blocked.iter().map(|b| b.retry_at).min()
    }

    #[test]
    fn a_stalled_seed_is_replaced_after_the_deadline() {
        let mut sim = Sim::new(3);
        sim.step(&[IMG]);
        let first = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&first, IMG, PullState::Pulling);
        sim.clock = sim.settings.seed_deadline - Duration::from_secs(1);
        sim.step(&[IMG]);
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default),
            std::slice::from_ref(&first)
        );
        sim.clock = sim.settings.seed_deadline + Duration::from_secs(1);
        sim.step(&[IMG]);
        let now = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], first);
    }

    #[test]
    fn a_seed_making_progress_is_kept_and_one_that_stops_is_replaced() {
        let mut sim = Sim::new(3);
        sim.step(&[IMG]);
        let first = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        let deadline = sim.settings.seed_deadline;
        // A large image on a slow link: more bytes at every look, for three
        // deadlines in all.
        for step in 1..=6i64 {
            sim.clock = deadline / 2 * step as u32;
            sim.progress(&first, IMG, step * 1_000_000);
            sim.step(&[IMG]);
            assert_eq!(
                sim.with_policy(IMG, RegistryPolicy::Default),
                std::slice::from_ref(&first),
                "moving seed kept at {:?}",
                sim.clock
            );
        }
        // It stops moving: replaced one deadline after its last progress,
        // not before.
        let last = sim.clock;
        sim.clock = last + deadline - Duration::from_secs(1);
        sim.step(&[IMG]);
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default),
            std::slice::from_ref(&first)
        );
        sim.clock = last + deadline + Duration::from_secs(1);
        sim.step(&[IMG]);
        let now = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], first);
    }

    #[test]
    fn a_seed_whose_node_goes_away_is_replaced() {
        let mut sim = Sim::new(3);
        sim.step(&[IMG]);
        let first = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.usable.remove(&first);
        sim.step(&[IMG]);
        let now = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], first);
    }

    #[test]
    fn adding_an_unrelated_node_moves_no_role() {
        let mut sim = Sim::new(6);
        sim.step(&[IMG]);
        let seed = sim.with_policy(IMG, RegistryPolicy::Default);
        for i in 0..20 {
            let n = format!("extra-{i}");
            sim.usable.insert(n.clone());
            sim.nodes.push(n);
            sim.step(&[IMG]);
            assert_eq!(sim.with_policy(IMG, RegistryPolicy::Default), seed);
        }
    }

    fn two_zones(n: usize, zones: ZoneSeeding) -> Sim {
        let mut sim = Sim::new(n);
        for (i, n) in sim.nodes.clone().iter().enumerate() {
            sim.groups
                .insert(n.clone(), if i % 2 == 0 { "a" } else { "b" }.into());
        }
        sim.settings.zone_seeding = zones;
        sim
    }

    #[test]
    fn zones_seed_at_once_when_asked_to() {
        let mut sim = two_zones(6, ZoneSeeding::Parallel);
        sim.step(&[IMG]);
        let seeds = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(seeds.len(), 2);
        assert_ne!(sim.groups[&seeds[0]], sim.groups[&seeds[1]]);
    }

    /// Once per cluster: the second zone's seed starts only when the first
    /// zone holds the image (its Default pull then finds every blob in the
    /// mirror), pinned to the digest the first resolved; no Mirror pull of
    /// a zone starts before a node of that zone holds the image.
    #[test]
    fn zones_seed_one_after_another_by_default() {
        let mut sim = two_zones(6, ZoneSeeding::default());
        sim.step(&[IMG]);
        let first = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(first.len(), 1, "one seed in the cluster");
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        let first_zone = sim.groups[&first[0]].clone();
        // Still pulling: the other zone keeps waiting, however often it is asked.
        sim.report(&first[0], IMG, PullState::Pulling);
        sim.step(&[IMG]);
        sim.step(&[IMG]);
        assert_eq!(sim.with_policy(IMG, RegistryPolicy::Default), first);
        sim.report(&first[0], IMG, PullState::Available);
        sim.step(&[IMG]);
        let seeds = sim.with_policy(IMG, RegistryPolicy::Default);
        assert_eq!(seeds.len(), 2);
        let second = seeds
            .iter()
            .find(|n| sim.groups[*n] != first_zone)
            .unwrap()
            .clone();
        let entry = sim.ours[&second].spec.image_set[0].clone();
        assert_eq!(
            entry.digest, None,
            "it resolves the tag too, confirming the first"
        );
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        sim.report(&second, IMG, PullState::Available);
        sim.step(&[IMG]);
        let mirrors = sim.with_policy(IMG, RegistryPolicy::Mirror);
        assert!(!mirrors.is_empty());
        for n in &mirrors {
            let e = &sim.ours[n].spec.image_set[0];
            assert_eq!(
                e.digest.as_deref(),
                Some(DIGEST),
                "pinned to the agreed digest"
            );
        }
    }

    #[test]
    fn one_platform_seeds_at_a_time_and_no_release_before_the_platform_has_it() {
        let mut sim = Sim::new(4);
        for (i, n) in sim.nodes.clone().iter().enumerate() {
            let arch = if i < 2 { "amd64" } else { "arm64" };
            sim.groups.insert(n.clone(), format!(" linux/{arch}"));
        }
        let of = |sim: &Sim, policy, arch: &str| -> Vec<String> {
            sim.with_policy(IMG, policy)
                .into_iter()
                .filter(|n| sim.groups[n].ends_with(arch))
                .collect()
        };
        sim.step(&[IMG]);
        // One platform seeds first; the other waits, so that what the
        // platforms share (the index, common layers) is fetched once.
        assert_eq!(sim.with_policy(IMG, RegistryPolicy::Default).len(), 1);
        let amd_seed = of(&sim, RegistryPolicy::Default, "amd64")[0].clone();
        // The amd64 seed finishes: the arm64 platform gets its seed, which
        // resolves the tag at the registry too (confirming the first), and
        // no Mirror pull yet: no digest is agreed, and the peers hold no
        // arm64 layer.
        sim.report(&amd_seed, IMG, PullState::Available);
        sim.step(&[IMG]);
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        let arm_seeds = of(&sim, RegistryPolicy::Default, "arm64");
        assert_eq!(arm_seeds.len(), 1);
        assert_eq!(
            of(&sim, RegistryPolicy::Default, "amd64"),
            std::slice::from_ref(&amd_seed),
            "no other confirmer"
        );
        let arm_entry = sim.ours[&arm_seeds[0]].spec.image_set[0].clone();
        assert_eq!(arm_entry.digest, None, "resolves the tag itself");
        sim.report(&arm_seeds[0], IMG, PullState::Available);
        sim.step(&[IMG]);
        assert_eq!(of(&sim, RegistryPolicy::Mirror, "amd64").len(), 1);
        assert_eq!(of(&sim, RegistryPolicy::Mirror, "arm64").len(), 1);
    }

    /// Another tenant's set holding `IMG`, pulled with its credentials.
    fn private_set(node: &str, namespace: &str) -> NodeImageSet {
        let mut theirs = set_for(node);
        theirs.spec.image_set = vec![NodeImage {
            refresh: None,
            name: IMG.into(),
            registry_policy: RegistryPolicy::Default,
            digest: None,
            source: None,
        }];
        theirs.spec.image_pull_secrets = vec![crd::SecretReference {
            namespace: namespace.into(),
            name: "regcred".into(),
        }];
        report(&mut theirs, IMG, PullState::Available);
        theirs
    }

    #[test]
    fn a_private_image_is_not_mirrored_to_a_tenant_without_its_credentials() {
        // Tenant A pulled it with credentials onto node-00.
        let mut sim = Sim::new(3);
        sim.others.push(private_set("node-00", "team-a"));
        // Tenant B names no secret: no Mirror entry, a seed of its own, whose
        // pull without credentials the registry will refuse.
        sim.step(&[IMG]);
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        assert_eq!(sim.with_policy(IMG, RegistryPolicy::Default).len(), 1);

        // An ImagePrefetch of team-a with pull secrets shares A's seed.
        let mut same = Sim::new(3);
        same.others.push(private_set("node-00", "team-a"));
        same.private_to = Some("team-a".into());
        same.step(&[IMG]);
        // No new seed: node-00 asks the registry for the copy it holds,
        // and one more node resolves the tag; then the others get it.
        assert!(
            same.with_policy(IMG, RegistryPolicy::Default)
                .contains(&"node-00".to_string())
        );
        same.resolve(IMG);
        same.step(&[IMG]);
        assert_eq!(same.with_policy(IMG, RegistryPolicy::Mirror).len(), 1);
        // Another namespace with credentials of its own: its own seed.
        let mut other = Sim::new(3);
        other.others.push(private_set("node-00", "team-a"));
        other.private_to = Some("team-b".into());
        other.step(&[IMG]);
        assert_eq!(other.with_policy(IMG, RegistryPolicy::Default).len(), 1);

        // Sharing switched on (spegel's own behaviour): everyone gets it.
        let mut shared = Sim::new(3);
        shared.isolate = false;
        shared.others.push(private_set("node-00", "team-a"));
        shared.step(&[IMG]);
        assert!(
            shared
                .with_policy(IMG, RegistryPolicy::Default)
                .contains(&"node-00".to_string())
        );
        shared.resolve(IMG);
        shared.step(&[IMG]);
        assert_eq!(shared.with_policy(IMG, RegistryPolicy::Mirror).len(), 1);
    }

    #[test]
    fn a_seed_is_shared_across_prefetches() {
        // Another ImagePrefetch's node seeds the image: ours wait, none of ours seeds.
        let mut sim = Sim::new(3);
        let mut theirs = set_for("their-node");
        theirs.spec.image_set = vec![NodeImage {
            refresh: None,
            name: IMG.into(),
            registry_policy: RegistryPolicy::Default,
            digest: None,
            source: None,
        }];
        report(&mut theirs, IMG, PullState::Pulling);
        sim.usable.insert("their-node".into());
        sim.others.push(theirs);
        let plan = sim.step(&[IMG]);
        assert!(plan.new_seeds.is_empty());
        assert!(sim.with_policy(IMG, RegistryPolicy::Default).is_empty());
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        // Two plans in a row for two prefetches over the same nodes claim one seed.
        let mut book = SeedBook::default();
        let view = ClusterView {
            usable: ["a".to_string(), "b".to_string()].into(),
            ..Default::default()
        };
        let nodes = vec!["a".to_string(), "b".to_string()];
        let s = Settings::default();
        let now = Instant::now();
        let p1 = super::plan(
            &[IMG.into()],
            &nodes,
            &Current::default(),
            &view,
            &mut book,
            &s,
            now,
        );
        let p2 = super::plan(
            &[IMG.into()],
            &nodes[1..],
            &Current::default(),
            &view,
            &mut book,
            &s,
            now,
        );
        let seeds1: Vec<_> = p1
            .entries
            .iter()
            .filter(|(_, e)| !e.is_empty())
            .map(|(n, _)| n)
            .collect();
        assert_eq!(seeds1.len(), 1);
        if seeds1[0] == "a" {
            assert!(p2.entries["b"].is_empty(), "b waits for a's seed");
        } else {
            assert!(p2.new_seeds.is_empty());
        }
    }

    #[test]
    fn without_sequencing_every_node_pulls_default_at_once() {
        let mut sim = Sim::new(5);
        sim.settings.sequencing = false;
        sim.step(&[IMG]);
        assert_eq!(sim.with_policy(IMG, RegistryPolicy::Default).len(), 5);
    }

    #[test]
    fn a_holder_is_a_source_only_once_spegel_can_find_it() {
        let mut sim = two_zones(4, ZoneSeeding::Sequential);
        sim.settings.findable_after = Duration::from_secs(2);
        sim.step(&[IMG]);
        let seed = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&seed, IMG, PullState::Available);
        let plan = sim.step(&[IMG]);
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default),
            std::slice::from_ref(&seed),
            "the other zone's seed waits too"
        );
        assert_eq!(
            plan.recheck_at,
            Some(sim.start + sim.clock + Duration::from_secs(2))
        );
        sim.clock += Duration::from_secs(2);
        sim.step(&[IMG]);
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default).len(),
            2,
            "the other zone seeds"
        );
        sim.resolve(IMG);
        sim.clock += Duration::from_secs(2);
        sim.step(&[IMG]);
        assert!(!sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
    }

    #[test]
    fn mirror_pulls_no_peer_serves_for_long_make_one_node_seed_again() {
        let mut sim = Sim::new(4);
        sim.step(&[IMG]);
        let seed = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&seed, IMG, PullState::Available);
        sim.resolve(IMG);
        let mirrors = sim.with_policy(IMG, RegistryPolicy::Mirror);
        assert!(!mirrors.is_empty());
        for m in &mirrors {
            sim.report(m, IMG, PullState::Failed);
        }
        let plan = sim.step(&[IMG]);
        assert!(plan.reseeds.is_empty(), "not at once");
        let after = sim.settings.reseed_after;
        assert_eq!(plan.recheck_at, Some(sim.start + sim.clock + after));
        sim.clock += after;
        let plan = sim.step(&[IMG]);
        assert_eq!(plan.reseeds.len(), 1);
        let again = &plan.reseeds[0].1;
        assert!(mirrors.contains(again));
        assert_eq!(sim.policy_of(again, IMG), Some(RegistryPolicy::Default));
        // Its report still shows the failed Mirror pull: it stays a seed.
        sim.step(&[IMG]);
        assert_eq!(sim.policy_of(again, IMG), Some(RegistryPolicy::Default));
        assert!(sim.step(&[IMG]).reseeds.is_empty(), "one at a time");
        // Once one Mirror pull succeeds, the mirror serves: no more re-seeds.
        sim.report(again, IMG, PullState::Available);
        sim.step(&[IMG]);
        let fresh = sim.with_policy(IMG, RegistryPolicy::Mirror);
        assert!(!fresh.is_empty(), "its copy is a source too");
        sim.report(&fresh[0], IMG, PullState::Available);
        sim.clock += after * 2;
        assert!(sim.step(&[IMG]).reseeds.is_empty());
    }

    #[test]
    fn a_holder_not_yet_findable_asks_the_registry_for_another_prefetch_and_no_one_else_seeds() {
        let mut sim = Sim::new(3);
        sim.settings.findable_after = Duration::from_secs(2);
        sim.step(&[IMG]);
        let seed = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        sim.report(&seed, IMG, PullState::Available);
        sim.step(&[IMG]);
        // Another ImagePrefetch of the image, at once: the holder confirms.
        sim.others = sim.ours.values().cloned().collect();
        sim.ours.clear();
        let plan = sim.step(&[IMG]);
        // It asks the registry for this ImagePrefetch (no bytes move); no
        // other node becomes a seed.
        assert!(plan.new_seeds.is_empty());
        assert_eq!(
            sim.with_policy(IMG, RegistryPolicy::Default),
            std::slice::from_ref(&seed)
        );
    }

    /// Review H1: one node's word pins no one. A compromised seed reports a
    /// digest of its own; the node confirming at the registry disagrees; a
    /// third decides, and every other node is pinned to the registry's.
    #[test]
    fn a_lying_node_poisons_only_itself() {
        const EVIL: &str =
            "sha256:eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
        let mut sim = Sim::new(6);
        sim.step(&[IMG]);
        let liar = sim.with_policy(IMG, RegistryPolicy::Default)[0].clone();
        let say = |sim: &mut Sim, node: &str, digest: &str| {
            sim.report(node, IMG, PullState::Available);
            let st = sim.ours.get_mut(node).unwrap().status.as_mut().unwrap();
            st.images[0].digest = Some(digest.into());
        };
        say(&mut sim, &liar, EVIL);
        sim.step(&[IMG]);
        let asked: Vec<String> = sim
            .with_policy(IMG, RegistryPolicy::Default)
            .into_iter()
            .filter(|n| *n != liar)
            .collect();
        assert_eq!(
            asked.len(),
            1,
            "one node resolves the tag at the registry too"
        );
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        say(&mut sim, &asked[0], DIGEST);
        sim.step(&[IMG]);
        // 1 against 1: nothing is pinned yet; a third node asks.
        assert!(sim.with_policy(IMG, RegistryPolicy::Mirror).is_empty());
        let third: Vec<String> = sim
            .with_policy(IMG, RegistryPolicy::Default)
            .into_iter()
            .filter(|n| *n != liar && *n != asked[0])
            .collect();
        assert_eq!(third.len(), 1);
        say(&mut sim, &third[0], DIGEST);
        sim.step(&[IMG]);
        let mirrors = sim.with_policy(IMG, RegistryPolicy::Mirror);
        assert!(!mirrors.is_empty());
        for n in &mirrors {
            let e = &sim.ours[n].spec.image_set[0];
            assert_eq!(e.digest.as_deref(), Some(DIGEST), "the registry's digest");
        }
        assert_eq!(
            super::resolution(IMG, &sim.nodes, &Current::from_sets(sim.ours.values())),
            Resolution::Agreed(DIGEST.into())
        );
    }

    /// The sequencing invariants, over random clusters (nodes in up to
    /// three groups, k pulls per holder, a cap or none, sources named or
    /// not) and random agents (each pull stays, moves on, finishes or
    /// fails, round after round):
    /// - while a group holds nothing, at most one node in it pulls from its
    ///   registry (one Default entry not failed);
    /// - no Mirror entry in a group before a node in it holds the image;
    /// - Mirror pulls in flight in a group at most k per holder there (and
    ///   the cap);
    /// - planning again with nothing new changes nothing (nothing written).
    ///
    /// Time passes between rounds (cool-downs end, holders become findable).
    mod invariants {
        use proptest::prelude::*;

        use super::*;

        #[derive(Clone, Debug)]
        struct Cluster {
            groups: Vec<u8>,
            pulls_per_holder: usize,
            wave_cap: Option<usize>,
            named: bool,
            /// Per round, per node: what its agent does with an entry under way.
            rounds: Vec<Vec<u8>>,
            /// Per round: seconds that pass before the agents act.
            waits: Vec<u64>,
        }

        fn clusters() -> impl Strategy<Value = Cluster> {
            (1usize..=24)
                .prop_flat_map(|n| {
                    (
                        proptest::collection::vec(0u8..3, n),
                        1usize..=3,
                        proptest::option::of(1usize..=4),
                        any::<bool>(),
                        proptest::collection::vec(proptest::collection::vec(0u8..10, n), 1..24),
                        proptest::collection::vec(0u64..40, 24),
                    )
                })
                .prop_map(
                    |(groups, pulls_per_holder, wave_cap, named, rounds, waits)| Cluster {
                        groups,
                        pulls_per_holder,
                        wave_cap,
                        named,
                        rounds,
                        waits,
                    },
                )
        }

        fn sim_of(c: &Cluster) -> Sim {
            let mut sim = Sim::new(c.groups.len());
            for (node, g) in sim.nodes.clone().iter().zip(&c.groups) {
                sim.groups.insert(node.clone(), format!("zone-{g}"));
                if c.named {
                    sim.addresses
                        .insert(node.clone(), format!("10.0.0.{}", sim.addresses.len() + 1));
                }
            }
            sim.settings.pulls_per_holder = c.pulls_per_holder;
            sim.settings.wave_cap = c.wave_cap;
            sim
        }

        fn check(sim: &Sim, c: &Cluster) -> Result<(), TestCaseError> {
            let mut by_group: HashMap<&str, Vec<&String>> = HashMap::new();
            for n in &sim.nodes {
                by_group.entry(sim.groups[n].as_str()).or_default().push(n);
            }
            for (group, nodes) in by_group {
                let holders = nodes
                    .iter()
                    .filter(|n| sim.state_of(n, IMG) == Some(PullState::Available))
                    .count();
                let under_way = |policy| {
                    nodes
                        .iter()
                        .filter(|n| {
                            sim.policy_of(n, IMG) == Some(policy)
                                && !matches!(
                                    sim.state_of(n, IMG),
                                    Some(PullState::Available | PullState::Failed)
                                )
                        })
                        .count()
                };
                let mirrors = nodes
                    .iter()
                    .filter(|n| sim.policy_of(n, IMG) == Some(RegistryPolicy::Mirror))
                    .count();
                if holders == 0 {
                    prop_assert!(
                        under_way(RegistryPolicy::Default) <= 1,
                        "{group}: two nodes pull from the registry while it holds nothing"
                    );
                    prop_assert_eq!(mirrors, 0, "{}: a Mirror entry before a holder", group);
                }
                let limit = (holders * c.pulls_per_holder).min(c.wave_cap.unwrap_or(usize::MAX));
                prop_assert!(
                    under_way(RegistryPolicy::Mirror) <= limit,
                    "{}: {} Mirror pulls in flight for {} holders",
                    group,
                    under_way(RegistryPolicy::Mirror),
                    holders
                );
            }
            Ok(())
        }

        fn entries(sim: &Sim) -> BTreeMap<String, Vec<NodeImage>> {
            sim.ours
                .iter()
                .map(|(n, s)| (n.clone(), s.spec.image_set.clone()))
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

            #[test]
            fn sequencing_holds_whatever_the_agents_do(c in clusters()) {
                let mut sim = sim_of(&c);
                sim.step(&[IMG]);
                check(&sim, &c)?;
                for (round, wait) in c.rounds.iter().zip(&c.waits) {
                    sim.clock += Duration::from_secs(*wait);
                    for (n, roll) in sim.nodes.clone().iter().zip(round) {
                        if sim.policy_of(n, IMG).is_none()
                            || matches!(
                                sim.state_of(n, IMG),
                                Some(PullState::Available | PullState::Failed)
                            )
                        {
                            continue;
                        }
                        match roll {
                            0..=2 => {}
                            3..=4 => sim.report(n, IMG, PullState::Pulling),
                            5..=8 => sim.report(n, IMG, PullState::Available),
                            _ => sim.report(n, IMG, PullState::Failed),
                        }
                    }
                    sim.step(&[IMG]);
                    check(&sim, &c)?;
                    let planned = entries(&sim);
                    sim.step(&[IMG]);
                    prop_assert_eq!(&entries(&sim), &planned, "planning again changed the entries");
                }
            }
        }
    }
}
