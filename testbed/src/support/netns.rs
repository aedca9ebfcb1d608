//! Network namespaces the test bed makes for itself — the kubelet cluster's
//! nodes — and relays that carry connections from inside one to a server on
//! the test's own loopback. A relay's listening socket is opened inside the
//! namespace (the thread enters it, binds, and comes back), so a node's
//! processes reach the API server and the registry at the very address the
//! rest of the bed uses (`127.0.0.1:<port>`), and no address of the
//! machine's own namespace is touched.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use crate::{Error, Result, io_err};

/// A named network namespace (`ip netns add`), removed when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `name` (a leftover of that name is removed first) with its
    /// loopback up.
    pub fn create(name: &str) -> Result<Self> {
        let _ = ip(&["netns", "delete", name]);
        ip(&["netns", "add", name])?;
        let ns = NetNs {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Where the namespace is pinned, for `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `program` started inside the namespace with `nsenter --net`: unlike
    /// `ip netns exec` it keeps the machine's /sys, where kubelet finds the
    /// cgroup mounts.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Listens on `listen` inside the namespace and carries every connection
    /// to `target` in the test's own namespace. Stops when dropped.
    pub fn relay(&self, listen: SocketAddr, target: SocketAddr) -> Result<Relay> {
        let inside = File::open(self.path()).map_err(io_err(&self.path()))?;
        let home_path = PathBuf::from("/proc/thread-self/ns/net");
        let listener = std::thread::scope(|s| {
            s.spawn(|| -> Result<TcpListener> {
                // This thread's own namespace, to come back to.
                let home = File::open(&home_path).map_err(io_err(&home_path))?;
                let enter = |f: &File| {
                    move_into_link_name_space(f.as_fd(), Some(LinkNameSpaceType::Network)).map_err(
                        |e| Error::Io {
                            path: self.path().display().to_string(),
                            source: e.into(),
                        },
                    )
                };
                enter(&inside)?;
                let bound = TcpListener::bind(listen);
                enter(&home)?;
                bound.map_err(|source| Error::Io {
                    path: format!("{} in {}", listen, self.name),
                    source,
                })
            })
            .join()
            .expect("the binding thread does not panic")
        })?;
        listener
            .set_nonblocking(true)
            .map_err(io_err(&self.path()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        match TcpStream::connect(target) {
                            Ok(server) => pipe(client, server),
                            Err(_) => {
                                let _ = client.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        Ok(Relay { stop })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "delete", &self.name]);
    }
}

/// A relay into a namespace; stops accepting when dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [
        (a.try_clone(), b.try_clone()),
        (b.try_clone(), a.try_clone()),
    ]
    .into_iter()
    .filter_map(|(f, t)| Some((f.ok()?, t.ok()?)))
    {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| Error::Io {
            path: "ip".into(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Build {
            what: "a network namespace",
            detail: format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}
