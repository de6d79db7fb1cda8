//! Embeds the conformance cases (`tests/conformance/<version>/<case>/*`) in
//! the crate, so that an installed binary has them without the source tree.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    collect(&root, &root, 0, &mut files);
    files.sort();
    let mut out = String::from(
        "/// Every file of the built-in cases: its path below the cases \
         directory, and its bytes.\npub(crate) static FILES: &[(&str, &[u8])] = &[\n",
    );
    for (name, path) in &files {
        writeln!(
            out,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("writing to a String cannot fail");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(dest.join("embedded_cases.rs"), out).expect("OUT_DIR is writable");
}

/// Files in the case directories below `dir` (depth 0: the version
/// directories; 1: cases; 2: their files), as (relative name, path).
fn collect(root: &Path, dir: &Path, depth: usize, files: &mut Vec<(String, PathBuf)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a readable directory entry").path();
        if path.is_dir() && depth < 2 {
            collect(root, &path, depth + 1, files);
        } else if path.is_file() && depth == 2 {
            let name = path
                .strip_prefix(root)
                .expect("below the root")
                .to_string_lossy()
                .replace('\\', "/");
            let absolute = path.canonicalize().expect("an existing file");
            files.push((name, absolute));
        }
    }
}
