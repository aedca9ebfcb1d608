//! The node's containerd as the mirror sees it: content by digest (size,
//! labels, bytes), tags through the image store, and the events that make
//! content appear and disappear. Namespace `k8s.io`, as spegel reads it.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{
    GetImageRequest, InfoRequest, ListContentRequest, ListImagesRequest, ReadContentRequest,
    SubscribeRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use futures::{Stream, StreamExt};

pub const NAMESPACE: &str = "k8s.io";
/// The label containerd puts on everything it fetched from a registry.
pub const SOURCE_LABEL: &str = "containerd.io/distribution.source.";

/// containerd ≥ 2.1 publishes this when a blob is committed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ContentCreate {
    #[prost(string, tag = "1")]
    pub digest: String,
    #[prost(int64, tag = "2")]
    pub size: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageEvent {
    #[prost(string, tag = "1")]
    name: String,
}

/// What happened in containerd that changes what this node can serve.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Committed(String),
    ImageCreated(String),
    ImageDeleted(String),
}

#[derive(Clone)]
pub struct Store {
    channel: Channel,
}

pub struct Blob {
    pub size: u64,
    /// Registries the content was fetched from.
    pub sources: Vec<String>,
}

fn request<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "containerd-namespace",
        NAMESPACE.parse().expect("an ASCII namespace"),
    );
    r
}

pub type Error = containerd_client::tonic::Status;

impl Store {
    pub async fn connect(socket: &Path) -> Result<Self, String> {
        let channel = containerd_client::connect(PathBuf::from(socket))
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        Ok(Store { channel })
    }

    /// The blob's size and source registries; `None` when containerd lacks it.
    pub async fn info(&self, digest: &str) -> Result<Option<Blob>, Error> {
        let info = ContentClient::new(self.channel.clone())
            .info(request(InfoRequest {
                digest: digest.into(),
            }))
            .await;
        match info {
            Ok(r) => Ok(r.into_inner().info.map(|i| Blob {
                size: i.size as u64,
                sources: i
                    .labels
                    .keys()
                    .filter_map(|k| k.strip_prefix(SOURCE_LABEL).map(str::to_string))
                    .collect(),
            })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// `len` bytes from `offset` (`len` 0: to the end), as containerd streams them.
    pub async fn read(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, Error>> + use<>, Error> {
        let stream = ContentClient::new(self.channel.clone())
            .read(request(ReadContentRequest {
                digest: digest.into(),
                offset: offset as i64,
                size: len as i64,
            }))
            .await?
            .into_inner();
        Ok(stream.map(|r| r.map(|c| Bytes::from(c.data))))
    }

    /// All of a small blob (manifests, configs).
    /// Whether the content starts as a JSON object does (its first byte
    /// past any whitespace is `{`): only such content is worth parsing for
    /// its media type; a layer is not read whole before it is served.
    pub async fn looks_like_json(&self, digest: &str, size: u64) -> Result<bool, Error> {
        let mut stream = Box::pin(self.read(digest, 0, size.min(64)).await?);
        let mut first = Vec::new();
        while let Some(chunk) = stream.next().await {
            first.extend_from_slice(&chunk?);
        }
        Ok(first.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'))
    }

    pub async fn read_all(&self, digest: &str) -> Result<Vec<u8>, Error> {
        let mut stream = Box::pin(self.read(digest, 0, 0).await?);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// The digest an image name (`registry/repo:tag`) points at.
    pub async fn resolve(&self, name: &str) -> Result<Option<String>, Error> {
        let got = ImagesClient::new(self.channel.clone())
            .get(request(GetImageRequest { name: name.into() }))
            .await;
        match got {
            Ok(r) => Ok(r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .map(|t| t.digest)),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// Digests of every blob fetched from a registry.
    pub async fn sourced_content(&self) -> Result<Vec<String>, Error> {
        let mut stream = ContentClient::new(self.channel.clone())
            .list(request(ListContentRequest { filters: vec![] }))
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(batch) = stream.next().await {
            for info in batch?.info {
                if info.labels.keys().any(|k| k.starts_with(SOURCE_LABEL)) {
                    out.push(info.digest);
                }
            }
        }
        Ok(out)
    }

    /// Names of the images with a registry in their name and a tag.
    pub async fn tagged_images(&self) -> Result<Vec<String>, Error> {
        let images = ImagesClient::new(self.channel.clone())
            .list(request(ListImagesRequest { filters: vec![] }))
            .await?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|i| i.name)
            .filter(|n| is_tag_name(n))
            .collect())
    }

    /// Commits and image creations and deletions, as they happen.
    pub async fn changes(&self) -> Result<impl Stream<Item = Change> + use<>, Error> {
        let stream = EventsClient::new(self.channel.clone())
            .subscribe(request(SubscribeRequest {
                filters: vec![
                    r#"topic=="/content/create""#.into(),
                    r#"topic=="/images/create""#.into(),
                    r#"topic=="/images/delete""#.into(),
                ],
            }))
            .await?
            .into_inner();
        Ok(stream.filter_map(|e| async move {
            let e = e.ok()?;
            if e.namespace != NAMESPACE {
                return None;
            }
            let any = e.event?;
            use prost::Message;
            match e.topic.as_str() {
                "/content/create" => ContentCreate::decode(any.value.as_slice())
                    .ok()
                    .map(|c| Change::Committed(c.digest)),
                "/images/create" => ImageEvent::decode(any.value.as_slice())
                    .ok()
                    .map(|i| Change::ImageCreated(i.name)),
                "/images/delete" => ImageEvent::decode(any.value.as_slice())
                    .ok()
                    .map(|i| Change::ImageDeleted(i.name)),
                _ => None,
            }
        }))
    }
}

/// `registry/repo:tag` (not a digest-only name): the names spegel advertises.
pub fn is_tag_name(name: &str) -> bool {
    let Some((path, tag)) = name.rsplit_once(':') else {
        return false;
    };
    path.contains('/') && !tag.contains('/') && !name.contains('@')
}

#[cfg(test)]
mod tests {
    #[test]
    fn tag_names() {
        assert!(super::is_tag_name("127.0.0.1:5000/team/web:1.0"));
        assert!(!super::is_tag_name("127.0.0.1:5000/team/web"));
        assert!(!super::is_tag_name("r/a@sha256:00"));
        assert!(!super::is_tag_name("web:1.0"));
    }
}
