"""The checks of `pylvs check`, run on the director against the running
director's configuration (a ``snapshot`` from its control socket, the data
``pylvs adm -S -n`` prints) and the director namespace's network.

Each check yields Results: ``verdict`` is ``ok``, ``warn`` or ``FAIL``;
``fix`` says in words what to do (empty for ok). The checks, what they send
and why each matters (the set-up errors the LVS ``configure`` script looked
for):

``services``
    Every virtual service needs a dest with weight > 0: otherwise each new
    flow is refused with ICMP port unreachable (``ip_vs_leave``).
``vip``
    Each VIP must be an address of the director's namespace: the kernel
    answers ARP for it only then, so routers deliver the VIP's frames to
    the director at all. (pylvs takes the frames itself; the address is for
    ARP, as with IPVS.) On ``lo`` the kernel still answers ARP for it on
    interfaces whose effective ``arp_ignore`` is 0; with a higher value the
    VIP must be routed to the director instead: warn. A service on 0.0.0.0
    is no wildcard (ip_vs_service_find matches the exact destination): warn,
    and the real-server probes skip it.
``dr-connected``
    A DR (``-g``) frame changes only its MACs, so the real server must be
    on a network directly connected to the director: the kernel's route to
    the RIP (``ip route get``) must have no gateway.
``dr``
    A DR real server must accept packets for the VIP: a TCP SYN from the
    director's address to VIP:port sent to the real server's MAC, as the
    director forwards a client's packet, must be answered from VIP:port
    (SYN-ACK or RST). Silence: it does not hold the VIP.
``arp-problem``
    On each segment with DR or Tun real servers, one broadcast ARP who-has
    for each VIP (and for each RIP, to learn their MACs) and every reply
    collected for ``wait`` seconds. A reply for a VIP from a MAC that is not
    one of the director's is a real server that holds the VIP and answers
    ARP for it: the router may learn it, and clients then reach that real
    server directly, past the director. The MAC is named by its RIP (from
    the RIPs' ARP replies, else the kernel's neighbour table). A Tun real
    server behind a router is on none of the director's segments: one ok
    line per real server, not probed.
``nat-route``
    A NAT real server must send its replies to clients through the director
    (the director un-NATs them). Method: two TCP SYNs to RIP:port, sent as
    whole frames to the real server's MAC (or its next hop's) from the
    director's interface toward it, with different source addresses:

    - *control*: source = the director's own address on that route (what
      ``ip route get RIP`` picks). The real server reaches it directly, so
      any SYN-ACK or RST proves the real server is alive at RIP:port;
    - *client*: source = a client-side address: the VIP by default (the
      address the director answers clients from, on the clients' side, so
      a route "to the clients" through the director covers it), or each
      ``--client`` address. The real server's SYN-ACK/RST for it leaves by
      its route to the clients.

    The client probe's answer seen arriving for the director's MAC: ok. Seen
    for another MAC (a flooded frame to another router): FAIL naming that
    MAC. Not seen while the control probe is answered: FAIL, the reply took
    a route that bypasses the director. Neither answered: warn (real server
    down or filtered: nothing to conclude). The director's kernel answers
    the stray SYN-ACK with a RST (or drops it), so nothing stays open on the
    real server. TCP is used for UDP services too: a closed port's RST
    travels the same route. (With ``--client`` and ``ip_forward=1`` the
    director's kernel forwards the stray SYN-ACK to that client, whose
    stack answers it with a RST: harmless, but it is real traffic.)
``tun``
    A Tun real server must decapsulate and accept the inner packet for the
    VIP. Method: a TCP SYN from the director's own address (the route's
    source toward the RIP) to VIP:port, inside IPIP (or UDP + GUE to the
    dest's tunnel port, with or without the outer checksum as the dest is
    configured), sent to RIP. The real server answers from the VIP straight
    to the director's address: a SYN-ACK or RST from VIP:port is ok. An
    ICMP protocol unreachable (IPIP) or port unreachable (GUE) from the RIP
    means nothing decapsulates there; silence means the packet was taken
    but not answered (the VIP not held, rp_filter dropping decapsulated
    packets, a decapsulator not running). And the tunnel MTU: the route's
    MTU toward the RIP less the overhead (20 IPIP, 32 GUE) must be at least
    576 (RFC 791's minimum datagram every host must accept), else clients'
    full-sized packets cannot pass. Once the tunnel answers, a DF probe of
    that outer size goes through it, then, if lost, smaller ones of common
    link MTUs (MTU_STEPS) at once: the full-sized one must be answered; a
    router's frag-needed
    (RFC 1191) gives the real path MTU (warn: the director learns it and
    tells clients; FAIL below 576 inside), silence brackets it (a black
    hole: FAIL). No DF probe when the tunnel does not answer: warn, not
    checked.
``settings``
    ``ip_forward``: informational; pylvs forwards in user space, so the
    kernel's value changes nothing for virtual services (1 lets the kernel
    route other traffic between the director's networks). Offloads:
    informational; pylvs reads frames with PACKET_VNET_HDR, completes
    partial checksums and segments GSO frames it sends itself, so no
    ``ethtool -K`` setting is needed. ``rp_filter``: pylvs applies the
    receiving interface's effective rp_filter (max of ``all`` and the
    interface) to new flows as the kernel does; with strict mode (1) a
    client whose route back leaves by another interface than the one its
    packets arrive on (taken as the VIP's interface) is refused (counted
    ``drop_rp_filter``), and with any mode a client with no route back at
    all. Checked per ``--client`` address; without one, a missing default
    route is reported.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterable

from .probe import PACKET_HOST, Answer, Net, ephemeral_port

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_TUN_MTU = 576
# Outer sizes a DF probe through the tunnel also tries when the full-sized
# one is lost: common link MTUs (Ethernet, PPPoE, tunnels, IPv6's 1280) down
# to RFC 791's 576, so the lost and the passed sizes bracket the real one.
MTU_STEPS = (1500, 1492, 1480, 1476, 1460, 1450, 1400, 1380, 1280, 1200, 1100, 1000,
             900, 800, 700, 576)
DR_OFF_LINK_FIX = ("give the director an address on the real server's network (DR needs "
                   "both on one segment), or add the dest with -i (Tun) or -m (NAT) instead "
                   "of -g")
SERVICE_KINDS = ("masq", "route", "tunnel")


@dataclass(frozen=True)
class Result:
    """One line of `pylvs check`: the check's name, what it is about, the
    verdict, what was found, and the fix in words (empty when ok)."""

    check: str
    subject: str
    verdict: str
    message: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        text = f"{self.verdict:<4} {self.check:<12} {self.subject}: {self.message}"
        return text + (f"; fix: {self.fix}" if self.fix else "")


def svc_name(s: dict) -> str:
    return f"{s['proto']} {s['vaddr']}:{s['vport']}"


ANY = "0.0.0.0"


def dests_by_fwd(snap: dict, key: str, any_vaddr: bool = True) -> list[tuple[dict, dict]]:
    """(service, dest) pairs whose dest uses the forwarding method KEY;
    without ``any_vaddr``, not those of a service on 0.0.0.0 (no packet is
    addressed to it: nothing to probe for, check_vips says so)."""
    return [(s, d) for s in snap.get("services", []) for d in s.get("dests", [])
            if d.get("fwd") == key and (any_vaddr or s["vaddr"] != ANY)]


class CheckInputError(ValueError):
    """An argument `pylvs check` cannot probe with; the message says why."""


def check_clients(clients: Iterable[str], net: Net) -> None:
    """CheckInputError unless every ``--client`` is a unicast address that is
    not the director's own: the probes use it as a client's source address,
    and a real server's reply to a loopback, multicast, broadcast or the
    director's own address says nothing about its route to clients."""
    import ipaddress
    own = net.addresses()
    for c in clients:
        a = ipaddress.IPv4Address(c)
        if a.is_unspecified or a.is_loopback or a.is_multicast or a.is_reserved \
                or a.is_link_local:
            raise CheckInputError(f"--client {c}: not a unicast address a client can have")
        if c in own:
            raise CheckInputError(f"--client {c} is an address of the director ({own[c]}): "
                                  f"give a client's address, e.g. one from the clients' network")
        if c in net.broadcasts():
            raise CheckInputError(f"--client {c} is a broadcast address of one of the "
                                  f"director's networks: not a client's address")


# --- configuration checks ------------------------------------------------------


def check_services(snap: dict) -> list[Result]:
    out = []
    for s in snap.get("services", []):
        dests = s.get("dests", [])
        live = [d for d in dests if d.get("weight", 0) > 0]
        if live:
            out.append(Result("services", svc_name(s), OK,
                              f"{len(live)} of {len(dests)} dest(s) with weight > 0"))
            continue
        what = "no dest" if not dests else "every dest has weight 0"
        fix = (f"add one: pylvs adm -a {'-t' if s['proto'] == 'TCP' else '-u'} "
               f"{s['vaddr']}:{s['vport']} -r RIP -w 1" if not dests else
               "give a dest a weight: pylvs adm -e ... -r RIP -w 1")
        out.append(Result("services", svc_name(s), FAIL,
                          f"{what}: every new flow is refused (ICMP port unreachable)", fix))
    return out


def check_vips(snap: dict, net: Net) -> list[Result]:
    addrs = net.addresses()
    out = []
    for vip in sorted({s["vaddr"] for s in snap.get("services", [])}):
        where = addrs.get(vip)
        if vip == ANY:
            # ip_vs_service_find matches a packet's exact destination address.
            out.append(Result("vip", vip, WARN,
                              "a service on 0.0.0.0 (accepted, as IPVS accepts it) is not a "
                              "wildcard: no packet is addressed to 0.0.0.0, so it receives "
                              "nothing, and the real-server probes skip it",
                              "give the service the address clients use, or a firewall-mark "
                              "service (-f) to take traffic to many addresses"))
        elif where is None:
            out.append(Result("vip", vip, FAIL, "not an address of the director: nobody answers "
                              "ARP for it, so its frames never reach the director",
                              f"ip addr add {vip}/32 dev IF (IF: the clients' side)"))
        elif where == "lo":
            arp_ignore = net.sysctl("conf/all/arp_ignore") or 0
            if arp_ignore:
                out.append(Result("vip", vip, WARN,
                                  f"on lo with all/arp_ignore={arp_ignore}: the kernel does "
                                  "not answer ARP for it",
                                  "route the VIP to the director, or put it on the "
                                  "clients' interface"))
            else:
                out.append(Result("vip", vip, OK, "on lo; the kernel answers ARP for it "
                                  "(arp_ignore 0)"))
        else:
            out.append(Result("vip", vip, OK, f"on {where}"))
    return out


def check_dr_connected(snap: dict, net: Net) -> list[Result]:
    out = []
    for rip in sorted({d["daddr"] for _, d in dests_by_fwd(snap, "route")}):
        r = net.route(rip)
        if r is None:
            out.append(Result("dr-connected", rip, FAIL, "no route to this DR real server: "
                              "the director drops its frames (drop_no_route)", DR_OFF_LINK_FIX))
        elif r.gateway:
            out.append(Result("dr-connected", rip, FAIL,
                              f"reached via gateway {r.gateway} on {r.ifname}: a DR frame "
                              "only changes MACs, it cannot cross a router, so the director "
                              "drops its frames (drop_no_route)", DR_OFF_LINK_FIX))
        else:
            out.append(Result("dr-connected", rip, OK, f"directly connected on {r.ifname}"))
    return out


def check_dr(snap: dict, net: Net, wait: float = 1.0) -> list[Result]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    out = []
    cache: dict = {}
    seen = set()
    for s, d in dests_by_fwd(snap, "route", any_vaddr=False):
        rip, vip, port = d["daddr"], s["vaddr"], s["vport"]
        r = net.route(rip)
        if (rip, vip, port) in seen or r is None or r.gateway or not r.prefsrc:
            continue   # dr-connected reports those without a direct route
        seen.add((rip, vip, port))
        subject = f"{rip} for {vip}:{port}"
        mac = _next_hop_mac(net, r, cache)
        if mac is None:
            out.append(Result("dr", subject, WARN, "no ARP answer from it: not probed",
                              f"check that {rip} is up"))
            continue
        sport = ephemeral_port()
        frame = bytes(Ether(dst=mac, src=net.mac(r.ifname)) / IP(src=r.prefsrc, dst=vip, ttl=64)
                      / TCP(sport=sport, dport=port, flags="S", seq=ephemeral_port() << 12))
        if net.exchange(r.ifname, [frame], _tcp_reply(vip, port, r.prefsrc, sport),
                        wait=wait, first=True, sources=[vip]):
            out.append(Result("dr", subject, OK, f"accepts packets for {vip}:{port} sent to its MAC"))
        else:
            out.append(Result("dr", subject, FAIL,
                              f"no answer from {vip}:{port} to a packet sent to its MAC: it "
                              "does not hold the VIP (or nothing listens and no RST is sent)",
                              f"on {rip} run `pylvs realserver setup --fwd dr --vip {vip}`"))
    return out


# --- the ARP problem -----------------------------------------------------------


def check_arp_problem(snap: dict, net: Net, wait: float = 1.0) -> list[Result]:
    # segment (interface) -> {vip: fwd key}, and the RIPs on it
    segments: dict[str, dict[str, str]] = {}
    rips: dict[str, set[str]] = {}
    # (RIP, VIP) -> that real server's methods for the VIP: the fix names its own.
    methods: dict[tuple[str, str], set[str]] = {}
    out = []
    routed = set()
    for s, d in (dests_by_fwd(snap, "route", any_vaddr=False)
                 + dests_by_fwd(snap, "tunnel", any_vaddr=False)):
        r = net.route(d["daddr"])
        if r is None or r.gateway:
            if d["fwd"] == "tunnel" and r is not None and d["daddr"] not in routed:
                # Its ARP answers stay on its own segment, which is not the
                # VIP's: it cannot draw the clients' traffic to the VIP.
                routed.add(d["daddr"])
                out.append(Result("arp-problem", d["daddr"], OK,
                                  f"Tun real server behind the router {r.gateway}: not on a "
                                  "segment of the director, so it cannot answer ARP for the "
                                  "VIP there"))
            continue   # a DR dest off-link: dr-connected reports it
        segments.setdefault(r.ifname, {}).setdefault(s["vaddr"], d["fwd"])
        rips.setdefault(r.ifname, set()).add(d["daddr"])
        methods.setdefault((d["daddr"], s["vaddr"]), set()).add(d["fwd"])
    mine = net.macs()
    for ifname in sorted(segments):
        vips = segments[ifname]
        answers = net.arp(ifname, [*vips, *sorted(rips[ifname])], wait)
        rip_of = net.neighbour_macs()
        rip_of.update({mac: ip for ip, mac in answers if ip in rips[ifname]})
        for vip in vips:
            thieves = sorted({mac for ip, mac in answers if ip == vip and mac not in mine})
            if not thieves:
                out.append(Result("arp-problem", f"{vip} on {ifname}", OK,
                                  "no host but the director answers ARP for it"))
            for mac in thieves:
                rip = rip_of.get(mac)
                if rip is None:
                    out.append(Result("arp-problem", f"{vip} on {ifname}", FAIL,
                                      f"{mac}, not a real server of this director, answers "
                                      "ARP for the VIP: that host has the VIP as an address "
                                      "of its own, so routers may send clients to it",
                                      "find the host with that MAC and remove the VIP from "
                                      "it (ip addr del VIP/PREFIX dev IF there); if it is a "
                                      "real server with another address, give that one with "
                                      "-r and let `pylvs realserver setup` put the VIP on its "
                                      "lo"))
                    continue
                # A real server that is a DR dest (for this VIP) is told DR's
                # set-up: tun's would only add a decapsulator it does not use.
                kind = "dr" if "route" in methods.get((rip, vip), {"route"}) else "tun"
                out.append(Result("arp-problem", f"{vip} on {ifname}", FAIL,
                                  f"real server {rip} ({mac}) answers ARP for the VIP: "
                                  "clients can reach it directly, past the director",
                                  f"on {rip} run `pylvs realserver setup --fwd {kind} --vip "
                                  f"{vip}` (VIP on lo /32, arp_ignore=1, arp_announce=2)"))
    return out


# --- probes through real servers ------------------------------------------------


def _next_hop_mac(net: Net, r, cache: dict) -> str | None:
    hop = r.gateway or r.dst
    if (r.ifname, hop) not in cache:
        known = {ip: mac for mac, ip in net.neighbour_macs().items()}
        cache[(r.ifname, hop)] = known.get(hop) or net.resolve(r.ifname, hop)
    return cache[(r.ifname, hop)]


def _tcp_reply(src: str, sport: int, dst: str, dport: int):
    """A matcher: the TCP segment src:sport -> dst:dport (SYN-ACK or RST)."""
    from scapy.layers.inet import IP, TCP

    def match(a: Answer):
        p = a.pkt
        if IP in p and TCP in p and p[IP].src == src and p[IP].dst == dst \
                and p[TCP].sport == sport and p[TCP].dport == dport:
            return a
        return None
    return match


def _nat_route_fix(rip: str, r, own: str, from_vip: bool) -> str:
    """How a NAT real server's replies are routed back through the director;
    ``from_vip``: the client probe's source was the VIP (no ``--client``)."""
    some = ("the probe used the VIP as the client's address: when only some clients are "
            "routed back through the director (`pylvs realserver setup --fwd nat --clients "
            "PREFIX`), run `pylvs check --client ADDR` with an address of one of them "
            "instead; otherwise " if from_vip else "")
    if not r.gateway:
        # setup refuses a second, different nat setup (config.setup): say how to redo it.
        return (f"{some}on {rip} run `pylvs realserver setup --fwd nat --dip {own}` (its "
                f"default route, or with --clients PREFIX its route to the clients, via the "
                f"director); if {rip} already has a nat setup (`pylvs realserver status` "
                f"there), run `pylvs realserver teardown` there first and set up again with "
                f"every client prefix in one --clients list")
    return (some + f"{rip} is behind the router {r.gateway}, so its replies reach the director only "
            f"if every hop routes the clients via it: on {rip}, the default route (or a route "
            f"to the clients) via its router toward the director (`pylvs realserver setup "
            f"--fwd nat --dip ROUTER`), and on each router between, the route to the clients "
            f"via the director ({own} on {r.ifname}, next to {r.gateway})")


def check_nat_route(snap: dict, net: Net, clients: Iterable[str] = (),
                    wait: float = 1.0) -> list[Result]:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    out = []
    cache: dict = {}
    mine = net.macs()
    seen = set()
    clients = list(clients)
    for s, d in dests_by_fwd(snap, "masq", any_vaddr=bool(clients)):
        rip, port = d["daddr"], d["dport"] or s["vport"]
        for src in (clients or [s["vaddr"]]):
            if (rip, port, src) in seen:
                continue
            seen.add((rip, port, src))
            subject = f"{rip}:{port}"
            r = net.route(rip)
            mac = r and _next_hop_mac(net, r, cache)
            if r is None or mac is None:
                out.append(Result("nat-route", subject, WARN,
                                  "no route or no ARP answer from it: not probed",
                                  f"check that {rip} is up and reachable"))
                continue
            own = r.prefsrc or next((a for a, i in net.addresses().items() if i == r.ifname), None)
            if own is None:
                out.append(Result("nat-route", subject, WARN,
                                  f"the director has no address on {r.ifname}: not probed",
                                  f"give {r.ifname} an address on {rip}'s network"))
                continue
            ports = {}
            frames = []
            for tag, sa in (("control", own), ("client", src)):
                ports[tag] = ephemeral_port()
                frames.append(bytes(Ether(dst=mac, src=net.mac(r.ifname))
                                    / IP(src=sa, dst=rip, ttl=64)
                                    / TCP(sport=ports[tag], dport=port, flags="S",
                                          seq=ephemeral_port() << 12)))
            m_ctl = _tcp_reply(rip, port, own, ports["control"])
            m_cli = _tcp_reply(rip, port, src, ports["client"])
            got = net.exchange(r.ifname, frames,
                               lambda a: (("control", a) if m_ctl(a) else
                                          ("client", a) if m_cli(a) else None),
                               wait=wait, sources=[rip])
            client = [a for tag, a in got if tag == "client"]
            control = [a for tag, a in got if tag == "control"]
            via = f"replies to {src}"
            fix = _nat_route_fix(rip, r, own, not clients)
            if any(a.pkttype == PACKET_HOST or a.pkt.dst.lower() in mine for a in client):
                out.append(Result("nat-route", subject, OK, f"{via} come back through the director"))
            elif client:
                out.append(Result("nat-route", subject, FAIL,
                                  f"{via} go to {client[0].pkt.dst}, not to the director",
                                  fix))
            elif control:
                out.append(Result("nat-route", subject, FAIL,
                                  f"answers the director's own address but {via} never "
                                  "reach the director: its route to the clients bypasses it",
                                  fix))
            else:
                out.append(Result("nat-route", subject, WARN,
                                  f"no answer to a SYN from the director's {own} either "
                                  "(down, or filtered): route not checked",
                                  f"check that {rip}:{port} is up"))
    return out


def _tunnel_frame(net: Net, r, mac: str, d: dict, inner: bytes, df: bool = False,
                  ip_id: int = 1) -> bytes:
    """INNER inside IPIP (or UDP + GUE as the dest is configured) from the
    route's source to the RIP, in a frame to MAC; ``df``: outer DF set."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    eth = Ether(dst=mac, src=net.mac(r.ifname))
    outer = IP(src=r.prefsrc, dst=r.dst, ttl=64, id=ip_id, flags="DF" if df else 0)
    if d.get("tun_type") == "gue":
        # GUE version 0, no extension, proto 4 (IPv4) in the ctype/proto byte.
        udp = UDP(sport=ephemeral_port(), dport=d["tun_port"])
        if d.get("tun_flags", 0) == 0:
            udp.chksum = 0
        return bytes(eth / outer / udp / Raw(b"\x00\x04\x00\x00" + inner))
    outer.proto = 4
    return bytes(eth / outer / Raw(inner))


def _syn(src: str, vip: str, port: int, sport: int, size: int = 0) -> bytes:
    """A TCP SYN to VIP:port, padded with payload to SIZE bytes (DF set then):
    a SYN carrying data is answered (SYN-ACK or RST) as a bare one is."""
    from scapy.layers.inet import IP, TCP
    from scapy.packet import Raw
    pkt = IP(src=src, dst=vip, ttl=64, flags="DF" if size else 0) / TCP(
        sport=sport, dport=port, flags="S", seq=ephemeral_port() << 12)
    return bytes(pkt / Raw(bytes(max(0, size - len(pkt))))) if size else bytes(pkt)


def _probe_tun_mtu(net: Net, r, mac: str, d: dict, vip: str, port: int, over: int,
                   wait: float) -> tuple[int | None, dict[int, bool], tuple | None]:
    """DF probes through the tunnel: first one of outer size r.mtu (up to
    WAIT seconds, ending at its answer or a router's frag-needed); when
    neither comes, the MTU_STEPS below it, sent at once and collected for
    WAIT seconds, to bracket the path MTU.

    Returns (the largest size answered or None, {size: answered}, the first
    frag-needed about a probe as (router, its next-hop MTU, the probe's size)
    or None).
    """
    from scapy.layers.inet import ICMP, IP, TCP, IPerror
    sizes = [r.mtu, *(m for m in MTU_STEPS if m < r.mtu)]
    # Each probe's inner source port and outer IP ID name its size in the
    # answer and in a router's quote of it.
    sports = random.sample(range(32768, 61000), len(sizes))
    base = random.randrange(0, 0x10000 - len(sizes))
    by_sport = dict(zip(sports, sizes))
    by_id = {base + i: size for i, size in enumerate(sizes)}
    frames = [_tunnel_frame(net, r, mac, d, _syn(r.prefsrc, vip, port, sport, size - over),
                            df=True, ip_id=base + i)
              for i, (sport, size) in enumerate(zip(sports, sizes))]

    def match(a: Answer):
        p = a.pkt
        if IP not in p:
            return None
        if ICMP in p:
            q = p[ICMP]
            if q.type == 3 and q.code == 4 and IPerror in p and p[IPerror].src == r.prefsrc \
                    and p[IPerror].dst == r.dst and p[IPerror].id in by_id:
                return ("frag", p[IP].src, q.nexthopmtu, by_id[p[IPerror].id])
            return None
        if TCP in p and p[IP].src == vip and p[IP].dst == r.prefsrc and p[TCP].sport == port \
                and p[TCP].dport in by_sport:
            return ("answered", by_sport[p[TCP].dport])
        return None

    def send(frames: list[bytes], first: bool) -> list:
        return net.exchange(r.ifname, frames, match, wait=wait, first=first, sources=[vip],
                            icmp=True)
    got = send(frames[:1], True) or send(frames[1:], False)
    answered = {size: False for size in sizes}
    frag = None
    for g in got:
        if g[0] == "answered":
            answered[g[1]] = True
        elif frag is None:
            frag = g[1:]
    passed = [size for size, ok in answered.items() if ok]
    return (max(passed) if passed else None), answered, frag


def _tun_mtu_result(subject: str, rip: str, r, over: int, probe) -> Result:
    """The tun-mtu line from a DF probe's outcome (see _probe_tun_mtu)."""
    largest, answered, frag = probe
    computed = f"MTU {r.mtu} on {r.ifname}"
    if answered.get(r.mtu):
        return Result("tun-mtu", subject, OK,
                      f"{r.mtu - over} bytes inside the tunnel ({computed} - {over}); a DF "
                      f"probe of {r.mtu} bytes through the tunnel was answered")
    raise_fix = (f"raise the MTU of the smaller link toward {rip} to at least {r.mtu} (the "
                 f"director's own toward it: {computed})")
    if frag is not None:
        router, mtu, size = frag
        found = (f"the path MTU toward {rip} is {mtu}, not the {computed}: router {router} "
                 f"answered a DF probe of {size} bytes with frag-needed (MTU {mtu}), leaving "
                 f"{mtu - over} bytes inside the tunnel")
        if mtu - over < MIN_TUN_MTU:
            return Result("tun-mtu", subject, FAIL, f"{found}, below {MIN_TUN_MTU}", raise_fix)
        # The director learns this from the router's frag-needed and tells
        # clients (ip_vs_in_icmp): it works, at the cost of a round trip
        # per client and a client that accepts ICMP.
        return Result("tun-mtu", subject, WARN,
                      f"{found}; the director learns it from such answers and tells each "
                      f"client with frag-needed, so a client that drops ICMP stalls", raise_fix)
    lost = min(size for size, ok in answered.items() if not ok and (largest is None
                                                                    or size > largest))
    if largest is None:
        found = (f"no DF probe from {lost} bytes down to {min(answered)} was answered while a "
                 f"small one was")
    else:
        found = (f"a DF probe of {largest} bytes was answered, one of {lost} was not: the path "
                 f"MTU is {largest} to {lost - 1}")
    return Result("tun-mtu", subject, FAIL,
                  f"{found}, and no router reported frag-needed (a path-MTU black hole): "
                  f"clients' full-sized packets through the tunnel are lost",
                  f"{raise_fix}, or make the router before the smaller link send ICMP "
                  f"frag-needed (it must not filter ICMP)")


def check_tun(snap: dict, net: Net, wait: float = 1.0) -> list[Result]:
    from scapy.layers.inet import ICMP, IP
    from ..forward import tunnel
    out = []
    cache: dict = {}
    seen = set()
    for s, d in dests_by_fwd(snap, "tunnel", any_vaddr=False):
        rip, vip, port = d["daddr"], s["vaddr"], s["vport"]
        ttype = d.get("tun_type", "ipip")
        key = (rip, vip, port, ttype, d.get("tun_port"), d.get("tun_flags"))
        if key in seen:
            continue
        seen.add(key)
        subject = f"{rip} ({ttype}) for {vip}:{port}"
        r = net.route(rip)
        if r is None:
            out.append(Result("tun", subject, FAIL, "no route to the real server",
                              f"add a route to {rip}"))
            continue
        over = tunnel.DESCRIPTOR.header_overhead(tunnel.TUN_TYPES.get(ttype, 0))
        room = r.mtu - over
        mtu_line = None
        if room < MIN_TUN_MTU:
            mtu_line = Result("tun-mtu", subject, FAIL,
                              f"path MTU {r.mtu} on {r.ifname} leaves {room} bytes inside the "
                              f"tunnel, below {MIN_TUN_MTU}",
                              f"raise the MTU toward {rip} to at least {MIN_TUN_MTU + over}")
        mac = _next_hop_mac(net, r, cache)
        if mac is None or not r.prefsrc:
            out.append(Result("tun", subject, WARN, "no ARP answer from the next hop: not probed",
                              f"check that {r.gateway or rip} is up"))
            out.append(mtu_line or _tun_mtu_unchecked(subject, r, over,
                                                      "no ARP answer from the next hop"))
            continue
        sport = ephemeral_port()
        frame = _tunnel_frame(net, r, mac, d, _syn(r.prefsrc, vip, port, sport))
        answered = _tcp_reply(vip, port, r.prefsrc, sport)

        def match(a: Answer, answered=answered):
            if answered(a):
                return "answered"
            p = a.pkt
            if IP in p and ICMP in p and p[IP].src == rip and p[ICMP].type == 3 \
                    and p[ICMP].code in (2, 3):
                return "unreachable"
            return None
        got = net.exchange(r.ifname, [frame], match, wait=wait, first=True, sources=[vip, rip])
        gue = f" --gue-port {d['tun_port']}" if ttype == "gue" else ""
        setup = f"on {rip} run `pylvs realserver setup --fwd tun --vip {vip}`"
        run = (f"if it has no ipip module (no tunl0), `pylvs realserver run --vip {vip}{gue}` "
               f"must be running there")
        if got and got[0] == "answered":
            out.append(Result("tun", subject, OK, f"answers from {vip}:{port} through the tunnel"))
            if mtu_line is None:
                mtu_line = _tun_mtu_result(subject, rip, r, over, _probe_tun_mtu(
                    net, r, mac, d, vip, port, over, wait))
        elif got:
            fix = f"{setup}; {run}"
            if ttype == "gue":
                # One decapsulator per namespace (realserver/run.py): the port
                # may be wrong on either side.
                opt = "-t" if s["proto"] == "TCP" else "-u"
                fix = (f"either the dest's tunnel port is wrong: `pylvs adm -e {opt} {vip}:{port} "
                       f"-r {rip} -i --tun-type gue --tun-port PORT` with the --gue-port {rip}'s "
                       f"`pylvs realserver run` was started with; or {rip} needs "
                       f"a decapsulator on {d['tun_port']}: {setup}, then `pylvs realserver "
                       f"run --vip {vip}{gue}` there, after stopping one that runs on another "
                       f"port (one decapsulator per namespace)")
            out.append(Result("tun", subject, FAIL,
                              f"{rip} answered ICMP {'protocol' if ttype == 'ipip' else 'port'} "
                              f"unreachable: nothing decapsulates {ttype.upper()} there", fix))
        else:
            out.append(Result("tun", subject, FAIL,
                              f"no answer from {vip}:{port} to a probe through the tunnel: "
                              "the real server does not decapsulate it, does not hold the VIP, "
                              "or drops it (rp_filter)",
                              f"{setup}; {run}; check `pylvs realserver status` there"))
        out.append(mtu_line or _tun_mtu_unchecked(subject, r, over,
                                                  "the tunnel does not answer"))
    return out


def _tun_mtu_unchecked(subject: str, r, over: int, why: str) -> Result:
    """The tun-mtu line when no DF probe could be sent: the route's MTU alone
    proves nothing about the path, so not ok."""
    return Result("tun-mtu", subject, WARN,
                  f"not checked: {why} (the route's MTU {r.mtu} on {r.ifname} would leave "
                  f"{r.mtu - over} bytes inside the tunnel)",
                  "fix the tun line first, then run pylvs check again")


# --- settings ------------------------------------------------------------------


def check_settings(snap: dict, net: Net, clients: Iterable[str] = ()) -> list[Result]:
    out = []
    fwd = net.sysctl("ip_forward")
    out.append(Result("settings", "ip_forward", OK,
                      f"{fwd}: informational, pylvs forwards virtual services in user space "
                      "whatever the value"))
    out.append(Result("settings", "offloads", OK,
                      "irrelevant: pylvs completes partial checksums and segments GSO "
                      "frames itself (PACKET_VNET_HDR)"))
    addrs = net.addresses()
    faces = sorted({addrs[s["vaddr"]] for s in snap.get("services", [])
                    if addrs.get(s["vaddr"]) not in (None, "lo")})
    clients = list(clients)
    for ifname in faces:
        rp = net.rp_filter(ifname)
        subject = f"rp_filter on {ifname}"
        if not rp:
            out.append(Result("settings", subject, OK, "0: no reverse-path check"))
            continue
        if not clients:
            if not net.has_default_route():
                out.append(Result("settings", subject, WARN,
                                  f"{rp} and no default route: only clients on routed "
                                  "networks pass pylvs's reverse-path check",
                                  "add a default route toward the clients, or rp_filter=0"))
            else:
                out.append(Result("settings", subject, OK,
                                  f"{rp}; give --client ADDR to check a client's path"))
            continue
        for c in clients:
            r = net.route(c)
            if r is None:
                out.append(Result("settings", f"{subject} for {c}", FAIL,
                                  f"{rp} and no route back to {c}: its new flows are refused "
                                  "(drop_rp_filter)", f"add a route to {c}"))
            elif rp == 1 and r.ifname != ifname:
                out.append(Result("settings", f"{subject} for {c}", FAIL,
                                  f"strict (1) and the route back to {c} leaves by {r.ifname}: "
                                  f"its new flows arriving on {ifname} are refused "
                                  "(drop_rp_filter)",
                                  f"route {c} via {ifname}, or set rp_filter=2 (loose) on "
                                  f"all and {ifname}"))
            else:
                out.append(Result("settings", f"{subject} for {c}", OK,
                                  f"{rp}; route back via {r.ifname}"))
    return out


def run_checks(snap: dict, net: Net, clients: Iterable[str] = (),
               wait: float = 1.0) -> list[Result]:
    """Every check, in the order they are printed. Raises CheckInputError for a
    ``clients`` address that cannot be a client's (check_clients)."""
    clients = list(clients)
    check_clients(clients, net)
    return [*check_services(snap), *check_vips(snap, net), *check_dr_connected(snap, net),
            *check_dr(snap, net, wait), *check_arp_problem(snap, net, wait),
            *check_nat_route(snap, net, clients, wait),
            *check_tun(snap, net, wait), *check_settings(snap, net, clients)]
