//! Who holds what: a shared directory standing in for spegel's DHT.
//!
//! `<root>/<sha256 of the key>/<node>` holds that node's mirror address: the
//! node advertises the key. As with provider records in the DHT, a node that
//! dies stays advertised (its files remain) until someone removes them, and
//! lookups then meet a dead peer and move on. Two timings are settings so
//! that tests can exercise spegel's: the delay before an advertisement
//! becomes visible, and how long a lookup's answer (empty too) is reused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How many providers a lookup asks for (spegel's `mirrorResolveRetries`).
pub const PROVIDERS: usize = 3;
/// From a blob's commit to other nodes finding it. spegel's provide is
/// asynchronous (queued into libp2p's sweeping provider) and unbounded by
/// spegel; half a second is this stand-in's estimate for a small cluster,
/// not a measurement of real spegel.
pub const ADVERTISE_DELAY: Duration = Duration::from_millis(500);
/// How long a lookup's answer, an empty one too, is reused (spegel: 2.5 s
/// before a refresh is allowed when fewer than 3 peers were found).
pub const LOOKUP_CACHE: Duration = Duration::from_millis(2500);

#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    node: String,
    addr: String,
    advertise_delay: Duration,
    lookup_ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    usage: Mutex<HashMap<String, u64>>,
}

impl Directory {
    pub fn new(
        root: PathBuf,
        node: &str,
        addr: &str,
        advertise_delay: Duration,
        lookup_ttl: Duration,
    ) -> Self {
        Directory {
            inner: Arc::new(Inner {
                root,
                node: node.into(),
                addr: addr.into(),
                advertise_delay,
                lookup_ttl,
                cache: Mutex::default(),
                usage: Mutex::default(),
            }),
        }
    }

    fn key_dir(&self, key: &str) -> PathBuf {
        let hash = Sha256::digest(key.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        self.inner.root.join(hex)
    }

    /// Joins the network: `<root>/_peers/<node>` (spegel's bootstrap).
    pub fn join(&self) -> std::io::Result<()> {
        let peers = self.inner.root.join("_peers");
        std::fs::create_dir_all(&peers)?;
        std::fs::write(peers.join(&self.inner.node), &self.inner.addr)
    }

    /// Ready as spegel is: once it knows at least one other node.
    pub fn has_peers(&self) -> bool {
        std::fs::read_dir(self.inner.root.join("_peers"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy() != self.inner.node)
    }

    /// Makes `key` findable by the other nodes, after the advertise delay.
    pub fn advertise(&self, key: String) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.inner.advertise_delay).await;
            let dir = this.key_dir(&key);
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("key"), &key)?;
                let tmp = dir.join(format!(".{}", this.inner.node));
                std::fs::write(&tmp, &this.inner.addr)?;
                std::fs::rename(tmp, dir.join(&this.inner.node))
            };
            if let Err(e) = write() {
                eprintln!("peer-mirror: advertise {key}: {e}");
            }
        });
    }

    /// Stops advertising `key`.
    pub fn withdraw(&self, key: &str) {
        let _ = std::fs::remove_file(self.key_dir(key).join(&self.inner.node));
    }

    /// Up to `PROVIDERS` other nodes' mirror addresses for `key`, least used
    /// first. An answer, even an empty one, is reused for the lookup TTL.
    pub fn lookup(&self, key: &str) -> Vec<String> {
        let now = Instant::now();
        if let Some((at, peers)) = self.inner.cache.lock().expect("cache").get(key)
            && now.duration_since(*at) < self.inner.lookup_ttl
        {
            return peers.clone();
        }
        let mut peers: Vec<String> = std::fs::read_dir(self.key_dir(key))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name == "key" || name.starts_with('.') || name == self.inner.node {
                    return None;
                }
                std::fs::read_to_string(e.path()).ok()
            })
            .collect();
        let usage = self.inner.usage.lock().expect("usage");
        peers.sort_by_key(|p| (usage.get(p).copied().unwrap_or(0), p.clone()));
        peers.truncate(PROVIDERS);
        drop(usage);
        self.inner
            .cache
            .lock()
            .expect("cache")
            .insert(key.to_string(), (now, peers.clone()));
        peers
    }

    /// Counts a request sent to `peer`, for least-used-first ordering.
    pub fn used(&self, peer: &str) {
        *self
            .inner
            .usage
            .lock()
            .expect("usage")
            .entry(peer.into())
            .or_default() += 1;
    }

    /// Drops a peer that failed from the reused answer for `key`.
    pub fn failed(&self, key: &str, peer: &str) {
        if let Some((_, peers)) = self.inner.cache.lock().expect("cache").get_mut(key) {
            peers.retain(|p| p != peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(root: &std::path::Path, node: &str, ttl_ms: u64) -> Directory {
        Directory::new(
            root.into(),
            node,
            &format!("{node}:5000"),
            Duration::ZERO,
            Duration::from_millis(ttl_ms),
        )
    }

    async fn advertised(d: &Directory, key: &str) {
        d.advertise(key.into());
        for _ in 0..100 {
            if d.key_dir(key).join(&d.inner.node).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("not advertised");
    }

    #[tokio::test]
    async fn lookups_find_others_not_self_and_cache_misses() {
        let root = std::env::temp_dir().join(format!("peer-mirror-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (a, b) = (dir(&root, "a", 60_000), dir(&root, "b", 0));
        assert!(a.lookup("k").is_empty());
        advertised(&b, "k").await;
        // a's empty answer is still reused: spegel's negative lookup cache.
        assert!(a.lookup("k").is_empty());
        let c = dir(&root, "c", 0);
        assert_eq!(c.lookup("k"), ["b:5000"]);
        advertised(&c, "k").await;
        assert_eq!(b.lookup("k"), ["c:5000"], "never itself");
        b.withdraw("k");
        assert!(c.lookup("k").is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
