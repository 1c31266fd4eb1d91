"""Count which worker answers each request: a small HTTP client for the benchmark.

Every benchmark app names its process in the x-worker-pid header. This client keeps
CONNECTIONS requests going (each on a keep-alive connection, reconnecting whenever the
server asks with "Connection: close" or drops it; or, with --close, each on a new
connection) and counts the answers per worker in tenths of a second of wall time, so
that the caller can cut windows out of one continuous run (steady, then after a
reload). Refused connections are counted apart from the other failures; a client waits
10 ms after a failure before it tries again. It runs until SIGINT or SIGTERM, or
--seconds, then prints one JSON object:

    {"answers": [[tenth, pid, count], ...], "refused": [[tenth, count], ...],
     "errors": [[tenth, count], ...], "p99_ms": 1.5}

where tenth is int(time.time() * 10) and p99_ms is over every answer.

    python3 bench/pidclient.py http://127.0.0.1:8000/ --connections 64 [--close]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time
from urllib.parse import urlsplit

PID_HEADER = b"x-worker-pid"


class Tally:
    def __init__(self) -> None:
        self.answers: collections.Counter[tuple[int, int]] = collections.Counter()
        self.refused: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[int] = collections.Counter()
        self.latencies: list[float] = []

    def answer(self, pid: int, started: float) -> None:
        now = time.time()
        self.answers[int(now * 10), pid] += 1
        self.latencies.append(now - started)

    def failure(self, err: BaseException) -> None:
        counter = self.refused if isinstance(err, ConnectionRefusedError) else self.errors
        counter[int(time.time() * 10)] += 1

    def as_json(self) -> str:
        latencies = sorted(self.latencies)
        p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else 0.0
        return json.dumps({"answers": [[tenth, pid, n] for (tenth, pid), n in sorted(self.answers.items())],
                           "refused": sorted(self.refused.items()), "errors": sorted(self.errors.items()),
                           "p99_ms": p99})


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The answering pid, and whether the server closes the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            key, value = line.split(b":", 1)
            headers[key.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # no trailers from the benchmark apps
    else:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    closing = headers.get(b"connection", b"").lower() == b"close"
    return int(headers.get(PID_HEADER, b"0")), closing


async def client(host: str, port: int, request: bytes, close_each: bool, tally: Tally, stop: asyncio.Event) -> None:
    writer = None
    while not stop.is_set():
        started = time.time()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            pid, closing = await read_response(reader)
            tally.answer(pid, started)
            if closing or close_each:
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as err:
            tally.failure(err)
            if writer is not None:
                writer.close()
                writer = None
            # A refused connection comes back at once: do not spin on it.
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def main_async(args: argparse.Namespace) -> Tally:
    url = urlsplit(args.url)
    connection = b"close" if args.close else b"keep-alive"
    request = (f"GET {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\n".encode()
               + b"Connection: " + connection + b"\r\n\r\n")
    tally = Tally()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.call_later(args.seconds, stop.set)
    tasks = [asyncio.create_task(client(url.hostname, url.port or 80, request, args.close, tally, stop))
             for _ in range(args.connections)]
    await stop.wait()
    # A request in flight when told to stop is left unanswered, not counted as failed.
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--close", action="store_true", help="a new connection for every request")
    parser.add_argument("--seconds", type=float, default=3600)
    args = parser.parse_args()
    print(asyncio.run(main_async(args)).as_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
