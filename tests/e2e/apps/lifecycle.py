"""An ASGI app for the lifecycle tests (plain ASGI: the same on every Debian).

/            200 with the pid
/sleep?s=N   answers after N seconds (the loop keeps running)
/block?s=N   blocks the event loop for N seconds (the watchdog's case)
/forever     a response that streams a line every 0.2 s and never ends
Flag files in /run/unitgen-test make instance UNITGEN_INSTANCE fail on purpose:
import-error-I (cannot be imported: exit 78) and fail-startup-I (lifespan raises);
fail-startup-all makes every instance fail at startup (a broken release);
exit-after-ready-all makes every process that starts stop itself 1.5 s after its
startup (SIGTERM to itself: it drains, exits 0 and systemd restarts it).
"""

import asyncio
import os
import signal
import time
from urllib.parse import parse_qs

FLAGS = "/run/unitgen-test"
INSTANCE = os.environ.get("UNITGEN_INSTANCE", "?")

if os.path.exists(f"{FLAGS}/import-error-{INSTANCE}"):
    import a_module_that_is_not_installed  # noqa: F401


def block(seconds):
    time.sleep(seconds)  # on the event loop thread, on purpose


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.path.exists(f"{FLAGS}/fail-startup-{INSTANCE}") or os.path.exists(f"{FLAGS}/fail-startup-all"):
                    await send({"type": "lifespan.startup.failed", "message": "failing on purpose"})
                    return
                if os.path.exists(f"{FLAGS}/exit-after-ready-all"):
                    asyncio.get_running_loop().call_later(1.5, os.kill, os.getpid(), signal.SIGTERM)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/forever":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while True:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.2)
    seconds = float(parse_qs(scope["query_string"].decode()).get("s", ["0"])[0])
    if scope["path"] == "/sleep":
        await asyncio.sleep(seconds)
    elif scope["path"] == "/block":
        block(seconds)
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/plain"), (b"x-worker-pid", str(os.getpid()).encode()),
        (b"x-instance", INSTANCE.encode())]})
    await send({"type": "http.response.body", "body": f"pid {os.getpid()} slept {seconds}\n".encode()})
