//! A simulated node's container runtime: one containerd 2.x with its own
//! root, state directory, socket and registry-host configuration.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use crate::builds::fixtures::CONTAINERD;
use crate::support::process::{self, Lifetime};
use crate::{Error, Result, io_err};

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The node's registry host configuration (`config_path`): `<host>/hosts.toml`.
    pub hosts_dir: PathBuf,
    pub log: PathBuf,
    child: Child,
    /// The mirrors `configure_registry` named: the bed's in-cluster mirror.
    mirrors: std::sync::Mutex<Vec<String>>,
}

/// Which containerd a simulated node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// 2.x built from its Go module: has the Transfer service.
    V2,
    /// The newest approved 2.x release, for the runtime matrix.
    V2Latest,
    /// Debian's 1.6 package: CRI only, no Transfer service.
    Debian16,
}

impl Containerd {
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_flavor(dir, Flavor::V2)
    }

    /// containerd 2.x exporting its own spans to `jaeger`: the server side
    /// of each call the agent makes joins the agent's trace when the call
    /// carries its context.
    pub fn start_traced(dir: &Path, jaeger: &crate::servers::jaeger::Jaeger) -> Result<Self> {
        let mut env: Vec<(&str, String)> = jaeger.exporter_env().into();
        env.push(("OTEL_SERVICE_NAME", "containerd".into()));
        Self::start_with(dir, Flavor::V2, &env, "", None)
    }

    pub fn start_flavor(dir: &Path, flavor: Flavor) -> Result<Self> {
        Self::start_with(dir, flavor, &[], "", None)
    }

    /// containerd 2.x as a kubelet node's runtime, started by `launch` (in the
    /// node's namespaces): CRI with
    /// `sandbox_image` as the pause image, pod networks from the CNI
    /// configuration in `<dir>/cni` (Debian's plugins), and
    /// `restrict_oom_score_adj` (a process here may not lower its OOM score,
    /// and runc fails without it).
    pub fn start_in(
        dir: &Path,
        launch: &dyn Fn(&Path) -> Command,
        sandbox_image: &str,
    ) -> Result<Self> {
        let extra = format!(
            r#"[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{sandbox_image}"
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
  # Pods' network namespaces under the node's own folder, not the
  # machine's /var/run/netns: they go with the node.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
"#,
            cni = dir.join("cni").display()
        );
        Self::start_with(dir, Flavor::V2, &[], &extra, Some(launch))
    }

    fn start_with(
        dir: &Path,
        flavor: Flavor,
        env: &[(&str, String)],
        extra_toml: &str,
        launch: Option<&dyn Fn(&Path) -> Command>,
    ) -> Result<Self> {
        let bin = match flavor {
            Flavor::V2 => CONTAINERD.require()?,
            Flavor::V2Latest => crate::builds::fixtures::CONTAINERD_LATEST.require()?,
            Flavor::Debian16 => crate::builds::fixtures::require_tool("containerd")?,
        };
        let hosts_dir = dir.join("certs.d");
        std::fs::create_dir_all(&hosts_dir).map_err(io_err(&hosts_dir))?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        let (version, cri) = match flavor {
            Flavor::V2 | Flavor::V2Latest => (3, "io.containerd.cri.v1.images"),
            Flavor::Debian16 => (2, "io.containerd.grpc.v1.cri"),
        };
        let toml = format!(
            r#"version = {version}
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."{cri}"]
  [plugins."{cri}".registry]
    config_path = "{hosts}"
{extra_toml}"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            hosts = hosts_dir.display(),
        );
        std::fs::write(&config, toml).map_err(io_err(&config))?;
        // A socket left by a killed predecessor would look like readiness.
        let _ = std::fs::remove_file(&socket);
        let log = dir.join("containerd.log");
        let mut cmd = match launch {
            Some(launch) => launch(&bin),
            None => Command::new(bin),
        };
        cmd.arg("--config")
            .arg(&config)
            .envs(env.iter().map(|(k, v)| (k, v)));
        let child = process::spawn(cmd, &log, Lifetime::Owned)?;
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            hosts_dir,
            log,
            child,
            mirrors: Default::default(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.socket.exists() {
            if let Ok(Some(status)) = c.child.try_wait() {
                return Err(Error::Exited {
                    what: "containerd",
                    status: status.to_string(),
                    log: c.log.display().to_string(),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    what: "containerd",
                    secs: 30,
                    log: c.log.display().to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(c)
    }

    /// Writes `<hosts_dir>/<registry>/hosts.toml` for a plain-HTTP loopback
    /// registry (`127.0.0.1:port`) as its own `server`, with `mirrors`
    /// (same form) tried first, as spegel configures a node.
    pub fn configure_registry(&self, registry: &str, mirrors: &[&str]) -> Result<()> {
        let mirrors: Vec<String> = mirrors.iter().map(|m| format!("http://{m}")).collect();
        self.mirrors
            .lock()
            .expect("mirrors lock")
            .extend(mirrors.iter().cloned());
        let mirrors: Vec<&str> = mirrors.iter().map(String::as_str).collect();
        write_hosts(
            &self.hosts_dir,
            registry,
            &format!("http://{registry}"),
            &mirrors,
        )
    }

    /// The hosts `configure_registry` named as mirrors, comma-separated: what
    /// the agent's `--mirror-endpoints` takes (its default, spegel's ports,
    /// fits no loopback bed).
    pub fn mirror_endpoints(&self) -> String {
        self.mirrors.lock().expect("mirrors lock").join(",")
    }

    /// `ctr` (Debian's containerd client) against this containerd, in the
    /// Kubernetes namespace: what it prints. Panics with ctr's error when it
    /// fails (for tests).
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr runs");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills containerd (as a crash would); `start` on the same dir brings it back.
    pub fn kill(mut self) {
        self.crash();
    }

    /// Kills containerd where it stands (a node whose runtime died).
    pub fn crash(&mut self) {
        process::stop(&mut self.child);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        process::stop(&mut self.child);
    }
}

/// A hosts.toml in containerd's registry host configuration format.
pub fn write_hosts(dir: &Path, registry: &str, server: &str, mirrors: &[&str]) -> Result<()> {
    let d = dir.join(registry);
    std::fs::create_dir_all(&d).map_err(io_err(&d))?;
    let mut toml = format!("server = \"{server}\"\n");
    for m in mirrors {
        toml.push_str(&format!(
            "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    let path = d.join("hosts.toml");
    std::fs::write(&path, toml).map_err(io_err(&path))
}
