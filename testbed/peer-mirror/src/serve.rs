//! The registry handler (spegel v0.7.4 `pkg/registry/registry.go`): local content first, then
//! the peers that advertise it, else a 404 that sends containerd on to the
//! next host. It never contacts a registry.
//!
//! Before anything, Basic auth when configured (401), then spegel's filters
//! (`mirroredRegistries` as an allow-list, `registryFilters` regexes): an
//! empty 404 with no lookup.
//!
//! One simplification of spegel's transport: peers are tried one after the
//! other, each given spegel's header deadline — max(2 × p90 of the peers'
//! observed header latency, 100 ms) — instead of hedged parallel attempts.
//! Which peer wins can differ; what is fetched, and from where (peers
//! only), and when a slow peer counts as a miss, does not.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

use crate::distribution::{self, Kind, Reference, Target};
use crate::fingerprint;
use crate::routing::Directory;
use crate::store::Store;

pub type Body = BoxBody<Bytes, io::Error>;

/// The header that marks a request from another mirror: served locally or
/// not at all, so a request never hops twice.
pub const MIRRORED: &str = "x-spegel-mirrored";
const DIGEST_HEADER: &str = "docker-content-digest";
const NAMESPACE_HEADER: &str = "oci-namespace";
/// The least a peer is given to send its response headers (spegel's 100 ms).
pub const HEADER_FLOOR: Duration = Duration::from_millis(100);
/// HEAD requests and manifests must finish within this (spegel's 3 s).
const SHORT_DEADLINE: Duration = Duration::from_secs(3);

/// What a request was answered from; the mirror's own counters.
#[derive(Default)]
pub struct Counters {
    /// Bytes of content served from this node's containerd (to containerd or to peers).
    pub local_bytes: AtomicU64,
    /// Bytes served to this node's containerd that came from peers.
    pub peer_bytes: AtomicU64,
    /// Requests answered with a 404 because no peer had the content.
    pub misses: AtomicU64,
    /// Blob GETs served locally to another mirror.
    pub served_to_peers: AtomicU64,
    /// Bytes of content served locally to requests with the peer header:
    /// another node's mirror, or its containerd asking a named source.
    pub bytes_served_to_peers: AtomicU64,
    /// Requests refused for want of the Basic-auth header.
    pub unauthorized: AtomicU64,
    /// Requests answered with an empty 404 by spegel's filters.
    pub filtered: AtomicU64,
    /// Peers that sent no response headers within spegel's deadline.
    pub peer_timeouts: AtomicU64,
}

/// How a node's spegel is set up (its chart values).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Registry hosts served (`mirroredRegistries`); empty: every registry.
    pub mirrored_registries: Vec<String>,
    /// `registryFilters`: a reference (`registry/repo[:tag]`) matching one is
    /// answered with an empty 404 and not advertised.
    pub registry_filters: Vec<regex::Regex>,
    /// `basicAuthSecretName`'s `user:password`: required on every request,
    /// and sent to peers.
    pub basic_auth: Option<String>,
    /// The least a peer is given to answer with headers (spegel: 100 ms).
    pub header_floor: Duration,
}

impl Settings {
    /// Whether spegel refuses `reference` outright.
    pub fn filtered(&self, reference: &Reference) -> bool {
        (!self.mirrored_registries.is_empty()
            && !self.mirrored_registries.contains(&reference.registry))
            || self.filters_name(&reference.name())
    }

    /// Whether a `registryFilters` regex matches `name` (`registry/repo[:tag]`).
    pub fn filters_name(&self, name: &str) -> bool {
        self.registry_filters.iter().any(|f| f.is_match(name))
    }
}

/// The peers' observed header latencies, for spegel's deadline.
#[derive(Default)]
struct Latency {
    recent: std::sync::Mutex<std::collections::VecDeque<Duration>>,
}

impl Latency {
    const KEPT: usize = 256;

    fn observe(&self, d: Duration) {
        let mut recent = self.recent.lock().expect("latency");
        if recent.len() == Self::KEPT {
            recent.pop_front();
        }
        recent.push_back(d);
    }

    /// max(2 × p90, floor): spegel's wait for a peer's response headers.
    fn deadline(&self, floor: Duration) -> Duration {
        let mut seen: Vec<Duration> = self
            .recent
            .lock()
            .expect("latency")
            .iter()
            .copied()
            .collect();
        if seen.is_empty() {
            return floor;
        }
        seen.sort();
        let p90 = seen[(seen.len() * 9 / 10).min(seen.len() - 1)];
        (p90 * 2).max(floor)
    }
}

pub struct Mirror {
    pub store: Store,
    pub directory: Directory,
    pub settings: Settings,
    pub counters: Counters,
    authorization: Option<HeaderValue>,
    latency: Latency,
    client: Client<HttpConnector, Empty<Bytes>>,
}

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(empty());
    *r.status_mut() = code;
    r
}

/// The OCI JSON error spegel answers a miss with.
fn oci_error(code: StatusCode, kind: Kind, message: &str, attempts: usize) -> Response<Body> {
    let code_name = match kind {
        Kind::Manifest => "MANIFEST_UNKNOWN",
        Kind::Blob => "BLOB_UNKNOWN",
    };
    let body = serde_json::json!({"errors": [{
        "code": code_name, "message": message, "detail": {"attempts": attempts},
    }]});
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

impl Mirror {
    pub fn new(store: Store, directory: Directory, settings: Settings) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(30)));
        let authorization = settings
            .basic_auth
            .as_deref()
            .map(|a| value(&crate::configuration::basic_authorization(a)));
        Mirror {
            store,
            directory,
            settings,
            authorization,
            latency: Latency::default(),
            counters: Counters::default(),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Serves HTTP/1 on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return status(StatusCode::NOT_FOUND);
        }
        match path.as_str() {
            "/livez" => return status(StatusCode::OK),
            "/readyz" => {
                return status(if self.directory.has_peers() {
                    StatusCode::OK
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                });
            }
            "/metrics" => return Response::new(full(self.metrics())),
            _ => {}
        }
        // spegel checks Basic auth before anything else, `/v2/` too.
        if let Some(expected) = &self.authorization
            && req.headers().get(header::AUTHORIZATION) != Some(expected)
        {
            self.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            let body = serde_json::json!({"errors": [{
                "code": "UNAUTHORIZED", "message": "authentication required",
            }]});
            let mut r = Response::new(full(body.to_string()));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            return r;
        }
        if path == "/v2" || path == "/v2/" {
            return status(StatusCode::OK);
        }
        let Some(reference) = distribution::parse(&path, req.uri().query()) else {
            return status(StatusCode::NOT_FOUND);
        };
        if self.settings.filtered(&reference) {
            self.counters.filtered.fetch_add(1, Ordering::Relaxed);
            return status(StatusCode::NOT_FOUND);
        }
        let head = req.method() == Method::HEAD;
        let range = req
            .headers()
            .get(header::RANGE)
            .and_then(|r| r.to_str().ok())
            .map(str::to_string);
        let from_peer = req
            .headers()
            .get(MIRRORED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let local = match self.local_digest(&reference).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("peer-mirror: containerd: {e}");
                None
            }
        };
        match local {
            Some(digest) => {
                self.serve_local(&reference, &digest, head, range.as_deref(), from_peer)
                    .await
            }
            None if from_peer => oci_error(
                StatusCode::NOT_FOUND,
                reference.kind,
                "not held by this node",
                0,
            ),
            None => self.serve_from_peers(&reference, head, range).await,
        }
    }

    /// The digest of the content if this node holds it.
    async fn local_digest(&self, r: &Reference) -> Result<Option<String>, crate::store::Error> {
        let digest = match &r.target {
            Target::Digest(d) => d.clone(),
            Target::Tag(_) => match self.store.resolve(&r.key()).await? {
                Some(d) => d,
                None => return Ok(None),
            },
        };
        Ok(self.store.info(&digest).await?.map(|_| digest))
    }

    async fn serve_local(
        &self,
        r: &Reference,
        digest: &str,
        head: bool,
        range: Option<&str>,
        from_peer: bool,
    ) -> Response<Body> {
        let unknown = |m: &str| oci_error(StatusCode::NOT_FOUND, r.kind, m, 0);
        let Ok(Some(blob)) = self.store.info(digest).await else {
            return unknown("not found in containerd");
        };
        // Layers are not read whole before their headers are sent: a peer
        // has only spegel's header deadline to answer.
        let json = blob.size <= fingerprint::MAX_PARSED
            && blob.size > 0
            && self
                .store
                .looks_like_json(digest, blob.size)
                .await
                .unwrap_or(false);
        let small = if json {
            match self.store.read_all(digest).await {
                Ok(b) => Some(b),
                Err(_) => return unknown("unreadable in containerd"),
            }
        } else {
            None
        };
        let media_type = fingerprint::media_type(blob.size, small.as_deref().unwrap_or_default());
        let is_manifest = fingerprint::is_manifest(&media_type);
        if is_manifest != (r.kind == Kind::Manifest) {
            return unknown("wrong kind of content");
        }
        let mut response = Response::new(empty());
        let h = response.headers_mut();
        h.insert(DIGEST_HEADER, value(digest));
        h.insert(NAMESPACE_HEADER, value(&r.registry));
        let (first, last) = match (r.kind, range) {
            (Kind::Blob, Some(range)) => {
                let Some(parsed) = distribution::parse_range(range) else {
                    return status(StatusCode::NOT_FOUND);
                };
                let Some((first, last)) = parsed.resolve(blob.size) else {
                    return status(StatusCode::BAD_REQUEST);
                };
                *response.status_mut() = StatusCode::PARTIAL_CONTENT;
                let h = response.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(fingerprint::OCTET_STREAM),
                );
                h.insert(
                    header::CONTENT_RANGE,
                    value(&format!("bytes {first}-{last}/{}", blob.size)),
                );
                (first, last)
            }
            _ => {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, value(&media_type));
                (0, blob.size.saturating_sub(1))
            }
        };
        let len = if blob.size == 0 { 0 } else { last - first + 1 };
        let h = response.headers_mut();
        h.insert(header::CONTENT_LENGTH, value(&len.to_string()));
        if r.kind == Kind::Blob {
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        if head || len == 0 {
            return response;
        }
        self.counters.local_bytes.fetch_add(len, Ordering::Relaxed);
        if from_peer {
            self.counters
                .bytes_served_to_peers
                .fetch_add(len, Ordering::Relaxed);
        }
        if from_peer && r.kind == Kind::Blob {
            self.counters
                .served_to_peers
                .fetch_add(1, Ordering::Relaxed);
        }
        if let Some(bytes) = small {
            *response.body_mut() = full(bytes[first as usize..=last as usize].to_vec());
            return response;
        }
        match self.store.read(digest, first, len).await {
            Ok(stream) => {
                let frames = stream.map(|c| c.map(Frame::data).map_err(io::Error::other));
                *response.body_mut() = BodyExt::boxed(StreamBody::new(frames));
                response
            }
            Err(_) => unknown("unreadable in containerd"),
        }
    }

    /// One request to `peer`; the response when it is usable.
    async fn ask(
        &self,
        peer: &str,
        r: &Reference,
        head: bool,
        range: Option<&str>,
    ) -> Option<Response<Incoming>> {
        let (kind, target) = match (&r.kind, &r.target) {
            (Kind::Manifest, Target::Tag(t)) => ("manifests", t.as_str()),
            (Kind::Manifest, Target::Digest(d)) => ("manifests", d.as_str()),
            (Kind::Blob, Target::Digest(d)) => ("blobs", d.as_str()),
            (Kind::Blob, Target::Tag(_)) => return None,
        };
        let uri = format!(
            "http://{peer}/v2/{}/{kind}/{target}?ns={}",
            r.repository, r.registry
        );
        let mut req = Request::builder()
            .method(if head { Method::HEAD } else { Method::GET })
            .uri(uri)
            .header(MIRRORED, "true")
            .header(header::USER_AGENT, "spegel")
            .header(
                header::ACCEPT,
                [
                    fingerprint::OCI_MANIFEST,
                    fingerprint::DOCKER_MANIFEST,
                    fingerprint::OCI_INDEX,
                    fingerprint::DOCKER_LIST,
                ]
                .join(", "),
            );
        if let Some(range) = range {
            req = req.header(header::RANGE, range);
        }
        if let Some(auth) = &self.authorization {
            req = req.header(header::AUTHORIZATION, auth.clone());
        }
        let req = req.body(Empty::new()).ok()?;
        self.directory.used(peer);
        let deadline = self.latency.deadline(self.settings.header_floor);
        let asked = std::time::Instant::now();
        let answer = tokio::time::timeout(deadline, self.client.request(req)).await;
        match &answer {
            Ok(_) => self.latency.observe(asked.elapsed()),
            Err(_) => {
                self.counters.peer_timeouts.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "peer-mirror: {peer} sent no headers for {} within {deadline:?}",
                    r.key()
                );
            }
        }
        match answer {
            // A ranged request needs the range: a whole blob would not fit
            // the response under way.
            Ok(Ok(resp))
                if (resp.status() == StatusCode::PARTIAL_CONTENT
                    || (resp.status() == StatusCode::OK && range.is_none()))
                    && (r.kind == Kind::Blob
                        || (resp.headers().contains_key(header::CONTENT_TYPE)
                            && resp.headers().contains_key(DIGEST_HEADER))) =>
            {
                Some(resp)
            }
            _ => None,
        }
    }

    /// The first peer that answers, and how many were asked.
    async fn race(
        &self,
        r: &Reference,
        head: bool,
        range: Option<&str>,
    ) -> (Option<Response<Incoming>>, usize) {
        let key = r.key();
        let mut attempts = 0;
        for peer in self.directory.lookup(&key) {
            attempts += 1;
            if let Some(resp) = self.ask(&peer, r, head, range).await {
                return (Some(resp), attempts);
            }
            self.directory.failed(&key, &peer);
        }
        (None, attempts)
    }

    async fn serve_from_peers(
        self: &Arc<Self>,
        r: &Reference,
        head: bool,
        range: Option<String>,
    ) -> Response<Body> {
        let short = head || r.kind == Kind::Manifest;
        let raced = if short {
            tokio::time::timeout(SHORT_DEADLINE, self.race(r, head, range.as_deref()))
                .await
                .unwrap_or((None, 0))
        } else {
            self.race(r, head, range.as_deref()).await
        };
        let (resp, attempts) = raced;
        let Some(resp) = resp else {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            let message = if attempts == 0 {
                format!("could not find peer for {}", r.key())
            } else {
                "all request retries exhausted".to_string()
            };
            return oci_error(StatusCode::NOT_FOUND, r.kind, &message, attempts);
        };
        let (parts, body) = resp.into_parts();
        let mut response = Response::new(empty());
        *response.status_mut() = parts.status;
        copy_headers(&parts.headers, response.headers_mut(), r);
        if head {
            return response;
        }
        if r.kind == Kind::Manifest {
            // Manifests are small: a failure mid-copy just truncates them, as in spegel.
            let stream = body.into_data_stream().map(|c| c.map_err(io::Error::other));
            *response.body_mut() =
                BodyExt::boxed(StreamBody::new(stream.map(|c| c.map(Frame::data))));
            return response;
        }
        // Blobs: what was asked for, as an absolute (first, last), so that a
        // broken transfer resumes from another peer where it stopped.
        let (first, last) = match content_span(&parts.headers) {
            Some(span) => span,
            None => return response,
        };
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(8);
        let this = r.clone();
        let mirror = self.clone();
        tokio::spawn(async move {
            let mut next = first;
            let mut body = body;
            loop {
                while let Some(frame) = body.frame().await {
                    let Ok(frame) = frame else { break };
                    if let Some(data) = frame.data_ref() {
                        next += data.len() as u64;
                        mirror
                            .counters
                            .peer_bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                if next > last {
                    return;
                }
                // The peer went away mid-transfer: the rest from another one.
                let resume = format!("bytes={next}-{last}");
                match mirror.race(&this, false, Some(&resume)).await {
                    (Some(resp), _) if resp.status() == StatusCode::PARTIAL_CONTENT => {
                        body = resp.into_body();
                    }
                    // Nobody can: the response ends short and containerd reopens it.
                    _ => return,
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        *response.body_mut() = BodyExt::boxed(StreamBody::new(stream));
        response
    }

    fn metrics(&self) -> String {
        let c = &self.counters;
        format!(
            "# TYPE peer_mirror_local_bytes_total counter\npeer_mirror_local_bytes_total {}\n\
             # TYPE peer_mirror_peer_bytes_total counter\npeer_mirror_peer_bytes_total {}\n\
             # TYPE peer_mirror_misses_total counter\npeer_mirror_misses_total {}\n\
             # TYPE peer_mirror_blobs_served_to_peers_total counter\npeer_mirror_blobs_served_to_peers_total {}\n\
             # TYPE peer_mirror_bytes_served_to_peers_total counter\npeer_mirror_bytes_served_to_peers_total {}\n\
             # TYPE peer_mirror_unauthorized_total counter\npeer_mirror_unauthorized_total {}\n\
             # TYPE peer_mirror_filtered_total counter\npeer_mirror_filtered_total {}\n\
             # TYPE peer_mirror_peer_timeouts_total counter\npeer_mirror_peer_timeouts_total {}\n",
            c.local_bytes.load(Ordering::Relaxed),
            c.peer_bytes.load(Ordering::Relaxed),
            c.misses.load(Ordering::Relaxed),
            c.served_to_peers.load(Ordering::Relaxed),
            c.bytes_served_to_peers.load(Ordering::Relaxed),
            c.unauthorized.load(Ordering::Relaxed),
            c.filtered.load(Ordering::Relaxed),
            c.peer_timeouts.load(Ordering::Relaxed),
        )
    }
}

/// Copies what spegel copies from a peer's answer onto its own.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, r: &Reference) {
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_RANGE,
    ] {
        if let Some(v) = from.get(&name) {
            to.insert(name, v.clone());
        }
    }
    let digest = from
        .get(DIGEST_HEADER)
        .cloned()
        .or_else(|| match &r.target {
            Target::Digest(d) => Some(value(d)),
            Target::Tag(_) => None,
        });
    if let Some(d) = digest {
        to.insert(DIGEST_HEADER, d);
    }
    if r.kind == Kind::Blob {
        to.entry(header::CONTENT_TYPE)
            .or_insert(HeaderValue::from_static(fingerprint::OCTET_STREAM));
        to.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    }
}

/// `(first, last)` byte of a 200 or 206 answer.
fn content_span(h: &HeaderMap) -> Option<(u64, u64)> {
    if let Some(range) = h.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()) {
        let (span, _) = range.strip_prefix("bytes ")?.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        return Some((a.parse().ok()?, b.parse().ok()?));
    }
    let len: u64 = h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()?;
    (len > 0).then(|| (0, len - 1))
}

/// Binds `addr` and serves until the process ends.
pub async fn run(mirror: Arc<Mirror>, addr: SocketAddr) -> io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    mirror.serve(listener).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_twice_the_p90_of_header_latency_and_at_least_the_floor() {
        let floor = Duration::from_millis(100);
        let l = Latency::default();
        assert_eq!(l.deadline(floor), floor, "nothing observed yet");
        for ms in 1..=100 {
            l.observe(Duration::from_millis(ms));
        }
        assert_eq!(l.deadline(floor), Duration::from_millis(182));
        let fast = Latency::default();
        fast.observe(Duration::from_millis(3));
        assert_eq!(fast.deadline(floor), floor);
    }

    #[test]
    fn filters_refuse_other_registries_and_matching_names() {
        let reference = |target: Target| Reference {
            registry: "registry.lan".into(),
            repository: "team/app".into(),
            kind: Kind::Manifest,
            target,
        };
        let latest = reference(Target::Tag("latest".into()));
        let pinned = reference(Target::Tag("1.0".into()));
        let digest = reference(Target::Digest("sha256:ab".into()));
        let none = Settings::default();
        assert!(!none.filtered(&latest) && !none.filtered(&digest));
        let latest_filtered = Settings {
            registry_filters: vec![regex::Regex::new(":latest$").unwrap()],
            ..Settings::default()
        };
        assert!(latest_filtered.filtered(&latest));
        assert!(!latest_filtered.filtered(&pinned) && !latest_filtered.filtered(&digest));
        let other = Settings {
            mirrored_registries: vec!["ghcr.io".into()],
            ..Settings::default()
        };
        assert!(other.filtered(&pinned) && other.filtered(&digest));
    }
}
