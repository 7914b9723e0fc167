"""The package layout works the way users and developers rely on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_py(code: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, env=env)


def test_repo_root_does_not_shadow_stdlib_operator():
    # `python -m pytest` puts the repo root first on sys.path; `operator/` must not win over the stdlib.
    r = run_py("""
        import sys; sys.path.insert(0, '')
        import operator
        assert operator.add(2, 3) == 5, operator
        assert 'site-packages' not in operator.__file__ and 'lib/python' in operator.__file__, operator.__file__
        import lorafleet.operator.main as m
        print(m.__file__)
    """, env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # this checkout, wherever the editable install points
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == REPO / "operator" / "main.py"


def test_python_m_pytest_from_repo_root_collects():
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/unit/test_digest.py"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_digest" in r.stdout


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """lorafleet installed from a wheel build (not the checkout), as an image would have it."""
    target = tmp_path_factory.mktemp("wheel-install")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(REPO)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return target


def test_wheel_contains_every_module(wheel_install: Path):
    for folder, package in [("contracts", "contracts"), ("operator", "operator"), ("sidecar", "sidecar"),
                            ("runtime", "runtime"), ("gateway", "gateway"), ("src/lorafleet", "")]:
        for src in (REPO / folder).rglob("*.py"):
            rel = src.relative_to(REPO / folder)
            installed = wheel_install / "lorafleet" / package / rel
            assert installed.is_file(), f"{src.relative_to(REPO)} is missing from the wheel " \
                                        f"(add its package to [tool.setuptools] packages in pyproject.toml)"


def test_import_layering(wheel_install: Path, tmp_path: Path):
    """contracts <- {operator, sidecar, runtime}; no imports between the three; no torch in the
    control plane. Checked by import-linter on the wheel install (contracts in pyproject.toml)."""
    # grimp (import-linter's graph builder) only walks regular packages, and lorafleet.operator is a
    # namespace package (operator/ has no __init__.py, see test above): give the linter's copy one.
    lint_copy = tmp_path / "lint"
    shutil.copytree(wheel_install / "lorafleet", lint_copy / "lorafleet")
    (lint_copy / "lorafleet" / "operator" / "__init__.py").touch()
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(lint_copy), "PATH": str(lint.parent)}
    r = subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"], cwd=lint_copy,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def test_control_plane_imports_without_torch(wheel_install: Path):
    """The control image (operator, sidecar, gateway) has no torch: every module of those and of
    contracts, and the `lorafleet` command, must import with torch absent."""
    r = run_py(f"""
        import importlib, pkgutil, sys
        sys.path.insert(0, {str(wheel_install)!r})
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'peft', 'safetensors.torch'):
                    raise ImportError(f'{{name}} is not installed in the control image')
        sys.meta_path.insert(0, NoTorch())
        import lorafleet
        assert lorafleet.__file__.startswith({str(wheel_install)!r}), lorafleet.__file__
        imported = []
        for pkg in ('lorafleet.contracts', 'lorafleet.operator', 'lorafleet.sidecar', 'lorafleet.gateway'):
            mod = importlib.import_module(pkg)
            for info in pkgutil.walk_packages(mod.__path__, pkg + '.'):
                importlib.import_module(info.name)
                imported.append(info.name)
        import lorafleet.cli
        assert 'torch' not in sys.modules
        print(len(imported))
    """, cwd=wheel_install)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 5


def test_cli_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "lorafleet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for sub in ("operator", "sidecar", "runtime", "serve", "push", "digest", "gen-crds"):
        assert sub in r.stdout
