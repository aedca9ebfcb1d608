//! Prints the CRDs to stdout, or with `--write DIR` writes them where the Helm
//! chart and the OLM bundle ship them (DIR is the workspace root).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let manifests = crd::generate::manifests();
    match args.as_slice() {
        [] => {
            for m in &manifests {
                print!("---\n{}", m.yaml);
            }
        }
        [flag, root] if flag == "--write" => {
            for (path, content) in crd::generate::files() {
                let path = PathBuf::from(root).join(path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&path, content)?;
                eprintln!("wrote {}", path.display());
            }
        }
        _ => {
            eprintln!("usage: crdgen [--write WORKSPACE_ROOT]");
            std::process::exit(2);
        }
    }
    Ok(())
}
