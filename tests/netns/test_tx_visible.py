"""Watching what the director transmits: tcpdump and `pylvs run --pcap`.

By default pylvs's AF_PACKET sockets have PACKET_QDISC_BYPASS: frames go
straight to the driver and never pass the kernel's taps, so a capture on the
director shows only what arrives. `pylvs run --no-qdisc-bypass` sends
through the qdisc layer (dev_queue_xmit), whose taps feed tcpdump: the
forwarded frame (daddr = RIP) shows up beside the real server's reply.
Both are checked, so the documentation (netns-labs/nat/README.md, docs/io.md)
cannot drift from the behaviour.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from pylvs.lab.topology import wait_for_file

pytestmark = pytest.mark.netns


def _capture_one_request(lab, tmp_path) -> list:
    """One HTTP request through the VIP, captured on the director's eth1
    (the real servers' side); returns the IPv4/TCP packets to or from the RIP."""
    rip = lab.rips[0]
    lab.adm("-A", "-t", f"{lab.vip}:80", "-s", "rr")
    lab.adm("-a", "-t", f"{lab.vip}:80", "-r", f"{rip}:80", "-m")
    assert lab.wait_resolved([rip]), lab.director_log()[-2000:]
    pcap, errf = tmp_path / "eth1.pcap", tmp_path / "tcpdump.err"
    # Bounded twice: -c stops it once enough is seen, timeout when it is not
    # (the default case, where the forwarded half never reaches the tap).
    with open(errf, "wb") as err:
        dump = lab.popen(lab.director, ["timeout", "5", "tcpdump", "-i", "eth1", "-n", "-U",
                                        "-c", "6", "-w", str(pcap), f"tcp and host {rip}"],
                         stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_for_file(errf, "listening on", 10, proc=dump), errf.read_text()
        p = lab.curl("/whoami", "-H", "Connection: close")
        assert p.stdout.strip(), p.stderr
        dump.wait(timeout=10)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait(timeout=5)
    return [pkt for pkt in rdpcap(str(pcap)) if IP in pkt and TCP in pkt]


@pytest.mark.parametrize("bypass", [False, True], ids=["--no-qdisc-bypass", "default"])
def test_tcpdump_sees_forwarded_frames_only_without_bypass(director_lab, tmp_path, bypass):
    lab = director_lab(run_args=() if bypass else ("--no-qdisc-bypass",), servers=1)
    rip = lab.rips[0]
    pkts = _capture_one_request(lab, tmp_path)
    # The real server's answers arrive on eth1: seen in both modes, which
    # proves the capture worked when the forwarded half is missing.
    replies = [p for p in pkts if p[IP].src == rip and p[TCP].sport == 80]
    assert replies, [p.summary() for p in pkts]
    forwarded = [p for p in pkts if p[IP].dst == rip and p[TCP].dport == 80]
    if bypass:
        assert forwarded == [], [p.summary() for p in forwarded]
        assert "qdisc" not in lab.director_log()
    else:
        # VS-NAT: daddr rewritten to the RIP, the client's address kept.
        assert forwarded, [p.summary() for p in pkts]
        assert {p[IP].src for p in forwarded} == {lab.cip}
        assert any(p[TCP].flags.S for p in forwarded)
        assert "sending through the qdisc" in lab.director_log()


def test_pcap_records_forwarded_and_made_frames(director_lab, tmp_path):
    """`pylvs run --pcap FILE`: the forwarded frames of a request (to the
    RIP, and the reply rewritten to come from the VIP) and a frame the engine
    makes (the RST answering an ACK to VIP:80 that has no conn, as the
    kernel's tcp_v4_send_reset) are in the file, readable by tcpdump."""
    pcap = tmp_path / "sent.pcap"
    lab = director_lab(run_args=("--pcap", str(pcap)), servers=1)
    rip = lab.rips[0]
    lab.adm("-A", "-t", f"{lab.vip}:80", "-s", "rr")
    lab.adm("-a", "-t", f"{lab.vip}:80", "-r", f"{rip}:80", "-m")
    assert lab.wait_resolved([rip]), lab.director_log()[-2000:]
    p = lab.curl("/whoami", "-H", "Connection: close")
    assert p.stdout.strip(), p.stderr
    lab.run(lab.client, [lab.python, "-c",
                         "from scapy.all import IP, TCP, send; "
                         f"send(IP(dst='{lab.vip}')/TCP(sport=40404, dport=80, flags='A', "
                         "seq=1000, ack=2000), verbose=0)"])
    time.sleep(0.3)  # the RST leaves on the next forward() call
    assert lab.stop_director() == 0
    assert f"frames sent copied to {pcap}" in lab.director_log()
    # tcpdump itself accepts the file (format, linktype).
    text = lab.run(lab.director, ["tcpdump", "-n", "-r", str(pcap)]).stdout
    assert f"> {rip}.80:" in text, text[:3000]
    pkts = [p for p in rdpcap(str(pcap)) if IP in p and TCP in p]
    to_rs = [p for p in pkts if p[IP].dst == rip and p[TCP].dport == 80]
    assert to_rs and {p[IP].src for p in to_rs} == {lab.cip}
    assert any(p[IP].src == lab.vip and p[TCP].sport == 80 and p[IP].dst == lab.cip
               and p[TCP].flags.S and p[TCP].flags.A for p in pkts), [p.summary() for p in pkts]
    rst = [p for p in pkts if p[TCP].dport == 40404]
    assert len(rst) == 1 and rst[0][TCP].flags == "R" and rst[0][TCP].seq == 2000, \
        [p.summary() for p in pkts]
    assert rst[0][IP].src == lab.vip and rst[0][IP].dst == lab.cip
