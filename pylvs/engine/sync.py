"""The engine's side of connection sync: one record per conn, as the IPVS
sync protocol describes it (``../shared/REFERENCE.md``, "Connection sync";
kernel ``include/net/ip_vs.h`` and ``net/netfilter/ipvs/ip_vs_sync.c``).

Engines fill records (``SYNC_DTYPE``) for the conns a master must announce
and install the records a backup hears; ``pylvs.sync`` turns them into wire
messages and back. Records hold host-order numbers: the wire codec does the
byte order.

Fields of SYNC_DTYPE:
    proto   IPPROTO_TCP (6) / IPPROTO_UDP (17)
    state   the kernel's state number: IP_VS_TCP_S_* for TCP (the numbering
            of ``pylvs.engine.states.STATE_NAMES``), IP_VS_UDP_S_NORMAL (0)
            for UDP; a template's is its template state
    flags   the kernel's IP_VS_CONN_F_* bits (the forwarding method in the
            low 3 bits, CONN_F_TEMPLATE, CONN_F_NOOUTPUT, ...)
    caddr cport vaddr vport daddr dport   the conn's tuple, IPv4 as u32
    fwmark  0 (no fwmark services yet)
    timeout seconds: the timeout of the conn's current state (the kernel
            sends cp->timeout / HZ), a template's own timeout
"""

from __future__ import annotations

import numpy as np

SYNC_DTYPE = np.dtype([
    ("proto", np.uint8),
    ("state", np.uint16),
    ("flags", np.uint32),
    ("caddr", np.uint32),
    ("cport", np.uint16),
    ("vaddr", np.uint32),
    ("vport", np.uint16),
    ("daddr", np.uint32),
    ("dport", np.uint16),
    ("fwmark", np.uint32),
    ("timeout", np.uint32),
], align=True)   # a C struct with natural alignment (the engines' view)

# IP_VS_CONN_F_* (include/uapi/linux/ip_vs.h): the bits that travel in sync.
CONN_F_FWD_MASK = 0x0007        # IP_VS_CONN_F_MASQ 0, LOCALNODE 1, TUNNEL 2, DROUTE 3
CONN_F_HASHED = 0x0040
CONN_F_NOOUTPUT = 0x0080
CONN_F_INACTIVE = 0x0100
CONN_F_OUT_SEQ = 0x0200
CONN_F_IN_SEQ = 0x0400
CONN_F_SEQ_MASK = 0x0600
CONN_F_NO_CPORT = 0x0800
CONN_F_TEMPLATE = 0x1000
CONN_F_ONE_PACKET = 0x2000
# The kernel keeps only these from a sync message (IP_VS_CONN_F_BACKUP_MASK)
# and sets IP_VS_CONN_F_SYNC on what it installs.
CONN_F_BACKUP_MASK = (CONN_F_FWD_MASK | CONN_F_NOOUTPUT | CONN_F_INACTIVE | CONN_F_SEQ_MASK
                      | CONN_F_NO_CPORT | CONN_F_TEMPLATE)
CONN_F_SYNC = 0x0020

IP_VS_UDP_S_NORMAL = 0
