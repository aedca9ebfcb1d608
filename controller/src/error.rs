use kube::runtime::finalizer;

/// Why a reconcile failed. `category()` is a short, stable label for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
    #[error("ImagePrefetch has no {0} (is it from an API server?)")]
    MissingMetadata(&'static str),
    #[error("leadership was lost: this replica writes nothing more")]
    NotLeading,
}

impl Error {
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::MissingMetadata(_) => "metadata",
            Error::NotLeading => "not-leading",
        }
    }
}
