"""The board: where an app's instances see each other's load, to share it evenly.

One small file in the app's runtime directory, mapped into every instance's memory.
Each instance writes only its own slot (at its instance number) and reads its siblings'
when it decides whether to accept a connection now and whether to ask a keep-alive
client to reconnect. Only the app's instances (one user, one directory) use it;
unitgen reads the counters files instead, so root never trusts what is written here.

A slot: pid, open connections, requests in flight, flags, heartbeat, and how many
connections the instance has accepted (written at each accept). The heartbeat is
CLOCK_MONOTONIC, which is one clock for every process on the host; a slot whose
heartbeat is older than STALE belongs to an instance that died or whose event loop is
stuck, and is ignored, as are the slots of instances draining.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from unitgen_worker.contract import BOARD_SLOTS

# pid, connections, in flight, flags, heartbeat, accepted; padded to 64 bytes (one
# cache line each, so instances writing their own slots never share one). The accepted
# count came last, after the rest: an older worker still running during a roll reads the
# fields it knows where they were, and writes zeros there (it does not set COUNTS).
_SLOT = struct.Struct("<qqqqdq16x")
_ACCEPTED = struct.Struct("<q")
_ACCEPTED_AT = _SLOT.size - 16 - _ACCEPTED.size
_HEADER = struct.Struct("<q56x")  # the highest slot in use + 1, so readers scan no further
STALE = 0.5  # seconds: the loop writes its heartbeat ten times a second
DRAINING, FULL, OVER_SHARE, COUNTS = 1, 2, 4, 8  # FULL and OVER_SHARE: accepting nothing now;
# COUNTS: the slot's writer counts its accepted connections there


@dataclass(frozen=True)
class Siblings:
    """The other instances alive and not draining."""

    count: int = 0
    connections: int = 0  # their open connections, summed
    accepting: int = 0  # how many of them accept connections now
    draining: int = 0  # alive instances draining, not counted above
    # Connections accepted so far, by pid, of those that count them and are not full (a
    # full one's few accepts are no share for the others to meet).
    accepted: dict[int, int] = field(default_factory=dict)
    pids: frozenset[int] = frozenset()  # of those counted above: who they are, to see one come or go


class Board:
    """This instance's slot, and a view of its siblings'."""

    def __init__(self, path: Path, instance: int) -> None:
        if not 0 <= instance < BOARD_SLOTS:
            raise ValueError(f"instance {instance} has no slot on the board (0 to {BOARD_SLOTS - 1})")
        size = _HEADER.size + BOARD_SLOTS * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{path} is not a regular file")
            if os.fstat(fd).st_size < size:
                # Allocated now, not on a first write into the mapping: a full /run is an
                # error here (no board), never a SIGBUS later. Siblings racing here all
                # make it the same size, zeroed.
                os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.instance = instance
        self.pid = os.getpid()
        self._offset = _HEADER.size + instance * _SLOT.size
        self.claim()

    def claim(self) -> None:
        """Makes sure readers scan as far as this slot. Siblings starting together can
        overwrite each other's claim (read, then write), so the heartbeat claims again."""
        (high,) = _HEADER.unpack_from(self._map, 0)
        if high <= self.instance:
            _HEADER.pack_into(self._map, 0, self.instance + 1)

    def publish(self, connections: int, in_flight: int, flags: int = 0, accepted: int = 0) -> None:
        _SLOT.pack_into(self._map, self._offset, self.pid, connections, in_flight, flags | COUNTS,
                        time.monotonic(), accepted)

    def count_accepted(self, accepted: int) -> None:
        """Between heartbeats: siblings deciding their share see every accept at once."""
        _ACCEPTED.pack_into(self._map, self._offset + _ACCEPTED_AT, accepted)

    def siblings(self) -> Siblings:
        (high,) = _HEADER.unpack_from(self._map, 0)
        high = max(0, min(high, BOARD_SLOTS))
        now = time.monotonic()
        slots = self._map[_HEADER.size:_HEADER.size + high * _SLOT.size]
        count = connections = accepting = draining = 0
        accepted = {}
        pids = set()
        for pid, open_connections, _, flags, beat, accepted_by_it in _SLOT.iter_unpack(slots):
            if pid and pid != self.pid and flags & DRAINING and 0 <= now - beat < STALE:
                draining += 1
            elif pid and pid != self.pid and 0 <= now - beat < STALE:
                count += 1
                pids.add(pid)
                connections += open_connections
                accepting += not flags & (FULL | OVER_SHARE)
                if flags & COUNTS and not flags & FULL:
                    accepted[pid] = accepted_by_it
        return Siblings(count=count, connections=connections, accepting=accepting, draining=draining,
                        accepted=accepted, pids=frozenset(pids))

    def leave(self) -> None:
        """Clears this instance's slot (at exit): siblings stop counting it at once."""
        _SLOT.pack_into(self._map, self._offset, 0, 0, 0, 0, 0.0, 0)
        self._map.close()
