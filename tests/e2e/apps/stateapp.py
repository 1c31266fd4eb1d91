"""An app that writes: a counter in its state directory and a file in a --writable path.

/          increments $STATE_DIRECTORY/count and answers "count N uid U"
/writable  appends to $WRITABLE_FILE and answers its size
/tmp       writes and reads back a file in /tmp (PrivateTmp)
/outside   tries to write /srv/outside/file, which is not --writable
"""

import os
import tempfile


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/writable":
        with open(os.environ["WRITABLE_FILE"], "a") as f:
            f.write("x")
        body = f"size {os.path.getsize(os.environ['WRITABLE_FILE'])}"
    elif scope["path"] == "/outside":
        try:
            with open("/srv/outside/file", "a") as f:
                f.write("x")
            body = "wrote"
        except OSError as err:
            body = f"denied: {err.strerror}"
    elif scope["path"] == "/tmp":
        with tempfile.NamedTemporaryFile("w+") as f:
            f.write("tmp ok")
            f.flush()
            f.seek(0)
            body = f.read()
    else:
        path = os.path.join(os.environ["STATE_DIRECTORY"], "count")
        count = int(open(path).read()) + 1 if os.path.exists(path) else 1
        with open(path, "w") as f:
            f.write(str(count))
        body = f"count {count} uid {os.getuid()}"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})
