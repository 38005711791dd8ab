# --- AF_PACKET forwarder (pylvs/_fast/afpacket.c) ---------------------------
from typing import Sequence

import numpy as np

class Ring:
    """The TPACKET_V3 receive ring of a configured AF_PACKET socket."""
    fd: int
    block_size: int
    block_nr: int
    rx_frames: int
    rx_blocks: int
    rx_truncated: int
    rx_vlan: int
    rx_oversize: int
    tx_frames: int
    tx_errors: int
    tx_bad_port: int
    sock_errors: int
    last_error: int
    def __init__(self, fd: int, block_size: int = ..., block_nr: int = ...,
                 frame_size: int = ..., retire_ms: int = ...) -> None: ...
    def close(self) -> None: ...

def forward(engine: Engine, rings: Sequence[Ring], now: float, timeout_ms: int = 0,
            budget: int = 4096) -> int: ...
def ring_recv(rings: Sequence[Ring], buf: np.ndarray, length: np.ndarray,
              in_port: np.ndarray, timeout_ms: int = 0) -> int: ...
def ring_send(rings: Sequence[Ring], buf: np.ndarray, length: np.ndarray,
              verdict: np.ndarray, out_port: np.ndarray, count: int) -> int: ...
# --- end AF_PACKET forwarder -----------------------------------------------
