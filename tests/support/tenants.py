"""LoRATenant spec pieces the tests write."""

from __future__ import annotations

import hashlib


def key_entry(key: str, name: str = "k1") -> dict[str, str]:
    """A LoRATenant spec.apiKeys entry: the key's sha256, never the key."""
    return {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest()}
