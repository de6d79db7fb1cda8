//! The console in a real browser: Debian's Chromium, driven by
//! `tests/browser/console.mjs` (playwright-core), against a host on
//! Mosquitto and moto. The script asserts on what each page shows and
//! writes screenshots to `target/console-screenshots/`; this test then
//! checks that what the operator did happened.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ksm_host::config::TOKEN_ENV;
use ksm_tests::{aws_env, create_stream, unique_stream_name, wait_for_records};

use crate::support::{Bench, Ksm, config, module};

const TOKEN: &str = "console-token-0123456789abcdef";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_does_what_an_operator_needs() {
    let bench = Bench::new("console", 1).await;
    let made_stream = unique_stream_name("console-made");
    create_stream(&bench.kinesis, &made_stream, 1).await;
    let mut env = aws_env(&bench.moto.endpoint(), &bench.moto.endpoint());
    env.push((TOKEN_ENV.to_owned(), TOKEN.to_owned()));
    let host = Ksm::start(
        &config(
            &bench.broker.url(),
            "ksm-console",
            &[module("first", &bench.stream, "subscribe_events = [\"*\"]")],
        ),
        env,
    );
    let root = workspace();
    let script = root.join("tests/browser/console.mjs");
    let broker = bench.broker.url().trim_start_matches("mqtt://").to_owned();
    let output = Command::new("node")
        .arg(&script)
        .current_dir(root.join("tests/browser"))
        .env("KSM_CONSOLE_URL", format!("http://{}/", host.admin_addr()))
        .env("KSM_ADMIN_TOKEN", TOKEN)
        .env("KSM_BROKER", &broker)
        .env("KSM_STREAM", &made_stream)
        .env("KSM_FIRST_MODULE", "first")
        .env("KSM_SCREENSHOTS", root.join("target/console-screenshots"))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run node {} (scripts/setup.sh installs it): {e}",
                script.display()
            )
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the browser run failed:\n{said}\n{}",
        host.log()
    );
    assert!(said.contains("console: every step passed"), "{said}");

    // What the operator did happened: 3 status events and 1 alert reached
    // the module's stream, and the module is gone from the host and the file.
    let landed = wait_for_records(&bench.kinesis, &made_stream, 4, Duration::from_secs(30)).await;
    let types: Vec<String> = landed
        .iter()
        .map(|r| {
            let event: serde_json::Value = serde_json::from_slice(&r.data).expect("an event");
            event["eventType"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(types, ["status", "status", "status", "alert"], "{types:?}");
    let ids: Vec<serde_json::Value> = host
        .get("/api/modules")
        .as_array()
        .expect("modules")
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(ids, [serde_json::json!("first")]);
    let file = std::fs::read_to_string(host.config_path()).expect("the config");
    assert!(!file.contains("console-made"), "{file}");
}
