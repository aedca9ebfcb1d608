//! The image-prefetch agent: one per node. It follows its node's
//! NodeImageSets, pulls their images through the node's containerd with the
//! policy each entry names, and reports per-image state back.

pub mod cli;
pub mod credential_providers;
pub mod credentials;
pub mod disk;
pub mod events;
pub mod hosts;
pub mod job;
pub mod ledger;
pub mod metrics;
pub mod pins;
pub mod pull;
pub mod report;
pub mod sets;
pub mod work;
