#!/usr/bin/env python3
"""A throttling TCP relay for bench.py (Python 3.11 standard library only).

    python3 throttle_relay.py --listen PORT --upstream PORT --mbps N

Listens on 127.0.0.1:PORT and relays every connection to 127.0.0.1:UPSTREAM. The bytes going
upstream -> client (the registry's responses) pass a token bucket of N MB/s (10^6 bytes/s) that is
SHARED by all connections, like one uplink: 21 parallel blob fetches get N MB/s between them, not
N MB/s each. The other direction (requests) is not throttled. Only the rate is limited; no latency
is added.

When either side of a connection closes or fails, both sides are closed. Everything is driven by the
asyncio event loop (no polling); with the bucket in debt a connection sleeps exactly until its chunk
is paid for. SIGTERM or SIGINT stops the relay: it closes the listener and every connection, prints
totals and exits.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

CHUNK = 256 * 1024          # bytes read per step from the upstream
CONNECT_TIMEOUT = 10.0


def log(msg: str) -> None:
    print(f"[relay {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class TokenBucket:
    """Token bucket that may go into debt: reserve(n) takes n tokens now and returns how long the
    caller must wait until they are paid for. Callers are served in the order they reserve, so the
    rate holds exactly over any interval (plus at most `burst` bytes) however many share it."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()

    def reserve(self, n: int) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Relay:
    def __init__(self, upstream_port: int, mbps: float) -> None:
        self.upstream_port = upstream_port
        rate = mbps * 1e6
        # Burst: 20 ms worth of bytes, at least one chunk (so a single read never waits twice).
        self.bucket = TokenBucket(rate, max(float(CHUNK), rate * 0.02))
        self.conns = 0
        self.open_conns: set[asyncio.Task] = set()
        self.down_bytes = 0      # upstream -> client, throttled
        self.up_bytes = 0        # client -> upstream
        self.started = time.monotonic()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   throttle: bool, count: list[int]) -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                return  # EOF: the caller closes both sides
            if throttle:
                delay = self.bucket.reserve(len(data))
                if delay > 0:
                    await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()  # back-pressure: read no more until the client took it
            count[0] += len(data)
            if throttle:
                self.down_bytes += len(data)
            else:
                self.up_bytes += len(data)

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.conns += 1
        n = self.conns
        task = asyncio.current_task()
        self.open_conns.add(task)
        t0 = time.monotonic()
        down, up = [0], [0]
        u_writer = None
        try:
            try:
                u_reader, u_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.upstream_port, limit=2 * CHUNK),
                    CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                log(f"conn {n}: cannot connect to upstream 127.0.0.1:{self.upstream_port}: {e!r}")
                return
            pumps = [asyncio.create_task(self.pump(u_reader, c_writer, True, down)),
                     asyncio.create_task(self.pump(c_reader, u_writer, False, up))]
            try:
                # Either direction ending (EOF or error) ends the connection.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pumps:
                    p.cancel()
                for p, r in zip(pumps, await asyncio.gather(*pumps, return_exceptions=True)):
                    if isinstance(r, Exception) and not isinstance(r, ConnectionError):
                        log(f"conn {n}: {r!r}")
        finally:
            for w in (c_writer, u_writer):
                if w is not None:
                    w.close()  # flushes what is buffered, then closes
            for w in (c_writer, u_writer):
                if w is not None:
                    try:
                        await asyncio.wait_for(w.wait_closed(), 5.0)
                    except (OSError, asyncio.TimeoutError, asyncio.CancelledError):
                        pass
            self.open_conns.discard(task)
            dt = time.monotonic() - t0
            if down[0] >= 1_000_000:
                log(f"conn {n}: closed after {dt:.2f}s, {down[0]} bytes down "
                    f"({down[0] / dt / 1e6:.1f} MB/s), {up[0]} up")


async def serve(listen_port: int, upstream_port: int, mbps: float) -> None:
    relay = Relay(upstream_port, mbps)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(relay.handle, "127.0.0.1", listen_port,
                                        limit=2 * CHUNK, reuse_address=True)
    log(f"listening on 127.0.0.1:{listen_port} -> 127.0.0.1:{upstream_port}, "
        f"upstream->client limited to {mbps:g} MB/s shared")
    try:
        await stop.wait()
    finally:
        server.close()
        for t in list(relay.open_conns):
            t.cancel()
        if relay.open_conns:
            await asyncio.wait(list(relay.open_conns), timeout=5.0)
        log(f"stopped: {relay.conns} connections, {relay.down_bytes} bytes down, "
            f"{relay.up_bytes} bytes up in {time.monotonic() - relay.started:.1f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1 to listen on")
    ap.add_argument("--upstream", type=int, required=True, help="port on 127.0.0.1 to relay to")
    ap.add_argument("--mbps", type=float, required=True,
                    help="upstream->client limit in MB/s (10^6 bytes/s), shared by all connections")
    args = ap.parse_args(argv)
    if args.mbps <= 0:
        ap.error("--mbps must be > 0")
    asyncio.run(serve(args.listen, args.upstream, args.mbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
