"""The one way unitgen runs a program: logged with --debug, failures made clear."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence

from unitgen import manager
from unitgen.errors import die

DEBUG = False


def log(message: str) -> None:
    if DEBUG:
        print(message, file=sys.stderr, flush=True)


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float | None = None,
    user: int | str | None = None,
    isolated: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run cmd, capturing its output; with check, a failure stops unitgen with its last line.

    user: run it as that user, with that user's groups (root only).
    isolated: for code unitgen does not trust (the app's import): a session of its own,
    so no controlling terminal (no TIOCSTI into the operator's shell), standard input
    from /dev/null, and whatever it leaves running in its process group killed after.
    """
    log(f"+ {shlex.join(cmd)}" + (f"  (as {user})" if user is not None else ""))
    as_user = {} if user is None else _credentials(user)
    isolation = {"start_new_session": True, "stdin": subprocess.DEVNULL} if isolated else {}
    if input is not None:
        isolation["stdin"] = subprocess.PIPE
    try:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **as_user, **isolation)
    except FileNotFoundError:
        die(f"{cmd[0]} is not installed or not on PATH", hint="install it, or run unitgen on a host with systemd")
    except PermissionError:
        who = f"user {user}" if user is not None else "this user"
        die(f"{cmd[0]} cannot be run by {who} (permission denied)",
            hint="the instances run as that user: make the interpreter and --workdir readable by it")
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        die(f'"{shlex.join(cmd)}" did not finish within {timeout} s')
    finally:
        if isolated:
            # The leader is gone; its group id is its pid. What it left behind goes too.
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
    result = subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)
    if result.stdout:
        log(result.stdout.rstrip())
    if result.stderr:
        log(result.stderr.rstrip())
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()
        detail = f": {last[-1]}" if last else ""
        die(f'"{shlex.join(cmd)}" returned non-zero exit code {result.returncode}{detail}')
    return result


def _credentials(user: int | str) -> dict:
    """subprocess arguments for user's uid, primary group and other groups (as login gives)."""
    try:
        entry = pwd.getpwuid(int(user)) if str(user).isdigit() else pwd.getpwnam(str(user))
    except KeyError:
        die(f"user {user} does not exist", hint="create it, or give --user an existing user")
    return {"user": entry.pw_uid, "group": entry.pw_gid,
            "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid)}


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["systemctl", *manager.current().flags, *args], check=check)


@contextlib.contextmanager
def stream(cmd: Sequence[str]) -> Iterator[Iterator[str]]:
    """Run cmd and hand over its output line by line as it comes (journalctl -f)."""
    log(f"+ {shlex.join(cmd)}")
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        die(f"{cmd[0]} is not installed or not on PATH", hint="run unitgen on a host with systemd")
    try:
        yield iter(proc.stdout.readline, "")
    finally:
        proc.terminate()
        _, err = proc.communicate()
    if proc.returncode not in (0, -15):
        last = err.strip().splitlines()
        die(f'"{shlex.join(cmd)}" returned non-zero exit code {proc.returncode}' + (f": {last[-1]}" if last else ""))
