"""Issue 14 end to end: examples/redis keeps its sessions, rate limit and counter in
Debian's redis-server, and every instance sees the same state, across `unitgen roll`,
under real systemd 252 and 257."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import wait_until
from testbed import free_port

pytestmark = pytest.mark.e2e

WORKDIR = "/srv/examples/redis"  # conftest binds the repository's examples/ at /srv/examples
APP = "shared_state:app"
KEYS = "shared-state:"

# wrk asks for the counted route (GET /) until the test creates a flag file (2 s after
# the roll; each wrk thread looks once a second), then only for /healthz, which counts
# nothing, until the test stops it (SIGINT: wrk then prints its report as at the end of
# -d). Stopping drops the requests in flight; as those are /healthz requests, every
# GET / that the app answered (and counted in Redis) was received by wrk, and counted
# here from its x-counted header. So Redis's counter must equal this count exactly: a
# lost or doubled INCR shows. (Without the /healthz phase Redis counted 64 more than wrk
# received: one request cut per connection.) The flag, not a fixed time, ends the counted
# phase, so a roll slowed down by a busy machine still happens under counted load.
COUNTING = """
local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counted = 0
   flag = args[1]
   checked, idling = 0, false
   counting = wrk.format("GET", "/")
   idle = wrk.format("GET", "/healthz")
end

function request()
   local now = os.time()
   if not idling and now ~= checked then
      checked = now
      local f = io.open(flag)
      if f then
         f:close()
         idling = true
      end
   end
   if idling then
      return idle
   end
   return counting
end

function response(status, headers, body)
   if headers["x-counted"] then
      counted = counted + 1
   end
end

function done(summary, latency, requests)
   local total = 0
   for _, thread in ipairs(threads) do
      total = total + thread:get("counted")
   end
   io.write(string.format("counted responses: %d\\n", total))
end
"""
IDLE_FOR = 4  # seconds of /healthz before wrk is stopped: every thread has switched by then
LOAD_LIMIT = 120  # wrk's -d: the test stops it long before


class Redis:
    """Debian's redis-server.service in the container, on a port of its own: the
    containers share the host's network."""

    def __init__(self, box, port: int) -> None:
        self.box, self.port = box, port

    def cli(self, *args: str) -> str:
        return self.box.run("redis-cli", "-p", str(self.port), "--no-raw", *args).stdout.strip()

    def value(self, key: str) -> str:
        return self.box.run("redis-cli", "-p", str(self.port), "--raw", "GET", key).stdout.strip()

    def hash(self, key: str) -> dict[str, str]:
        lines = self.box.run("redis-cli", "-p", str(self.port), "--raw", "HGETALL", key).stdout.split()
        return dict(zip(lines[::2], lines[1::2], strict=True))

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="module")
def redis_server(box):
    port = free_port()
    box.run("sed", "-i", f"s/^port 6379$/port {port}/", "/etc/redis/redis.conf")
    box.run("systemctl", "start", "redis-server.service")
    server = Redis(box, port)
    assert server.cli("PING") == "PONG"
    yield server
    box.run("systemctl", "stop", "redis-server.service")
    box.run("sed", "-i", f"s/^port {port}$/port 6379/", "/etc/redis/redis.conf")


@pytest.fixture
def redis(redis_server):
    redis_server.cli("FLUSHALL")
    return redis_server


def deploy_example(deploy, redis: Redis, *env: str):
    args = ["--cores", "2", "--env", f"REDIS_URL={redis.url()}"]
    for assignment in env:
        args += ["--env", assignment]
    return deploy(APP, *args, workdir=WORKDIR)


def ask(app, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """(status, headers, body) of one request on a connection of its own, so that
    successive requests land on whichever instance accepts them."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def run_counting_load(app, tmp_path: Path, flag: Path) -> subprocess.Popen[str]:
    script = tmp_path / "counting.lua"
    script.write_text(COUNTING)
    cmd = ["wrk", "-t2", "-c64", f"-d{LOAD_LIMIT}s", "--timeout", "10s", "-s", str(script), f"{app.url}/",
           "--", str(flag)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wrk_numbers(output: str) -> dict[str, int]:
    """wrk's responses, failures (socket errors, non-2xx) and the script's counted responses."""
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    counted = re.search(r"counted responses: (\d+)", output)
    assert counted, output
    return {
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),
        "failed": (sum(int(n) for n in errors.groups()) if errors else 0) + (int(non_2xx.group(1)) if non_2xx else 0),
        "counted": int(counted.group(1)),
    }


def test_counter_in_redis_equals_the_responses_received_across_a_roll(box, deploy, redis, tmp_path):
    app = deploy_example(deploy, redis)
    before = app.instance_pids()
    flag = tmp_path / "stop-counting"
    began = time.monotonic()
    load = run_counting_load(app, tmp_path, flag)
    time.sleep(1.5)
    roll = box.run("unitgen", "roll", app.name, timeout=120)
    rolled_at = time.monotonic() - began
    time.sleep(2)  # the new processes serve counted requests too
    flag.touch()
    time.sleep(IDLE_FOR)
    load.send_signal(signal.SIGINT)
    output, _ = load.communicate(timeout=30)
    took = time.monotonic() - began
    after = app.instance_pids()
    numbers = wrk_numbers(output)
    hits = int(redis.value(KEYS + "hits") or 0)
    by_pid = {int(pid): int(n) for pid, n in redis.hash(KEYS + "hits-by-pid").items()}
    print(f"{box.suite}: roll of 2 done at {rolled_at:.1f} s, load over at {took:.1f} s: {numbers['requests']} "
          f"responses ({numbers['counted']} counted, the rest /healthz), {numbers['failed']} failed; "
          f"Redis hits {hits}; by pid {by_pid}; pids {sorted(before)} -> {sorted(after)}")
    assert roll.stderr.count(" swapped in ") == 2, roll.stderr
    assert took < LOAD_LIMIT - 5, "wrk ran its full time: SIGINT did not stop it"
    assert len(before) == 2 and len(after) == 2 and not before & after, (before, after)
    assert numbers["failed"] == 0, output
    assert numbers["counted"] > 1000, output
    assert numbers["requests"] > numbers["counted"], "no /healthz phase: the count could include cut requests"
    assert hits == numbers["counted"], output
    # Every process counted into the same key: the old ones before the roll, the new after.
    assert sum(by_pid.values()) == hits
    assert before | after <= set(by_pid), (before, after, by_pid)


def test_the_rate_limit_is_one_limit_across_instances(box, deploy, redis):
    limit = 20
    app = deploy_example(deploy, redis, f"RATE_LIMIT={limit}", "RATE_WINDOW=600")
    key = {"X-Api-Key": f"client-{uuid.uuid4()}"}
    answers = [ask(app, "GET", "/limited", headers=key) for _ in range(limit + 10)]
    statuses = [status for status, _, _ in answers]
    served_by = [headers["x-instance"] for status, headers, _ in answers if status == 200]
    print(f"{box.suite}: {statuses.count(200)} x 200 then {statuses.count(429)} x 429; "
          f"200s by instance {sorted(set(served_by))}: {[served_by.count(i) for i in sorted(set(served_by))]}")
    # A limit kept in each process would let each instance's share through, more than
    # `limit` in all, as soon as two instances answered.
    assert set(served_by) == {"0", "1"}, served_by
    assert statuses == [200] * limit + [429] * 10, statuses
    refused = answers[-1][1]
    assert refused["x-ratelimit-remaining"] == "0" and 0 < int(refused["retry-after"]) <= 600, refused
    # Per client: another key has its whole allowance.
    assert ask(app, "GET", "/limited", headers={"X-Api-Key": f"client-{uuid.uuid4()}"})[0] == 200


def test_a_session_set_through_one_instance_is_read_through_the_other_and_survives_a_roll(box, deploy, redis):
    app = deploy_example(deploy, redis, "SESSION_TTL=900")
    data = {"user": "ann", "cart": [3, 1, 4]}
    status, headers, body = ask(app, "POST", "/session", json.dumps(data).encode(),
                                {"Content-Type": "application/json"})
    assert status == 201, body
    cookie = headers["set-cookie"].split(";")[0]
    sid = cookie.partition("=")[2]
    assert "HttpOnly" in headers["set-cookie"]
    writer = headers["x-instance"]

    def read_elsewhere():
        answer = ask(app, "GET", "/session", headers={"Cookie": cookie})
        return answer if answer[1]["x-instance"] != writer else None

    other = wait_until(read_elsewhere, timeout=10, step=0)
    assert other is not None, f"instance {writer} answered every request"
    print(f"{box.suite}: session written by instance {writer}, read by instance {other[1]['x-instance']}")
    assert other[0] == 200 and json.loads(other[2]) == data
    ttl = int(redis.cli("TTL", f"{KEYS}session:{sid}").split()[-1])
    assert 0 < ttl <= 900, ttl

    # New processes, same sessions: nothing of it lived in the old ones.
    box.run("unitgen", "roll", app.name, timeout=120)
    status, _, body = ask(app, "GET", "/session", headers={"Cookie": cookie})
    assert status == 200 and json.loads(body) == data

    # Logged out through one instance: gone for both.
    assert ask(app, "DELETE", "/session", headers={"Cookie": cookie})[0] == 204
    statuses = {ask(app, "GET", "/session", headers={"Cookie": cookie})[0] for _ in range(6)}
    assert statuses == {404}
    assert redis.cli("EXISTS", f"{KEYS}session:{sid}").split()[-1] == "0"


def test_an_instance_is_not_ready_until_redis_answers(box, deploy):
    closed = free_port()  # nothing listens there
    secret = "not-in-the-journal"
    app = deploy(APP, "--cores", "1", "--env", f"REDIS_URL=redis://:{secret}@127.0.0.1:{closed}/0",
                 workdir=WORKDIR, start=False)
    unit = f"{app.name}@0.service"
    box.run("systemctl", "start", "--no-block", unit)
    # The lifespan startup fails after its retries (10 s): exit 3, restarted with backoff.
    assert wait_until(lambda: app.show(unit, "NRestarts") not in ("", "0"), timeout=60, step=0.5), \
        box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout
    journal = box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout
    print(f"{box.suite}: {[line for line in journal.splitlines() if 'redis at' in line][:1]}")
    assert f"redis at redis://127.0.0.1:{closed}/0" in journal, journal
    assert secret not in journal
    # No READY=1 was sent: the unit never got to "active".
    assert app.show(unit, "ActiveEnterTimestampMonotonic") == "0"
