#!/usr/bin/env bash
# Installs what ksm's tests and quickstart need on a Debian 12 machine, and only what is
# missing, so running it again is quick:
#   - Mosquitto broker and clients (apt; the system service Debian starts is stopped),
#   - curl, Node.js and npm (apt, only if missing),
#   - Debian's python3 with python3-venv (apt, only if missing; the Python guest's build),
#   - the Rust target wasm32-wasip2, clippy and rustfmt (rustup),
#   - moto's server 5.2.1 with boto3 1.40.60 or later (pip; an older botocore does not know
#     MaxRecordSizeInKiB, which tests/emulators/moto_server.py adds to moto),
#   - aws-kinesis-agg 1.2.3 with protobuf (pip), the KPL reference de-aggregator that
#     tests/emulators/deaggregate.py reads streams with,
#   - kinesalite 3.3.3 in tests/emulators (npm ci, from package-lock.json),
#   - Debian's Chromium (apt, only if missing) and playwright-core 1.64.1 in tests/browser
#     (npm ci), which drive the console in its browser test.
# Run as root, or as a user with sudo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOTO_VERSION="5.2.1"
BOTO3_MIN_VERSION="1.40.60"
KINESIS_AGG_VERSION="1.2.3"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        die "not root and sudo is not available; run as root"
    fi
fi

# --- Debian packages ---------------------------------------------------------------------

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

APT_UPDATED=0
apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        is_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# Debian's mosquitto package starts a broker on port 1883. The tests and the quickstart run
# their own brokers on other ports; stop the system one so it holds no port and no state.
stop_system_mosquitto() {
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/mosquitto ]; then
        $SUDO /etc/init.d/mosquitto stop >/dev/null 2>&1 || true
    fi
    local pidfile=/run/mosquitto/mosquitto.pid
    if [ -f "$pidfile" ]; then
        local pid
        pid="$(cat "$pidfile")"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            say "stopping the system mosquitto service (pid $pid)"
            $SUDO kill "$pid" || true
        fi
    fi
}

if is_installed mosquitto && is_installed mosquitto-clients; then
    say "mosquitto: installed ($(dpkg-query -W -f='${Version}' mosquitto))"
else
    apt_install mosquitto mosquitto-clients
    stop_system_mosquitto
fi

if command -v curl >/dev/null 2>&1; then
    say "curl: installed"
else
    apt_install curl ca-certificates
fi

if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    say "node: $(node --version), npm: $(npm --version)"
else
    apt_install nodejs npm
fi

# Debian's python3 with venv: scripts/build-python-guest.sh makes its venv with it.
if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    say "python3 (Debian): $(/usr/bin/python3 --version), with venv"
else
    apt_install python3 python3-venv
fi

# --- Rust --------------------------------------------------------------------------------

command -v cargo >/dev/null 2>&1 || die "cargo is not installed (install Rust with rustup)"
if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    say "rust target wasm32-wasip2: installed"
else
    say "rustup target add wasm32-wasip2"
    rustup target add wasm32-wasip2
fi
for component in clippy rustfmt; do
    if cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        say "rust component $component: installed"
    else
        say "rustup component add $component"
        rustup component add "$component"
    fi
done

# --- moto (Kinesis and STS emulator), boto3 and aws-kinesis-agg --------------------------

command -v python3 >/dev/null 2>&1 || apt_install python3
if ! python3 -m pip --version >/dev/null 2>&1; then
    apt_install python3-pip
fi

# pip install "$@", retrying with --break-system-packages where this Python is externally
# managed (PEP 668).
pip_install() {
    local pip_args=(install --quiet --disable-pip-version-check --root-user-action=ignore "$@")
    local out
    if ! out="$(python3 -m pip "${pip_args[@]}" 2>&1)"; then
        if grep -q "externally-managed-environment" <<<"$out"; then
            say "pip: this Python is externally managed; retrying with --break-system-packages"
            $SUDO python3 -m pip "${pip_args[@]}" --break-system-packages
        else
            printf '%s\n' "$out" >&2
            die "pip install $* failed"
        fi
    fi
}

moto_ready() {
    python3 - "$MOTO_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata, sys
assert importlib.metadata.version("moto") == sys.argv[1]
import moto.server, flask_cors, boto3  # noqa: F401  (the [server] extra and the SDK)
from moto.core.utils import get_service_model
# botocore 1.40.60 on knows UpdateMaxRecordSize and MaxRecordSizeInKiB.
assert "UpdateMaxRecordSize" in get_service_model("kinesis").operation_names
PY
}

if moto_ready; then
    say "moto $MOTO_VERSION: installed"
else
    say "pip install moto[server]==$MOTO_VERSION boto3>=$BOTO3_MIN_VERSION"
    pip_install "moto[server]==$MOTO_VERSION" "boto3>=$BOTO3_MIN_VERSION"
    # pyenv only sees new console scripts (moto_server) after a rehash.
    if command -v pyenv >/dev/null 2>&1; then
        pyenv rehash || true
    fi
    moto_ready || die "moto $MOTO_VERSION is still not importable by python3 after pip install"
fi
# The tests and the quickstart run moto through tests/emulators/moto_server.py with this python3.

kinesis_agg_ready() {
    python3 - "$KINESIS_AGG_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata, sys
assert importlib.metadata.version("aws-kinesis-agg") == sys.argv[1]
import aws_kinesis_agg.aggregator, aws_kinesis_agg.deaggregator  # noqa: F401  (and protobuf)
PY
}

if kinesis_agg_ready; then
    say "aws-kinesis-agg $KINESIS_AGG_VERSION: installed"
else
    say "pip install aws-kinesis-agg==$KINESIS_AGG_VERSION"
    pip_install "aws-kinesis-agg==$KINESIS_AGG_VERSION"
    kinesis_agg_ready \
        || die "aws-kinesis-agg $KINESIS_AGG_VERSION is still not importable by python3 after pip install"
fi

# --- npm packages: kinesalite (second Kinesis emulator), playwright-core (browser test) ---

# npm ci in tests/$1 unless its node_modules matches its package-lock.json and holds $2.
# --ignore-scripts: kinesalite runs in memory, so leveldown's native build is not needed, and
# playwright-core drives the Chromium installed below rather than downloading a browser.
npm_ci() {
    local dir="$ROOT/tests/$1"
    local stamp="$dir/node_modules/.ksm-package-lock.sha256"
    local lock_sum
    lock_sum="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
    if [ -f "$dir/node_modules/$2" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$lock_sum" ]; then
        say "tests/$1: installed (node_modules is current)"
    else
        say "npm ci in tests/$1"
        (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
        printf '%s\n' "$lock_sum" >"$stamp"
    fi
}
npm_ci emulators kinesalite/cli.js
npm_ci browser playwright-core/package.json

if [ -x /usr/bin/chromium ]; then
    say "chromium: installed ($(dpkg-query -W -f='${Version}' chromium 2>/dev/null || echo unknown))"
else
    apt_install chromium
fi

say "done"
