//! The kubelet cluster test bed: a control plane with a scheduler and a
//! controller manager, and kubelet nodes — each a network namespace of the
//! bed's own with containerd 2.x (CRI), kubelet, kube-proxy and a bridge pod
//! network — so that the chart runs as pods, as an administrator installs it.
//!
//! No address of the machine's own namespace is used but its loopback: the
//! API server and the registry listen there, and each node reaches them
//! through relays whose sockets are opened inside the node's namespace
//! ([`crate::support::netns`]), at `127.0.0.1:<port>` (kubelet, containerd) and at the
//! API server's advertised address (pods, through the `kubernetes` Service
//! and kube-proxy).
//!
//! Each node also has a mount namespace of its own, where the paths a node's
//! pods expect — `/run/containerd`, `/etc/containerd/certs.d`,
//! `/var/lib/containerd`, `/var/lib/image-prefetch` — are the node's own
//! folders: the nodes share the machine's filesystem, and a DaemonSet's
//! hostPath is one path for every node. So the chart installs with its
//! defaults.
//!
//! The nodes are joined by a bridge in a namespace of its own, with a route
//! to every other node's pod network; each runs the
//! peer mirror stand-in (spegel's data path, `testbed/peer-mirror`) on its
//! address, written into its registry configuration as spegel's chart does.
//!
//! Limits: `kubectl logs`/`exec` cannot reach a kubelet inside its
//! namespace (pod logs are in the node's `pod-logs` folder); no cluster DNS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;

use crate::builds::fixtures::{KUBE_CONTROLLER_MANAGER, KUBE_PROXY, KUBE_SCHEDULER, KUBELET};
use crate::servers::containerd::Containerd;
use crate::servers::peer_mirror::{PeerMirror, Placement, Settings};
use crate::servers::registry::Registry;
use crate::support::netns::{NetNs, Relay};
use crate::support::process;
use crate::{ControlPlane, Error, Lifetime, Result, io_err};

/// The API server's address as the pods see it: inside every node's
/// namespace, a relay to the real one listens there.
pub const API_ADDRESS: &str = "10.250.0.1";

/// Where each node's peer mirror listens, on the node's address.
/// spegel's registry hostPort (its chart's default), which the agent takes for
/// the in-cluster mirror by default.
const PEER_MIRROR_PORT: u16 = 30020;

/// The pause image the nodes' containerd runs each pod's sandbox from.
pub const PAUSE: &str = "pause:1";

/// How full the nodes' image filesystem looks to kubelet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFs {
    /// No eviction thresholds: kubelet never reclaims.
    Roomy,
    /// Past kubelet's thresholds for good: its garbage collection of
    /// unused images runs as under disk pressure (the node is tainted
    /// `disk-pressure`; only pods that tolerate it schedule).
    UnderPressure,
}

/// A control plane, a registry and kubelet nodes.
pub struct Cluster {
    pub dir: PathBuf,
    pub plane: ControlPlane,
    pub registry: Registry,
    // Field order is drop order: nodes first, then the control plane's helpers.
    pub nodes: Vec<ClusterNode>,
    helpers: Vec<Child>,
    /// The nodes' network: a bridge in a namespace of its own, one port per node.
    fabric: NetNs,
    /// What this bed's namespace names begin with.
    prefix: String,
    /// The private mount the nodes' mount namespaces are pinned on.
    pins: PathBuf,
}

/// One kubelet node.
pub struct ClusterNode {
    pub name: String,
    /// Where its containerd, kubelet and CNI keep their files.
    pub dir: PathBuf,
    pub containerd: Containerd,
    kubelet: Child,
    proxy: Child,
    pub peer_mirror: PeerMirror,
    _relays: Vec<Relay>,
    /// Where its mount namespace is pinned.
    mounts: PathBuf,
    // Last: the namespace goes after everything in it.
    pub netns: NetNs,
}

/// The paths of a node that are its own inside its mount namespace, and the
/// folder (under the node's) each stands for.
const NODE_PATHS: [(&str, &str); 4] = [
    ("/run/containerd", "."),
    ("/etc/containerd/certs.d", "certs.d"),
    ("/var/lib/containerd", "root"),
    ("/var/lib/image-prefetch", "image-prefetch"),
];

impl ClusterNode {
    /// `program`, started in the node's network and mount namespaces.
    pub fn command(&self, program: &Path) -> Command {
        in_node(&self.netns, &self.mounts, program)
    }
}

fn in_node(netns: &NetNs, mounts: &Path, program: &Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.path().display()))
        .arg(format!("--mount={}", mounts.display()))
        .arg("--")
        .arg(program);
    cmd
}

/// Runs `program` with `args` to completion; an error with its output if it fails.
fn run(cmd: &mut Command, what: &'static str) -> Result<()> {
    let (ok, out) = process::run(cmd);
    if ok {
        Ok(())
    } else {
        Err(Error::Build {
            what,
            detail: format!("{cmd:?}: {out}"),
        })
    }
}

impl Cluster {
    /// Starts the bed in `dir` with `nodes` nodes, and waits until they are Ready.
    pub async fn start(dir: &Path, nodes: usize) -> Result<Self> {
        Self::start_with(dir, nodes, ImageFs::Roomy).await
    }

    /// As [`start`](Self::start), with the nodes' image filesystem `image_fs`.
    pub async fn start_with(dir: &Path, nodes: usize, image_fs: ImageFs) -> Result<Self> {
        Self::start_nodes(dir, nodes, image_fs, None).await
    }

    /// As [`start`](Self::start), every node registering with the taint
    /// `key` (`NoSchedule`), as kubelet's `registerWithTaints` does: nodes
    /// that join behind a readiness gate.
    pub async fn start_gated(dir: &Path, nodes: usize, key: &str) -> Result<Self> {
        Self::start_nodes(dir, nodes, ImageFs::Roomy, Some(key)).await
    }

    async fn start_nodes(
        dir: &Path,
        nodes: usize,
        image_fs: ImageFs,
        taint: Option<&str>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let dir = std::fs::canonicalize(dir).map_err(io_err(dir))?;
        // Mount namespaces are pinned on files of a private mount: the
        // folder of mount-namespace pins, bound onto itself.
        let pins = dir.join("mount-namespaces");
        std::fs::create_dir_all(&pins).map_err(io_err(&pins))?;
        run(
            Command::new("mount").arg("--bind").arg(&pins).arg(&pins),
            "the cluster bed",
        )?;
        run(
            Command::new("mount").arg("--make-private").arg(&pins),
            "the cluster bed",
        )?;
        let plane = ControlPlane::start_advertising(
            &dir.join("control-plane"),
            Lifetime::Owned,
            Some(API_ADDRESS),
        )
        .await?;
        let registry = Registry::start(&dir.join("registry"))?;
        crate::builds::images::push_pause(&dir.join("pause"), &registry.host, PAUSE)?;
        let ca = plane.dir.join("certs").join("apiserver.crt");
        let key = plane.dir.join("service-account.key");
        // The scheduler and the controller manager (ServiceAccounts,
        // Deployments, DaemonSets, the garbage collector), as an admin.
        let helper = |program: PathBuf, extra: &[String], name: &str| -> Result<Child> {
            let mut cmd = Command::new(program);
            cmd.arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
                .args(extra)
                .args([
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                ]);
            process::spawn(cmd, &dir.join(format!("{name}.log")), Lifetime::Owned)
        };
        let helpers = vec![
            helper(
                KUBE_CONTROLLER_MANAGER.require()?,
                &[
                    format!("--root-ca-file={}", ca.display()),
                    format!("--service-account-private-key-file={}", key.display()),
                ],
                "kube-controller-manager",
            )?,
            helper(KUBE_SCHEDULER.require()?, &[], "kube-scheduler")?,
        ];
        // Namespace names carry the process and the bed, so that beds of
        // one test process, or of two, never share one.
        static BEDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let bed = BEDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("ipf-{}-{bed}", std::process::id());
        let fabric = NetNs::create(&format!("{prefix}-net"))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Cluster {
            dir: dir.clone(),
            plane,
            registry,
            nodes: Vec::new(),
            helpers,
            fabric,
            pins,
            prefix,
        };
        for i in 0..nodes {
            let node = cluster.start_node(i, image_fs, taint)?;
            cluster.nodes.push(node);
        }
        // Each node's pod network is reached through that node.
        for (i, node) in cluster.nodes.iter().enumerate() {
            for j in (0..nodes).filter(|j| *j != i) {
                node.netns.ip(&[
                    "route",
                    "add",
                    &format!("10.244.{j}.0/24"),
                    "via",
                    &format!("10.250.0.{}", 10 + j),
                ])?;
            }
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    fn start_node(&self, i: usize, image_fs: ImageFs, taint: Option<&str>) -> Result<ClusterNode> {
        let name = format!("kubelet-node-{i}");
        let dir = self.dir.join(&name);
        for sub in ["cni", "static", "kubelet"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io_err(&dir))?;
        }
        let netns = NetNs::create(&format!("{}-{i}", self.prefix))?;
        let ip = format!("10.250.0.{}", 10 + i);
        // An interface with a real address (kubelet refuses a loopback node
        // IP), one end of a veth pair whose other end is a port of the
        // nodes' bridge: the nodes (their peer mirrors) reach each other.
        let port = format!("node{i}");
        netns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &port])?;
        netns.ip(&["link", "set", &port, "netns", &self.fabric.name])?;
        self.fabric.ip(&["link", "set", &port, "master", "br0"])?;
        self.fabric.ip(&["link", "set", &port, "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "dev", "eth0"])?;
        netns.ip(&["addr", "add", &format!("{API_ADDRESS}/32"), "dev", "lo"])?;
        // The node's mount namespace, with its own folders at the paths
        // every node has.
        let mounts = self.pins.join(&name);
        write(&mounts, "")?;
        run(
            Command::new("unshare")
                .arg(format!("--mount={}", mounts.display()))
                .args(["--propagation", "private", "true"]),
            "a node's mount namespace",
        )?;
        for (path, own) in NODE_PATHS {
            let own = dir.join(own);
            std::fs::create_dir_all(&own).map_err(io_err(&own))?;
            run(
                Command::new("nsenter")
                    .arg(format!("--mount={}", mounts.display()))
                    .arg("--")
                    .arg("sh")
                    .arg("-c")
                    .arg(format!(
                        "mkdir -p {path} && mount --bind {} {path}",
                        own.display()
                    )),
                "a node's own paths",
            )?;
        }
        let api: SocketAddr = self
            .plane
            .server
            .trim_start_matches("https://")
            .parse()
            .map_err(|e| Error::Build {
                what: "the cluster bed",
                detail: format!("API server address {}: {e}", self.plane.server),
            })?;
        let registry: SocketAddr = self.registry.host.parse().map_err(|e| Error::Build {
            what: "the cluster bed",
            detail: format!("registry address {}: {e}", self.registry.host),
        })?;
        let advertised: SocketAddr = format!("{API_ADDRESS}:{}", api.port())
            .parse()
            .expect("an IPv4 address and a port");
        let relays = vec![
            netns.relay(api, api)?,
            netns.relay(advertised, api)?,
            netns.relay(registry, registry)?,
        ];
        // The pod network: a bridge with a /24 of its own, masqueraded.
        let cni = format!(
            r#"{{"cniVersion": "1.0.0", "name": "pods", "plugins": [
  {{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
   "ipam": {{"type": "host-local", "dataDir": "{data}",
             "ranges": [[{{"subnet": "10.244.{i}.0/24"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}"#,
            data = dir.join("cni-state").display()
        );
        write(&dir.join("cni").join("10-pods.conflist"), &cni)?;
        let launch = |program: &Path| in_node(&netns, &mounts, program);
        let containerd =
            Containerd::start_in(&dir, &launch, &format!("{}/{PAUSE}", self.registry.host))?;
        // The node's spegel: the peer mirror stand-in, on the node's address,
        // written into the node's registry configuration as spegel's chart
        // writes it.
        let mirror_host = format!("{ip}:{PEER_MIRROR_PORT}");
        let live = |host: &str| {
            let (ip, port) = host.split_once(':').unwrap_or((host, ""));
            launch(Path::new("bash"))
                .args(["-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let peer_mirror = PeerMirror::start_at(
            &dir,
            &name,
            &Placement {
                host: mirror_host,
                launch: &launch,
                live: &live,
            },
            &containerd.socket,
            &self.dir.join("peer-directory"),
            &Settings::default(),
        )?;
        peer_mirror.configure_node(
            &containerd.hosts_dir,
            &[&format!("http://{}", self.registry.host)],
        )?;
        let kubelet_config = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# These machines have cgroup v1 and cannot move processes between cgroups
# the way kubelet's QoS classes want.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: unix://{socket}
staticPodPath: {static_dir}
address: {ip}
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
resolvConf: \"\"
podLogsDir: {logs}
{pressure}{taints}",
            socket = containerd.socket.display(),
            static_dir = dir.join("static").display(),
            logs = dir.join("pod-logs").display(),
            taints = match taint {
                Some(key) =>
                    format!("registerWithTaints: [{{key: \"{key}\", effect: NoSchedule}}]\n"),
                None => String::new(),
            },
            pressure = match image_fs {
                ImageFs::Roomy => "evictionHard: {}\n",
                // Thresholds no disk meets: kubelet reclaims at once and
                // again every 10 s, deleting every unused image a second
                // old that is not pinned.
                ImageFs::UnderPressure => {
                    "evictionHard: {imagefs.available: \"99%\", nodefs.available: \"99%\"}\n\
                     imageMinimumGCAge: 1s\n"
                }
            },
        );
        let config = dir.join("kubelet.yaml");
        write(&config, &kubelet_config)?;
        let mut kubelet = launch(&KUBELET.require()?);
        kubelet
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", self.plane.kubeconfig.display()))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("kubelet-pki").display()))
            .arg(format!("--node-ip={ip}"))
            .arg(format!("--hostname-override={name}"));
        let kubelet = process::spawn(kubelet, &dir.join("kubelet.log"), Lifetime::Owned)?;
        let mut proxy = launch(&KUBE_PROXY.require()?);
        proxy
            .arg(format!("--kubeconfig={}", self.plane.kubeconfig.display()))
            .arg(format!("--hostname-override={name}"))
            .args([
                "--cluster-cidr=10.244.0.0/16",
                "--proxy-mode=iptables",
                // The namespace's conntrack table is the machine's to size.
                "--conntrack-max-per-core=0",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
            ]);
        let proxy = process::spawn(proxy, &dir.join("kube-proxy.log"), Lifetime::Owned)?;
        Ok(ClusterNode {
            name,
            dir,
            containerd,
            kubelet,
            proxy,
            peer_mirror,
            _relays: relays,
            mounts,
            netns,
        })
    }

    async fn wait_ready(&self) -> Result<()> {
        let client = self.plane.client().await?;
        let nodes: Api<Node> = Api::all(client);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut ready = 0;
            for n in &self.nodes {
                if let Ok(node) = nodes.get(&n.name).await
                    && node
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                {
                    ready += 1;
                }
            }
            if ready == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    what: "the kubelet nodes",
                    secs: 90,
                    log: self.dir.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.helpers {
            process::stop(h);
        }
        // The nodes are gone (dropped first); so can the pins' mount.
        self.nodes.clear();
        let _ = Command::new("umount").arg("-l").arg(&self.pins).status();
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        process::stop(&mut self.kubelet);
        process::stop(&mut self.proxy);
        // The pods' processes and containerd's shims outlive containerd (and
        // a container outlives its shim): stop them all, then unmount what
        // is left under the node.
        kill_containers(&self.containerd.dir.join("state"));
        kill_shims(&self.containerd.socket);
        self.containerd.crash();
        unmount_under(&self.dir);
        // The mount namespace ends with its last process and its pin.
        let _ = Command::new("umount").arg(&self.mounts).status();
    }
}

/// Kills every container of the containerd whose state directory is
/// `state`: each container's first process (its task's `init.pid`) heads the
/// container's own PID namespace, so the rest of the container goes with it.
fn kill_containers(state: &Path) {
    let tasks = state.join("io.containerd.runtime.v2.task");
    let bundles = std::fs::read_dir(tasks)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|namespace| {
            std::fs::read_dir(namespace.path())
                .into_iter()
                .flatten()
                .flatten()
        });
    for bundle in bundles {
        let pid = std::fs::read_to_string(bundle.path().join("init.pid")).unwrap_or_default();
        if let Ok(pid) = pid.trim().parse::<i32>() {
            kill(pid);
        }
    }
}

fn kill(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Kills the containerd shims that serve `socket`.
fn kill_shims(socket: &Path) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let wanted = socket.display().to_string();
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&wanted) {
            kill(pid);
        }
    }
}

/// Lazily unmounts every mount under `dir` (the pods' root filesystems,
/// their volumes), deepest first.
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", p]).status();
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(io_err(path))
}
