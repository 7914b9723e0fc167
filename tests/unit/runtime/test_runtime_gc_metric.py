"""The garbage collector's passes as the runtime's /metrics shows them (lorafleet_runtime_gc_pause_seconds)."""

import gc

from prometheus_client.parser import text_string_to_metric_families

from lorafleet.runtime.metrics import RuntimeMetrics


def _pauses(m: RuntimeMetrics) -> dict:
    fam = next(f for f in text_string_to_metric_families(m.render().decode())
               if f.name == "lorafleet_runtime_gc_pause_seconds")
    out = {}
    for s in fam.samples:
        key = (s.name.rsplit("_", 1)[-1], s.labels["generation"], s.labels.get("le"))
        out[key] = s.value
    return out


def test_a_full_collection_is_counted_with_its_duration_in_every_runtimes_registry():
    a, b = RuntimeMetrics(), RuntimeMetrics()  # two runtimes in one process: one collector, seen by both
    before = _pauses(a)
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic pass frees the cycles first
    try:
        for _ in range(20_000):  # cyclic garbage: the pass has something to walk and free
            x: list = []
            x.append(x)
        freed = gc.collect()
    finally:
        if was_enabled:
            gc.enable()
    after, seen_by_b = _pauses(a), _pauses(b)
    assert freed >= 20_000
    assert after[("count", "2", None)] >= before[("count", "2", None)] + 1
    assert after[("sum", "2", None)] > before[("sum", "2", None)]
    assert after[("bucket", "2", "+Inf")] == after[("count", "2", None)]  # every pass falls in a bucket
    buckets = [v for (kind, g, le), v in sorted(after.items(), key=lambda kv: float(kv[0][2] or 0))
               if kind == "bucket" and g == "2"]
    assert buckets == sorted(buckets), "cumulative buckets"
    assert seen_by_b[("count", "2", None)] >= after[("count", "2", None)]
