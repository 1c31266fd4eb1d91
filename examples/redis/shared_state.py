"""Shared state across instances: sessions, a rate limit and a counter kept in Redis.

Every instance of an app under unitgen is a process of its own, as each worker of Node's
cluster module or of PM2 is: a dict, a counter or a lock in one instance's memory is
invisible to its siblings and lost at each `unitgen roll`. What the instances must agree
on lives here in Redis (redis-py's asyncio client, from Debian's python3-redis on 12
and 13).

    GET    /          counts the request in Redis (INCR) and answers the count
    GET    /limited   rate-limited per client: LIMIT requests per WINDOW seconds, else 429
    POST   /session   stores the JSON object in the body as the session (a cookie names it)
    GET    /session   the session of the cookie, or 404
    DELETE /session   forgets it
    GET    /healthz   answers once Redis does

Run it with unitgen (README: "Shared state across instances"):

    unitgen render --app shared_state:app --workdir examples/redis \\
        --env REDIS_URL=redis://127.0.0.1:6379/0 | sudo unitgen install -

Environment: REDIS_URL (default redis://127.0.0.1:6379/0), SESSION_TTL (seconds, 1800),
RATE_LIMIT (requests, 100) and RATE_WINDOW (seconds, 60), COOKIE_SECURE (1 behind HTTPS).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets

import redis.asyncio as aioredis
from redis.exceptions import RedisError

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SESSION_TTL = int(os.environ.get("SESSION_TTL", "1800"))
RATE_LIMIT = int(os.environ.get("RATE_LIMIT", "100"))
RATE_WINDOW = int(os.environ.get("RATE_WINDOW", "60"))
COOKIE_SECURE = os.environ.get("COOKIE_SECURE", "0") == "1"
# How long startup waits for Redis before it fails (the worker then exits 3 and systemd
# starts it again after a growing delay); `unitgen roll` stops at an instance that fails.
CONNECT_FOR = 10.0
MAX_BODY = 4096  # bytes of session data a client may send
COOKIE = "sid"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # what secrets.token_urlsafe(32) makes
KEYS = "shared-state:"  # prefix of every key this app writes

INSTANCE = os.environ.get("UNITGEN_INSTANCE", "-")
client: aioredis.Redis | None = None  # one per process, with its pool of connections


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    route = ROUTES.get((scope["method"], scope["path"]))
    if route is None:
        await respond(send, 404, {"error": "not found"})
        return
    try:
        await route(scope, receive, send)
    except RedisError as err:
        # Redis went away: say so, rather than guess from this process's memory.
        await respond(send, 503, {"error": f"redis: {err.__class__.__name__}"})


async def lifespan(receive, send):
    """Open the client at startup, so that READY=1 (the worker sends it after the startup)
    means that Redis answers; close it at shutdown, after the last request drained."""
    global client
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                client = await connect()
            except (RedisError, OSError) as err:
                # startup.failed, not an exception: uvicorn's "auto" lifespan would take
                # an exception for an app without lifespan support and serve anyway.
                where = re.sub(r"//[^@/]*@", "//", REDIS_URL)  # never a password in the journal
                await send({"type": "lifespan.startup.failed", "message": f"redis at {where}: {err}"})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if client is not None:
                # Both redis-py 4.3 (Debian 12) and 5.x-6.x (Debian 13) have this; close()
                # is deprecated from 5.0.1 and aclose() is missing from 4.3.
                await client.connection_pool.disconnect()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def connect() -> aioredis.Redis:
    """A client whose server answered PING, retried for CONNECT_FOR seconds (Redis may be
    starting at the same time as the app, at boot)."""
    new = aioredis.from_url(REDIS_URL, decode_responses=True, socket_connect_timeout=2, socket_timeout=5,
                            health_check_interval=30)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONNECT_FOR
    while True:
        try:
            await new.ping()
            return new
        except (RedisError, OSError):
            if loop.time() > deadline:
                await new.connection_pool.disconnect()
                raise
            await asyncio.sleep(0.5)


async def count(scope, receive, send):
    # One round trip, applied together: the total and this process's share of it (a field
    # for every process there ever was: the test reads it; a real app would let it expire).
    async with client.pipeline(transaction=True) as pipe:
        pipe.incr(KEYS + "hits")
        pipe.hincrby(KEYS + "hits-by-pid", str(os.getpid()), 1)
        hits, _ = await pipe.execute()
    await respond(send, 200, {"hits": hits}, [(b"x-counted", b"1")])


async def limited(scope, receive, send):
    """A fixed window per client: it opens at the client's first request (SET NX with a
    TTL) and counts every request in it (INCR keeps the TTL). Both in one MULTI, so no
    counter is left without its expiry, whichever instance or crash comes in between."""
    key = f"{KEYS}rate:{client_key(scope)}"
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(key, 0, ex=RATE_WINDOW, nx=True)
        pipe.incr(key)
        pipe.ttl(key)
        _, used, ttl = await pipe.execute()
    limit_headers = [(b"x-ratelimit-limit", str(RATE_LIMIT).encode()),
                     (b"x-ratelimit-remaining", str(max(0, RATE_LIMIT - used)).encode())]
    if used > RATE_LIMIT:
        retry = str(max(1, ttl)).encode()
        await respond(send, 429, {"error": "rate limited", "retry_after": int(retry)},
                      [*limit_headers, (b"retry-after", retry)])
        return
    await respond(send, 200, {"used": used, "limit": RATE_LIMIT}, limit_headers)


def client_key(scope) -> str:
    """Who the limit counts: the X-Api-Key header, else the peer's address (behind a proxy
    that is the proxy's: take the client from its header there). Hashed, so that a key of
    any length or content makes a short, safe Redis key. This example does not check the
    key, so a client can pick a new one for every request and never be limited: a real
    API counts only keys it has authenticated, and everything else by address."""
    given = header(scope, b"x-api-key") or (scope.get("client") or ("unknown",))[0]
    return hashlib.sha256(given.encode(errors="replace")).hexdigest()[:32]


async def create_session(scope, receive, send):
    body = await read_body(receive)
    if body is None:
        await respond(send, 413, {"error": f"session data over {MAX_BODY} bytes"})
        return
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        await respond(send, 400, {"error": "the body must be a JSON object"})
        return
    # A new id at each login (never one the client chose): no session fixation.
    sid = secrets.token_urlsafe(32)
    old = session_id(scope)
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(KEYS + "session:" + sid, json.dumps(data), ex=SESSION_TTL)
        if old:
            pipe.delete(KEYS + "session:" + old)
        await pipe.execute()
    await respond(send, 201, data, [(b"set-cookie", cookie(sid, SESSION_TTL))])


async def read_session(scope, receive, send):
    sid = session_id(scope)
    if sid is None:
        await respond(send, 404, {"error": "no session"})
        return
    key = KEYS + "session:" + sid
    # Reading a session keeps it alive for another SESSION_TTL (GET, then EXPIRE, in one
    # MULTI; GETEX would need Redis 6.2).
    async with client.pipeline(transaction=True) as pipe:
        pipe.get(key)
        pipe.expire(key, SESSION_TTL)
        data, _ = await pipe.execute()
    if data is None:
        await respond(send, 404, {"error": "no session"}, [(b"set-cookie", cookie("", 0))])
        return
    await respond(send, 200, json.loads(data))


async def delete_session(scope, receive, send):
    sid = session_id(scope)
    if sid is not None:
        await client.delete(KEYS + "session:" + sid)
    await respond(send, 204, None, [(b"set-cookie", cookie("", 0))])


async def healthz(scope, receive, send):
    await client.ping()
    await respond(send, 200, {"ok": True})


ROUTES = {
    ("GET", "/"): count,
    ("GET", "/limited"): limited,
    ("POST", "/session"): create_session,
    ("GET", "/session"): read_session,
    ("DELETE", "/session"): delete_session,
    ("GET", "/healthz"): healthz,
}


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def session_id(scope) -> str | None:
    """The session id of the request's cookie, if it has the shape of one of ours."""
    for part in (header(scope, b"cookie") or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and SESSION_ID.fullmatch(value):
            return value
    return None


def cookie(sid: str, max_age: int) -> bytes:
    secure = "; Secure" if COOKIE_SECURE else ""
    return f"{COOKIE}={sid}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax{secure}".encode()


async def read_body(receive) -> bytes | None:
    """The request body, or None once it passes MAX_BODY."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            return None
        if not message.get("more_body"):
            return body


async def respond(send, status: int, payload, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = b"" if payload is None else json.dumps(payload).encode() + b"\n"
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"x-instance", INSTANCE.encode()),
        (b"x-pid", str(os.getpid()).encode()),
        *headers,
    ]})
    await send({"type": "http.response.body", "body": body})
