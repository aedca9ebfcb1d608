//! Pulls through a real containerd 2.x from real registries (Debian's
//! docker-registry) serving images built here.

mod support;

use agent::hosts;
use agent::pull::Runtime;
use testbed::builds::images;
use testbed::servers::containerd::{Containerd, Flavor};
use testbed::servers::registry::Registry;
use testbed::support::workdir::Workdir;

const MB: usize = 1024 * 1024;

/// A Mirror pull of `image` by its digest, as the agent makes one, with
/// `mirror` as the in-cluster mirror; asserts the digest, returns the host
/// directory used.
async fn mirror_pull(
    runtime: &Runtime,
    node: &Containerd,
    dir: &Workdir,
    upstream: &Registry,
    mirror: &Registry,
    image: &images::Image,
) -> std::path::PathBuf {
    let mirror_dir = hosts::prepare_mirror(
        &node.hosts_dir,
        &dir.join("agent-hosts"),
        &upstream.host,
        &hosts::MirrorEndpoints::new([format!("http://{}", mirror.host)]),
        None,
    )
    .unwrap();
    let pinned = format!("{}/team/app@{}", upstream.host, image.digest);
    let pulled = runtime
        .pull(&pinned, &image.reference, &mirror_dir, None, None, true)
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
    mirror_dir
}

#[tokio::test]
async fn default_pull_comes_from_the_registry_and_is_a_cri_image() {
    let dir = Workdir::new("agent-pull-default");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let image = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/app",
        "1.0",
        &[16 * MB, 8 * MB, 4 * MB, MB],
    )
    .unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();

    let runtime = Runtime::connect(&node.socket).await.unwrap();
    let (progress, told) = tokio::sync::watch::channel(agent::pull::Progress::default());
    let pulled = runtime
        .pull(
            &image.reference,
            &image.reference,
            &node.hosts_dir,
            None,
            Some(progress),
            true,
        )
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(pulled.size, Some(image.size as i64));
    // containerd's progress stream told every byte: the config and layers
    // (what `size` counts), and the manifest.
    let told = told.borrow().total();
    assert!(
        told >= image.size as u64 && told < image.size as u64 + 64 * 1024,
        "progress told {told} bytes of {}",
        image.size
    );
    // Every blob crossed once.
    let gets = upstream.blob_gets(&image.repository);
    for blob in &image.blobs {
        assert_eq!(gets.get(blob), Some(&1), "{blob}: {gets:?}");
    }
    // Present in the k8s.io namespace, and listed by CRI, which is what kubelet asks.
    assert_eq!(
        runtime
            .image(&image.reference)
            .await
            .unwrap()
            .map(|(d, _)| d),
        Some(image.digest.clone())
    );
    let tags = cri_tags(&node).await;
    assert!(tags.contains(&image.reference), "CRI lists {tags:?}");
}

#[tokio::test]
async fn mirror_pull_never_reaches_the_upstream() {
    let dir = Workdir::new("agent-pull-mirror");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let mirror = Registry::start(&dir.join("mirror")).unwrap();
    let work = dir.join("images");
    // The same image on both: what the mirror would hold after a seed pulled it.
    let image =
        images::build_and_push(&work, &upstream.host, "team/app", "2.0", &[2 * MB, MB]).unwrap();
    let mirrored =
        images::build_and_push(&work, &mirror.host, "team/app", "2.0", &[2 * MB, MB]).unwrap();
    assert_eq!(image.digest, mirrored.digest);
    let node = Containerd::start(&dir.join("node")).unwrap();
    // As spegel configures a node: the registry as server, the mirror tried first.
    node.configure_registry(&upstream.host, &[&mirror.host])
        .unwrap();

    let runtime = Runtime::connect(&node.socket).await.unwrap();
    let pushed = upstream.requests().len();
    let mirror_dir = mirror_pull(&runtime, &node, &dir, &upstream, &mirror, &image).await;
    let after = upstream.requests();
    assert_eq!(
        after.len(),
        pushed,
        "upstream was contacted: {:?}",
        &after[pushed..]
    );
    assert!(
        !mirror.blob_gets("team/app").is_empty(),
        "the mirror served the blobs"
    );

    // An image the mirror does not have fails without falling back upstream.
    let missing =
        images::build_and_push(&work, &upstream.host, "team/other", "1.0", &[MB]).unwrap();
    let before = upstream.requests().len();
    let err = runtime
        .pull(
            &missing.reference,
            &missing.reference,
            &mirror_dir,
            None,
            None,
            true,
        )
        .await
        .unwrap_err();
    assert_eq!(
        upstream.requests().len(),
        before,
        "a Mirror pull fell back to the upstream"
    );
    assert_eq!(err.reason(), crd::PullFailure::NotFound, "{err}");
}

/// The node's file as spegel writes it with Basic auth and `prependExisting`
/// keeping an administrator's pull-through cache after it: the Mirror pull
/// sends spegel's header (the mirror refuses anyone without it), and never
/// asks the cache — which could reach the internet — though the cache is
/// listed first and holds the image.
#[tokio::test]
async fn a_mirror_pull_keeps_the_mirrors_settings_and_skips_other_hosts() {
    const PASSWORD: &str = "spegel-basic-4417";
    let dir = Workdir::new("agent-pull-mirror-settings");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let mirror = Registry::start_with_login(&dir.join("mirror"), "spegel", PASSWORD).unwrap();
    let cache = Registry::start(&dir.join("cache")).unwrap();
    let work = dir.join("images");
    let image = images::build_and_push(&work, &upstream.host, "team/app", "3.0", &[MB]).unwrap();
    let login = Some(("spegel", PASSWORD));
    images::build_and_push_as(&work, &mirror.host, "team/app", "3.0", &[MB], login).unwrap();
    images::build_and_push(&work, &cache.host, "team/app", "3.0", &[MB]).unwrap();
    let node = Containerd::start(&dir.join("node")).unwrap();
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("spegel:{PASSWORD}"))
    };
    let registry_dir = node.hosts_dir.join(&upstream.host);
    std::fs::create_dir_all(&registry_dir).unwrap();
    std::fs::write(
        registry_dir.join("hosts.toml"),
        format!(
            "server = 'http://{up}'\n\n\
             [host.'http://{cache}']\ncapabilities = ['pull', 'resolve']\n\n\
             [host.'http://{mirror}']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'\n\
             [host.'http://{mirror}'.header]\nAuthorization = 'Basic {basic}'\n",
            up = upstream.host,
            cache = cache.host,
            mirror = mirror.host,
        ),
    )
    .unwrap();

    let runtime = Runtime::connect(&node.socket).await.unwrap();
    let (upstream_before, cache_before) = (upstream.requests().len(), cache.requests().len());
    mirror_pull(&runtime, &node, &dir, &upstream, &mirror, &image).await;
    assert_eq!(upstream.requests().len(), upstream_before, "upstream asked");
    assert_eq!(
        cache.requests()[cache_before..],
        [] as [String; 0],
        "the pull-through cache asked"
    );
    assert!(
        !mirror.blob_gets("team/app").is_empty(),
        "the mirror served the blobs, with spegel's header"
    );
}

#[tokio::test]
async fn containerd_1_6_falls_back_to_cri() {
    let dir = Workdir::new("agent-pull-cri");
    let upstream = Registry::start(&dir.join("upstream")).unwrap();
    let image = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "team/app",
        "3.0",
        &[2 * MB, MB],
    )
    .unwrap();
    let node = Containerd::start_flavor(&dir.join("node"), Flavor::Debian16).unwrap();
    node.configure_registry(&upstream.host, &[]).unwrap();

    let runtime = Runtime::connect(&node.socket).await.unwrap();
    // Pinned to the digest, stored under the tag kubelet will ask for.
    let pinned = format!("{}/team/app@{}", upstream.host, image.digest);
    let pulled = runtime
        .pull(&pinned, &image.reference, &node.hosts_dir, None, None, true)
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(
        runtime
            .image(&image.reference)
            .await
            .unwrap()
            .map(|(d, _)| d),
        Some(image.digest.clone())
    );
    let labels = runtime.labels(&image.reference).await.unwrap();
    assert_eq!(
        labels.get("io.cri-containerd.image").map(String::as_str),
        Some("managed")
    );
}

/// Every repo tag CRI's ListImages reports.
async fn cri_tags(node: &Containerd) -> Vec<String> {
    use k8s_cri::v1::ListImagesRequest;
    use k8s_cri::v1::image_service_client::ImageServiceClient;
    let channel = containerd_client::connect(&node.socket).await.unwrap();
    // CRI learns of images from containerd's events: poll until it has caught up.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let images = ImageServiceClient::new(channel.clone())
            .list_images(ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .images;
        let tags: Vec<String> = images.into_iter().flat_map(|i| i.repo_tags).collect();
        if !tags.is_empty() || tokio::time::Instant::now() > deadline {
            return tags;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// containerd keeps a Transfer's progress and auth streams through a garbage
/// collection only when their namespace exists in its metadata store; on a
/// node where nothing was ever pulled it does not, and a collection between
/// opening a stream and the Transfer failed the pull with "not found".
#[tokio::test]
async fn connecting_to_a_fresh_containerd_creates_the_kubernetes_namespace() {
    let dir = Workdir::new("agent-pull-namespace");
    let node = Containerd::start(&dir.join("node")).unwrap();
    let namespaces = || node.ctr(&["namespaces", "ls", "--quiet"]);
    assert!(
        !namespaces().lines().any(|n| n == "k8s.io"),
        "{}",
        namespaces()
    );
    Runtime::connect(&node.socket).await.unwrap();
    assert!(
        namespaces().lines().any(|n| n == "k8s.io"),
        "{}",
        namespaces()
    );
    // A second agent (a restart) finds it there and is content.
    Runtime::connect(&node.socket).await.unwrap();
}

/// Pins and releases land in the order they were decided, however quickly
/// they follow one another (review M4: made side by side, a release decided
/// before a pin could land after it, and the reverse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_and_releases_land_in_the_order_decided() {
    let dir = Workdir::new("agent-pins-order");
    let support::NodeAndRegistry {
        upstream,
        image,
        node,
    } = support::NodeAndRegistry::start(&dir, "team/app", "1.0", &[MB]);
    let runtime = Runtime::connect(&node.socket).await.unwrap();
    runtime
        .pull(
            &image.reference,
            &image.reference,
            &node.hosts_dir,
            None,
            None,
            true,
        )
        .await
        .unwrap();
    let pinned = || async {
        let labels = runtime.labels(&image.reference).await.unwrap();
        (
            labels.contains_key("io.cri-containerd.pinned"),
            labels.contains_key("imageprefetch.io/pinned"),
        )
    };
    // A sandbox image of the test's own registry, pulled like the other.
    let pause = images::build_and_push(
        &dir.join("images"),
        &upstream.host,
        "k8s/pause",
        "3.10",
        &[MB],
    )
    .unwrap();
    runtime
        .pull(
            &pause.reference,
            &pause.reference,
            &node.hosts_dir,
            None,
            None,
            true,
        )
        .await
        .unwrap();
    let sandbox = agent::pins::SandboxImages::new([format!("{}/k8s/pause", upstream.host)]);
    let pins = agent::pins::Pins::start(runtime.clone(), sandbox);
    for (first, last, want) in [
        ("release", "pin", (true, true)),
        ("pin", "release", (false, false)),
    ] {
        for _ in 0..25 {
            for change in [first, last] {
                match change {
                    "pin" => pins.pin(image.reference.clone()),
                    _ => pins.release(image.reference.clone()),
                }
            }
        }
        pins.flushed().await;
        assert_eq!(
            pinned().await,
            want,
            "{first} then {last}: the last decision holds"
        );
    }
    // Released, a sandbox image keeps CRI's pin; only the agent's mark goes (review M10).
    pins.release(pause.reference.clone());
    pins.flushed().await;
    let labels = runtime.labels(&pause.reference).await.unwrap();
    assert_eq!(
        (
            labels.contains_key("io.cri-containerd.pinned"),
            labels.contains_key("imageprefetch.io/pinned"),
        ),
        (true, false)
    );
}
