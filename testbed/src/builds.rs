//! What the beds build rather than download.
//!
//! | module | what |
//! | --- | --- |
//! | `fixtures` | kube-apiserver, kubelet, containerd 2.x, helm, Jaeger, the OLM validators, from their Go modules into a cache outside the clone |
//! | `images` | test images of incompressible layers, pushed to a test registry |
//! | `oci` | container images of the product's binaries, assembled with buildah |

pub mod fixtures;
pub mod images;
pub mod oci;
