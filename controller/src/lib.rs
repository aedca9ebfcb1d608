//! The image-prefetch controller: turns each ImagePrefetch into one
//! NodeImageSet per selected node and reports progress on the ImagePrefetch.
//!
//! `select`, `policy`, `registries`, `status` and `decide` (which joins
//! them into one reconcile's writes) are pure decisions; `index` caches the
//! NodeImageSets they read, `triggers` says what is worth a reconcile,
//! `reconcile` does the API I/O, and `run` wires watches, caches and the
//! kube-runtime `Controller` together. `cli` reads the command line into a
//! `config::Config`; `error` says what failed on what.

pub mod agent_daemonset;
pub mod cli;
pub mod config;
pub mod decide;
pub mod error;
pub mod gate;
pub mod index;
pub mod leader;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod pull_secrets;
pub mod reconcile;
pub mod refresh;
pub mod registries;
pub mod run;
pub mod select;
pub mod status;
pub mod trace;
pub mod triggers;
pub mod uninstall;

pub use config::Config;
pub use error::Error;
pub use run::run;
