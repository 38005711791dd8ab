# pylvs._bpf (pylvs/bpf/loader.c): load BPF objects with libbpf, attach
# their programs at tc ingress (tcx) through BPF links, update their maps.
# Every file descriptor is close-on-exec and owned by one object; a Link's
# is the only reference to the attachment (never pinned), so the kernel
# detaches the program when the Link is closed or the process dies.
# Errors from the kernel or libbpf: OSError(errno, "what failed: why\nlibbpf's words").

class Map:
    name: str
    id: int
    key_size: int
    value_size: int
    max_entries: int
    def update(self, keys: bytes, value: bytes) -> None:
        """Set each key (key_size bytes each, back to back) to value; OSError
        (E2BIG: the map is full) names the key's index."""
    def delete(self, keys: bytes) -> int:
        """Delete each key; missing ones skipped; how many were deleted."""
    def keys(self) -> bytes:
        """Every key of a hash map, back to back."""
    def sum_u64(self, index: int) -> int:
        """u64 at index of an array map, summed over CPUs when per-CPU."""
    def close(self) -> None: ...

class Link:
    id: int
    prog_id: int
    ifindex: int
    closed: bool
    def close(self) -> None:
        """Drop the link: the kernel detaches the program now."""

class Object:
    def __init__(self, path: str, max_entries: dict[str, int] = ...) -> None:
        """Open and load a compiled BPF object file, first sizing the named
        maps (KeyError: no such map; ValueError: size out of 1..2**32-1)."""
    def map(self, name: str) -> Map:
        """The named map, with its own descriptor (KeyError if none)."""
    def attach_tcx_ingress(self, prog: str, ifindex: int) -> Link:
        """Attach the named program first at tcx ingress of the interface
        (kernel >= 6.6; OSError EINVAL without tcx, EPERM without CAP_BPF)."""
    def attach_xdp(self, prog: str, ifindex: int, generic: bool = False) -> Link:
        """Attach the named XDP program through a BPF link, native (driver)
        mode or generic (skb) mode (OSError EOPNOTSUPP: no native XDP;
        EBUSY/EEXIST: another XDP program is there)."""
    def attach_tun_steering(self, prog: str, fd: int) -> int:
        """Make the named socket-filter program the queue-steering program
        of the TUN/TAP device ``fd`` is a queue of (TUNSETSTEERINGEBPF): the
        device holds it until replaced or detached (ioctl with -1). Returns
        the program's id (OSError EINVAL: not a socket filter; EBADFD)."""
    def prog_fd(self, prog: str) -> tuple[int, int]:
        """(fd, id): a new close-on-exec descriptor of the named program,
        the caller's to close (for PACKET_FANOUT_DATA of a
        PACKET_FANOUT_EBPF group, which holds the program itself once
        set), and the program's id."""
    def close(self) -> None:
        """Free the object; its Links and Maps stay valid."""

def tcx_query(ifindex: int, egress: bool = False) -> list[int]:
    """Ids of the programs at tcx ingress (egress) of the interface, in order."""

def prog_info(prog_id: int) -> dict:
    """{"name": str, "map_ids": list[int]} of a loaded program."""

def map_from_id(map_id: int) -> Map:
    """Open a loaded map by id."""

def prog_test_run(prog_id: int, frame: bytes) -> int:
    """A loaded program's verdict on one Ethernet frame (BPF_PROG_TEST_RUN;
    for tc programs a frame to MAC 00:00:00:00:00:00 is PACKET_HOST)."""

def xdp_query(ifindex: int) -> dict:
    """{"prog_id": int, "mode": "none"|"native"|"generic"|"offload"|"multi",
    "link": bool}: the interface's XDP program and whether a BPF link holds it."""

def xdp_detach(ifindex: int, prog_id: int, generic: bool = False) -> None:
    """Detach prog_id if netlink attached it there in native (generic) mode
    (OSError otherwise)."""
