//! The real parts a test starts and stops, each on loopback or in a network
//! namespace the bed made.
//!
//! | module | what |
//! | --- | --- |
//! | `control_plane` | etcd and kube-apiserver |
//! | `containerd` | one node's containerd 2.x (or Debian's 1.6) with its own root and socket |
//! | `registry` | Debian's `docker-registry`, its access log the count of upstream fetches |
//! | `peer_mirror` | the stand-in for spegel (the `peer-mirror` binary), one per node |
//! | `jaeger` | Jaeger v2: OTLP in, its query API out |
//! | `slow_link` | a throttled TCP relay: the uplink to the registry |

pub mod containerd;
pub mod control_plane;
pub mod jaeger;
pub mod peer_mirror;
pub mod registry;
pub mod slow_link;
