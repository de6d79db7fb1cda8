//! TLS and mutual-TLS brokers: real Mosquitto TLS listeners with certificates made by the
//! test (a CA, a server certificate for 127.0.0.1, client certificates, broken ones), moto for
//! Kinesis. Device identity enforced at the broker, every connection failure users meet first
//! explained in the host log and every module's log, a rotated certificate picked up at the
//! next reconnection with nothing lost meanwhile, and no secret in any log at trace level.

use std::path::Path;
use std::time::{Duration, Instant};

use ksm_tests::mosquitto::TlsBroker;
use ksm_tests::mqtt::{ClientTls, PublishAnswer, publish_all_tls, publish_one_tls};
use ksm_tests::tls::{CertFiles, KeyKind, TestPki};
use ksm_tests::{Mosquitto, RecordingProxy, TempDir, aws_env};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

use crate::support::{Bench, HostOptions, Ksm, config_with_options, ksm_command, module};

/// How long a test waits for ksm to log what went wrong.
const LOG_TIMEOUT: Duration = Duration::from_secs(20);

const EVENT: &str = r#"{"eventType":"t","eventData":{"n":1}}"#;

/// `[mqtt]` lines for TLS with `ca_file` and, if given, a client certificate.
fn tls_lines(ca_file: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut lines = format!("tls.ca_file = \"{}\"\n", ca_file.display());
    if let Some((cert, key)) = client {
        lines.push_str(&format!(
            "tls.client_cert_file = \"{}\"\ntls.client_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    lines
}

/// A bench whose broker is `broker` (the plain one it started is dropped).
async fn bench_on(prefix: &str, broker: Mosquitto) -> Bench {
    let mut bench = Bench::new(prefix, 1).await;
    bench.broker = broker;
    bench
}

/// A host's configuration text: broker `url`, `[mqtt]` lines, two modules taking every event.
fn host_config(bench: &Bench, url: &str, client_id: &str, mqtt: &str) -> String {
    config_with_options(
        url,
        client_id,
        &ksm_tests::guest_wasm(),
        &[
            module("first", &bench.stream, "subscribe_events = [\"*\"]"),
            module("second", &bench.stream, "subscribe_events = [\"*\"]"),
        ],
        &HostOptions {
            mqtt: mqtt.to_owned(),
            ..HostOptions::default()
        },
    )
}

/// Starts a host that may not connect: no wait for it to be ready.
fn start_unready(bench: &Bench, config: &str) -> Ksm {
    let endpoint = bench.moto.endpoint();
    let mut host = Ksm::prepare(config, aws_env(&endpoint, &endpoint), None);
    host.spawn_unchecked();
    host
}

/// Waits (bounded) until every module's log has an ERROR entry containing `wanted`, and the
/// host log has it too; panics with both logs otherwise.
fn wait_for_error_everywhere(host: &mut Ksm, wanted: &str) {
    let deadline = Instant::now() + LOG_TIMEOUT;
    loop {
        let explained = |log: &str| {
            log.lines()
                .any(|line| line.starts_with("\"ERROR\"") && line.contains(wanted))
        };
        let modules_say = ["first", "second"]
            .iter()
            .all(|id| explained(&host.module_log_when_up(id)));
        if modules_say && host.log().contains(wanted) {
            assert!(host.is_running(), "the host keeps running:\n{}", host.log());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no ERROR saying `{wanted}` in every log within {LOG_TIMEOUT:?}:\nmodule log:\n{}\nhost log:\n{}",
            host.module_log_when_up("first"),
            host.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_may_publish_only_under_its_own_id_at_a_mutual_tls_broker() {
    let pki = TestPki::new();
    let bench = bench_on(
        "tls-identity",
        Mosquitto::start_tls(TlsBroker::device_identity(&pki)),
    )
    .await;
    let ksm_identity = pki.client_with_key("ksm", KeyKind::Rsa2048);
    let url = bench.broker.tls_url();
    let config = host_config(
        &bench,
        &url,
        "ksm",
        &tls_lines(pki.ca_file(), Some((&ksm_identity.cert, &ksm_identity.key))),
    );
    let endpoint = bench.moto.endpoint();
    let host = Ksm::start(&config, aws_env(&endpoint, &endpoint));
    assert!(
        host.log()
            .contains("TLS client certificate for the MQTT broker: subject CN=ksm"),
        "the log says which certificate is in use:\n{}",
        host.log()
    );

    let device = ClientTls::new(pki.ca_file()).identity(&pki.client("1001"));
    let forged = publish_one_tls(&url, &device, "/devices/1002/event", EVENT.into()).await;
    assert_eq!(
        forged,
        PublishAnswer::PubAck(PubAckReason::NotAuthorized),
        "the broker refuses a publish under another device's ID"
    );
    publish_all_tls(
        &url,
        &device,
        &[
            ("/devices/1001/event", EVENT),
            ("/devices/1001/event", EVENT),
        ],
    )
    .await;
    let records = bench.records(4).await;
    assert_eq!(records.len(), 4, "two events, two modules:\n{}", host.log());
    assert!(
        records.iter().all(|r| r.partition_key == "1001"),
        "nothing of device 1002 reached the stream: {records:?}"
    );
}

/// A broker for a failure case, and the host settings that meet it.
struct Case {
    name: &'static str,
    broker: TlsBroker,
    /// The broker URL ksm is given: TLS or plain port, mqtts:// or mqtt://.
    url: fn(&Mosquitto) -> String,
    /// `[mqtt]` lines.
    mqtt: String,
    /// What the ERROR entries must say.
    wanted: &'static str,
}

#[tokio::test(flavor = "multi_thread")]
async fn each_failure_to_connect_is_explained_in_every_log_and_the_host_keeps_trying() {
    let pki = TestPki::new();
    let tls = |broker: &Mosquitto| broker.tls_url();
    let ksm_client = pki.client("ksm");
    let with_client =
        |client: &CertFiles| tls_lines(pki.ca_file(), Some((&client.cert, &client.key)));
    let requiring = TlsBroker {
        require_certificate: true,
        ..TlsBroker::new(&pki)
    };
    let cases = [
        Case {
            name: "unknown CA",
            broker: TlsBroker::new(&pki),
            url: tls,
            mqtt: tls_lines(pki.other_ca_file(), None),
            wanted: "not signed by a CA ksm trusts",
        },
        Case {
            name: "name mismatch",
            broker: TlsBroker {
                server: pki.wrong_name_server(),
                ..TlsBroker::new(&pki)
            },
            url: tls,
            mqtt: tls_lines(pki.ca_file(), None),
            wanted: "not valid for 127.0.0.1 (it names wrong.example)",
        },
        Case {
            name: "expired server certificate",
            broker: TlsBroker {
                server: pki.expired_server(),
                ..TlsBroker::new(&pki)
            },
            url: tls,
            mqtt: tls_lines(pki.ca_file(), None),
            wanted: "the broker's certificate expired at",
        },
        Case {
            name: "no client certificate",
            broker: requiring.clone(),
            url: tls,
            mqtt: tls_lines(pki.ca_file(), None),
            wanted: "the broker requires a client certificate",
        },
        Case {
            name: "expired client certificate",
            broker: requiring.clone(),
            url: tls,
            mqtt: with_client(&pki.expired_client("ksm")),
            wanted: "refused ksm's client certificate: it has expired",
        },
        Case {
            name: "client certificate from another CA",
            broker: requiring.clone(),
            url: tls,
            mqtt: with_client(&pki.foreign_client("ksm")),
            wanted: "does not trust the CA that signed ksm's client certificate",
        },
        Case {
            name: "client certificate not yet valid",
            broker: requiring,
            url: tls,
            mqtt: with_client(&pki.not_yet_valid_client("ksm")),
            wanted: "the broker refused ksm's client certificate",
        },
        Case {
            name: "plain MQTT to the TLS port",
            broker: TlsBroker::new(&pki),
            url: |broker| format!("mqtt://127.0.0.1:{}", broker.tls_port()),
            mqtt: String::new(),
            wanted: "use mqtts://",
        },
        Case {
            name: "TLS to the plain port",
            broker: TlsBroker {
                plain_listener: true,
                ..TlsBroker::new(&pki)
            },
            url: |broker| format!("mqtts://127.0.0.1:{}", broker.port()),
            mqtt: with_client(&ksm_client),
            wanted: "plain MQTT port, use mqtt://",
        },
    ];
    let mut bench = Bench::new("tls-failures", 1).await;
    for case in cases {
        bench.broker = Mosquitto::start_tls(case.broker);
        let config = host_config(&bench, &(case.url)(&bench.broker), "ksm", &case.mqtt);
        let mut host = start_unready(&bench, &config);
        println!("case: {}", case.name);
        wait_for_error_everywhere(&mut host, case.wanted);
        assert_eq!(
            host.get_raw("/api/health").0,
            503,
            "{}: not ready while it cannot connect",
            case.name
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_that_is_not_the_certificates_stops_the_start_and_validate_names_it() {
    let pki = TestPki::new();
    let bench = bench_on(
        "tls-key",
        Mosquitto::start_tls(TlsBroker::device_identity(&pki)),
    )
    .await;
    let certificate = pki.client("ksm");
    let mismatched = pki.unmatched_key();
    let config = host_config(
        &bench,
        &bench.broker.tls_url(),
        "ksm",
        &tls_lines(pki.ca_file(), Some((&certificate.cert, &mismatched))),
    );
    let mut host = start_unready(&bench, &config);
    let status = host
        .wait_for_exit(LOG_TIMEOUT)
        .unwrap_or_else(|| panic!("ksm started with a key that is not its certificate's"));
    assert!(!status.success());
    let wanted = format!(
        "the private key in {} does not belong to the certificate in {}",
        mismatched.display(),
        certificate.cert.display()
    );
    assert!(host.log().contains(&wanted), "{}", host.log());

    let config_path = host.config_path().display().to_string();
    let (valid, _, stderr) = ksm_command(&["validate", "--config", &config_path]);
    assert!(!valid, "validate refuses it");
    assert!(stderr.contains(&wanted), "{stderr}");

    let expired = pki.expired_client("ksm");
    host.edit_config(|text| {
        text.replace(
            &certificate.cert.display().to_string(),
            &expired.cert.display().to_string(),
        )
        .replace(
            &mismatched.display().to_string(),
            &expired.key.display().to_string(),
        )
    });
    let (valid, _, stderr) = ksm_command(&["validate", "--config", &config_path]);
    assert!(!valid, "an expired client certificate is an error");
    assert!(
        stderr.contains("mqtt.tls.client_cert_file: CN=ksm expired on"),
        "{stderr}"
    );

    let expiring = pki.expiring_client("ksm");
    host.edit_config(|text| {
        text.replace(
            &expired.cert.display().to_string(),
            &expiring.cert.display().to_string(),
        )
        .replace(
            &expired.key.display().to_string(),
            &expiring.key.display().to_string(),
        )
    });
    let (valid, stdout, stderr) = ksm_command(&["validate", "--config", &config_path]);
    assert!(
        valid,
        "a certificate expiring soon is still valid: {stderr}"
    );
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(
        stderr.contains("warning: mqtt.tls.client_cert_file: CN=ksm expires on")
            && stderr.contains("in 9 days"),
        "{stderr}"
    );
}

/// Copies a certificate and key over `dir`'s `ksm.pem` and `ksm.key`, as an operator
/// rotating them would.
fn install(dir: &Path, files: &CertFiles) {
    for (from, to) in [(&files.cert, "ksm.pem"), (&files.key, "ksm.key")] {
        let staged = dir.join(format!("{to}.new"));
        std::fs::copy(from, &staged).expect("copy the certificate file");
        std::fs::rename(&staged, dir.join(to)).expect("move the certificate file in place");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_is_taken_at_the_next_reconnection_and_waiting_messages_land() {
    let pki = TestPki::new();
    let bench = bench_on(
        "tls-rotate",
        Mosquitto::start_tls(TlsBroker::device_identity(&pki)),
    )
    .await;
    let files = TempDir::new("ksm-certs");
    install(files.path(), &pki.client("ksm"));
    let url = bench.broker.tls_url();
    let config = host_config(
        &bench,
        &url,
        "ksm-rotating",
        &tls_lines(
            pki.ca_file(),
            Some((&files.path().join("ksm.pem"), &files.path().join("ksm.key"))),
        ),
    );
    // The first start makes ksm's persistent session at the broker.
    let endpoint = bench.moto.endpoint();
    let mut host = Ksm::start(&config, aws_env(&endpoint, &endpoint));
    host.kill9();

    // The certificate expires while ksm is down; devices go on publishing.
    install(files.path(), &pki.expired_client("ksm"));
    host.spawn_unchecked();
    wait_for_error_everywhere(&mut host, "it has expired");
    let device = ClientTls::new(pki.ca_file()).identity(&pki.client("1001"));
    let waiting: Vec<(&str, &str)> = (0..5).map(|_| ("/devices/1001/event", EVENT)).collect();
    publish_all_tls(&url, &device, &waiting).await;

    let renewed = pki.renew_client("ksm");
    install(files.path(), &renewed);
    let records = bench.records(10).await;
    assert_eq!(
        records.len(),
        10,
        "the messages that waited at the broker, in both modules:\n{}",
        host.log()
    );
    let serial = renewed.serial.trim_start_matches('0');
    assert!(
        host.log().lines().any(|line| line
            .contains("TLS client certificate for the MQTT broker changed: now subject CN=ksm")
            && line.contains(serial)),
        "the log names the renewed certificate (serial {serial}):\n{}",
        host.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_any_log_at_trace_level() {
    const PASSWORD: &str = "mqtt-password-7c1e9a4f";
    const TOKEN: &str = "admin-token-5d2b8e0c93aa";
    const SECRET_KEY: &str = "aws-secret-key-1f6a3c8d0e";
    let pki = TestPki::new();
    let bench = bench_on(
        "tls-secrets",
        Mosquitto::start_tls(TlsBroker {
            passwords: vec![("ksm".to_owned(), PASSWORD.to_owned())],
            ..TlsBroker::new(&pki)
        }),
    )
    .await;
    let secrets = TempDir::new("ksm-secrets");
    let password_file = secrets.path().join("mqtt-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("write the password file");
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let url = bench.broker.tls_url();
    let config = config_with_options(
        &url,
        "ksm-secrets",
        &ksm_tests::guest_wasm(),
        &[module(
            "with-role",
            &bench.stream,
            "subscribe_events = [\"*\"]\nrole_arn = \"arn:aws:iam::123456789012:role/w\"",
        )],
        &HostOptions {
            mqtt: format!(
                "username = \"ksm\"\npassword_file = \"{}\"\n{}",
                password_file.display(),
                tls_lines(pki.ca_file(), None)
            ),
            ..HostOptions::default()
        },
    );
    let mut env = aws_env(&proxy.endpoint(), &proxy.endpoint());
    env.retain(|(name, _)| name != "AWS_SECRET_ACCESS_KEY");
    env.extend([
        ("AWS_SECRET_ACCESS_KEY".to_owned(), SECRET_KEY.to_owned()),
        ("KSM_ADMIN_TOKEN".to_owned(), TOKEN.to_owned()),
        // Everything at trace, but the compiler that turns the guest's wasm into
        // machine code (it sees no secret, only the guest's code): at trace it writes
        // millions of lines per compile, which alone can take a minute on a busy machine.
        (
            "KSM_LOG".to_owned(),
            "trace,cranelift_codegen=info,cranelift_frontend=info,wasmtime_internal_cranelift=info"
                .to_owned(),
        ),
    ]);
    let host = Ksm::start(&config, env);
    let device = ClientTls::new(pki.ca_file());
    let mut device_options = ksm_tests::mqtt::tls_options(&url, "device", &device);
    device_options.set_credentials("ksm", PASSWORD);
    ksm_tests::mqtt::publish_all_with(device_options, &[("/devices/1001/event", EVENT)]).await;
    let records = bench.records(1).await;
    assert_eq!(records.len(), 1, "{}", host.log());
    let session_token = proxy
        .wait_for_operation("PutRecords", 1, Duration::from_secs(10))
        .await
        .iter()
        .find_map(|put| put.security_token().map(str::to_owned))
        .expect("PutRecords signed with the role's session token");
    let modules = host.get("/api/modules");
    assert!(modules.is_array());

    let logs = [
        ("the host log", host.log()),
        ("the module log", host.module_log("with-role")),
    ];
    assert!(
        logs[0].1.contains("TRACE"),
        "the host log is written at trace level"
    );
    for (name, log) in &logs {
        for (secret, text) in [
            ("the MQTT password", PASSWORD),
            ("the admin token", TOKEN),
            ("the AWS secret key", SECRET_KEY),
            ("the STS session token", session_token.as_str()),
        ] {
            assert!(!log.contains(text), "{secret} is in {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn server_name_verifies_a_broker_whose_certificate_names_another_host() {
    let pki = TestPki::new();
    let bench = bench_on(
        "tls-name",
        Mosquitto::start_tls(TlsBroker {
            server: pki.wrong_name_server(),
            ..TlsBroker::new(&pki)
        }),
    )
    .await;
    let url = bench.broker.tls_url();
    let config = host_config(
        &bench,
        &url,
        "ksm",
        &format!(
            "{}tls.server_name = \"wrong.example\"\n",
            tls_lines(pki.ca_file(), None)
        ),
    );
    let endpoint = bench.moto.endpoint();
    let host = Ksm::start(&config, aws_env(&endpoint, &endpoint));
    let device = ClientTls::new(pki.ca_file());
    let mut options = ksm_tests::mqtt::tls_options(&url, "device", &device);
    // The device checks the broker as ksm does: for the name in its certificate.
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(
            ksm_host::tls::client::broker_config(&ksm_host::config::MqttTlsConfig {
                ca_file: Some(pki.ca_file().to_owned()),
                server_name: Some("wrong.example".into()),
                ..Default::default()
            })
            .expect("a TLS configuration")
            .config,
        ),
    ));
    ksm_tests::mqtt::publish_all_with(options, &[("/devices/1001/event", EVENT)]).await;
    let records = bench.records(2).await;
    assert_eq!(records.len(), 2, "{}", host.log());
}
