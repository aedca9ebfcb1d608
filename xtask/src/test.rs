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
}
