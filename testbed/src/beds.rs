//! Whole beds, each the servers of [`crate::servers`] put together the way
//! one kind of test needs them.
//!
//! | module | what |
//! | --- | --- |
//! | `shared` | one control plane per test process, shared by its tests |
//! | `simulated` | simulated nodes (containerd, peer mirror) and the product's binaries as processes: the demo's and the e2e tests' bed |
//! | `peer_cluster` | N simulated nodes with their mirrors behind one registry and a slow uplink: the peer-mirror bed |
//! | `cluster` | kubelet nodes in network namespaces, with a scheduler and a controller manager: the kubelet bed |

pub mod cluster;
pub mod peer_cluster;
pub mod shared;
pub mod simulated;
