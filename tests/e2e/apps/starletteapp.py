"""An ASGI app (Starlette) for the e2e tests: echo, streaming, status codes, headers."""

import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


async def index(request):
    return JSONResponse({"pid": os.getpid()})


async def echo(request):
    return Response(await request.body(), media_type="application/octet-stream")


async def stream(request):
    async def chunks():
        for i in range(100):
            yield f"chunk {i}\n"
    return StreamingResponse(chunks(), media_type="text/plain")


async def status(request):
    code = request.path_params["code"]
    return PlainTextResponse(f"status {code}\n", status_code=code)


async def headers(request):
    return PlainTextResponse("ok\n", headers={"X-Echo": request.headers.get("x-test", ""), "X-Interface": "asgi"})


app = Starlette(routes=[
    Route("/", index),
    Route("/echo", echo, methods=["POST"]),
    Route("/stream", stream),
    Route("/status/{code:int}", status),
    Route("/headers", headers),
])
