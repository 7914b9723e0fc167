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


def _stat(pid: int | str) -> tuple[int, int] | None:
    """(parent pid, user + system clock ticks) of process ``pid`` from /proc; None if it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[1]), int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` itself; 0 if it is gone."""
    st = _stat(pid)
    return st[1] / os.sysconf("SC_CLK_TCK") if st else 0.0


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants still running (a server's child processes: vLLM's
    engine core, the runtime's HTTP front)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {int(d.name): st for d in Path("/proc").iterdir() if d.name.isdigit() and (st := _stat(d.name))}
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        total += stats[p][1]
        todo.extend(c for c, (ppid, _) in stats.items() if ppid == p)
    return total / tick
