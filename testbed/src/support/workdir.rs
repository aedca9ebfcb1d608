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
        // A failed test's logs go with its directory: print their ends first,
        // so that a failure on CI says what the processes were doing.
        if std::thread::panicking() {
            print_log_tails(&self.0);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How much of each log a failed test prints.
const TAIL_LINES: usize = 40;

fn print_log_tails(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            print_log_tails(&path);
        } else if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<_> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
            eprintln!("---- last {} lines of {} ----", tail.len(), path.display());
            for line in tail {
                eprintln!("{line}");
            }
        }
    }
}
