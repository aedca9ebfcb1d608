//! Leader election on a coordination.k8s.io Lease, so that two controller
//! replicas never reconcile at once. The leader renews the lease; a leader
//! that has not renewed within the renew deadline — shorter than the lease,
//! and enforced by a timer, not by the call that hangs — stops reconciling
//! before any standby may take the lease over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    /// How long a lease is honoured without renewal.
    pub duration: Duration,
    /// How often the leader renews (well inside `duration`).
    pub renew_every: Duration,
    /// A leader that has not renewed for this long gives up leadership; less
    /// than `duration`, so it has stopped before a standby may take over.
    pub renew_deadline: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, identity: &str) -> Self {
        LeaseConfig {
            namespace: namespace.to_string(),
            name: "image-prefetch-controller".to_string(),
            identity: identity.to_string(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

/// Held leadership. `lost()` completes when the lease could not be renewed.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Completes once leadership is lost.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.lost.clone();
        async move {
            let _ = rx.wait_for(|lost| *lost).await;
        }
    }
}

impl Leadership {
    /// The fence of this leadership: closed when it is lost.
    pub fn fence(&self) -> Fence {
        Fence(Some(self.lost.clone()))
    }
}

/// What every write of a reconcile passes first. Closed the moment the
/// renewal loop gives the lease up (renew deadline 10 s, inside the lease's
/// 15 s), so a reconcile still under way then — the Controller lets them
/// finish — writes nothing more: another replica may lead already. A
/// request already sent may still land; that is the 5 s margin between
/// the renew deadline and the lease's expiry. Always open without leader
/// election.
#[derive(Clone, Debug, Default)]
pub struct Fence(Option<watch::Receiver<bool>>);

impl Fence {
    /// `Err(NotLeading)` once leadership is lost.
    pub fn check(&self) -> Result<(), crate::Error> {
        match &self.0 {
            Some(lost) if *lost.borrow() => Err(crate::Error::NotLeading),
            _ => Ok(()),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until this replica holds the lease, then keeps renewing it in the background.
pub async fn acquire(client: kube::Client, config: LeaseConfig) -> Leadership {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut announced = false;
    loop {
        match try_acquire(&api, &config).await {
            Ok(true) => break,
            Ok(false) => {
                if !announced {
                    info!(lease = %config.name, "another replica leads; standing by");
                    announced = true;
                }
            }
            Err(e) => {
                warn!(error = %e, lease = %config.name, "cannot read or write the leader lease")
            }
        }
        tokio::time::sleep(config.renew_every).await;
    }
    info!(lease = %config.name, identity = %config.identity, "became leader");
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        // The renewal written last took effect no earlier than its request
        // was sent: counted from then, to be on the safe side.
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(config.renew_every).await;
            let sent = tokio::time::Instant::now();
            let deadline = last_renewed + config.renew_deadline;
            match tokio::time::timeout_at(deadline, try_acquire(&api, &config)).await {
                Ok(Ok(true)) => last_renewed = sent,
                Ok(Ok(false)) => {
                    warn!(lease = %config.name, "leader lease taken by another replica");
                    let _ = tx.send(true);
                    return;
                }
                Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "renewing the leader lease failed; trying again")
                }
                Ok(Err(_)) | Err(_) => {
                    warn!(
                        lease = %config.name,
                        deadline = ?config.renew_deadline,
                        "could not renew the leader lease within the renew deadline; stepping down"
                    );
                    let _ = tx.send(true);
                    return;
                }
            }
        }
    });
    Leadership { lost: rx, task }
}

/// One attempt: take a free or expired lease, or renew our own. `Ok(false)`:
/// someone else holds it. Optimistic concurrency (resourceVersion) settles races.
async fn try_acquire(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let seconds = config.duration.as_secs() as i32;
    let existing = api.get_opt(&config.name).await?;
    let Some(mut lease) = existing else {
        let mut lease = Lease::default();
        lease.metadata.name = Some(config.name.clone());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(config.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..Default::default()
        });
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(d)) => renewed.0 + SignedDuration::from_secs(d.into()) < now,
        _ => true,
    };
    if !ours && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(config.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds);
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    #[test]
    fn a_fence_closes_when_leadership_is_lost_and_stays_closed() {
        let (tx, rx) = watch::channel(false);
        let fence = Fence(Some(rx));
        assert!(fence.check().is_ok());
        tx.send(true).unwrap();
        assert!(matches!(fence.check(), Err(crate::Error::NotLeading)));
        drop(tx);
        assert!(
            fence.check().is_err(),
            "a finished renewal loop does not reopen it"
        );
        assert!(
            Fence::default().check().is_ok(),
            "no leader election: always open"
        );
    }
}
