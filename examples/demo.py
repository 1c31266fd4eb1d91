"""The demo: real systemd in a Debian container, the example app on every core, under
load from wrk while its instances are restarted one by one. Run it as examples/demo."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from testbed import SUITES, Container, free_port  # noqa: E402


def say(message: str) -> None:
    print(f"\n== {message}", flush=True)


def wrk_summary(output: str) -> tuple[int, int]:
    """(requests, failed) from wrk's report: socket errors and non-2xx/3xx responses."""
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    failed = (sum(int(n) for n in errors.groups()) if errors else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return requests, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--debian", choices=sorted(SUITES), default="bookworm")
    parser.add_argument("--seconds", type=int, default=15, help="length of the load")
    args = parser.parse_args()

    say("packaging/build-deb")
    deb = ROOT / subprocess.run([str(ROOT / "packaging/build-deb")], check=True, stdout=subprocess.PIPE,
                                text=True).stdout.strip().splitlines()[-1]
    print(deb)
    say(f"booting Debian {args.debian} with systemd {SUITES[args.debian]} as PID 1 (systemd-nspawn)")
    box = Container(args.debian, {str(deb.parent): "/debs", str(ROOT / "examples"): "/srv/examples"})
    box.boot()
    try:
        say(f"apt-get install ./{deb.name}  (its dependencies come from Debian)")
        install = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", f"/debs/{deb.name}"]
        if box.run(*install, check=False, timeout=600).returncode != 0:
            box.run("apt-get", "update", "-q", timeout=600)
            box.run(*install, timeout=600)
        print(box.run("dpkg-query", "-W", "unitgen", "python3-uvicorn", "python3-systemd").stdout)
        return demo(box, args.seconds)
    finally:
        box.shutdown()


def demo(box: Container, seconds: int) -> int:
    port = free_port()
    render = f"unitgen render --app hello:app --cores auto --listen 127.0.0.1:{port} --workdir /srv/examples"
    say(f"{render} | unitgen install -")
    bundle = box.sh(render).stdout
    print(bundle)
    box.run("unitgen", "install", "-", input=bundle)
    print(box.sh("systemctl list-units --no-pager 'hello*'").stdout)
    instances = box.run("systemctl", "show", "-p", "Wants", "--value", "hello.target").stdout.split()

    say(f"wrk: 64 keep-alive connections for {seconds} s on http://127.0.0.1:{port}/; "
        "meanwhile: unitgen roll hello")
    wrk = subprocess.Popen(["wrk", "-t2", "-c64", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(seconds / 4)
    # One instance at a time: each drains, and is back once its new process is READY.
    print(box.run("unitgen", "roll", "hello").stderr, flush=True)
    time.sleep(1.5)
    print(box.run("unitgen", "status", "hello").stdout, flush=True)
    output, _ = wrk.communicate()
    print(output)
    requests, failed = wrk_summary(output)
    say(f"{requests} requests, {failed} failed, across a rolling restart of {len(instances)} instances")

    say("unitgen uninstall hello")
    box.run("unitgen", "uninstall", "hello")
    print("units removed, port closed")
    if failed or requests == 0:
        say(f"FAILED: {failed} of {requests} requests failed; the demo's whole point is 0")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
