//! Pulls through the node's containerd (Transfer service), in the namespace
//! kubelet uses, so the images are what kubelet sees.

use crd::PullFailure;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use containerd_client::services::v1::StreamInit;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::streaming_client::StreamingClient;
use containerd_client::services::v1::transfer_client::TransferClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{CreateNamespaceRequest, Namespace};
use containerd_client::services::v1::{
    GetImageRequest, ListImagesRequest, ReadContentRequest, TransferOptions, TransferRequest,
    UpdateImageRequest,
};
use containerd_client::services::v1::{content_client::ContentClient, images_client::ImagesClient};
use containerd_client::tonic::Request;
use containerd_client::tonic::transport::Channel;
use containerd_client::types::Platform;
use containerd_client::types::transfer::{
    AuthRequest, AuthResponse, AuthType, ImageStore, OciRegistry, Progress as TransferProgress,
    RegistryResolver, UnpackConfiguration,
};
use prost::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use containerd_client::services::v1::{CreateImageRequest, Image};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, PullImageRequest};
use tokio::sync::{mpsc, watch};

use crate::credentials::{Credential, Keyring};
use containerd_client::to_any;
use containerd_client::tonic::metadata::{MetadataKey, MetadataValue};
use futures::StreamExt;
use tracing::{Instrument as _, Span, info_span, warn};

/// containerd's namespace for Kubernetes.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Labels that make an image a CRI image, and keep kubelet's image garbage
/// collection from removing it while it is prefetched.
pub const CRI_MANAGED: (&str, &str) = ("io.cri-containerd.image", "managed");
pub const CRI_PINNED: (&str, &str) = ("io.cri-containerd.pinned", "pinned");
/// Set beside CRI's pin when the agent pins: the agent removes only pins it
/// set (a sandbox image CRI pinned stays pinned when a prefetch ends).
pub const OWN_PIN: (&str, &str) = crd::keys::PINNED_BY_AGENT;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("cannot connect to containerd at {socket}: {message}")]
    Connect { socket: String, message: String },
    #[error("{0}")]
    Containerd(String),
    #[error("pull of {image} did not finish within {secs}s")]
    Timeout { image: String, secs: u64 },
    #[error(
        "pull of {image} made no progress for {secs}s ({fetched} bytes fetched); ended, to be tried again"
    )]
    Stalled {
        image: String,
        secs: u64,
        fetched: u64,
    },
    /// The Transfer service is missing (containerd < 1.7); CRI is used instead.
    #[error("containerd has no Transfer service")]
    Unsupported,
}

fn status_error(s: containerd_client::tonic::Status) -> PullError {
    if s.code() == containerd_client::tonic::Code::Unimplemented {
        PullError::Unsupported
    } else {
        PullError::Containerd(s.message().to_string())
    }
}

impl PullError {
    /// Machine-readable cause, as NodeImageSet status `reason`.
    pub fn reason(&self) -> PullFailure {
        match self {
            PullError::Connect { .. } => PullFailure::RuntimeUnavailable,
            PullError::Timeout { .. } | PullError::Stalled { .. } => PullFailure::PullTimeout,
            PullError::Unsupported => PullFailure::RuntimeUnsupported,
            PullError::Containerd(m) => classify(m),
        }
    }
}

fn classify(message: &str) -> PullFailure {
    let m = message.to_lowercase();
    // Words, not bare status numbers: a message names hosts and ports too
    // (port 44031 contains "403").
    let any = |words: &[&str]| words.iter().any(|w| m.contains(w));
    if any(&[
        "connection refused",
        "no such host",
        "dial tcp",
        "i/o timeout",
        "no route",
        "connection reset",
    ]) {
        PullFailure::RegistryUnreachable
    } else if any(&["unauthorized", "forbidden", "denied"]) {
        PullFailure::Unauthorized
    } else if any(&["not found", "manifest unknown", "name unknown"]) {
        PullFailure::NotFound
    } else {
        PullFailure::PullFailed
    }
}

/// What a finished pull gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pulled {
    pub digest: String,
    /// Bytes of the manifest's config and layers, when the target is one manifest.
    pub size: Option<i64>,
    pub duration: Duration,
}

/// The node's containerd.
#[derive(Clone)]
pub struct Runtime {
    channel: Channel,
    namespace: String,
    snapshotter: String,
    /// Cleared once containerd says it has no Transfer service.
    transfer: Arc<AtomicBool>,
    /// The one platform fetched and unpacked: an index's other platforms
    /// would cost their bytes on every node for nothing.
    platform: crd::platform::Platform,
    /// containerd's version, as its Version service tells it.
    version: String,
}

/// The containerd releases whose pulls can be kept off the registry: the
/// Transfer service of 2.0 and later honours the registry host
/// configuration it is given (`host_dir`).
pub const MIRROR_ONLY_SINCE: u64 = 2;

/// Whether containerd `version` can make a Mirror pull that never reaches
/// the registry; else why not, in words for the entry's status. containerd
/// 1.7's Transfer service builds its resolver from the registries' defaults
/// and ignores `host_dir` (`pkg/transfer/registry/registry.go`): every pull
/// goes straight to the registry. 1.6 has no Transfer service, and CRI's
/// pull falls back to the registry when the mirror misses.
pub fn mirror_only(version: &str) -> Result<(), String> {
    let major = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse::<u64>().ok());
    match major {
        Some(m) if m >= MIRROR_ONLY_SINCE => Ok(()),
        _ => Err(format!(
            "containerd {version} on this node cannot keep a Mirror pull off the registry \
             (before 2.0, containerd ignores the registry host configuration it is given, or falls back \
             to the registry): the image is not pulled here; upgrade containerd to 2.0 or newer"
        )),
    }
}

impl Runtime {
    pub async fn connect(socket: &Path) -> Result<Self, PullError> {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| PullError::Connect {
                socket: socket.display().to_string(),
                message: e.to_string(),
            })?;
        let version = VersionClient::new(channel.clone())
            .version(())
            .await
            .map_err(status_error)?
            .into_inner()
            .version;
        let runtime = Runtime {
            channel,
            namespace: K8S_NAMESPACE.to_string(),
            snapshotter: "overlayfs".to_string(),
            transfer: Arc::new(AtomicBool::new(true)),
            platform: crd::platform::Platform::host(),
            version,
        };
        runtime.ensure_namespace().await?;
        Ok(runtime)
    }

    /// Creates the Kubernetes namespace in containerd if it is not there yet
    /// (a node no image was ever pulled on): when connecting, and again each
    /// time the agent follows containerd's events anew. A Transfer's progress and auth
    /// streams are registered in it; containerd's garbage collection keeps a
    /// stream only while its namespace exists in the metadata store, so a
    /// collection between registering a stream and the Transfer that uses it
    /// made that pull fail with a bare "not found" (seen once in a few runs
    /// on loaded CI; reproduced with a forced collection in between).
    pub async fn ensure_namespace(&self) -> Result<(), PullError> {
        let request = CreateNamespaceRequest {
            namespace: Some(Namespace {
                name: self.namespace.clone(),
                ..Default::default()
            }),
        };
        let span = rpc("Namespaces.Create");
        match NamespacesClient::new(self.channel.clone())
            .create(self.request(&span, request))
            .instrument(span)
            .await
        {
            Err(s) if s.code() != containerd_client::tonic::Code::AlreadyExists => {
                Err(status_error(s))
            }
            _ => Ok(()),
        }
    }

    /// containerd's version (`v2.2.9`, Debian's `1.6.20~ds1`).
    /// Whether containerd reports this node's pulls' progress (the Transfer
    /// service); `false` once a pull found it missing and CRI pulls instead.
    pub fn reports_progress(&self) -> bool {
        self.transfer.load(Ordering::Relaxed)
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// Pulls for `platform` instead of this machine's (a simulated node of
    /// another architecture; unpacking its layers needs no emulation).
    pub fn for_platform(mut self, platform: crd::platform::Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Pulls `source` (a tag or digest reference) and stores it as `name`,
    /// resolving registries through the hosts.toml files of `host_dir`.
    /// Credentials, when `keyring` has any for the repository, are answered on
    /// containerd's auth stream host by host, only for hosts the secrets name
    /// (so never to an in-cluster mirror). The bytes fetched so far go to
    /// `progress` while the pull runs (not through CRI, which tells nothing).
    pub async fn pull(
        &self,
        source: &str,
        name: &str,
        host_dir: &Path,
        keyring: Option<(Keyring, String)>,
        progress: Option<watch::Sender<Progress>>,
        pin: bool,
    ) -> Result<Pulled, PullError> {
        let started = Instant::now();
        if self.transfer.load(Ordering::Relaxed) {
            match self
                .transfer_pull(source, name, host_dir, keyring.clone(), progress, pin)
                .await
            {
                Err(PullError::Unsupported) => {
                    warn!(
                        "containerd has no Transfer service (it is older than 1.7): pulling through CRI \
                         (Default pulls only: Mirror pulls need containerd 2.0)"
                    );
                    self.transfer.store(false, Ordering::Relaxed);
                }
                Ok(()) => return self.pulled(name, started).await,
                Err(e) => return Err(e),
            }
        }
        self.cri_pull(source, name, keyring).await?;
        self.pulled(name, started).await
    }

    /// A request in the Kubernetes namespace, carrying the trace context of
    /// `span` (the call's own span) so containerd's spans, when it exports
    /// any, join the pull's trace.
    fn request<T>(&self, span: &Span, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        if let Ok(namespace) = MetadataValue::try_from(self.namespace.as_str()) {
            metadata.insert("containerd-namespace", namespace);
        }
        for (key, value) in plumbing::propagation::headers(span) {
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                metadata.insert(key, value);
            }
        }
        request
    }

    async fn pulled(&self, name: &str, started: Instant) -> Result<Pulled, PullError> {
        let (digest, size) = self.image(name).await?.ok_or_else(|| {
            PullError::Containerd(format!("{name} is missing right after its pull"))
        })?;
        Ok(Pulled {
            digest,
            size,
            duration: started.elapsed(),
        })
    }

    async fn transfer_pull(
        &self,
        source: &str,
        name: &str,
        host_dir: &Path,
        keyring: Option<(Keyring, String)>,
        progress: Option<watch::Sender<Progress>>,
        pin: bool,
    ) -> Result<(), PullError> {
        let auth = match keyring {
            Some((ring, repository)) if !ring.is_empty() => {
                Some(self.auth_stream(ring, repository).await?)
            }
            _ => None,
        };
        let told = match progress {
            Some(bytes) => Some(self.progress_stream(bytes).await?),
            None => None,
        };
        let registry = OciRegistry {
            reference: source.to_string(),
            resolver: Some(RegistryResolver {
                host_dir: host_dir.display().to_string(),
                auth_stream: auth.as_ref().map(|a| a.id.clone()).unwrap_or_default(),
                ..Default::default()
            }),
        };
        // A new image is pinned as it is created (no moment for kubelet's GC
        // to take it). An image already stored keeps its labels as they are:
        // the transfer would otherwise replace them, and mark as the agent's
        // a pin someone else set (pinning it is the ledger's `Pin`, after).
        let labels: HashMap<String, String> = match self.stored(name).await? {
            Some(existing) => {
                let mut labels = existing.labels;
                labels.insert(CRI_MANAGED.0.to_string(), CRI_MANAGED.1.to_string());
                labels
            }
            // (Unpinned when its entry asks for no pin.)
            None if pin => [CRI_MANAGED, CRI_PINNED, OWN_PIN]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            None => [CRI_MANAGED]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let platform = Platform {
            os: self.platform.os.clone(),
            architecture: self.platform.architecture.clone(),
            variant: self.platform.variant.clone(),
            ..Default::default()
        };
        let store = ImageStore {
            name: name.to_string(),
            labels,
            // Without platforms containerd fetches every platform of an index.
            platforms: vec![platform.clone()],
            unpacks: vec![UnpackConfiguration {
                platform: Some(platform),
                snapshotter: self.snapshotter.clone(),
            }],
            ..Default::default()
        };
        let request = TransferRequest {
            source: Some(to_any(&registry)),
            destination: Some(to_any(&store)),
            options: told.as_ref().map(|t| TransferOptions {
                progress_stream: t.id.clone(),
            }),
        };
        let span = rpc("Transfer.Transfer");
        let transferred = TransferClient::new(self.channel.clone())
            .transfer(self.request(&span, request))
            .instrument(span)
            .await;
        drop((auth, told));
        transferred.map_err(status_error)?;
        Ok(())
    }

    /// containerd 1.6: CRI's PullImage with the node's registry configuration,
    /// then the image is also named `name` (CRI names it after `source`).
    async fn cri_pull(
        &self,
        source: &str,
        name: &str,
        keyring: Option<(Keyring, String)>,
    ) -> Result<(), PullError> {
        let registry = crd::reference::parse(source)
            .map(|r| r.registry)
            .unwrap_or_default();
        let auth = keyring.and_then(|(ring, repository)| {
            ring.lookup(&registry, &repository).map(|c| match c {
                Credential::Basic { username, password } => AuthConfig {
                    username: username.clone(),
                    password: password.clone(),
                    ..Default::default()
                },
                Credential::IdentityToken(token) => AuthConfig {
                    identity_token: token.clone(),
                    ..Default::default()
                },
            })
        });
        let request = PullImageRequest {
            image: Some(ImageSpec {
                image: source.to_string(),
                ..Default::default()
            }),
            auth,
            sandbox_config: None,
        };
        let span = rpc("ImageService.PullImage");
        ImageServiceClient::new(self.channel.clone())
            .pull_image(self.request(&span, request))
            .instrument(span)
            .await
            .map_err(status_error)?;
        if source == name {
            return Ok(());
        }
        let pulled = self.stored(source).await?.ok_or_else(|| {
            PullError::Containerd(format!("{source} is missing right after its pull"))
        })?;
        self.name_image(name, pulled.target).await
    }

    /// Names the image `target` also `name`, as a CRI image (created, or
    /// pointed at `target` with every other label it has kept: a pin CRI or
    /// someone else set on that name stays).
    async fn name_image(
        &self,
        name: &str,
        target: Option<containerd_client::types::Descriptor>,
    ) -> Result<(), PullError> {
        let image = Image {
            name: name.to_string(),
            labels: [CRI_MANAGED]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target,
            ..Default::default()
        };
        let create = CreateImageRequest {
            image: Some(image.clone()),
            ..Default::default()
        };
        let span = rpc("Images.Create");
        let created = ImagesClient::new(self.channel.clone())
            .create(self.request(&span, create))
            .instrument(span)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == containerd_client::tonic::Code::AlreadyExists => {
                let paths = vec!["target".to_string(), format!("labels.{}", CRI_MANAGED.0)];
                self.update_image(image, Some(paths)).await
            }
            Err(s) => Err(status_error(s)),
        }
    }

    /// Names the stored image `name` by its digest too (`registry/repo@digest`),
    /// as CRI names what it pulls: kubelet asks for an image by the reference
    /// a pod names, and a pod naming the digest (or `repo:tag@digest`, which
    /// kubelet and CRI read as the digest) finds it. The name carries no pin:
    /// CRI counts an image pinned while any of its names is. Returns the name
    /// given, `None` when `name` is that name already.
    pub async fn name_by_digest(&self, name: &str) -> Result<Option<String>, PullError> {
        let Some(stored) = self.stored(name).await? else {
            return Ok(None);
        };
        let Some(target) = stored.target else {
            return Ok(None);
        };
        let Ok(reference) = crd::reference::parse(name) else {
            return Ok(None);
        };
        let by_digest = format!(
            "{}/{}@{}",
            reference.registry, reference.repository, target.digest
        );
        if by_digest == name {
            return Ok(None);
        }
        self.name_image(&by_digest, Some(target)).await?;
        Ok(Some(by_digest))
    }

    /// The stored image `name`, or `None` when containerd has none by that name.
    async fn stored(&self, name: &str) -> Result<Option<Image>, PullError> {
        let request = GetImageRequest {
            name: name.to_string(),
        };
        let span = rpc("Images.Get");
        let response = ImagesClient::new(self.channel.clone())
            .get(self.request(&span, request))
            .instrument(span)
            .await;
        match response {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == containerd_client::tonic::Code::NotFound => Ok(None),
            Err(s) => Err(status_error(s)),
        }
    }

    /// Writes `image`: only the fields `paths` name, or all of it.
    async fn update_image(
        &self,
        image: Image,
        paths: Option<Vec<String>>,
    ) -> Result<(), PullError> {
        let request = UpdateImageRequest {
            image: Some(image),
            update_mask: paths.map(|paths| prost_types::FieldMask { paths }),
            ..Default::default()
        };
        let span = rpc("Images.Update");
        ImagesClient::new(self.channel.clone())
            .update(self.request(&span, request))
            .instrument(span)
            .await
            .map_err(status_error)?;
        Ok(())
    }

    /// The stored image `name`: its digest and content size, if present.
    pub async fn image(&self, name: &str) -> Result<Option<(String, Option<i64>)>, PullError> {
        let Some(target) = self.stored(name).await?.and_then(|i| i.target) else {
            return Ok(None);
        };
        let size = self.manifest_size(&target.digest, &target.media_type).await;
        Ok(Some((target.digest, size)))
    }

    /// Opens a named stream with containerd's Streaming service (what the
    /// Transfer service talks to a client on: credentials asked, progress
    /// told). Returns the stream's id, its outbound side and its inbound side.
    async fn open_stream(
        &self,
        purpose: &str,
    ) -> Result<
        (
            String,
            mpsc::Sender<prost_types::Any>,
            containerd_client::tonic::Streaming<prost_types::Any>,
        ),
        PullError,
    > {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = format!(
            "image-prefetch-{purpose}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (tx, rx) = mpsc::channel::<prost_types::Any>(4);
        let failed = |s: containerd_client::tonic::Status| {
            // containerd 1.6 has no Streaming service either: that is the
            // missing Transfer service, and CRI pulls instead.
            if s.code() == containerd_client::tonic::Code::Unimplemented {
                return PullError::Unsupported;
            }
            PullError::Containerd(format!("{purpose} stream: {}", s.message()))
        };
        tx.send(to_any(&StreamInit { id: id.clone() }))
            .await
            .map_err(|_| PullError::Containerd(format!("{purpose} stream closed")))?;
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let span = rpc("Streaming.Stream");
        let mut inbound = StreamingClient::new(self.channel.clone())
            .stream(self.request(&span, outbound))
            .instrument(span)
            .await
            .map_err(failed)?
            .into_inner();
        // containerd acknowledges once the stream is registered under `id`.
        inbound.message().await.map_err(failed)?;
        Ok((id, tx, inbound))
    }

    /// Opens a stream containerd asks for credentials on while a transfer runs.
    async fn auth_stream(
        &self,
        keyring: Keyring,
        repository: String,
    ) -> Result<StreamTask, PullError> {
        let (id, tx, mut inbound) = self.open_stream("auth").await?;
        let task = tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let Ok(request) = AuthRequest::decode(message.value.as_slice()) else {
                    continue;
                };
                let response = match keyring.lookup(&request.host, &repository) {
                    Some(Credential::Basic { username, password }) => AuthResponse {
                        auth_type: AuthType::Credentials as i32,
                        username: username.clone(),
                        secret: password.clone(),
                        ..Default::default()
                    },
                    Some(Credential::IdentityToken(token)) => AuthResponse {
                        auth_type: AuthType::Refresh as i32,
                        secret: token.clone(),
                        ..Default::default()
                    },
                    None => AuthResponse::default(),
                };
                if tx.send(to_any(&response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(StreamTask { id, task })
    }

    /// Opens a stream containerd tells a transfer's progress on; each blob's
    /// bytes so far go into `progress`.
    async fn progress_stream(
        &self,
        progress: watch::Sender<Progress>,
    ) -> Result<StreamTask, PullError> {
        let (id, tx, mut inbound) = self.open_stream("progress").await?;
        let task = tokio::spawn(async move {
            // containerd closes the stream when the client side ends.
            let _keep = tx;
            while let Ok(Some(message)) = inbound.message().await {
                let Ok(p) = TransferProgress::decode(message.value.as_slice()) else {
                    continue;
                };
                // Every message is a sign of life (containerd sends one per
                // 300 ms while it extracts, none while a fetch is stuck); the
                // bytes only grow.
                progress.send_modify(|blobs| {
                    blobs.update(&p.name, p.progress);
                    blobs.events += 1;
                });
            }
        });
        Ok(StreamTask { id, task })
    }

    /// Takes the kubelet-GC pin off `name` (when its ImagePrefetch is gone); the image stays.
    /// Removes the pin from `name` if the agent set it; a pin someone else
    /// set (CRI's, on its sandbox image) stays.
    /// `true` when a pin came off. With `keep_cri_pin` only the agent's
    /// mark comes off: the image keeps CRI's pin (a sandbox image).
    pub async fn unpin(&self, name: &str, keep_cri_pin: bool) -> Result<bool, PullError> {
        let Some(mut image) = self.stored(name).await? else {
            return Ok(false);
        };
        if image.labels.remove(OWN_PIN.0).is_none() {
            return Ok(false);
        }
        if !keep_cri_pin {
            image.labels.remove(CRI_PINNED.0);
        }
        let paths = [CRI_PINNED.0, OWN_PIN.0]
            .iter()
            .map(|l| format!("labels.{l}"))
            .collect();
        self.update_image(image, Some(paths)).await.map(|()| true)
    }

    /// Names of the images that carry the agent's own pin.
    pub async fn own_pinned(&self) -> Result<Vec<String>, PullError> {
        let request = ListImagesRequest {
            filters: vec![format!("labels.\"{}\"=={}", OWN_PIN.0, OWN_PIN.1)],
        };
        let span = rpc("Images.List");
        let images = ImagesClient::new(self.channel.clone())
            .list(self.request(&span, request))
            .instrument(span)
            .await
            .map_err(status_error)?
            .into_inner()
            .images;
        Ok(images.into_iter().map(|i| i.name).collect())
    }

    /// Keeps `name` from kubelet's image garbage collection (an image the
    /// agent found already there, or pulled through CRI), marking the pin as
    /// the agent's. An image pinned already, by anyone, is left as it is.
    pub async fn pin(&self, name: &str) -> Result<(), PullError> {
        let Some(mut image) = self.stored(name).await? else {
            return Ok(());
        };
        if image.labels.contains_key(CRI_PINNED.0) {
            return Ok(());
        }
        for (k, v) in [CRI_PINNED, OWN_PIN] {
            image.labels.insert(k.to_string(), v.to_string());
        }
        let paths = [CRI_PINNED.0, OWN_PIN.0]
            .iter()
            .map(|l| format!("labels.{l}"))
            .collect();
        self.update_image(image, Some(paths)).await
    }

    /// Labels of the stored image `name`.
    pub async fn labels(&self, name: &str) -> Result<HashMap<String, String>, PullError> {
        let image = self
            .stored(name)
            .await?
            .ok_or_else(|| PullError::Containerd(format!("image {name} not found")))?;
        Ok(image.labels)
    }

    /// Config plus layer bytes of a single manifest; `None` for an index or on any doubt.
    /// Bytes of config and layers of the node's platform: for an index,
    /// of the manifest it lists for that platform.
    async fn manifest_size(&self, digest: &str, media_type: &str) -> Option<i64> {
        let mut manifest = self.read_json(digest).await?;
        if media_type.contains("index") || media_type.contains("manifest.list") {
            let chosen = self.platform.select(&manifest)?.to_string();
            manifest = self.read_json(&chosen).await?;
        }
        let config = manifest["config"]["size"].as_i64()?;
        let layers: i64 = manifest["layers"]
            .as_array()?
            .iter()
            .filter_map(|l| l["size"].as_i64())
            .sum();
        Some(config + layers)
    }

    async fn read_json(&self, digest: &str) -> Option<serde_json::Value> {
        let request = ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        };
        let span = rpc("Content.Read");
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.request(&span, request))
            .instrument(span)
            .await
            .ok()?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend(chunk.ok()?.data);
        }
        serde_json::from_slice(&bytes).ok()
    }
}

/// Bytes fetched so far by an entry's pull, over its attempts: the furthest
/// each blob got (containerd tells each blob's bytes so far, by its name).
/// It never goes back: a blob fetched again from its start after a failed
/// attempt counts as progress only past the point it had reached.
#[derive(Debug, Default)]
pub struct Progress {
    blobs: HashMap<String, i64>,
    /// Progress messages containerd sent.
    pub events: u64,
}

impl Progress {
    /// Whether the total grew.
    pub fn update(&mut self, name: &str, progress: i64) -> bool {
        if name.is_empty() || progress <= 0 {
            return false;
        }
        let b = self.blobs.entry(name.to_string()).or_default();
        let grew = progress > *b;
        *b = (*b).max(progress);
        grew
    }

    pub fn total(&self) -> u64 {
        self.blobs.values().map(|b| *b as u64).sum()
    }
}

/// A registered stream and the task serving it; dropping it ends both.
struct StreamTask {
    id: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StreamTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The span of one call to containerd (or its CRI service).
fn rpc(method: &'static str) -> Span {
    info_span!(
        "containerd",
        otel.name = method,
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.method = method,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn mirror_only_pulls_need_containerd_2() {
        for ok in ["v2.2.9", "v2.0.0", "2.1.4", "v2.0.0-rc.1", "v3.0.0"] {
            assert_eq!(super::mirror_only(ok), Ok(()), "{ok}");
        }
        for refused in ["v1.7.35", "1.6.20~ds1", "v1.7.0-beta.3", "", "unknown"] {
            let why = super::mirror_only(refused).unwrap_err();
            assert!(
                why.contains("upgrade containerd to 2.0"),
                "{refused}: {why}"
            );
            assert!(why.contains(refused), "names the version: {why}");
        }
    }

    use super::*;

    #[test]
    fn progress_sums_the_furthest_point_of_each_blob() {
        let mut p = Progress::default();
        assert!(p.update("layer-a", 100));
        assert!(p.update("layer-b", 50));
        assert!(!p.update("", 10), "events without a blob count nothing");
        assert!(!p.update("layer-a", 0), "a new attempt starting over");
        assert!(!p.update("layer-a", 60), "behind the furthest point");
        assert_eq!(p.total(), 150);
        assert!(p.update("layer-a", 120));
        assert_eq!(p.total(), 170);
    }

    #[test]
    fn errors_are_classified_for_status() {
        assert_eq!(
            classify("failed to resolve reference: not found"),
            PullFailure::NotFound
        );
        assert_eq!(
            classify("unexpected status 401 Unauthorized"),
            PullFailure::Unauthorized
        );
        assert_eq!(
            classify("dial tcp 127.0.0.1:1: connect: connection refused"),
            PullFailure::RegistryUnreachable
        );
        assert_eq!(classify("something else"), PullFailure::PullFailed);
        // A port that contains 403 is not an authorisation failure.
        assert_eq!(
            classify(
                "Head \"http://127.0.0.1:44031/v2/x/manifests/1\": dial tcp 127.0.0.1:44031: connect: connection refused"
            ),
            PullFailure::RegistryUnreachable
        );
        assert_eq!(
            classify("unexpected status from HEAD request: 403 Forbidden"),
            PullFailure::Unauthorized
        );
    }
}
