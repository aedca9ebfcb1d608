//! `peer-mirror`: the test bed's stand-in for spegel (see the library docs).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use peer_mirror::configuration::{self, Configuration};
use peer_mirror::routing::Directory;
use peer_mirror::serve::{self, Mirror};
use peer_mirror::store::Store;

const USAGE: &str = "\
usage:
  peer-mirror configuration --containerd-registry-config-path DIR --mirror-targets URL[,URL]
                            [--mirrored-registries URL[,URL]] [--resolve-tags false]
      writes the node's hosts.toml as spegel's chart does
  peer-mirror registry --addr IP:PORT --containerd-sock PATH --directory DIR --node NAME
                       [--mirrored-registries URL[,URL]] [--advertise-delay-ms N]
                       [--lookup-cache-ms N] [--peer-header-timeout-ms N]
      serves this node's content and its peers' (never a registry's)
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
    let mut flags = std::collections::HashMap::new();
    for pair in rest.chunks(2) {
        match pair {
            [k, v] if k.starts_with("--") => {
                flags.insert(k.trim_start_matches("--").to_string(), v.clone());
            }
            _ => fail(&format!("bad arguments {pair:?}")),
        }
    }
    let get = |k: &str| flags.get(k).cloned();
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
                resolve_tags: get("resolve-tags").is_none_or(|v| v != "false"),
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
                    .unwrap_or_default(),
                millis(&get("lookup-cache-ms").unwrap_or_else(|| "2500".into())),
            );
            if let Err(e) = directory.join() {
                fail(&format!("joining the directory: {e}"));
            }
            let mirror = Arc::new(Mirror::new(
                store.clone(),
                directory.clone(),
                get("mirrored-registries").map(hosts).unwrap_or_default(),
                millis(&get("peer-header-timeout-ms").unwrap_or_else(|| "1000".into())),
            ));
            tokio::spawn(peer_mirror::advertise::run(store, directory));
            if let Err(e) = serve::run(mirror, socket_addr).await {
                fail(&format!("serving on {addr}: {e}"));
            }
        }
        "-h" | "--help" | "help" => print!("{USAGE}"),
        other => fail(&format!("unknown command {other}")),
    }
}
