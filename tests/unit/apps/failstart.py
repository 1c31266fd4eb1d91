"""An ASGI app whose lifespan startup fails: the worker must exit 3 without READY=1."""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "failing on purpose"})
