//! `peer-mirror`: the test bed's stand-in for spegel (see the library docs).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use peer_mirror::advertise::Advertising;
use peer_mirror::configuration::{self, Configuration};
use peer_mirror::routing::{self, Directory};
use peer_mirror::serve::{self, Mirror, Settings};
use peer_mirror::store::Store;

const USAGE: &str = "\
usage:
  peer-mirror configuration --containerd-registry-config-path DIR --mirror-targets URL[,URL]
                            [--mirrored-registries URL[,URL]] [--resolve-tags false]
                            [--basic-auth USER:PASSWORD] [--prepend-existing true]
      writes the node's hosts.toml as spegel's chart does
  peer-mirror registry --addr IP:PORT --containerd-sock PATH --directory DIR --node NAME
                       [--mirrored-registries URL[,URL]] [--registry-filters REGEX]...
                       [--basic-auth USER:PASSWORD] [--content-events false]
                       [--advertise-delay-ms N (500)] [--lookup-cache-ms N (2500)]
                       [--peer-header-timeout-ms N (100: the floor of 2 x p90)]
      serves this node's content and its peers' (never a registry's);
      --content-events false is containerd 2.0's (no /content/create)
";

fn fail(message: &str) -> ! {
    eprintln!("peer-mirror: {message}\n\n{USAGE}");
    std::process::exit(2)
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn millis(v: &str) -> Duration {
    Duration::from_millis(
        v.parse()
            .unwrap_or_else(|_| fail(&format!("not a number: {v}"))),
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        fail("no command")
    };
    // A flag may be repeated (`--registry-filters`); the last one counts for the others.
    let mut flags: std::collections::HashMap<String, Vec<String>> = Default::default();
    for pair in rest.chunks(2) {
        match pair {
            [k, v] if k.starts_with("--") => {
                flags
                    .entry(k.trim_start_matches("--").to_string())
                    .or_default()
                    .push(v.clone());
            }
            _ => fail(&format!("bad arguments {pair:?}")),
        }
    }
    let get = |k: &str| flags.get(k).and_then(|v| v.last()).cloned();
    let flag_true = |k: &str, default: bool| get(k).map_or(default, |v| v != "false");
    let need = |k: &str| get(k).unwrap_or_else(|| fail(&format!("--{k} is required")));
    // Registries are matched by host, as the `ns` parameter names them.
    let hosts = |v: String| -> Vec<String> {
        list(&v)
            .into_iter()
            .map(|u| u.split_once("://").map(|(_, h)| h.to_string()).unwrap_or(u))
            .collect()
    };
    match command.as_str() {
        "configuration" => {
            let c = Configuration {
                mirrored_registries: get("mirrored-registries")
                    .map(|v| list(&v))
                    .unwrap_or_default(),
                mirror_targets: list(&need("mirror-targets")),
                resolve_tags: flag_true("resolve-tags", true),
                basic_auth: get("basic-auth"),
                prepend_existing: flag_true("prepend-existing", false),
            };
            let path = PathBuf::from(need("containerd-registry-config-path"));
            if let Err(e) = configuration::write(&path, &c) {
                fail(&format!("writing {}: {e}", path.display()));
            }
        }
        "registry" => {
            let addr = need("addr");
            let socket_addr = addr
                .parse()
                .unwrap_or_else(|_| fail(&format!("--addr {addr}: not IP:PORT")));
            let store = Store::connect(&PathBuf::from(need("containerd-sock")))
                .await
                .unwrap_or_else(|e| fail(&e));
            let directory = Directory::new(
                need("directory").into(),
                &need("node"),
                &addr,
                get("advertise-delay-ms")
                    .map(|v| millis(&v))
                    .unwrap_or(routing::ADVERTISE_DELAY),
                get("lookup-cache-ms")
                    .map(|v| millis(&v))
                    .unwrap_or(routing::LOOKUP_CACHE),
            );
            if let Err(e) = directory.join() {
                fail(&format!("joining the directory: {e}"));
            }
            let settings = Settings {
                mirrored_registries: get("mirrored-registries").map(hosts).unwrap_or_default(),
                registry_filters: flags
                    .get("registry-filters")
                    .into_iter()
                    .flatten()
                    .map(|f| {
                        regex::Regex::new(f)
                            .unwrap_or_else(|e| fail(&format!("--registry-filters {f}: {e}")))
                    })
                    .collect(),
                basic_auth: get("basic-auth"),
                header_floor: get("peer-header-timeout-ms")
                    .map(|v| millis(&v))
                    .unwrap_or(serve::HEADER_FLOOR),
            };
            let mirror = Arc::new(Mirror::new(
                store.clone(),
                directory.clone(),
                settings.clone(),
            ));
            let advertising = Advertising {
                content_events: flag_true("content-events", true),
                settings,
            };
            tokio::spawn(peer_mirror::advertise::run(store, directory, advertising));
            if let Err(e) = serve::run(mirror, socket_addr).await {
                fail(&format!("serving on {addr}: {e}"));
            }
        }
        "-h" | "--help" | "help" => print!("{USAGE}"),
        other => fail(&format!("unknown command {other}")),
    }
}
