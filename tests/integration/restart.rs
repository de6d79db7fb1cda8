//! The persistent session: messages published while ksm is down wait at the
//! broker and arrive after a restart; SIGTERM stops the host cleanly.

use crate::support::{Bench, module};

#[tokio::test(flavor = "multi_thread")]
async fn messages_sent_while_ksm_is_down_arrive_after_restart() {
    let bench = Bench::new("restart", 1).await;
    let mut host = bench.ksm(
        "ksm-restart",
        &[module(
            "durable",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    let event = |n: usize| {
        (
            "/devices/1001/event".to_owned(),
            format!(r#"{{"eventType":"seq","eventData":{{"n":{n}}}}}"#),
        )
    };
    bench.publish(&[event(0)]).await;
    bench.records(1).await;

    assert!(host.stop(), "ksm exits cleanly on SIGTERM:\n{}", host.log());
    let while_down: Vec<_> = (1..=10).map(event).collect();
    bench.publish(&while_down).await;
    host.restart();

    let records = bench.records(11).await;
    let numbers: Vec<u64> = records
        .iter()
        .map(|r| r.data_json()["eventData"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(numbers, (0..=10).collect::<Vec<_>>(), "{}", host.log());
    assert!(host.log().contains("session resumed"), "{}", host.log());
}
