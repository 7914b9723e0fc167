"""Reading a Prometheus /metrics page the way a scraper does."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples on ``url``/metrics whose labels include ``labels`` (0 when none)."""
    return metric_in(httpx.get(url + "/metrics", timeout=10).text, name, **labels)


def metric_in(text: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in the exposition ``text`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total
