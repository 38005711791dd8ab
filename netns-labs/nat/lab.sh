#!/bin/sh
# The VS-NAT walkthrough (README.md, steps 1-4 and 8) in one go, as root:
#   netns-labs/nat/lab.sh [NAME]
# The lab and the director are removed on exit, error or Ctrl-C.
set -eu
NAME=${1:-lvs$$}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
pylvs() { (cd "$ROOT" && "$PY" -m pylvs.cli.main "$@"); }
D="ip netns exec $NAME-director"
C="ip netns exec $NAME-client"
VIP=10.0.0.100
PID=

cleanup() {
    trap - EXIT INT TERM
    [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
    pylvs lab down --name "$NAME" || true
}
trap cleanup EXIT INT TERM

pylvs lab up --name "$NAME"
LOG=$(mktemp)
(cd "$ROOT" && exec $D "$PY" -m pylvs.cli.main run --iface eth0 --iface eth1) 2>"$LOG" &
PID=$!
i=0
until grep -q ready "$LOG"; do
    i=$((i + 1)); [ $i -le 200 ] || { cat "$LOG"; echo "pylvs run not ready" >&2; exit 1; }
    kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.1
done

(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -A -t $VIP:80 -s wlc)
w=1
for rip in 10.0.1.11 10.0.1.12 10.0.1.13; do
    (cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -a -t $VIP:80 -r $rip:80 -m -w $w)
    w=$((w + 1))
done
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -L -n)

echo "--- 60 requests through the VIP, one connection each:"
$C curl -s --max-time 30 -H 'Connection: close' \
    $(i=0; while [ $i -lt 60 ]; do echo http://$VIP/whoami; i=$((i + 1)); done) | sort | uniq -c
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -L -n --stats)
rm -f "$LOG"
