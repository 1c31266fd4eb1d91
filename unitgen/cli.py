"""unitgen's command line: declares the options, hands the work to the modules."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import traceback
from pathlib import Path

from unitgen import __version__, config, manager, run
from unitgen.check import check_app
from unitgen.cores import usable_cpus
from unitgen.dev import DevConfig, serve
from unitgen.errors import Die, die
from unitgen.install import install, uninstall, write_files
from unitgen.ops import logs, roll, scale
from unitgen.render import format_bundle, render_files
from unitgen.spec import (
    HARDENING,
    INTERFACES,
    MAX_CONCURRENCY,
    MAX_THREADS,
    AppSpec,
    check_manager,
    check_on_failure,
    check_root_safe_env,
    default_name,
    parse_app,
    parse_cidr,
    parse_cores,
    parse_count,
    parse_env,
    parse_executable,
    parse_hardening,
    parse_interface,
    parse_listens,
    parse_metrics_listen,
    parse_name,
    parse_path,
    parse_recycling,
    parse_seconds,
    parse_unit,
    parse_user,
)
from unitgen.state import App
from unitgen.status import collect, table
from unitgen.watch import watch
from unitgen_worker import alert
from unitgen_worker.contract import DRAIN_TIMEOUT, HOLD, RECYCLE_MEMORY_AT, REQUEST_TIMEOUT, THREADS, WATCHDOG

DEFAULT_LISTEN = "127.0.0.1:8000"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Die(message, hint=f"see `{self.prog} --help`", code=2)


def spec_from_args(args: argparse.Namespace) -> AppSpec:
    app = parse_app(args.app)
    listen = parse_listens(tuple(args.listen or [DEFAULT_LISTEN]))
    env = tuple(parse_env(value) for value in args.env)
    on_failure = parse_unit("--on-failure", args.on_failure) if args.on_failure is not None else None
    name = parse_name(args.name if args.name is not None else default_name(app))
    if on_failure:
        check_root_safe_env(env)
        check_on_failure(name, on_failure)
    spec = AppSpec(
        name=name,
        app=app,
        instances=parse_cores(args.cores, usable=usable_cpus()),
        listen=listen,
        workdir=parse_path("--workdir", args.workdir if args.workdir is not None else os.getcwd()),
        python=parse_executable("--python", args.python if args.python is not None else sys.executable),
        env=env,
        user=parse_user(args.user) if args.user is not None else None,
        interface=parse_interface(args.interface),
        watchdog=parse_seconds("--watchdog", args.watchdog, minimum=0),
        drain_timeout=parse_seconds("--drain-timeout", args.drain_timeout, minimum=1),
        threads=parse_count("--threads", args.threads, minimum=1, maximum=MAX_THREADS),
        max_concurrency=parse_count("--max-concurrency", args.max_concurrency, minimum=0, maximum=MAX_CONCURRENCY),
        request_timeout=parse_seconds("--request-timeout", args.request_timeout, minimum=0),
        rebalance=args.rebalance,
        **parse_recycling(args.max_requests, args.max_requests_jitter, args.memory_max),
        on_failure=on_failure,
        writable=tuple(parse_path("--writable", value) for value in args.writable),
        hardening=parse_hardening(args.hardening),
        allow=tuple(parse_cidr("--allow", value) for value in args.allow),
        deny=tuple(parse_cidr("--deny", value) for value in args.deny),
        metrics_listen=(parse_metrics_listen(args.metrics_listen, listen, args.user)
                        if args.metrics_listen is not None else None),
        helper_python=parse_executable("--helper-python", sys.executable if args.helper_python is None
                                       else args.helper_python),
        helper_script=parse_executable("--helper-script", str(Path(alert.__file__).resolve())
                                       if args.helper_script is None else args.helper_script),
        manager=args.manager,
    )
    check_manager(spec)
    return spec


def write_out(files: dict[str, str], out: str) -> None:
    """Write the files into directory OUT (created if missing), each through a rename."""
    target = Path(out)
    hint = "give a directory whose path systemd and the kernel accept"
    try:
        if target.exists() and not target.is_dir():
            die(f"--out {out} exists and is not a directory", hint="give a directory")
        if not target.absolute().parent.is_dir():
            die(f"--out {out}: {target.absolute().parent} does not exist", hint="create it first")
        target.mkdir(exist_ok=True)
    except OSError as err:  # a name too long for the kernel, say: exists() raises on it
        die(f"--out {out}: {err.strerror}", hint=hint)
    write_files(files, target)


def spec_from_file(source: str) -> AppSpec:
    """A saved spec (`unitgen show NAME`), from a file or '-' for standard input."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as err:
        die(f"cannot read --spec {source}: {getattr(err, 'strerror', None) or err}",
            hint="give the file `unitgen show NAME` wrote, or - for standard input")
    return AppSpec.from_json(text, source)


def with_config_file(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """render's options from the app's unitgen.toml or pyproject.toml [tool.unitgen]
    (in --workdir, else here) wherever the command line does not give them."""
    if args.spec is not None:  # a saved spec stands for every option
        return args
    found = config.find(Path(parse_path("--workdir", args.workdir) if args.workdir is not None else os.getcwd()))
    if found is None:
        return args
    # The file's values as render's defaults: argparse lets the command line override them.
    merged = build_parser(render_defaults={**found.options, "config": found}).parse_args(argv)
    for dest, value in found.options.items():
        if isinstance(value, list) and getattr(args, dest):
            setattr(merged, dest, getattr(args, dest))  # a repeatable option replaces the file's list
    return merged


def cmd_render(args: argparse.Namespace) -> int:
    if (args.spec is None) == (args.app is None):
        die("render needs either --app (with its options) or --spec FILE",
            hint="`unitgen render --app myapp:app ...` (or app = \"myapp:app\" in unitgen.toml or pyproject.toml "
                 "[tool.unitgen]), or `unitgen show NAME | unitgen render --spec -`")
    if args.spec is not None:
        spec = spec_from_file(args.spec)
    else:
        with config.naming_the_file(args.config, args):
            spec = spec_from_args(args)
    if args.check:
        check_app(spec)
    files = render_files(spec)
    if args.out:
        write_out(files, args.out)
    else:
        sys.stdout.write(format_bundle(files))
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    workdir = parse_path("--workdir", args.workdir if args.workdir is not None else os.getcwd())
    if not os.path.isdir(workdir):
        die(f"--workdir {workdir} is not a directory", hint="give the directory the app is imported from")
    # Without --app, the app (and its interface) from the file render reads; its other
    # keys describe the servers (their addresses, users, limits), not this machine.
    found = config.find(Path(workdir)) if args.app is None else None
    if found is not None:
        args.app = found.options.get("app")
        if args.interface is None:
            args.interface = found.options.get("interface")
    if args.app is None:
        die("dev needs --app MODULE:ATTR", hint="for example `unitgen dev --app myapp:app` in the app's directory, "
                                                 "or app = \"myapp:app\" in its unitgen.toml or pyproject.toml "
                                                 "[tool.unitgen]")
    with config.naming_the_file(found, args):
        dev_config = DevConfig(app=parse_app(args.app), listen=parse_listens(tuple(args.listen or [DEFAULT_LISTEN])),
                               workdir=workdir, interface=parse_interface(args.interface or "auto"),
                               python=parse_executable("--python", args.python or sys.executable),
                               reload=args.reload)
    return serve(dev_config)


def cmd_show(args: argparse.Namespace) -> int:
    sys.stdout.write(App(args.name).spec.to_json())
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    name = install(args.source, start=not args.no_start, replace=args.replace)
    state = "installed" if args.no_start else "installed and started"
    systemctl = " ".join(["systemctl", *manager.current().flags])
    print(f"{name}: {state}; see `{systemctl} status {name}.target`", file=sys.stderr)
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    uninstall(args.name)
    print(f"{args.name}: stopped and removed", file=sys.stderr)
    return 0


def cmd_roll(args: argparse.Namespace) -> int:
    if args.pause < 0:
        die(f"--pause {args.pause} is negative", hint="give seconds to wait between instances, e.g. --pause 2")
    if args.hold < 0:
        die(f"--hold {args.hold} is negative", hint="give seconds to watch each instance, e.g. --hold 3 (0: none)")
    roll(args.name, pause=args.pause, all_at_once=args.all_at_once, hold=args.hold, restart=args.restart)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is not None:
        if not 0.1 <= args.watch <= 3600:
            die(f"--watch {args.watch:g} is out of range",
                hint="give seconds between looks, 0.1 to 3600, e.g. --watch 2")
        return watch(args.name, args.watch, as_json=args.json)
    status = collect(args.name)
    print(status.to_json() if args.json else table(status))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    scale(args.name, parse_cores(args.count, usable=usable_cpus(), what="the number of instances"))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    if args.lines < 0:
        die(f"-n {args.lines} is negative", hint="give how many lines to show, e.g. -n 100")
    return logs(args.name, follow=args.follow, lines=args.lines)


def build_parser(*, render_defaults: dict[str, object] | None = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="log every command run and show tracebacks")
    parser = _Parser(prog="unitgen", parents=[common],
                     description="Run a Python web app on every core, supervised by systemd.")
    parser.add_argument("--version", action="version", version=f"unitgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    render = sub.add_parser("render", parents=[common], help="render the systemd units of an app")
    render.add_argument("--app", help="MODULE:ATTR of the WSGI or ASGI app (required unless --spec)")
    render.add_argument("--spec", metavar="FILE",
                        help="render from a saved spec (`unitgen show NAME`; - for standard input) instead")
    render.add_argument("--name", help="unit name (default: the app's top-level module)")
    render.add_argument("--cores", default="auto", help="instances: auto (usable CPUs) or N (default auto)")
    render.add_argument("--listen", action="append", metavar="ADDR",
                        help=f"[HOST:]PORT, [IPV6]:PORT or /path.sock; repeatable (default {DEFAULT_LISTEN})")
    render.add_argument("--workdir", help="directory the app is imported from (default: the current one)")
    render.add_argument("--python", help="interpreter that runs the app, e.g. a virtualenv's (default: this one)")
    render.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment; repeatable")
    render.add_argument("--user", help="run the instances as this user")
    render.add_argument("--manager", default="system", choices=manager.MANAGERS,
                        help="the systemd the units are for: system (default), or user: a user's own "
                             "(`unitgen install --user`, no root)")
    render.add_argument("--interface", default="auto", choices=INTERFACES, help="app interface (default: detect)")
    render.add_argument("--watchdog", default=str(WATCHDOG), metavar="SECONDS",
                        help=f"kill and restart an instance whose event loop is stuck this long; 0: off "
                             f"(default {WATCHDOG})")
    render.add_argument("--drain-timeout", default=str(DRAIN_TIMEOUT), metavar="SECONDS",
                        help=f"time in-flight requests get on stop before connections are closed "
                             f"(default {DRAIN_TIMEOUT})")
    render.add_argument("--threads", default=str(THREADS), metavar="N",
                        help=f"a WSGI app's threads per instance (default {THREADS})")
    render.add_argument("--max-concurrency", default="0", metavar="N",
                        help="requests in flight at which an instance stops accepting connections, so that its "
                             "siblings take them (default 0: its threads for WSGI, no limit for ASGI)")
    render.add_argument("--request-timeout", default=str(REQUEST_TIMEOUT), metavar="SECONDS",
                        help="log a request running longer with its stack; a WSGI instance whose threads are all "
                             f"stuck past it restarts; 0: off (default {REQUEST_TIMEOUT})")
    render.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                        help="never ask keep-alive clients of an instance over its share to reconnect")
    render.add_argument("--max-requests", default="0", metavar="N",
                        help="an instance swaps its process for a fresh one, in place, after N requests "
                             "(default 0: never)")
    render.add_argument("--max-requests-jitter", default="0", metavar="J",
                        help="plus a random 0 to J requests per process, so instances do not recycle together")
    render.add_argument("--memory-max", default="0", metavar="SIZE",
                        help="MemoryMax= of each instance (e.g. 512M); its process swaps itself for a fresh one "
                             f"once its resident memory and a fresh process's pass {round(RECYCLE_MEMORY_AT * 100)}%% "
                             "of it (default 0: none)")
    render.add_argument("--on-failure", metavar="UNIT", help="unit to start when an instance fails (alerting)")
    render.add_argument("--writable", action="append", default=[], metavar="PATH",
                        help="a path the app may write besides its state directory; repeatable")
    render.add_argument("--hardening", default="strict", choices=HARDENING,
                        help="sandbox: strict (default) or relaxed (see the README)")
    render.add_argument("--allow", action="append", default=[], metavar="CIDR",
                        help="serve only clients from this address or network; repeatable")
    render.add_argument("--deny", action="append", default=[], metavar="CIDR",
                        help="refuse clients from this address or network; repeatable")
    render.add_argument("--metrics-listen", metavar="ADDR",
                        help="serve Prometheus metrics of every instance here ([HOST:]PORT, [IPV6]:PORT or "
                             "/path.sock; not one of --listen), from a socket unit of their own (default: off)")
    render.add_argument("--helper-python", metavar="PATH",
                        help="root-owned interpreter (no virtualenv) that runs the --on-failure alert helper as root "
                             "(default: the one running unitgen)")
    render.add_argument("--helper-script", metavar="PATH",
                        help="root-owned unitgen_worker/alert.py for that helper (default: this unitgen's)")
    render.add_argument("--out", help="write the unit files into this directory instead of a bundle on stdout")
    render.add_argument("--no-check", dest="check", action="store_false",
                        help="do not import the app with --python in --workdir to check it")
    render.set_defaults(func=cmd_render, **{"config": None, **(render_defaults or {})})

    devp = sub.add_parser("dev", parents=[common],
                          help="serve the app in the foreground with the same worker, reloading on code changes "
                               "(no root, no systemd)")
    devp.add_argument("--app", help="MODULE:ATTR of the WSGI or ASGI app (default: app in unitgen.toml or "
                                    "pyproject.toml [tool.unitgen])")
    devp.add_argument("--listen", action="append", metavar="ADDR",
                      help=f"[HOST:]PORT, [IPV6]:PORT or /path.sock; repeatable (default {DEFAULT_LISTEN})")
    devp.add_argument("--workdir", help="directory the app is imported from and watched (default: the current one)")
    devp.add_argument("--python", help="interpreter that runs the app, e.g. a virtualenv's (default: this one)")
    devp.add_argument("--interface", choices=INTERFACES, help="app interface (default: detect)")
    devp.add_argument("--no-reload", dest="reload", action="store_false",
                      help="do not start a new worker when a .py file under --workdir changes")
    devp.set_defaults(func=cmd_dev)

    inst = sub.add_parser("install", parents=[common], help="install, enable and start rendered units")
    inst.add_argument("source", nargs="?", default="-", help="bundle file, --out directory, or - (default)")
    inst.add_argument("--no-start", action="store_true", help="install and enable, but start nothing")
    inst.add_argument("--replace", action="store_true",
                      help="install over an app of the same name with another --app or --workdir")
    inst.set_defaults(func=cmd_install)

    uninst = sub.add_parser("uninstall", parents=[common], help="stop, disable and remove an app's units")
    uninst.add_argument("name")
    uninst.set_defaults(func=cmd_uninstall)

    rollp = sub.add_parser("roll", parents=[common],
                           help="swap every instance's process, one at a time, without failing a request")
    rollp.add_argument("name")
    rollp.add_argument("--pause", type=float, default=0.0, metavar="SECONDS", help="wait between instances")
    rollp.add_argument("--hold", type=float, default=HOLD, metavar="SECONDS",
                       help=f"watch each instance this long after it is ready; stop if it exits (default {HOLD:g})")
    rollp.add_argument("--restart", action="store_true",
                       help="restart each instance (drain, then start) instead of swapping its process in place")
    rollp.add_argument("--all-at-once", action="store_true",
                       help="restart every instance together; the socket queues connections meanwhile")
    rollp.set_defaults(func=cmd_roll)

    showp = sub.add_parser("show", parents=[common], help="print the spec install saved (JSON)")
    showp.add_argument("name")
    showp.set_defaults(func=cmd_show)

    statusp = sub.add_parser("status", parents=[common],
                             help="one row per instance: state, pid, uptime, memory, requests")
    statusp.add_argument("name")
    statusp.add_argument("--json", action="store_true", help="the same as a JSON document (schema in the README)")
    statusp.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                         help="show it again every SECONDS (default 1), with requests per second; Ctrl-C stops")
    statusp.set_defaults(func=cmd_status)

    scalep = sub.add_parser("scale", parents=[common], help="run exactly N instances from now on")
    scalep.add_argument("name")
    scalep.add_argument("count", metavar="N", help="number of instances, or auto (usable CPUs)")
    scalep.set_defaults(func=cmd_scale)

    logsp = sub.add_parser("logs", parents=[common], help="the journal of every instance, each line tagged")
    logsp.add_argument("name")
    logsp.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logsp.add_argument("-n", "--lines", type=int, default=50, help="how many lines to show first (default 50)")
    logsp.set_defaults(func=cmd_logs)
    for command in (inst, uninst, rollp, showp, statusp, scalep, logsp):
        command.add_argument("--user", dest="user_manager", action="store_true",
                             help="the app under your own user's systemd (`systemctl --user`), not the system's")
    return parser


def _not_dumpable() -> None:
    """Other processes of this user (the app's import check among them, when that runs
    as this user) may not ptrace unitgen or open its /proc/PID/fd: the bundle it writes
    to a pipe for `sudo unitgen install` cannot be swapped under it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0


def main(argv: list[str] | None = None) -> int:
    _not_dumpable()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    run.DEBUG = debug
    try:
        args = build_parser().parse_args(argv)
        if args.command == "render":
            args = with_config_file(args, argv)
        if getattr(args, "user_manager", False):
            manager.use(manager.user_manager())
        return args.func(args)
    except Die as err:
        if debug:
            traceback.print_exc()
        print(f"unitgen: error: {err.line()}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback
        if debug:
            traceback.print_exc()
        print(f"unitgen: internal error: {type(err).__name__}: {err}; run again with --debug "
              "for the traceback", file=sys.stderr)
        return 70
