#!/bin/sh
# The ARP-problem walkthrough (README.md) in one go, as root:
#   netns-labs/arp-problem/lab.sh [NAME]
# Builds the VS-DR lab, breaks rs1 the classic way (the VIP on lo without
# arp_ignore/arp_announce), shows `pylvs check` naming it, fixes it with
# `pylvs realserver setup`, and shows the check pass. The lab and the
# director are removed on exit, error or Ctrl-C.
NAME=${1:-arp$$}
. "$(dirname "$0")/../lab-common.sh"

start_lab --fwd dr -- --iface eth0
R1="ip netns exec $NAME-rs1"
pylvs_in director adm -A -t $VIP:80 -s rr
for rip in 10.0.0.11 10.0.0.12 10.0.0.13; do
    pylvs_in director adm -a -t $VIP:80 -r $rip:80 -g
done

echo "--- 1. break rs1 the classic way: undo its set-up, then put the VIP on lo"
echo "       by hand with the kernel's default ARP behaviour (arp_ignore=0)"
pylvs_in rs1 realserver teardown >/dev/null
$R1 ip link set lo up
$R1 ip addr add $VIP/32 dev lo
$R1 sysctl -qw net.ipv4.conf.all.arp_ignore=0 net.ipv4.conf.eth0.arp_ignore=0 \
    net.ipv4.conf.all.arp_announce=0 net.ipv4.conf.eth0.arp_announce=0

echo "--- 2. pylvs check probes who-has $VIP on the segment: rs1 answers too"
pylvs_in director check || echo "(check failed, as it should: exit $?)"

echo "--- 3. the fix it names, on rs1"
pylvs_in rs1 realserver setup --fwd dr --vip $VIP --iface eth0

echo "--- 4. check again"
pylvs_in director check
