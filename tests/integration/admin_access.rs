//! Who may use the admin API: with a token (`KSM_ADMIN_TOKEN` or
//! `admin.token_file`) every endpoint but `/api/health` needs it, and the
//! dead-letter CLI finds it; without one, `ksm validate` refuses to listen
//! beyond loopback; announced bodies are bounded; and with `admin.tls` the
//! API speaks HTTPS only.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use ksm_host::admin_client::AdminClient;
use ksm_host::config::TOKEN_ENV;
use ksm_tests::tls::TestPki;
use ksm_tests::{TempDir, aws_env, guest_wasm};

use crate::support::{
    Bench, HostOptions, Ksm, config_with_options, ksm_command_with_env, module, raw_http,
};

/// The admin token of these tests (at least 16 characters).
const TOKEN: &str = "admin-token-0123456789abcdef";

/// The module of every host here; it takes every event.
const MODULE: &str = "guarded";

/// A payload the guest refuses: it becomes one dead letter.
const NOT_JSON: (&str, &str) = ("/devices/1001/event", "not json");

/// Writes `token` to `name` in `dir`, readable by its owner only, and returns its path.
fn token_file(dir: &TempDir, name: &str, token: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, format!("{token}\n")).expect("write the token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 the token file");
    path
}

/// The configuration of a host on `bench` with one module, and extra `[admin]` lines.
fn host_config(bench: &Bench, client_id: &str, admin: &str) -> String {
    config_with_options(
        &bench.broker.url(),
        client_id,
        &guest_wasm(),
        &[module(MODULE, &bench.stream, "subscribe_events = [\"*\"]")],
        &HostOptions {
            admin: admin.to_owned(),
            ..HostOptions::default()
        },
    )
}

/// A host on `bench` whose admin token is `KSM_ADMIN_TOKEN` in its environment.
fn host_with_env_token(bench: &Bench, client_id: &str) -> Ksm {
    let mut env = aws_env(&bench.moto.endpoint(), &bench.moto.endpoint());
    env.push((TOKEN_ENV.to_owned(), TOKEN.to_owned()));
    Ksm::start(&host_config(bench, client_id, ""), env)
}

/// Status of `method path` with the token `token` (none for `None`).
fn status_with(host: &Ksm, token: Option<&str>, method: &str, path: &str) -> u16 {
    AdminClient::new(host.admin_addr())
        .with_token(token.map(str::to_owned))
        .request(method, path)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", host.log()))
        .0
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_every_endpoint_but_health_needs_it() {
    let bench = Bench::new("admin-token", 1).await;
    let host = host_with_env_token(&bench, "ksm-admin-token");
    bench.publish(&[NOT_JSON]).await;
    host.wait_for_counters(MODULE, |c| c["dead_lettered"] == 1);

    let refused = raw_http(host.admin_addr(), "GET /api/modules", &[]).expect("GET /api/modules");
    assert_eq!(refused.status, 401, "{refused:?}");
    let challenge = refused.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{refused:?}");
    assert!(
        refused.body.contains("Authorization: Bearer"),
        "says what is missing: {refused:?}"
    );

    let modules = host.get("/api/modules");
    assert_eq!(modules[0]["id"], MODULE, "with the token: {modules}");

    let wrong = "admin-token-0123456789abcdeX";
    let logs = format!("/api/modules/{MODULE}/logs");
    let letters = format!("/api/modules/{MODULE}/dead-letters");
    let one = format!("/api/modules/{MODULE}");
    let endpoints = [
        ("GET", "/api/modules"),
        ("GET", one.as_str()),
        ("GET", "/api/config"),
        ("GET", "/metrics"),
        ("GET", logs.as_str()),
        ("GET", letters.as_str()),
        ("POST", "/api/component/reload"),
    ];
    for (token, expected) in [
        (None, 401),
        (Some(wrong), 401),
        (Some(&TOKEN[..TOKEN.len() - 1]), 401),
        (Some(TOKEN), 200),
    ] {
        for (method, path) in endpoints {
            assert_eq!(
                status_with(&host, token, method, path),
                expected,
                "{method} {path} with token {token:?}"
            );
        }
    }
    for token in [None, Some(wrong)] {
        for open in ["/api/health", "/", "/console.js", "/console.css"] {
            assert_eq!(
                status_with(&host, token, "GET", open),
                200,
                "{open} is open, token {token:?}"
            );
        }
    }
    let without_bearer = raw_http(
        host.admin_addr(),
        "GET /api/modules",
        &[&format!("Authorization: {TOKEN}")],
    )
    .expect("GET /api/modules");
    assert_eq!(
        without_bearer.status, 401,
        "the token alone is not `Bearer TOKEN`"
    );

    // Refused purges, replays and module changes do nothing: the dead
    // letter and the module are still there.
    let replay = format!("{letters}/replay");
    for token in [None, Some(wrong)] {
        assert_eq!(status_with(&host, token, "DELETE", &letters), 401);
        assert_eq!(status_with(&host, token, "POST", &replay), 401);
        assert_eq!(status_with(&host, token, "DELETE", &one), 401);
        assert_eq!(status_with(&host, token, "PUT", &one), 401);
        assert_eq!(status_with(&host, token, "POST", "/api/modules"), 401);
    }
    assert_eq!(host.all_dead_letters(MODULE).len(), 1);
    assert_eq!(host.get("/api/modules").as_array().map(Vec::len), Some(1));
    let log = host.module_log(MODULE);
    assert!(
        !log.contains("purged") && !log.contains("queued for replay"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_announcing_a_body_over_4_mib_is_refused_with_413() {
    let bench = Bench::new("admin-413", 1).await;
    let mut host = host_with_env_token(&bench, "ksm-admin-413");
    let addr = host.admin_addr();
    let bearer = format!("Authorization: Bearer {TOKEN}");
    for (request, headers) in [
        ("POST /api/component/reload", vec![bearer.as_str()]),
        ("POST /api/component/reload", vec![]),
        ("GET /api/health", vec![]),
    ] {
        let mut headers = headers;
        headers.push("Content-Length: 5000000");
        // The headers only: the answer must come without the body being sent.
        let answer = raw_http(addr, request, &headers).expect("an answer before the body");
        assert_eq!(answer.status, 413, "{request} {headers:?}: {answer:?}");
        assert!(
            answer.body.contains("4194304"),
            "says the limit: {answer:?}"
        );
    }
    let empty = raw_http(addr, "GET /api/health", &["Content-Length: 0"]).expect("health");
    assert_eq!(empty.status, 200, "an empty body is fine: {empty:?}");
    assert!(host.is_up(), "{}", host.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reads_the_token_file_from_the_config_and_the_environment_otherwise() {
    let bench = Bench::new("admin-token-file", 1).await;
    let secrets = TempDir::new("admin-secrets");
    let file = token_file(&secrets, "admin.token", TOKEN);
    let config = host_config(
        &bench,
        "ksm-admin-token-file",
        &format!("token_file = \"{}\"", file.display()),
    );
    // No KSM_ADMIN_TOKEN: the file alone gives the token.
    let host = Ksm::start_with_admin(
        &config,
        aws_env(&bench.moto.endpoint(), &bench.moto.endpoint()),
        |addr| AdminClient::new(addr).with_token(Some(TOKEN.to_owned())),
    );
    bench.publish(&[NOT_JSON]).await;
    host.wait_for_counters(MODULE, |c| c["dead_lettered"] == 1);
    assert_eq!(status_with(&host, None, "GET", "/api/modules"), 401);

    let config_path = host.config_path().display().to_string();
    let (ok, listed, stderr) = ksm_command_with_env(
        &["dead-letters", "list", "--config", &config_path, MODULE],
        &[],
    );
    assert!(
        ok,
        "the CLI takes the token from admin.token_file: {stderr}"
    );
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(listed.contains(NOT_JSON.0), "{listed}");

    let addr = host.admin_addr().to_string();
    let by_address = ["dead-letters", "list", "--admin", &addr, MODULE];
    let (ok, stdout, stderr) = ksm_command_with_env(&by_address, &[]);
    assert!(!ok, "no token for a bare address: {stdout}");
    assert!(stderr.contains("401"), "says 401: {stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");

    let (ok, stdout, stderr) = ksm_command_with_env(&by_address, &[(TOKEN_ENV, TOKEN)]);
    assert!(ok, "the token of KSM_ADMIN_TOKEN: {stderr}");
    assert_eq!(stdout, listed);
}

/// A valid host configuration listening on `listen`, with extra `[admin]`
/// lines, written to `name` in `dir`; returns its path.
fn write_config(dir: &TempDir, name: &str, listen: &str, admin: &str) -> PathBuf {
    let text = config_with_options(
        "mqtt://127.0.0.1:1883",
        "ksm-validate-admin",
        &guest_wasm(),
        &[module(MODULE, "a-stream", "subscribe_events = [\"*\"]")],
        &HostOptions {
            admin: admin.to_owned(),
            ..HostOptions::default()
        },
    );
    let start = text.find("listen = \"").expect("a listen line") + "listen = \"".len();
    let end = start + text[start..].find('"').expect("a quoted address");
    let text = format!("{}{listen}{}", &text[..start], &text[end..]).replace(
        "@STORAGE_DIR@",
        &dir.path().join("data").display().to_string(),
    );
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write the config");
    path
}

/// `ksm validate --config path` with `env` (and no other admin token).
fn validate(path: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    ksm_command_with_env(
        &["validate", "--config", path.to_str().expect("UTF-8")],
        env,
    )
}

#[test]
fn validate_refuses_listening_beyond_loopback_without_a_token() {
    let dir = TempDir::new("validate-admin");
    let open = write_config(&dir, "open.toml", "0.0.0.0:18686", "");
    let (ok, stdout, stderr) = validate(&open, &[]);
    assert!(!ok, "no token on every address: {stdout}");
    assert!(stderr.contains("admin.listen"), "{stderr}");
    assert!(
        stderr.contains("0.0.0.0:18686") && stderr.contains("loopback") && stderr.contains("token"),
        "says why: {stderr}"
    );

    let (ok, stdout, stderr) = validate(&open, &[(TOKEN_ENV, TOKEN)]);
    assert!(ok, "KSM_ADMIN_TOKEN gives a token: {stderr}");
    assert!(stdout.contains("valid"), "{stdout}");

    let file = token_file(&dir, "admin.token", TOKEN);
    let guarded = write_config(
        &dir,
        "guarded.toml",
        "0.0.0.0:18686",
        &format!("token_file = \"{}\"", file.display()),
    );
    let (ok, stdout, stderr) = validate(&guarded, &[]);
    assert!(ok, "a token file: {stderr}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(!stderr.contains("admin."), "no finding: {stderr}");

    let loopback = write_config(&dir, "loopback.toml", "127.0.0.1:18686", "");
    let (ok, _, stderr) = validate(&loopback, &[]);
    assert!(ok, "loopback needs no token: {stderr}");
}

#[test]
fn validate_checks_the_token_file() {
    let dir = TempDir::new("validate-token-file");
    let short = token_file(&dir, "short.token", "only-15-chars..");
    let path = write_config(
        &dir,
        "short.toml",
        "127.0.0.1:18686",
        &format!("token_file = \"{}\"", short.display()),
    );
    let (ok, stdout, stderr) = validate(&path, &[]);
    assert!(!ok, "a 15-character token: {stdout}");
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("at least 16 characters"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("only-15-chars.."),
        "the token is not shown: {stderr}"
    );

    let missing = dir.path().join("missing.token");
    let path = write_config(
        &dir,
        "missing.toml",
        "127.0.0.1:18686",
        &format!("token_file = \"{}\"", missing.display()),
    );
    let (ok, _, stderr) = validate(&path, &[]);
    assert!(!ok, "a missing token file");
    assert!(
        stderr.contains("admin.token_file") && stderr.contains("missing.token"),
        "{stderr}"
    );

    let readable = token_file(&dir, "readable.token", TOKEN);
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    let path = write_config(
        &dir,
        "readable.toml",
        "0.0.0.0:18686",
        &format!("token_file = \"{}\"", readable.display()),
    );
    let (ok, _, stderr) = validate(&path, &[]);
    assert!(ok, "a world-readable token still works: {stderr}");
    assert!(
        stderr.contains("warning: admin.token_file") && stderr.contains("readable by every user"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_admin_tls_the_api_speaks_https_only() {
    let pki = TestPki::new();
    let bench = Bench::new("admin-https", 1).await;
    let server = pki.server();
    let mut host = https_host(
        &bench,
        "ksm-admin-https",
        &server.cert,
        &server.key,
        pki.ca_file(),
    );
    let modules = host.get("/api/modules");
    assert_eq!(modules[0]["id"], MODULE, "over HTTPS: {modules}");
    let (status, metrics) = host.get_raw("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("ksm_mqtt_connected 1"), "{metrics}");

    let addr = host.admin_addr();
    match raw_http(addr, "GET /api/health", &[]) {
        Ok(answer) => panic!("plain HTTP was answered: {answer:?}"),
        Err(error) => assert_ne!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "the port is open, only HTTP is not spoken: {error}"
        ),
    }
    let plain = AdminClient::new(addr).request("GET", "/api/health");
    assert!(plain.is_err(), "plain HTTP: {plain:?}");

    let untrusting = trusting(pki.other_ca_file());
    let refused = AdminClient::new(addr)
        .with_tls(untrusting)
        .request("GET", "/api/health");
    assert!(
        refused.is_err(),
        "a certificate of an unknown CA: {refused:?}"
    );

    // Broken handshakes did not stop the API.
    assert!(host.is_up(), "{}", host.log());
}

/// A client configuration that trusts the certificates in `ca_file` only.
fn trusting(ca_file: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    ksm_host::tls::client::broker_config(&ksm_host::config::MqttTlsConfig {
        ca_file: Some(ca_file.to_owned()),
        ..Default::default()
    })
    .expect("a client config")
    .config
}

/// A host on `bench` serving its admin API over HTTPS with `cert_file` and
/// `key_file`, reached by the test with a client trusting `trust`.
fn https_host(
    bench: &Bench,
    client_id: &str,
    cert_file: &Path,
    key_file: &Path,
    trust: &Path,
) -> Ksm {
    let config = host_config(
        bench,
        client_id,
        &format!(
            "tls = {{ cert_file = \"{}\", key_file = \"{}\" }}",
            cert_file.display(),
            key_file.display()
        ),
    );
    let trusted = trusting(trust);
    Ksm::start_with_admin(
        &config,
        aws_env(&bench.moto.endpoint(), &bench.moto.endpoint()),
        |addr| AdminClient::new(addr).with_tls(trusted),
    )
}

/// `ksm dead-letters list --config` of `host`, with no token: (success, stdout, stderr).
fn cli_list(host: &Ksm) -> (bool, String, String) {
    let config_path = host.config_path().display().to_string();
    ksm_command_with_env(
        &["dead-letters", "list", "--config", &config_path, MODULE],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reaches_an_https_api_with_a_self_signed_certificate_through_its_config() {
    let dir = TempDir::new("admin-self-signed");
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    let (cert_file, key_file) = (dir.path().join("admin.crt"), dir.path().join("admin.key"));
    std::fs::write(&cert_file, certified.cert.pem()).expect("write the certificate");
    std::fs::write(&key_file, certified.signing_key.serialize_pem()).expect("write the key");
    let bench = Bench::new("admin-self-signed", 1).await;
    let host = https_host(
        &bench,
        "ksm-admin-self-signed",
        &cert_file,
        &key_file,
        &cert_file,
    );
    bench.publish(&[NOT_JSON]).await;
    host.wait_for_counters(MODULE, |c| c["dead_lettered"] == 1);
    let (ok, listed, stderr) = cli_list(&host);
    assert!(ok, "the CLI trusts admin.tls.cert_file: {stderr}");
    assert!(listed.contains(NOT_JSON.0), "{listed}");
}

/// `AdminClient::for_config` trusts exactly the certificate in
/// `admin.tls.cert_file`, so the usual leaf of a private CA is reached too.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_reaches_an_https_api_whose_certificate_a_private_ca_signed() {
    let pki = TestPki::new();
    let bench = Bench::new("admin-https-cli", 1).await;
    let server = pki.server();
    let host = https_host(
        &bench,
        "ksm-admin-https-cli",
        &server.cert,
        &server.key,
        pki.ca_file(),
    );
    let (ok, _, stderr) = cli_list(&host);
    assert!(
        ok,
        "the CLI over HTTPS with the config's certificate: {stderr}"
    );
}
