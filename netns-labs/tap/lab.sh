#!/bin/sh
# The TAP walkthrough (README.md, steps 1-5 and 7) in one go, as root:
#   netns-labs/tap/lab.sh [NAME]
# The lab and the director are removed on exit, error or Ctrl-C.
NAME=${1:-lvs$$}
. "$(dirname "$0")/../lab-common.sh"

# The director namespace only bridges: eth0 + tap0 in br0, eth1 + tap1 in br1.
# pylvs owns the director's addresses on the TAPs.
start_lab --io tap --fwd mixed -- --tap tap0 --addr 10.0.0.1/24 \
    --tap tap1 --addr 10.0.1.1/24 --gateway 10.0.0.2

echo "--- the director's kernel holds no IPv4 address, only bridges:"
ip -n "$NAME-director" -br -4 addr
ip -n "$NAME-director" -br link

pylvs_in director adm -A -t $VIP:80 -s wrr
pylvs_in director adm -a -t $VIP:80 -r 10.0.1.11:80 -m -w 1   # rs1 NAT, behind tap1
pylvs_in director adm -a -t $VIP:80 -r 10.0.0.12:80 -g -w 2   # rs2 DR, beside tap0
pylvs_in director adm -a -t $VIP:80 -r 10.0.3.13:80 -i -w 3   # rs3 Tun, behind the router
pylvs_in director adm -L -n

echo "--- 60 requests through the VIP, one connection each:"
requests 60
pylvs_in director adm -L -n --stats

echo "--- the router learned the VIP's MAC from pylvs (not from the TAP device):"
ip -n "$NAME-router" neigh show 10.0.0.100
ip -n "$NAME-director" -br link show tap0
echo "--- pylvs's own host: ARP and echo it answered, neighbours it resolved:"
pylvs_in director stats --json | "$PY" -c '
import json, sys
io = json.load(sys.stdin)["io"]
for k in ("arp_replies_sent", "arp_requests_sent", "arp_learned", "echo_replies_sent",
          "host_bad_frames", "rx_frames", "tx_frames", "emit_sent", "rx_dropped"):
    print(f"{k:<20} {io[k]}")'

echo "--- one queue of each TAP per worker; what each worker read (one client address"
echo "    here, so all its conns are on one worker: the steering key is the client):"
ip -n "$NAME-director" -d link show tap0 | grep -o 'numqueues [0-9]*'
pylvs_in director stats --json | "$PY" -c '
import json, sys
for i, w in enumerate(json.load(sys.stdin)["workers"]):
    rx, conns = w["io"]["rx_frames"], w["conns"]["conn_count"]
    print(f"worker {i}: rx_frames {rx}, conns {conns}")'
