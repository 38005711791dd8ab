#!/bin/sh
# The VS-Tun walkthrough (README.md, steps 1-4 and 6) in one go, as root:
#   netns-labs/tun/lab.sh [NAME]
# The lab and the director are removed on exit, error or Ctrl-C.
NAME=${1:-lvs$$}
. "$(dirname "$0")/../lab-common.sh"

start_lab --fwd tun -- --iface eth0

pylvs_in director adm -A -t $VIP:80 -s wrr
w=1
for rip in 10.0.3.11 10.0.3.12 10.0.3.13; do
    # -i: VS-Tun, IPIP (--tun-type gue --tun-port 6080 for GUE)
    pylvs_in director adm -a -t $VIP:80 -r $rip:80 -i -w $w
    w=$((w + 1))
done
pylvs_in director adm -L -n
echo "--- the real server rs1 as pylvs realserver set it up:"
pylvs_in rs1 realserver status || true

echo "--- 60 requests through the VIP, one connection each:"
requests 60
echo "--- InPkts count, OutPkts stay 0: the replies never pass the director"
pylvs_in director adm -L -n --stats
echo "--- rs1's decapsulator (pylvs realserver run; counters written once a second)"
echo "--- and the director's frames in and tunneled out; counters that are not 0:"
sleep 1.5
pylvs_in rs1 realserver status \
    | sed -n '/^decapsulator/,$p' | grep -v ' 0$' || true
pylvs_in director stats | grep -E '^(rx_frames|tx_tunneled|drop_)' \
    | grep -v ' 0$' || true
