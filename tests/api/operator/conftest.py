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
