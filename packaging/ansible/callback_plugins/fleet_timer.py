"""Ansible callback: how long each host spent in each task, and in each play.

Prints, after the PLAY RECAP, one line per host and task that took at least
FLEET_TIMER_MIN seconds (default 0.5), and each play's wall time: what a fleet roll's
batches cost, host by host (see docs/fleet.md). Enabled in ansible.cfg.
"""

from __future__ import annotations

import os
import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: fleet_timer
type: aggregate
short_description: seconds per host and task, and per play
description: Prints the slow tasks of each host and each play's wall time after the recap.
requirements: [enable in ansible.cfg (callbacks_enabled = fleet_timer)]
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "fleet_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.times: list[tuple[str, str, float]] = []
        self.plays: list[tuple[str, float, float]] = []
        self.minimum = float(os.environ.get("FLEET_TIMER_MIN", "0.5"))

    def v2_playbook_on_play_start(self, play) -> None:
        now = time.monotonic()
        if self.plays:
            name, began, _ = self.plays[-1]
            self.plays[-1] = (name, began, now)
        self.plays.append((play.get_name(), now, 0.0))

    def _start(self, task) -> None:
        self.started[task._uuid] = time.monotonic()

    v2_playbook_on_task_start = lambda self, task, is_conditional: self._start(task)  # noqa: E731
    v2_playbook_on_handler_task_start = lambda self, task: self._start(task)  # noqa: E731

    def _end(self, result) -> None:
        began = self.started.get(result._task._uuid)
        if began is not None:
            self.times.append((result._host.get_name(), result._task.get_name(), time.monotonic() - began))

    v2_runner_on_ok = v2_runner_on_failed = v2_runner_on_unreachable = lambda self, result, *a, **k: self._end(result)

    def v2_playbook_on_stats(self, stats) -> None:
        now = time.monotonic()
        if self.plays:
            name, began, _ = self.plays[-1]
            self.plays[-1] = (name, began, now)
        self._display.display("\nFLEET TIMES " + "*" * 68)
        for name, began, ended in self.plays:
            self._display.display(f"play {ended - began:8.1f} s  {name}")
        for host, task, seconds in self.times:
            if seconds >= self.minimum:
                self._display.display(f"{host:<12} {seconds:8.1f} s  {task}")
