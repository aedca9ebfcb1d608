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
            for dir in crd::generate::DESTINATIONS {
                let dir = PathBuf::from(root).join(dir);
                std::fs::create_dir_all(&dir)?;
                for m in &manifests {
                    std::fs::write(dir.join(&m.file_name), &m.yaml)?;
                    eprintln!("wrote {}", dir.join(&m.file_name).display());
                }
            }
        }
        _ => {
            eprintln!("usage: crdgen [--write WORKSPACE_ROOT]");
            std::process::exit(2);
        }
    }
    Ok(())
}
