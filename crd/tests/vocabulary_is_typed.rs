//! No reason, condition type or Event reason of ours is spelt as a string
//! literal in product code: each is written through the enums of
//! `crd::vocabulary`, so the reference generated from them is complete.

use std::path::{Path, PathBuf};

use crd::vocabulary::{ConditionReason, ConditionType, EventReason, PullFailure, Word};

/// Literals that are someone else's word spelt like one of ours.
const NOT_OURS: &[(&str, &str, &str)] = &[
    (
        "crd/src/prefetch.rs",
        "Ready",
        "the header of a kubectl column",
    ),
    (
        "controller/src/select.rs",
        "Ready",
        "the Node's Ready condition, Kubernetes'",
    ),
    (
        "controller/src/triggers.rs",
        "Ready",
        "the Node's Ready condition, Kubernetes'",
    ),
];

fn words() -> Vec<&'static str> {
    fn of<W: Word>() -> impl Iterator<Item = &'static str> {
        W::iter().map(Word::as_str)
    }
    of::<PullFailure>()
        .chain(of::<ConditionType>())
        .chain(of::<ConditionReason>())
        .chain(of::<EventReason>())
        .collect()
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn product_code_spells_no_reason_as_a_string() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let words = words();
    let mut found = Vec::new();
    for krate in ["crd", "controller", "agent", "plumbing"] {
        let mut files = Vec::new();
        sources(&root.join(krate).join("src"), &mut files);
        for file in files {
            let relative = file.strip_prefix(&root).unwrap().display().to_string();
            if relative == "crd/src/vocabulary.rs" {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            // Unit tests may spell what they expect to read back.
            let product = text.split("#[cfg(test)]").next().unwrap_or_default();
            for (n, line) in product.lines().enumerate() {
                for word in &words {
                    let literal = format!("\"{word}\"");
                    let allowed = NOT_OURS.iter().any(|(f, w, _)| *f == relative && w == word);
                    if line.contains(&literal) && !allowed {
                        found.push(format!("{relative}:{}: {}", n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "reasons spelt as strings (use crd::vocabulary):\n{}",
        found.join("\n")
    );
}
