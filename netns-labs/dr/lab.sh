#!/bin/sh
# The VS-DR walkthrough (README.md, steps 1-4 and 6) in one go, as root:
#   netns-labs/dr/lab.sh [NAME]
# The lab and the director are removed on exit, error or Ctrl-C.
NAME=${1:-lvs$$}
. "$(dirname "$0")/../lab-common.sh"

start_lab --fwd dr -- --iface eth0

pylvs_in director adm -A -t $VIP:80 -s wrr
w=1
for rip in 10.0.0.11 10.0.0.12 10.0.0.13; do
    # -g: VS-DR (also ipvsadm's default when no method is given)
    pylvs_in director adm -a -t $VIP:80 -r $rip:80 -g -w $w
    w=$((w + 1))
done
pylvs_in director adm -L -n
echo "--- the real server rs1 as pylvs realserver set it up:"
pylvs_in rs1 realserver status || true

echo "--- 60 requests through the VIP, one connection each:"
requests 60
echo "--- InPkts count, OutPkts stay 0: the replies never pass the director"
pylvs_in director adm -L -n --stats
echo "--- the router's neighbour entry for the VIP is the director's MAC:"
ip netns exec "$NAME-router" ip neigh show $VIP
ip netns exec "$NAME-director" ip -br link show eth0
