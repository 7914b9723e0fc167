"""The operator running for real (``lorafleet operator`` as a subprocess) against the test control
plane: one per test module."""

from __future__ import annotations

import pytest

from lf_operator_kit import Operator


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log").start()
    yield op
    op.stop()
    # A crash or a traceback in the operator fails the module even when every wait passed.
    assert "Traceback" not in op.text(), op.text()[-5000:]


@pytest.fixture(autouse=True)
def acme_tenant(request):
    """Tenant ``acme`` (whose adapters ``lf_operator_kit.adapter_doc`` makes) in the test's namespace,
    allowed every ``s3://adapters/`` source: the operator routes an adapter only from its tenant's
    spec.sources. Tests about tenants use other tenant names."""
    if "namespace" not in request.fixturenames:
        return
    from lf_operator_kit import apply, tenant_doc

    apply(request.getfixturevalue("control_plane"), request.getfixturevalue("namespace"), tenant_doc())
