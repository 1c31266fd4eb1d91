"""ASGI apps of the benchmark, in plain ASGI (no framework, the same on every Debian).

hello    answers "Hello, world!" at once
sleep5   awaits 5 ms first (an app waiting on a database or an API)

Every response names its process in x-worker-pid, so a client can count each worker's
share of the requests.
"""

import asyncio
import os

BODY = b"Hello, world!\n"
LENGTH = str(len(BODY)).encode()


async def _lifespan(receive, send) -> None:
    # Answered rather than left to fail, so that every server runs the startup the same.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", LENGTH),
                            (b"x-worker-pid", str(os.getpid()).encode())]})
    await send({"type": "http.response.body", "body": BODY})


async def hello(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await _answer(send)


async def sleep5(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await asyncio.sleep(0.005)
        await _answer(send)
