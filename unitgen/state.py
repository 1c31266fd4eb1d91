"""What systemd says about an installed app: one `systemctl show` for many units."""

from __future__ import annotations

import re
import time

from unitgen import manager
from unitgen.errors import die
from unitgen.install import installed_spec, is_ours, spec_path, unit_dir
from unitgen.render import unit_names
from unitgen.run import systemctl
from unitgen.spec import AppSpec, parse_name
from unitgen_worker.contract import instances_pattern

_INSTANCE = re.compile(r".+@(\d+)\.service")


def show(units: list[str], props: list[str]) -> list[dict[str, str]]:
    """systemctl show for each unit, in the order given (blocks split by a blank line)."""
    out = systemctl("show", "-p", ",".join(props), *units).stdout
    blocks = [block for block in out.strip("\n").split("\n\n")]
    if len(blocks) != len(units):
        die(f"systemctl show answered for {len(blocks)} units, not {len(units)}")
    return [_properties(block) for block in blocks]


def _properties(block: str) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            # A property with several values comes as a line each (Listen=, one per address).
            props[key] = f"{props[key]} {value}" if key in props else value
    return props


def instance_number(unit: str) -> int:
    match = _INSTANCE.fullmatch(unit)
    return int(match.group(1)) if match else -1


class App:
    """An app installed by unitgen, as systemd has it now."""

    def __init__(self, name: str) -> None:
        self.name = parse_name(name)
        self.socket, self.service, self.target = unit_names(self.name)
        target_file = unit_dir() / self.target
        if not target_file.exists():
            where = " under your user's systemd" if manager.current().user else ""
            die(f"no app named {self.name!r} is installed{where}",
                hint=f"install it with `unitgen render ... | {manager.current().sudo} install -`")
        if not is_ours(target_file):
            die(f"{target_file} was not written by unitgen", hint="unitgen only manages apps it installed")
        spec = installed_spec(self.name)
        if spec is None:
            die(f"{self.name!r} has no saved spec; it was installed by unitgen 0.1",
                hint="render and install it again with this unitgen")
        self.spec: AppSpec = spec
        self.app = spec.app

    def units_changed_at(self) -> float:
        """When its service template or saved spec was last written, on CLOCK_MONOTONIC
        (systemd's *TimestampMonotonic clock)."""
        files = [unit_dir() / self.service, spec_path(self.name)]
        written = max((path.stat().st_mtime for path in files if path.exists()), default=0.0)
        return written - (time.time() - time.monotonic())

    def wanted(self) -> list[str]:
        """The instances the target wants, by number: what runs after a reboot."""
        wants = show([self.target], ["Wants"])[0].get("Wants", "").split()
        return sorted((u for u in wants if instance_number(u) >= 0 and u.startswith(f"{self.name}@")),
                      key=instance_number)

    def loaded(self) -> list[str]:
        """Every instance systemd has loaded now, wanted or not (after a scale down)."""
        out = systemctl("list-units", "--all", "--plain", "--no-legend", "--type=service",
                        instances_pattern(self.name)).stdout
        units = {line.split()[0] for line in out.splitlines() if line.strip()}
        return sorted((u for u in units if instance_number(u) >= 0), key=instance_number)
