"""Issue 5 item 9: operational hygiene of a running director.

- a deleted dest is forgotten: no more ARP for it once it is gone;
- `pylvs run -v` does not turn third-party libraries' debug logging on;
- `pylvs adm -R` goes on after a bad line (ipvsadm's restore_table) and
  names each bad line;
- the per-namespace lock file under /run/pylvs goes when the director stops.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

# The kernel's neighbour code sends at most mcast_solicit (3) probes,
# retrans_time (1 s) apart, for an entry already asked for: after that, ARP
# for a deleted dest can only come from the director asking again.
KERNEL_PROBES_S = 3.5
# Then watch longer than the gap between two of the director's rounds of
# asking (a kernel cycle of 3 s, then up to 2 s until the director pokes the
# failed entry again), so a director that keeps asking is always caught.
WATCH_S = 5.0


def test_cleared_dests_are_not_resolved_any_more(director_lab):
    lab = director_lab(servers=1)
    gone = [f"10.0.1.{i}" for i in range(50, 250)]  # nobody answers for these
    rules = f"-A -t {lab.vip}:80 -s rr\n" + "".join(
        f"-a -t {lab.vip}:80 -r {ip}:80 -m\n" for ip in gone)
    dump = lab.popen(lab.switch, ["tcpdump", "-i", "br0", "-n", "-l", "-tt", "arp"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1)  # tcpdump up (its "listening" goes to stderr; a second is plenty)
        lab.adm("-R", stdin=rules, timeout=60)
        time.sleep(2)  # the director asks for all of them
        lab.adm("-C")
        cleared = time.time()
        time.sleep(KERNEL_PROBES_S + WATCH_S)
    finally:
        dump.terminate()
        out, _ = dump.communicate(timeout=10)
    asks = []
    for line in out.splitlines():
        m = re.match(r"(\d+\.\d+) ARP, Request who-has (\S+)", line)
        if m and m.group(2) in gone:
            asks.append((float(m.group(1)) - cleared, m.group(2)))
    assert any(t < 0 for t, _ in asks), "no ARP for the dests at all: the capture is broken"
    late = [(round(t, 2), ip) for t, ip in asks if t > KERNEL_PROBES_S]
    assert not late, f"{len(late)} ARP requests for cleared dests, e.g. {late[:5]}"


THIRD_PARTY_DEBUG = re.compile(r"pyroute2|SOCK_DGRAM enqueue|await data on|'event': 'RTM_")


def test_verbose_does_not_log_library_debug(director_lab):
    lab = director_lab(servers=1, run_args=("-v",))
    lab.nat_service("tcp", 80, (1,))  # the resolver talks netlink (pyroute2)
    for _ in range(3):
        assert lab.curl("/whoami", max_time=5).stdout.strip() == "rs1"
    time.sleep(2)
    log = lab.director_log()
    noise = [line for line in log.splitlines() if THIRD_PARTY_DEBUG.search(line)]
    assert not noise, f"{len(noise)} library debug lines ({len(log)} bytes), e.g. {noise[:3]}"
    assert len(log) < 64 * 1024, len(log)


def test_restore_goes_on_after_bad_lines_and_names_them(director_lab):
    lab = director_lab(servers=1)
    v = lab.vip
    rules = (f"-A -t {v}:80 -s rr\n"
             f"-a -t {v}:80 -r\n"              # line 2: -r without its argument
             f"-A -t {v}:81 -s \"rr\n"          # line 3: an unterminated quote
             f"-A -t {v}:82 -s wlc\n")
    p = lab.adm_run("-R", stdin=rules)
    said = p.stdout + p.stderr
    assert re.search(r"\bline 2\b", said) and re.search(r"\bline 3\b", said), said
    assert not re.search(r"\bline [14]\b", said), said
    listed = {line.split()[1] for line in lab.adm("-L", "-n").splitlines()
              if line.startswith("TCP")}
    assert listed == {f"{v}:80", f"{v}:82"}, (listed, said)


def test_lock_file_removed_when_the_director_stops(director_lab):
    lab = director_lab(servers=1)
    pid = str(lab.procs["director"].pid)  # `ip netns exec` execs pylvs: the same pid

    def locks() -> list[Path]:
        # The director writes its pid into the lock it holds (whatever its
        # name); other directors on the machine may come and go meanwhile.
        out = []
        for f in Path("/run/pylvs").glob("*.lock"):
            try:
                if f.read_text(errors="replace").strip() == pid:
                    out.append(f)
            except OSError:
                pass
        return out

    held = locks()
    assert len(held) == 1, held
    assert lab.stop_director() == 0, lab.director_log()[-2000:]
    assert not held[0].exists()
