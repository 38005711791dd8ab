#!/bin/sh
# The VS-NAT walkthrough (README.md, steps 1-4 and 8) in one go, as root:
#   netns-labs/nat/lab.sh [NAME]
# The lab and the director are removed on exit, error or Ctrl-C.
NAME=${1:-lvs$$}
. "$(dirname "$0")/../lab-common.sh"

start_lab -- --iface eth0 --iface eth1

pylvs_in director adm -A -t $VIP:80 -s wlc
w=1
for rip in 10.0.1.11 10.0.1.12 10.0.1.13; do
    pylvs_in director adm -a -t $VIP:80 -r $rip:80 -m -w $w
    w=$((w + 1))
done
pylvs_in director adm -L -n

echo "--- 60 requests through the VIP, one connection each:"
requests 60
pylvs_in director adm -L -n --stats
