#!/bin/sh
# The failover lab's one-command check (README.md), as root.
# Builds the lab (two directors with pylvs run and keepalived), measures the
# VIP takeover after killing the master, runs 100 paced downloads through
# each forwarding method while killing the master, prints how many finished
# intact, and removes the lab (also on error or Ctrl-C).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}

usage() {
    cat <<EOF
usage: $0 [NAME] [--sync auto|on|off] [--advert-int SECONDS]

The failover lab's one-command check (netns-labs/failover/README.md), as root:
builds the lab NAME (default fo<pid>: namespaces NAME-client, NAME-dir1, ...),
measures the VIP takeover after killing the VRRP master, runs 100 paced
downloads through VS-NAT, VS-DR and VS-Tun while killing the master, prints
how many finished intact, and removes the lab (also on error or Ctrl-C).

  NAME                  the lab's name; refused when a lab of that name is up
  --sync auto|on|off    connection sync daemons on both directors (default auto:
                        where pylvs has them; off: the control, downloads break)
  --advert-int SECONDS  keepalived's advert_int (default 1; VRRPv3 takes 0.3)
  -h, --help            this text

Exit status: 0; 1 when, with sync on, fewer than 99% of a method's downloads
finished intact, or the lab failed; 2 for a bad argument.
Python: \$PYTHON, else $ROOT/.venv/bin/python (make build).
EOF
}

bad() {
    echo "$0: $1 (--help for usage)" >&2
    exit 2
}

# The options are this script's own (checked here, so --help and errors
# name lab.sh, not the Python module behind it).
NAME=fo$$
SYNC=auto
ADVERT=1
named=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --sync|--advert-int)
            [ $# -ge 2 ] || bad "$1 needs a value"
            if [ "$1" = --sync ]; then SYNC=$2; else ADVERT=$2; fi
            shift 2 ;;
        --sync=*) SYNC=${1#*=}; shift ;;
        --advert-int=*) ADVERT=${1#*=}; shift ;;
        -*) bad "unknown option $1" ;;
        *)  [ -z "$named" ] || bad "one lab name only (got $NAME and $1)"
            NAME=$1; named=1; shift ;;
    esac
done
case $SYNC in auto|on|off) ;; *) bad "--sync takes auto, on or off, not '$SYNC'" ;; esac
case $ADVERT in
    ''|*[!0-9.]*|*.*.*|.) bad "--advert-int takes seconds (1, 0.3), not '$ADVERT'" ;;
esac
# The name prefixes namespaces, file names and keepalived's router_id.
case $NAME in
    ''|*[!A-Za-z0-9_-]*) bad "a lab name is letters, digits, - and _, not '$NAME'" ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (it builds network namespaces)" >&2; exit 1; }
[ -x "$PY" ] || { echo "$0: no Python at $PY (make build, or set PYTHON)" >&2; exit 1; }
# A lab of that name already up is the user's: refuse before the trap
# below could tear it down.
if [ -e "/run/netns/$NAME-client" ]; then
    echo "$0: a lab named $NAME is up (pylvs lab down --name $NAME removes it)" >&2
    exit 1
fi
cleanup() {
    trap - EXIT INT TERM
    (cd "$ROOT" && "$PY" -m pylvs.lab.failover down --name "$NAME" >/dev/null 2>&1) || true
}
trap cleanup EXIT INT TERM
cd "$ROOT" && "$PY" -m pylvs.lab.failover check --name "$NAME" --sync "$SYNC" \
    --advert-int "$ADVERT"
