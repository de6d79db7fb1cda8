#!/usr/bin/env bash
# Builds the JavaScript guest (examples/guest-js/guest.js) into a WebAssembly component for
# the `smart-module` world of wit/: target/guest-js/ksm_guest_js.wasm.
#
#   - npm ci in examples/guest-js, only when node_modules is missing or was installed from
#     another package-lock.json (componentize-js and jco, pinned there; needs Node.js >= 20);
#   - componentize-js, with every optional StarlingMonkey feature the guest does not use
#     disabled (http, fetch-event, stdio, clocks), so that the component imports only
#     ksm:smart-module/types and wasi:random/random (for UUIDv4 keys); skipped when the
#     component was built from the same inputs.
#
# componentize-js's own CLI is used rather than `jco componentize`: jco 1.34 bundles
# componentize-js 0.22, whose bindings leak memory on every call (ComponentizeJS #350), and
# jco 1.35's componentize cannot read the WIT directory (its WASI shim preopens nothing).
#
# Quiet on success; on failure prints the failing tool's output. Run it again at will.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="$ROOT/examples/guest-js"
OUT_DIR="$ROOT/target/guest-js"
OUT="$OUT_DIR/ksm_guest_js.wasm"
# Features of the StarlingMonkey engine the guest does not need. `random` stays: the guest
# calls crypto.getRandomValues for UUIDv4 partition keys.
DISABLED_FEATURES=(http fetch-event stdio clocks)

SCRIPT=build-js-guest
# shellcheck source=scripts/quietly.sh
source "$ROOT/scripts/quietly.sh"

command -v node >/dev/null 2>&1 || die "node is not installed (Node.js 20 or later is needed)"
command -v npm >/dev/null 2>&1 || die "npm is not installed"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || die "Node.js $(node --version) is too old: 20 or later is needed"

# --- npm ci, only when node_modules is missing or stale ----------------------------------
lock="$GUEST_DIR/package-lock.json"
stamp="$GUEST_DIR/node_modules/.ksm-package-lock.sha256"
lock_sum="$(sha256sum "$lock" | cut -d' ' -f1)"
if [ ! -x "$GUEST_DIR/node_modules/.bin/componentize-js" ] || [ ! -f "$stamp" ] \
    || [ "$(cat "$stamp")" != "$lock_sum" ]; then
    quietly npm ci --prefix "$GUEST_DIR" --no-audit --no-fund --loglevel=error
    printf '%s\n' "$lock_sum" >"$stamp"
fi

# --- componentize, only when an input changed ---------------------------------------------
# The build's inputs: the guest, the WIT, the pinned tools and this script's options.
inputs_sum="$(
    {
        sha256sum "$GUEST_DIR/guest.js" "$ROOT"/wit/1.0/*.wit
        printf '%s\n' "$lock_sum" "${DISABLED_FEATURES[*]}"
    } | sed "s|$ROOT/||" | sha256sum | cut -d' ' -f1
)"
out_stamp="$OUT_DIR/.ksm_guest_js.inputs.sha256"
if [ -f "$OUT" ] && [ -f "$out_stamp" ] && [ "$(cat "$out_stamp")" = "$inputs_sum" ]; then
    exit 0
fi

mkdir -p "$OUT_DIR"
tmp_out="$OUT_DIR/.ksm_guest_js.wasm.partial"
rm -f "$out_stamp" "$tmp_out" "$OUT"
quietly "$GUEST_DIR/node_modules/.bin/componentize-js" "$GUEST_DIR/guest.js" \
    --wit "$ROOT/wit/1.0" --world-name smart-module \
    --disable "${DISABLED_FEATURES[@]}" \
    -o "$tmp_out"
mv -f "$tmp_out" "$OUT"
printf '%s\n' "$inputs_sum" >"$out_stamp"
