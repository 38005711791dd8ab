#!/bin/sh
# The failover lab's one-command check (README.md), as root:
#   netns-labs/failover/lab.sh [NAME] [--sync auto|on|off] [--advert-int SECONDS]
# Builds the lab (two directors with pylvs run and keepalived), measures the
# VIP takeover after killing the master, runs 100 paced downloads through
# each forwarding method while killing the master, prints how many finished
# intact, and removes the lab (also on error or Ctrl-C).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
NAME=fo$$
case "${1:-}" in -*|"") ;; *) NAME=$1; shift ;; esac
# A lab of that name already up is the user's: refuse before the trap
# below could tear it down.
if [ -e "/run/netns/$NAME-client" ]; then
    echo "lab.sh: a lab named $NAME is up (pylvs lab down --name $NAME removes it)" >&2
    exit 1
fi
cleanup() {
    trap - EXIT INT TERM
    (cd "$ROOT" && "$PY" -m pylvs.lab.failover down --name "$NAME" >/dev/null 2>&1) || true
}
trap cleanup EXIT INT TERM
cd "$ROOT" && "$PY" -m pylvs.lab.failover check --name "$NAME" "$@"
