"""Import MODULE:ATTR and tell WSGI from ASGI."""

from __future__ import annotations

import importlib
import inspect
from typing import Any


class ConfigError(Exception):
    """The app cannot be loaded as given: restarting will not help (exit 78)."""


def import_app(spec: str) -> Any:
    module_name, _, attrs = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        # A missing module, or a module the app imports that is not installed.
        raise ConfigError(f"cannot import {module_name!r}: {err}") from None
    except SyntaxError as err:
        raise ConfigError(f"cannot import {module_name!r}: {err.msg} ({err.filename}, line {err.lineno})") from None
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attrs!r}") from None
    return obj


def detect_interface(app: Any) -> str:
    """'asgi' when calling the app is a coroutine function, else 'wsgi' (as uvicorn does)."""
    if not callable(app):
        raise ConfigError(f"the app is a {type(app).__name__}, not a WSGI or ASGI callable")
    # A coroutine function (or a partial of one), a class (ASGI 2/3 style), or an object
    # whose __call__ is a coroutine function (Starlette, FastAPI, Django's ASGIHandler).
    if inspect.isclass(app) or inspect.iscoroutinefunction(app):
        return "asgi"
    if not (inspect.isfunction(app) or inspect.ismethod(app)) and inspect.iscoroutinefunction(type(app).__call__):
        return "asgi"
    return "wsgi"


def as_asgi(app: Any, interface: str, threads: int) -> Any:
    """WSGI apps run through a maintained adapter, a2wsgi, else uvicorn's own, on a pool
    of `threads` threads."""
    if interface == "asgi":
        return app
    try:
        from a2wsgi import WSGIMiddleware
    except ImportError:  # Debian 12 has no a2wsgi; uvicorn's middleware is there.
        from uvicorn.middleware.wsgi import WSGIMiddleware
    return WSGIMiddleware(app, workers=threads)
