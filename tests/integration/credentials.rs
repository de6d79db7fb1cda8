//! Credentials: the module's role is assumed through STS with its external
//! ID, and PutRecords is signed with the assumed credentials.

use ksm_tests::RecordingProxy;

use crate::support::{Bench, module};

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ksm-writer";

#[tokio::test(flavor = "multi_thread")]
async fn the_role_is_assumed_with_the_external_id() {
    let bench = Bench::new("assumed", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-sts",
        &[module(
            "with-role",
            &bench.stream,
            &format!(
                "subscribe_events = [\"*\"]\nrole_arn = \"{ROLE_ARN}\"\nexternal_id = \"ext-42\""
            ),
        )],
    );
    bench
        .publish(&[("/devices/1001/event", r#"{"eventType":"t","eventData":{}}"#)])
        .await;
    let records = bench.records(1).await;
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
    let bench = Bench::new("default-creds", 1).await;
    let proxy = RecordingProxy::start(&bench.moto.endpoint());
    let host = bench.ksm_via(
        &proxy.endpoint(),
        "ksm-default-creds",
        &[module(
            "no-role",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    bench
        .publish(&[("/devices/1001/event", r#"{"eventType":"t","eventData":{}}"#)])
        .await;
    let records = bench.records(1).await;
    assert_eq!(records.len(), 1, "{}", host.log());
    assert!(proxy.requests_for("AssumeRole").is_empty());
    let puts = proxy.requests_for("PutRecords");
    assert!(puts.iter().all(|p| p.access_key_id() == Some("testing")));
}
