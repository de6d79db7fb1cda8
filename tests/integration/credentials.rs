//! Credentials: the module's role is assumed through STS with its external
//! ID, and PutRecords is signed with the assumed credentials.

use std::time::Duration;

use ksm_tests::{
    Mosquitto, Moto, RecordingProxy, aws_env, create_stream, kinesis_client, publish_all,
    unique_stream_name, wait_for_records,
};

use crate::support::{Ksm, config, module};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ksm-writer";

#[tokio::test(flavor = "multi_thread")]
async fn the_role_is_assumed_with_the_external_id() {
    let broker = Mosquitto::start();
    let moto = Moto::start();
    let proxy = RecordingProxy::start(&moto.endpoint());
    let kinesis = kinesis_client(&moto.endpoint()).await;
    let stream = unique_stream_name("assumed");
    create_stream(&kinesis, &stream, 1).await;
    let host = Ksm::start(
        &config(
            &broker.url(),
            "ksm-sts",
            &[module(
                "with-role",
                &stream,
                &format!(
                    "subscribe_events = [\"*\"]\nrole_arn = \"{ROLE_ARN}\"\nexternal_id = \"ext-42\""
                ),
            )],
        ),
        aws_env(&proxy.endpoint(), &proxy.endpoint()),
    );
    publish_all(
        &broker.url(),
        &[("/devices/1001/event", r#"{"eventType":"t","eventData":{}}"#)],
    )
    .await;
    let records = wait_for_records(&kinesis, &stream, 1, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 1, "{}", host.log());

    let assume = proxy.requests_for("AssumeRole");
    assert_eq!(assume.len(), 1, "one AssumeRole call, credentials cached");
    let call = &assume[0];
    assert_eq!(call.form_param("RoleArn").as_deref(), Some(ROLE_ARN));
    assert_eq!(call.form_param("ExternalId").as_deref(), Some("ext-42"));
    assert_eq!(
        call.form_param("RoleSessionName").as_deref(),
        Some("ksm-with-role")
    );
    assert_eq!(
        call.access_key_id(),
        Some("testing"),
        "AssumeRole is signed with the base credentials"
    );
    let assumed = call
        .assumed_access_key_id()
        .expect("AssumeRole returned credentials");
    assert_ne!(assumed, "testing");

    let puts = proxy.requests_for("PutRecords");
    assert!(!puts.is_empty());
    for put in &puts {
        assert_eq!(
            put.access_key_id(),
            Some(assumed.as_str()),
            "signed with the role's credentials"
        );
        assert!(put.security_token().is_some(), "with the session token");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_role_the_default_credentials_are_used() {
    let broker = Mosquitto::start();
    let moto = Moto::start();
    let proxy = RecordingProxy::start(&moto.endpoint());
    let kinesis = kinesis_client(&moto.endpoint()).await;
    let stream = unique_stream_name("default-creds");
    create_stream(&kinesis, &stream, 1).await;
    let host = Ksm::start(
        &config(
            &broker.url(),
            "ksm-default-creds",
            &[module("no-role", &stream, "subscribe_events = [\"*\"]")],
        ),
        aws_env(&proxy.endpoint(), &proxy.endpoint()),
    );
    publish_all(
        &broker.url(),
        &[("/devices/1001/event", r#"{"eventType":"t","eventData":{}}"#)],
    )
    .await;
    let records = wait_for_records(&kinesis, &stream, 1, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 1, "{}", host.log());
    assert!(proxy.requests_for("AssumeRole").is_empty());
    let puts = proxy.requests_for("PutRecords");
    assert!(puts.iter().all(|p| p.access_key_id() == Some("testing")));
}
