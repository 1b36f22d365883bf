"""Resident memory as the OS (Linux) counts it, for the worker that trains.

``rss()`` is the process's resident set now (psutil, = VmRSS). ``high_water()`` is the kernel's
peak resident set of the process (VmHWM). ``reset_high_water()`` restarts that peak (writing 5 to
``/proc/self/clear_refs``, Linux >= 4.0), so the peak of the training steps alone can be read
after loading. The reset also lowers what ``wait4`` later reports as ``ru_maxrss`` (the kernel
takes it from the same counter at exit), so the whole-process peak is
max(VmHWM read just before the reset, ``ru_maxrss``); ``bench/spawn.py`` does that.
"""

from __future__ import annotations

from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def high_water() -> int | None:
    """Peak resident bytes of this process since start (or since the last reset); None off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def reset_high_water() -> bool:
    """Restart the peak at the current RSS; False when the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
