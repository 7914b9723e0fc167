"""lorafleet's contracts: CRD models, routes table, cache layout, digest and names shared by every part.

Imports nothing of lorafleet's other packages, and nothing heavy (no torch, no Kubernetes client).
"""

from .cache import CacheLayout
from .digest import directory_digest, is_digest
from .resources import (
    AdapterPhase,
    AdapterSource,
    BaseModelPool,
    BaseModelPoolSpec,
    BaseModelPoolStatus,
    CanarySpec,
    Condition,
    LoRAAdapter,
    LoRAAdapterSpec,
    LoRAAdapterStatus,
    PoolPhase,
    Task,
)
from .routes import RouteEntry, RoutesTable, RouteVersion, SyncReport

__all__ = [
    "AdapterPhase", "AdapterSource", "BaseModelPool", "BaseModelPoolSpec", "BaseModelPoolStatus", "CacheLayout",
    "CanarySpec", "Condition", "LoRAAdapter", "LoRAAdapterSpec", "LoRAAdapterStatus", "PoolPhase", "RouteEntry",
    "RouteVersion", "RoutesTable", "SyncReport", "Task", "directory_digest", "is_digest",
]
