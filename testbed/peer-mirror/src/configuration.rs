//! The node's containerd registry configuration, written the way spegel's
//! `configuration` init container writes it (spegel v0.7.4 `AddMirrorConfiguration`):
//! existing entries moved once into `_backup`, everything else cleared, then
//! one `hosts.toml` per mirrored registry (`_default` when none is listed)
//! with the mirror targets first, single-quoted, no trailing newline; with
//! Basic auth a `.header` table after each target, and with
//! `prependExisting` the backed-up file's own host tables after spegel's.

use std::path::Path;

/// What `peer-mirror configuration` is told.
#[derive(Clone, Debug, Default)]
pub struct Configuration {
    /// `http(s)://host[:port]` URLs; empty means every registry (`_default`).
    pub mirrored_registries: Vec<String>,
    /// The node's mirror endpoints, in the order containerd tries them.
    pub mirror_targets: Vec<String>,
    /// `false` leaves tag resolution to the registry (capability `pull` only).
    pub resolve_tags: bool,
    /// spegel's `basicAuthSecretName`: the `Authorization` header each
    /// target's table carries, as `user:password`.
    pub basic_auth: Option<String>,
    /// spegel's `prependExisting`: the host tables of the registry's
    /// backed-up file (and its other files) kept after spegel's own.
    pub prepend_existing: bool,
}

/// The `Authorization` value for `user:password`, as spegel sends it.
pub fn basic_authorization(user_password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

/// `(directory name, hosts.toml text)` for each mirrored registry.
pub fn hosts_files(c: &Configuration) -> Vec<(String, String)> {
    let capabilities = if c.resolve_tags {
        "['pull', 'resolve']"
    } else {
        "['pull']"
    };
    let tables: Vec<String> = c
        .mirror_targets
        .iter()
        .map(|t| {
            let table =
                format!("[host.'{t}']\ncapabilities = {capabilities}\ndial_timeout = '200ms'");
            match &c.basic_auth {
                Some(auth) => format!(
                    "{table}\n[host.'{t}'.header]\nAuthorization = '{}'",
                    basic_authorization(auth)
                ),
                None => table,
            }
        })
        .collect();
    let body = tables.join("\n\n");
    let registries: Vec<&str> = if c.mirrored_registries.is_empty() {
        vec!["_default"]
    } else {
        c.mirrored_registries.iter().map(String::as_str).collect()
    };
    registries
        .into_iter()
        .map(|r| {
            if r == "_default" || r == "*" {
                return ("_default".to_string(), body.trim().to_string());
            }
            let host = r.split_once("://").map(|(_, h)| h).unwrap_or(r);
            let server = if host == "docker.io" {
                "https://registry-1.docker.io".to_string()
            } else {
                r.to_string()
            };
            let text = format!("server = '{server}'\n\n{body}");
            (host.to_string(), text.trim().to_string())
        })
        .collect()
}

/// Writes the files under `config_path`: the first run moves what was there
/// into `_backup` (a restart keeps that original backup), then every entry
/// but `_backup` is removed and the new files are written.
pub fn write(config_path: &Path, c: &Configuration) -> std::io::Result<()> {
    std::fs::create_dir_all(config_path)?;
    let backup = config_path.join("_backup");
    if !backup.exists() {
        std::fs::create_dir(&backup)?;
        for entry in std::fs::read_dir(config_path)? {
            let entry = entry?;
            if entry.file_name() != "_backup" {
                std::fs::rename(entry.path(), backup.join(entry.file_name()))?;
            }
        }
    }
    for entry in std::fs::read_dir(config_path)? {
        let entry = entry?;
        if entry.file_name() == "_backup" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    for (dir, text) in hosts_files(c) {
        let d = config_path.join(&dir);
        std::fs::create_dir_all(&d)?;
        let kept = backup.join(&dir);
        let text = match std::fs::read_to_string(kept.join("hosts.toml")) {
            Ok(old) if c.prepend_existing => {
                for entry in std::fs::read_dir(&kept)? {
                    let entry = entry?;
                    if entry.file_name() != "hosts.toml" && entry.file_type()?.is_file() {
                        std::fs::copy(entry.path(), d.join(entry.file_name()))?;
                    }
                }
                prepend(&text, &old)
            }
            _ => text,
        };
        std::fs::write(d.join("hosts.toml"), text)?;
    }
    Ok(())
}

/// spegel's text followed by the `[host.'…']` tables of `existing`, in their
/// order; `existing`'s top-level keys (`server`, `capabilities`) are dropped.
/// (spegel re-serialises the tables, which may reorder keys; they are kept
/// verbatim here, which containerd reads the same.)
pub fn prepend(text: &str, existing: &str) -> String {
    let tables = existing
        .lines()
        .position(|l| l.trim_start().starts_with("[host."))
        .map(|first| existing.lines().skip(first).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default();
    if tables.trim().is_empty() {
        return text.to_string();
    }
    format!("{text}\n\n{}", tables.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets() -> Vec<String> {
        vec![
            "http://10.0.0.5:30020".into(),
            "http://10.0.0.5:30021".into(),
        ]
    }

    #[test]
    fn default_chart_writes_one_wildcard_file() {
        let files = hosts_files(&Configuration {
            mirrored_registries: vec![],
            mirror_targets: targets(),
            resolve_tags: true,
            ..Default::default()
        });
        assert_eq!(
            files,
            [(
                "_default".to_string(),
                "[host.'http://10.0.0.5:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'\n\n\
                 [host.'http://10.0.0.5:30021']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'"
                    .to_string()
            )]
        );
    }

    #[test]
    fn listed_registries_get_a_server_line_and_docker_hub_its_real_host() {
        let files = hosts_files(&Configuration {
            mirrored_registries: vec!["https://docker.io".into(), "https://ghcr.io".into()],
            mirror_targets: targets()[..1].to_vec(),
            resolve_tags: false,
            ..Default::default()
        });
        assert_eq!(files[0].0, "docker.io");
        assert_eq!(
            files[0].1,
            "server = 'https://registry-1.docker.io'\n\n[host.'http://10.0.0.5:30020']\ncapabilities = ['pull']\ndial_timeout = '200ms'"
        );
        assert_eq!(files[1].0, "ghcr.io");
        assert!(files[1].1.starts_with("server = 'https://ghcr.io'\n\n"));
    }

    #[test]
    fn existing_configuration_is_backed_up_once_and_cleared() {
        let dir = std::env::temp_dir().join(format!("peer-mirror-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("quay.io")).unwrap();
        std::fs::write(dir.join("quay.io/hosts.toml"), "server = 'https://quay.io'").unwrap();
        let c = Configuration {
            mirrored_registries: vec![],
            mirror_targets: targets(),
            resolve_tags: true,
            ..Default::default()
        };
        write(&dir, &c).unwrap();
        assert!(dir.join("_backup/quay.io/hosts.toml").is_file());
        assert!(!dir.join("quay.io").exists());
        assert!(dir.join("_default/hosts.toml").is_file());
        // A restart keeps the original backup and rewrites the rest.
        write(&dir, &c).unwrap();
        assert!(dir.join("_backup/quay.io/hosts.toml").is_file());
        assert!(!dir.join("_backup/_default").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn basic_auth_adds_a_header_table_after_each_target() {
        let files = hosts_files(&Configuration {
            mirrored_registries: vec!["http://foo.bar:5000".into()],
            mirror_targets: vec!["http://127.0.0.1:5000".into()],
            resolve_tags: true,
            basic_auth: Some("hello:world".into()),
            prepend_existing: false,
        });
        // spegel's own unit test's file, byte for byte.
        assert_eq!(
            files[0].1,
            "server = 'http://foo.bar:5000'\n\n[host.'http://127.0.0.1:5000']\ncapabilities = ['pull', 'resolve']\n\
             dial_timeout = '200ms'\n[host.'http://127.0.0.1:5000'.header]\nAuthorization = 'Basic aGVsbG86d29ybGQ='"
        );
    }

    #[test]
    fn prepend_existing_keeps_the_old_host_tables_after_spegels_and_their_files() {
        let dir = std::env::temp_dir().join(format!("peer-mirror-prepend-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("_default")).unwrap();
        std::fs::write(
            dir.join("_default/hosts.toml"),
            "server = 'https://old'\ncapabilities = ['pull']\n\n[host.'https://cache.lan']\n\
             capabilities = ['pull', 'resolve']\nca = 'cache.pem'\n",
        )
        .unwrap();
        std::fs::write(dir.join("_default/cache.pem"), "PEM").unwrap();
        let c = Configuration {
            mirror_targets: targets()[..1].to_vec(),
            resolve_tags: true,
            prepend_existing: true,
            ..Default::default()
        };
        write(&dir, &c).unwrap();
        let text = std::fs::read_to_string(dir.join("_default/hosts.toml")).unwrap();
        assert_eq!(
            text,
            "[host.'http://10.0.0.5:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'\n\n\
             [host.'https://cache.lan']\ncapabilities = ['pull', 'resolve']\nca = 'cache.pem'"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("_default/cache.pem")).unwrap(),
            "PEM"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
