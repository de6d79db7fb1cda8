//! The guest is untrusted: one that traps, loops or eats memory costs the
//! message it was handling (kept as a dead letter), not the host; one that
//! imports what the host does not give, or is of another world, is refused
//! when it is loaded.

use std::time::Duration;

use ksm_host::bindings::types::{DeviceContext, ModuleSettings};
use ksm_host::runtime::{GuestLimits, Runtime, RuntimeError};
use ksm_tests::{
    aws_env, guest_wasm, misbehaving_guest_wasm, sockets_guest_wasm, wrong_world_guest_wasm,
};

use crate::support::{Bench, Ksm, config_with_component, dead_letter_data, ksm_command, module};

fn context() -> DeviceContext {
    DeviceContext {
        device_id: 7,
        home_id: Some(1),
        device_class: None,
        device_ip: None,
        received_at: "2026-01-01T00:00:00.000Z".into(),
    }
}

#[test]
fn a_failing_call_is_an_error_and_the_next_call_works() {
    let limits = GuestLimits {
        call_timeout: Duration::from_millis(100),
        max_memory_bytes: 32 * 1024 * 1024,
    };
    let runtime = Runtime::load_with(&misbehaving_guest_wasm(), limits).expect("the fixture loads");
    let settings = ModuleSettings {
        subscribe_events: vec!["*".into()],
        bulk_data_label: None,
        use_uuid: false,
        max_record_size: 1024 * 1024,
    };
    let mut guest = runtime
        .instantiate(&settings)
        .expect("the fixture configures");
    for (payload, symptom) in [
        ("panic", "unreachable"),
        ("loop", "interrupt"),
        ("hog", "memory"),
    ] {
        match guest.device_event(&context(), payload.as_bytes()) {
            Err(RuntimeError::Trap(trap)) => {
                let text = format!("{trap:?}");
                assert!(text.contains(symptom), "{payload}: {text}");
            }
            Err(other) => panic!("{payload}: expected a trap, got {other}"),
            Ok(answer) => panic!("{payload}: expected a trap, got {answer:?}"),
        }
        let records = guest
            .device_event(&context(), b"fine")
            .expect("the replaced instance answers")
            .expect("and accepts the event");
        assert_eq!(records.len(), 1, "after {payload}");
        assert_eq!(records[0].data, b"fine");
        assert_eq!(records[0].partition_key, "7");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_messages_become_dead_letters_and_the_rest_flows() {
    let bench = Bench::new("untrusted", 1).await;
    let text = config_with_component(
        &bench.broker.url(),
        "ksm-untrusted",
        &misbehaving_guest_wasm(),
        &[module(
            "sandboxed",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
    );
    let host = Ksm::start(
        &text,
        aws_env(&bench.moto.endpoint(), &bench.moto.endpoint()),
    );
    let topic = "/devices/7/event";
    bench
        .publish(&[
            (topic, "panic"),
            (topic, "one"),
            (topic, "loop"),
            (topic, "two"),
            (topic, "hog"),
            (topic, "three"),
        ])
        .await;

    let records = bench.records(3).await;
    let data: Vec<String> = records.iter().map(|r| r.data_text()).collect();
    assert_eq!(data, ["one", "two", "three"], "{}", host.log());
    let letters = host.get("/api/modules/sandboxed/dead-letters");
    let letters = letters.as_array().expect("a list");
    assert_eq!(letters.len(), 3, "{letters:?}");
    for (letter, payload) in letters.iter().zip(["panic", "loop", "hog"]) {
        let reason = letter["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("component failed"), "{reason}");
        assert_eq!(dead_letter_data(letter), payload.as_bytes());
    }
    let errors = host.get("/api/modules/sandboxed/logs?level=error");
    assert_eq!(errors.as_array().expect("a list").len(), 3, "{errors}");
    let counters = host.counters("sandboxed");
    assert_eq!(counters["received"], 6);
    assert_eq!(counters["dead_lettered"], 3);
}

#[test]
fn a_guest_that_imports_sockets_is_refused_at_load_naming_the_import() {
    let path = sockets_guest_wasm();
    match Runtime::load(&path) {
        Err(RuntimeError::Import { import, .. }) => {
            assert!(import.starts_with("wasi:sockets/"), "{import}");
        }
        Err(other) => panic!("expected an import refusal, got {other}"),
        Ok(_) => panic!("a guest importing wasi:sockets must not load"),
    }
    let (ok, _, stderr) = ksm_command(&["conformance", &path.display().to_string()]);
    assert!(!ok);
    assert!(
        stderr.contains("imports `wasi:sockets/") && stderr.contains("does not give to guests"),
        "{stderr}"
    );
}

#[test]
fn a_component_of_another_world_is_refused_at_load() {
    match Runtime::load(&wrong_world_guest_wasm()) {
        Err(RuntimeError::Link { source, .. }) => {
            let text = format!("{source:#}");
            assert!(text.contains("ksm:smart-module"), "{text}");
        }
        Err(other) => panic!("expected a world mismatch, got {other}"),
        Ok(_) => panic!("a component of another world must not load"),
    }
}

#[test]
fn the_reference_guest_imports_only_what_the_host_gives() {
    Runtime::load(&guest_wasm()).expect("the reference guest loads");
}
