"""An ASGI app for the lifecycle tests (plain ASGI: the same on every Debian).

/            200 with the pid
/sleep?s=N   answers after N seconds (the loop keeps running)
/block?s=N   blocks the event loop for N seconds (the watchdog's case); &until=PATH: until
             PATH exists, N seconds at most
/forever     a response that streams a line every 0.2 s and never ends
/leak?kb=N   keeps N KiB more for good (a leak); answers with the process's resident bytes
/ws          a WebSocket: sends the pid, then echoes until the client or server closes
Flag files in /run/unitgen-test make instance UNITGEN_INSTANCE fail on purpose:
import-error-I (cannot be imported: exit 78) and fail-startup-I (lifespan raises);
fail-startup-all makes every instance fail at startup (a broken release);
slow-startup-all makes every process that starts take 3 s in its lifespan startup;
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


LEAKED = []


def resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def websocket(receive, send):
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": str(os.getpid())})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message.get("text") or ""})


def block(seconds, until=None):
    # On the event loop thread, on purpose.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.path.exists(f"{FLAGS}/fail-startup-{INSTANCE}") or os.path.exists(f"{FLAGS}/fail-startup-all"):
                    await send({"type": "lifespan.startup.failed", "message": "failing on purpose"})
                    return
                if os.path.exists(f"{FLAGS}/slow-startup-all"):
                    await asyncio.sleep(3)
                if os.path.exists(f"{FLAGS}/exit-after-ready-all"):
                    asyncio.get_running_loop().call_later(1.5, os.kill, os.getpid(), signal.SIGTERM)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await websocket(receive, send)
        return
    if scope["path"] == "/leak":
        kib = int(parse_qs(scope["query_string"].decode()).get("kb", ["0"])[0])
        LEAKED.append(os.urandom(kib * 1024))  # random: no page is shared or left untouched
        body = f"pid {os.getpid()} resident {resident_bytes()}\n".encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain"), (b"x-worker-pid", str(os.getpid()).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["path"] == "/forever":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while True:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.2)
    query = parse_qs(scope["query_string"].decode())
    seconds = float(query.get("s", ["0"])[0])
    if scope["path"] == "/sleep":
        await asyncio.sleep(seconds)
    elif scope["path"] == "/block":
        block(seconds, query.get("until", [None])[0])
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/plain"), (b"x-worker-pid", str(os.getpid()).encode()),
        (b"x-instance", INSTANCE.encode())]})
    await send({"type": "http.response.body", "body": f"pid {os.getpid()} slept {seconds}\n".encode()})
