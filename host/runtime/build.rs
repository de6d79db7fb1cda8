//! Reads the `sandbox` world of `wit/1.1` (what ksm grants a guest) and
//! writes its imports, by interface name without version, for
//! `sandbox::GRANTED_IMPORTS`: the WIT world is the one list.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use wit_parser::{Resolve, WorldItem};

fn main() {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit/1.1");
    println!("cargo:rerun-if-changed={}", wit.display());
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_dir(&wit)
        .unwrap_or_else(|e| panic!("cannot read the WIT in {}: {e:#}", wit.display()));
    let world = resolve
        .select_world(&[package], Some("sandbox"))
        .unwrap_or_else(|e| panic!("wit/1.1 has no sandbox world: {e:#}"));
    let mut out = String::from(
        "/// The interfaces (any version) a guest may import: the imports of the\n\
         /// `sandbox` world of `wit/1.1/sandbox.wit`, in its order.\n\
         pub const GRANTED_IMPORTS: &[&str] = &[\n",
    );
    for item in resolve.worlds[world].imports.values() {
        let WorldItem::Interface { id, .. } = item else {
            panic!("the sandbox world imports only interfaces");
        };
        let name = resolve.id_of(*id).expect("a named interface");
        let name = name.split_once('@').map_or(name.as_str(), |(name, _)| name);
        writeln!(out, "    {name:?},").expect("writing to a String cannot fail");
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(dest.join("granted_imports.rs"), out).expect("OUT_DIR is writable");
}
