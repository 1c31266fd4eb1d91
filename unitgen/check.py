"""Check at render time that the app really loads where and how systemd will run it.

The check imports the app, i.e. runs code its user can write. It must never run that
code with more rights than the instances will have, nor where it could reach the
operator's terminal, environment or the bundle on its way to `sudo unitgen install`:
- as root with systemd running: a transient unit (systemd-run) as the instances' user,
  or a fresh dynamic user, with a clean environment and no terminal; systemd kills
  whatever the import leaves behind when the unit ends;
- as root without systemd (a chroot, an image build): as --user, in a new session with
  no terminal and a clean environment; with no --user there is nobody safe to be, so
  the check is skipped with a note;
- not as root: only when this user is the instances' --user; otherwise skipped with a
  note (the app's code would run as the operator);
- for a user manager (--manager user): as this user, who installs and runs it; as root,
  nobody is that user, so skipped with a note.
"""

from __future__ import annotations

import os
import pwd
import sys

from unitgen.errors import die
from unitgen.run import run
from unitgen.spec import AppSpec
from unitgen_worker.contract import EXIT_CONFIG, WorkerConfig, worker_argv

_CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _is_me(user: str) -> bool:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return False
    return entry.pw_uid == os.geteuid()


def _systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system")


def _command(spec: AppSpec) -> list[str] | None:
    """The check's command line as it must run here, or None when it must not run."""
    argv = worker_argv(spec.python, WorkerConfig(app=spec.app, interface=spec.interface, check=True))
    if spec.manager == "user":
        return argv if os.geteuid() != 0 else None
    if os.geteuid() == 0 and _systemd_running():
        who = [f"--uid={spec.user}"] if spec.user else ["-p", "DynamicUser=yes"]
        env = [f"--setenv={key}={value}" for key, value in spec.env]
        return ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--service-type=exec",
                f"--working-directory={spec.workdir}", *who, "-p", "NoNewPrivileges=yes", *env, *argv]
    if spec.user and (os.geteuid() == 0 or _is_me(spec.user)):
        return argv
    return None


def check_app(spec: AppSpec) -> str | None:
    """Import the app as the instances will; its interface, or None when not checked."""
    if not os.path.isdir(spec.workdir):
        die(f"--workdir {spec.workdir} is not a directory", hint="create it or give the app's directory")
    if not (os.path.isfile(spec.python) and os.access(spec.python, os.X_OK)):
        die(f"--python {spec.python} is not an executable file",
            hint="give the interpreter, e.g. /srv/app/.venv/bin/python")
    cmd = _command(spec)
    if cmd is None:
        who = ("the user who installs it (--manager user)" if spec.manager == "user" else
               f"user {spec.user}" if spec.user else "a dynamic user")
        print(f"unitgen: note: the app was not imported to check it: it runs as {who}, and importing it here "
              "would run its code as this user; render as root (or as that user) to check, or pass --no-check",
              file=sys.stderr)
        return None
    env = {"PATH": _CLEAN_PATH, "LANG": "C.UTF-8", **dict(spec.env)}
    as_user = spec.user if cmd[0] != "systemd-run" and os.geteuid() == 0 else None
    result = run(cmd, cwd=spec.workdir, env=env, check=False, timeout=120, user=as_user, isolated=True)
    lines = result.stderr.strip().splitlines()
    if result.returncode == 0:
        return result.stdout.strip()
    if result.returncode != EXIT_CONFIG and any("No module named unitgen_worker" in line for line in lines):
        die(f"the unitgen worker runtime is not importable by {spec.python}",
            hint=f"install it there: {spec.python} -m pip install unitgen")
    detail = lines[-1] if lines else f"exit code {result.returncode}"
    die(f"--app {spec.app} does not load in {spec.workdir}: {detail.removeprefix('unitgen-worker: ')}",
        hint="fix the module, --workdir, --python or --env, or pass --no-check to render for another host")
