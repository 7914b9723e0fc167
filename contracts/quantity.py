"""Kubernetes resource quantities (``20Gi``, ``512Mi``, ``1e9``, ``500M``) as byte counts."""

from __future__ import annotations

import re

_SUFFIX = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(?:[eE]([0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def parse_quantity(value: int | str) -> int:
    """Bytes in a quantity; raises ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"quantity must not be negative: {value}")
        return value
    m = _RE.match(str(value).strip())
    if not m:
        raise ValueError(f"not a quantity: {value!r} (expected e.g. 512Mi, 20Gi, 1000000)")
    number, exp, suffix = m.groups()
    scaled = float(number) * (10 ** int(exp) if exp else 1) * _SUFFIX[suffix or ""]
    return int(scaled)
