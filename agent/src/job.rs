//! One entry's pull, as a task of its own: the attempts with their retries
//! and backoff, the Mirror-only host configuration, credentials, the disk
//! guard, the progress a seed tells, and the span the pull is traced as.
//! What the loop (`work`) hears from it is an [`Outcome`].

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{Instrument as _, debug, field, info_span, warn};

use crd::{NodeImage, PullFailure, RegistryPolicy, reference};

use crate::credentials::Keyring;
use crate::hosts;
use crate::ledger::{self, Failure, Key, Want, store_name};
use crate::pull::{self, Progress, PullError, Pulled, Runtime};
use crate::work::Config;

/// How one entry's pull ended: what was pulled, or why not; and the attempts made.
pub(crate) type PullResult = Result<(Pulled, i32), (Failure, i32)>;

/// What a pull task tells the loop.
pub(crate) enum Outcome {
    /// An attempt failed; the task goes on retrying.
    Attempt {
        attempts: i32,
        failure: Failure,
    },
    Done(PullResult),
    /// The pull has fetched this many bytes so far.
    Progress(u64),
}

/// A message from the pull task of `key`, started for `want`.
pub(crate) type Message = (Key, Want, Outcome);

/// Hands a pull's progress to the loop, at most once a second (containerd
/// tells it far more often); the ledger decides what gets reported. Ends
/// when the pull's task ends (its sender is dropped).
pub(crate) async fn forward_progress(
    mut told: watch::Receiver<Progress>,
    tx: mpsc::Sender<Message>,
    key: Key,
    want: Want,
) {
    while told.changed().await.is_ok() {
        let bytes = told.borrow_and_update().total();
        let message = (key.clone(), want.clone(), Outcome::Progress(bytes));
        if tx.try_send(message).is_err() && tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether the entry names its content by digest (pinned by the controller,
/// or written so): content by digest never changes.
fn names_digest(entry: &NodeImage) -> bool {
    entry.digest.is_some() || reference::parse(&entry.name).is_ok_and(|r| r.digest.is_some())
}

/// Whether a local copy at `digest` is what the entry asks for without
/// asking a registry: the digest it names; or, for a Mirror entry naming
/// only a tag (no registry to ask), any copy.
fn current(entry: &NodeImage, digest: &str) -> bool {
    // A seed (Default) always asks its registry, with its set's credentials:
    // a local copy — another tenant's private image, named by its digest —
    // is not confirmed on the node's word (with `privateImages: isolate`
    // the registry decides who gets it). Nothing moves when the copy is
    // current; the cost is one manifest request per seed.
    if entry.registry_policy == RegistryPolicy::Default {
        return false;
    }
    let named = entry
        .digest
        .as_deref()
        .map(str::to_string)
        .or_else(|| reference::parse(&entry.name).ok().and_then(|r| r.digest));
    match named {
        Some(named) => named == digest,
        None => entry.registry_policy == RegistryPolicy::Mirror,
    }
}

/// What to pull: the pinned digest when the controller gave one.
fn source(entry: &NodeImage) -> String {
    match (reference::parse(&entry.name), &entry.digest) {
        (Ok(r), Some(d)) => format!("{}/{}@{d}", r.registry, r.repository),
        (Ok(r), None) => r.canonical(),
        (Err(_), _) => entry.name.to_string(),
    }
}

/// The span of one entry's pull, all attempts included, continuing the
/// controller's trace when the set names one.
pub(crate) fn pull_span(wanted: &Want, node: &str) -> tracing::Span {
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
        .and_then(plumbing::propagation::parse)
    {
        plumbing::propagation::set_parent(&span, &parent);
    }
    span
}

pub(crate) fn record_outcome(span: &tracing::Span, outcome: &PullResult) {
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
        Err((failure, attempts)) => {
            span.record("attempts", attempts);
            span.record("result", failure.reason.as_str());
            span.record("error.type", failure.reason.as_str());
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", failure.message.as_str());
        }
    }
}

/// One entry's pull, with everything it needs.
pub(crate) struct Job {
    pub(crate) config: Arc<Config>,
    pub(crate) client: kube::Client,
    pub(crate) runtime: Runtime,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) tx: mpsc::Sender<Message>,
    pub(crate) key: Key,
    pub(crate) wanted: Want,
    /// Where a seed's pull tells its progress.
    pub(crate) progress: Option<watch::Sender<Progress>>,
    /// Counts Mirror pulls asked again after a miss.
    pub(crate) mirror_misses: prometheus_client::metrics::counter::Counter,
}

impl Job {
    /// The pull (or the confirmation of a local copy), then the image named
    /// by its digest too, as CRI names what it pulls.
    pub(crate) async fn pull_with_retries(&self) -> PullResult {
        let result = self.pull_or_confirm().await;
        if result.is_ok() {
            let name = store_name(&self.wanted.entry.name);
            if let Err(e) = self.runtime.name_by_digest(&name).await {
                warn!(image = %name, error = %e, "could not name the image by its digest too; a pod naming the digest may pull it again");
            }
        }
        result
    }

    async fn pull_or_confirm(&self) -> PullResult {
        let entry = &self.wanted.entry;
        let name = store_name(&entry.name);
        let local = self.runtime.image(&name).await.ok().flatten();
        // Already there (kubelet pulled it, or an earlier run of the agent)
        // and known current: confirm only. A tag is known current only once
        // its registry says so; the pull below asks it, and moves no bytes
        // when the local copy is current.
        if let Some((digest, size)) = &local
            && current(entry, digest)
        {
            return Ok((
                Pulled {
                    digest: digest.clone(),
                    size: *size,
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
            let result = self
                .attempt_past_misses(&name)
                .instrument(span.clone())
                .await;
            if let Err(failure) = &result {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", failure.message.as_str());
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
            .notify(|failure: &Failure, wait: Duration| {
                let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
                warn!(image = %entry.name, error = %failure.message, retry_in = ?wait, attempt = n, "pull failed; retrying");
                let progress = Outcome::Attempt {
                    attempts: n,
                    failure: failure.clone(),
                };
                let _ = self
                    .tx
                    .try_send((self.key.clone(), self.wanted.clone(), progress));
            })
            .await;
        let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
        result
            .map(|mut p| {
                // The registry confirmed the local copy: nothing was pulled.
                if local.as_ref().is_some_and(|(d, _)| *d == p.digest) {
                    p.duration = Duration::ZERO;
                }
                (p, n)
            })
            .map_err(|f| (f, n))
    }

    /// One attempt; for a Mirror pull, a miss ("not found": no peer has it
    /// yet, or spegel still caches an empty lookup) is asked again on
    /// [`ledger::mirror_miss_waits`] before it counts as a failed attempt.
    async fn attempt_past_misses(&self, name: &str) -> Result<Pulled, Failure> {
        let mut waits = ledger::mirror_miss_waits();
        loop {
            match self.attempt(name).await {
                Err(miss)
                    if self.wanted.entry.registry_policy == RegistryPolicy::Mirror
                        && miss.reason == PullFailure::NotFound =>
                {
                    let Some(wait) = waits.next() else {
                        return Err(miss);
                    };
                    self.mirror_misses.inc();
                    debug!(image = %self.wanted.entry.name, retry_in = ?wait, "no peer has the image yet; asking the mirror again");
                    tokio::time::sleep(wait).await;
                }
                result => return result,
            }
        }
    }

    /// The disk guard: no pull starts while the image filesystem is over
    /// its threshold. A filesystem that cannot be read is no reason to stop.
    fn room_on_disk(&self) -> Result<(), Failure> {
        let path = &self.config.image_fs;
        match crate::disk::usage(path) {
            Ok(usage) => crate::disk::check(path, usage, self.config.image_fs_high_percent)
                .map_err(|e| Failure {
                    message: e.to_string(),
                    reason: PullFailure::DiskPressure,
                }),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "image filesystem unreadable; no disk guard");
                Ok(())
            }
        }
    }

    async fn attempt(&self, name: &str) -> Result<Pulled, Failure> {
        let entry = &self.wanted.entry;
        let parsed = reference::parse(&entry.name).ok();
        let registry = parsed
            .as_ref()
            .map(|r| r.registry.clone())
            .unwrap_or_default();
        let repository = parsed.map(|r| r.repository).unwrap_or_default();
        let host_dir = match entry.registry_policy {
            RegistryPolicy::Default if names_digest(entry) => self.config.node_hosts_dir.clone(),
            RegistryPolicy::Default => hosts::prepare_upstream_resolves(
                &self.config.node_hosts_dir,
                &self.config.mirror_hosts_dir,
                &registry,
            )
            .map_err(|e| Failure {
                message: e.to_string(),
                reason: PullFailure::HostsUnreadable,
            })?,
            // Fail closed: bytes a runtime would fetch from the registry
            // are never reported as the mirror's.
            RegistryPolicy::Mirror => pull::mirror_only(self.runtime.version())
                .map_err(|message| Failure {
                    message,
                    reason: PullFailure::RuntimeUnsupported,
                })
                .and_then(|()| {
                    hosts::prepare_mirror(
                        &self.config.node_hosts_dir,
                        &self.config.mirror_hosts_dir,
                        &registry,
                        &self.config.mirror_endpoints,
                        // An address that does not parse names no peer: the
                        // pull goes through the node's own mirror.
                        entry.source.as_ref().and_then(|s| s.address.parse().ok()),
                    )
                    .map_err(|e| Failure {
                        message: e.to_string(),
                        reason: PullFailure::NoMirror,
                    })
                })?,
        };
        // The permit first: at most `concurrency` keyrings are held at once,
        // however many entries wait.
        let _permit = self.limit.acquire().await.map_err(|e| Failure {
            message: e.to_string(),
            reason: PullFailure::Stopping,
        })?;
        // Read at every attempt: a secret created or fixed after a failure is used on the next try.
        let mut ring = if self.wanted.secrets.is_empty() {
            Keyring::default()
        } else {
            Keyring::load(&self.client, &self.wanted.secrets)
                .await
                .map_err(|e| Failure {
                    message: e.to_string(),
                    reason: e.reason(),
                })?
        };
        // The node's credential plugins, for a pull that may reach the
        // registry (a Mirror pull asks no registry for anything); after the
        // pull secrets, which win where both name a registry.
        let mut plugin_failures = Vec::new();
        if let Some(providers) = &self.config.credential_providers
            && entry.registry_policy == RegistryPolicy::Default
        {
            let (plugins, failed) = providers.keyring(&entry.name, &registry, &repository).await;
            for e in &failed {
                warn!(error = %e, image = %name, "a credential provider failed; pulling without its credentials");
            }
            plugin_failures = failed;
            ring.merge(plugins);
        }
        let keyring = (!ring.is_empty()).then_some((ring, repository));
        self.room_on_disk()?;
        let source = source(entry);
        // Every attempt follows its progress, a seed's to report it too.
        let progress = self
            .progress
            .clone()
            .unwrap_or_else(|| watch::channel(Progress::default()).0);
        let told = progress.subscribe();
        let pull = self.runtime.pull(
            &source,
            name,
            &host_dir,
            keyring,
            Some(progress),
            self.wanted.pin,
        );
        let limits = Limits {
            stall: self
                .wanted
                .stall_timeout
                .unwrap_or(self.config.stall_timeout),
            wall: self.config.pull_timeout,
        };
        match limits
            .apply(pull, || self.runtime.reports_progress(), told)
            .await
        {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => {
                // A plugin's failure may be why the registry refused.
                let plugins: String = plugin_failures.iter().map(|f| format!("; {f}")).collect();
                Err(Failure {
                    message: format!("pulling {} from {registry}: {e}{plugins}", entry.name),
                    reason: e.reason(),
                })
            }
            Err(ended) => {
                let e = ended.error(&entry.name);
                Err(Failure {
                    message: e.to_string(),
                    reason: e.reason(),
                })
            }
        }
    }
}

/// When an attempt is ended: when containerd reports no progress for
/// `stall` (a pull that keeps moving is never cut, however big or slow);
/// where containerd reports no progress at all (CRI pulls, containerd 1.6),
/// after `wall`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) stall: Duration,
    pub(crate) wall: Duration,
}

/// Why an attempt was ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    Stalled { after: Duration, fetched: u64 },
    TooLong { after: Duration },
}

impl Ended {
    fn error(&self, image: &str) -> PullError {
        match *self {
            Ended::Stalled { after, fetched } => PullError::Stalled {
                image: image.to_string(),
                secs: after.as_secs(),
                fetched,
            },
            Ended::TooLong { after } => PullError::Timeout {
                image: image.to_string(),
                secs: after.as_secs(),
            },
        }
    }
}

impl Limits {
    /// When the attempt is due to end, given its start, its last sign of
    /// life, and whether its progress is reported at all.
    pub(crate) fn deadline(
        &self,
        started: tokio::time::Instant,
        last_news: tokio::time::Instant,
        reported: bool,
    ) -> tokio::time::Instant {
        if reported {
            last_news + self.stall
        } else {
            started + self.wall
        }
    }

    /// Runs `pull` until it ends or a limit ends it.
    /// (`reported`: whether containerd reports this pull's progress now.)
    pub(crate) async fn apply<F, T>(
        &self,
        pull: F,
        reported: impl Fn() -> bool,
        mut told: watch::Receiver<Progress>,
    ) -> Result<T, Ended>
    where
        F: std::future::Future<Output = T>,
    {
        tokio::pin!(pull);
        let started = tokio::time::Instant::now();
        let mut last_news = started;
        let mut listening = true;
        loop {
            // Read each time: a pull that found no Transfer service goes on
            // through CRI, whose progress is not reported.
            let deadline = self.deadline(started, last_news, reported());
            tokio::select! {
                result = &mut pull => return Ok(result),
                changed = told.changed(), if listening => match changed {
                    Ok(()) => last_news = tokio::time::Instant::now(),
                    Err(_) => listening = false,
                },
                _ = tokio::time::sleep_until(deadline) => {
                    let reported = reported();
                    if tokio::time::Instant::now() >= self.deadline(started, last_news, reported) {
                        return Err(if reported {
                            Ended::Stalled {
                                after: self.stall,
                                fetched: told.borrow().total(),
                            }
                        } else {
                            Ended::TooLong { after: self.wall }
                        });
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        stall: Duration::from_secs(3),
        wall: Duration::from_secs(5),
    };

    /// A pull that tells `steps` progress messages, one every `every`, then ends.
    async fn pull(tx: watch::Sender<Progress>, steps: u64, every: Duration) -> &'static str {
        for i in 1..=steps {
            tokio::time::sleep(every).await;
            tx.send_modify(|p| {
                p.update("layer", (i * 1024) as i64);
                p.events += 1;
            });
        }
        "pulled"
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_that_keeps_moving_is_never_cut() {
        let (tx, rx) = watch::channel(Progress::default());
        // 30 s in all, far past both limits, never 3 s without news.
        let r = LIMITS
            .apply(pull(tx, 15, Duration::from_secs(2)), || true, rx)
            .await;
        assert_eq!(r, Ok("pulled"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_that_stops_moving_is_cut_after_the_stall_limit() {
        let (tx, rx) = watch::channel(Progress::default());
        let started = tokio::time::Instant::now();
        // Two messages, then silence: cut 3 s after the last.
        let stalls = async {
            pull(tx.clone(), 2, Duration::from_secs(1)).await;
            std::future::pending::<&str>().await
        };
        let r = LIMITS.apply(stalls, || true, rx).await;
        assert_eq!(
            r,
            Err(Ended::Stalled {
                after: Duration::from_secs(3),
                fetched: 2048
            })
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn without_progress_reports_the_wall_clock_limit_holds() {
        let (_tx, rx) = watch::channel(Progress::default());
        let started = tokio::time::Instant::now();
        let r = LIMITS
            .apply(std::future::pending::<&str>(), || false, rx)
            .await;
        assert_eq!(
            r,
            Err(Ended::TooLong {
                after: Duration::from_secs(5)
            })
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn entry(name: &str, policy: RegistryPolicy, digest: Option<&str>) -> NodeImage {
        NodeImage {
            refresh: None,
            name: name.into(),
            registry_policy: policy,
            digest: digest.map(Into::into),
            source: None,
        }
    }

    #[test]
    fn a_local_copy_of_a_tag_is_current_only_once_the_registry_says_so() {
        let tag = "registry.example.com/app:latest";
        // A seed's tag: the registry is asked, whatever is on the node.
        let seed = entry(tag, RegistryPolicy::Default, None);
        assert!(!current(&seed, D1));
        assert!(!names_digest(&seed));
        // A seed's digest, pinned or written: the registry is asked too
        // (it decides whether this set's credentials get the image).
        let pinned = entry(tag, RegistryPolicy::Default, Some(D1));
        assert!(!current(&pinned, D1) && !current(&pinned, D2));
        assert!(names_digest(&pinned));
        let by_digest = entry(
            &format!("registry.example.com/app@{D2}"),
            RegistryPolicy::Default,
            None,
        );
        assert!(!current(&by_digest, D2));
        assert!(names_digest(&by_digest));
        let mirror_by_digest = entry(
            &format!("registry.example.com/app@{D2}"),
            RegistryPolicy::Mirror,
            None,
        );
        assert!(current(&mirror_by_digest, D2) && !current(&mirror_by_digest, D1));
        // A Mirror entry pinned to a digest: that digest; without one there
        // is no registry to ask, and the local copy stands.
        assert!(!current(&entry(tag, RegistryPolicy::Mirror, Some(D1)), D2));
        assert!(current(&entry(tag, RegistryPolicy::Mirror, None), D2));
    }
}
