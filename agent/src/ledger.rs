//! The agent's per-image ledger: what each (NodeImageSet, image) entry asks
//! for, where its pull stands, and what to do next. Pure: no I/O, time comes
//! in as an argument; the loop in `work.rs` carries out the actions.
//!
//! No state is terminal. A pull that gave up is `Failed` with a time to try
//! again (capped exponential backoff), and is started at once when its entry
//! changes (a seed turned into a Mirror entry, a digest pinned). An entry that
//! disappears aborts its pull, and nothing is reported for it afterwards.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crd::{
    NodeImage, NodeImageStatus, PullFailure, PullSource, PullState, RegistryPolicy, SecretReference,
};

/// (NodeImageSet name, image as listed).
pub type Key = (String, String);

/// What one entry of a NodeImageSet asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Want {
    /// The set's uid: a set deleted and created again under the same name is a new entry.
    pub set_uid: String,
    pub entry: NodeImage,
    pub retry_limit: i32,
    /// An attempt that fetched nothing new for this long is ended; `None`:
    /// the agent's default.
    pub stall_timeout: Option<Duration>,
    /// Whether the image is pinned against kubelet's garbage collection
    /// (and pulled again when something removes it).
    pub pin: bool,
    pub secrets: Vec<SecretReference>,
    /// The `traceparent` of the controller span that wrote the set.
    pub trace: Option<String>,
}

/// One entry as the loop read it from a set: what it asks for, and what the
/// set's status already says about it (adopted once, after a restart).
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: Key,
    pub want: Want,
    pub reported: Option<NodeImageStatus>,
}

/// Why an attempt or a pull failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    /// Machine-readable cause.
    pub reason: PullFailure,
}

/// A finished pull.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Present {
    pub digest: String,
    pub size: Option<i64>,
    pub duration: Duration,
}

/// Where an entry stands.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Pulling {
        attempts: i32,
        last: Option<Failure>,
        /// The progress last reported (seeds only).
        told: Option<Told>,
    },
    Available {
        present: Present,
        attempts: i32,
        /// The policy it was pulled with.
        policy: RegistryPolicy,
    },
    /// Gave up after the retry limit; started again at `retry_at`.
    Failed {
        failure: Failure,
        attempts: i32,
        retry_at: Instant,
    },
    /// Removed from the node (by kubelet's garbage collection) while its
    /// entry asks for no pin: not pulled again until the entry changes.
    Reclaimed,
}

/// Progress reported in a set's status: the bytes, and when.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Told {
    pub bytes: u64,
    pub at: Instant,
}

/// What the loop must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start a pull task for the entry (none is running for it).
    Start(Key, Box<Want>),
    /// Stop the entry's pull task.
    Abort(Key),
    /// Keep the image (stored under this name) from kubelet's garbage
    /// collection: it is present and an entry wants it.
    Pin(String),
    /// Drop the agent's GC pin of the image: no entry wants it.
    Release(String),
    /// Write this set's status.
    Report(String),
}

/// Backoff between a Failed entry's rounds of pulls.
pub type Backoff = crd::backoff::Doubling;

/// A Failed entry is tried again after 30 s, doubling up to 5 minutes.
pub const FAILED_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(30), Duration::from_secs(5 * 60));

#[derive(Clone, Debug)]
struct Record {
    want: Want,
    state: State,
    /// Rounds that ended Failed since the entry last changed.
    failed_rounds: u32,
}

/// The ledger of every entry of this node's sets.
#[derive(Debug)]
pub struct Ledger {
    records: HashMap<Key, Record>,
    /// Sets whose spec cannot be read: their entries stay as they are.
    held: BTreeSet<String>,
    backoff: Backoff,
    /// Least time between two progress reports of one entry.
    progress_every: Duration,
}

/// The waits before a Mirror pull that found no peer ("not found") is
/// asked again, before the miss counts as a failed attempt. A miss is "not
/// yet" more often than "never": spegel advertises a new holder's content
/// asynchronously, and caches an empty lookup — for up to about 2.5 s a
/// second ask gets the same 404 at once. So each wait outlasts that cache,
/// and the waits grow: about 24 s in all, against minutes of attempt
/// backoff, and a retry budget, that a miss used to cost.
pub fn mirror_miss_waits() -> impl Iterator<Item = Duration> {
    [3, 3, 6, 12].into_iter().map(Duration::from_secs)
}

/// How often a seed's progress is reported by default: the controller's
/// seed deadline (minutes) needs no finer grain, and the writes stay few.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(30);

/// The name an image is stored under (what kubelet asks for).
pub fn store_name(image: &str) -> String {
    crd::reference::parse(image)
        .map(|r| r.canonical())
        .unwrap_or_else(|_| image.to_string())
}

impl Ledger {
    pub fn new(backoff: Backoff) -> Self {
        Ledger {
            records: HashMap::new(),
            held: BTreeSet::new(),
            backoff,
            progress_every: PROGRESS_EVERY,
        }
    }

    /// A ledger for unit tests: the default backoff, and every progress reported.
    #[cfg(test)]
    fn default() -> Self {
        Ledger::new(FAILED_BACKOFF).with_progress_every(Duration::ZERO)
    }

    /// Reports a seed's progress at most once per `every`.
    pub fn with_progress_every(mut self, every: Duration) -> Self {
        self.progress_every = every;
        self
    }

    /// Sets whose spec this agent cannot read (a newer release's, or written
    /// by hand): what they asked for before is neither withdrawn nor
    /// released, and nothing new is started for them, until they read again.
    /// An unreadable spec says nothing about what is wanted, so it must not
    /// look like a deleted one.
    pub fn hold(&mut self, sets: BTreeSet<String>) {
        self.held = sets;
    }

    /// The sets as they are now: starts what is new, changed or due for a
    /// retry; aborts and forgets what is no longer listed.
    pub fn observe(&mut self, listed: Vec<Listed>, now: Instant) -> Vec<Action> {
        let pinned_before = self.wanted_pinned();
        let known_before: BTreeSet<String> =
            self.records.keys().map(|k| store_name(&k.1)).collect();
        let actions = self.observe_entries(listed, now);
        self.repin(pinned_before, &known_before, actions)
    }

    /// Images some entry wants pinned (held sets' entries included).
    fn wanted_pinned(&self) -> BTreeSet<String> {
        self.records
            .iter()
            .filter(|(_, r)| r.want.pin)
            .map(|(k, _)| store_name(&k.1))
            .collect()
    }

    /// After entries changed: a pin comes off an image no entry wants pinned
    /// any more, and goes on a present image that was held unpinned and an
    /// entry now wants pinned. (A pull's end pins what it pulled; an image
    /// adopted after a restart keeps the pin it has.)
    fn repin(
        &self,
        before: BTreeSet<String>,
        known_before: &BTreeSet<String>,
        mut actions: Vec<Action>,
    ) -> Vec<Action> {
        let after = self.wanted_pinned();
        let present = self.present();
        for name in before.difference(&after) {
            actions.push(Action::Release(name.clone()));
        }
        for name in after.difference(&before) {
            if present.contains(name) && known_before.contains(name) {
                actions.push(Action::Pin(name.clone()));
            }
        }
        actions
    }

    fn observe_entries(&mut self, listed: Vec<Listed>, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let wanted: HashMap<Key, &Listed> = listed.iter().map(|l| (l.key.clone(), l)).collect();
        // Withdrawn entries: their set was deleted, or the entry removed.
        let mut withdrawn: Vec<Key> = self
            .records
            .keys()
            .filter(|k| !wanted.contains_key(*k) && !self.held.contains(&k.0))
            .cloned()
            .collect();
        withdrawn.sort();
        // (An image stays pinned while any entry, of any set, wants it
        // pinned: `repin`.)
        for key in withdrawn {
            let record = self.records.remove(&key).expect("listed above");
            if matches!(record.state, State::Pulling { .. }) {
                actions.push(Action::Abort(key.clone()));
            }
        }
        let mut keys: Vec<&Key> = wanted.keys().collect();
        keys.sort();
        for key in keys {
            let l = wanted[key];
            match self.records.get(key) {
                None => {
                    if let Some(r) = adoptable(l) {
                        self.records.insert(key.clone(), adopted(l, r));
                        continue;
                    }
                    actions.extend(self.start(l));
                }
                // Changed (policy, pinned digest, a set re-created): start over.
                Some(r) if r.want.entry != l.want.entry || r.want.set_uid != l.want.set_uid => {
                    if matches!(r.state, State::Pulling { .. }) {
                        actions.push(Action::Abort(key.clone()));
                    }
                    actions.extend(self.start(l));
                }
                Some(r) => {
                    let due = matches!(r.state, State::Failed { retry_at, .. } if now >= retry_at);
                    // Secrets and trace may change without restarting a pull.
                    let rounds = r.failed_rounds;
                    if let Some(r) = self.records.get_mut(key) {
                        r.want = l.want.clone();
                    }
                    if due {
                        actions.extend(self.start(l));
                        if let Some(r) = self.records.get_mut(key) {
                            r.failed_rounds = rounds;
                        }
                    }
                }
            }
        }
        actions
    }

    fn start(&mut self, l: &Listed) -> Vec<Action> {
        self.records.insert(
            l.key.clone(),
            Record {
                want: l.want.clone(),
                state: State::Pulling {
                    attempts: 0,
                    last: None,
                    told: None,
                },
                failed_rounds: 0,
            },
        );
        vec![
            Action::Start(l.key.clone(), Box::new(l.want.clone())),
            Action::Report(l.key.0.clone()),
        ]
    }

    /// An attempt of the entry's pull failed; it goes on retrying.
    pub fn attempt_failed(&mut self, key: &Key, attempts: i32, failure: Failure) -> Vec<Action> {
        match self.records.get_mut(key) {
            Some(Record {
                state: State::Pulling { told, .. },
                ..
            }) => {
                let told = *told;
                let r = self.records.get_mut(key).expect("matched");
                r.state = State::Pulling {
                    attempts,
                    last: Some(failure),
                    told,
                };
                vec![Action::Report(key.0.clone())]
            }
            _ => vec![],
        }
    }

    /// The entry's pull (started for `want`) has fetched `bytes` so far.
    /// Reported only for a seed (a `Default` entry: the controller's seed
    /// deadline runs from its last progress; Mirror pulls are not timed),
    /// and at most once per progress interval, so a node's status writes
    /// stay a handful per minute whatever the pull's size.
    pub fn progressed(&mut self, key: &Key, want: &Want, bytes: u64, now: Instant) -> Vec<Action> {
        let every = self.progress_every;
        let Some(r) = self.records.get_mut(key) else {
            return vec![];
        };
        if r.want.entry != want.entry
            || r.want.set_uid != want.set_uid
            || r.want.entry.registry_policy != RegistryPolicy::Default
        {
            return vec![];
        }
        let State::Pulling { told, .. } = &mut r.state else {
            return vec![];
        };
        let due = match told {
            None => true,
            Some(t) => bytes > t.bytes && now.saturating_duration_since(t.at) >= every,
        };
        if !due || bytes == 0 {
            return vec![];
        }
        *told = Some(Told { bytes, at: now });
        vec![Action::Report(key.0.clone())]
    }

    /// The entry's pull task ended. Nothing is reported for an entry that is
    /// gone or was restarted since (its task was aborted).
    pub fn finished(
        &mut self,
        key: &Key,
        want: &Want,
        result: Result<(Present, i32), (Failure, i32)>,
        now: Instant,
    ) -> Vec<Action> {
        let backoff = self.backoff;
        let Some(r) = self.records.get_mut(key) else {
            return vec![];
        };
        if r.want.entry != want.entry
            || r.want.set_uid != want.set_uid
            || !matches!(r.state, State::Pulling { .. })
        {
            return vec![];
        }
        let mut actions = vec![Action::Report(key.0.clone())];
        r.state = match result {
            Ok((present, attempts)) => {
                r.failed_rounds = 0;
                // Pulled, or found already there: pinned either way, when
                // its entry asks for a pin.
                if want.pin {
                    actions.push(Action::Pin(store_name(&key.1)));
                }
                State::Available {
                    present,
                    attempts,
                    policy: want.entry.registry_policy,
                }
            }
            Err((failure, attempts)) => {
                r.failed_rounds += 1;
                State::Failed {
                    failure,
                    attempts,
                    retry_at: now + backoff.after(r.failed_rounds),
                }
            }
        };
        actions
    }

    /// containerd no longer has the image stored as `name`: the entries
    /// that had it pull it again.
    pub fn gone_from_node(&mut self, name: &str) -> Vec<Action> {
        let mut keys: Vec<Key> = self
            .records
            .iter()
            .filter(|(k, r)| store_name(&k.1) == name && matches!(r.state, State::Available { .. }))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        let mut actions = Vec::new();
        for key in keys {
            let want = self.records[&key].want.clone();
            if !want.pin {
                // Unpinned on purpose: kubelet's garbage collection may
                // take it, and pulling it back would fight it.
                if let Some(r) = self.records.get_mut(&key) {
                    r.state = State::Reclaimed;
                }
                actions.push(Action::Report(key.0.clone()));
                continue;
            }
            actions.extend(self.start(&Listed {
                key,
                want,
                reported: None,
            }));
        }
        actions
    }

    /// Names of the images the ledger holds as present that some entry
    /// wants pinned.
    pub fn pinned(&self) -> BTreeSet<String> {
        let wanted = self.wanted_pinned();
        self.present()
            .into_iter()
            .filter(|n| wanted.contains(n))
            .collect()
    }

    /// Names of the images the ledger holds as present.
    pub fn present(&self) -> BTreeSet<String> {
        self.records
            .iter()
            .filter(|(_, r)| matches!(r.state, State::Available { .. }))
            .map(|(k, _)| store_name(&k.1))
            .collect()
    }

    /// When the next Failed entry is due to be tried again.
    pub fn next_retry(&self) -> Option<Instant> {
        self.records
            .values()
            .filter_map(|r| match r.state {
                State::Failed { retry_at, .. } => Some(retry_at),
                _ => None,
            })
            .min()
    }

    pub fn state(&self, key: &Key) -> Option<&State> {
        self.records.get(key).map(|r| &r.state)
    }

    /// What the set's status says about `image`, as the agent reports it.
    pub fn status(&self, key: &Key) -> Option<NodeImageStatus> {
        let r = self.records.get(key)?;
        let mut s = NodeImageStatus::new(&key.1, PullState::Pulling, 0);
        s.refresh = r.want.entry.refresh.clone();
        match &r.state {
            State::Pulling {
                attempts,
                last,
                told,
            } => {
                s.attempts = *attempts;
                s.progress_bytes = told.map(|t| t.bytes as i64);
                if let Some(f) = last {
                    s.last_error = Some(crd::node_image_set::error_message(&f.message));
                    s.reason = Some(f.reason);
                }
            }
            State::Available {
                present,
                attempts,
                policy,
            } => {
                s.state = PullState::Available;
                s.attempts = *attempts;
                s.digest = Some(present.digest.as_str().into());
                s.size_bytes = present.size;
                s.pull_duration_millis = Some(present.duration.as_millis() as i64);
                s.source = Some(match policy {
                    RegistryPolicy::Default => PullSource::Upstream,
                    RegistryPolicy::Mirror => PullSource::Mirror,
                });
            }
            State::Failed {
                failure, attempts, ..
            } => {
                s.state = PullState::Failed;
                s.attempts = *attempts;
                s.last_error = Some(crd::node_image_set::error_message(&failure.message));
                s.reason = Some(failure.reason);
            }
            State::Reclaimed => {
                s.state = PullState::Waiting;
                s.last_error = Some(
                    "removed from the node (kubelet's image garbage collection); not pulled again: its ImagePrefetch asks for no pin"
                        .into(),
                );
            }
        }
        Some(s)
    }
}

/// The reported status of a listed entry that says the image is present (at
/// the pinned digest, when there is one, and for the entry's refresh round):
/// taken as it stands after a restart.
fn adoptable(l: &Listed) -> Option<&NodeImageStatus> {
    let r = l.reported.as_ref()?;
    let pinned_ok = l.want.entry.digest.is_none() || l.want.entry.digest == r.digest;
    // A report of an earlier refresh round: the registry is to be asked again.
    let round_ok = r.refresh == l.want.entry.refresh;
    (r.state == PullState::Available && pinned_ok && round_ok && r.digest.is_some()).then_some(r)
}

fn adopted(l: &Listed, r: &NodeImageStatus) -> Record {
    Record {
        want: l.want.clone(),
        state: State::Available {
            present: Present {
                digest: r.digest.as_deref().unwrap_or_default().to_string(),
                size: r.size_bytes,
                duration: Duration::from_millis(r.pull_duration_millis.unwrap_or(0).max(0) as u64),
            },
            attempts: r.attempts,
            policy: match r.source {
                Some(PullSource::Mirror) => RegistryPolicy::Mirror,
                _ => l.want.entry.registry_policy,
            },
        },
        failed_rounds: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: &str = "registry.example.com/team/app:1";
    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn want(uid: &str, policy: RegistryPolicy, digest: Option<&str>) -> Want {
        Want {
            set_uid: uid.into(),
            entry: NodeImage {
                refresh: None,
                name: IMG.into(),
                registry_policy: policy,
                digest: digest.map(Into::into),
                source: None,
            },
            retry_limit: 3,
            stall_timeout: None,
            pin: true,
            secrets: vec![],
            trace: None,
        }
    }

    fn listed(set: &str, w: &Want) -> Listed {
        Listed {
            key: (set.into(), IMG.into()),
            want: w.clone(),
            reported: None,
        }
    }

    fn key(set: &str) -> Key {
        (set.into(), IMG.into())
    }

    fn present() -> Present {
        Present {
            digest: D.into(),
            size: Some(10),
            duration: Duration::from_millis(5),
        }
    }

    fn failure(reason: PullFailure) -> Failure {
        Failure {
            message: format!("{reason} happened"),
            reason,
        }
    }

    fn starts(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Start(..)))
            .count()
    }

    #[test]
    fn a_new_entry_starts_and_reports() {
        let mut l = Ledger::default();
        let w = want("u1", RegistryPolicy::Default, None);
        let now = Instant::now();
        let a = l.observe(vec![listed("s", &w)], now);
        assert_eq!(
            a,
            [
                Action::Start(key("s"), Box::new(w.clone())),
                Action::Report("s".into())
            ]
        );
        assert!(
            l.observe(vec![listed("s", &w)], now).is_empty(),
            "nothing twice"
        );
        let a = l.finished(&key("s"), &w, Ok((present(), 1)), now);
        assert_eq!(
            a,
            [Action::Report("s".into()), Action::Pin(store_name(IMG))]
        );
        let s = l.status(&key("s")).unwrap();
        assert_eq!(s.state, PullState::Available);
        assert_eq!(s.source, Some(PullSource::Upstream));
        assert_eq!(l.present(), [store_name(IMG)].into());
    }

    #[test]
    fn failed_is_retried_after_a_capped_backoff() {
        let mut l = Ledger::new(Backoff {
            first: Duration::from_secs(30),
            cap: Duration::from_secs(120),
        });
        let w = want("u1", RegistryPolicy::Default, None);
        let t0 = Instant::now();
        l.observe(vec![listed("s", &w)], t0);
        l.finished(&key("s"), &w, Err((failure(PullFailure::NotFound), 4)), t0);
        assert_eq!(l.status(&key("s")).unwrap().state, PullState::Failed);
        assert_eq!(l.next_retry(), Some(t0 + Duration::from_secs(30)));
        assert_eq!(
            starts(&l.observe(vec![listed("s", &w)], t0 + Duration::from_secs(29))),
            0
        );
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(starts(&l.observe(vec![listed("s", &w)], t1)), 1);
        // Failing again doubles the wait, up to the cap.
        l.finished(&key("s"), &w, Err((failure(PullFailure::NotFound), 4)), t1);
        assert_eq!(l.next_retry(), Some(t1 + Duration::from_secs(60)));
        let t2 = t1 + Duration::from_secs(60);
        l.observe(vec![listed("s", &w)], t2);
        l.finished(&key("s"), &w, Err((failure(PullFailure::NotFound), 4)), t2);
        assert_eq!(l.next_retry(), Some(t2 + Duration::from_secs(120)));
        let t3 = t2 + Duration::from_secs(120);
        l.observe(vec![listed("s", &w)], t3);
        l.finished(&key("s"), &w, Err((failure(PullFailure::NotFound), 4)), t3);
        assert_eq!(
            l.next_retry(),
            Some(t3 + Duration::from_secs(120)),
            "capped"
        );
        // Then it works: Available, no retry pending.
        let t4 = t3 + Duration::from_secs(120);
        l.observe(vec![listed("s", &w)], t4);
        l.finished(&key("s"), &w, Ok((present(), 1)), t4);
        assert_eq!(l.next_retry(), None);
    }

    #[test]
    fn default_turned_mirror_while_failed_starts_at_once() {
        let mut l = Ledger::default();
        let seed = want("u1", RegistryPolicy::Default, None);
        let now = Instant::now();
        l.observe(vec![listed("s", &seed)], now);
        l.finished(
            &key("s"),
            &seed,
            Err((failure(PullFailure::RegistryUnreachable), 4)),
            now,
        );
        let mirror = want("u1", RegistryPolicy::Mirror, Some(D));
        let a = l.observe(vec![listed("s", &mirror)], now);
        assert_eq!(a[0], Action::Start(key("s"), Box::new(mirror.clone())));
        assert!(!a.contains(&Action::Abort(key("s"))), "nothing was running");
        l.finished(&key("s"), &mirror, Ok((present(), 1)), now);
        assert_eq!(
            l.status(&key("s")).unwrap().source,
            Some(PullSource::Mirror)
        );
    }

    #[test]
    fn a_mirror_miss_is_asked_again_past_spegels_negative_cache_within_half_a_minute() {
        let waits: Vec<Duration> = mirror_miss_waits().collect();
        // spegel caches an empty lookup for about 2.5 s.
        assert!(
            waits.iter().all(|w| *w > Duration::from_millis(2500)),
            "{waits:?}"
        );
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "growing: {waits:?}");
        let total: Duration = waits.iter().sum();
        assert!(total <= Duration::from_secs(30), "{total:?}");
    }

    #[test]
    fn an_unreadable_set_keeps_what_it_asked_for_until_it_reads_or_goes() {
        let mut l = Ledger::default();
        let w = want("u1", RegistryPolicy::Default, None);
        let now = Instant::now();
        l.observe(vec![listed("s", &w)], now);
        l.finished(&key("s"), &w, Ok((present(), 1)), now);
        // The set's spec stops decoding: it lists nothing, but is held.
        l.hold(["s".to_string()].into());
        assert!(
            l.observe(vec![], now).is_empty(),
            "nothing aborted or released"
        );
        assert_eq!(l.present(), BTreeSet::from([store_name(IMG)]));
        // Readable again with the same entry: nothing to do either.
        l.hold(BTreeSet::new());
        assert!(l.observe(vec![listed("s", &w)], now).is_empty());
        // Held, then deleted (no longer held, not listed): released.
        l.hold(["s".to_string()].into());
        l.observe(vec![], now);
        l.hold(BTreeSet::new());
        assert_eq!(l.observe(vec![], now), [Action::Release(store_name(IMG))]);
    }

    #[test]
    fn deleted_mid_pull_aborts_releases_and_reports_nothing_after() {
        let mut l = Ledger::default();
        let w = want("u1", RegistryPolicy::Default, None);
        let now = Instant::now();
        l.observe(vec![listed("s", &w)], now);
        let a = l.observe(vec![], now);
        assert_eq!(
            a,
            [Action::Abort(key("s")), Action::Release(store_name(IMG))]
        );
        assert!(
            l.finished(&key("s"), &w, Ok((present(), 1)), now)
                .is_empty(),
            "no status write to a deleted set"
        );
        assert!(l.status(&key("s")).is_none());
    }

    #[test]
    fn recreated_with_a_new_uid_starts_over() {
        let mut l = Ledger::default();
        let old = want("u1", RegistryPolicy::Default, None);
        let now = Instant::now();
        l.observe(vec![listed("s", &old)], now);
        let new = want("u2", RegistryPolicy::Default, None);
        let a = l.observe(vec![listed("s", &new)], now);
        assert_eq!(a[0], Action::Abort(key("s")));
        assert_eq!(a[1], Action::Start(key("s"), Box::new(new.clone())));
        // The old task's late result is not taken for the new entry.
        assert!(
            l.finished(&key("s"), &old, Ok((present(), 1)), now)
                .is_empty()
        );
        assert_eq!(l.status(&key("s")).unwrap().state, PullState::Pulling);
    }

    #[test]
    fn digest_pinned_after_the_pull_started_restarts_it() {
        let mut l = Ledger::default();
        let now = Instant::now();
        let tag = want("u1", RegistryPolicy::Mirror, None);
        l.observe(vec![listed("s", &tag)], now);
        let pinned = want("u1", RegistryPolicy::Mirror, Some(D));
        let a = l.observe(vec![listed("s", &pinned)], now);
        assert_eq!(
            &a[..2],
            [
                Action::Abort(key("s")),
                Action::Start(key("s"), Box::new(pinned))
            ]
        );
    }

    #[test]
    fn a_secret_appearing_later_is_picked_up_by_the_retry() {
        let mut l = Ledger::default();
        let now = Instant::now();
        let w = want("u1", RegistryPolicy::Default, None);
        l.observe(vec![listed("s", &w)], now);
        l.attempt_failed(&key("s"), 1, failure(PullFailure::SecretNotFound));
        let s = l.status(&key("s")).unwrap();
        assert_eq!(
            (s.state, s.reason),
            (PullState::Pulling, Some(PullFailure::SecretNotFound))
        );
        l.finished(
            &key("s"),
            &w,
            Err((failure(PullFailure::SecretNotFound), 4)),
            now,
        );
        // The secret now exists: the next round (read afresh) succeeds.
        let later = now + FAILED_BACKOFF.first;
        assert_eq!(starts(&l.observe(vec![listed("s", &w)], later)), 1);
        l.finished(&key("s"), &w, Ok((present(), 1)), later);
        assert_eq!(l.status(&key("s")).unwrap().state, PullState::Available);
    }

    #[test]
    fn two_sets_wanting_one_image_release_it_only_when_both_are_gone() {
        let mut l = Ledger::default();
        let now = Instant::now();
        let w = want("u1", RegistryPolicy::Default, None);
        let w2 = want("u2", RegistryPolicy::Mirror, Some(D));
        let a = l.observe(vec![listed("a", &w), listed("b", &w2)], now);
        assert_eq!(starts(&a), 2);
        l.finished(&key("a"), &w, Ok((present(), 1)), now);
        l.finished(&key("b"), &w2, Ok((present(), 1)), now);
        let a = l.observe(vec![listed("b", &w2)], now);
        assert!(a.is_empty(), "b still wants it: {a:?}");
        let a = l.observe(vec![], now);
        assert_eq!(a, [Action::Release(store_name(IMG))]);
    }

    #[test]
    fn an_unpinned_entry_is_not_pinned_nor_pulled_back_after_garbage_collection() {
        let mut l = Ledger::default();
        let unpinned = Want {
            pin: false,
            ..want("u1", RegistryPolicy::Mirror, Some(D))
        };
        let t0 = Instant::now();
        l.observe(vec![listed("s", &unpinned)], t0);
        let a = l.finished(&key("s"), &unpinned, Ok((present(), 1)), t0);
        assert_eq!(a, [Action::Report("s".into())], "no Pin");
        assert!(l.pinned().is_empty());
        // kubelet's garbage collection took it: reported Waiting, not pulled.
        let a = l.gone_from_node(&store_name(IMG));
        assert_eq!(a, [Action::Report("s".into())]);
        let st = l.status(&key("s")).unwrap();
        assert_eq!(st.state, PullState::Waiting);
        assert!(st.last_error.unwrap().contains("garbage collection"));
        assert!(l.observe(vec![listed("s", &unpinned)], t0).is_empty());
    }

    #[test]
    fn an_image_stays_pinned_while_any_entry_wants_it_pinned() {
        let mut l = Ledger::default();
        let pinned = want("u1", RegistryPolicy::Mirror, Some(D));
        let unpinned = Want {
            pin: false,
            ..want("u2", RegistryPolicy::Mirror, Some(D))
        };
        let t0 = Instant::now();
        let both = || vec![listed("a", &pinned), listed("b", &unpinned)];
        l.observe(both(), t0);
        let a = l.finished(&key("a"), &pinned, Ok((present(), 1)), t0);
        assert!(a.contains(&Action::Pin(store_name(IMG))));
        l.finished(&key("b"), &unpinned, Ok((present(), 1)), t0);
        assert_eq!(l.pinned(), BTreeSet::from([store_name(IMG)]));
        // The pinned entry goes: the pin comes off, the image stays.
        let a = l.observe(vec![listed("b", &unpinned)], t0);
        assert_eq!(a, [Action::Release(store_name(IMG))]);
        assert!(l.pinned().is_empty());
        // Its ImagePrefetch asks for a pin again: pinned, nothing pulled.
        let repinned = Want {
            pin: true,
            ..unpinned.clone()
        };
        let a = l.observe(vec![listed("b", &repinned)], t0);
        assert_eq!(a, [Action::Pin(store_name(IMG))]);
    }

    #[test]
    fn a_reported_present_image_is_adopted_after_a_restart() {
        let mut l = Ledger::default();
        let w = want("u1", RegistryPolicy::Mirror, Some(D));
        let mut reported = NodeImageStatus::new(IMG, PullState::Available, 1);
        reported.digest = Some(D.into());
        reported.source = Some(PullSource::Mirror);
        let a = l.observe(
            vec![Listed {
                key: key("s"),
                want: w.clone(),
                reported: Some(reported.clone()),
            }],
            Instant::now(),
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(l.status(&key("s")).unwrap().state, PullState::Available);
        // Deleted from the node: pulled again.
        let a = l.gone_from_node(&store_name(IMG));
        assert_eq!(a[0], Action::Start(key("s"), Box::new(w)));
    }

    #[test]
    fn a_report_at_another_digest_is_not_adopted() {
        let mut l = Ledger::default();
        let w = want("u1", RegistryPolicy::Mirror, Some(D));
        let mut reported = NodeImageStatus::new(IMG, PullState::Available, 1);
        reported.digest = Some("sha256:other".into());
        let a = l.observe(
            vec![Listed {
                key: key("s"),
                want: w,
                reported: Some(reported),
            }],
            Instant::now(),
        );
        assert_eq!(starts(&a), 1);
    }

    /// A new refresh round on a seed's entry asks the registry again, even
    /// with the image present; the report names the round it answers, and
    /// an agent restarted in the middle of a round does not take the last
    /// round's report for this one's.
    #[test]
    fn a_new_refresh_round_pulls_the_tag_again_and_the_report_names_it() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        let first = Want {
            entry: NodeImage {
                refresh: Some("round-1".into()),
                ..want("u1", RegistryPolicy::Default, None).entry
            },
            ..want("u1", RegistryPolicy::Default, None)
        };
        l.observe(vec![listed("s", &first)], t0);
        l.finished(&key("s"), &first, Ok((present(), 1)), t0);
        let report = l.status(&key("s")).unwrap();
        assert_eq!(report.refresh.as_deref(), Some("round-1"));
        // The same round again: nothing to do.
        assert!(l.observe(vec![listed("s", &first)], t0).is_empty());

        let second = Want {
            entry: NodeImage {
                refresh: Some("round-2".into()),
                ..first.entry.clone()
            },
            ..first.clone()
        };
        let a = l.observe(vec![listed("s", &second)], t0);
        assert!(
            a.contains(&Action::Start(key("s"), Box::new(second.clone()))),
            "{a:?}"
        );
        assert!(
            !a.iter().any(|a| matches!(a, Action::Release(_))),
            "the pin stays while the tag is asked again: {a:?}"
        );
        assert_eq!(
            l.status(&key("s")).unwrap().refresh.as_deref(),
            Some("round-2")
        );

        // Restarted during round 2, with round 1's report in the status.
        let mut restarted = Ledger::default();
        let a = restarted.observe(
            vec![Listed {
                key: key("s"),
                want: second.clone(),
                reported: Some(report.clone()),
            }],
            t0,
        );
        assert_eq!(starts(&a), 1, "round 1's report is no answer to round 2");
        let a = Ledger::default().observe(
            vec![Listed {
                key: key("s"),
                want: first,
                reported: Some(report),
            }],
            t0,
        );
        assert_eq!(starts(&a), 0, "the same round's report is adopted");
    }

    #[test]
    fn a_seeds_progress_is_reported_at_most_once_per_interval() {
        let every = Duration::from_secs(30);
        let mut l = Ledger::new(FAILED_BACKOFF).with_progress_every(every);
        let t0 = Instant::now();
        let seed = want("u1", RegistryPolicy::Default, None);
        l.observe(vec![listed("s", &seed)], t0);
        let told = |l: &Ledger| l.status(&key("s")).unwrap().progress_bytes;
        assert_eq!(told(&l), None);

        // The first bytes are reported at once: the controller sees the
        // seed moving.
        let a = l.progressed(&key("s"), &seed, 100, t0);
        assert_eq!(a, [Action::Report("s".into())]);
        assert_eq!(told(&l), Some(100));
        // More within the interval: held back, the status keeps 100.
        assert!(
            l.progressed(&key("s"), &seed, 500, t0 + every / 2)
                .is_empty()
        );
        assert_eq!(told(&l), Some(100));
        // After the interval: reported.
        let a = l.progressed(&key("s"), &seed, 700, t0 + every);
        assert_eq!(a, [Action::Report("s".into())]);
        assert_eq!(told(&l), Some(700));
        // No new bytes: nothing to say, however long it has been.
        assert!(
            l.progressed(&key("s"), &seed, 700, t0 + every * 5)
                .is_empty()
        );
        // A failed attempt keeps what was reported.
        l.attempt_failed(&key("s"), 1, failure(PullFailure::RegistryUnreachable));
        assert_eq!(told(&l), Some(700));
        // Available: progress is over.
        l.finished(&key("s"), &seed, Ok((present(), 1)), t0 + every * 6);
        assert_eq!(told(&l), None);
        assert!(
            l.progressed(&key("s"), &seed, 900, t0 + every * 7)
                .is_empty()
        );
    }

    #[test]
    fn progress_of_mirror_pulls_and_of_stale_tasks_is_not_reported() {
        let mut l = Ledger::new(FAILED_BACKOFF);
        let t0 = Instant::now();
        let mirror = want("u1", RegistryPolicy::Mirror, Some(D));
        l.observe(vec![listed("s", &mirror)], t0);
        assert!(l.progressed(&key("s"), &mirror, 100, t0).is_empty());
        assert_eq!(l.status(&key("s")).unwrap().progress_bytes, None);
        // A task of the entry as it was before (a seed since turned into a
        // Mirror entry) tells nothing either.
        let seed = want("u1", RegistryPolicy::Default, None);
        assert!(l.progressed(&key("s"), &seed, 100, t0).is_empty());
        // Nor does a task of a deleted set.
        l.observe(vec![], t0);
        assert!(l.progressed(&key("s"), &mirror, 100, t0).is_empty());
    }
}
