//! Registry host configuration for the two policies.
//!
//! `Default` pulls use the node's own configuration directory (where spegel
//! lists itself as a mirror of each registry, with the registry as `server`),
//! found as containerd finds it (`host_port_`, `host:port`, `_default`).
//! `Mirror` pulls use a directory the agent owns, written from the node's:
//! the hosts that are the in-cluster mirror ([`MirrorEndpoints`]: spegel's
//! targets by default), each table copied with every setting (headers for
//! spegel's Basic auth, `ca`/`client`/`skip_verify`, `dial_timeout`,
//! `override_path`) and only its capabilities changed, in the file's order;
//! any other host left out, since it may reach the internet; and the
//! upstream — identified by the `server` entry, never by comparing host names
//! (Docker Hub's `docker.io` is served by `registry-1.docker.io`) — kept only
//! with the `push` capability, so containerd's resolver can neither resolve
//! nor fetch from it.
//! `Default` pulls of a tag use another such directory: the mirrors keep only
//! `pull` (content by digest) and the upstream alone resolves the tag, since
//! a mirror (spegel) answers a tag with whatever digest some node stored
//! under it, however old (spegel's own `resolveTags: false`, per pull).

use std::path::{Path, PathBuf};

use toml::{Table, Value};

#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error(
        "no in-cluster mirror is configured for registry {registry} in {dir} (hosts taken for one: {endpoints}): Mirror pulls need the in-cluster mirror (spegel) set up on this node, or the agent's mirror endpoints set to the hosts it uses"
    )]
    NoMirror {
        registry: String,
        dir: String,
        endpoints: String,
    },
    #[error("cannot read {path}: {message}")]
    Unreadable { path: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Which of a node's configured hosts are the in-cluster mirror. Any other
/// host (a pull-through cache, a public mirror an administrator listed, an
/// alias of the registry) may reach the internet, so Mirror pulls leave it
/// out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorEndpoints(Vec<String>);

impl MirrorEndpoints {
    /// Each entry is a host as `hosts.toml` names it (`http://10.0.0.5:30020`,
    /// scheme optional) or `:PORT`, any host at that port.
    pub fn new(entries: impl IntoIterator<Item = String>) -> Self {
        MirrorEndpoints(entries.into_iter().filter(|e| !e.is_empty()).collect())
    }

    /// Whether `host` (a `[host."…"]` key) is the in-cluster mirror.
    pub fn contains(&self, host: &str) -> bool {
        let address = host_of(host);
        self.0.iter().any(|e| match e.strip_prefix(':') {
            Some(port) => address.rsplit_once(':').is_some_and(|(_, p)| p == port),
            None => host_of(e) == address,
        })
    }
}

impl Default for MirrorEndpoints {
    /// spegel's targets as its chart writes them: the node's address at the
    /// registry hostPort (30020) and at the NodePort (30021).
    fn default() -> Self {
        MirrorEndpoints::new([":30020".to_string(), ":30021".to_string()])
    }
}

impl MirrorEndpoints {
    /// The port a peer's mirror listens on at the peer's address: that of
    /// the first endpoint (spegel's registry hostPort, 30020, by default).
    pub fn peer_port(&self) -> Option<&str> {
        self.0.first().and_then(|e| port_of(e))
    }
}

/// The port of a host as `hosts.toml` names it (`http://10.0.0.5:30020`,
/// `[fd00::5]:30020`, `:30020`).
fn port_of(host: &str) -> Option<&str> {
    let (_, port) = host_of(host).rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(port)
}

impl std::fmt::Display for MirrorEndpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// A node's configuration for one registry, as containerd reads it: the
/// upstream's settings and the `[host."…"]` tables in the file's order
/// (containerd tries them in that order), every key kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeHosts {
    pub server: String,
    /// The file's keys besides `server` and `host`: the upstream's own settings.
    pub upstream: Table,
    pub hosts: Vec<(String, Table)>,
}

impl NodeHosts {
    /// The mirrors among the hosts: those `endpoints` names, in file order.
    pub fn mirrors<'a>(
        &'a self,
        endpoints: &'a MirrorEndpoints,
    ) -> impl Iterator<Item = &'a (String, Table)> {
        let upstream = host_of(&self.server).to_string();
        self.hosts
            .iter()
            // A configuration may list the upstream as a host as well; it is never a mirror.
            .filter(move |(h, _)| host_of(h) != upstream && endpoints.contains(h))
    }
}

/// The server containerd uses for a registry with no `server` entry.
fn default_server(registry: &str) -> String {
    if registry == crd::reference::DOCKER_HUB {
        "https://registry-1.docker.io".into()
    } else {
        format!("https://{registry}")
    }
}

fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split('/').next().unwrap_or(rest)
}

/// The directories containerd looks in for `registry` (`host[:port]`), in
/// its order: `host_port_` (containerd's form for a port), `host:port`,
/// then `_default`. The first that exists is the one it uses.
fn candidate_dirs(node_dir: &Path, registry: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some((host, port)) = registry.rsplit_once(':').filter(|(h, _)| !h.is_empty()) {
        dirs.push(node_dir.join(format!("{host}_{port}_")));
    }
    dirs.push(node_dir.join(registry));
    dirs.push(node_dir.join("_default"));
    dirs
}

/// Relative `ca` and `client` paths are relative to the file's directory
/// for containerd; made absolute, a table means the same wherever it is
/// written.
fn absolute_paths(table: &mut Table, base: &Path) {
    fn fix(value: &mut Value, base: &Path) {
        match value {
            Value::String(s) if !Path::new(s.as_str()).is_absolute() => {
                *s = base.join(s.as_str()).display().to_string();
            }
            Value::Array(items) => items.iter_mut().for_each(|v| fix(v, base)),
            _ => {}
        }
    }
    for key in ["ca", "client"] {
        if let Some(v) = table.get_mut(key) {
            fix(v, base);
        }
    }
}

/// Reads the node's configuration for `registry` from the directory
/// containerd would use (a directory without `hosts.toml` means containerd's
/// defaults, as for containerd).
pub fn read(node_dir: &Path, registry: &str) -> Result<NodeHosts, HostsError> {
    let defaults = NodeHosts {
        server: default_server(registry),
        ..Default::default()
    };
    let Some(dir) = candidate_dirs(node_dir, registry)
        .into_iter()
        .find(|d| d.is_dir())
    else {
        return Ok(defaults);
    };
    let path = dir.join("hosts.toml");
    if !path.is_file() {
        return Ok(defaults);
    }
    let unreadable = |message: String| HostsError::Unreadable {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| unreadable(e.to_string()))?;
    let mut file: Table = toml::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
    let server = match file.remove("server") {
        Some(Value::String(s)) => s,
        Some(other) => return Err(unreadable(format!("server is not a string: {other}"))),
        None => default_server(registry),
    };
    let hosts = match file.remove("host") {
        Some(Value::Table(hosts)) => hosts
            .into_iter()
            .map(|(name, value)| match value {
                Value::Table(mut t) => {
                    absolute_paths(&mut t, &dir);
                    Ok((name, t))
                }
                other => Err(unreadable(format!("host {name} is not a table: {other}"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(unreadable(format!("host is not a table: {other}"))),
        None => Vec::new(),
    };
    absolute_paths(&mut file, &dir);
    Ok(NodeHosts {
        server,
        upstream: file,
        hosts,
    })
}

fn capabilities(names: &[&str]) -> Value {
    Value::Array(names.iter().map(|n| Value::from(*n)).collect())
}

/// `hosts.toml` text: the `comment`, `server` with `upstream`'s settings,
/// then `hosts` in order.
fn render(comment: &str, server: &str, upstream: Table, hosts: Vec<(String, Table)>) -> String {
    let mut file = Table::new();
    file.insert("server".into(), Value::from(server));
    file.extend(upstream);
    if !hosts.is_empty() {
        file.insert(
            "host".into(),
            Value::Table(
                hosts
                    .into_iter()
                    .map(|(h, t)| (h, Value::Table(t)))
                    .collect(),
            ),
        );
    }
    format!(
        "# {comment}\n{}",
        toml::to_string(&file).expect("a TOML table renders")
    )
}

/// The header spegel puts on its requests to peers: a peer serves what it
/// holds and answers 404 for anything else, never asking further itself.
pub const PEER_REQUEST_HEADER: (&str, &str) = ("X-Spegel-Mirrored", "true");

/// The host table for a named peer at `address`: the node's in-cluster
/// mirror at the peer port (its scheme, headers, TLS settings — the peer's
/// mirror is configured as this node's), at the peer's address, with the
/// peer request header. `None` when no mirror of the node is at that port.
pub fn named_peer(
    hosts: &NodeHosts,
    endpoints: &MirrorEndpoints,
    address: std::net::IpAddr,
) -> Option<(String, Table)> {
    let port = endpoints.peer_port()?;
    let (h, t) = hosts
        .mirrors(endpoints)
        .find(|(h, _)| port_of(h) == Some(port))?;
    let scheme = h.split_once("://").map(|(s, _)| format!("{s}://"));
    let host = match address {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    };
    let mut t = t.clone();
    t.insert("capabilities".into(), capabilities(&["pull", "resolve"]));
    let header = t
        .entry("header")
        .or_insert_with(|| Value::Table(Table::new()));
    if let Value::Table(header) = header {
        header.insert(
            PEER_REQUEST_HEADER.0.into(),
            Value::from(PEER_REQUEST_HEADER.1),
        );
    }
    Some((format!("{}{host}", scheme.unwrap_or_default()), t))
}

/// The hosts.toml for a Mirror pull: the named peer first when there is
/// one, then the in-cluster mirrors, each with its own settings (headers,
/// TLS, dial timeout) and `pull` and `resolve`; the upstream push-only;
/// every other host left out.
pub fn mirror_only_toml(
    hosts: &NodeHosts,
    endpoints: &MirrorEndpoints,
    peer: Option<(String, Table)>,
) -> String {
    let mut upstream = hosts.upstream.clone();
    upstream.insert("capabilities".into(), capabilities(&["push"]));
    let mirrors = peer
        .into_iter()
        .chain(hosts.mirrors(endpoints).map(|(h, t)| {
            let mut t = t.clone();
            t.insert("capabilities".into(), capabilities(&["pull", "resolve"]));
            (h.clone(), t)
        }))
        .collect();
    render(
        "Written by image-prefetch-agent: pulls with policy Mirror must not reach the upstream.",
        &hosts.server,
        upstream,
        mirrors,
    )
}

/// The hosts.toml for a Default pull of a tag: the upstream resolves the
/// tag (with its own settings); the in-cluster mirrors may serve content by
/// digest; other hosts keep their settings with `pull` only, as a fallback
/// for content the way the node's own file has them.
pub fn upstream_resolves_toml(hosts: &NodeHosts) -> String {
    let upstream_host = host_of(&hosts.server).to_string();
    let others = hosts
        .hosts
        .iter()
        .filter(|(h, _)| host_of(h) != upstream_host)
        .map(|(h, t)| {
            let mut t = t.clone();
            t.insert("capabilities".into(), capabilities(&["pull"]));
            (h.clone(), t)
        })
        .collect();
    render(
        "Written by image-prefetch-agent: a tag is resolved at its registry, never by a mirror.",
        &hosts.server,
        hosts.upstream.clone(),
        others,
    )
}

/// Where, under the agent's directory, the configurations for Default pulls
/// of tags go. `_` cannot start a host name, so no registry's directory is
/// ever taken for it (containerd's own `_default` uses the same rule).
const UPSTREAM_RESOLVES: &str = "_upstream-resolves";

/// Writes the configuration for a Default pull of a tag of `registry` under
/// `own_dir` and returns the directory to pass as `host_dir`.
pub fn prepare_upstream_resolves(
    node_dir: &Path,
    own_dir: &Path,
    registry: &str,
) -> Result<PathBuf, HostsError> {
    let hosts = read(node_dir, registry)?;
    let dir = own_dir.join(UPSTREAM_RESOLVES);
    write_atomically(&dir, registry, &upstream_resolves_toml(&hosts))?;
    Ok(dir)
}

/// Where, under the agent's directory, the configurations for Mirror pulls
/// from a named peer go: one directory per peer address.
const VIA_PEER: &str = "_via-peer";

/// Writes the Mirror configuration for `registry` under `mirror_dir` and
/// returns the directory to pass as `host_dir`. With a named peer (`from`),
/// that peer's mirror comes first, in a directory of its own.
pub fn prepare_mirror(
    node_dir: &Path,
    mirror_dir: &Path,
    registry: &str,
    endpoints: &MirrorEndpoints,
    from: Option<std::net::IpAddr>,
) -> Result<PathBuf, HostsError> {
    let hosts = read(node_dir, registry)?;
    if hosts.mirrors(endpoints).next().is_none() {
        return Err(HostsError::NoMirror {
            registry: registry.to_string(),
            dir: node_dir.display().to_string(),
            endpoints: endpoints.to_string(),
        });
    }
    let peer = from.and_then(|a| named_peer(&hosts, endpoints, a).map(|p| (a, p)));
    let dir = match &peer {
        // `:` of an IPv6 address is kept out of the directory's name.
        Some((a, _)) => mirror_dir
            .join(VIA_PEER)
            .join(a.to_string().replace(':', "_")),
        None => mirror_dir.to_path_buf(),
    };
    let text = mirror_only_toml(&hosts, endpoints, peer.map(|(_, p)| p));
    write_atomically(&dir, registry, &text)?;
    Ok(dir)
}

/// Writes `<base>/<registry>/hosts.toml`.
fn write_atomically(base: &Path, registry: &str, text: &str) -> Result<(), HostsError> {
    let dir = base.join(registry);
    let write_err = |source| HostsError::Write {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(write_err)?;
    let path = dir.join("hosts.toml");
    // Written aside and renamed: a concurrent pull never reads half a file.
    // Each writer has a file of its own, so two concurrent Mirror pulls of
    // one registry never write, or rename away, each other's.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".hosts.toml.{}.{n}", std::process::id()));
    std::fs::write(&tmp, text).map_err(write_err)?;
    std::fs::rename(&tmp, &path).map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(registry: &str, toml: &str) -> tempdir::Dir {
        let d = tempdir::Dir::new();
        let r = d.path().join(registry);
        std::fs::create_dir_all(&r).unwrap();
        std::fs::write(r.join("hosts.toml"), toml).unwrap();
        d
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p =
                    std::env::temp_dir().join(format!("agent-hosts-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&p);
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn spegel() -> MirrorEndpoints {
        MirrorEndpoints::default()
    }

    #[test]
    fn docker_hub_upstream_is_known_by_server_not_name() {
        // spegel's configuration for Docker Hub: the directory is docker.io,
        // the server registry-1.docker.io, which some setups also list as a host.
        let d = dir_with(
            "docker.io",
            "server = \"https://registry-1.docker.io\"\n\n[host.\"http://10.0.0.5:30020\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n[host.\"https://registry-1.docker.io\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        );
        let hosts = read(d.path(), "docker.io").unwrap();
        assert_eq!(hosts.server, "https://registry-1.docker.io");
        let endpoints = spegel();
        let mirrors: Vec<&str> = hosts.mirrors(&endpoints).map(|(h, _)| h.as_str()).collect();
        assert_eq!(mirrors, ["http://10.0.0.5:30020"]);
        let parsed: Table = toml::from_str(&mirror_only_toml(&hosts, &spegel(), None)).unwrap();
        assert_eq!(parsed["capabilities"], capabilities(&["push"]));
        assert_eq!(parsed["host"].as_table().unwrap().len(), 1);
    }

    /// spegel's chart with Basic auth and both targets, as its init
    /// container writes them: every setting of each target is kept, in
    /// order; only the capabilities change.
    #[test]
    fn mirror_tables_are_copied_with_every_setting_in_order() {
        let d = dir_with(
            "_default",
            "[host.'http://10.0.0.5:30021']\ncapabilities = ['pull']\ndial_timeout = '200ms'\n[host.'http://10.0.0.5:30021'.header]\nAuthorization = 'Basic c3BlZ2VsOnNlY3JldA=='\n\n\
             [host.'http://10.0.0.5:30020']\ncapabilities = ['pull']\ndial_timeout = '200ms'\nskip_verify = true\noverride_path = true\nca = 'ca.crt'\nclient = [['client.crt', 'client.key']]\n",
        );
        let hosts = read(d.path(), "registry.example.com:5000").unwrap();
        assert_eq!(hosts.server, "https://registry.example.com:5000");
        let parsed: Table = toml::from_str(&mirror_only_toml(&hosts, &spegel(), None)).unwrap();
        let written: Vec<(&String, &Value)> = parsed["host"].as_table().unwrap().iter().collect();
        assert_eq!(
            written[0].0, "http://10.0.0.5:30021",
            "the file's order, not sorted"
        );
        let first = written[0].1.as_table().unwrap();
        assert_eq!(first["dial_timeout"].as_str(), Some("200ms"));
        assert_eq!(
            first["header"]["Authorization"].as_str(),
            Some("Basic c3BlZ2VsOnNlY3JldA==")
        );
        assert_eq!(first["capabilities"], capabilities(&["pull", "resolve"]));
        let second = written[1].1.as_table().unwrap();
        assert_eq!(second["skip_verify"].as_bool(), Some(true));
        assert_eq!(second["override_path"].as_bool(), Some(true));
        let base = d.path().join("_default");
        assert_eq!(
            second["ca"].as_str().map(PathBuf::from),
            Some(base.join("ca.crt")),
            "relative to the node's directory, as containerd reads it"
        );
        assert_eq!(
            second["client"][0][1].as_str().map(PathBuf::from),
            Some(base.join("client.key"))
        );
    }

    /// A named peer comes first: the node's mirror at spegel's hostPort, at
    /// the peer's address, with its settings and the peer request header;
    /// the node's own mirrors follow, for when the peer does not answer.
    #[test]
    fn a_named_peer_is_asked_first_as_spegel_asks_its_peers() {
        let d = dir_with(
            "_default",
            "[host.'http://10.0.0.5:30021']\ncapabilities = ['pull']\n\n\
             [host.'http://10.0.0.5:30020']\ncapabilities = ['pull']\ndial_timeout = '200ms'\n[host.'http://10.0.0.5:30020'.header]\nAuthorization = 'Basic c3BlZ2VsOnNlY3JldA=='\n",
        );
        let out = tempdir::Dir::new();
        let peer: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        let dir = prepare_mirror(
            d.path(),
            out.path(),
            "registry.example.com",
            &spegel(),
            Some(peer),
        )
        .unwrap();
        assert_ne!(
            dir,
            out.path(),
            "a directory per peer: pulls from others are unaffected"
        );
        let text = std::fs::read_to_string(dir.join("registry.example.com/hosts.toml")).unwrap();
        let parsed: Table = toml::from_str(&text).unwrap();
        let written: Vec<(&String, &Value)> = parsed["host"].as_table().unwrap().iter().collect();
        let names: Vec<&str> = written.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(
            names,
            [
                "http://10.0.0.9:30020",
                "http://10.0.0.5:30021",
                "http://10.0.0.5:30020"
            ]
        );
        let first = written[0].1.as_table().unwrap();
        assert_eq!(first["dial_timeout"].as_str(), Some("200ms"));
        assert_eq!(
            first["header"]["Authorization"].as_str(),
            Some("Basic c3BlZ2VsOnNlY3JldA==")
        );
        assert_eq!(first["header"]["X-Spegel-Mirrored"].as_str(), Some("true"));
        assert_eq!(first["capabilities"], capabilities(&["pull", "resolve"]));
        // The upstream stays unreachable for pulls.
        assert_eq!(parsed["capabilities"], capabilities(&["push"]));
        // IPv6, and no mirror at the peer port: no peer is named.
        let v6: std::net::IpAddr = "fd00::9".parse().unwrap();
        let hosts = read(d.path(), "registry.example.com").unwrap();
        assert_eq!(
            named_peer(&hosts, &spegel(), v6).unwrap().0,
            "http://[fd00::9]:30020"
        );
        let elsewhere = MirrorEndpoints::new([":5000".to_string(), ":30021".to_string()]);
        assert!(named_peer(&hosts, &elsewhere, peer).is_none());
    }

    /// `prependExisting`, `additionalMirrorTargets` or an administrator's
    /// own pull-through cache: hosts that are not the in-cluster mirror are
    /// never used by a Mirror pull (they may reach the internet).
    #[test]
    fn only_the_in_cluster_mirror_serves_mirror_pulls() {
        let d = dir_with(
            "registry.example.com",
            "server = 'https://registry.example.com'\n\
             [host.'http://10.0.0.5:30020']\ncapabilities = ['pull', 'resolve']\n\
             [host.'https://cache.corp.example:8443']\ncapabilities = ['pull', 'resolve']\n\
             [host.'https://mirror.gcr.io']\ncapabilities = ['pull']\n",
        );
        let hosts = read(d.path(), "registry.example.com").unwrap();
        let parsed: Table = toml::from_str(&mirror_only_toml(&hosts, &spegel(), None)).unwrap();
        let kept: Vec<&String> = parsed["host"].as_table().unwrap().keys().collect();
        assert_eq!(kept, ["http://10.0.0.5:30020"]);
        // An administrator who names their mirror endpoints gets exactly those.
        let mine = MirrorEndpoints::new(["https://cache.corp.example:8443".to_string()]);
        let parsed: Table = toml::from_str(&mirror_only_toml(&hosts, &mine, None)).unwrap();
        let kept: Vec<&String> = parsed["host"].as_table().unwrap().keys().collect();
        assert_eq!(kept, ["https://cache.corp.example:8443"]);
        // No in-cluster mirror at all: a Mirror pull fails closed, saying so.
        let out = tempdir::Dir::new();
        let none = MirrorEndpoints::new([":6443".to_string()]);
        let err =
            prepare_mirror(d.path(), out.path(), "registry.example.com", &none, None).unwrap_err();
        assert!(err.to_string().contains(":6443"), "{err}");
    }

    /// containerd takes the first directory that exists: `host_port_`, then
    /// `host:port`, then `_default`; a directory without hosts.toml means
    /// containerd's defaults.
    #[test]
    fn the_directory_is_found_as_containerd_finds_it() {
        let d = dir_with(
            "registry.example.com_5000_",
            "[host.'http://10.0.0.5:30020']\n",
        );
        std::fs::create_dir_all(d.path().join("registry.example.com:5000")).unwrap();
        std::fs::write(
            d.path().join("registry.example.com:5000/hosts.toml"),
            "[host.'http://10.0.0.9:30020']\n",
        )
        .unwrap();
        let hosts = read(d.path(), "registry.example.com:5000").unwrap();
        assert_eq!(hosts.hosts[0].0, "http://10.0.0.5:30020");
        std::fs::create_dir_all(d.path().join("other.example")).unwrap();
        std::fs::create_dir_all(d.path().join("_default")).unwrap();
        std::fs::write(
            d.path().join("_default/hosts.toml"),
            "[host.'http://10.0.0.5:30020']\n",
        )
        .unwrap();
        let hosts = read(d.path(), "other.example").unwrap();
        assert!(
            hosts.hosts.is_empty(),
            "an existing directory wins over _default"
        );
    }

    #[test]
    fn a_tag_is_resolved_upstream_and_mirrors_serve_only_content() {
        let node = dir_with(
            "registry.example.com",
            "server = \"https://registry.example.com\"\n[host.\"http://127.0.0.1:30020\"]\ndial_timeout = '200ms'\n",
        );
        let hosts = read(node.path(), "registry.example.com").unwrap();
        let parsed: Table = toml::from_str(&upstream_resolves_toml(&hosts)).unwrap();
        // The upstream keeps containerd's default capabilities (resolve among them).
        assert_eq!(
            parsed["server"].as_str(),
            Some("https://registry.example.com")
        );
        assert!(parsed.get("capabilities").is_none());
        let mirror = &parsed["host"]["http://127.0.0.1:30020"];
        assert_eq!(mirror["capabilities"], capabilities(&["pull"]));
        assert_eq!(mirror["dial_timeout"].as_str(), Some("200ms"));
        // Written next to, never over, the Mirror configurations.
        let own = tempdir::Dir::new();
        let dir =
            prepare_upstream_resolves(node.path(), own.path(), "registry.example.com").unwrap();
        assert_ne!(dir, own.path());
        let written = std::fs::read_to_string(dir.join("registry.example.com/hosts.toml")).unwrap();
        assert_eq!(written, upstream_resolves_toml(&hosts));
    }

    #[test]
    fn no_mirror_is_an_error_that_says_what_to_do() {
        let d = dir_with(
            "registry.example.com",
            "server = \"https://registry.example.com\"\n",
        );
        let out = tempdir::Dir::new();
        let err = prepare_mirror(
            d.path(),
            out.path(),
            "registry.example.com",
            &spegel(),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("spegel"), "{err}");
    }

    #[test]
    fn default_directory_applies_to_every_registry() {
        let d = dir_with("_default", "[host.\"http://10.0.0.5:30020\"]\n");
        let hosts = read(d.path(), "ghcr.io").unwrap();
        assert_eq!(hosts.server, "https://ghcr.io");
        assert_eq!(hosts.mirrors(&spegel()).count(), 1);
    }

    #[test]
    fn concurrent_mirror_preparations_never_trip_over_each_other() {
        let d = dir_with(
            "registry.example.com",
            "server = 'https://registry.example.com'\n\n[host.'http://127.0.0.1:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'",
        );
        let out = tempdir::Dir::new();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        prepare_mirror(
                            d.path(),
                            out.path(),
                            "registry.example.com",
                            &spegel(),
                            None,
                        )
                        .expect("no writer renames another's file away");
                    }
                });
            }
        });
        let left: Vec<_> = std::fs::read_dir(out.path().join("registry.example.com"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["hosts.toml"], "no temporary file is left behind");
    }
}
