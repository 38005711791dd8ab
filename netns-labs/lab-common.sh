# What every netns-labs/*/lab.sh shares; sourced, not run. The caller sets
# NAME (the lab's name) first. Gives:
#   pylvs ARGS...          pylvs on the host (lab up/down)
#   pylvs_in NS ARGS...    pylvs inside namespace NS ("director", "rs1", ...)
#   start_lab LABARGS -- RUNARGS
#                          `pylvs lab up` and `pylvs run` in the director, waiting
#                          (bounded) until it logs ready; both are removed on
#                          exit, error or Ctrl-C
#   requests N             N HTTP requests to the VIP, one connection each,
#                          counted by the real server that answered
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
VIP=10.0.0.100
PID=
LOG=

pylvs() (cd "$ROOT" && exec "$PY" -m pylvs.cli.main "$@")
pylvs_in() (ns=$1; shift; cd "$ROOT" && exec ip netns exec "$NAME-$ns" "$PY" -m pylvs.cli.main "$@")

cleanup() {
    trap - EXIT INT TERM
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    [ -n "$LOG" ] && rm -f "$LOG"
    pylvs lab down --name "$NAME" || true
}
trap cleanup EXIT INT TERM

start_lab() {
    lab_args=""
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do lab_args="$lab_args $1"; shift; done
    [ $# -gt 0 ] && shift
    # shellcheck disable=SC2086  # word splitting of the lab options is wanted
    pylvs lab up --name "$NAME" $lab_args
    LOG=$(mktemp)
    (cd "$ROOT" && exec ip netns exec "$NAME-director" "$PY" -m pylvs.cli.main run "$@") \
        2>"$LOG" &
    PID=$!
    i=0
    until grep -q " ready: " "$LOG"; do
        i=$((i + 1)); [ $i -le 200 ] || { cat "$LOG"; echo "pylvs run not ready" >&2; exit 1; }
        kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
        sleep 0.1
    done
}

requests() {
    ip netns exec "$NAME-client" curl -s --max-time 30 -H 'Connection: close' \
        $(i=0; while [ $i -lt "$1" ]; do echo http://$VIP/whoami; i=$((i + 1)); done) \
        | sort | uniq -c
}
