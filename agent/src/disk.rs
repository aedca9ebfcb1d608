//! The disk guard: the agent starts no pull while the node's image
//! filesystem is fuller than a threshold set below kubelet's image garbage
//! collection's high mark (85 % by default), so that prefetched images —
//! pinned, and so beyond the collector's reach — never push a node into
//! disk pressure. The decision is pure; reading the filesystem is `usage`.

use std::path::Path;

/// How full a filesystem is, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    /// What an unprivileged writer can fill: used plus available (as `df`
    /// counts it), so blocks reserved for root do not hide a full disk.
    pub capacity: u64,
}

impl Usage {
    pub fn percent(&self) -> f64 {
        if self.capacity == 0 {
            return 100.0;
        }
        self.used as f64 * 100.0 / self.capacity as f64
    }
}

/// Default threshold: under kubelet's `imageGCHighThresholdPercent` (85).
pub const DEFAULT_HIGH_PERCENT: u8 = 80;

/// Why a pull is not started.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error(
    "the image filesystem ({path}) is {percent:.0}% full, over the {high}% the agent keeps it under \
     (--image-fs-high-percent); the pull waits until space is freed"
)]
pub struct TooFull {
    pub path: String,
    pub percent: f64,
    pub high: u8,
}

/// Whether a pull may start on a filesystem at `usage`.
pub fn check(path: &Path, usage: Usage, high: u8) -> Result<(), TooFull> {
    let percent = usage.percent();
    if high >= 100 || percent <= f64::from(high) {
        return Ok(());
    }
    Err(TooFull {
        path: path.display().to_string(),
        percent,
        high,
    })
}

/// The filesystem holding `path`, as `df` reports it.
pub fn usage(path: &Path) -> std::io::Result<Usage> {
    let s = rustix::fs::statvfs(path)?;
    let block = s.f_frsize.max(1);
    let used = s.f_blocks.saturating_sub(s.f_bfree) * block;
    Ok(Usage {
        used,
        capacity: used + s.f_bavail * block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_waits_while_the_filesystem_is_over_the_threshold() {
        let path = Path::new("/var/lib/containerd");
        let at = |used, capacity| Usage { used, capacity };
        assert!(check(path, at(79, 100), 80).is_ok());
        assert!(check(path, at(80, 100), 80).is_ok());
        let refused = check(path, at(81, 100), 80).unwrap_err();
        assert_eq!(refused.high, 80);
        assert!(refused.to_string().contains("81% full"), "{refused}");
        // 100 switches the guard off; an unknown capacity counts as full.
        assert!(check(path, at(99, 100), 100).is_ok());
        assert!(check(path, at(0, 0), 80).is_err());
    }

    #[test]
    fn usage_is_read_from_the_filesystem() {
        let u = usage(Path::new("/")).unwrap();
        assert!(u.capacity > 0 && u.used <= u.capacity, "{u:?}");
    }
}
