"""python -m unitgen_worker: run one instance of an app under systemd."""

from __future__ import annotations

import faulthandler
import logging
import sys

from unitgen_worker.contract import (
    EXIT_CONFIG,
    EXIT_STARTUP,
    WorkerConfig,
    counters_file,
    runtime_directory_of_this_process,
)
from unitgen_worker.loader import ConfigError, as_asgi, detect_interface, import_app
from unitgen_worker.sd import NoSocketError, adopt_listen_sockets

log = logging.getLogger("unitgen.worker")


def load(app_spec: str, interface: str) -> tuple[object, str]:
    app = import_app(app_spec)
    detected = detect_interface(app)
    return app, (detected if interface == "auto" else interface)


def main(argv: list[str] | None = None) -> int:
    args = WorkerConfig.from_argv(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The import path is the working directory, as for `python -m` and gunicorn.
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    if args.check:
        try:
            _, interface = load(args.app, args.interface)
        except ConfigError as err:
            print(f"unitgen-worker: {err}", file=sys.stderr)
            return EXIT_CONFIG
        print(interface)
        return 0

    # systemd's watchdog kills with SIGABRT: faulthandler prints every thread's stack
    # to stderr (the journal) first, which shows where the event loop was stuck.
    faulthandler.enable(all_threads=True)
    try:
        sockets = adopt_listen_sockets()
        app, interface = load(args.app, args.interface)
    except (ConfigError, NoSocketError) as err:
        # One line in the journal, no traceback: RestartPreventExitStatus= stops here.
        print(f"unitgen-worker: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("the app raised while it was imported")
        return EXIT_STARTUP
    from unitgen_worker.server import serve  # after the app: its import errors come first

    log.info("instance %s serving %s (%s)", args.instance, args.app, interface)
    lifespan = "auto" if interface == "asgi" else "off"
    runtime = runtime_directory_of_this_process()
    counters = counters_file(runtime, args.instance) if runtime else None
    if not serve(as_asgi(app, interface), sockets, lifespan=lifespan, drain_timeout=args.drain_timeout,
                 counters_path=counters):
        return EXIT_STARTUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
