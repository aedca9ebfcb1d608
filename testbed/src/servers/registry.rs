//! A real OCI registry (Debian's `docker-registry`) on 127.0.0.1, with an
//! access log the tests read to count what was fetched from it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::builds::fixtures::require_tool;
use crate::support::process::{self, Lifetime, free_ports};
use crate::{Error, Result, io_err};

pub struct Registry {
    /// `127.0.0.1:<port>`
    pub host: String,
    pub log: PathBuf,
    command: (PathBuf, PathBuf),
    child: Option<Child>,
}

impl Registry {
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_with(dir, None, None)
    }

    /// A registry that only serves (and accepts) `user` with `password`.
    pub fn start_with_login(dir: &Path, user: &str, password: &str) -> Result<Self> {
        Self::start_with(dir, Some((user, password)), None)
    }

    /// A pull-through cache of `upstream` (a URL): it fetches from there what
    /// it does not hold yet, then serves it itself.
    pub fn start_mirror_of(dir: &Path, upstream: &str) -> Result<Self> {
        Self::start_with(dir, None, Some(upstream))
    }

    fn start_with(dir: &Path, login: Option<(&str, &str)>, proxy: Option<&str>) -> Result<Self> {
        let bin = require_tool("docker-registry")?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let [port] = free_ports()?;
        let host = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
            dir.join("data").display()
        );
        if let Some(remote) = proxy {
            yaml.push_str(&format!("proxy:\n  remoteurl: {remote}\n"));
        }
        if let Some((user, password)) = login {
            let htpasswd = dir.join("htpasswd");
            let out = Command::new(require_tool("htpasswd")?)
                .args(["-Bbn", user, password])
                .output()
                .map_err(io_err(&htpasswd))?;
            std::fs::write(&htpasswd, &out.stdout).map_err(io_err(&htpasswd))?;
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: image-prefetch-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, yaml).map_err(io_err(&config))?;
        let mut registry = Registry {
            host,
            log: dir.join("registry.log"),
            command: (bin, config),
            child: None,
        };
        registry.restart()?;
        Ok(registry)
    }

    /// Stops serving (the port refuses connections) until [`Registry::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            process::stop(&mut child);
        }
    }

    /// Serves again on the same address, with the same content.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let mut cmd = Command::new(&self.command.0);
        cmd.arg("serve").arg(&self.command.1);
        self.child = Some(process::spawn(cmd, &self.log, Lifetime::Owned)?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(Error::Exited {
                    what: "docker-registry",
                    status: status.to_string(),
                    log: self.log.display().to_string(),
                });
            }
            // 401 is ready too: a registry with a login answers that to anonymous clients.
            if get_status(&self.host, "/v2/").is_ok_and(|code| code == 200 || code == 401) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    what: "docker-registry",
                    secs: 20,
                    log: self.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Request lines (`GET /v2/...`, `HEAD /v2/...`) the registry has served so far.
    pub fn requests(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                // Access log: `... "GET /v2/app/blobs/sha256:... HTTP/1.1" 200 ...`
                let start = l.find('"')? + 1;
                let rest = &l[start..];
                let line = &rest[..rest.find('"')?];
                (line.starts_with("GET ") || line.starts_with("HEAD "))
                    .then(|| line.trim_end_matches(" HTTP/1.1").to_string())
            })
            .collect()
    }

    /// Requests whose client (user agent) contains `agent`, e.g. `containerd/`.
    pub fn requests_from(&self, agent: &str) -> usize {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let quoted = format!("\"{agent}");
        log.lines()
            .filter(|l| l.contains("\" 20") || l.contains("\" 30") || l.contains("\" 40"))
            .filter(|l| l.contains(&quoted))
            .count()
    }

    /// Bytes of blob bodies the registry sent (GET answers, from the size
    /// field of its access log), over all repositories.
    pub fn blob_bytes_served(&self) -> u64 {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .filter_map(|l| {
                // `... "GET /v2/app/blobs/sha256:... HTTP/1.1" 200 1234 "..." "..."`
                let (request, rest) = l.split_once("\" ")?;
                if !request.contains("\"GET /v2/") || !request.contains("/blobs/") {
                    return None;
                }
                let mut fields = rest.split_whitespace();
                let status = fields.next()?;
                let size: u64 = fields.next()?.parse().ok()?;
                status.starts_with('2').then_some(size)
            })
            .sum()
    }

    /// How many times each blob of `repository` was fetched (GET, not HEAD).
    pub fn blob_gets(&self, repository: &str) -> std::collections::BTreeMap<String, usize> {
        let prefix = format!("GET /v2/{repository}/blobs/");
        let mut counts = std::collections::BTreeMap::new();
        for r in self.requests() {
            if let Some(digest) = r.strip_prefix(&prefix) {
                *counts.entry(digest.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// How many times each of `blobs` of `repository` was fetched (0 when
    /// never): the count a test asserts "once per cluster" on.
    pub fn gets_of(
        &self,
        repository: &str,
        blobs: &[String],
    ) -> std::collections::BTreeMap<String, usize> {
        let served = self.blob_gets(repository);
        blobs
            .iter()
            .map(|b| (b.clone(), served.get(b).copied().unwrap_or(0)))
            .collect()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A "registry" that accepts connections and never answers, for timeouts.
pub struct HungRegistry {
    pub host: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HungRegistry {
    pub fn start() -> Result<Self> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err(Path::new("127.0.0.1:0")))?;
        let host = listener
            .local_addr()
            .map_err(io_err(Path::new("127.0.0.1:0")))?
            .to_string();
        listener
            .set_nonblocking(true)
            .map_err(io_err(Path::new("127.0.0.1:0")))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => held.push(conn),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(HungRegistry { host, stop })
    }
}

impl Drop for HungRegistry {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Status code of a plain HTTP GET to `host` (loopback only).
fn get_status(host: &str, path: &str) -> std::io::Result<u16> {
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    text.get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text}")))
}

/// A pull secret (`kubernetes.io/dockerconfigjson`) named `name` that logs
/// in to `registry` (`host:port`) as `user` with `password`.
pub fn pull_secret(
    name: &str,
    registry: &str,
    user: &str,
    password: &str,
) -> k8s_openapi::api::core::v1::Secret {
    let config = serde_json::json!({"auths": {registry: {"username": user, "password": password}}});
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(
            [(
                ".dockerconfigjson".to_string(),
                k8s_openapi::ByteString(config.to_string().into_bytes()),
            )]
            .into(),
        ),
        ..Default::default()
    }
}
