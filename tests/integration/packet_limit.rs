//! The broker's packet limit (`max_packet_size`, see [`BROKER_MAX_PACKET_SIZE`]): a device's
//! message too large for ksm is refused when it is published, so the device knows, and the
//! largest message the broker takes reaches ksm and is handled whole.

use ksm_tests::mosquitto::BROKER_MAX_PACKET_SIZE;
use ksm_tests::mqtt::{PublishAnswer, publish_one, publish_one_mqtt311, qos1_publish_packet_size};
use rumqttc::v5::mqttbytes::v5::PubAckReason;

use crate::support::{Bench, HostOptions, dead_letter_data, module};

/// Where the test device publishes.
const TOPIC: &str = "/devices/1001/event";

/// A payload that is not a JSON object (so the reference guest refuses it and keeps it whole
/// as a dead letter), sized so that its MQTT 5 QoS 1 PUBLISH packet on [`TOPIC`] is `packet`
/// bytes (over MQTT 3.1.1, which has no properties, one byte less).
fn payload_for_packet(packet: usize) -> Vec<u8> {
    let len = (packet - 40..packet)
        .find(|&len| qos1_publish_packet_size(TOPIC, len) == packet)
        .expect("a payload length for every packet size");
    vec![b'x'; len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_broker_limit_is_refused_at_publish_and_one_at_it_reaches_ksm() {
    let ksm_max = ksm_host::config::MqttConfig::default().max_packet_bytes;
    assert_eq!(
        BROKER_MAX_PACKET_SIZE,
        ksm_max - 4,
        "the test broker's limit is ksm's default less what Mosquitto miscounts"
    );
    let limit = usize::try_from(BROKER_MAX_PACKET_SIZE).unwrap();
    let bench = Bench::new("packet-limit", 1).await;
    // Lowering a 16 MiB payload into the guest takes longer than the default 50 ms deadline
    // on a slow machine; the message would still be kept, with a deadline for its reason.
    let options = HostOptions {
        component: "call_timeout_ms = 2000".into(),
        ..HostOptions::default()
    };
    let host = bench.ksm_with(
        &bench.moto.endpoint(),
        "ksm-packet-limit",
        &[module("big", &bench.stream, "subscribe_events = [\"*\"]")],
        &options,
    );
    let url = bench.broker.url();

    // One byte over: an MQTT 5 client has the limit from the broker's CONNACK and refuses to
    // send the packet, so the publish fails at the device.
    let answer = publish_one(&url, TOPIC, payload_for_packet(limit + 1)).await;
    assert_eq!(
        answer,
        PublishAnswer::OverBrokerMaximum {
            size: BROKER_MAX_PACKET_SIZE + 1,
            max: BROKER_MAX_PACKET_SIZE,
        }
    );
    // A packet one byte over ksm's limit from an MQTT 3.1.1 client, which is told no limit and
    // sends it: the broker closes the connection instead of acknowledging it.
    let ksm_max = usize::try_from(ksm_max).unwrap();
    let answer = publish_one_mqtt311(&url, TOPIC, payload_for_packet(ksm_max + 2)).await;
    assert!(
        answer.is_err(),
        "the broker acknowledged a packet too large for ksm"
    );

    // At the limit: acknowledged, delivered to ksm, refused by the guest and kept whole.
    let at_limit = payload_for_packet(limit);
    let size = at_limit.len();
    let answer = publish_one(&url, TOPIC, at_limit).await;
    assert_eq!(answer, PublishAnswer::PubAck(PubAckReason::Success));
    let counters = host.wait_for_counters("big", |c| c["dead_lettered"] == 1);
    assert_eq!(counters["dead_lettered"], 1, "{counters}\n{}", host.log());
    assert_eq!(
        counters["received"], 1,
        "only the message at the limit reached ksm: {counters}"
    );
    let letter = host.get("/api/modules/big/dead-letters/1");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not a JSON object"), "{reason}");
    let data = dead_letter_data(&letter);
    assert_eq!(data.len(), size, "the dead letter holds the whole message");
    assert!(data.iter().all(|&b| b == b'x'));
    let broker_log = bench.broker.log();
    assert!(
        broker_log.contains("disconnected due to oversize packet"),
        "the broker refused the MQTT 3.1.1 client's packet:\n{broker_log}"
    );
    assert!(
        !broker_log.contains("Dropping too large outgoing PUBLISH"),
        "{broker_log}"
    );
}
