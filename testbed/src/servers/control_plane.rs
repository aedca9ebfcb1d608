//! etcd + kube-apiserver on 127.0.0.1, started as real processes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::builds::fixtures::{KUBE_APISERVER, require_tool};
use crate::support::process::{self, Lifetime, free_ports};
use crate::{Error, Result, io_err};

/// How long etcd and the API server get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A running etcd and kube-apiserver.
pub struct ControlPlane {
    /// Directory with the data, logs, credentials and kubeconfig.
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// From the first process start to `/readyz` answering ok.
    pub startup: Duration,
    /// etcd, then kube-apiserver.
    children: Vec<Child>,
    lifetime: Lifetime,
    /// How kube-apiserver is started, to start it again after an outage.
    apiserver: Vec<String>,
}

const PIDS_FILE: &str = "pids";
const AUDIT_LOG: &str = "audit.log";

/// Every write to image-prefetch's resources, its metadata only.
const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
    resources:
      - group: imageprefetch.io
  - level: None
";

/// One write the API server audited.
#[derive(Clone, Debug)]
pub struct AuditedWrite {
    /// The user the request acted as (the impersonated one, if any).
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub received: std::time::SystemTime,
    pub code: u16,
}

impl ControlPlane {
    /// Starts a fresh control plane whose files live in `dir` (emptied first).
    pub async fn start(dir: &Path, lifetime: Lifetime) -> Result<Self> {
        Self::start_with(dir, lifetime, None, false).await
    }

    /// As [`start`](Self::start), with the API server's audit log of every
    /// write to image-prefetch's resources ([`audited_writes`](Self::audited_writes)):
    /// what a client did, counted by the server.
    pub async fn start_audited(dir: &Path, lifetime: Lifetime) -> Result<Self> {
        Self::start_with(dir, lifetime, None, true).await
    }

    /// As [`start`](Self::start), publishing `address` (with the secure
    /// port) as the `kubernetes` Service's endpoint and in the serving
    /// certificate, for pods of the kubelet cluster bed: inside each node's
    /// namespace, a relay on that address leads here.
    pub async fn start_advertising(
        dir: &Path,
        lifetime: Lifetime,
        address: Option<&str>,
    ) -> Result<Self> {
        Self::start_with(dir, lifetime, address, false).await
    }

    async fn start_with(
        dir: &Path,
        lifetime: Lifetime,
        address: Option<&str>,
        audit: bool,
    ) -> Result<Self> {
        let apiserver_bin = KUBE_APISERVER.require()?;
        let etcd_bin = require_tool("etcd")?;
        let openssl = require_tool("openssl")?;
        if dir.exists() {
            stop_detached(dir)?;
            std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let dir = std::fs::canonicalize(dir).map_err(io_err(dir))?;

        let token = random_token();
        let tokens = dir.join("tokens.csv");
        std::fs::write(&tokens, format!("{token},admin,admin,system:masters\n"))
            .map_err(io_err(&tokens))?;
        let sa_key = dir.join("service-account.key");
        let status = Command::new(openssl)
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .map_err(io_err(&sa_key))?;
        if !status.success() {
            return Err(Error::Build {
                what: "service-account key",
                detail: format!("openssl genrsa exited {status}"),
            });
        }

        let [etcd_port, peer_port, api_port] = free_ports()?;
        let started = Instant::now();
        let mut plane = ControlPlane {
            kubeconfig: dir.join("kubeconfig"),
            server: format!("https://127.0.0.1:{api_port}"),
            dir: dir.clone(),
            startup: Duration::ZERO,
            children: Vec::new(),
            lifetime,
            apiserver: Vec::new(),
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(etcd_bin);
        etcd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")]);
        plane.spawn(etcd, "etcd")?;

        plane.apiserver = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            format!("--advertise-address={}", address.unwrap_or("127.0.0.1")),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("certs").display()),
            format!("--token-auth-file={}", tokens.display()),
            format!("--service-account-key-file={}", sa_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--authorization-mode=RBAC".into(),
            // The built-in endpoint reconciler would publish 127.0.0.1 for the
            // `kubernetes` Service, which the API rejects; only pods need it.
            format!(
                "--endpoint-reconciler-type={}",
                if address.is_some() { "lease" } else { "none" }
            ),
        ];
        if audit {
            let policy = dir.join("audit-policy.yaml");
            std::fs::write(&policy, AUDIT_POLICY).map_err(io_err(&policy))?;
            plane.apiserver.extend([
                format!("--audit-policy-file={}", policy.display()),
                format!("--audit-log-path={}", dir.join(AUDIT_LOG).display()),
                "--audit-log-mode=blocking".into(),
            ]);
        }
        let mut apiserver = Command::new(&apiserver_bin);
        apiserver.args(&plane.apiserver);
        plane.spawn(apiserver, "kube-apiserver")?;
        plane.record_pids()?;

        let ca = dir.join("certs").join("apiserver.crt");
        let kubeconfig = kubeconfig_yaml(&plane.server, &ca, &token);
        std::fs::write(&plane.kubeconfig, kubeconfig).map_err(io_err(&plane.kubeconfig))?;
        plane.wait_ready(&ca).await?;
        plane.startup = started.elapsed();
        Ok(plane)
    }

    /// A detached plane's process ids, for `stop_detached` from another process.
    fn record_pids(&self) -> Result<()> {
        if self.lifetime == Lifetime::Detached {
            let pids: Vec<String> = self.children.iter().map(|c| c.id().to_string()).collect();
            let path = self.dir.join(PIDS_FILE);
            std::fs::write(&path, pids.join("\n")).map_err(io_err(&path))?;
        }
        Ok(())
    }

    fn spawn(&mut self, cmd: Command, what: &'static str) -> Result<()> {
        let log = self.dir.join(format!("{what}.log"));
        self.children
            .push(process::spawn(cmd, &log, self.lifetime)?);
        Ok(())
    }

    async fn wait_ready(&mut self, ca: &Path) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        loop {
            for (child, what) in self.children.iter_mut().zip(["etcd", "kube-apiserver"]) {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(Error::Exited {
                        what,
                        status: status.to_string(),
                        log: self.dir.join(format!("{what}.log")).display().to_string(),
                    });
                }
            }
            // The serving certificate appears only once the API server has generated it.
            if ca.exists() {
                match self.readyz().await {
                    Ok(()) => return Ok(()),
                    Err(e) => last_error = e.to_string(),
                }
            }
            if Instant::now() > deadline {
                tracing::warn!(%last_error, "kube-apiserver not ready");
                return Err(Error::NotReady {
                    what: "kube-apiserver",
                    secs: READY_TIMEOUT.as_secs(),
                    log: self.dir.join("kube-apiserver.log").display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn readyz(&self) -> Result<()> {
        let client = self.client().await?;
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .expect("static request");
        let body = client.request_text(req).await?;
        if body.trim() == "ok" {
            Ok(())
        } else {
            Err(Error::NotReady {
                what: "kube-apiserver",
                secs: 0,
                log: body,
            })
        }
    }

    /// A client with cluster-admin rights.
    /// Writes a kubeconfig at `path` that authenticates with `token` (a
    /// ServiceAccount's, from a TokenRequest) instead of as the admin.
    pub fn kubeconfig_with_token(&self, token: &str, path: &Path) -> Result<()> {
        let ca = self.dir.join("certs").join("apiserver.crt");
        std::fs::write(path, kubeconfig_yaml(&self.server, &ca, token)).map_err(io_err(path))
    }

    pub async fn client(&self) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Stops kube-apiserver and leaves etcd running: an API server outage
    /// (an upgrade, a crash). [`start_apiserver`](Self::start_apiserver)
    /// brings it back.
    pub fn stop_apiserver(&mut self) {
        if let Some(apiserver) = self.children.get_mut(1) {
            process::stop(apiserver);
        }
    }

    /// Starts kube-apiserver again as it was (its port, certificates and
    /// etcd) after [`stop_apiserver`](Self::stop_apiserver), and waits until
    /// it is ready. Its request counters start again from zero: what it
    /// counts is what clients asked of it since it came back.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        let mut apiserver = Command::new(KUBE_APISERVER.require()?);
        apiserver.args(&self.apiserver);
        let log = self.dir.join("kube-apiserver.log");
        let child = process::spawn(apiserver, &log, self.lifetime)?;
        match self.children.get_mut(1) {
            Some(stopped) => *stopped = child,
            None => self.children.push(child),
        }
        self.record_pids()?;
        self.wait_ready(&self.dir.join("certs").join("apiserver.crt"))
            .await
    }

    /// Stops both processes (the API server first) and waits for them to exit.
    pub fn stop(mut self) {
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for child in self.children.iter_mut().rev() {
            process::stop(child);
        }
        self.children.clear();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Owned {
            self.kill_all();
        }
    }
}

/// A client for the control plane whose kubeconfig is at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Stops a control plane that `start(dir, Lifetime::Detached)` left running.
/// Returns whether anything was running.
pub fn stop_detached(dir: &Path) -> Result<bool> {
    let path = dir.join(PIDS_FILE);
    let Ok(pids) = std::fs::read_to_string(&path) else {
        return Ok(false);
    };
    let mut any = false;
    for pid in pids
        .lines()
        .rev()
        .filter_map(|l| l.trim().parse::<i32>().ok())
    {
        if is_alive(pid) {
            any = true;
            // SAFETY: plain kill(2) on a pid we started and recorded.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while is_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if is_alive(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    std::fs::remove_file(&path).map_err(io_err(&path))?;
    Ok(any)
}

/// Whether the detached control plane in `dir` is running.
pub fn detached_running(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(PIDS_FILE))
        .map(|pids| {
            let pids: Vec<i32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
            !pids.is_empty() && pids.iter().all(|&p| is_alive(p))
        })
        .unwrap_or(false)
}

fn is_alive(pid: i32) -> bool {
    // A zombie still answers kill(0); its /proc status says Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn kubeconfig_yaml(server: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testbed
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: testbed
  context:
    cluster: testbed
    user: admin
    namespace: default
current-context: testbed
",
        ca = ca.display()
    )
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ControlPlane {
    /// The writes the API server audited so far (a plane started with
    /// [`start_audited`](Self::start_audited)).
    pub fn audited_writes(&self) -> Vec<AuditedWrite> {
        let text = std::fs::read_to_string(self.dir.join(AUDIT_LOG)).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete")
            .filter_map(|e| {
                let user = e["impersonatedUser"]["username"]
                    .as_str()
                    .or(e["user"]["username"].as_str())?
                    .to_string();
                let received = micro_time(e["requestReceivedTimestamp"].as_str()?)?;
                Some(AuditedWrite {
                    user,
                    verb: e["verb"].as_str()?.to_string(),
                    resource: e["objectRef"]["resource"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    received,
                    code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                })
            })
            .collect()
    }
}

/// `2026-12-06T19:31:19.123456Z` (a `MicroTime`) as a time.
fn micro_time(s: &str) -> Option<std::time::SystemTime> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let t: MicroTime = serde_json::from_value(serde_json::Value::String(s.into())).ok()?;
    let micros = u64::try_from(t.0.as_microsecond()).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_micros(micros))
}
