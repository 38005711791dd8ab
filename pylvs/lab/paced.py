"""Paced downloads whose every byte is checked: the traffic of the failover
lab (netns-labs/failover, tests/netns/test_failover.py).

- ``serve``: a TCP server; a client sends one line ``SEED SIZE RATE
  [GAP]\\n`` (ASCII decimal: the content's seed, bytes to send, bytes per
  second, and seconds of silence after the first half) and gets SIZE
  bytes of ``content(SEED, SIZE)``, sent in slices every ``TICK`` s so
  that the transfer lasts SIZE / RATE seconds (plus GAP, during which the
  connection is idle: no segment either way), then the server closes.
- ``fetch``: N such downloads at once to one address and port, each with
  its own seed; it prints ``running N`` on stdout once every
  connection has received its first bytes (the moment to break something),
  then one JSON line: {"conns", "established", "intact", "broken":
  [{"seed", "got", "error"}], "seconds"}. A download is intact when all
  SIZE bytes arrived, equal to the content, followed by the server's FIN;
  one that receives nothing for ``idle`` seconds, is reset, or receives a
  wrong byte is broken.

``python -m pylvs.lab.paced serve --port P`` / ``fetch --addr A --port P
--conns N --size S --rate R``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

TICK = 0.02   # seconds between two slices of a download


def content(seed: int, size: int) -> bytes:
    """The bytes download ``seed`` carries (deterministic, incompressible)."""
    return random.Random(seed).randbytes(size)


async def _send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
        fields = line.split()
        if len(fields) not in (3, 4):
            raise ValueError(line)
        seed, size, rate = (int(x) for x in fields[:3])
        gap = float(fields[3]) if len(fields) == 4 else 0.0
        if not (0 <= size <= 1 << 30 and rate > 0 and 0 <= gap <= 3600):
            raise ValueError(line)
        data = content(seed, size)
        step = max(1, int(rate * TICK))
        start = time.monotonic()
        for off in range(0, size, step):
            if gap and off >= size // 2:
                # An idle conn (a session between two requests): nothing
                # for a sync master to announce again.
                await asyncio.sleep(gap)
                start += gap
                gap = 0.0
            writer.write(data[off:off + step])
            await writer.drain()
            # Paced by the clock, not by the slices sent: a stall (a
            # failover) is caught up afterwards, as a player's buffer would.
            delay = start + (off + step) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        writer.write_eof()
        await writer.drain()
    except (ValueError, OSError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


async def serve(host: str, port: int) -> None:
    server = await asyncio.start_server(_send, host, port, backlog=1024, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _fetch_one(addr: str, port: int, seed: int, size: int, rate: int, idle: float,
                     first: asyncio.Event, counter: list, total: int, out: dict,
                     gap: float = 0.0) -> None:
    want = content(seed, size)
    got = 0
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 10)
    except (OSError, asyncio.TimeoutError) as e:
        out[seed] = {"seed": seed, "got": 0, "error": f"connect: {e!r}"}
        return
    out[seed] = None   # established
    try:
        writer.write((f"{seed} {size} {rate} {gap}\n" if gap else
                      f"{seed} {size} {rate}\n").encode())
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 16), idle + gap)
            if not chunk:
                break
            if chunk != want[got:got + len(chunk)]:
                raise ValueError(f"wrong bytes at offset {got}")
            if got == 0:
                counter[0] += 1
                if counter[0] == total:
                    first.set()
            got += len(chunk)
        if got != size:
            raise ValueError(f"EOF after {got} of {size} bytes")
    except asyncio.TimeoutError:
        out[seed] = {"seed": seed, "got": got, "error": f"nothing for {idle + gap} s"}
    except (OSError, ValueError) as e:
        out[seed] = {"seed": seed, "got": got, "error": repr(e)}
    finally:
        writer.close()


async def fetch(addr: str, port: int, conns: int, size: int, rate: int, idle: float,
                seed: int = 0, gap: float = 0.0) -> dict:
    first = asyncio.Event()
    counter = [0]
    out: dict = {}
    start = time.monotonic()
    tasks = [asyncio.ensure_future(_fetch_one(addr, port, seed + i, size, rate, idle, first,
                                              counter, conns, out, gap))
             for i in range(conns)]

    async def announce() -> None:
        await first.wait()
        print(f"running {conns}", flush=True)
    note = asyncio.ensure_future(announce())
    await asyncio.gather(*tasks)
    note.cancel()
    broken = [v for v in out.values() if v is not None]
    return {"conns": conns, "established": sum(1 for v in out.values()
                                               if v is None or not v["error"].startswith("connect")),
            "intact": conns - len(broken), "broken": broken,
            "seconds": round(time.monotonic() - start, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pylvs.lab.paced", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--addr", required=True)
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--conns", type=int, default=100)
    f.add_argument("--size", type=int, default=100_000, help="bytes per download")
    f.add_argument("--rate", type=int, default=25_000, help="bytes per second per download")
    f.add_argument("--idle", type=float, default=8.0,
                   help="seconds without a byte after which a download is broken")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--gap", type=float, default=0.0,
                   help="seconds the server stays silent after the first half (the conn "
                   "idle; --idle counts beyond it)")
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        try:
            asyncio.run(serve(a.host, a.port))
        except KeyboardInterrupt:
            pass
        return 0
    if not (1 <= a.conns <= 10000 and a.size >= 0 and a.rate > 0 and a.idle > 0
            and 0 <= a.gap <= 3600):
        ap.error("--conns 1..10000, --size >= 0, --rate > 0, --idle > 0, --gap 0..3600")
    res = asyncio.run(fetch(a.addr, a.port, a.conns, a.size, a.rate, a.idle, a.seed, a.gap))
    print(json.dumps(res), flush=True)
    return 0 if res["intact"] == res["conns"] else 1


if __name__ == "__main__":
    sys.exit(main())
