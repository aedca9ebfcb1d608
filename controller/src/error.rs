//! Why a reconcile failed: one variant per operation, carrying the object it
//! was done on, so a log line, a metric and the Warning Event say which
//! write failed on what (not just "the API request failed").

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::finalizer;

#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
pub enum Error {
    #[error("applying NodeImageSet {set} for node {node}: {source}")]
    ApplyNodeImageSet {
        set: String,
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting NodeImageSet {set} of node {node}, no longer selected: {source}")]
    DeleteNodeImageSet {
        set: String,
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting the NodeImageSets of ImagePrefetch {prefetch}: {source}")]
    DeleteOwnedNodeImageSets {
        prefetch: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of ImagePrefetch {prefetch}: {source}")]
    WriteStatus {
        prefetch: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading ServiceAccount {account} (serviceAccountName) for its pull secrets: {source}")]
    ReadServiceAccount {
        account: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting ImagePrefetch {prefetch}, ready for its ttlSecondsAfterReady: {source}")]
    DeleteExpired {
        prefetch: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "granting the agent `get` on the pull secrets named in namespace {namespace}: {source}"
    )]
    GrantPullSecrets {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("ImagePrefetch has no {0} (is it from an API server?)")]
    MissingMetadata(&'static str),
    #[error("leadership was lost: this replica writes nothing more")]
    NotLeading,
}

impl Error {
    /// The operation that failed, as a short stable label for logs and the
    /// `reconcile_errors_total{category}` metric: the variant's name
    /// (`apply-node-image-set`, `write-status`, …); a finalizer's error is
    /// its inner error's.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.category()
                }
                _ => "finalizer",
            },
            other => other.into(),
        }
    }

    /// The object the failed operation was on, besides the ImagePrefetch:
    /// the Warning Event's related object.
    pub fn related(&self) -> Option<ObjectReference> {
        match self {
            Error::ApplyNodeImageSet { set, .. } | Error::DeleteNodeImageSet { set, .. } => {
                Some(ObjectReference {
                    api_version: Some(format!("{}/{}", crd::GROUP, crd::VERSION)),
                    kind: Some("NodeImageSet".into()),
                    name: Some(set.clone()),
                    ..Default::default()
                })
            }
            Error::Finalizer(e) => match e.as_ref() {
                finalizer::Error::ApplyFailed(inner) | finalizer::Error::CleanupFailed(inner) => {
                    inner.related()
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether an administrator should hear of it as an Event: not when this
    /// replica merely lost its leadership.
    pub fn is_announced(&self) -> bool {
        !matches!(self, Error::NotLeading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("etcd is away", "ServiceUnavailable")
                .with_code(503)
                .boxed(),
        )
    }

    #[test]
    fn an_error_names_its_operation_and_object() {
        let e = Error::ApplyNodeImageSet {
            set: "ns-app-node-1".into(),
            node: "node-1".into(),
            source: api_error(),
        };
        assert_eq!(e.category(), "apply-node-image-set");
        let text = e.to_string();
        assert!(
            text.contains("ns-app-node-1")
                && text.contains("node-1")
                && text.contains("etcd is away"),
            "{text}"
        );
        assert_eq!(e.related().unwrap().name.as_deref(), Some("ns-app-node-1"));

        let wrapped = Error::Finalizer(Box::new(finalizer::Error::CleanupFailed(
            Error::DeleteOwnedNodeImageSets {
                prefetch: "ns/app".into(),
                source: api_error(),
            },
        )));
        assert_eq!(wrapped.category(), "delete-owned-node-image-sets");
        assert_eq!(Error::NotLeading.category(), "not-leading");
        assert!(!Error::NotLeading.is_announced());
    }
}
