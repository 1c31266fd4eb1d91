"""unitgen against gunicorn, uvicorn --workers, a bare uvicorn, Node's cluster module and
PM2 cluster mode, side by side in one run (issue 12).

Everything serves inside ONE Debian container booted with real systemd (the e2e test
bed): unitgen from the .deb built from this tree, the Python peers on the same
interpreter with Debian's uvicorn, httptools and uvloop, Node from Debian, PM2 from npm.
wrk and the pid client load them from the host. Steady rounds are interleaved across
systems (A B C, then C B A, ...) so that drifts of the machine hit all alike; medians and
min-max over the rounds. Then, on the hello-world app with N workers: each worker's
share of requests before and after a reload, failed requests and p99 through two
reloads, recovery from kill -9 of a worker, refused connections through a full restart,
memory. Writes OUT/results.md, PNG plots beside it, and prints the summary table.

    sudo .venv/bin/python bench/compare.py [--suite bookworm|trixie] [--rounds N]
    sudo .venv/bin/python bench/compare.py --smoke      # every code path in about 3 minutes; for CI

The full run is sized to finish within 15 minutes on 2 cores (each phase's time is in
results.md); --smoke writes to bench/smoke/ and marks its results.md as a smoke run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bed import ROOT, Bed, BenchError, build_deb, log
from measure import (
    LOADS,
    ReloadRun,
    RestartRun,
    ShareRun,
    kill9_recovery,
    memory,
    reloads_under_load,
    restart_under_load,
    shares_around_reload,
    steady,
    wait_ready,
)
from report import Results, write_report
from systems import SYSTEMS, WORKLOADS, Server, Workload

from testbed import SUITES, TestbedError, free_port

# N: one worker per core, as unitgen's --cores auto; never fewer than 2, or nothing scales.
N = max(2, os.cpu_count() or 2)


@dataclass(frozen=True)
class Plan:
    rounds: int  # of the steady measurements
    seconds: float  # each steady wrk run
    margin: float  # seconds of load before, between and after reloads and restarts
    window: float  # seconds counted for a share
    settle: float  # from a reload's end to the share window after it
    reloads: int  # under one wrk run
    timeout: float  # for a reload or restart to be done
    kill_timeout: float  # for a worker killed with -9 to be replaced and answering
    roll_hold: float | None  # unitgen roll --hold; None: its default (3 s)
    share_loads: tuple[str, ...]  # the loads under which shares are counted
    reload_loads: tuple[str, ...]  # the loads under which reloads are measured
    warm_up: float  # seconds of unrecorded load on each server first (Node's JIT needs it)


FULL = Plan(rounds=5, seconds=2, margin=2, window=3, settle=5, reloads=2, timeout=90, kill_timeout=15,
            roll_hold=None, share_loads=tuple(LOADS), reload_loads=tuple(LOADS), warm_up=2)
# Every code path once, with tiny durations: the shares under keep-alive load only, the
# reloads under connection-close load only, and the roll holds each instance 0 s, not 3.
SMOKE = Plan(rounds=1, seconds=1, margin=0.5, window=1, settle=1, reloads=2, timeout=60, kill_timeout=5,
             roll_hold=0, share_loads=("keep-alive",), reload_loads=("close",), warm_up=0)


def say(message: str) -> None:
    print(message, flush=True)


class Run:
    """One benchmark run: the bed, what is serving, and the results so far."""

    def __init__(self, bed: Bed, plan: Plan, results: Results, systems: list[type[Server]]) -> None:
        self.bed, self.plan, self.results, self.systems = bed, plan, results, systems

    def deploy(self, workload: Workload) -> list[Server]:
        servers = []
        for cls in self.systems:
            if not cls.serves(workload):
                continue
            # uvicorn with one worker is the bare uvicorn: the reference of one unitgen instance.
            for workers in (N, 1):
                server = cls(self.bed, workload, workers, free_port(), roll_hold=self.plan.roll_hold)
                self.results.servers.append(server)
                try:
                    server.start()
                    servers.append(server)
                except BenchError as err:
                    self.results.not_measured.append(f"{server.label}, {workload.title}: did not start: {err}")
        ready = []
        for server in servers:
            try:
                wait_ready(server, self.plan.timeout)
                if self.plan.warm_up:
                    steady(server, "keep-alive", self.plan.warm_up)  # not counted
                ready.append(server)
            except BenchError as err:
                self.results.not_measured.append(f"{server.label}, {workload.title}: {err}")
        return ready

    def steady_rounds(self, workload: Workload, servers: list[Server]) -> None:
        runs = [(server, load) for server in servers for load in LOADS
                if load == "keep-alive" or (workload.node and server.workers == N)]
        for round_ in range(self.plan.rounds):
            for server, load in runs if round_ % 2 == 0 else reversed(runs):
                try:
                    run = steady(server, load, self.plan.seconds)
                except BenchError as err:
                    self.results.not_measured.append(f"{server.label}, {workload.title}, {load}, round "
                                                     f"{round_ + 1}: {err}")
                    continue
                self.results.throughput.setdefault((workload.key, load, server.key, server.workers), []).append(run)
                say(f"  round {round_ + 1} {workload.key:5} {server.label:22} {load:10} "
                    f"{run.rate:9.0f} req/s  p99 {run.p99_ms:7.2f} ms  failed {run.failed}")
        for server in servers:
            try:
                self.results.memory[(workload.key, server.key, server.workers)] = memory(server)
            except BenchError as err:
                self.results.not_measured.append(f"{server.label}, {workload.title}: memory: {err}")

    def healthy(self, server: Server) -> None:
        """A server left short of workers by the last measurement is restarted first."""
        if len(server.worker_pids()) != server.workers:
            say(f"  {server.label}: {len(server.worker_pids())} of {server.workers} workers; restarting it")
            server.restart()
            wait_ready(server, self.plan.timeout)

    def events(self, servers: list[Server]) -> None:
        """Shares, reloads, kill -9 and restarts on the N-worker servers, alternating order."""
        plan, results = self.plan, self.results
        phases = [("shares", load, lambda s, load=load: shares_around_reload(s, load, plan.window, plan.settle,
                                                                             plan.timeout), results.shares)
                  for load in plan.share_loads]
        phases += [("reloads", load, lambda s, load=load: reloads_under_load(s, load, plan.reloads, plan.margin,
                                                                             plan.timeout), results.reloads)
                   for load in plan.reload_loads]
        phases += [("kill -9", "", lambda s: kill9_recovery(s, plan.kill_timeout), results.kills),
                   ("restart", "close", lambda s: restart_under_load(s, plan.margin, plan.timeout), results.restarts)]
        for index, (what, load, measure, into) in enumerate(phases):
            for server in servers if index % 2 == 0 else reversed(servers):
                started = time.monotonic()
                try:
                    self.healthy(server)
                    into[(server.key, load)] = value = measure(server)
                except BenchError as err:
                    into[(server.key, load)] = value = f"not measured: {err}"
                say(f"  {what:8} {load:10} {server.label:22} {time.monotonic() - started:5.1f} s  {_brief(value)}")

    def workload(self, workload: Workload) -> None:
        started = time.monotonic()
        say(f"{workload.title}: starting every system")
        servers = self.deploy(workload)
        try:
            self.steady_rounds(workload, servers)
            if workload.node:
                self.events([server for server in servers if server.workers == N])
        finally:
            for server in servers:
                server.stop()
        self.results.phases.append((workload.title, time.monotonic() - started))


def _brief(value) -> str:
    """One line on a measurement, for the progress output."""
    if isinstance(value, ReloadRun):
        return (f"failed {value.load.failed} of {value.load.requests}, p99 {value.load.p99_ms:.1f} ms, "
                f"took {', '.join(f'{d:.1f}' for d in value.durations)} s")
    if isinstance(value, RestartRun):
        return (f"refused {value.refused} in {value.refused_seconds:.1f} s, other failures {value.errors}, "
                f"p99 {value.p99_ms:.1f} ms")
    if isinstance(value, ShareRun):
        return f"max/min {value.steady.max_min:.2f} steady, {value.after_reload.max_min:.2f} after the reload"
    if value is None:
        return "no successor answered"
    return value if isinstance(value, str) else f"{value:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=SUITES, default="bookworm")
    parser.add_argument("--smoke", action="store_true", help="tiny durations, one round: for CI")
    parser.add_argument("--out", type=Path, help="where results.md and the plots go (default bench/, "
                                                 "bench/smoke/ with --smoke)")
    parser.add_argument("--deb", type=Path, help="a unitgen .deb built before (default: build one from this tree)")
    parser.add_argument("--rounds", type=int, help="steady rounds (default 5, 1 with --smoke)")
    parser.add_argument("--debug", action="store_true", help="log every command")
    args = parser.parse_args()
    if args.debug:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(relativeCreated)8.0f ms %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    plan = SMOKE if args.smoke else FULL
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    out = args.out or ROOT / ("bench/smoke" if args.smoke else "bench")
    out.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        sys.exit("compare.py boots a container: run it as root")

    started = time.monotonic()
    results = Results(smoke=args.smoke, plan=asdict(plan), workers=N,
                      command=" ".join(["bench/compare.py", *sys.argv[1:]]))
    debs = args.deb.resolve().parent if args.deb else Path("/tmp/unitgen-bench-debs")
    debs.mkdir(exist_ok=True)
    bed = Bed(args.suite, debs)
    try:
        bed.boot()
    except TestbedError as err:
        sys.exit(f"compare.py: the test bed did not start: {err}")
    try:
        say(f"{args.suite}: installing unitgen, gunicorn, uvicorn, Node and PM2")
        # The peers download and install while the .deb builds on the host.
        with ThreadPoolExecutor(1) as pool:
            peers = pool.submit(bed.install_peers)
            deb = args.deb.resolve() if args.deb else build_deb(debs)
            pm2_missing = peers.result()
        bed.install_unitgen(deb)
        systems = list(SYSTEMS.values())
        if pm2_missing:
            results.not_measured.append(f"PM2: not measured ({pm2_missing})")
            systems.remove(SYSTEMS["pm2"])
        results.versions = bed.versions()
        results.phases.append(("setup", time.monotonic() - started))
        run = Run(bed, plan, results, systems)
        for workload in WORKLOADS.values():
            try:
                run.workload(workload)
            except Exception as err:  # what was measured so far is still written
                log.debug("%s", traceback.format_exc())
                results.not_measured.append(f"{workload.title}: the run stopped: {err!r}")
                say(f"{workload.title}: the run stopped: {err!r}")
    finally:
        bed.shutdown()
    results.elapsed = time.monotonic() - started
    summary = write_report(results, out)
    print(summary)
    say(f"wrote {out / 'results.md'} in {results.elapsed / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
