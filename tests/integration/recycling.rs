//! Guest instances recycled: a guest whose heap only grows (the JavaScript
//! guest's engine keeps what it allocates) is given a fresh instance before
//! it reaches the memory limit, so no message is lost to it.

use std::time::Duration;

use ksm_tests::{aws_env, js_guest_wasm};

use crate::support::{Bench, HostOptions, Ksm, config_with_options, module};

/// Events of about 1 MB each: without recycling, the JavaScript guest
/// loses about one in thirteen to its 64 MiB limit.
const EVENTS: usize = 20;

fn big_event(n: usize) -> String {
    let filler = "x".repeat(1_000_000);
    format!(r#"{{"eventType":"scan","eventData":{{"n":{n},"blob":"{filler}"}},"homeId":77}}"#)
}

/// Runs the JavaScript guest with `component` settings over `events`
/// events of 1 MB; returns its counters once every message is settled, and
/// how often its instance was recycled.
async fn run_js_guest(prefix: &str, component: &str, events: usize) -> Outcome {
    let bench = Bench::new(prefix, 1).await;
    let options = HostOptions {
        component: format!("call_timeout_ms = 5000\nmax_memory_mib = 64\n{component}"),
        ..HostOptions::default()
    };
    let text = config_with_options(
        &bench.broker.url(),
        &format!("ksm-{prefix}"),
        &js_guest_wasm(),
        &[module("scans", &bench.stream, "subscribe_events = [\"*\"]")],
        &options,
    );
    let host = Ksm::start(
        &text,
        aws_env(&bench.moto.endpoint(), &bench.moto.endpoint()),
    );
    let messages: Vec<(String, String)> = (0..events)
        .map(|n| ("/devices/1001/event".to_owned(), big_event(n)))
        .collect();
    bench.publish(&messages).await;
    let counters = host.wait_for_counters_within("scans", Duration::from_secs(120), |c| {
        c["forwarded"].as_u64().unwrap_or(0) + c["dead_lettered"].as_u64().unwrap_or(0)
            == events as u64
    });
    let metrics = host.get_raw("/metrics").1;
    let recycles = metrics
        .lines()
        .find(|line| line.starts_with("ksm_guest_recycles_total{module=\"scans\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    Outcome {
        counters,
        recycles,
        log: host.module_log("scans"),
    }
}

/// What a run of the JavaScript guest came to.
struct Outcome {
    counters: serde_json::Value,
    recycles: u64,
    log: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_whose_heap_only_grows_is_recycled_before_it_loses_a_message() {
    // Its memory past 48 MiB (the default, three quarters of 64): recycled.
    let Outcome {
        counters,
        recycles,
        log,
    } = run_js_guest("recycled", "", EVENTS).await;
    assert_eq!(counters["forwarded"], EVENTS as u64, "{counters}\n{log}");
    assert_eq!(counters["dead_lettered"], 0, "{counters}\n{log}");
    assert!(recycles > 0, "the instance was recycled: {recycles}");

    // After a number of calls instead, with the memory mark out of reach.
    let Outcome {
        counters,
        recycles,
        log,
    } = run_js_guest(
        "recycled-calls",
        "recycle_above_mib = 64\nrecycle_after_calls = 4",
        12,
    )
    .await;
    assert_eq!(counters["forwarded"], 12, "{counters}\n{log}");
    assert_eq!(recycles, 3, "every 4 calls");
}
