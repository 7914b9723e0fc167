"""lorafleet: serve thousands of tenants' LoRA adapters on Kubernetes."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

COMPONENTS = ("contracts", "operator", "sidecar", "runtime", "gateway")


class _CheckoutFinder:
    """Finds ``lorafleet.<component>`` in a source checkout, where each component is a top-level folder
    (``operator/`` has no ``__init__.py``, so it can never shadow the standard library's ``operator``).
    An installed wheel has them inside the package and never installs this finder."""

    def __init__(self, root: Path):
        self.root = str(root)

    def find_spec(self, fullname: str, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == "lorafleet" and name in COMPONENTS:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.root])
        return None


def _install_checkout_finder() -> None:
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "contracts" / "__init__.py").is_file():
        if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _CheckoutFinder(root))


_install_checkout_finder()
