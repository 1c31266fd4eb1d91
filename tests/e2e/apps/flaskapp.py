"""A WSGI app (Flask) for the e2e tests: echo, streaming, status codes, headers, a stuck handler."""

import os
import time

from flask import Flask, Response, request

app = Flask(__name__)


@app.route("/")
def index():
    return {"pid": os.getpid()}


@app.route("/echo", methods=["POST"])
def echo():
    return Response(request.get_data(), mimetype="application/octet-stream")


@app.route("/stream")
def stream():
    def chunks():
        for i in range(100):
            yield f"chunk {i}\n"
    return Response(chunks(), mimetype="text/plain")


@app.route("/status/<int:code>")
def status(code):
    return Response(f"status {code}\n", status=code)


@app.route("/headers")
def headers():
    return Response("ok\n", headers={"X-Echo": request.headers.get("X-Test", ""), "X-Interface": "wsgi"})


@app.route("/hang")
def hang():
    # A handler stuck in a call without a timeout (time.sleep stands for it).
    seconds = float(request.args.get("s", "60"))
    time.sleep(seconds)
    return {"pid": os.getpid(), "slept": seconds}
