"""The tables shared between the control plane and the data path.

Everything the C engine and the Python reference engine read or write is
defined here once: the service and dest tables (built by the control plane,
immutable once published), the counter arrays (written by the engine, read
by the control plane without copying), the verdicts, and the Batch of frames.

Addresses are IPv4 addresses as host-order integers (``int(IPv4Address)``),
ports are host-order integers. Frames are Ethernet frames prefixed by a
10-byte ``struct virtio_net_hdr`` (see ``VNET_HDR``): that is what an
AF_PACKET socket with PACKET_VNET_HDR (and a TAP with IFF_VNET_HDR) delivers
and accepts, and it carries the partial-checksum and GSO facts the engine
must respect.
"""

from __future__ import annotations

import struct

import numpy as np

# --- frames ---------------------------------------------------------------

# struct virtio_net_hdr, little endian (AF_PACKET uses the host's order, and
# these machines are little endian): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset. csum_start counts from the Ethernet header.
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10
VNET_F_NEEDS_CSUM = 1  # the L4 checksum field holds only the pseudo-header sum
VNET_F_DATA_VALID = 2
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_UDP = 3
VNET_GSO_TCPV6 = 4
VNET_GSO_UDP_L4 = 5

# Largest frame the engine accepts: a 64 KiB GSO frame plus headers.
MAX_FRAME = VNET_HDR_LEN + 14 + 65535

# Per-frame verdicts.
V_PASS = 0  # not virtual-service traffic: the kernel's own copy stands
V_TX = 1    # rewritten in place; send on out_port
V_DROP = 2  # service traffic that must not go anywhere; counted by reason
V_EMIT = 3  # not sent itself: what the engine made of it (IP fragments) is in the emit area

# --- forwarding methods (numbered as the kernel's IP_VS_CONN_F_FWD_MASK) ---
FWD_MASQ = 0
FWD_LOCAL = 1
FWD_TUNNEL = 2
FWD_ROUTE = 3
# Their names, ipvsadm flags and properties: pylvs.forward.METHODS.

PROTO_TCP = 6
PROTO_UDP = 17

# --- tables built by the control plane ------------------------------------

SVC_F_USED = 1  # the slot holds a service
# Only in the copy the socket filter and the steering sets are built from
# (pylvs/control/vipfollow.py): the VIP is not an address of this host, so
# its frames are left to the kernel. Never in the engines' tables.
SVC_F_STANDBY = 2
SVC_F_ONE_PACKET = 4  # -o: each UDP datagram scheduled alone, no conn kept (IP_VS_SVC_F_ONEPACKET)

SERVICE_DTYPE = np.dtype(
    [
        ("vaddr", "<u4"),
        ("vport", "<u2"),
        ("proto", "u1"),
        ("flags", "u1"),
        # Persistence (-p, -M; kernel ip_vs_sched_persist): 0 = not persistent,
        # else the template timeout in seconds; netmask host order (-M, /32 default).
        ("timeout", "<u4"),
        ("netmask", "<u4"),
    ],
    align=True,
)

DEST_F_USED = 1      # the slot holds a dest (conns may still point at a freed slot)
DEST_F_RESOLVED = 2  # out_port, dmac and smac are valid
DEST_F_NO_ROUTE = 4  # a DR dest not on a directly connected network: drop, count
DEST_F_REPLIES = 8   # the dest's method changed away from one whose replies come back
                     # through the director while conns bound to it may live on: the
                     # steering and socket filter still take its replies (pylvs/io/bpf.py)

DEST_DTYPE = np.dtype(
    [
        ("daddr", "<u4"),
        ("dport", "<u2"),
        ("svc", "<u2"),       # service slot this dest belongs to
        ("weight", "<u4"),
        ("fwd", "u1"),        # FWD_*
        ("flags", "u1"),      # DEST_F_*
        ("out_port", "<u2"),  # egress port index (see the I/O backend's port list)
        ("dmac", "u1", (6,)), # next-hop MAC (the real server's, on its L2 segment)
        ("smac", "u1", (6,)), # the director's MAC on out_port
        ("tun_type", "u1"),   # FWD_TUNNEL: pylvs.forward.tunnel.TUN_* (0 ipip, 1 gue, 2 gre)
        ("tun_flags", "u1"),  # FWD_TUNNEL: tunnel.TUN_F_* (0 nocsum, 1 csum, 2 remcsum)
        ("tun_port", "<u2"),  # FWD_TUNNEL gue: UDP destination port, host order
    ],
    align=True,
)

# --- counters written by the engine ---------------------------------------

# Global counters, indexed by position. The C engine uses the same indices
# (pylvs/_fast/engine.h); a test checks the two lists agree.
STAT_NAMES = (
    "rx_frames",          # frames handed to the engine
    "tx_frames",          # frames given verdict V_TX
    "pass_not_ipv4",      # not IPv4 (ARP, IPv6, VLAN, ...): left to the kernel
    "pass_not_ours",      # IPv4 but no conn and no service: left to the kernel
    "drop_truncated",     # shorter than its headers
    "drop_bad_ip",        # version != 4, IHL < 5, IHL or total length beyond the frame
    "drop_bad_l4",        # TCP data offset < 5 or beyond the packet; UDP length lies
    "drop_fragment",      # IP fragments (not reassembled by this version)
    "drop_no_conn",       # a non-SYN TCP segment to a service without a conn
    "drop_no_dest",       # the scheduler found no available dest
    "drop_table_full",    # the conn table is full
    "drop_dest_gone",     # the conn's dest was deleted (expire_nodest_conn=0)
    "drop_unresolved",    # the dest's next-hop MAC is not known yet
    "drop_fwd_method",    # forwarding method not supported by this engine
    "drop_conflict",      # the real-server side of a new conn is already in use
    "conns_created",
    "conns_expired",
    "ip_options",         # IPv4 headers with options seen (forwarded)
    "csum_partial_fixed", # partial checksums completed (TP_STATUS_CSUMNOTREADY)
    "gso_frames",         # GSO frames forwarded with a partial checksum
    "sched_errors",       # the scheduler upcall raised
    # -- verdict counters added for issue 5 (each frame bumps exactly one) --
    "drop_bad_ip_csum",   # IPv4 header checksum wrong (kernel ip_rcv_core)
    "drop_l2_other_host", # Ethernet dst is another host's MAC (PACKET_OTHERHOST)
    "drop_l2_bcast",      # Ethernet dst is broadcast or multicast
    "drop_source_route",  # IPv4 LSRR/SSRR option (accept_source_route=0)
    "drop_martian",       # martian source: 0/8, 127/8, multicast, broadcast, ours
    "drop_rp_filter",     # the reverse path check failed (rp_filter 1 or 2)
    "drop_frag_needed",   # DF set and too big for the egress MTU: answered
    "drop_gso_too_big",   # a GSO frame without DF whose segments exceed the MTU
    "tx_fragmented",      # V_EMIT: sent as IP fragments (DF clear, too big)
    "icmp_forwarded",     # V_TX: an ICMP error about a conn, sent where its packets go
    # -- extra counters (any number per frame) --
    "emit_frames",        # frames the engine made (ICMP, RST, fragments)
    "emit_overflow",      # a frame to make found no room in the emit area
    "icmp_unreach_sent",  # ICMP port unreachable: no dest for a new flow
    "icmp_frag_needed_sent",  # ICMP fragmentation needed (path MTU)
    "rst_sent",           # TCP RST for a segment that matches no conn
    "icmp_ratelimited",   # an ICMP error not sent: icmp_msgs_per_sec
    "rst_ratelimited",    # a RST not sent: tcp_rst_per_sec
    "frag_out",           # IP fragments made
    "conns_evicted",      # conns removed at the limit to make room
    "conns_reused",       # conns expired by a new SYN (conn_reuse_mode)
    # -- added for issue 6 --
    "drop_ttl",           # verdict: TTL <= 1, not forwarded (kernel ip_forward, decrement_ttl)
    "icmp_time_exceeded_sent",  # extra: ICMP time exceeded answering a drop_ttl
    "drop_no_route",      # verdict: the dest is DEST_F_NO_ROUTE (not on a connected network)
    "tx_tunneled",        # V_EMIT: sent encapsulated (VS-Tun, IPIP or GUE) from the emit area
    "tun_pmtu_learned",   # verdict (V_PASS): a router's frag-needed about a tunnel packet taken
    "drop_tun_icmp",      # verdict: an ICMP error about a tunnel packet: malformed, or of no Tun conn
    "tun_icmp_relayed",   # verdict (V_PASS): another error about a tunnel packet, relayed to the client
    # -- added for issue 7 --
    "drop_upcall_limit",  # verdict: a new flow while the receive ring is backed up and upcall_share is spent
    # -- added for issue 8 (knobs) --
    "drop_defense",       # verdict: a new flow's packet dropped by drop_packet's rate (kernel ip_vs_todrop)
    "conns_dropped",      # extra: conns removed by drop_entry (kernel ip_vs_random_dropentry)
    "drop_rs_no_conn",    # verdict: a NAT real server's packet matching no conn, nat_icmp_send=1
    "drop_pressure",      # verdict: a new flow while the receive ring is backed up, pressure_conn_rate spent
    # -- added for issue 9 (connection sync; docs/engine.md, "Sync") --
    "drop_sync_no_mac",   # verdict: a NAT reply of a conn installed by sync before its client's first frame
    "sync_queued",        # extra: records queued for sync_drain (master)
    "sync_queue_full",    # extra: records not queued, the queue held sync_qlen_max
    "sync_installed",     # extra: conns and templates created by sync_install (backup)
    "sync_updated",       # extra: existing conns and templates updated by sync_install
    "sync_rejected",      # extra: records that make no sense (proto, fwd, state, flags, ports)
    "sync_no_dest",       # extra: records whose service or dest this engine does not have
    "sync_stale",         # extra: the INACTIVE record of a conn already replaced (ignored)
    "sync_table_full",    # extra: records not installed, the table full and no conn may give way
    "sync_l2_routed",     # extra: a synced conn's client side taken from its route (ROUTE_F_MAC), not a frame
)
STAT_INDEX = {name: i for i, name in enumerate(STAT_NAMES)}
N_STATS = 64  # room to grow without changing the array's size

# --- ports, routes and sysctls (tables the engine indexes) ------------------

PORT_F_USED = 1        # the row describes an attached port
PORT_F_CHECK_MAC = 2   # drop service frames whose Ethernet dst is not `mac`
PORT_F_LOCAL = 4       # loopback: clients on the director itself (docs/io.md)

# One row per I/O port (index = the backend's port number).
PORT_DTYPE = np.dtype(
    [
        ("addr", "<u4"),       # the director's primary IPv4 address there (0: none)
        ("mtu", "<u4"),        # egress MTU in bytes (0: unknown, no MTU check)
        ("mac", "u1", (6,)),   # the port's MAC
        ("flags", "u1"),       # PORT_F_*
        ("rp_filter", "u1"),   # 0 off, 1 strict, 2 loose: max(all, iface) as the kernel
    ],
    align=True,
)

NO_PORT = 0xFFFF  # a route through an interface pylvs does not attach

ROUTE_F_MAC = 1  # `mac` is the next hop's: the kernel's neighbour entry for the gateway (or host)

# The namespace's IPv4 routes, sorted by plen descending (first match wins).
ROUTE_DTYPE = np.dtype(
    [
        ("prefix", "<u4"),     # host order, masked
        ("plen", "u1"),
        ("port", "<u2"),       # egress port, or NO_PORT
        ("mac", "u1", (6,)),   # the next hop's MAC when flags has ROUTE_F_MAC
        ("flags", "u1"),       # ROUTE_F_*
    ],
    align=True,
)

# Run-time knobs under the kernel's /proc/sys/net/ipv4/vs (and icmp) names,
# handed to the engine as one int64 array indexed by position.
SYSCTL_NAMES = (
    "conn_reuse_mode",     # 1: a SYN on a TIME_WAIT/CLOSE conn is scheduled afresh
    "expire_nodest_conn",  # 1: expire a conn whose dest is gone when a packet meets it
    "icmp_msgs_per_sec",   # ICMP errors the engine may send per second (net.ipv4.icmp_msgs_per_sec)
    "icmp_msgs_burst",     # ... and in a burst (net.ipv4.icmp_msgs_burst)
    "tcp_rst_per_sec",     # RSTs for segments matching no conn, per second
    "tcp_rst_burst",       # ... and in a burst
    "icmp_ratelimit",      # ms between ICMP errors to one destination, burst 6 (net.ipv4.icmp_ratelimit)
    "upcall_share",        # percent of time new flows' scheduler upcalls may take while the ring backs up (100: no limit)
    # -- issue 8 (Documentation/networking/ipvs-sysctl.rst; docs/engine.md, "Defence") --
    "sloppy_tcp",          # 1: any TCP segment but a RST may make a conn (take over flows after a failover)
    "nat_icmp_send",       # 1: a NAT real server's packet matching no conn gets ICMP port unreachable
    "pmtu_disc",           # 0: tunnelled DF packets too big are fragmented, not answered with frag-needed
    "drop_entry",          # 0 off, 1/2 automatic (2: on now), 3 always: randomly drop conns (control)
    "drop_packet",         # 0 off, 1/2 automatic, 3 always: drop 1 in rate new-flow packets (control)
    "secure_tcp",          # 0 off, 1/2 automatic, 3 always: the TCP state table tcp_states_dos (control)
    "amemthresh",          # pages of available memory below which the automatic modes turn on
    "am_droprate",         # drop_packet's rate in mode 3
    "expire_quiescent_template",  # 1: a template whose dest has weight 0 is invalid when next checked
    "pressure_conn_rate",  # new conns a worker admits per second while the ring backs up (0: no limit)
    # -- issue 9: connection sync (ipvs-sysctl.rst; docs/engine.md, "Sync") --
    "sync_threshold",      # the kernel's sync_threshold pair, first: send at pkts % sync_period == this
    "sync_period",         # ... second (DEFAULT_SYNC_PERIOD); 0: only at pkts == sync_threshold
    "sync_refresh_period", # s: resend a conn when its expiry moved this far (0: the threshold rule)
    "sync_retries",        # 0..3: resends of an unchanged conn, sync_refresh_period / 8 apart
    "sync_qlen_max",       # records the master's queue holds (set when master mode starts)
    "sync_persist_mode",   # 1: conns of persistent services are not sent, only their templates
    "sync_version",        # 1: the wire format (pylvs.sync speaks v1 only; 0 is refused by control)
)
SYSCTL_DEFAULTS = (1, 0, 1000, 50, 1000, 50, 1000, 50, 0, 0, 1, 0, 0, 0, 1024, 10, 0, 1000,
                   3, 50, 0, 0, 65536, 0, 1)
SYSCTL_INDEX = {name: i for i, name in enumerate(SYSCTL_NAMES)}
N_SYSCTL = len(SYSCTL_NAMES)


def default_sysctls() -> np.ndarray:
    """The sysctl array with every knob at its default (int64[N_SYSCTL])."""
    return np.array(SYSCTL_DEFAULTS, dtype=np.int64)


def empty_ports(n: int) -> np.ndarray:
    return np.zeros(n, dtype=PORT_DTYPE)


def empty_routes(n: int) -> np.ndarray:
    return np.zeros(n, dtype=ROUTE_DTYPE)


# --- scheduling in the engine (docs/engine.md, "Schedulers in C") ---------

# Counters.dest_flags bits, set and cleared by the engines as a conn binds
# or unbinds a dest (the kernel's ip_vs_bind_dest / ip_vs_unbind_dest).
DEST_F_OVERLOAD = 1  # IP_VS_DEST_F_OVERLOAD: -x reached, not yet below -y

# Schedulers the engine runs itself, by ``-s`` name; SCHED_UPCALL (any
# other name, or Balancer.c_sched off) calls the Python scheduler.
SCHED_UPCALL = 0
SCHED_KINDS = {"rr": 1, "wrr": 2, "lc": 3, "wlc": 4, "sed": 5, "nq": 6, "fo": 7, "ovf": 8,
               "sh": 9, "dh": 10, "mh": 11}
# sh, dh, mh: buckets per table (their Scheduler.table_size).
SCHED_TABLE_SIZES = {"sh": 256, "dh": 256, "mh": 4093}

# One row per service slot: its scheduler and its dests' run in SCHED_DEST
# rows [first, first + count), in the order its Python scheduler sees them;
# sh, dh, mh also their table, SCHED_TABLE_SIZES int32 entries of the
# sched_table array from `table` on: indices into the run, -1 empty.
SCHED_SVC_DTYPE = np.dtype(
    [
        ("kind", "u1"),      # SCHED_KINDS value or SCHED_UPCALL
        ("flags", "u1"),     # the service's -b bits (IP_VS_SVC_F_SCHED1..3)
        ("pad", "<u2"),
        ("first", "<u4"),
        ("count", "<u4"),
        ("table", "<u4"),
    ],
    align=True,
)
SCHED_DEST_DTYPE = np.dtype([("slot", "<u4"), ("weight", "<i4")], align=True)
# One row per dest slot: -x and -y (0: none), for the overload flag.
DEST_THRESH_DTYPE = np.dtype([("u_threshold", "<u4"), ("l_threshold", "<u4")], align=True)
# Counters.sched_state row: int32 words a stateful scheduler keeps for its
# service, shared by every worker's engine (word 0 is the row's lock).
SCHED_STATE_WORDS = 8


def empty_sched(max_services: int, max_dests: int) -> tuple[np.ndarray, ...]:
    """Scheduler tables with no C scheduler and no thresholds:
    (SCHED_SVC_DTYPE[max_services], SCHED_DEST_DTYPE[0],
    DEST_THRESH_DTYPE[max_dests], int32[0] sched_table)."""
    return (np.zeros(max_services, dtype=SCHED_SVC_DTYPE), np.zeros(0, dtype=SCHED_DEST_DTYPE),
            np.zeros(max_dests, dtype=DEST_THRESH_DTYPE), np.zeros(0, dtype=np.int32))


# Per-service and per-dest traffic counters, columns:
STAT_CONNS, STAT_INPKTS, STAT_OUTPKTS, STAT_INBYTES, STAT_OUTBYTES = range(5)
N_TRAFFIC = 5
# Per-dest conn counts, columns (the kernel's activeconns, inactconns; its
# persistconns, the templates, are Counters.dest_persist):
ACTIVE, INACTIVE = 0, 1
# conns() tuples: the `fwd` field of a template carries this bit too (the
# kernel's IP_VS_CONN_F_TEMPLATE in cp->flags).
CONN_F_TEMPLATE = 0x1000
# Template states (the kernel's IP_VS_CTPL_S_*, names as ip_vs_state_name).
CTPL_NONE, CTPL_ASSURED = 0, 1
CTPL_NAMES = ("NONE", "ASSURED")


class Counters:
    """The arrays the engine writes and everyone else reads (no copies).

    Bytes are IP packet lengths (as IPVS counts skb->len at the IP layer).
    A TCP conn is active in ESTABLISHED, SYN_SENT, SYN_RECV and SYNACK
    (states.ACTIVE, the kernel's tcp_state_active_table); every other state,
    and UDP, counts as inactive.
    """

    def __init__(self, max_services: int = 256, max_dests: int = 4096,
                 dest_conns: np.ndarray | None = None, dest_persist: np.ndarray | None = None,
                 dest_flags: np.ndarray | None = None, sched_state: np.ndarray | None = None):
        """``dest_conns``: an int32 (max_dests, 2) array to share with other
        Counters (workers: every engine adds to the same counts, atomically
        in C); None makes a new one. ``dest_persist``: int32 (max_dests,),
        the persistence templates naming each dest (the kernel's
        persistconns), ``dest_flags`` (uint8[max_dests], DEST_F_OVERLOAD) and
        ``sched_state`` (int32 (max_services, SCHED_STATE_WORDS)) are shared
        the same way."""
        self.max_services = max_services
        self.max_dests = max_dests
        self.stats = np.zeros(N_STATS, dtype=np.uint64)
        self.svc_stats = np.zeros((max_services, N_TRAFFIC), dtype=np.uint64)
        self.dest_stats = np.zeros((max_dests, N_TRAFFIC), dtype=np.uint64)
        self.dest_conns = _shared(dest_conns, "dest_conns", (max_dests, 2), np.int32)
        self.dest_persist = _shared(dest_persist, "dest_persist", (max_dests,), np.int32)
        self.dest_flags = _shared(dest_flags, "dest_flags", (max_dests,), np.uint8)
        self.sched_state = _shared(sched_state, "sched_state",
                                   (max_services, SCHED_STATE_WORDS), np.int32)

    def stat(self, name: str) -> int:
        return int(self.stats[STAT_INDEX[name]])

    def named(self) -> dict[str, int]:
        return {n: int(self.stats[i]) for i, n in enumerate(STAT_NAMES)}

    def zero_svc(self, slot: int) -> None:
        """Zero a service row's traffic counters (ipvsadm -Z, a new service)."""
        self.svc_stats[slot] = 0

    def zero_dest(self, slot: int) -> None:
        self.dest_stats[slot] = 0


def _shared(a: np.ndarray | None, what: str, shape: tuple, dtype) -> np.ndarray:
    if a is None:
        return np.zeros(shape, dtype=dtype)
    if a.shape != shape or a.dtype != dtype:
        raise ValueError(f"{what} must be {np.dtype(dtype).name} {shape}")
    return a


class CounterSum:
    """The Counters of several workers read as one (docs/io.md, "Workers"):
    ``stats``, ``svc_stats`` and ``dest_stats`` are sums made at each read
    (the kernel sums its per-CPU ip_vs_stats the same way), ``dest_conns``
    (with ``dest_flags`` and ``sched_state``) is the one array every
    worker's engine shares. Writes go through
    ``zero_svc`` / ``zero_dest``, which zero every worker's row. ``parts``:
    the workers' Counters, in worker order."""

    def __init__(self, max_services: int, max_dests: int, workers: int):
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.max_services = max_services
        self.max_dests = max_dests
        first = Counters(max_services, max_dests)
        self.dest_conns, self.dest_persist = first.dest_conns, first.dest_persist
        self.dest_flags, self.sched_state = first.dest_flags, first.sched_state
        self.parts = [first] + [Counters(max_services, max_dests, self.dest_conns,
                                         self.dest_persist, self.dest_flags, self.sched_state)
                                for _ in range(workers - 1)]

    def _sum(self, name: str) -> np.ndarray:
        arrays = [getattr(p, name) for p in self.parts]
        if len(arrays) == 1:
            return arrays[0].copy()
        return np.sum(arrays, axis=0, dtype=np.uint64)

    @property
    def stats(self) -> np.ndarray:
        return self._sum("stats")

    @property
    def svc_stats(self) -> np.ndarray:
        return self._sum("svc_stats")

    @property
    def dest_stats(self) -> np.ndarray:
        return self._sum("dest_stats")

    def stat(self, name: str) -> int:
        return sum(p.stat(name) for p in self.parts)

    def named(self) -> dict[str, int]:
        return {n: int(v) for n, v in zip(STAT_NAMES, self.stats)}

    def zero_svc(self, slot: int) -> None:
        for p in self.parts:
            p.zero_svc(slot)

    def zero_dest(self, slot: int) -> None:
        for p in self.parts:
            p.zero_dest(slot)


def empty_services(n: int) -> np.ndarray:
    return np.zeros(n, dtype=SERVICE_DTYPE)


def empty_dests(n: int) -> np.ndarray:
    return np.zeros(n, dtype=DEST_DTYPE)


def dests_gone(old: np.ndarray | None, new: np.ndarray) -> bool:
    """Did a dest of `old` go (its slot no longer used, or used by another
    service's dest) in `new`? Both DEST_DTYPE arrays; None: no old table."""
    if old is None or len(old) == 0:
        return False
    n = min(len(old), len(new))
    was = (old["flags"] & DEST_F_USED) != 0
    still = np.zeros(len(old), dtype=bool)
    still[:n] = ((new["flags"][:n] & DEST_F_USED) != 0) & (new["svc"][:n] == old["svc"][:n])
    return bool(np.any(was & ~still))


# --- batches of frames ----------------------------------------------------


class Batch:
    """Frames for one call of ``Engine.process``: in and out, in place.

    ``buf[i, :length[i]]`` is frame i (virtio_net_hdr + Ethernet frame) that
    arrived on port ``in_port[i]``. The engine rewrites it in place (NAT
    keeps the length) and sets ``verdict[i]`` and, for V_TX, ``out_port[i]``.

    Frames the engine makes (ICMP errors, RSTs, IP fragments) go to the emit
    area: frame j is ``emit_buf[emit_off[j]:emit_off[j] + emit_len[j]]``
    (a zero virtio_net_hdr + a complete Ethernet frame) to leave on
    ``emit_port[j]``; ``emit_n`` = (frames, bytes used), reset by each
    ``process``.
    """

    def __init__(self, size: int = 256, slot: int = 2048, emit_bytes: int = 256 * 1024,
                 emit_max: int | None = None):
        self.size = size
        self.slot = slot
        self.buf = np.zeros((size, slot), dtype=np.uint8)
        self.length = np.zeros(size, dtype=np.uint32)
        self.in_port = np.zeros(size, dtype=np.uint16)
        self.verdict = np.zeros(size, dtype=np.uint8)
        self.out_port = np.zeros(size, dtype=np.uint16)
        self.count = 0
        emit_max = 4 * size if emit_max is None else emit_max
        self.emit_buf = np.zeros(emit_bytes, dtype=np.uint8)
        self.emit_off = np.zeros(emit_max, dtype=np.uint32)
        self.emit_len = np.zeros(emit_max, dtype=np.uint32)
        self.emit_port = np.zeros(emit_max, dtype=np.uint16)
        self.emit_n = np.zeros(2, dtype=np.uint32)

    def clear(self) -> None:
        self.count = 0
        self.emit_n[:] = 0

    def emitted(self) -> list[tuple[int, bytes]]:
        """The frames the last ``process`` made: (port, frame with vnet header)."""
        out = []
        for j in range(int(self.emit_n[0])):
            off, n = int(self.emit_off[j]), int(self.emit_len[j])
            out.append((int(self.emit_port[j]), self.emit_buf[off:off + n].tobytes()))
        return out

    def append(self, frame: bytes, in_port: int = 0) -> int:
        """Add a frame (with its virtio_net_hdr); returns its index."""
        i = self.count
        if i >= self.size:
            raise IndexError("batch is full")
        n = len(frame)
        if n > self.slot:
            raise ValueError(f"frame of {n} bytes does not fit a {self.slot}-byte slot")
        self.buf[i, :n] = np.frombuffer(frame, dtype=np.uint8)
        self.length[i] = n
        self.in_port[i] = in_port
        self.verdict[i] = V_PASS
        self.out_port[i] = 0
        self.count = i + 1
        return i

    def frame(self, i: int) -> bytes:
        return self.buf[i, : self.length[i]].tobytes()


def with_vnet(frame: bytes, flags: int = 0, gso_type: int = VNET_GSO_NONE,
              hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
              csum_offset: int = 0) -> bytes:
    """Prefix an Ethernet frame with a virtio_net_hdr (all zero: a plain frame)."""
    return VNET_HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) + frame


def strip_vnet(frame: bytes) -> tuple[tuple[int, ...], bytes]:
    """Split a frame into its virtio_net_hdr fields and the Ethernet frame."""
    return VNET_HDR.unpack_from(frame), frame[VNET_HDR_LEN:]


# The sync record (pylvs.engine.sync), here too so that the C engine checks
# it against its struct as it does the other tables. Last: sync.py reads
# this module's names when it is imported first.
from .sync import SYNC_DTYPE  # noqa: E402
