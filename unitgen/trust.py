"""May root run this? Checked on the files themselves, before root runs anything of them.

Root runs one thing an app could reach: the crash-loop alert helper (an
`ExecStopPost=+` line, only with --on-failure):

    PYTHON -I -S SCRIPT   (no site-packages, no .pth files, no PYTHON* variables)

So root loads exactly: the interpreter (every symlink on the way to it), its standard
library, and SCRIPT's package directory (the script loads its package from there and
puts nothing on sys.path). Each of those files and every directory above them must be owned by root,
writable by nobody else and carry no ACL. This does not depend on who the instances run
as, and nothing is executed to find it out: a probe run by the interpreter would load
the very files it is meant to check.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_MAX_HOPS = 40
_INTERPRETER = re.compile(r"python(\d+\.\d+)")


def _untrusted(path: str, *, sticky_ok: bool = False) -> str | None:
    """Why root must not trust path itself (not following it), or None.

    sticky_ok: a directory on the way (not the last one) may be a root-owned sticky
    directory such as /tmp: others may add entries there but not replace root's.
    """
    try:
        st = os.lstat(path)
    except OSError as err:
        return f"{path} cannot be read ({err.strerror})"
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    sticky = sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if not stat.S_ISLNK(st.st_mode) and not sticky and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by its group or by others"
    try:
        if not stat.S_ISLNK(st.st_mode) and set(_ACLS) & set(os.listxattr(path, follow_symlinks=False)):
            return f"{path} has an ACL"
    except OSError:
        pass  # no xattr support on this file system: no ACL either
    return None


def _resolve(path: str, hops: int = 0) -> tuple[str | None, str | None]:
    """(the real path, None), or (None, why) when any step on the way is untrusted.

    Every directory and every symlink met while resolving is checked, hop by hop: a
    root-owned link to a link in a writable directory is as bad as the second link.
    """
    if hops > _MAX_HOPS:
        return None, f"{path}: too many symlinks"
    current = "/"
    parts = Path(path).parts[1:]
    for position, part in enumerate(parts, 1):
        candidate = os.path.join(current, part)
        if (problem := _untrusted(candidate, sticky_ok=position < len(parts))) is not None:
            return None, problem
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            resolved, problem = _resolve(os.path.normpath(os.path.join(current, target)), hops + 1)
            if problem is not None:
                return None, problem
            current = resolved
        else:
            current = candidate
    if (problem := _untrusted("/")) is not None:
        return None, problem
    return current, None


def _tree_problem(directory: str) -> str | None:
    """The first untrusted file or directory in the tree below directory (links not followed)."""
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            if (problem := _untrusted(os.path.join(root, name))) is not None:
                return problem
    return None


def stdlib_of(python: str) -> str | None:
    """The standard library of a plain (not virtualenv) CPython at its real path."""
    match = _INTERPRETER.fullmatch(os.path.basename(python))
    if not match:
        return None
    library = os.path.join(os.path.dirname(os.path.dirname(python)), "lib", f"python{match.group(1)}")
    return library if os.path.isfile(os.path.join(library, "os.py")) else None


def helper_problem(python: str, script: str) -> str | None:
    """Why root must not run `python -I -S script`, or None when it may."""
    real, problem = _resolve(python)
    if problem is not None:
        return f"the alert helper's interpreter: {problem}"
    for candidate in {python, real}:
        for directory in (os.path.dirname(candidate), os.path.dirname(os.path.dirname(candidate))):
            if os.path.exists(os.path.join(directory, "pyvenv.cfg")):
                return f"the alert helper's interpreter {python} is a virtualenv's ({directory}/pyvenv.cfg)"
    library = stdlib_of(real)
    if library is None:
        return f"cannot tell where the standard library of {real} is"
    _, problem = _resolve(library)
    problem = problem or _tree_problem(library)
    if problem is not None:
        return f"the alert helper's standard library: {problem}"
    real_script, problem = _resolve(script)
    if problem is not None:
        return f"the alert helper {script}: {problem}"
    package = os.path.dirname(real_script)
    if problem := _tree_problem(package):
        return f"the alert helper's package: {problem}"
    return None


def writable_by_others(directory: str) -> str | None:
    """For root writing into directory: why someone else could swap things in it, or None."""
    _, problem = _resolve(os.path.abspath(directory))
    return problem
