"""An ASGI app whose lifespan startup takes 2 s: READY=1 must wait for it."""

import asyncio
import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(2)
                app.state["ready"] = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    # A request served before startup finished would answer 503.
    status = 200 if app.state.get("ready") else 503
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": f"pid {os.getpid()}\n".encode()})


app.state = {}
