"""The garbage collector's passes as the runtime's /metrics shows them (lorafleet_runtime_gc_pause_seconds)."""

import gc

from prometheus_client.utils import floatToGoString

from lorafleet.runtime.metrics import GCPauses, RuntimeMetrics
from support.collector import collector_off
from support.metrics import metric_in

NAME = "lorafleet_runtime_gc_pause_seconds"


def _full(m: RuntimeMetrics, part: str, **labels: str) -> float:
    return metric_in(m.render().decode(), f"{NAME}_{part}", generation="2", **labels)


def test_a_full_collection_is_counted_with_its_duration_in_every_runtimes_registry():
    a, b = RuntimeMetrics(), RuntimeMetrics()  # two runtimes in one process: one collector, seen by both
    count0, sum0 = _full(a, "count"), _full(a, "sum")
    with collector_off():  # no automatic pass frees the cycles first
        for _ in range(20_000):  # cyclic garbage: the pass has something to walk and free
            x: list = []
            x.append(x)
        freed = gc.collect()
    count = _full(a, "count")
    assert freed >= 20_000
    assert count >= count0 + 1
    assert _full(a, "sum") > sum0
    assert _full(a, "bucket", le="+Inf") == count  # every pass falls in a bucket
    buckets = [_full(a, "bucket", le=floatToGoString(le)) for le in GCPauses.BUCKETS]
    assert buckets == sorted(buckets) and buckets[-1] <= count, "cumulative buckets"
    assert _full(b, "count") >= count
