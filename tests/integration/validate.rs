//! `ksm validate`, `ksm bulk encode` and `ksm conformance` as users run them.

use ksm_tests::{TempDir, guest_wasm, workspace_root};

use crate::support::ksm_command;

#[test]
fn validate_lists_every_problem_with_its_field() {
    let dir = TempDir::new("validate");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
[component]
path = "guest.wasm"
[[modules]]
id = "x"
external_id = "ext-42"
region = "us-east-1"
[[modules]]
id = "good-one"
subscribe_events = ["*"]
role_arn = "arn:aws:iam::123:role/w"
region = "us-east-1"
stream_name = "s"
surprise = true
"#,
    )
    .unwrap();
    let (ok, _, stderr) = ksm_command(&["validate", "--config", path.to_str().unwrap()]);
    assert!(!ok, "an invalid config must fail");
    for field in [
        "modules[0].id",
        "modules[0].subscribe_events",
        "modules[0].external_id",
        "modules[0].stream_name",
        "modules[1].role_arn",
        "modules[1].surprise",
    ] {
        assert!(stderr.contains(field), "{field} missing from:\n{stderr}");
    }
}

#[test]
fn validate_loads_the_component() {
    let dir = TempDir::new("validate-component");
    let path = dir.path().join("no-component.toml");
    let example =
        std::fs::read_to_string(workspace_root().join("examples/quickstart.toml")).unwrap();
    std::fs::write(
        &path,
        example.replace(
            "target/wasm32-wasip2/release/ksm_guest.wasm",
            "/nonexistent/guest.wasm",
        ),
    )
    .unwrap();
    let (ok, _, stderr) = ksm_command(&["validate", "--config", path.to_str().unwrap()]);
    assert!(!ok, "a missing component must fail validation");
    assert!(
        stderr.contains("component.path") && stderr.contains("/nonexistent/guest.wasm"),
        "{stderr}"
    );
}

#[test]
fn the_example_configs_validate() {
    guest_wasm();
    let examples = workspace_root().join("examples");
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, stdout, stderr) =
                ksm_command(&["validate", "--config", path.to_str().unwrap()]);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains("valid"), "{stdout}");
        }
    }
}

#[test]
fn bulk_encode_writes_the_payload_for_the_files() {
    let dir = TempDir::new("bulk-encode");
    let a = dir.path().join("a.bin");
    let b = dir.path().join("b.json");
    std::fs::write(&a, [0u8, 1, 2, 255]).unwrap();
    std::fs::write(&b, br#"{"t":1}"#).unwrap();
    let output = std::process::Command::new(ksm_tests::ksm_binary())
        .args(["bulk", "encode"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(output.status.success());
    let mut expected = vec![0xa3];
    expected.extend(b"1.0");
    expected.extend([0xc4, 4, 0, 1, 2, 255]);
    expected.extend([0xc4, 7]);
    expected.extend(br#"{"t":1}"#);
    assert_eq!(output.stdout, expected);
    let (ok, _, stderr) = ksm_command(&["bulk", "encode", "/nonexistent/file"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/file"), "{stderr}");
}

#[test]
fn the_reference_guest_passes_conformance() {
    let wasm = guest_wasm();
    let (ok, stdout, stderr) = ksm_command(&["conformance", wasm.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let words: Vec<&str> = last.split(' ').collect();
    let passed: usize = words[words.len() - 4].parse().unwrap();
    assert!(passed >= 30, "{passed} cases");
}

#[test]
fn a_missing_component_is_a_clear_error() {
    let (ok, _, stderr) = ksm_command(&["conformance", "/nonexistent/guest.wasm"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/guest.wasm"), "{stderr}");
}
