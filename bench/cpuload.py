"""How busy the machine was while a benchmark ran (shared by the bench scripts).

The bench scripts run as ``python bench/<script>.py``, so this module is importable as
``cpuload`` from them.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy (not idle or waiting for I/O) since boot."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
