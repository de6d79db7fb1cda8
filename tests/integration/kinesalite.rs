//! The same host against kinesalite, a second Kinesis implementation.

use std::time::Duration;

use ksm_tests::{
    Kinesalite, Mosquitto, aws_env, create_stream, kinesis_client, publish_all, unique_stream_name,
    wait_for_records,
};

use crate::support::{Ksm, config, module};

#[tokio::test(flavor = "multi_thread")]
async fn events_and_bulk_data_land_in_kinesalite() {
    let broker = Mosquitto::start();
    let kinesalite = Kinesalite::start();
    let kinesis = kinesis_client(&kinesalite.endpoint()).await;
    let stream = unique_stream_name("kinesalite");
    create_stream(&kinesis, &stream, 3).await;
    let host = Ksm::start(
        &config(
            &broker.url(),
            "ksm-kinesalite",
            &[module(
                "to-kinesalite",
                &stream,
                "subscribe_events = [\"*\"]\nbulk_data_label = \"raw\"",
            )],
        ),
        aws_env(&kinesalite.endpoint(), &kinesalite.endpoint()),
    );
    let bulk: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8; 64]).collect();
    publish_all(
        &broker.url(),
        &[
            (
                "/devices/1001/event",
                br#"{"eventType":"boot","eventData":{"v":1}}"#.to_vec(),
            ),
            ("/devices/4242/bulkData/raw", ksm_host::bulk::encode(&bulk)),
        ],
    )
    .await;
    let records = wait_for_records(&kinesis, &stream, 51, Duration::from_secs(30)).await;
    assert_eq!(records.len(), 51, "{}", host.log());
    let boot: Vec<_> = records
        .iter()
        .filter(|r| r.partition_key == "1001")
        .collect();
    assert_eq!(boot.len(), 1);
    assert_eq!(boot[0].data_json()["eventData"]["v"], 1);
    let bulk_back: Vec<Vec<u8>> = records
        .iter()
        .filter(|r| r.partition_key == "4242")
        .map(|r| r.data.clone())
        .collect();
    assert_eq!(bulk_back, bulk, "one key lands in one shard, in order");
}
