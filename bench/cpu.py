"""Who used the CPU during a timed window: this process, and everything else on the machine.

``other_cores`` is the machine's busy CPU time (/proc/stat: user, nice, system, irq, softirq and
steal, i.e. time a hypervisor gave to other guests) minus this process's own, per wall second. On a
quiet machine it is close to 0; 1.0 means another process took a whole core on average.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")


def machine_busy_seconds() -> float | None:
    try:
        fields = STAT.read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Window:
    """``with Window() as w: ...`` then ``w.result()``: cores this process kept busy, cores others took."""

    def __enter__(self):
        self.cpu, self.wall, self.machine = time.process_time(), time.perf_counter(), machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall
        machine = machine_busy_seconds()
        self.machine = None if machine is None or self.machine is None else machine - self.machine
        return False

    def result(self) -> dict:
        own = self.cpu / self.wall
        other = None if self.machine is None else max(0.0, (self.machine - self.cpu) / self.wall)
        return {"cores_busy": own, "other_cores": other}
