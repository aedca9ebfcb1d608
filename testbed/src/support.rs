//! Small helpers the servers, beds and tests share.
//!
//! | module | what |
//! | --- | --- |
//! | `process` | starting a server as a process with its log file; loopback HTTP |
//! | `workdir` | a scratch directory per test |
//! | `poll` | waiting with a deadline |
//! | `crds` | installing the generated CRDs |
//! | `nodes` | Node objects with the status a kubelet would report |
//! | `api_metrics` | the API server's own request counters |
//! | `netns` | network namespaces and relays into them |
//! | `helm` | helm against a bed's API server |

pub mod api_metrics;
pub mod crds;
pub mod helm;
pub mod netns;
pub mod nodes;
pub mod poll;
pub mod process;
pub mod workdir;
