"""User text as pylvs reads it: numbers, and input echoed in messages.

Shared by the command lines (`pylvs adm`, `pylvs run`, `pylvs sysctl`),
the -R / -c rule files and the control socket, so they agree on what a
number is and echo bad input the same way.
"""

from __future__ import annotations

import re

# Python's int() takes any Unicode decimal digit ("٣", "３"); strtol, which
# ipvsadm and sysctl(8) use, takes only ASCII ones.
_INT = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)[ \t\n\v\f\r]*")

# Longest piece of the user's input quoted back in an error message.
EXCERPT_CHARS = 60


def ascii_int(text: str) -> int | None:
    """The int written in ``text`` (optional ASCII white space around an
    optional sign and ASCII decimal digits), or None for anything else."""
    m = _INT.fullmatch(text)
    return int(m.group(1)) if m else None


def quoted(value: object) -> str:
    """``value`` as repr() shows it, cut and escaped as excerpt() does."""
    if isinstance(value, (str, bytes)):
        return f"'{excerpt(value)}'"
    return excerpt(repr(value))


def excerpt(text: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """``text`` as an error message may quote it: at most ``limit``
    characters then "...", with control characters, undecodable bytes
    (surrogate escapes) and other non-printable characters shown as
    backslash escapes."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    head = text[:limit]
    out = []
    for ch in head:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:   # an undecodable byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out) + ("..." if len(text) > limit else "")
