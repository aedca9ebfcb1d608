//! A model of spegel's data plane for `cargo run --release -p xtask --features swarm -- bench swarm`: who can
//! serve an image, how long a pull takes, how many streams a holder serves.
//! Pure: time comes in as an argument.
//!
//! - The registry's uplink is `uplink` bytes/s, shared by the upstream pulls
//!   under way; every node's NIC is `nic` bytes/s.
//! - A holder is findable `advertise_delay` after its pull finished (spegel
//!   provides asynchronously).
//! - A lookup returns at most 3 findable providers; the pull goes to the
//!   least used of them (spegel's own count), whose NIC is shared by the
//!   streams it serves: a pull's rate is fixed when it starts, at
//!   `nic / (streams + 1)`.
//! - A Default pull goes to the mirror first and to the registry on a miss.
//! - A pull that names a holder (the controller's named source) is served
//!   by it, findable or not, as the agent asks that peer first; a named
//!   node that does not hold the image sends the pull on to the lookup.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// spegel's providers per lookup.
pub const PROVIDERS_PER_LOOKUP: usize = 3;

#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub image_bytes: u64,
    pub uplink: u64,
    pub nic: u64,
    pub advertise_delay: Duration,
}

impl Model {
    /// One upstream pull then ⌈log₂ N⌉ peer rounds at a full NIC each.
    pub fn ideal(&self, nodes: usize) -> Duration {
        let rounds = nodes.next_power_of_two().trailing_zeros();
        self.transfer(self.uplink.min(self.nic)) + self.transfer(self.nic) * rounds
    }

    fn transfer(&self, rate: u64) -> Duration {
        Duration::from_secs_f64(self.image_bytes as f64 / rate.max(1) as f64)
    }
}

/// Where a pull's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Registry,
    Peer(String),
}

/// A pull the model started: from where, and for how long.
#[derive(Clone, Debug, PartialEq)]
pub struct Started {
    pub source: Source,
    pub takes: Duration,
}

#[derive(Debug)]
struct Holder {
    findable_at: Instant,
    streams: usize,
}

/// The cluster's data plane for one image.
#[derive(Debug)]
pub struct DataPlane {
    model: Model,
    holders: HashMap<String, Holder>,
    upstream_streams: usize,
    pub upstream_pulls: usize,
    pub peer_pulls: usize,
    pub misses: usize,
    /// The most streams any holder served at once.
    pub most_streams: usize,
}

impl DataPlane {
    pub fn new(model: Model) -> Self {
        DataPlane {
            model,
            holders: HashMap::new(),
            upstream_streams: 0,
            upstream_pulls: 0,
            peer_pulls: 0,
            misses: 0,
            most_streams: 0,
        }
    }

    /// A pull by `node`, from the holder `named` first when there is one;
    /// `None` is a miss (no findable peer, Mirror only).
    pub fn start(
        &mut self,
        node: &str,
        mirror_only: bool,
        named: Option<&str>,
        now: Instant,
    ) -> Option<Started> {
        if let Some(peer) = named.filter(|n| *n != node && self.holders.contains_key(*n)) {
            return Some(self.served_by(peer.to_string()));
        }
        let mut providers: Vec<(&String, &Holder)> = self
            .holders
            .iter()
            .filter(|(n, h)| *n != node && h.findable_at <= now)
            .collect();
        // spegel returns some providers, not all: model which by name, then
        // the least used of those serves.
        providers.sort_by(|a, b| a.0.cmp(b.0));
        let offset = if providers.is_empty() {
            0
        } else {
            name_hash(node) % providers.len()
        };
        providers.rotate_left(offset);
        let chosen = providers
            .into_iter()
            .take(PROVIDERS_PER_LOOKUP)
            .min_by_key(|(n, h)| (h.streams, (*n).clone()))
            .map(|(n, _)| n.clone());
        match chosen {
            Some(peer) => Some(self.served_by(peer)),
            None if mirror_only => {
                self.misses += 1;
                None
            }
            None => {
                self.upstream_streams += 1;
                self.upstream_pulls += 1;
                let rate = (self.model.uplink / self.upstream_streams as u64).min(self.model.nic);
                Some(Started {
                    source: Source::Registry,
                    takes: self.model.transfer(rate),
                })
            }
        }
    }

    /// A pull served by the holder `peer`, its NIC shared with its other streams.
    fn served_by(&mut self, peer: String) -> Started {
        let holder = self.holders.get_mut(&peer).expect("a holder");
        holder.streams += 1;
        self.most_streams = self.most_streams.max(holder.streams);
        self.peer_pulls += 1;
        let rate = self.model.nic / holder.streams as u64;
        Started {
            source: Source::Peer(peer),
            takes: self.model.transfer(rate),
        }
    }

    /// The pull `started` by `node` finished at `now`: the node holds the image.
    pub fn finish(&mut self, node: &str, started: &Started, now: Instant) {
        match &started.source {
            Source::Registry => self.upstream_streams -= 1,
            Source::Peer(peer) => {
                if let Some(h) = self.holders.get_mut(peer) {
                    h.streams -= 1;
                }
            }
        }
        self.holders.entry(node.to_string()).or_insert(Holder {
            findable_at: now + self.model.advertise_delay,
            streams: 0,
        });
    }
}

fn name_hash(s: &str) -> usize {
    s.bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn model() -> Model {
        Model {
            image_bytes: 100 * MIB,
            uplink: 10 * MIB,
            nic: 100 * MIB,
            advertise_delay: Duration::from_millis(500),
        }
    }

    #[test]
    fn the_ideal_is_one_upstream_pull_and_log2_n_peer_rounds() {
        let m = model();
        assert_eq!(m.ideal(1000), Duration::from_secs(10 + 10));
        assert_eq!(m.ideal(1024), Duration::from_secs(10 + 10));
        assert_eq!(m.ideal(1025), Duration::from_secs(10 + 11));
    }

    #[test]
    fn a_seed_goes_upstream_and_is_findable_after_the_advertisement_delay() {
        let mut d = DataPlane::new(model());
        let t0 = Instant::now();
        assert_eq!(
            d.start("b", true, None, t0),
            None,
            "nobody holds it: a miss"
        );
        let seed = d.start("a", false, None, t0).unwrap();
        assert_eq!(seed.source, Source::Registry);
        assert_eq!(seed.takes, Duration::from_secs(10));
        let done = t0 + seed.takes;
        d.finish("a", &seed, done);
        assert_eq!(d.start("b", true, None, done), None, "not advertised yet");
        let peer = d
            .start("b", true, None, done + Duration::from_millis(500))
            .unwrap();
        assert_eq!(peer.source, Source::Peer("a".into()));
        assert_eq!(peer.takes, Duration::from_secs(1));
        assert_eq!((d.upstream_pulls, d.peer_pulls, d.misses), (1, 1, 2));
    }

    #[test]
    fn a_holders_nic_is_shared_by_the_streams_it_serves() {
        let mut d = DataPlane::new(model());
        let t0 = Instant::now();
        let seed = d.start("a", false, None, t0).unwrap();
        d.finish("a", &seed, t0);
        let later = t0 + Duration::from_secs(1);
        let first = d.start("b", true, None, later).unwrap();
        let second = d.start("c", true, None, later).unwrap();
        assert_eq!(first.takes, Duration::from_secs(1));
        assert_eq!(
            second.takes,
            Duration::from_secs(2),
            "two streams share a's NIC"
        );
        assert_eq!(d.most_streams, 2);
        // A Default pull with a findable holder is served by the mirror.
        assert_eq!(
            d.start("d", false, None, later).unwrap().source,
            Source::Peer("a".into())
        );
    }

    #[test]
    fn a_named_holder_serves_before_it_is_advertised() {
        let mut d = DataPlane::new(model());
        let t0 = Instant::now();
        let seed = d.start("a", false, None, t0).unwrap();
        d.finish("a", &seed, t0);
        // Not findable yet, but named.
        let named = d.start("b", true, Some("a"), t0).unwrap();
        assert_eq!(named.source, Source::Peer("a".into()));
        // A named node that does not hold it: the lookup, which misses.
        assert_eq!(d.start("c", true, Some("z"), t0), None);
        assert_eq!((d.peer_pulls, d.misses), (1, 1));
    }
}
