//! The agent's loop: follow this node's NodeImageSets, run one pull task per
//! (set, image) entry, report per-image state on change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, field, info, info_span, warn};

use crd::{
    NodeImage, NodeImageSet, NodeImageSetStatus, NodeImageStatus, PullSource, PullState,
    RegistryPolicy, SecretReference, keys, reference,
};

use crd::condition::{condition, now};

use crate::credentials::Keyring;
use crate::events::{self, Notice};
use crate::hosts;
use crate::metrics::{Metrics, PullLabels, SourceLabels};
use crate::pull::{PullError, Pulled, Runtime};

/// Field manager of the agent's status writes.
pub const AGENT_MANAGER: &str = "image-prefetch-agent";

/// Agent settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub containerd_socket: PathBuf,
    /// The node's registry host configuration (spegel writes its mirror entries here).
    pub node_hosts_dir: PathBuf,
    /// A directory the agent owns, for the Mirror-only host configuration.
    pub mirror_hosts_dir: PathBuf,
    /// Pulls at once on this node.
    pub concurrency: usize,
    /// One attempt longer than this is abandoned and counted as failed.
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
}

impl Config {
    pub fn new(node_name: &str) -> Self {
        Config {
            node_name: node_name.to_string(),
            containerd_socket: "/run/containerd/containerd.sock".into(),
            node_hosts_dir: "/etc/containerd/certs.d".into(),
            mirror_hosts_dir: "/var/lib/image-prefetch/hosts".into(),
            concurrency: 2,
            pull_timeout: Duration::from_secs(600),
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            metrics_addr: None,
            platform: crd::platform::Platform::host(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pull(#[from] PullError),
}

/// (NodeImageSet name, image as listed).
type Key = (String, String);

enum Outcome {
    Attempt {
        attempts: i32,
        error: String,
        reason: String,
    },
    Done(Result<(Pulled, i32), (String, String, i32)>),
}

struct Task {
    entry: NodeImage,
    handle: JoinHandle<()>,
}

/// Runs until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = telemetry::serve::Health::default();
    if let Some(addr) = config.metrics_addr {
        telemetry::serve::serve(addr, Arc::new(registry), health.clone()).await;
    }
    let runtime = Runtime::connect(&config.containerd_socket)
        .await?
        .for_platform(config.platform.clone());
    health.set_ready(true);
    let sets_api: Api<NodeImageSet> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let wc = watcher::Config::default().labels(&keys::on_node(&config.node_name));
    let mut events = reflector::reflector(writer, watcher(sets_api.clone(), wc))
        .applied_objects()
        .boxed();
    let (tx, mut rx) = mpsc::channel::<(Key, Outcome)>(64);
    let mut agent = Agent {
        client,
        config: Arc::new(config),
        runtime,
        sets_api,
        store,
        tasks: HashMap::new(),
        states: HashMap::new(),
        known: HashSet::new(),
        limit: Arc::new(Semaphore::new(1)),
        tx,
        metrics,
    };
    agent.limit = Arc::new(Semaphore::new(agent.config.concurrency.max(1)));
    info!(node = %agent.config.node_name, "image-prefetch agent following this node's NodeImageSets");
    let mut resync = tokio::time::interval(agent.config.resync);
    let mut deletions = events::watch(agent.config.containerd_socket.clone());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.next() => match event {
                Some(Ok(_)) => agent.sync().await,
                Some(Err(e)) => warn!(error = %e, "watching NodeImageSets failed; retrying"),
                None => break,
            },
            Some((key, outcome)) = rx.recv() => {
                agent.record(key.clone(), outcome);
                agent.sync().await;
            }
            _ = resync.tick() => {
                agent.check_present().await;
                agent.sync().await;
            }
            Some(notice) = deletions.recv() => {
                match notice {
                    Notice::Deleted(name) => agent.forget(&name),
                    Notice::CheckAll => agent.check_present().await,
                }
                agent.sync().await;
            }
        }
    }
    for task in agent.tasks.values() {
        task.handle.abort();
    }
    Ok(())
}

struct Agent {
    client: kube::Client,
    config: Arc<Config>,
    runtime: Runtime,
    sets_api: Api<NodeImageSet>,
    store: Store<NodeImageSet>,
    tasks: HashMap<Key, Task>,
    states: HashMap<Key, NodeImageStatus>,
    /// Entries seen since this agent started: a reported status is adopted only once.
    known: HashSet<Key>,
    limit: Arc<Semaphore>,
    tx: mpsc::Sender<(Key, Outcome)>,
    metrics: Metrics,
}

impl Agent {
    /// Starts what is listed and not under way, stops what is no longer
    /// listed, and writes every status that changed.
    async fn sync(&mut self) {
        let sets = self.store.state();
        let mut wanted: HashMap<Key, Wanted> = HashMap::new();
        for set in &sets {
            for entry in &set.spec.image_set {
                let key = (set.name_any(), entry.name.clone());
                // After a restart, what the status already says is taken as it
                // stands; the presence check that follows every subscription
                // to containerd's events finds what has gone since.
                if self.known.insert(key.clone())
                    && let Some(reported) = reported_available(set, entry)
                {
                    self.states.insert(key.clone(), reported);
                }
                wanted.insert(
                    key,
                    Wanted {
                        entry: entry.clone(),
                        retry_limit: set.spec.image_download_retry_limit,
                        secrets: set.spec.image_pull_secrets.clone(),
                        trace: set.annotations().get(keys::TRACEPARENT_ANNOTATION).cloned(),
                    },
                );
            }
        }
        // Entries withdrawn (a replaced seed) or changed (policy, pinned digest) stop.
        self.tasks.retain(|key, task| {
            let keep = wanted.get(key).is_some_and(|w| w.entry == task.entry);
            if !keep {
                task.handle.abort();
            }
            keep
        });
        let withdrawn: Vec<Key> = self
            .states
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        self.known.retain(|key| wanted.contains_key(key));
        for key in withdrawn {
            self.states.remove(&key);
            self.release(&key.1, &wanted);
        }
        for (key, w) in wanted {
            let done = self
                .states
                .get(&key)
                .is_some_and(|s| matches!(s.state, PullState::Available | PullState::Failed));
            if !done && !self.tasks.contains_key(&key) {
                self.start(key, w);
            }
        }
        let present = self
            .states
            .values()
            .filter(|s| s.state == PullState::Available)
            .count();
        self.metrics.images_present.set(present as i64);
        for set in &sets {
            self.write_status(set).await;
        }
    }

    fn start(&mut self, key: Key, wanted: Wanted) {
        self.states.insert(
            key.clone(),
            NodeImageStatus::new(&wanted.entry.name, PullState::Pulling, 0),
        );
        let job = Job {
            config: self.config.clone(),
            client: self.client.clone(),
            runtime: self.runtime.clone(),
            limit: self.limit.clone(),
            tx: self.tx.clone(),
            key: key.clone(),
            wanted: wanted.clone(),
        };
        let span = pull_span(&wanted, &self.config.node_name);
        let handle = tokio::spawn(async move {
            let outcome = job.pull_with_retries().instrument(span.clone()).await;
            record_outcome(&span, &outcome);
            let _ = job.tx.send((job.key.clone(), Outcome::Done(outcome))).await;
        });
        let entry = wanted.entry;
        self.tasks.insert(key, Task { entry, handle });
    }

    fn record(&mut self, key: Key, outcome: Outcome) {
        let Some(state) = self.states.get_mut(&key) else {
            return;
        };
        match outcome {
            Outcome::Attempt {
                attempts,
                error,
                reason,
            } => {
                self.metrics.retries.inc();
                state.attempts = attempts;
                state.last_error = Some(error);
                state.reason = Some(reason);
            }
            Outcome::Done(result) => {
                let policy = self.tasks.remove(&key).map(|t| t.entry.registry_policy);
                let policy_label = format!("{:?}", policy.unwrap_or(RegistryPolicy::Default));
                match result {
                    Ok((pulled, attempts)) => {
                        info!(image = %key.1, digest = %pulled.digest, secs = pulled.duration.as_secs_f64(), "image present");
                        let labels = PullLabels {
                            policy: policy_label,
                            result: "success".into(),
                        };
                        self.metrics.pulls.get_or_create(&labels).inc();
                        // A confirmation of an image already there moved no bytes.
                        if !pulled.duration.is_zero() {
                            self.metrics
                                .pull_seconds
                                .observe(pulled.duration.as_secs_f64());
                            let source = match policy {
                                Some(RegistryPolicy::Mirror) => "mirror",
                                _ => "upstream",
                            };
                            let bytes = pulled.size.unwrap_or(0).max(0) as u64;
                            let labels = SourceLabels {
                                source: source.into(),
                            };
                            self.metrics.bytes.get_or_create(&labels).inc_by(bytes);
                        }
                        state.state = PullState::Available;
                        state.attempts = attempts;
                        state.digest = Some(pulled.digest);
                        state.size_bytes = pulled.size;
                        state.pull_duration_millis = Some(pulled.duration.as_millis() as i64);
                        state.last_error = None;
                        state.reason = None;
                        state.source = policy.map(|p| match p {
                            RegistryPolicy::Default => PullSource::Upstream,
                            RegistryPolicy::Mirror => PullSource::Mirror,
                        });
                    }
                    Err((error, reason, attempts)) => {
                        warn!(image = %key.1, %error, %reason, attempts, "giving up on image");
                        let labels = PullLabels {
                            policy: policy_label,
                            result: reason.clone(),
                        };
                        self.metrics.pulls.get_or_create(&labels).inc();
                        state.state = PullState::Failed;
                        state.attempts = attempts;
                        state.last_error = Some(error);
                        state.reason = Some(reason);
                    }
                }
            }
        }
    }

    /// An image no entry asks for any more loses its GC pin (it stays on the
    /// node; deleting images is not the operator's job).
    fn release(&self, image: &str, wanted: &HashMap<Key, Wanted>) {
        let name = store_name(image);
        if wanted.keys().any(|(_, i)| store_name(i) == name) {
            return;
        }
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            match runtime.unpin(&name).await {
                Ok(()) => {
                    info!(image = %name, "no longer prefetched here; released to kubelet's garbage collection")
                }
                Err(e) => warn!(image = %name, error = %e, "could not release the GC pin"),
            }
        });
    }

    /// containerd deleted `name`: the entries for it are pulled again.
    fn forget(&mut self, name: &str) {
        let before = self.states.len();
        self.states
            .retain(|key, s| !(s.state == PullState::Available && store_name(&key.1) == name));
        if self.states.len() != before {
            info!(image = %name, "prefetched image was deleted from the node; pulling it again");
        }
    }

    /// Images reported present that containerd no longer has are pulled again.
    async fn check_present(&mut self) {
        let mut gone = Vec::new();
        for (key, state) in &self.states {
            if state.state != PullState::Available {
                continue;
            }
            let name = store_name(&key.1);
            if let Ok(None) = self.runtime.image(&name).await {
                info!(image = %key.1, "prefetched image was removed from the node; pulling it again");
                gone.push(key.clone());
            }
        }
        for key in gone {
            self.states.remove(&key);
        }
    }

    async fn write_status(&self, set: &NodeImageSet) {
        let name = set.name_any();
        let images: Vec<NodeImageStatus> = set
            .spec
            .image_set
            .iter()
            .filter_map(|e| self.states.get(&(name.clone(), e.name.clone())).cloned())
            .collect();
        let available = images
            .iter()
            .filter(|i| i.state == PullState::Available)
            .count();
        let failed: Vec<&str> = images
            .iter()
            .filter(|i| i.state == PullState::Failed)
            .map(|i| i.name.as_str())
            .collect();
        let total = set.spec.image_set.len();
        let (ready, reason, message) = if !failed.is_empty() {
            (
                false,
                "PullFailed",
                format!("gave up on: {}", failed.join(", ")),
            )
        } else if available == total {
            (
                true,
                "AllImagesPresent",
                format!("all {total} images are on the node"),
            )
        } else {
            (
                false,
                "Pulling",
                format!("{available} of {total} images are on the node"),
            )
        };
        let old = set
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or(&[]);
        let generation = set.metadata.generation;
        let ready = condition(old, "Ready", ready, reason, &message, generation, &now());
        let status = NodeImageSetStatus {
            available: available as i32,
            total: total as i32,
            images,
            conditions: vec![ready],
        };
        if set.status.as_ref() == Some(&status) {
            return;
        }
        let body = json!({
            "apiVersion": NodeImageSet::api_version(&()),
            "kind": NodeImageSet::kind(&()),
            "status": status,
        });
        let params = PatchParams::apply(AGENT_MANAGER).force();
        if let Err(e) = self
            .sets_api
            .patch_status(&name, &params, &Patch::Apply(&body))
            .await
        {
            warn!(set = %name, error = %e, "writing NodeImageSet status failed; will retry on the next change");
        }
    }
}

/// The status entry of `entry` if it says the image is present (at the pinned digest, when there is one).
fn reported_available(set: &NodeImageSet, entry: &NodeImage) -> Option<NodeImageStatus> {
    let reported = set.report_on(&entry.name)?;
    let pinned_ok = entry.digest.is_none() || entry.digest == reported.digest;
    (reported.state == PullState::Available && pinned_ok).then(|| reported.clone())
}

/// The name the image is stored under: what kubelet will ask for.
fn store_name(image: &str) -> String {
    reference::parse(image)
        .map(|r| r.canonical())
        .unwrap_or_else(|_| image.to_string())
}

/// What to pull: the pinned digest when the controller gave one.
fn source(entry: &NodeImage) -> String {
    match (reference::parse(&entry.name), &entry.digest) {
        (Ok(r), Some(d)) => format!("{}/{}@{d}", r.registry, r.repository),
        (Ok(r), None) => r.canonical(),
        (Err(_), _) => entry.name.clone(),
    }
}

/// What one entry asks for.
#[derive(Clone, Debug)]
struct Wanted {
    entry: NodeImage,
    retry_limit: i32,
    secrets: Vec<SecretReference>,
    /// The `traceparent` of the controller span that wrote the entry's set.
    trace: Option<String>,
}

/// The span of one entry's pull, all attempts included, continuing the
/// controller's trace when the set names one.
fn pull_span(wanted: &Wanted, node: &str) -> tracing::Span {
    let entry = &wanted.entry;
    let span = info_span!(
        "pull",
        image = %entry.name,
        policy = ?entry.registry_policy,
        node = %node,
        digest = entry.digest.as_deref(),
        attempts = field::Empty,
        bytes = field::Empty,
        result = field::Empty,
        error.r#type = field::Empty,
        otel.status_code = field::Empty,
        otel.status_description = field::Empty,
    );
    if let Some(parent) = wanted
        .trace
        .as_deref()
        .and_then(telemetry::propagation::parse)
    {
        telemetry::propagation::set_parent(&span, &parent);
    }
    span
}

fn record_outcome(span: &tracing::Span, outcome: &Result<(Pulled, i32), (String, String, i32)>) {
    match outcome {
        Ok((pulled, attempts)) => {
            span.record("digest", pulled.digest.as_str());
            span.record("attempts", attempts);
            if let Some(bytes) = pulled.size {
                span.record("bytes", bytes);
            }
            let result = if pulled.duration.is_zero() {
                "already-present"
            } else {
                "success"
            };
            span.record("result", result);
        }
        Err((error, reason, attempts)) => {
            span.record("attempts", attempts);
            span.record("result", reason.as_str());
            span.record("error.type", reason.as_str());
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", error.as_str());
        }
    }
}

/// One entry's pull, with everything it needs.
struct Job {
    config: Arc<Config>,
    client: kube::Client,
    runtime: Runtime,
    limit: Arc<Semaphore>,
    tx: mpsc::Sender<(Key, Outcome)>,
    key: Key,
    wanted: Wanted,
}

impl Job {
    async fn pull_with_retries(&self) -> Result<(Pulled, i32), (String, String, i32)> {
        let entry = &self.wanted.entry;
        let name = store_name(&entry.name);
        // Already there (kubelet pulled it, or an earlier run of the agent): confirm only.
        if let Ok(Some((digest, size))) = self.runtime.image(&name).await
            && entry.digest.as_ref().is_none_or(|d| *d == digest)
        {
            return Ok((
                Pulled {
                    digest,
                    size,
                    duration: Duration::ZERO,
                },
                0,
            ));
        }
        let attempts = std::sync::atomic::AtomicI32::new(0);
        let attempt = || async {
            let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let span = info_span!(
                "attempt",
                attempt = n,
                otel.status_code = field::Empty,
                otel.status_description = field::Empty
            );
            let result = self.attempt(&name).instrument(span.clone()).await;
            if let Err((error, _)) = &result {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", error.as_str());
            }
            result
        };
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.backoff_min)
            .with_max_delay(self.config.backoff_max)
            .with_jitter()
            .with_max_times(self.wanted.retry_limit.max(0) as usize);
        let result = attempt
            .retry(backoff)
            .notify(|(error, reason): &(String, String), wait: Duration| {
                let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
                warn!(image = %entry.name, %error, retry_in = ?wait, attempt = n, "pull failed; retrying");
                let progress = Outcome::Attempt {
                    attempts: n,
                    error: error.clone(),
                    reason: reason.clone(),
                };
                let _ = self.tx.try_send((self.key.clone(), progress));
            })
            .await;
        let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
        result.map(|p| (p, n)).map_err(|(e, r)| (e, r, n))
    }

    /// One attempt; the error is (message, reason).
    async fn attempt(&self, name: &str) -> Result<Pulled, (String, String)> {
        let entry = &self.wanted.entry;
        let parsed = reference::parse(&entry.name).ok();
        let registry = parsed
            .as_ref()
            .map(|r| r.registry.clone())
            .unwrap_or_default();
        let repository = parsed.map(|r| r.repository).unwrap_or_default();
        let host_dir = match entry.registry_policy {
            RegistryPolicy::Default => self.config.node_hosts_dir.clone(),
            RegistryPolicy::Mirror => hosts::prepare_mirror(
                &self.config.node_hosts_dir,
                &self.config.mirror_hosts_dir,
                &registry,
            )
            .map_err(|e| (e.to_string(), "NoMirror".to_string()))?,
        };
        // Read at every attempt: a secret created or fixed after a failure is used on the next try.
        let keyring = if self.wanted.secrets.is_empty() {
            None
        } else {
            let ring = Keyring::load(&self.client, &self.wanted.secrets)
                .await
                .map_err(|e| (e.to_string(), e.reason().to_string()))?;
            Some((ring, repository))
        };
        let _permit = self
            .limit
            .acquire()
            .await
            .map_err(|e| (e.to_string(), "Stopping".to_string()))?;
        let source = source(entry);
        let pull = self.runtime.pull(&source, name, &host_dir, keyring);
        match tokio::time::timeout(self.config.pull_timeout, pull).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err((
                format!("pulling {} from {registry}: {e}", entry.name),
                e.reason().to_string(),
            )),
            Err(_) => {
                let e = PullError::Timeout {
                    image: entry.name.clone(),
                    secs: self.config.pull_timeout.as_secs(),
                };
                Err((e.to_string(), e.reason().to_string()))
            }
        }
    }
}

/// Status entries by image for one set, for tests and tools.
pub fn by_image(status: &NodeImageSetStatus) -> BTreeMap<&str, &NodeImageStatus> {
    status.images.iter().map(|i| (i.name.as_str(), i)).collect()
}
