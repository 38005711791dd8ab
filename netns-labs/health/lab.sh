#!/bin/sh
# The health-check lab (README.md) in one go, as root:
#   netns-labs/health/lab.sh [NAME]
# Builds the lab, kills rs1's HTTP server and watches it leave, kills rs2's
# and watches the sorry server (rs3) take the clients, starts rs1's again
# and watches it come back; prints each step (ok/FAIL), the listings and
# `pylvs status`, and removes the lab (also on error or Ctrl-C). Exit
# status 0 when every step did what it should.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
cd "$ROOT"
exec "$PY" -m pylvs.lab.health check --name "${1:-hl$$}"
