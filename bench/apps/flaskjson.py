"""The WSGI app of the benchmark: a Flask JSON endpoint, as in a small API.

The response names its process in x-worker-pid, so a client can count each worker's
share of the requests.
"""

import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return {"message": "Hello, world!", "pid": os.getpid()}


@app.after_request
def name_the_worker(response):
    response.headers["x-worker-pid"] = str(os.getpid())
    return response
