"""A user module named `worker`: the runtime's own import name must not shadow it."""


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"the user's own worker module\n"]
