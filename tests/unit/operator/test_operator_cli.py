"""``lorafleet operator``'s flags: one namespace or many, or the whole cluster."""

from __future__ import annotations

import pytest

from lorafleet.operator.cli import parse


def test_namespaces_repeat_and_default_to_the_whole_cluster():
    assert parse([]).namespace == [] and not parse([]).all_namespaces
    args = parse(["-n", "team-a", "--namespace", "team-*", "--verbose", "--liveness", "http://0.0.0.0:8080/healthz"])
    assert args.namespace == ["team-a", "team-*"] and args.verbose
    assert args.liveness == "http://0.0.0.0:8080/healthz"


def test_namespace_and_all_namespaces_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse(["-A", "-n", "x"])
    assert "not allowed with" in capsys.readouterr().err
