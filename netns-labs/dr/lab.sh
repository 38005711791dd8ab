#!/bin/sh
# The VS-DR walkthrough (README.md, steps 1-4 and 6) in one go, as root:
#   netns-labs/dr/lab.sh [NAME]
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

pylvs lab up --name "$NAME" --fwd dr
LOG=$(mktemp)
(cd "$ROOT" && exec $D "$PY" -m pylvs.cli.main run --iface eth0) 2>"$LOG" &
PID=$!
i=0
until grep -q ready "$LOG"; do
    i=$((i + 1)); [ $i -le 200 ] || { cat "$LOG"; echo "pylvs run not ready" >&2; exit 1; }
    kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.1
done

(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -A -t $VIP:80 -s wrr)
w=1
for rip in 10.0.0.11 10.0.0.12 10.0.0.13; do
    # -g: VS-DR (also ipvsadm's default when no method is given)
    (cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -a -t $VIP:80 -r $rip:80 -g -w $w)
    w=$((w + 1))
done
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -L -n)
echo "--- the real server rs1 as pylvs realserver set it up:"
(cd "$ROOT" && ip netns exec "$NAME-rs1" "$PY" -m pylvs.cli.main realserver status) || true

echo "--- 60 requests through the VIP, one connection each:"
$C curl -s --max-time 30 -H 'Connection: close' \
    $(i=0; while [ $i -lt 60 ]; do echo http://$VIP/whoami; i=$((i + 1)); done) | sort | uniq -c
echo "--- InPkts count, OutPkts stay 0: the replies never pass the director"
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -L -n --stats)
echo "--- the router's neighbour entry for the VIP is the director's MAC:"
ip netns exec "$NAME-router" ip neigh show $VIP
$D ip -br link show eth0
rm -f "$LOG"
