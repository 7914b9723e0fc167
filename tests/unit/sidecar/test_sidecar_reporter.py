"""The sidecar's pod reporter: the sync report on its own pod, and while the routes drain the pod (a
scale down removes it) the pod-deletion-cost that makes the ReplicaSet delete it first; removed once
it drains no more, and only a cost this sidecar set."""

from __future__ import annotations

from lorafleet.contracts import names
from lorafleet.contracts.routes import SyncReport
from lorafleet.sidecar.kube import PodReporter


class Client:
    def __init__(self):
        self.patches: list[dict] = []

    def patch(self, _kind, name, body, namespace, patch_type):
        assert (name, namespace) == ("p-0", "ns")
        self.patches.append(body["metadata"]["annotations"])


def test_a_drained_pod_is_marked_first_for_deletion_then_unmarked():
    c = Client()
    r = PodReporter(c, "ns", "p-0")
    report = SyncReport(generation=3, loaded=2)
    assert r.report(report) and c.patches[-1] == {names.SYNC_ANNOTATION: report.to_json()}  # no cost touched
    assert not r.report(report)  # nothing changed: no patch
    assert r.report(report, draining=True)
    assert c.patches[-1] == {names.SYNC_ANNOTATION: report.to_json(),
                             names.POD_DELETION_COST_ANNOTATION: names.DRAIN_DELETION_COST}
    assert not r.report(report, draining=True) and len(c.patches) == 2
    assert r.report(report, draining=False)
    assert c.patches[-1] == {names.SYNC_ANNOTATION: report.to_json(), names.POD_DELETION_COST_ANNOTATION: None}
    # A cost this sidecar never set (the pool's podAnnotations) is left alone.
    fresh = PodReporter(c, "ns", "p-0")
    fresh.report(SyncReport(generation=4), draining=False)
    assert names.POD_DELETION_COST_ANNOTATION not in c.patches[-1]
