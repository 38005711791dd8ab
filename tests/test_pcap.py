"""The pcap file header and the Capture buffer's bounds (no sockets)."""

from __future__ import annotations

import struct

import pytest

from pylvs import _fast
from pylvs.io.pcap import file_header


def test_file_header_is_classic_pcap_ethernet():
    magic, major, minor, zone, sigfigs, snaplen, linktype = struct.unpack("=IHHiIII", file_header())
    assert (magic, major, minor, zone, sigfigs) == (0xA1B2C3D4, 2, 4, 0, 0)
    assert snaplen == _fast.PCAP_SNAPLEN >= 65536 + 14 + 60 + 60  # a 64 KiB GSO frame whole
    assert linktype == 1


@pytest.mark.parametrize("size", [0, _fast.PCAP_SNAPLEN, (1 << 30) + 1])
def test_capture_refuses_a_buffer_that_cannot_hold_the_largest_record(size):
    with pytest.raises(ValueError, match="buffer_bytes"):
        _fast.Capture(size)


def test_capture_starts_empty():
    c = _fast.Capture()
    assert c.take() == b"" and (c.frames, c.dropped, c.bytes) == (0, 0, 0)


def test_a_pcap_file_that_cannot_be_created_is_a_clear_error(tmp_path):
    from pylvs.io.pcap import PcapWriter

    with pytest.raises(OSError, match=r"cannot write the pcap file .*/no/dir/x.pcap: No such file"):
        PcapWriter(str(tmp_path / "no" / "dir" / "x.pcap"), [])
