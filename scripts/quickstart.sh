#!/usr/bin/env bash
# Runs ksm end to end on this machine, with nothing from AWS:
#   Mosquitto (MQTT broker) -> ksm (host + guest component) -> moto (Kinesis and STS).
# It creates the 2-shard stream "ksm-quickstart", starts `ksm run` with a config like
# examples/quickstart.toml, publishes a device event, a home event, a bulk-data payload and
# a malformed event, prints the records that landed in the stream, the module's log and the
# dead letter. Run from a terminal, it then keeps everything running, with a device
# publishing an event a second, for the console (the admin URL and token it prints) until
# Ctrl-C; otherwise (or with --no-console) it stops everything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

STREAM="ksm-quickstart"
# A second stream, for a module made in the console.
SECOND_STREAM="ksm-quickstart-2"
MODULE="sensor-stream"
STAY=0
if [ -t 0 ] && [ -t 1 ]; then
    STAY=1
fi
for arg in "$@"; do
    case "$arg" in
        --no-console) STAY=0 ;;
        *) printf 'usage: %s [--no-console]\n' "$0" >&2; exit 2 ;;
    esac
done
ADMIN="127.0.0.1:8686"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
# The host is built in the dev profile, as the tests build it: the heavy dependencies
# are optimised there too (opt-level 2), and the quickstart and the tests then share one
# build instead of compiling wasmtime and the AWS SDK twice. Production builds use
# `cargo build --release -p ksm-host`.
KSM="$TARGET/debug/ksm"
GUEST="$TARGET/wasm32-wasip2/release/ksm_guest.wasm"
TOOL=(python3 "$ROOT/scripts/kinesis_tool.py")

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d -t ksm-quickstart.XXXXXX)"
PIDS=()
cleanup() {
    local status=$?
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        printf '\nquickstart failed; logs are kept in %s\n' "$WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# Prints the tail of a log file (used when a service fails).
show_log() {
    printf -- '--- %s ---\n' "$1" >&2
    tail -n 40 "$1" >&2 || true
}

# Pretty-prints JSON from stdin (or passes it through if it is not JSON).
pretty() {
    local text
    text="$(cat)"
    python3 -m json.tool <<<"$text" 2>/dev/null || printf '%s\n' "$text"
}

port_is_free() {
    python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for DESCRIPTION PID LOG COMMAND...: retries COMMAND for up to 60 s while PID lives.
wait_for() {
    local what="$1" pid="$2" log="$3"
    shift 3
    local i
    for i in $(seq 1 300); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log "$log"
            die "$what: the process exited"
        fi
        sleep 0.2
    done
    show_log "$log"
    die "$what: not ready after 60 s"
}

say "setup (installs what is missing)"
bash scripts/setup.sh

say "build the guest component and the host"
cargo build --release --target wasm32-wasip2 -p ksm-guest
cargo build -p ksm-host --bin ksm

port_is_free 8686 || die "the admin port 8686 is in use (another ksm running?)"

MQTT_PORT=18830
port_is_free "$MQTT_PORT" || MQTT_PORT="$(free_port)"
say "start Mosquitto on 127.0.0.1:$MQTT_PORT"
cat >"$WORK/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
log_dest stderr
CONF
mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=("$!")
wait_for "mosquitto" "$!" "$WORK/mosquitto.log" \
    bash -c "exec 3<>/dev/tcp/127.0.0.1/$MQTT_PORT"

MOTO_PORT="$(free_port)"
MOTO="http://127.0.0.1:$MOTO_PORT"
say "start moto (Kinesis and STS) on $MOTO"
# moto's server with its Kinesis record numbering made safe for concurrent PutRecords
# (ksm sends several at once); see the launcher.
python3 tests/emulators/moto_server.py -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=("$!")
wait_for "moto" "$!" "$WORK/moto.log" curl -sf "$MOTO/moto-api/"

say "create the streams $STREAM (2 shards) and $SECOND_STREAM (1 shard)"
"${TOOL[@]}" --endpoint "$MOTO" create-stream "$STREAM" --shards 2
"${TOOL[@]}" --endpoint "$MOTO" create-stream "$SECOND_STREAM" --shards 1

# The admin API and the console ask for this token (the CLI reads it from the environment).
KSM_ADMIN_TOKEN="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
export KSM_ADMIN_TOKEN
api() { curl -s -H "Authorization: Bearer $KSM_ADMIN_TOKEN" "http://$ADMIN$1"; }

CONFIG="$WORK/ksm.toml"
say "write $CONFIG"
cat >"$CONFIG" <<CONF
[mqtt]
url = "mqtt://127.0.0.1:$MQTT_PORT"
client_id = "ksm-quickstart"

[admin]
listen = "$ADMIN"

[component]
path = "$GUEST"

[storage]
dir = "$WORK/data"

[[devices]]
id = 1001
home_id = 77
class = "thermostat"

[[modules]]
id = "$MODULE"
description = "every event and the telemetry bulk data"
subscribe_events = ["*"]
bulk_data_label = "telemetry"
role_arn = "arn:aws:iam::123456789012:role/ksm-writer"
external_id = "ext-42"
region = "us-east-1"
stream_name = "$STREAM"
CONF
cat "$CONFIG"

say "start ksm"
env AWS_ENDPOINT_URL="$MOTO" \
    AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 \
    AWS_EC2_METADATA_DISABLED=true \
    "$KSM" run --config "$CONFIG" >"$WORK/ksm.log" 2>&1 &
KSM_PID="$!"
PIDS+=("$KSM_PID")
wait_for "ksm to connect and subscribe" "$KSM_PID" "$WORK/ksm.log" curl -sf "http://$ADMIN/api/health"
api /api/modules | pretty

say "publish a device event, a home event and a bulk-data payload (MQTT 5, QoS 1)"
pub() { mosquitto_pub -V mqttv5 -q 1 -h 127.0.0.1 -p "$MQTT_PORT" -i "ksm-quickstart-pub" "$@"; }
pub -t /devices/1001/event -m '{"eventType":"temperature","eventData":{"celsius":21.5}}'
pub -t /homes/77/event -m '{"eventType":"away","eventData":{"mode":"eco"}}'
printf '{"celsius":21.4,"at":"08:00"}' >"$WORK/reading-1.json"
printf '{"celsius":21.6,"at":"08:05"}' >"$WORK/reading-2.json"
printf 'raw telemetry line\n' >"$WORK/reading-3.txt"
"$KSM" bulk encode "$WORK/reading-1.json" "$WORK/reading-2.json" "$WORK/reading-3.txt" \
    >"$WORK/bulk.msgpack"
pub -t /devices/1001/bulkData/telemetry -f "$WORK/bulk.msgpack"
pub -t /devices/1001/event -m 'this is not a MODE event'
echo "published 2 events, 1 bulk payload of 3 records and 1 malformed event"

say "records in $STREAM (shard, partition key, data)"
if ! "${TOOL[@]}" --endpoint "$MOTO" read "$STREAM" --wait-for 5 --timeout 30; then
    show_log "$WORK/ksm.log"
    die "not all 5 records arrived"
fi

say "the module's log (GET /api/modules/$MODULE/logs)"
api "/api/modules/$MODULE/logs" | pretty

say "the malformed event, kept as a dead letter (ksm dead-letters list $MODULE)"
"$KSM" dead-letters list "$MODULE" --config "$CONFIG"

if [ "$STAY" -eq 1 ]; then
    # A device publishing an event a second, so that there is something to watch.
    (
        n=0
        while sleep 1; do
            n=$((n + 1))
            pub -t /devices/1001/event \
                -m "{\"eventType\":\"temperature\",\"eventData\":{\"celsius\":21.$((n % 10)),\"n\":$n}}" \
                >/dev/null 2>&1 || true
        done
    ) &
    PIDS+=("$!")
    say "ksm keeps running, with device 1001 publishing an event a second"
    cat <<TEXT
  console:  http://$ADMIN/
  token:    $KSM_ADMIN_TOKEN
  streams:  $STREAM (module $MODULE), $SECOND_STREAM (free: add a module for it with "+ New")
  config:   $CONFIG (changes made in the console are written here)
  read:     python3 scripts/kinesis_tool.py --endpoint $MOTO read $SECOND_STREAM
Press Ctrl-C to stop ksm, moto and Mosquitto.
TEXT
    wait "$KSM_PID" || true
fi

say "done: stopping ksm, moto and Mosquitto"
