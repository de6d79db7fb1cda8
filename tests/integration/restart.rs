//! The persistent session: messages published while ksm is down wait at the
//! broker and arrive after a restart; SIGTERM stops the host cleanly.

use std::time::Duration;

use ksm_tests::{
    Mosquitto, Moto, aws_env, create_stream, kinesis_client, publish_all, unique_stream_name,
    wait_for_records,
};

use crate::support::{Ksm, config, module};

#[tokio::test(flavor = "multi_thread")]
async fn messages_sent_while_ksm_is_down_arrive_after_restart() {
    let broker = Mosquitto::start();
    let moto = Moto::start();
    let kinesis = kinesis_client(&moto.endpoint()).await;
    let stream = unique_stream_name("restart");
    create_stream(&kinesis, &stream, 1).await;
    let mut host = Ksm::start(
        &config(
            &broker.url(),
            "ksm-restart",
            &[module("durable", &stream, "subscribe_events = [\"*\"]")],
        ),
        aws_env(&moto.endpoint(), &moto.endpoint()),
    );
    let event = |n: usize| {
        (
            "/devices/1001/event".to_owned(),
            format!(r#"{{"eventType":"seq","eventData":{{"n":{n}}}}}"#),
        )
    };
    publish_all(&broker.url(), &[event(0)]).await;
    wait_for_records(&kinesis, &stream, 1, Duration::from_secs(30)).await;

    assert!(host.stop(), "ksm exits cleanly on SIGTERM:\n{}", host.log());
    let while_down: Vec<_> = (1..=10).map(event).collect();
    publish_all(&broker.url(), &while_down).await;
    host.restart();

    let records = wait_for_records(&kinesis, &stream, 11, Duration::from_secs(30)).await;
    let numbers: Vec<u64> = records
        .iter()
        .map(|r| r.data_json()["eventData"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(numbers, (0..=10).collect::<Vec<_>>(), "{}", host.log());
    assert!(host.log().contains("session resumed"), "{}", host.log());
}
