"""Two operator replicas elect a leader on a coordination.k8s.io Lease: only the holder acts, and when
it dies (SIGKILL, mid-rollout) the other takes the Lease within 15 s and completes the rollout, with
no moment at which a request would have failed.

The API server's audit log is the witness of who acted: each replica runs as its own ServiceAccount,
and every write either made is in the log with its user and time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from lf_operator_kit import SHA, Operator, adapter_doc, apply, make_pod, pool_doc, routes, set_pod, tenant_doc

from lorafleet.localstack.procs import wait_for

SYSTEM = "lorafleet-system"  # the operators' ServiceAccounts and the Lease
NS = "tenants"  # the pool and its adapter
TAKEOVER_S = 15.0
AUDIT_POLICY = f"""
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:{SYSTEM}"]
  verbs: [create, update, patch, delete]
- level: None
"""


@pytest.fixture(scope="module")
def audited(tmp_path_factory, repo):
    """A control plane of its own whose API server audits every write the operators' accounts make."""
    from lorafleet.localstack.controlplane import ControlPlane
    from lorafleet.localstack.tools import ToolMissing, require_tool

    for tool in ("etcd", "kube-apiserver", "kubectl"):
        try:
            require_tool(tool)
        except ToolMissing as e:
            pytest.fail(str(e), pytrace=False)
    d = tmp_path_factory.mktemp("audited")
    (d / "audit-policy.yaml").write_text(AUDIT_POLICY)
    cp = ControlPlane(d / "cp", apiserver_args=[f"--audit-policy-file={d / 'audit-policy.yaml'}",
                                                f"--audit-log-path={d / 'audit.log'}"])
    try:
        cp.start(controller_manager=False)  # the test plays the pods: no controllers needed
        cp.kubectl("apply", "--server-side", "-f", str(repo / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        cp.audit_log = d / "audit.log"
        yield cp
    finally:
        cp.stop()


def _writes(audit_log: Path) -> list[dict]:
    """Every audited write: who (the ServiceAccount's name), when (epoch seconds), what, its status."""
    out = []
    for line in audit_log.read_text().splitlines():
        e = json.loads(line)
        ref = e.get("objectRef") or {}
        out.append({"who": e["user"]["username"].rsplit(":", 1)[-1],
                    "at": datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp(),
                    "what": f"{e['verb']} {ref.get('resource')}{'/' + ref['subresource'] if ref.get('subresource') else ''}"
                            f" {ref.get('name', '')}",
                    "code": (e.get("responseStatus") or {}).get("code", 0)})
    return out


def _holder(kube) -> str | None:
    from lightkube.core.exceptions import ApiError
    from lightkube.resources.coordination_v1 import Lease

    try:
        return kube.get(Lease, "lorafleet-operator", namespace=SYSTEM).spec.holderIdentity
    except ApiError as e:
        if e.status.code == 404:
            return None
        raise


def test_the_other_replica_takes_over_a_rollout_when_the_leader_dies(audited, tmp_path):
    from lightkube import Client, KubeConfig

    cp = audited
    kube = Client(config=KubeConfig.from_file(str(cp.kubeconfig)), field_manager="lorafleet-tests")
    for ns in (SYSTEM, NS):
        cp.kubectl("create", "namespace", ns)
    cp.kubectl("create", "serviceaccount", "default", "-n", NS)  # no controller manager makes it here
    ops: dict[str, Operator] = {}
    for who in ("op-a", "op-b"):
        cp.kubectl("create", "serviceaccount", who, "-n", SYSTEM)
        cp.kubectl("create", "clusterrolebinding", who, "--clusterrole=cluster-admin",
                   f"--serviceaccount={SYSTEM}:{who}")
        token = cp.kubectl("create", "token", who, "-n", SYSTEM, "--duration=1h").stdout.strip()
        ops[who] = Operator(cp.kubeconfig_for_token(token, tmp_path / f"{who}.kubeconfig"), tmp_path / f"{who}.log",
                            args=("--lease-namespace", SYSTEM, "--lease-duration", "10"), env={"POD_NAME": who})
    try:
        for op in ops.values():
            op.start()
        holder = wait_for(lambda: _holder(kube), timeout=30, what="a replica to hold the Lease")
        leader = holder.split("_")[0]
        follower = next(w for w in ops if w != leader)
        assert f"held by {holder}" in wait_for(lambda: "waits to take over" in ops[follower].text()
                                               and ops[follower].text(), timeout=30, what="the follower to wait")

        apply(cp, NS, tenant_doc())
        apply(cp, NS, pool_doc("p", replicas=2))
        apply(cp, NS, adapter_doc("a", "p", version="1", sha=SHA["b"]))
        g1 = wait_for(lambda: "a" in (t := routes(kube, NS, "p")).adapters and t, timeout=30,
                      what="a@1 in the routes").generation
        # The test plays both replicas' sidecars: what each has loaded, and its sync report.
        loaded = {pod: {"1"} for pod in ("p-0", "p-1")}
        for pod in loaded:
            make_pod(kube, NS, "p", pod, sync={"generation": g1, "loaded": 1, "modelReady": True})
        wait_for(lambda: _status(cp, "a").get("phase") == "Ready", timeout=30, interval=0.2, what="a@1 Ready")

        # A client resolving "a" as a replica does: a request fails when the routes name no version
        # of it that every replica has loaded (the runtime serves a draining version until then).
        answers: list[tuple[float, bool, str]] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    entry = routes(kube, NS, "p").adapters.get("a")
                    versions = [v.version for v in entry.versions] if entry else []
                    ok = any(all(v in loaded[pod] for pod in loaded) for v in versions)
                    answers.append((time.time(), ok, f"routes {versions}, loaded {loaded}"))
                except Exception as e:  # noqa: BLE001 - a failed read is a failed request
                    answers.append((time.time(), False, repr(e)))
                time.sleep(0.02)

        reader = threading.Thread(target=client, daemon=True)
        reader.start()
        time.sleep(0.5)
        apply(cp, NS, adapter_doc("a", "p", version="2", sha=SHA["c"]))
        t2 = wait_for(lambda: (t := routes(kube, NS, "p")).adapters["a"].versions[0].version == "2" and t,
                      timeout=30, what="a@2 in the routes")
        g2 = t2.generation
        assert [(v.version, v.draining) for v in t2.adapters["a"].versions] == [("2", False), ("1", True)]
        for pod in loaded:  # the replicas start loading version 2
            set_pod(kube, NS, pod, sync={"generation": g2, "loaded": 1, "modelReady": True, "pending": ["a@2"],
                                         "pendingTotal": 1})

        # Mid-rollout (version 2 routed, nobody has it yet), the leader dies.
        killed = time.time()
        os.kill(ops[leader].proc.pid, signal.SIGKILL)
        ops[leader].proc.proc.wait(10)
        died = time.time()  # a write the leader sent just before the signal may reach the server up to here
        for pod in loaded:  # ... and the replicas finish loading version 2
            loaded[pod].add("2")
            set_pod(kube, NS, pod, sync={"generation": g2, "loaded": 2, "modelReady": True})
        new = wait_for(lambda: (h := _holder(kube)) and h.startswith(follower) and h, timeout=TAKEOVER_S + 5,
                       interval=0.05, what=f"{follower} to take the Lease")
        took = time.time() - killed
        assert took <= TAKEOVER_S, f"{follower} took the Lease {took:.1f} s after the leader died"

        # The new leader completes the rollout: version 1 dropped, a Ready at version 2.
        def committed():
            t = routes(kube, NS, "p")
            return [v.version for v in t.adapters["a"].versions] == ["2"] and t

        t3 = wait_for(committed, timeout=30, what="a@1 dropped by the new leader")
        commit_s = time.time() - killed
        for pod in loaded:  # the sidecars unload version 1 once it left the routes
            set_pod(kube, NS, pod, sync={"generation": t3.generation, "loaded": 1, "modelReady": True})
            loaded[pod].discard("1")
        st = wait_for(lambda: (s := _status(cp, "a")).get("phase") == "Ready" and s.get("servedVersion") == "2"
                      and s.get("observedGeneration") == 2 and s, timeout=30, interval=0.2, what="a Ready at version 2")
        assert st["ready"] == "2/2", st
        time.sleep(0.5)
        stop.set()
        reader.join(10)
    finally:
        stop_all = [op for op in ops.values() if op.proc is not None]
        for op in stop_all:
            op.stop()

    failed = [a for a in answers if not a[1]]
    assert answers and not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    assert any(at > killed for at, _, _ in answers)

    writes = _writes(cp.audit_log)
    acted = {who: [w for w in writes if w["who"] == who and "leases" not in w["what"]] for who in ops}
    lease_taken = min(w["at"] for w in writes if w["who"] == follower and "leases" in w["what"]
                      and w["code"] < 300)
    assert lease_taken > killed
    # Never both acting: the follower wrote nothing before it held the Lease, the leader nothing after
    # it died; each of them did act while it led.
    early = [w for w in acted[follower] if w["at"] < lease_taken]
    assert not early, f"{follower} acted before it held the Lease: {early[:5]}"
    assert acted[leader], "the first leader wrote nothing while it led"
    late = [w for w in acted[leader] if w["at"] >= min(died, lease_taken)]
    assert not late, f"{leader} wrote after it died or lost the Lease: {late[:5]}"
    assert any("loraadapters/status a" in w["what"] for w in acted[follower]), acted[follower]
    assert f"taken over from {holder}" in ops[follower].text()
    for op in ops.values():
        assert "Traceback" not in op.text(), op.text()[-3000:]
    print(f"leader failover: Lease taken {took:.1f} s after SIGKILL; first write by the new leader "
          f"{min(w['at'] for w in acted[follower]) - killed:.1f} s, rollout committed {commit_s:.1f} s after it; "
          f"{len(answers)} requests, none failed")


def _status(cp, name: str) -> dict:
    r = cp.kubectl("get", "lora", name, "-n", NS, "-o", "json", check=False)
    return (json.loads(r.stdout).get("status") or {}) if r.returncode == 0 else {}


def test_a_leader_cut_off_from_the_api_server_stops_before_another_takes_over(control_plane, namespace, kube,
                                                                               tmp_path):
    """A leader that cannot renew (the network to the API server gone) exits within its renew deadline,
    before the standby may take the Lease: never two leaders, also when the old one is alive."""
    from lf_operator_kit import CuttableProxy
    from lightkube.resources.coordination_v1 import Lease

    proxy = CuttableProxy(control_plane.api_port)
    lease_args = ("--lease-namespace", namespace, "--lease-duration", "6")
    cut_off = Operator(proxy.kubeconfig(control_plane.kubeconfig, tmp_path / "proxied.kubeconfig"),
                       tmp_path / "op-a.log", args=lease_args, env={"POD_NAME": "op-a"})
    standby = Operator(control_plane.kubeconfig, tmp_path / "op-b.log", args=lease_args, env={"POD_NAME": "op-b"})

    def holder() -> str | None:
        try:
            return kube.get(Lease, "lorafleet-operator", namespace=namespace).spec.holderIdentity
        except Exception:  # noqa: BLE001 - not made yet
            return None

    try:
        cut_off.start()
        first = wait_for(holder, timeout=30, what="op-a to hold the Lease")
        assert first.startswith("op-a_")
        standby.start()
        wait_for(lambda: "waits to take over" in standby.text(), timeout=30, what="op-b to wait")
        proxy.cut()
        cut = time.monotonic()
        cut_off.proc.proc.wait(15)
        exited = time.monotonic() - cut
        assert cut_off.proc.proc.returncode == 1
        assert "leadership lost, exiting at once" in cut_off.text()
        # Its last renewal was at most one retry period (1.2 s) before the cut, its renew deadline is
        # 4 s after that, and the standby may take over 6 s after it: it must be gone by then.
        assert exited < 6 - 1.2, exited
        assert holder() == first, "op-b took the Lease while op-a could still have been acting"
        took = wait_for(lambda: (h := holder()) and h.startswith("op-b_") and time.monotonic() - cut, timeout=15,
                        interval=0.05, what="op-b to take the Lease")
        assert took > exited, (took, exited)
        assert 6 - 1.2 <= took <= 6 + 2 * 1.2 + 1.5, took
        print(f"leader cut off: exited {exited:.1f} s after the cut, the standby took the Lease {took:.1f} s after it")
    finally:
        standby.stop()
        cut_off.stop()
        proxy.close()
    assert "Traceback" not in standby.text() + cut_off.text()


def test_a_leader_stopped_cleanly_hands_the_lease_over_at_once(control_plane, namespace, kube, tmp_path):
    """SIGTERM (an upgrade, a drain): the leader finishes, gives the Lease up, and the standby takes it
    without waiting out the lease duration."""
    from lightkube.resources.coordination_v1 import Lease

    lease_args = ("--lease-namespace", namespace, "--lease-duration", "10")
    ops = {who: Operator(control_plane.kubeconfig, tmp_path / f"{who}.log", args=lease_args, env={"POD_NAME": who})
           for who in ("op-a", "op-b")}

    def lease():
        try:
            return kube.get(Lease, "lorafleet-operator", namespace=namespace).spec
        except Exception:  # noqa: BLE001 - not made yet
            return None

    try:
        ops["op-a"].start()
        wait_for(lambda: (s := lease()) and s.holderIdentity, timeout=30, what="op-a to hold the Lease")
        ops["op-b"].start()
        wait_for(lambda: "waits to take over" in ops["op-b"].text(), timeout=30, what="op-b to wait")
        before = lease()
        assert before.holderIdentity.startswith("op-a_")
        stopped = time.monotonic()
        ops["op-a"].stop()  # SIGTERM, then waits for the exit
        assert ops["op-a"].log.read_text().count("released by op-a_") == 1
        spec = wait_for(lambda: (s := lease()) and (s.holderIdentity or "").startswith("op-b_") and s, timeout=15,
                        interval=0.05, what="op-b to take the Lease")
        took = time.monotonic() - stopped
        # Released: taken within one retry period (2 s) of the leader's exit, not 10 s after.
        assert took < 6, took
        assert spec.leaseTransitions == (before.leaseTransitions or 0) + 1
        wait_for(lambda: "store primed" in ops["op-b"].text(), timeout=30, what="op-b to start the operator")
        print(f"clean hand-over: the standby held the Lease {took:.1f} s after SIGTERM to the leader")
    finally:
        for op in ops.values():
            op.stop()
    for op in ops.values():
        assert "Traceback" not in op.text(), op.text()[-3000:]
