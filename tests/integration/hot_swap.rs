//! Hot swap: a new component is loaded, checked and switched in while ksm
//! runs (admin API, SIGHUP, file change), without losing or repeating a
//! message; a bad one is refused and the running one stays; each module may
//! run its own component; compiled components are cached.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ksm_tests::{TempDir, misbehaving_guest_wasm, publish_all, sockets_guest_wasm};

use crate::support::{Bench, HostOptions, Ksm, ModuleSpec, config_with_options, module};

/// The tag in the misbehaving fixture that each build carries.
const TAG: &[u8] = b"ksm-fixture-version-0000";

/// Writes build `version` of the tagged fixture to `path` (atomically, as
/// a deployment would: write aside, then rename).
fn install_version(version: u16, path: &Path) {
    let mut wasm = std::fs::read(misbehaving_guest_wasm()).expect("read the fixture");
    let at = wasm
        .windows(TAG.len())
        .position(|w| w == TAG)
        .expect("the fixture carries its tag");
    let digits = format!("{version:04}");
    wasm[at + TAG.len() - 4..at + TAG.len()].copy_from_slice(digits.as_bytes());
    let aside = path.with_extension("wasm.new");
    std::fs::write(&aside, wasm).expect("write the new build");
    std::fs::rename(&aside, path).expect("move the new build in place");
}

/// The version that produced a record of the tagged fixture.
fn version_of(data: &[u8]) -> u16 {
    let tag = &data[..TAG.len()];
    std::str::from_utf8(&tag[TAG.len() - 4..])
        .ok()
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("not a tagged record: {}", String::from_utf8_lossy(data)))
}

fn start(bench: &Bench, component: &Path, modules: &[ModuleSpec], component_extra: &str) -> Ksm {
    let options = HostOptions {
        component: component_extra.into(),
        ..HostOptions::default()
    };
    Ksm::start(
        &config_with_options(
            &bench.broker.url(),
            "ksm-swap",
            component,
            modules,
            &options,
        ),
        ksm_tests::aws_env(&bench.moto.endpoint(), &bench.moto.endpoint()),
    )
}

/// A bench and a host whose one module `tagged` runs build `version` of the
/// tagged fixture from a file of its own (returned, with its directory),
/// swapped only when asked.
async fn tagged_host(prefix: &str, shards: i32, version: u16) -> (Bench, TempDir, PathBuf, Ksm) {
    let bench = Bench::new(prefix, shards).await;
    let dir = TempDir::new(prefix);
    let current = dir.path().join("current.wasm");
    install_version(version, &current);
    let host = start(
        &bench,
        &current,
        &[module(
            "tagged",
            &bench.stream,
            "subscribe_events = [\"*\"]",
        )],
        "watch_interval_ms = 0",
    );
    (bench, dir, current, host)
}

fn running_hash(host: &Ksm, module: &str) -> String {
    let modules = host.get("/api/modules");
    modules
        .as_array()
        .and_then(|all| all.iter().find(|m| m["id"] == module))
        .and_then(|m| m["component"]["sha256"].as_str())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_component_under_load_loses_and_repeats_nothing() {
    let (bench, _dir, current, host) = tagged_host("swap", 2, 0).await;

    // Publish in paced chunks on one task until the main task has swapped
    // five times.
    const SWAPS: u16 = 5;
    let url = bench.broker.url();
    let swapping = Arc::new(AtomicBool::new(true));
    let publishing = swapping.clone();
    let publisher = tokio::spawn(async move {
        let mut sent = 0u64;
        // One more chunk after the last swap, so the last version handles some.
        let mut last_round = false;
        while !last_round {
            last_round = !publishing.load(Ordering::Acquire);
            let messages: Vec<(String, String)> = (sent..sent + 50)
                .map(|n| (format!("/devices/{}/event", 1 + n % 20), format!("tag:{n}")))
                .collect();
            publish_all(&url, &messages).await;
            sent += 50;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });
    let mut load_ms = Vec::new();
    for version in 1..=SWAPS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        install_version(version, &current);
        let (status, body) = host.post("/api/component/reload");
        assert_eq!(status, 200, "{body}");
        let outcomes: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(outcomes[0]["outcome"], "swapped", "{outcomes}");
        let info = host.get("/api/modules")[0]["component"].clone();
        load_ms.push(info["load_ms"].as_u64().unwrap_or(0));
    }
    swapping.store(false, Ordering::Release);
    let messages = publisher.await.expect("the publisher finishes");
    let (status, body) = host.post("/api/component/reload");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"unchanged\""), "{body}");

    let records = bench.records(messages as usize).await;
    let mut by_message: Vec<Option<u16>> = vec![None; messages as usize];
    for record in &records {
        let text = String::from_utf8_lossy(&record.data);
        let n: usize = text
            .rsplit("tag:")
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected record {text}"));
        assert!(by_message[n].is_none(), "message {n} produced two records");
        by_message[n] = Some(version_of(&record.data));
    }
    let versions: Vec<u16> = by_message
        .iter()
        .enumerate()
        .map(|(n, v)| v.unwrap_or_else(|| panic!("message {n} produced no record")))
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "each message is handled by the version running when it arrived, in order"
    );
    let used: std::collections::BTreeSet<u16> = versions.iter().copied().collect();
    assert!(
        used.len() >= 3,
        "the load spanned several versions: {used:?}"
    );

    let log = host.module_log("tagged");
    let pauses: Vec<u64> = log
        .lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once("switched between two messages in ")?;
            rest.split(' ').next()?.parse().ok()
        })
        .collect();
    assert_eq!(pauses.len(), usize::from(SWAPS), "{log}");
    eprintln!(
        "swap-figures: {messages} messages, {SWAPS} swaps, versions seen {used:?}, load+check ms \
         {load_ms:?}, longest switch {} µs",
        pauses.iter().max().unwrap_or(&0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_component_is_refused_and_the_running_one_stays() {
    let (bench, _dir, current, host) = tagged_host("swap-bad", 1, 1).await;
    let before = running_hash(&host, "tagged");

    std::fs::copy(sockets_guest_wasm(), &current).expect("copy the sockets guest");
    let (status, body) = host.post("/api/component/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("wasi:sockets"), "{body}");
    std::fs::write(&current, b"not a component").expect("write garbage");
    let (status, body) = host.post("/api/component/reload");
    assert_eq!(status, 422, "{body}");
    // Build 9999 sleeps a minute in configure: refused within its deadline.
    install_version(9999, &current);
    let asked = Instant::now();
    let (status, body) = host.post("/api/component/reload");
    let took = asked.elapsed();
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("for the clock"), "{body}");
    assert!(
        took < Duration::from_secs(10),
        "a sleeping configure took {took:?}"
    );
    assert_eq!(
        running_hash(&host, "tagged"),
        before,
        "the running one stays"
    );
    let errors = host.get("/api/modules/tagged/logs?level=error");
    assert_eq!(errors.as_array().map_or(0, Vec::len), 3, "{errors}");
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not swapped in"),
        "{errors}"
    );

    publish_all(&bench.broker.url(), &[("/devices/3/event", "tag:still")]).await;
    let records = bench.records(1).await;
    assert_eq!(version_of(&records[0].data), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_changes_and_sighup_swap_per_module_components_from_the_cache() {
    let bench = Bench::new("swap-watch", 1).await;
    let dir = TempDir::new("ksm-swap-watch");
    let shared = dir.path().join("shared.wasm");
    let own = dir.path().join("own.wasm");
    install_version(1, &shared);
    install_version(7, &own);
    let modules = [
        module("default", &bench.stream, "subscribe_events = [\"a\"]"),
        module(
            "own",
            &bench.stream,
            &format!(
                "subscribe_events = [\"b\"]\ncomponent = \"{}\"",
                own.display()
            ),
        ),
    ];
    let mut host = start(&bench, &shared, &modules, "watch_interval_ms = 100");
    let cache = host.storage_dir().join("component-cache");
    assert!(
        walk(&cache).iter().any(|f| f.is_file()),
        "compiled components are cached in {}",
        cache.display()
    );
    let listed = host.get("/api/modules");
    let first_load_ms = listed[0]["component"]["load_ms"].clone();
    assert_eq!(listed[0]["component"]["path"], shared.display().to_string());
    assert_eq!(listed[1]["component"]["path"], own.display().to_string());
    let own_hash = running_hash(&host, "own");

    // A file change swaps only the modules that run that file.
    let before = running_hash(&host, "default");
    install_version(2, &shared);
    wait_until(
        || running_hash(&host, "default") != before,
        "the file change to be picked up",
    );
    assert_eq!(running_hash(&host, "own"), own_hash);

    // SIGHUP reloads too (the watcher is off after this restart).
    assert!(host.stop());
    host.edit_config(|text| text.replace("watch_interval_ms = 100", "watch_interval_ms = 0"));
    host.restart();
    eprintln!(
        "swap-figures: start-up load+check ms: {first_load_ms} compiling, {} from the cache",
        host.get("/api/modules")[0]["component"]["load_ms"]
    );
    let before = running_hash(&host, "own");
    install_version(8, &own);
    host.signal("HUP");
    wait_until(|| running_hash(&host, "own") != before, "SIGHUP to reload");

    publish_all(&bench.broker.url(), &[("/devices/3/event", "tag:sighup")]).await;
    let records = bench.records(2).await;
    let versions: std::collections::BTreeSet<u16> =
        records.iter().map(|r| version_of(&r.data)).collect();
    assert_eq!(
        versions,
        [2, 8].into(),
        "each module answers with its own, swapped, component"
    );
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "waited 20 s for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(walk(&path));
            } else {
                found.push(path);
            }
        }
    }
    found
}
