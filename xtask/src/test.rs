//! `cargo xtask test` and `cargo xtask lint`.

use std::process::Command;

use anyhow::{Result, bail};

/// Runs cargo in the workspace, failing with the command when it fails.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo)
        .args(args)
        .current_dir(crate::root())
        .status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Everything the tests need, then every test of the workspace.
pub fn all() -> Result<()> {
    crate::deps::install()?;
    crate::fixtures()?;
    cargo(&["test", "--workspace", "--all-targets", "--no-fail-fast"])
}

/// Formatting, generated files and lints: what CI checks before the tests.
pub fn lint() -> Result<()> {
    crate::deps::install()?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    crate::crdgen(true)?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The swarm benchmark is behind a feature: linted too, so it keeps
    // building as the code it simulates changes.
    cargo(&[
        "clippy",
        "-p",
        "xtask",
        "--features",
        "swarm",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])
}

#[cfg(test)]
mod tests {
    /// containerd-client and opentelemetry-otlp must share one gRPC stack;
    /// two tonic (or prost) versions would double the build and break type sharing.
    #[test]
    fn one_tonic_and_one_prost_in_the_lock_file() {
        let lock = std::fs::read_to_string(crate::root().join("Cargo.lock")).unwrap();
        for name in ["tonic", "prost"] {
            let versions = lock
                .split("[[package]]")
                .filter(|p| p.contains(&format!("\nname = \"{name}\"\n")))
                .count();
            assert_eq!(versions, 1, "Cargo.lock has {versions} versions of {name}");
        }
    }

    /// The README's layout table names every top-level entry of the tree
    /// and only those, and each crate's row names every module of its
    /// `src/` (and no module that is not there).
    #[test]
    fn the_readme_layout_matches_the_tree() {
        let root = crate::root();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let table = readme
            .split("## Layout")
            .nth(1)
            .and_then(|t| t.split("\n## ").next())
            .expect("a Layout section");
        let rows: Vec<(Vec<String>, String)> = table
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let mut cells = l.trim_matches('|').splitn(2, '|');
                let paths = cells.next().unwrap_or_default();
                let what = cells.next().unwrap_or_default().to_string();
                let paths = paths
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|p| p.trim_end_matches('/').to_string())
                    .collect();
                (paths, what)
            })
            .collect();
        let listed: std::collections::BTreeSet<&str> = rows
            .iter()
            .flat_map(|(paths, _)| paths.iter().map(String::as_str))
            .collect();
        // What the tree has besides: the workspace files and build output.
        let beside = ["Cargo.toml", "Cargo.lock", "README.md", "target"];
        let tree: std::collections::BTreeSet<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !beside.contains(&n.as_str()))
            .collect();
        let tree_refs: std::collections::BTreeSet<&str> = tree.iter().map(String::as_str).collect();
        assert_eq!(
            listed, tree_refs,
            "the README's layout table and `ls` differ"
        );

        for krate in ["crd", "controller", "agent", "plumbing", "xtask"] {
            let (_, what) = rows
                .iter()
                .find(|(paths, _)| paths.iter().any(|p| p == krate))
                .unwrap();
            let named: std::collections::BTreeSet<&str> = what
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .collect();
            let modules: std::collections::BTreeSet<String> =
                std::fs::read_dir(root.join(krate).join("src"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .filter(|p| p.extension().is_some_and(|e| e == "rs"))
                    .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
                    .filter(|m| m != "lib" && m != "main")
                    .collect();
            for m in &modules {
                assert!(
                    named.contains(m.as_str()),
                    "README: {krate}'s row does not name `{m}`"
                );
            }
            // Binaries (crdgen) are named too; anything else is a module.
            for n in &named {
                assert!(
                    modules.contains(*n) || *n == "crdgen",
                    "README: {krate}'s row names `{n}`, which {krate}/src does not have"
                );
            }
        }
    }
}
