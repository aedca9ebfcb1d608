//! A test-bed stand-in for spegel, the in-cluster p2p mirror, with spegel's
//! behaviour on the data path (read from the source of spegel
//! v0.7.4), because spegel itself cannot be built on this project's machines.
//!
//! - `configuration`: writes the node's containerd `hosts.toml` as spegel's
//!   chart does;
//! - `distribution`, `fingerprint`: the read side of the OCI distribution API
//!   and media types as spegel reports them;
//! - `store`: the node's containerd content and images;
//! - `routing`: who holds what (a shared directory stands in for the DHT);
//! - `advertise`: keeps this node's advertisements in step with containerd;
//! - `serve`: the registry handler: local content, else peers, else 404.
//!   It never contacts a registry.

pub mod advertise;
pub mod configuration;
pub mod distribution;
pub mod fingerprint;
pub mod routing;
pub mod serve;
pub mod store;
