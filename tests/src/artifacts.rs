//! The artifacts under test: the guest component and the host binary, built at most once per
//! test process with the same cargo that runs the tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        manifest
            .parent()
            .expect("tests/ has a parent directory")
            .to_path_buf()
    })
}

/// The workspace's target directory (`CARGO_TARGET_DIR` if set, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// True for the variables cargo sets for the test process itself (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_NAME`, ...). A nested cargo must not see them: build scripts that read them
/// (ring's, for one) would be rerun, and every crate above them rebuilt, twice per test run.
fn set_by_cargo_for_this_crate(name: &str) -> bool {
    const NAMES: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    NAMES.contains(&name) || name.starts_with("CARGO_PKG_") || name.starts_with("CARGO_BIN_EXE_")
}

/// Runs `cargo <args>` in the workspace root (with `$CARGO` if set) in the environment the
/// test run was started with, panicking with the command line if it fails.
fn cargo(args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_for_this_crate) {
            command.env_remove(name);
        }
    }
    let status = command
        .args(args)
        .current_dir(workspace_root())
        .status()
        .unwrap_or_else(|e| panic!("run {cargo:?} {}: {e}", args.join(" ")));
    assert!(
        status.success(),
        "`cargo {}` failed ({status}); see its output above",
        args.join(" ")
    );
}

/// The reference guest component, `target/wasm32-wasip2/release/ksm_guest.wasm`, built once
/// per test process with `cargo build --release --target wasm32-wasip2 -p ksm-guest` (a
/// no-op when it is up to date).
///
/// Set `KSM_GUEST_WASM` to a path to use that file instead and skip the build.
pub fn guest_wasm() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| component("ksm-guest", "KSM_GUEST_WASM"))
        .clone()
}

/// The misbehaving test guest (`tests/fixtures/misbehaving-guest`): a device event whose
/// payload is `panic`, `loop` or `hog` traps, spins or allocates without bound. Built once
/// per test process; `KSM_MISBEHAVING_WASM` overrides it.
pub fn misbehaving_guest_wasm() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| component("ksm-fixture-misbehaving-guest", "KSM_MISBEHAVING_WASM"))
        .clone()
}

/// The SDK example guest (`examples/guest-rust-low-battery`): forwards only device events
/// whose `eventData.battery` is below 20, as its own record shape. Built once per test
/// process; `KSM_LOW_BATTERY_WASM` overrides it.
pub fn low_battery_guest_wasm() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| component("ksm-example-low-battery", "KSM_LOW_BATTERY_WASM"))
        .clone()
}

/// A guest of the smart-module world that opens a TCP connection, so its component imports
/// `wasi:sockets` (`tests/fixtures/sockets-guest`). Built once per test process.
pub fn sockets_guest_wasm() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| component("ksm-fixture-sockets-guest", "KSM_SOCKETS_WASM"))
        .clone()
}

/// A valid component of another world (`tests/fixtures/wrong-world-guest`). Built once per
/// test process.
pub fn wrong_world_guest_wasm() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| component("ksm-fixture-wrong-world-guest", "KSM_WRONG_WORLD_WASM"))
        .clone()
}

/// The JavaScript guest (`examples/guest-js`), `target/guest-js/ksm_guest_js.wasm`, built
/// once per test process by `scripts/build-js-guest.sh` (quick when it is up to date);
/// `KSM_JS_GUEST_WASM` overrides it.
pub fn js_guest_wasm() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            if let Some(path) = overridden("KSM_JS_GUEST_WASM") {
                return path;
            }
            let root = workspace_root();
            let status = Command::new("bash")
                .arg(root.join("scripts/build-js-guest.sh"))
                .status()
                .expect("run scripts/build-js-guest.sh");
            assert!(
                status.success(),
                "scripts/build-js-guest.sh failed ({status})"
            );
            target_dir().join("guest-js/ksm_guest_js.wasm")
        })
        .clone()
}

/// The file the environment variable `var` names, if it is set (it must exist).
fn overridden(var: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os(var)?);
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    Some(path)
}

/// Builds the component of `package` for wasm32-wasip2 (release) unless the environment
/// variable `override_var` names a file to use instead, and returns its path.
fn component(package: &str, override_var: &str) -> PathBuf {
    if let Some(path) = overridden(override_var) {
        return path;
    }
    cargo(&[
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "-p",
        package,
    ]);
    let path = target_dir()
        .join("wasm32-wasip2/release")
        .join(format!("{}.wasm", package.replace('-', "_")));
    assert!(
        path.is_file(),
        "the build of {package} succeeded but {} is missing (is the target wasm32-wasip2 \
         installed? `rustup target add wasm32-wasip2`)",
        path.display()
    );
    path
}

/// The host binary `ksm` in the dev profile, `target/debug/ksm`, built once per test process
/// with `cargo build -p ksm-host --bin ksm` (a no-op when it is up to date), for tests that
/// run the host as a process.
///
/// Set `KSM_BINARY` to a path to use that file instead and skip the build.
pub fn ksm_binary() -> PathBuf {
    static HOST: OnceLock<PathBuf> = OnceLock::new();
    HOST.get_or_init(|| host_binary(false)).clone()
}

/// The standalone conformance tool, `target/debug/ksm-conformance`, built once per test
/// process together with the host's binary: built alone, its dependencies would get other
/// features and be compiled again, loading the machine under the other tests.
pub fn conformance_binary() -> PathBuf {
    static TOOL: OnceLock<PathBuf> = OnceLock::new();
    TOOL.get_or_init(|| {
        cargo(&[
            "build",
            "-p",
            "ksm-host",
            "--bin",
            "ksm",
            "-p",
            "ksm-conformance",
            "--bin",
            "ksm-conformance",
        ]);
        let path = target_dir().join("debug").join("ksm-conformance");
        assert!(
            path.is_file(),
            "the conformance build succeeded but {} is missing",
            path.display()
        );
        path
    })
    .clone()
}

/// The host binary in the profile this process was built in: `target/release/ksm` when it
/// is optimised (`cargo bench`), else as [`ksm_binary`]. For benchmarks, whose figures mean
/// nothing for a dev build. `KSM_BINARY` overrides it too.
pub fn ksm_binary_as_built() -> PathBuf {
    if cfg!(debug_assertions) {
        return ksm_binary();
    }
    static HOST: OnceLock<PathBuf> = OnceLock::new();
    HOST.get_or_init(|| host_binary(true)).clone()
}

fn host_binary(release: bool) -> PathBuf {
    if let Some(path) = overridden("KSM_BINARY") {
        return path;
    }
    let (args, dir): (&[&str], _) = if release {
        (
            &["build", "--release", "-p", "ksm-host", "--bin", "ksm"],
            "release",
        )
    } else {
        (&["build", "-p", "ksm-host", "--bin", "ksm"], "debug")
    };
    cargo(args);
    let path = target_dir().join(dir).join("ksm");
    assert!(
        path.is_file(),
        "the host build succeeded but {} is missing",
        path.display()
    );
    path
}
