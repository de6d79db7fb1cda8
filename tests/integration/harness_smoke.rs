//! The harness against the real services: if these fail, no other integration test can pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::Credentials;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use ksm_tests::mosquitto::TlsBroker;
use ksm_tests::mqtt::{
    ClientTls, PublishAnswer, Subscriber, publish_all_tls, publish_one_tls, publish_one_with,
    tls_options,
};
use ksm_tests::tls::{CertFiles, KeyKind, TestPki};
use ksm_tests::{
    Faults, Kinesalite, LoadPlan, LoadPublisher, Mosquitto, Moto, RecordingProxy, create_stream,
    kinesis, kinesis_client, publish_all, read_all_records, unique_stream_name, wait_for_records,
};
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, PubAckReason};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn mosquitto_delivers_published_messages_and_restarts_on_the_same_port() {
    let mut broker = Mosquitto::start();
    assert_eq!(broker.url(), format!("mqtt://127.0.0.1:{}", broker.port()));

    let mut subscriber = Subscriber::subscribe(&broker.url(), "/devices/+/event").await;
    publish_all(
        &broker.url(),
        &[
            ("/devices/1001/event", r#"{"eventType":"a"}"#),
            ("/devices/1002/event", r#"{"eventType":"b"}"#),
            ("/homes/77/event", r#"{"eventType":"not subscribed"}"#),
        ],
    )
    .await;
    let got = subscriber.recv_n(2, WAIT).await;
    let topics: Vec<&str> = got.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["/devices/1001/event", "/devices/1002/event"]);
    assert_eq!(got[0].payload, br#"{"eventType":"a"}"#);
    assert_eq!(subscriber.recv(Duration::from_millis(300)).await, None);
    drop(subscriber);

    let port = broker.port();
    broker.stop();
    assert!(!broker.is_running());
    broker.restart();
    assert_eq!(broker.port(), port);
    let mut subscriber = Subscriber::subscribe(&broker.url(), "#").await;
    let big = vec![7u8; 2 * 1024 * 1024];
    publish_all(&broker.url(), &[("/devices/1/bulkData/x", big.as_slice())]).await;
    let got = subscriber.recv(WAIT).await.expect("the 2 MiB message");
    assert_eq!(got.payload.len(), big.len());
    assert!(
        broker.log().contains("mosquitto version"),
        "{}",
        broker.log()
    );
}

#[tokio::test]
async fn publish_all_waits_for_every_ack() {
    let broker = Mosquitto::start();
    let mut subscriber = Subscriber::subscribe(&broker.url(), "load/#").await;
    let messages: Vec<(String, String)> = (0..500)
        .map(|i| (format!("load/{}", i % 7), format!("message {i}")))
        .collect();
    publish_all(&broker.url(), &messages).await;
    let got = subscriber.recv_n(500, WAIT).await;
    assert_eq!(got.len(), 500);
    assert_eq!(got[499].payload, b"message 499");
}

/// Creates a two-shard stream, puts records with several keys, and reads them back.
async fn stream_round_trip(endpoint: &str) {
    let client = kinesis_client(endpoint).await;
    let stream = unique_stream_name("smoke");
    create_stream(&client, &stream, 2).await;
    assert_eq!(kinesis::shard_ids(&client, &stream).await.len(), 2);
    assert!(read_all_records(&client, &stream).await.is_empty());

    for i in 0..20 {
        client
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("device-{}", i % 5))
            .data(Blob::new(format!("record {i}")))
            .send()
            .await
            .expect("PutRecord");
    }
    let entries: Vec<PutRecordsRequestEntry> = (20..30)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .partition_key("home-77")
                .data(Blob::new(format!("record {i}")))
                .build()
                .expect("entry")
        })
        .collect();
    let out = client
        .put_records()
        .stream_name(&stream)
        .set_records(Some(entries))
        .send()
        .await
        .expect("PutRecords");
    assert_eq!(out.failed_record_count(), Some(0));

    let records = wait_for_records(&client, &stream, 30, WAIT).await;
    assert_eq!(records.len(), 30, "{records:#?}");
    let mut shards: Vec<&str> = records.iter().map(|r| r.shard_id.as_str()).collect();
    shards.dedup();
    assert!(shards.windows(2).all(|w| w[0] < w[1]), "grouped by shard");
    for key in ["device-0", "device-3", "home-77"] {
        let data: Vec<String> = records
            .iter()
            .filter(|r| r.partition_key == key)
            .map(|r| r.data_text())
            .collect();
        let mut sorted = data.clone();
        sorted.sort_by_key(|d| d[7..].parse::<u32>().expect("number"));
        assert_eq!(data, sorted, "per-key order for {key}");
    }
    let keys = records
        .iter()
        .filter(|r| r.partition_key == "home-77")
        .count();
    assert_eq!(keys, 10);
    // Asking for more than there is returns what is there once the time is up.
    let more = wait_for_records(&client, &stream, 31, Duration::from_millis(500)).await;
    assert_eq!(more.len(), 30);
}

#[tokio::test]
async fn moto_stores_and_returns_records() {
    let moto = Moto::start();
    stream_round_trip(&moto.endpoint()).await;
}

#[tokio::test]
async fn kinesalite_stores_and_returns_records() {
    let kinesalite = Kinesalite::start();
    stream_round_trip(&kinesalite.endpoint()).await;
}

#[tokio::test]
async fn proxy_records_assume_role_and_the_signing_key() {
    let moto = Moto::start();
    let proxy = RecordingProxy::start(&moto.endpoint());
    let stream = unique_stream_name("proxied");
    create_stream(&kinesis_client(&moto.endpoint()).await, &stream, 1).await;

    let sts = kinesis::sts_client(&proxy.endpoint()).await;
    let assumed = sts
        .assume_role()
        .role_arn("arn:aws:iam::123456789012:role/ksm-writer")
        .role_session_name("ksm")
        .external_id("ext-42")
        .send()
        .await
        .expect("AssumeRole");
    let creds = assumed.credentials().expect("credentials");

    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .endpoint_url(proxy.endpoint())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            creds.access_key_id(),
            creds.secret_access_key(),
            Some(creds.session_token().to_owned()),
            None,
            "assumed",
        ))
        .build();
    let client = aws_sdk_kinesis::Client::from_conf(config);
    let entry = PutRecordsRequestEntry::builder()
        .partition_key("1001")
        .data(Blob::new("hello"))
        .build()
        .expect("entry");
    client
        .put_records()
        .stream_name(&stream)
        .records(entry)
        .send()
        .await
        .expect("PutRecords through the proxy");

    let assume = proxy.requests_for("AssumeRole");
    assert_eq!(assume.len(), 1, "{:#?}", proxy.requests());
    assert_eq!(
        assume[0].form_param("ExternalId").as_deref(),
        Some("ext-42")
    );
    assert_eq!(
        assume[0].form_param("RoleArn").as_deref(),
        Some("arn:aws:iam::123456789012:role/ksm-writer")
    );
    assert_eq!(assume[0].access_key_id(), Some("testing"));
    assert_eq!(
        assume[0].assumed_access_key_id().as_deref(),
        Some(creds.access_key_id())
    );

    let puts = proxy
        .wait_for_operation("PutRecords", 1, Duration::from_secs(1))
        .await;
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].response_status, 200, "{}", puts[0].response_text());
    assert_eq!(puts[0].access_key_id(), Some(creds.access_key_id()));
    assert_eq!(puts[0].security_token(), Some(creds.session_token()));
    assert_eq!(
        puts[0].target(),
        Some("Kinesis_20131202.PutRecords"),
        "{:?}",
        puts[0].headers
    );
    let body = puts[0].body_json().expect("JSON body");
    assert_eq!(body["StreamName"], stream.as_str());

    let records = read_all_records(&client, &stream).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].data, b"hello");
    assert_eq!(records[0].partition_key, "1001");
}

#[tokio::test]
async fn proxy_keeps_connections_alive_and_injects_errors() {
    let kinesalite = Kinesalite::start();
    let proxy = RecordingProxy::start(&kinesalite.endpoint());
    let client = kinesis_client(&proxy.endpoint()).await;
    let stream = unique_stream_name("inject");
    create_stream(&client, &stream, 1).await;

    proxy.inject_error(
        "PutRecord",
        1,
        400,
        r#"{"__type":"ProvisionedThroughputExceededException","message":"slow down"}"#,
    );
    for i in 0..5 {
        client
            .put_record()
            .stream_name(&stream)
            .partition_key("k")
            .data(Blob::new(vec![i; 100_000]))
            .send()
            .await
            .expect("PutRecord (retried after the injected throttle)");
    }
    let puts = proxy.requests_for("PutRecord");
    assert_eq!(puts.len(), 6, "one throttled, then five stored");
    assert_eq!(puts[0].response_status, 400);
    assert!(puts[1..].iter().all(|r| r.response_status == 200));
    let records = read_all_records(&client, &stream).await;
    assert_eq!(records.len(), 5);
    assert_eq!(records[4].data, vec![4u8; 100_000]);
    assert!(proxy.requests().len() > 8);
    proxy.clear();
    assert!(proxy.requests().is_empty());
}

#[test]
fn aws_env_points_the_sdk_at_the_emulators_only() {
    let env = ksm_tests::aws_env("http://127.0.0.1:1", "http://127.0.0.1:2");
    let get = |k: &str| {
        env.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("AWS_ENDPOINT_URL_KINESIS"), Some("http://127.0.0.1:1"));
    assert_eq!(get("AWS_ENDPOINT_URL_STS"), Some("http://127.0.0.1:2"));
    assert_eq!(get("AWS_ACCESS_KEY_ID"), Some("testing"));
    assert_eq!(get("AWS_REGION"), Some("us-east-1"));
}

#[test]
fn guest_component_is_built_once() {
    let path = ksm_tests::guest_wasm();
    assert!(
        path.ends_with("target/wasm32-wasip2/release/ksm_guest.wasm")
            || std::env::var_os("KSM_GUEST_WASM").is_some()
    );
    let bytes = std::fs::read(&path).expect("read the guest");
    assert_eq!(
        &bytes[..4],
        b"\0asm",
        "{} is not WebAssembly",
        path.display()
    );
    assert_eq!(ksm_tests::guest_wasm(), path);
}

/// A `PutRecords` entry with `key` and the text `data`.
fn entry(key: &str, data: &str) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .partition_key(key)
        .data(Blob::new(data))
        .build()
        .expect("entry")
}

#[tokio::test]
async fn proxy_fails_random_records_and_keeps_each_accepted_one_once() {
    let moto = Moto::start();
    let proxy = RecordingProxy::start(&moto.endpoint());
    let client = kinesis_client(&proxy.endpoint()).await;
    let stream = unique_stream_name("faults");
    create_stream(&client, &stream, 2).await;
    proxy.set_faults(Faults {
        fail_record_ratio: 0.3,
        seed: 7,
        ..Faults::default()
    });

    let mut pending: Vec<PutRecordsRequestEntry> = (0..200)
        .map(|i| entry(&format!("device-{}", i % 10), &format!("record {i}")))
        .collect();
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(rounds <= 30, "{} records still failing", pending.len());
        let mut failed = Vec::new();
        for chunk in pending.chunks(50) {
            let out = client
                .put_records()
                .stream_name(&stream)
                .set_records(Some(chunk.to_vec()))
                .send()
                .await
                .unwrap_or_else(|e| panic!("PutRecords: {}", DisplayErrorContext(&e)));
            assert_eq!(out.records().len(), chunk.len());
            let before = failed.len();
            for (sent, result) in chunk.iter().zip(out.records()) {
                if let Some(code) = result.error_code() {
                    assert_eq!(code, "ProvisionedThroughputExceededException");
                    failed.push(sent.clone());
                } else {
                    assert!(result.sequence_number().is_some(), "{result:?}");
                }
            }
            assert_eq!(
                out.failed_record_count(),
                Some(i32::try_from(failed.len() - before).expect("count"))
            );
        }
        pending = failed;
    }
    assert!(rounds > 1, "some records must have failed");

    let stats = proxy.put_records_stats();
    assert!(stats.records_failed_injected > 0, "{stats:?}");
    assert_eq!(
        stats.records_received,
        stats.records_forwarded + stats.records_failed_injected,
        "{stats:?}"
    );
    assert_eq!(stats.records_forwarded, 200, "{stats:?}");
    assert_eq!(stats.server_errors_injected, 0);
    assert_eq!(
        stats.requests,
        u64::try_from(proxy.requests_for("PutRecords").len()).expect("count")
    );

    let accepted = proxy.accepted_records();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for record in &accepted {
        let text = record.data_text();
        let i: usize = text["record ".len()..].parse().expect("record number");
        assert_eq!(record.partition_key, format!("device-{}", i % 10));
        *seen.entry(text).or_default() += 1;
    }
    assert_eq!(accepted.len(), 200);
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|&n| n == 1));

    let stored = read_all_records(&kinesis_client(&moto.endpoint()).await, &stream).await;
    assert_eq!(stored.len(), 200);
}

#[tokio::test]
async fn proxy_down_refuses_connections_and_recovers() {
    let moto = Moto::start();
    let proxy = RecordingProxy::start(&moto.endpoint());
    let config = kinesis::sdk_config(&proxy.endpoint()).await;
    let client = aws_sdk_kinesis::Client::from_conf(
        aws_sdk_kinesis::config::Builder::from(&config)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    let stream = unique_stream_name("down");
    create_stream(&client, &stream, 1).await;
    let put = || {
        client
            .put_records()
            .stream_name(&stream)
            .records(entry("k", "hello"))
            .send()
    };

    proxy.set_down(true);
    assert!(proxy.is_down());
    let requests_before = proxy.requests().len();
    // The first call finds the kept-alive connection, the second needs a new one.
    for attempt in 0..2 {
        let err = put().await.expect_err("PutRecords while the proxy is down");
        assert!(
            matches!(err, SdkError::DispatchFailure(_)),
            "attempt {attempt}: {}",
            DisplayErrorContext(&err)
        );
    }
    let stats = proxy.put_records_stats();
    assert!(stats.refused_while_down >= 2, "{stats:?}");
    assert_eq!(stats.requests, 0, "{stats:?}");
    assert_eq!(proxy.requests().len(), requests_before);

    proxy.set_down(false);
    let out = put()
        .await
        .unwrap_or_else(|e| panic!("PutRecords after recovery: {}", DisplayErrorContext(&e)));
    assert_eq!(out.failed_record_count(), Some(0));
    assert_eq!(proxy.put_records_stats().requests, 1);
    assert_eq!(proxy.accepted_records().len(), 1);
    assert_eq!(proxy.accepted_records()[0].data, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_publisher_survives_a_graceful_broker_restart() {
    let mut broker = Mosquitto::start_persistent();
    let plan = LoadPlan {
        devices: 7,
        messages: 500,
        rate_per_sec: 500,
        max_in_flight: 20,
        client_id_prefix: "ksm-tests-load".into(),
    };
    let publisher = LoadPublisher::start(&broker.url(), plan);
    let deadline = Instant::now() + WAIT;
    while publisher.stats().acked < 100 {
        assert!(
            Instant::now() < deadline,
            "only {:?} before the restart",
            publisher.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(publisher.stats().acked < 500, "restart in the middle");
    tokio::task::block_in_place(|| broker.restart_graceful());
    assert!(broker.is_running());

    let report = publisher.finish(Duration::from_secs(60)).await;
    assert_eq!(report.missing(500), Vec::<u64>::new(), "{report:?}");
    assert_eq!(report.acked.len(), 500);
    assert!(report.reconnects >= 1, "{report:?}");
    assert!(report.attempts >= 500, "{report:?}");
    let log = broker.log();
    assert!(log.contains("mosquitto terminated"), "{log}");
    assert!(log.contains("persistence"), "{log}");
}

/// A client that trusts `pki`'s CA and presents `identity`.
fn tls_client(pki: &TestPki, identity: &CertFiles) -> ClientTls {
    ClientTls::new(pki.ca_file()).identity(identity)
}

/// True for a PUBACK that took the message.
fn accepted(answer: &PublishAnswer) -> bool {
    matches!(
        answer,
        PublishAnswer::PubAck(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
    )
}

/// The client's error for a connection that failed before any CONNACK; panics otherwise.
fn not_connected(what: &str, answer: PublishAnswer) -> String {
    match answer {
        PublishAnswer::NotConnected(error) => error,
        other => panic!("{what}: expected the connection to fail, got {other:?}"),
    }
}

/// Waits until the broker's log holds `text` `times` times (it may write a line just after the
/// client saw the outcome); panics with the log after 5 s.
async fn wait_for_log(broker: &Mosquitto, text: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = broker.log();
        if log.matches(text).count() >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{text:?} not {times} times in:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tls_client_with_a_certificate_reaches_a_tls_subscriber() {
    let pki = TestPki::new();
    let broker = Mosquitto::start_tls(TlsBroker {
        require_certificate: true,
        ..TlsBroker::new(&pki)
    });
    let url = broker.tls_url();
    assert_eq!(url, format!("mqtts://127.0.0.1:{}", broker.tls_port()));

    let ksm = tls_client(&pki, &pki.client("ksm"));
    let mut subscriber = Subscriber::subscribe_tls(&url, &ksm, "/devices/+/event").await;
    let device = tls_client(&pki, &pki.client("1001"));
    let event = r#"{"eventType":"tls"}"#;
    publish_all_tls(&url, &device, &[("/devices/1001/event", event)]).await;
    let got = subscriber
        .recv(WAIT)
        .await
        .expect("the message sent over TLS");
    assert_eq!(got.topic, "/devices/1001/event");
    assert_eq!(got.payload, event.as_bytes());

    // The server certificate names `localhost` too.
    let by_name = format!("mqtts://localhost:{}", broker.tls_port());
    publish_all_tls(&by_name, &device, &[("/devices/1001/event", "by name")]).await;
    let got = subscriber
        .recv(WAIT)
        .await
        .expect("the message sent to localhost");
    assert_eq!(got.payload, b"by name");
    assert_eq!(subscriber.recv(Duration::from_millis(300)).await, None);
}

#[tokio::test]
async fn tls_broker_requiring_certificates_refuses_a_client_without_one() {
    let pki = TestPki::new();
    let anonymous = ClientTls::new(pki.ca_file());
    let topic = "/devices/1/event";

    let optional = Mosquitto::start_tls(TlsBroker::new(&pki));
    let answer = publish_one_tls(&optional.tls_url(), &anonymous, topic, vec![1]).await;
    assert!(accepted(&answer), "{answer:?}");

    let required = Mosquitto::start_tls(TlsBroker {
        require_certificate: true,
        ..TlsBroker::new(&pki)
    });
    let answer = publish_one_tls(&required.tls_url(), &anonymous, topic, vec![1]).await;
    let error = not_connected("no client certificate", answer);
    // TLS 1.3: the client finishes its handshake, then reads the broker's alert.
    assert!(error.contains("CertificateRequired"), "{error}");
    wait_for_log(&required, "peer did not return a certificate", 1).await;
}

#[tokio::test]
async fn device_acl_lets_a_device_publish_only_under_its_own_id() {
    let pki = TestPki::new();
    let broker = Mosquitto::start_tls(TlsBroker {
        plain_listener: true,
        ..TlsBroker::device_identity(&pki)
    });
    let url = broker.tls_url();
    let ksm = tls_client(&pki, &pki.client("ksm"));
    let mut subscriber = Subscriber::subscribe_tls(&url, &ksm, "/devices/#").await;
    let device = tls_client(&pki, &pki.client("1001"));

    // Mosquitto answers a publish its ACL refuses with PUBACK "not authorized".
    let other = publish_one_tls(&url, &device, "/devices/1002/event", b"not mine".to_vec()).await;
    assert_eq!(other, PublishAnswer::PubAck(PubAckReason::NotAuthorized));
    let own = publish_one_tls(&url, &device, "/devices/1001/event", b"mine".to_vec()).await;
    assert!(accepted(&own), "{own:?}");
    // ksm may only read.
    let by_ksm = publish_one_tls(&url, &ksm, "/devices/1001/event", b"ksm".to_vec()).await;
    assert_eq!(by_ksm, PublishAnswer::PubAck(PubAckReason::NotAuthorized));
    // The plain listener has no ACL.
    publish_all(&broker.url(), &[("/devices/1003/event", "plain")]).await;

    let got = subscriber.recv_n(2, WAIT).await;
    let seen: Vec<(&str, &[u8])> = got
        .iter()
        .map(|m| (m.topic.as_str(), m.payload.as_slice()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/devices/1001/event", b"mine".as_slice()),
            ("/devices/1003/event", b"plain".as_slice())
        ]
    );
    assert_eq!(subscriber.recv(Duration::from_millis(300)).await, None);
    // The certificate's CN is the username.
    wait_for_log(&broker, "u'1001')", 2).await;
}

#[tokio::test]
async fn broker_refuses_expired_not_yet_valid_and_foreign_client_certificates() {
    let pki = TestPki::new();
    let broker = Mosquitto::start_tls(TlsBroker::device_identity(&pki));
    let url = broker.tls_url();
    let topic = "/devices/1001/event";
    let valid = tls_client(&pki, &pki.client("1001"));
    let answer = publish_one_tls(&url, &valid, topic, vec![1]).await;
    assert!(accepted(&answer), "{answer:?}");
    for (what, identity, alert) in [
        ("expired", pki.expired_client("1001"), "CertificateExpired"),
        (
            "not yet valid",
            pki.not_yet_valid_client("1001"),
            "BadCertificate",
        ),
        ("from another CA", pki.foreign_client("1001"), "UnknownCA"),
    ] {
        let answer = publish_one_tls(&url, &tls_client(&pki, &identity), topic, vec![1]).await;
        let error = not_connected(what, answer);
        assert!(error.contains(alert), "{what}: {error}");
    }
    wait_for_log(&broker, "certificate verify failed", 3).await;
}

#[tokio::test]
async fn tls_clients_refuse_a_broker_they_cannot_verify() {
    let pki = TestPki::new();
    let trusting = ClientTls::new(pki.ca_file());
    let topic = "/devices/1/event";
    for (what, server, error_part) in [
        ("wrong name", pki.wrong_name_server(), "not valid for name"),
        ("expired", pki.expired_server(), "certificate expired"),
    ] {
        let broker = Mosquitto::start_tls(TlsBroker {
            server,
            ..TlsBroker::new(&pki)
        });
        let answer = publish_one_tls(&broker.tls_url(), &trusting, topic, vec![1]).await;
        let error = not_connected(what, answer);
        assert!(error.contains(error_part), "{what}: {error}");
    }

    let broker = Mosquitto::start_tls(TlsBroker {
        plain_listener: true,
        ..TlsBroker::new(&pki)
    });
    let stranger = ClientTls::new(pki.other_ca_file());
    let answer = publish_one_tls(&broker.tls_url(), &stranger, topic, vec![1]).await;
    let error = not_connected("other CA", answer);
    assert!(error.contains("UnknownIssuer"), "{error}");
    let plain_port = format!("mqtts://127.0.0.1:{}", broker.port());
    let answer = publish_one_tls(&plain_port, &trusting, topic, vec![1]).await;
    not_connected("TLS to the plain port", answer);
    let answer = publish_one_tls(&broker.tls_url(), &trusting, topic, vec![1]).await;
    assert!(accepted(&answer), "{answer:?}");
}

#[tokio::test]
async fn client_keys_of_every_kind_renewal_and_an_unmatched_key() {
    let pki = TestPki::new();
    let broker = Mosquitto::start_tls(TlsBroker::device_identity(&pki));
    let url = broker.tls_url();
    let topic = "/devices/1001/event";
    for kind in [KeyKind::EcP256, KeyKind::Ed25519, KeyKind::Rsa2048] {
        let identity = pki.client_with_key("1001", kind);
        let key = std::fs::read_to_string(&identity.key).expect("read the key");
        assert!(
            key.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{kind:?}: {key}"
        );
        let answer = publish_one_tls(&url, &tls_client(&pki, &identity), topic, vec![1]).await;
        assert!(accepted(&answer), "{kind:?}: {answer:?}");
    }

    let first = pki.client("1001");
    let renewed = pki.renew_client("1001");
    assert_eq!((&first.cert, &first.key), (&renewed.cert, &renewed.key));
    assert_ne!(first.serial, renewed.serial);
    assert!(renewed.not_after > first.not_after, "{first:?} {renewed:?}");
    let der = CertificateDer::from_pem_file(&renewed.cert).expect("the renewed certificate");
    let serial: Vec<u8> = (0..renewed.serial.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&renewed.serial[i..i + 2], 16).expect("hex"))
        .collect();
    assert!(
        der.windows(serial.len()).any(|w| w == serial.as_slice()),
        "the file holds the renewed certificate"
    );
    let answer = publish_one_tls(&url, &tls_client(&pki, &renewed), topic, vec![1]).await;
    assert!(accepted(&answer), "{answer:?}");

    let unmatched = PrivateKeyDer::from_pem_file(pki.unmatched_key()).expect("the unmatched key");
    let pair = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_client_auth_cert(vec![der], unmatched);
    let error = pair.expect_err("a key that does not match the certificate");
    assert!(
        matches!(error, rustls::Error::InconsistentKeys(_)),
        "{error}"
    );
}

#[tokio::test]
async fn password_file_on_the_tls_listener() {
    let pki = TestPki::new();
    let broker = Mosquitto::start_tls(TlsBroker {
        passwords: vec![
            ("device-7".into(), "secret".into()),
            ("device-8".into(), "other".into()),
        ],
        ..TlsBroker::new(&pki)
    });
    let url = broker.tls_url();
    let tls = ClientTls::new(pki.ca_file());
    let publish = |user: &str, password: Option<&str>| {
        let mut options = tls_options(&url, "ksm-tests-password", &tls);
        if let Some(password) = password {
            options.set_credentials(user, password);
        }
        publish_one_with(options, "/devices/7/event", vec![1])
    };
    let right = publish("device-7", Some("secret")).await;
    assert!(accepted(&right), "{right:?}");
    let second = publish("device-8", Some("other")).await;
    assert!(accepted(&second), "{second:?}");
    let refused = PublishAnswer::ConnectRefused(ConnectReturnCode::NotAuthorized);
    assert_eq!(publish("device-7", Some("guess")).await, refused);
    assert_eq!(publish("device-7", None).await, refused);
}
