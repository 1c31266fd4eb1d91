"""Can the app's user write what root would run? Checked before root runs anything of it.

Root runs two things an app could reach: the crash-loop alert helper (an `ExecStopPost=+`
line, only with --on-failure) and, when `unitgen render` itself runs as root, the
render-time import check. The first must come from files the app's user cannot write;
the second runs as the app's user instead (see check.py).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from unitgen.run import log

NOBODY = 65534

# What the helper's interpreter would put on sys.path with -I, where its site
# directories are (their .pth files run at every start), and where unitgen_worker is.
# -S: no site processing now, so no .pth file of theirs runs while we look.
_PROBE = (
    "import importlib.util, json, site, sys\n"
    "dirs = [p for p in sys.path if p] + site.getsitepackages()\n"
    "sys.path.extend(site.getsitepackages())\n"
    "spec = importlib.util.find_spec('unitgen_worker')\n"
    "print(json.dumps({'path': dirs, 'site': site.getsitepackages(),\n"
    "                  'worker': list(spec.submodule_search_locations) if spec else []}))\n"
)


@dataclass(frozen=True)
class Writer:
    """Whoever the instances run as: a uid and its groups (none for a dynamic user)."""

    uid: int | None
    gids: frozenset[int]

    @classmethod
    def of(cls, user: str | None) -> Writer:
        """--user USER, or a dynamic user (None): it owns nothing and is in no group."""
        if user is None:
            return cls(None, frozenset())
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            return cls(int(user) if user.isdigit() else -1, frozenset())
        groups = {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
        return cls(entry.pw_uid, frozenset({entry.pw_gid, *groups}))

    def can_write(self, st: os.stat_result) -> bool:
        if st.st_mode & stat.S_IWOTH:
            return True
        if self.uid is not None and st.st_uid == self.uid:
            return True
        return bool(st.st_mode & stat.S_IWGRP) and st.st_gid in self.gids


def writable_part(path: str, writer: Writer) -> str | None:
    """The first of path, its real path and their ancestors that writer can change."""
    seen: list[str] = []
    for candidate in (path, os.path.realpath(path)):
        current = Path(candidate)
        for part in [current, *current.parents]:
            if str(part) in seen:
                continue
            seen.append(str(part))
            try:
                st = os.lstat(part)
            except OSError:
                continue
            if writer.can_write(st) and not stat.S_ISLNK(st.st_mode):
                return str(part)
            if stat.S_ISLNK(st.st_mode) and writer.uid is not None and st.st_uid == writer.uid:
                return str(part)
    return None


def helper_problem(python: str, user: str | None) -> str | None:
    """Why root must not run `python -I -m unitgen_worker.alert`, or None when it may."""
    writer = Writer.of(user)
    who = f"user {user}" if user else "the instances' user"
    if (part := writable_part(python, writer)) is not None:
        return f"the alert helper's interpreter {python}: {part} is writable by {who}"
    cmd = [python, "-I", "-S", "-c", _PROBE]
    log(f"+ {' '.join(cmd[:4])} <probe>")
    # Even the probe starts the interpreter, which loads its standard library before
    # anything is checked: as root, it runs as nobody.
    drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True, cwd="/",
                             env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, **drop).stdout
        found = json.loads(out)
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        return f"the alert helper's interpreter {python} did not answer: {err}"
    if not found["worker"]:
        return f"the alert helper's interpreter {python} cannot import unitgen_worker"
    files = [*found["path"], *found["worker"]]
    for directory in [*found["site"], *found["worker"]]:
        try:
            files += [str(p) for p in Path(directory).iterdir() if p.suffix in (".pth", ".py")]
        except OSError:
            pass
    for path in files:
        if (part := writable_part(path, writer)) is not None:
            return f"the alert helper would load {path}, and {part} is writable by {who}"
    return None
