//! The agent's loop: follow this node's NodeImageSets, run one pull task per
//! (set, image) entry, report per-image state on change.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, info, warn};

use crd::{NodeImageSet, RegistryPolicy};

use crd::condition::now;

use crate::events::{self, Notice};
use crate::hosts;
use crate::job::{Job, Message, Outcome, forward_progress, pull_span, record_outcome};
use crate::ledger::{self, Action, Failure, Key, Ledger, Present, Want, store_name};
use crate::metrics::{Metrics, PullLabels, SourceLabels};
use crate::pins::Pins;
use crate::pull::{Progress, PullError, Runtime};
use crate::report::{self, Written};
use crate::sets;

/// First and longest wait before writing statuses again after a failed write.
const STATUS_RETRY: crd::backoff::Doubling =
    crd::backoff::Doubling::new(Duration::from_secs(1), Duration::from_secs(30));

/// Field manager of the agent's status writes.
pub use crate::sets::AGENT_MANAGER;

/// Agent settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub containerd_socket: PathBuf,
    /// The node's registry host configuration (spegel writes its mirror entries here).
    pub node_hosts_dir: PathBuf,
    /// A directory the agent owns, for the Mirror-only host configuration.
    pub mirror_hosts_dir: PathBuf,
    /// Which hosts of the node's configuration are the in-cluster mirror.
    pub mirror_endpoints: hosts::MirrorEndpoints,
    /// Pulls at once on this node.
    pub concurrency: usize,
    /// One attempt longer than this is abandoned and counted as failed.
    /// A pull attempt that containerd reports no progress of for this long
    /// is ended (Transfer pulls; the ImagePrefetch may set its own).
    pub stall_timeout: Duration,
    /// The wall-clock limit of an attempt whose progress containerd does
    /// not report (CRI pulls, containerd 1.6).
    pub pull_timeout: Duration,
    /// First and longest wait between attempts (exponential, with jitter).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often present images are checked to be still there.
    pub resync: Duration,
    /// Where to serve /metrics, /healthz and /readyz; `None`: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The platform pulled for: the node's own.
    pub platform: crd::platform::Platform,
    /// Wait before a Failed entry's next round of attempts, doubling to its cap.
    pub failed_backoff: ledger::Backoff,
    /// Least time between two progress reports of a seed's pull.
    pub progress_every: Duration,
    /// The node's image filesystem (containerd's root) and how full it may
    /// be before no pull starts (100: no limit).
    pub image_fs: PathBuf,
    pub image_fs_high_percent: u8,
    /// Sandbox image repositories: released, they keep CRI's pin.
    pub sandbox_images: crate::pins::SandboxImages,
    /// The node's kubelet credential-provider plugins; `None`: not used.
    pub credential_providers: Option<Arc<crate::credential_providers::Providers>>,
}

impl Config {
    pub fn new(node_name: &str) -> Self {
        Config {
            node_name: node_name.to_string(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            node_hosts_dir: "/etc/containerd/certs.d".into(),
            mirror_hosts_dir: "/var/lib/image-prefetch/hosts".into(),
            mirror_endpoints: hosts::MirrorEndpoints::default(),
            concurrency: 2,
            stall_timeout: Duration::from_secs(300),
            pull_timeout: Duration::from_secs(600),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            metrics_addr: None,
            platform: crd::platform::Platform::host(),
            sandbox_images: crate::pins::SandboxImages::default(),
            failed_backoff: ledger::FAILED_BACKOFF,
            progress_every: ledger::PROGRESS_EVERY,
            image_fs: "/var/lib/containerd".into(),
            image_fs_high_percent: crate::disk::DEFAULT_HIGH_PERCENT,
            credential_providers: None,
        }
    }
}

/// Runs until `shutdown` completes; nothing it meets on the way stops it.
pub async fn run(
    client: kube::Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = plumbing::serve::Health::default();
    if let Some(addr) = config.metrics_addr {
        plumbing::serve::serve(addr, Arc::new(registry), health.clone()).await;
    }
    health.set(
        false,
        format!(
            "connecting to containerd at {}",
            config.containerd_socket.display()
        ),
    );
    tokio::pin!(shutdown);
    let Some(runtime) = connect(&config.containerd_socket, &mut shutdown).await else {
        return;
    };
    let runtime = runtime.for_platform(config.platform.clone());
    health.set(
        true,
        format!(
            "connected to containerd; following node {}",
            config.node_name
        ),
    );
    let sets_api: Api<NodeImageSet> = Api::all(client.clone());
    let (store, mut events) = sets::follow(&sets_api, &config.node_name);
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let (failed_backoff, progress_every) = (config.failed_backoff, config.progress_every);
    let sandbox_images = config.sandbox_images.clone();
    let mut agent = Agent {
        client,
        config: Arc::new(config),
        runtime: runtime.clone(),
        sets_api,
        store,
        tasks: HashMap::new(),
        ledger: Ledger::new(failed_backoff).with_progress_every(progress_every),
        write_retry: None,
        listed_once: false,
        limit: Arc::new(Semaphore::new(1)),
        pins: Pins::start(runtime.clone(), sandbox_images),
        tx,
        metrics,
        told_unreadable: HashSet::new(),
        written: HashMap::new(),
        queue: Queue::default(),
    };
    agent.limit = Arc::new(Semaphore::new(agent.config.concurrency.max(1)));
    info!(node = %agent.config.node_name, "image-prefetch agent following this node's NodeImageSets");
    let mut resync = tokio::time::interval(agent.config.resync);
    let mut deletions = events::watch(agent.config.containerd_socket.clone());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.next() => match event {
                // The first complete list of this node's sets: pins left by
                // sets deleted while the agent was away come off now.
                Some(Ok(watcher::Event::InitDone)) if !agent.listed_once => {
                    agent.listed_once = true;
                    agent.sync().await;
                    agent.release_orphaned_pins().await;
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Ok(_)) => agent.sync().await,
                Some(Err(e)) => {
                    agent.metrics.watch_errors.inc();
                    warn!(error = %e, "watching NodeImageSets failed; retrying");
                }
                None => break,
            },
            Some((key, want, outcome)) = rx.recv() => {
                let actions = agent.record(&key, &want, outcome);
                agent.apply(actions);
                agent.sync().await;
            }
            // A Failed entry's next round is due.
            _ = sleep_until(agent.ledger.next_retry()) => agent.sync().await,
            // Statuses that could not be written are tried again.
            _ = sleep_until(agent.write_retry.map(|(at, _)| at)) => agent.sync().await,
            _ = resync.tick() => {
                agent.check_present().await;
                agent.sync().await;
                if agent.listed_once {
                    agent.repair_pins().await;
                }
            }
            Some(notice) = deletions.recv() => {
                match notice {
                    Notice::Deleted(name) => {
                        let actions = agent.ledger.gone_from_node(&name);
                        if !actions.is_empty() {
                            info!(image = %name, "prefetched image was deleted from the node; pulling it again");
                        }
                        agent.apply(actions);
                    }
                    Notice::CheckAll => agent.check_present().await,
                }
                agent.sync().await;
            }
        }
    }
    for task in agent.tasks.values() {
        task.abort();
    }
    agent.leave_nothing_behind().await;
}

/// containerd on a node that is starting, or restarting under the agent,
/// may not answer yet (its socket can exist before its services do): the
/// agent waits for it with capped backoff, not readiness, rather than exit.
const CONNECT_RETRY: crd::backoff::Doubling =
    crd::backoff::Doubling::new(Duration::from_millis(200), Duration::from_secs(10));
const CONNECT_ATTEMPT: Duration = Duration::from_secs(10);

/// The runtime once containerd answers; `None` when `shutdown` came first.
async fn connect(
    socket: &std::path::Path,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Option<Runtime> {
    let mut failures = 0;
    loop {
        // A socket that accepts but never answers must not hold the agent.
        let attempt = tokio::time::timeout(CONNECT_ATTEMPT, Runtime::connect(socket)).await;
        match attempt.unwrap_or_else(|_| {
            Err(PullError::Connect {
                socket: socket.display().to_string(),
                message: format!("no answer within {CONNECT_ATTEMPT:?}"),
            })
        }) {
            Ok(runtime) => return Some(runtime),
            Err(e) => {
                failures += 1;
                let wait = CONNECT_RETRY.after(failures);
                warn!(error = %e, retry_in = ?wait, "containerd does not answer yet");
                tokio::select! {
                    _ = shutdown.as_mut() => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Sleeps until `at`, or for ever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

struct Agent {
    client: kube::Client,
    config: Arc<Config>,
    runtime: Runtime,
    sets_api: Api<NodeImageSet>,
    store: Store<NodeImageSet>,
    /// The running pull task of each entry that has one.
    tasks: HashMap<Key, JoinHandle<()>>,
    /// Every entry's state and what to do about it (pure; see `ledger.rs`).
    ledger: Ledger,
    /// When to write statuses again after a failed write, and the wait used.
    write_retry: Option<(Instant, Duration)>,
    /// Whether the watch has listed this node's sets completely once.
    listed_once: bool,
    limit: Arc<Semaphore>,
    tx: mpsc::Sender<Message>,
    /// Pins and releases, made one after another in decision order.
    pins: Pins,
    metrics: Metrics,
    /// Unreadable sets already logged, with why (each logged once).
    told_unreadable: HashSet<(String, String)>,
    /// The last status written to each set (by uid), until the watch brings it back.
    written: HashMap<String, Written>,
    /// Pulls decided but not started: no task yet (see `TASKS_PER_PERMIT`).
    queue: Queue,
}

/// Pull tasks per concurrency permit. A task waiting out a mirror miss or a
/// retry holds no permit, so there are more tasks than permits; but not one
/// per entry: a task costs tens of KiB, and a node may hold every entry of
/// the cluster's budget (`cargo xtask bench agent-memory`).
const TASKS_PER_PERMIT: usize = 8;

/// Pulls waiting for a task, first decided first started. Replacing or
/// removing an entry is O(1): its older place in the order is skipped.
#[derive(Default)]
struct Queue {
    order: std::collections::VecDeque<(Key, u64)>,
    waiting: HashMap<Key, (u64, Want)>,
    next: u64,
}

impl Queue {
    fn push(&mut self, key: Key, want: Want) {
        self.next += 1;
        self.order.push_back((key.clone(), self.next));
        self.waiting.insert(key, (self.next, want));
    }

    fn remove(&mut self, key: &Key) {
        self.waiting.remove(key);
    }

    fn pop(&mut self) -> Option<(Key, Want)> {
        while let Some((key, n)) = self.order.pop_front() {
            if self.waiting.get(&key).is_some_and(|(m, _)| *m == n) {
                let (_, want) = self.waiting.remove(&key).expect("just seen");
                return Some((key, want));
            }
        }
        None
    }
}

impl Agent {
    /// Hands the sets as they are to the ledger, carries out what it
    /// decides, and writes every status that changed.
    async fn sync(&mut self) {
        let sets = self.store.state();
        let unreadable: Vec<_> = sets
            .iter()
            .filter_map(|set| Some((set.name_any(), set.spec.unreadable.as_ref()?)))
            .collect();
        for (name, why) in &unreadable {
            if self.told_unreadable.insert((name.clone(), why.to_string())) {
                warn!(set = %name, field = %why.field, error = %why.error,
                    "this NodeImageSet's spec cannot be read by this agent; its images are kept as they were until it can be");
            }
        }
        self.metrics.unreadable_sets.set(unreadable.len() as i64);
        self.ledger
            .hold(unreadable.into_iter().map(|(name, _)| name).collect());
        let listed = report::listed(&sets);
        let actions = self.ledger.observe(listed, Instant::now());
        self.apply(actions);
        self.metrics
            .images_present
            .set(self.ledger.present().len() as i64);
        // Only sets that exist are written: a deleted set gets no status write.
        let mut failed = false;
        let uids: HashSet<String> = sets.iter().filter_map(|s| s.uid()).collect();
        self.written.retain(|uid, _| uids.contains(uid));
        for set in &sets {
            failed |= !self.write_status(set).await;
        }
        // A failed write is tried again, sooner at first, then less often
        // (the API server may be away), until one round succeeds.
        self.write_retry = if failed {
            let wait = STATUS_RETRY.next(self.write_retry.map(|(_, wait)| wait));
            Some((Instant::now() + wait, wait))
        } else {
            None
        };
    }

    /// Carries out the ledger's decisions (status writes happen in `sync`).
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Start(key, want) => self.start(key, *want),
                Action::Abort(key) => {
                    if let Some(task) = self.tasks.remove(&key) {
                        task.abort();
                    }
                    self.queue.remove(&key);
                }
                Action::Pin(name) => self.pin(name),
                Action::Release(name) => self.release(name),
                Action::Report(_) => {}
            }
        }
        while self.tasks.len() < self.config.concurrency.max(1) * TASKS_PER_PERMIT {
            let Some((key, want)) = self.queue.pop() else {
                break;
            };
            self.spawn(key, want);
        }
    }

    /// Queues the entry's pull (replacing a running or queued one): only
    /// `TASKS_PER_PERMIT` pull tasks per permit exist at once, however many
    /// entries the node's sets hold.
    fn start(&mut self, key: Key, want: Want) {
        if let Some(old) = self.tasks.remove(&key) {
            old.abort();
        }
        self.queue.push(key, want);
    }

    fn spawn(&mut self, key: Key, want: Want) {
        // A seed tells its progress (the controller's deadline runs from it).
        let progress = (want.entry.registry_policy == RegistryPolicy::Default).then(|| {
            let (progress, told) = watch::channel(Progress::default());
            tokio::spawn(forward_progress(
                told,
                self.tx.clone(),
                key.clone(),
                want.clone(),
            ));
            progress
        });
        let job = Job {
            config: self.config.clone(),
            client: self.client.clone(),
            runtime: self.runtime.clone(),
            limit: self.limit.clone(),
            tx: self.tx.clone(),
            key: key.clone(),
            wanted: want.clone(),
            progress,
            mirror_misses: self.metrics.mirror_misses.clone(),
        };
        let span = pull_span(&want, &self.config.node_name);
        let handle = tokio::spawn(async move {
            let outcome = job.pull_with_retries().instrument(span.clone()).await;
            record_outcome(&span, &outcome);
            let message = (job.key.clone(), job.wanted.clone(), Outcome::Done(outcome));
            let _ = job.tx.send(message).await;
        });
        self.tasks.insert(key, handle);
    }

    /// A task's news, into the ledger (and the metrics, for a finished pull
    /// the ledger still wants).
    fn record(&mut self, key: &Key, want: &Want, outcome: Outcome) -> Vec<Action> {
        let now = Instant::now();
        match outcome {
            Outcome::Attempt { attempts, failure } => {
                self.metrics.retries.inc();
                self.ledger.attempt_failed(key, attempts, failure)
            }
            Outcome::Progress(bytes) => self.ledger.progressed(key, want, bytes, now),
            Outcome::Done(result) => {
                let policy = want.entry.registry_policy;
                let result = match result {
                    Ok((pulled, attempts)) => {
                        info!(image = %key.1, digest = %pulled.digest, secs = pulled.duration.as_secs_f64(), "image present");
                        Ok((
                            Present {
                                digest: pulled.digest,
                                size: pulled.size,
                                duration: pulled.duration,
                            },
                            attempts,
                        ))
                    }
                    Err((failure, attempts)) => {
                        warn!(image = %key.1, error = %failure.message, reason = %failure.reason, attempts, "giving up on image for now; it will be tried again");
                        Err((failure, attempts))
                    }
                };
                let counted = result.clone();
                let actions = self.ledger.finished(key, want, result, now);
                // The task that sent this is done, unless the entry was
                // restarted since (then the running task is a newer one).
                if !actions.is_empty() || self.ledger.state(key).is_none() {
                    self.tasks.remove(key);
                }
                if !actions.is_empty() {
                    self.count(policy, &counted);
                }
                actions
            }
        }
    }

    fn count(&self, policy: RegistryPolicy, result: &Result<(Present, i32), (Failure, i32)>) {
        let result_label = match result {
            Ok(_) => "success".to_string(),
            Err((f, _)) => f.reason.to_string(),
        };
        let labels = PullLabels {
            policy: format!("{policy:?}"),
            result: result_label,
        };
        self.metrics.pulls.get_or_create(&labels).inc();
        // A confirmation of an image already there moved no bytes.
        if let Ok((present, _)) = result
            && !present.duration.is_zero()
        {
            self.metrics
                .pull_seconds
                .observe(present.duration.as_secs_f64());
            let source = match policy {
                RegistryPolicy::Mirror => "mirror",
                RegistryPolicy::Default => "upstream",
            };
            let labels = SourceLabels {
                source: source.into(),
            };
            self.metrics
                .bytes
                .get_or_create(&labels)
                .inc_by(present.size.unwrap_or(0).max(0) as u64);
        }
    }

    fn pin(&self, name: String) {
        self.pins.pin(name);
    }

    /// An image no entry asks for any more loses its GC pin (it stays on the
    /// node; deleting images is not the operator's job).
    fn release(&self, name: String) {
        self.pins.release(name);
    }

    /// Puts pins right: every image the ledger holds as present is pinned
    /// (a pin someone removed, or a pin lost to a race, comes back), and
    /// the agent's pins no entry wants come off.
    async fn repair_pins(&self) {
        for name in self.ledger.pinned() {
            self.pin(name);
        }
        self.release_orphaned_pins().await;
    }

    /// On the way out (an uninstall, or a restart): pins no entry wants come
    /// off — `helm uninstall` deletes every set just before it stops the
    /// agents — and every pin change decided is made before the process
    /// ends; the Mirror-only host files go (they are written again before
    /// every Mirror pull).
    async fn leave_nothing_behind(&self) {
        if self.listed_once {
            self.release_orphaned_pins().await;
        }
        if tokio::time::timeout(Duration::from_secs(10), self.pins.flushed())
            .await
            .is_err()
        {
            warn!("pin changes still under way at exit");
        }
        let dir = &self.config.mirror_hosts_dir;
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if let Err(e) = removed {
                    warn!(path = %path.display(), error = %e, "could not remove a Mirror-only host file");
                }
            }
        }
    }

    /// Drops the agent's pin from every image no entry wants (sets deleted
    /// while the agent was down). Images other pins hold are not touched.
    async fn release_orphaned_pins(&self) {
        // An unreadable set may want any image: release nothing until every
        // set reads (the next agent start tries again).
        if self
            .store
            .state()
            .iter()
            .any(|s| s.spec.unreadable.is_some())
        {
            warn!("a NodeImageSet of this node cannot be read: no pin is released at start-up");
            return;
        }
        let wanted: std::collections::HashSet<String> = self
            .store
            .state()
            .iter()
            .filter(|set| set.spec.pin != Some(false))
            .flat_map(|set| {
                set.spec
                    .image_set
                    .iter()
                    .map(|e| store_name(&e.name))
                    .collect::<Vec<_>>()
            })
            .collect();
        match self.runtime.own_pinned().await {
            Ok(pinned) => {
                for name in pinned.into_iter().filter(|n| !wanted.contains(n)) {
                    self.release(name);
                }
            }
            Err(e) => warn!(error = %e, "could not list the images the agent pinned"),
        }
    }

    /// Images the ledger holds as present that containerd no longer has are pulled again.
    async fn check_present(&mut self) {
        // containerd may have come back with its state wiped (a node
        // re-imaged under a running agent): the namespace again first.
        if let Err(e) = self.runtime.ensure_namespace().await {
            warn!(error = %e, "could not create containerd's Kubernetes namespace");
        }
        for name in self.ledger.present() {
            if let Ok(None) = self.runtime.image(&name).await {
                info!(image = %name, "prefetched image was removed from the node; pulling it again");
                let actions = self.ledger.gone_from_node(&name);
                self.apply(actions);
            }
        }
    }

    /// Writes the set's status if one is due; `false` when the write failed.
    async fn write_status(&mut self, set: &NodeImageSet) -> bool {
        let name = set.name_any();
        let uid = set.uid().unwrap_or_default();
        let Some((status, written)) =
            report::due(&self.ledger, set, &now(), self.written.get(&uid))
        else {
            return true;
        };
        match sets::write(&self.sets_api, &name, &status).await {
            Ok(_) => {
                // Only a write that landed: one that did not (the set gone,
                // or its status not served yet) is made again next time.
                self.written.insert(uid, written);
                true
            }
            // Gone meanwhile (then the watch drops it and nothing is tried
            // again), or not served yet (a CRD just established can answer
            // 404 for a while): tried again with the backoff either way.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                debug!(set = %name, "NodeImageSet status not found; trying again");
                false
            }
            Err(e) => {
                self.metrics.status_write_errors.inc();
                warn!(set = %name, error = %e, "writing NodeImageSet status failed; retrying with backoff");
                false
            }
        }
    }
}
