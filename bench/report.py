"""results.md, the PNG plots beside it and the summary table, from one run's measurements.

Every number written here comes from the Results of the run that writes it; a figure
that could not be measured says so and why.
"""

from __future__ import annotations

import datetime
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from systems import SYSTEMS, WORKLOADS

NAMES = {key: cls.title for key, cls in SYSTEMS.items()}
ONE = {key: cls.single for key, cls in SYSTEMS.items()}
PEERS = ("gunicorn", "uvicorn")  # the Python multi-worker peers on the same engine


@dataclass
class Results:
    smoke: bool
    plan: dict
    workers: int
    command: str
    versions: dict = field(default_factory=dict)
    servers: list = field(default_factory=list)  # every Server started, for its commands
    throughput: dict = field(default_factory=dict)  # (workload, load, system, workers) -> [WrkRun per round]
    memory: dict = field(default_factory=dict)  # (workload, system, workers) -> Memory
    shares: dict = field(default_factory=dict)  # (system, load) -> ShareRun | reason
    reloads: dict = field(default_factory=dict)  # (system, load) -> ReloadRun | reason
    kills: dict = field(default_factory=dict)  # (system, "") -> seconds | None | reason
    restarts: dict = field(default_factory=dict)  # (system, "close") -> RestartRun | reason
    not_measured: list = field(default_factory=list)
    phases: list = field(default_factory=list)  # (name, seconds)
    elapsed: float = 0.0


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt_spread(values: list[float], digits: int = 0) -> str:
    if not values:
        return "not measured"
    mid, low, high = spread(values)
    return f"{mid:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})" if len(values) > 1 else f"{mid:,.{digits}f}"


def ratio(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def rates(results: Results, workload: str, load: str, system: str, workers: int) -> list[float]:
    return [run.rate for run in results.throughput.get((workload, load, system, workers), [])]


def paired_ratios(results: Results, key: tuple, other: tuple) -> list[float]:
    """Round-by-round ratios: both ran in the same round, next to each other."""
    mine, theirs = results.throughput.get(key, []), results.throughput.get(other, [])
    return [a.rate / b.rate for a, b in zip(mine, theirs, strict=False) if b.rate]


def systems_in(results: Results) -> list[str]:
    seen = {key[2] for key in results.throughput} | {key[0] for key in results.reloads}
    return [system for system in NAMES if system in seen]


def steady_p99(results: Results, load: str, system: str) -> float | None:
    runs = results.throughput.get(("hello", load, system, results.workers), [])
    return statistics.median(run.p99_ms for run in runs) if runs else None


def describe_event(value, load_figure) -> str:
    return value if isinstance(value, str) else load_figure(value)


def summary_table(results: Results) -> str:
    n = results.workers
    rows = [f"| system (N={n}) | hello req/s keep-alive | hello req/s close | scaling 1→{n} | "
            "failed in 2 reloads keep-alive / close | p99 in reloads keep-alive / close (ms) | "
            "refused in a full restart | kill -9 → full capacity | RSS per worker | "
            "share max/min after a reload keep-alive / close |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for system in systems_in(results):
        ka, cc = rates(results, "hello", "keep-alive", system, n), rates(results, "hello", "close", system, n)
        one = rates(results, "hello", "keep-alive", system, 1)
        scaling = f"{statistics.median(ka) / statistics.median(one):.2f}x" if ka and one else "not measured"
        failed = " / ".join(_event(results.reloads.get((system, load)), lambda e: f"{e.load.failed:,}")
                            for load in ("keep-alive", "close"))
        p99 = " / ".join(_event(results.reloads.get((system, load)), lambda e: f"{e.load.p99_ms:.1f}")
                         for load in ("keep-alive", "close"))
        refused = _event(results.restarts.get((system, "close")),
                         lambda r: f"{r.refused:,} in {r.refused_seconds:.1f} s" if r.refused else "0")
        kill = results.kills.get((system, ""), "not measured")
        kill = kill if isinstance(kill, str) else "not replaced" if kill is None else f"{kill:.2f} s"
        mem = results.memory.get(("hello", system, n))
        rss = f"{statistics.median(mem.worker_rss_kb) / 1024:.1f} MB" if mem and mem.worker_rss_kb else "-"
        shares = " / ".join(_event(results.shares.get((system, load)), lambda s: ratio(s.after_reload.max_min))
                            for load in ("keep-alive", "close"))
        rows.append(f"| {NAMES[system]} | {fmt_spread(ka)} | {fmt_spread(cc)} | {scaling} | {failed} | {p99} | "
                    f"{refused} | {kill} | {rss} | {shares} |")
    return "\n".join(rows)


def _event(value, figure) -> str:
    if value is None:
        return "-"  # not part of this run's plan
    return "not measured" if isinstance(value, str) else figure(value)


def throughput_section(results: Results) -> list[str]:
    n, lines = results.workers, ["## Throughput", ""]
    lines.append(f"Requests per second, median of {results.plan['rounds']} interleaved rounds of "
                 f"{results.plan['seconds']:g} s (min-max), wrk -t2 -c64 from the host.")
    for workload in WORKLOADS.values():
        for load in ("keep-alive", "close"):
            systems = [s for s in NAMES if rates(results, workload.key, load, s, n)]
            if not systems:
                continue
            lines += ["", f"### {workload.title}, {load}", "",
                      f"| system | 1 worker | N={n} | scaling | p99 at N={n} (ms) |", "| --- | --- | --- | --- | --- |"]
            for system in systems:
                many, one = rates(results, workload.key, load, system, n), rates(results, workload.key, load, system, 1)
                scaling = f"{statistics.median(many) / statistics.median(one):.2f}x" if one else "-"
                p99 = [run.p99_ms for run in results.throughput[(workload.key, load, system, n)]]
                lines.append(f"| {NAMES[system]} | {f'{fmt_spread(one)} ({ONE[system]})' if one else '-'} | "
                             f"{fmt_spread(many)} | {scaling} | {fmt_spread(p99, 2)} |")
    lines += ["", "### unitgen against its peers, round by round", "",
              "| workload, load | unitgen 1 instance / bare uvicorn | "
              f"unitgen N={n} / best Python peer at N={n} |", "| --- | --- | --- |"]
    for workload in WORKLOADS.values():
        for load in ("keep-alive", "close"):
            mine = ("unitgen", n)
            if (workload.key, load, *mine) not in results.throughput:
                continue
            single = paired_ratios(results, (workload.key, load, "unitgen", 1), (workload.key, load, "uvicorn", 1))
            peers = [p for p in PEERS if rates(results, workload.key, load, p, n)]
            best = max(peers, key=lambda p: statistics.median(rates(results, workload.key, load, p, n)), default=None)
            against = (paired_ratios(results, (workload.key, load, *mine), (workload.key, load, best, n))
                       if best else [])
            lines.append(f"| {workload.title}, {load} | {_ratios(single)} | "
                         f"{_ratios(against)}{f' ({best})' if best else ''} |")
    return lines


def _ratios(values: list[float]) -> str:
    return fmt_spread(values, 3) + "x" if values else "not measured"


def events_section(results: Results, systems: dict) -> list[str]:
    n, plan = results.workers, results.plan
    lines = ["## Reloads under load", "",
             f"wrk with 64 connections through {plan['reloads']} reloads of the hello-world app (N={n}), "
             f"{plan['margin']:g} s of load before, between and after them; a reload is done once every worker "
             "is a new process and the app answers. Failed: wrk's socket errors and non-2xx answers; wrk "
             "reconnects at once after a failed connection, so while nothing listens the count grows with the "
             "time, and can pass the requests answered.", "",
             "| system | reload command | load | failed / answered | p99 (ms), steady p99 | each reload took (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for system in systems_in(results):
        for load in plan["reload_loads"]:
            value = results.reloads.get((system, load), "not measured")
            steady = steady_p99(results, load, system)
            figure = describe_event(value, lambda e, steady=steady: (
                f"{e.load.failed:,} / {e.load.requests:,} | {e.load.p99_ms:.1f}, "
                f"{'-' if steady is None else f'{steady:.1f}'} | {', '.join(f'{d:.1f}' for d in e.durations)}"
                f"{' (the main process was replaced: a restart)' if e.restarted else ''}"))
            command = systems[system].reload_command() if system in systems else "-"
            lines.append(f"| {NAMES[system]} | `{command}` | {load} | {figure} |")
    lines += ["", "## A full restart, a worker killed", "",
              "Restart: the pid client's connection-close load (64 connections; a client waits 10 ms after a "
              f"failure), {plan['margin']:g} s before and after; refused connections counted apart from other "
              "failures, and the time from the first refused connection to the last. kill -9: from the kill until "
              "the successor answers beside the other workers (probes of 8 concurrent requests, no other load).", "",
              "| system | restart command | refused connections | refused during (s) | other failures | answered | "
              "p99 (ms) | back after (s) | kill -9 → full capacity |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for system in systems_in(results):
        value = results.restarts.get((system, "close"), "not measured")
        figure = describe_event(value, lambda r: (
            f"{r.refused:,} | {r.refused_seconds:.1f} | {r.errors:,} | {r.answered:,} | {r.p99_ms:.1f} | "
            f"{r.duration:.2f}"))
        kill = results.kills.get((system, ""), "not measured")
        kill = kill if isinstance(kill, str) else (
            f"no successor answered in {plan['kill_timeout']:g} s" if kill is None else f"{kill:.2f} s")
        command = systems[system].restart_command() if system in systems else "-"
        lines.append(f"| {NAMES[system]} | `{command}` | {figure} | {kill} |")
    lines += ["", "## Each worker's share of requests", "",
              f"The pid client (bench/pidclient.py, 64 connections) counts the x-worker-pid of every answer: a "
              f"{plan['window']:g} s window in steady state, then a reload, then a {plan['window']:g} s window from "
              f"{plan['settle']:g} s after the reload was done. Shares of the workers alive at each window's end.", "",
              "| system | load | steady: shares (max/min) | after a reload: shares (max/min) | client errors |",
              "| --- | --- | --- | --- | --- |"]
    for system in systems_in(results):
        for load in plan["share_loads"]:
            value = results.shares.get((system, load), "not measured")
            figure = describe_event(value, lambda s: (
                f"{_percents(s.steady)} | {_percents(s.after_reload)} | {s.errors:,}"))
            lines.append(f"| {NAMES[system]} | {load} | {figure} |")
    return lines


def _percents(shares) -> str:
    return "/".join(f"{p:.0f}%" for p in shares.percents) + f" ({ratio(shares.max_min)})"


def memory_section(results: Results) -> list[str]:
    lines = ["## Memory", "", "Resident memory after the steady rounds (ps RSS). unitgen's supervisor is systemd "
             "(PID 1), which serves the whole machine.", "",
             "| workload | system | workers | RSS per worker (MB) | supervisor RSS (MB) |",
             "| --- | --- | --- | --- | --- |"]
    for (workload, system, workers), mem in sorted(results.memory.items()):
        per = [kb / 1024 for kb in mem.worker_rss_kb]
        lines.append(f"| {workload} | {NAMES[system]} | {workers} | {fmt_spread(per, 1)} | "
                     f"{_supervisor(system, workers, mem)} |")
    return lines


def _supervisor(system: str, workers: int, mem) -> str:
    if system == "unitgen":
        return "- (PID 1)"
    if system == "uvicorn" and workers == 1:
        return "- (none)"
    return f"{mem.supervisor_rss_kb / 1024:.1f}"


def setup_section(results: Results) -> list[str]:
    v = results.versions
    lines = ["## Machine and versions", "",
             f"- machine: {v.get('machine')}, {v.get('cores')} cores, {v.get('memory')}; kernel {v.get('kernel')}",
             f"- container: Debian {v.get('debian')}, {v.get('systemd')}, {v.get('python3')}",
             f"- unitgen {v.get('unitgen')} (.deb from this tree), python3-uvicorn {v.get('python3-uvicorn')}, "
             f"python3-gunicorn {v.get('python3-gunicorn')}, python3-httptools {v.get('python3-httptools')}, "
             f"python3-uvloop {v.get('python3-uvloop')}, python3-flask {v.get('python3-flask')}",
             f"- node {v.get('node')} (Debian nodejs {v.get('nodejs')}), pm2 {v.get('pm2')} (npm)",
             f"- load: {v.get('wrk')} and bench/pidclient.py on the host; the container shares the host's "
             "network, so everything runs on the same cores",
             "", "## How each system ran", "",
             "Peers run as transient services (systemd-run, Restart=always, no start limit) as root; unitgen "
             "installs its units with their default sandbox and a dynamic user.", ""]
    lines += [f"- {NAMES[s.key]} x{s.workers}, {s.workload.key}: `{s.start_command()}`" for s in results.servers]
    return lines


def write_report(results: Results, out: Path) -> str:
    """Write out/results.md and the plots; return the summary table."""
    from plots import draw_all  # matplotlib loads only here

    systems = {s.key: s for s in results.servers if s.workers == results.workers and s.workload.key == "hello"}
    images = draw_all(results, out)
    summary = summary_table(results)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# unitgen and its peers, side by side", ""]
    if results.smoke:
        lines += ["**SMOKE RUN: one round of tiny loads, to check the harness. Not a measurement to quote.**", ""]
    lines += [f"Measured {when} by `{results.command}` in {results.elapsed / 60:.1f} minutes "
              f"({', '.join(f'{name} {secs:.0f} s' for name, secs in results.phases)}). "
              f"N = {results.workers} workers (one per core). Medians, with min-max over the rounds.", "",
              summary, ""]
    if results.smoke:
        lines += ["`-`: not part of a smoke run.", ""]
    if results.not_measured:
        lines += ["Not measured:", "", *[f"- {reason}" for reason in results.not_measured], ""]
    lines += throughput_section(results) + [""] + [f"![{name}]({name})" for name in images if "throughput" in name]
    overhead = Path(__file__).with_name("overhead.md")  # the profile of where unitgen is behind, by hand
    if overhead.exists() and not results.smoke:
        lines += ["", overhead.read_text().rstrip()]
    lines += [""] + events_section(results, systems) + [""]
    lines += [f"![{name}]({name})" for name in images if "throughput" not in name]
    lines += [""] + memory_section(results) + [""] + setup_section(results)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary
