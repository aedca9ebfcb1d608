//! The test bed's stand-in for spegel (the `peer-mirror` binary of
//! `testbed/peer-mirror`), one per simulated node: it serves the node's
//! containerd content to the node and to its peers, finds peers through a
//! shared directory, and never contacts a registry.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::support::process::{self, Lifetime, free_ports};
use crate::{Error, Result, io_err};

pub const BINARY: &str = "peer-mirror";

/// A node's spegel set-up: its chart values and timings. The defaults are
/// spegel v0.7.4's chart defaults on containerd 2.1 or newer.
#[derive(Clone, Debug)]
pub struct Settings {
    /// From containerd's commit to other nodes finding the blob (an
    /// estimate: spegel's provide is asynchronous and unbounded).
    pub advertise_delay: Duration,
    /// How long a lookup's answer, an empty one too, is reused (spegel: about 2.5 s).
    pub lookup_cache: Duration,
    /// `registryFilters`: regexes over `registry/repo[:tag]`.
    pub registry_filters: Vec<String>,
    /// `basicAuthSecretName`'s `user:password`: required by the mirror and
    /// written into the node's `hosts.toml`.
    pub basic_auth: Option<String>,
    /// `false` is spegel on containerd 2.0: no `/content/create` events, so
    /// what is pulled after the mirror started is not advertised.
    pub content_events: bool,
    /// The least a peer is given to send its headers; above it spegel's
    /// 2 × p90 rule applies. spegel's floor is 100 ms, for a peer that opens
    /// a file; this stand-in asks its containerd three times over gRPC, in a
    /// debug build, beside every other process of a test on two cores, and
    /// its first answers of a rollout took over 100 ms
    /// (`e2e/tests/headline.rs`: blobs then fetched upstream twice). The
    /// floor is scaled to the stand-in, not the rule.
    pub header_floor: Duration,
    /// The port every node's stand-in listens on, at the node's own
    /// address, as spegel's registry hostPort (30020) is the same on every
    /// node: what a named source is reached at. `None`: a free port each.
    pub port: Option<u16>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            advertise_delay: Duration::from_millis(500),
            lookup_cache: Duration::from_millis(2500),
            registry_filters: Vec::new(),
            basic_auth: None,
            content_events: true,
            header_floor: Duration::from_secs(1),
            port: None,
        }
    }
}

/// Where a peer mirror runs: its `ip:port`, how its process is started,
/// and how to tell it is live.
pub struct Placement<'a> {
    pub host: String,
    pub launch: &'a dyn Fn(&Path) -> Command,
    pub live: &'a dyn Fn(&str) -> bool,
}

pub struct PeerMirror {
    /// `ip:port` on its own loopback address.
    pub host: String,
    pub log: PathBuf,
    basic_auth: Option<String>,
    child: Child,
}

impl PeerMirror {
    /// Starts the node's mirror on `ip` (a 127.0.0.x of its own), serving
    /// `containerd_socket`'s content, advertising in `directory`.
    pub fn start(
        dir: &Path,
        node: &str,
        ip: &str,
        containerd_socket: &Path,
        directory: &Path,
        settings: &Settings,
    ) -> Result<Self> {
        let port = match settings.port {
            Some(port) => port,
            // A port free on 127.0.0.1 is free on every loopback address.
            None => free_ports::<1>()?[0],
        };
        let at = Placement {
            host: format!("{ip}:{port}"),
            launch: &|program: &Path| Command::new(program),
            live: &|host: &str| {
                process::http_get(host, "/livez").is_ok_and(|(code, _)| code == 200)
            },
        };
        Self::start_at(dir, node, &at, containerd_socket, directory, settings)
    }

    /// Starts the node's mirror listening on `at.host`, started by
    /// `at.launch` (in a node's namespaces), live when `at.live` says so.
    pub fn start_at(
        dir: &Path,
        node: &str,
        at: &Placement<'_>,
        containerd_socket: &Path,
        directory: &Path,
        settings: &Settings,
    ) -> Result<Self> {
        let bin = crate::beds::simulated::binary(BINARY);
        if !bin.exists() {
            return Err(Error::MissingFixture {
                what: "the peer mirror stand-in (cargo build --workspace)",
                path: bin.display().to_string(),
            });
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let host = at.host.clone();
        let log = dir.join(format!("{node}-peer-mirror.log"));
        let mut cmd = (at.launch)(&bin);
        cmd.args(["registry", "--addr", &host, "--node", node])
            .arg("--containerd-sock")
            .arg(containerd_socket)
            .arg("--directory")
            .arg(directory)
            .args([
                "--advertise-delay-ms",
                &settings.advertise_delay.as_millis().to_string(),
                "--lookup-cache-ms",
                &settings.lookup_cache.as_millis().to_string(),
                "--content-events",
                &settings.content_events.to_string(),
                "--peer-header-timeout-ms",
                &settings.header_floor.as_millis().to_string(),
            ]);
        for filter in &settings.registry_filters {
            cmd.args(["--registry-filters", filter]);
        }
        if let Some(auth) = &settings.basic_auth {
            cmd.args(["--basic-auth", auth]);
        }
        let mut child = process::spawn(cmd, &log, Lifetime::Owned)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(at.live)(&host) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Exited {
                    what: "peer-mirror",
                    status: status.to_string(),
                    log: log.display().to_string(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    what: "peer-mirror",
                    secs: 20,
                    log: log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(PeerMirror {
            host,
            log,
            basic_auth: settings.basic_auth.clone(),
            child,
        })
    }

    /// Writes the node's `hosts.toml` as spegel's chart does, with this
    /// mirror as the one target: for `registries` (`http://host:port`) when
    /// listed, else `_default`. The test bed lists its plain-HTTP loopback
    /// registry, so that the file names it as `server` with its scheme.
    /// With Basic auth set, each target carries spegel's header.
    pub fn configure_node(&self, hosts_dir: &Path, registries: &[&str]) -> Result<()> {
        self.configure_node_with(hosts_dir, registries, &[], false)
    }

    /// As `configure_node`, with `additionalMirrorTargets` after this mirror
    /// and `prependExisting` (the node's own host tables kept after spegel's).
    pub fn configure_node_with(
        &self,
        hosts_dir: &Path,
        registries: &[&str],
        additional_targets: &[&str],
        prepend_existing: bool,
    ) -> Result<()> {
        let mut targets = vec![format!("http://{}", self.host)];
        targets.extend(additional_targets.iter().map(|t| t.to_string()));
        let mut cmd = Command::new(crate::beds::simulated::binary(BINARY));
        cmd.args(["configuration", "--containerd-registry-config-path"])
            .arg(hosts_dir)
            .args(["--mirror-targets", &targets.join(",")])
            .args(["--prepend-existing", &prepend_existing.to_string()]);
        if !registries.is_empty() {
            cmd.args(["--mirrored-registries", &registries.join(",")]);
        }
        if let Some(auth) = &self.basic_auth {
            cmd.args(["--basic-auth", auth]);
        }
        let (ok, out) = process::run(&mut cmd);
        if ok {
            Ok(())
        } else {
            Err(Error::Build {
                what: "the node's hosts.toml",
                detail: out,
            })
        }
    }

    /// One of its own counters (`peer_mirror_*_total`).
    pub fn counter(&self, name: &str) -> u64 {
        process::metric_sum(&self.host, &format!("{name} ")).unwrap_or(0.0) as u64
    }

    pub fn stop(&mut self) {
        process::stop(&mut self.child);
    }
}

impl Drop for PeerMirror {
    fn drop(&mut self) {
        self.stop();
    }
}
