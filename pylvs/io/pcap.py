"""`pylvs run --pcap FILE`: what the director transmits, written to a pcap file.

Every frame the AF_PACKET rings send (forwarded frames and the ones the
engine makes: ICMP errors, RSTs, fragments, tunnel packets) is copied by the
data thread into a bounded buffer (``_fast.Capture``, pcap records already
formatted); a writer thread takes the buffer whole every ``period`` seconds
and appends it to the file. When the writer falls behind, frames are
dropped from the capture, never delayed on the wire: ``dropped`` counts them.

The file is the classic libpcap format (pcap-savefile(5)): magic 0xa1b2c3d4
in host byte order, version 2.4, microsecond timestamps, snaplen 262144,
linktype 1 (Ethernet). It is flushed after each write, so ``tcpdump -r FILE``
reads it while pylvs runs. Frames are recorded as sent: a GSO frame is one
record of up to 64 KiB, and a frame with a partial checksum (vnet flag
NEEDS_CSUM) shows the pseudo-header sum in its checksum field, as tcpdump
shows the sender's own offloaded frames.
"""

from __future__ import annotations

import logging
import struct
import threading

from .. import _fast

log = logging.getLogger("pylvs.pcap")

LINKTYPE_ETHERNET = 1


def file_header(snaplen: int | None = None) -> bytes:
    """The 24-byte pcap global header (host byte order, as the records)."""
    return struct.pack("=IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0,
                       snaplen or _fast.PCAP_SNAPLEN, LINKTYPE_ETHERNET)


class PcapWriter:
    """Copies the frames ``rings`` send to ``path`` (created or truncated).

    ``buffer_bytes``: the most record bytes held between two writes (at
    least 262,160, one record of the largest frame); ``period``: seconds
    between writes. Raises OSError when the file cannot be opened.
    ``stop()`` detaches the capture, writes what is left and closes the file.
    """

    def __init__(self, path: str, rings, *, buffer_bytes: int = 4 << 20,
                 period: float = 0.02):
        self.path = path
        try:
            self._file = open(path, "wb")
        except OSError as e:
            raise OSError(f"cannot write the pcap file {path}: {e.strerror or e}") from None
        try:
            self._file.write(file_header())
            self._file.flush()
            self.capture = _fast.Capture(buffer_bytes)
        except BaseException:
            self._file.close()
            raise
        self._rings = list(rings)
        self._period = period
        self._stop = threading.Event()
        self.write_errors = 0
        for r in self._rings:
            r.set_capture(self.capture)
        self._thread = threading.Thread(target=self._run, name="pylvs-pcap", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        data = self.capture.take()
        if not data:
            return
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as e:
            # A full disk must not stop the director: count, log once.
            if not self.write_errors:
                log.error("pcap %s: %s; records are being lost", self.path, e)
            self.write_errors += 1

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._drain()

    def stats(self) -> dict[str, int]:
        """``pcap_frames`` recorded, ``pcap_dropped`` (buffer full: sent,
        not recorded), ``pcap_write_errors`` (writes the file refused)."""
        return {"pcap_frames": self.capture.frames, "pcap_dropped": self.capture.dropped,
                "pcap_write_errors": self.write_errors}

    def stop(self) -> None:
        if self._file.closed:
            return
        for r in self._rings:
            r.set_capture(None)
        self._stop.set()
        self._thread.join(5)
        self._drain()
        self._file.close()
