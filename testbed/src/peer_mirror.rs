//! The test bed's stand-in for spegel (the `peer-mirror` binary of
//! `testbed/peer-mirror`), one per simulated node: it serves the node's
//! containerd content to the node and to its peers, finds peers through a
//! shared directory, and never contacts a registry.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::process::{self, Lifetime, free_ports};
use crate::{Error, Result, io_err};

pub const BINARY: &str = "peer-mirror";

/// spegel's timings, settable so that tests can exercise them.
#[derive(Clone, Debug)]
pub struct Timing {
    /// From containerd's commit to other nodes finding the blob.
    pub advertise_delay: Duration,
    /// How long a lookup's answer, an empty one too, is reused (spegel: about 2.5 s).
    pub lookup_cache: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            advertise_delay: Duration::ZERO,
            lookup_cache: Duration::from_millis(2500),
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
        timing: &Timing,
    ) -> Result<Self> {
        // A port free on 127.0.0.1 is free on every loopback address.
        let [port] = free_ports()?;
        let at = Placement {
            host: format!("{ip}:{port}"),
            launch: &|program: &Path| Command::new(program),
            live: &|host: &str| {
                process::http_get(host, "/livez").is_ok_and(|(code, _)| code == 200)
            },
        };
        Self::start_at(dir, node, &at, containerd_socket, directory, timing)
    }

    /// Starts the node's mirror listening on `at.host`, started by
    /// `at.launch` (in a node's namespaces), live when `at.live` says so.
    pub fn start_at(
        dir: &Path,
        node: &str,
        at: &Placement<'_>,
        containerd_socket: &Path,
        directory: &Path,
        timing: &Timing,
    ) -> Result<Self> {
        let bin = crate::simulated::binary(BINARY);
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
                &timing.advertise_delay.as_millis().to_string(),
                "--lookup-cache-ms",
                &timing.lookup_cache.as_millis().to_string(),
            ]);
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
        Ok(PeerMirror { host, log, child })
    }

    /// Writes the node's `hosts.toml` as spegel's chart does, with this
    /// mirror as the one target: for `registries` (`http://host:port`) when
    /// listed, else `_default`. The test bed lists its plain-HTTP loopback
    /// registry, so that the file names it as `server` with its scheme.
    pub fn configure_node(&self, hosts_dir: &Path, registries: &[&str]) -> Result<()> {
        let mut cmd = Command::new(crate::simulated::binary(BINARY));
        cmd.args(["configuration", "--containerd-registry-config-path"])
            .arg(hosts_dir)
            .args(["--mirror-targets", &format!("http://{}", self.host)]);
        if !registries.is_empty() {
            cmd.args(["--mirrored-registries", &registries.join(",")]);
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
