"""Runtime settings: defaults, the pod environment (``contracts.names.RuntimeEnv``), then flags; the
class itself is contracts/settings.py's, where every component's settings are."""

from __future__ import annotations

from lorafleet.contracts.settings import ENGINES, QUANTIZATIONS, TASKS, RuntimeSettings

__all__ = ["ENGINES", "QUANTIZATIONS", "TASKS", "RuntimeSettings"]
