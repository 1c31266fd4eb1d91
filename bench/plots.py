"""The PNG plots of results.md (matplotlib, no display needed)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from report import NAMES, Results, rates, steady_p99, systems_in  # noqa: E402
from systems import WORKLOADS  # noqa: E402

LOADS = ("keep-alive", "close")
COLOURS = {"keep-alive": "#1f77b4", "close": "#ff7f0e", 1: "#9ecae1", "many": "#08519c"}


def draw_all(results: Results, out: Path) -> list[str]:
    """Draw every plot into out; return the file names."""
    names = []
    for name, draw in (("throughput.png", throughput), ("reloads.png", reloads), ("recovery.png", recovery),
                       ("shares.png", shares)):
        fig = draw(results)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            names.append(name)
    return names


def _label_bars(ax, bars, texts) -> None:
    for bar, text in zip(bars, texts, strict=True):
        ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=7)


def throughput(results: Results):
    n = results.workers
    panels = [(w, load) for w in WORKLOADS.values() for load in LOADS
              if any(rates(results, w.key, load, s, n) for s in NAMES)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (workload, load) in zip(axes[0], panels, strict=True):
        systems = [s for s in NAMES if rates(results, workload.key, load, s, n)]
        for offset, workers, colour in ((-0.2, 1, COLOURS[1]), (0.2, n, COLOURS["many"])):
            xs, mids, errs = [], [], [[], []]
            for x, system in enumerate(systems):
                values = rates(results, workload.key, load, system, workers)
                if values:
                    mid = statistics.median(values)
                    xs.append(x + offset)
                    mids.append(mid)
                    errs[0].append(mid - min(values))
                    errs[1].append(max(values) - mid)
            ax.bar(xs, mids, 0.4, yerr=errs, color=colour, capsize=3, label=f"{workers} worker{'s' * (workers > 1)}")
        ax.set_xticks(range(len(systems)), [NAMES[s] for s in systems], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{workload.title}\n{load}", fontsize=9)
        ax.set_ylabel("requests/s (median, min-max)")
        ax.legend(fontsize=7)
    return fig


def _event_values(table: dict, system: str, load: str, figure):
    value = table.get((system, load))
    return None if value is None or isinstance(value, str) else figure(value)


def reloads(results: Results):
    systems = systems_in(results)
    if all(isinstance(value, str) for value in results.reloads.values()):
        return None
    fig, (failed_ax, p99_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loads = results.plan["reload_loads"]
    for i, load in enumerate(loads):
        xs = [x + (i - (len(loads) - 1) / 2) * 0.4 for x in range(len(systems))]
        failed = [_event_values(results.reloads, s, load, lambda e: e.load.failed) for s in systems]
        bars = failed_ax.bar(xs, [f or 0 for f in failed], 0.4, color=COLOURS[load], label=load)
        _label_bars(failed_ax, bars, ["n/a" if f is None else str(f) for f in failed])
        p99 = [_event_values(results.reloads, s, load, lambda e: e.load.p99_ms) for s in systems]
        p99_ax.bar(xs, [p or 0 for p in p99], 0.4, color=COLOURS[load], label=f"{load}, during reloads")
        steady = [steady_p99(results, load, s) for s in systems]
        marks = [(x, v) for x, v in zip(xs, steady, strict=True) if v]
        p99_ax.scatter([x for x, _ in marks], [v for _, v in marks], color="black", marker="_", s=200, zorder=3,
                       label="steady" if i == 0 else None)
    failed_ax.set_yscale("symlog")
    failed_ax.set_title(f"failed requests through {results.plan['reloads']} reloads (64 connections)", fontsize=9)
    p99_ax.set_title("p99 latency through the reloads (ms)", fontsize=9)
    for ax in (failed_ax, p99_ax):
        ax.set_xticks(range(len(systems)), [NAMES[s] for s in systems], rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def recovery(results: Results):
    systems = systems_in(results)
    fig, (restart_ax, kill_ax, rss_ax) = plt.subplots(1, 3, figsize=(13, 4))
    refused = [_event_values(results.restarts, s, "close", lambda r: r.refused) for s in systems]
    bars = restart_ax.bar(range(len(systems)), [r or 0 for r in refused], color=COLOURS["close"])
    _label_bars(restart_ax, bars, ["n/a" if r is None else str(r) for r in refused])
    restart_ax.set_yscale("symlog")
    restart_ax.set_title("refused connections through a full restart\n(connection-close load)", fontsize=9)
    timeout = results.plan["kill_timeout"]
    kills = [results.kills.get((s, "")) for s in systems]
    heights = [timeout if k is None else 0 if isinstance(k, str) else k for k in kills]
    bars = kill_ax.bar(range(len(systems)), heights, color=["#bbbbbb" if k is None else "#2ca02c" for k in kills])
    _label_bars(kill_ax, bars, ["not replaced" if k is None else "n/a" if isinstance(k, str) else f"{k:.2f}"
                                for k in kills])
    kill_ax.set_title("kill -9 of a worker → successor serving (s)", fontsize=9)
    mems = [results.memory.get(("hello", s, results.workers)) for s in systems]
    per_worker = [statistics.median(m.worker_rss_kb) / 1024 if m and m.worker_rss_kb else 0 for m in mems]
    supervisor = [m.supervisor_rss_kb / 1024 if m else 0 for m in mems]
    rss_ax.bar(range(len(systems)), per_worker, color=COLOURS["many"], label="per worker")
    rss_ax.bar(range(len(systems)), supervisor, bottom=per_worker, color=COLOURS[1], label="supervisor")
    rss_ax.set_title(f"RSS (MB), hello world, N={results.workers}", fontsize=9)
    rss_ax.legend(fontsize=7)
    for ax in (restart_ax, kill_ax, rss_ax):
        ax.set_xticks(range(len(systems)), [NAMES[s] for s in systems], rotation=30, ha="right", fontsize=8)
    return fig


def shares(results: Results):
    systems = systems_in(results)
    loads = results.plan["share_loads"]
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 4), squeeze=False)
    for ax, load in zip(axes[0], loads, strict=True):
        for i, when in enumerate(("steady", "after_reload")):
            values = [_event_values(results.shares, s, load, lambda r, when=when: getattr(r, when).max_min)
                      for s in systems]
            finite = [v for v in values if v is not None and not math.isinf(v)]
            cap = max(finite + [2.0]) * 1.5  # where an infinite ratio (a worker with nothing) is drawn
            heights = [0 if v is None else cap if math.isinf(v) else v for v in values]
            xs = [x + (i - 0.5) * 0.4 for x in range(len(systems))]
            bars = ax.bar(xs, heights, 0.4, color=COLOURS[1] if i == 0 else COLOURS["many"],
                          label=when.replace("_", " "))
            _label_bars(ax, bars, ["n/a" if v is None else "∞" if math.isinf(v) else f"{v:.2f}" for v in values])
        ax.axhline(1, color="black", linewidth=0.5)
        ax.set_title(f"busiest / idlest worker's requests, {load}", fontsize=9)
        ax.set_xticks(range(len(systems)), [NAMES[s] for s in systems], rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    return fig
