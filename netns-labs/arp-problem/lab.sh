#!/bin/sh
# The ARP-problem walkthrough (README.md) in one go, as root:
#   netns-labs/arp-problem/lab.sh [NAME]
# Builds the VS-DR lab, breaks rs1 the classic way (the VIP on lo without
# arp_ignore/arp_announce), shows `pylvs check` naming it, fixes it with
# `pylvs realserver setup`, and shows the check pass. The lab and the
# director are removed on exit, error or Ctrl-C.
set -eu
NAME=${1:-arp$$}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
pylvs() { (cd "$ROOT" && "$PY" -m pylvs.cli.main "$@"); }
D="ip netns exec $NAME-director"
R1="ip netns exec $NAME-rs1"
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
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -A -t $VIP:80 -s rr)
for rip in 10.0.0.11 10.0.0.12 10.0.0.13; do
    (cd "$ROOT" && $D "$PY" -m pylvs.cli.main adm -a -t $VIP:80 -r $rip:80 -g)
done

echo "--- 1. break rs1 the classic way: undo its set-up, then put the VIP on lo"
echo "       by hand with the kernel's default ARP behaviour (arp_ignore=0)"
(cd "$ROOT" && $R1 "$PY" -m pylvs.cli.main realserver teardown) >/dev/null
$R1 ip link set lo up
$R1 ip addr add $VIP/32 dev lo
$R1 sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.eth0.arp_ignore=0 \
    net.ipv4.conf.all.arp_announce=0 net.ipv4.conf.eth0.arp_announce=0

echo "--- 2. pylvs check probes who-has $VIP on the segment: rs1 answers too"
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main check) || echo "(check failed, as it should: exit $?)"

echo "--- 3. the fix it names, on rs1"
(cd "$ROOT" && $R1 "$PY" -m pylvs.cli.main realserver setup --fwd dr --vip $VIP --iface eth0)

echo "--- 4. check again"
(cd "$ROOT" && $D "$PY" -m pylvs.cli.main check)
rm -f "$LOG"
