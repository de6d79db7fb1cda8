#!/usr/bin/env bash
# Builds the Python guest (examples/guest-python: app.py and ksm_guest/) into a WebAssembly
# component for the `smart-module` world of wit/1.0: target/guest-python/ksm_guest_python.wasm.
#
#   - a venv in target/guest-python/venv with componentize-py (pinned in
#     examples/guest-python/requirements.txt), made with Debian's python3 and pip only when
#     missing or installed from another requirements.txt;
#   - wasm-tools (pinned below) from crates.io into target/guest-python/tools, only when
#     missing (cargo install, about 3 minutes on two cores, once);
#   - componentize-py: CPython and the guest, pre-initialised, into a component; it imports
#     wasi:sockets (wasi-libc's sockets, which the guest never calls), which ksm refuses;
#   - so the sockets interfaces it imports are filled with trapping stubs: a component that
#     exports them (`wasm-tools component embed --dummy`) composed into the guest
#     (`wasm-tools compose`). Not componentize-py's --stub-wasi, which stubs every WASI
#     import, randomness included (UUIDv4 keys need wasi:random);
#   - a check that the result imports only what the host grants (ksm:smart-module/types and
#     WASI cli, clocks, filesystem, io, random);
#   skipped when the component was built from the same inputs.
#
# Quiet on success; on failure prints the failing tool's output. Run it again at will.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GUEST_DIR="$ROOT/examples/guest-python"
OUT_DIR="$ROOT/target/guest-python"
OUT="$OUT_DIR/ksm_guest_python.wasm"
VENV="$OUT_DIR/venv"
TOOLS="$OUT_DIR/tools"
PYTHON=/usr/bin/python3
WASM_TOOLS_VERSION="1.254.2"
WASM_TOOLS="$TOOLS/bin/wasm-tools"

SCRIPT=build-python-guest
# shellcheck source=scripts/quietly.sh
source "$ROOT/scripts/quietly.sh"

[ -x "$PYTHON" ] || die "$PYTHON is missing: install Debian's python3 and python3-venv (apt-get install python3 python3-venv; scripts/setup.sh does)"
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
    || die "$PYTHON cannot make a venv: install Debian's python3-venv (apt-get install python3-venv; scripts/setup.sh does)"
command -v cargo >/dev/null 2>&1 || die "cargo is not installed (it builds wasm-tools)"

# --- componentize-py in a venv, only when missing or stale --------------------------------
requirements="$GUEST_DIR/requirements.txt"
req_sum="$(sha256sum "$requirements" | cut -d' ' -f1)"
venv_stamp="$VENV/.ksm-requirements.sha256"
if [ ! -x "$VENV/bin/componentize-py" ] || [ ! -f "$venv_stamp" ] \
    || [ "$(cat "$venv_stamp")" != "$req_sum" ]; then
    rm -rf "$VENV"
    mkdir -p "$OUT_DIR"
    quietly "$PYTHON" -m venv "$VENV"
    quietly "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$requirements"
    printf '%s\n' "$req_sum" >"$venv_stamp"
fi

# --- wasm-tools, only when missing or another version --------------------------------------
if [ ! -x "$WASM_TOOLS" ] || [ "$("$WASM_TOOLS" --version 2>/dev/null | cut -d' ' -f2)" != "$WASM_TOOLS_VERSION" ]; then
    quietly cargo install --locked --root "$TOOLS" "wasm-tools@$WASM_TOOLS_VERSION" \
        --no-default-features --features component,compose
fi

# --- componentize, only when an input changed ----------------------------------------------
# The build's inputs: the guest's sources, the WIT, the pinned tools and this script.
sources=("$GUEST_DIR/app.py" "$GUEST_DIR"/ksm_guest/*.py)
inputs_sum="$(
    {
        sha256sum "${sources[@]}" "$ROOT"/wit/1.0/*.wit "${BASH_SOURCE[0]}"
        printf '%s\n' "$req_sum" "$WASM_TOOLS_VERSION"
    } | sed "s|$ROOT/||" | sha256sum | cut -d' ' -f1
)"
out_stamp="$OUT_DIR/.ksm_guest_python.inputs.sha256"
if [ -f "$OUT" ] && [ -f "$out_stamp" ] && [ "$(cat "$out_stamp")" = "$inputs_sum" ]; then
    exit 0
fi

work="$OUT_DIR/build"
rm -rf "$work" "$out_stamp" "$OUT"
mkdir -p "$work/src/ksm_guest" "$work/stub-wit"
# The sources are copied aside: pre-initialisation may write __pycache__ beside them.
cp "$GUEST_DIR/app.py" "$work/src/"
cp "$GUEST_DIR"/ksm_guest/*.py "$work/src/ksm_guest/"

quietly "$VENV/bin/componentize-py" --wit-path "$ROOT/wit/1.0" --world smart-module \
    componentize --python-path "$work/src" app --output "$work/guest.wasm"

# The sockets interfaces the component imports, and a component that exports each with
# functions that trap (the guest never opens a socket).
quietly "$WASM_TOOLS" component wit "$work/guest.wasm" --out-dir "$work/guest-wit"
sockets="$("$WASM_TOOLS" component wit "$work/guest.wasm" \
    | sed -n 's/^ *import \(wasi:sockets\/[a-z-]*@[0-9.]*\);$/\1/p')"
if [ -n "$sockets" ]; then
    cp -r "$work/guest-wit/deps" "$work/stub-wit/deps"
    {
        printf 'package ksm:python-guest-stubs;\n\nworld sockets-stub {\n'
        printf '  export %s;\n' $sockets
        printf '}\n'
    } >"$work/stub-wit/stub.wit"
    quietly "$WASM_TOOLS" component embed --dummy "$work/stub-wit" --world sockets-stub \
        --output "$work/stub.core.wasm"
    quietly "$WASM_TOOLS" component new "$work/stub.core.wasm" --output "$work/stub.wasm"
    quietly "$WASM_TOOLS" compose "$work/guest.wasm" --definitions "$work/stub.wasm" \
        --output "$work/composed.wasm"
else
    cp "$work/guest.wasm" "$work/composed.wasm"
fi

# Only what the host grants (the sandbox world of wit/1.1/sandbox.wit).
refused="$("$WASM_TOOLS" component wit "$work/composed.wasm" \
    | sed -n 's/^ *import \([^ ;]*\);$/\1/p' \
    | grep -Ev '^(ksm:smart-module/types|wasi:(cli|clocks|filesystem|io|random)/[a-z-]+)@' || true)"
[ -z "$refused" ] || die "the component still imports what ksm does not grant: $refused"

mv -f "$work/composed.wasm" "$OUT"
printf '%s\n' "$inputs_sum" >"$out_stamp"
rm -rf "$work"
