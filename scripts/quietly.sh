# Helpers for the guest build scripts, sourced after setting SCRIPT (the name their errors
# start with).

# Prints an error and exits.
die() { printf '%s: error: %s\n' "$SCRIPT" "$*" >&2; exit 1; }

# Runs a command with its output kept aside, shown only if it fails.
quietly() {
    local log status=0
    log="$(mktemp)"
    "$@" >"$log" 2>&1 || status=$?
    if [ "$status" -ne 0 ]; then
        cat "$log" >&2
        rm -f "$log"
        die "failed ($status): $*"
    fi
    rm -f "$log"
}
