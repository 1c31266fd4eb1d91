"""Check at render time that the app really loads where and how systemd will run it."""

from __future__ import annotations

import os

from unitgen.errors import die
from unitgen.run import run
from unitgen.spec import AppSpec
from unitgen.trust import NOBODY
from unitgen_worker.contract import EXIT_CONFIG, WorkerConfig, worker_argv


def check_app(spec: AppSpec) -> str:
    """Import the app with spec.python in spec.workdir; returns its interface."""
    if not os.path.isdir(spec.workdir):
        die(f"--workdir {spec.workdir} is not a directory", hint="create it or give the app's directory")
    if not (os.path.isfile(spec.python) and os.access(spec.python, os.X_OK)):
        die(f"--python {spec.python} is not an executable file",
            hint="give the interpreter, e.g. /srv/app/.venv/bin/python")
    env = {**os.environ, **dict(spec.env)}
    cmd = worker_argv(spec.python, WorkerConfig(app=spec.app, interface=spec.interface, check=True))
    # As root, importing the app would run code its user can write (the module, a .pth
    # in its virtualenv) with root's rights: run it as the app's user, or as nobody for
    # a dynamic user, which is what the instances see anyway.
    as_user = (spec.user if spec.user and not spec.user.isdigit() else int(spec.user or NOBODY)) \
        if os.geteuid() == 0 else None
    result = run(cmd, cwd=spec.workdir, env=env, check=False, timeout=120, user=as_user)
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        return result.stdout.strip()
    if result.returncode != EXIT_CONFIG and any("No module named unitgen_worker" in line for line in lines):
        die(f"the unitgen worker runtime is not importable by {spec.python}",
            hint=f"install it there: {spec.python} -m pip install unitgen")
    detail = lines[-1] if lines else f"exit code {result.returncode}"
    die(f"--app {spec.app} does not load in {spec.workdir}: {detail.removeprefix('unitgen-worker: ')}",
        hint="fix the module, --workdir, --python or --env, or pass --no-check to render for another host")
