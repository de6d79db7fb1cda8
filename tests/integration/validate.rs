//! `ksm validate`, `ksm bulk encode` and `ksm conformance` as users run them.

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ksm_tests::{
    TempDir, conformance_binary, guest_wasm, ksm_binary, misbehaving_guest_wasm, workspace_root,
};

use crate::support::ksm_command;

/// The generous bound on a conformance run of a few hopeless cases (before per-case limits, a
/// looping `configure` took 5 s per case, minutes for a suite).
const HOPELESS_RUN_BOUND: Duration = Duration::from_secs(30);

/// The shipped case 001, with its settings' `subscribe_events` set to `events` (TOML).
fn case_with_events(events: &str) -> String {
    let case = std::fs::read_to_string(
        workspace_root().join("tests/conformance/1.0/001-device-event-exact-match/case.toml"),
    )
    .expect("read the shipped case 001");
    let edited = case.replace(
        r#"subscribe_events = ["temperature"]"#,
        &format!("subscribe_events = {events}"),
    );
    assert_ne!(edited, case, "case 001 subscribes to [\"temperature\"]");
    edited
}

/// Writes `case_toml` as the case `name` in `dir`.
fn write_case(dir: &Path, name: &str, case_toml: &str) {
    std::fs::create_dir_all(dir.join(name)).expect("create the case directory");
    std::fs::write(dir.join(name).join("case.toml"), case_toml).expect("write case.toml");
}

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

/// The files under `/etc/ksm/` the example configurations name, made for the test: test
/// certificates for the CA, client and admin certificates, secrets of mode 0600.
fn example_files(pki: &ksm_tests::tls::TestPki, dir: &std::path::Path) -> Vec<(String, String)> {
    use std::os::unix::fs::PermissionsExt;
    let secret = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a secret file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the secret file");
        path
    };
    let read = |path: &std::path::Path| std::fs::read_to_string(path).expect("read a key");
    let client = pki.client("ksm-forwarder");
    let server = pki.server();
    [
        ("AmazonRootCA1.pem", pki.ca_file().to_owned()),
        ("ksm-forwarder.cert.pem", client.cert),
        (
            "ksm-forwarder.private.key",
            secret("client.key", &read(&client.key)),
        ),
        ("mqtt-password", secret("mqtt-password", "a-password\n")),
        (
            "admin-token",
            secret("admin-token", "an-admin-token-of-32-characters!\n"),
        ),
        ("admin.pem", server.cert.clone()),
        ("admin.key", secret("admin.key", &read(&server.key))),
    ]
    .into_iter()
    .map(|(name, path)| (format!("/etc/ksm/{name}"), path.display().to_string()))
    .collect()
}

#[test]
fn the_example_configs_validate() {
    guest_wasm();
    let pki = ksm_tests::tls::TestPki::new();
    let dir = TempDir::new("examples");
    let files = example_files(&pki, dir.path());
    let examples = workspace_root().join("examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // The same configuration, its files under /etc/ksm made by the test.
            let mut text = std::fs::read_to_string(&path).expect("read the example");
            for (named, made) in &files {
                text = text.replace(named, made);
            }
            assert!(
                !text.contains("/etc/ksm/"),
                "{}: a file the test does not make",
                path.display()
            );
            let copy = dir.path().join(path.file_name().expect("a file name"));
            std::fs::write(&copy, text).expect("write the example's copy");
            let (ok, stdout, stderr) =
                ksm_command(&["validate", "--config", copy.to_str().unwrap()]);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains("valid"), "{stdout}");
            assert!(!stderr.contains("warning"), "{}: {stderr}", path.display());
            seen.push(
                path.file_name()
                    .expect("a name")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    for tls_example in [
        "aws-iot-core.toml",
        "aws-iot-core-443.toml",
        "tls-password.toml",
    ] {
        assert!(
            seen.iter().any(|name| name == tls_example),
            "{tls_example} validated: {seen:?}"
        );
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
    // The default case limit (2 s, each call 1/18 of it).
    let (ok, stdout, stderr) = ksm_command(&["conformance", wasm.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    check_full_pass(&stdout);
}

/// A run of the built-in cases by a 1.1 guest that passed: the contract
/// line, a line per case (1.0 and 1.1 cases), the cost of each call kind in
/// both forms, the summary.
fn check_full_pass(stdout: &str) {
    let lines: Vec<&str> = stdout.lines().collect();
    let (last, lines) = lines.split_last().expect("some output");
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let words: Vec<&str> = last.split(' ').collect();
    let passed: usize = words[words.len() - 4]
        .parse()
        .expect("the summary counts passed cases");
    assert!(passed >= 100, "{passed} cases");
    assert!(
        lines[0].ends_with(": ksm:smart-module@1.1 (batches)"),
        "{}",
        lines[0]
    );
    let cases: Vec<&&str> = lines.iter().filter(|l| l.starts_with("ok   ")).collect();
    assert_eq!(cases.len(), passed, "a line per case:\n{stdout}");
    assert!(cases.iter().any(|l| l.starts_with("ok   1.0/")), "{stdout}");
    assert!(
        cases.iter().any(|l| l.starts_with("ok   1.1/2")),
        "{stdout}"
    );
    let costs: Vec<&&str> = lines.iter().filter(|l| l.starts_with("cost ")).collect();
    for kind in ["device-event", "home-event", "bulk-data"] {
        for form in ["one per call", "batches of 64"] {
            assert!(
                costs
                    .iter()
                    .any(|l| l.contains(kind) && l.contains(form) && l.contains(" ns per message")),
                "no {kind} cost {form}:\n{stdout}"
            );
        }
    }
    assert_eq!(
        lines.len(),
        1 + passed + costs.len() + 1,
        "the contract, the cases, a note on the debug build, the costs:\n{stdout}"
    );
}

#[test]
fn the_standalone_tool_runs_the_built_in_cases_without_the_source_tree() {
    let dir = TempDir::new("conformance-installed");
    // Installed: the tool and the guest alone in a directory, run from there.
    let tool = dir.path().join("ksm-conformance");
    std::fs::copy(conformance_binary(), &tool).unwrap();
    std::fs::copy(guest_wasm(), dir.path().join("guest.wasm")).unwrap();
    let output = Command::new(&tool)
        .arg("guest.wasm")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    check_full_pass(&stdout);

    // The built-in cases, written out, are the same suite read from files.
    let output = Command::new(&tool)
        .args(["--write-cases", "cases"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(
        dir.path()
            .join("cases/1.0/001-device-event-exact-match/case.toml")
            .is_file()
    );
    assert!(
        dir.path()
            .join("cases/1.1/200-batch-mixed-kinds-in-order/case.toml")
            .is_file()
    );
    let output = Command::new(&tool)
        .args(["guest.wasm", "--cases", "cases"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let from_files = String::from_utf8_lossy(&output.stdout);
    let summary = |text: &str| text.lines().last().unwrap_or_default().to_owned();
    assert_eq!(summary(&from_files), summary(&stdout));
}

#[test]
fn a_guest_whose_configure_loops_is_reported_in_seconds() {
    let dir = TempDir::new("conformance-loop");
    let looping = case_with_events(r#"["configure:loop"]"#);
    for i in 1..=8 {
        write_case(dir.path(), &format!("{i:03}-configure-loops"), &looping);
    }
    let fixture = misbehaving_guest_wasm();
    let started = Instant::now();
    let (ok, stdout, stderr) = ksm_command(&[
        "conformance",
        fixture.to_str().unwrap(),
        "--cases",
        dir.path().to_str().unwrap(),
    ]);
    let took = started.elapsed();
    assert!(!ok, "a guest that loops must fail:\n{stdout}\n{stderr}");
    assert!(
        took < HOPELESS_RUN_BOUND,
        "took {took:?}, over {HOPELESS_RUN_BOUND:?}:\n{stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        11,
        "the contract, 8 cases, why the run stopped, the summary:\n{stdout}"
    );
    let lines = &lines[1..];
    for (i, line) in lines[..3].iter().enumerate() {
        let want = format!(
            "FAIL {:03}-configure-loops: ran past the case limit of 2000 ms in configure (",
            i + 1
        );
        assert!(line.starts_with(&want), "{line}");
    }
    assert!(
        lines[3].starts_with("stopped: 3 cases in a row ran past the case limit of 2000 ms")
            && lines[3].contains("the 5 case(s) left are not run"),
        "{}",
        lines[3]
    );
    for (i, line) in lines[4..9].iter().enumerate() {
        assert_eq!(*line, format!("FAIL {:03}-configure-loops: not run", i + 4));
    }
    assert_eq!(lines[9], "conformance: 0 passed, 8 failed");
}

#[test]
fn conformance_prints_each_case_as_it_finishes() {
    let dir = TempDir::new("conformance-progress");
    write_case(
        dir.path(),
        "001-configure-loops",
        &case_with_events(r#"["configure:loop"]"#),
    );
    // The second case's payload is a named pipe: the run cannot go past it until the test
    // writes to it, so the first case's line must come out while the run is still going.
    let waiting = case_with_events(r#"["*"]"#);
    let payload_line = waiting
        .lines()
        .find(|line| line.starts_with("payload = "))
        .unwrap();
    write_case(
        dir.path(),
        "002-payload-from-a-pipe",
        &waiting.replace(payload_line, r#"payload_file = "payload.fifo""#),
    );
    let fifo = dir.path().join("002-payload-from-a-pipe/payload.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo {}", fifo.display());

    let mut child = Command::new(ksm_binary())
        .arg("conformance")
        .arg(misbehaving_guest_wasm())
        .arg("--cases")
        .arg(dir.path())
        .args(["--case-timeout-ms", "500"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let header = lines_rx.recv_timeout(HOPELESS_RUN_BOUND);
    let first = lines_rx.recv_timeout(HOPELESS_RUN_BOUND);
    let unblocked = write_to_pipe(&fifo, br#"{"eventType":"t","eventData":{}}"#);
    let status = child.wait().unwrap();
    let header = header.expect("the contract line first");
    assert!(header.ends_with("(batches)"), "{header}");
    let first = first.expect("the first case's line before the run went on");
    unblocked.expect("the run reads the second case's payload");
    assert!(
        first.starts_with(
            "FAIL 001-configure-loops: ran past the case limit of 500 ms in configure ("
        ),
        "{first}"
    );
    let rest: Vec<String> = lines_rx.iter().collect();
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert!(
        rest[0].starts_with("FAIL 002-payload-from-a-pipe: "),
        "{rest:?}"
    );
    assert_eq!(rest[1], "conformance: 0 passed, 2 failed");
    assert!(!status.success());
}

/// Opens the named pipe for writing once a reader has it open (waiting up to
/// [`HOPELESS_RUN_BOUND`]), writes `data` and closes it.
fn write_to_pipe(fifo: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    /// Linux's `O_NONBLOCK`: opening a pipe's writing end fails at once while it has no reader.
    const O_NONBLOCK: i32 = 0o4000;
    let deadline = Instant::now() + HOPELESS_RUN_BOUND;
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(fifo)
        {
            Ok(mut pipe) => return pipe.write_all(data),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_missing_component_is_a_clear_error() {
    let (ok, _, stderr) = ksm_command(&["conformance", "/nonexistent/guest.wasm"]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/guest.wasm"), "{stderr}");
}
