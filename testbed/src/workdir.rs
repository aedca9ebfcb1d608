//! A scratch directory for one test, removed when the test is done with it.

use std::path::{Path, PathBuf};

/// Declare it before the servers that use it: it is dropped (and removed) after them.
pub struct Workdir(PathBuf);

impl Workdir {
    pub fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("image-prefetch-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Workdir(dir)
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl std::ops::Deref for Workdir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
