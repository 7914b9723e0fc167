"""What every benchmark says of the machine it ran on (its JSON line's machine fields)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: how shared the machine was."""
    return [round(x, 2) for x in os.getloadavg()]
