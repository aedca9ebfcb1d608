//! The stand-in itself, against real containerd 2.x and a real registry:
//! it serves its node's content, proxies a peer's, answers a miss with
//! spegel's 404, reuses a miss for its lookup TTL, resumes a transfer that
//! breaks mid-way from another peer, and never calls the registry.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use testbed::servers::containerd::Containerd;
use testbed::servers::peer_mirror::{PeerMirror, Settings};
use testbed::servers::registry::Registry;
use testbed::support::process::{HttpResponse, http_request};

fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// `ctr images pull` from the registry itself, as a node that seeded would.
fn pull(containerd: &Containerd, reference: &str) {
    let (ok, out) = testbed::support::process::run(
        Command::new("ctr")
            .arg("--address")
            .arg(&containerd.socket)
            .args(["--namespace", "k8s.io", "images", "pull", "--plain-http"])
            .arg("--hosts-dir")
            .arg(&containerd.hosts_dir)
            .arg(reference),
    );
    assert!(ok, "ctr pull {reference}: {out}");
}

fn get(host: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_request(host, "GET", path, headers).unwrap()
}

/// Waits until `path` on `host` answers 200 (the content is advertised).
fn until_found(host: &str, path: &str) {
    until_found_with(host, path, &[])
}

/// A peer that advertises `blob`, then answers every request with a 200 and
/// the full length but only the first half of the bytes, and hangs up.
/// Returns how many requests it has answered so far.
fn breaking_peer(directory: &Path, digest: &str, blob: Vec<u8>) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind("127.0.0.19:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    // Listed before the real peers: lookups order equally used peers by address.
    let key_dir = directory.join(format!("{:x}", Sha256::digest(digest.as_bytes())));
    std::fs::create_dir_all(&key_dir).unwrap();
    std::fs::write(key_dir.join("key"), digest).unwrap();
    std::fs::write(key_dir.join("breaking-node"), &host).unwrap();
    let digest = digest.to_string();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: {digest}\r\n\r\n",
                blob.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&blob[..blob.len() / 2]);
        }
    });
    answered
}

#[test]
fn serves_local_and_peer_content_misses_with_404_resumes_and_never_calls_the_registry() {
    let work = testbed::support::workdir::Workdir::new("peer-mirror");
    let upstream = Registry::start(&work.join("upstream")).unwrap();
    // One layer above the 4 MiB that spegel fingerprints, one below.
    let image = testbed::builds::images::build_and_push(
        &work.join("images"),
        &upstream.host,
        "team/web",
        "1.0",
        &[5 << 20, 300 << 10],
    )
    .unwrap();
    let later = testbed::builds::images::build_and_push(
        &work.join("images"),
        &upstream.host,
        "team/later",
        "1.0",
        &[200 << 10],
    )
    .unwrap();

    let seed = Containerd::start(&work.join("seed")).expect("containerd 2 (cargo xtask fixtures)");
    seed.configure_registry(&upstream.host, &[]).unwrap();
    pull(&seed, &image.reference);
    let empty = Containerd::start(&work.join("empty")).unwrap();
    let directory = work.join("directory");
    // Advertised at once: this test is about serving; the delay is the
    // default everywhere else.
    let settings = Settings {
        advertise_delay: Duration::ZERO,
        ..Settings::default()
    };
    let a = PeerMirror::start(
        &work.join("a"),
        "a",
        "127.0.0.21",
        &seed.socket,
        &directory,
        &settings,
    )
    .unwrap();
    let long_memory = Settings {
        lookup_cache: Duration::from_secs(60),
        ..settings.clone()
    };
    let b = PeerMirror::start(
        &work.join("b"),
        "b",
        "127.0.0.22",
        &empty.socket,
        &directory,
        &long_memory,
    )
    .unwrap();
    let upstream_before = upstream.requests().len();

    let ns = format!("ns={}", upstream.host);
    let manifest = |repo: &str, r: &str| format!("/v2/{repo}/manifests/{r}?{ns}");
    let blob = |repo: &str, d: &str| format!("/v2/{repo}/blobs/{d}?{ns}");

    // The API root, and requests spegel refuses with an empty 404.
    assert_eq!(get(&a.host, "/v2/", &[]).status, 200);
    assert_eq!(get(&a.host, "/readyz", &[]).status, 200, "a has a peer");
    let no_ns = get(&a.host, "/v2/team/web/manifests/1.0", &[]);
    assert_eq!((no_ns.status, no_ns.body.len()), (404, 0), "ns is required");
    assert_eq!(
        get(&a.host, &format!("/v2/team/web/tags/list?{ns}"), &[]).status,
        404
    );
    let post = http_request(&a.host, "POST", &manifest("team/web", "1.0"), &[]).unwrap();
    assert_eq!(post.status, 404, "pull-only");

    // Local content: the tag, the manifest by digest, a layer, a range.
    let by_tag = get(&a.host, &manifest("team/web", "1.0"), &[]);
    assert_eq!(by_tag.status, 200);
    assert_eq!(by_tag.header("docker-content-digest"), image.digest);
    assert_eq!(
        by_tag.header("content-type"),
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(by_tag.header("oci-namespace"), upstream.host);
    assert_eq!(sha256(&by_tag.body), image.digest);
    for d in &image.blobs {
        let r = get(&a.host, &blob("team/web", d), &[]);
        assert_eq!(r.status, 200, "{d}");
        assert_eq!(r.header("accept-ranges"), "bytes");
        assert_eq!(&sha256(&r.body), d, "the bytes of {d}");
    }
    let (big_len, big) = image
        .blobs
        .iter()
        .map(|d| {
            (
                get(&a.host, &blob("team/web", d), &[]).body.len(),
                d.clone(),
            )
        })
        .max()
        .unwrap();
    let part = get(
        &a.host,
        &blob("team/web", &big),
        &[("Range", "bytes=10-19")],
    );
    assert_eq!(part.status, 206);
    assert_eq!(part.body.len(), 10);
    assert_eq!(
        part.header("content-range"),
        format!("bytes 10-19/{big_len}")
    );
    let past = get(
        &a.host,
        &blob("team/web", &big),
        &[("Range", "bytes=999999999-")],
    );
    assert_eq!(past.status, 400, "a range past the end, served locally");
    let on_blobs = get(&a.host, &blob("team/web", &image.digest), &[]);
    assert_eq!(on_blobs.status, 404, "a manifest is not a blob");

    // b's node has nothing: it proxies a's, marking the request so it never hops twice.
    until_found(&b.host, &manifest("team/web", &image.digest));
    let via_peer = get(&b.host, &manifest("team/web", "1.0"), &[]);
    assert_eq!(via_peer.status, 200);
    assert_eq!(sha256(&via_peer.body), image.digest);
    for d in &image.blobs {
        let r = get(&b.host, &blob("team/web", d), &[]);
        assert_eq!(
            (r.status, sha256(&r.body)),
            (200, d.clone()),
            "{d} via the peer"
        );
    }
    assert!(b.counter("peer_mirror_peer_bytes_total") > 5 << 20);
    let marked = get(
        &b.host,
        &blob("team/web", &big),
        &[("X-Spegel-Mirrored", "true")],
    );
    assert_eq!(
        marked.status, 404,
        "a peer request is served locally or not at all"
    );

    // A miss: the OCI JSON error, and the miss is remembered for the lookup TTL.
    let long_memory = Settings {
        lookup_cache: Duration::from_secs(60),
        ..settings.clone()
    };
    let e = PeerMirror::start(
        &work.join("e"),
        "e",
        "127.0.0.26",
        &empty.socket,
        &directory,
        &long_memory,
    )
    .unwrap();
    let miss = get(&e.host, &manifest("team/later", &later.digest), &[]);
    assert_eq!(miss.status, 404);
    assert_eq!(miss.header("content-type"), "application/json");
    let error: serde_json::Value = serde_json::from_slice(&miss.body).unwrap();
    assert_eq!(error["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert_eq!(error["errors"][0]["detail"]["attempts"], 0);
    assert_eq!(
        upstream.requests().len(),
        upstream_before,
        "the mirrors called the registry: {:?}",
        &upstream.requests()[upstream_before..]
    );
    pull(&seed, &later.reference);
    let upstream_before = upstream.requests().len();
    until_found(&a.host, &manifest("team/later", &later.digest));
    let c = PeerMirror::start(
        &work.join("c"),
        "c",
        "127.0.0.24",
        &empty.socket,
        &directory,
        &settings,
    )
    .unwrap();
    until_found(&c.host, &manifest("team/later", &later.digest));
    assert_eq!(
        get(&e.host, &manifest("team/later", &later.digest), &[]).status,
        404,
        "e still answers from its cached lookup, as spegel does for ~2.5 s"
    );

    // A peer that breaks mid-transfer: the rest comes from another peer with a Range.
    let small = image
        .blobs
        .iter()
        .find(|d| **d != big && get(&a.host, &blob("team/web", d), &[]).body.len() > 100 << 10)
        .unwrap()
        .clone();
    let bytes = get(&a.host, &blob("team/web", &small), &[]).body;
    let broken = breaking_peer(&directory, &small, bytes.clone());
    let fresh = PeerMirror::start(
        &work.join("d"),
        "d",
        "127.0.0.25",
        &empty.socket,
        &directory,
        &settings,
    )
    .unwrap();
    let resumed = get(&fresh.host, &blob("team/web", &small), &[]);
    assert_eq!(resumed.status, 200);
    assert_eq!(resumed.body.len(), bytes.len(), "the whole blob arrived");
    assert_eq!(sha256(&resumed.body), small);
    assert!(
        broken.load(Ordering::SeqCst) >= 1,
        "the breaking peer was asked first (least used, then by address)"
    );

    // Not one request reached the registry through any mirror.
    assert_eq!(
        upstream.requests().len(),
        upstream_before,
        "the mirrors called the registry: {:?}",
        &upstream.requests()[upstream_before..]
    );
}

/// spegel's set-ups beyond the chart's defaults: Basic auth (401 without the
/// header, sent to peers, and written into the node's `hosts.toml`), `registryFilters` (an empty 404, no lookup), and
/// containerd 2.0's missing content events (a blob pulled after the mirror
/// started is never advertised, though its tag is, until a mirror lists the
/// content again at its start).
#[test]
fn basic_auth_filters_and_containerd_2_0_without_content_events() {
    let work = testbed::support::workdir::Workdir::new("peer-mirror-set-ups");
    let upstream = Registry::start(&work.join("upstream")).unwrap();
    let build = |repo: &str| {
        testbed::builds::images::build_and_push(
            &work.join("images"),
            &upstream.host,
            repo,
            "1.0",
            &[300 << 10],
        )
        .unwrap()
    };
    let (before, after) = (build("team/before"), build("team/after"));
    let seed = Containerd::start(&work.join("seed")).expect("containerd 2 (cargo xtask fixtures)");
    seed.configure_registry(&upstream.host, &[]).unwrap();
    pull(&seed, &before.reference);
    let empty = Containerd::start(&work.join("empty")).unwrap();
    let directory = work.join("directory");
    let spegel_2_0 = Settings {
        basic_auth: Some("spegel:basic-4417".into()),
        registry_filters: vec![":latest$".into()],
        content_events: false,
        ..Settings::default()
    };
    let start = |name: &str, ip: &str, node: &Containerd| {
        PeerMirror::start(
            &work.join(name),
            name,
            ip,
            &node.socket,
            &directory,
            &spegel_2_0,
        )
        .unwrap()
    };
    // The seed's mirror: it serves b (kept alive by its binding).
    let _a = start("a", "127.0.0.31", &seed);
    let b = start("b", "127.0.0.32", &empty);
    let ns = format!("ns={}", upstream.host);
    let manifest = |repo: &str, r: &str| format!("/v2/{repo}/manifests/{r}?{ns}");
    let blob = |repo: &str, d: &str| format!("/v2/{repo}/blobs/{d}?{ns}");
    let auth = format!("Basic {}", {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode("spegel:basic-4417")
    });
    let authed = [("Authorization", auth.as_str())];

    // Basic auth, checked before anything else.
    let refused = get(&b.host, "/v2/", &[]);
    assert_eq!(refused.status, 401);
    let error: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(error["errors"][0]["code"], "UNAUTHORIZED");
    assert_eq!(
        get(&b.host, "/v2/", &[("Authorization", "Basic d3Jvbmc=")]).status,
        401
    );
    assert_eq!(get(&b.host, "/v2/", &authed).status, 200);
    assert_eq!(b.counter("peer_mirror_unauthorized_total"), 2);

    // registryFilters: refused before any lookup.
    let filtered = get(&b.host, &manifest("team/before", "latest"), &authed);
    assert_eq!((filtered.status, filtered.body.len()), (404, 0));
    assert_eq!(b.counter("peer_mirror_filtered_total"), 1);
    assert_eq!(
        b.counter("peer_mirror_misses_total"),
        0,
        "no lookup was made"
    );

    // What was there when the mirror started is found; b passes the header on to a.
    until_found_with(&b.host, &manifest("team/before", &before.digest), &authed);
    // The node's hosts.toml carries the header for containerd to send
    // (containerd sending it is shown by the agent's Mirror-pull tests).
    b.configure_node(&empty.hosts_dir, &[&format!("http://{}", upstream.host)])
        .unwrap();
    let hosts =
        std::fs::read_to_string(empty.hosts_dir.join(&upstream.host).join("hosts.toml")).unwrap();
    assert!(
        hosts.contains(&format!(
            "[host.'http://{}'.header]\nAuthorization = '{auth}'",
            b.host
        )),
        "{hosts}"
    );

    // Pulled after the mirror started, on containerd 2.0: the tag is
    // advertised when the image is created, the blobs never are.
    pull(&seed, &after.reference);
    until_found_with(&b.host, &manifest("team/after", "1.0"), &authed);
    for d in &after.blobs {
        let r = get(&b.host, &blob("team/after", d), &authed);
        assert_eq!(r.status, 404, "{d} was advertised without content events");
    }
    // A mirror that starts now lists the content and advertises it (spegel's restart).
    let c = start("c", "127.0.0.33", &seed);
    let d = start("d", "127.0.0.34", &empty);
    for digest in &after.blobs {
        until_found_with(&d.host, &blob("team/after", digest), &authed);
        let r = get(&d.host, &blob("team/after", digest), &authed);
        assert_eq!((r.status, &sha256(&r.body)), (200, digest));
    }
    assert_eq!(
        c.counter("peer_mirror_blobs_served_to_peers_total"),
        after.blobs.len() as u64
    );
}

/// Waits until `path` on `host` answers 200 to a HEAD with `headers`.
fn until_found_with(host: &str, path: &str, headers: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_request(host, "HEAD", path, headers).unwrap().status != 200 {
        assert!(
            Instant::now() < deadline,
            "{path} not found via {host} in 20s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
