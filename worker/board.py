"""The board: where an app's instances see each other's load, to share it evenly.

One small file in the app's runtime directory, mapped into every instance's memory.
Each instance writes only its own slot (at its instance number) and reads its siblings'
when it decides whether to accept a connection now and whether to ask a keep-alive
client to reconnect. Only the app's instances (one user, one directory) use it;
unitgen reads the counters files instead, so root never trusts what is written here.

A slot: pid, open connections, requests in flight, flags, heartbeat. The heartbeat is
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
from dataclasses import dataclass
from pathlib import Path

from unitgen_worker.contract import BOARD_SLOTS

# pid, connections, in flight, flags, heartbeat; padded to 64 bytes (one cache line
# each, so instances writing their own slots never share one).
_SLOT = struct.Struct("<qqqqd24x")
_HEADER = struct.Struct("<q56x")  # the highest slot in use + 1, so readers scan no further
STALE = 0.5  # seconds: the loop writes its heartbeat ten times a second
DRAINING, FULL, OVER_SHARE = 1, 2, 4  # flags; FULL and OVER_SHARE: accepting nothing now


@dataclass(frozen=True)
class Siblings:
    """The other instances alive and not draining."""

    count: int = 0
    connections: int = 0  # their open connections, summed
    accepting: int = 0  # how many of them accept connections now


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

    def publish(self, connections: int, in_flight: int, flags: int = 0) -> None:
        _SLOT.pack_into(self._map, self._offset, self.pid, connections, in_flight, flags, time.monotonic())

    def siblings(self) -> Siblings:
        (high,) = _HEADER.unpack_from(self._map, 0)
        high = max(0, min(high, BOARD_SLOTS))
        now = time.monotonic()
        slots = self._map[_HEADER.size:_HEADER.size + high * _SLOT.size]
        count = connections = accepting = 0
        for pid, open_connections, _, flags, beat in _SLOT.iter_unpack(slots):
            if pid and pid != self.pid and not flags & DRAINING and 0 <= now - beat < STALE:
                count += 1
                connections += open_connections
                accepting += not flags & (FULL | OVER_SHARE)
        return Siblings(count=count, connections=connections, accepting=accepting)

    def leave(self) -> None:
        """Clears this instance's slot (at exit): siblings stop counting it at once."""
        _SLOT.pack_into(self._map, self._offset, 0, 0, 0, 0, 0.0)
        self._map.close()
