"""``lorafleet operator``."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    print("lorafleet operator: not implemented yet", file=sys.stderr)
    return 2
