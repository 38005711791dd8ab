"""What `bench conn-rate`, `bench latency` and `bench throughput` share.

The directors compared, each set up and torn down in a running lab of
pylvs/lab/topology.py between rounds, and the round loop (impls
interleaved, the first impl alternating), as in bench/e2e.py:

- ``pylvs``: `pylvs run` pinned with taskset to the director's core, a
  service with the lab's method (``-m``, ``-g``, ``-i``).
- ``kernel-nft`` (VS-NAT lab only): ip_forward=1 and ``dnat to numgen inc
  mod N map {...}`` in nat prerouting: conntrack + DNAT, the kernel's own
  load balancing, as in `bench e2e`.
- ``haproxy``: Debian's HAProxy in the director namespace, ``mode tcp``,
  the real servers in ``balance roundrobin``, one thread pinned to the
  director's core: the user-space proxy way (two TCP connections per
  client connection).
- ``direct``: no director at all. In the VS-NAT lab the client gets a
  second interface (eth1, 10.0.1.200) on the real servers' bridge and talks
  to rs1's RIP on the wire; in the routed labs the client reaches rs1's RIP
  through the lab's router, the path the replies take anyway. The floor of
  each bench: what the rest of the lab (veths, bridge, the peers) costs.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pylvs.lab.topology import Lab, LabError, wait_for_line

PEERS_SRC = Path(__file__).resolve().with_name("peers.c")
DIRECT_CIP = "10.0.1.200"   # the client's eth1 on the VS-NAT lab's server bridge
WIDE_PORTS = "net.ipv4.ip_local_port_range=1024 65535"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def cores() -> tuple[str, str]:
    """(client core, director core): the client on CPU 0, the director on the last."""
    return "0", str((os.cpu_count() or 1) - 1)


def build_c(lab: Lab, src: Path) -> Path:
    """Compile one of bench/'s C programs with ``cc -O2 -Wall`` into the
    lab's directory (removed with the lab); the executable. LabError with
    the compiler's message if it fails, OSError if there is no cc."""
    exe = lab.log_path(src.stem).with_suffix(".bin")
    p = subprocess.run(["cc", "-O2", "-Wall", "-o", str(exe), str(src)],
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise LabError(f"cc -O2 {src} failed: {p.stderr.strip()}")
    return exe


def build_peers(lab: Lab) -> Path:
    """bench/peers.c, compiled (build_c)."""
    return build_c(lab, PEERS_SRC)


def start_ready(lab: Lab, ns: str, argv: list[str], key: str,
                timeout: float = 10.0) -> subprocess.Popen:
    """Start argv in ns (killed by lab.down()); wait until it prints "ready"."""
    p = lab.popen(ns, argv, key=key, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  stdin=subprocess.DEVNULL, start_new_session=True)
    if not wait_for_line(p, "ready", timeout):
        p.kill()
        raise LabError(f"{argv[0]} {' '.join(argv[1:3])} in {ns} did not start: "
                       f"{p.stderr.read().decode(errors='replace')[-1000:]}")
    return p


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0.0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy(lab: Lab, keys: list[str], run: Callable[[], dict]) -> dict:
    """run() with the CPU use of lab.procs[keys] over it: run()'s result plus
    ``cpu_busy`` {key: fraction of one core}. `ip netns exec` execs its
    command, so the Popen's pid is the process itself."""
    pids = {k: lab.procs[k].pid for k in keys if k in lab.procs}
    c0, t0 = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
    res = run()
    dt = time.monotonic() - t0
    res["cpu_busy"] = {k: round((cpu_seconds(p) - c0[k]) / dt, 3) for k, p in pids.items()}
    return res


def add_direct_path(lab: Lab) -> str:
    """The `direct` impl's way to rs1 without the director; the address to use.

    VS-NAT lab: a veth from the client namespace (eth1, DIRECT_CIP/24) into
    the server bridge, so the client and rs1 share a wire (rs1 answers on
    its connected route, not via the director). Routed labs: rs1's RIP is
    already reachable through the router.
    """
    if lab.routed:
        return lab.rips[0]
    lab.run(lab.switch, ["ip", "link", "add", "cdirect", "type", "veth", "peer", "name", "eth1",
                         "netns", lab.client])
    lab.run(lab.switch, ["ip", "link", "set", "cdirect", "master", "br0", "up"])
    lab.run(lab.client, ["ip", "addr", "add", f"{DIRECT_CIP}/24", "dev", "eth1"])
    lab.run(lab.client, ["ip", "link", "set", "eth1", "up"])
    return lab.rips[0]


# --- the directors ------------------------------------------------------------------


def kernel_nft_up(lab: Lab, proto: str, port: int, rips: list[str],
                  also_tcp: bool = False) -> None:
    """DNAT of VIP:port (proto) to the rips in turn; also_tcp: TCP to the
    same port as well (bench e2e's SYN flood)."""
    m = ", ".join(f"{i} : {rip}" for i, rip in enumerate(rips))
    match = f"meta l4proto {{ {proto}, tcp }} th" if also_tcp else proto
    lab.set_ip_forward(1)
    lab.nft(lab.director, f"""
table ip lb {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {lab.vip} {match} dport {port} dnat to numgen inc mod {len(rips)} map {{ {m} }}
  }}
}}
""")


def kernel_nft_down(lab: Lab) -> None:
    lab.run(lab.director, ["nft", "delete", "table", "ip", "lb"], check=False)
    lab.set_ip_forward(0)


def haproxy_config(vip: str, port: int, rips: list[str], cpu: str) -> str:
    servers = "".join(f"    server rs{i + 1} {rip}:{port}\n" for i, rip in enumerate(rips))
    return f"""global
    nbthread 1
    cpu-map 1/1 {cpu}
    maxconn 9000

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend vs
    bind {vip}:{port}
    maxconn 9000
    default_backend rs

backend rs
    balance roundrobin
{servers}"""


def haproxy_up(lab: Lab, port: int, rips: list[str], cpu: str) -> None:
    cfg = lab.log_path("haproxy").with_suffix(".cfg")
    cfg.write_text(haproxy_config(lab.vip, port, rips, cpu))
    p = lab.popen(lab.director, ["taskset", "-c", cpu, "haproxy", "-db", "-f", str(cfg)],
                  key="haproxy", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                  stdin=subprocess.DEVNULL, start_new_session=True)
    # HAProxy prints nothing when it starts well: wait for its listener.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise LabError(f"haproxy exited: {p.stderr.read().decode(errors='replace')[-1000:]}")
        out = lab.run(lab.director, ["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if lab.vip in out:
            return
        time.sleep(0.1)
    raise LabError("haproxy did not listen within 10 s")


def haproxy_down(lab: Lab) -> None:
    lab.stop("haproxy")


def impl_actions(impl: str, lab: Lab, proto: str, port: int, cpu: str,
                 weights: list) -> tuple[Callable[[], None], Callable[[], None]]:
    """(up, down) of one impl for a service proto/port over the weighted real servers.

    weights: one per real server, None leaves it out (rs1 alone: [1, None, None]).
    """
    rips = [rip for rip, w in zip(lab.rips, weights) if w is not None]
    if impl in ("pylvs", "pylvs-nolimit"):
        # -nolimit: the upcall limit off (docs/engine.md), its A/B.
        extra = ("--sysctl", "upcall_share=100") if impl == "pylvs-nolimit" else ()

        def up():
            lab.start_director(*extra, taskset=cpu)
            lab.service(proto, port, weights, sched="wlc")
        return up, lab.stop_director
    if impl == "kernel-nft":
        return (lambda: kernel_nft_up(lab, proto, port, rips)), (lambda: kernel_nft_down(lab))
    if impl == "haproxy":
        return (lambda: haproxy_up(lab, port, rips, cpu)), (lambda: haproxy_down(lab))
    if impl == "direct":
        return (lambda: None), (lambda: None)
    raise ValueError(f"unknown impl {impl}")


def interleaved(impls: list[str], runs: int, one: Callable[[int, str], dict],
                actions: Callable[[str], tuple]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Rounds of every impl, the order reversed every other round; samples and errors.

    one(round, impl) measures one round with the impl up; an impl that fails
    is reported in errors and left out of the later rounds.
    """
    samples: dict[str, list[dict]] = {i: [] for i in impls}
    errors: dict[str, str] = {}
    for r in range(runs):
        for impl in (impls if r % 2 == 0 else list(reversed(impls))):
            if impl in errors:
                continue
            up, down = actions(impl)
            try:
                up()
                samples[impl].append(one(r, impl))
            except Exception as e:
                errors[impl] = f"{type(e).__name__}: {e}"
                print(f"{impl}: {errors[impl]}", flush=True)
            finally:
                try:
                    down()
                except Exception as e:
                    errors.setdefault(impl, f"teardown: {type(e).__name__}: {e}")
    return samples, errors


@dataclass
class NatLab:
    """What a round of `bench conn-rate` or `bench latency` works with."""

    lab: Lab
    exe: Path           # bench/peers.c, compiled into the lab's directory
    direct_host: str    # the `direct` impl's address of rs1 (add_direct_path)
    client_cpu: str
    director_cpu: str


def nat_lab_rounds(prefix: str, impls: list[str], runs: int, proto: str, port: int,
                   setup: Callable[[NatLab], None],
                   one: Callable[[NatLab, int, str], dict]) -> tuple[dict, dict, dict]:
    """The round loop of the VS-NAT lab benches: a lab named prefix + a
    random suffix, the direct path and bench/peers.c, setup(ctx) once (the
    real servers' peers), then the impls interleaved (interleaved: each one
    set up by impl_actions for proto/port over the three real servers,
    one(ctx, round, impl) measuring it); the lab is removed even on failure.

    Returns (samples {impl: [one()'s results]}, errors {impl: text},
    meta {"uptime_before", "uptime_after", "director_cpu"}).
    """
    client_cpu, director_cpu = cores()
    before = uptime()
    lab = Lab(f"{prefix}{uuid.uuid4().hex[:5]}", servers=3, start_servers=False)
    try:
        lab.up()
        ctx = NatLab(lab, direct_host=add_direct_path(lab), exe=build_peers(lab),
                     client_cpu=client_cpu, director_cpu=director_cpu)
        setup(ctx)
        samples, errors = interleaved(
            impls, runs, lambda r, impl: one(ctx, r, impl), lambda impl: impl_actions(
                impl, lab, proto, port, director_cpu, [1] * len(lab.rips)))
    finally:
        errs = lab.down()
        if errs:
            print("lab teardown:", errs)
    return samples, errors, {"uptime_before": before, "uptime_after": uptime(),
                             "director_cpu": director_cpu}


def median_of(got: list[dict], key: str):
    vals = [s[key] for s in got if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def ratio_rows(rows: dict[str, dict], key: str, num: str, bases: list[str],
               samples: dict[str, list[dict]], sample_key: str | None = None) -> list[str]:
    """Put num/base ratios of rows' key (of medians, and the median of the
    per-round ratios of the samples' sample_key, key by default) into
    rows[num]["ratios"]; the summary lines."""
    sample_key = sample_key or key
    out = []
    a = rows.get(num, {}).get(key)
    for base in bases:
        b = rows.get(base, {}).get(key)
        if not a or not b:
            continue
        rows[num].setdefault("ratios", {})[f"{num}/{base}"] = a / b
        per = [x[sample_key] / y[sample_key] for x, y in zip(samples[num], samples[base])
               if y.get(sample_key)]
        if per:
            rows[num].setdefault("ratios_per_round_median", {})[f"{num}/{base}"] = \
                statistics.median(per)
        out.append(f"{num}/{base} = {a / b:.2f} (median of per-round ratios "
                   f"{statistics.median(per):.2f})" if per else f"{num}/{base} = {a / b:.2f}")
    return out
