//! The guest is untrusted: one that traps, loops or eats memory costs the
//! message it was handling (kept as a dead letter), not the host; one that
//! imports what the host does not give, or is of another world, is refused
//! when it is loaded.

use std::time::{Duration, Instant};

use ksm_host::bindings::types::{DeviceContext, ModuleSettings};
use ksm_host::runtime::{CallResult, GuestFault, GuestLimits, Runtime, RuntimeError};
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

fn settings(subscribe_events: &[&str]) -> ModuleSettings {
    ModuleSettings {
        subscribe_events: subscribe_events.iter().map(|e| (*e).to_owned()).collect(),
        bulk_data_label: None,
        use_uuid: false,
        max_record_size: 1024 * 1024,
    }
}

fn fixture(call_timeout_ms: u64, max_memory_mib: usize) -> Runtime {
    let max_memory_bytes = max_memory_mib * 1024 * 1024;
    let limits = GuestLimits {
        call_timeout: Duration::from_millis(call_timeout_ms),
        max_memory_bytes,
        recycle_above_bytes: max_memory_bytes / 4 * 3,
        recycle_after_calls: 0,
    };
    Runtime::load_with(&misbehaving_guest_wasm(), limits).expect("the fixture loads")
}

/// The sandbox fault a call ended with, or a panic naming what came instead.
fn fault_of<T: std::fmt::Debug>(result: CallResult<T>) -> GuestFault {
    match result {
        Err(RuntimeError::Fault(fault)) => fault,
        other => panic!("expected a sandbox fault, got {other:?}"),
    }
}

#[test]
fn a_failing_call_is_an_error_and_the_next_call_works() {
    let runtime = fixture(100, 32);
    let mut guest = runtime.instantiate(&settings(&["*"])).expect("configures");
    for (payload, symptom) in [
        ("panic", "trapped"),
        ("loop", "ran past its deadline of 100 ms twice"),
        ("hog", "went over its memory limit of 32 MiB"),
    ] {
        match guest.device_event(&context(), payload.as_bytes()) {
            Err(error) => {
                let text = error.to_string();
                assert!(text.contains(symptom), "{payload}: {text}");
            }
            Ok(answer) => panic!("{payload}: expected a failure, got {answer:?}"),
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

#[test]
fn a_guest_cannot_sleep_past_its_deadline_nor_in_configure() {
    let runtime = fixture(50, 32);
    let mut guest = runtime.instantiate(&settings(&["*"])).expect("configures");
    let started = Instant::now();
    let fault = fault_of(guest.device_event(&context(), b"sleep:20000"));
    let took = started.elapsed();
    assert!(
        matches!(fault, GuestFault::Sleep { asked, .. } if asked == Duration::from_secs(20)),
        "{fault}"
    );
    assert!(
        took < Duration::from_secs(5),
        "a 20 s sleep must end at once, took {took:?}"
    );
    let slept = guest
        .device_event(&context(), b"sleep:5")
        .expect("a short sleep within the deadline is fine")
        .expect("and the event is answered");
    assert_eq!(slept.len(), 1);
    let forever =
        fault_of(guest.device_event(&context(), format!("sleep:{}", u64::MAX).as_bytes()));
    assert!(matches!(forever, GuestFault::Sleep { .. }), "{forever}");

    let started = Instant::now();
    match runtime.instantiate(&settings(&["*", "configure:sleep:60000"])) {
        Err(RuntimeError::Fault(GuestFault::Sleep { .. })) => {}
        Err(other) => panic!("expected a sleep fault, got {other}"),
        Ok(_) => panic!("a configure that sleeps 60 s must fail"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    match runtime.instantiate(&settings(&["*", "configure:loop"])) {
        Err(RuntimeError::Fault(fault)) => {
            assert!(matches!(fault, GuestFault::OwnWork { .. }), "{fault}");
        }
        Err(other) => panic!("expected a deadline fault, got {other}"),
        Ok(_) => panic!("a configure that loops must fail"),
    }
}

#[test]
fn memory_under_the_limit_is_fine_and_over_it_the_fault_says_so() {
    let runtime = fixture(2000, 64);
    let mut guest = runtime.instantiate(&settings(&["*"])).expect("configures");
    let records = guest
        .device_event(&context(), b"alloc:56")
        .expect("56 MiB fits under 64 MiB")
        .expect("and the event is answered");
    assert_eq!(records.len(), 1);
    let fault = fault_of(guest.device_event(&context(), b"alloc:80"));
    assert!(
        matches!(fault, GuestFault::Memory { limit, .. } if limit == 64 << 20),
        "{fault}"
    );
    assert!(
        fault.to_string().contains("memory limit of 64 MiB"),
        "{fault}"
    );
}

#[test]
fn a_memory_fault_stays_the_reason_when_its_second_try_runs_out_of_time() {
    // On a used instance the event hogs memory; its second try, on a fresh
    // instance, spins past the deadline (as a busy machine can make any second
    // try do): the message is refused for its memory, not for the time.
    let runtime = fixture(100, 32);
    let mut guest = runtime.instantiate(&settings(&["*"])).expect("configures");
    guest
        .device_event(&context(), b"first")
        .expect("an ordinary event")
        .expect("answered");
    let fault = fault_of(guest.device_event(&context(), b"hog-when-used"));
    assert!(
        matches!(fault, GuestFault::Memory { limit, .. } if limit == 32 << 20),
        "{fault}"
    );
    // The instance was replaced: the next event is answered.
    let records = guest
        .device_event(&context(), b"after")
        .expect("a fresh instance")
        .expect("answered");
    assert_eq!(records.len(), 1);
}

#[test]
fn time_that_is_not_the_guests_own_work_gets_a_second_chance() {
    // 90 ms asleep (not the guest's work) and 30 ms of its own: over a
    // 100 ms deadline on the clock, well under it in CPU time.
    let runtime = fixture(100, 32);
    let mut guest = runtime.instantiate(&settings(&["*"])).expect("configures");
    let records = guest
        .device_event(&context(), b"sleep:90,spin:30")
        .expect("the second try counts only the guest's own work")
        .expect("and the event is answered");
    assert_eq!(records.len(), 1);
    // The guest's own work over the deadline still costs the message.
    let fault = fault_of(guest.device_event(&context(), b"spin:250"));
    assert!(matches!(fault, GuestFault::OwnWork { .. }), "{fault}");
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
