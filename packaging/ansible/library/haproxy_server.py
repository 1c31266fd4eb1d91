#!/usr/bin/python3
"""Ansible module: a server's state in HAProxy, through its admin socket (runtime API).

Runs on the balancer (delegate_to). Needs nothing but Python: it speaks the runtime API
over the unix socket HAProxy opens with `stats socket PATH level admin`.
"""

from __future__ import annotations

import socket
import time

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: haproxy_server
short_description: Drain, ready or read a server in HAProxy over its admin socket
options:
  socket: {description: HAProxy's admin socket, type: path, default: /run/haproxy/admin.sock}
  backend: {description: the backend, type: str, required: true}
  server: {description: the server (every server of the backend when omitted with state=query), type: str}
  state:
    description: drain (no new requests), ready, maint, or query (change nothing)
    type: str
    choices: [drain, ready, maint, query]
    default: query
  wait_idle: {description: with drain or maint, wait until the server has no session left, type: bool, default: false}
  wait_status:
    description: wait until the server's check status (show stat) starts with this, e.g. UP
    type: str
  timeout: {description: seconds to wait for wait_idle or wait_status, type: float, default: 120}
"""

RETURN = r"""
servers:
  description: >-
    show stat of each server asked for: name, status, scur (sessions now), qcur, hrsp_2xx ... hrsp_5xx,
    responses (their sum), errors (eresp + econ + hrsp_5xx), wretr, wredis, admin (drain or maint or ready)
  type: list
"""

# srv_admin_state bits in `show servers state` (HAProxy's server.h): forced and
# inherited maintenance, forced and inherited drain.
ADMIN_MAINT = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
ADMIN_DRAIN = 0x08 | 0x10
NUMBERS = ("scur", "qcur", "stot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other",
           "eresp", "econ", "wretr", "wredis", "chkfail")


def ask(path: str, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def admin_states(path: str, backend: str) -> dict[str, str]:
    """server -> drain | maint | ready, from `show servers state` (format 1)."""
    lines = ask(path, f"show servers state {backend}").splitlines()
    header = next((line for line in lines if line.startswith("# be_id")), None)
    if header is None:
        raise ValueError(f"no backend {backend!r}: {' '.join(lines)[:200]}")
    columns = header[2:].split()
    states = {}
    for line in lines:
        if not line or line.startswith("#") or line.strip() == "1":
            continue
        row = dict(zip(columns, line.split()))  # noqa: B905
        admin = int(row.get("srv_admin_state", "0"))
        states[row["srv_name"]] = "maint" if admin & ADMIN_MAINT else "drain" if admin & ADMIN_DRAIN else "ready"
    return states


def stats(path: str, backend: str) -> dict[str, dict]:
    lines = [line for line in ask(path, "show stat").splitlines() if line]
    columns = lines[0].lstrip("# ").split(",")
    admin = admin_states(path, backend)
    found = {}
    for line in lines[1:]:
        row = dict(zip(columns, line.split(",")))  # noqa: B905 (the balancer may run Python < 3.10)
        if row.get("pxname") != backend or row.get("svname") in ("FRONTEND", "BACKEND"):
            continue
        entry = {"name": row["svname"], "status": row.get("status", ""), "admin": admin.get(row["svname"], "?")}
        for key in NUMBERS:
            entry[key] = int(row.get(key) or 0)
        entry["responses"] = sum(entry[k] for k in ("hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx",
                                                     "hrsp_other"))
        entry["errors"] = entry["eresp"] + entry["econ"] + entry["hrsp_5xx"]
        found[entry["name"]] = entry
    return found


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "socket": {"type": "path", "default": "/run/haproxy/admin.sock"},
            "backend": {"type": "str", "required": True},
            "server": {"type": "str"},
            "state": {"type": "str", "default": "query", "choices": ["drain", "ready", "maint", "query"]},
            "wait_idle": {"type": "bool", "default": False},
            "wait_status": {"type": "str"},
            "timeout": {"type": "float", "default": 120.0},
        },
        required_if=[("state", "drain", ["server"]), ("state", "ready", ["server"]), ("state", "maint", ["server"])],
        supports_check_mode=True,
    )
    p = module.params
    path, backend, server, state = p["socket"], p["backend"], p["server"], p["state"]
    try:
        current = stats(path, backend)
    except (OSError, ValueError) as err:
        module.fail_json(msg=f"cannot read HAProxy's state from {path}: {err}")
    if server is not None and server not in current:
        module.fail_json(msg=f"backend {backend} has no server {server!r} (it has {', '.join(sorted(current))})")
    changed = state != "query" and current[server]["admin"] != state
    if changed and not module.check_mode:
        answer = ask(path, f"set server {backend}/{server} state {state}").strip()
        if answer:  # the runtime API answers nothing on success
            module.fail_json(msg=f"HAProxy refused `set server {backend}/{server} state {state}`: {answer}")
    deadline = time.monotonic() + p["timeout"]
    while not module.check_mode and server is not None:
        current = stats(path, backend)
        mine = current[server]
        idle = not p["wait_idle"] or (mine["scur"] == 0 and mine["qcur"] == 0)
        up = not p["wait_status"] or mine["status"].startswith(p["wait_status"])
        if idle and up:
            break
        if time.monotonic() > deadline:
            module.fail_json(msg=f"{backend}/{server} still has {mine['scur']} sessions and status {mine['status']} "
                                 f"after {p['timeout']:g} s", servers=list(current.values()), changed=changed)
        time.sleep(0.2)
    servers = [current[server]] if server is not None else list(current.values())
    module.exit_json(changed=changed, servers=servers)


if __name__ == "__main__":
    main()
