#!/usr/bin/env bash
# The test command: installs what is missing, then format, lints, every test of every crate,
# a short run of each benchmark, and the conformance suite against the reference guest and
# the JavaScript guest. Exits non-zero on any failure.
#
# Conformance runs through the dev-profile host (`cargo run -p ksm-host`), not --release:
# `cargo test` has just built that binary and every dependency in the dev profile (where
# wasmtime, cranelift and the AWS SDK are optimised at opt-level 2), so it costs only a link,
# while a release build would compile all of them a second time with LTO.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GUEST_WASM="target/wasm32-wasip2/release/ksm_guest.wasm"
START=$SECONDS

step() {
    printf '\n==> %s  [%ds]\n' "$*" "$((SECONDS - START))"
}

step "setup"
bash scripts/setup.sh

step "build the guest components (the reference, the SDK example)"
cargo build --release --target wasm32-wasip2 -p ksm-guest -p ksm-example-low-battery

step "format"
cargo fmt --all -- --check

step "clippy (host, tests, guest natively)"
cargo clippy --workspace --all-targets -- -D warnings

step "clippy (guests for wasm32-wasip2)"
cargo clippy -p ksm-guest -p ksm-guest-sdk -p ksm-example-low-battery \
    -p ksm-fixture-misbehaving-guest -p ksm-fixture-sockets-guest \
    -p ksm-fixture-wrong-world-guest --target wasm32-wasip2 -- -D warnings

step "tests (every crate)"
# The integration tests use the component built above instead of building it again.
KSM_GUEST_WASM="$ROOT/$GUEST_WASM" cargo test --workspace --no-fail-fast

step "benches: build them and run each briefly, so they keep working (figures: BENCHMARKS.md)"
# The dev profile reuses the test build (a release build would compile wasmtime and the AWS
# SDK again, with LTO, for minutes); no figure from these runs means anything.
KSM_GUEST_WASM="$ROOT/$GUEST_WASM" cargo bench -p ksm-tests --profile dev --bench guest_stage \
    -- --warm-up-time 0.2 --measurement-time 0.5
cargo bench -p ksm-tests --profile dev --bench aggregate -- --warm-up-time 0.2 --measurement-time 0.5
KSM_GUEST_WASM="$ROOT/$GUEST_WASM" cargo bench -p ksm-tests --profile dev --bench e2e \
    -- --seconds 2 --warmup 1 --drain-records 20000,100000

step "conformance: the SDK example guest, against its own cases (examples/guest-rust-low-battery)"
cargo run -p ksm-host -- conformance target/wasm32-wasip2/release/ksm_example_low_battery.wasm \
    --cases examples/guest-rust-low-battery/conformance

step "conformance: the JavaScript guest (examples/guest-js)"
bash scripts/build-js-guest.sh
cargo run -p ksm-host -- conformance target/guest-js/ksm_guest_js.wasm

step "conformance: the Python guest (examples/guest-python)"
bash scripts/build-python-guest.sh
cargo run -p ksm-host -- conformance target/guest-python/ksm_guest_python.wasm

step "conformance: the reference guest"
# Its last line, "N passed, M failed", is the last line of this script's output.
cargo run -p ksm-host -- conformance "$GUEST_WASM"
